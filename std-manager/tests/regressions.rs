//! Regression tests of the defects found by probing the manager as a hostile
//! caller would (issue 8): each failed on the code before its fix.
#![allow(clippy::cast_possible_truncation, reason = "small test values")]

mod common;

use std::future::Future;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, Waker};

use common::{Faulty, checksum, config, kv_bytes, layout, request};
use pagedkv_manager::{
    AdvancedKvCacheManager, HostBackend, HostManager, KvCacheManager, KvManager, ManagerError,
    PrefixCacheConfig, RequestId,
};

const BS: usize = 8;

fn prompt(n: u32, seed: u32) -> Vec<u32> {
    (0..n).map(|i| i * 13 + seed).collect()
}

fn block_bytes() -> usize {
    layout().block_bytes().unwrap() as usize
}

/// Polls a future once, then drops it (a request aborted mid-call).
fn poll_once_then_drop<F: Future>(f: F) -> bool {
    let mut f = std::pin::pin!(f);
    let mut cx = Context::from_waker(Waker::noop());
    matches!(f.as_mut().poll(&mut cx), Poll::Ready(_))
}

fn assert_nothing_held<B: pagedkv_manager::ManagedBackend>(m: &KvManager<B>) {
    m.check_invariants().unwrap();
    assert!(
        m.used_blocks().iter().all(|&u| u == 0),
        "blocks still held: {:?}",
        m.used_blocks()
    );
}

/// Defect 1 through the manager: a key repeated in `block_keys` leaked a
/// block for good.
#[tokio::test]
async fn d01_repeated_block_keys_leak_nothing() {
    let mut cfg = config(4);
    cfg.prefix_cache_config = Some(PrefixCacheConfig::default());
    cfg.enable_pooling = false;
    let m = HostManager::new(HostBackend::new(), cfg).unwrap();
    let mut r = request(1, Vec::new());
    r.initial_tokens = BS;
    r.block_keys = vec![42];
    m.allocate(&r).await.unwrap();
    m.deallocate(RequestId(1)).await.unwrap();
    let mut held = request(2, Vec::new());
    held.initial_tokens = 3 * BS;
    m.allocate(&held).await.unwrap();
    let mut dup = request(3, Vec::new());
    dup.initial_tokens = 3 * BS;
    dup.block_keys = vec![42, 42, 42];
    assert!(m.allocate(&dup).await.is_err(), "no room: refused");
    m.deallocate(RequestId(2)).await.unwrap();
    m.allocate(&dup).await.unwrap();
    m.deallocate(RequestId(3)).await.unwrap();
    assert_nothing_held(&m);
}

/// Defect 2: when the copy-on-write copy failed, `extend` returned an error
/// but the request had grown (12 -> 13 tokens), its partial block held
/// garbage and the original was released.
#[tokio::test]
async fn d02_a_failed_copy_on_write_changes_nothing() {
    let (be, knobs) = Faulty::new();
    let m = KvManager::new(be, config(16)).unwrap();
    let a = m.allocate(&request(1, prompt(12, 1))).await.unwrap();
    for i in 0..2 {
        m.write_block(RequestId(1), i, &kv_bytes(block_bytes(), i as u64))
            .unwrap();
    }
    let b = m.fork(RequestId(1), RequestId(2)).await.unwrap();
    let (table, sum) = (
        b.block_table(),
        checksum(&m.read_block(RequestId(2), 1).unwrap()),
    );
    let used = m.used_blocks();
    knobs
        .fail_transfer
        .store(knobs.transfers.load(Ordering::SeqCst) + 1, Ordering::SeqCst);
    let e = m.extend(RequestId(2), 1).await.unwrap_err();
    assert!(matches!(e, ManagerError::Backend { .. }), "{e}");
    assert_eq!(b.num_tokens(), 12, "the request did not grow");
    assert_eq!(b.block_table(), table, "its table did not change");
    assert_eq!(m.used_blocks(), used, "nothing held, nothing released");
    assert_eq!(checksum(&m.read_block(RequestId(2), 1).unwrap()), sum);
    m.check_invariants().unwrap();
    // A retry copies, and the copy holds the shared block's KV.
    m.extend(RequestId(2), 1).await.unwrap();
    assert_eq!(b.num_tokens(), 13);
    assert_ne!(b.block_table().physical_blocks[1], table.physical_blocks[1]);
    assert_eq!(checksum(&m.read_block(RequestId(2), 1).unwrap()), sum);
    assert_eq!(a.num_tokens(), 12);
    for id in [1, 2] {
        m.deallocate(RequestId(id)).await.unwrap();
    }
    assert_nothing_held(&m);
}

