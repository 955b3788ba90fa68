//! hal-host passes the backend conformance suite, in both of its variants.
#![allow(clippy::cast_possible_truncation, reason = "small test values")]

use pagedkv_core::MemoryKind;
use pagedkv_hal_host::{HostBackend, StaticBackend, quant};
use pagedkv_tests::conformance;

#[test]
fn heap_backend_copies() {
    let mut be = HostBackend::new();
    conformance::copies(&mut be, [MemoryKind::Device(0), MemoryKind::Device(1)]);
    conformance::copies(&mut be, [MemoryKind::Host, MemoryKind::PinnedHost]);
    assert_eq!(
        be.used_bytes(MemoryKind::Device(0)),
        0,
        "destroy returns the bytes"
    );
}

#[test]
fn heap_backend_out_of_memory() {
    let mut be = HostBackend::new();
    conformance::out_of_memory(&mut be, MemoryKind::Host);
    // A simulated device with a byte limit.
    let mut small = HostBackend::new()
        .with_limit(MemoryKind::Device(0), 1 << 20)
        .unwrap();
    conformance::out_of_memory(&mut small, MemoryKind::Device(0));
    let layout = conformance::small_layout(
        pagedkv_core::BlockOrder::BlockMajor,
        pagedkv_core::DType::F16,
    );
    let per = layout.block_bytes().unwrap();
    let fits = pagedkv_core::RegionDesc {
        block_count: ((1 << 20) / per) as u32,
        layout,
        memory: MemoryKind::Device(0),
    };
    let r = pagedkv_core::Backend::create_region(&mut small, &fits).unwrap();
    let err = pagedkv_core::Backend::create_region(
        &mut small,
        &pagedkv_core::RegionDesc {
            block_count: 1,
            ..fits
        },
    )
    .unwrap_err();
    assert_eq!(
        pagedkv_core::BackendError::kind(&err),
        pagedkv_core::ErrorKind::OutOfMemory
    );
    // SAFETY: no batch in flight.
    unsafe { pagedkv_core::Backend::destroy_region(&mut small, r) };
}

#[test]
fn heap_backend_quantize_round_trip() {
    conformance::quantize_round_trip(
        &mut HostBackend::new(),
        MemoryKind::Host,
        quant::error_bound,
    );
}

#[test]
fn static_backend_passes_the_suite() {
    let arena: &'static mut [u8] = Box::leak(vec![0u8; 8 << 20].into_boxed_slice());
    let mut be = StaticBackend::new(arena);
    conformance::copies(&mut be, [MemoryKind::Device(0), MemoryKind::Host]);
    conformance::out_of_memory(&mut be, MemoryKind::Host);
    be.reset().unwrap();
    conformance::quantize_round_trip(&mut be, MemoryKind::Host, quant::error_bound);
}
