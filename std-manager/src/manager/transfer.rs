//! Running the core's plans on the backend: submit the copies under `dev`,
//! wait for their fences without holding a lock, then commit under `inner`.
//! A guard owns every submitted plan: dropped before the commit (a failed
//! copy, a dropped future), it waits for the copies and aborts the plan.
#![allow(
    clippy::cast_possible_truncation,
    reason = "block counts are u32 by construction"
)]

use std::collections::BTreeMap;

use pagedkv_core::{Backend, BlockCopy, BlockId, KvPart, PlanId, PoolId, QuantFormat};

use super::pools::PoolMem;
use super::{DevSide, Inner, KvManager, ManagedBackend, Shared, lock};
use crate::error::{InvalidRequest, ManagerError, Result};
use crate::types::RequestId;

/// What a batch does to the bytes.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum CopyOp {
    Copy,
    Quantize(QuantFormat),
    Dequantize(QuantFormat),
}

/// Submits `copies` from pool `src` to pool `dst`, one validated batch per
/// pair of regions; pushes the fences.
fn submit<B: ManagedBackend>(
    dev: &mut DevSide<B>,
    (src, dst): (usize, usize),
    same_pool: bool,
    copies: &[BlockCopy],
    op: CopyOp,
    fences: &mut Vec<B::Fence>,
) -> Result<()> {
    let DevSide {
        backend,
        mems,
        validator,
    } = dev;
    let (Some(sm), Some(dm)) = (mems.get(src), mems.get(dst)) else {
        return Err(pagedkv_core::Error::UnknownPool(PoolId(src as u16)).into());
    };
    let (sper, dper) = (sm.blocks_per_region.max(1), dm.blocks_per_region.max(1));
    let mut groups: BTreeMap<(usize, usize), Vec<BlockCopy>> = BTreeMap::new();
    for c in copies {
        let key = ((c.src.0 / sper) as usize, (c.dst.0 / dper) as usize);
        groups.entry(key).or_default().push(BlockCopy {
            src: BlockId(c.src.0 % sper),
            dst: BlockId(c.dst.0 % dper),
        });
    }
    for ((rs, rd), batch_copies) in &groups {
        let (Some(sr), Some(dr)) = (sm.regions.get(*rs), dm.regions.get(*rd)) else {
            return Err(pagedkv_core::Error::UnknownBlock(BlockId(u32::MAX)).into());
        };
        let same = same_pool && rs == rd;
        let batch = validator.validate(batch_copies, sper, dper, same)?;
        // SAFETY: both regions belong to `backend` and stay alive while the
        // manager holds them (regions are destroyed only by `defragment`,
        // after every transfer into them has completed, and on drop, when no
        // transfer is left). The core planned the copies: their target
        // blocks are reserved for this plan and unpublished, so nothing reads
        // or writes them until the fence is waited; their source blocks are
        // held by the plan or the request and immutable meanwhile.
        let fence = unsafe {
            match op {
                CopyOp::Copy => backend.copy_blocks(sr, dr, batch),
                CopyOp::Quantize(f) => backend.quantize(sr, dr, batch, f),
                CopyOp::Dequantize(f) => backend.dequantize(sr, dr, batch, f),
            }
        }
        .map_err(ManagerError::backend("copying blocks"))?;
        fences.push(fence);
    }
    Ok(())
}

/// Polls fences with short `dev` sections; between polls the future sleeps
/// on the manager's timer with a growing backoff (no busy loop: `wait.rs`).
async fn wait_fences<B: ManagedBackend>(
    shared: &Shared<B>,
    fences: &mut Vec<B::Fence>,
    op: &'static str,
) -> Result<()> {
    let mut attempt = 0;
    while !fences.is_empty() {
        {
            let mut dev = lock(&shared.dev);
            let mut i = 0;
            while i < fences.len() {
                if dev
                    .backend
                    .poll(&fences[i])
                    .map_err(ManagerError::backend(op))?
                {
                    fences.swap_remove(i);
                } else {
                    i += 1;
                }
            }
        }
        if !fences.is_empty() {
            shared.timer.sleep(super::wait::backoff(attempt)).await;
            attempt += 1;
        }
    }
    Ok(())
}

/// Waits fences synchronously (on failure paths, before releasing targets).
fn drain_fences<B: ManagedBackend>(shared: &Shared<B>, fences: &mut Vec<B::Fence>) {
    if fences.is_empty() {
        return;
    }
    let mut dev = lock(&shared.dev);
    for f in fences.drain(..) {
        let _ = dev.backend.wait(&f);
    }
}

/// Aborts a plan unless it ended (on error or a dropped future).
pub(super) struct PlanGuard<'a, B: ManagedBackend> {
    shared: &'a Shared<B>,
    plan: PlanId,
    fences: Vec<B::Fence>,
    armed: bool,
}

impl<B: ManagedBackend> Drop for PlanGuard<'_, B> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        drain_fences(self.shared, &mut self.fences);
        let _ = lock(&self.shared.inner).cache.abort(self.plan);
        tracing::debug!(plan = %self.plan, "move aborted");
    }
}

