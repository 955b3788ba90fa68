//! The seed's value types: requests, devices, configs and stats.

use pagedkv_core::{DType, KvLayout, PressureThresholds};
use serde::{Deserialize, Serialize};

/// A request (sequence) as the engine names it.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize, Deserialize)]
pub struct RequestId(pub u64);

impl std::fmt::Display for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "req-{}", self.0)
    }
}

/// Where KV lives.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize, Deserialize)]
pub enum Device {
    /// Host memory (the swap tier, or a CPU engine).
    Cpu,
    /// Accelerator `n`.
    Gpu(u16),
}

/// Scheduling priority (the seed's `Priority`).
#[derive(
    Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default, Serialize, Deserialize,
)]
pub enum Priority {
    /// Evicted first.
    Low,
    /// The default.
    #[default]
    Normal,
    /// Evicted late.
    High,
    /// Evicted last.
    Critical,
}

/// What an engine asks for when a request arrives (the seed's
/// `AllocationRequest`, plus the prompt's token ids for prefix caching).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AllocationRequest {
    /// The request.
    pub request_id: RequestId,
    /// Prompt tokens to place now.
    pub initial_tokens: usize,
    /// Upper bound of the sequence's length (prompt + output).
    pub max_sequence_length: usize,
    /// Transformer layers (must match the manager's layout).
    pub num_layers: usize,
    /// KV heads (must match the manager's layout).
    pub num_heads: usize,
    /// Head size (must match the manager's layout).
    pub head_dim: usize,
    /// Preferred device; `None` follows the device preference.
    pub device: Option<Device>,
    /// Element type (must match the manager's layout).
    pub dtype: DType,
    /// Scheduling priority, used by the priority-aware eviction policy.
    pub priority: Priority,
    /// The prompt's token ids (`initial_tokens` of them) when prefix caching
    /// is on; empty to skip prefix matching for this request.
    pub prompt: Vec<u32>,
    /// Tenant salt: requests with different salts never share KV.
    pub cache_salt: Option<u128>,
    /// Precomputed keys of the prompt's first full blocks (a router's or a
    /// trace's block hashes), used instead of hashing `prompt`. Equal keys
    /// must mean equal content and equal preceding content. Decode blocks of
    /// such a request are not cached (their tokens are not known).
    pub block_keys: Vec<u128>,
    /// LoRA adapter (or other model variant) the KV is computed with: part
    /// of every block key, so requests of other adapters never share it.
    #[serde(default)]
    pub adapter: Option<u64>,
    /// Multimodal items of the prompt (content hash and placement): part of
    /// the keys of the blocks they overlap.
    #[serde(default)]
    pub mm_items: Vec<pagedkv_core::MmItem>,
    /// Keep only the blocks overlapping the last this many tokens (a
    /// sliding-window model); `None`: keep all.
    #[serde(default)]
    pub sliding_window: Option<u32>,
    /// Chunked prefill: place the prompt's cached blocks and at most this
    /// many more tokens now; the rest follows by `extend_tokens` with the
    /// prompt's next ids. `None`: the whole prompt at once.
    #[serde(default)]
    pub prefill_chunk: Option<usize>,
}

impl AllocationRequest {
    /// A request for `prompt` under `layout`.
    pub fn for_prompt(
        request_id: RequestId,
        prompt: Vec<u32>,
        max_sequence_length: usize,
        layout: &KvLayout,
    ) -> Self {
        Self {
            request_id,
            initial_tokens: prompt.len(),
            max_sequence_length,
            num_layers: layout.layers as usize,
            num_heads: layout.kv_heads as usize,
            head_dim: layout.head_size as usize,
            device: None,
            dtype: layout.dtype,
            priority: Priority::Normal,
            prompt,
            cache_salt: None,
            block_keys: Vec::new(),
            adapter: None,
            mm_items: Vec::new(),
            sliding_window: None,
            prefill_chunk: None,
        }
    }

    /// Bytes of KV at `max_sequence_length`, keys and values. `None` on
    /// overflow (the seed's version overflowed silently).
    pub fn estimated_memory_bytes(&self) -> Option<usize> {
        self.num_layers
            .checked_mul(self.num_heads)?
            .checked_mul(self.max_sequence_length)?
            .checked_mul(self.head_dim)?
            .checked_mul(2)?
            .checked_mul(self.dtype.size_bytes() as usize)
    }
}

