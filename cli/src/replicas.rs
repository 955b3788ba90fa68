//! Replicas behind a router: `simulate --replicas N [--remote redis://...]`.
//! N managers (each with the per-replica capacity) replay a trace in
//! arrival order, each request sent to one replica by a router:
//!
//! - `rr`: round robin;
//! - `kv`: KV-aware, on the replicas' cache events (what a router reads
//!   from vLLM-format events): the replica holding the longest prefix of
//!   the request, among those not past 1.25x their share of requests (a
//!   router that sends everything to the replica with the system prompt
//!   melts it), ties to the least loaded.
//!
//! With `--remote`, the replicas share a remote tier on Redis: a request's
//! blocks past its local hits are looked up there (one round trip per 128
//! blocks), and the blocks it computed are written there (`SET NX`). A
//! remote hit is a block served from Redis instead of recomputed. Every
//! value read is checked against the bytes its key was written with.
//!
//! The comparison, in one run: one pooled cache of N times the capacity;
//! N private caches; N caches sharing the remote tier.

use std::collections::HashSet;

use anyhow::{Result, bail};
use pagedkv_hal_host::MetadataBackend;
use pagedkv_manager::{KvCacheManager, KvManager, ManagerEvent, RequestId};
use serde::Serialize;

use crate::sim::{self, SimConfig, block_on};
use crate::workload::Workload;

/// How requests are assigned to replicas.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize)]
pub enum Router {
    /// In turn.
    RoundRobin,
    /// By prefix overlap on the cache events, under a load bound.
    KvAware,
}

impl Router {
    /// `rr` or `kv`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "rr" | "round-robin" => Ok(Router::RoundRobin),
            "kv" | "kv-aware" => Ok(Router::KvAware),
            _ => bail!("--router {s}: expected rr (round robin) or kv (KV-aware)"),
        }
    }
}

/// One configuration's outcome.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ReplicaRun {
    /// `pooled`, `private` or `shared`.
    pub name: String,
    /// Replicas.
    pub replicas: u32,
    /// Device blocks of each.
    pub device_blocks_each: u32,
    /// Prompt blocks of every request.
    pub query_blocks: u64,
    /// Hit on the device of the replica that served it.
    pub device_hit_blocks: u64,
    /// Brought back from that replica's host tier.
    pub host_hit_blocks: u64,
    /// Served from the shared remote tier.
    pub remote_hit_blocks: u64,
    /// All hits / `query_blocks`.
    pub block_hit_ratio: f64,
    /// Requests each replica served.
    pub requests_per_replica: Vec<u64>,
    /// Requests a real server rejects (larger than a device).
    pub rejected: u64,
    /// Remote values whose bytes were not the ones written (must be 0).
    pub wrong_kv: u64,
    /// The remote tier's counters, summed over replicas.
    #[cfg(feature = "redis")]
    pub remote: Option<pagedkv_manager::remote::RemoteStats>,
}

/// The bytes the simulation stores for the block with `key` (a stand-in
/// for its KV: checked on every read).
#[cfg(feature = "redis")]
fn payload(key: u128) -> Vec<u8> {
    key.to_le_bytes().repeat(4)
}

#[cfg(feature = "redis")]
type Tier = pagedkv_manager::remote::RemoteTier;
#[cfg(not(feature = "redis"))]
type Tier = std::convert::Infallible;

#[cfg(feature = "redis")]
fn open_tiers(url: &str, n: u32, w: &Workload) -> Result<Vec<Tier>> {
    use pagedkv_manager::remote::{Codec, KeyScheme, Namespace, RemoteConfig, RemoteTier};
    // A namespace of this run alone: blocks left by an earlier run are not
    // this run's hits.
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let ns = Namespace {
        model: format!("simulate-{}-{nonce:x}", std::process::id()),
        layout: 0,
        dtype: "none".into(),
        block_size: w.tokens_per_block,
        tp_rank: 0,
    };
    (0..n)
        .map(|_| {
            RemoteTier::redis(
                url,
                ns.clone(),
                KeyScheme::Keyed(*b"pagedkv-simulate-cluster-secret!"),
                Codec::None,
                RemoteConfig::default(),
            )
            .map_err(|e| anyhow::anyhow!("--remote {url}: {e}"))
        })
        .collect()
}

#[cfg(not(feature = "redis"))]
fn open_tiers(_: &str, _: u32, _: &Workload) -> Result<Vec<Tier>> {
    bail!("--remote: this pagedkv was built without the `redis` feature")
}

