//! Replays a workload through the real `pagedkv-manager`, and computes the
//! offline references (the ideal hit ratio of an infinite cache, and
//! Belady's optimum for a cache of the same size).
//!
//! # Timed mode: the cost model
//!
//! A simulated engine runs steps on a virtual clock. Each step it admits
//! waiting requests (first come, first served) while the device keeps a
//! 1% watermark free, up to `max_running` sequences and
//! `prefill_tokens_per_step` uncached prompt tokens; then every running
//! sequence decodes one token (`extend`). A step lasts
//! `uncached_prefill_tokens / prefill_tps + decode_step_s +
//! decode_s_per_seq × running`. When a decode step needs a block and the
//! device is full, the manager preempts sequences chosen by the sequence
//! eviction policy to the host tier; a preempted sequence resumes (swapped
//! back in) once its blocks fit again. A sequence that cannot be kept at all
//! is dropped and recomputed later (counted). Queueing delay is admission
//! time minus arrival time.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use anyhow::{Result, bail};
use pagedkv_core::KvLayout;
use pagedkv_manager::{
    AdvancedKvCacheManager, AllocationRequest, CacheEvictionPolicy, CostAwareEvictionPolicy,
    Device, KvCacheManager, KvManager, LfuEvictionPolicy, LruEvictionPolicy, ManagedBackend,
    ManagerConfig, ManagerError, MultiDeviceCacheManager, PrefixCacheConfig, Priority,
    PriorityEvictionPolicy, RequestId,
};
use serde::Serialize;

use crate::workload::{Request, Workload};

/// Runs a future of the manager to completion. The manager's futures never
/// wait on anything external (they yield only to let other tasks run), so
/// polling in a loop is a complete executor for a single-threaded replay.
pub(crate) fn block_on<F: Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
    }
}

/// Timed-mode engine parameters (see the module docs).
#[derive(Clone, Copy, Debug, Serialize)]
pub(crate) struct CostModel {
    /// Uncached prompt tokens computed per second.
    pub(crate) prefill_tps: f64,
    /// Fixed time of a decode step.
    pub(crate) decode_step_s: f64,
    /// Added time per running sequence in a decode step.
    pub(crate) decode_s_per_seq: f64,
    /// Most sequences running at once.
    pub(crate) max_running: usize,
    /// Most uncached prompt tokens admitted per step.
    pub(crate) prefill_tokens_per_step: u64,
}

impl Default for CostModel {
    fn default() -> Self {
        Self {
            prefill_tps: 8_000.0,
            decode_step_s: 0.030,
            decode_s_per_seq: 0.000_1,
            max_running: 128,
            prefill_tokens_per_step: 8_192,
        }
    }
}

/// What a replay needs beyond the workload.
#[derive(Clone, Debug)]
pub(crate) struct SimConfig {
    /// Device blocks.
    pub(crate) capacity_blocks: u32,
    /// Host tier blocks.
    pub(crate) host_blocks: u32,
    /// Model KV layout (its `tokens_per_block` is the block size).
    pub(crate) layout: KvLayout,
    /// Timed (arrivals, decode, pressure) or sequential.
    pub(crate) timed: bool,
    /// Tenants with their own cache salts (1: all share).
    pub(crate) tenants: u32,
    /// Offload cached blocks evicted from the device to the host tier.
    pub(crate) offload: bool,
    /// Engine cost model (timed mode).
    pub(crate) cost: CostModel,
}

/// One point of the time series.
#[derive(Clone, Copy, Debug, Serialize)]
pub(crate) struct Sample {
    /// Seconds (timed) or request index (sequential).
    pub(crate) x: f64,
    /// Device blocks held / device blocks.
    pub(crate) utilization: f64,
    /// Cumulative block hit ratio.
    pub(crate) hit_ratio: f64,
}

