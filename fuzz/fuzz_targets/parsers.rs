//! The trace parsers (Mooncake JSONL, Azure CSV, agentic sessions) on arbitrary text: an
//! error or a workload, never a panic; a workload respects its key budget,
//! its arrivals are finite and sorted, and its requests' keys cover at most
//! what a sequence can hold.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pagedkv_cli::agentic;
use pagedkv_cli::workload::{Limits, Workload, parse_azure, parse_mooncake};

const LIMITS: Limits = Limits { max_keys: 1 << 16 };

fn check(w: &Workload) {
    let keys: u64 = w.requests.iter().map(|r| r.keys.len() as u64).sum();
    assert!(keys <= LIMITS.max_keys);
    assert!(
        w.requests
            .windows(2)
            .all(|p| p[0].arrival_s <= p[1].arrival_s)
    );
    for r in &w.requests {
        assert!(r.arrival_s.is_finite());
        assert!(r.keys.len() as u64 * u64::from(w.tokens_per_block) <= u64::from(u32::MAX) + 512);
    }
}

fuzz_target!(|input: (u8, u8, &str)| {
    let (which, bs, text) = input;
    let bs = u32::from(bs) + 1;
    let w = match which % 3 {
        0 => parse_mooncake(text, "fuzz.jsonl", bs, &LIMITS),
        1 => parse_azure(text, "fuzz.csv", bs, u32::from(which), &LIMITS),
        _ => agentic::parse(
            "fuzz",
            &[("fuzz.json".to_string(), text.to_string())],
            bs,
            f64::from(which),
            u64::from(which),
            &LIMITS,
        ),
    };
    if let Ok(w) = w {
        check(&w);
    }
});
