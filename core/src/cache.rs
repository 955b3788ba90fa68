//! [`KvCache`]: sequences and their block tables across pools, the object
//! an engine (or the manager) drives every scheduler step.
//!
//! # Workflow
//!
//! 1. [`KvCache::allocate`] a prompt: full blocks are hashed along the chain,
//!    the prefix index is walked until the first miss (each hit gains a
//!    holder), the rest comes from the free stack or by eviction, and newly
//!    filled blocks are registered under their keys.
//! 2. [`KvCache::append`] decode tokens: a new block when the last one fills;
//!    copy-on-write when the last block is shared and partly filled.
//! 3. [`KvCache::fork`] for parallel sampling; [`KvCache::share_prefix`] to
//!    give an empty sequence another's prefix.
//! 4. Under pressure, [`KvCache::swap_out`] / [`KvCache::swap_in`] /
//!    [`KvCache::move_to`] plan a two-phase move: targets reserved, copies
//!    listed by [`KvCache::plan`]; then [`KvCache::commit`] (sources released,
//!    keys published in the target pool) or [`KvCache::abort`] (nothing moved).
//!    Tier moves of cached blocks ([`KvCache::offload`], [`KvCache::promote`])
//!    and copy-on-write ahead of an append ([`KvCache::cow`]) are plans too.
//! 5. [`KvCache::free`]: blocks lose a holder, tail first, so a finished
//!    request's last blocks are evicted before its first ones.
//!
//! Registration is immediate, as in vLLM v1: a block is published once its
//! tokens are known, because a caller runs the step that computes it before
//! any later step can read it. Moves publish their target blocks only at
//! commit, so a failed transfer can never be hit.
#![allow(
    clippy::cast_possible_truncation,
    reason = "block and token counts are checked against u32 limits (table rows, pool capacity, LengthOverflow) before narrowing"
)]

use core::num::NonZeroU32;

use crate::error::{Error, Result};
use crate::events::KvEvent;
use crate::hash::BlockHasher;
use crate::ids::{BlockHash, BlockId, CacheSalt, PoolId, SeqId};
use crate::plan::PlanSlot;
use crate::pool::{BlockPool, PoolKind};
use crate::prompt::{KeyChain, Prompt};
use crate::slab::{Entry, Links, NIL, Slab};
use crate::storage::Slots;

/// Pools one cache can hold.
pub const MAX_POOLS: usize = 8;
/// Table entry of a block dropped by a sliding window, and the source of a
/// plan position that copies nothing (never exported as a real id).
pub const HOLE: BlockId = BlockId(u32::MAX);

/// Shape of a [`KvCache`]'s fixed storage.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct CacheConfig {
    /// Tokens per block (all pools agree).
    pub tokens_per_block: u32,
    /// Sequences alive at once.
    pub max_seqs: u32,
    /// Blocks in one sequence's table (longest sequence / tokens per block).
    pub max_blocks_per_seq: u32,
    /// Two-phase moves pending at once.
    pub max_plans: u32,
}

impl CacheConfig {
    fn validate(&self) -> Result<NonZeroU32> {
        let bs = NonZeroU32::new(self.tokens_per_block).ok_or(Error::ZeroTokensPerBlock)?;
        if self.max_seqs == 0 || self.max_blocks_per_seq == 0 {
            return Err(Error::ZeroCapacity);
        }
        if self.max_seqs == NIL || self.max_plans == NIL {
            return Err(Error::CapacityTooLarge {
                requested: u64::from(self.max_seqs.max(self.max_plans)),
                max: NIL - 1,
            });
        }
        Ok(bs)
    }
    fn times_width(&self, n: u32) -> Result<usize> {
        (n as usize)
            .checked_mul(self.max_blocks_per_seq as usize)
            .ok_or(Error::LengthOverflow)
    }
    fn pending_len(&self) -> Result<usize> {
        (self.max_seqs as usize)
            .checked_mul(self.tokens_per_block as usize)
            .ok_or(Error::LengthOverflow)
    }
}