/// The outcome of one replay.
#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct RunResult {
    /// Block eviction policy of the prefix cache.
    pub(crate) policy: String,
    /// Sequence eviction (preemption) policy.
    pub(crate) preempt: String,
    /// Prompt blocks looked up.
    pub(crate) query_blocks: u64,
    /// Prompt blocks served from the device.
    pub(crate) device_hit_blocks: u64,
    /// Prompt blocks brought back from the host tier.
    pub(crate) host_hit_blocks: u64,
    /// Hit blocks / looked-up blocks.
    pub(crate) block_hit_ratio: f64,
    /// Prompt tokens served from a cache / prompt tokens.
    pub(crate) token_hit_ratio: f64,
    /// `block_hit_ratio` / Belady's.
    pub(crate) fraction_of_optimum: f64,
    /// Cached blocks evicted.
    pub(crate) evictions: u64,
    /// Sequences swapped to the host tier.
    pub(crate) swap_outs: u64,
    /// Sequences swapped back.
    pub(crate) swap_ins: u64,
    /// Preemptions that dropped a sequence for recomputation.
    pub(crate) recomputes: u64,
    /// Requests the cache could not take (larger than the device).
    pub(crate) rejected: u64,
    /// Highest device utilization seen.
    pub(crate) peak_utilization: f64,
    /// Mean device utilization over samples.
    pub(crate) mean_utilization: f64,
    /// Queueing delay, median (timed mode), seconds.
    pub(crate) queueing_delay_p50_s: f64,
    /// Queueing delay, 99th percentile (timed mode), seconds.
    pub(crate) queueing_delay_p99_s: f64,
    /// Simulated time (timed mode), seconds.
    pub(crate) simulated_s: f64,
    /// Requests still allocated after the replay (must be 0).
    pub(crate) leaked_sequences: u64,
    /// Device blocks still held after the replay (must be 0).
    pub(crate) blocks_in_use_at_end: u64,
    /// Device blocks.
    pub(crate) blocks_total: u64,
    /// Device blocks free or cached after the replay (= total when nothing leaked).
    pub(crate) blocks_free_at_end: u64,
    /// Time series (at most 2,000 points).
    pub(crate) samples: Vec<Sample>,
}

/// Hit ratios of an offline reference.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub(crate) struct Reference {
    /// Hit blocks / looked-up blocks.
    pub(crate) block_hit_ratio: f64,
    /// Hit tokens / prompt tokens.
    pub(crate) token_hit_ratio: f64,
}

/// Hashing for maps keyed by block keys, which are uniform 128-bit hashes
/// already: their low 64 bits are the hash.
#[derive(Default, Clone, Copy)]
pub(crate) struct KeyHasher(u64);

impl std::hash::Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes.iter().take(8) {
            self.0 = (self.0 << 8) | u64::from(b);
        }
    }
    fn write_u128(&mut self, v: u128) {
        self.0 = v as u64;
    }
}

type KeyBuild = std::hash::BuildHasherDefault<KeyHasher>;
pub(crate) type KeyMap<V> = HashMap<u128, V, KeyBuild>;
pub(crate) type KeySet = HashSet<u128, KeyBuild>;

fn hit_tokens(r: &Request, hit_blocks: u64, bs: u32) -> u64 {
    (hit_blocks * u64::from(bs)).min(u64::from(r.prompt_tokens.max(r.keys.len() as u32 * bs)))
}

fn prompt_tokens_of(r: &Request, bs: u32) -> u64 {
    u64::from(r.prompt_tokens.max(r.keys.len() as u32 * bs))
}

/// The infinite cache: every block ever seen stays; stop at the first miss.
pub(crate) fn ideal(w: &Workload) -> Reference {
    let mut seen = KeySet::default();
    let (mut hits, mut refs, mut ht, mut qt) = (0u64, 0u64, 0u64, 0u64);
    for r in &w.requests {
        let h = r.keys.iter().take_while(|k| seen.contains(k)).count() as u64;
        hits += h;
        refs += r.keys.len() as u64;
        ht += hit_tokens(r, h, w.tokens_per_block);
        qt += prompt_tokens_of(r, w.tokens_per_block);
        seen.extend(r.keys.iter().copied());
    }
    ratio(hits, refs, ht, qt)
}

