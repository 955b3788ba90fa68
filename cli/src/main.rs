//! `pagedkv`: replay serving workloads through the KV-cache manager and
//! show what the cache does.
//!
//! ```text
//! pagedkv simulate                                   # the built-in chat workload
//! pagedkv simulate --trace ../shared/traces/mooncake_conversation.jsonl --sequential --capacity-fraction 0.05
//! pagedkv simulate --trace ../shared/traces/azure_conv_2023.csv --capacity-gib 4 --model llama3-8b --json
//! ```

#![allow(
    clippy::cast_possible_truncation,
    reason = "a simulator on 64-bit hosts: trace token and block counts fit in u32"
)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use pagedkv_cli::check::{Budget, Need};
use pagedkv_cli::plot;
use pagedkv_cli::policy::{block_policy, gap_closed};
use pagedkv_cli::replicas::{ReplicaRun, Router};
use pagedkv_cli::sim::{self, CostModel, OfferedLoad, Reference, RunResult, SimConfig};
use pagedkv_cli::workload::{self, Limits};
use pagedkv_core::{BlockOrder, DType, KvLayout};
use pagedkv_hal_host::{HostBackend, MetadataBackend};
use pagedkv_manager::{KvManager, ManagedBackend};
use serde::Serialize;

#[derive(Parser, Debug)]
#[command(
    name = "pagedkv",
    version,
    about = "Replay serving workloads through pagedkv's KV-cache manager"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Replay a workload (built in, or a Mooncake / Azure trace) and report
    /// hit ratios, evictions, swaps, utilization and queueing delay.
    Simulate(Simulate),
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Model {
    /// 32 layers, 8 KV heads, head size 128.
    #[value(name = "llama3-8b")]
    Llama3_8b,
    /// 80 layers, 8 KV heads, head size 128.
    #[value(name = "llama3-70b")]
    Llama3_70b,
    /// 28 layers, 4 KV heads, head size 128.
    #[value(name = "qwen2.5-7b")]
    Qwen25_7b,
}

