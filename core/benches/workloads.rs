//! The side-by-side workloads of pagedkv's comparison with its peers,
//! ported from `shared/bench/workloads.rs` with the same seeds (so the same
//! operation sequences), and the decode step every engine pays:
//!
//! - `w1_allocator_churn`: 200,000 allocations of 1-64 blocks, at most 512
//!   live, freed in random order, on a 65,536-block pool. Unit: ns per block
//!   allocated and freed (6.51 M blocks).
//! - `w2_prefix_serving`: 3,000 requests, 32 in flight, 32 Zipf(1) system
//!   prompts of 1,024 tokens plus 128-512 new tokens, 30% continuing one of
//!   the last 64; longest cached prefix, allocate the rest (evicting),
//!   register full blocks, free on finish; 8,192-block pool; keys
//!   precomputed (no hashing). Unit: µs per request. LRU hit rate 0.770793.
//! - `w3_mooncake`: the Mooncake conversation trace one request at a time,
//!   each 512-token id as 32 keyed 16-token blocks; 8,192-block pool. Unit:
//!   µs per request and ns per request-block. Hit rate 0.042782.
//! - `decode_step_256`: 256 sequences of 496-token prompts each append one
//!   token, then the vLLM block tables and slot mapping and the FlashInfer
//!   tables of the batch are exported. Unit: ns per sequence per step.
//!
//! Each prints its unit and hit rate once. `cargo bench -p pagedkv-core
//! --bench workloads`.
#![allow(missing_docs, reason = "criterion macros generate undocumented items")]
#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_precision_loss,
    reason = "bench sizes fit; ratios are printed"
)]

use std::path::PathBuf;
use std::time::Instant;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use pagedkv_core::{
    BlockHash, BlockHasher, BlockId, BlockPool, CacheConfig, ExtraKeys, KvCache, PoolConfig,
    PoolId, Prompt, SeqId, SipBlockHasher,
};

/// SplitMix64, as the workloads' generator.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix0(self.0)
    }
    fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next()) * u128::from(n)) >> 64) as u64
    }
    fn range(&mut self, lo: u64, hi_incl: u64) -> u64 {
        lo + self.below(hi_incl - lo + 1)
    }
    fn f64(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn mix0(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn mix(x: u64) -> u64 {
    mix0(x.wrapping_add(0x9e37_79b9_7f4a_7c15))
}

fn sub_key(id: u64, j: u64) -> BlockHash {
    let a = mix(id.wrapping_mul(64) + j);
    let b = mix(a ^ 0x5555);
    BlockHash((u128::from(b) << 64) | u128::from(a))
}

fn pool(capacity: u32) -> BlockPool<'static> {
    let mut p = BlockPool::with_capacity(PoolConfig::device(0, 16), capacity).unwrap();
    p.set_events_enabled(false);
    p
}

fn cache(capacity: u32, max_seqs: u32, width: u32) -> KvCache<'static, SipBlockHasher> {
    let config = CacheConfig {
        tokens_per_block: 16,
        max_seqs,
        max_blocks_per_seq: width,
        max_plans: 1,
    };
    let mut c = KvCache::with_config(config, SipBlockHasher::new([7; 16])).unwrap();
    c.add_pool(pool(capacity)).unwrap();
    c
}

// ---- W1 -------------------------------------------------------------------

#[derive(Clone, Copy)]
enum W1Op {
    Alloc { slot: u16, n: u8 },
    Free { slot: u16 },
}

const W1_LIVE: usize = 512;

fn gen_w1(seed: u64) -> Vec<W1Op> {
    let mut rng = Rng(seed);
    let mut ops = Vec::new();
    let mut live: Vec<u16> = Vec::new();
    let mut free_slots: Vec<u16> = (0..W1_LIVE as u16).rev().collect();
    let mut allocs = 0;
    while allocs < 200_000 || !live.is_empty() {
        let alloc = if live.len() == W1_LIVE || allocs == 200_000 {
            false
        } else {
            live.is_empty() || rng.next() & 1 == 0
        };
        if alloc {
            let slot = free_slots.pop().unwrap();
            ops.push(W1Op::Alloc {
                slot,
                n: rng.range(1, 64) as u8,
            });
            live.push(slot);
            allocs += 1;
        } else {
            let slot = live.swap_remove(rng.below(live.len() as u64) as usize);
            ops.push(W1Op::Free { slot });
            free_slots.push(slot);
        }
    }
    ops
}

