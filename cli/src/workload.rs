//! Workloads: the built-in multi-turn chat generator, Mooncake JSONL and
//! Azure CSV traces. Every request carries the chained keys of its full
//! blocks at the simulation's block size (what a prefix cache sees).
//!
//! Parsers check every field (types, ranges, finite times, no extra CSV
//! fields) and count the block keys a trace expands to against a budget
//! before building them, so a hostile trace is a one-line error, never an
//! abort or a machine out of memory.

use std::path::Path;

use anyhow::{Context, Result, bail};
use pagedkv_core::{BlockHasher, ExtraKeys, SipBlockHasher};

use crate::keys::KeySet;

/// One request of a workload.
#[derive(Clone, Debug)]
pub struct Request {
    /// Arrival, seconds from the start.
    pub arrival_s: f64,
    /// Prompt tokens.
    pub prompt_tokens: u32,
    /// Output tokens to decode.
    pub output_tokens: u32,
    /// Chained keys of the prompt's full blocks (equal key: equal content
    /// and equal preceding content).
    pub keys: Vec<u128>,
    /// Chained keys of the blocks decoding fills after the prompt's full
    /// blocks (the prompt's partial block, then the output), when the output
    /// is known: a cache that keys decode blocks stores them too, and a
    /// later turn's prompt hits them.
    pub output_keys: Vec<u128>,
    /// The prompt's token ids, when the workload has them (the built-in
    /// generator); the manager then hashes them itself.
    pub tokens: Option<Vec<u32>>,
    /// The output's token ids, when known (appended while decoding).
    pub output: Option<Vec<u32>>,
    /// Tenant, for per-tenant cache salts.
    pub tenant: u32,
}

impl Request {
    /// Prompt tokens as the cache sees them: at least the tokens its keys
    /// cover (a Mooncake id counts as a full block).
    pub fn prompt_len(&self, tokens_per_block: u32) -> u64 {
        u64::from(self.prompt_tokens).max(self.keys.len() as u64 * u64::from(tokens_per_block))
    }

    /// A request of a trace: lengths and block keys, no token ids.
    pub(crate) fn from_trace(
        arrival_s: f64,
        prompt_tokens: u32,
        output_tokens: u32,
        keys: Vec<u128>,
    ) -> Self {
        Self {
            arrival_s,
            prompt_tokens,
            output_tokens,
            keys,
            output_keys: Vec::new(),
            tokens: None,
            output: None,
            tenant: 0,
        }
    }
}

/// A named list of requests in arrival order.
#[derive(Clone, Debug)]
pub struct Workload {
    /// Where it came from.
    pub name: String,
    /// Requests, sorted by arrival (ties keep file order).
    pub requests: Vec<Request>,
    /// Tokens per block of the keys.
    pub tokens_per_block: u32,
}

impl Workload {
    /// Block references (keys over all requests).
    pub fn block_refs(&self) -> u64 {
        self.requests.iter().map(|r| r.keys.len() as u64).sum()
    }

    /// Distinct keys.
    pub fn unique_blocks(&self) -> u64 {
        let mut seen = KeySet::default();
        for r in &self.requests {
            seen.extend(r.keys.iter().copied());
        }
        seen.len() as u64
    }
}

/// How far a trace may expand: block keys in all (16 bytes each).
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Most block keys over all requests.
    pub max_keys: u64,
}

impl Limits {
    pub(crate) fn take(&self, total: &mut u64, n: u64, tokens_per_block: u32) -> Result<()> {
        *total = total.saturating_add(n);
        if *total > self.max_keys {
            bail!(
                "the workload expands to more than {} block keys ({:.1} GiB) at {tokens_per_block} tokens per block: \
                 use larger blocks (--tokens-per-block) or allow more memory (--max-memory)",
                self.max_keys,
                (self.max_keys * 16) as f64 / f64::from(1u32 << 30)
            );
        }
        Ok(())
    }
}

pub(crate) fn mix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A uniform 128-bit key for sub-block `j` of a trace block `id`.
pub(crate) fn sub_key(id: u64, j: u64) -> u128 {
    let a = mix64(id.wrapping_mul(1 << 12) ^ j);
    let b = mix64(a ^ 0x5555_5555);
    (u128::from(b) << 64) | u128::from(a)
}