/// Per-sequence metadata (opaque; `EMPTY` for static storage).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct SeqSlot {
    pub(crate) links: Links,
    /// Decode blocks are hashed and registered as they fill.
    pub(crate) hashing: bool,
    /// The KV went through a lossy transfer (compression): never published.
    pub(crate) lossy: bool,
    pub(crate) pool: u16,
    pub(crate) tokens: u32,
    /// Lookahead slots reserved past `tokens` (see `KvCache::reserve`).
    pub(crate) reserve: u32,
    /// Table length: the blocks of `tokens + reserve`.
    pub(crate) blocks: u32,
    pub(crate) first_live: u32,
    /// Leading blocks whose keys are known (`tip` is the last one's).
    pub(crate) keyed_blocks: u32,
    /// Leading blocks that were prefix hits when the sequence was placed
    /// (the eviction policy's signal: shared, or a conversation that came back).
    pub(crate) hits: u32,
    pub(crate) window: u32,
    /// The pending plan moving this sequence, or `NIL`.
    pub(crate) plan: u32,
    /// Bumped whenever the table changes anywhere but at its end (see
    /// `KvCache::export_block_tables_since`).
    pub(crate) edits: u32,
    pub(crate) salt: Option<CacheSalt>,
    pub(crate) adapter: Option<u64>,
    pub(crate) tip: BlockHash,
}

impl SeqSlot {
    /// An unused slot.
    pub const EMPTY: Self = Self {
        links: Links::EMPTY,
        hashing: false,
        lossy: false,
        pool: 0,
        tokens: 0,
        reserve: 0,
        blocks: 0,
        first_live: 0,
        keyed_blocks: 0,
        hits: 0,
        window: 0,
        plan: NIL,
        edits: 0,
        salt: None,
        adapter: None,
        tip: BlockHash(0),
    };
}

impl Entry for SeqSlot {
    const EMPTY: Self = SeqSlot::EMPTY;
    fn links(&self) -> &Links {
        &self.links
    }
    fn links_mut(&mut self) -> &mut Links {
        &mut self.links
    }
}

/// Storage of a [`KvCache`], borrowed or owned. Lengths from [`CacheConfig`]:
/// `seqs` = `max_seqs`, `tables` = `max_seqs × max_blocks_per_seq`, `pending`
/// = `max_seqs × tokens_per_block`, `plans` = `max_plans`, `plan_targets`
/// and `plan_sources` = `max_plans × max_blocks_per_seq`.
#[derive(Debug)]
pub struct CacheStorage<'a> {
    /// Sequence slots.
    pub seqs: Slots<'a, SeqSlot>,
    /// Block-table rows.
    pub tables: Slots<'a, BlockId>,
    /// Tokens of each sequence's partly filled last block.
    pub pending: Slots<'a, u32>,
    /// Plan slots.
    pub plans: Slots<'a, PlanSlot>,
    /// Target blocks of each plan.
    pub plan_targets: Slots<'a, BlockId>,
    /// Source blocks of each tier plan (offload, promote).
    pub plan_sources: Slots<'a, BlockId>,
}

impl CacheStorage<'_> {
    /// Owned storage sized for `config`; a typed error (never an abort) when
    /// the allocator refuses.
    #[cfg(feature = "alloc")]
    pub fn owned(config: &CacheConfig) -> Result<Self> {
        config.validate()?;
        Ok(Self {
            seqs: Slots::try_owned(config.max_seqs as usize, SeqSlot::EMPTY)?,
            tables: Slots::try_owned(config.times_width(config.max_seqs)?, HOLE)?,
            pending: Slots::try_owned(config.pending_len()?, 0)?,
            plans: Slots::try_owned(config.max_plans as usize, PlanSlot::EMPTY)?,
            plan_targets: Slots::try_owned(config.times_width(config.max_plans)?, HOLE)?,
            plan_sources: Slots::try_owned(config.times_width(config.max_plans)?, HOLE)?,
        })
    }
}

