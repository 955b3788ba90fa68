//! Scenarios every backend runs: the host tests (`manager.rs`) and the GPU
//! ones (`cuda.rs`) call the same functions, so the manager's swap, move,
//! defragment and compression are checked byte for byte on each.

use std::sync::Arc;

use pagedkv_manager::{
    AdvancedKvCacheManager, BlockAllocator, Device, KvCacheHandle, KvCacheManager, KvManager,
    ManagedBackend, ManagerConfig, ManagerError, MultiDeviceCacheManager, RequestId,
};

use super::{checksum, config, kv_bytes, layout, request};

pub fn block_bytes() -> usize {
    layout().block_bytes().unwrap() as usize
}

pub fn fill<B: ManagedBackend>(m: &KvManager<B>, id: RequestId, blocks: usize) -> Vec<u64> {
    (0..blocks)
        .map(|i| {
            let data = kv_bytes(block_bytes(), id.0 * 1000 + i as u64);
            m.write_block(id, i, &data).unwrap();
            checksum(&data)
        })
        .collect()
}

pub fn sums<B: ManagedBackend>(m: &KvManager<B>, id: RequestId, blocks: usize) -> Vec<u64> {
    (0..blocks)
        .map(|i| checksum(&m.read_block(id, i).unwrap()))
        .collect()
}

pub fn prompt(n: u32, salt: u32) -> Vec<u32> {
    (0..n).map(|i| i * 13 + salt).collect()
}

/// The configuration of [`swap_move_defragment`]: 64 blocks per device,
/// 16 backed at start, a 64-block host tier, `devices` devices.
pub fn swap_config(devices: u16) -> ManagerConfig {
    let mut cfg = config(64);
    cfg.initial_blocks = 16;
    cfg.host_blocks = 64;
    cfg.target_devices = (0..devices).map(Device::Gpu).collect();
    cfg
}

/// Growth, swap out and in, a move to device 1 (with two devices), then
/// defragment: the bytes of every request survive each step. Requests 2, 3
/// and 4 stay allocated; their handles are returned.
pub async fn swap_move_defragment<B: ManagedBackend>(
    m: &KvManager<B>,
    devices: usize,
) -> Vec<Arc<dyn KvCacheHandle>> {
    let mut handles = Vec::new();
    let mut want = Vec::new();
    for id in 0..5u64 {
        let h = m
            .allocate(&request(id, prompt(64, id as u32)))
            .await
            .unwrap();
        want.push(fill(m, RequestId(id), 8));
        handles.push(h);
    }
    // 40 blocks on pools backed for 16 at start: a pool grew by a region.
    assert!(m.total_block_count() > 16 * devices, "a device pool grew");
    for id in 0..5u64 {
        assert_eq!(sums(m, RequestId(id), 8), want[id as usize], "after growth");
    }
    m.swap_out(RequestId(1)).await.unwrap();
    assert_eq!(handles[1].device(), Device::Cpu);
    assert!(
        handles[1].key_cache(0).unwrap().is_none(),
        "not addressable while swapped out"
    );
    assert_eq!(sums(m, RequestId(1), 8), want[1], "on the host tier");
    m.swap_in(RequestId(1)).await.unwrap();
    assert_eq!(sums(m, RequestId(1), 8), want[1], "after swap in");
    if devices > 1 {
        m.move_cache(RequestId(2), Device::Gpu(1)).await.unwrap();
        assert_eq!(m.get_cache_device(RequestId(2)), Some(Device::Gpu(1)));
        assert_eq!(sums(m, RequestId(2), 8), want[2], "after move");
    }
    m.deallocate(RequestId(0)).await.unwrap();
    m.deallocate(RequestId(1)).await.unwrap();
    let before = m.total_block_count();
    m.defragment().unwrap();
    assert!(
        m.total_block_count() < before,
        "pool shrank: {} -> {}",
        before,
        m.total_block_count()
    );
    for id in [2u64, 3, 4] {
        assert_eq!(
            sums(m, RequestId(id), 8),
            want[id as usize],
            "after defragment"
        );
        let t = handles[id as usize].block_table();
        assert!(
            t.physical_blocks
                .iter()
                .all(|b| (b.0 as usize) < m.total_block_count())
        );
    }
    m.check_invariants().unwrap();
    handles
}

/// Frees requests 2, 3 and 4 of [`swap_move_defragment`]; nothing stays used.
pub async fn free_the_rest<B: ManagedBackend>(m: &KvManager<B>) {
    for id in [2u64, 3, 4] {
        m.deallocate(RequestId(id)).await.unwrap();
    }
    assert!(m.used_blocks().iter().all(|&u| u == 0));
}

/// Compression to int8 halves the bytes; running the request again
/// restores them within hal-host's documented bound.
pub async fn compression_within_bound<B: ManagedBackend>(m: &KvManager<B>) {
    let h = m.allocate(&request(1, prompt(48, 0))).await.unwrap();
    let data: Vec<Vec<u8>> = (0..6).map(|i| kv_bytes(block_bytes(), i)).collect();
    for (i, d) in data.iter().enumerate() {
        m.write_block(RequestId(1), i, d).unwrap();
    }
    assert!(matches!(
        m.compress_cache(RequestId(1), 0.25).await,
        Err(ManagerError::UnreachableRatio { .. })
    ));
    m.compress_cache(RequestId(1), 0.5).await.unwrap();
    let cs = m.compression_stats();
    assert_eq!(cs.compressed_caches, 1);
    assert!((cs.avg_compression_ratio - 0.5).abs() < 0.05, "{cs:?}");
    assert!(cs.memory_saved_bytes >= 6 * block_bytes() * 9 / 20);
    assert!(h.key_cache(0).unwrap().is_none());
    // Running again decompresses first.
    m.extend(RequestId(1), 1).await.unwrap();
    assert_eq!(m.compression_stats().compressed_caches, 0);
    for (i, d) in data.iter().enumerate() {
        let got = m.read_block(RequestId(1), i).unwrap();
        for (k, (x, y)) in d.chunks(2).zip(got.chunks(2)).enumerate() {
            let x = half::f16::from_le_bytes([x[0], x[1]]).to_f32();
            let y = half::f16::from_le_bytes([y[0], y[1]]).to_f32();
            let bound = pagedkv_hal_host::quant::error_bound(
                pagedkv_core::QuantFormat::Int8PerHead,
                x,
                8.0,
                pagedkv_core::DType::F16,
            );
            assert!((x - y).abs() <= bound, "block {i} element {k}: {x} -> {y}");
        }
    }
    m.check_invariants().unwrap();
}