/// Reads a trace file, refusing one larger than the key budget could hold.
pub(crate) fn read(path: &Path, limits: &Limits) -> Result<String> {
    let len = std::fs::metadata(path)
        .with_context(|| format!("reading {}", path.display()))?
        .len();
    if len > limits.max_keys.saturating_mul(16) {
        bail!(
            "{} is {len} bytes: more than the memory limit allows (--max-memory)",
            path.display()
        );
    }
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

/// Trace timestamps past this (about 31 years) are refused.
pub(crate) const MAX_SECONDS: f64 = 1e9;

/// Reads a Mooncake JSONL trace: see [`parse_mooncake`].
pub fn mooncake(path: &Path, tokens_per_block: u32, limits: &Limits) -> Result<Workload> {
    let text = read(path, limits)?;
    parse_mooncake(&text, &file_name(path), tokens_per_block, limits)
}

/// Parses a Mooncake JSONL trace (`timestamp` ms, `input_length`,
/// `output_length`, `hash_ids` of 512-token blocks), each 512-token id
/// split into `512 / tokens_per_block` sub-blocks. Every listed id counts
/// as a full block (the published hit ratios count them so). Errors name
/// the line (`name:line: field`).
pub fn parse_mooncake(
    text: &str,
    name: &str,
    tokens_per_block: u32,
    limits: &Limits,
) -> Result<Workload> {
    if tokens_per_block == 0 || 512 % tokens_per_block != 0 {
        bail!("--tokens-per-block must divide 512 for a Mooncake trace (got {tokens_per_block})");
    }
    let split = u64::from(512 / tokens_per_block);
    let mut requests = Vec::new();
    let mut total = 0u64;
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = |field: &str| format!("{name}:{}: field `{field}`", n + 1);
        let v: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("{name}:{}: not JSON", n + 1))?;
        let num = |field: &str| -> Result<u64> {
            v.get(field)
                .and_then(serde_json::Value::as_u64)
                .with_context(|| format!("{}: missing or not a non-negative integer", at(field)))
        };
        let ts = num("timestamp")? as f64 / 1000.0;
        if ts > MAX_SECONDS {
            bail!("{}: more than {MAX_SECONDS} seconds", at("timestamp"));
        }
        let input = u32::try_from(num("input_length")?)
            .with_context(|| format!("{}: above {}", at("input_length"), u32::MAX))?;
        let output = u32::try_from(num("output_length")?)
            .with_context(|| format!("{}: above {}", at("output_length"), u32::MAX))?;
        let ids = v
            .get("hash_ids")
            .and_then(serde_json::Value::as_array)
            .with_context(|| format!("{}: missing or not an array", at("hash_ids")))?;
        let covered = ids.len() as u64 * 512;
        if covered > u64::from(u32::MAX) {
            bail!(
                "{}: {} ids cover {covered} tokens, more than a sequence can hold ({})",
                at("hash_ids"),
                ids.len(),
                u32::MAX
            );
        }
        limits.take(&mut total, ids.len() as u64 * split, tokens_per_block)?;
        let mut keys = Vec::with_capacity(ids.len() * split as usize);
        for id in ids {
            let id = id.as_u64().with_context(|| {
                format!("{}: an id is not a non-negative integer", at("hash_ids"))
            })?;
            keys.extend((0..split).map(|j| sub_key(id, j)));
        }
        requests.push(Request::from_trace(ts, input, output, keys));
    }
    trace_workload(name, requests, tokens_per_block)
}

/// The requests of a trace, sorted by arrival; an empty trace is an error.
pub(crate) fn trace_workload(
    name: &str,
    mut requests: Vec<Request>,
    tokens_per_block: u32,
) -> Result<Workload> {
    if requests.is_empty() {
        bail!("{name}: no requests");
    }
    sort_stable(&mut requests);
    Ok(Workload {
        name: name.to_string(),
        requests,
        tokens_per_block,
    })
}

pub(crate) fn file_name(path: &Path) -> String {
    path.file_name().map_or_else(
        || path.display().to_string(),
        |f| f.to_string_lossy().into_owned(),
    )
}

fn sort_stable(requests: &mut [Request]) {
    requests.sort_by(|a, b| a.arrival_s.total_cmp(&b.arrival_s));
}

