//! Replays a workload through the real `pagedkv-manager`, and computes the
//! offline references (the ideal hit ratio of an infinite cache, and
//! Belady's optimum for a cache of the same size).
//!
//! # What a run counts
//!
//! Every ratio of a report has one denominator: all the workload's block
//! references (its requests' keys), the same the references use. A request
//! a real server would reject (its prompt, or in timed mode its prompt and
//! output, need more blocks than the device has) is rejected before it
//! reaches the manager: its blocks count as misses, and the rejections are
//! reported on their own line.
//!
//! # Timed mode: the cost model
//!
//! A simulated engine runs steps on a virtual clock. Each step it admits
//! waiting requests (first come, first served) while the device keeps a
//! small watermark free, up to `max_running` sequences and
//! `prefill_tokens_per_step` uncached prompt tokens; then every running
//! sequence decodes one token (`extend`). A step lasts
//! `uncached_prefill_tokens / prefill_tps + decode_step_s +
//! decode_s_per_seq × running`. When a decode step needs a block and the
//! device is full, the manager preempts sequences chosen by the sequence
//! eviction policy to the host tier; a preempted sequence resumes (swapped
//! back in) once its blocks fit again. A sequence that cannot be kept at all
//! is dropped and recomputed later (counted). Queueing delay is admission
//! time minus arrival time. A run that stops making progress ends with an
//! error: it never loops.

use std::collections::{BTreeSet, VecDeque};
use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use anyhow::{Result, bail};
use pagedkv_core::{EvictionPolicy, KvLayout};
use pagedkv_manager::{
    AdvancedKvCacheManager, Allocation, AllocationRequest, CacheEvictionPolicy,
    CostAwareEvictionPolicy, Device, ExtendItem, HostAdmission, InvalidRequest, KvCacheManager,
    KvManager, LfuEvictionPolicy, LruEvictionPolicy, ManagedBackend, ManagerConfig, ManagerError,
    MultiDeviceCacheManager, PreemptionPolicy, PrefixCacheConfig, Priority, PriorityEvictionPolicy,
    RequestId,
};
use serde::Serialize;

use crate::keys::{KeyMap, KeySet};
use crate::workload::{Request, Workload};

/// Runs a future of the manager to completion. The manager's futures never
/// wait on anything external (they yield only to let other tasks run), so
/// polling in a loop is a complete executor for a single-threaded replay.
pub fn block_on<F: Future>(f: F) -> F::Output {
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
pub struct CostModel {
    /// Uncached prompt tokens computed per second.
    pub prefill_tps: f64,
    /// Fixed time of a decode step.
    pub decode_step_s: f64,
    /// Added time per running sequence in a decode step.
    pub decode_s_per_seq: f64,
    /// Most sequences running at once.
    pub max_running: usize,
    /// Most uncached prompt tokens admitted per step.
    pub prefill_tokens_per_step: u64,
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

impl CostModel {
    /// Refuses values the model cannot run with (zero, negative, not finite).
    pub fn check(&self) -> Result<()> {
        if !(self.prefill_tps.is_finite() && self.prefill_tps > 0.0) {
            bail!(
                "--prefill-tps must be a positive number (got {})",
                self.prefill_tps
            );
        }
        if !(self.decode_step_s.is_finite() && self.decode_step_s > 0.0) {
            bail!(
                "--decode-step-ms must be a positive number (got {})",
                self.decode_step_s * 1000.0
            );
        }
        if self.max_running == 0 {
            bail!("--max-running must be at least 1");
        }
        Ok(())
    }

    /// Decode tokens per second with `max_running` sequences in a batch.
    fn decode_capacity(&self) -> f64 {
        let n = self.max_running as f64;
        n / (self.decode_step_s + self.decode_s_per_seq * n)
    }
}

/// What a replay needs beyond the workload.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Device blocks.
    pub capacity_blocks: u32,
    /// Host tier blocks.
    pub host_blocks: u32,
    /// Model KV layout (its `tokens_per_block` is the block size).
    pub layout: KvLayout,
    /// Timed (arrivals, decode, pressure) or sequential.
    pub timed: bool,
    /// Tenants with their own cache salts (1: all share).
    pub tenants: u32,
    /// Offload cached blocks evicted from the device to the host tier.
    pub offload: bool,
    /// Which of those the host tier takes.
    pub host_admission: HostAdmission,
    /// The device pools' order of eviction for cached blocks.
    pub eviction: EvictionPolicy,
    /// Engine cost model (timed mode).
    pub cost: CostModel,
}

impl SimConfig {
    /// Whether a real server takes `r` at all: its prompt (and in timed
    /// mode its output) fits the device.
    pub fn fits(&self, r: &Request, tokens_per_block: u32) -> bool {
        let tokens = r.prompt_len(tokens_per_block)
            + if self.timed {
                u64::from(r.output_tokens)
            } else {
                0
            };
        tokens.div_ceil(u64::from(tokens_per_block)) <= u64::from(self.capacity_blocks)
    }
}

/// One point of the time series.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Sample {
    /// Seconds (timed) or request index (sequential).
    pub x: f64,
    /// Device blocks held / device blocks.
    pub utilization: f64,
    /// Cumulative block hit ratio.
    pub hit_ratio: f64,
}

