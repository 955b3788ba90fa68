//! The block pool: fixed capacity, reference counts, a free stack, the
//! eviction order of cached blocks (LRU by default; see [`EvictionPolicy`])
//! and the prefix index, all intrusive in one array of 24-byte slots.
//!
//! # Block states
//!
//! | state | holders | key | list |
//! |---|---|---|---|
//! | free | 0 | none | free stack (reused first) |
//! | cached | 0 | yes | eviction order (the next victim at the head) |
//! | used | ≥ 1 | none | none |
//! | used, keyed | ≥ 1 | yes | none |
//!
//! Every operation is O(1) per block: allocate pops the free stack, or
//! evicts the head of the eviction order; release pushes a keyed block at the
//! eviction order's tail and an unkeyed one on the free stack; a prefix hit
//! unlinks a cached block from the middle of the eviction order.
//!
//! # Memory
//!
//! A slot is 24 bytes: the 128-bit key, and two `u32` words that are `prev`
//! and `next` links while the block is in a list (the top two bits of `prev`
//! hold a cached block's eviction class), the reference count while it is
//! held (with a pin bit and a shared bit; the top two bits of the second word
//! hold the state, the next one marks a block inside a run: see `runs`). The
//! prefix index adds 1.5 entries of 4 bytes per block (sized for every block
//! heading its own run, as on host pools). Total: **30 bytes per block**,
//! counted by `size_of::<BlockSlot>() + 4 * buckets_for(n) / n` (see the
//! `metadata_bytes_per_block` test; small pools round up to whole buckets).
#![allow(
    clippy::cast_possible_truncation,
    reason = "block indices fit in 29 bits: the constructor refuses pools over MAX_BLOCKS; key halves are split on purpose"
)]

mod check;
mod lists;
mod ops;
mod order;
mod runs;

pub use order::{EvictionPolicy, Retention};

use crate::error::{Error, Result};
use crate::events::{EventQueue, KvEvent};
use crate::ids::{BlockHash, BlockId, PoolId};
use crate::prefix::{PrefixIndex, buckets_for};
use crate::stats::PoolStats;
use crate::storage::Slots;

const STATE_SHIFT: u32 = 30;
/// A keyed block inside a run: block `i - 1` carries its chain parent, and
/// it is found from there rather than through the hash index (see `runs`).
const RUN_BIT: u32 = 1 << (STATE_SHIFT - 1);
const LINK_MASK: u32 = RUN_BIT - 1;
const NIL: u32 = LINK_MASK;
const FREE: u32 = 0;
const CACHED: u32 = 1;
const USED: u32 = 2;
const USED_KEYED: u32 = 3;

/// Largest number of blocks in one pool (ids must fit in 29 bits).
pub const MAX_BLOCKS: u32 = NIL - 1;

/// Per-block metadata. Opaque; exposed so firmware can declare storage
/// (`static mut SLOTS: [BlockSlot; N] = [BlockSlot::EMPTY; N]`).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct BlockSlot {
    key_lo: u64,
    key_hi: u64,
    /// `prev` link (in a list) or reference count (held).
    a: u32,
    /// State in the top two bits, the run mark, `next` link in the rest.
    b: u32,
}

impl BlockSlot {
    /// An unused slot (the pool initialises every slot itself).
    pub const EMPTY: Self = Self {
        key_lo: 0,
        key_hi: 0,
        a: 0,
        b: 0,
    };

    #[inline]
    fn state(&self) -> u32 {
        self.b >> STATE_SHIFT
    }
    #[inline]
    fn next(&self) -> u32 {
        self.b & LINK_MASK
    }
    /// Sets the state and link. A block keeps its run mark unless it
    /// becomes free (pins and list moves of a run's blocks keep it).
    #[inline]
    fn set(&mut self, state: u32, next: u32) {
        let run = if state == FREE { 0 } else { self.b & RUN_BIT };
        self.b = (state << STATE_SHIFT) | run | next;
    }
    /// Inside a run (not in the hash index; see `runs`).
    #[inline]
    fn in_run(&self) -> bool {
        self.b & RUN_BIT != 0
    }
    #[inline]
    fn set_in_run(&mut self, on: bool) {
        self.b = (self.b & !RUN_BIT) | if on { RUN_BIT } else { 0 };
    }
    #[inline]
    fn key(&self) -> BlockHash {
        BlockHash(u128::from(self.key_lo) | (u128::from(self.key_hi) << 64))
    }
    #[inline]
    fn set_key(&mut self, k: BlockHash) {
        self.key_lo = k.0 as u64;
        self.key_hi = (k.0 >> 64) as u64;
    }
    #[inline]
    fn is_keyed(&self) -> bool {
        matches!(self.state(), CACHED | USED_KEYED)
    }
    #[inline]
    fn is_held(&self) -> bool {
        self.state() >= USED
    }
}

/// What kind of memory a pool's blocks live in; decides which moves are swaps.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum PoolKind {
    /// Accelerator memory: sequences run here.
    Device,
    /// Host memory: the swap and offload tier.
    Host,
}

