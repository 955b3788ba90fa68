//! The manager with real bytes on hal-host: KV survives every move, prefix
//! reuse works across tiers, compression stays within its bound, pressure
//! fires at crossings, gc reclaims, stats serialize.
#![allow(clippy::cast_possible_truncation, reason = "small test values")]

mod common;

use std::sync::{Arc, Mutex};

use common::scenarios::{self, block_bytes, fill, prompt, sums};
use common::{config, request};
use pagedkv_manager::{
    AdvancedKvCacheManager, BlockAllocator, Device, HostAdmission, HostBackend, HostManager,
    InvalidRequest, KvCacheManager, ManagerError, MemoryPressure, MultiDeviceCacheManager,
    PrefixCacheConfig, RequestId,
};

#[tokio::test]
async fn kv_bytes_survive_swap_move_defragment_and_growth() {
    let m = HostManager::new(HostBackend::new(), scenarios::swap_config(2)).unwrap();
    let handles = scenarios::swap_move_defragment(&m, 2).await;
    // Views address real memory: the first key byte of block 0 is the data.
    let v = handles[3].key_cache(0).unwrap().unwrap();
    // SAFETY: host memory of a live region; no transfer runs meanwhile.
    let first = unsafe { *(v.block_addrs[0] as *const u8) };
    assert_eq!(first, m.read_block(RequestId(3), 0).unwrap()[0]);
    scenarios::free_the_rest(&m).await;
}

#[tokio::test]
async fn compression_halves_the_bytes_within_the_bound() {
    let m = HostManager::new(HostBackend::new(), config(32)).unwrap();
    scenarios::compression_within_bound(&m).await;
}

#[tokio::test]
async fn prefix_hits_reuse_kv_and_the_host_tier_serves_evicted_prefixes() {
    let mut cfg = config(12);
    cfg.host_blocks = 32;
    cfg.offload_evicted_prefixes = true;
    cfg.prefix_cache_config = Some(PrefixCacheConfig::default());
    let m = HostManager::new(HostBackend::new(), cfg).unwrap();
    let p = prompt(64, 5);
    m.allocate(&request(1, p.clone())).await.unwrap();
    let want = fill(&m, RequestId(1), 8);
    m.deallocate(RequestId(1)).await.unwrap();
    // A hit on the device: same blocks, same bytes.
    m.allocate(&request(2, p.clone())).await.unwrap();
    assert_eq!(sums(&m, RequestId(2), 8), want);
    assert_eq!(m.stats().device_hit_blocks, 8);
    m.deallocate(RequestId(2)).await.unwrap();
    // Another prompt fills the device: the cached prefix is offloaded.
    m.allocate(&request(3, prompt(96, 77))).await.unwrap();
    assert!(
        m.indexed_keys()[1] >= 4,
        "prefix blocks offloaded to the host tier"
    );
    m.deallocate(RequestId(3)).await.unwrap();
    // The first prompt again: its blocks come back from the host by copy.
    m.allocate(&request(4, p.clone())).await.unwrap();
    let s = m.stats();
    assert!(s.host_hit_blocks >= 4, "{s:?}");
    assert_eq!(sums(&m, RequestId(4), 8), want, "KV brought back intact");
    m.check_invariants().unwrap();
}

