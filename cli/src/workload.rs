//! Workloads: the built-in multi-turn chat generator, Mooncake JSONL and
//! Azure CSV traces. Every request carries the chained keys of its full
//! blocks at the simulation's block size (what a prefix cache sees).

use std::path::Path;

use anyhow::{Context, Result, bail};
use pagedkv_core::{BlockHasher, ExtraKeys, SipBlockHasher};

/// One request of a workload.
#[derive(Clone, Debug)]
pub(crate) struct Request {
    /// Arrival, seconds from the start.
    pub(crate) arrival_s: f64,
    /// Prompt tokens.
    pub(crate) prompt_tokens: u32,
    /// Output tokens to decode.
    pub(crate) output_tokens: u32,
    /// Chained keys of the prompt's full blocks (equal key: equal content
    /// and equal preceding content).
    pub(crate) keys: Vec<u128>,
    /// The prompt's token ids, when the workload has them (the built-in
    /// generator); the manager then hashes them itself.
    pub(crate) tokens: Option<Vec<u32>>,
    /// The output's token ids, when known (appended while decoding).
    pub(crate) output: Option<Vec<u32>>,
    /// Tenant, for per-tenant cache salts.
    pub(crate) tenant: u32,
}

/// A named list of requests in arrival order.
#[derive(Clone, Debug)]
pub(crate) struct Workload {
    /// Where it came from.
    pub(crate) name: String,
    /// Requests, sorted by arrival (ties keep file order).
    pub(crate) requests: Vec<Request>,
    /// Tokens per block of the keys.
    pub(crate) tokens_per_block: u32,
}

impl Workload {
    /// Block references (keys over all requests).
    pub(crate) fn block_refs(&self) -> u64 {
        self.requests.iter().map(|r| r.keys.len() as u64).sum()
    }

    /// Distinct keys.
    pub(crate) fn unique_blocks(&self) -> u64 {
        let mut seen = crate::sim::KeySet::default();
        for r in &self.requests {
            seen.extend(r.keys.iter().copied());
        }
        seen.len() as u64
    }
}

fn mix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A uniform 128-bit key for sub-block `j` of a trace block `id`.
fn sub_key(id: u64, j: u64) -> u128 {
    let a = mix64(id.wrapping_mul(1 << 12) ^ j);
    let b = mix64(a ^ 0x5555_5555);
    (u128::from(b) << 64) | u128::from(a)
}

/// Reads a Mooncake JSONL trace (`timestamp` ms, `input_length`,
/// `output_length`, `hash_ids` of 512-token blocks), each 512-token id
/// split into `512 / tokens_per_block` sub-blocks. Every listed id counts
/// as a full block (the published hit ratios count them so).
pub(crate) fn mooncake(path: &Path, tokens_per_block: u32) -> Result<Workload> {
    if tokens_per_block == 0 || 512 % tokens_per_block != 0 {
        bail!("--tokens-per-block must divide 512 for a Mooncake trace (got {tokens_per_block})");
    }
    let split = u64::from(512 / tokens_per_block);
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut requests = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = |field: &str| format!("{}:{}: field `{field}`", path.display(), n + 1);
        let v: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: not JSON", path.display(), n + 1))?;
        let num = |field: &str| -> Result<u64> {
            v.get(field)
                .and_then(serde_json::Value::as_u64)
                .with_context(|| format!("{}: missing or not a non-negative integer", at(field)))
        };
        let ts = num("timestamp")?;
        let input = u32::try_from(num("input_length")?).with_context(|| at("input_length"))?;
        let output = u32::try_from(num("output_length")?).with_context(|| at("output_length"))?;
        let ids = v
            .get("hash_ids")
            .and_then(serde_json::Value::as_array)
            .with_context(|| format!("{}: missing or not an array", at("hash_ids")))?;
        let mut keys = Vec::with_capacity(ids.len() * split as usize);
        for id in ids {
            let id = id.as_u64().with_context(|| {
                format!("{}: an id is not a non-negative integer", at("hash_ids"))
            })?;
            keys.extend((0..split).map(|j| sub_key(id, j)));
        }
        requests.push(Request::from_trace(ts as f64 / 1000.0, input, output, keys));
    }
    trace_workload(path, requests, tokens_per_block)
}