fn ratio(hits: u64, refs: u64, ht: u64, qt: u64) -> Reference {
    Reference {
        block_hit_ratio: if refs == 0 {
            0.0
        } else {
            hits as f64 / refs as f64
        },
        token_hit_ratio: if qt == 0 { 0.0 } else { ht as f64 / qt as f64 },
    }
}

/// Belady's offline optimum for `capacity` blocks, requests one at a time,
/// the in-flight request's blocks pinned: on a miss, evict the cached block
/// whose next use is farthest in the future.
pub(crate) fn belady(w: &Workload, capacity: u32) -> Reference {
    let n = w.requests.len();
    const NEVER: usize = usize::MAX;
    // next[i][k]: the next request after i that uses key k of request i.
    let mut next: Vec<Vec<usize>> = vec![Vec::new(); n];
    let mut last: KeyMap<usize> = KeyMap::default();
    for i in (0..n).rev() {
        next[i] = w.requests[i]
            .keys
            .iter()
            .map(|k| last.get(k).copied().unwrap_or(NEVER))
            .collect();
        for &k in &w.requests[i].keys {
            last.insert(k, i);
        }
    }
    let cap = capacity as usize;
    // key -> (next use, depth in its chain). Ties in next use evict the
    // deeper block first: a cached child of an evicted parent is useless
    // when lookups stop at the first miss.
    let mut cached: KeyMap<(usize, usize)> = KeyMap::default();
    let mut order: BTreeSet<(usize, usize, u128)> = BTreeSet::new(); // unpinned
    let (mut hits, mut refs, mut ht, mut qt) = (0u64, 0u64, 0u64, 0u64);
    for (i, r) in w.requests.iter().enumerate() {
        let h = r.keys.iter().take_while(|k| cached.contains_key(k)).count() as u64;
        hits += h;
        refs += r.keys.len() as u64;
        ht += hit_tokens(r, h, w.tokens_per_block);
        qt += prompt_tokens_of(r, w.tokens_per_block);
        // Pin the request's blocks (as many as fit).
        let keep = r.keys.len().min(cap);
        for k in &r.keys[..keep] {
            if let Some(&(nu, d)) = cached.get(k) {
                order.remove(&(nu, d, *k));
            }
        }
        for k in &r.keys[..keep] {
            if cached.contains_key(k) {
                continue;
            }
            if cached.len() >= cap {
                let Some(&victim) = order.iter().next_back() else {
                    break;
                };
                order.remove(&victim);
                cached.remove(&victim.2);
            }
            cached.insert(*k, (NEVER, 0));
        }
        // Unpin with their next uses.
        for (d, (k, &nu)) in r.keys[..keep].iter().zip(&next[i]).enumerate() {
            if let Some(v) = cached.get_mut(k) {
                *v = (nu, d);
                order.insert((nu, d, *k));
            }
        }
    }
    ratio(hits, refs, ht, qt)
}

/// A sequence eviction policy by name.
pub(crate) fn preempt_policy(name: &str) -> Result<Arc<dyn CacheEvictionPolicy>> {
    Ok(match name {
        "lru" => Arc::new(LruEvictionPolicy::new()),
        "lfu" => Arc::new(LfuEvictionPolicy::new()),
        "priority" => Arc::new(PriorityEvictionPolicy::new()),
        "cost" | "cost-aware" => Arc::new(CostAwareEvictionPolicy::new()),
        other => bail!("unknown sequence eviction policy `{other}` (lru, lfu, priority, cost)"),
    })
}

