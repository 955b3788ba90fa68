//! Model-based property test of the core: random operation sequences (see
//! `pagedkv_tests::model` for what is checked after every step) against the
//! cache, driven by proptest. The same model drives the `core_ops` fuzz target.
//!
//! The number of cases is `PAGEDKV_MODEL_CASES` (default 3,500 cases of
//! 1–600 operations, 300 on average: over 1,000,000 operations per run), and
//! `PAGEDKV_MODEL_MAX_OPS` caps the operations of a case (miri runs short ones).
#![allow(clippy::cast_possible_truncation, reason = "small test values")]

use pagedkv_tests::model::{Model, Op};
use proptest::prelude::*;

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..2u8, 0..3u8, 0..3u8, 0..48u8, 0..12u8, 0..4u32).prop_map(
            |(dev, salt, base, prefix, suffix, seed)| Op::Allocate { dev, salt, base, prefix, suffix, seed }),
        1 => (0..2u8, 0..40u8).prop_map(|(dev, len)| Op::AllocateLen { dev, len }),
        8 => (any::<u8>(), 0..10u8, prop::bool::weighted(0.9), 0..4u32)
            .prop_map(|(pick, n, known, seed)| Op::Append { pick, n, known, seed }),
        2 => any::<u8>().prop_map(|pick| Op::Fork { pick }),
        4 => any::<u8>().prop_map(|pick| Op::Free { pick }),
        1 => any::<u8>().prop_map(|pick| Op::FreeStale { pick }),
        1 => (any::<u8>(), any::<bool>(), any::<u8>()).prop_map(|(src, same_salt, frac)| Op::Share { src, same_salt, frac }),
        2 => any::<u8>().prop_map(|pick| Op::SwapOut { pick }),
        2 => (any::<u8>(), 0..2u8).prop_map(|(pick, dev)| Op::SwapIn { pick, dev }),
        1 => (any::<u8>(), 0..2u8).prop_map(|(pick, dev)| Op::Move { pick, dev }),
        3 => any::<u8>().prop_map(|pick| Op::Commit { pick }),
        2 => (any::<u8>(), any::<bool>()).prop_map(|(pick, garbage)| Op::Abort { pick, garbage }),
        1 => (0..3u8).prop_map(|pool| Op::Evict { pool }),
        2 => any::<u8>().prop_map(|pick| Op::Lookup { pick }),
        1 => (any::<u8>(), 0..16u8).prop_map(|(pick, w)| Op::Window { pick, w }),
        1 => (0..2u8, any::<u8>()).prop_map(|(dev, frac)| Op::Shrink { dev, frac }),
        1 => (0..2u8).prop_map(|dev| Op::Grow { dev }),
        1 => (0..3u8, any::<u8>(), any::<bool>()).prop_map(|(pool, protect, tail_first)| Op::Policy { pool, protect, tail_first }),
        2 => any::<u8>().prop_map(|pick| Op::Relocate { pick }),
        3 => (0..2u8, 0..3u8, 0..3u8, 0..48u8, prop::option::weighted(0.3, (any::<u8>(), any::<u8>())))
            .prop_map(|(dev, salt, base, prefix, dup)| Op::AllocateKeys { dev, salt, base, prefix, dup }),
        1 => Just(Op::AllocateHost),
        2 => (0..2u8, 0..3u8, 0..48u8, 0..12u8).prop_map(|(dev, base, prefix, chunk)| Op::AllocateChunk { dev, base, prefix, chunk }),
        2 => (any::<u8>(), 0..9u8).prop_map(|(pick, n)| Op::Reserve { pick, n }),
        2 => any::<u8>().prop_map(|pick| Op::Cow { pick }),
        1 => any::<u8>().prop_map(|pick| Op::SwapOutLossy { pick }),
        1 => (any::<u8>(), 0..2u8).prop_map(|(pick, dev)| Op::SwapInLossy { pick, dev }),
        2 => (0..2u8, 0..12u8).prop_map(|(dev, n)| Op::Offload { dev, n }),
        2 => (any::<u8>(), 0..2u8).prop_map(|(pick, dev)| Op::Promote { pick, dev }),
    ]
}

fn env(name: &str) -> Option<u32> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

