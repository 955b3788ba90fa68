#![doc = include_str!("../README.md")]

pub mod engine;
mod error;
#[cfg(feature = "kv-events")]
pub mod kv_events;
mod manager;
pub mod policy;
#[cfg(feature = "redis")]
pub mod remote;
mod traits;
mod types;

pub use engine::{
    Allocation, ExportItem, ExtendItem, Extension, KernelTables, ManagerEvent, PreemptMode,
    Preemption, PreemptionPolicy, Tier,
};
pub use error::{InvalidRequest, ManagerError, Result};
pub use manager::{Handle, KvManager, MAX_DEVICES, ManagedBackend};
#[cfg(feature = "redis")]
pub use manager::{MAX_PREFETCHES, RemoteUse};
pub use pagedkv_core as core;
pub use pagedkv_core::{
    BlockId, BlockOrder, BlockTable, DType, KvLayout, MemoryPressure, PressureThresholds,
};
pub use pagedkv_hal_host::HostBackend;
pub use policy::{
    CostAwareEvictionPolicy, LfuEvictionPolicy, LruEvictionPolicy, PriorityEvictionPolicy,
};
pub use traits::{
    AdvancedKvCacheManager, BlockAllocator, CacheEvictionPolicy, Candidate, KvCacheHandle,
    KvCacheManager, KvView, MultiDeviceCacheManager, PressureCallback,
};
pub use types::{
    AllocationRequest, CacheGcStats, CacheHandleStats, CacheManagerStats, CompressionStats, Device,
    HostAdmission, ManagerConfig, PrefixCacheConfig, Priority, RequestId,
};

/// The manager over host memory (and simulated devices).
pub type HostManager = KvManager<HostBackend>;

#[cfg(feature = "cuda")]
pub use pagedkv_hal_cuda::{self as cuda, CudaBackend};

/// The manager over CUDA GPUs (`Device::Gpu(n)` is CUDA device `n`; the
/// host tier is mapped pinned memory).
#[cfg(feature = "cuda")]
pub type CudaManager = KvManager<CudaBackend>;

#[cfg(feature = "vulkan")]
pub use pagedkv_hal_vulkan::{self as vulkan, VulkanBackend};

/// The manager over a Vulkan device (every `Device::Gpu(n)` is that one
/// device; the host tier is host-visible memory).
#[cfg(feature = "vulkan")]
pub type VulkanManager = KvManager<VulkanBackend>;
