#![doc = include_str!("../README.md")]
#![no_std]
#![deny(unsafe_code)]
// A panic-free core: no panic is reachable from a caller's input. Indexing,
// `unwrap` and the like are refused outside tests (`get`, typed errors);
// the firmware build checks the result (`firmware/panics.sh`).
#![cfg_attr(
    not(test),
    deny(
        clippy::indexing_slicing,
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::unreachable,
        clippy::todo,
        clippy::unimplemented,
        clippy::modulo_arithmetic,
    )
)]
#![cfg_attr(docsrs, feature(doc_cfg))]

#[cfg(feature = "alloc")]
extern crate alloc;
#[cfg(feature = "std")]
extern crate std;

mod fmt;

pub mod batch;
mod blocksize;
pub mod cache;
pub mod error;
pub mod events;
mod fork;
pub mod hal;
pub mod hash;
pub mod ids;
mod invariants;
pub mod layout;
pub mod plan;
pub mod pool;
mod prefix;
pub mod pressure;
pub mod prompt;
mod scan;
pub mod seq;
pub mod shared;
mod slab;
pub mod stats;
pub mod storage;
pub mod table;
mod tier;

pub use batch::{BatchValidator, BlockCopy, ValidatedBatch, validator_words};
pub use cache::{CacheConfig, CacheStorage, HOLE, KvCache, MAX_POOLS, SeqInfo, SeqSlot};
pub use error::{Error, Result};
pub use events::{KeyBatch, KvEvent, TOKENS_PER_EVENT, TokenBatch};
pub use hal::{Backend, BackendError, ErrorKind, MemoryKind, QuantFormat, Quantize, RegionDesc};
pub use hash::{BlockHasher, ExtraKeys, MmItem, Sha256BlockHasher, SipBlockHasher};
pub use ids::{BlockHash, BlockId, CacheSalt, PlanId, PoolId, SeqId, Tick};
pub use layout::{BlockOrder, ByteRange, DType, KvLayout, KvPart};
pub use plan::{Fidelity, PlanSlot, PlanView};
pub use pool::{
    BlockPool, BlockSlot, EvictionPolicy, Invariant, MAX_BLOCKS, PoolConfig, PoolKind, Registered,
    Retention,
};
pub use pressure::{MemoryPressure, PressureMonitor, PressureThresholds};
pub use prompt::{Prompt, PromptTokens};
pub use seq::{Allocated, AppendNeeds, Appended};
pub use shared::{Shared, SharedPool};
pub use stats::PoolStats;
pub use storage::Slots;
#[cfg(feature = "alloc")]
pub use table::BlockTable;
pub use table::ExportedRow;

/// Index-table entries a pool of `capacity` blocks needs (for caller storage).
pub const fn buckets_for(capacity: u32) -> usize {
    prefix::buckets_for(capacity)
}