impl Model {
    fn layout(self, tokens_per_block: u32) -> KvLayout {
        let (layers, kv_heads) = match self {
            Model::Llama3_8b => (32, 8),
            Model::Llama3_70b => (80, 8),
            Model::Qwen25_7b => (28, 4),
        };
        KvLayout {
            layers,
            kv_heads,
            head_size: 128,
            tokens_per_block,
            dtype: DType::F16,
            order: BlockOrder::BlockMajor,
        }
    }
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Format {
    /// JSON lines: timestamp, input_length, output_length, hash_ids.
    Mooncake,
    /// CSV: TIMESTAMP,ContextTokens,GeneratedTokens.
    Azure,
    /// JSON: one agentic coding session (see `--trace-dir` for many).
    Agentic,
}

#[derive(Parser, Debug)]
#[command(allow_negative_numbers = true)]
struct Simulate {
    /// A trace file (`.jsonl`: Mooncake, `.csv`: Azure). Without it, the
    /// built-in multi-turn chat workload.
    #[arg(long)]
    trace: Option<PathBuf>,
    /// The trace's format, if its extension does not tell.
    #[arg(long, value_enum)]
    format: Option<Format>,
    /// A directory of agentic coding sessions (`shared/traces/agentic`: one
    /// JSON file per session, ids local to each file), replayed together.
    #[arg(long, conflicts_with_all = ["trace", "format"])]
    trace_dir: Option<PathBuf>,
    /// New sessions per minute of `--trace-dir` (a seeded Poisson process:
    /// `--seed`); each session's requests keep their own timing.
    #[arg(long, default_value_t = 1.0)]
    sessions_per_minute: f64,
    /// One request at a time, in arrival order (the published hit-ratio
    /// studies' mode). Without it: timed replay with decode and pressure.
    #[arg(long)]
    sequential: bool,
    /// Device capacity in blocks.
    #[arg(long, conflicts_with_all = ["capacity_gib", "capacity_fraction"])]
    capacity_blocks: Option<u32>,
    /// Device capacity in GiB of KV for `--model`.
    #[arg(long, conflicts_with = "capacity_fraction")]
    capacity_gib: Option<f64>,
    /// Device capacity as a fraction of the workload's unique blocks.
    #[arg(long)]
    capacity_fraction: Option<f64>,
    /// Model whose KV shape sizes the blocks.
    #[arg(long, value_enum, default_value = "llama3-8b")]
    model: Model,
    /// Host tier blocks (default: as many as the device in timed mode, none
    /// in sequential mode).
    #[arg(long)]
    host_blocks: Option<u32>,
    /// Tokens per block (default: 512 for Mooncake and 64 for agentic
    /// sessions, their ids' block sizes, else 16). Trace ids are split into
    /// sub-blocks of N tokens.
    #[arg(long)]
    tokens_per_block: Option<u32>,
    /// Block eviction policies of the prefix cache, compared in one run:
    /// `lru` (vLLM's order), `protect` (prefix hits and blocks shared by
    /// chains kept in a protected segment), `tail-first` (a finished
    /// request's deepest new block evicted first), `protect-tail` (both),
    /// `belady` (the offline optimum).
    #[arg(long, value_delimiter = ',', default_value = "lru")]
    policy: Vec<String>,
    /// Share of the device, in percent, that `protect` keeps for prefix hits.
    #[arg(long, default_value_t = pagedkv_cli::policy::PROTECT_PERCENT)]
    protect_percent: u8,
    /// Replay only part of a trace, by time: `first-half` (where policies
    /// are tuned), `second-half` (where they are tested) or `all`.
    #[arg(long, default_value = "all")]
    split: String,
    /// Sequence eviction (preemption) policies, compared in one run (timed
    /// mode): lru, lfu, priority, cost.
    #[arg(long, value_delimiter = ',', default_value = "lru")]
    preempt: Vec<String>,
    /// Tenants with separate cache salts (requests assigned round robin).
    #[arg(long, default_value_t = 1)]
    tenants: u32,
    /// Seed of the built-in workload.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Memory the run may take, in GiB (default: 80% of what the machine
    /// has available); a run estimated to need more is refused up front.
    #[arg(long)]
    max_memory: Option<f64>,
    /// Conversations of the built-in workload.
    #[arg(long, default_value_t = 800)]
    conversations: u32,
    /// Shared system prompt of Azure requests, in tokens.
    #[arg(long, default_value_t = 0)]
    system_prompt_tokens: u32,
    /// Offload cached blocks evicted from the device to the host tier.
    #[arg(long)]
    offload: bool,
    /// Which evicted blocks `--offload` copies to the host tier: `every`
    /// one, or only those at least two prompts asked for recently
    /// (`second-touch`: one-off prompts do not flood the host tier).
    #[arg(long, default_value = "every", value_parser = ["every", "second-touch"])]
    host_admission: String,
    /// Move real KV bytes (pools must fit in memory); default: metadata only.
    #[arg(long)]
    with_bytes: bool,
    /// Where `--with-bytes` puts the KV: `host` (hal-host), `cuda` (GPU
    /// memory, host tier in pinned memory; needs a CUDA driver and GPU) or
    /// `vulkan` (a Vulkan device's memory; Mesa's lavapipe works on a CPU).
    #[arg(long, default_value = "host", value_parser = ["host", "cuda", "vulkan"])]
    backend: String,
    /// Uncached prompt tokens per second (timed cost model).
    #[arg(long, default_value_t = 8000.0)]
    prefill_tps: f64,
    /// Fixed milliseconds of a decode step (timed cost model).
    #[arg(long, default_value_t = 30.0)]
    decode_step_ms: f64,
    /// Most running sequences (timed mode).
    #[arg(long, default_value_t = 128)]
    max_running: usize,
    /// Replicas behind a router, each with the capacity given (`--sequential`
    /// replay). The report compares one pooled cache of N times the capacity,
    /// N private caches and, with `--remote`, N caches sharing a remote tier.
    #[arg(long, default_value_t = 1)]
    replicas: u32,
    /// How requests reach replicas: `kv` (KV-aware, on the cache events,
    /// under a load bound) or `rr` (round robin).
    #[arg(long, default_value = "kv")]
    router: String,
    /// A Redis server the replicas share as a remote prefix tier
    /// (`redis://host:port/`); the run writes under a namespace of its own.
    #[arg(long)]
    remote: Option<String>,
    /// Publish each replica's cache events in vLLM's format over ZeroMQ
    /// (`tcp://127.0.0.1:5557`: replica i on port + i, its replay socket on
    /// port + N + i), for a router outside to read.
    #[arg(long)]
    events: Option<String>,
    /// Print a JSON report instead of the table.
    #[arg(long)]
    json: bool,
    /// Draw utilization and hit ratio over time (.png or .svg).
    #[arg(long)]
    plot: Option<PathBuf>,
}

#[derive(Serialize)]
struct Report {
    workload: String,
    requests: usize,
    block_refs: u64,
    unique_blocks: u64,
    tokens_per_block: u32,
    mode: &'static str,
    device_blocks: u32,
    host_blocks: u32,
    block_bytes: u64,
    ideal: Reference,
    belady: Reference,
    runs: Vec<RunResult>,
    cost_model: Option<CostModel>,
    offered_load: Option<OfferedLoad>,
    wall_seconds: f64,
}

fn main() {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if e.use_stderr() => {
            // One line: clap's message without its usage block.
            let text = e.render().to_string();
            eprintln!(
                "{}",
                text.lines().next().unwrap_or("error: invalid arguments")
            );
            std::process::exit(2);
        }
        Err(e) => e.exit(),
    };
    let Command::Simulate(args) = cli.command;
    if let Err(e) = simulate(args) {
        eprintln!("error: {e:#}");
        std::process::exit(2);
    }
}