/// Issue 14: with second-touch admission, a one-off prompt's blocks are
/// evicted without a copy, and a prompt asked for twice goes to the host
/// tier and comes back intact; admitting every block copies both.
#[tokio::test]
async fn second_touch_admission_keeps_one_off_prompts_off_the_host_tier() {
    for admission in [HostAdmission::Every, HostAdmission::SecondTouch] {
        let mut cfg = config(24);
        cfg.host_blocks = 32;
        cfg.offload_evicted_prefixes = true;
        cfg.host_admission = admission;
        cfg.prefix_cache_config = Some(PrefixCacheConfig::default());
        let m = HostManager::new(HostBackend::new(), cfg).unwrap();
        let (once, twice) = (prompt(64, 5), prompt(64, 9));
        m.allocate(&request(1, once.clone())).await.unwrap();
        m.deallocate(RequestId(1)).await.unwrap();
        m.allocate(&request(2, twice.clone())).await.unwrap();
        let want = fill(&m, RequestId(2), 8);
        m.deallocate(RequestId(2)).await.unwrap();
        m.allocate(&request(3, twice.clone())).await.unwrap();
        m.deallocate(RequestId(3)).await.unwrap();
        // A 24-block prompt evicts both cached prompts from the device.
        m.allocate(&request(4, prompt(192, 77))).await.unwrap();
        m.deallocate(RequestId(4)).await.unwrap();
        let s = m.stats();
        let second = admission == HostAdmission::SecondTouch;
        assert_eq!(s.offloaded_blocks, if second { 8 } else { 16 }, "{s:?}");
        assert_eq!(s.not_admitted_blocks, if second { 8 } else { 0 }, "{s:?}");
        assert_eq!(u64::from(m.indexed_keys()[1]), s.offloaded_blocks);
        // The one-off prompt again: from the host tier only if admitted.
        m.allocate(&request(5, once.clone())).await.unwrap();
        assert_eq!(m.stats().host_hit_blocks, if second { 0 } else { 8 });
        m.deallocate(RequestId(5)).await.unwrap();
        // The reused one comes back by copy, its KV intact.
        let before = m.stats().host_hit_blocks;
        m.allocate(&request(6, twice.clone())).await.unwrap();
        assert_eq!(m.stats().host_hit_blocks - before, 8);
        assert_eq!(sums(&m, RequestId(6), 8), want);
        m.deallocate(RequestId(6)).await.unwrap();
        m.check_invariants().unwrap();
    }
}

#[tokio::test]
async fn pressure_callback_fires_exactly_at_crossings() {
    let mut cfg = config(20);
    cfg.pressure_hysteresis = 0.0;
    let m = HostManager::new(HostBackend::new(), cfg).unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s2 = Arc::clone(&seen);
    m.set_pressure_callback(Box::new(move |l| s2.lock().unwrap().push(l)));
    // Walk utilization up one block (5%) at a time, then down.
    for id in 0..20u64 {
        m.allocate(&request(id, prompt(8, id as u32)))
            .await
            .unwrap();
    }
    for id in 0..20u64 {
        m.deallocate(RequestId(id)).await.unwrap();
    }
    use MemoryPressure::*;
    // Up: 12/20 = 0.6 Medium, 16/20 = 0.8 High, 19/20 = 0.95 Critical.
    // Down: below 0.95 at 18, below 0.8 at 15, below 0.6 at 11.
    assert_eq!(
        *seen.lock().unwrap(),
        vec![Medium, High, Critical, High, Medium, Low]
    );
}

#[tokio::test]
async fn gc_reclaims_idle_requests_and_expired_prefixes() {
    let mut cfg = config(32);
    cfg.prefix_cache_config = Some(PrefixCacheConfig {
        max_prefixes: 3,
        ..PrefixCacheConfig::default()
    });
    cfg.request_ttl_seconds = Some(1);
    let m = HostManager::new(HostBackend::new(), cfg).unwrap();
    let keep = m.allocate(&request(1, prompt(16, 1))).await.unwrap();
    drop(m.allocate(&request(2, prompt(32, 2))).await.unwrap());
    // The manager owns a request until deallocate: a dropped handle frees
    // nothing.
    let gc = m.gc().await.unwrap();
    assert_eq!(gc.caches_freed, 0);
    assert!(m.get_handle(RequestId(2)).is_some_and(|h| h.is_valid()));
    // Idle past request_ttl_seconds: freed; the request extended meanwhile
    // stays.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    m.extend(RequestId(1), 1).await.unwrap();
    let gc = m.gc().await.unwrap();
    assert_eq!(gc.caches_freed, 1);
    assert_eq!(gc.memory_freed, 4 * block_bytes());
    assert!(keep.is_valid());
    assert!(m.get_handle(RequestId(2)).is_none());
    // max_prefixes: at most 3 cached blocks remain.
    assert!(m.pool_stats()[0].blocks_cached <= 3);
    // TTL: with a zero-second TTL... use 1 s and an old release stamp.
    m.enable_prefix_caching(PrefixCacheConfig {
        prefix_ttl_seconds: 1,
        ..PrefixCacheConfig::default()
    })
    .await
    .unwrap();
    m.deallocate(RequestId(1)).await.unwrap();
    assert!(m.pool_stats()[0].blocks_cached > 0);
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    let gc = m.gc().await.unwrap();
    assert!(gc.prefixes_expired > 0);
    assert_eq!(m.pool_stats()[0].blocks_cached, 0);
}

