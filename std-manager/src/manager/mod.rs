//! `KvManager`: the core's `KvCache` behind a mutex, a backend behind
//! another, and two-phase moves between them.
//!
//! # Where things are
//!
//! | file | what |
//! |---|---|
//! | `mod.rs` | the manager, its shared state, the lock order, introspection |
//! | `build.rs` | configuration checks and pool construction |
//! | `pools.rs` | the named pools (devices, their compressed pools, the host tier) and the memory behind them |
//! | `transfer.rs` | submitting plans to the backend, fences, the guard that aborts a dropped move |
//! | `requests.rs` | allocate, append (with copy-on-write), fork, free |
//! | `preempt.rs` | making room (growth, or preemption as the policy says), moving requests between places, compressed pools on demand |
//! | `scheduler.rs` | what an engine calls each step: allocate and extend with per-request answers, batches, kernel tables, explicit preemption, events |
//! | `prefix_tier.rs` | offloading cached blocks to the host tier and promoting them back |
//! | `admission.rs` | which evicted blocks the host tier takes (a sketch of recent prompt touches) |
//! | `handle.rs` | request handles and their kernel views |
//! | `seed_*.rs` | the seed's traits, one file each, calling the above |
//!
//! # Locks
//!
//! Two `std` mutexes: `inner` (the core's state: sequences, pools, requests)
//! and `dev` (the backend and its regions). Neither is held across an
//! `.await` or a wait on a fence: a move plans under `inner`, submits its
//! copies under `dev`, polls its fences with short `dev` sections between
//! yields, and commits under `inner`. When both are needed (growing a pool,
//! defragmenting), `dev` is taken first.
//!
//! # Cancellation
//!
//! A pending move is owned by a guard: if the future is dropped (or the
//! backend fails) the guard waits for submitted copies and aborts the plan,
//! so nothing leaks and the request stays where it was. Every move is a core
//! plan (swaps, moves, compression, relocation, copy-on-write, tier moves),
//! so the core's invariant check sees every block a move holds.
#![allow(
    clippy::cast_possible_truncation,
    reason = "block sizes were checked as u64 at construction; pool indices are below 8"
)]

mod admission;
mod build;
mod extend;
mod handle;
mod pools;
mod preempt;
mod prefix_tier;
#[cfg(feature = "redis")]
mod remote;
mod requests;
mod scheduler;
mod seed_advanced;
mod seed_allocator;
mod seed_cache;
mod seed_multi;
mod transfer;
mod wait;

use hashbrown::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Instant;

use pagedkv_core::{
    Backend, BatchValidator, BlockId, KvCache, MemoryPressure, PressureMonitor, QuantFormat,
    Quantize, SeqId, SipBlockHasher,
};

pub use self::handle::Handle;
use self::pools::{CompressedPool, PoolMap, PoolMem};
#[cfg(feature = "redis")]
pub use self::remote::{MAX_PREFETCHES, RemoteUse};
use crate::error::{ManagerError, Result};
use crate::traits::CacheEvictionPolicy;
use crate::types::{
    CacheManagerStats, Device, ManagerConfig, PrefixCacheConfig, Priority, RequestId,
};

/// Most device pools: the core's [`MAX_POOLS`](pagedkv_core::MAX_POOLS) but
/// one, for the host tier. Compressed pools are created on demand in the
/// slots left.
pub const MAX_DEVICES: usize = pagedkv_core::MAX_POOLS - 1;

/// A backend the manager can drive from several threads. The bounds on the
/// associated types are stated once, here, and inherited by every use.
pub trait ManagedBackend:
    Backend<Region: Send + Sync, Fence: Send, Error: Send + Sync + 'static> + Quantize + Send + 'static
{
}

impl<B> ManagedBackend for B where
    B: Backend<Region: Send + Sync, Fence: Send, Error: Send + Sync + 'static>
        + Quantize
        + Send
        + 'static
{
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Where a request's KV is.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Place {
    Device(usize),
    Host,
    Compressed(usize, QuantFormat),
}

#[derive(Debug)]
struct ReqState {
    seq: SeqId,
    priority: Priority,
    /// The handle last given out, reused while the engine holds it (the
    /// request lives on without it: the manager owns it until `deallocate`).
    handle: Weak<Handle>,
    device: usize,
    last_access: Instant,
    /// The last batch call (`Inner::batches`) that named it: a request
    /// named twice in one batch is refused the second time.
    mark: u64,
    /// It has a sliding window (its extensions release blocks).
    window: bool,
    /// This allocation's number (`Inner::serials`): handles of an earlier
    /// request of the same id see nothing.
    serial: u64,
}

