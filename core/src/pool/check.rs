//! The pool's invariant check, and its unit tests.

use super::order::{class_of, prev_of};
use super::{BlockPool, BlockSlot, CACHED, FREE, Invariant, NIL, ensure};

impl BlockPool<'_> {
    /// Checks, in O(capacity): the free stack holds exactly the free blocks;
    /// the eviction order is a well-linked list of exactly the cached blocks;
    /// free + cached + used = capacity; every keyed block is indexed and
    /// reachable under its key, or inside a run (after a keyed block, not
    /// indexed), and every index entry names a block carrying it.
    pub fn check_invariants(&self) -> Result<(), Invariant> {
        let cap = self.max_blocks();
        let (mut free, mut cached, mut keyed, mut held) = (0u32, 0u32, 0u32, 0u32);
        let mut in_runs = 0u32;
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
                    ensure(
                        s.a & super::lists::COUNT_MASK > 0,
                        "held block with zero holders",
                        Some(i),
                    )?;
                    ensure(
                        s.a & super::lists::PIN_BIT == 0,
                        "pin left on a block",
                        Some(i),
                    )?;
                    held += 1;
                }
            }
            if s.in_run() {
                // Inside a run: keyed, after a keyed block, not indexed.
                in_runs += 1;
                ensure(s.is_keyed(), "run mark on an unkeyed block", Some(i))?;
                let before = i.checked_sub(1).and_then(|p| self.at(p));
                ensure(
                    before.is_some_and(BlockSlot::is_keyed),
                    "run block after an unkeyed one",
                    Some(i),
                )?;
                ensure(
                    !self.index.contains(s.key(), i),
                    "run block indexed",
                    Some(i),
                )?;
            } else if s.is_keyed() {
                keyed += 1;
                ensure(
                    self.index.contains(s.key(), i),
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
        ensure(in_runs == self.in_runs, "run block count", None)?;
        // Free stack.
        let (mut n, mut i) = (0u32, self.free_head);
        while i != NIL {
            let s = self.at(i);
            ensure(s.is_some(), "free link out of range", Some(i))?;
            let s = s.copied().unwrap_or(super::BlockSlot::EMPTY);
            ensure(s.state() == FREE, "non-free on free stack", Some(i))?;
            n += 1;
            ensure(n <= free, "free stack cycle", Some(i))?;
            i = s.next();
        }
        ensure(n == free, "free stack length", None)?;
        // Eviction order, each class in both directions.
        let mut n = 0u32;
        for (c, ends) in self.evict.all().into_iter().enumerate() {
            let (mut len, mut prev) = (0u32, NIL);
            let mut i = ends.head;
            while i != NIL {
                let s = self.at(i);
                ensure(s.is_some(), "eviction link out of range", Some(i))?;
                let s = s.copied().unwrap_or(super::BlockSlot::EMPTY);
                ensure(s.state() == CACHED, "non-cached in eviction order", Some(i))?;
                ensure(prev_of(s.a) == prev, "eviction prev link", Some(i))?;
                ensure(class_of(s.a) == c, "eviction class", Some(i))?;
                len += 1;
                ensure(len <= cached, "eviction order cycle", Some(i))?;
                prev = i;
                i = s.next();
            }
            ensure(prev == ends.tail, "eviction tail", None)?;
            ensure(len == ends.len, "eviction class length", None)?;
            n += len;
        }
        ensure(n == cached, "eviction order length", None)?;
        // Index entries.
        for (at, e) in self.index.entries() {
            let s = self.at(e);
            ensure(e < cap && s.is_some(), "index entry out of range", Some(e))?;
            let s = s.copied().unwrap_or(super::BlockSlot::EMPTY);
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
    use super::super::*;
    use crate::buckets_for;

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
    fn free_stack_is_exactly_lifo() {
        // Unkeyed blocks go back on the free stack: what comes out must be
        // exactly what a plain stack would give, also after shrink and grow.
        let mut p = pool(50);
        let mut model: std::vec::Vec<BlockId> = (0..50).rev().map(BlockId).collect();
        let mut held = std::vec::Vec::new();
        let mut x: u64 = 7;
        let steps = if cfg!(miri) { 500 } else { 5_000 };
        for step in 0..steps {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if !x.is_multiple_of(2) && !model.is_empty() {
                let n = (x % 9) as usize % (model.len() + 1);
                let mut out = std::vec![BlockId(0); n];
                p.allocate(&mut out).unwrap();
                let want: std::vec::Vec<BlockId> = (0..n).map(|_| model.pop().unwrap()).collect();
                assert_eq!(out, want, "step {step}");
                held.extend(out);
            } else if !held.is_empty() {
                let k = (x % 7) as usize % held.len() + 1;
                let back: std::vec::Vec<BlockId> = held.drain(held.len() - k..).collect();
                p.free(&back).unwrap();
                model.extend(back);
            }
            if step % 97 == 0 {
                p.check_invariants().unwrap();
            }
        }
        // Shrink rebuilds the stack lowest id on top; grow pushes the new
        // blocks (lowest on top).
        p.free(&held).unwrap();
        p.shrink(20).unwrap();
        p.check_invariants().unwrap();
        let mut out = [BlockId(0); 20];
        p.allocate(&mut out).unwrap();
        assert!(out.iter().map(|b| b.0).eq(0..20));
        p.grow(30).unwrap();
        let mut more = [BlockId(0); 30];
        p.allocate(&mut more).unwrap();
        assert!(more.iter().map(|b| b.0).eq(20..50));
        assert_eq!(p.available(), 0);
        p.free(&out).unwrap();
        p.free(&more).unwrap();
        p.check_invariants().unwrap();
    }

    #[test]
    fn index_survives_heavy_churn() {
        let mut p = pool(64);
        let mut held = heapless::Vec::<BlockId, 64>::new();
        let mut x: u64 = 1;
        let steps = if cfg!(miri) { 2_000u64 } else { 20_000 };
        for step in 0..steps {
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