/// Sequences, block tables, tiers of pools and two-phase moves.
#[derive(Debug)]
pub struct KvCache<'a, H: BlockHasher> {
    pub(crate) config: CacheConfig,
    pub(crate) bs: crate::blocksize::BlockSize,
    /// Entries per table row (`max_blocks_per_seq`).
    pub(crate) width: usize,
    pub(crate) hasher: H,
    pub(crate) pools: heapless::Vec<BlockPool<'a>, MAX_POOLS>,
    pub(crate) seqs: Slab<'a, SeqSlot>,
    pub(crate) tables: Slots<'a, BlockId>,
    pub(crate) pending: Slots<'a, u32>,
    pub(crate) plans: Slab<'a, PlanSlot>,
    pub(crate) plan_targets: Slots<'a, BlockId>,
    pub(crate) plan_sources: Slots<'a, BlockId>,
}

/// `[i × width, (i + 1) × width)` of `v`, or empty past its end.
#[inline]
pub(crate) fn row_of<T>(v: &[T], i: u32, width: usize) -> &[T] {
    let s = i as usize * width;
    v.get(s..s + width).unwrap_or(&[])
}

#[inline]
pub(crate) fn row_of_mut<T>(v: &mut [T], i: u32, width: usize) -> &mut [T] {
    let s = i as usize * width;
    v.get_mut(s..s + width).unwrap_or(&mut [])
}

impl<'a, H: BlockHasher> KvCache<'a, H> {
    /// A cache over `storage` (see [`CacheStorage`] for the lengths).
    pub fn new(config: CacheConfig, storage: CacheStorage<'a>, hasher: H) -> Result<Self> {
        let bs = config.validate()?;
        let CacheStorage {
            seqs,
            tables,
            pending,
            plans,
            plan_targets,
            plan_sources,
        } = storage;
        let checks = [
            (config.max_seqs as usize, seqs.len()),
            (config.times_width(config.max_seqs)?, tables.len()),
            (config.pending_len()?, pending.len()),
            (config.max_plans as usize, plans.len()),
            (config.times_width(config.max_plans)?, plan_targets.len()),
            (config.times_width(config.max_plans)?, plan_sources.len()),
        ];
        for (needed, provided) in checks {
            if provided < needed {
                return Err(Error::StorageTooSmall { needed, provided });
            }
        }
        Ok(Self {
            config,
            bs: crate::blocksize::BlockSize::new(bs),
            width: config.max_blocks_per_seq as usize,
            hasher,
            pools: heapless::Vec::new(),
            seqs: Slab::new(seqs, config.max_seqs),
            tables,
            pending,
            plans: Slab::new(plans, config.max_plans),
            plan_targets,
            plan_sources,
        })
    }

    /// A cache with owned storage.
    #[cfg(feature = "alloc")]
    pub fn with_config(config: CacheConfig, hasher: H) -> Result<Self> {
        let storage = CacheStorage::owned(&config)?;
        Self::new(config, storage, hasher)
    }

    /// The configuration.
    pub fn config(&self) -> &CacheConfig {
        &self.config
    }

    /// The block hasher.
    pub fn hasher(&self) -> &H {
        &self.hasher
    }

    /// Adds a pool; its id must be unused and its tokens per block the cache's.
    pub fn add_pool(&mut self, pool: BlockPool<'a>) -> Result<PoolId> {
        let id = pool.id();
        if pool.tokens_per_block() != self.config.tokens_per_block {
            return Err(Error::TokensPerBlockMismatch {
                expected: self.config.tokens_per_block,
                found: pool.tokens_per_block(),
            });
        }
        if self.pools.iter().any(|p| p.id() == id) {
            return Err(Error::DuplicatePool(id));
        }
        self.pools.push(pool).map_err(|_| Error::TooManyPools)?;
        Ok(id)
    }

