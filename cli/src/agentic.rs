//! Agentic coding sessions (`shared/traces/agentic/`): one JSON file per
//! session, `{"block_size": 64, "requests": [{"t", "in", "out",
//! "hash_ids", ...}, {"type": "subagent", "t", "requests": [...]}]}`.
//!
//! A session's `hash_ids` are chained ids of `block_size`-token blocks,
//! local to its file: id 1 in two files are different blocks. So each
//! session's keys are made unique (the session's index is mixed into every
//! id), and sessions start by a seeded Poisson process of
//! `sessions_per_minute`. A request's arrival is its session's start plus
//! its `t` (a sub-agent's requests: plus the sub-agent's own `t`, their
//! times being relative to its start). Sub-agents are replayed like any
//! request of the session.

use std::path::Path;

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::workload::{self, Limits, Request, Rng, Workload};

/// Ids at or above this are refused (the traces' ids are small counters).
const MAX_ID: u64 = 1 << 40;
/// Largest `block_size`: an id splits into at most 4,096 sub-blocks (the
/// sub-block index must stay below the id's bits in `workload::sub_key`),
/// and counts of ids times tokens stay far from overflowing.
const MAX_BLOCK_SIZE: u64 = 4096;

/// Reads one session file, or every `*.json` session in a directory (in
/// name order): see [`parse`].
pub fn read(
    path: &Path,
    tokens_per_block: u32,
    sessions_per_minute: f64,
    seed: u64,
    limits: &Limits,
) -> Result<Workload> {
    let mut paths: Vec<_> = if path.is_dir() {
        std::fs::read_dir(path)
            .with_context(|| format!("reading {}", path.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "json"))
            .collect()
    } else {
        vec![path.to_path_buf()]
    };
    paths.sort();
    if paths.is_empty() {
        bail!("{}: no session files (*.json)", path.display());
    }
    let mut sessions = Vec::with_capacity(paths.len());
    let mut bytes = 0u64;
    for p in &paths {
        let text = workload::read(p, limits)?;
        bytes += text.len() as u64;
        if bytes > limits.max_keys.saturating_mul(16) {
            bail!(
                "{}: the sessions take more than the memory limit allows (--max-memory)",
                path.display()
            );
        }
        sessions.push((workload::file_name(p), text));
    }
    let name = format!(
        "{} ({} sessions, {}/min)",
        workload::file_name(path),
        sessions.len(),
        if (1e-3..1e6).contains(&sessions_per_minute) {
            format!("{sessions_per_minute}")
        } else {
            format!("{sessions_per_minute:.3e}")
        }
    );
    parse(
        &name,
        &sessions,
        tokens_per_block,
        sessions_per_minute,
        seed,
        limits,
    )
}

/// The workload of `sessions` (file name, text), in the given order: see
/// the module's documentation. `tokens_per_block` must divide each file's
/// `block_size` (each id is split into that many sub-blocks). Errors name
/// the file and the request (`name: requests[3].requests[0]: field`).
pub fn parse(
    name: &str,
    sessions: &[(String, String)],
    tokens_per_block: u32,
    sessions_per_minute: f64,
    seed: u64,
    limits: &Limits,
) -> Result<Workload> {
    if !sessions_per_minute.is_finite() || sessions_per_minute <= 0.0 {
        bail!("--sessions-per-minute must be positive (got {sessions_per_minute})");
    }
    if tokens_per_block == 0 {
        bail!("--tokens-per-block must be at least 1");
    }
    let mut rng = Rng::new(seed);
    let mut start = 0.0f64;
    let mut requests = Vec::new();
    let mut total = 0u64;
    for (s, (file, text)) in sessions.iter().enumerate() {
        if s > 0 {
            start += rng.exp(60.0 / sessions_per_minute);
        }
        let v: Value = serde_json::from_str(text).with_context(|| format!("{file}: not JSON"))?;
        let block_size = v
            .get("block_size")
            .and_then(Value::as_u64)
            .with_context(|| format!("{file}: field `block_size` missing or not an integer"))?;
        if block_size > MAX_BLOCK_SIZE {
            bail!("{file}: block_size {block_size}: at most {MAX_BLOCK_SIZE} tokens");
        }
        if block_size == 0 || block_size % u64::from(tokens_per_block) != 0 {
            bail!(
                "{file}: --tokens-per-block {tokens_per_block} must divide the session's block_size {block_size}"
            );
        }
        let mut s = Session {
            file,
            salt: workload::mix64(s as u64 ^ 0xa6e7_71c5),
            block_size,
            split: block_size / u64::from(tokens_per_block),
            tokens_per_block,
            limits,
            total: &mut total,
            out: &mut requests,
        };
        let reqs = v
            .get("requests")
            .with_context(|| format!("{file}: field `requests` missing"))?;
        s.walk(reqs, start, "requests")?;
    }
    workload::trace_workload(name, requests, tokens_per_block)
}

