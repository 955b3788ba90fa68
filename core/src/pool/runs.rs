//! Runs: the prefix index works per run of blocks, not per block.
//!
//! When an allocation publishes the missed blocks of a prompt given as token
//! ids (see `allocate_keyed`: the cache hashed the keys, so no key repeats
//! in the chain), a block whose id follows the block that carries its
//! chain parent is marked *in a run* (`RUN_BIT`) and does not enter the hash
//! index: it is found from its predecessor, by comparing the next slot's key
//! ([`lookup_after`](BlockPool::lookup_after)). Only the block where a run
//! begins (a chain's first block, a branch, a block whose predecessor's id is
//! not one less) is a hash-index entry. The pool hands out a request's fresh
//! blocks as consecutive ids whenever its free stack or eviction order holds
//! them in order, which is the common case: a prompt's blocks are freed
//! together, tail first, and evicted together.
//!
//! So a prompt of `n` missed blocks costs one index insert per run instead of
//! `n`, a prefix hit one index probe per run and a key compare per block, and
//! evicting a run (tail first) costs nothing in the index until its head.
//!
//! # What a run keeps
//!
//! - A block marked in a run is keyed, and block `id - 1` is keyed and
//!   carries its chain parent (`check_invariants` checks it).
//! - **Splits.** When a block loses its key (evicted, dropped by a shrink, a
//!   draining release), the block after it, if in its run, starts a run of
//!   its own: it enters the index, so it stays exactly as findable as before
//!   (by [`lookup`](BlockPool::lookup) now, and by its chain as before).
//!   Eviction order and hit semantics are those of per-block LRU: no block is
//!   evicted that per-block eviction would keep, and hit ratios are equal.
//! - **Merges.** An allocation whose first fresh block follows the block of
//!   its last hit (or the previous chunk of the same prompt) continues that
//!   run rather than starting one.
//! - **Trims.** Evicting a run's tail (the usual order: a finished
//!   sequence's tail goes first) leaves the rest of the run where it is.
//!
//! # What changes for callers
//!
//! [`lookup`](BlockPool::lookup) finds a block by its key alone only where a
//! run begins; a block inside a run is found by walking its chain:
//! [`lookup_after`](BlockPool::lookup_after) (the previous block of the
//! chain, then the key) or [`match_prefix`](BlockPool::match_prefix). Every
//! prefix match of the crate walks chains this way. A key is indexed once
//! when it is published by [`register`](BlockPool::register); a run's
//! blocks skip that check, so a key whose only other copy is a run head
//! cut off from its parent can be held twice (both copies are exact; the
//! events report both, each stored once and removed once).

use super::{BlockPool, BlockSlot, CACHED, Registered, USED, USED_KEYED};
use crate::error::{Error, Result};
use crate::ids::{BlockHash, BlockId};