fn load(args: &Simulate, budget: &Budget) -> Result<workload::Workload> {
    let limits = Limits {
        max_keys: budget.max_keys(),
    };
    let agentic = |path: &std::path::Path| {
        pagedkv_cli::agentic::read(
            path,
            args.tokens_per_block.unwrap_or(AGENTIC_BLOCK),
            args.sessions_per_minute,
            args.seed,
            &limits,
        )
    };
    if let Some(dir) = &args.trace_dir {
        return agentic(dir);
    }
    let Some(path) = &args.trace else {
        let bs = args.tokens_per_block.unwrap_or(16);
        if args.conversations == 0 {
            bail!("--conversations must be at least 1");
        }
        let bytes = u64::from(args.conversations) * workload::BYTES_PER_CONVERSATION;
        if bytes > budget.bytes {
            bail!(
                "{} conversations take up to {:.1} GiB: more than the memory limit (--max-memory)",
                args.conversations,
                bytes as f64 / f64::from(1u32 << 30)
            );
        }
        return workload::generate(args.seed, args.conversations, bs, args.tenants);
    };
    let format = match (args.format, path.extension().and_then(|e| e.to_str())) {
        (Some(f), _) => f,
        (None, Some("jsonl" | "json")) => Format::Mooncake,
        (None, Some("csv")) => Format::Azure,
        _ => bail!(
            "cannot tell the format of {}: pass --format",
            path.display()
        ),
    };
    match format {
        Format::Mooncake => workload::mooncake(path, args.tokens_per_block.unwrap_or(512), &limits),
        Format::Agentic => agentic(path),
        Format::Azure => workload::azure(
            path,
            args.tokens_per_block.unwrap_or(16),
            args.system_prompt_tokens,
            &limits,
        ),
    }
}

