//! The free stack of a pool, threaded through the slots, the blocks in
//! service (grow, shrink), and the moves of a block between states (the
//! eviction order is in `order`).
//!
//! Slot indices handed to these functions come from the pool itself (list
//! links, or ids checked by the caller), so a missing slot can only mean a
//! broken invariant: the functions then do nothing (`check_invariants`
//! reports it) rather than panic.

use super::order::Retention;
use super::{BlockPool, CACHED, FREE, NIL, USED, USED_KEYED};
use crate::error::{Error, Result};
use crate::ids::{BlockHash, BlockId};

/// Holders beyond which a prefix hit is treated as a miss (unreachable in
/// practice; keeps every reference count far from overflowing).
pub(super) const MAX_HOLDERS: u32 = u32::MAX / 4;
/// Marks a held block pinned by the allocation being planned (the top bit
/// of its reference count, which never reaches it).
pub(super) const PIN_BIT: u32 = 1 << 31;
/// Marks a held block that had a second holder (a hit while held, a fork,
/// a duplicate computation): another chain may continue it, so it is never
/// evicted first ([`Retention::Low`]).
pub(super) const SHARED_BIT: u32 = 1 << 30;
/// The reference count of a held block's `a` word.
pub(super) const COUNT_MASK: u32 = SHARED_BIT - 1;