impl<B: ManagedBackend> KvManager<B> {
    /// Snapshots a planned move's copies and submits them under `dev`; the
    /// returned guard aborts the plan unless the move ends otherwise.
    fn start_plan(
        &self,
        plan: PlanId,
        op: CopyOp,
        during: &'static str,
    ) -> Result<PlanGuard<'_, B>> {
        let mut guard = PlanGuard {
            shared: &*self.shared,
            plan,
            fences: Vec::new(),
            armed: true,
        };
        let (pools, copies) = {
            let inner = lock(&self.shared.inner);
            let v = inner.cache.plan(plan)?;
            let map = &self.shared.pools;
            let pools = (map.mem(v.src_pool), map.mem(v.dst_pool));
            (pools, v.copies().collect::<Vec<_>>())
        };
        let mut dev = lock(&self.shared.dev);
        let same = pools.0 == pools.1;
        submit(&mut dev, pools, same, &copies, op, &mut guard.fences).map_err(|e| match e {
            ManagerError::Backend { kind, source, .. } => ManagerError::Backend {
                kind,
                op: during,
                source,
            },
            e => e,
        })?;
        Ok(guard)
    }

    /// Runs a planned move: copies (or quantizes) under `dev`, waits without
    /// locks, commits under `inner`; aborts on failure or cancellation.
    pub(super) async fn run_plan(
        &self,
        plan: PlanId,
        op: CopyOp,
        during: &'static str,
    ) -> Result<()> {
        self.run_plan_then(plan, op, during, |inner, plan| {
            inner.cache.commit(plan)?;
            Ok(())
        })
        .await
    }

    /// [`run_plan`](Self::run_plan) where the copies landed and `finish`
    /// decides, under `inner`, how the plan ends: it commits (and may do
    /// more in the same critical section) or aborts. A plan `finish` left
    /// pending is aborted.
    pub(super) async fn run_plan_then<R>(
        &self,
        plan: PlanId,
        op: CopyOp,
        during: &'static str,
        finish: impl FnOnce(&mut Inner, PlanId) -> Result<R>,
    ) -> Result<R> {
        let mut guard = self.start_plan(plan, op, during)?;
        wait_fences(&self.shared, &mut guard.fences, during).await?;
        let mut inner = lock(&self.shared.inner);
        let r = finish(&mut inner, plan);
        guard.armed = inner.cache.plan(plan).is_ok();
        drop(inner);
        r
    }

    /// [`run_plan`](Self::run_plan), blocking (for the synchronous
    /// `BlockAllocator::defragment`).
    pub(super) fn run_plan_blocking(
        &self,
        plan: PlanId,
        op: CopyOp,
        during: &'static str,
    ) -> Result<()> {
        let mut guard = self.start_plan(plan, op, during)?;
        {
            let mut dev = lock(&self.shared.dev);
            for f in guard.fences.drain(..) {
                dev.backend
                    .wait(&f)
                    .map_err(ManagerError::backend(during))?;
            }
        }
        lock(&self.shared.inner).cache.commit(plan)?;
        guard.armed = false;
        Ok(())
    }

    /// Reads or writes block `index` of a request's table: `bytes` is
    /// told the block's size first (reads size their buffer, writes check it).
    fn block_io<'b>(
        &self,
        id: RequestId,
        index: usize,
        bytes: impl FnOnce(usize) -> Result<Bytes<'b>>,
    ) -> Result<()> {
        let (pool, block) = {
            let inner = lock(&self.shared.inner);
            let st = inner.req(id)?;
            let info = inner.cache.info(st.seq)?;
            let table = inner.cache.table(st.seq)?;
            let b = *table.get(index).ok_or(InvalidRequest::BlockIndex {
                index,
                blocks: table.len(),
            })?;
            (info.pool, b)
        };
        let mut dev = lock(&self.shared.dev);
        let DevSide { backend, mems, .. } = &mut *dev;
        let m = mems
            .get(self.shared.pools.mem(pool))
            .ok_or(pagedkv_core::Error::UnknownPool(pool))?;
        let io = bytes(m.layout.block_bytes()? as usize)?;
        block_bytes(backend, m, block, io)
    }

    /// Reads the bytes of block `index` of a request's table (tests and
    /// checksums). The request must be on a device or the host tier.
    pub fn read_block(&self, id: RequestId, index: usize) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        self.block_io(id, index, |len| {
            out.resize(len, 0);
            Ok(Bytes::Read(&mut out))
        })?;
        Ok(out)
    }

    /// Writes the bytes of block `index` of a request's table (what a kernel
    /// would do; tests use it to fill KV).
    pub fn write_block(&self, id: RequestId, index: usize, data: &[u8]) -> Result<()> {
        self.block_io(id, index, |want| {
            if data.len() != want {
                return Err(InvalidRequest::BlockBytes {
                    got: data.len(),
                    want,
                }
                .into());
            }
            Ok(Bytes::Write(data))
        })
    }
}

/// A block's bytes, read into or written from a buffer of `block_bytes`.
pub(super) enum Bytes<'a> {
    Read(&'a mut [u8]),
    Write(&'a [u8]),
}

/// Reads or writes every (layer, K/V) part of block `b` of a pool.
pub(super) fn block_bytes<B: Backend<Error: Send + Sync + 'static>>(
    be: &mut B,
    m: &PoolMem<B::Region>,
    b: BlockId,
    bytes: Bytes<'_>,
) -> Result<()> {
    let (r, local) = m.locate(b).ok_or(pagedkv_core::Error::UnknownBlock(b))?;
    let pb = m.layout.part_bytes()? as usize;
    let part_of = |p: usize| {
        let kv = if p.is_multiple_of(2) {
            KvPart::Key
        } else {
            KvPart::Value
        };
        m.layout
            .offset(m.blocks_per_region, local, (p / 2) as u32, kv)
    };
    match bytes {
        Bytes::Read(out) => {
            for (p, chunk) in out.chunks_mut(pb).enumerate() {
                be.read_bytes(r, part_of(p)?, chunk)
                    .map_err(ManagerError::backend("reading a block"))?;
            }
        }
        Bytes::Write(data) => {
            for (p, chunk) in data.chunks(pb).enumerate() {
                be.write_bytes(r, part_of(p)?, chunk)
                    .map_err(ManagerError::backend("writing a block"))?;
            }
        }
    }
    Ok(())
}
