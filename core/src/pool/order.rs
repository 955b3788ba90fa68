//! The eviction order of cached blocks: three intrusive lists (classes),
//! evicted in class order and, inside a class, least recently released
//! first, and the policies that choose a released block's class.
//!
//! # Classes
//!
//! | class | holds | evicted |
//! |---|---|---|
//! | [`Retention::Low`] | a finished chain's deepest new block (`tail_first`) | first |
//! | [`Retention::Normal`] | everything else (plain LRU) | next |
//! | [`Retention::High`] | prefix hits (`protect_percent`), at most that share of the pool | last |
//!
//! With [`EvictionPolicy::LRU`] every block is `Normal`: one LRU list, the
//! order vLLM, SGLang and TGI use.
//!
//! # Cost
//!
//! No byte per block: a cached block's class lives in the two top bits of
//! its `prev` link (links are 29 bits). Push, unlink and victim are O(1)
//! (three list heads); a push into `High` past its cap moves one block down.
//!
//! # Never before a descendant
//!
//! A block is never evicted while one of its descendants in a prefix chain
//! stays cached (a child whose parent is gone can never hit), for every
//! policy, as long as holders release chains tail first (sequences do):
//! - a sequence's classes never decrease towards the root (`Low` only at
//!   the deepest block, `High` only on the leading hits), and a parent loses
//!   its last holder no earlier than its cached children did;
//! - a block that was ever shared by a second holder (a hit on a held
//!   block, a fork, a shared prefix: its ancestors are shared too) is never
//!   `Low`, and is `High` when the policy protects: another chain may
//!   continue it, and may have cached its children as hits;
//! - a change of policy merges the classes into one list, in order.
//!
//! One case no order can keep: two sequences that compute the same block at
//! once. The second copy stays unpublished, and the second sequence's later
//! blocks hang off the first copy, which the first sequence alone holds.
//! - a `High` block pushed past the cap moves the oldest `High` block to the
//!   tail of `Normal`: children leave `High` before their parents.
#![allow(
    clippy::cast_possible_truncation,
    reason = "class indices are 0..3 and links fit in 29 bits"
)]

use super::{BlockPool, CACHED, LINK_MASK, NIL};

/// Classes of the eviction order.
pub(super) const CLASSES: usize = 3;
const CLASS_SHIFT: u32 = 30;

/// Where a block that lost its last holder goes in the eviction order (a
/// request for it: the pool's [`EvictionPolicy`] decides).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug, Default)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Retention {
    /// Evicted before any other class (a chain's tail nobody continued).
    Low = 0,
    /// Plain LRU.
    #[default]
    Normal = 1,
    /// Evicted after every other class (a prefix hit: shared by chains, or
    /// a conversation that came back).
    High = 2,
}

/// Which cached blocks a pool evicts first. O(1) per operation, no byte per
/// block, no allocation; any policy keeps the order's guarantee that a
/// block is never evicted before its cached descendants (see the module).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct EvictionPolicy {
    /// Percent of the pool's blocks that prefix hits may hold in the
    /// protected class (segmented LRU); 0: off. At most 100.
    pub protect_percent: u8,
    /// A finished sequence's deepest keyed block that was not a hit is
    /// evicted before every other block.
    pub tail_first: bool,
}

impl EvictionPolicy {
    /// Least recently released first (the default).
    pub const LRU: Self = Self {
        protect_percent: 0,
        tail_first: false,
    };
    /// Prefix hits (blocks shared by chains, conversations that came back)
    /// kept in a protected class of up to `percent` of the pool.
    #[must_use]
    pub const fn protect(percent: u8) -> Self {
        Self {
            protect_percent: percent,
            tail_first: false,
        }
    }
    /// A finished chain's tail (its deepest new block) evicted first.
    pub const TAIL_FIRST: Self = Self {
        protect_percent: 0,
        tail_first: true,
    };

    /// The class a release asking for `want` gets; `shared`: the block
    /// had a second holder while held.
    #[inline]
    fn class(self, want: Retention, shared: bool) -> Retention {
        match want {
            Retention::Low if self.tail_first && !shared => Retention::Low,
            // A block another chain shared while it was held is protected
            // like a hit: its children may have been cached as hits.
            _ if self.protect_percent > 0 && (want == Retention::High || shared) => Retention::High,
            _ => Retention::Normal,
        }
    }
}