/// Days in month `m` of year `y` (proleptic Gregorian).
fn days_in(y: i64, m: i64) -> i64 {
    match m {
        2 if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Parses `YYYY-MM-DD HH:MM:SS.fffffff` into seconds since a fixed epoch;
/// every field in range (a leap second allowed), the seconds finite.
fn parse_timestamp(s: &str) -> Option<f64> {
    let (date, time) = s.trim().split_once(' ')?;
    let num = |x: &str, lo: i64, hi: i64| {
        x.parse::<i64>()
            .ok()
            .filter(|v| (lo..=hi).contains(v) && x.bytes().all(|b| b.is_ascii_digit()))
    };
    let mut d = date.split('-');
    let y = num(d.next()?, 1, 9999)?;
    let mo = num(d.next()?, 1, 12)?;
    let da = num(d.next()?, 1, days_in(y, mo))?;
    let mut t = time.split(':');
    let h = num(t.next()?, 0, 23)?;
    let mi = num(t.next()?, 0, 59)?;
    let sec_text = t.next()?;
    let sec: f64 = sec_text.parse().ok()?;
    if d.next().is_some() || t.next().is_some() || !(0.0..61.0).contains(&sec) {
        return None;
    }
    if !sec_text.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return None;
    }
    // Days from a civil date (Howard Hinnant's algorithm).
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (mo + if mo > 2 { -3 } else { 9 }) + 2) / 5 + da - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe;
    Some(days as f64 * 86_400.0 + (h * 3600 + mi * 60) as f64 + sec)
}

/// Reads an Azure LLM inference CSV: see [`parse_azure`].
pub fn azure(
    path: &Path,
    tokens_per_block: u32,
    system_tokens: u32,
    limits: &Limits,
) -> Result<Workload> {
    let text = read(path, limits)?;
    parse_azure(
        &text,
        &file_name(path),
        tokens_per_block,
        system_tokens,
        limits,
    )
}

/// Parses an Azure LLM inference CSV (`TIMESTAMP,ContextTokens,GeneratedTokens`).
/// Prompts are unique beyond an optional shared system prompt of
/// `system_tokens` tokens.
pub fn parse_azure(
    text: &str,
    name: &str,
    tokens_per_block: u32,
    system_tokens: u32,
    limits: &Limits,
) -> Result<Workload> {
    if tokens_per_block == 0 {
        bail!("--tokens-per-block must be at least 1");
    }
    let mut lines = text.lines().enumerate();
    let header = lines
        .next()
        .map(|(_, h)| h.trim().to_string())
        .unwrap_or_default();
    if header != "TIMESTAMP,ContextTokens,GeneratedTokens" {
        bail!("{name}:1: expected the header `TIMESTAMP,ContextTokens,GeneratedTokens`");
    }
    let system_blocks = system_tokens / tokens_per_block;
    let mut requests = Vec::new();
    let mut t0 = None;
    let mut total = 0u64;
    for (n, line) in lines {
        if line.trim().is_empty() {
            continue;
        }
        let at = |field: &str| format!("{name}:{}: field `{field}`", n + 1);
        let fields: Vec<&str> = line.split(',').collect();
        if fields.len() != 3 {
            bail!("{name}:{}: {} fields, expected 3", n + 1, fields.len());
        }
        let ts = parse_timestamp(fields[0]).with_context(|| {
            format!(
                "{}: not a valid `YYYY-MM-DD HH:MM:SS` time",
                at("TIMESTAMP")
            )
        })?;
        let count = |i: usize, field: &str| -> Result<u32> {
            fields[i]
                .trim()
                .parse()
                .with_context(|| format!("{}: not an integer in 0..={}", at(field), u32::MAX))
        };
        let ctx = count(1, "ContextTokens")?;
        let gen_tokens = count(2, "GeneratedTokens")?;
        let t0 = *t0.get_or_insert(ts);
        if (ts - t0).abs() > MAX_SECONDS {
            bail!(
                "{}: more than {MAX_SECONDS} seconds from the first",
                at("TIMESTAMP")
            );
        }
        let full = ctx / tokens_per_block;
        limits.take(&mut total, u64::from(full), tokens_per_block)?;
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
    trace_workload(name, requests, tokens_per_block)
}

/// A seeded random source (SplitMix64).
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed ^ 0x2545_f491_4f6c_dd1d)
    }
    /// 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix64(self.0)
    }
    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Exponential with mean `mean`.
    pub fn exp(&mut self, mean: f64) -> f64 {
        -mean * (1.0 - self.unit()).ln()
    }
    /// Log-normal-ish length around `median`, clamped to `[lo, hi]`.
    pub fn length(&mut self, median: f64, spread: f64, lo: u32, hi: u32) -> u32 {
        // Sum of uniforms approximates a normal in the log domain.
        let z = (0..4).map(|_| self.unit()).sum::<f64>() - 2.0;
        let v = median * (spread * z).exp();
        (v.round() as u32).clamp(lo, hi)
    }
}

