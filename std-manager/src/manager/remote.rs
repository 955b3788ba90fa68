//! The remote tier under the host tier (feature `redis`): blocks admitted
//! to the host tier are written to it; a request's blocks that miss device
//! and host are looked up there ahead of its allocation
//! ([`KvManager::prefetch_remote`]) and, if the answer has arrived by then,
//! imported into host blocks, each checked whole before it is published,
//! then promoted like any host hit. An answer that has not arrived is a
//! miss: the allocation never waits for the network.
//!
//! Replicas share remote blocks when they name blocks alike: the same
//! `hash_key` in their [`ManagerConfig`](crate::ManagerConfig) and the same
//! remote [`Namespace`](crate::remote::Namespace) (model, layout, dtype,
//! block size, rank).

use std::collections::HashMap;
use std::sync::Arc;

use pagedkv_core::{BlockHash, BlockId, PoolId};
use serde::Serialize;

use super::transfer::{Bytes, block_bytes};
use super::{DevSide, KvManager, ManagedBackend, lock};
use crate::error::{InvalidRequest, Result};
use crate::remote::{Fetched, Lookup, RemoteTier};
use crate::types::{AllocationRequest, RequestId};

/// Prefetches kept for requests not allocated yet; past it the oldest is
/// dropped (a request cancelled in the queue never comes to allocate).
pub const MAX_PREFETCHES: usize = 1024;

/// A lookup started for a request not allocated yet.
struct Pending {
    /// When it started (prefetches so far), to drop the oldest.
    serial: u64,
    /// Index in the prompt's chain of the first block asked for.
    start: usize,
    lookup: Lookup,
    done: Option<Fetched>,
}

/// The manager's side of the remote tier.
#[derive(Default)]
pub(super) struct RemoteSide {
    tier: Option<Arc<RemoteTier>>,
    pending: HashMap<RequestId, Pending>,
    serials: u64,
    stats: RemoteUse,
}

/// What the manager did with the remote tier (the tier's own counters are
/// [`RemoteTier::stats`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RemoteUse {
    /// Lookups started by `prefetch_remote`.
    pub prefetches: u64,
    /// Prefetches dropped unused: past [`MAX_PREFETCHES`], or cancelled.
    pub prefetches_dropped: u64,
    /// Blocks imported into the host tier from remote answers.
    pub imported_blocks: u64,
    /// Allocations whose lookup had not answered yet (a miss, not a wait).
    pub pending_at_allocation: u64,
    /// Remote blocks not imported: the host tier had no room, or the bytes
    /// did not have the block's size.
    pub import_refused: u64,
    /// Host-tier blocks queued for writing to the remote tier.
    pub writes_queued: u64,
    /// Offloads whose bytes could not be read for the remote tier.
    pub write_errors: u64,
}

impl<B: ManagedBackend> KvManager<B> {
    /// Puts a remote tier under the host tier (or removes it); blocks
    /// offloaded to the host tier from then on are written to it. Refused
    /// (nothing changes) without a host tier (`host_blocks`), or when the
    /// tier's namespace is not this manager's layout (block size, and the
    /// layout fingerprint of [`Namespace::for_layout`]): replicas must never
    /// exchange bytes that mean something else.
    ///
    /// [`Namespace::for_layout`]: crate::remote::Namespace::for_layout
    pub fn set_remote_tier(&self, tier: Option<Arc<RemoteTier>>) -> Result<()> {
        if let Some(t) = &tier {
            let layout = &self.shared.config.layout;
            let ns = t.namespace();
            let want = crate::remote::layout_fingerprint(layout);
            let wrong = if self.shared.pools.host().is_none() {
                Some(("host tier blocks (a remote tier sits under it)", 0, 1))
            } else if ns.block_size != layout.tokens_per_block {
                let b = layout.tokens_per_block as usize;
                Some((
                    "the remote namespace's block size",
                    ns.block_size as usize,
                    b,
                ))
            } else if ns.layout != want {
                Some((
                    "the remote namespace's layout fingerprint",
                    ns.layout as usize,
                    want as usize,
                ))
            } else {
                None
            };
            if let Some((what, got, want)) = wrong {
                return Err(InvalidRequest::Layout { what, got, want }.into());
            }
        }
        let mut r = lock(&self.shared.remote);
        r.tier = tier;
        r.pending.clear();
        Ok(())
    }

