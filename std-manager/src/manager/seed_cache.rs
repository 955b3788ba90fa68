//! The seed's `KvCacheManager` over the manager.
#![allow(
    clippy::cast_possible_truncation,
    reason = "elapsed milliseconds fit in u64"
)]

use std::sync::Arc;
use std::time::Instant;

use super::{KvManager, ManagedBackend, lock};
use crate::error::Result;
use crate::traits::{KvCacheHandle, KvCacheManager, PressureCallback};
use crate::types::{AllocationRequest, CacheGcStats, CacheManagerStats, RequestId};

#[async_trait::async_trait]
impl<B: ManagedBackend> KvCacheManager for KvManager<B> {
    #[tracing::instrument(skip_all, fields(request = %request.request_id))]
    async fn allocate(&self, request: &AllocationRequest) -> Result<Arc<dyn KvCacheHandle>> {
        Ok(self.allocate_inner(request).await?.handle)
    }

    #[tracing::instrument(skip(self))]
    async fn extend(&self, request_id: RequestId, additional_tokens: usize) -> Result<()> {
        self.append(request_id, additional_tokens, None, 0, &[])
            .await
            .map(|_| ())
    }

    #[tracing::instrument(skip(self, tokens))]
    async fn extend_tokens(&self, request_id: RequestId, tokens: &[u32]) -> Result<()> {
        self.append(request_id, tokens.len(), Some(tokens), 0, &[])
            .await
            .map(|_| ())
    }

    #[tracing::instrument(skip(self))]
    async fn deallocate(&self, request_id: RequestId) -> Result<()> {
        self.free_request(request_id).await
    }

    fn can_allocate(&self, request: &AllocationRequest) -> bool {
        if self.check_request(request).is_err() {
            return false;
        }
        let bs = self.shared.config.layout.tokens_per_block as usize;
        let Ok(blocks) = u32::try_from(request.initial_tokens.div_ceil(bs)) else {
            return false;
        };
        let inner = lock(&self.shared.inner);
        if inner.reqs.contains_key(&request.request_id) {
            return false;
        }
        let Ok(d) = self.choose_device(&inner, request, blocks) else {
            return false;
        };
        inner
            .cache
            .pool(self.shared.pools.device(d))
            .is_ok_and(|p| {
                let growable = if self.shared.config.enable_pooling {
                    p.max_blocks() - p.capacity()
                } else {
                    0
                };
                p.available() + growable >= blocks
            })
    }

    fn stats(&self) -> CacheManagerStats {
        let inner = lock(&self.shared.inner);
        let all: Vec<usize> = (0..self.shared.devices.len()).collect();
        self.stats_for(&inner, &all)
    }

    /// The manager owns each request until `deallocate`: dropping its
    /// handles frees nothing. `gc` frees requests idle (no call used them:
    /// allocate, extend, fork, swap, move, compress) for
    /// `request_ttl_seconds`, when set (an engine that forgot them; one
    /// being moved is left for the next gc), cached blocks past `max_prefixes`, and cached blocks
    /// unused for `prefix_ttl_seconds` (0, and values past the manager's
    /// lifetime, never expire).
    #[tracing::instrument(skip(self))]
    async fn gc(&self) -> Result<CacheGcStats> {
        let t0 = Instant::now();
        let bb = self.shared.config.layout.block_bytes()? as usize;
        let dropped: Vec<RequestId> = match self.shared.config.request_ttl_seconds {
            None => Vec::new(),
            Some(ttl) => {
                let inner = lock(&self.shared.inner);
                let ttl = std::time::Duration::from_secs(ttl);
                inner
                    .reqs
                    .iter()
                    .filter(|(_, s)| s.last_access.elapsed() >= ttl)
                    .map(|(id, _)| *id)
                    .collect()
            }
        };
        // Freed only if still idle when its turn comes, and not moving (a
        // call may have used it since the list was made); one that went away
        // meanwhile was freed by its engine.
        let mut freed_blocks = 0usize;
        let mut freed = 0usize;
        let ttl =
            std::time::Duration::from_secs(self.shared.config.request_ttl_seconds.unwrap_or(0));
        for &id in &dropped {
            let blocks = {
                let mut guard = lock(&self.shared.inner);
                let inner = &mut *guard;
                let Some(st) = inner.reqs.get(&id) else {
                    continue;
                };
                let seq = st.seq;
                let Ok(info) = inner.cache.info(seq) else {
                    continue;
                };
                if st.last_access.elapsed() < ttl || info.moving {
                    continue;
                }
                self.stamp_release(inner, seq);
                inner.cache.free(seq)?;
                inner.reqs.remove(&id);
                (info.blocks - info.first_live) as usize
            };
            self.shared.policy.forget(id);
            freed_blocks += blocks;
            freed += 1;
        }
        let expired = {
            let mut guard = lock(&self.shared.inner);
            let inner = &mut *guard;
            let mut n = self.enforce_max_prefixes(inner);
            let ttl = inner.prefix.as_ref().map_or(0, |p| p.prefix_ttl_seconds);
            if ttl > 0 {
                let now = self.shared.epoch.elapsed().as_secs();
                for (d, pool) in self.shared.pools.device_ids().enumerate() {
                    loop {
                        let Some(b) = inner.cache.pool(pool)?.eviction_order().next() else {
                            break;
                        };
                        let at = inner
                            .released_at
                            .get(d)
                            .and_then(|r| r.get(b.index()))
                            .map_or(0, |&t| u64::from(t));
                        if at.saturating_add(ttl) > now {
                            break;
                        }
                        inner.cache.evict(pool, b)?;
                        n += 1;
                    }
                }
            }
            n
        };
        self.notify_pressure();
        Ok(CacheGcStats {
            memory_freed: freed_blocks * bb,
            caches_freed: freed,
            prefixes_expired: expired,
            gc_time_ms: t0.elapsed().as_millis() as u64,
        })
    }

    fn set_pressure_callback(&self, callback: PressureCallback) {
        *lock(&self.shared.callback) = Some(Arc::from(callback));
    }

    fn get_handle(&self, request_id: RequestId) -> Option<Arc<dyn KvCacheHandle>> {
        let mut inner = lock(&self.shared.inner);
        let st = inner.reqs.get_mut(&request_id)?;
        Some(self.handle_of(request_id, st))
    }

    fn list_handles(&self) -> Vec<(RequestId, Arc<dyn KvCacheHandle>)> {
        let mut inner = lock(&self.shared.inner);
        let mut v: Vec<_> = inner
            .reqs
            .iter_mut()
            .map(|(id, s)| (*id, self.handle_of(*id, s)))
            .collect();
        v.sort_by_key(|(id, _)| *id);
        v
    }
}