/// How a pool is set up.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct PoolConfig {
    /// The pool's id inside its cache.
    pub id: PoolId,
    /// Device or host.
    pub kind: PoolKind,
    /// Tokens per block (the same for every pool of a cache).
    pub tokens_per_block: u32,
}

impl PoolConfig {
    /// A device pool with id `id`.
    pub const fn device(id: u16, tokens_per_block: u32) -> Self {
        Self {
            id: PoolId(id),
            kind: PoolKind::Device,
            tokens_per_block,
        }
    }
    /// A host pool with id `id`.
    pub const fn host(id: u16, tokens_per_block: u32) -> Self {
        Self {
            id: PoolId(id),
            kind: PoolKind::Host,
            tokens_per_block,
        }
    }
}

/// Outcome of [`BlockPool::register`].
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Registered {
    /// The block now carries the key and can be hit.
    Stored,
    /// Another block already carries the key (two sequences computed the same
    /// block at once); the block stays unkeyed and returns to the free stack
    /// when released. The index is untouched.
    Duplicate(BlockId),
    /// The index found no room without a long displacement chain (at most
    /// 2/3 load with 8-way buckets, this essentially never happens); the
    /// block stays unkeyed, a missed caching opportunity and nothing worse.
    IndexFull,
}

/// A broken internal invariant, found by `check_invariants`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Invariant {
    /// What does not hold.
    pub what: &'static str,
    /// An index (block, sequence or plan) where it was seen, if any.
    pub at: Option<u32>,
}

impl core::fmt::Display for Invariant {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self.at {
            Some(i) => write!(f, "invariant broken at {i}: {}", self.what),
            None => write!(f, "invariant broken: {}", self.what),
        }
    }
}

#[inline]
pub(crate) fn ensure(cond: bool, what: &'static str, at: Option<u32>) -> Result<(), Invariant> {
    if cond {
        Ok(())
    } else {
        Err(Invariant { what, at })
    }
}

/// A fixed-capacity pool of KV blocks with reference counts, a prefix index
/// and LRU eviction of cached blocks.
///
/// ```
/// use pagedkv_core::{BlockPool, PoolConfig, BlockSlot, BlockHash, buckets_for};
/// let mut slots = [BlockSlot::EMPTY; 8];
/// let mut index = [0u32; buckets_for(8)];
/// let mut pool = BlockPool::new(PoolConfig::device(0, 16), &mut slots, &mut index).unwrap();
/// let b = pool.allocate_one().unwrap();
/// pool.register(b, BlockHash(42), None).unwrap();
/// pool.release(b).unwrap();                 // cached: reusable, still a hit
/// assert_eq!(pool.acquire(BlockHash(42)), Some(b));
/// pool.release(b).unwrap();
/// pool.check_invariants().unwrap();
/// ```
#[derive(Debug)]
pub struct BlockPool<'a> {
    config: PoolConfig,
    slots: Slots<'a, BlockSlot>,
    index: PrefixIndex<'a>,
    /// Blocks `0..online` are in service; the rest are offline (not backed
    /// by memory), or draining (held, and offline once released).
    online: u32,
    free_head: u32,
    free_len: u32,
    /// Per class of the eviction order: head, tail, length.
    evict: order::Classes,
    evict_len: u32,
    policy: EvictionPolicy,
    /// `policy` is not LRU.
    ranked: bool,
    held: u32,
    /// Keyed blocks inside runs (not in the hash index).
    in_runs: u32,
    stats: PoolStats,
    events: EventQueue<'a>,
}

impl<'a> BlockPool<'a> {
    /// A pool over caller storage: one slot per block, and an index table of
    /// at least [`buckets_for`](crate::buckets_for)`(slots.len())` entries.
    pub fn new(
        config: PoolConfig,
        slots: impl Into<Slots<'a, BlockSlot>>,
        index: impl Into<Slots<'a, u32>>,
    ) -> Result<Self> {
        let mut slots = slots.into();
        let index = index.into();
        if config.tokens_per_block == 0 {
            return Err(Error::ZeroTokensPerBlock);
        }
        if slots.is_empty() {
            return Err(Error::ZeroCapacity);
        }
        if slots.len() > MAX_BLOCKS as usize {
            return Err(Error::CapacityTooLarge {
                requested: slots.len() as u64,
                max: MAX_BLOCKS,
            });
        }
        let capacity = slots.len() as u32;
        let buckets = buckets_for(capacity);
        if index.len() < buckets {
            return Err(Error::StorageTooSmall {
                needed: buckets,
                provided: index.len(),
            });
        }
        // Free stack in id order: block 0 is handed out first.
        let mut next = NIL;
        for (i, s) in slots.iter_mut().enumerate().rev() {
            *s = BlockSlot::EMPTY;
            s.set(FREE, next);
            next = i as u32;
        }
        Ok(Self {
            config,
            slots,
            index: PrefixIndex::new(index, capacity),
            online: capacity,
            free_head: 0,
            free_len: capacity,
            evict: order::Classes::EMPTY,
            evict_len: 0,
            policy: EvictionPolicy::LRU,
            ranked: false,
            held: 0,
            in_runs: 0,
            stats: PoolStats {
                blocks_total: capacity,
                ..PoolStats::default()
            },
            events: EventQueue::new(Slots::Borrowed(&mut [])),
        })
    }

