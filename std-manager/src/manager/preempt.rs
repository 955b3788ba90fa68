//! Making room on a device (growing its pool, preempting requests to the
//! host tier) and moving requests between places (devices, the host tier,
//! compressed pools).
#![allow(
    clippy::cast_possible_truncation,
    reason = "region counts and block counts are below 2^30"
)]

use pagedkv_core::{
    BlockPool, DType, Fidelity, MemoryKind, PoolConfig, PoolId, QuantFormat, RegionDesc,
};

use super::pools::{CompressedPool, PoolMem};
use super::transfer::CopyOp;
use super::{KvManager, ManagedBackend, Place, lock};
use crate::engine::{ManagerEvent, PreemptMode, Preemption, PreemptionPolicy};
use crate::error::{ManagerError, Result};
use crate::traits::Candidate;
use crate::types::{Device, RequestId};

/// Times a call makes room and retries before it gives up.
const ROOM_TRIES: u32 = 4;

/// Preemption events kept for `drain_events` before the oldest are dropped.
const EVENT_BACKLOG: usize = 4096;

/// The retries of one call that may need room on a device: see
/// [`KvManager::with_room`]. It collects the preemptions done for the call.
pub(super) struct Room {
    device: usize,
    keep: Option<RequestId>,
    /// The rest of a batch being extended: never victims (their new slots'
    /// KV is not written yet, so they must not move this step).
    batch: Vec<RequestId>,
    tries: u32,
    pub(super) preempted: Vec<Preemption>,
}

impl Room {
    /// Room on `device`, never by preempting `keep`.
    pub(super) fn on(device: usize, keep: Option<RequestId>) -> Self {
        Self {
            device,
            keep,
            batch: Vec::new(),
            tries: 0,
            preempted: Vec::new(),
        }
    }
}

impl Room {
    /// Never preempting the requests of `batch` either.
    pub(super) fn keeping(mut self, batch: &[RequestId]) -> Self {
        self.batch.extend_from_slice(batch);
        self
    }
}

impl<B: ManagedBackend> KvManager<B> {
    /// Settles one attempt of a call that needs room: `Some` when it is done
    /// (or failed for another reason: `Err`), `None` after the core answered
    /// out-of-blocks and room was made on the device: try again. Room is
    /// made by growing the pool (as long as it can), then, with automatic
    /// preemption, by up to `ROOM_TRIES` rounds of swapping out requests
    /// other than `keep` and the batch's; with preemption left to the
    /// scheduler, no room is [`ManagerError::NoRoom`]. Used as
    /// `loop { if let Some(v) = self.with_room(attempt.await, &mut room).await? { break v } }`.
    pub(super) async fn with_room<T>(&self, r: Result<T>, room: &mut Room) -> Result<Option<T>> {
        match r {
            Err(ManagerError::Core(pagedkv_core::Error::OutOfBlocks { needed, available })) => {
                // Growing the pool is bounded by its maximum: always retry.
                if self.grow(room.device)? {
                    return Ok(None);
                }
                let missing = needed.saturating_sub(available).max(1);
                if room.tries >= ROOM_TRIES {
                    let device = self.device_at(room.device);
                    return Err(match self.shared.config.preemption {
                        PreemptionPolicy::Scheduler => ManagerError::NoRoom { device, missing },
                        PreemptionPolicy::Automatic => ManagerError::OutOfMemory {
                            needed: needed as usize,
                            device,
                        },
                    });
                }
                room.tries += 1;
                self.make_room(room, needed as usize, missing).await?;
                Ok(None)
            }
            r => r.map(Some),
        }
    }

    fn device_at(&self, d: usize) -> Device {
        self.shared.devices.get(d).copied().unwrap_or(Device::Cpu)
    }

    /// Backs more blocks of device `d` (one region) if below `max_blocks`;
    /// its compressed pools follow, so compression always fits.
    fn grow(&self, d: usize) -> Result<bool> {
        if !self.shared.config.enable_pooling {
            return Ok(false);
        }
        let pools = &self.shared.pools;
        let mut dev = lock(&self.shared.dev);
        let mut inner = lock(&self.shared.inner);
        let pool = inner.cache.pool(pools.device(d))?;
        let (online, max) = (pool.capacity(), pool.max_blocks());
        if online >= max {
            return Ok(false);
        }
        let super::DevSide { backend, mems, .. } = &mut *dev;
        let followers: Vec<PoolId> = inner
            .compressed
            .iter()
            .filter(|c| c.device == d)
            .map(|c| c.pool)
            .collect();
        let mut to = online;
        for (k, p) in std::iter::once(pools.device(d))
            .chain(followers)
            .enumerate()
        {
            let i = pools.mem(p);
            let Some(m) = mems.get_mut(i) else { continue };
            let want = if k == 0 {
                (online + m.blocks_per_region).min(max)
            } else {
                to
            };
            while m.backed() < want {
                let region = match backend.create_region(&RegionDesc {
                    block_count: m.blocks_per_region,
                    layout: m.layout,
                    memory: m.memory,
                }) {
                    Ok(r) => r,
                    Err(e) if k == 0 => return Err(ManagerError::backend("growing a pool")(e)),
                    Err(e) => {
                        // The device grew; its compressed pool lags (a later
                        // compression may find no room: a typed error then).
                        tracing::warn!(error = %e, "growing a compressed pool");
                        break;
                    }
                };
                let base = backend.region_address(&region).unwrap_or(0);
                m.regions.push(region);
                if let Some(b) = inner.bases.get_mut(i) {
                    b.push(base);
                }
            }
            if k == 0 {
                to = m.backed().min(max);
            }
            // A follower serves only what it could back.
            let target = to.min(m.backed());
            let now = inner.cache.pool(p)?.capacity();
            if now < target {
                inner.cache.grow(p, target - now)?;
            }
        }
        tracing::debug!(device = d, blocks = to, "pool grown");
        Ok(true)
    }

