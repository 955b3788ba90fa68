//! Hot paths of the core. `cargo bench -p pagedkv-core`.
//!
//! - `pool/allocate_free_1`: allocate and free one block.
//! - `pool/allocate_free_64`: a 64-block run (throughput per block).
//! - `hash/16_tokens`: the key of one 16-token block, keyed SipHash-1-3-128
//!   (the default) and SHA-256.
//! - `prefix/lookup_64_chain`: look up a cached 64-block chain.
//! - `trace/mooncake_16`: the Mooncake conversation trace, each 512-token id
//!   expanded to 32 16-token blocks, on an 8,192-block pool, one request at a
//!   time (lookup, allocate, register, free); keys precomputed (hashing
//!   excluded); throughput per request.
//! - `eviction/{lru,protect,tail_first,protect_tail}`: the same replay under
//!   each eviction policy (`EvictionPolicy`), throughput per request-block.
#![allow(missing_docs, reason = "criterion macros generate undocumented items")]
#![allow(clippy::cast_possible_truncation, reason = "trace lengths fit in u32")]

use std::hint::black_box;
use std::path::PathBuf;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use pagedkv_core::{
    BlockHash, BlockHasher, BlockId, BlockPool, CacheConfig, EvictionPolicy, ExtraKeys, KvCache,
    PoolConfig, PoolId, Prompt, Sha256BlockHasher, SipBlockHasher,
};

fn pool_benches(c: &mut Criterion) {
    let mut g = c.benchmark_group("pool");
    let mut pool = BlockPool::with_capacity(PoolConfig::device(0, 16), 8192).unwrap();
    g.throughput(Throughput::Elements(1));
    g.bench_function("allocate_free_1", |b| {
        b.iter(|| {
            let id = pool.allocate_one().unwrap();
            pool.release(black_box(id)).unwrap();
        })
    });
    let mut ids = [BlockId(0); 64];
    g.throughput(Throughput::Elements(64));
    g.bench_function("allocate_free_64", |b| {
        b.iter(|| {
            pool.allocate(&mut ids).unwrap();
            pool.free(black_box(&ids)).unwrap();
        })
    });
    g.finish();
}

fn hash_benches(c: &mut Criterion) {
    let mut g = c.benchmark_group("hash");
    g.throughput(Throughput::Elements(1));
    let tokens: Vec<u32> = (0..16).map(|i| i * 7919 + 13).collect();
    let sip = SipBlockHasher::new(*b"0123456789abcdef");
    let parent = sip.root(None);
    let extra = ExtraKeys::default();
    g.bench_function("16_tokens_siphash13", |b| {
        b.iter(|| sip.hash_block(black_box(parent), black_box(&tokens), 0, &extra))
    });
    g.bench_function("16_tokens_sha256", |b| {
        b.iter(|| Sha256BlockHasher.hash_block(black_box(parent), black_box(&tokens), 0, &extra))
    });
    g.finish();
}

fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A uniform 128-bit key for sub-block `j` of trace block `id`.
fn sub_key(id: u64, j: u64) -> BlockHash {
    let a = mix(id.wrapping_mul(64) + j);
    let b = mix(a ^ 0x5555);
    BlockHash((u128::from(b) << 64) | u128::from(a))
}

fn prefix_benches(c: &mut Criterion) {
    let mut g = c.benchmark_group("prefix");
    let mut pool = BlockPool::with_capacity(PoolConfig::device(0, 16), 8192).unwrap();
    pool.set_events_enabled(false);
    let keys: Vec<BlockHash> = (0..64).map(|j| sub_key(7, j)).collect();
    let mut ids = [BlockId(0); 64];
    pool.allocate(&mut ids).unwrap();
    for (&b, &k) in ids.iter().zip(&keys) {
        pool.register(b, k, None).unwrap();
    }
    pool.free(&ids).unwrap();
    g.throughput(Throughput::Elements(64));
    g.bench_function("lookup_64_chain", |b| {
        b.iter(|| {
            let mut n = 0;
            for &k in black_box(&keys) {
                if pool.lookup(k).is_none() {
                    break;
                }
                n += 1;
            }
            n
        })
    });
    g.finish();
}

