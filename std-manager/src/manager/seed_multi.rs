//! The seed's `MultiDeviceCacheManager` over the manager.

use std::collections::HashMap;

use super::preempt::Room;
use super::{KvManager, ManagedBackend, Place, lock};
use crate::error::Result;
use crate::traits::MultiDeviceCacheManager;
use crate::types::{CacheManagerStats, Device, RequestId};

/// Rebalancing stops after this many moves, or when device utilizations
/// differ by at most `REBALANCE_SPREAD`.
const REBALANCE_MOVES: usize = 64;
const REBALANCE_SPREAD: f32 = 0.1;

#[async_trait::async_trait]
impl<B: ManagedBackend> MultiDeviceCacheManager for KvManager<B> {
    fn supported_devices(&self) -> Vec<Device> {
        self.shared.devices.clone()
    }

    fn set_device_preference(&self, devices: Vec<Device>) {
        let order: Vec<usize> = devices
            .iter()
            .filter_map(|&d| self.device_index(d).ok())
            .collect();
        if !order.is_empty() {
            lock(&self.shared.inner).preference = order;
        }
    }

    #[tracing::instrument(skip(self))]
    async fn move_cache(&self, request_id: RequestId, target_device: Device) -> Result<()> {
        let d = self.device_index(target_device)?;
        self.ensure_on_device(request_id).await?;
        let current = lock(&self.shared.inner)
            .reqs
            .get(&request_id)
            .map(|s| s.device);
        if current == Some(d) {
            return Ok(());
        }
        let mut room = Room::on(d, Some(request_id));
        loop {
            let r = self.move_request(request_id, Place::Device(d)).await;
            if let Some(()) = self.with_room(r, &mut room).await? {
                break;
            }
        }
        self.notify_pressure();
        Ok(())
    }

    fn get_cache_device(&self, request_id: RequestId) -> Option<Device> {
        let inner = lock(&self.shared.inner);
        let st = inner.reqs.get(&request_id)?;
        match self.place(&inner, st).ok()? {
            Place::Device(d) => self.shared.devices.get(d).copied(),
            _ => Some(Device::Cpu),
        }
    }

    async fn rebalance_devices(&self) -> Result<()> {
        let pools = &self.shared.pools;
        let n = pools.devices();
        for _ in 0..REBALANCE_MOVES {
            let (lo, pick) = {
                let inner = lock(&self.shared.inner);
                let util = |d: usize| {
                    inner
                        .cache
                        .pool(pools.device(d))
                        .map_or(0.0, |p| p.used_len() as f32 / p.capacity().max(1) as f32)
                };
                let (Some(hi), Some(lo)) = (
                    (0..n).max_by(|&a, &b| util(a).total_cmp(&util(b))),
                    (0..n).min_by(|&a, &b| util(a).total_cmp(&util(b))),
                ) else {
                    return Ok(());
                };
                if util(hi) - util(lo) <= REBALANCE_SPREAD {
                    return Ok(());
                }
                let lo_free = inner.cache.pool(pools.device(lo))?.available();
                let pick = inner
                    .reqs
                    .iter()
                    .filter(
                        |(_, s)| matches!(self.place(&inner, s), Ok(Place::Device(x)) if x == hi),
                    )
                    .filter_map(|(id, s)| {
                        inner
                            .cache
                            .info(s.seq)
                            .ok()
                            .map(|i| (*id, i.blocks - i.first_live))
                    })
                    .filter(|&(_, b)| b <= lo_free)
                    .min_by_key(|&(id, b)| (b, id));
                (lo, pick)
            };
            match pick {
                Some((id, _)) => self.move_request(id, Place::Device(lo)).await?,
                None => return Ok(()),
            }
        }
        self.notify_pressure();
        Ok(())
    }

    fn device_stats(&self) -> HashMap<Device, CacheManagerStats> {
        let inner = lock(&self.shared.inner);
        self.shared
            .devices
            .iter()
            .enumerate()
            .map(|(i, &d)| {
                let mut s = self.stats_for(&inner, &[i]);
                s.active_caches = inner.reqs.values().filter(|r| r.device == i).count();
                (d, s)
            })
            .collect()
    }
}