    /// What the manager did with the remote tier.
    pub fn remote_use(&self) -> RemoteUse {
        lock(&self.shared.remote).stats
    }

    /// Starts looking up, on the remote tier, the blocks of `req`'s prompt
    /// past those on a device or the host tier; a later `allocate_request`
    /// of the same request imports what has arrived by then. Never waits.
    /// Returns the blocks asked for (0: no tier, nothing missing, or a
    /// prompt without keys).
    pub fn prefetch_remote(&self, req: &AllocationRequest) -> Result<usize> {
        let Some(tier) = lock(&self.shared.remote).tier.clone() else {
            return Ok(0);
        };
        self.check_request(req)?;
        let raw: Vec<BlockHash> = req.block_keys.iter().map(|&k| BlockHash(k)).collect();
        let pp = self.plan_prompt(req, &raw, false)?;
        let start = {
            let inner = lock(&self.shared.inner);
            let pools = &self.shared.pools;
            let pool = |p: Option<PoolId>| p.and_then(|p| inner.cache.pool(p).ok());
            let (dev, host) = (pool(Some(pools.device(pp.device))), pool(pools.host()));
            // One chain walk per tier (blocks inside runs are found from
            // their parent's).
            let (mut on_dev, mut on_host) = (None, None);
            pp.keys
                .iter()
                .take_while(|&&k| {
                    on_dev = dev.and_then(|p| p.lookup_after(on_dev, k));
                    on_host = host.and_then(|p| p.lookup_after(on_host, k));
                    on_dev.is_some() || on_host.is_some()
                })
                .count()
        };
        let rest = &pp.keys[start..];
        if rest.is_empty() {
            return Ok(0);
        }
        let lookup = tier.lookup(rest);
        let mut r = lock(&self.shared.remote);
        r.stats.prefetches += 1;
        r.serials += 1;
        let serial = r.serials;
        let replaced = r.pending.insert(
            req.request_id,
            Pending {
                serial,
                start,
                lookup,
                done: None,
            },
        );
        r.stats.prefetches_dropped += u64::from(replaced.is_some());
        if r.pending.len() > MAX_PREFETCHES
            && let Some(oldest) = r.pending.iter().min_by_key(|(_, p)| p.serial).map(|e| *e.0)
        {
            r.pending.remove(&oldest);
            r.stats.prefetches_dropped += 1;
        }
        Ok(rest.len().min(crate::remote::MAX_LOOKUP_KEYS))
    }

    /// Drops the prefetch of `id` (a request leaving the queue unserved).
    /// Returns whether there was one.
    pub fn cancel_prefetch(&self, id: RequestId) -> bool {
        let mut r = lock(&self.shared.remote);
        let had = r.pending.remove(&id).is_some();
        r.stats.prefetches_dropped += u64::from(had);
        had
    }

    /// Whether the prefetch of `id` has its answer (`None`: none started).
    pub fn remote_ready(&self, id: RequestId) -> Option<bool> {
        let mut r = lock(&self.shared.remote);
        let p = r.pending.get_mut(&id)?;
        if p.done.is_none() {
            p.done = p.lookup.poll();
        }
        Some(p.done.is_some())
    }

    /// At allocation on device `d`: imports into the host tier the blocks
    /// the prefetch of `id` found, if it has answered, and if the prompt's
    /// chain before them is still on device `d` or the host tier (held
    /// during the import, so the import cannot evict it). Returns the blocks
    /// imported. Never fails the allocation: a backend error is counted as a
    /// refused import.
    pub(super) fn import_remote(&self, id: RequestId, d: usize, keys: &[BlockHash]) -> u64 {
        self.try_import(id, d, keys).unwrap_or_else(|_| {
            lock(&self.shared.remote).stats.import_refused += 1;
            0
        })
    }

