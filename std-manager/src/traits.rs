//! The seed's traits, fixed (see the crate docs for the list of changes).

use std::collections::HashMap;
use std::sync::Arc;

use pagedkv_core::{BlockId, BlockTable, MemoryKind};

use crate::error::Result;
use crate::types::{
    AllocationRequest, CacheGcStats, CacheHandleStats, CacheManagerStats, CompressionStats, Device,
    PrefixCacheConfig, Priority, RequestId,
};

/// What a kernel needs to address one layer's keys or values of a sequence:
/// the address of that layer's part of every block (in table order), the
/// strides inside a part, and where the memory is (the seed's `TensorRef`).
#[derive(Clone, Debug, PartialEq)]
pub struct KvView {
    /// Memory the addresses point into.
    pub memory: MemoryKind,
    /// Element type.
    pub dtype: pagedkv_core::DType,
    /// For each block of the table: the address of this layer's keys (or
    /// values) in it; 0 for a block dropped by a sliding window.
    pub block_addrs: Vec<u64>,
    /// Bytes between consecutive tokens of a block.
    pub token_stride: u64,
    /// Bytes between consecutive heads of a token.
    pub head_stride: u64,
    /// Tokens per block.
    pub tokens_per_block: u32,
    /// Tokens in the sequence.
    pub num_tokens: usize,
}

/// A live request's cache, as an engine holds it (`Arc<dyn KvCacheHandle>`).
///
/// A handle is a view: it reads the manager's current state, so it never goes
/// stale after `extend` or a swap (the seed's handle held a `BlockTable` by
/// reference and needed `&mut` to change, while it was shared as `Arc`).
pub trait KvCacheHandle: Send + Sync + std::fmt::Debug {
    /// The request.
    fn request_id(&self) -> RequestId;
    /// A snapshot of the block table (owned: the table changes under the handle).
    fn block_table(&self) -> BlockTable;
    /// Where the KV lives now.
    fn device(&self) -> Device;
    /// Tokens stored.
    fn num_tokens(&self) -> usize;
    /// Layers.
    fn num_layers(&self) -> usize;
    /// KV heads.
    fn num_heads(&self) -> usize;
    /// Head size.
    fn head_dim(&self) -> usize;
    /// The keys of `layer`; `None` while the request is swapped out or
    /// compressed (not addressable by kernels).
    fn key_cache(&self, layer: usize) -> Result<Option<KvView>>;
    /// The values of `layer`; as `key_cache`.
    fn value_cache(&self, layer: usize) -> Result<Option<KvView>>;
    /// Both.
    fn kv_cache(&self, layer: usize) -> Result<(Option<KvView>, Option<KvView>)> {
        Ok((self.key_cache(layer)?, self.value_cache(layer)?))
    }
    /// Figures of this request.
    fn stats(&self) -> CacheHandleStats;
    /// Whether the request is still allocated.
    fn is_valid(&self) -> bool;
    /// A printable id.
    fn cache_id(&self) -> String;
    /// Downcasting.
    fn as_any(&self) -> &dyn std::any::Any;
}

/// Pressure callbacks: fired on level changes only, in order, with no lock
/// held (a callback may call the manager; one that keeps the manager should
/// hold a `Weak`, or the two keep each other alive).
pub type PressureCallback = Box<dyn Fn(pagedkv_core::MemoryPressure) + Send + Sync>;

/// The basic manager (the seed's `KvCacheManager`).
#[async_trait::async_trait]
pub trait KvCacheManager: Send + Sync {
    /// Places a request's prompt (prefix hits shared). Under pressure,
    /// lower-value requests are swapped out first, per the eviction policy.
    async fn allocate(&self, request: &AllocationRequest) -> Result<Arc<dyn KvCacheHandle>>;
    /// Appends `additional_tokens` (unknown ids) to a request. Takes the
    /// request id (the seed took `&mut dyn KvCacheHandle`, which an `Arc`
    /// cannot give).
    async fn extend(&self, request_id: RequestId, additional_tokens: usize) -> Result<()>;
    /// Appends decode tokens whose ids are known (their full blocks are
    /// registered for prefix reuse).
    async fn extend_tokens(&self, request_id: RequestId, tokens: &[u32]) -> Result<()>;
    /// Frees a request; its full blocks stay cached for reuse.
    async fn deallocate(&self, request_id: RequestId) -> Result<()>;
    /// Whether `allocate` would succeed now without preempting anyone.
    fn can_allocate(&self, request: &AllocationRequest) -> bool;
    /// Figures.
    fn stats(&self) -> CacheManagerStats;
    /// Reclaims requests whose handles were all dropped, and prefixes past
    /// their TTL or beyond `max_prefixes`.
    async fn gc(&self) -> Result<CacheGcStats>;
    /// Called on pressure level changes (with hysteresis), outside any lock.
    fn set_pressure_callback(&self, callback: PressureCallback);
    /// The handle of a live request.
    fn get_handle(&self, request_id: RequestId) -> Option<Arc<dyn KvCacheHandle>>;
    /// Every live request's handle.
    fn list_handles(&self) -> Vec<(RequestId, Arc<dyn KvCacheHandle>)>;
}

