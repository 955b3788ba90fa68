//! Identifier newtypes. Never aliases: a `BlockId` cannot be passed where a
//! `SeqId` is expected, and a stale `SeqId` can never alias a reused slot.

use core::fmt;
use core::num::NonZeroU32;

/// A physical block inside one pool: an index into that pool's slot array.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct BlockId(pub u32);

impl BlockId {
    /// The index as `usize`, for slicing.
    #[inline]
    pub const fn index(self) -> usize {
        self.0 as usize
    }
}

impl fmt::Display for BlockId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "block#{}", self.0)
    }
}

/// A sequence (request) handle: slot index plus generation, as slotmap keys do.
///
/// When a sequence is freed its slot's generation moves on, so an old `SeqId`
/// is answered with [`Error::UnknownSequence`](crate::Error::UnknownSequence)
/// instead of silently naming whatever sequence reuses the slot.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct SeqId {
    /// Slot index in the sequence store.
    pub index: u32,
    /// Generation of the slot when this id was handed out.
    pub generation: NonZeroU32,
}

impl fmt::Display for SeqId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "seq#{}v{}", self.index, self.generation)
    }
}

/// A pending two-phase move (swap out, swap in, move between devices).
/// Generational like [`SeqId`]: committing or aborting a finished plan is an error.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct PlanId {
    /// Slot index in the plan store.
    pub index: u32,
    /// Generation of the slot when this id was handed out.
    pub generation: NonZeroU32,
}

impl fmt::Display for PlanId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "plan#{}v{}", self.index, self.generation)
    }
}

/// A chained 128-bit prefix key of one full block (see [`crate::hash`]).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct BlockHash(pub u128);

impl fmt::Display for BlockHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

/// Logical time, supplied by the caller (the core never reads a clock).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Tick(pub u64);

/// One pool (a device's block pool, or the host tier) inside a [`crate::KvCache`].
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct PoolId(pub u16);

impl fmt::Display for PoolId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pool#{}", self.0)
    }
}

/// A per-tenant cache salt. Keys computed under different salts are disjoint,
/// so tenants never share blocks (nor learn through timing what another cached).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct CacheSalt(pub u128);