/// Blocks handed out by `BlockAllocator::allocate_blocks` (sorted, to match
/// a later `free_blocks`), and the sequence holding them.
type RawAllocation = (Vec<BlockId>, SeqId);

struct Inner {
    cache: KvCache<'static, SipBlockHasher>,
    reqs: HashMap<RequestId, ReqState>,
    raw_allocations: Vec<RawAllocation>,
    prefix: Option<PrefixCacheConfig>,
    preference: Vec<usize>,
    /// Per pool: base address of each region (for kernel views).
    bases: Vec<Vec<u64>>,
    /// Per pool: blocks per region.
    blocks_per_region: Vec<u32>,
    /// Per device pool: seconds (since `epoch`) each block was last released.
    released_at: Vec<Vec<u32>>,
    /// Compressed pools created so far.
    compressed: Vec<CompressedPool>,
    /// Preemptions not drained yet (see `drain_events`).
    events: std::collections::VecDeque<crate::engine::ManagerEvent>,
    /// Preemption events dropped because nobody drained them.
    events_lost: u64,
    /// Events reported lost so far (pools' and the manager's).
    lost_reported: u64,
    /// Sequence ids of a batched export (kept, so an export allocates nothing).
    scratch: Vec<SeqId>,
    /// Batch calls so far (see `ReqState::mark`).
    batches: u64,
    /// Allocations so far (see `ReqState::serial`).
    serials: u64,
    /// Pressure level changes so far (delivered in order: `Shared::delivered`).
    pressure_changes: u64,
    pressure: PressureMonitor,
    stats: Counters,
    /// Recent prompt touches, for admission to the host tier.
    touches: admission::TouchSketch,
}

impl Inner {
    /// The state of a live request.
    fn req(&self, id: RequestId) -> Result<&ReqState> {
        self.reqs.get(&id).ok_or(ManagerError::UnknownRequest(id))
    }