/// The outcome of one replay.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RunResult {
    /// Block eviction policy of the prefix cache.
    pub policy: String,
    /// Sequence eviction (preemption) policy.
    pub preempt: String,
    /// Prompt blocks of every request (the denominator of every ratio).
    pub query_blocks: u64,
    /// Prompt blocks served from the device.
    pub device_hit_blocks: u64,
    /// Prompt blocks brought back from the host tier.
    pub host_hit_blocks: u64,
    /// Hit blocks / `query_blocks`.
    pub block_hit_ratio: f64,
    /// Prompt tokens served from a cache / prompt tokens.
    pub token_hit_ratio: f64,
    /// `block_hit_ratio` / Belady's.
    pub fraction_of_optimum: f64,
    /// Cached blocks evicted.
    pub evictions: u64,
    /// Sequences swapped to the host tier.
    pub swap_outs: u64,
    /// Sequences swapped back.
    pub swap_ins: u64,
    /// Cached blocks copied to the host tier as the device evicted them.
    pub offloaded_blocks: u64,
    /// Cached blocks the device evicted without a copy: the host tier's
    /// admission (`--host-admission`) refused them.
    pub not_admitted_blocks: u64,
    /// Requests the manager preempted (swapped to the host tier) to make
    /// room, as its answers reported them.
    pub preemptions: u64,
    /// Preemptions that dropped a sequence for recomputation.
    pub recomputes: u64,
    /// Requests a real server would reject (larger than the device).
    pub rejected: u64,
    /// Their prompt blocks (counted as misses).
    pub rejected_blocks: u64,
    /// Highest device utilization seen.
    pub peak_utilization: f64,
    /// Mean device utilization over samples.
    pub mean_utilization: f64,
    /// Queueing delay, median (timed mode), seconds.
    pub queueing_delay_p50_s: f64,
    /// Queueing delay, 99th percentile (timed mode), seconds.
    pub queueing_delay_p99_s: f64,
    /// Simulated time (timed mode), seconds.
    pub simulated_s: f64,
    /// Requests still allocated after the replay (must be 0).
    pub leaked_sequences: u64,
    /// Device blocks still held after the replay (must be 0).
    pub blocks_in_use_at_end: u64,
    /// Device blocks.
    pub blocks_total: u64,
    /// Device blocks free or cached after the replay (= total when nothing leaked).
    pub blocks_free_at_end: u64,
    /// Share of the gap from LRU's hits to Belady's this policy closes:
    /// (hits - LRU's) / (Belady's - LRU's), when both ran.
    pub gap_closed: Option<f64>,
    /// 95% bootstrap interval of `gap_closed` over 20 time windows.
    pub gap_closed_interval: Option<[f64; 2]>,
    /// Time series (at most 2,000 points).
    pub samples: Vec<Sample>,
    /// Prompt blocks hit, per request.
    #[serde(skip)]
    pub request_hits: Vec<u32>,
}

