//! The Vulkan backend passes the backend conformance suite on whatever
//! device the loader offers (Mesa's lavapipe in CI), with the Khronos
//! validation layer on: every path (mapped and staged device memory,
//! timeline semaphores and fences) and no validation message. Skips
//! without Vulkan (fails with `PAGEDKV_REQUIRE_VULKAN=1`).

use pagedkv_core::MemoryKind;
use pagedkv_hal_host::quant;
use pagedkv_hal_vulkan::{VulkanBackend, VulkanOptions, skip_reason};
use pagedkv_tests::conformance;

/// Every combination of the two switches, validated.
fn variants() -> Vec<VulkanOptions> {
    let mut out = Vec::new();
    for force_staging in [false, true] {
        for force_fences in [false, true] {
            out.push(VulkanOptions {
                force_staging,
                force_fences,
                validation: true,
                ..VulkanOptions::default()
            });
        }
    }
    out
}

fn each(test: impl Fn(&mut VulkanBackend)) {
    let first = variants().remove(0);
    if let Some(why) = skip_reason(&first) {
        eprintln!("{why}");
        return;
    }
    for o in variants() {
        let mut be = VulkanBackend::new(&o).expect("Vulkan opened once: it opens again");
        eprintln!("on {}", be.describe());
        let t0 = std::time::Instant::now();
        test(&mut be);
        eprintln!("took {:?}", t0.elapsed());
        // Counted after the drop: the layer reports leaked objects when
        // the device is destroyed.
        let messages = be.message_counter();
        drop(be);
        let n = messages.load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(n, 0, "validation messages with {o:?} (printed above)");
    }
}

#[test]
fn vulkan_copies() {
    each(|be| {
        conformance::copies(be, [MemoryKind::Device(0), MemoryKind::Device(0)]);
        conformance::copies(be, [MemoryKind::Device(0), MemoryKind::PinnedHost]);
        conformance::copies(be, [MemoryKind::PinnedHost, MemoryKind::Device(1)]);
    });
}

#[test]
fn vulkan_out_of_memory() {
    each(|be| {
        conformance::out_of_memory(be, MemoryKind::Device(0));
        conformance::out_of_memory(be, MemoryKind::PinnedHost);
    });
}

#[test]
fn vulkan_quantize_round_trip() {
    each(|be| {
        conformance::quantize_round_trip(be, MemoryKind::Device(0), quant::error_bound);
        conformance::quantize_round_trip(be, MemoryKind::PinnedHost, quant::error_bound);
    });
}
