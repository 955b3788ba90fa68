//! The prefix index: key → block, a bucketized cuckoo table of `u32` entries
//! over caller storage.
//!
//! Each key has two candidate buckets of 8 entries (from the low and the
//! high 64 bits of the key, which is already a uniform 128-bit hash: no
//! second hashing). An entry packs the block index in its low `id_bits` and
//! a tag (more key bits) in the rest, so a lookup compares 16 entries of two
//! cache lines and dereferences a slot only on a tag match. Removal clears
//! one entry: no shifting, no tombstones, O(1) in the worst case. Insertion
//! takes a free entry of either bucket, or displaces entries along a short
//! cuckoo path (bounded; undone if it fails, in which case the block is
//! simply not cached: the index never corrupts and never grows).
//!
//! The table has 1.5 entries per block (load at most 2/3, where 8-way
//! cuckoo buckets essentially never need a displacement), 6 bytes per block.
//!
//! Why not `hashbrown::HashTable<u32>`: its power-of-two bucket count plus a
//! control byte per bucket costs up to 11.4 bytes per block, which alone
//! breaks the budget of 32 bytes of metadata per block; this table costs 6,
//! needs no allocator, and its removal (the eviction path) never probes.
#![allow(
    clippy::cast_possible_truncation,
    reason = "bucket indices are below the table length (fast range reduction); key halves are split on purpose"
)]

use crate::ids::BlockHash;
use crate::storage::Slots;

pub(crate) const EMPTY: u32 = u32::MAX;
/// A bucket with nothing in it (what a bucket index past the table reads).
const EMPTY_BUCKET: [u32; WAYS] = [EMPTY; WAYS];

/// Outcome of [`PrefixIndex::insert`].
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Insert {
    Inserted,
    Exists(u32),
    Full,
}
const WAYS: usize = 8;
const MAX_KICKS: usize = 32;

/// Entries (`u32`) needed for a pool of `capacity` blocks: 1.5 per block,
/// rounded up to whole buckets, at least two buckets.
pub(crate) const fn buckets_for(capacity: u32) -> usize {
    let c = capacity as usize;
    let entries = c + c / 2 + 1;
    let buckets = entries.div_ceil(WAYS);
    (if buckets < 2 { 2 } else { buckets }) * WAYS
}

#[derive(Debug)]
pub(crate) struct PrefixIndex<'a> {
    table: Slots<'a, u32>,
    buckets: usize,
    id_bits: u32,
    len: u32,
    rotor: u32,
}

impl<'a> PrefixIndex<'a> {
    /// `table` must hold at least `buckets_for(capacity)` entries.
    pub(crate) fn new(mut table: Slots<'a, u32>, capacity: u32) -> Self {
        table.fill(EMPTY);
        let buckets = table.len() / WAYS;
        // Bits to write `capacity` itself: the id part of EMPTY (all ones) is
        // then never a valid block index.
        let id_bits = 32 - capacity.leading_zeros();
        Self {
            table,
            buckets,
            id_bits,
            len: 0,
            rotor: 0,
        }
    }

    #[inline]
    pub(crate) fn len(&self) -> u32 {
        self.len
    }

    #[inline]
    fn id_mask(&self) -> u32 {
        if self.id_bits >= 32 {
            u32::MAX
        } else {
            (1 << self.id_bits) - 1
        }
    }

    #[inline]
    fn entry(&self, key: BlockHash, block: u32) -> u32 {
        let tag = ((key.0 >> 96) as u32)
            .checked_shl(self.id_bits)
            .unwrap_or(0);
        (tag & !self.id_mask()) | block
    }

    #[inline]
    fn buckets_of(&self, key: BlockHash) -> (usize, usize) {
        let n = self.buckets as u128;
        let b1 = ((u128::from(key.0 as u64) * n) >> 64) as usize;
        let mut b2 = ((u128::from((key.0 >> 64) as u64) * n) >> 64) as usize;
        if b2 == b1 {
            b2 = if b1 + 1 == self.buckets { 0 } else { b1 + 1 };
        }
        (b1, b2)
    }

    /// Bucket `b` (always below `buckets`; an index past the table reads
    /// as empty rather than panicking).
    #[inline]
    fn bucket(&self, b: usize) -> &[u32; WAYS] {
        self.table
            .as_chunks::<WAYS>()
            .0
            .get(b)
            .unwrap_or(&EMPTY_BUCKET)
    }

