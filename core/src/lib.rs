#![doc = include_str!("../README.md")]
#![no_std]
#![deny(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

#[cfg(feature = "alloc")]
extern crate alloc;
#[cfg(feature = "std")]
extern crate std;

mod fmt;

pub mod error;
pub mod events;
pub mod hal;
pub mod hash;
pub mod ids;
pub mod layout;
pub mod plan;
pub mod pool;
mod prefix;
pub mod pressure;
pub mod seq;
pub mod shared;
pub mod stats;
pub mod storage;
pub mod table;

pub use error::{Error, Result};
pub use events::{KeyBatch, KvEvent};
pub use hal::{Backend, BackendError, ErrorKind, MemoryKind, QuantFormat, Quantize, RegionDesc};
pub use hash::{BlockHasher, ExtraKeys, MmItem, Sha256BlockHasher, SipBlockHasher};
pub use ids::{BlockHash, BlockId, CacheSalt, PlanId, PoolId, SeqId, Tick};
pub use layout::{BlockOrder, ByteRange, DType, KvLayout, KvPart};
pub use plan::{BatchValidator, BlockCopy, ValidatedBatch, validator_words};
pub use pool::{BlockPool, BlockSlot, Invariant, MAX_BLOCKS, PoolConfig, PoolKind, Registered};
pub use pressure::{MemoryPressure, PressureMonitor, PressureThresholds};
pub use seq::{
    Allocated, Appended, CacheConfig, CacheStorage, HOLE, KvCache, MAX_POOLS, PlanSlot, PlanView,
    Prompt, PromptTokens, SeqInfo, SeqSlot,
};
pub use shared::{Shared, SharedPool};
pub use stats::PoolStats;
pub use storage::Slots;
#[cfg(feature = "alloc")]
pub use table::BlockTable;

/// Index-table entries a pool of `capacity` blocks needs (for caller storage).
pub const fn buckets_for(capacity: u32) -> usize {
    prefix::buckets_for(capacity)
}