#[tokio::test]
async fn share_prefix_fork_and_stats_json() {
    let mut cfg = config(32);
    cfg.prefix_cache_config = Some(PrefixCacheConfig::default());
    let m = HostManager::new(HostBackend::new(), cfg.clone()).unwrap();
    let a = m.allocate(&request(1, prompt(20, 3))).await.unwrap();
    let mut empty = request(2, vec![]);
    empty.initial_tokens = 0;
    let b = m.allocate(&empty).await.unwrap();
    m.share_prefix(RequestId(1), RequestId(2), 16)
        .await
        .unwrap();
    assert_eq!(
        b.block_table().physical_blocks[..2],
        a.block_table().physical_blocks[..2]
    );
    let c = m.fork(RequestId(1), RequestId(3)).await.unwrap();
    m.extend_tokens(RequestId(3), &[1, 2]).await.unwrap();
    assert_ne!(
        c.block_table().physical_blocks[2],
        a.block_table().physical_blocks[2],
        "copy-on-write"
    );
    let json = serde_json::to_string(&m.stats()).unwrap();
    let back: pagedkv_manager::CacheManagerStats = serde_json::from_str(&json).unwrap();
    assert_eq!(back, m.stats());
    let cj = serde_json::to_string(&cfg).unwrap();
    assert_eq!(
        serde_json::from_str::<pagedkv_manager::ManagerConfig>(&cj).unwrap(),
        cfg
    );
    m.check_invariants().unwrap();
}

#[tokio::test]
async fn bad_requests_are_typed_errors() {
    let m = HostManager::new(HostBackend::new(), config(8)).unwrap();
    let mut r = request(1, prompt(16, 0));
    r.num_layers = 7;
    assert!(matches!(
        m.allocate(&r).await,
        Err(ManagerError::InvalidRequest(InvalidRequest::Layout {
            what: "num_layers",
            got: 7,
            want: 2
        }))
    ));
    assert!(matches!(
        m.allocate(&request(2, prompt(80, 0))).await,
        Err(ManagerError::Core(_))
    ));
    m.allocate(&request(3, prompt(8, 0))).await.unwrap();
    assert!(matches!(
        m.allocate(&request(3, prompt(8, 0))).await,
        Err(ManagerError::DuplicateRequest(_))
    ));
    assert!(matches!(
        m.extend(RequestId(9), 1).await,
        Err(ManagerError::UnknownRequest(_))
    ));
    assert!(matches!(
        m.swap_out(RequestId(3)).await,
        Err(ManagerError::NoHostTier)
    ));
    assert!(matches!(
        m.move_cache(RequestId(3), Device::Gpu(5)).await,
        Err(ManagerError::UnknownDevice(_))
    ));
    assert!(matches!(
        m.free_blocks(&[pagedkv_manager::BlockId(0)]),
        Err(ManagerError::NotAnAllocation)
    ));
    let raw = m.allocate_blocks(3).unwrap();
    m.free_blocks(&raw).unwrap();
    m.check_invariants().unwrap();
    assert!(m.used_blocks()[0] == 1);
}

