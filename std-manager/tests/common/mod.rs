//! Helpers shared by the manager's tests: a small layout, a backend wrapper
//! that injects faults and slow fences, and checksums.
#![allow(
    dead_code,
    unused_imports,
    unreachable_pub,
    missing_docs,
    clippy::cast_possible_truncation,
    reason = "test helpers"
)]

pub mod scenarios;

use pagedkv_core::{BackendError, ErrorKind};
use pagedkv_manager::{AllocationRequest, BlockOrder, DType, KvLayout, ManagerConfig, RequestId};
pub use pagedkv_tests::faulty::{Faulty, Knobs};

pub fn layout() -> KvLayout {
    KvLayout {
        layers: 2,
        kv_heads: 2,
        head_size: 32,
        tokens_per_block: 8,
        dtype: DType::F16,
        order: BlockOrder::BlockMajor,
    }
}

pub fn config(blocks: usize) -> ManagerConfig {
    let mut c = ManagerConfig::new(layout(), blocks);
    c.hash_key = Some(*b"manager-test-key");
    c.max_sequence_length = 4096;
    c
}

pub fn request(id: u64, prompt: Vec<u32>) -> AllocationRequest {
    AllocationRequest::for_prompt(RequestId(id), prompt, 1024, &layout())
}

/// A simple checksum (FNV-1a 64).
pub fn checksum(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// Deterministic f16 KV bytes of (request, block): finite values in [-8, 8].
pub fn kv_bytes(block_bytes: usize, seed: u64) -> Vec<u8> {
    (0..block_bytes / 2)
        .flat_map(|i| {
            let x = ((i as u64 * 2_654_435_761 + seed * 97) % 4001) as f32 / 250.0 - 8.0;
            half::f16::from_f32(x).to_bits().to_le_bytes()
        })
        .collect()
}

pub fn _assert_kind(e: &dyn BackendError) -> ErrorKind {
    e.kind()
}