    pub(crate) fn pool_index(&self, id: PoolId) -> Result<usize> {
        self.pools
            .iter()
            .position(|p| p.id() == id)
            .ok_or(Error::UnknownPool(id))
    }

    /// A pool.
    pub fn pool(&self, id: PoolId) -> Result<&BlockPool<'a>> {
        let i = self.pool_index(id)?;
        self.pools.get(i).ok_or(Error::UnknownPool(id))
    }

    /// A pool, mutably: crate-private, so that every change of a block's
    /// holders goes through a sequence or a plan the invariants can see.
    pub(crate) fn pool_mut(&mut self, id: PoolId) -> Result<&mut BlockPool<'a>> {
        let i = self.pool_index(id)?;
        self.pools.get_mut(i).ok_or(Error::UnknownPool(id))
    }

    /// Every pool.
    pub fn pools(&self) -> &[BlockPool<'a>] {
        &self.pools
    }

    // ---- what a caller may do to a pool directly ------------------------------

    /// Sets how `pool` orders its cached blocks for eviction (see
    /// [`EvictionPolicy`](crate::EvictionPolicy)).
    pub fn set_eviction_policy(&mut self, pool: PoolId, p: crate::EvictionPolicy) -> Result<()> {
        self.pool_mut(pool)?.set_eviction_policy(p)
    }

    /// Evicts the next cached block of `pool` in its eviction order, if any. O(1).
    pub fn evict_one(&mut self, pool: PoolId) -> Result<Option<(BlockId, BlockHash)>> {
        Ok(self.pool_mut(pool)?.evict_one())
    }

    /// Evicts one cached block of `pool` (for example past a time-to-live). O(1).
    pub fn evict(&mut self, pool: PoolId, b: BlockId) -> Result<BlockHash> {
        self.pool_mut(pool)?.evict(b)
    }

    /// Brings `n` more blocks of `pool` into service (see [`BlockPool::grow`]).
    pub fn grow(&mut self, pool: PoolId, n: u32) -> Result<u32> {
        self.pool_mut(pool)?.grow(n)
    }

    /// Takes blocks `to..` of `pool` out of service (see [`BlockPool::shrink`]).
    pub fn shrink(&mut self, pool: PoolId, to: u32) -> Result<()> {
        self.pool_mut(pool)?.shrink(to)
    }

    /// Drops every key of `pool` (see [`BlockPool::reset_prefix_cache`]).
    pub fn reset_prefix_cache(&mut self, pool: PoolId) -> Result<()> {
        self.pool_mut(pool)?.reset_prefix_cache();
        Ok(())
    }

    /// The oldest undrained event of `pool`.
    pub fn pop_event(&mut self, pool: PoolId) -> Result<Option<KvEvent>> {
        Ok(self.pool_mut(pool)?.pop_event())
    }

    /// Turns event recording of every pool on or off.
    pub fn set_events_enabled(&mut self, on: bool) {
        for p in self.pools.iter_mut() {
            p.set_events_enabled(on);
        }
    }

    // ---- counts and views ---------------------------------------------------------

    /// Live sequences.
    pub fn len(&self) -> u32 {
        self.seqs.len()
    }

    /// Whether no sequence is live.
    pub fn is_empty(&self) -> bool {
        self.seqs.len() == 0
    }

    /// Pending plans.
    pub fn pending_plans(&self) -> u32 {
        self.plans.len()
    }

    pub(crate) fn slot(&self, id: SeqId) -> Result<&SeqSlot> {
        self.seqs
            .get(id.index, id.generation)
            .ok_or(Error::UnknownSequence(id))
    }

    pub(crate) fn seq_id(&self, index: u32) -> SeqId {
        SeqId {
            index,
            generation: self.seqs.generation(index),
        }
    }

    pub(crate) fn row(&self, index: u32) -> &[BlockId] {
        row_of(&self.tables, index, self.width)
    }

    /// Blocks holding `tokens` tokens.
    #[inline]
    pub(crate) fn blocks_for(&self, tokens: u64) -> u64 {
        self.bs.blocks_for(tokens)
    }

    pub(crate) fn check_table_fits(&self, blocks: u64, pi: usize) -> Result<()> {
        if blocks > u64::from(self.config.max_blocks_per_seq) {
            return Err(Error::SequenceTooLong {
                blocks,
                max_blocks: self.config.max_blocks_per_seq,
            });
        }
        let capacity = self.pools.get(pi).map_or(0, BlockPool::max_blocks);
        if blocks > u64::from(capacity) {
            return Err(Error::LargerThanPool {
                needed: blocks,
                capacity,
            });
        }
        Ok(())
    }

    /// A sequence that can take tokens: not moving, in a device pool.
    pub(crate) fn active(&self, id: SeqId) -> Result<(&SeqSlot, usize)> {
        let s = self.slot(id)?;
        if s.plan != NIL {
            return Err(Error::SequenceBusy(id));
        }
        let pi = self.pool_index(PoolId(s.pool))?;
        if self.pools.get(pi).map(BlockPool::kind) != Some(PoolKind::Device) {
            return Err(Error::SequenceSwappedOut(id));
        }
        Ok((s, pi))
    }

    /// Where a sequence is and what it holds.
    pub fn info(&self, id: SeqId) -> Result<SeqInfo> {
        let s = self.slot(id)?;
        Ok(SeqInfo {
            pool: PoolId(s.pool),
            tokens: s.tokens,
            reserved: s.reserve,
            blocks: s.blocks,
            first_live: s.first_live,
            moving: s.plan != NIL,
            salt: s.salt,
            lossy: s.lossy,
        })
    }

    /// A sequence's slot and table, in one lookup (for the exports).
    #[inline]
    pub(crate) fn slot_table(&self, id: SeqId) -> Result<(&SeqSlot, &[BlockId])> {
        let s = self.slot(id)?;
        Ok((
            s,
            self.row(id.index).get(..s.blocks as usize).unwrap_or(&[]),
        ))
    }

    /// The block table of a sequence (entries before `first_live` are [`HOLE`]).
    pub fn table(&self, id: SeqId) -> Result<&[BlockId]> {
        let s = self.slot(id)?;
        Ok(self.row(id.index).get(..s.blocks as usize).unwrap_or(&[]))
    }

    /// The chained keys of `prompt`'s full blocks that prefix matching uses
    /// (hashed token ids, or its precomputed keys bound to its salt and extra
    /// keys), in order, passed to `f`. What [`allocate`](Self::allocate)
    /// would look up, for a caller that needs them first (a tier promotion).
    pub fn prompt_keys(&self, prompt: &Prompt<'_>, mut f: impl FnMut(BlockHash)) -> Result<()> {
        let full = prompt.token_len()? / self.bs;
        let chain = KeyChain::new(&self.hasher, prompt, self.bs.get(), full)?;
        let mut tip = chain.root();
        for i in 0..chain.matchable() {
            tip = chain.key(i, tip);
            f(tip);
        }
        Ok(())
    }

    /// Ids of the live sequences.
    pub fn seq_ids(&self) -> impl Iterator<Item = SeqId> + '_ {
        self.seqs.iter().map(|(i, _)| self.seq_id(i))
    }
}

/// Where a sequence is and what it holds.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct SeqInfo {
    /// The pool holding its blocks.
    pub pool: PoolId,
    /// Tokens.
    pub tokens: u32,
    /// Lookahead slots reserved past the tokens.
    pub reserved: u32,
    /// Table length (including holes left by a sliding window, and the
    /// blocks of reserved slots).
    pub blocks: u32,
    /// First table entry that is not a hole.
    pub first_live: u32,
    /// Whether a move is pending.
    pub moving: bool,
    /// Tenant salt.
    pub salt: Option<CacheSalt>,
    /// Whether its KV went through a lossy transfer (compression): such
    /// blocks are never published in the prefix cache.
    pub lossy: bool,
}
