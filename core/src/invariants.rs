//! The cache-wide invariant check: every pool, every sequence and plan, and
//! that each block's reference count equals the table entries and plan
//! references naming it.
#![allow(
    clippy::cast_possible_truncation,
    reason = "indices below u32 limits by construction"
)]

use crate::cache::{HOLE, KvCache, row_of};
use crate::hash::BlockHasher;
use crate::ids::{BlockId, PoolId};
use crate::pool::{Invariant, ensure};
use crate::slab::NIL;

impl<H: BlockHasher> KvCache<'_, H> {
    /// Checks every pool, every sequence and plan, and that each block's
    /// reference count equals the number of table entries and plan
    /// references naming it. O(capacity + table entries) with `alloc`,
    /// quadratic in table entries without it (meant for tests and small
    /// firmware pools).
    pub fn check_invariants(&self) -> Result<(), Invariant> {
        for p in &self.pools {
            p.check_invariants()?;
        }
        self.seqs.check("live sequence count")?;
        self.plans.check("live plan count")?;
        let bs = self.bs;
        for (idx, s) in self.seqs.iter() {
            ensure(
                u64::from(s.blocks) == self.blocks_for(u64::from(s.tokens) + u64::from(s.reserve)),
                "table length vs tokens",
                Some(idx),
            )?;
            ensure(s.first_live <= s.blocks, "first_live past end", Some(idx))?;
            ensure(
                s.keyed_blocks <= s.tokens / bs,
                "keyed past full blocks",
                Some(idx),
            )?;
            let pi = self.pool_index(PoolId(s.pool)).map_err(|_| Invariant {
                what: "seq in unknown pool",
                at: Some(idx),
            })?;
            let pool = self.pools.get(pi);
            for (k, &b) in self.row(idx).iter().take(s.blocks as usize).enumerate() {
                if (k as u32) < s.first_live {
                    ensure(b == HOLE, "hole expected", Some(idx))?;
                } else {
                    let rc = pool.and_then(|p| p.ref_count(b).ok()).unwrap_or(0);
                    ensure(rc > 0, "table names an unheld block", Some(idx))?;
                }
            }
            if s.plan != NIL {
                let p = self.plans.at(s.plan).filter(|p| p.links.live);
                ensure(
                    p.is_some_and(|p| p.seq == idx),
                    "moving sequence without its plan",
                    Some(idx),
                )?;
            }
        }
        for (idx, p) in self.plans.iter() {
            if p.seq == NIL {
                continue;
            }
            let s = self.seqs.at(p.seq).filter(|s| s.links.live);
            ensure(
                s.is_some_and(|s| s.plan == idx),
                "plan without its sequence",
                Some(idx),
            )?;
            ensure(
                s.is_some_and(|s| p.len == s.blocks - s.first_live),
                "plan length",
                Some(idx),
            )?;
        }
        self.check_ref_counts()
    }

    /// Calls `f` with every reference the cache's sequences and plans hold,
    /// as (pool index, block): live table entries; plan targets (a
    /// relocation's or a copy-on-write's unmoved positions are the table's
    /// own); tier plan sources.
    fn for_each_holder(&self, f: &mut dyn FnMut(usize, BlockId)) {
        for (i, s) in self.seqs.iter() {
            let Ok(pi) = self.pool_index(PoolId(s.pool)) else {
                continue;
            };
            let row = row_of(&self.tables, i, self.width);
            for &b in row
                .get(s.first_live as usize..s.blocks as usize)
                .unwrap_or(&[])
            {
                f(pi, b);
            }
        }
        for (i, p) in self.plans.iter() {
            let src = self.pool_index(PoolId(p.src)).ok();
            let dst = self.pool_index(PoolId(p.dst)).ok();
            let tier = p.seq == NIL;
            let same = p.src == p.dst;
            for (&s, &t) in self.plan_sources(i, p).iter().zip(self.plan_targets(i, p)) {
                if let Some(d) = dst.filter(|_| tier || !same || s != t) {
                    f(d, t);
                }
                if let Some(sp) = src.filter(|_| tier && s != HOLE) {
                    f(sp, s);
                }
            }
        }
    }

    #[cfg(feature = "alloc")]
    fn check_ref_counts(&self) -> Result<(), Invariant> {
        let mut counts: alloc::vec::Vec<alloc::vec::Vec<u32>> = self
            .pools
            .iter()
            .map(|p| alloc::vec![0; p.max_blocks() as usize])
            .collect();
        let mut out_of_range = None;
        self.for_each_holder(&mut |pi, b| match counts
            .get_mut(pi)
            .and_then(|c| c.get_mut(b.index()))
        {
            Some(c) => *c += 1,
            None => out_of_range = Some(b.0),
        });
        ensure(
            out_of_range.is_none(),
            "table entry out of range",
            out_of_range,
        )?;
        for (p, counts) in self.pools.iter().zip(&counts) {
            for (b, &c) in counts.iter().enumerate() {
                let rc = p.ref_count(BlockId(b as u32)).unwrap_or(u32::MAX);
                ensure(rc == c, "ref count differs from holders", Some(b as u32))?;
            }
        }
        Ok(())
    }

    #[cfg(not(feature = "alloc"))]
    fn check_ref_counts(&self) -> Result<(), Invariant> {
        for (pi, p) in self.pools.iter().enumerate() {
            for b in 0..p.max_blocks() {
                let mut c = 0u32;
                self.for_each_holder(&mut |q, h| c += u32::from(q == pi && h.0 == b));
                let rc = p.ref_count(BlockId(b)).unwrap_or(u32::MAX);
                ensure(rc == c, "ref count differs from holders", Some(b))?;
            }
        }
        Ok(())
    }
}