/// New conversations per second in the built-in workload: with ample memory
/// the default server (see `sim::CostModel`) runs it at about two thirds of
/// its compute, so what moves the figures is memory, not queueing.
pub const CONVERSATIONS_PER_S: f64 = 3.0;

/// Bytes the built-in workload takes per conversation, at most (token ids
/// of every turn's prompt and output), for the memory check.
pub const BYTES_PER_CONVERSATION: u64 = 12 * (2000 + 12 * 2500) * 4;

/// The built-in workload: multi-turn chat over a few shared system prompts,
/// Poisson arrivals of new conversations, think time between turns.
/// Each turn's prompt is the system prompt, the conversation so far and the
/// new user message; real token ids, hashed by the manager.
pub fn generate(
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
        t += rng.exp(1.0 / CONVERSATIONS_PER_S);
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
                output_keys: Vec::new(),
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
        let mut all = r.tokens.clone().unwrap_or_default();
        all.extend(r.output.as_deref().unwrap_or(&[]));
        let mut tip = h.root(Some(pagedkv_core::CacheSalt(u128::from(r.tenant))));
        let mut keys: Vec<u128> = all
            .chunks_exact(bs)
            .enumerate()
            .map(|(i, b)| {
                tip = h.hash_block(tip, b, (i * bs) as u32, &ExtraKeys::default());
                tip.0
            })
            .collect();
        r.output_keys = keys.split_off((r.prompt_tokens as usize / bs).min(keys.len()));
        r.keys = keys;
    }
    Ok(Workload {
        name: format!("built-in chat (seed {seed}, {conversations} conversations)"),
        requests,
        tokens_per_block,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROOMY: Limits = Limits { max_keys: 1 << 30 };

    #[test]
    fn timestamps_are_checked_field_by_field() {
        assert!(parse_timestamp("2023-11-16 18:15:46.6805900").is_some());
        for bad in [
            "2023-13-16 18:15:46.68",
            "2023-02-30 18:15:46.68",
            "2023-11-45 18:15:46.68",
            "2023-11-16 99:15:46.68",
            "2023-11-16 18:61:46.68",
            "2023-11-16 18:15:NaN",
            "2023-11-16 18:15:inf",
            "2023-11-16 18:15:-1",
            "99999999999-11-16 18:15:46.68",
            "2023-11-16 18:15:46:12",
        ] {
            assert_eq!(parse_timestamp(bad), None, "{bad}");
        }
    }

    #[test]
    fn hostile_lines_are_refused_by_line() {
        let csv = "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.68,374,44,9\n";
        let e = parse_azure(csv, "t.csv", 16, 0, &ROOMY)
            .unwrap_err()
            .to_string();
        assert!(e.contains("t.csv:2: 4 fields"), "{e}");
        let big = format!(
            "{{\"timestamp\": 0, \"input_length\": 5, \"output_length\": 5, \"hash_ids\": [{}]}}",
            vec!["1"; 1 << 23].join(",")
        );
        let e = parse_mooncake(&big, "m.jsonl", 512, &ROOMY)
            .unwrap_err()
            .to_string();
        assert!(e.contains("m.jsonl:1: field `hash_ids`"), "{e}");
        let line = "{\"timestamp\": 0, \"input_length\": 5, \"output_length\": 5, \"hash_ids\": [1, 2, 3]}";
        let tiny = Limits { max_keys: 64 };
        let e = parse_mooncake(line, "m.jsonl", 16, &tiny)
            .unwrap_err()
            .to_string();
        assert!(e.contains("--max-memory"), "{e}");
        assert_eq!(
            parse_mooncake(line, "m.jsonl", 16, &ROOMY)
                .unwrap()
                .block_refs(),
            96
        );
    }
}
