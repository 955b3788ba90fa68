//! The CUDA backend passes the backend conformance suite: device memory,
//! mapped pinned host memory, copies within and across them, thousands of
//! scattered blocks in one launch, out of memory, quantization within
//! hal-host's bound. Skips without a GPU (fails with `PAGEDKV_REQUIRE_CUDA=1`).

use pagedkv_core::MemoryKind;
use pagedkv_hal_cuda::{CopyStrategy, CudaBackend, skip_reason};
use pagedkv_hal_host::quant;
use pagedkv_tests::conformance;

fn gpu() -> Option<CudaBackend> {
    if let Some(why) = skip_reason() {
        eprintln!("{why}");
        return None;
    }
    Some(CudaBackend::new().expect("a GPU is present: the backend opens"))
}

#[test]
fn cuda_copies() {
    let Some(mut be) = gpu() else { return };
    for strategy in [CopyStrategy::Auto, CopyStrategy::Memcpy] {
        be.set_copy_strategy(strategy);
        conformance::copies(&mut be, [MemoryKind::Device(0), MemoryKind::Device(0)]);
        conformance::copies(&mut be, [MemoryKind::Device(0), MemoryKind::PinnedHost]);
        conformance::copies(&mut be, [MemoryKind::PinnedHost, MemoryKind::Device(0)]);
        conformance::copies(&mut be, [MemoryKind::Host, MemoryKind::PinnedHost]);
    }
}

#[test]
fn cuda_out_of_memory() {
    let Some(mut be) = gpu() else { return };
    conformance::out_of_memory(&mut be, MemoryKind::Device(0));
}

#[test]
fn cuda_quantize_round_trip() {
    let Some(mut be) = gpu() else { return };
    conformance::quantize_round_trip(&mut be, MemoryKind::Device(0), quant::error_bound);
    conformance::quantize_round_trip(&mut be, MemoryKind::PinnedHost, quant::error_bound);
}
