//! The prefix index: key → block, a fixed open-addressing table of `u32`
//! block indices over caller storage.
//!
//! Keys are already uniform 128-bit hashes, so the home bucket is a
//! multiply-shift of the key's low 64 bits onto `[0, len)` (no second hash,
//! any table length). Linear probing; deletion by backward shift (no
//! tombstones), so probe lengths do not decay over a long run. The table has
//! at least 1.5 buckets per block, so the load never exceeds 2/3 and an
//! unsuccessful probe inspects about 5 buckets on average.
//!
//! Why not `hashbrown::HashTable<u32>`: its power-of-two bucket count plus a
//! control byte per bucket costs up to 11.4 bytes per block, which alone
//! breaks the budget of 32 bytes of metadata per block; this table costs 6 and
//! is the same code with and without `alloc`.

use crate::ids::BlockHash;
use crate::storage::Slots;

pub(crate) const EMPTY: u32 = u32::MAX;

/// Buckets needed for a pool of `capacity` blocks.
pub(crate) const fn buckets_for(capacity: u32) -> usize {
    let c = capacity as usize;
    c + c / 2 + 1
}

#[derive(Debug)]
pub(crate) struct PrefixIndex<'a> {
    table: Slots<'a, u32>,
    len: u32,
}

impl<'a> PrefixIndex<'a> {
    /// `table` must hold at least `buckets_for(capacity)` entries; extra are used too.
    pub(crate) fn new(mut table: Slots<'a, u32>) -> Self {
        table.fill(EMPTY);
        Self { table, len: 0 }
    }

    #[inline]
    pub(crate) fn len(&self) -> u32 {
        self.len
    }

    #[inline]
    fn home(&self, key: BlockHash) -> usize {
        ((u128::from(key.0 as u64) * self.table.len() as u128) >> 64) as usize
    }

    #[inline]
    fn next(&self, i: usize) -> usize {
        if i + 1 == self.table.len() { 0 } else { i + 1 }
    }

    /// The block indexed under `key`, if any. `key_of(b)` is the key block `b` carries.
    #[inline]
    pub(crate) fn find(&self, key: BlockHash, key_of: impl Fn(u32) -> BlockHash) -> Option<u32> {
        let mut i = self.home(key);
        loop {
            let e = self.table[i];
            if e == EMPTY {
                return None;
            }
            if key_of(e) == key {
                return Some(e);
            }
            i = self.next(i);
        }
    }

    /// Inserts `block` under `key`; the caller checked that `key` is absent
    /// and that the table is not full (`len < capacity`).
    #[inline]
    pub(crate) fn insert_unique(&mut self, key: BlockHash, block: u32) {
        debug_assert!((self.len as usize) < self.table.len() - 1);
        let mut i = self.home(key);
        while self.table[i] != EMPTY {
            i = self.next(i);
        }
        self.table[i] = block;
        self.len += 1;
    }

    /// Removes the entry for `block` (indexed under `key`). Returns whether it was there.
    #[inline]
    pub(crate) fn remove(
        &mut self,
        key: BlockHash,
        block: u32,
        key_of: impl Fn(u32) -> BlockHash,
    ) -> bool {
        let mut i = self.home(key);
        loop {
            let e = self.table[i];
            if e == EMPTY {
                return false;
            }
            if e == block {
                break;
            }
            i = self.next(i);
        }
        // Backward-shift deletion.
        let mut hole = i;
        let mut j = i;
        loop {
            j = self.next(j);
            let e = self.table[j];
            if e == EMPTY {
                break;
            }
            let h = self.home(key_of(e));
            // `e` may fill the hole unless its home lies cyclically in (hole, j].
            let stays = if hole <= j {
                hole < h && h <= j
            } else {
                hole < h || h <= j
            };
            if !stays {
                self.table[hole] = e;
                hole = j;
            }
        }
        self.table[hole] = EMPTY;
        self.len -= 1;
        true
    }

    pub(crate) fn clear(&mut self) {
        self.table.fill(EMPTY);
        self.len = 0;
    }

    /// Every occupied entry (for invariant checks).
    pub(crate) fn entries(&self) -> impl Iterator<Item = (usize, u32)> + '_ {
        self.table
            .iter()
            .copied()
            .enumerate()
            .filter(|&(_, e)| e != EMPTY)
    }

    /// Whether `key` is reachable from its home bucket without crossing an empty one.
    pub(crate) fn reachable(&self, key: BlockHash, at: usize) -> bool {
        let mut i = self.home(key);
        loop {
            if i == at {
                return true;
            }
            if self.table[i] == EMPTY {
                return false;
            }
            i = self.next(i);
        }
    }
}
