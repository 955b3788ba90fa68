//! What a pool's users call: allocate and release, prefix lookups and
//! registration, eviction, events.

use super::lists::{COUNT_MASK, MAX_HOLDERS, SHARED_BIT};
use super::order::Retention;
use super::runs::Prev;
use super::{BlockPool, BlockSlot, CACHED, FREE, NIL, Registered, USED, USED_KEYED};
use crate::error::{Error, Result};
use crate::events::KvEvent;
use crate::ids::{BlockHash, BlockId};
use crate::prefix::Insert;

impl BlockPool<'_> {
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

    /// One block with reference count 1. O(1).
    #[inline]
    pub fn allocate_one(&mut self) -> Result<BlockId> {
        self.check_available(1)?;
        self.stats.allocations += 1;
        self.take().map(BlockId).ok_or(Error::OutOfBlocks {
            needed: 1,
            available: 0,
        })
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
        // The free stack first, with its head and counts in registers (the
        // loop carries nothing through memory but the links themselves).
        let popped = self.pop_free_into(out);
        // Evicted blocks fill the rest from its end: a finished sequence's
        // blocks are cached tail first, so its run comes back in id order.
        for o in out.iter_mut().skip(popped).rev() {
            // Cannot fail after the check unless the lists are broken.
            *o = BlockId(self.take().unwrap_or(NIL));
        }
        Ok(())
    }

    /// [`allocate`](Self::allocate), publishing each of the first `keyed`
    /// fresh blocks at once under the key `key(k)` gives it (key, chain
    /// parent, token ids), in order: allocate and register fused for the
    /// blocks a prompt missed, each as by
    /// [`publish_after`](Self::publish_after) (`prev`: the block holding the
    /// first key's parent), and with `runs` (keys the cache hashed: a chain
    /// where no key repeats) each block that follows the block carrying its
    /// parent joins that block's run. All or nothing.
    pub(crate) fn allocate_keyed<'t>(
        &mut self,
        prev: Option<BlockId>,
        out: &mut [BlockId],
        keyed: usize,
        runs: bool,
        mut key: impl FnMut(usize) -> (BlockHash, Option<BlockHash>, &'t [u32]),
    ) -> Result<()> {
        self.allocate(out)?;
        let (mut prev, mut ours) = (prev, None);
        for (k, &b) in out.iter().take(keyed).enumerate() {
            let (key, parent, tokens) = key(k);
            let whence = match k {
                0 => Prev::Found { runs },
                _ if prev == ours => Prev::Published { runs },
                // The copy that held the previous key already.
                _ => Prev::Walked,
            };
            // Cannot fail: `b` was just allocated (held, unkeyed).
            prev = self
                .publish_chained(prev, b, key, parent, tokens, whence)
                .unwrap_or(None);
            ours = Some(b);
        }
        Ok(())
    }

    /// Publishes block `i`, held and unkeyed, under `key` inside the run of
    /// block `i - 1` (which carries `parent`: the caller checked): no index
    /// entry.
    #[inline]
    pub(super) fn publish_in_run(
        &mut self,
        i: u32,
        key: BlockHash,
        parent: Option<BlockHash>,
        tokens: &[u32],
    ) {
        if let Some(s) = self.at_mut(i) {
            s.set_key(key);
            s.set(USED_KEYED, 0);
            s.set_in_run(true);
            self.in_runs += 1;
        }
        let c = &self.config;
        self.events
            .stored((c.id, c.kind, c.tokens_per_block), parent, key, tokens);
    }

    /// Publishes block `i`, held and unkeyed (the caller checked), under
    /// `key`.
    #[inline]
    pub(super) fn publish(
        &mut self,
        i: u32,
        key: BlockHash,
        parent: Option<BlockHash>,
        tokens: &[u32],
    ) -> Registered {
        // The key is written first: a displacement may need it. While the
        // state says unkeyed, the stored key bits mean nothing.
        if let Some(s) = self.at_mut(i) {
            s.set_key(key);
        }
        let slots = &self.slots;
        let key_of = |e: u32| slots.get(e as usize).map_or(BlockHash(0), BlockSlot::key);
        match self.index.insert(key, i, key_of) {
            Insert::Exists(other) => Registered::Duplicate(BlockId(other)),
            Insert::Full => Registered::IndexFull,
            Insert::Inserted => {
                if let Some(s) = self.at_mut(i) {
                    s.set(USED_KEYED, 0);
                }
                let c = &self.config;
                self.events
                    .stored((c.id, c.kind, c.tokens_per_block), parent, key, tokens);
                Registered::Stored
            }
        }
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
        if s.a & COUNT_MASK >= MAX_HOLDERS {
            return Err(Error::RefCountOverflow(b));
        }
        // A second holder: another chain may continue the block.
        s.a = (s.a | SHARED_BIT) + 1;
        Ok(())
    }

    /// Drops one holder. At zero, a keyed block joins the tail of the
    /// eviction order (still a prefix hit) and an unkeyed one the free stack.
    /// Returns whether the block lost its last holder. O(1).
    #[inline]
    pub fn release(&mut self, b: BlockId) -> Result<bool> {
        self.release_as(b, Retention::Normal)
    }

    /// [`release`](Self::release), asking for class `want` in the eviction
    /// order if this was the last holder (the pool's
    /// [`EvictionPolicy`](super::EvictionPolicy) decides). O(1).
    #[inline(always)]
    pub fn release_as(&mut self, b: BlockId, want: Retention) -> Result<bool> {
        let s = self
            .slots
            .get_mut(b.index())
            .ok_or(Error::UnknownBlock(b))?;
        if !s.is_held() || s.a & COUNT_MASK == 0 {
            return Err(Error::BlockNotInUse(b));
        }
        s.a -= 1;
        if s.a & COUNT_MASK > 0 {
            return Ok(false);
        }
        self.unheld(b.0, want);
        Ok(true)
    }

    /// Releases each block once, in order (put a finished sequence's tail
    /// first so it is evicted first). All or nothing: if any release would be
    /// invalid (unknown block, or more releases than holders) nothing changes.
    pub fn free(&mut self, blocks: &[BlockId]) -> Result<()> {
        // Pass 1: decrement, checking; undo on failure.
        for (k, &b) in blocks.iter().enumerate() {
            let ok = match self.slots.get_mut(b.index()) {
                None => Err(Error::UnknownBlock(b)),
                Some(s) if !s.is_held() || s.a & COUNT_MASK == 0 => Err(Error::BlockNotInUse(b)),
                Some(s) => {
                    s.a -= 1;
                    Ok(())
                }
            };
            if let Err(e) = ok {
                for u in blocks.iter().take(k) {
                    if let Some(s) = self.slots.get_mut(u.index()) {
                        s.a += 1;
                    }
                }
                return Err(e);
            }
        }
        // Pass 2: move the blocks that lost their last holder to their list.
        // Unkeyed blocks in service (the common case of a plain free) go on
        // the free stack with its head and counts kept in registers.
        let (mut head, mut pushed) = (self.free_head, 0u32);
        let online = self.online;
        for &b in blocks {
            let Some(s) = self.slots.get_mut(b.index()) else {
                continue;
            };
            if s.a & COUNT_MASK != 0 || !s.is_held() {
                continue;
            }
            if s.state() == USED && b.0 < online {
                s.set(FREE, head);
                head = b.0;
                pushed += 1;
            } else {
                self.free_head = head;
                self.free_len += pushed;
                self.held -= pushed;
                pushed = 0;
                self.unheld(b.0, Retention::Normal);
                head = self.free_head;
            }
        }
        self.free_head = head;
        self.free_len += pushed;
        self.held -= pushed;
        Ok(())
    }

    // ---- prefix index -----------------------------------------------------

    /// The block cached or held under `key`, without taking it, where a
    /// run begins: a block inside a run (published by an allocation after
    /// the block of its chain parent) is found from that block, with
    /// [`lookup_after`](Self::lookup_after) or
    /// [`match_prefix`](Self::match_prefix). Blocks published by
    /// [`register`](Self::register) always begin a run. O(1) expected.
    #[inline]
    pub fn lookup(&self, key: BlockHash) -> Option<BlockId> {
        let slots = &self.slots;
        self.index
            .find(key, |e| {
                slots
                    .get(e as usize)
                    .map_or(BlockHash(!key.0), BlockSlot::key)
            })
            .map(BlockId)
    }

    /// A prefix hit: the block under `key` (found as by
    /// [`lookup`](Self::lookup)) gains a holder (leaving the eviction order
    /// if it was cached). O(1) expected.
    #[inline]
    pub fn acquire(&mut self, key: BlockHash) -> Option<BlockId> {
        self.acquire_after(None, key)
    }

    /// [`acquire`](Self::acquire) of the block found by
    /// [`lookup_after`](Self::lookup_after)`(prev, key)`: the next hit of a
    /// chain walk. O(1) expected.
    #[inline]
    pub fn acquire_after(&mut self, prev: Option<BlockId>, key: BlockHash) -> Option<BlockId> {
        let b = self.lookup_after(prev, key)?;
        self.acquire_block(b).then_some(b)
    }

    /// Publishes a held, unkeyed block under `key` (its content is complete
    /// and immutable from now on), heading a run. `parent` is the chain
    /// parent, for events. If `key` is already indexed the block stays
    /// unkeyed ([`Registered::Duplicate`]): two sequences that computed the
    /// same block at once never corrupt the index. On a device pool a key
    /// held inside a run is not indexed: publish a chain's blocks with
    /// [`publish_after`](Self::publish_after), which walks it. O(1) expected.
    pub fn register(
        &mut self,
        b: BlockId,
        key: BlockHash,
        parent: Option<BlockHash>,
    ) -> Result<Registered> {
        self.register_tokens(b, key, parent, &[])
    }

    /// [`register`](Self::register), with the block's token ids for the
    /// stored event (see [`KvEvent::BlockStored`]).
    pub fn register_tokens(
        &mut self,
        b: BlockId,
        key: BlockHash,
        parent: Option<BlockHash>,
        tokens: &[u32],
    ) -> Result<Registered> {
        let s = self.slot(b)?;
        match s.state() {
            USED => {}
            USED_KEYED => return Err(Error::AlreadyRegistered(b)),
            _ => return Err(Error::BlockNotInUse(b)),
        }
        Ok(self.publish(b.0, key, parent, tokens))
    }

    /// Evicts the next cached block in eviction order to the free stack. O(1).
    pub fn evict_one(&mut self) -> Option<(BlockId, BlockHash)> {
        if self.evict_len == 0 {
            return None;
        }
        let b = BlockId(self.victim());
        self.evict(b).ok().map(|key| (b, key))
    }

    /// Evicts one particular cached block (for example one just offloaded to
    /// another tier, or past a time-to-live) to the free stack. O(1).
    pub fn evict(&mut self, b: BlockId) -> Result<BlockHash> {
        let s = self.slot(b)?;
        if s.state() != CACHED {
            return Err(Error::NotCached(b));
        }
        let key = s.key();
        self.evict_unlink(b.0);
        self.drop_key(b.0);
        self.stats.evictions += 1;
        self.free_push(b.0);
        Ok(key)
    }

    /// Drops every key: cached blocks return to the free stack, held blocks
    /// stay held but unkeyed. Emits [`KvEvent::AllCleared`]. O(capacity).
    pub fn reset_prefix_cache(&mut self) {
        while self.evict_len > 0 {
            let i = self.victim();
            if self.at(i).is_none() {
                break;
            }
            self.evict_unlink(i);
            self.free_push(i);
        }
        for s in self.slots.iter_mut() {
            if s.state() == USED_KEYED {
                s.set(USED, 0);
                s.set_in_run(false);
            }
        }
        self.index.clear();
        self.in_runs = 0;
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
}