fn capacity(args: &Simulate, w: &workload::Workload, layout: &KvLayout) -> Result<u32> {
    let blocks = if let Some(b) = args.capacity_blocks {
        u64::from(b)
    } else if let Some(g) = args.capacity_gib {
        if !g.is_finite() || g <= 0.0 {
            bail!("--capacity-gib must be positive");
        }
        (g * (1u64 << 30) as f64 / layout.block_bytes()? as f64).min(u64::MAX as f64) as u64
    } else {
        let f = args.capacity_fraction.unwrap_or(0.1);
        if !f.is_finite() || f <= 0.0 {
            bail!("--capacity-fraction must be positive");
        }
        if f > MAX_FRACTION {
            bail!(
                "--capacity-fraction {f}: at most {MAX_FRACTION} (a device that large holds the whole workload)"
            );
        }
        (w.unique_blocks() as f64 * f).round().min(u64::MAX as f64) as u64
    };
    if blocks == 0 {
        bail!("the device capacity is zero blocks: give a larger --capacity-*");
    }
    let max = u64::from(pagedkv_core::MAX_BLOCKS);
    if blocks > max {
        bail!("a device of {blocks} blocks: at most {max} are supported");
    }
    u32::try_from(blocks).context("device capacity above 2^32 blocks")
}

/// Tokens per block of the agentic sessions' ids (their `block_size`).
const AGENTIC_BLOCK: u32 = 64;

/// Largest `--capacity-fraction`: beyond, the device holds every block of
/// the workload many times over.
const MAX_FRACTION: f64 = 10.0;

fn progress_bar(len: u64) -> ProgressBar {
    let pb = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::hidden());
    pb.set_style(
        ProgressStyle::with_template("{spinner} {msg} [{bar:40}] {pos}/{len} requests ({eta})")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    pb
}

/// Advances `pb` by each count it is told; the bar shows only once the run
/// has taken a second since `started` (quick runs print nothing).
fn ticker(pb: &ProgressBar, started: Instant) -> impl FnMut(u64) + '_ {
    let mut shown = false;
    move |n| {
        pb.inc(n);
        if !shown && started.elapsed() > Duration::from_secs(1) {
            pb.set_draw_target(ProgressDrawTarget::stderr());
            shown = true;
        }
    }
}

/// The replay with KV bytes on a GPU.
#[cfg(feature = "cuda")]
fn run_cuda(w: &workload::Workload, cfg: &SimConfig, args: &Simulate) -> Result<Vec<RunResult>> {
    let make =
        || pagedkv_manager::CudaBackend::new().map_err(|e| anyhow::anyhow!("--backend cuda: {e}"));
    run_all(&make, w, cfg, args)
}

/// Without the `cuda` feature, `--backend cuda` is refused.
#[cfg(not(feature = "cuda"))]
fn run_cuda(_: &workload::Workload, _: &SimConfig, _: &Simulate) -> Result<Vec<RunResult>> {
    bail!("--backend cuda: this pagedkv was built without the `cuda` feature")
}

/// The replay with KV bytes in a Vulkan device's memory.
#[cfg(feature = "vulkan")]
fn run_vulkan(w: &workload::Workload, cfg: &SimConfig, args: &Simulate) -> Result<Vec<RunResult>> {
    let make = || {
        let o = pagedkv_manager::vulkan::VulkanOptions::default();
        pagedkv_manager::VulkanBackend::new(&o)
            .map_err(|e| anyhow::anyhow!("--backend vulkan: {e}"))
    };
    run_all(&make, w, cfg, args)
}

/// Without the `vulkan` feature, `--backend vulkan` is refused.
#[cfg(not(feature = "vulkan"))]
fn run_vulkan(_: &workload::Workload, _: &SimConfig, _: &Simulate) -> Result<Vec<RunResult>> {
    bail!("--backend vulkan: this pagedkv was built without the `vulkan` feature")
}