/// One class's list: its ends and length.
#[derive(Clone, Copy, Debug)]
pub(super) struct Ends {
    pub(super) head: u32,
    pub(super) tail: u32,
    pub(super) len: u32,
}

impl Ends {
    const EMPTY: Self = Self {
        head: NIL,
        tail: NIL,
        len: 0,
    };
}

/// The three classes' lists, indexed by class (a fourth, never used, makes
/// every two-bit class value an index: no branch, no bounds check).
#[derive(Clone, Copy, Debug)]
pub(super) struct Classes([Ends; 4]);

#[allow(
    clippy::indexing_slicing,
    reason = "indices are masked to 0..4, the array's length"
)]
impl Classes {
    pub(super) const EMPTY: Self = Self([Ends::EMPTY; 4]);

    /// Class `c`'s list.
    #[inline(always)]
    pub(super) fn get(&self, c: usize) -> &Ends {
        &self.0[c & 3]
    }
    #[inline(always)]
    fn get_mut(&mut self, c: usize) -> &mut Ends {
        &mut self.0[c & 3]
    }
    /// Every class, in eviction order.
    pub(super) fn all(&self) -> [&Ends; CLASSES] {
        [&self.0[0], &self.0[1], &self.0[2]]
    }
}

/// The prev link of a cached block's `a` word.
#[inline]
pub(super) fn prev_of(a: u32) -> u32 {
    a & LINK_MASK
}
/// The class of a cached block's `a` word.
#[inline]
pub(super) fn class_of(a: u32) -> usize {
    (a >> CLASS_SHIFT) as usize
}