impl Request {
    /// A request of a trace: lengths and block keys, no token ids.
    fn from_trace(arrival_s: f64, prompt_tokens: u32, output_tokens: u32, keys: Vec<u128>) -> Self {
        Self {
            arrival_s,
            prompt_tokens,
            output_tokens,
            keys,
            tokens: None,
            output: None,
            tenant: 0,
        }
    }
}

/// The requests of a trace file, sorted by arrival; an empty trace is an error.
fn trace_workload(
    path: &Path,
    mut requests: Vec<Request>,
    tokens_per_block: u32,
) -> Result<Workload> {
    if requests.is_empty() {
        bail!("{}: no requests", path.display());
    }
    sort_stable(&mut requests);
    Ok(Workload {
        name: file_name(path),
        requests,
        tokens_per_block,
    })
}

fn file_name(path: &Path) -> String {
    path.file_name().map_or_else(
        || path.display().to_string(),
        |f| f.to_string_lossy().into_owned(),
    )
}

fn sort_stable(requests: &mut [Request]) {
    requests.sort_by(|a, b| a.arrival_s.total_cmp(&b.arrival_s));
}

/// Parses `YYYY-MM-DD HH:MM:SS.fffffff` into seconds since a fixed epoch.
fn parse_timestamp(s: &str) -> Option<f64> {
    let (date, time) = s.trim().split_once(' ')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>().ok());
    let (y, mo, da) = (d.next()??, d.next()??, d.next()??);
    let mut t = time.split(':');
    let (h, mi) = (
        t.next()?.parse::<i64>().ok()?,
        t.next()?.parse::<i64>().ok()?,
    );
    let sec: f64 = t.next()?.parse().ok()?;
    // Days from a civil date (Howard Hinnant's algorithm).
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (mo + if mo > 2 { -3 } else { 9 }) + 2) / 5 + da - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe;
    Some(days as f64 * 86_400.0 + (h * 3600 + mi * 60) as f64 + sec)
}

/// Reads an Azure LLM inference CSV (`TIMESTAMP,ContextTokens,GeneratedTokens`).
/// Prompts are unique beyond an optional shared system prompt of
/// `system_tokens` tokens.
pub(crate) fn azure(path: &Path, tokens_per_block: u32, system_tokens: u32) -> Result<Workload> {
    if tokens_per_block == 0 {
        bail!("--tokens-per-block must be at least 1");
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut lines = text.lines().enumerate();
    let header = lines
        .next()
        .map(|(_, h)| h.trim().to_string())
        .unwrap_or_default();
    if header != "TIMESTAMP,ContextTokens,GeneratedTokens" {
        bail!(
            "{}:1: expected the header `TIMESTAMP,ContextTokens,GeneratedTokens`",
            path.display()
        );
    }
    let system_blocks = system_tokens / tokens_per_block;
    let mut requests = Vec::new();
    let mut t0 = None;
    for (n, line) in lines {
        if line.trim().is_empty() {
            continue;
        }
        let at = |field: &str| format!("{}:{}: field `{field}`", path.display(), n + 1);
        let mut f = line.split(',');
        let ts = f
            .next()
            .and_then(parse_timestamp)
            .with_context(|| format!("{}: not a timestamp", at("TIMESTAMP")))?;
        let ctx: u32 = f
            .next()
            .and_then(|x| x.trim().parse().ok())
            .with_context(|| format!("{}: not a non-negative integer", at("ContextTokens")))?;
        let gen_tokens: u32 = f
            .next()
            .and_then(|x| x.trim().parse().ok())
            .with_context(|| format!("{}: not a non-negative integer", at("GeneratedTokens")))?;
        let t0 = *t0.get_or_insert(ts);
        let full = ctx / tokens_per_block;
        let idx = requests.len() as u64;
        let keys = (0..full)
            .map(|b| {
                if b < system_blocks {
                    sub_key(u64::MAX, u64::from(b))
                } else {
                    sub_key(idx, u64::from(b))
                }
            })
            .collect();
        requests.push(Request::from_trace(ts - t0, ctx, gen_tokens, keys));
    }
    trace_workload(path, requests, tokens_per_block)
}

/// A seeded random source (SplitMix64).
pub(crate) struct Rng(u64);

impl Rng {
    /// A generator from `seed`.
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed ^ 0x2545_f491_4f6c_dd1d)
    }
    /// 64 random bits.
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix64(self.0)
    }
    /// Uniform in `[0, 1)`.
    pub(crate) fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Exponential with mean `mean`.
    pub(crate) fn exp(&mut self, mean: f64) -> f64 {
        -mean * (1.0 - self.unit()).ln()
    }
    /// Log-normal-ish length around `median`, clamped to `[lo, hi]`.
    pub(crate) fn length(&mut self, median: f64, spread: f64, lo: u32, hi: u32) -> u32 {
        // Sum of uniforms approximates a normal in the log domain.
        let z = (0..4).map(|_| self.unit()).sum::<f64>() - 2.0;
        let v = median * (spread * z).exp();
        (v.round() as u32).clamp(lo, hi)
    }
}