/// Hit ratios of an offline reference.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Reference {
    /// Hit blocks / looked-up blocks.
    pub block_hit_ratio: f64,
    /// Hit tokens / prompt tokens.
    pub token_hit_ratio: f64,
}

/// The load a timed run offers against the simulated server's compute,
/// with an ideal prefix cache (so memory cannot be what it lacks).
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct OfferedLoad {
    /// Uncached prompt tokens per second of the workload.
    pub prefill_tps: f64,
    /// Output tokens per second of the workload.
    pub decode_tps: f64,
    /// Fraction of the server's time these take (above 1: it cannot keep up).
    pub utilization: f64,
}

impl OfferedLoad {
    /// Whether queueing, not memory, will dominate the figures.
    pub fn compute_bound(&self) -> bool {
        self.utilization > 0.9
    }
}

/// The blocks a request leaves in the cache: its prompt's, and in timed mode
/// (`outputs`) the blocks its decoding fills, when their keys are known.
fn stored(r: &Request, outputs: bool) -> impl Iterator<Item = &u128> {
    r.keys
        .iter()
        .chain(r.output_keys.iter().filter(move |_| outputs))
}

/// The offered load of `w` on a server of cost model `cost`.
pub fn offered_load(w: &Workload, cost: &CostModel) -> OfferedLoad {
    let (first, last) = match (w.requests.first(), w.requests.last()) {
        (Some(a), Some(b)) => (a.arrival_s, b.arrival_s),
        _ => return OfferedLoad::default(),
    };
    let span = (last - first).max(1.0);
    let bs = w.tokens_per_block;
    let mut seen = KeySet::default();
    let (mut prefill, mut decode) = (0u64, 0u64);
    for r in &w.requests {
        let h = r.keys.iter().take_while(|k| seen.contains(k)).count() as u64;
        prefill += r.prompt_len(bs) - hit_tokens(r, h, bs);
        decode += u64::from(r.output_tokens);
        seen.extend(stored(r, true).copied());
    }
    let (p, d) = (prefill as f64 / span, decode as f64 / span);
    OfferedLoad {
        prefill_tps: p,
        decode_tps: d,
        utilization: p / cost.prefill_tps + d / cost.decode_capacity(),
    }
}

fn hit_tokens(r: &Request, hit_blocks: u64, bs: u32) -> u64 {
    (hit_blocks * u64::from(bs)).min(r.prompt_len(bs))
}