impl BlockPool<'_> {
    /// The pool's eviction policy.
    pub fn eviction_policy(&self) -> EvictionPolicy {
        self.policy
    }

    /// Whether the policy uses classes beyond LRU (releases then say which
    /// class they ask for: [`release_as`](Self::release_as)).
    #[inline]
    pub fn is_ranked(&self) -> bool {
        self.ranked
    }

    /// Sets how cached blocks are ordered for eviction. A change merges
    /// the classes into one LRU list in their eviction order (`Low`, then
    /// `Normal`, then `High`), so that no block ranked under the old policy
    /// outlives a parent ranked under the new one: O(cached blocks).
    /// Refuses a `protect_percent` above 100 (and changes nothing).
    pub fn set_eviction_policy(&mut self, p: EvictionPolicy) -> crate::Result<()> {
        if p.protect_percent > 100 {
            return Err(crate::Error::ProtectPercentTooLarge {
                percent: p.protect_percent,
            });
        }
        if p != self.policy {
            self.merge_classes();
        }
        self.policy = p;
        self.ranked = p != EvictionPolicy::LRU;
        Ok(())
    }

    /// Makes every cached block `Normal`, keeping the eviction order.
    fn merge_classes(&mut self) {
        let normal = (Retention::Normal as u32) << CLASS_SHIFT;
        let ends = self.evict.all().map(|e| *e);
        let mut tail = NIL;
        let mut head = NIL;
        for e in &ends {
            // Relabel the list, then hang it after what came before.
            let mut i = e.head;
            while let Some(s) = self.at_mut(i) {
                s.a = prev_of(s.a) | normal;
                i = s.next();
            }
            if e.len == 0 {
                continue;
            }
            match self.at_mut(tail) {
                Some(t) => t.set(CACHED, e.head),
                None => head = e.head,
            }
            if let Some(h) = self.at_mut(e.head) {
                h.a = tail | normal;
            }
            tail = e.tail;
        }
        self.evict = Classes::EMPTY;
        *self.evict.get_mut(Retention::Normal as usize) = Ends {
            head,
            tail,
            len: self.evict_len,
        };
    }

    /// Blocks the protected class may hold.
    #[inline]
    fn protect_cap(&self) -> u32 {
        (u64::from(self.online) * u64::from(self.policy.protect_percent) / 100) as u32
    }

    /// A keyed block lost its last holder (`shared`: it had a second
    /// holder once): to the tail of its class.
    #[inline(always)]
    pub(super) fn cache_block(&mut self, i: u32, want: Retention, shared: bool) {
        if !self.ranked {
            // LRU, the common case: as cheap as a single list.
            self.evict_push_back(i, Retention::Normal as usize);
        } else {
            self.cache_ranked(i, want, shared);
        }
    }

    /// [`cache_block`](Self::cache_block) under a policy with classes.
    #[inline(never)]
    fn cache_ranked(&mut self, i: u32, want: Retention, shared: bool) {
        let c = self.policy.class(want, shared);
        self.evict_push_back(i, c as usize);
        if c == Retention::High {
            let Ends { head, len, .. } = *self.evict.get(Retention::High as usize);
            if len > self.protect_cap() {
                self.evict_unlink(head);
                self.evict_push_back(head, Retention::Normal as usize);
            }
        }
    }

    #[inline(always)]
    pub(super) fn evict_push_back(&mut self, i: u32, c: usize) {
        let tail = self.evict.get(c).tail;
        let Some(s) = self.at_mut(i) else { return };
        s.a = tail | ((c as u32) << CLASS_SHIFT);
        s.set(CACHED, NIL);
        let linked = self.at_mut(tail).map(|t| t.set(CACHED, i)).is_some();
        let e = self.evict.get_mut(c);
        if !linked {
            e.head = i;
        }
        e.tail = i;
        e.len += 1;
        self.evict_len += 1;
    }

    /// Unlinks a cached block from the eviction order. The block's own links
    /// are left as they were, so [`relink`](Self::relink) can put it back
    /// exactly where it was (as long as nothing else changed the list).
    #[inline]
    pub(super) fn evict_unlink(&mut self, i: u32) {
        let Some((a, next)) = self.at(i).map(|s| (s.a, s.next())) else {
            return;
        };
        if self.ranked {
            self.unlink_in(i, a, next, class_of(a));
        } else {
            self.unlink_in(i, a, next, Retention::Normal as usize);
        }
    }

    #[inline(always)]
    fn unlink_in(&mut self, _i: u32, a: u32, next: u32, c: usize) {
        let prev = prev_of(a);
        let bits = (c as u32) << CLASS_SHIFT;
        let has_prev = self.at_mut(prev).map(|p| p.set(CACHED, next)).is_some();
        let has_next = self.at_mut(next).map(|n| n.a = prev | bits).is_some();
        let e = self.evict.get_mut(c);
        if !has_prev {
            e.head = next;
        }
        if !has_next {
            e.tail = prev;
        }
        e.len -= 1;
        self.evict_len -= 1;
    }

    /// Undoes [`evict_unlink`](Self::evict_unlink) of block `i` (dancing
    /// links: exact when undone in reverse order of the unlinks).
    #[inline]
    pub(super) fn relink(&mut self, i: u32) {
        let Some((a, next)) = self.at(i).map(|s| (s.a, s.next())) else {
            return;
        };
        let (prev, c) = (prev_of(a), class_of(a));
        let bits = (c as u32) << CLASS_SHIFT;
        let has_prev = self.at_mut(prev).map(|p| p.set(CACHED, i)).is_some();
        let has_next = self.at_mut(next).map(|n| n.a = i | bits).is_some();
        if let Some(s) = self.at_mut(i) {
            s.set(CACHED, next);
        }
        let e = self.evict.get_mut(c);
        if !has_prev {
            e.head = i;
        }
        if !has_next {
            e.tail = i;
        }
        e.len += 1;
        self.evict_len += 1;
    }

    /// The next block to evict: the head of the lowest non-empty class.
    #[inline]
    pub(super) fn victim(&self) -> u32 {
        let e = &self.evict;
        let normal = e.get(Retention::Normal as usize);
        if !self.ranked {
            return normal.head;
        }
        let low = e.get(Retention::Low as usize);
        if low.len > 0 {
            low.head
        } else if normal.len > 0 {
            normal.head
        } else {
            e.get(Retention::High as usize).head
        }
    }

    /// The cached blocks in eviction order (the next victim first).
    pub fn eviction_order(&self) -> impl Iterator<Item = super::BlockId> + '_ {
        let mut c = 0;
        let mut i = NIL;
        core::iter::from_fn(move || {
            while self.at(i).is_none() {
                i = self.evict.all().get(c)?.head;
                c += 1;
            }
            let s = self.at(i)?;
            let b = super::BlockId(i);
            i = s.next();
            Some(b)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::*;
    use super::*;

    fn keyed(p: &mut BlockPool<'_>, n: u32) -> [BlockId; 6] {
        let mut ids = [BlockId(0); 6];
        p.allocate(&mut ids[..n as usize]).unwrap();
        for (k, &b) in ids[..n as usize].iter().enumerate() {
            p.register(b, BlockHash(100 + k as u128), None).unwrap();
        }
        ids
    }

    fn order(p: &BlockPool<'_>) -> std::vec::Vec<u32> {
        p.eviction_order().map(|b| b.0).collect()
    }

    #[test]
    fn classes_are_evicted_low_then_normal_then_high() {
        for (policy, want) in [
            (EvictionPolicy::LRU, [0, 1, 2, 3]),
            (EvictionPolicy::TAIL_FIRST, [1, 0, 2, 3]),
            (EvictionPolicy::protect(50), [0, 1, 3, 2]),
        ] {
            let mut p = BlockPool::with_capacity(PoolConfig::device(0, 4), 8).unwrap();
            p.set_eviction_policy(policy).unwrap();
            let b = keyed(&mut p, 4);
            p.release_as(b[0], Retention::Normal).unwrap();
            p.release_as(b[1], Retention::Low).unwrap();
            p.release_as(b[2], Retention::High).unwrap();
            p.release_as(b[3], Retention::Normal).unwrap();
            assert_eq!(order(&p), want, "{policy:?}");
            p.check_invariants().unwrap();
            // Eviction follows the order; hits and refused pins keep it.
            let first = p.evict_one().unwrap().0;
            assert_eq!(first.0, want[0]);
            p.check_invariants().unwrap();
        }
    }

    #[test]
    fn a_new_policy_merges_the_classes_in_eviction_order() {
        let mut p = BlockPool::with_capacity(PoolConfig::device(0, 4), 8).unwrap();
        p.set_eviction_policy(EvictionPolicy {
            protect_percent: 100,
            tail_first: true,
        })
        .unwrap();
        let b = keyed(&mut p, 6);
        for (k, want) in [
            Retention::High,
            Retention::Low,
            Retention::Normal,
            Retention::High,
            Retention::Low,
            Retention::Normal,
        ]
        .into_iter()
        .enumerate()
        {
            p.release_as(b[k], want).unwrap();
        }
        let before = order(&p);
        assert_eq!(before, [1, 4, 2, 5, 0, 3]);
        p.set_eviction_policy(EvictionPolicy::LRU).unwrap();
        assert_eq!(order(&p), before);
        assert_eq!(p.evict.all().map(|e| e.len), [0, 6, 0]);
        p.check_invariants().unwrap();
        // Hits and evictions keep working on the merged list.
        assert_eq!(p.acquire(BlockHash(102)), Some(b[2]));
        assert_eq!(p.evict_one().unwrap().0, b[1]);
        p.release(b[2]).unwrap();
        assert_eq!(order(&p), [4, 5, 0, 3, 2]);
        p.check_invariants().unwrap();
    }

    #[test]
    fn the_protected_class_sheds_its_oldest_block_past_its_share() {
        let mut p = BlockPool::with_capacity(PoolConfig::device(0, 4), 6).unwrap();
        p.set_eviction_policy(EvictionPolicy::protect(34)).unwrap(); // 2 blocks
        let b = keyed(&mut p, 4);
        p.release_as(b[0], Retention::Normal).unwrap();
        for &x in &b[1..4] {
            p.release_as(x, Retention::High).unwrap();
        }
        // Block 1, the oldest protected one, went to Normal's tail.
        assert_eq!(order(&p), [0, 1, 2, 3]);
        assert_eq!(p.evict.all().map(|e| e.len), [0, 2, 2]);
        p.check_invariants().unwrap();
    }

    #[test]
    fn a_block_shared_while_held_is_never_evicted_first() {
        let mut p = BlockPool::with_capacity(PoolConfig::device(0, 4), 8).unwrap();
        p.set_eviction_policy(EvictionPolicy::TAIL_FIRST).unwrap();
        let b = keyed(&mut p, 2);
        p.add_ref(b[1]).unwrap();
        p.release_as(b[1], Retention::Low).unwrap();
        p.release_as(b[0], Retention::Normal).unwrap();
        p.release_as(b[1], Retention::Low).unwrap();
        assert_eq!(order(&p), [0, 1]);
        assert_eq!(p.ref_count(b[1]).unwrap(), 0);
        p.check_invariants().unwrap();
        // Past 100 percent is refused; the policy stays.
        assert_eq!(
            p.set_eviction_policy(EvictionPolicy::protect(101)),
            Err(crate::Error::ProtectPercentTooLarge { percent: 101 })
        );
        assert_eq!(p.eviction_policy(), EvictionPolicy::TAIL_FIRST);
    }
}