fn run_all<B: ManagedBackend>(
    make: &dyn Fn() -> Result<B>,
    w: &workload::Workload,
    cfg: &SimConfig,
    args: &Simulate,
) -> Result<Vec<RunResult>> {
    let mut runs = Vec::new();
    let started = Instant::now();
    let preempts: Vec<String> = if cfg.timed {
        args.preempt.clone()
    } else {
        vec!["-".into()]
    };
    for preempt in &preempts {
        let policy = if cfg.timed {
            sim::preempt_policy(preempt)?
        } else {
            sim::preempt_policy("lru")?
        };
        let m = KvManager::with_policy(make()?, sim::manager_config(w, cfg), policy)?;
        let pb = progress_bar(w.requests.len() as u64);
        pb.set_message(format!("replaying ({preempt})"));
        let mut tick = ticker(&pb, started);
        let r = if cfg.timed {
            sim::timed(&m, w, cfg, preempt, &mut tick)?
        } else {
            sim::sequential(&m, w, cfg, &mut tick)?
        };
        pb.finish_and_clear();
        runs.push(r);
    }
    Ok(runs)
}

fn simulate(args: Simulate) -> Result<()> {
    let started = Instant::now();
    let budget = Budget::new(args.max_memory)?;
    let cost = CostModel {
        prefill_tps: args.prefill_tps,
        decode_step_s: args.decode_step_ms / 1000.0,
        max_running: args.max_running,
        ..CostModel::default()
    };
    cost.check()?;
    if args.tenants == 0 {
        bail!("--tenants must be at least 1");
    }
    if args.tokens_per_block == Some(0) {
        bail!("--tokens-per-block must be at least 1");
    }
    let split = pagedkv_cli::policy::Split::parse(&args.split)?;
    let mut policies = Vec::new();
    for p in &args.policy {
        if !policies.iter().any(|(n, _)| n == p) {
            policies.push((p.clone(), block_policy(p, args.protect_percent)?));
        }
    }
    let mut w = load(&args, &budget)?;
    split.apply(&mut w)?;
    let bs = w.tokens_per_block;
    let layout = args.model.layout(bs);
    layout.validate()?;
    let device = capacity(&args, &w, &layout)?;
    let timed = !args.sequential;
    let host = args.host_blocks.unwrap_or(if timed { device } else { 0 });
    if u64::from(host) > u64::from(pagedkv_core::MAX_BLOCKS) {
        bail!(
            "a host tier of {host} blocks: at most {} are supported",
            pagedkv_core::MAX_BLOCKS
        );
    }
    for p in &args.preempt {
        sim::preempt_policy(p)?;
    }
    let cfg = SimConfig {
        capacity_blocks: device,
        host_blocks: host,
        layout,
        timed,
        tenants: args.tenants,
        offload: args.offload,
        host_admission: if args.host_admission == "second-touch" {
            pagedkv_manager::HostAdmission::SecondTouch
        } else {
            pagedkv_manager::HostAdmission::Every
        },
        eviction: pagedkv_core::EvictionPolicy::LRU,
        cost,
    };
    let seq_blocks = sim::max_sequence_tokens(&w, &cfg).div_ceil(u64::from(bs));
    let need = Need::replay(
        (w.block_refs(), w.unique_blocks()),
        (device, host),
        (sim::max_sequences(&cfg) as u64, seq_blocks),
        args.with_bytes.then_some(layout.block_bytes()?),
    );
    budget.check(&need)?;
    if args.replicas > 1 || args.remote.is_some() {
        return replicas(&args, &w, &cfg, started);
    }
    let ideal = sim::ideal(&w, timed);
    let (belady, belady_hits) = sim::belady(&w, &cfg);
    let mut runs = Vec::new();
    for (name, policy) in &policies {
        let Some(policy) = *policy else {
            let rejected = w.requests.iter().filter(|r| !cfg.fits(r, bs));
            runs.push(RunResult {
                rejected: rejected.clone().count() as u64,
                rejected_blocks: rejected.map(|r| r.keys.len() as u64).sum(),
                policy: "belady".into(),
                preempt: "-".into(),
                block_hit_ratio: belady.block_hit_ratio,
                token_hit_ratio: belady.token_hit_ratio,
                request_hits: belady_hits.clone(),
                samples: sim::reference_samples(&w, &belady_hits, timed),
                ..RunResult::default()
            });
            continue;
        };
        let cfg = SimConfig {
            eviction: policy,
            ..cfg.clone()
        };
        let mut these = match (args.with_bytes, args.backend.as_str()) {
            (false, "host") => run_all(&|| Ok(MetadataBackend::new()), &w, &cfg, &args)?,
            (false, _) => bail!(
                "--backend {} moves real bytes: add --with-bytes",
                args.backend
            ),
            (true, "host") => run_all(&|| Ok(HostBackend::new()), &w, &cfg, &args)?,
            (true, "cuda") => run_cuda(&w, &cfg, &args)?,
            (true, _) => run_vulkan(&w, &cfg, &args)?,
        };
        for r in &mut these {
            r.policy.clone_from(name);
        }
        runs.extend(these);
    }
    let lru_hits = runs
        .iter()
        .find(|r| r.policy == "lru")
        .map(|r| r.request_hits.clone());
    for r in &mut runs {
        r.fraction_of_optimum = if belady.block_hit_ratio > 0.0 {
            r.block_hit_ratio / belady.block_hit_ratio
        } else {
            1.0
        };
        if let Some(lru) = &lru_hits
            && let Some((p, ci)) = gap_closed(&r.request_hits, lru, &belady_hits, args.seed)
        {
            r.gap_closed = Some(p);
            r.gap_closed_interval = Some(ci);
        }
    }
    let report = Report {
        workload: w.name.clone(),
        requests: w.requests.len(),
        block_refs: w.block_refs(),
        unique_blocks: w.unique_blocks(),
        tokens_per_block: bs,
        mode: if timed { "timed" } else { "sequential" },
        device_blocks: device,
        host_blocks: host,
        block_bytes: layout.block_bytes()?,
        ideal,
        belady,
        runs,
        cost_model: timed.then_some(cfg.cost),
        offered_load: timed.then(|| sim::offered_load(&w, &cfg.cost)),
        wall_seconds: started.elapsed().as_secs_f64(),
    };
    if let Some(p) = &args.plot {
        let x = if timed {
            "simulated seconds"
        } else {
            "request"
        };
        plot::write(p, &report.runs, x)?;
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&report);
    }
    Ok(())
}

