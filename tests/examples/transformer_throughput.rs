//! Tokens per second of the tiny transformer served through the manager,
//! with and without prefix reuse: 32 requests share a 256-token system
//! prompt, each with its own 16-token question, and generate 32 tokens in
//! batched decode steps. With reuse, the later requests' prefill skips the
//! system prompt (the computed tokens of the allocation answers).
//!
//! `cargo run --release -p pagedkv-tests --example transformer_throughput`

use std::time::Instant;

use pagedkv_tests::transformer::engine::{Engine, EngineConfig};
use pagedkv_tests::transformer::{Config, Model};

const REQUESTS: u32 = 32;
const SYSTEM: u32 = 256;
const QUESTION: u32 = 16;
const OUTPUT: usize = 32;

fn run(prefix: bool) -> (f64, u64, u64) {
    let cfg = Config {
        vocab: 256,
        dim: 128,
        heads: 8,
        kv_heads: 2,
        head_dim: 16,
        hidden: 256,
        full_layers: 3,
        window: 64,
    };
    let mut e = Engine::new(
        Model::new(cfg, 7),
        EngineConfig {
            full_blocks: 4096,
            window_blocks: 4096,
            host_blocks: 0,
            prefix,
            check: false,
        },
    );
    let system: Vec<u32> = (0..SYSTEM).map(|i| (i * 31 + 7) % 256).collect();
    let start = Instant::now();
    for id in 0..REQUESTS {
        let mut p = system.clone();
        p.extend((0..QUESTION).map(|i| (id * 13 + i * 3) % 256));
        e.admit(u64::from(id), &p, None)
            .expect("room for every request");
    }
    let ids = e.running();
    for _ in 0..OUTPUT {
        assert!(e.step(&ids).is_empty(), "no preemption with this much room");
    }
    let secs = start.elapsed().as_secs_f64();
    let forwards = e.seen.forwards;
    for id in ids {
        e.finish(id).expect("finish");
    }
    (secs, forwards, e.seen.skipped_tokens)
}

fn main() {
    let generated = f64::from(REQUESTS) * OUTPUT as f64;
    let mut rates = Vec::new();
    for prefix in [false, true] {
        let (secs, forwards, skipped) = run(prefix);
        let rate = generated / secs;
        println!(
            "prefix reuse {:<3}: {:>8.0} generated tok/s ({forwards} forward passes, {skipped} prompt tokens skipped, {secs:.3} s)",
            if prefix { "on" } else { "off" },
            rate,
        );
        rates.push(rate);
    }
    println!("speed-up from prefix reuse: {:.2}x", rates[1] / rates[0]);
}
