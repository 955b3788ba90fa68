//! The block pool: fixed capacity, reference counts, a free stack, an LRU
//! eviction order of cached blocks and the prefix index, all intrusive in one
//! array of 24-byte slots.
//!
//! # Block states
//!
//! | state | holders | key | list |
//! |---|---|---|---|
//! | free | 0 | none | free stack (reused first) |
//! | cached | 0 | yes | eviction order (LRU at the head) |
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
//! and `next` links while the block is in a list, the reference count while it
//! is held (the top two bits of the second word hold the state). The prefix
//! index adds 1.5 entries of 4 bytes per block. Total: **30 bytes per block**,
//! counted by `size_of::<BlockSlot>() + 4 * buckets_for(n) / n` (see the
//! `metadata_bytes_per_block` test; small pools round up to whole buckets).
#![allow(
    clippy::cast_possible_truncation,
    reason = "block indices fit in 30 bits: the constructor refuses pools over MAX_BLOCKS; key halves are split on purpose"
)]

use crate::error::{Error, Result};
use crate::events::{EventQueue, KvEvent};
use crate::ids::{BlockHash, BlockId, PoolId};
use crate::prefix::{Insert, PrefixIndex, buckets_for};
use crate::stats::PoolStats;
use crate::storage::Slots;

const STATE_SHIFT: u32 = 30;
const LINK_MASK: u32 = (1 << STATE_SHIFT) - 1;
const NIL: u32 = LINK_MASK;
const FREE: u32 = 0;
const CACHED: u32 = 1;
const USED: u32 = 2;
const USED_KEYED: u32 = 3;

/// Largest number of blocks in one pool (ids must fit in 30 bits).
pub const MAX_BLOCKS: u32 = NIL - 1;