/// Looks up the blocks of `keys` on the remote tier (128 per round trip,
/// until the chain stops); returns how many were found, checking each.
#[cfg(feature = "redis")]
fn remote_hits(t: &Tier, keys: &[u128], wrong: &mut u64) -> Result<u64> {
    use pagedkv_manager::core::BlockHash;
    use pagedkv_manager::remote::{LookupEnd, MAX_LOOKUP_KEYS};
    let mut at = 0;
    while at < keys.len() {
        let chunk: Vec<BlockHash> = keys[at..(at + MAX_LOOKUP_KEYS).min(keys.len())]
            .iter()
            .map(|&k| BlockHash(k))
            .collect();
        let f = t.lookup(&chunk).wait_blocking();
        for (k, v) in &f.blocks {
            if *v != payload(k.0) {
                *wrong += 1;
            }
        }
        at += f.blocks.len();
        if f.end != LookupEnd::Complete {
            break;
        }
    }
    Ok(at as u64)
}

#[cfg(not(feature = "redis"))]
fn remote_hits(t: &Tier, _: &[u128], _: &mut u64) -> Result<u64> {
    match *t {}
}

#[cfg(feature = "redis")]
fn remote_store(t: &Tier, keys: &[u128]) {
    for &k in keys {
        t.store(pagedkv_manager::core::BlockHash(k), &payload(k));
    }
    // Sequential replay: the next request sees these writes.
    t.flush_blocking(std::time::Duration::from_secs(10));
}

#[cfg(not(feature = "redis"))]
fn remote_store(t: &Tier, _: &[u128]) {
    match *t {}
}

fn pick(
    router: Router,
    mirrors: &[HashSet<u128>],
    served: &[u64],
    keys: &[u128],
    i: usize,
) -> usize {
    let n = mirrors.len();
    match router {
        Router::RoundRobin => i % n,
        Router::KvAware => {
            let total: u64 = served.iter().sum();
            let bound = (total as f64 / n as f64) * 1.25 + 4.0;
            (0..n)
                .filter(|&r| served[r] as f64 <= bound)
                .max_by_key(|&r| {
                    let overlap = keys.iter().take_while(|k| mirrors[r].contains(k)).count();
                    (overlap, std::cmp::Reverse(served[r]))
                })
                .unwrap_or(i % n)
        }
    }
}

fn apply(mirror: &mut HashSet<u128>, events: &mut Vec<ManagerEvent>) {
    for e in events.drain(..) {
        match e {
            ManagerEvent::Stored { keys, .. } => mirror.extend(keys.iter().map(|k| k.0)),
            ManagerEvent::Removed { keys, .. } => {
                for k in keys {
                    mirror.remove(&k.0);
                }
            }
            ManagerEvent::Cleared { .. } | ManagerEvent::Lost { .. } => mirror.clear(),
            ManagerEvent::Preempted(_) => {}
        }
    }
}

/// Where each replica publishes its cache events (vLLM's format over
/// ZeroMQ), if anywhere.
#[cfg(feature = "kv-events")]
pub type Publisher = pagedkv_manager::kv_events::KvEventPublisher;
/// Where each replica publishes its cache events (none without the
/// `kv-events` feature).
#[cfg(not(feature = "kv-events"))]
pub type Publisher = std::convert::Infallible;

/// Binds one publisher per replica: replica `i` on `endpoint`'s port plus
/// `i` (vLLM's convention for data-parallel ranks), its replay socket on
/// the port after the last replica's.
#[cfg(feature = "kv-events")]
pub fn publishers(endpoint: &str, n: u32) -> Result<Vec<Publisher>> {
    use pagedkv_manager::kv_events::{KvEventPublisher, PublisherConfig};
    let (base, port) = endpoint
        .rsplit_once(':')
        .and_then(|(b, p)| Some((b, p.parse::<u16>().ok()?)))
        .filter(|&(b, p)| b.starts_with("tcp://") && p > 0)
        .ok_or_else(|| {
            anyhow::anyhow!("--events {endpoint}: expected tcp://host:port (port above 0)")
        })?;
    (0..n)
        .map(|i| {
            let at = |k: u32| -> Result<String> {
                let p = u32::from(port) + k;
                u16::try_from(p)
                    .map(|p| format!("{base}:{p}"))
                    .map_err(|_| anyhow::anyhow!("--events {endpoint}: ports past 65535"))
            };
            KvEventPublisher::bind(PublisherConfig {
                endpoint: at(i)?,
                replay_endpoint: Some(at(n + i)?),
                topic: String::new(),
                buffer_steps: 10_000,
                data_parallel_rank: Some(i),
                format: Default::default(),
            })
            .map_err(|e| anyhow::anyhow!("--events: {e}"))
        })
        .collect()
}