#[derive(Serialize)]
struct ReplicaReport {
    workload: String,
    requests: usize,
    block_refs: u64,
    unique_blocks: u64,
    tokens_per_block: u32,
    router: Router,
    runs: Vec<ReplicaRun>,
    /// Shared (local + remote) hits / pooled hits.
    shared_over_pooled: Option<f64>,
    /// Private hits / pooled hits.
    private_over_pooled: f64,
    wall_seconds: f64,
}

/// `--replicas` / `--remote`: pooled, private and shared caches in one run.
fn replicas(
    args: &Simulate,
    w: &workload::Workload,
    cfg: &SimConfig,
    started: Instant,
) -> Result<()> {
    if cfg.timed {
        bail!("--replicas and --remote replay requests in arrival order: add --sequential");
    }
    if args.replicas == 0 {
        bail!("--replicas must be at least 1");
    }
    if cfg.tenants > 1 {
        // The router's mirrors and the remote tier name blocks by the
        // workload's keys, not the manager's salted ones.
        bail!("--replicas and --remote replay one tenant: drop --tenants");
    }
    let router = Router::parse(&args.router)?;
    let n = args.replicas;
    let pooled_cfg = SimConfig {
        capacity_blocks: cfg.capacity_blocks.saturating_mul(n),
        host_blocks: cfg.host_blocks.saturating_mul(n),
        ..cfg.clone()
    };
    let mut plan: Vec<(&str, u32, &SimConfig, Option<&str>)> =
        vec![("pooled", 1, &pooled_cfg, None), ("private", n, cfg, None)];
    if let Some(url) = &args.remote {
        plan.push(("shared", n, cfg, Some(url.as_str())));
    }
    let publishers = match &args.events {
        Some(e) => pagedkv_cli::replicas::publishers(e, n)?,
        None => Vec::new(),
    };
    let last = plan.last().map_or("", |p| p.0);
    let mut runs = Vec::new();
    for (name, k, c, remote) in plan {
        let pb = progress_bar(w.requests.len() as u64);
        pb.set_message(format!("replaying ({name})"));
        let mut tick = ticker(&pb, started);
        // The last run (shared, else private) publishes its events.
        let to: &[_] = if name == last { &publishers } else { &[] };
        runs.push(pagedkv_cli::replicas::run(
            w, c, k, router, remote, to, name, &mut tick,
        )?);
        pb.finish_and_clear();
    }
    let pooled = runs[0].block_hit_ratio.max(1e-12);
    let report = ReplicaReport {
        workload: w.name.clone(),
        requests: w.requests.len(),
        block_refs: w.block_refs(),
        unique_blocks: w.unique_blocks(),
        tokens_per_block: w.tokens_per_block,
        router,
        shared_over_pooled: runs.get(2).map(|r| r.block_hit_ratio / pooled),
        private_over_pooled: runs[1].block_hit_ratio / pooled,
        runs,
        wall_seconds: started.elapsed().as_secs_f64(),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "workload   {} ({} requests, {} block references, {} unique blocks of {} tokens)",
        report.workload,
        report.requests,
        report.block_refs,
        report.unique_blocks,
        report.tokens_per_block
    );
    println!(
        "replicas   {n} x {} device blocks ({:.1}% of unique each), router {:?}; pooled: one cache of {} blocks",
        cfg.capacity_blocks,
        100.0 * f64::from(cfg.capacity_blocks) / report.unique_blocks.max(1) as f64,
        router,
        pooled_cfg.capacity_blocks
    );
    println!();
    println!(
        "{:<10}{:>10}{:>16}{:>12}{:>12}{:>12}{:>10}  requests per replica",
        "cache", "replicas", "block hit ratio", "device", "host", "remote", "wrong KV"
    );
    for r in &report.runs {
        let q = r.query_blocks.max(1) as f64;
        println!(
            "{:<10}{:>10}{:>16.4}{:>12.4}{:>12.4}{:>12.4}{:>10}  {:?}",
            r.name,
            r.replicas,
            r.block_hit_ratio,
            r.device_hit_blocks as f64 / q,
            r.host_hit_blocks as f64 / q,
            r.remote_hit_blocks as f64 / q,
            r.wrong_kv,
            r.requests_per_replica
        );
    }
    println!();
    println!("private / pooled  {:.3}", report.private_over_pooled);
    if let Some(s) = report.shared_over_pooled {
        println!("shared / pooled   {s:.3} (local + remote hits over one pooled cache)");
    }
    println!("\n({:.2} s wall)", report.wall_seconds);
    Ok(())
}

