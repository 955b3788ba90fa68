//! The host tier of the prefix cache: cached blocks about to be evicted from
//! a device are offloaded to host memory, and a prompt's blocks found there
//! are promoted back before its allocation. Both are core tier plans run
//! like swaps (submit, fence, commit or abort): nothing is published before
//! its copy landed, and a dropped future or a failed copy aborts the plan.

use std::collections::HashSet;

use pagedkv_core::BlockHash;

use super::transfer::CopyOp;
use super::{KvManager, ManagedBackend, lock};
use crate::error::Result;

impl<B: ManagedBackend> KvManager<B> {
    /// Before an allocation of `blocks` blocks for the prompt with chained
    /// `keys` on device `d`:
    /// offloads to the host tier the cached blocks the allocation would
    /// evict (beyond the device's free blocks), except the prompt's own hits.
    pub(super) async fn offload_before(
        &self,
        d: usize,
        blocks: u32,
        keys: &[BlockHash],
    ) -> Result<()> {
        let Some(host) = self.shared.pools.host() else {
            return Ok(());
        };
        let pool = self.shared.pools.device(d);
        let plan = {
            let mut inner = lock(&self.shared.inner);
            let p = inner.cache.pool(pool)?;
            let hits = p.match_prefix(keys);
            let short = (blocks as usize)
                .saturating_sub(hits)
                .saturating_sub(p.free_len() as usize);
            if short == 0 {
                return Ok(());
            }
            // The blocks the allocation will evict: the first `short` of the
            // eviction order, the prompt's own hits aside. Of those, the ones
            // the host tier admits are copied.
            let keep: HashSet<BlockHash> = keys.iter().take(hits).copied().collect();
            let victims: Vec<BlockHash> = p
                .eviction_order()
                .filter_map(|b| p.key_of(b).ok().flatten())
                .filter(|k| !keep.contains(k))
                .take(short)
                .collect();
            let admitted: HashSet<BlockHash> = victims
                .iter()
                .copied()
                .filter(|&k| inner.touches.admits(k))
                .collect();
            inner.stats.not_admitted += (victims.len() - admitted.len()) as u64;
            if admitted.is_empty() {
                return Ok(());
            }
            let n = u32::try_from(admitted.len()).unwrap_or(u32::MAX);
            match inner
                .cache
                .offload(pool, host, n, |k| !admitted.contains(&k))?
            {
                Some(p) => {
                    let targets: Vec<_> = inner.cache.plan(p)?.copies().map(|c| c.dst).collect();
                    (p, targets)
                }
                None => return Ok(()),
            }
        };
        let (plan, targets) = plan;
        let copied = targets.len() as u64;
        self.run_plan(plan, CopyOp::Copy, "offloading prefixes")
            .await?;
        #[cfg(feature = "redis")]
        self.write_remote(host, &targets);
        // Counted once the copies landed (an aborted plan copied nothing).
        lock(&self.shared.inner).stats.offloaded += copied;
        Ok(())
    }

    /// Brings the prompt blocks with chained `keys` found on the host tier
    /// (after the device's hits) back to device `d`, so the allocation that
    /// follows hits them. Returns the blocks promoted.
    pub(super) async fn promote(&self, d: usize, keys: &[BlockHash]) -> Result<u64> {
        let Some(host) = self.shared.pools.host() else {
            return Ok(0);
        };
        let (plan, n) = {
            let mut inner = lock(&self.shared.inner);
            let Some(plan) = inner
                .cache
                .promote(host, self.shared.pools.device(d), keys)?
            else {
                return Ok(0);
            };
            (plan, inner.cache.plan(plan)?.len() as u64)
        };
        self.run_plan(plan, CopyOp::Copy, "promoting prefixes")
            .await?;
        Ok(n)
    }
}
