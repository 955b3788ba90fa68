//! Model-based test of the manager: random request sequences (allocate,
//! extend, fork, swap, compress, move, defragment, gc, free, cancelled
//! calls, unknown ids) on real host memory against a model of every
//! block's KV (see `pagedkv_tests::manager_model`). At least 100,000
//! operations per run (`PAGEDKV_MANAGER_CASES` cases to change it).

use pagedkv_tests::manager_model::{MOp, ManagerModel};
use proptest::prelude::*;

fn op() -> impl Strategy<Value = MOp> {
    prop_oneof![
        6 => (any::<u8>(), any::<u8>(), any::<u8>(), any::<u8>(), any::<u8>(), any::<u8>()).prop_map(
            |(tenant, base, prefix, suffix, seed, dev)| MOp::Allocate { tenant, base, prefix, suffix, seed, dev }),
        8 => (any::<u8>(), any::<u8>(), any::<bool>()).prop_map(|(pick, n, known)| MOp::Extend { pick, n, known }),
        2 => any::<u8>().prop_map(|pick| MOp::Fork { pick }),
        2 => any::<u8>().prop_map(|pick| MOp::SwapOut { pick }),
        2 => any::<u8>().prop_map(|pick| MOp::SwapIn { pick }),
        1 => any::<u8>().prop_map(|pick| MOp::Compress { pick }),
        1 => (any::<u8>(), any::<u8>()).prop_map(|(pick, dev)| MOp::Move { pick, dev }),
        1 => Just(MOp::Defragment),
        1 => Just(MOp::Gc),
        4 => any::<u8>().prop_map(|pick| MOp::Free { pick }),
        2 => (any::<u8>(), any::<u8>()).prop_map(|(op, pick)| MOp::Cancel { op, pick }),
        1 => any::<u8>().prop_map(|which| MOp::Unknown { which }),
    ]
}

#[test]
fn manager_matches_model() {
    use proptest::test_runner::{Config, TestRunner};
    use std::sync::atomic::{AtomicU64, Ordering};
    static OPS: AtomicU64 = AtomicU64::new(0);
    static HITS: AtomicU64 = AtomicU64::new(0);
    static CANCELLED: AtomicU64 = AtomicU64::new(0);
    let cases: Option<u32> = std::env::var("PAGEDKV_MANAGER_CASES")
        .ok()
        .and_then(|v| v.parse().ok());
    let config = Config {
        cases: cases.unwrap_or(700),
        max_shrink_iters: 5_000,
        failure_persistence: None,
        ..Config::default()
    };
    let mut runner = TestRunner::new(config);
    let result = runner.run(&prop::collection::vec(op(), 1..=300), |ops| {
        let mut m = ManagerModel::new();
        for op in &ops {
            m.step(op);
        }
        m.drain();
        OPS.fetch_add(m.ops, Ordering::Relaxed);
        HITS.fetch_add(m.hits, Ordering::Relaxed);
        CANCELLED.fetch_add(m.cancelled, Ordering::Relaxed);
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    let (ops, hits, cancelled) = (
        OPS.load(Ordering::Relaxed),
        HITS.load(Ordering::Relaxed),
        CANCELLED.load(Ordering::Relaxed),
    );
    println!(
        "manager model: {ops} operations, {hits} prefix hits checked, {cancelled} calls cancelled mid-move"
    );
    assert!(
        hits > 1_000 && cancelled > 100,
        "the model exercised too little"
    );
    if cases.is_none() {
        assert!(ops >= 100_000, "only {ops} operations");
    }
}