/// Per-block metadata. Opaque; exposed so firmware can declare storage
/// (`static mut SLOTS: [BlockSlot; N] = [BlockSlot::EMPTY; N]`).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct BlockSlot {
    key_lo: u64,
    key_hi: u64,
    /// `prev` link (in a list) or reference count (held).
    a: u32,
    /// State in the top two bits; `next` link in the rest.
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
    #[inline]
    fn set(&mut self, state: u32, next: u32) {
        self.b = (state << STATE_SHIFT) | next;
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
    evict_head: u32,
    evict_tail: u32,
    evict_len: u32,
    held: u32,
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
        for (i, s) in slots.iter_mut().enumerate() {
            let next = if i + 1 == capacity as usize {
                NIL
            } else {
                i as u32 + 1
            };
            *s = BlockSlot::EMPTY;
            s.set(FREE, next);
        }
        Ok(Self {
            config,
            slots,
            index: PrefixIndex::new(index, capacity),
            online: capacity,
            free_head: 0,
            free_len: capacity,
            evict_head: NIL,
            evict_tail: NIL,
            evict_len: 0,
            held: 0,
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

    /// A pool of `capacity` blocks with owned storage.
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
            Slots::owned(capacity as usize, BlockSlot::EMPTY),
            Slots::owned(buckets_for(capacity), 0u32),
        )?
        .with_events(Slots::owned(crate::events::EVENT_QUEUE_LEN, KvEvent::EMPTY)))
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

    /// Held blocks at or past [`capacity`](Self::capacity): they leave
    /// service when released. O(max_blocks).
    pub fn draining_len(&self) -> u32 {
        self.slots[self.online as usize..]
            .iter()
            .filter(|s| s.is_held())
            .count() as u32
    }

    /// Brings `n` more blocks into service (their memory is now backed).
    /// Blocks still held from an earlier shrink simply stop draining. O(n).
    pub fn grow(&mut self, n: u32) -> Result<u32> {
        let to = self
            .online
            .checked_add(n)
            .filter(|&t| t <= self.max_blocks())
            .ok_or(Error::CapacityTooLarge {
                requested: u64::from(self.online) + u64::from(n),
                max: self.max_blocks(),
            })?;
        let from = self.online;
        self.online = to;
        for i in (from..to).rev() {
            if self.slots[i as usize].state() == FREE {
                self.free_push(i);
            }
        }
        self.stats.blocks_total = to;
        Ok(to)
    }

    /// Takes blocks `to..` out of service: free ones at once, cached ones
    /// evicted (their keys leave the index), held ones when released
    /// ("draining": relocate their holders, for example with
    /// `KvCache::relocate`, to empty them). New allocations only come from
    /// blocks below `to`. O(max_blocks).
    pub fn shrink(&mut self, to: u32) -> Result<()> {
        if to == 0 {
            return Err(Error::ZeroCapacity);
        }
        if to >= self.online {
            return Ok(());
        }
        for i in to..self.online {
            if self.slots[i as usize].state() == CACHED {
                self.evict_unlink(i);
                let key = self.slots[i as usize].key();
                self.index.remove(key, i);
                self.stats.evictions += 1;
                self.events.removed(self.config.id, key);
                self.slots[i as usize].set(FREE, NIL);
            }
        }
        // Rebuild the free stack from the blocks that stay, lowest id on top.
        self.online = to;
        self.free_head = NIL;
        self.free_len = 0;
        for i in (0..to).rev() {
            if self.slots[i as usize].state() == FREE {
                self.free_push(i);
            }
        }
        for s in &mut self.slots[to as usize..] {
            if s.state() == FREE {
                s.set(FREE, NIL);
            }
        }
        self.stats.blocks_total = to;
        Ok(())
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
    /// Keys in the prefix index.
    #[inline]
    pub fn indexed_len(&self) -> u32 {
        self.index.len()
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
    fn slot(&self, b: BlockId) -> Result<&BlockSlot> {
        self.slots.get(b.index()).ok_or(Error::UnknownBlock(b))
    }

    /// Holders of `b` (0 for a free or cached block).
    pub fn ref_count(&self, b: BlockId) -> Result<u32> {
        let s = self.slot(b)?;
        Ok(if s.is_held() { s.a } else { 0 })
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

    // ---- intrusive lists -------------------------------------------------

    #[inline]
    fn free_push(&mut self, i: u32) {
        let head = self.free_head;
        self.slots[i as usize].set(FREE, head);
        self.free_head = i;
        self.free_len += 1;
    }

    #[inline]
    fn free_pop(&mut self) -> u32 {
        let i = self.free_head;
        debug_assert!(i != NIL);
        self.free_head = self.slots[i as usize].next();
        self.free_len -= 1;
        i
    }

    #[inline]
    fn evict_push_back(&mut self, i: u32) {
        let tail = self.evict_tail;
        {
            let s = &mut self.slots[i as usize];
            s.a = tail;
            s.set(CACHED, NIL);
        }
        if tail == NIL {
            self.evict_head = i;
        } else {
            let t = &mut self.slots[tail as usize];
            let st = t.state();
            t.set(st, i);
        }
        self.evict_tail = i;
        self.evict_len += 1;
    }

    #[inline]
    fn evict_unlink(&mut self, i: u32) {
        let (prev, next) = {
            let s = &self.slots[i as usize];
            (s.a, s.next())
        };
        if prev == NIL {
            self.evict_head = next;
        } else {
            let p = &mut self.slots[prev as usize];
            let st = p.state();
            p.set(st, next);
        }
        if next == NIL {
            self.evict_tail = prev;
        } else {
            self.slots[next as usize].a = prev;
        }
        self.evict_len -= 1;
    }

    /// Takes one block for a new holder: the free stack first, else the LRU
    /// cached block (its key leaves the index). Caller checked availability.
    #[inline]
    fn take(&mut self) -> u32 {
        let i = if self.free_len > 0 {
            self.free_pop()
        } else {
            let i = self.evict_head;
            self.evict_unlink(i);
            let key = self.slots[i as usize].key();
            let removed = self.index.remove(key, i);
            debug_assert!(removed);
            self.stats.evictions += 1;
            crate::fmt::trace!("pool {}: evicted block {}", self.config.id.0, i);
            self.events.removed(self.config.id, key);
            i
        };
        let s = &mut self.slots[i as usize];
        s.a = 1;
        s.set(USED, 0);
        self.held += 1;
        i
    }

    #[inline]
    fn check_available(&mut self, n: u32) -> Result<()> {
        if n > self.max_blocks() {
            return Err(Error::LargerThanPool {
                needed: u64::from(n),
                capacity: self.max_blocks(),
            });
        }
        let available = self.available();
        if n > available {
            crate::fmt::debug!(
                "pool {}: out of blocks, {} needed, {} available",
                self.config.id.0,
                n,
                available
            );
            self.stats.allocation_failures += 1;
            return Err(Error::OutOfBlocks {
                needed: n,
                available,
            });
        }
        Ok(())
    }

    // ---- allocate / release ---------------------------------------------

    /// One block with reference count 1. O(1).
    #[inline]
    pub fn allocate_one(&mut self) -> Result<BlockId> {
        self.check_available(1)?;
        self.stats.allocations += 1;
        Ok(BlockId(self.take()))
    }

    /// Fills `out` with fresh blocks (reference count 1 each), all or nothing.
    /// O(1) per block.
    pub fn allocate(&mut self, out: &mut [BlockId]) -> Result<()> {
        let n = u32::try_from(out.len()).map_err(|_| Error::LargerThanPool {
            needed: out.len() as u64,
            capacity: self.max_blocks(),
        })?;
        self.check_available(n)?;
        self.stats.allocations += u64::from(n);
        for o in out.iter_mut() {
            *o = BlockId(self.take());
        }
        Ok(())
    }

    /// Adds a holder to a held block. O(1).
    #[inline]
    pub fn add_ref(&mut self, b: BlockId) -> Result<()> {
        let s = self
            .slots
            .get_mut(b.index())
            .ok_or(Error::UnknownBlock(b))?;
        if !s.is_held() {
            return Err(Error::BlockNotInUse(b));
        }
        s.a = s.a.checked_add(1).ok_or(Error::RefCountOverflow(b))?;
        Ok(())
    }

    /// Drops one holder. At zero, a keyed block joins the tail of the
    /// eviction order (still a prefix hit) and an unkeyed one the free stack.
    /// Returns whether the block lost its last holder. O(1).
    #[inline]
    pub fn release(&mut self, b: BlockId) -> Result<bool> {
        let s = self
            .slots
            .get_mut(b.index())
            .ok_or(Error::UnknownBlock(b))?;
        if !s.is_held() {
            return Err(Error::BlockNotInUse(b));
        }
        s.a -= 1;
        if s.a > 0 {
            return Ok(false);
        }
        self.unheld(b.0);
        Ok(true)
    }

    /// A block lost its last holder: to the eviction order (keyed), the free
    /// stack, or out of service (draining past `capacity`).
    #[inline]
    fn unheld(&mut self, i: u32) {
        self.held -= 1;
        let s = &mut self.slots[i as usize];
        let keyed = s.state() == USED_KEYED;
        if i >= self.online {
            s.set(FREE, NIL);
            if keyed {
                let key = s.key();
                self.index.remove(key, i);
                self.events.removed(self.config.id, key);
            }
        } else if keyed {
            self.evict_push_back(i);
        } else {
            self.free_push(i);
        }
    }

    /// Releases each block once, in order (put a finished sequence's tail
    /// first so it is evicted first). All or nothing: if any release would be
    /// invalid (unknown block, or more releases than holders) nothing changes.
    pub fn free(&mut self, blocks: &[BlockId]) -> Result<()> {
        // Pass 1: decrement, checking; undo on failure.
        for (k, &b) in blocks.iter().enumerate() {
            let ok = match self.slots.get_mut(b.index()) {
                None => Err(Error::UnknownBlock(b)),
                Some(s) if !s.is_held() || s.a == 0 => Err(Error::BlockNotInUse(b)),
                Some(s) => {
                    s.a -= 1;
                    Ok(())
                }
            };
            if let Err(e) = ok {
                for &u in &blocks[..k] {
                    self.slots[u.index()].a += 1;
                }
                return Err(e);
            }
        }
        // Pass 2: move the blocks that lost their last holder to their list.
        for &b in blocks {
            let s = &self.slots[b.index()];
            if s.a == 0 && s.is_held() {
                self.unheld(b.0);
            }
        }
        Ok(())
    }

    // ---- prefix index -----------------------------------------------------

    /// The block cached or held under `key`, without taking it. O(1) expected.
    #[inline]
    pub fn lookup(&self, key: BlockHash) -> Option<BlockId> {
        let slots = &self.slots;
        self.index
            .find(key, |e| slots[e as usize].key())
            .map(BlockId)
    }

    /// A prefix hit: the block under `key` gains a holder (leaving the
    /// eviction order if it was cached). O(1) expected.
    #[inline]
    pub fn acquire(&mut self, key: BlockHash) -> Option<BlockId> {
        let b = self.lookup(key)?;
        let i = b.0;
        if self.slots[i as usize].state() == CACHED {
            self.evict_unlink(i);
            let s = &mut self.slots[i as usize];
            s.a = 1;
            s.set(USED_KEYED, 0);
            self.held += 1;
        } else {
            // Held already: another holder. Saturation is unreachable in
            // practice (2^32 holders); treat it as a miss rather than wrap.
            let s = &mut self.slots[i as usize];
            s.a = s.a.checked_add(1)?;
        }
        Some(b)
    }

    /// Takes a holder on a held or cached keyed block (a hit found by
    /// [`lookup_cached`](Self::lookup_cached)). Returns false for a block that is neither.
    #[inline]
    pub(crate) fn acquire_block(&mut self, b: BlockId) -> bool {
        let Some(s) = self.slots.get_mut(b.index()) else {
            return false;
        };
        match s.state() {
            CACHED => {
                self.evict_unlink(b.0);
                let s = &mut self.slots[b.index()];
                s.a = 1;
                s.set(USED_KEYED, 0);
                self.held += 1;
                true
            }
            USED_KEYED => match s.a.checked_add(1) {
                Some(a) => {
                    s.a = a;
                    true
                }
                None => false,
            },
            _ => false,
        }
    }

    /// Whether `key` is indexed and the block would be taken from the
    /// eviction order by [`acquire`](Self::acquire) (so it no longer counts as available).
    #[inline]
    pub(crate) fn lookup_cached(&self, key: BlockHash) -> Option<(BlockId, bool)> {
        self.lookup(key)
            .map(|b| (b, self.slots[b.index()].state() == CACHED))
    }

    /// Publishes a held, unkeyed block under `key` (its content is complete
    /// and immutable from now on). `parent` is the chain parent, for events.
    /// If `key` is already indexed the block stays unkeyed
    /// ([`Registered::Duplicate`]): two sequences that computed the same block
    /// at once never corrupt the index. O(1) expected.
    pub fn register(
        &mut self,
        b: BlockId,
        key: BlockHash,
        parent: Option<BlockHash>,
    ) -> Result<Registered> {
        let s = self.slot(b)?;
        match s.state() {
            USED => {}
            USED_KEYED => return Err(Error::AlreadyRegistered(b)),
            _ => return Err(Error::BlockNotInUse(b)),
        }
        // The key is written first: a displacement may need it. While the
        // state says unkeyed, the stored key bits mean nothing.
        self.slots[b.index()].set_key(key);
        let slots = &self.slots;
        match self.index.insert(key, b.0, |e| slots[e as usize].key()) {
            Insert::Exists(other) => Ok(Registered::Duplicate(BlockId(other))),
            Insert::Full => Ok(Registered::IndexFull),
            Insert::Inserted => {
                self.slots[b.index()].set(USED_KEYED, 0);
                self.events.stored(self.config.id, parent, key);
                Ok(Registered::Stored)
            }
        }
    }

    /// Evicts the least recently used cached block to the free stack. O(1).
    pub fn evict_one(&mut self) -> Option<(BlockId, BlockHash)> {
        if self.evict_len == 0 {
            return None;
        }
        let i = self.evict_head;
        self.evict_unlink(i);
        let key = self.slots[i as usize].key();
        self.index.remove(key, i);
        self.stats.evictions += 1;
        self.events.removed(self.config.id, key);
        self.free_push(i);
        Some((BlockId(i), key))
    }

    /// Evicts one particular cached block (for example one just offloaded to
    /// another tier, or past a time-to-live) to the free stack. O(1).
    pub fn evict(&mut self, b: BlockId) -> Result<BlockHash> {
        let s = self.slot(b)?;
        if s.state() != CACHED {
            return Err(Error::NotCached(b));
        }
        self.evict_unlink(b.0);
        let key = self.slots[b.index()].key();
        self.index.remove(key, b.0);
        self.stats.evictions += 1;
        self.events.removed(self.config.id, key);
        self.free_push(b.0);
        Ok(key)
    }

    /// The cached blocks in eviction order (least recently used first).
    pub fn eviction_order(&self) -> impl Iterator<Item = BlockId> + '_ {
        let mut i = self.evict_head;
        core::iter::from_fn(move || {
            if i == NIL {
                return None;
            }
            let b = BlockId(i);
            i = self.slots[i as usize].next();
            Some(b)
        })
    }

    /// Drops every key: cached blocks return to the free stack, held blocks
    /// stay held but unkeyed. Emits [`KvEvent::AllCleared`]. O(capacity).
    pub fn reset_prefix_cache(&mut self) {
        while let Some(i) = (self.evict_len > 0).then_some(self.evict_head) {
            self.evict_unlink(i);
            self.free_push(i);
        }
        for s in self.slots.iter_mut() {
            if s.state() == USED_KEYED {
                s.set(USED, 0);
            }
        }
        self.index.clear();
        self.events.cleared(self.config.id);
    }

    // ---- events -------------------------------------------------------------

    /// The oldest undrained event.
    pub fn pop_event(&mut self) -> Option<KvEvent> {
        self.events.pop()
    }
    /// Events waiting to be drained.
    pub fn pending_events(&self) -> usize {
        self.events.len()
    }
    /// Events dropped because the queue was full (resynchronise when it grows).
    pub fn events_lost(&self) -> u64 {
        self.events.lost()
    }
    /// Turns event recording on (the default when the pool has event
    /// storage) or off.
    pub fn set_events_enabled(&mut self, on: bool) {
        self.events.set_enabled(on);
    }

    // ---- invariants -----------------------------------------------------------

    /// Checks, in O(capacity): the free stack holds exactly the free blocks;
    /// the eviction order is a well-linked list of exactly the cached blocks;
    /// free + cached + used = capacity; every keyed block is indexed and
    /// reachable under its key, and every index entry names a block carrying it.
    pub fn check_invariants(&self) -> Result<(), Invariant> {
        let cap = self.max_blocks();
        let (mut free, mut cached, mut keyed, mut held) = (0u32, 0u32, 0u32, 0u32);
        for (i, s) in self.slots.iter().enumerate() {
            let i = i as u32;
            match s.state() {
                FREE if i < self.online => free += 1,
                FREE => {}
                CACHED => {
                    ensure(i < self.online, "cached block out of service", Some(i))?;
                    cached += 1;
                }
                _ => {
                    ensure(s.a > 0, "held block with zero holders", Some(i))?;
                    held += 1;
                }
            }
            if s.is_keyed() {
                keyed += 1;
                let found = self.lookup(s.key());
                ensure(
                    found == Some(BlockId(i)),
                    "keyed block not indexed",
                    Some(i),
                )?;
            }
        }
        ensure(free == self.free_len, "free count", None)?;
        ensure(held == self.held, "held count", None)?;
        ensure(self.stats.blocks_total == self.online, "total blocks", None)?;
        ensure(cached == self.evict_len, "cached count", None)?;
        ensure(keyed == self.index.len(), "index size", None)?;
        // Free stack.
        let (mut n, mut i) = (0u32, self.free_head);
        while i != NIL {
            ensure(i < cap, "free link out of range", Some(i))?;
            ensure(
                self.slots[i as usize].state() == FREE,
                "non-free on free stack",
                Some(i),
            )?;
            n += 1;
            ensure(n <= free, "free stack cycle", Some(i))?;
            i = self.slots[i as usize].next();
        }
        ensure(n == free, "free stack length", None)?;
        // Eviction order, both directions.
        let (mut n, mut prev, mut i) = (0u32, NIL, self.evict_head);
        while i != NIL {
            ensure(i < cap, "eviction link out of range", Some(i))?;
            let s = &self.slots[i as usize];
            ensure(s.state() == CACHED, "non-cached in eviction order", Some(i))?;
            ensure(s.a == prev, "eviction prev link", Some(i))?;
            n += 1;
            ensure(n <= cached, "eviction order cycle", Some(i))?;
            prev = i;
            i = s.next();
        }
        ensure(prev == self.evict_tail, "eviction tail", None)?;
        ensure(n == cached, "eviction order length", None)?;
        // Index entries.
        for (at, e) in self.index.entries() {
            ensure(e < cap, "index entry out of range", Some(e))?;
            let s = &self.slots[e as usize];
            ensure(s.is_keyed(), "index names an unkeyed block", Some(e))?;
            ensure(
                self.index.reachable(s.key(), at),
                "index entry unreachable",
                Some(e),
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(n: u32) -> BlockPool<'static> {
        BlockPool::with_capacity(PoolConfig::device(0, 16), n).unwrap()
    }

    #[test]
    fn metadata_bytes_per_block() {
        assert_eq!(core::mem::size_of::<BlockSlot>(), 24);
        for n in [64u32, 1000, 8192, 1 << 20, 3_000_001] {
            let bytes = core::mem::size_of::<BlockSlot>() * n as usize + 4 * buckets_for(n);
            assert!(bytes as f64 / f64::from(n) <= 32.0, "{n}: {bytes}");
        }
    }

    #[test]
    fn never_cached_blocks_are_reused_before_cached_ones() {
        let mut p = pool(4);
        let a = p.allocate_one().unwrap();
        let b = p.allocate_one().unwrap();
        p.register(a, BlockHash(1), None).unwrap();
        p.release(a).unwrap();
        p.release(b).unwrap();
        // b (unkeyed) comes back first; then the two never-used blocks; then a.
        assert_eq!(p.allocate_one().unwrap(), b);
        p.allocate_one().unwrap();
        p.allocate_one().unwrap();
        assert_eq!(p.lookup(BlockHash(1)), Some(a));
        assert_eq!(p.allocate_one().unwrap(), a);
        assert_eq!(p.lookup(BlockHash(1)), None);
        assert_eq!(p.stats().evictions, 1);
        p.check_invariants().unwrap();
    }

    #[test]
    fn eviction_is_lru_and_a_hit_leaves_the_order() {
        let mut p = pool(3);
        let mut ids = [BlockId(0); 3];
        p.allocate(&mut ids).unwrap();
        for (k, &b) in ids.iter().enumerate() {
            p.register(b, BlockHash(k as u128 + 10), None).unwrap();
        }
        p.free(&[ids[2], ids[1], ids[0]]).unwrap();
        assert!(p.eviction_order().eq([ids[2], ids[1], ids[0]]));
        assert_eq!(p.acquire(BlockHash(11)), Some(ids[1]));
        assert!(p.eviction_order().eq([ids[2], ids[0]]));
        p.release(ids[1]).unwrap();
        assert!(p.eviction_order().eq([ids[2], ids[0], ids[1]]));
        assert_eq!(p.evict_one(), Some((ids[2], BlockHash(12))));
        p.check_invariants().unwrap();
    }

    #[test]
    fn duplicate_registration_keeps_the_index_intact() {
        let mut p = pool(2);
        let a = p.allocate_one().unwrap();
        let b = p.allocate_one().unwrap();
        assert_eq!(p.register(a, BlockHash(5), None), Ok(Registered::Stored));
        assert_eq!(
            p.register(b, BlockHash(5), None),
            Ok(Registered::Duplicate(a))
        );
        assert_eq!(
            p.register(a, BlockHash(6), None),
            Err(Error::AlreadyRegistered(a))
        );
        p.release(b).unwrap();
        assert_eq!(p.free_len(), 1);
        p.check_invariants().unwrap();
    }

    #[test]
    fn index_survives_heavy_churn() {
        let mut p = pool(64);
        let mut held = heapless::Vec::<BlockId, 64>::new();
        let mut x: u64 = 1;
        for step in 0..20_000u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if held.len() < 40 && !x.is_multiple_of(3) {
                let key = BlockHash(u128::from(x % 97));
                let b = match p.acquire(key) {
                    Some(b) => b,
                    None => {
                        let b = p.allocate_one().unwrap();
                        p.register(b, key, None).unwrap();
                        b
                    }
                };
                held.push(b).unwrap();
            } else if let Some(b) = held.pop() {
                p.release(b).unwrap();
            }
            if step % 1000 == 0 {
                p.check_invariants().unwrap();
            }
        }
        p.check_invariants().unwrap();
    }
}