/// The infinite cache: every block ever stored stays; a prompt hits up to
/// its first miss. With `outputs` (timed mode), requests store the blocks
/// their decoding fills too.
pub fn ideal(w: &Workload, outputs: bool) -> Reference {
    let mut seen = KeySet::default();
    let (mut hits, mut refs, mut ht, mut qt) = (0u64, 0u64, 0u64, 0u64);
    for r in &w.requests {
        let h = r.keys.iter().take_while(|k| seen.contains(k)).count() as u64;
        hits += h;
        refs += r.keys.len() as u64;
        ht += hit_tokens(r, h, w.tokens_per_block);
        qt += r.prompt_len(w.tokens_per_block);
        seen.extend(stored(r, outputs).copied());
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

/// Belady's offline optimum for the device of `cfg`, requests one at a
/// time, the in-flight request's blocks pinned: on a miss, evict the cached
/// block whose next use is farthest in the future. Requests a real server
/// rejects ([`SimConfig::fits`]) are misses here too, and cache nothing.
/// In timed mode requests store their output blocks (as for [`ideal`]).
pub fn belady(w: &Workload, cfg: &SimConfig) -> (Reference, Vec<u32>) {
    let (capacity, outputs) = (cfg.capacity_blocks, cfg.timed);
    let n = w.requests.len();
    const NEVER: usize = usize::MAX;
    // next[i][k]: the next request after i that looks up stored key k of request i.
    let mut next: Vec<Vec<usize>> = vec![Vec::new(); n];
    let mut last: KeyMap<usize> = KeyMap::default();
    for i in (0..n).rev() {
        next[i] = stored(&w.requests[i], outputs)
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
    let mut per = Vec::with_capacity(n);
    for (i, r) in w.requests.iter().enumerate() {
        refs += r.keys.len() as u64;
        qt += r.prompt_len(w.tokens_per_block);
        if !cfg.fits(r, w.tokens_per_block) {
            per.push(0);
            continue;
        }
        let h = r.keys.iter().take_while(|k| cached.contains_key(k)).count() as u64;
        per.push(u32::try_from(h).unwrap_or(u32::MAX));
        hits += h;
        ht += hit_tokens(r, h, w.tokens_per_block);
        // Pin the request's blocks (as many as fit).
        let blocks: Vec<u128> = stored(r, outputs).copied().collect();
        let keep = blocks.len().min(cap);
        for k in &blocks[..keep] {
            if let Some(&(nu, d)) = cached.get(k) {
                order.remove(&(nu, d, *k));
            }
        }
        for k in &blocks[..keep] {
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
        for (d, (k, &nu)) in blocks[..keep].iter().zip(&next[i]).enumerate() {
            if let Some(v) = cached.get_mut(k) {
                *v = (nu, d);
                order.insert((nu, d, *k));
            }
        }
    }
    (ratio(hits, refs, ht, qt), per)
}

/// A sequence eviction policy by name.
pub fn preempt_policy(name: &str) -> Result<Arc<dyn CacheEvictionPolicy>> {
    Ok(match name {
        "lru" => Arc::new(LruEvictionPolicy::new()),
        "lfu" => Arc::new(LfuEvictionPolicy::new()),
        "priority" => Arc::new(PriorityEvictionPolicy::new()),
        "cost" | "cost-aware" => Arc::new(CostAwareEvictionPolicy::new()),
        other => bail!("unknown sequence eviction policy `{other}` (lru, lfu, priority, cost)"),
    })
}

/// Sequences the manager holds at once in a replay.
pub fn max_sequences(cfg: &SimConfig) -> usize {
    cfg.cost.max_running + 64
}

/// The longest sequence the manager is sized for: the longest request that
/// fits the device (longer ones are rejected before the manager).
pub fn max_sequence_tokens(w: &Workload, cfg: &SimConfig) -> u64 {
    let bs = w.tokens_per_block;
    let longest = w
        .requests
        .iter()
        .filter(|r| cfg.fits(r, bs))
        .map(|r| r.prompt_len(bs) + u64::from(r.output_tokens))
        .max()
        .unwrap_or(1);
    (longest + 16).min(u64::from(cfg.capacity_blocks) * u64::from(bs))
}

/// The manager's configuration for a replay.
pub fn manager_config(w: &Workload, cfg: &SimConfig) -> ManagerConfig {
    let mut c = ManagerConfig::new(cfg.layout, cfg.capacity_blocks as usize);
    c.host_blocks = cfg.host_blocks as usize;
    c.prefix_cache_config = Some(PrefixCacheConfig::default());
    c.offload_evicted_prefixes = cfg.offload && cfg.host_blocks > 0;
    c.host_admission = cfg.host_admission;
    c.block_eviction = cfg.eviction;
    c.max_sequence_length = max_sequence_tokens(w, cfg) as usize;
    c.max_sequences = max_sequences(cfg);
    c.hash_key = Some(*b"pagedkv-simulate");
    c.target_devices = vec![Device::Gpu(0)];
    // The replay compares the manager's preemption policies (`--preempt`):
    // the manager preempts, and reports each preemption in its answers.
    c.preemption = PreemptionPolicy::Automatic;
    c
}

fn request_for(r: &Request, id: u64, cfg: &SimConfig, bs: u32) -> AllocationRequest {
    request_with(r, id, cfg, bs, false)
}

/// The allocation of request `r` (number `id`): its token ids where known,
/// unless `by_keys` (then its chained block keys, what a router and a
/// shared tier name blocks by).
pub(crate) fn request_with(
    r: &Request,
    id: u64,
    cfg: &SimConfig,
    bs: u32,
    by_keys: bool,
) -> AllocationRequest {
    let l = &cfg.layout;
    let prompt_len = r.prompt_len(bs) as usize;
    let mut a = AllocationRequest::for_prompt(
        RequestId(id),
        Vec::new(),
        prompt_len + r.output_tokens as usize + 16,
        l,
    );
    a.max_sequence_length = a.max_sequence_length.min(max_sequence_tokens_of(cfg, bs));
    a.initial_tokens = prompt_len;
    match &r.tokens {
        Some(t) if !by_keys => a.prompt = t.clone(),
        _ => a.block_keys = r.keys.clone(),
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

fn max_sequence_tokens_of(cfg: &SimConfig, bs: u32) -> usize {
    (u64::from(cfg.capacity_blocks) * u64::from(bs)) as usize
}

/// Whether a real server would reject the request this error answers:
/// it can never fit (longer than the device or the sequence limit), or
/// there is no room for it even with nothing else running. Anything else
/// is a failure of the run.
pub(crate) fn rejected(e: &ManagerError, alone: bool) -> bool {
    use pagedkv_core::Error as Core;
    match e {
        ManagerError::Core(Core::LargerThanPool { .. } | Core::SequenceTooLong { .. }) => true,
        ManagerError::InvalidRequest(InvalidRequest::TooLong { .. }) => true,
        ManagerError::OutOfMemory { .. }
        | ManagerError::NoRoom { .. }
        | ManagerError::Core(Core::OutOfBlocks { .. }) => alone,
        _ => false,
    }
}

fn utilization<B: ManagedBackend>(m: &KvManager<B>) -> f64 {
    let s = m.stats();
    if s.total_blocks == 0 {
        0.0
    } else {
        (s.total_blocks - s.free_blocks) as f64 / s.total_blocks as f64
    }
}

/// Per-run tallies over every request (accepted or rejected).
#[derive(Default)]
struct Tally {
    /// Prompt blocks hit, per request (by index in the workload).
    hits: Vec<u32>,
    query_blocks: u64,
    hit_blocks: u64,
    device_hits: u64,
    host_hits: u64,
    preemptions: u64,
    hit_tokens: u64,
    query_tokens: u64,
}

impl Tally {
    /// A request done: its prefix hits as the allocation answered them.
    fn request(&mut self, i: usize, r: &Request, a: Option<&Allocation>, bs: u32) {
        let (device, host) = a.map_or((0, 0), |a| {
            (u64::from(a.device_hit_blocks), u64::from(a.host_hit_blocks))
        });
        let hit_blocks = device + host;
        if let Some(h) = self.hits.get_mut(i) {
            *h = u32::try_from(hit_blocks).unwrap_or(u32::MAX);
        }
        self.device_hits += device;
        self.host_hits += host;
        self.query_blocks += r.keys.len() as u64;
        self.hit_blocks += hit_blocks;
        self.hit_tokens += hit_tokens(r, hit_blocks, bs);
        self.query_tokens += r.prompt_len(bs);
    }
    fn ratio(&self) -> f64 {
        if self.query_blocks == 0 {
            0.0
        } else {
            self.hit_blocks as f64 / self.query_blocks as f64
        }
    }
}

fn finish<B: ManagedBackend>(
    m: &KvManager<B>,
    mut res: RunResult,
    samples: Vec<Sample>,
    t: &Tally,
) -> RunResult {
    let s = m.stats();
    res.query_blocks = t.query_blocks;
    res.device_hit_blocks = t.device_hits;
    res.host_hit_blocks = t.host_hits;
    res.preemptions = t.preemptions;
    res.block_hit_ratio = t.ratio();
    res.token_hit_ratio = if t.query_tokens == 0 {
        0.0
    } else {
        t.hit_tokens as f64 / t.query_tokens as f64
    };
    res.evictions = s.eviction_count;
    res.swap_outs = s.swap_outs;
    res.swap_ins = s.swap_ins;
    res.offloaded_blocks = s.offloaded_blocks;
    res.not_admitted_blocks = s.not_admitted_blocks;
    res.leaked_sequences = m.list_handles().len() as u64 + s.active_caches as u64;
    res.blocks_in_use_at_end = u64::from(m.used_blocks().first().copied().unwrap_or(0));
    res.blocks_total = s.total_blocks as u64;
    res.blocks_free_at_end = s.free_blocks as u64;
    res.peak_utilization = samples.iter().map(|p| p.utilization).fold(0.0, f64::max);
    res.mean_utilization = if samples.is_empty() {
        0.0
    } else {
        samples.iter().map(|p| p.utilization).sum::<f64>() / samples.len() as f64
    };
    res.samples = downsample(samples, 2000);
    res.request_hits = t.hits.clone();
    res
}

/// The cumulative hit ratio of an offline reference whose per-request hits
/// are `hits` (x: request index, or arrival second when `timed`).
pub fn reference_samples(w: &Workload, hits: &[u32], timed: bool) -> Vec<Sample> {
    let (mut h, mut refs) = (0u64, 0u64);
    let samples = w
        .requests
        .iter()
        .zip(hits)
        .enumerate()
        .map(|(i, (r, &n))| {
            h += u64::from(n);
            refs += r.keys.len() as u64;
            Sample {
                x: if timed { r.arrival_s } else { i as f64 },
                utilization: 0.0,
                hit_ratio: if refs == 0 {
                    0.0
                } else {
                    h as f64 / refs as f64
                },
            }
        })
        .collect();
    downsample(samples, 2000)
}

fn downsample(s: Vec<Sample>, max: usize) -> Vec<Sample> {
    if s.len() <= max {
        return s;
    }
    let step = s.len().div_ceil(max);
    s.into_iter().step_by(step).collect()
}

/// Replays requests one at a time: allocate (prefix lookup, hits pinned),
/// then free. `progress` is told each request done.
pub fn sequential<B: ManagedBackend>(
    m: &KvManager<B>,
    w: &Workload,
    cfg: &SimConfig,
    progress: &mut dyn FnMut(u64),
) -> Result<RunResult> {
    let bs = w.tokens_per_block;
    let mut res = RunResult {
        policy: "lru".into(),
        preempt: "-".into(),
        ..RunResult::default()
    };
    let mut samples = Vec::with_capacity(w.requests.len());
    let mut t = Tally {
        hits: vec![0; w.requests.len()],
        ..Tally::default()
    };
    for (i, r) in w.requests.iter().enumerate() {
        progress(1);
        let reject = |res: &mut RunResult, t: &mut Tally| {
            res.rejected += 1;
            res.rejected_blocks += r.keys.len() as u64;
            t.request(i, r, None, bs);
        };
        if !cfg.fits(r, bs) {
            reject(&mut res, &mut t);
            continue;
        }
        match block_on(m.allocate_request(&request_for(r, i as u64, cfg, bs))) {
            Ok(a) => {
                t.request(i, r, Some(&a), bs);
                t.preemptions += a.preempted.len() as u64;
                let util = utilization(m);
                block_on(m.deallocate(RequestId(i as u64)))?;
                samples.push(Sample {
                    x: i as f64,
                    utilization: util,
                    hit_ratio: t.ratio(),
                });
            }
            Err(e) if rejected(&e, true) => reject(&mut res, &mut t),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(finish(m, res, samples, &t))
}

struct Running {
    id: u64,
    req: usize,
    decoded: u32,
}

/// Steps in a row that may make no progress before a timed run gives up.
const STALL_STEPS: u32 = 10_000;

/// Replays requests on a virtual clock: arrivals, prefill, decode, pressure,
/// preemption to the host tier and back (see the module docs).
pub fn timed<B: ManagedBackend>(
    m: &KvManager<B>,
    w: &Workload,
    cfg: &SimConfig,
    preempt: &str,
    progress: &mut dyn FnMut(u64),
) -> Result<RunResult> {
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
    let mut t = Tally {
        hits: vec![0; w.requests.len()],
        ..Tally::default()
    };
    let watermark = (cfg.capacity_blocks / 1000) as usize;
    let resume_headroom = (cfg.capacity_blocks / 20) as usize;
    let mut done = 0usize;
    let mut stalled = 0u32;
    let total = w.requests.len();
    while done < total {
        while next_arrival < total && w.requests[next_arrival].arrival_s <= now {
            let r = &w.requests[next_arrival];
            if cfg.fits(r, bs) {
                waiting.push_back(next_arrival);
            } else {
                // Larger than the device: a real server refuses it.
                res.rejected += 1;
                res.rejected_blocks += r.keys.len() as u64;
                t.request(next_arrival, r, None, bs);
                done += 1;
                progress(1);
            }
            next_arrival += 1;
        }
        if running.is_empty() && waiting.is_empty() {
            if next_arrival < total {
                now = now.max(w.requests[next_arrival].arrival_s);
            }
            continue;
        }
        let mut progressed = false;
        // Admit.
        let mut prefill_tokens = 0u64;
        while let Some(&ri) = waiting.front() {
            let r = &w.requests[ri];
            if running.len() >= cost.max_running || prefill_tokens >= cost.prefill_tokens_per_step {
                break;
            }
            let need = r.prompt_len(bs).div_ceil(u64::from(bs)) as usize + 1;
            let free = m.stats().free_blocks;
            if free < need + watermark && !running.is_empty() {
                break;
            }
            let id = next_id;
            next_id += 1;
            match block_on(m.allocate_request(&request_for(r, id, cfg, bs))) {
                Ok(a) => {
                    t.request(ri, r, Some(&a), bs);
                    t.preemptions += a.preempted.len() as u64;
                    // The engine skips the prefill of the computed tokens.
                    prefill_tokens += r.prompt_len(bs) - a.computed_tokens as u64;
                    delays.push(now - r.arrival_s);
                    waiting.pop_front();
                    running.push(Running {
                        id,
                        req: ri,
                        decoded: 0,
                    });
                    progressed = true;
                }
                Err(e) if rejected(&e, running.is_empty()) => {
                    res.rejected += 1;
                    res.rejected_blocks += r.keys.len() as u64;
                    t.request(ri, r, None, bs);
                    waiting.pop_front();
                    done += 1;
                    progress(1);
                    progressed = true;
                }
                Err(e) if rejected(&e, true) => break, // no room now: wait
                Err(e) => return Err(e.into()),
            }
        }
        // Decode one token for every running sequence that is on the device,
        // or can come back to it.
        let mut i = 0;
        let mut active = 0usize;
        let any_on_device = running
            .iter()
            .any(|r| m.get_cache_device(RequestId(r.id)) != Some(Device::Cpu));
        while i < running.len() {
            let id = RequestId(running[i].id);
            if m.get_cache_device(id) == Some(Device::Cpu) {
                let blocks = m
                    .get_handle(id)
                    .map_or(0, |h| h.block_table().physical_blocks.len());
                // Resume only with headroom (5% of the device), so resumed
                // and running sequences do not keep preempting each other;
                // with nothing on the device, resume anyway.
                let room = m.stats().free_blocks >= blocks + resume_headroom || !any_on_device;
                if !room || block_on(m.swap_in(id)).is_err() {
                    i += 1;
                    continue;
                }
            }
            let r = &w.requests[running[i].req];
            let tok = r
                .output
                .as_ref()
                .and_then(|o| o.get(running[i].decoded as usize).copied());
            let tokens = tok.as_ref().map(std::slice::from_ref);
            let item = ExtendItem {
                request: id,
                tokens,
                count: 1,
                lookahead: 0,
            };
            match block_on(m.extend_request(item)) {
                Ok(x) => {
                    t.preemptions += x.preempted.len() as u64;
                    active += 1;
                    progressed = true;
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
                Err(e) if rejected(&e, true) => {
                    // No room anywhere: drop it and recompute later.
                    block_on(m.deallocate(id))?;
                    res.recomputes += 1;
                    let ri = running.swap_remove(i).req;
                    waiting.push_front(ri);
                }
                Err(e) => return Err(e.into()),
            }
        }
        stalled = if progressed { 0 } else { stalled + 1 };
        if stalled > STALL_STEPS {
            bail!(
                "the timed replay stopped making progress at {now:.1} s ({} waiting, {} running): \
                 the device is too small for this workload",
                waiting.len(),
                running.len()
            );
        }
        let step = prefill_tokens as f64 / cost.prefill_tps
            + cost.decode_step_s
            + cost.decode_s_per_seq * active as f64;
        now += step;
        samples.push(Sample {
            x: now,
            utilization: utilization(m),
            hit_ratio: t.ratio(),
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
    Ok(finish(m, res, samples, &t))
}