/// Prefix sharing, tiers and compression (the seed's
/// `AdvancedKvCacheManager`, made `dyn`-compatible with `async_trait`).
#[async_trait::async_trait]
pub trait AdvancedKvCacheManager: KvCacheManager {
    /// Turns prefix caching on with `config`.
    async fn enable_prefix_caching(&self, config: PrefixCacheConfig) -> Result<()>;
    /// Gives the (empty) `target` the first `shared_tokens` of `source`.
    async fn share_prefix(
        &self,
        source: RequestId,
        target: RequestId,
        shared_tokens: usize,
    ) -> Result<()>;
    /// Moves a request's KV to the host tier (two-phase; bytes move).
    async fn swap_out(&self, request_id: RequestId) -> Result<()>;
    /// Brings a swapped-out request back to a device.
    async fn swap_in(&self, request_id: RequestId) -> Result<()>;
    /// Quantizes a request's blocks to reach at most `compression_ratio` of
    /// their size (0.5 from 16-bit: int8 or fp8). Decompressed before the
    /// request runs again.
    async fn compress_cache(&self, request_id: RequestId, compression_ratio: f32) -> Result<()>;
    /// Compression figures.
    fn compression_stats(&self) -> CompressionStats;
}

/// Raw block allocation on a device pool (the seed's `BlockAllocator`).
pub trait BlockAllocator: Send + Sync {
    /// `num_blocks` blocks, all or nothing, outside any request.
    fn allocate_blocks(&self, num_blocks: usize) -> Result<Vec<BlockId>>;
    /// Frees the blocks of one `allocate_blocks` call.
    fn free_blocks(&self, blocks: &[BlockId]) -> Result<()>;
    /// Blocks free or evictable.
    fn free_block_count(&self) -> usize;
    /// Blocks in service.
    fn total_block_count(&self) -> usize;
    /// Tokens per block.
    fn block_size(&self) -> usize;
    /// Compacts used blocks toward the start of each device pool by real
    /// copies (tables updated), then shrinks the pool's memory.
    fn defragment(&self) -> Result<()>;
}

/// Several devices (the seed's `MultiDeviceCacheManager`).
#[async_trait::async_trait]
pub trait MultiDeviceCacheManager: KvCacheManager {
    /// Devices with a pool.
    fn supported_devices(&self) -> Vec<Device>;
    /// Order in which devices are tried for new requests.
    fn set_device_preference(&self, devices: Vec<Device>);
    /// Moves a request's KV to another device (bytes move).
    async fn move_cache(&self, request_id: RequestId, target_device: Device) -> Result<()>;
    /// Where a request's KV is.
    fn get_cache_device(&self, request_id: RequestId) -> Option<Device>;
    /// Moves requests from the fullest device to the emptiest until their
    /// utilizations are within 10 points.
    async fn rebalance_devices(&self) -> Result<()>;
    /// Figures per device.
    fn device_stats(&self) -> HashMap<Device, CacheManagerStats>;
}

/// A request the eviction policy may choose.
#[derive(Clone, Debug, PartialEq)]
pub struct Candidate {
    /// The request.
    pub request_id: RequestId,
    /// Blocks it holds (freed by evicting it, if not shared).
    pub blocks: usize,
    /// Tokens it holds (what recomputation would cost).
    pub tokens: usize,
    /// Its priority.
    pub priority: Priority,
    /// Bytes per block.
    pub block_bytes: usize,
}

/// Chooses which requests to preempt (the seed's `CacheEvictionPolicy`).
///
/// The manager calls a policy while it holds its own lock (the choice and
/// the preemption must see the same state): a policy must not call back
/// into the manager.
pub trait CacheEvictionPolicy: Send + Sync {
    /// Requests to preempt, in order, until `required_blocks` are freed.
    fn select_eviction_candidates(
        &self,
        required_blocks: usize,
        candidates: &[Candidate],
    ) -> Vec<RequestId>;
    /// Records a use (takes `&self`: the seed's `&mut self` could not be
    /// called through the shared policy object).
    fn record_access(&self, request_id: RequestId, at: std::time::Instant);
    /// Records uses of several requests at one time (a decode step): one
    /// call, so a policy can take its lock once.
    fn record_accesses(
        &self,
        request_ids: &mut dyn Iterator<Item = RequestId>,
        at: std::time::Instant,
    ) {
        for id in request_ids {
            self.record_access(id, at);
        }
    }
    /// Forgets a request.
    fn forget(&self, request_id: RequestId);
    /// The policy's name.
    fn name(&self) -> &str;
}