    /// Entry `pos` of the table, mutably (`None` past its end).
    #[inline]
    fn slot_mut(&mut self, pos: usize) -> Option<&mut u32> {
        self.table.get_mut(pos)
    }

    /// The block indexed under `key`, if any. `key_of(b)` is the key block `b` carries.
    #[inline]
    pub(crate) fn find(&self, key: BlockHash, key_of: impl Fn(u32) -> BlockHash) -> Option<u32> {
        let (b1, b2) = self.buckets_of(key);
        let probe = self.entry(key, 0);
        let mask = self.id_mask();
        for b in [b1, b2] {
            let bucket = self.bucket(b);
            // Branch-free tag match over the bucket (vectorizes), then check
            // the few candidates: an EMPTY entry's id part is never a block.
            let mut hits = Self::matches(bucket, !mask, probe);
            while hits != 0 {
                let id = bucket
                    .get(hits.trailing_zeros() as usize)
                    .map_or(mask, |e| e & mask);
                if id != mask && key_of(id) == key {
                    return Some(id);
                }
                hits &= hits - 1;
            }
        }
        None
    }

    /// Bit `w` set where `bucket[w] & select == want`.
    #[inline]
    fn matches(bucket: &[u32; WAYS], select: u32, want: u32) -> u32 {
        crate::scan::matches(bucket, select, want)
    }

    #[inline]
    fn free_way(&self, b: usize) -> Option<usize> {
        let m = Self::matches(self.bucket(b), u32::MAX, EMPTY);
        (m != 0).then(|| m.trailing_zeros() as usize)
    }

    /// Inserts `block` under `key` unless `key` is present (one pass over
    /// the two buckets finds an existing entry and a free way at once).
    pub(crate) fn insert(
        &mut self,
        key: BlockHash,
        block: u32,
        key_of: impl Fn(u32) -> BlockHash,
    ) -> Insert {
        let (b1, b2) = self.buckets_of(key);
        let e = self.entry(key, block);
        let mask = self.id_mask();
        let mut free = None;
        for b in [b1, b2] {
            let bucket = self.bucket(b);
            let mut hits = Self::matches(bucket, !mask, e & !mask);
            while hits != 0 {
                let id = bucket
                    .get(hits.trailing_zeros() as usize)
                    .map_or(mask, |e| e & mask);
                if id != mask && key_of(id) == key {
                    return Insert::Exists(id);
                }
                hits &= hits - 1;
            }
            if free.is_none() {
                let m = Self::matches(bucket, u32::MAX, EMPTY);
                if m != 0 {
                    free = Some(b * WAYS + m.trailing_zeros() as usize);
                }
            }
        }
        if let Some(slot) = free.and_then(|pos| self.slot_mut(pos)) {
            *slot = e;
            self.len += 1;
            return Insert::Inserted;
        }
        if self.displace(b1, e, key_of) {
            Insert::Inserted
        } else {
            Insert::Full
        }
    }

    /// Inserts `block` under `key` even if `key` is indexed already (a run
    /// head that must stay findable; `find` returns either). False when the
    /// table has no room.
    pub(crate) fn insert_any(
        &mut self,
        key: BlockHash,
        block: u32,
        key_of: impl Fn(u32) -> BlockHash,
    ) -> bool {
        let (b1, b2) = self.buckets_of(key);
        let e = self.entry(key, block);
        for b in [b1, b2] {
            if let Some(slot) = self.free_way(b).and_then(|w| self.slot_mut(b * WAYS + w)) {
                *slot = e;
                self.len += 1;
                return true;
            }
        }
        self.displace(b1, e, key_of)
    }

    /// Whether `block` is indexed under `key`.
    pub(crate) fn contains(&self, key: BlockHash, block: u32) -> bool {
        let (b1, b2) = self.buckets_of(key);
        let e = self.entry(key, block);
        [b1, b2]
            .into_iter()
            .any(|b| Self::matches(self.bucket(b), u32::MAX, e) != 0)
    }

