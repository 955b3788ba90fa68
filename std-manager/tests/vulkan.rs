//! The manager on the Vulkan backend (feature `vulkan`): the swap, move,
//! defragment and compression scenarios of the host tests, on lavapipe in
//! CI, with the Khronos validation layer on and no message allowed, through
//! mapped and through staged device memory. Skips without Vulkan (fails
//! with `PAGEDKV_REQUIRE_VULKAN=1`).
#![cfg(feature = "vulkan")]
#![allow(clippy::cast_possible_truncation, reason = "small test values")]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::{config, scenarios};
use pagedkv_manager::{VulkanBackend, VulkanManager, vulkan};

fn backends() -> Vec<(VulkanBackend, Arc<AtomicUsize>)> {
    let options = |force_staging| vulkan::VulkanOptions {
        force_staging,
        validation: true,
        ..vulkan::VulkanOptions::default()
    };
    if let Some(why) = vulkan::skip_reason(&options(false)) {
        eprintln!("{why}");
        return Vec::new();
    }
    [false, true]
        .into_iter()
        .map(|s| {
            let be = VulkanBackend::new(&options(s)).unwrap();
            let n = be.message_counter();
            (be, n)
        })
        .collect()
}

#[tokio::test]
async fn kv_bytes_survive_swap_move_and_defragment_on_vulkan() {
    for (be, messages) in backends() {
        let m = VulkanManager::new(be, scenarios::swap_config(2)).unwrap();
        let handles = scenarios::swap_move_defragment(&m, 2).await;
        assert!(handles[3].key_cache(0).unwrap().is_some());
        scenarios::free_the_rest(&m).await;
        drop(m);
        assert_eq!(messages.load(Ordering::Relaxed), 0, "validation messages");
    }
}

#[tokio::test]
async fn compression_on_vulkan_stays_within_the_bound() {
    for (be, messages) in backends() {
        let m = VulkanManager::new(be, config(32)).unwrap();
        scenarios::compression_within_bound(&m).await;
        drop(m);
        assert_eq!(messages.load(Ordering::Relaxed), 0, "validation messages");
    }
}