/// The manager's configuration for a replay.
pub(crate) fn manager_config(w: &Workload, cfg: &SimConfig) -> ManagerConfig {
    let longest = w
        .requests
        .iter()
        .map(|r| prompt_tokens_of(r, w.tokens_per_block) as usize + r.output_tokens as usize)
        .max()
        .unwrap_or(1);
    let mut c = ManagerConfig::new(cfg.layout, cfg.capacity_blocks as usize);
    c.host_blocks = cfg.host_blocks as usize;
    c.prefix_cache_config = Some(PrefixCacheConfig::default());
    c.offload_evicted_prefixes = cfg.offload && cfg.host_blocks > 0;
    c.max_sequence_length = longest + 16;
    c.max_sequences = cfg.cost.max_running + 64;
    c.hash_key = Some(*b"pagedkv-simulate");
    c.target_devices = vec![Device::Gpu(0)];
    c
}

fn request_for(r: &Request, id: u64, cfg: &SimConfig, bs: u32) -> AllocationRequest {
    let l = &cfg.layout;
    let prompt_len = prompt_tokens_of(r, bs) as usize;
    let mut a = AllocationRequest::for_prompt(
        RequestId(id),
        Vec::new(),
        prompt_len + r.output_tokens as usize + 16,
        l,
    );
    a.initial_tokens = prompt_len;
    match &r.tokens {
        Some(t) => a.prompt = t.clone(),
        None => a.block_keys = r.keys.clone(),
    }
    if cfg.tenants > 1 {
        a.cache_salt = Some(u128::from(r.tenant % cfg.tenants) + 1);
    }
    a.priority = match id % 4 {
        0 => Priority::Low,
        3 => Priority::High,
        _ => Priority::Normal,
    };
    a
}

fn utilization<B: ManagedBackend>(m: &KvManager<B>) -> f64
where
    B::Region: Send + Sync,
    B::Fence: Send,
{
    let s = m.stats();
    if s.total_blocks == 0 {
        0.0
    } else {
        (s.total_blocks - s.free_blocks) as f64 / s.total_blocks as f64
    }
}

fn held_fraction<B: ManagedBackend>(m: &KvManager<B>) -> (u64, u64)
where
    B::Region: Send + Sync,
    B::Fence: Send,
{
    let used = u64::from(m.used_blocks()[0]);
    (used, m.stats().total_blocks as u64)
}

fn finish<B: ManagedBackend>(
    m: &KvManager<B>,
    mut res: RunResult,
    samples: Vec<Sample>,
    hit_tokens: u64,
    query_tokens: u64,
) -> RunResult
where
    B::Region: Send + Sync,
    B::Fence: Send,
{
    let s = m.stats();
    res.query_blocks = s.query_blocks;
    res.device_hit_blocks = s.device_hit_blocks;
    res.host_hit_blocks = s.host_hit_blocks;
    res.block_hit_ratio = if s.query_blocks == 0 {
        0.0
    } else {
        (s.device_hit_blocks + s.host_hit_blocks) as f64 / s.query_blocks as f64
    };
    res.token_hit_ratio = if query_tokens == 0 {
        0.0
    } else {
        hit_tokens as f64 / query_tokens as f64
    };
    res.evictions = s.eviction_count;
    res.swap_outs = s.swap_outs;
    res.swap_ins = s.swap_ins;
    res.leaked_sequences = m.list_handles().len() as u64 + s.active_caches as u64;
    let (used, total) = held_fraction(m);
    res.blocks_in_use_at_end = used;
    res.blocks_total = total;
    res.blocks_free_at_end = s.free_blocks as u64;
    res.peak_utilization = samples.iter().map(|p| p.utilization).fold(0.0, f64::max);
    res.mean_utilization = if samples.is_empty() {
        0.0
    } else {
        samples.iter().map(|p| p.utilization).sum::<f64>() / samples.len() as f64
    };
    res.samples = downsample(samples, 2000);
    res
}

fn downsample(s: Vec<Sample>, max: usize) -> Vec<Sample> {
    if s.len() <= max {
        return s;
    }
    let step = s.len().div_ceil(max);
    s.into_iter().step_by(step).collect()
}