    /// Records events for a KV-aware router in `events` (a ring; see
    /// [`pop_event`](Self::pop_event)). Pools built by [`new`](Self::new)
    /// record none until given storage; [`with_capacity`](Self::with_capacity)
    /// gives them [`EVENT_QUEUE_LEN`](crate::events::EVENT_QUEUE_LEN).
    pub fn with_events(mut self, events: impl Into<Slots<'a, KvEvent>>) -> Self {
        self.events = EventQueue::new(events.into());
        self
    }

    /// A pool of `capacity` blocks with owned storage. Refuses (rather than
    /// aborting the process) when the allocator cannot provide it.
    #[cfg(feature = "alloc")]
    pub fn with_capacity(config: PoolConfig, capacity: u32) -> Result<Self> {
        if capacity > MAX_BLOCKS {
            return Err(Error::CapacityTooLarge {
                requested: u64::from(capacity),
                max: MAX_BLOCKS,
            });
        }
        Ok(Self::new(
            config,
            Slots::try_owned(capacity as usize, BlockSlot::EMPTY)?,
            Slots::try_owned(buckets_for(capacity), 0u32)?,
        )?
        .with_events(Slots::try_owned(
            crate::events::EVENT_QUEUE_LEN,
            KvEvent::EMPTY,
        )?))
    }

    /// The pool's configuration.
    #[inline]
    pub fn config(&self) -> &PoolConfig {
        &self.config
    }
    /// The pool's id.
    #[inline]
    pub fn id(&self) -> PoolId {
        self.config.id
    }
    /// Device or host.
    #[inline]
    pub fn kind(&self) -> PoolKind {
        self.config.kind
    }
    /// Tokens per block.
    #[inline]
    pub fn tokens_per_block(&self) -> u32 {
        self.config.tokens_per_block
    }
    /// Blocks in service (backed by memory): see [`grow`](Self::grow) and
    /// [`shrink`](Self::shrink). Equal to [`max_blocks`](Self::max_blocks)
    /// unless the caller changed it.
    #[inline]
    pub fn capacity(&self) -> u32 {
        self.online
    }

    /// The metadata capacity: the most blocks the pool can ever serve.
    #[inline]
    pub fn max_blocks(&self) -> u32 {
        self.slots.len() as u32
    }

    /// Blocks on the free stack.
    #[inline]
    pub fn free_len(&self) -> u32 {
        self.free_len
    }
    /// Cached (evictable) blocks.
    #[inline]
    pub fn cached_len(&self) -> u32 {
        self.evict_len
    }
    /// Blocks with at least one holder (draining ones included).
    #[inline]
    pub fn used_len(&self) -> u32 {
        self.held
    }
    /// Blocks `allocate` can hand out now (free plus evictable).
    #[inline]
    pub fn available(&self) -> u32 {
        self.free_len + self.evict_len
    }
    /// Keyed blocks: those in the hash index and those inside runs (found
    /// through their chain).
    #[inline]
    pub fn indexed_len(&self) -> u32 {
        self.index.len() + self.in_runs
    }

    /// Counters and gauges.
    pub fn stats(&self) -> PoolStats {
        PoolStats {
            blocks_free: self.free_len,
            blocks_cached: self.evict_len,
            blocks_used: self.used_len(),
            ..self.stats
        }
    }

    pub(crate) fn stats_mut(&mut self) -> &mut PoolStats {
        &mut self.stats
    }

    #[inline]
    fn at(&self, i: u32) -> Option<&BlockSlot> {
        self.slots.get(i as usize)
    }

    #[inline]
    fn at_mut(&mut self, i: u32) -> Option<&mut BlockSlot> {
        self.slots.get_mut(i as usize)
    }

    #[inline]
    fn slot(&self, b: BlockId) -> Result<&BlockSlot> {
        self.slots.get(b.index()).ok_or(Error::UnknownBlock(b))
    }

    /// Holders of `b` (0 for a free or cached block).
    pub fn ref_count(&self, b: BlockId) -> Result<u32> {
        let s = self.slot(b)?;
        Ok(if s.is_held() {
            s.a & lists::COUNT_MASK
        } else {
            0
        })
    }

    /// The key `b` carries, if any.
    pub fn key_of(&self, b: BlockId) -> Result<Option<BlockHash>> {
        let s = self.slot(b)?;
        Ok(s.is_keyed().then(|| s.key()))
    }

    /// Whether `b` is cached (keyed, no holder, in the eviction order).
    pub fn is_cached(&self, b: BlockId) -> Result<bool> {
        Ok(self.slot(b)?.state() == CACHED)
    }
}
