//! Tier moves of cached blocks, as two-phase plans run like swaps:
//!
//! - [`KvCache::offload`]: the least recently used cached blocks of a
//!   device pool are copied to a host pool before an allocation would evict
//!   them; at commit they are published on the host tier and leave the device.
//! - [`KvCache::promote`]: the blocks of a prompt found on the host tier
//!   (after its device hits) are copied back to the device; at commit they are
//!   published there, so the allocation that follows hits them.
//!
//! A tier plan holds its source blocks and its targets (and, for a
//! promotion, the prompt's device hits, so the promotion's own allocation
//! cannot evict them) until it ends. Nothing is published before its copy
//! landed; an abort publishes nothing and releases everything it held.
#![allow(
    clippy::cast_possible_truncation,
    reason = "plan lengths are below max_blocks_per_seq (u32)"
)]

use crate::cache::{HOLE, KvCache, row_of, row_of_mut};
use crate::error::{Error, Result};
use crate::hash::BlockHasher;
use crate::ids::{BlockHash, PlanId, PoolId};
use crate::plan::{PlanKind, PlanSlot, two_pools};
use crate::slab::NIL;

impl<H: BlockHasher> KvCache<'_, H> {
    /// Plans copying up to `max` cached blocks of pool `from`, least recently
    /// used first, to pool `to`, skipping those whose key `skip` names (the
    /// prompt about to hit them) and those `to` holds already. `None`:
    /// nothing to offload (nothing changed). `to` must be a host pool. The
    /// sources leave `from`'s eviction order until the plan ends. O(blocks
    /// walked).
    pub fn offload(
        &mut self,
        from: PoolId,
        to: PoolId,
        max: u32,
        skip: impl Fn(BlockHash) -> bool,
    ) -> Result<Option<PlanId>> {
        let (src, dst) = self.tier_pools(from, to)?;
        // A host pool: it is asked by key alone which blocks it holds.
        if self.pool(to)?.kind() != crate::PoolKind::Host {
            return Err(Error::WrongPoolKind(to));
        }
        let pi = self.plans.vacant().ok_or(Error::TooManyPlans {
            capacity: self.plans.capacity(),
        })?;
        let (sp, dp) = two_pools(&mut self.pools, src, dst)?;
        let dp = dp.ok_or(Error::SamePool(to))?;
        let limit = (max as usize).min(self.width).min(dp.available() as usize);
        let sources = row_of_mut(&mut self.plan_sources, pi, self.width);
        let mut n = 0usize;
        for b in sp.eviction_order() {
            if n >= limit {
                break;
            }
            let Some(key) = sp.key_of(b).ok().flatten() else {
                continue;
            };
            if skip(key) || dp.lookup(key).is_some() {
                continue;
            }
            if let Some(e) = sources.get_mut(n) {
                *e = b;
                n += 1;
            }
        }
        if n == 0 {
            return Ok(None);
        }
        let sources = sources.get(..n).unwrap_or(&[]);
        for &b in sources {
            sp.acquire_block(b);
        }
        let targets = row_of_mut(&mut self.plan_targets, pi, self.width);
        dp.allocate(targets.get_mut(..n).unwrap_or(&mut []))?;
        let plan = PlanSlot {
            kind: PlanKind::Offload,
            src: from.0,
            dst: to.0,
            len: n as u32,
            ..PlanSlot::EMPTY
        };
        self.insert_plan(plan, None).map(Some)
    }

    /// Publishes in pool `to` blocks whose bytes come from outside the
    /// cache (a remote tier shared by replicas): for each of the chained
    /// `keys` in order (the first one's parent is `parent`), takes a block
    /// (free, else the next in eviction order), lets `fill(i, block)` write
    /// key `i`'s bytes into it, then registers it and leaves it cached,
    /// unheld. Keys `to` holds already are skipped, filling nothing. Stops at
    /// the first block that cannot be taken or that `fill` refuses (returns
    /// false): that block goes back free, unkeyed, so a chain is published
    /// only as far as its bytes are whole. Returns how many keys, from the
    /// first, `to` holds afterwards, and how many of those this call
    /// published. `to` must be a host pool. O(1) per key, plus `fill`.
    pub fn import(
        &mut self,
        to: PoolId,
        parent: Option<BlockHash>,
        keys: &[BlockHash],
        mut fill: impl FnMut(usize, crate::BlockId) -> bool,
    ) -> Result<(usize, usize)> {
        let p = self.pool_mut(to)?;
        // A host pool: every block is found by its key (no runs).
        if p.kind() != crate::PoolKind::Host {
            return Err(Error::WrongPoolKind(to));
        }
        // Pass 1: hold each block of the chain (found, or taken and filled),
        // so taking a block never evicts the chain's own head.
        let mut parent = parent;
        let (mut held, mut published) = (0, 0);
        for (i, &key) in keys.iter().enumerate() {
            if p.acquire(key).is_none() {
                let Ok(b) = p.allocate_one() else {
                    break;
                };
                let stored = fill(i, b)
                    && matches!(
                        p.register(b, key, parent),
                        Ok(crate::pool::Registered::Stored)
                    );
                if !stored {
                    // Unkeyed: back to the free stack. (Releasing a block
                    // this call holds cannot fail; no early return may
                    // leave the chain held.)
                    let _ = p.release(b);
                    break;
                }
                published += 1;
            }
            held += 1;
            parent = Some(key);
        }
        // Pass 2: release, tail first, so the chain's tail is evicted first.
        for &key in keys.iter().take(held).rev() {
            if let Some(b) = p.lookup(key) {
                let _ = p.release(b);
            }
        }
        Ok((held, published))
    }

    /// Plans bringing the blocks of a prompt (its chained `keys`) that pool
    /// `to` lacks and pool `from` holds back to `to`: from the first key `to`
    /// misses, as long as `from` hits and `to` has room. `None`: nothing to
    /// promote (nothing changed).
    pub fn promote(
        &mut self,
        from: PoolId,
        to: PoolId,
        keys: &[BlockHash],
    ) -> Result<Option<PlanId>> {
        let (src, dst) = self.tier_pools(from, to)?;
        let keys = keys.get(..self.width.min(keys.len())).unwrap_or(&[]);
        let (sp, dp) = two_pools(&mut self.pools, src, dst)?;
        let dp = dp.ok_or(Error::SamePool(to))?;
        // Chain walks (blocks inside runs are found from their parent's).
        let (mut start, mut cached_hits, mut prev) = (0, 0, None);
        for &k in keys {
            prev = dp.lookup_after(prev, k);
            let Some(b) = prev else { break };
            start += 1;
            // Room left once the device hits are held (a key repeated among
            // them is counted twice: the estimate only errs low).
            cached_hits += usize::from(dp.is_cached(b) == Ok(true));
        }
        let (mut found, mut prev) = (0, None);
        for (i, &k) in keys.iter().enumerate() {
            prev = sp.lookup_after(prev, k);
            if i >= start {
                if prev.is_none() {
                    break;
                }
                found += 1;
            }
        }
        let room = (dp.available() as usize).saturating_sub(cached_hits);
        let m = found.min(room);
        if m == 0 {
            return Ok(None);
        }
        let pi = self.plans.vacant().ok_or(Error::TooManyPlans {
            capacity: self.plans.capacity(),
        })?;
        let len = start + m;
        let sources = row_of_mut(&mut self.plan_sources, pi, self.width);
        let targets = row_of_mut(&mut self.plan_targets, pi, self.width);
        let (Some(sources), Some(targets)) = (sources.get_mut(..len), targets.get_mut(..len))
        else {
            return Ok(None);
        };
        // Hold the device hits: they stay targets of the plan, copying nothing.
        let hits = sources.iter_mut().zip(targets.iter_mut()).zip(keys);
        let mut prev = None;
        for ((s, t), &k) in hits.take(start) {
            prev = dp.lookup_after(prev, k);
            let b = prev.unwrap_or(HOLE);
            dp.acquire_block(b);
            (*s, *t) = (HOLE, b);
        }
        dp.allocate(targets.get_mut(start..).unwrap_or(&mut []))?;
        let mut prev = None;
        for (i, (s, &k)) in sources.iter_mut().zip(keys).enumerate() {
            prev = sp.lookup_after(prev, k);
            if i >= start {
                *s = prev.unwrap_or(HOLE);
                sp.acquire_block(*s);
            }
        }
        let plan = PlanSlot {
            kind: PlanKind::Promote,
            src: from.0,
            dst: to.0,
            len: len as u32,
            ..PlanSlot::EMPTY
        };
        self.insert_plan(plan, None).map(Some)
    }

    fn tier_pools(&self, from: PoolId, to: PoolId) -> Result<(usize, usize)> {
        let (src, dst) = (self.pool_index(from)?, self.pool_index(to)?);
        if src == dst {
            return Err(Error::SamePool(to));
        }
        Ok((src, dst))
    }

    /// Commits an offload or a promotion (see [`commit`](Self::commit)).
    pub(crate) fn commit_tier(&mut self, id: PlanId, p: &PlanSlot) -> Result<()> {
        let (src, dst) = self.tier_pools(PoolId(p.src), PoolId(p.dst))?;
        let sources = row_of(&self.plan_sources, id.index, self.width);
        let targets = row_of(&self.plan_targets, id.index, self.width);
        let pairs = sources.iter().zip(targets).take(p.len as usize);
        let (sp, dp) = two_pools(&mut self.pools, src, dst)?;
        let dp = dp.ok_or(Error::SamePool(PoolId(p.dst)))?;
        // Publish. An offload's blocks are independent (each heads a run);
        // a promotion's are a chain, walked in the target (`prev` holds the
        // previous key there; past a key not known, nothing is published).
        let (mut parent, mut prev) = (None, None);
        for (&s, &t) in pairs.clone() {
            if p.kind == PlanKind::Offload {
                if let Some(key) = sp.key_of(s)? {
                    let _ = dp.register(t, key, None);
                }
                continue;
            }
            let key = if s == HOLE {
                dp.key_of(t)?
            } else {
                sp.key_of(s)?
            };
            let Some(key) = key else { break };
            prev = if s == HOLE {
                Some(t)
            } else {
                dp.publish_after(prev, t, key, parent, &[]).ok().flatten()
            };
            parent = Some(key);
        }
        // Release, tail first; an offloaded block leaves the device.
        for (&s, &t) in pairs.rev() {
            dp.release(t)?;
            if s != HOLE {
                sp.release(s)?;
                if p.kind == PlanKind::Offload && sp.is_cached(s)? {
                    sp.evict(s)?;
                }
            }
        }
        if let Some(s) = self.seqs.at_mut(p.seq).filter(|_| p.seq != NIL) {
            s.plan = NIL;
        }
        self.plans.remove(id.index);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{BlockPool, CacheConfig, PoolConfig, Prompt, SipBlockHasher};

    fn cache() -> KvCache<'static, SipBlockHasher> {
        let cfg = CacheConfig {
            tokens_per_block: 4,
            max_seqs: 4,
            max_blocks_per_seq: 8,
            max_plans: 2,
        };
        let mut c = KvCache::with_config(cfg, SipBlockHasher::new([1; 16])).unwrap();
        c.add_pool(BlockPool::with_capacity(PoolConfig::device(0, 4), 8).unwrap())
            .unwrap();
        c.add_pool(BlockPool::with_capacity(PoolConfig::host(1, 4), 8).unwrap())
            .unwrap();
        c
    }

    #[test]
    fn offload_skips_what_it_is_told_and_nothing_to_do_is_none() {
        let (dev, host) = (PoolId(0), PoolId(1));
        let mut c = cache();
        assert_eq!(
            c.offload(dev, host, 4, |_| false),
            Ok(None),
            "nothing cached"
        );
        assert_eq!(c.offload(dev, dev, 4, |_| false), Err(Error::SamePool(dev)));
        let toks: [u32; 12] = core::array::from_fn(|i| i as u32);
        let a = c.allocate(dev, &Prompt::ids(&toks)).unwrap().seq;
        c.free(a).unwrap();
        let first = c.pool(dev).unwrap().eviction_order().next().unwrap();
        let skip = c.pool(dev).unwrap().key_of(first).unwrap().unwrap();
        let p = c.offload(dev, host, 8, |k| k == skip).unwrap().unwrap();
        assert_eq!(c.plan(p).unwrap().len(), 2, "three cached, one skipped");
        assert!(c.plan(p).unwrap().copies().all(|cp| cp.src != first));
        c.commit(p).unwrap();
        // The chain's head left the device: no hit there. What the host
        // holds already is not offloaded again.
        let again = c.allocate(dev, &Prompt::ids(&toks)).unwrap();
        assert_eq!(again.hit_blocks, 0);
        c.free(again.seq).unwrap();
        let p = c.offload(dev, host, 8, |_| false).unwrap().unwrap();
        assert_eq!(c.plan(p).unwrap().len(), 1, "only the block the host lacks");
        c.abort(p).unwrap();
        c.check_invariants().unwrap();
    }
}
