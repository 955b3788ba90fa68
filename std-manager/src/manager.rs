//! `KvManager`: the core's `KvCache` behind a mutex, a backend behind
//! another, and two-phase moves between them.
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
//! so nothing leaks and the sequence stays where it was.

#![allow(
    clippy::cast_possible_truncation,
    reason = "pool indices are below 8, block counts below 2^30 and sizes were checked as u32 at construction"
)]

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll};
use std::time::Instant;

use pagedkv_core::{
    Backend, BackendError, BatchValidator, BlockCopy, BlockHash, BlockHasher, BlockId, BlockPool,
    BlockTable, CacheSalt, DType, ExtraKeys, KvCache, KvLayout, KvPart, MemoryKind, MemoryPressure,
    PlanId, PoolConfig, PoolId, PressureMonitor, Prompt, QuantFormat, Quantize, RegionDesc, SeqId,
    SipBlockHasher,
};

use crate::error::{ManagerError, Result};
use crate::policy::LruEvictionPolicy;
use crate::traits::{
    AdvancedKvCacheManager, BlockAllocator, CacheEvictionPolicy, Candidate, KvCacheHandle,
    KvCacheManager, KvView, MultiDeviceCacheManager, PressureCallback,
};
use crate::types::{
    AllocationRequest, CacheConfig, CacheGcStats, CacheHandleStats, CacheManagerStats,
    CompressionStats, Device, PrefixCacheConfig, Priority, RequestId,
};

/// Most device pools (each device also has a compressed pool; plus the host tier).
pub const MAX_DEVICES: usize = 3;

/// A future that is pending once: lets other tasks run between polls of a
/// fence, on any runtime.
struct YieldNow(bool);

impl Future for YieldNow {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.0 {
            Poll::Ready(())
        } else {
            self.0 = true;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    }
}