fn w1(c: &mut Criterion) {
    let ops = gen_w1(0x5eed_0001);
    let blocks: u64 = ops
        .iter()
        .map(|o| match o {
            W1Op::Alloc { n, .. } => u64::from(*n),
            W1Op::Free { .. } => 0,
        })
        .sum();
    let mut p = pool(65_536);
    let mut slots = vec![[BlockId(0); 64]; W1_LIVE];
    let mut lens = [0usize; W1_LIVE];
    let mut run = || {
        for op in &ops {
            match *op {
                W1Op::Alloc { slot, n } => {
                    let s = usize::from(slot);
                    lens[s] = usize::from(n);
                    p.allocate(&mut slots[s][..lens[s]]).unwrap();
                }
                W1Op::Free { slot } => {
                    let s = usize::from(slot);
                    p.free(&slots[s][..lens[s]]).unwrap();
                }
            }
        }
    };
    let t = Instant::now();
    run();
    println!(
        "w1_allocator_churn: {blocks} blocks, {:.2} ns per block (one run)",
        t.elapsed().as_nanos() as f64 / blocks as f64
    );
    let mut g = c.benchmark_group("workloads");
    g.sample_size(10);
    g.bench_function("w1_allocator_churn", |b| b.iter(&mut run));
    g.finish();
}

// ---- W2 -------------------------------------------------------------------

enum W2Op {
    Alloc(usize),
    Free(usize),
}

fn gen_w2(seed: u64) -> (Vec<Vec<u32>>, Vec<W2Op>) {
    const VOCAB: u64 = 32_000;
    let mut rng = Rng(seed);
    let sys: Vec<Vec<u32>> = (0..32)
        .map(|_| (0..1024).map(|_| rng.below(VOCAB) as u32).collect())
        .collect();
    let w: Vec<f64> = (1..=32).map(|r| 1.0 / f64::from(r)).collect();
    let total: f64 = w.iter().sum();
    let mut acc = 0.0;
    let cdf: Vec<f64> = w
        .iter()
        .map(|x| {
            acc += x / total;
            acc
        })
        .collect();
    let mut reqs: Vec<Vec<u32>> = Vec::with_capacity(3000);
    for i in 0..3000 {
        let mut t = if i > 0 && rng.f64() < 0.30 {
            let back = rng.below((i as u64).min(64));
            reqs[i - 1 - back as usize].clone()
        } else {
            let u = rng.f64();
            sys[cdf.iter().position(|&c| u < c).unwrap_or(31)].clone()
        };
        let new = rng.range(128, 512);
        t.extend((0..new).map(|_| rng.below(VOCAB) as u32));
        reqs.push(t);
    }
    let mut ops = Vec::new();
    let mut inflight: Vec<usize> = Vec::new();
    for i in 0..3000 {
        if inflight.len() == 32 {
            let k = rng.below(inflight.len() as u64) as usize;
            ops.push(W2Op::Free(inflight.swap_remove(k)));
        }
        ops.push(W2Op::Alloc(i));
        inflight.push(i);
    }
    while !inflight.is_empty() {
        let k = rng.below(inflight.len() as u64) as usize;
        ops.push(W2Op::Free(inflight.swap_remove(k)));
    }
    (reqs, ops)
}

/// The chained keys of a prompt's full blocks (what allocation would hash).
fn chain_keys(h: &SipBlockHasher, tokens: &[u32]) -> Vec<BlockHash> {
    let extra = ExtraKeys::default();
    let mut parent = h.root(None);
    tokens
        .chunks_exact(16)
        .enumerate()
        .map(|(i, t)| {
            parent = h.hash_block(parent, t, i as u32 * 16, &extra);
            parent
        })
        .collect()
}

