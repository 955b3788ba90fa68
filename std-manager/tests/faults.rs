//! Fault injection: a backend that fails the k-th transfer or the k-th fence
//! poll, for every k, in swap out, swap in, move, compress and defragment.
//! After each failure: the error is typed, no block leaked, the request is
//! where it was with its KV intact (checksums), no target block of the failed
//! transfer was published, and a later prefix hit reads the original bytes.
#![allow(clippy::cast_possible_truncation, reason = "small test values")]

mod common;

use std::sync::atomic::Ordering;

use common::{Faulty, checksum, config, kv_bytes, layout, request};
use pagedkv_manager::{
    AdvancedKvCacheManager, BlockAllocator, Device, KvCacheManager, KvManager, ManagerError,
    MultiDeviceCacheManager, PrefixCacheConfig, RequestId,
};

#[derive(Clone, Copy, Debug, PartialEq)]
enum Op {
    SwapOut,
    SwapIn,
    Move,
    Compress,
    Defragment,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Fault {
    Transfer,
    Fence,
}

const A: RequestId = RequestId(1);

fn prompt() -> Vec<u32> {
    (0..48).map(|i| i * 7 + 1).collect()
}

fn on_gpu0(id: u64) -> pagedkv_manager::AllocationRequest {
    let mut r = request(id, prompt());
    r.device = Some(Device::Gpu(0));
    r
}

struct Setup {
    m: KvManager<Faulty>,
    knobs: std::sync::Arc<common::Knobs>,
    sums: Vec<u64>,
}

async fn setup(op: Op) -> Setup {
    let (be, knobs) = Faulty::new();
    let mut cfg = config(32);
    cfg.initial_blocks = 4; // regions of 4 blocks: A's 6 blocks span several
    cfg.host_blocks = 32;
    cfg.target_devices = vec![Device::Gpu(0), Device::Gpu(1)];
    cfg.prefix_cache_config = Some(PrefixCacheConfig::default());
    let m = KvManager::new(be, cfg).unwrap();
    let bb = layout().block_bytes().unwrap() as usize;
    // A filler below A, freed afterwards, so A sits high in the pool.
    let mut filler = request(9, vec![]);
    filler.initial_tokens = 13 * 8;
    filler.device = Some(Device::Gpu(0));
    let _f = m.allocate(&filler).await.unwrap();
    let a = m.allocate(&on_gpu0(A.0)).await.unwrap();
    std::mem::forget(a); // keep the handle alive for the whole test
    m.deallocate(RequestId(9)).await.unwrap();
    let sums = (0..6)
        .map(|i| {
            let d = kv_bytes(bb, 100 + i as u64);
            m.write_block(A, i, &d).unwrap();
            checksum(&d)
        })
        .collect();
    if op == Op::SwapIn {
        m.swap_out(A).await.unwrap();
    }
    knobs.reset();
    Setup { m, knobs, sums }
}

async fn run(m: &KvManager<Faulty>, op: Op) -> Result<(), ManagerError> {
    match op {
        Op::SwapOut => m.swap_out(A).await,
        Op::SwapIn => m.swap_in(A).await,
        Op::Move => m.move_cache(A, Device::Gpu(1)).await,
        Op::Compress => m.compress_cache(A, 0.51).await,
        Op::Defragment => m.defragment(),
    }
}

fn sums_now(m: &KvManager<Faulty>) -> Vec<u64> {
    (0..6)
        .map(|i| checksum(&m.read_block(A, i).unwrap()))
        .collect()
}

/// Per-pool counts unchanged; a compression pool created on first use is
/// empty.
fn assert_same(before: &[u32], now: &[u32], what: &str) {
    assert_eq!(now.get(..before.len()), Some(before), "{what}");
    assert!(
        now.iter().skip(before.len()).all(|&u| u == 0),
        "{what} (new pool)"
    );
}

#[tokio::test]
async fn every_fault_in_every_move_loses_nothing() {
    let mut checked = 0;
    for op in [
        Op::SwapOut,
        Op::SwapIn,
        Op::Move,
        Op::Compress,
        Op::Defragment,
    ] {
        for fault in [Fault::Transfer, Fault::Fence] {
            for k in 1.. {
                let s = setup(op).await;
                let place = s.m.get_cache_device(A);
                let used = s.m.used_blocks();
                let keys = s.m.indexed_keys();
                let table = s.m.get_handle(A).unwrap().block_table();
                match fault {
                    Fault::Transfer => s.knobs.fail_transfer.store(k, Ordering::SeqCst),
                    Fault::Fence => s.knobs.fail_poll.store(k, Ordering::SeqCst),
                }
                let r = run(&s.m, op).await;
                let Err(e) = r else {
                    // k is past the last transfer or poll: the move succeeded.
                    println!("{op:?}, {fault:?} faults: the move succeeded at k = {k}");
                    assert!(
                        k > 1 || fault == Fault::Fence || op == Op::Defragment,
                        "{op:?} never transferred"
                    );
                    s.knobs.reset();
                    s.m.swap_in(A).await.unwrap();
                    if op != Op::Compress {
                        assert_eq!(sums_now(&s.m), s.sums, "{op:?} succeeded but changed KV");
                    }
                    s.m.check_invariants().unwrap();
                    break;
                };
                checked += 1;
                let what = format!("{op:?}, {fault:?} fault #{k}");
                assert!(matches!(e, ManagerError::Backend { .. }), "{what}: {e}");
                assert_eq!(s.m.get_cache_device(A), place, "{what}: request moved");
                assert_eq!(
                    s.m.get_handle(A).unwrap().block_table(),
                    table,
                    "{what}: table changed"
                );
                assert_same(&used, &s.m.used_blocks(), &format!("{what}: blocks leaked"));
                assert_same(
                    &keys,
                    &s.m.indexed_keys(),
                    &format!("{what}: a target was published"),
                );
                s.m.check_invariants()
                    .unwrap_or_else(|i| panic!("{what}: {i}"));
                if op == Op::SwapIn {
                    // Still on the host: check its bytes there.
                    assert_eq!(sums_now(&s.m), s.sums, "{what}: KV damaged");
                    s.knobs.reset();
                    s.m.swap_in(A).await.unwrap();
                }
                assert_eq!(sums_now(&s.m), s.sums, "{what}: KV damaged");
                // A later prefix hit reads the original bytes, never a failed copy's.
                s.knobs.reset();
                let _b = s.m.allocate(&on_gpu0(2)).await.unwrap();
                assert_eq!(s.m.stats().device_hit_blocks, 6, "{what}: the prompt hits");
                let hit: Vec<u64> = (0..6)
                    .map(|i| checksum(&s.m.read_block(RequestId(2), i).unwrap()))
                    .collect();
                assert_eq!(hit, s.sums, "{what}: a prefix hit read other bytes");
                // And the same move now succeeds.
                if op != Op::SwapIn {
                    s.m.deallocate(RequestId(2)).await.unwrap();
                    run(&s.m, op)
                        .await
                        .unwrap_or_else(|e| panic!("{what}: retry failed: {e}"));
                    s.m.swap_in(A).await.unwrap();
                    assert_eq!(sums_now(&s.m).len(), 6);
                    if op != Op::Compress {
                        assert_eq!(sums_now(&s.m), s.sums, "{what}: retry changed KV");
                    }
                }
                s.m.check_invariants().unwrap();
                assert!(k < 100, "{what}: runaway");
            }
        }
    }
    // Each move here is several batches (A straddles regions), a fence each.
    assert!(checked >= 18, "only {checked} faults injected");
    println!("{checked} faults injected and recovered from");
}