impl BlockPool<'_> {
    /// The block after `prev` in its chain if it carries `key`, else the
    /// block heading a run under `key` (see [`lookup`](Self::lookup)).
    /// `prev = None` is a plain lookup. O(1) expected.
    #[inline]
    pub fn lookup_after(&self, prev: Option<BlockId>, key: BlockHash) -> Option<BlockId> {
        if let Some(p) = prev {
            let j = p.0.wrapping_add(1);
            if self.at(j).is_some_and(|s| s.carries(key)) {
                return Some(BlockId(j));
            }
        }
        self.lookup(key)
    }

    /// How many of the chained `keys`, from the first, the pool holds (a
    /// chain walk: one index probe per run). O(keys).
    pub fn match_prefix(&self, keys: &[BlockHash]) -> usize {
        let mut prev = None;
        for (n, &k) in keys.iter().enumerate() {
            prev = self.lookup_after(prev, k);
            if prev.is_none() {
                return n;
            }
        }
        keys.len()
    }

    /// Whether any block carries `key`, in a run or not. A scan, O(capacity):
    /// for audits and tests, not for serving.
    pub fn holds_key(&self, key: BlockHash) -> bool {
        self.slots.iter().any(|s| s.is_keyed() && s.key() == key)
    }

    /// Publishes held, unkeyed block `b` under `key` as the next block of a
    /// chain walk: `prev` holds the chain's previous key (`None`: the chain
    /// starts here, or no block holds its previous key). If a block holds
    /// `key` already (found after `prev`, or by its key) `b` stays unkeyed
    /// and that block is returned; else `b` is published heading a run, and
    /// returned. `None`:
    /// the index had no room (`b` stays unkeyed). `parent` and `tokens` are
    /// for the stored event. Walking chains this way, a key is never held
    /// twice. O(1) expected.
    pub fn publish_after(
        &mut self,
        prev: Option<BlockId>,
        b: BlockId,
        key: BlockHash,
        parent: Option<BlockHash>,
        tokens: &[u32],
    ) -> Result<Option<BlockId>> {
        self.publish_chained(prev, b, key, parent, tokens, Prev::Walked)
    }

    /// Publishes held, unkeyed blocks under a chain's keys, from its first
    /// key, as a chain walk (see [`publish_after`](Self::publish_after)):
    /// `chain` yields each block with its key; past a key not known
    /// (`None`) nothing more is published.
    pub(crate) fn publish_chain(
        &mut self,
        chain: impl Iterator<Item = (BlockId, Option<BlockHash>)>,
    ) {
        let (mut parent, mut prev) = (None, None);
        for (b, key) in chain {
            let Some(key) = key else { break };
            prev = self.publish_after(prev, b, key, parent, &[]).ok().flatten();
            parent = Some(key);
        }
    }

    /// [`publish_after`](Self::publish_after), told where `prev` comes from.
    #[inline]
    pub(super) fn publish_chained(
        &mut self,
        prev: Option<BlockId>,
        b: BlockId,
        key: BlockHash,
        parent: Option<BlockHash>,
        tokens: &[u32],
        whence: Prev,
    ) -> Result<Option<BlockId>> {
        // An allocation publishes the blocks it just took (held, unkeyed).
        if matches!(whence, Prev::Walked) {
            match self.slot(b)?.state() {
                USED => {}
                USED_KEYED => return Err(Error::AlreadyRegistered(b)),
                _ => return Err(Error::BlockNotInUse(b)),
            }
        }
        // One index probe either way: a run block looks its key up, a head's
        // insert finds it.
        // The block after `prev` needs no look when `prev` was unkeyed until
        // the caller published it (no run then continued it).
        let after = prev.map(|p| p.0.wrapping_add(1));
        let look = after.filter(|_| !matches!(whence, Prev::Published { .. }));
        if let Some(j) = look.filter(|&j| self.at(j).is_some_and(|s| s.carries(key))) {
            return Ok(Some(BlockId(j)));
        }
        // Runs form only from an allocation's chain of cache-hashed keys.
        let runs = matches!(
            whence,
            Prev::Found { runs: true } | Prev::Published { runs: true }
        );
        if runs && after == Some(b.0) && self.continues_run(b.0, parent) {
            if let Some(other) = self.lookup(key) {
                return Ok(Some(other));
            }
            self.stats.run_merges += u64::from(matches!(whence, Prev::Found { .. }));
            self.publish_in_run(b.0, key, parent, tokens);
            return Ok(Some(b));
        }
        Ok(match self.publish(b.0, key, parent, tokens) {
            Registered::Stored => Some(b),
            Registered::Duplicate(other) => Some(other),
            Registered::IndexFull => None,
        })
    }

    /// Whether block `i`, about to be published with chain parent `parent`,
    /// continues the run of block `i - 1` (which must carry `parent`).
    /// Only device pools form runs: a host pool is reached by key alone
    /// (offloads pick single blocks, remote tiers and routers ask by key),
    /// so every block of it stays in the index.
    #[inline]
    pub(super) fn continues_run(&self, i: u32, parent: Option<BlockHash>) -> bool {
        if self.config.kind != super::PoolKind::Device {
            return false;
        }
        match (parent, i.checked_sub(1)) {
            (Some(pk), Some(p)) => self.at(p).is_some_and(|s| s.is_keyed() && s.key() == pk),
            _ => false,
        }
    }

    /// The key of block `i` leaves the pool's index (or its run), the event
    /// says so, and the block after it, if it was in `i`'s run, starts its
    /// own. The caller sets `i`'s new state.
    #[inline(never)]
    pub(super) fn drop_key(&mut self, i: u32) {
        let Some(s) = self.at_mut(i) else {
            return;
        };
        let (key, in_run) = (s.key(), s.in_run());
        s.set_in_run(false);
        if in_run {
            self.in_runs -= 1;
            self.stats.run_trims += 1;
        } else {
            let removed = self.index.remove(key, i);
            debug_assert!(removed);
        }
        self.events.removed(self.config.id, self.config.kind, key);
        self.split_after(i);
    }

    /// Block `i` lost its key: block `i + 1`, if in its run, becomes a run
    /// head (enters the index). In the (essentially impossible) case that the
    /// index has no room, that block loses its key too (a cached one is
    /// evicted, a held one stays held, unkeyed) and the next is looked at.
    fn split_after(&mut self, i: u32) {
        let mut j = i;
        loop {
            j = j.wrapping_add(1);
            let Some(s) = self.at_mut(j) else { return };
            if !s.in_run() {
                return;
            }
            s.set_in_run(false);
            let key = s.key();
            self.in_runs -= 1;
            let slots = &self.slots;
            let key_of = |e: u32| slots.get(e as usize).map_or(BlockHash(0), BlockSlot::key);
            if self.index.insert_any(key, j, key_of) {
                self.stats.run_splits += 1;
                return;
            }
            self.events.removed(self.config.id, self.config.kind, key);
            match self.at(j).map(BlockSlot::state) {
                Some(CACHED) => {
                    self.evict_unlink(j);
                    self.stats.evictions += 1;
                    self.free_push(j);
                }
                Some(USED_KEYED) => {
                    if let Some(s) = self.at_mut(j) {
                        let next = s.next();
                        s.set(USED, next);
                    }
                }
                _ => {}
            }
        }
    }
}

