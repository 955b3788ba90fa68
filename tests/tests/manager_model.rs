//! Model-based test of the manager: random request sequences (allocate,
//! extend, fork, swap, compress, move, defragment, gc, free, cancelled
//! calls, unknown ids, batched decode steps with kernel tables, scheduler
//! preemption) on real host memory against a model of every block's KV and
//! every answer (see `pagedkv_tests::manager_model`), half the cases under
//! each preemption policy. At least 100,000 operations per run
//! (`PAGEDKV_MANAGER_CASES` cases to change it).

use pagedkv_manager::PreemptionPolicy;
use pagedkv_tests::manager_model::{MOp, ManagerModel};
use proptest::prelude::*;

fn op() -> impl Strategy<Value = MOp> {
    prop_oneof![
        6 => (any::<u8>(), any::<u8>(), any::<u8>(), any::<u8>(), any::<u8>(), any::<u8>(), any::<u8>()).prop_map(
            |(tenant, base, prefix, suffix, seed, dev, chunk)| MOp::Allocate { tenant, base, prefix, suffix, seed, dev, chunk }),
        8 => (any::<u8>(), any::<u8>(), any::<bool>(), any::<u8>()).prop_map(|(pick, n, known, look)| MOp::Extend { pick, n, known, look }),
        3 => (any::<u8>(), any::<u8>(), any::<u8>()).prop_map(|(first, count, look)| MOp::Batch { first, count, look }),
        1 => (any::<u8>(), any::<bool>()).prop_map(|(pick, recompute)| MOp::Preempt { pick, recompute }),
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
    static PREEMPTIONS: AtomicU64 = AtomicU64::new(0);
    static BATCHED: AtomicU64 = AtomicU64::new(0);
    static COPIES: AtomicU64 = AtomicU64::new(0);
    static LOOKAHEADS: AtomicU64 = AtomicU64::new(0);
    static CHUNKED: AtomicU64 = AtomicU64::new(0);
    static EVENTS: AtomicU64 = AtomicU64::new(0);
    let cases: Option<u32> = std::env::var("PAGEDKV_MANAGER_CASES")
        .ok()
        .and_then(|v| v.parse().ok());
    let config = Config {
        // 760 cases of 1-300 operations: 114,000 expected, and 100,000 is
        // six standard deviations below (700 cases missed it 1% of runs).
        cases: cases.unwrap_or(760),
        max_shrink_iters: 5_000,
        failure_persistence: None,
        ..Config::default()
    };
    let mut runner = TestRunner::new(config);
    let strategy = (any::<bool>(), prop::collection::vec(op(), 1..=300));
    let result = runner.run(&strategy, |(scheduler, ops)| {
        let policy = if scheduler {
            PreemptionPolicy::Scheduler
        } else {
            PreemptionPolicy::Automatic
        };
        let mut m = ManagerModel::with_policy(policy);
        for op in &ops {
            m.step(op);
        }
        m.drain();
        OPS.fetch_add(m.ops, Ordering::Relaxed);
        HITS.fetch_add(m.hits, Ordering::Relaxed);
        CANCELLED.fetch_add(m.cancelled, Ordering::Relaxed);
        PREEMPTIONS.fetch_add(m.preemptions, Ordering::Relaxed);
        BATCHED.fetch_add(m.batched, Ordering::Relaxed);
        COPIES.fetch_add(m.copies, Ordering::Relaxed);
        LOOKAHEADS.fetch_add(m.lookaheads, Ordering::Relaxed);
        CHUNKED.fetch_add(m.chunked, Ordering::Relaxed);
        EVENTS.fetch_add(m.events, Ordering::Relaxed);
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let (ops, hits, cancelled) = (load(&OPS), load(&HITS), load(&CANCELLED));
    let (preemptions, batched, copies) = (load(&PREEMPTIONS), load(&BATCHED), load(&COPIES));
    let (lookaheads, chunked, events) = (load(&LOOKAHEADS), load(&CHUNKED), load(&EVENTS));
    println!(
        "manager model: {ops} operations, {hits} prefix hits checked, {cancelled} calls cancelled mid-move, \
         {preemptions} preemptions reported, {batched} batch items exported, {copies} copies answered, \
         {lookaheads} extensions with lookahead, {chunked} chunked prefills, {events} events mirrored"
    );
    assert!(
        hits > 1_000 && cancelled > 100,
        "the model exercised too little"
    );
    if cases.is_none() {
        assert!(
            preemptions > 100
                && batched > 1_000
                && copies > 100
                && lookaheads > 1_000
                && chunked > 100
                && events > 1_000,
            "the engine calls were exercised too little"
        );
    }
    if cases.is_none() {
        assert!(ops >= 100_000, "only {ops} operations");
    }
}