    /// Makes room for `e` in bucket `b1` by moving entries to their other
    /// bucket along a bounded path; undone if it fails.
    fn displace(&mut self, b1: usize, e: u32, key_of: impl Fn(u32) -> BlockHash) -> bool {
        // Cuckoo path: displace entries to their other bucket, remembering
        // each swap so a failed path can be undone.
        let mut path = [0usize; MAX_KICKS];
        let mut carried = e;
        let mut b = b1;
        let mut steps = 0;
        for slot in path.iter_mut() {
            self.rotor = self.rotor.wrapping_add(1);
            let pos = b * WAYS + (self.rotor as usize % WAYS);
            let Some(entry) = self.slot_mut(pos) else {
                break;
            };
            *slot = pos;
            steps += 1;
            carried = core::mem::replace(entry, carried);
            let (k1, k2) = self.buckets_of(key_of(carried & self.id_mask()));
            b = if k1 == b { k2 } else { k1 };
            let free = self.free_way(b).and_then(|w| self.slot_mut(b * WAYS + w));
            if let Some(entry) = free {
                *entry = carried;
                self.len += 1;
                return true;
            }
        }
        for &pos in path.iter().take(steps).rev() {
            if let Some(entry) = self.slot_mut(pos) {
                carried = core::mem::replace(entry, carried);
            }
        }
        debug_assert_eq!(carried, e);
        false
    }

    /// Removes the entry of `block` (indexed under `key`). O(1).
    #[inline]
    pub(crate) fn remove(&mut self, key: BlockHash, block: u32) -> bool {
        let (b1, b2) = self.buckets_of(key);
        let e = self.entry(key, block);
        for b in [b1, b2] {
            let m = Self::matches(self.bucket(b), u32::MAX, e);
            let w = m.trailing_zeros() as usize;
            if let Some(entry) = self.slot_mut(b * WAYS + w).filter(|_| m != 0) {
                *entry = EMPTY;
                self.len -= 1;
                return true;
            }
        }
        false
    }

    pub(crate) fn clear(&mut self) {
        self.table.fill(EMPTY);
        self.len = 0;
    }

    /// Every occupied entry as (position, block) (for invariant checks).
    pub(crate) fn entries(&self) -> impl Iterator<Item = (usize, u32)> + '_ {
        let mask = self.id_mask();
        self.table
            .iter()
            .copied()
            .enumerate()
            .filter(|&(_, e)| e != EMPTY)
            .map(move |(i, e)| (i, e & mask))
    }

    /// Whether the entry at `at` is where `key` can be found, with its tag.
    pub(crate) fn reachable(&self, key: BlockHash, at: usize) -> bool {
        let (b1, b2) = self.buckets_of(key);
        let b = at / WAYS;
        let e = self.table.get(at).copied().unwrap_or(EMPTY);
        (b == b1 || b == b2) && e == self.entry(key, e & self.id_mask())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: u32) -> BlockHash {
        let x = u128::from(i).wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835) ^ 0xabcdef;
        BlockHash(x.rotate_left(i % 128))
    }

    #[test]
    fn full_table_refuses_without_losing_entries() {
        let keys: std::vec::Vec<BlockHash> = (0..64).map(key).collect();
        let key_of = |b: u32| keys[b as usize];
        let mut idx = PrefixIndex::new(Slots::owned(2 * WAYS, 0), 64);
        for b in 0..16 {
            assert_eq!(
                idx.insert(keys[b as usize], b, key_of),
                Insert::Inserted,
                "{b}"
            );
        }
        let before: std::vec::Vec<u32> = idx.table.to_vec();
        assert_eq!(idx.insert(keys[16], 16, key_of), Insert::Full);
        assert_eq!(idx.insert(keys[5], 5, key_of), Insert::Exists(5));
        assert_eq!(&idx.table[..], &before[..], "failed insert undone");
        for b in 0..16 {
            assert_eq!(idx.find(keys[b as usize], key_of), Some(b));
        }
        assert!(idx.remove(keys[3], 3));
        assert_eq!(idx.find(keys[3], key_of), None);
        assert_eq!(idx.insert(keys[16], 16, key_of), Insert::Inserted);
        assert_eq!(idx.find(keys[16], key_of), Some(16));
        assert_eq!(idx.len(), 16);
    }

    #[test]
    fn fills_to_capacity_at_the_designed_load() {
        let n = if cfg!(miri) { 512u32 } else { 4096 };
        let keys: std::vec::Vec<BlockHash> = (0..n).map(key).collect();
        let key_of = |b: u32| keys[b as usize];
        let mut idx = PrefixIndex::new(Slots::owned(buckets_for(n), 0), n);
        for b in 0..n {
            assert_eq!(idx.insert(keys[b as usize], b, key_of), Insert::Inserted);
        }
        let mut at = std::vec![usize::MAX; n as usize];
        for (pos, e) in idx.entries() {
            at[e as usize] = pos;
        }
        for b in 0..n {
            assert_eq!(idx.find(keys[b as usize], key_of), Some(b));
            assert!(idx.reachable(keys[b as usize], at[b as usize]));
        }
    }
}