fn hits_of<B: ManagedBackend>(m: &KvManager<B>) -> u64
where
    B::Region: Send + Sync,
    B::Fence: Send,
{
    let s = m.stats();
    s.device_hit_blocks + s.host_hit_blocks
}

/// Replays requests one at a time: allocate (prefix lookup, hits pinned),
/// then free. `progress` is told each request done.
pub(crate) fn sequential<B: ManagedBackend>(
    m: &KvManager<B>,
    w: &Workload,
    cfg: &SimConfig,
    progress: &mut dyn FnMut(u64),
) -> Result<RunResult>
where
    B::Region: Send + Sync,
    B::Fence: Send,
{
    let bs = w.tokens_per_block;
    let mut res = RunResult {
        policy: "lru".into(),
        preempt: "-".into(),
        ..RunResult::default()
    };
    let mut samples = Vec::with_capacity(w.requests.len());
    let (mut ht, mut qt) = (0u64, 0u64);
    for (i, r) in w.requests.iter().enumerate() {
        let before = hits_of(m);
        match block_on(m.allocate(&request_for(r, i as u64, cfg, bs))) {
            Ok(_h) => {
                let h = hits_of(m) - before;
                ht += hit_tokens(r, h, bs);
                qt += prompt_tokens_of(r, bs);
                let util = utilization(m);
                block_on(m.deallocate(RequestId(i as u64)))?;
                let s = m.stats();
                samples.push(Sample {
                    x: i as f64,
                    utilization: util,
                    hit_ratio: if s.query_blocks == 0 {
                        0.0
                    } else {
                        hits_of(m) as f64 / s.query_blocks as f64
                    },
                });
            }
            Err(ManagerError::Core(_) | ManagerError::OutOfMemory { .. }) => {
                res.rejected += 1;
                qt += prompt_tokens_of(r, bs);
            }
            Err(e) => return Err(e.into()),
        }
        progress(1);
    }
    Ok(finish(m, res, samples, ht, qt))
}

struct Running {
    id: u64,
    req: usize,
    decoded: u32,
}