#[tokio::test]
async fn rebalance_and_device_stats() {
    let mut cfg = config(32);
    cfg.target_devices = vec![Device::Gpu(0), Device::Gpu(1)];
    let m = HostManager::new(HostBackend::new(), cfg).unwrap();
    m.set_device_preference(vec![Device::Gpu(0)]);
    for id in 0..6u64 {
        let mut r = request(id, prompt(32, id as u32));
        r.device = Some(Device::Gpu(0));
        std::mem::forget(m.allocate(&r).await.unwrap());
    }
    let s = m.device_stats();
    assert_eq!(s[&Device::Gpu(0)].active_caches, 6);
    assert_eq!(s[&Device::Gpu(1)].active_caches, 0);
    m.rebalance_devices().await.unwrap();
    let s = m.device_stats();
    let u = |d: Device| s[&d].used_memory_bytes as f32 / s[&d].total_memory_bytes as f32;
    assert!(
        (u(Device::Gpu(0)) - u(Device::Gpu(1))).abs() <= 0.1 + 1e-6,
        "{s:?}"
    );
    assert_eq!(
        s[&Device::Gpu(0)].active_caches + s[&Device::Gpu(1)].active_caches,
        6
    );
    m.check_invariants().unwrap();
}

#[tokio::test]
async fn prefix_config_is_honoured() {
    let mut cfg = config(64);
    cfg.prefix_cache_config = Some(PrefixCacheConfig {
        min_prefix_length: 40,
        ..PrefixCacheConfig::default()
    });
    let m = HostManager::new(HostBackend::new(), cfg).unwrap();
    // Too short to use the cache.
    for id in [1, 2] {
        m.allocate(&request(id, prompt(16, 0))).await.unwrap();
        m.deallocate(RequestId(id)).await.unwrap();
    }
    assert_eq!(m.stats().device_hit_blocks, 0);
    for id in [3, 4] {
        m.allocate(&request(id, prompt(48, 0))).await.unwrap();
        m.deallocate(RequestId(id)).await.unwrap();
    }
    assert_eq!(m.stats().device_hit_blocks, 6);
    // No sharing across requests: each its own salt.
    m.enable_prefix_caching(PrefixCacheConfig {
        enable_cross_request_sharing: false,
        ..PrefixCacheConfig::default()
    })
    .await
    .unwrap();
    for id in [5, 6] {
        m.allocate(&request(id, prompt(48, 0))).await.unwrap();
        m.deallocate(RequestId(id)).await.unwrap();
    }
    assert_eq!(m.stats().device_hit_blocks, 6);
}

#[tokio::test]
async fn a_pluggable_policy_picks_the_victims() {
    let mut cfg = config(16);
    cfg.host_blocks = 32;
    cfg.preemption = pagedkv_manager::PreemptionPolicy::Automatic;
    let m = pagedkv_manager::KvManager::with_policy(
        HostBackend::new(),
        cfg,
        std::sync::Arc::new(pagedkv_manager::PriorityEvictionPolicy::new()),
    )
    .unwrap();
    let mut low = request(1, prompt(64, 1));
    low.priority = pagedkv_manager::Priority::Low;
    let mut high = request(2, prompt(64, 2));
    high.priority = pagedkv_manager::Priority::High;
    let _l = m.allocate(&low).await.unwrap();
    let _h = m.allocate(&high).await.unwrap();
    // A third request needs room: the low-priority one is preempted.
    let n = m
        .allocate_request(&request(3, prompt(64, 3)))
        .await
        .unwrap();
    // Reported, never silent: in the answer and as an event.
    let want = pagedkv_manager::Preemption {
        request: RequestId(1),
        mode: pagedkv_manager::PreemptMode::Swap,
        blocks: 8,
    };
    assert_eq!(n.preempted, vec![want]);
    let mut events = Vec::new();
    m.drain_events(&mut events);
    assert_eq!(events, vec![pagedkv_manager::ManagerEvent::Preempted(want)]);
    assert_eq!(m.get_cache_device(RequestId(1)), Some(Device::Cpu));
    assert_eq!(m.get_cache_device(RequestId(2)), Some(Device::Gpu(0)));
    assert_eq!(m.stats().swap_outs, 1);
    m.check_invariants().unwrap();
}