    /// Makes room for `needed` blocks on the room's device (which cannot
    /// grow): with automatic preemption, swap out requests chosen by the
    /// policy (recorded in the room and as events); else `NoRoom`.
    async fn make_room(&self, room: &mut Room, needed: usize, missing: u32) -> Result<()> {
        let d = room.device;
        let device = self.device_at(d);
        if self.shared.config.preemption == PreemptionPolicy::Scheduler {
            return Err(ManagerError::NoRoom { device, missing });
        }
        if self.shared.pools.host().is_none() {
            return Err(ManagerError::OutOfMemory { needed, device });
        }
        let victims = {
            let inner = lock(&self.shared.inner);
            let bb = self.shared.config.layout.block_bytes()? as usize;
            let cands: Vec<Candidate> = inner
                .reqs
                .iter()
                .filter(|(id, st)| {
                    Some(**id) != room.keep
                        && !room.batch.contains(id)
                        && matches!(self.place(&inner, st), Ok(Place::Device(x)) if x == d)
                })
                .filter_map(|(id, st)| {
                    let info = inner.cache.info(st.seq).ok()?;
                    (!info.moving).then_some(Candidate {
                        request_id: *id,
                        blocks: (info.blocks - info.first_live) as usize,
                        tokens: info.tokens as usize,
                        priority: st.priority,
                        block_bytes: bb,
                    })
                })
                .collect();
            let victims = self
                .shared
                .policy
                .select_eviction_candidates(missing as usize, &cands);
            // Preempt only if the victims hold enough blocks (counting the
            // ones they share, which free less): never swap out in vain
            // when even all of them would not do.
            let freed: usize = cands
                .iter()
                .filter(|c| victims.contains(&c.request_id))
                .map(|c| c.blocks)
                .sum();
            if freed < missing as usize {
                Vec::new()
            } else {
                victims
            }
        };
        if victims.is_empty() {
            return Err(ManagerError::OutOfMemory { needed, device });
        }
        for v in victims {
            match self.preempt_swap(v).await {
                Ok(p) => room.preempted.push(p),
                Err(ManagerError::Core(_)) => {} // busy or host full: try the next one
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Swaps request `id` out to the host tier as a preemption, recorded as
    /// an event.
    pub(super) async fn preempt_swap(&self, id: RequestId) -> Result<Preemption> {
        let blocks = self.held_blocks(id)?;
        self.move_request(id, Place::Host).await?;
        let p = Preemption {
            request: id,
            mode: PreemptMode::Swap,
            blocks,
        };
        self.record(ManagerEvent::Preempted(p));
        tracing::debug!(request = %id, "preempted to host");
        Ok(p)
    }

    /// Blocks a request holds (its live table entries).
    pub(super) fn held_blocks(&self, id: RequestId) -> Result<u32> {
        let inner = lock(&self.shared.inner);
        let st = inner.req(id)?;
        let info = inner.cache.info(st.seq)?;
        Ok(info.blocks - info.first_live)
    }

    /// Queues a manager event for `drain_events` (the oldest go when nobody drains).
    pub(super) fn record(&self, e: ManagerEvent) {
        let mut inner = lock(&self.shared.inner);
        if inner.events.len() >= EVENT_BACKLOG {
            inner.events.pop_front();
            inner.events_lost += 1;
        }
        inner.events.push_back(e);
    }

    /// The compressed pool of device `d` for `format`, created (with memory
    /// for the device's current capacity) the first time it is needed.
    pub(super) fn compressed_pool(&self, d: usize, format: QuantFormat) -> Result<PoolId> {
        let pools = &self.shared.pools;
        let mut dev = lock(&self.shared.dev);
        let mut inner = lock(&self.shared.inner);
        if let Some(c) = inner
            .compressed
            .iter()
            .find(|c| c.device == d && c.format == format)
        {
            return Ok(c.pool);
        }
        let id = pools.next_compressed(&inner.compressed);
        if id >= pagedkv_core::MAX_POOLS || dev.mems.len() != id {
            return Err(ManagerError::NoPoolSlot(format));
        }
        let dp = inner.cache.pool(pools.device(d))?;
        let (max, online) = (dp.max_blocks(), dp.capacity());
        let dtype = match format {
            QuantFormat::Int8PerHead => DType::Int8,
            QuantFormat::Fp8E4M3PerHead => DType::Fp8E4M3,
        };
        let layout = self.shared.config.layout.with_dtype(dtype);
        let memory = match self.shared.devices.get(d) {
            Some(Device::Gpu(n)) => MemoryKind::Device(*n),
            _ => MemoryKind::Host,
        };
        let pool_id = PoolId(id as u16);
        let mut pool = BlockPool::with_capacity(
            PoolConfig::host(pool_id.0, self.shared.config.layout.tokens_per_block),
            max,
        )?;
        pool.shrink(online)?;
        // Lossy blocks are never published: nothing for a router there.
        pool.set_events_enabled(false);
        let super::DevSide { backend, mems, .. } = &mut *dev;
        let region = backend
            .create_region(&RegionDesc {
                block_count: online,
                layout,
                memory,
            })
            .map_err(ManagerError::backend("creating a compressed pool"))?;
        let base = backend.region_address(&region).unwrap_or(0);
        if let Err(e) = inner.cache.add_pool(pool) {
            // SAFETY: just created by this backend; nothing uses it.
            unsafe { backend.destroy_region(region) };
            return Err(e.into());
        }
        mems.push(PoolMem {
            layout,
            memory,
            blocks_per_region: online,
            regions: vec![region],
        });
        inner.bases.push(vec![base]);
        inner.blocks_per_region.push(online);
        inner.compressed.push(CompressedPool {
            device: d,
            format,
            pool: pool_id,
        });
        Ok(pool_id)
    }

    /// Moves a request to `to` by a two-phase plan (quantizing into, or out
    /// of, a compressed pool: a lossy copy whose blocks are never published).
    pub(super) async fn move_request(&self, id: RequestId, to: Place) -> Result<()> {
        let pools = &self.shared.pools;
        let target = match to {
            Place::Compressed(d, f) => Some(self.compressed_pool(d, f)?),
            _ => None,
        };
        let (plan, op, from) = {
            let mut inner = lock(&self.shared.inner);
            let st = inner.req(id)?;
            let (seq, from) = (st.seq, self.place(&inner, st)?);
            if matches!(from, Place::Device(_)) {
                // Its device blocks are released at the commit.
                self.stamp_release(&mut inner, seq);
            }
            let (plan, op) = match (from, to, target) {
                (Place::Device(_), Place::Host, _) => {
                    let host = pools.host().ok_or(ManagerError::NoHostTier)?;
                    (inner.cache.swap_out(seq, host)?, CopyOp::Copy)
                }
                (Place::Device(_), Place::Compressed(_, f), Some(pool)) => (
                    inner.cache.swap_out_as(seq, pool, Fidelity::Lossy)?,
                    CopyOp::Quantize(f),
                ),
                (Place::Host, Place::Device(d), _) => {
                    (inner.cache.swap_in(seq, pools.device(d))?, CopyOp::Copy)
                }
                (Place::Compressed(_, f), Place::Device(d), _) => (
                    inner
                        .cache
                        .swap_in_as(seq, pools.device(d), Fidelity::Lossy)?,
                    CopyOp::Dequantize(f),
                ),
                (Place::Device(_), Place::Device(d), _) => {
                    (inner.cache.move_to(seq, pools.device(d))?, CopyOp::Copy)
                }
                _ => return Err(pagedkv_core::Error::NotOnDevice(seq).into()),
            };
            (plan, op, from)
        };
        self.run_plan(plan, op, "moving a request").await?;
        let mut inner = lock(&self.shared.inner);
        if let (Some(st), Place::Device(d)) = (inner.reqs.get_mut(&id), to) {
            st.device = d;
        }
        match (from, to) {
            (_, Place::Host) => inner.stats.swap_outs += 1,
            (Place::Host, _) => inner.stats.swap_ins += 1,
            _ => {}
        }
        Ok(())
    }

    /// Brings a request back to its device if it is swapped out or
    /// compressed (making room as the preemption policy says). Whether it moved.
    pub(super) async fn ensure_on_device(&self, id: RequestId) -> Result<bool> {
        let mut preempted = Vec::new();
        self.ensure_on_device_keeping(id, &[], &mut preempted).await
    }

    /// [`ensure_on_device`](Self::ensure_on_device), never preempting the
    /// requests of `batch`; the preemptions it made go to `preempted`.
    pub(super) async fn ensure_on_device_keeping(
        &self,
        id: RequestId,
        batch: &[RequestId],
        preempted: &mut Vec<Preemption>,
    ) -> Result<bool> {
        let (place, device) = {
            let mut inner = lock(&self.shared.inner);
            inner.req_mut(id)?.last_access = std::time::Instant::now();
            let st = inner.req(id)?;
            (self.place(&inner, st)?, st.device)
        };
        if matches!(place, Place::Device(_)) {
            return Ok(false);
        }
        let mut room = Room::on(device, Some(id)).keeping(batch);
        let r = loop {
            let r = self.move_request(id, Place::Device(device)).await;
            match self.with_room(r, &mut room).await {
                Ok(Some(())) => break Ok(true),
                Ok(None) => {}
                Err(e) => break Err(e),
            }
        };
        preempted.append(&mut room.preempted);
        r
    }
}
