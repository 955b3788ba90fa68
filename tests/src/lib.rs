//! Shared helpers of pagedkv's integration tests: cache construction and a
//! fingerprint of all observable state, to assert that refused operations
//! change nothing.
#![allow(clippy::cast_possible_truncation, reason = "small test values")]

pub mod conformance;
pub mod faulty;
pub mod manager_model;
pub mod model;
pub mod redis_server;
pub mod transformer;

use pagedkv_core::{
    BlockId, BlockPool, CacheConfig, KvCache, PoolConfig, PoolId, PoolStats, SeqId, SeqInfo,
    SipBlockHasher,
};

/// Polls a future to the end (the manager's futures wait on nothing but
/// the backend, so polling in a loop is a complete executor).
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    loop {
        if let std::task::Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
    }
}

/// The hasher key every test uses (keys are reproducible run to run).
pub const TEST_KEY: [u8; 16] = *b"pagedkv-tests-k1";

/// A cache with the given device pool capacities, then one host pool.
pub fn cache_with(
    config: CacheConfig,
    devices: &[u32],
    host: u32,
) -> KvCache<'static, SipBlockHasher> {
    let mut c = KvCache::with_config(config, SipBlockHasher::new(TEST_KEY)).expect("config");
    let bs = config.tokens_per_block;
    for (i, &cap) in devices.iter().enumerate() {
        c.add_pool(BlockPool::with_capacity(PoolConfig::device(i as u16, bs), cap).unwrap())
            .unwrap();
    }
    if host > 0 {
        let id = devices.len() as u16;
        c.add_pool(BlockPool::with_capacity(PoolConfig::host(id, bs), host).unwrap())
            .unwrap();
    }
    c
}

/// Everything a caller can observe of a cache, for before/after comparisons.
#[derive(Clone, PartialEq, Debug)]
pub struct Fingerprint {
    /// Per pool: stats (with `allocation_failures` zeroed when asked), eviction order.
    pub pools: Vec<(PoolId, PoolStats, Vec<BlockId>, usize)>,
    /// Per live sequence: id, info, table.
    pub seqs: Vec<(SeqId, SeqInfo, Vec<BlockId>)>,
    /// Pending plans.
    pub plans: u32,
}

/// The fingerprint of `cache`. With `ignore_failures`, the allocation-failure
/// counter (which a refused allocation legitimately bumps) is left out.
pub fn fingerprint(cache: &KvCache<'_, SipBlockHasher>, ignore_failures: bool) -> Fingerprint {
    let pools = cache
        .pools()
        .iter()
        .map(|p| {
            let mut st = p.stats();
            if ignore_failures {
                st.allocation_failures = 0;
            }
            (p.id(), st, p.eviction_order().collect(), p.pending_events())
        })
        .collect();
    let seqs = cache
        .seq_ids()
        .map(|s| (s, cache.info(s).unwrap(), cache.table(s).unwrap().to_vec()))
        .collect();
    Fingerprint {
        pools,
        seqs,
        plans: cache.pending_plans(),
    }
}
