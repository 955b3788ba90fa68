//! Building a manager: configuration checks, then the core's pools and the
//! memory behind them.
#![allow(
    clippy::cast_possible_truncation,
    reason = "pool indices are below MAX_POOLS; sizes are checked as u32 first"
)]

use hashbrown::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use pagedkv_core::{
    BatchValidator, BlockPool, KvCache, KvEvent, KvLayout, MemoryKind, PoolConfig, PressureMonitor,
    RegionDesc, SipBlockHasher,
};

use super::pools::{PoolMap, PoolMem};
use super::{Counters, DevSide, Inner, KvManager, MAX_DEVICES, ManagedBackend, Shared};
use crate::error::{ManagerError, Result};
use crate::policy::LruEvictionPolicy;
use crate::traits::CacheEvictionPolicy;
use crate::types::{Device, ManagerConfig};

fn config_err(field: &'static str, problem: impl Into<String>) -> ManagerError {
    ManagerError::Config {
        field,
        problem: problem.into(),
    }
}

fn to_u32(v: usize, field: &'static str) -> Result<u32> {
    u32::try_from(v).map_err(|_| config_err(field, format!("is {v}, above {}", u32::MAX)))
}

/// What the configuration asks for, checked.
struct Sizes {
    devices: usize,
    max_blocks: u32,
    initial: u32,
    host_blocks: u32,
    core: pagedkv_core::CacheConfig,
}

fn check(config: &ManagerConfig) -> Result<Sizes> {
    config.layout.validate()?;
    let devices = config.target_devices.len();
    if devices == 0 || devices > MAX_DEVICES {
        return Err(config_err(
            "target_devices",
            format!("has {devices} devices, between 1 and {MAX_DEVICES} are supported"),
        ));
    }
    let max_blocks = to_u32(config.max_blocks, "max_blocks")?;
    if max_blocks == 0 {
        return Err(config_err("max_blocks", "must be at least 1"));
    }
    let initial = if config.enable_pooling {
        config.initial_blocks
    } else {
        config.max_blocks
    };
    let initial = to_u32(initial.clamp(1, config.max_blocks), "initial_blocks")?;
    let bs = config.layout.tokens_per_block;
    let max_seq_blocks = to_u32(
        config.max_sequence_length.div_ceil(bs as usize).max(1),
        "max_sequence_length",
    )?;
    let max_seqs = to_u32(config.max_sequences.max(1), "max_sequences")?;
    Ok(Sizes {
        devices,
        max_blocks,
        initial,
        host_blocks: to_u32(config.host_blocks, "host_blocks")?,
        core: pagedkv_core::CacheConfig {
            tokens_per_block: bs,
            max_seqs,
            max_blocks_per_seq: max_seq_blocks,
            max_plans: max_seqs,
        },
    })
}

/// The block-hash key: the configured one, or one drawn at random.
fn hash_key(config: &ManagerConfig) -> [u8; 16] {
    config.hash_key.unwrap_or_else(|| {
        use std::hash::{BuildHasher, RandomState};
        let a = RandomState::new().hash_one(1u8);
        let b = RandomState::new().hash_one(2u8);
        let mut k = [0u8; 16];
        k[..8].copy_from_slice(&a.to_le_bytes());
        k[8..].copy_from_slice(&b.to_le_bytes());
        k
    })
}

/// Events each pool keeps for `drain_events` (a step's worth for a busy
/// server: chained stores coalesce into one event); past it, `Lost`.
const EVENT_RING: usize = 4096;

/// Adds a pool of `max` blocks, `online` of them backed by one region, with
/// a ring of `events`.
fn add_pool<B: ManagedBackend>(
    backend: &mut B,
    cache: &mut KvCache<'static, SipBlockHasher>,
    mems: &mut Vec<PoolMem<B::Region>>,
    cfg: PoolConfig,
    layout: KvLayout,
    memory: MemoryKind,
    (max, online, events): (u32, u32, usize),
) -> Result<()> {
    let mut pool = BlockPool::with_capacity(cfg, max)?
        .with_events(pagedkv_core::Slots::try_owned(events, KvEvent::EMPTY)?);
    pool.shrink(online)?;
    cache.add_pool(pool)?;
    let region = backend
        .create_region(&RegionDesc {
            block_count: online,
            layout,
            memory,
        })
        .map_err(ManagerError::backend("creating a region"))?;
    mems.push(PoolMem {
        layout,
        memory,
        blocks_per_region: online,
        regions: vec![region],
    });
    Ok(())
}

impl<B: ManagedBackend> KvManager<B> {
    /// A manager over `backend` with `config`, preempting with LRU.
    pub fn new(backend: B, config: ManagerConfig) -> Result<Self> {
        Self::with_policy(backend, config, Arc::new(LruEvictionPolicy::new()))
    }