impl BlockPool<'_> {
    /// Held blocks at or past [`capacity`](Self::capacity): they leave
    /// service when released. O(max_blocks).
    pub fn draining_len(&self) -> u32 {
        self.slots
            .iter()
            .skip(self.online as usize)
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
            if self.at(i).is_some_and(|s| s.state() == FREE) {
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
        // Highest first: a run loses its tail before its head (no splits).
        for i in (to..self.online).rev() {
            if self.at(i).is_some_and(|s| s.state() == CACHED) {
                self.evict_unlink(i);
                self.drop_key(i);
                self.stats.evictions += 1;
                if let Some(s) = self.at_mut(i) {
                    s.set(FREE, NIL);
                }
            }
        }
        // Rebuild the free stack from the blocks that stay, lowest id on top.
        self.online = to;
        self.free_head = NIL;
        self.free_len = 0;
        for i in (0..to).rev() {
            if self.at(i).is_some_and(|s| s.state() == FREE) {
                self.free_push(i);
            }
        }
        for s in self.slots.iter_mut().skip(to as usize) {
            if s.state() == FREE {
                s.set(FREE, NIL);
            }
        }
        self.stats.blocks_total = to;
        Ok(())
    }

    #[inline]
    pub(super) fn free_push(&mut self, i: u32) {
        let head = self.free_head;
        if let Some(s) = self.at_mut(i) {
            s.set(FREE, head);
            self.free_head = i;
            self.free_len += 1;
        }
    }

    #[inline]
    fn free_pop(&mut self) -> Option<u32> {
        let i = self.free_head;
        let next = self.at(i)?.next();
        self.free_head = next;
        self.free_len -= 1;
        Some(i)
    }

    /// Pops up to `out.len()` blocks off the free stack into `out` (each
    /// with one holder); returns how many. The stack's head and counts stay
    /// in registers for the loop.
    #[inline]
    pub(super) fn pop_free_into(&mut self, out: &mut [BlockId]) -> usize {
        let want = out.len().min(self.free_len as usize);
        let mut head = self.free_head;
        let mut popped = 0;
        for o in out.iter_mut().take(want) {
            let Some(s) = self.slots.get_mut(head as usize) else {
                break;
            };
            let next = s.next();
            s.a = 1;
            s.set(USED, 0);
            *o = BlockId(head);
            head = next;
            popped += 1;
        }
        self.free_head = head;
        self.free_len -= popped as u32;
        self.held += popped as u32;
        popped
    }

    /// Takes one block for a new holder: the free stack first, else the LRU
    /// cached block (its key leaves the index). The caller checked
    /// availability; `None` only if the lists are broken.
    #[inline]
    pub(super) fn take(&mut self) -> Option<u32> {
        let i = if self.free_len > 0 {
            self.free_pop()?
        } else {
            let i = self.victim();
            self.at(i)?;
            self.evict_unlink(i);
            self.drop_key(i);
            self.stats.evictions += 1;
            crate::fmt::trace!("pool {}: evicted block {}", self.config.id.0, i);
            i
        };
        let s = self.at_mut(i)?;
        s.a = 1;
        s.set(USED, 0);
        self.held += 1;
        Some(i)
    }

    /// A block lost its last holder: to the eviction order (keyed, in the
    /// class `want` asks for), the free stack, or out of service (draining
    /// past `capacity`).
    #[inline(always)]
    pub(super) fn unheld(&mut self, i: u32, want: Retention) {
        let Some((keyed, a)) = self.at(i).map(|s| (s.state() == USED_KEYED, s.a)) else {
            return;
        };
        self.held -= 1;
        if i >= self.online {
            if keyed {
                self.drop_key(i);
            }
            if let Some(s) = self.at_mut(i) {
                s.set(FREE, NIL);
            }
        } else if keyed {
            self.cache_block(i, want, a & SHARED_BIT != 0);
        } else {
            self.free_push(i);
        }
    }

    // ---- the prefix hits of one allocation ---------------------------------
    //
    // An allocation first walks its prompt's keys and pins each hit, so that
    // `available()` counts exactly what the rest of the prompt can use; then
    // it either holds the hits (success) or unpins them (refusal). A cached
    // hit is pinned by unlinking it from the eviction order and marking it
    // USED while its slot keeps its list links (a state no indexed block
    // otherwise has); a held hit by setting `PIN_BIT` in its count. Either
    // mark makes a second hit on the same block in one walk (a key repeated
    // in one prompt) recognisable: it ends the match. Unpinning relinks a
    // cached block in place; nothing else touches the pool between the pins
    // and their undo, so the eviction order is restored exactly.

    /// Pins the block under `key` for the allocation being planned. `None`
    /// when the key is not indexed, or its block was already pinned by this
    /// walk (a key repeated in one prompt ends the match there).
    /// `prev` is the walk's previous hit (the chain is walked through runs).
    pub(crate) fn pin_hit(&mut self, prev: Option<BlockId>, key: BlockHash) -> Option<BlockId> {
        let b = self.lookup_after(prev, key)?;
        let s = self.at(b.0)?;
        match s.state() {
            CACHED => {
                self.evict_unlink(b.0);
                let s = self.at_mut(b.0)?;
                let next = s.next();
                s.set(USED, next);
                Some(b)
            }
            // A pinned block (`PIN_BIT` set) is past the limit: a key
            // repeated in one walk ends the match.
            USED_KEYED if s.a & !SHARED_BIT < MAX_HOLDERS => {
                self.at_mut(b.0)?.a |= PIN_BIT;
                Some(b)
            }
            _ => None,
        }
    }

    /// Undoes [`pin_hit`](Self::pin_hit) for `hits` (the blocks it returned,
    /// in order), restoring the eviction order exactly.
    pub(crate) fn unpin_hits(&mut self, hits: &[BlockId]) {
        for b in hits.iter().rev() {
            match self.at_mut(b.0) {
                Some(s) if s.state() == USED => self.relink(b.0),
                Some(s) => s.a &= !PIN_BIT,
                None => {}
            }
        }
    }

    /// Gives each pinned hit its holder (the allocation succeeded).
    pub(crate) fn hold_hits(&mut self, hits: &[BlockId]) {
        for b in hits {
            let Some(s) = self.at_mut(b.0) else { continue };
            match s.state() {
                USED => {
                    s.a = 1;
                    s.set(USED_KEYED, 0);
                    self.held += 1;
                }
                // A hit on a held block: a second chain shares it.
                USED_KEYED => s.a = ((s.a & !PIN_BIT) | SHARED_BIT) + 1,
                _ => debug_assert!(false, "hit neither pinned nor held"),
            }
        }
    }

    /// Takes a holder on a held or cached keyed block. False for a block
    /// that is neither (or whose count is implausibly high).
    #[inline]
    pub(crate) fn acquire_block(&mut self, b: BlockId) -> bool {
        let Some(s) = self.at(b.0) else {
            return false;
        };
        match s.state() {
            CACHED => {
                self.evict_unlink(b.0);
                if let Some(s) = self.at_mut(b.0) {
                    s.a = 1;
                    s.set(USED_KEYED, 0);
                }
                self.held += 1;
                true
            }
            USED_KEYED if s.a & COUNT_MASK < MAX_HOLDERS => {
                if let Some(s) = self.at_mut(b.0) {
                    s.a = (s.a | SHARED_BIT) + 1;
                }
                true
            }
            _ => false,
        }
    }
}
