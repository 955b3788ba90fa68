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
            let hits = keys.iter().take_while(|&&k| p.lookup(k).is_some()).count();
            let short = (blocks as usize)
                .saturating_sub(hits)
                .saturating_sub(p.free_len() as usize);
            if short == 0 {
                return Ok(());
            }
            let keep: HashSet<BlockHash> = keys.iter().take(hits).copied().collect();
            let n = u32::try_from(short).unwrap_or(u32::MAX);
            inner.cache.offload(pool, host, n, |k| keep.contains(&k))?
        };
        match plan {
            Some(p) => self.run_plan(p, CopyOp::Copy, "offloading prefixes").await,
            None => Ok(()),
        }
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