fn yield_now() -> YieldNow {
    YieldNow(false)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What a batch does to the bytes.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum CopyOp {
    Copy,
    Quantize(QuantFormat),
    Dequantize(QuantFormat),
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
    handle: Weak<Handle>,
    device: usize,
    compressed: Option<QuantFormat>,
    last_access: Instant,
}

/// The memory behind one core pool.
#[derive(Debug)]
struct PoolMem<R> {
    layout: KvLayout,
    memory: MemoryKind,
    chunk: u32,
    regions: Vec<R>,
}

struct DevSide<B: Backend> {
    backend: B,
    pools: Vec<PoolMem<B::Region>>,
    validator: BatchValidator<'static>,
}

struct Inner {
    cache: KvCache<'static, SipBlockHasher>,
    reqs: HashMap<RequestId, ReqState>,
    anon: Vec<(Vec<BlockId>, SeqId)>,
    prefix: Option<PrefixCacheConfig>,
    preference: Vec<usize>,
    /// Per pool: base address of each region (for kernel views).
    bases: Vec<Vec<u64>>,
    /// Per pool: blocks per region.
    chunks: Vec<u32>,
    /// Per device pool: seconds (since `epoch`) each block was last released.
    released_at: Vec<Vec<u32>>,
    /// Blocks pinned by in-flight tier transfers (for invariant checks).
    pinned: Vec<(PoolId, BlockId)>,
    pressure: PressureMonitor,
    stats: Counters,
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
    compressions: u64,
    compression_ratio_sum: f64,
    compression_ms_sum: f64,
}

type SharedCallback = Arc<dyn Fn(MemoryPressure) + Send + Sync>;

/// The state handles and the manager share.
struct Shared<B: Backend> {
    config: CacheConfig,
    devices: Vec<Device>,
    host_pool: Option<PoolId>,
    inner: Mutex<Inner>,
    dev: Mutex<DevSide<B>>,
    callback: Mutex<Option<SharedCallback>>,
    policy: Arc<dyn CacheEvictionPolicy>,
    epoch: Instant,
}

/// The manager: implements the seed's traits over any backend with
/// quantization (`pagedkv_hal_host::HostBackend` for host memory).
pub struct KvManager<B: Backend> {
    shared: Arc<Shared<B>>,
}

/// A backend the manager can drive from several threads.
pub trait ManagedBackend: Backend + Quantize + Send + 'static
where
    Self::Region: Send + Sync,
    Self::Fence: Send,
{
}
impl<B> ManagedBackend for B
where
    B: Backend + Quantize + Send + 'static,
    B::Region: Send + Sync,
    B::Fence: Send,
{
}

fn backend_err<E: BackendError>(during: &'static str) -> impl FnOnce(E) -> ManagerError {
    move |e| ManagerError::Backend {
        kind: e.kind(),
        during,
        message: e.to_string(),
    }
}

fn device_pool(i: usize) -> PoolId {
    PoolId(i as u16)
}

impl<B: ManagedBackend> KvManager<B>
where
    B::Region: Send + Sync,
    B::Fence: Send,
{
    /// A manager over `backend` with `config`, preempting with LRU.
    pub fn new(backend: B, config: CacheConfig) -> Result<Self> {
        Self::with_policy(backend, config, Arc::new(LruEvictionPolicy::new()))
    }

    /// A manager with a chosen eviction policy.
    pub fn with_policy(
        mut backend: B,
        config: CacheConfig,
        policy: Arc<dyn CacheEvictionPolicy>,
    ) -> Result<Self> {
        let layout = config.layout;
        layout.validate()?;
        let ndev = config.target_devices.len();
        if ndev == 0 || ndev > MAX_DEVICES {
            return Err(ManagerError::Config("between 1 and 3 target devices"));
        }
        let to_u32 = |v: usize, what| u32::try_from(v).map_err(|_| ManagerError::Config(what));
        let max_blocks = to_u32(config.max_blocks, "max_blocks too large")?;
        let initial = if config.enable_pooling {
            config.initial_blocks
        } else {
            config.max_blocks
        };
        let initial = to_u32(
            initial.clamp(1, config.max_blocks.max(1)),
            "initial_blocks too large",
        )?;
        if max_blocks == 0 {
            return Err(ManagerError::Config("max_blocks must be at least 1"));
        }
        let bs = layout.tokens_per_block;
        let max_seq_blocks = to_u32(
            config.max_sequence_length.div_ceil(bs as usize).max(1),
            "max_sequence_length too large",
        )?;
        let core_config = pagedkv_core::CacheConfig {
            tokens_per_block: bs,
            max_seqs: to_u32(config.max_sequences.max(1), "max_sequences too large")?,
            max_blocks_per_seq: max_seq_blocks,
            max_plans: to_u32(config.max_sequences.max(1), "max_sequences too large")?,
        };
        let key = config.hash_key.unwrap_or_else(|| {
            use std::hash::{BuildHasher, RandomState};
            let a = RandomState::new().hash_one(1u8);
            let b = RandomState::new().hash_one(2u8);
            let mut k = [0u8; 16];
            k[..8].copy_from_slice(&a.to_le_bytes());
            k[8..].copy_from_slice(&b.to_le_bytes());
            k
        });
        let mut cache = KvCache::with_config(core_config, SipBlockHasher::new(key))?;
        let mut mems = Vec::new();
        let mut devices = Vec::new();
        // Pools: devices 0..n, their compressed pools n..2n, then the host tier.
        let mut add = |cache: &mut KvCache<'static, SipBlockHasher>,
                       mems: &mut Vec<PoolMem<B::Region>>,
                       cfg: PoolConfig,
                       layout: KvLayout,
                       memory: MemoryKind,
                       max: u32,
                       online: u32|
         -> Result<()> {
            let mut pool = BlockPool::with_capacity(cfg, max)?;
            pool.shrink(online)?;
            cache.add_pool(pool)?;
            let region = backend
                .create_region(&RegionDesc {
                    block_count: online,
                    layout,
                    memory,
                })
                .map_err(backend_err("creating a region"))?;
            mems.push(PoolMem {
                layout,
                memory,
                chunk: online,
                regions: vec![region],
            });
            Ok(())
        };
        for (i, d) in config.target_devices.iter().enumerate() {
            let memory = match d {
                Device::Gpu(n) => MemoryKind::Device(*n),
                Device::Cpu => MemoryKind::Host,
            };
            devices.push(*d);
            add(
                &mut cache,
                &mut mems,
                PoolConfig::device(i as u16, bs),
                layout,
                memory,
                max_blocks,
                initial,
            )?;
        }
        let qlayout = layout.with_dtype(DType::Int8);
        let kinds: Vec<MemoryKind> = mems.iter().map(|m| m.memory).collect();
        for (i, mem) in kinds.into_iter().enumerate() {
            add(
                &mut cache,
                &mut mems,
                PoolConfig::host((ndev + i) as u16, bs),
                qlayout,
                mem,
                max_blocks,
                initial,
            )?;
        }
        let host_pool = if config.host_blocks > 0 {
            let hb = to_u32(config.host_blocks, "host_blocks too large")?;
            let id = (2 * ndev) as u16;
            add(
                &mut cache,
                &mut mems,
                PoolConfig::host(id, bs),
                layout,
                MemoryKind::PinnedHost,
                hb,
                hb,
            )?;
            Some(PoolId(id))
        } else {
            None
        };
        let chunks = mems.iter().map(|m| m.chunk).collect();
        let bases = mems
            .iter()
            .map(|m| {
                m.regions
                    .iter()
                    .map(|r| backend.region_address(r).unwrap_or(0))
                    .collect()
            })
            .collect();
        let pressure =
            PressureMonitor::new(config.pressure_thresholds, config.pressure_hysteresis)?;
        for p in cache.pools_mut() {
            p.set_events_enabled(false);
        }
        let inner = Inner {
            cache,
            reqs: HashMap::new(),
            anon: Vec::new(),
            prefix: config.prefix_cache_config.clone(),
            preference: (0..ndev).collect(),
            bases,
            chunks,
            released_at: vec![vec![0; max_blocks as usize]; ndev],
            pinned: Vec::new(),
            pressure,
            stats: Counters::default(),
        };
        let dev = DevSide {
            backend,
            pools: mems,
            validator: BatchValidator::with_capacity(max_blocks.max(config.host_blocks as u32)),
        };
        Ok(Self {
            shared: Arc::new(Shared {
                config,
                devices,
                host_pool,
                inner: Mutex::new(inner),
                dev: Mutex::new(dev),
                callback: Mutex::new(None),
                policy,
                epoch: Instant::now(),
            }),
        })
    }

    /// A new request `child` sharing every block of `parent` (parallel
    /// sampling, beam search); the first write to a shared partial block
    /// copies it.
    pub async fn fork(
        &self,
        parent: RequestId,
        child: RequestId,
    ) -> Result<Arc<dyn KvCacheHandle>> {
        self.ensure_on_device(parent).await?;
        let mut inner = lock(&self.shared.inner);
        if inner.reqs.contains_key(&child) {
            return Err(ManagerError::DuplicateRequest(child));
        }
        let st = inner
            .reqs
            .get(&parent)
            .ok_or(ManagerError::UnknownRequest(parent))?;
        let (pseq, priority, device) = (st.seq, st.priority, st.device);
        let seq = inner.cache.fork(pseq)?;
        let handle = self.new_handle(child);
        inner.reqs.insert(
            child,
            ReqState {
                seq,
                priority,
                handle: Arc::downgrade(&handle),
                device,
                compressed: None,
                last_access: Instant::now(),
            },
        );
        drop(inner);
        self.shared.policy.record_access(child, Instant::now());
        Ok(handle)
    }

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

    /// Checks the core's invariants (with in-flight transfers' pins).
    pub fn check_invariants(&self) -> std::result::Result<(), pagedkv_core::Invariant> {
        let inner = lock(&self.shared.inner);
        inner.cache.check_invariants_with(&inner.pinned)
    }

    /// Blocks held, per pool (device pools first, then compressed, then host).
    pub fn used_blocks(&self) -> Vec<u32> {
        lock(&self.shared.inner)
            .cache
            .pools()
            .iter()
            .map(|p| p.used_len())
            .collect()
    }

    /// The pool and block of entry `index` of a request's table.
    fn locate(&self, id: RequestId, index: usize) -> Result<(PoolId, BlockId)> {
        let inner = lock(&self.shared.inner);
        let st = inner
            .reqs
            .get(&id)
            .ok_or(ManagerError::UnknownRequest(id))?;
        let info = inner.cache.info(st.seq)?;
        let b = *inner
            .cache
            .table(st.seq)?
            .get(index)
            .ok_or(ManagerError::LayoutMismatch("block index past the table"))?;
        Ok((info.pool, b))
    }

    /// Reads the bytes of block `index` of a request's table (tests and
    /// checksums). The request must be on a device or the host tier.
    pub fn read_block(&self, id: RequestId, index: usize) -> Result<Vec<u8>> {
        let (pool, block) = self.locate(id, index)?;
        let mut dev = lock(&self.shared.dev);
        let DevSide { backend, pools, .. } = &mut *dev;
        let m = &pools[pool.0 as usize];
        let mut out = vec![0u8; m.layout.block_bytes()? as usize];
        read_block_bytes(backend, m, block, &mut out)?;
        Ok(out)
    }

    /// Writes the bytes of block `index` of a request's table (what a kernel
    /// would do; tests use it to fill KV).
    pub fn write_block(&self, id: RequestId, index: usize, data: &[u8]) -> Result<()> {
        let (pool, block) = self.locate(id, index)?;
        let mut dev = lock(&self.shared.dev);
        let DevSide { backend, pools, .. } = &mut *dev;
        write_block_bytes(backend, &pools[pool.0 as usize], block, data)
    }

    fn notify_pressure(&self) {
        let changed = {
            let mut inner = lock(&self.shared.inner);
            let ndev = self.shared.devices.len();
            let (used, total) = inner.cache.pools()[..ndev]
                .iter()
                .fold((0u64, 0u64), |(u, t), p| {
                    (u + u64::from(p.used_len()), t + u64::from(p.capacity()))
                });
            let util = if total == 0 {
                0.0
            } else {
                used as f32 / total as f32
            };
            inner.pressure.update(util)
        };
        if let Some(level) = changed {
            tracing::debug!(?level, "memory pressure changed");
            let cb = lock(&self.shared.callback).clone();
            if let Some(cb) = cb {
                cb(level);
            }
        }
    }

    fn place(&self, inner: &Inner, st: &ReqState) -> Result<Place> {
        let info = inner.cache.info(st.seq)?;
        let ndev = self.shared.devices.len();
        let p = info.pool.0 as usize;
        Ok(if p < ndev {
            Place::Device(p)
        } else if p < 2 * ndev {
            Place::Compressed(p - ndev, st.compressed.unwrap_or(QuantFormat::Int8PerHead))
        } else {
            Place::Host
        })
    }

    // ---- two-phase moves ----------------------------------------------------

    /// Snapshots a planned move's copies and submits them under `dev`; the
    /// returned guard aborts the plan unless the move is committed.
    fn start_plan(
        &self,
        plan: PlanId,
        op: CopyOp,
        during: &'static str,
    ) -> Result<PlanGuard<'_, B>> {
        let (src, dst, copies) = {
            let inner = lock(&self.shared.inner);
            let v = inner.cache.plan(plan)?;
            (v.src_pool, v.dst_pool, v.copies().collect::<Vec<_>>())
        };
        let mut guard = PlanGuard {
            shared: &*self.shared,
            plan,
            fences: Vec::new(),
            armed: true,
        };
        let mut dev = lock(&self.shared.dev);
        submit(&mut dev, src, dst, &copies, op, &mut guard.fences)
            .map_err(|e| relabel(e, during))?;
        Ok(guard)
    }

    /// Commits a move whose copies completed.
    fn commit_plan(&self, mut guard: PlanGuard<'_, B>) -> Result<()> {
        lock(&self.shared.inner).cache.commit(guard.plan)?;
        guard.armed = false;
        Ok(())
    }

    /// Runs a planned move: copies (or quantizes) under `dev`, waits without
    /// locks, commits under `inner`; aborts on failure or cancellation.
    async fn run_plan(&self, plan: PlanId, op: CopyOp, during: &'static str) -> Result<()> {
        let mut guard = self.start_plan(plan, op, during)?;
        wait_fences(&self.shared, &mut guard.fences, during).await?;
        self.commit_plan(guard)
    }

    /// The same, blocking (for the synchronous `BlockAllocator::defragment`).
    fn run_plan_blocking(&self, plan: PlanId, op: CopyOp, during: &'static str) -> Result<()> {
        let mut guard = self.start_plan(plan, op, during)?;
        {
            let mut dev = lock(&self.shared.dev);
            for f in guard.fences.drain(..) {
                dev.backend.wait(&f).map_err(backend_err(during))?;
            }
        }
        self.commit_plan(guard)
    }

    async fn move_request(&self, id: RequestId, to: Place) -> Result<()> {
        let (plan, op, from) = {
            let mut inner = lock(&self.shared.inner);
            let st = inner
                .reqs
                .get(&id)
                .ok_or(ManagerError::UnknownRequest(id))?;
            let (seq, from) = (st.seq, self.place(&inner, st)?);
            let ndev = self.shared.devices.len();
            let (plan, op) = match (from, to) {
                (Place::Device(_), Place::Host) => {
                    let host = self.shared.host_pool.ok_or(ManagerError::NoHostTier)?;
                    (inner.cache.swap_out(seq, host)?, CopyOp::Copy)
                }
                (Place::Device(d), Place::Compressed(_, f)) => (
                    inner.cache.swap_out(seq, PoolId((ndev + d) as u16))?,
                    CopyOp::Quantize(f),
                ),
                (Place::Host, Place::Device(d)) => {
                    (inner.cache.swap_in(seq, device_pool(d))?, CopyOp::Copy)
                }
                (Place::Compressed(_, f), Place::Device(d)) => (
                    inner.cache.swap_in(seq, device_pool(d))?,
                    CopyOp::Dequantize(f),
                ),
                (Place::Device(_), Place::Device(d)) => {
                    (inner.cache.move_to(seq, device_pool(d))?, CopyOp::Copy)
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

    /// Brings a request back to a device if it is swapped out or compressed.
    async fn ensure_on_device(&self, id: RequestId) -> Result<()> {
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
        let mut tries = 0;
        loop {
            match self.move_request(id, Place::Device(device)).await {
                Err(ManagerError::Core(pagedkv_core::Error::OutOfBlocks { needed, .. }))
                    if tries < 4 =>
                {
                    tries += 1;
                    self.make_room(device, needed as usize, Some(id)).await?;
                }
                r => return r,
            }
        }
    }

    // ---- growth and preemption ---------------------------------------------

    /// Backs `chunk` more blocks of device `d` if below `max_blocks`.
    fn grow(&self, d: usize) -> Result<bool> {
        if !self.shared.config.enable_pooling {
            return Ok(false);
        }
        let mut dev = lock(&self.shared.dev);
        let mut inner = lock(&self.shared.inner);
        let pool = inner.cache.pool(device_pool(d))?;
        let (online, max) = (pool.capacity(), pool.max_blocks());
        if online >= max {
            return Ok(false);
        }
        let DevSide { backend, pools, .. } = &mut *dev;
        let m = &mut pools[d];
        let backed = m.chunk * m.regions.len() as u32;
        if backed < max && online + m.chunk > backed {
            let region = backend
                .create_region(&RegionDesc {
                    block_count: m.chunk,
                    layout: m.layout,
                    memory: m.memory,
                })
                .map_err(backend_err("growing a pool"))?;
            let base = backend.region_address(&region).unwrap_or(0);
            m.regions.push(region);
            inner.bases[d].push(base);
        }
        let backed = m.chunk * m.regions.len() as u32;
        let to = backed.min(max);
        inner.cache.pool_mut(device_pool(d))?.grow(to - online)?;
        // The compressed pool of the device follows, so compression always fits.
        let ndev = self.shared.devices.len();
        let cm = &mut pools[ndev + d];
        let cpool = inner.cache.pool(PoolId((ndev + d) as u16))?;
        let conline = cpool.capacity();
        if conline < to {
            while cm.chunk * (cm.regions.len() as u32) < to {
                let region = backend
                    .create_region(&RegionDesc {
                        block_count: cm.chunk,
                        layout: cm.layout,
                        memory: cm.memory,
                    })
                    .map_err(backend_err("growing a pool"))?;
                let base = backend.region_address(&region).unwrap_or(0);
                cm.regions.push(region);
                inner.bases[ndev + d].push(base);
            }
            inner
                .cache
                .pool_mut(PoolId((ndev + d) as u16))?
                .grow(to - conline)?;
        }
        tracing::debug!(device = d, blocks = to, "pool grown");
        Ok(true)
    }

    /// Frees `needed` blocks on device `d`: grow the pool, else preempt
    /// requests chosen by the policy to the host tier.
    async fn make_room(&self, d: usize, needed: usize, keep: Option<RequestId>) -> Result<()> {
        if self.grow(d)? {
            return Ok(());
        }
        if self.shared.host_pool.is_none() {
            return Err(ManagerError::OutOfMemory {
                needed,
                device: self.shared.devices[d],
            });
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
            return Err(ManagerError::OutOfMemory {
                needed,
                device: self.shared.devices[d],
            });
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

    // ---- tiers of the prefix cache ------------------------------------------

    /// Moves up to `n` least recently used cached blocks of device `d` to the
    /// host tier before they would be evicted.
    async fn offload(&self, d: usize, n: usize, keep: &[BlockHash]) -> Result<()> {
        let Some(host) = self.shared.host_pool else {
            return Ok(());
        };
        let pairs: Vec<(BlockId, BlockId, BlockHash)> = {
            let mut guard = lock(&self.shared.inner);
            let inner = &mut *guard;
            let dp = device_pool(d);
            let pool = inner.cache.pool(dp)?;
            let victims: Vec<(BlockId, BlockHash)> = pool
                .eviction_order()
                .filter_map(|b| pool.key_of(b).ok().flatten().map(|k| (b, k)))
                .filter(|(_, k)| !keep.contains(k))
                .take(n)
                .collect();
            let mut pairs = Vec::new();
            for (b, key) in victims {
                if inner.cache.pool(host)?.lookup(key).is_some() {
                    continue; // already on the host tier
                }
                let Ok(hb) = inner.cache.pool_mut(host)?.allocate_one() else {
                    break;
                };
                let pinned = inner.cache.pool_mut(dp)?.acquire(key);
                debug_assert_eq!(pinned, Some(b));
                inner.pinned.push((dp, b));
                inner.pinned.push((host, hb));
                pairs.push((b, hb, key));
            }
            pairs
        };
        if pairs.is_empty() {
            return Ok(());
        }
        let copies: Vec<BlockCopy> = pairs
            .iter()
            .map(|&(s, t, _)| BlockCopy { src: s, dst: t })
            .collect();
        let dp = device_pool(d);
        let mut fences = Vec::new();
        let res = {
            let mut dev = lock(&self.shared.dev);
            submit(&mut dev, dp, host, &copies, CopyOp::Copy, &mut fences)
        };
        let res = match res {
            Ok(()) => wait_fences(&self.shared, &mut fences, "offloading prefixes").await,
            Err(e) => {
                drain_fences(&self.shared, &mut fences);
                Err(e)
            }
        };
        let mut guard = lock(&self.shared.inner);
        let inner = &mut *guard;
        for &(b, hb, key) in &pairs {
            unpin(&mut inner.pinned, (dp, b));
            unpin(&mut inner.pinned, (host, hb));
            if res.is_ok() {
                inner.cache.pool_mut(host)?.register(hb, key, None)?;
            }
            inner.cache.pool_mut(host)?.release(hb)?;
            let pool = inner.cache.pool_mut(dp)?;
            pool.release(b)?;
            if res.is_ok() && pool.is_cached(b)? {
                pool.evict(b)?;
            }
        }
        res
    }

    /// Brings prompt blocks found on the host tier back to device `d` (after
    /// the device hits), so the allocation that follows hits them.
    async fn promote(&self, d: usize, keys: &[BlockHash]) -> Result<u64> {
        let Some(host) = self.shared.host_pool else {
            return Ok(0);
        };
        let dp = device_pool(d);
        let pairs: Vec<(BlockId, BlockId, BlockHash)> = {
            let mut guard = lock(&self.shared.inner);
            let inner = &mut *guard;
            let start = keys
                .iter()
                .position(|&k| {
                    inner
                        .cache
                        .pool(dp)
                        .map(|p| p.lookup(k).is_none())
                        .unwrap_or(true)
                })
                .unwrap_or(keys.len());
            let mut pairs = Vec::new();
            for &key in &keys[start..] {
                if inner.cache.pool(host)?.lookup(key).is_none() {
                    break;
                }
                let Ok(db) = inner.cache.pool_mut(dp)?.allocate_one() else {
                    break;
                };
                let Some(hb) = inner.cache.pool_mut(host)?.acquire(key) else {
                    inner.cache.pool_mut(dp)?.release(db)?;
                    break;
                };
                inner.pinned.push((dp, db));
                inner.pinned.push((host, hb));
                pairs.push((hb, db, key));
            }
            pairs
        };
        if pairs.is_empty() {
            return Ok(0);
        }
        let copies: Vec<BlockCopy> = pairs
            .iter()
            .map(|&(s, t, _)| BlockCopy { src: s, dst: t })
            .collect();
        let mut fences = Vec::new();
        let res = {
            let mut dev = lock(&self.shared.dev);
            submit(&mut dev, host, dp, &copies, CopyOp::Copy, &mut fences)
        };
        let res = match res {
            Ok(()) => wait_fences(&self.shared, &mut fences, "promoting prefixes").await,
            Err(e) => {
                drain_fences(&self.shared, &mut fences);
                Err(e)
            }
        };
        let mut guard = lock(&self.shared.inner);
        let inner = &mut *guard;
        let mut parent = None;
        for &(hb, db, key) in &pairs {
            unpin(&mut inner.pinned, (dp, db));
            unpin(&mut inner.pinned, (host, hb));
            // Published only once the bytes are in place.
            if res.is_ok() {
                inner.cache.pool_mut(dp)?.register(db, key, parent)?;
            }
            parent = Some(key);
            inner.cache.pool_mut(dp)?.release(db)?;
            inner.cache.pool_mut(host)?.release(hb)?;
        }
        res.map(|()| pairs.len() as u64)
    }

    fn prompt_keys(
        &self,
        inner: &Inner,
        tokens: &[u32],
        salt: Option<CacheSalt>,
    ) -> Vec<BlockHash> {
        let h = inner.cache.hasher();
        let bs = self.shared.config.layout.tokens_per_block as usize;
        let mut tip = h.root(salt);
        tokens
            .chunks_exact(bs)
            .enumerate()
            .map(|(i, t)| {
                tip = h.hash_block(tip, t, (i * bs) as u32, &ExtraKeys::default());
                tip
            })
            .collect()
    }

    fn salt_for(&self, inner: &Inner, req: &AllocationRequest) -> Option<CacheSalt> {
        let shared = inner
            .prefix
            .as_ref()
            .is_none_or(|p| p.enable_cross_request_sharing);
        match (req.cache_salt, shared) {
            (Some(s), true) => Some(CacheSalt(s)),
            (s, false) => Some(CacheSalt(
                (u128::from(req.request_id.0) << 64) ^ s.unwrap_or(0) ^ 0x5a17,
            )),
            (None, true) => None,
        }
    }

    fn new_handle(&self, id: RequestId) -> Arc<Handle> {
        Arc::new(Handle {
            id,
            shared: Arc::clone(&self.shared) as Arc<dyn SharedView>,
        })
    }

    fn stamp_release(&self, inner: &mut Inner, seq: SeqId) {
        let now = self.shared.epoch.elapsed().as_secs() as u32;
        let Ok(info) = inner.cache.info(seq) else {
            return;
        };
        let d = info.pool.0 as usize;
        if d >= self.shared.devices.len() {
            return;
        }
        let blocks: Vec<BlockId> = inner
            .cache
            .table(seq)
            .map(|t| t.to_vec())
            .unwrap_or_default();
        for b in blocks.into_iter().skip(info.first_live as usize) {
            if let Some(s) = inner.released_at[d].get_mut(b.index()) {
                *s = now;
            }
        }
    }

    fn enforce_max_prefixes(&self, inner: &mut Inner) -> usize {
        let Some(max) = inner.prefix.as_ref().map(|p| p.max_prefixes) else {
            return 0;
        };
        let mut n = 0;
        for d in 0..self.shared.devices.len() {
            let Ok(pool) = inner.cache.pool_mut(device_pool(d)) else {
                continue;
            };
            while pool.cached_len() as usize > max {
                pool.evict_one();
                n += 1;
            }
        }
        n
    }

    async fn free_request(&self, id: RequestId) -> Result<()> {
        loop {
            {
                let mut guard = lock(&self.shared.inner);
                let inner = &mut *guard;
                let st = inner
                    .reqs
                    .get(&id)
                    .ok_or(ManagerError::UnknownRequest(id))?;
                let seq = st.seq;
                self.stamp_release(inner, seq);
                match inner.cache.free(seq) {
                    Ok(()) => {
                        inner.reqs.remove(&id);
                        self.enforce_max_prefixes(inner);
                        break;
                    }
                    Err(pagedkv_core::Error::SequenceBusy(_)) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            // Another task is moving it: let that finish.
            yield_now().await;
        }
        self.shared.policy.forget(id);
        self.notify_pressure();
        Ok(())
    }

    async fn append(&self, id: RequestId, n: usize, tokens: Option<&[u32]>) -> Result<()> {
        self.ensure_on_device(id).await?;
        let n32 = u32::try_from(n).map_err(|_| pagedkv_core::Error::LengthOverflow)?;
        let mut tries = 0;
        loop {
            let (res, device) = {
                let mut inner = lock(&self.shared.inner);
                let st = inner
                    .reqs
                    .get_mut(&id)
                    .ok_or(ManagerError::UnknownRequest(id))?;
                st.last_access = Instant::now();
                let (seq, device) = (st.seq, st.device);
                let res = match tokens {
                    Some(t) => inner.cache.append(seq, t),
                    None => inner.cache.append_len(seq, n32),
                };
                (res, device)
            };
            match res {
                Ok(out) => {
                    if let Some(c) = out.cow {
                        let mut fences = Vec::new();
                        let dp = device_pool(device);
                        let r = {
                            let mut dev = lock(&self.shared.dev);
                            submit(&mut dev, dp, dp, &[c], CopyOp::Copy, &mut fences)
                        };
                        r?;
                        wait_fences(&self.shared, &mut fences, "copy-on-write").await?;
                    }
                    self.shared.policy.record_access(id, Instant::now());
                    self.notify_pressure();
                    return Ok(());
                }
                Err(pagedkv_core::Error::OutOfBlocks { needed, .. }) if tries < 4 => {
                    tries += 1;
                    self.make_room(device, needed as usize, Some(id)).await?;
                }
                Err(pagedkv_core::Error::SequenceBusy(_)) if tries < 1000 => {
                    tries += 1;
                    yield_now().await;
                }
                Err(e) => {
                    lock(&self.shared.inner).stats.failures += 1;
                    return Err(e.into());
                }
            }
        }
    }

    fn check_request(&self, req: &AllocationRequest) -> Result<()> {
        let l = &self.shared.config.layout;
        if req.num_layers != l.layers as usize
            || req.num_heads != l.kv_heads as usize
            || req.head_dim != l.head_size as usize
        {
            return Err(ManagerError::LayoutMismatch("layers, heads or head size"));
        }
        if req.dtype != l.dtype {
            return Err(ManagerError::LayoutMismatch("element type"));
        }
        if !req.prompt.is_empty() && req.prompt.len() != req.initial_tokens {
            return Err(ManagerError::LayoutMismatch(
                "prompt length differs from initial_tokens",
            ));
        }
        if req.max_sequence_length > self.shared.config.max_sequence_length
            || req.initial_tokens > req.max_sequence_length
        {
            return Err(ManagerError::LayoutMismatch(
                "sequence longer than max_sequence_length",
            ));
        }
        if let Some(d) = req.device {
            self.device_index(d)?;
        }
        Ok(())
    }

    fn device_index(&self, d: Device) -> Result<usize> {
        self.shared
            .devices
            .iter()
            .position(|&x| x == d)
            .ok_or(ManagerError::UnknownDevice(d))
    }

    fn choose_device(&self, inner: &Inner, req: &AllocationRequest, blocks: u32) -> Result<usize> {
        if let Some(d) = req.device {
            return self.device_index(d);
        }
        let pick = inner.preference.iter().copied().find(|&d| {
            inner
                .cache
                .pool(device_pool(d))
                .is_ok_and(|p| p.available() >= blocks)
        });
        Ok(pick.unwrap_or(inner.preference[0]))
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
            ..CacheManagerStats::default()
        };
        for &d in devices {
            if let Ok(p) = inner.cache.pool(device_pool(d)) {
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
        s
    }

    async fn allocate_inner(&self, req: &AllocationRequest) -> Result<Arc<dyn KvCacheHandle>> {
        self.check_request(req)?;
        let bs = self.shared.config.layout.tokens_per_block as usize;
        let blocks = u32::try_from(req.initial_tokens.div_ceil(bs))
            .map_err(|_| pagedkv_core::Error::LengthOverflow)?;
        // Prompt keys, and host-tier prefixes brought back first.
        let (device, keys, salt, use_prefix) = {
            let inner = lock(&self.shared.inner);
            if inner.reqs.contains_key(&req.request_id) {
                return Err(ManagerError::DuplicateRequest(req.request_id));
            }
            let device = self.choose_device(&inner, req, blocks)?;
            let long_enough = req.initial_tokens >= 1
                && (req.prompt.len() == req.initial_tokens || !req.block_keys.is_empty());
            let use_prefix = long_enough
                && inner
                    .prefix
                    .as_ref()
                    .is_some_and(|p| req.initial_tokens >= p.min_prefix_length.max(1));
            let salt = self.salt_for(&inner, req);
            let keys = if !use_prefix {
                Vec::new()
            } else if !req.block_keys.is_empty() {
                // External keys: a salt moves them to the tenant's own key space.
                let mix = salt.map_or(0, |s| inner.cache.hasher().root(Some(s)).0);
                req.block_keys.iter().map(|&k| BlockHash(k ^ mix)).collect()
            } else {
                self.prompt_keys(&inner, &req.prompt, salt)
            };
            (device, keys, salt, use_prefix)
        };
        let mut host_hits = 0;
        if use_prefix && self.shared.host_pool.is_some() {
            host_hits = self.promote(device, &keys).await?;
        }
        let mut tries = 0;
        loop {
            // Cached blocks about to be evicted go to the host tier first.
            if self.shared.config.offload_evicted_prefixes && use_prefix {
                let (short, hits) = {
                    let inner = lock(&self.shared.inner);
                    let p = inner.cache.pool(device_pool(device))?;
                    let hits = keys.iter().take_while(|&&k| p.lookup(k).is_some()).count();
                    (
                        (blocks as usize - hits).saturating_sub(p.free_len() as usize),
                        hits,
                    )
                };
                if short > 0 {
                    self.offload(device, short, &keys[..hits]).await?;
                }
            }
            let res = {
                let mut guard = lock(&self.shared.inner);
                let inner = &mut *guard;
                let prompt = if use_prefix && !req.block_keys.is_empty() {
                    let len = u32::try_from(req.initial_tokens)
                        .map_err(|_| pagedkv_core::Error::LengthOverflow)?;
                    Prompt::keys(&keys, len)
                } else if use_prefix {
                    Prompt {
                        salt,
                        ..Prompt::ids(&req.prompt)
                    }
                } else {
                    Prompt::len(
                        u32::try_from(req.initial_tokens)
                            .map_err(|_| pagedkv_core::Error::LengthOverflow)?,
                    )
                };
                match inner.cache.allocate(device_pool(device), &prompt) {
                    Ok(a) => {
                        let handle = self.new_handle(req.request_id);
                        inner.reqs.insert(
                            req.request_id,
                            ReqState {
                                seq: a.seq,
                                priority: req.priority,
                                handle: Arc::downgrade(&handle),
                                device,
                                compressed: None,
                                last_access: Instant::now(),
                            },
                        );
                        inner.stats.allocations += 1;
                        if use_prefix {
                            inner.stats.queries += keys.len() as u64;
                            let from_host = host_hits.min(u64::from(a.hit_blocks));
                            inner.stats.host_hits += from_host;
                            inner.stats.device_hits += u64::from(a.hit_blocks) - from_host;
                        }
                        Ok(handle)
                    }
                    Err(e) => Err(e),
                }
            };
            match res {
                Ok(h) => {
                    self.shared
                        .policy
                        .record_access(req.request_id, Instant::now());
                    self.notify_pressure();
                    return Ok(h);
                }
                Err(pagedkv_core::Error::OutOfBlocks { needed, .. }) if tries < 4 => {
                    tries += 1;
                    if let Err(e) = self.make_room(device, needed as usize, None).await {
                        lock(&self.shared.inner).stats.failures += 1;
                        return Err(e);
                    }
                }
                Err(e) => {
                    lock(&self.shared.inner).stats.failures += 1;
                    return Err(e.into());
                }
            }
        }
    }
}

fn unpin(pinned: &mut Vec<(PoolId, BlockId)>, x: (PoolId, BlockId)) {
    if let Some(i) = pinned.iter().position(|&p| p == x) {
        pinned.swap_remove(i);
    }
}

fn relabel(e: ManagerError, during: &'static str) -> ManagerError {
    match e {
        ManagerError::Backend { kind, message, .. } => ManagerError::Backend {
            kind,
            during,
            message,
        },
        e => e,
    }
}

fn part_of(p: u32) -> KvPart {
    if p.is_multiple_of(2) {
        KvPart::Key
    } else {
        KvPart::Value
    }
}

fn read_block_bytes<B: Backend>(
    be: &mut B,
    m: &PoolMem<B::Region>,
    b: BlockId,
    out: &mut [u8],
) -> Result<()> {
    let (r, local) = ((b.0 / m.chunk) as usize, BlockId(b.0 % m.chunk));
    let pb = m.layout.part_bytes()? as usize;
    for (p, chunk) in out.chunks_mut(pb).enumerate() {
        let off = m
            .layout
            .offset(m.chunk, local, p as u32 / 2, part_of(p as u32))?;
        be.read_bytes(&m.regions[r], off, chunk)
            .map_err(backend_err("reading a block"))?;
    }
    Ok(())
}

fn write_block_bytes<B: Backend>(
    be: &mut B,
    m: &PoolMem<B::Region>,
    b: BlockId,
    data: &[u8],
) -> Result<()> {
    let (r, local) = ((b.0 / m.chunk) as usize, BlockId(b.0 % m.chunk));
    let pb = m.layout.part_bytes()? as usize;
    if data.len() != m.layout.block_bytes()? as usize {
        return Err(ManagerError::LayoutMismatch("block data of the wrong size"));
    }
    for (p, chunk) in data.chunks(pb).enumerate() {
        let off = m
            .layout
            .offset(m.chunk, local, p as u32 / 2, part_of(p as u32))?;
        be.write_bytes(&m.regions[r], off, chunk)
            .map_err(backend_err("writing a block"))?;
    }
    Ok(())
}

/// Submits `copies` from pool `src` to pool `dst`, one validated batch per
/// pair of regions; pushes the fences.
fn submit<B: ManagedBackend>(
    dev: &mut DevSide<B>,
    src: PoolId,
    dst: PoolId,
    copies: &[BlockCopy],
    op: CopyOp,
    fences: &mut Vec<B::Fence>,
) -> Result<()>
where
    B::Region: Send + Sync,
    B::Fence: Send,
{
    let DevSide {
        backend,
        pools,
        validator,
    } = dev;
    let (sm, dm) = (&pools[src.0 as usize], &pools[dst.0 as usize]);
    let mut groups: HashMap<(usize, usize), Vec<BlockCopy>> = HashMap::new();
    for c in copies {
        let key = ((c.src.0 / sm.chunk) as usize, (c.dst.0 / dm.chunk) as usize);
        groups.entry(key).or_default().push(BlockCopy {
            src: BlockId(c.src.0 % sm.chunk),
            dst: BlockId(c.dst.0 % dm.chunk),
        });
    }
    let mut keys: Vec<_> = groups.keys().copied().collect();
    keys.sort_unstable();
    for (rs, rd) in keys {
        let batch_copies = &groups[&(rs, rd)];
        let (sr, dr) = (&sm.regions[rs], &dm.regions[rd]);
        let same = src == dst && rs == rd;
        let batch = validator.validate(batch_copies, sm.chunk, dm.chunk, same)?;
        // SAFETY: both regions belong to `backend` and stay alive while the
        // manager holds them (regions are destroyed only by `defragment`,
        // after every transfer into them has completed). The core planned
        // the copies: their target blocks are reserved for this transfer
        // and unpublished, so nothing reads or writes them until the fence
        // is waited; their source blocks are held and immutable.
        let fence = unsafe {
            match op {
                CopyOp::Copy => backend.copy_blocks(sr, dr, batch),
                CopyOp::Quantize(f) => backend.quantize(sr, dr, batch, f),
                CopyOp::Dequantize(f) => backend.dequantize(sr, dr, batch, f),
            }
        }
        .map_err(backend_err("copying blocks"))?;
        fences.push(fence);
    }
    Ok(())
}

/// Polls fences with short `dev` sections, yielding between polls.
async fn wait_fences<B: Backend>(
    shared: &Shared<B>,
    fences: &mut Vec<B::Fence>,
    during: &'static str,
) -> Result<()> {
    while !fences.is_empty() {
        let done = {
            let mut dev = lock(&shared.dev);
            let mut done = true;
            let mut i = 0;
            while i < fences.len() {
                if dev.backend.poll(&fences[i]).map_err(backend_err(during))? {
                    fences.swap_remove(i);
                } else {
                    done = false;
                    i += 1;
                }
            }
            done
        };
        if !done {
            yield_now().await;
        }
    }
    Ok(())
}

/// Waits fences synchronously (on failure paths, before releasing targets).
fn drain_fences<B: Backend>(shared: &Shared<B>, fences: &mut Vec<B::Fence>) {
    if fences.is_empty() {
        return;
    }
    let mut dev = lock(&shared.dev);
    for f in fences.drain(..) {
        let _ = dev.backend.wait(&f);
    }
}

/// Aborts a plan unless disarmed (on error or a dropped future).
struct PlanGuard<'a, B: Backend> {
    shared: &'a Shared<B>,
    plan: PlanId,
    fences: Vec<B::Fence>,
    armed: bool,
}

impl<B: Backend> Drop for PlanGuard<'_, B> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        drain_fences(self.shared, &mut self.fences);
        let _ = lock(&self.shared.inner).cache.abort(self.plan);
        tracing::debug!(plan = %self.plan, "move aborted");
    }
}

/// What a handle reads of the manager (object-safe, so handles need not
/// carry the backend type).
trait SharedView: Send + Sync {
    fn snapshot(
        &self,
        id: RequestId,
    ) -> Option<(pagedkv_core::SeqInfo, Vec<BlockId>, usize, usize)>;
    fn view(&self, id: RequestId, layer: usize, part: KvPart) -> Result<Option<KvView>>;
    fn config(&self) -> &CacheConfig;
    fn device_of(&self, pool: usize) -> Device;
    fn epoch(&self) -> Instant;
    fn last_access(&self, id: RequestId) -> Option<Instant>;
}

impl<B: Backend + Send> SharedView for Shared<B>
where
    B::Region: Send + Sync,
    B::Fence: Send,
{
    fn snapshot(
        &self,
        id: RequestId,
    ) -> Option<(pagedkv_core::SeqInfo, Vec<BlockId>, usize, usize)> {
        let inner = lock(&self.inner);
        let st = inner.reqs.get(&id)?;
        let info = inner.cache.info(st.seq).ok()?;
        let t = inner.cache.table(st.seq).ok()?.to_vec();
        Some((info, t, st.device, self.devices.len()))
    }

    fn view(&self, id: RequestId, layer: usize, part: KvPart) -> Result<Option<KvView>> {
        let l = self.config.layout;
        if layer >= l.layers as usize {
            return Err(ManagerError::LayoutMismatch("layer out of range"));
        }
        let inner = lock(&self.inner);
        let st = inner
            .reqs
            .get(&id)
            .ok_or(ManagerError::UnknownRequest(id))?;
        let info = inner.cache.info(st.seq)?;
        let p = info.pool.0 as usize;
        if p >= self.devices.len() || info.moving {
            return Ok(None);
        }
        let chunk = inner.chunks[p];
        let bases = &inner.bases[p];
        let mut addrs = Vec::with_capacity(info.blocks as usize);
        for (k, &b) in inner.cache.table(st.seq)?.iter().enumerate() {
            if (k as u32) < info.first_live {
                addrs.push(0);
                continue;
            }
            let (r, local) = ((b.0 / chunk) as usize, BlockId(b.0 % chunk));
            let off = l.offset(chunk, local, layer as u32, part)?;
            addrs.push(bases.get(r).copied().unwrap_or(0) + off);
        }
        let elem = u64::from(l.dtype.size_bytes());
        Ok(Some(KvView {
            memory: match self.devices[p] {
                Device::Gpu(n) => MemoryKind::Device(n),
                Device::Cpu => MemoryKind::Host,
            },
            dtype: l.dtype,
            block_addrs: addrs,
            token_stride: u64::from(l.kv_heads) * u64::from(l.head_size) * elem,
            head_stride: u64::from(l.head_size) * elem,
            tokens_per_block: l.tokens_per_block,
            num_tokens: info.tokens as usize,
        }))
    }

    fn config(&self) -> &CacheConfig {
        &self.config
    }

    fn device_of(&self, pool: usize) -> Device {
        self.devices[pool.min(self.devices.len() - 1)]
    }

    fn epoch(&self) -> Instant {
        self.epoch
    }

    fn last_access(&self, id: RequestId) -> Option<Instant> {
        lock(&self.inner).reqs.get(&id).map(|s| s.last_access)
    }
}

/// The handle of a live request.
pub struct Handle {
    id: RequestId,
    shared: Arc<dyn SharedView>,
}

impl std::fmt::Debug for Handle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handle").field("id", &self.id).finish()
    }
}

impl KvCacheHandle for Handle {
    fn request_id(&self) -> RequestId {
        self.id
    }
    fn block_table(&self) -> BlockTable {
        let bs = self.shared.config().layout.tokens_per_block as usize;
        match self.shared.snapshot(self.id) {
            Some((info, t, _, _)) => BlockTable {
                physical_blocks: t,
                sequence_length: info.tokens as usize,
                block_size: bs,
            },
            None => BlockTable {
                physical_blocks: Vec::new(),
                sequence_length: 0,
                block_size: bs,
            },
        }
    }
    fn device(&self) -> Device {
        match self.shared.snapshot(self.id) {
            Some((info, _, device, ndev)) if (info.pool.0 as usize) < ndev => {
                self.shared.device_of(device)
            }
            Some(_) => Device::Cpu,
            None => Device::Cpu,
        }
    }
    fn num_tokens(&self) -> usize {
        self.shared
            .snapshot(self.id)
            .map_or(0, |(i, ..)| i.tokens as usize)
    }
    fn num_layers(&self) -> usize {
        self.shared.config().layout.layers as usize
    }
    fn num_heads(&self) -> usize {
        self.shared.config().layout.kv_heads as usize
    }
    fn head_dim(&self) -> usize {
        self.shared.config().layout.head_size as usize
    }
    fn key_cache(&self, layer: usize) -> Result<Option<KvView>> {
        self.shared.view(self.id, layer, KvPart::Key)
    }
    fn value_cache(&self, layer: usize) -> Result<Option<KvView>> {
        self.shared.view(self.id, layer, KvPart::Value)
    }
    fn stats(&self) -> CacheHandleStats {
        let l = self.shared.config().layout;
        let bb = l.block_bytes().unwrap_or(0) as usize;
        let (blocks, tokens) = self.shared.snapshot(self.id).map_or((0, 0), |(i, ..)| {
            ((i.blocks - i.first_live) as usize, i.tokens as usize)
        });
        let cap = blocks * l.tokens_per_block as usize;
        CacheHandleStats {
            memory_bytes: blocks * bb,
            blocks_allocated: blocks,
            tokens_stored: tokens,
            utilization: if cap == 0 {
                0.0
            } else {
                tokens as f32 / cap as f32
            },
            last_access_secs: self.shared.last_access(self.id).map_or(0.0, |t| {
                t.saturating_duration_since(self.shared.epoch())
                    .as_secs_f64()
            }),
        }
    }
    fn is_valid(&self) -> bool {
        self.shared.snapshot(self.id).is_some()
    }
    fn cache_id(&self) -> String {
        self.id.to_string()
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

#[async_trait::async_trait]
impl<B: ManagedBackend> KvCacheManager for KvManager<B>
where
    B::Region: Send + Sync,
    B::Fence: Send,
{
    #[tracing::instrument(skip_all, fields(request = %request.request_id))]
    async fn allocate(&self, request: &AllocationRequest) -> Result<Arc<dyn KvCacheHandle>> {
        self.allocate_inner(request).await
    }

    #[tracing::instrument(skip(self))]
    async fn extend(&self, request_id: RequestId, additional_tokens: usize) -> Result<()> {
        self.append(request_id, additional_tokens, None).await
    }

    #[tracing::instrument(skip(self, tokens))]
    async fn extend_tokens(&self, request_id: RequestId, tokens: &[u32]) -> Result<()> {
        self.append(request_id, tokens.len(), Some(tokens)).await
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
        inner.cache.pool(device_pool(d)).is_ok_and(|p| {
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

    #[tracing::instrument(skip(self))]
    async fn gc(&self) -> Result<CacheGcStats> {
        let t0 = Instant::now();
        let bb = self.shared.config.layout.block_bytes()? as usize;
        let dropped: Vec<RequestId> = {
            let inner = lock(&self.shared.inner);
            inner
                .reqs
                .iter()
                .filter(|(_, s)| s.handle.strong_count() == 0)
                .map(|(id, _)| *id)
                .collect()
        };
        let mut freed_blocks = 0usize;
        for id in &dropped {
            let blocks = {
                let inner = lock(&self.shared.inner);
                inner
                    .reqs
                    .get(id)
                    .and_then(|s| inner.cache.info(s.seq).ok())
                    .map_or(0, |i| (i.blocks - i.first_live) as usize)
            };
            self.free_request(*id).await?;
            freed_blocks += blocks;
        }
        let expired = {
            let mut inner = lock(&self.shared.inner);
            let mut n = self.enforce_max_prefixes(&mut inner);
            if let Some(ttl) = inner
                .prefix
                .as_ref()
                .map(|p| p.prefix_ttl_seconds)
                .filter(|&t| t > 0)
            {
                let now = self.shared.epoch.elapsed().as_secs();
                for d in 0..self.shared.devices.len() {
                    loop {
                        let pool = inner.cache.pool(device_pool(d))?;
                        let Some(b) = pool.eviction_order().next() else {
                            break;
                        };
                        let at = u64::from(inner.released_at[d][b.index()]);
                        if at + ttl > now {
                            break;
                        }
                        inner.cache.pool_mut(device_pool(d))?.evict(b)?;
                        n += 1;
                    }
                }
            }
            n
        };
        self.notify_pressure();
        Ok(CacheGcStats {
            memory_freed: freed_blocks * bb,
            caches_freed: dropped.len(),
            prefixes_expired: expired,
            gc_time_ms: t0.elapsed().as_millis() as u64,
        })
    }

    fn set_pressure_callback(&self, callback: PressureCallback) {
        *lock(&self.shared.callback) = Some(Arc::from(callback));
    }

    fn get_handle(&self, request_id: RequestId) -> Option<Arc<dyn KvCacheHandle>> {
        let inner = lock(&self.shared.inner);
        inner
            .reqs
            .get(&request_id)?
            .handle
            .upgrade()
            .map(|h| h as Arc<dyn KvCacheHandle>)
    }

    fn list_handles(&self) -> Vec<(RequestId, Arc<dyn KvCacheHandle>)> {
        let inner = lock(&self.shared.inner);
        let mut v: Vec<_> = inner
            .reqs
            .iter()
            .filter_map(|(id, s)| {
                s.handle
                    .upgrade()
                    .map(|h| (*id, h as Arc<dyn KvCacheHandle>))
            })
            .collect();
        v.sort_by_key(|(id, _)| *id);
        v
    }
}

#[async_trait::async_trait]
impl<B: ManagedBackend> AdvancedKvCacheManager for KvManager<B>
where
    B::Region: Send + Sync,
    B::Fence: Send,
{
    async fn enable_prefix_caching(&self, config: PrefixCacheConfig) -> Result<()> {
        let mut inner = lock(&self.shared.inner);
        inner.prefix = Some(config);
        self.enforce_max_prefixes(&mut inner);
        Ok(())
    }

    #[tracing::instrument(skip(self))]
    async fn share_prefix(
        &self,
        source: RequestId,
        target: RequestId,
        shared_tokens: usize,
    ) -> Result<()> {
        self.ensure_on_device(source).await?;
        self.ensure_on_device(target).await?;
        let mut inner = lock(&self.shared.inner);
        let s = inner
            .reqs
            .get(&source)
            .ok_or(ManagerError::UnknownRequest(source))?
            .seq;
        let t = inner
            .reqs
            .get(&target)
            .ok_or(ManagerError::UnknownRequest(target))?
            .seq;
        let tokens =
            u32::try_from(shared_tokens).map_err(|_| pagedkv_core::Error::LengthOverflow)?;
        inner.cache.share_prefix(s, t, tokens)?;
        Ok(())
    }

    #[tracing::instrument(skip(self))]
    async fn swap_out(&self, request_id: RequestId) -> Result<()> {
        self.move_request(request_id, Place::Host).await?;
        self.notify_pressure();
        Ok(())
    }

    #[tracing::instrument(skip(self))]
    async fn swap_in(&self, request_id: RequestId) -> Result<()> {
        self.ensure_on_device(request_id).await?;
        self.notify_pressure();
        Ok(())
    }

    #[tracing::instrument(skip(self))]
    async fn compress_cache(&self, request_id: RequestId, compression_ratio: f32) -> Result<()> {
        let l = self.shared.config.layout;
        let full = l.block_bytes()? as f32;
        let q = l.with_dtype(DType::Int8).block_bytes()? as f32;
        let best = q / full;
        if l.dtype.is_quantized() || compression_ratio + 0.01 < best || compression_ratio.is_nan() {
            return Err(ManagerError::UnreachableRatio {
                requested: compression_ratio,
                best,
            });
        }
        // Int8 with per-head scales for any ratio in reach (fp8 gives the
        // same size; int8 is the more accurate on bounded KV).
        let format = QuantFormat::Int8PerHead;
        let t0 = Instant::now();
        let device = {
            let inner = lock(&self.shared.inner);
            inner
                .reqs
                .get(&request_id)
                .ok_or(ManagerError::UnknownRequest(request_id))?
                .device
        };
        self.ensure_on_device(request_id).await?;
        self.move_request(request_id, Place::Compressed(device, format))
            .await?;
        let mut inner = lock(&self.shared.inner);
        inner.stats.compressions += 1;
        inner.stats.compression_ratio_sum += f64::from(best);
        inner.stats.compression_ms_sum += t0.elapsed().as_secs_f64() * 1000.0;
        drop(inner);
        self.notify_pressure();
        Ok(())
    }

    fn compression_stats(&self) -> CompressionStats {
        let inner = lock(&self.shared.inner);
        let l = self.shared.config.layout;
        let (full, q) = (
            l.block_bytes().unwrap_or(0) as usize,
            l.with_dtype(DType::Int8).block_bytes().unwrap_or(0) as usize,
        );
        let mut count = 0;
        let mut saved = 0;
        for st in inner.reqs.values() {
            if st.compressed.is_some()
                && let Ok(info) = inner.cache.info(st.seq)
            {
                count += 1;
                saved += (info.blocks - info.first_live) as usize * full.saturating_sub(q);
            }
        }
        let n = inner.stats.compressions.max(1) as f64;
        CompressionStats {
            compressed_caches: count,
            memory_saved_bytes: saved,
            avg_compression_ratio: if inner.stats.compressions == 0 {
                0.0
            } else {
                (inner.stats.compression_ratio_sum / n) as f32
            },
            avg_compression_time_ms: if inner.stats.compressions == 0 {
                0.0
            } else {
                inner.stats.compression_ms_sum / n
            },
        }
    }
}

impl<B: ManagedBackend> BlockAllocator for KvManager<B>
where
    B::Region: Send + Sync,
    B::Fence: Send,
{
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
        let d = inner.preference[0];
        let seq = inner
            .cache
            .allocate(device_pool(d), &Prompt::len(tokens))?
            .seq;
        let blocks = inner.cache.table(seq)?.to_vec();
        let mut sorted = blocks.clone();
        sorted.sort_unstable();
        inner.anon.push((sorted, seq));
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
            .anon
            .iter()
            .position(|(b, _)| *b == sorted)
            .ok_or(ManagerError::NotAnAllocation)?;
        let seq = inner.anon[i].1;
        inner.cache.free(seq)?;
        inner.anon.swap_remove(i);
        Ok(())
    }

    fn free_block_count(&self) -> usize {
        let inner = lock(&self.shared.inner);
        (0..self.shared.devices.len())
            .filter_map(|d| inner.cache.pool(device_pool(d)).ok())
            .map(|p| p.available() as usize)
            .sum()
    }

    fn total_block_count(&self) -> usize {
        let inner = lock(&self.shared.inner);
        (0..self.shared.devices.len())
            .filter_map(|d| inner.cache.pool(device_pool(d)).ok())
            .map(|p| p.capacity() as usize)
            .sum()
    }

    fn block_size(&self) -> usize {
        self.shared.config.layout.tokens_per_block as usize
    }

    fn defragment(&self) -> Result<()> {
        for d in 0..self.shared.devices.len() {
            let dp = device_pool(d);
            // Shrink the pool's service range to the used blocks, rounded up
            // to whole regions; raw allocations stay where they are.
            let target = {
                let dev = lock(&self.shared.dev);
                let mut inner = lock(&self.shared.inner);
                let chunk = dev.pools[d].chunk;
                let pool = inner.cache.pool(dp)?;
                let pinned_top = inner
                    .anon
                    .iter()
                    .flat_map(|(b, _)| b.last())
                    .map(|b| b.0 + 1)
                    .max()
                    .unwrap_or(0);
                let target = pool.used_len().max(pinned_top).max(1).div_ceil(chunk) * chunk;
                if target >= pool.capacity() {
                    continue;
                }
                inner.cache.pool_mut(dp)?.shrink(target)?;
                target
            };
            let anon: Vec<SeqId> = lock(&self.shared.inner)
                .anon
                .iter()
                .map(|(_, s)| *s)
                .collect();
            let draining: Vec<SeqId> = {
                let inner = lock(&self.shared.inner);
                inner
                    .cache
                    .draining_seqs(dp)
                    .filter(|s| !anon.contains(s))
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
            // Free the regions wholly past the service range with nothing held.
            let mut dev = lock(&self.shared.dev);
            let mut inner = lock(&self.shared.inner);
            let DevSide { backend, pools, .. } = &mut *dev;
            let m = &mut pools[d];
            while m.regions.len() > 1 {
                let pool = inner.cache.pool(dp)?;
                let first = (m.regions.len() as u32 - 1) * m.chunk;
                let held = (first..(first + m.chunk).min(pool.max_blocks()))
                    .any(|b| pool.ref_count(BlockId(b)).unwrap_or(0) > 0);
                if first < target || held {
                    break;
                }
                let Some(r) = m.regions.pop() else { break };
                // SAFETY: every transfer into or out of this region has been
                // waited (defragmentation runs its moves to completion), and
                // no block of it is held or in service.
                unsafe { backend.destroy_region(r) };
                inner.bases[d].pop();
            }
            tracing::debug!(device = d, blocks = target, "defragmented");
        }
        self.notify_pressure();
        Ok(())
    }
}

#[async_trait::async_trait]
impl<B: ManagedBackend> MultiDeviceCacheManager for KvManager<B>
where
    B::Region: Send + Sync,
    B::Fence: Send,
{
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
        let mut tries = 0;
        loop {
            match self.move_request(request_id, Place::Device(d)).await {
                Err(ManagerError::Core(pagedkv_core::Error::OutOfBlocks { needed, .. }))
                    if tries < 4 =>
                {
                    tries += 1;
                    self.make_room(d, needed as usize, Some(request_id)).await?;
                }
                r => {
                    r?;
                    break;
                }
            }
        }
        self.notify_pressure();
        Ok(())
    }

    fn get_cache_device(&self, request_id: RequestId) -> Option<Device> {
        let inner = lock(&self.shared.inner);
        let st = inner.reqs.get(&request_id)?;
        match self.place(&inner, st).ok()? {
            Place::Device(d) => Some(self.shared.devices[d]),
            _ => Some(Device::Cpu),
        }
    }

    async fn rebalance_devices(&self) -> Result<()> {
        let n = self.shared.devices.len();
        for _ in 0..64 {
            let (lo, pick) = {
                let inner = lock(&self.shared.inner);
                let util = |d: usize| {
                    inner
                        .cache
                        .pool(device_pool(d))
                        .map_or(0.0, |p| p.used_len() as f32 / p.capacity().max(1) as f32)
                };
                let (Some(hi), Some(lo)) = (
                    (0..n).max_by(|&a, &b| util(a).total_cmp(&util(b))),
                    (0..n).min_by(|&a, &b| util(a).total_cmp(&util(b))),
                ) else {
                    return Ok(());
                };
                if util(hi) - util(lo) <= 0.1 {
                    return Ok(());
                }
                let lo_free = inner.cache.pool(device_pool(lo))?.available();
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