    fn try_import(&self, id: RequestId, d: usize, keys: &[BlockHash]) -> Result<u64> {
        // No keys: no prefetch was started for this prompt (it computes the
        // same keys), so the allocation path takes no lock for the tier.
        if keys.is_empty() {
            return Ok(0);
        }
        let (Some(host), Some(mut p)) = (
            self.shared.pools.host(),
            lock(&self.shared.remote).pending.remove(&id),
        ) else {
            return Ok(0);
        };
        let Some(f) = p.done.take().or_else(|| p.lookup.poll()) else {
            lock(&self.shared.remote).stats.pending_at_allocation += 1;
            return Ok(0);
        };
        // The answer must continue this prompt's chain where it was asked.
        let chain = keys.get(p.start..).unwrap_or(&[]);
        let n = f
            .blocks
            .iter()
            .zip(chain)
            .take_while(|((k, _), c)| k == *c)
            .count();
        if n == 0 {
            return Ok(0);
        }
        let end = p.start + n;
        let imported = {
            let mut dev = lock(&self.shared.dev);
            let DevSide { backend, mems, .. } = &mut *dev;
            let mut inner = lock(&self.shared.inner);
            let Some(m) = mems.get(self.shared.pools.mem(host)) else {
                return Ok(0);
            };
            let want = m.layout.block_bytes()? as usize;
            // The chain from the device's leading hits: the part before the
            // fetched blocks must be on the host tier (held by the import),
            // else the fetched blocks would be published without a parent.
            let device = inner.cache.pool(self.shared.pools.device(d))?;
            let lo = device.match_prefix(keys).min(end);
            let parent = lo.checked_sub(1).and_then(|i| keys.get(i)).copied();
            let start = p.start;
            let (_, published) = inner.cache.import(host, parent, &keys[lo..end], |i, b| {
                let Some(bytes) = (lo + i).checked_sub(start).and_then(|j| f.blocks.get(j)) else {
                    // A block before the fetched ones left the host tier.
                    return false;
                };
                bytes.1.len() == want && block_bytes(backend, m, b, Bytes::Write(&bytes.1)).is_ok()
            })?;
            published
        };
        let mut r = lock(&self.shared.remote);
        r.stats.imported_blocks += imported as u64;
        r.stats.import_refused += n.saturating_sub(imported) as u64;
        Ok(imported as u64)
    }

    /// After an offload to the host tier landed: queues the bytes of its
    /// target blocks (those still holding a key) for the remote tier. The
    /// bytes are copied under the locks that keep the blocks from being
    /// reused; encoding and queueing happen after. Never fails the caller: a
    /// backend error is counted (`write_errors`).
    pub(super) fn write_remote(&self, host: PoolId, blocks: &[BlockId]) {
        let Some(tier) = lock(&self.shared.remote).tier.clone() else {
            return;
        };
        // Encoding (a copy and a checksum per block) runs under no lock.
        let (queued, errors) = match self.copy_out(host, blocks) {
            Ok(items) => (items.iter().filter(|(k, v)| tier.store(*k, v)).count(), 0),
            Err(_) => (0, 1),
        };
        let mut r = lock(&self.shared.remote);
        r.stats.writes_queued += queued as u64;
        r.stats.write_errors += errors;
    }

    /// The keys and bytes of those of `blocks` (in pool `host`) that hold a
    /// key now.
    fn copy_out(&self, host: PoolId, blocks: &[BlockId]) -> Result<Vec<(BlockHash, Vec<u8>)>> {
        let mut dev = lock(&self.shared.dev);
        let DevSide { backend, mems, .. } = &mut *dev;
        let inner = lock(&self.shared.inner);
        let (Some(m), Ok(pool)) = (
            mems.get(self.shared.pools.mem(host)),
            inner.cache.pool(host),
        ) else {
            return Ok(Vec::new());
        };
        let len = m.layout.block_bytes()? as usize;
        let mut out = Vec::with_capacity(blocks.len());
        for &b in blocks {
            // A block's key names immutable content.
            let Ok(Some(key)) = pool.key_of(b) else {
                continue;
            };
            let mut buf = vec![0u8; len];
            block_bytes(backend, m, b, Bytes::Read(&mut buf))?;
            out.push((key, buf));
        }
        Ok(out)
    }
}