/// Prefix caching settings (the seed's `PrefixCacheConfig`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PrefixCacheConfig {
    /// Most cached (reusable, unheld) blocks kept per device; beyond, the
    /// least recently used are evicted.
    pub max_prefixes: usize,
    /// Prompts shorter than this (tokens) neither hit nor populate the cache.
    pub min_prefix_length: usize,
    /// Cached blocks unused for this long are dropped by `gc` (0: never).
    pub prefix_ttl_seconds: u64,
    /// When false, every request gets its own salt: no KV is shared between
    /// requests (`share_prefix` still works).
    pub enable_cross_request_sharing: bool,
}

impl Default for PrefixCacheConfig {
    fn default() -> Self {
        Self {
            max_prefixes: usize::MAX,
            min_prefix_length: 0,
            prefix_ttl_seconds: 0,
            enable_cross_request_sharing: true,
        }
    }
}

/// The manager's configuration: the seed's `CacheConfig` (renamed, so it is
/// not taken for the core's `pagedkv_core::CacheConfig`, the shape of a
/// cache's fixed storage), plus the layout and tiers the seed left implicit.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ManagerConfig {
    /// The model's KV layout (its `tokens_per_block` is the block size).
    pub layout: KvLayout,
    /// Most blocks per device pool.
    pub max_blocks: usize,
    /// Blocks backed by memory at start; the pool grows on demand, by this
    /// many blocks at a time, up to `max_blocks` (with `enable_pooling`).
    pub initial_blocks: usize,
    /// Grow pools on demand (otherwise `initial_blocks` is all there is).
    pub enable_pooling: bool,
    /// Device pools, in default preference order.
    pub target_devices: Vec<Device>,
    /// Blocks of the host tier (swap and prefix offload); 0 for none.
    pub host_blocks: usize,
    /// Prefix caching on from the start, with this configuration.
    pub prefix_cache_config: Option<PrefixCacheConfig>,
    /// Offload cached blocks evicted from a device to the host tier.
    pub offload_evicted_prefixes: bool,
    /// Which of those blocks the host tier takes (with
    /// `offload_evicted_prefixes`).
    #[serde(default)]
    pub host_admission: HostAdmission,
    /// The order in which device pools evict cached blocks (LRU by default;
    /// see [`pagedkv_core::EvictionPolicy`]).
    #[serde(default)]
    pub block_eviction: pagedkv_core::EvictionPolicy,
    /// Pressure levels, with `pressure_hysteresis` below a level to leave it.
    pub pressure_thresholds: PressureThresholds,
    /// See `pressure_thresholds`.
    pub pressure_hysteresis: f32,
    /// Sequences alive at once.
    pub max_sequences: usize,
    /// Longest sequence, in tokens.
    pub max_sequence_length: usize,
    /// Secret key of the block hash; `None` draws one at random.
    pub hash_key: Option<[u8; 16]>,
    /// Who preempts when a device has no room: the engine's scheduler (a
    /// `NoRoom` answer; the default, as vLLM), or the manager by its
    /// eviction policy (every preemption reported).
    #[serde(default)]
    pub preemption: crate::engine::PreemptionPolicy,
    /// The format `compress_cache` uses (its pool is created on first use).
    #[serde(default = "default_format")]
    pub compression_format: pagedkv_core::QuantFormat,
    /// Record the cache's events (blocks stored and removed, by tier) for
    /// `drain_events` (a KV-aware router mirrors the cache with them).
    #[serde(default)]
    pub record_events: bool,
    /// `gc` frees requests not extended or allocated for this long (their
    /// engine forgot them); `None`: only `deallocate` frees a request.
    #[serde(default)]
    pub request_ttl_seconds: Option<u64>,
}

/// Which cached blocks evicted from a device are copied to the host tier.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HostAdmission {
    /// Every one (as long as the host tier has room).
    #[default]
    Every,
    /// Only blocks whose key at least two prompts asked for recently: one-off
    /// prompts do not flood the host tier.
    SecondTouch,
}