fn w2(c: &mut Criterion) {
    let (reqs, ops) = gen_w2(0x5eed_0002);
    let h = SipBlockHasher::new([7; 16]);
    let keys: Vec<Vec<BlockHash>> = reqs.iter().map(|t| chain_keys(&h, t)).collect();
    let full: u64 = keys.iter().map(|k| k.len() as u64).sum();
    let run = |cache: &mut KvCache<'static, SipBlockHasher>| {
        let mut seqs: Vec<Option<SeqId>> = vec![None; reqs.len()];
        let mut hits = 0u64;
        for op in &ops {
            match *op {
                W2Op::Alloc(i) => {
                    let p = Prompt::keys(&keys[i], reqs[i].len() as u32);
                    let a = cache.allocate(PoolId(0), &p).unwrap();
                    hits += u64::from(a.hit_blocks);
                    seqs[i] = Some(a.seq);
                }
                W2Op::Free(i) => cache.free(seqs[i].take().unwrap()).unwrap(),
            }
        }
        hits
    };
    let mut c0 = cache(8192, 64, 8192);
    let t = Instant::now();
    let hits = run(&mut c0);
    println!(
        "w2_prefix_serving: hit rate {:.6}, {:.3} us per request (one run)",
        hits as f64 / full as f64,
        t.elapsed().as_secs_f64() * 1e6 / reqs.len() as f64
    );
    let mut g = c.benchmark_group("workloads");
    g.sample_size(10);
    g.bench_function("w2_prefix_serving", |b| {
        b.iter_batched_ref(|| cache(8192, 64, 8192), run, BatchSize::PerIteration)
    });
    g.finish();
}

// ---- W3 -------------------------------------------------------------------

fn traces_dir() -> PathBuf {
    std::env::var_os("PAGEDKV_TRACES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/traces"))
}

fn w3(c: &mut Criterion) {
    #[derive(serde::Deserialize)]
    struct Line {
        input_length: u32,
        hash_ids: Vec<u64>,
    }
    let path = traces_dir().join("mooncake_conversation.jsonl");
    let Ok(text) = std::fs::read_to_string(&path) else {
        eprintln!("w3_mooncake skipped: no {path:?}");
        return;
    };
    let reqs: Vec<(Vec<BlockHash>, u32)> = text
        .lines()
        .map(|l| {
            let line: Line = serde_json::from_str(l).expect("trace line");
            let keys = line
                .hash_ids
                .iter()
                .flat_map(|&id| (0..32).map(move |j| sub_key(id, j)))
                .take((line.input_length / 16) as usize)
                .collect();
            (keys, line.input_length)
        })
        .collect();
    let blocks: u64 = reqs.iter().map(|r| r.0.len() as u64).sum();
    let run = |cache: &mut KvCache<'static, SipBlockHasher>| {
        let mut hits = 0u64;
        for (keys, len) in &reqs {
            let a = cache
                .allocate(PoolId(0), &Prompt::keys(keys, *len))
                .unwrap();
            hits += u64::from(a.hit_blocks);
            cache.free(a.seq).unwrap();
        }
        hits
    };
    let mut c0 = cache(8192, 4, 8192);
    let t = Instant::now();
    let hits = run(&mut c0);
    let secs = t.elapsed().as_secs_f64();
    println!(
        "w3_mooncake: hit rate {:.6}, {:.2} us per request, {:.1} ns per request-block (one run)",
        hits as f64 / blocks as f64,
        secs * 1e6 / reqs.len() as f64,
        secs * 1e9 / blocks as f64
    );
    let st = c0.pool(PoolId(0)).unwrap().stats();
    println!(
        "w3_mooncake runs: {} evictions, {} of them inside a run; {} merges, {} splits",
        st.evictions, st.run_trims, st.run_merges, st.run_splits
    );
    let mut g = c.benchmark_group("workloads");
    g.sample_size(10);
    g.bench_function("w3_mooncake", |b| {
        b.iter_batched_ref(|| cache(8192, 4, 8192), run, BatchSize::PerIteration)
    });
    g.finish();
}

// ---- The decode step --------------------------------------------------------

#[path = "common/decode.rs"]
#[allow(dead_code, reason = "shared with the manager's bench")]
mod decode;

use decode::{Decode, SEQS, STEPS};

fn decode_step(c: &mut Criterion) {
    let mut d = Decode::new();
    let per = d.timed(u64::from(STEPS)).as_secs_f64() * 1e9 / f64::from(STEPS) / SEQS as f64;
    println!("decode_step_256: {per:.1} ns per sequence per step (one pass of {STEPS} steps)");
    let mut g = c.benchmark_group("workloads");
    g.bench_function("decode_step_256", |b| b.iter_custom(|iters| d.timed(iters)));
    g.finish();
}

criterion_group!(benches, w1, w2, w3, decode_step);
criterion_main!(benches);
