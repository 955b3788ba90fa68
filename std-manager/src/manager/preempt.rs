//! Making room on a device (growing its pool, preempting requests to the
//! host tier) and moving requests between places (devices, the host tier,
//! compressed pools).
#![allow(
    clippy::cast_possible_truncation,
    reason = "region counts and block counts are below 2^30"
)]

use pagedkv_core::{Fidelity, RegionDesc};

use super::transfer::CopyOp;
use super::{KvManager, ManagedBackend, Place, lock};
use crate::error::{ManagerError, Result};
use crate::traits::Candidate;
use crate::types::RequestId;

/// Times a call makes room and retries before it gives up.
const ROOM_TRIES: u32 = 4;

/// The retries of one call that may need room on a device: see
/// [`KvManager::with_room`].
pub(super) struct Room {
    device: usize,
    keep: Option<RequestId>,
    tries: u32,
}

impl Room {
    /// Room on `device`, never by preempting `keep`.
    pub(super) fn on(device: usize, keep: Option<RequestId>) -> Self {
        Self {
            device,
            keep,
            tries: 0,
        }
    }
}

impl<B: ManagedBackend> KvManager<B> {
    /// Settles one attempt of a call that needs room: `Some` when it is done
    /// (or failed for another reason: `Err`), `None` after the core answered
    /// out-of-blocks and room was made on the device (growth, then
    /// preemption of requests other than `keep`): try again. Used as
    /// `loop { if let Some(v) = self.with_room(attempt.await, &mut room).await? { break v } }`.
    pub(super) async fn with_room<T>(&self, r: Result<T>, room: &mut Room) -> Result<Option<T>> {
        match r {
            Err(ManagerError::Core(pagedkv_core::Error::OutOfBlocks { needed, .. }))
                if room.tries < ROOM_TRIES =>
            {
                room.tries += 1;
                self.make_room(room.device, needed as usize, room.keep)
                    .await?;
                Ok(None)
            }
            r => r.map(Some),
        }
    }

    /// Backs more blocks of device `d` (one region) if below `max_blocks`;
    /// its compressed pool follows, so compression always fits.
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
        let mut to = online;
        for (p, first) in [(pools.device(d), true), (pools.compressed(d), false)] {
            let i = pools.mem(p);
            let Some(m) = mems.get_mut(i) else { continue };
            let want = if first {
                (online + m.blocks_per_region).min(max)
            } else {
                to
            };
            while m.backed() < want {
                let region = backend
                    .create_region(&RegionDesc {
                        block_count: m.blocks_per_region,
                        layout: m.layout,
                        memory: m.memory,
                    })
                    .map_err(ManagerError::backend("growing a pool"))?;
                let base = backend.region_address(&region).unwrap_or(0);
                m.regions.push(region);
                if let Some(b) = inner.bases.get_mut(i) {
                    b.push(base);
                }
            }
            if first {
                to = m.backed().min(max);
            }
            let now = inner.cache.pool(p)?.capacity();
            if now < to {
                inner.cache.grow(p, to - now)?;
            }
        }
        tracing::debug!(device = d, blocks = to, "pool grown");
        Ok(true)
    }

    /// Frees `needed` blocks on device `d`: grow the pool, else preempt
    /// requests chosen by the policy to the host tier.
    pub(super) async fn make_room(
        &self,
        d: usize,
        needed: usize,
        keep: Option<RequestId>,
    ) -> Result<()> {
        if self.grow(d)? {
            return Ok(());
        }
        let device = self
            .shared
            .devices
            .get(d)
            .copied()
            .unwrap_or(crate::types::Device::Cpu);
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
                    Some(**id) != keep
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
            self.shared
                .policy
                .select_eviction_candidates(needed, &cands)
        };
        if victims.is_empty() {
            return Err(ManagerError::OutOfMemory { needed, device });
        }
        for v in victims {
            match self.move_request(v, Place::Host).await {
                Ok(()) => tracing::debug!(request = %v, "preempted to host"),
                Err(ManagerError::Core(_)) => {} // busy or host full: try the next one
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Moves a request to `to` by a two-phase plan (quantizing into, or out
    /// of, a compressed pool: a lossy copy whose blocks are never published).
    pub(super) async fn move_request(&self, id: RequestId, to: Place) -> Result<()> {
        let pools = &self.shared.pools;
        let (plan, op, from) = {
            let mut inner = lock(&self.shared.inner);
            let st = inner
                .reqs
                .get(&id)
                .ok_or(ManagerError::UnknownRequest(id))?;
            let (seq, from) = (st.seq, self.place(&inner, st)?);
            let (plan, op) = match (from, to) {
                (Place::Device(_), Place::Host) => {
                    let host = pools.host().ok_or(ManagerError::NoHostTier)?;
                    (inner.cache.swap_out(seq, host)?, CopyOp::Copy)
                }
                (Place::Device(d), Place::Compressed(_, f)) => (
                    inner
                        .cache
                        .swap_out_as(seq, pools.compressed(d), Fidelity::Lossy)?,
                    CopyOp::Quantize(f),
                ),
                (Place::Host, Place::Device(d)) => {
                    (inner.cache.swap_in(seq, pools.device(d))?, CopyOp::Copy)
                }
                (Place::Compressed(_, f), Place::Device(d)) => (
                    inner
                        .cache
                        .swap_in_as(seq, pools.device(d), Fidelity::Lossy)?,
                    CopyOp::Dequantize(f),
                ),
                (Place::Device(_), Place::Device(d)) => {
                    (inner.cache.move_to(seq, pools.device(d))?, CopyOp::Copy)
                }
                _ => return Err(pagedkv_core::Error::NotOnDevice(seq).into()),
            };
            (plan, op, from)
        };
        self.run_plan(plan, op, "moving a request").await?;
        let mut inner = lock(&self.shared.inner);
        if let Some(st) = inner.reqs.get_mut(&id) {
            match to {
                Place::Device(d) => {
                    st.device = d;
                    st.compressed = None;
                }
                Place::Compressed(_, f) => st.compressed = Some(f),
                Place::Host => {}
            }
        }
        match (from, to) {
            (_, Place::Host) => inner.stats.swap_outs += 1,
            (Place::Host, _) => inner.stats.swap_ins += 1,
            _ => {}
        }
        Ok(())
    }

    /// Brings a request back to its device if it is swapped out or compressed.
    pub(super) async fn ensure_on_device(&self, id: RequestId) -> Result<()> {
        let (place, device) = {
            let inner = lock(&self.shared.inner);
            let st = inner
                .reqs
                .get(&id)
                .ok_or(ManagerError::UnknownRequest(id))?;
            (self.place(&inner, st)?, st.device)
        };
        if matches!(place, Place::Device(_)) {
            return Ok(());
        }
        let mut room = Room::on(device, Some(id));
        loop {
            let r = self.move_request(id, Place::Device(device)).await;
            if let Some(()) = self.with_room(r, &mut room).await? {
                return Ok(());
            }
        }
    }
}