    /// A manager with a chosen eviction policy. On failure every region
    /// already created is freed again.
    pub fn with_policy(
        backend: B,
        config: ManagerConfig,
        policy: Arc<dyn CacheEvictionPolicy>,
    ) -> Result<Self> {
        let sizes = check(&config)?;
        let layout = config.layout;
        let bs = layout.tokens_per_block;
        let mut cache = KvCache::with_config(sizes.core, SipBlockHasher::new(hash_key(&config)))?;
        // The backend moves into `DevSide` first, so that a failure half way
        // frees the regions made so far (its `Drop`).
        let mut dev = DevSide {
            backend,
            mems: Vec::new(),
            validator: BatchValidator::try_with_capacity(sizes.max_blocks.max(sizes.host_blocks))?,
        };
        let DevSide { backend, mems, .. } = &mut dev;
        let pools = PoolMap::new(sizes.devices, sizes.host_blocks > 0);
        let memory_of = |d: &Device| match d {
            Device::Gpu(n) => MemoryKind::Device(*n),
            Device::Cpu => MemoryKind::Host,
        };
        let events = if config.record_events { EVENT_RING } else { 0 };
        let sized = (sizes.max_blocks, sizes.initial, events);
        for (d, dev) in config.target_devices.iter().enumerate() {
            let cfg = PoolConfig::device(pools.device(d).0, bs);
            add_pool(
                backend,
                &mut cache,
                mems,
                cfg,
                layout,
                memory_of(dev),
                sized,
            )?;
            cache.set_eviction_policy(cfg.id, config.block_eviction)?;
        }
        if let Some(host) = pools.host() {
            let hb = (sizes.host_blocks, sizes.host_blocks, events);
            let cfg = PoolConfig::host(host.0, bs);
            add_pool(
                backend,
                &mut cache,
                mems,
                cfg,
                layout,
                MemoryKind::PinnedHost,
                hb,
            )?;
        }
        let blocks_per_region = mems.iter().map(|m| m.blocks_per_region).collect();
        let bases = mems
            .iter()
            .map(|m| {
                m.regions
                    .iter()
                    .map(|r| backend.region_address(r).unwrap_or(0))
                    .collect()
            })
            .collect();
        let pressure =
            PressureMonitor::new(config.pressure_thresholds, config.pressure_hysteresis)?;
        cache.set_events_enabled(config.record_events);
        let inner = Inner {
            cache,
            reqs: HashMap::new(),
            raw_allocations: Vec::new(),
            prefix: config.prefix_cache_config.clone(),
            preference: (0..sizes.devices).collect(),
            bases,
            blocks_per_region,
            released_at: vec![vec![0; sizes.max_blocks as usize]; sizes.devices],
            compressed: Vec::new(),
            events: std::collections::VecDeque::new(),
            events_lost: 0,
            lost_reported: 0,
            scratch: Vec::new(),
            batches: 0,
            serials: 0,
            pressure_changes: 0,
            pressure,
            stats: Counters::default(),
            touches: super::admission::TouchSketch::new(
                config.host_admission,
                if config.offload_evicted_prefixes && config.host_blocks > 0 {
                    sizes.max_blocks as usize * sizes.devices + config.host_blocks
                } else {
                    0
                },
            ),
        };
        Ok(Self {
            shared: Arc::new(Shared {
                devices: config.target_devices.clone(),
                config,
                pools,
                inner: Mutex::new(inner),
                dev: Mutex::new(dev),
                callback: Mutex::new(None),
                delivered: Mutex::new(0),
                policy,
                epoch: Instant::now(),
                timer: super::wait::Timer::default(),
                #[cfg(feature = "redis")]
                remote: Mutex::default(),
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pagedkv_core::{BlockOrder, DType};

    fn layout() -> KvLayout {
        KvLayout {
            layers: 1,
            kv_heads: 1,
            head_size: 8,
            tokens_per_block: 4,
            dtype: DType::F16,
            order: BlockOrder::BlockMajor,
        }
    }

    #[test]
    fn bad_configurations_name_their_field() {
        let mut c = ManagerConfig::new(layout(), 8);
        c.target_devices = vec![];
        let e = check(&c).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("target_devices"), "{e}");
        let mut c = ManagerConfig::new(layout(), 0);
        c.initial_blocks = 0;
        let e = check(&c).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("max_blocks"), "{e}");
        let mut c = ManagerConfig::new(layout(), 8);
        c.host_blocks = usize::MAX;
        let e = check(&c).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("host_blocks"), "{e}");
        let c = ManagerConfig::new(layout(), 8);
        let s = check(&c).unwrap();
        assert_eq!((s.devices, s.max_blocks, s.initial), (1, 8, 8));
    }
}