struct Request {
    keys: Vec<BlockHash>,
    len: u32,
}

fn traces_dir() -> PathBuf {
    std::env::var_os("PAGEDKV_TRACES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/traces"))
}

fn load_mooncake() -> Option<Vec<Request>> {
    #[derive(serde::Deserialize)]
    struct Line {
        input_length: u32,
        hash_ids: Vec<u64>,
    }
    let text = std::fs::read_to_string(traces_dir().join("mooncake_conversation.jsonl")).ok()?;
    let reqs = text
        .lines()
        .map(|l| {
            let line: Line = serde_json::from_str(l).expect("trace line");
            let full = (line.input_length / 16) as usize;
            let keys = line
                .hash_ids
                .iter()
                .flat_map(|&id| (0..32).map(move |j| sub_key(id, j)))
                .take(full)
                .collect();
            Request {
                keys,
                len: line.input_length,
            }
        })
        .collect();
    Some(reqs)
}

fn trace_benches(c: &mut Criterion) {
    let Some(reqs) = load_mooncake() else {
        eprintln!(
            "trace/mooncake_16 skipped: no mooncake_conversation.jsonl under {:?}",
            traces_dir()
        );
        return;
    };
    let mut g = c.benchmark_group("trace");
    g.sample_size(10);
    g.throughput(Throughput::Elements(reqs.len() as u64));
    g.bench_function("keys_only", |b| {
        b.iter(|| {
            let mut x = 0u128;
            for r in &reqs {
                for k in &r.keys {
                    x ^= k.0;
                }
            }
            x
        })
    });
    g.bench_function("mooncake_16", |b| replay(b, &reqs, EvictionPolicy::LRU));
    g.finish();
    // The eviction policies on the same replay, per request-block (each one
    // a prefix lookup or an allocation with its eviction, a registration,
    // and a release into the eviction order).
    let mut g = c.benchmark_group("eviction");
    g.sample_size(10);
    let blocks: usize = reqs.iter().map(|r| r.keys.len()).sum();
    g.throughput(Throughput::Elements(blocks as u64));
    for (name, p) in [
        ("lru", EvictionPolicy::LRU),
        ("protect", EvictionPolicy::protect(10)),
        ("tail_first", EvictionPolicy::TAIL_FIRST),
        (
            "protect_tail",
            EvictionPolicy {
                protect_percent: 10,
                tail_first: true,
            },
        ),
    ] {
        g.bench_function(name, |b| replay(b, &reqs, p));
    }
    g.finish();
}

/// Replays `reqs` one at a time through a pool of 8,192 blocks under `p`.
fn replay(b: &mut criterion::Bencher<'_>, reqs: &[Request], p: EvictionPolicy) {
    let config = CacheConfig {
        tokens_per_block: 16,
        max_seqs: 4,
        max_blocks_per_seq: 8192,
        max_plans: 1,
    };
    b.iter_batched_ref(
        || {
            let mut cache = KvCache::with_config(config, SipBlockHasher::new([7; 16])).unwrap();
            let mut pool = BlockPool::with_capacity(PoolConfig::device(0, 16), 8192).unwrap();
            pool.set_events_enabled(false);
            pool.set_eviction_policy(p).unwrap();
            cache.add_pool(pool).unwrap();
            cache
        },
        |cache| {
            let mut hits = 0u64;
            for r in reqs {
                let a = cache
                    .allocate(PoolId(0), &Prompt::keys(&r.keys, r.len))
                    .unwrap();
                hits += u64::from(a.hit_blocks);
                cache.free(a.seq).unwrap();
            }
            hits
        },
        BatchSize::PerIteration,
    )
}

criterion_group!(
    benches,
    pool_benches,
    hash_benches,
    prefix_benches,
    trace_benches
);
criterion_main!(benches);