fn default_format() -> pagedkv_core::QuantFormat {
    pagedkv_core::QuantFormat::Int8PerHead
}

impl ManagerConfig {
    /// A configuration for `layout` with one device of `blocks` blocks.
    pub fn new(layout: KvLayout, blocks: usize) -> Self {
        Self {
            layout,
            max_blocks: blocks,
            initial_blocks: blocks,
            enable_pooling: true,
            target_devices: vec![Device::Gpu(0)],
            host_blocks: 0,
            prefix_cache_config: None,
            offload_evicted_prefixes: false,
            host_admission: HostAdmission::Every,
            block_eviction: pagedkv_core::EvictionPolicy::LRU,
            pressure_thresholds: PressureThresholds::default(),
            pressure_hysteresis: 0.05,
            max_sequences: 256,
            max_sequence_length: 32_768,
            hash_key: None,
            preemption: crate::engine::PreemptionPolicy::Scheduler,
            compression_format: pagedkv_core::QuantFormat::Int8PerHead,
            record_events: false,
            request_ttl_seconds: None,
        }
    }
}

/// Stats of a handle (the seed's `CacheHandleStats`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CacheHandleStats {
    /// Bytes of KV the handle's blocks occupy.
    pub memory_bytes: usize,
    /// Blocks in its table.
    pub blocks_allocated: usize,
    /// Tokens stored.
    pub tokens_stored: usize,
    /// Tokens / (blocks × block size).
    pub utilization: f32,
    /// Seconds since the manager started, at the last access.
    pub last_access_secs: f64,
}

/// Manager-wide stats (the seed's `CacheManagerStats`, plus tiers).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CacheManagerStats {
    /// Bytes of all device pools at their current size.
    pub total_memory_bytes: usize,
    /// Bytes of held blocks.
    pub used_memory_bytes: usize,
    /// Live requests.
    pub active_caches: usize,
    /// Blocks in service.
    pub total_blocks: usize,
    /// Blocks free or evictable.
    pub free_blocks: usize,
    /// Fraction of looked-up prompt blocks served from a cache (any tier).
    pub cache_hit_rate: f32,
    /// Prompt blocks served from device pools.
    pub device_hit_blocks: u64,
    /// Prompt blocks brought back from the host tier by a copy.
    pub host_hit_blocks: u64,
    /// Prompt blocks looked up.
    pub query_blocks: u64,
    /// Cached blocks evicted.
    pub eviction_count: u64,
    /// Successful allocations.
    pub allocation_count: u64,
    /// Allocations refused.
    pub allocation_failures: u64,
    /// Sequences swapped out (preempted) so far.
    pub swap_outs: u64,
    /// Sequences swapped back in so far.
    pub swap_ins: u64,
    /// Cached blocks copied to the host tier on their way out of a device.
    #[serde(default)]
    pub offloaded_blocks: u64,
    /// Refusals of host admission (`host_admission`): cached blocks an
    /// allocation was about to evict from a device, not copied to the host
    /// tier. An allocation retried after making room decides, and counts,
    /// again.
    #[serde(default)]
    pub not_admitted_blocks: u64,
    /// Blocks held in compressed pools (compressed requests).
    #[serde(default)]
    pub compressed_blocks: usize,
    /// Bytes of the compressed pools created so far (on demand).
    #[serde(default)]
    pub compressed_memory_bytes: usize,
}

/// What `gc` reclaimed.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CacheGcStats {
    /// Bytes freed.
    pub memory_freed: usize,
    /// Requests reclaimed (handles dropped without `deallocate`).
    pub caches_freed: usize,
    /// Cached prefix blocks dropped (past the TTL or `max_prefixes`).
    pub prefixes_expired: usize,
    /// Time taken.
    pub gc_time_ms: u64,
}

/// Compression figures (the seed's `CompressionStats`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CompressionStats {
    /// Requests currently compressed.
    pub compressed_caches: usize,
    /// Device bytes saved by them now.
    pub memory_saved_bytes: usize,
    /// Mean compressed / original size over compressions done.
    pub avg_compression_ratio: f32,
    /// Mean time of one compression.
    pub avg_compression_time_ms: f64,
}