fn cases() -> Option<u32> {
    env("PAGEDKV_MODEL_CASES")
}
/// Runs the model against random operation sequences; by default at least
/// 1,000,000 operations in all (asserted), or `PAGEDKV_MODEL_CASES` cases.
#[test]
fn cache_matches_model() {
    use proptest::test_runner::{Config, TestRunner};
    use std::sync::atomic::{AtomicU64, Ordering};
    static OPS: AtomicU64 = AtomicU64::new(0);
    static EVICTIONS: AtomicU64 = AtomicU64::new(0);
    static RUNS: [AtomicU64; 3] = [const { AtomicU64::new(0) }; 3];
    let config = Config {
        cases: cases().unwrap_or(3_500),
        max_shrink_iters: 20_000,
        failure_persistence: None,
        ..Config::default()
    };
    let mut runner = TestRunner::new(config);
    let result = runner.run(
        &prop::collection::vec(
            op(),
            1..=env("PAGEDKV_MODEL_MAX_OPS").unwrap_or(600) as usize,
        ),
        |ops| {
            let mut m = Model::new();
            for op in &ops {
                m.step(op);
            }
            m.drain();
            OPS.fetch_add(ops.len() as u64, Ordering::Relaxed);
            EVICTIONS.fetch_add(m.policy_evictions(), Ordering::Relaxed);
            for (total, n) in RUNS.iter().zip(m.run_stats()) {
                total.fetch_add(n, Ordering::Relaxed);
            }
            Ok(())
        },
    );
    if let Err(e) = result {
        panic!("{e}");
    }
    let ops = OPS.load(Ordering::Relaxed);
    let evictions = EVICTIONS.load(Ordering::Relaxed);
    let [splits, merges, trims] = RUNS.each_ref().map(|n| n.load(Ordering::Relaxed));
    println!(
        "model test: {ops} operations checked; {evictions} evictions checked against descendants; \
         runs: {splits} splits, {merges} merges, {trims} blocks evicted from inside a run"
    );
    if cases().is_none() {
        assert!(ops >= 1_000_000, "only {ops} operations");
        // The operations cover every change of a run (about 20,000 splits,
        // 300 merges and 100,000 trims in a default run).
        assert!(
            splits >= 1_000 && merges >= 100 && trims >= 1_000,
            "runs: {splits} splits, {merges} merges, {trims} trims"
        );
    }
}

/// The model over operations that keep chains in order (no sliding window,
/// move, swap, offload or shrink): every eviction the order chooses, under
/// random eviction policies switched mid-run, is checked against the
/// descendants still cached, on top of the model's own checks.
#[test]
fn evictions_never_orphan_descendants() {
    use proptest::test_runner::{Config, TestRunner};
    use std::sync::atomic::{AtomicU64, Ordering};
    static EVICTIONS: AtomicU64 = AtomicU64::new(0);
    let in_order = op().prop_map(|o| {
        let reorders = o.reorders_chains();
        // Replaced by a read-only lookup.
        if reorders { Op::Lookup { pick: 0 } } else { o }
    });
    let config = Config {
        cases: cases().map_or(600, |c| c / 4 + 1),
        failure_persistence: None,
        ..Config::default()
    };
    let result = TestRunner::new(config).run(
        &prop::collection::vec(
            in_order,
            1..=env("PAGEDKV_MODEL_MAX_OPS").unwrap_or(600) as usize,
        ),
        |ops| {
            let mut m = Model::new();
            for op in &ops {
                m.step(op);
            }
            m.drain();
            EVICTIONS.fetch_add(m.policy_evictions(), Ordering::Relaxed);
            Ok(())
        },
    );
    if let Err(e) = result {
        panic!("{e}");
    }
    let evictions = EVICTIONS.load(Ordering::Relaxed);
    println!("eviction check: {evictions} evictions checked against descendants");
    if cases().is_none() {
        assert!(evictions >= 5_000, "only {evictions} evictions checked");
    }
}

/// A short run from fixed bytes decoded as the fuzz target decodes its
/// input (`arbitrary`), small enough for miri: CI runs it there to catch
/// undefined behaviour and overflow in the core and its dependencies.
#[test]
fn short_seeded_run() {
    use arbitrary::{Arbitrary, Unstructured};
    let mut x = 0x2545_f491_4f6c_dd1d_u64;
    let bytes: Vec<u8> = (0..4096)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let mut u = Unstructured::new(&bytes);
    let mut m = Model::new();
    let mut n = 0;
    while n < 120 {
        let Ok(op) = Op::arbitrary(&mut u) else { break };
        m.step(&op);
        n += 1;
    }
    m.drain();
    assert!(n >= 100, "only {n} operations decoded");
}

/// Found by the fuzzer: prompts given as keys, one repeating a key, then
/// another. A key repeated in one prompt must end the prefix match, not hit
/// a second copy of the block (runs form only from cache-hashed chains, so
/// such a key is held once).
#[test]
fn a_repeated_key_never_hits_a_second_copy() {
    let keys = |dup| Op::AllocateKeys {
        dev: 177,
        salt: 177,
        base: 177,
        prefix: 177,
        dup,
    };
    let ops = [
        keys(Some((177, 177))),
        Op::Allocate {
            dev: 177,
            salt: 177,
            base: 177,
            prefix: 177,
            suffix: 177,
            seed: 2_981_212_593,
        },
        keys(Some((177, 177))),
        keys(Some((177, 218))),
        keys(None),
        keys(Some((177, 177))),
        keys(Some((41, 187))),
        Op::AllocateKeys {
            dev: 177,
            salt: 164,
            base: 48,
            prefix: 0,
            dup: None,
        },
    ];
    let mut m = Model::new();
    for op in &ops {
        m.step(op);
    }
    m.drain();
}