/// The built-in workload: multi-turn chat over a few shared system prompts,
/// Poisson arrivals of new conversations, think time between turns.
/// Each turn's prompt is the system prompt, the conversation so far and the
/// new user message; real token ids, hashed by the manager.
pub(crate) fn generate(
    seed: u64,
    conversations: u32,
    tokens_per_block: u32,
    tenants: u32,
) -> Result<Workload> {
    if tokens_per_block == 0 {
        bail!("--tokens-per-block must be at least 1");
    }
    let mut rng = Rng::new(seed);
    let systems: Vec<Vec<u32>> = (0..4)
        .map(|s| {
            let n = rng.length(700.0, 0.4, 200, 2000);
            (0..n)
                .map(|i| 1000 + (s * 7919 + i * 31) % 30_000)
                .collect()
        })
        .collect();
    let mut requests = Vec::new();
    let mut t = 0.0;
    for c in 0..conversations {
        t += rng.exp(0.125); // 8 new conversations per second
        let system = &systems[(rng.next_u64() % systems.len() as u64) as usize];
        let tenant = (rng.next_u64() % u64::from(tenants.max(1))) as u32;
        let turns = 1 + (rng.exp(2.5) as u32).min(11);
        let mut context: Vec<u32> = system.clone();
        let mut at = t;
        for turn in 0..turns {
            let user = rng.length(120.0, 0.6, 8, 1500);
            let answer = rng.length(180.0, 0.6, 8, 1000);
            let base = (c as u64) << 20 | (turn as u64) << 12;
            context
                .extend((0..user).map(|i| 30_000 + (mix64(base ^ u64::from(i)) % 20_000) as u32));
            let output: Vec<u32> = (0..answer)
                .map(|i| 50_000 + (mix64(base ^ 0x800 ^ u64::from(i)) % 20_000) as u32)
                .collect();
            requests.push(Request {
                arrival_s: at,
                prompt_tokens: context.len() as u32,
                output_tokens: answer,
                keys: Vec::new(),
                tokens: Some(context.clone()),
                output: Some(output.clone()),
                tenant,
            });
            context.extend(output);
            at += rng.exp(20.0);
        }
    }
    sort_stable(&mut requests);
    // Keys for the offline references (any chained hash identifies blocks).
    let h = SipBlockHasher::new(*b"pagedkv-genkeys!");
    let bs = tokens_per_block as usize;
    for r in &mut requests {
        let toks = r.tokens.as_deref().unwrap_or(&[]);
        let mut tip = h.root(Some(pagedkv_core::CacheSalt(u128::from(r.tenant))));
        r.keys = toks
            .chunks_exact(bs)
            .enumerate()
            .map(|(i, b)| {
                tip = h.hash_block(tip, b, (i * bs) as u32, &ExtraKeys::default());
                tip.0
            })
            .collect();
    }
    Ok(Workload {
        name: format!("built-in chat (seed {seed}, {conversations} conversations)"),
        requests,
        tokens_per_block,
    })
}