/// Defect 3: compress a request, evict the exact cached copies, decompress:
/// the int8-rounded blocks were published under the exact prefix keys, and
/// a later request with the same prompt hit lossy KV.
#[tokio::test]
async fn d03_compressed_kv_is_never_served_as_exact() {
    let mut cfg = config(16);
    cfg.prefix_cache_config = Some(PrefixCacheConfig::default());
    let m = HostManager::new(HostBackend::new(), cfg).unwrap();
    let p = prompt(32, 5);
    m.allocate(&request(1, p.clone())).await.unwrap();
    for i in 0..4 {
        m.write_block(RequestId(1), i, &kv_bytes(block_bytes(), 100 + i as u64))
            .unwrap();
    }
    m.compress_cache(RequestId(1), 0.6).await.unwrap();
    // The exact copies left behind are evicted.
    m.enable_prefix_caching(PrefixCacheConfig {
        max_prefixes: 0,
        ..PrefixCacheConfig::default()
    })
    .await
    .unwrap();
    m.enable_prefix_caching(PrefixCacheConfig::default())
        .await
        .unwrap();
    m.swap_in(RequestId(1)).await.unwrap(); // decompressed
    m.extend(RequestId(1), 1).await.unwrap();
    m.deallocate(RequestId(1)).await.unwrap();
    let hits = m.stats().device_hit_blocks;
    m.allocate(&request(2, p)).await.unwrap();
    assert_eq!(
        m.stats().device_hit_blocks,
        hits,
        "a prefix hit served decompressed (lossy) KV as exact"
    );
    m.deallocate(RequestId(2)).await.unwrap();
    assert_nothing_held(&m);
}

/// Defect 4: an `allocate` dropped while a tier move (promotion, offload)
/// waited on a slow fence leaked its pinned blocks for ever, and the
/// invariant check passed because a side list hid them.
#[tokio::test]
async fn d04_an_allocation_dropped_mid_tier_move_leaks_nothing() {
    let (be, knobs) = Faulty::new();
    let mut cfg = config(8);
    cfg.enable_pooling = false;
    cfg.host_blocks = 16;
    cfg.prefix_cache_config = Some(PrefixCacheConfig::default());
    cfg.offload_evicted_prefixes = true;
    let m = KvManager::new(be, cfg).unwrap();
    let (p, q) = (prompt(48, 1), prompt(48, 2));
    m.allocate(&request(1, p.clone())).await.unwrap();
    m.deallocate(RequestId(1)).await.unwrap();
    // q evicts p's blocks from the 8-block device: they are offloaded first.
    m.allocate(&request(2, q.clone())).await.unwrap();
    m.deallocate(RequestId(2)).await.unwrap();
    assert!(m.stats().eviction_count > 0);
    knobs.slow_polls.store(5, Ordering::SeqCst);
    let mut pending = 0;
    for id in 3..6 {
        // p again: its blocks are promoted back from the host tier (and q's
        // offloaded to make room); the call is dropped on a slow fence.
        pending += usize::from(!poll_once_then_drop(m.allocate(&request(id, p.clone()))));
        m.check_invariants().unwrap();
        assert_nothing_held(&m);
    }
    assert!(pending >= 2, "only {pending} allocations were pending");
    knobs.slow_polls.store(0, Ordering::SeqCst);
    m.allocate(&request(9, p)).await.unwrap();
    assert!(m.stats().host_hit_blocks > 0, "the host tier still serves");
    m.deallocate(RequestId(9)).await.unwrap();
    assert_nothing_held(&m);
}

/// Defect 5: dropping a manager freed no region (20 managers created and
/// dropped left 1.6 GB resident).
#[tokio::test]
async fn d05_dropping_a_manager_frees_every_region() {
    let (be, knobs) = Faulty::new();
    let mut cfg = config(64);
    cfg.initial_blocks = 8; // several regions per pool once grown
    cfg.host_blocks = 16;
    let m = KvManager::new(be, cfg).unwrap();
    let h = m.allocate(&request(1, prompt(200, 1))).await.unwrap();
    assert!(knobs.live_regions.load(Ordering::SeqCst) > 3);
    drop(m);
    assert!(
        knobs.live_regions.load(Ordering::SeqCst) > 0,
        "a live handle keeps the memory it views"
    );
    drop(h);
    assert_eq!(knobs.live_regions.load(Ordering::SeqCst), 0);
    // A configuration refused half way frees what it had created.
    let (be, knobs) = Faulty::new();
    let mut cfg = config(8);
    cfg.pressure_hysteresis = 2.0;
    assert!(KvManager::new(be, cfg).is_err());
    assert_eq!(knobs.live_regions.load(Ordering::SeqCst), 0);
}

/// Defect 13: `prefix_ttl_seconds = u64::MAX` ("never expire") overflowed
/// in `gc` and evicted every prefix.
#[tokio::test]
async fn d13_the_longest_ttl_never_expires() {
    let mut cfg = config(16);
    cfg.prefix_cache_config = Some(PrefixCacheConfig {
        prefix_ttl_seconds: u64::MAX,
        ..PrefixCacheConfig::default()
    });
    let m = HostManager::new(HostBackend::new(), cfg).unwrap();
    m.allocate(&request(1, prompt(32, 3))).await.unwrap();
    // Released a second or more after the manager started: `at + ttl`
    // overflowed where `at` was not zero.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    m.deallocate(RequestId(1)).await.unwrap();
    let gc = m.gc().await.unwrap();
    assert_eq!(gc.prefixes_expired, 0);
    let hits = m.stats().device_hit_blocks;
    m.allocate(&request(2, prompt(32, 3))).await.unwrap();
    assert_eq!(m.stats().device_hit_blocks, hits + 4);
}