#[cfg(not(feature = "kv-events"))]
/// Without the `kv-events` feature, `--events` is refused.
pub fn publishers(_: &str, _: u32) -> Result<Vec<Publisher>> {
    bail!("--events: this pagedkv was built without the `kv-events` feature")
}

#[cfg(feature = "kv-events")]
fn publish(p: &[Publisher], at: usize, events: &[ManagerEvent]) {
    if let Some(p) = p.get(at) {
        p.publish(events);
    }
}

#[cfg(not(feature = "kv-events"))]
fn publish(p: &[Publisher], at: usize, _: &[ManagerEvent]) {
    if let Some(&never) = p.get(at) {
        match never {}
    }
}

/// Replays `w` over `n` replicas of `cfg`'s capacity each, assigned by
/// `router`, sharing the remote tier at `remote` if given, each publishing
/// its events on `events` (see [`publishers`]).
#[allow(
    clippy::too_many_arguments,
    reason = "one call site, each argument a knob of the run"
)]
pub fn run(
    w: &Workload,
    cfg: &SimConfig,
    n: u32,
    router: Router,
    remote: Option<&str>,
    events_to: &[Publisher],
    name: &str,
    progress: &mut dyn FnMut(u64),
) -> Result<ReplicaRun> {
    if n == 0 {
        bail!("--replicas must be at least 1");
    }
    let bs = w.tokens_per_block;
    let mut mcfg = sim::manager_config(w, cfg);
    mcfg.record_events = true;
    let managers = (0..n)
        .map(|_| {
            KvManager::with_policy(
                MetadataBackend::new(),
                mcfg.clone(),
                sim::preempt_policy("lru")?,
            )
            .map_err(anyhow::Error::from)
        })
        .collect::<Result<Vec<_>>>()?;
    let tiers = match remote {
        Some(url) => open_tiers(url, n, w)?,
        None => Vec::new(),
    };
    let mut mirrors = vec![HashSet::new(); n as usize];
    let mut res = ReplicaRun {
        name: name.into(),
        replicas: n,
        device_blocks_each: cfg.capacity_blocks,
        requests_per_replica: vec![0; n as usize],
        ..ReplicaRun::default()
    };
    let mut events = Vec::new();
    for (i, r) in w.requests.iter().enumerate() {
        progress(1);
        res.query_blocks += r.keys.len() as u64;
        if !cfg.fits(r, bs) {
            res.rejected += 1;
            continue;
        }
        let at = pick(router, &mirrors, &res.requests_per_replica, &r.keys, i);
        res.requests_per_replica[at] += 1;
        let m = &managers[at];
        let req = sim::request_with(r, i as u64, cfg, bs, true);
        let a = match block_on(m.allocate_request(&req)) {
            Ok(a) => a,
            Err(e) if sim::rejected(&e, true) => {
                res.rejected += 1;
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let local = u64::from(a.device_hit_blocks) + u64::from(a.host_hit_blocks);
        res.device_hit_blocks += u64::from(a.device_hit_blocks);
        res.host_hit_blocks += u64::from(a.host_hit_blocks);
        if let Some(t) = tiers.get(at) {
            let rest = &r.keys[(local as usize).min(r.keys.len())..];
            let found = remote_hits(t, rest, &mut res.wrong_kv)?;
            res.remote_hit_blocks += found;
            remote_store(t, &rest[found as usize..]);
        }
        block_on(m.deallocate(RequestId(i as u64)))?;
        m.drain_events(&mut events);
        publish(events_to, at, &events);
        apply(&mut mirrors[at], &mut events);
    }
    let hits = res.device_hit_blocks + res.host_hit_blocks + res.remote_hit_blocks;
    res.block_hit_ratio = hits as f64 / res.query_blocks.max(1) as f64;
    #[cfg(feature = "redis")]
    if !tiers.is_empty() {
        let mut sum = pagedkv_manager::remote::RemoteStats::default();
        for t in &tiers {
            sum += t.stats();
        }
        res.remote = Some(sum);
    }
    Ok(res)
}
