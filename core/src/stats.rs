//! Counters of a pool. Plain integers, updated on the hot paths with no
//! atomics (the pool is `&mut`); the manager snapshots them.

/// Counters and gauges of one pool.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct PoolStats {
    /// Blocks in the pool.
    pub blocks_total: u32,
    /// Blocks never cached or whose key was dropped: reused first.
    pub blocks_free: u32,
    /// Blocks holding a prefix key with no holder: reusable, evicted LRU first.
    pub blocks_cached: u32,
    /// Blocks with at least one holder.
    pub blocks_used: u32,
    /// Prefix lookups: full blocks found in the index.
    pub hit_blocks: u64,
    /// Prefix lookups: full blocks asked for and not found (up to and
    /// including the first miss, and every full block after it).
    pub miss_blocks: u64,
    /// Prompt tokens served from the prefix cache.
    pub hit_tokens: u64,
    /// Prompt tokens looked up (hit or not).
    pub query_tokens: u64,
    /// Cached blocks evicted to make room.
    pub evictions: u64,
    /// Blocks handed out by `allocate`.
    pub allocations: u64,
    /// `allocate` calls refused for lack of blocks.
    pub allocation_failures: u64,
    /// Runs split in two: a block inside a run became a run head (entered
    /// the hash index) because the block before it lost its key.
    pub run_splits: u64,
    /// Allocations whose first fresh block continued the run of their last
    /// prefix hit (merged into it).
    pub run_merges: u64,
    /// Blocks that lost their key inside a run (evicted, shrunk away or
    /// released past capacity) while the block before them kept theirs: a
    /// partial run eviction, usually from its tail.
    pub run_trims: u64,
}

impl PoolStats {
    /// Blocks that could be handed out now (free plus evictable).
    pub const fn blocks_available(&self) -> u32 {
        self.blocks_free + self.blocks_cached
    }

    /// Fraction of blocks held by a sequence, in `[0, 1]`.
    pub fn utilization(&self) -> f32 {
        if self.blocks_total == 0 {
            0.0
        } else {
            self.blocks_used as f32 / self.blocks_total as f32
        }
    }

    /// Fraction of looked-up full blocks that hit.
    pub fn block_hit_ratio(&self) -> f64 {
        let q = self.hit_blocks + self.miss_blocks;
        if q == 0 {
            0.0
        } else {
            self.hit_blocks as f64 / q as f64
        }
    }

    /// Fraction of looked-up prompt tokens served from the cache.
    pub fn token_hit_ratio(&self) -> f64 {
        if self.query_tokens == 0 {
            0.0
        } else {
            self.hit_tokens as f64 / self.query_tokens as f64
        }
    }
}