/// Replays requests on a virtual clock: arrivals, prefill, decode, pressure,
/// preemption to the host tier and back (see the module docs).
pub(crate) fn timed<B: ManagedBackend>(
    m: &KvManager<B>,
    w: &Workload,
    cfg: &SimConfig,
    preempt: &str,
    progress: &mut dyn FnMut(u64),
) -> Result<RunResult>
where
    B::Region: Send + Sync,
    B::Fence: Send,
{
    let bs = w.tokens_per_block;
    let cost = cfg.cost;
    let mut res = RunResult {
        policy: "lru".into(),
        preempt: preempt.into(),
        ..RunResult::default()
    };
    let mut samples = Vec::new();
    let mut waiting: VecDeque<usize> = VecDeque::new();
    let mut running: Vec<Running> = Vec::new();
    let mut next_arrival = 0usize;
    let mut now = 0.0f64;
    let mut delays = Vec::with_capacity(w.requests.len());
    let mut next_id = 0u64;
    let (mut ht, mut qt) = (0u64, 0u64);
    let watermark = (cfg.capacity_blocks / 1000) as usize;
    let resume_headroom = (cfg.capacity_blocks / 20) as usize;
    let mut done = 0usize;
    let total = w.requests.len();
    while done < total {
        while next_arrival < total && w.requests[next_arrival].arrival_s <= now {
            waiting.push_back(next_arrival);
            next_arrival += 1;
        }
        if running.is_empty() && waiting.is_empty() {
            now = w.requests[next_arrival].arrival_s;
            continue;
        }
        // Admit.
        let mut prefill_tokens = 0u64;
        while let Some(&ri) = waiting.front() {
            let r = &w.requests[ri];
            if running.len() >= cost.max_running || prefill_tokens >= cost.prefill_tokens_per_step {
                break;
            }
            let need = prompt_tokens_of(r, bs).div_ceil(u64::from(bs)) as usize + 1;
            let free = m.stats().free_blocks;
            if free < need + watermark && !running.is_empty() {
                break;
            }
            let id = next_id;
            next_id += 1;
            let before = hits_of(m);
            match block_on(m.allocate(&request_for(r, id, cfg, bs))) {
                Ok(_h) => {
                    let h = hits_of(m) - before;
                    let cached = hit_tokens(r, h, bs);
                    ht += cached;
                    qt += prompt_tokens_of(r, bs);
                    prefill_tokens += prompt_tokens_of(r, bs) - cached;
                    delays.push(now - r.arrival_s);
                    waiting.pop_front();
                    running.push(Running {
                        id,
                        req: ri,
                        decoded: 0,
                    });
                }
                Err(
                    ManagerError::OutOfMemory { .. }
                    | ManagerError::Core(pagedkv_core::Error::OutOfBlocks { .. }),
                ) => {
                    if running.is_empty() {
                        // Cannot fit even alone: reject.
                        res.rejected += 1;
                        qt += prompt_tokens_of(r, bs);
                        waiting.pop_front();
                        done += 1;
                        progress(1);
                    }
                    break;
                }
                Err(ManagerError::Core(_)) => {
                    res.rejected += 1;
                    qt += prompt_tokens_of(r, bs);
                    waiting.pop_front();
                    done += 1;
                    progress(1);
                }
                Err(e) => return Err(e.into()),
            }
        }
        // Decode one token for every running sequence that is on the device,
        // or can come back to it.
        let mut i = 0;
        let mut active = 0usize;
        while i < running.len() {
            let id = RequestId(running[i].id);
            if m.get_cache_device(id) == Some(Device::Cpu) {
                let blocks = m
                    .get_handle(id)
                    .map_or(0, |h| h.block_table().physical_blocks.len());
                // Resume only with headroom (5% of the device), so resumed
                // and running sequences do not keep preempting each other.
                if m.stats().free_blocks < blocks + resume_headroom
                    || block_on(m.swap_in(id)).is_err()
                {
                    i += 1;
                    continue;
                }
            }
            let r = &w.requests[running[i].req];
            let tok = r
                .output
                .as_ref()
                .and_then(|o| o.get(running[i].decoded as usize).copied());
            let ext = match tok {
                Some(t) => block_on(m.extend_tokens(id, &[t])),
                None => block_on(m.extend(id, 1)),
            };
            match ext {
                Ok(()) => {
                    active += 1;
                    running[i].decoded += 1;
                    if running[i].decoded >= r.output_tokens.max(1) {
                        block_on(m.deallocate(id))?;
                        running.swap_remove(i);
                        done += 1;
                        progress(1);
                        continue;
                    }
                    i += 1;
                }
                Err(ManagerError::OutOfMemory { .. } | ManagerError::Core(_)) => {
                    // No room anywhere: drop it and recompute later.
                    let _ = block_on(m.deallocate(id));
                    res.recomputes += 1;
                    let ri = running.swap_remove(i).req;
                    waiting.push_front(ri);
                }
                Err(e) => return Err(e.into()),
            }
        }
        let step = prefill_tokens as f64 / cost.prefill_tps
            + cost.decode_step_s
            + cost.decode_s_per_seq * active as f64;
        now += step;
        let s = m.stats();
        samples.push(Sample {
            x: now,
            utilization: utilization(m),
            hit_ratio: if s.query_blocks == 0 {
                0.0
            } else {
                hits_of(m) as f64 / s.query_blocks as f64
            },
        });
    }
    delays.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        if delays.is_empty() {
            0.0
        } else {
            delays[((delays.len() - 1) as f64 * p).round() as usize]
        }
    };
    res.queueing_delay_p50_s = pct(0.5);
    res.queueing_delay_p99_s = pct(0.99);
    res.simulated_s = now;
    Ok(finish(m, res, samples, ht, qt))
}