/// Where the `prev` of a chained publication comes from.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Prev {
    /// An allocation's last prefix hit: continuing its run is a merge.
    /// `runs`: the allocation's keys were hashed by the cache (runs may form).
    Found { runs: bool },
    /// Found by the caller's walk, or given: the block is published as a
    /// run head (keys not hashed by the cache may repeat in one chain, and
    /// a repeated key must end a prefix match rather than hit a second copy).
    Walked,
    /// Published just before by the same allocation (unkeyed until then, so
    /// no run continued it).
    Published { runs: bool },
}

impl BlockSlot {
    /// Whether the slot holds a valid key equal to `key` (keyed, or pinned
    /// inside a run by the allocation being planned).
    #[inline]
    fn carries(&self, key: BlockHash) -> bool {
        (self.is_keyed() || self.in_run()) && self.key() == key
    }
}

#[cfg(test)]
mod tests {
    use super::super::{PoolConfig, Retention};
    use super::*;

    fn key(i: u32) -> BlockHash {
        BlockHash(u128::from(i).wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835) | 1)
    }

    /// A device pool of `n` blocks and the blocks of a chain of `len` keys
    /// (keys `from..from + len`, the first a chain root), allocated and
    /// published at once, as a prompt's misses are.
    fn chain(p: &mut BlockPool<'_>, prev: Option<BlockId>, from: u32, len: usize) -> [BlockId; 8] {
        let mut out = [BlockId(u32::MAX); 8];
        let out_len = out.len().min(len);
        p.allocate_keyed(prev, &mut out[..out_len], len, true, |k| {
            let at = from + k as u32;
            let parent = (at > 0).then(|| key(at - 1));
            (key(at), parent, &[])
        })
        .unwrap();
        out
    }

    fn pool(n: u32) -> BlockPool<'static> {
        BlockPool::with_capacity(PoolConfig::device(0, 16), n).unwrap()
    }

    #[test]
    fn a_prompt_is_one_index_entry_and_found_by_its_chain() {
        let mut p = pool(16);
        let b = chain(&mut p, None, 0, 5);
        p.check_invariants().unwrap();
        assert_eq!(p.indexed_len(), 5);
        assert_eq!(p.index.len(), 1, "only the run head is hashed");
        assert_eq!(p.lookup(key(0)), Some(b[0]));
        assert_eq!(p.lookup(key(3)), None, "inside a run: found by its chain");
        assert_eq!(p.lookup_after(Some(b[2]), key(3)), Some(b[3]));
        assert_eq!(p.lookup_after(Some(b[1]), key(3)), None);
        let keys: [BlockHash; 6] = core::array::from_fn(|i| key(i as u32));
        assert_eq!(p.match_prefix(&keys), 5);
        assert!(p.holds_key(key(4)) && !p.holds_key(key(5)));
    }

    #[test]
    fn evicting_inside_a_run_splits_it_and_every_key_stays_found() {
        let mut p = pool(16);
        let b = chain(&mut p, None, 0, 6);
        p.free(&b[..6]).unwrap();
        // Block 2 goes: block 3 heads its own run now (its parent's key is
        // gone; it stays exactly as findable as with per-block eviction).
        assert_eq!(p.evict(b[2]).unwrap(), key(2));
        assert_eq!(p.stats().run_splits, 1);
        assert_eq!(p.stats().run_trims, 1);
        p.check_invariants().unwrap();
        assert_eq!(p.lookup(key(3)), Some(b[3]));
        assert_eq!(p.lookup_after(Some(b[3]), key(4)), Some(b[4]));
        assert_eq!(p.match_prefix(&[key(0), key(1), key(2)]), 2);
        assert_eq!(p.indexed_len(), 5);
        // The tail, then the head of a run: a trim, then the index entry.
        assert_eq!(p.evict(b[5]).unwrap(), key(5));
        assert_eq!(p.evict(b[0]).unwrap(), key(0));
        assert_eq!(p.stats().run_trims, 2);
        assert_eq!(p.lookup(key(1)), Some(b[1]), "split again");
        p.check_invariants().unwrap();
    }

    #[test]
    fn a_later_allocation_merges_into_the_run_it_continues() {
        let mut p = pool(16);
        let b = chain(&mut p, None, 0, 3);
        // The next chunk of the same chain gets the next ids: one run.
        let c = chain(&mut p, Some(b[2]), 3, 3);
        assert_eq!(c[0].0, b[2].0 + 1);
        assert_eq!(p.stats().run_merges, 1);
        assert_eq!(p.index.len(), 1);
        let keys: [BlockHash; 6] = core::array::from_fn(|i| key(i as u32));
        assert_eq!(p.match_prefix(&keys), 6);
        p.check_invariants().unwrap();
        // A held run: releasing it tail first caches it, still one run.
        for &x in c[..3].iter().rev().chain(b[..3].iter().rev()) {
            p.release_as(x, Retention::Normal).unwrap();
        }
        assert_eq!(p.cached_len(), 6);
        assert_eq!(p.match_prefix(&keys), 6);
        p.check_invariants().unwrap();
    }

    #[test]
    fn a_key_held_in_a_run_is_never_published_twice() {
        let mut p = pool(16);
        let b = chain(&mut p, None, 0, 4);
        // Another block computed key 2 after key 1's block: the run's copy
        // is found and the new block stays unkeyed.
        let x = p.allocate_one().unwrap();
        assert_eq!(
            p.publish_after(Some(b[1]), x, key(2), Some(key(1)), &[]),
            Ok(Some(b[2]))
        );
        assert_eq!(p.key_of(x), Ok(None));
        assert_eq!(
            p.publish_after(Some(b[1]), b[2], key(2), Some(key(1)), &[]),
            Err(crate::Error::AlreadyRegistered(b[2]))
        );
        p.check_invariants().unwrap();
        assert_eq!(p.indexed_len(), 4);
    }

    #[test]
    fn host_pools_form_no_runs() {
        let mut p = BlockPool::with_capacity(PoolConfig::host(1, 16), 16).unwrap();
        chain(&mut p, None, 0, 5);
        assert_eq!(p.index.len(), 5, "every host block is found by its key");
        assert!((0..5).all(|i| p.lookup(key(i)).is_some()));
        p.check_invariants().unwrap();
    }

    #[test]
    fn a_shrink_through_a_run_keeps_the_rest_found() {
        let mut p = pool(8);
        let b = chain(&mut p, None, 0, 8);
        p.free(&b).unwrap();
        p.shrink(3).unwrap();
        p.check_invariants().unwrap();
        assert_eq!(p.indexed_len(), 3);
        let keys: [BlockHash; 8] = core::array::from_fn(|i| key(i as u32));
        assert_eq!(p.match_prefix(&keys), 3);
        p.reset_prefix_cache();
        p.check_invariants().unwrap();
        assert_eq!(p.indexed_len(), 0);
    }
}
