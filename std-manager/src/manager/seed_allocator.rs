//! The seed's `BlockAllocator` over the manager: raw blocks, and
//! defragmentation (relocation by real copies, regions released).
#![allow(
    clippy::cast_possible_truncation,
    reason = "region counts are below 2^30"
)]

use pagedkv_core::{BlockId, Prompt, SeqId};

use super::transfer::CopyOp;
use super::{DevSide, KvManager, ManagedBackend, lock};
use crate::error::{ManagerError, Result};
use crate::traits::BlockAllocator;

impl<B: ManagedBackend> BlockAllocator for KvManager<B> {
    fn allocate_blocks(&self, num_blocks: usize) -> Result<Vec<BlockId>> {
        let bs = self.shared.config.layout.tokens_per_block;
        let n = u32::try_from(num_blocks).map_err(|_| pagedkv_core::Error::LengthOverflow)?;
        let tokens = n
            .checked_mul(bs)
            .ok_or(pagedkv_core::Error::LengthOverflow)?;
        if n == 0 {
            return Ok(Vec::new());
        }
        let mut inner = lock(&self.shared.inner);
        let d = inner.preference.first().copied().unwrap_or(0);
        let seq = inner
            .cache
            .allocate(self.shared.pools.device(d), &Prompt::len(tokens))?
            .seq;
        let blocks = inner.cache.table(seq)?.to_vec();
        let mut sorted = blocks.clone();
        sorted.sort_unstable();
        inner.raw_allocations.push((sorted, seq));
        Ok(blocks)
    }

    fn free_blocks(&self, blocks: &[BlockId]) -> Result<()> {
        if blocks.is_empty() {
            return Ok(());
        }
        let mut sorted = blocks.to_vec();
        sorted.sort_unstable();
        let mut inner = lock(&self.shared.inner);
        let i = inner
            .raw_allocations
            .iter()
            .position(|(b, _)| *b == sorted)
            .ok_or(ManagerError::NotAnAllocation)?;
        let seq = inner.raw_allocations[i].1;
        inner.cache.free(seq)?;
        inner.raw_allocations.swap_remove(i);
        Ok(())
    }

    fn free_block_count(&self) -> usize {
        let inner = lock(&self.shared.inner);
        self.shared
            .pools
            .device_ids()
            .filter_map(|p| inner.cache.pool(p).ok())
            .map(|p| p.available() as usize)
            .sum()
    }

    fn total_block_count(&self) -> usize {
        let inner = lock(&self.shared.inner);
        self.shared
            .pools
            .device_ids()
            .filter_map(|p| inner.cache.pool(p).ok())
            .map(|p| p.capacity() as usize)
            .sum()
    }

    fn block_size(&self) -> usize {
        self.shared.config.layout.tokens_per_block as usize
    }

    /// Per device: shrinks the pool's service range to its used blocks
    /// (rounded up to whole regions; raw allocations stay where they are),
    /// relocates the requests holding blocks past it by real copies, and
    /// frees the regions left empty.
    fn defragment(&self) -> Result<()> {
        let pools = &self.shared.pools;
        for d in 0..pools.devices() {
            let dp = pools.device(d);
            let Some(target) = self.shrink_to_used(d)? else {
                continue;
            };
            let draining: Vec<SeqId> = {
                let inner = lock(&self.shared.inner);
                let raw: Vec<SeqId> = inner.raw_allocations.iter().map(|(_, s)| *s).collect();
                inner
                    .cache
                    .draining_seqs(dp)
                    .filter(|s| !raw.contains(s))
                    .collect()
            };
            for seq in draining {
                let plan = lock(&self.shared.inner).cache.relocate(seq);
                match plan {
                    Ok(p) => self.run_plan_blocking(p, CopyOp::Copy, "defragmenting")?,
                    Err(pagedkv_core::Error::SequenceBusy(_)) => continue,
                    Err(e) => return Err(e.into()),
                }
            }
            self.release_empty_regions(d, target)?;
            tracing::debug!(device = d, blocks = target, "defragmented");
        }
        self.notify_pressure();
        Ok(())
    }
}

impl<B: ManagedBackend> KvManager<B> {
    /// Shrinks device `d`'s service range to its held blocks, rounded up to
    /// whole regions. `None` if nothing would be released.
    fn shrink_to_used(&self, d: usize) -> Result<Option<u32>> {
        let dp = self.shared.pools.device(d);
        let dev = lock(&self.shared.dev);
        let mut inner = lock(&self.shared.inner);
        let per = dev
            .mems
            .get(self.shared.pools.mem(dp))
            .map_or(1, |m| m.blocks_per_region.max(1));
        let pool = inner.cache.pool(dp)?;
        let raw_top = inner
            .raw_allocations
            .iter()
            .flat_map(|(b, _)| b.last())
            .map(|b| b.0 + 1)
            .max()
            .unwrap_or(0);
        let target = pool.used_len().max(raw_top).max(1).div_ceil(per) * per;
        if target >= pool.capacity() {
            return Ok(None);
        }
        inner.cache.shrink(dp, target)?;
        Ok(Some(target))
    }

    /// Destroys device `d`'s regions wholly past `target` with no block held.
    fn release_empty_regions(&self, d: usize, target: u32) -> Result<()> {
        let dp = self.shared.pools.device(d);
        let i = self.shared.pools.mem(dp);
        let mut dev = lock(&self.shared.dev);
        let mut inner = lock(&self.shared.inner);
        let DevSide { backend, mems, .. } = &mut *dev;
        let Some(m) = mems.get_mut(i) else {
            return Ok(());
        };
        while m.regions.len() > 1 {
            let pool = inner.cache.pool(dp)?;
            let first = (m.regions.len() as u32 - 1) * m.blocks_per_region;
            let held = (first..(first + m.blocks_per_region).min(pool.max_blocks()))
                .any(|b| pool.ref_count(BlockId(b)).unwrap_or(0) > 0);
            if first < target || held {
                break;
            }
            let Some(r) = m.regions.pop() else { break };
            // SAFETY: every transfer into or out of this region has been
            // waited (defragmentation runs its moves to completion), and no
            // block of it is held or in service.
            unsafe { backend.destroy_region(r) };
            if let Some(b) = inner.bases.get_mut(i) {
                b.pop();
            }
        }
        Ok(())
    }
}