/// One session file being read.
struct Session<'a> {
    file: &'a str,
    /// Mixed into every id: ids are local to their file.
    salt: u64,
    block_size: u64,
    split: u64,
    tokens_per_block: u32,
    limits: &'a Limits,
    total: &'a mut u64,
    out: &'a mut Vec<Request>,
}

impl Session<'_> {
    /// The requests of `reqs` (an array at `path`), their times relative to `origin`.
    fn walk(&mut self, reqs: &Value, origin: f64, path: &str) -> Result<()> {
        let reqs = reqs
            .as_array()
            .with_context(|| format!("{}: {path}: not an array", self.file))?;
        for (i, r) in reqs.iter().enumerate() {
            let at = format!("{}: {path}[{i}]", self.file);
            let t = r
                .get("t")
                .and_then(Value::as_f64)
                .filter(|t| t.is_finite() && (0.0..=workload::MAX_SECONDS).contains(t))
                .with_context(|| format!("{at}: field `t` missing, negative or too large"))?;
            if r.get("type").and_then(Value::as_str) == Some("subagent") {
                let nested = r
                    .get("requests")
                    .with_context(|| format!("{at}: a sub-agent without `requests`"))?;
                self.walk(nested, origin + t, &format!("{path}[{i}].requests"))?;
                continue;
            }
            let num = |field: &str| -> Result<u32> {
                r.get(field)
                    .and_then(Value::as_u64)
                    .and_then(|n| u32::try_from(n).ok())
                    .with_context(|| {
                        format!("{at}: field `{field}` missing or not an integer below 2^32")
                    })
            };
            let (input, output) = (num("in")?, num("out")?);
            let ids = r
                .get("hash_ids")
                .and_then(Value::as_array)
                .with_context(|| format!("{at}: field `hash_ids` missing or not an array"))?;
            // Ids name full blocks of the prompt: more than fit is a bad trace.
            if ids.len() as u64 * self.block_size > u64::from(input) {
                bail!(
                    "{at}: {} ids of {} tokens are more than the prompt's {input} tokens",
                    ids.len(),
                    self.block_size
                );
            }
            self.limits.take(
                self.total,
                ids.len() as u64 * self.split,
                self.tokens_per_block,
            )?;
            let mut keys = Vec::with_capacity(ids.len() * self.split as usize);
            for id in ids {
                let id = id
                    .as_u64()
                    .filter(|&id| id < MAX_ID)
                    .with_context(|| format!("{at}: an id is not an integer below 2^40"))?;
                let unique = id ^ self.salt;
                keys.extend((0..self.split).map(|j| workload::sub_key(unique, j)));
            }
            let arrival = origin + t;
            if !arrival.is_finite() || arrival > workload::MAX_SECONDS {
                bail!(
                    "{at}: arrives {arrival:.3e} s after the replay starts, more than {:.0e} s \
                     (fewer sessions, or a higher --sessions-per-minute)",
                    workload::MAX_SECONDS
                );
            }
            self.out
                .push(Request::from_trace(arrival, input, output, keys));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits { max_keys: 1 << 30 };

    fn session(ids_a: &str, ids_b: &str) -> String {
        format!(
            r#"{{"id": "x", "block_size": 64, "requests": [
                {{"t": 0.0, "type": "n", "in": 130, "out": 5, "hash_ids": [{ids_a}]}},
                {{"t": 10.0, "type": "subagent", "requests": [
                    {{"t": 2.5, "type": "n", "in": 64, "out": 1, "hash_ids": [9]}}]}},
                {{"t": 20.0, "type": "n", "in": 200, "out": 7, "hash_ids": [{ids_b}]}}]}}"#
        )
    }

    #[test]
    fn sessions_are_unique_timed_and_sub_agents_included() {
        let s = [
            ("a.json".to_string(), session("1, 2", "1, 2, 3")),
            ("b.json".to_string(), session("1, 2", "1, 2, 3")),
        ];
        let w = parse("t", &s, 16, 2.0, 7, &LIMITS).unwrap();
        assert_eq!(w.requests.len(), 6);
        // 64-token ids split in four 16-token blocks.
        let a: Vec<&Request> = w
            .requests
            .iter()
            .filter(|r| r.prompt_tokens == 130)
            .collect();
        assert_eq!(a.len(), 2);
        assert_eq!(a[0].keys.len(), 8);
        // Same ids in two files: different blocks; within a file: shared.
        assert!(a[0].keys.iter().all(|k| !a[1].keys.contains(k)));
        let b = w.requests.iter().find(|r| r.prompt_tokens == 200).unwrap();
        assert_eq!(&b.keys[..8], &w.requests[0].keys[..]);
        // The first session starts at 0; its sub-agent's request at 10 + 2.5.
        assert_eq!(w.requests[0].arrival_s, 0.0);
        assert!(w.requests.iter().any(|r| r.arrival_s == 12.5));
        // The second starts later, by the seeded process (same seed, same start).
        let again = parse("t", &s, 16, 2.0, 7, &LIMITS).unwrap();
        let starts = |w: &Workload| {
            w.requests
                .iter()
                .map(|r| r.arrival_s)
                .fold(f64::MIN, f64::max)
        };
        assert!(starts(&w) > 20.0);
        assert_eq!(starts(&w), starts(&again));
        let other = parse("t", &s, 16, 2.0, 8, &LIMITS).unwrap();
        assert_ne!(starts(&w), starts(&other));
    }

    #[test]
    fn bad_sessions_are_named() {
        let bad = |text: &str, tbp: u32| {
            let s = [("s.json".to_string(), text.to_string())];
            format!("{:#}", parse("t", &s, tbp, 1.0, 1, &LIMITS).unwrap_err())
        };
        assert!(bad("{", 16).contains("s.json: not JSON"));
        assert!(bad(&session("1", "1"), 48).contains("must divide"));
        let huge = r#"{"block_size": 9223372036854775808, "requests": []}"#;
        assert!(bad(huge, 1).contains("at most 4096"));
        assert!(bad(&session("1, 2, 3", "1"), 16).contains("requests[0]: 3 ids"));
        assert!(bad(&session("-1", "1"), 16).contains("requests[0]: an id"));
        let no_t = r#"{"block_size": 64, "requests": [{"type": "subagent", "t": 1,
            "requests": [{"in": 1, "out": 1, "hash_ids": []}]}]}"#;
        assert!(bad(no_t, 16).contains("requests[0].requests[0]: field `t`"));
        let s = [("s.json".to_string(), session("1", "1"))];
        assert!(parse("t", &s, 16, 0.0, 1, &LIMITS).is_err());
        // A start past the limit (a tiny rate), or a sub-agent pushing a
        // request past it: refused, never an infinite arrival.
        let two = [s[0].clone(), s[0].clone()];
        let e = format!(
            "{:#}",
            parse("t", &two, 16, 1e-300, 1, &LIMITS).unwrap_err()
        );
        assert!(e.contains("arrives"), "{e}");
        let late = r#"{"block_size": 64, "requests": [{"type": "subagent", "t": 9e8,
            "requests": [{"t": 9e8, "in": 1, "out": 1, "hash_ids": []}]}]}"#;
        assert!(bad(late, 16).contains("arrives"));
        assert!(parse("t", &s, 16, f64::NAN, 1, &LIMITS).is_err());
    }
}