    /// The state of a live request, to change.
    fn req_mut(&mut self, id: RequestId) -> Result<&mut ReqState> {
        self.reqs
            .get_mut(&id)
            .ok_or(ManagerError::UnknownRequest(id))
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct Counters {
    allocations: u64,
    failures: u64,
    device_hits: u64,
    host_hits: u64,
    queries: u64,
    swap_outs: u64,
    swap_ins: u64,
    /// Cached blocks copied to the host tier on their way out of a device.
    offloaded: u64,
    /// Host admission's refusals (see `CacheManagerStats::not_admitted_blocks`).
    not_admitted: u64,
    compressions: u64,
    compression_ratio_sum: f64,
    compression_ms_sum: f64,
}

type SharedCallback = Arc<dyn Fn(MemoryPressure) + Send + Sync>;

/// The backend and the memory behind each pool.
struct DevSide<B: Backend> {
    backend: B,
    mems: Vec<PoolMem<B::Region>>,
    validator: BatchValidator<'static>,
}

impl<B: Backend> Drop for DevSide<B> {
    fn drop(&mut self) {
        for m in &mut self.mems {
            for r in m.regions.drain(..) {
                // SAFETY: the regions were created by this backend, and no
                // transfer is in flight: every move is owned by a guard that
                // borrows the manager's shared state (which owns this) and
                // waits for its fences before it ends.
                unsafe { self.backend.destroy_region(r) };
            }
        }
    }
}

/// The state handles and the manager share.
struct Shared<B: ManagedBackend> {
    config: ManagerConfig,
    devices: Vec<Device>,
    pools: PoolMap,
    inner: Mutex<Inner>,
    dev: Mutex<DevSide<B>>,
    callback: Mutex<Option<SharedCallback>>,
    /// The last pressure change delivered to the callback.
    delivered: Mutex<u64>,
    policy: Arc<dyn CacheEvictionPolicy>,
    epoch: Instant,
    /// Wakes futures waiting on fences (see `wait.rs`).
    timer: wait::Timer,
    /// The remote tier under the host tier, and its lookups in flight.
    #[cfg(feature = "redis")]
    remote: Mutex<remote::RemoteSide>,
}

/// The manager: implements the seed's traits over any backend with
/// quantization (`pagedkv_hal_host::HostBackend` for host memory).
/// Dropping it (and every handle) frees every region it created.
pub struct KvManager<B: ManagedBackend> {
    shared: Arc<Shared<B>>,
}

impl<B: ManagedBackend> KvManager<B> {
    /// Stats of every core pool: devices, then their compressed pools, then
    /// the host tier.
    pub fn pool_stats(&self) -> Vec<pagedkv_core::PoolStats> {
        lock(&self.shared.inner)
            .cache
            .pools()
            .iter()
            .map(|p| p.stats())
            .collect()
    }

    /// Keys indexed in every core pool (same order as `pool_stats`).
    pub fn indexed_keys(&self) -> Vec<u32> {
        lock(&self.shared.inner)
            .cache
            .pools()
            .iter()
            .map(|p| p.indexed_len())
            .collect()
    }

    /// Checks the core's invariants (every block a move holds is a plan's).
    pub fn check_invariants(&self) -> std::result::Result<(), pagedkv_core::Invariant> {
        lock(&self.shared.inner).cache.check_invariants()
    }

    /// Blocks held, per pool (device pools first, then the host tier, then
    /// compression pools in the order they were created).
    pub fn used_blocks(&self) -> Vec<u32> {
        lock(&self.shared.inner)
            .cache
            .pools()
            .iter()
            .map(|p| p.used_len())
            .collect()
    }

    fn notify_pressure(&self) {
        let changed = {
            let mut inner = lock(&self.shared.inner);
            let (used, total) = self
                .shared
                .pools
                .device_ids()
                .filter_map(|p| inner.cache.pool(p).ok())
                .fold((0u64, 0u64), |(u, t), p| {
                    (u + u64::from(p.used_len()), t + u64::from(p.capacity()))
                });
            let util = if total == 0 {
                0.0
            } else {
                used as f32 / total as f32
            };
            let changed = inner.pressure.update(util).is_some();
            if changed {
                inner.pressure_changes += 1;
            }
            changed
        };
        if changed {
            self.deliver_pressure();
        }
    }

    /// Calls the pressure callback with the latest level, in order: one
    /// caller delivers at a time (others leave it the newest change, which
    /// it picks up before it returns), and no lock is held during the call,
    /// so the callback may call the manager.
    fn deliver_pressure(&self) {
        loop {
            let Ok(mut delivered) = self.shared.delivered.try_lock() else {
                return; // the deliverer sees this change after its call
            };
            let (level, change) = {
                let inner = lock(&self.shared.inner);
                (inner.pressure.level(), inner.pressure_changes)
            };
            if change <= *delivered {
                return;
            }
            *delivered = change;
            tracing::debug!(?level, "memory pressure changed");
            let cb = lock(&self.shared.callback).clone();
            if let Some(cb) = cb {
                cb(level);
            }
        }
    }

    fn place(&self, inner: &Inner, st: &ReqState) -> crate::Result<Place> {
        let info = inner.cache.info(st.seq)?;
        Ok(self.shared.pools.place_of(info.pool, &inner.compressed))
    }

    fn stats_for(&self, inner: &Inner, devices: &[usize]) -> CacheManagerStats {
        let bb = self.shared.config.layout.block_bytes().unwrap_or(0) as usize;
        let mut s = CacheManagerStats {
            active_caches: inner.reqs.len(),
            allocation_count: inner.stats.allocations,
            allocation_failures: inner.stats.failures,
            device_hit_blocks: inner.stats.device_hits,
            host_hit_blocks: inner.stats.host_hits,
            query_blocks: inner.stats.queries,
            swap_outs: inner.stats.swap_outs,
            swap_ins: inner.stats.swap_ins,
            offloaded_blocks: inner.stats.offloaded,
            not_admitted_blocks: inner.stats.not_admitted,
            ..CacheManagerStats::default()
        };
        for &d in devices {
            if let Ok(p) = inner.cache.pool(self.shared.pools.device(d)) {
                let st = p.stats();
                s.total_blocks += p.capacity() as usize;
                s.free_blocks += p.available() as usize;
                s.total_memory_bytes += p.capacity() as usize * bb;
                s.used_memory_bytes += p.used_len() as usize * bb;
                s.eviction_count += st.evictions;
            }
        }
        if s.query_blocks > 0 {
            s.cache_hit_rate =
                (s.device_hit_blocks + s.host_hit_blocks) as f32 / s.query_blocks as f32;
        }
        let qbb = |f: QuantFormat| {
            let dtype = match f {
                QuantFormat::Int8PerHead => pagedkv_core::DType::Int8,
                QuantFormat::Fp8E4M3PerHead => pagedkv_core::DType::Fp8E4M3,
            };
            let l = self.shared.config.layout.with_dtype(dtype);
            l.block_bytes().unwrap_or(0) as usize
        };
        for c in inner
            .compressed
            .iter()
            .filter(|c| devices.contains(&c.device))
        {
            if let Ok(p) = inner.cache.pool(c.pool) {
                s.compressed_blocks += p.used_len() as usize;
                s.compressed_memory_bytes += p.capacity() as usize * qbb(c.format);
            }
        }
        s
    }
}
