//! The manager on the CUDA backend (feature `cuda`): the same swap,
//! defragment and compression scenarios as on hal-host, with the KV in GPU
//! memory and the host tier in mapped pinned memory; a move between devices
//! where the machine has two GPUs. Skips without a GPU (fails with
//! `PAGEDKV_REQUIRE_CUDA=1`).
#![cfg(feature = "cuda")]
#![allow(clippy::cast_possible_truncation, reason = "small test values")]

mod common;

use common::{config, scenarios};
use pagedkv_manager::{CudaBackend, CudaManager, cuda};

fn backend() -> Option<(CudaBackend, usize)> {
    if let Some(why) = cuda::skip_reason() {
        eprintln!("{why}");
        return None;
    }
    let devices = cuda::probe().unwrap().devices.min(2);
    Some((CudaBackend::new().unwrap(), devices))
}

#[tokio::test]
async fn kv_bytes_survive_swap_move_and_defragment_on_the_gpu() {
    let Some((be, devices)) = backend() else {
        return;
    };
    let m = CudaManager::new(be, scenarios::swap_config(devices as u16)).unwrap();
    let handles = scenarios::swap_move_defragment(&m, devices).await;
    // Views address GPU memory: the handle's key view is a device pointer.
    let v = handles[3].key_cache(0).unwrap().unwrap();
    assert!(v.block_addrs[0] != 0);
    scenarios::free_the_rest(&m).await;
}

#[tokio::test]
async fn compression_on_the_gpu_stays_within_the_bound() {
    let Some((be, _)) = backend() else { return };
    let m = CudaManager::new(be, config(32)).unwrap();
    scenarios::compression_within_bound(&m).await;
}