fn print_table(r: &Report) {
    println!(
        "workload   {} ({} requests, {} block references, {} unique blocks of {} tokens)",
        r.workload, r.requests, r.block_refs, r.unique_blocks, r.tokens_per_block
    );
    println!(
        "pools      device {} blocks ({:.1}% of unique, {:.2} GiB), host {} blocks; {} replay",
        r.device_blocks,
        100.0 * f64::from(r.device_blocks) / r.unique_blocks.max(1) as f64,
        (u64::from(r.device_blocks) * r.block_bytes) as f64 / (1u64 << 30) as f64,
        r.host_blocks,
        r.mode
    );
    println!(
        "references ideal (infinite cache) {:.4} blocks / {:.4} tokens; Belady optimum (same capacity, arrival order) {:.4} / {:.4}",
        r.ideal.block_hit_ratio,
        r.ideal.token_hit_ratio,
        r.belady.block_hit_ratio,
        r.belady.token_hit_ratio
    );
    if let (Some(load), Some(cost)) = (r.offered_load, r.cost_model) {
        println!(
            "load       prefill {:.0} uncached tokens/s (server {:.0}), decode {:.0} tokens/s: {:.0}% of the server's compute",
            load.prefill_tps,
            cost.prefill_tps,
            load.decode_tps,
            100.0 * load.utilization
        );
        if load.compute_bound() {
            println!(
                "warning    the workload offers more than the simulated server can compute: queueing delay \
                 measures compute, not memory (lower the load, or raise --prefill-tps)"
            );
        }
    }
    println!();
    let mut rows: Vec<(&str, Vec<String>)> = vec![
        ("policy / preempt", vec![]),
        ("block hit ratio", vec![]),
        ("token hit ratio", vec![]),
        ("of optimum", vec![]),
        ("LRU-Belady gap closed", vec![]),
        ("of ideal", vec![]),
        ("hit ratio device / host", vec![]),
        ("hit blocks device / host", vec![]),
        ("evictions", vec![]),
        ("preempted", vec![]),
        ("swaps out / in", vec![]),
        ("offloaded / not admitted", vec![]),
        ("recomputed", vec![]),
        ("rejected", vec![]),
        ("utilization peak / mean", vec![]),
        ("queue delay p50 / p99", vec![]),
        ("simulated time", vec![]),
    ];
    for run in &r.runs {
        let v = [
            format!("{} / {}", run.policy, run.preempt),
            format!("{:.4}", run.block_hit_ratio),
            format!("{:.4}", run.token_hit_ratio),
            format!("{:.1}%", 100.0 * run.fraction_of_optimum),
            run.gap_closed.map_or("-".into(), |g| {
                let [lo, hi] = run.gap_closed_interval.unwrap_or([g, g]);
                format!("{g:.3} ({lo:.3}-{hi:.3})")
            }),
            format!(
                "{:.1}%",
                100.0 * run.block_hit_ratio / r.ideal.block_hit_ratio.max(1e-12)
            ),
            format!(
                "{:.4} / {:.4}",
                run.device_hit_blocks as f64 / run.query_blocks.max(1) as f64,
                run.host_hit_blocks as f64 / run.query_blocks.max(1) as f64
            ),
            format!("{} / {}", run.device_hit_blocks, run.host_hit_blocks),
            run.evictions.to_string(),
            run.preemptions.to_string(),
            format!("{} / {}", run.swap_outs, run.swap_ins),
            format!("{} / {}", run.offloaded_blocks, run.not_admitted_blocks),
            run.recomputes.to_string(),
            format!("{} ({} blocks)", run.rejected, run.rejected_blocks),
            format!("{:.2} / {:.2}", run.peak_utilization, run.mean_utilization),
            format!(
                "{:.2}s / {:.2}s",
                run.queueing_delay_p50_s, run.queueing_delay_p99_s
            ),
            format!("{:.0}s", run.simulated_s),
        ];
        for (row, val) in rows.iter_mut().zip(v) {
            row.1.push(val);
        }
    }
    for (name, vals) in rows {
        let cells: Vec<String> = vals.iter().map(|v| format!("{v:>22}")).collect();
        println!("{name:<24}{}", cells.join(""));
    }
    if r.runs
        .iter()
        .any(|run| run.fraction_of_optimum > 1.0 + 1e-9)
    {
        println!(
            "\nnote: above 100% of the optimum, a run also hit the host tier or ran requests \
             concurrently (sharing blocks in flight), which the reference (device only, one \
             request at a time) does not."
        );
    }
    println!("\n({:.2} s wall)", r.wall_seconds);
}
