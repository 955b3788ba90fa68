//! The engine-facing calls refuse bad input with a typed error and change
//! nothing: allocation with zero sizes, extensions whose ids do not match
//! their count or name unknown requests, batches mixing good and bad items,
//! kernel exports of unknown, swapped-out or over-long requests, preemption
//! and compression of unknown requests. And the scheduler's loop: no room
//! is a `NoRoom` answer with the blocks missing, a preemption the scheduler
//! asks for makes the room, the retry succeeds and every step is reported.
#![allow(clippy::cast_possible_truncation, reason = "small test values")]

mod common;

use common::{config, request};
use pagedkv_manager::core::QuantFormat;
use pagedkv_manager::{
    BlockTable, Device, ExportItem, ExtendItem, Extension, HostBackend, HostManager,
    InvalidRequest, KernelTables, KvCacheManager, ManagerError, ManagerEvent,
    MultiDeviceCacheManager, PreemptMode, PreemptionPolicy, PrefixCacheConfig, RequestId, Tier,
};

const BS: u32 = 8;

fn prompt(n: u32, salt: u32) -> Vec<u32> {
    (0..n).map(|i| i * 13 + salt).collect()
}

fn manager(blocks: usize, policy: PreemptionPolicy) -> HostManager {
    let mut cfg = config(blocks);
    cfg.host_blocks = 64;
    cfg.preemption = policy;
    cfg.prefix_cache_config = Some(PrefixCacheConfig::default());
    cfg.record_events = true;
    HostManager::new(HostBackend::new(), cfg).unwrap()
}

/// A 32-block manager (preemption left to the scheduler) holding request
/// 1 with a prompt of `tokens`.
async fn with_request(tokens: u32) -> HostManager {
    let m = manager(32, PreemptionPolicy::Scheduler);
    m.allocate_request(&request(1, prompt(tokens, 1)))
        .await
        .unwrap();
    m
}

/// What a refused call must leave as it was.
#[derive(Debug, PartialEq)]
struct Snapshot {
    used: Vec<u32>,
    keys: Vec<u32>,
    requests: Vec<(RequestId, Option<Device>, usize, BlockTable)>,
}

fn snapshot(m: &HostManager) -> Snapshot {
    let mut requests: Vec<_> = m
        .list_handles()
        .into_iter()
        .map(|(id, h)| (id, m.get_cache_device(id), h.num_tokens(), h.block_table()))
        .collect();
    requests.sort_by_key(|r| r.0);
    m.check_invariants().unwrap();
    Snapshot {
        used: m.used_blocks(),
        keys: m.indexed_keys(),
        requests,
    }
}

#[tokio::test]
async fn allocate_request_refuses_zero_sizes_and_changes_nothing() {
    let m = with_request(20).await;
    let before = snapshot(&m);
    let mut r = request(2, prompt(20, 2));
    r.prefill_chunk = Some(0);
    let e = m.allocate_request(&r).await.unwrap_err();
    assert!(
        matches!(
            e,
            ManagerError::InvalidRequest(InvalidRequest::Zero {
                what: "prefill_chunk"
            })
        ),
        "{e}"
    );
    let mut r = request(2, prompt(20, 2));
    r.sliding_window = Some(0);
    let e = m.allocate_request(&r).await.unwrap_err();
    assert!(
        matches!(
            e,
            ManagerError::InvalidRequest(InvalidRequest::Zero {
                what: "sliding_window"
            })
        ),
        "{e}"
    );
    // A duplicate id and a prompt larger than the pool.
    let e = m
        .allocate_request(&request(1, prompt(4, 9)))
        .await
        .unwrap_err();
    assert!(
        matches!(e, ManagerError::DuplicateRequest(RequestId(1))),
        "{e}"
    );
    let e = m
        .allocate_request(&request(3, prompt(40 * BS, 3)))
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            ManagerError::Core(pagedkv_manager::core::Error::LargerThanPool {
                needed: 40,
                capacity: 32
            })
        ),
        "{e}"
    );
    assert_eq!(snapshot(&m), before);
}

#[tokio::test]
async fn extend_request_refuses_mismatched_ids_and_unknown_requests() {
    let m = with_request(20).await;
    let before = snapshot(&m);
    let ids = [7, 8, 9];
    let item = ExtendItem {
        request: RequestId(1),
        tokens: Some(&ids),
        count: 2,
        lookahead: 0,
    };
    let e = m.extend_request(item).await.unwrap_err();
    assert!(
        matches!(
            e,
            ManagerError::InvalidRequest(InvalidRequest::TokenCount { ids: 3, count: 2 })
        ),
        "{e}"
    );
    let e = m
        .extend_request(ExtendItem::tokens(RequestId(99), &ids))
        .await
        .unwrap_err();
    assert!(
        matches!(e, ManagerError::UnknownRequest(RequestId(99))),
        "{e}"
    );
    // Past the longest sequence, by tokens or by lookahead.
    for (count, lookahead) in [(u32::MAX, 0), (1, u32::MAX), (5000, 0)] {
        let item = ExtendItem {
            request: RequestId(1),
            tokens: None,
            count,
            lookahead,
        };
        assert!(
            m.extend_request(item).await.is_err(),
            "{count} + {lookahead}"
        );
    }
    assert_eq!(snapshot(&m), before);
}

#[tokio::test]
async fn extend_batch_answers_each_item_and_refused_items_change_nothing() {
    let m = with_request(20).await;
    let _b = m
        .allocate_request(&request(2, prompt(16, 2)))
        .await
        .unwrap();
    let _c = m.allocate_request(&request(3, prompt(8, 3))).await.unwrap();
    let before = snapshot(&m);
    let (one, two) = ([5u32], [6u32, 7]);
    let items = [
        ExtendItem::tokens(RequestId(1), &one),
        ExtendItem::tokens(RequestId(42), &one),
        ExtendItem {
            request: RequestId(3),
            tokens: Some(&two),
            count: 1,
            lookahead: 0,
        },
        ExtendItem {
            request: RequestId(2),
            tokens: Some(&one),
            count: 1,
            lookahead: 3,
        },
    ];
    let mut out: Vec<_> = (0..9).map(|_| Ok(Extension::default())).collect(); // cleared
    m.extend_batch(&items, &mut out).await;
    assert_eq!(out.len(), 4);
    assert_eq!(
        out[0].as_ref().unwrap().new_blocks,
        0,
        "20 -> 21 tokens, 3 blocks"
    );
    assert!(matches!(
        out[1],
        Err(ManagerError::UnknownRequest(RequestId(42)))
    ));
    assert!(matches!(
        out[2],
        Err(ManagerError::InvalidRequest(InvalidRequest::TokenCount {
            ids: 2,
            count: 1
        }))
    ));
    // 16 -> 17 tokens and 3 lookahead slots: one block more.
    assert_eq!(out[3].as_ref().unwrap().new_blocks, 1);
    let now = snapshot(&m);
    assert_eq!(now.requests[0].2, 21);
    assert_eq!(now.requests[1].2, 17);
    assert_eq!(now.requests[1].3.physical_blocks.len(), 3);
    assert_eq!(now.requests[2], before.requests[2], "the refused item");
    // Nothing else moved: request 1 kept its blocks.
    assert_eq!(
        now.requests[0].3.physical_blocks,
        before.requests[0].3.physical_blocks
    );
}

#[tokio::test]
async fn export_tables_is_all_or_nothing() {
    let m = with_request(20).await;
    let _b = m.allocate_request(&request(2, prompt(9, 2))).await.unwrap();
    let _c = m.allocate_request(&request(3, prompt(8, 3))).await.unwrap();
    m.preempt(RequestId(3), PreemptMode::Swap).await.unwrap();
    let good = |request, new_tokens| ExportItem {
        request: RequestId(request),
        new_tokens,
        lookahead: 0,
    };
    let mut t = KernelTables {
        pad: -1,
        ..KernelTables::default()
    };
    m.export_tables(&[good(1, 1), good(2, 9)], &mut t).unwrap();
    assert_eq!(t.max_blocks, 3);
    assert_eq!(t.slot_mapping.len(), 10);
    assert_eq!(t.indptr, vec![0, 3, 5]);
    assert_eq!(t.last_page_len, vec![4, 1]);
    let before = snapshot(&m);
    let bad = [
        (vec![good(1, 1), good(77, 1)], "an unknown request"),
        (vec![good(1, 1), good(3, 1)], "a swapped-out request"),
        (vec![good(2, 10)], "more new tokens than it holds"),
        (
            vec![ExportItem {
                request: RequestId(2),
                new_tokens: 1,
                lookahead: 40,
            }],
            "lookahead past its reservation",
        ),
    ];
    for (items, what) in bad {
        assert!(m.export_tables(&items, &mut t).is_err(), "{what}");
        assert!(
            t.block_tables.is_empty()
                && t.slot_mapping.is_empty()
                && t.indptr.is_empty()
                && t.indices.is_empty()
                && t.last_page_len.is_empty(),
            "{what}: the buffers were left half written"
        );
    }
    assert_eq!(snapshot(&m), before);
    // The tables kept after a refusal export the batch whole again.
    let mut fresh = KernelTables {
        pad: -1,
        ..KernelTables::default()
    };
    let batch = [good(1, 1), good(2, 9)];
    m.export_tables(&batch, &mut t).unwrap();
    m.export_tables(&batch, &mut fresh).unwrap();
    assert_eq!(t.block_tables, fresh.block_tables);
    assert!(t.block_tables.iter().any(|&b| b >= 0));
}

#[tokio::test]
async fn preempt_and_compress_refuse_unknown_requests() {
    let m = with_request(20).await;
    let before = snapshot(&m);
    for mode in [PreemptMode::Swap, PreemptMode::Recompute] {
        let e = m.preempt(RequestId(5), mode).await.unwrap_err();
        assert!(
            matches!(e, ManagerError::UnknownRequest(RequestId(5))),
            "{e}"
        );
    }
    for f in [QuantFormat::Int8PerHead, QuantFormat::Fp8E4M3PerHead] {
        let e = m.compress_with(RequestId(5), f).await.unwrap_err();
        assert!(
            matches!(e, ManagerError::UnknownRequest(RequestId(5))),
            "{e}"
        );
    }
    assert_eq!(snapshot(&m), before);
    let mut events = Vec::new();
    m.drain_events(&mut events);
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, ManagerEvent::Preempted(_))),
        "a refused preemption was reported"
    );
}

#[tokio::test]
async fn compression_pools_are_made_on_demand_in_both_formats_and_counted() {
    let m = with_request(32).await;
    let _b = m
        .allocate_request(&request(2, prompt(32, 2)))
        .await
        .unwrap();
    assert_eq!(
        m.used_blocks().len(),
        2,
        "one device pool and the host tier"
    );
    assert_eq!(m.stats().compressed_blocks, 0);
    m.compress_with(RequestId(1), QuantFormat::Int8PerHead)
        .await
        .unwrap();
    m.compress_with(RequestId(2), QuantFormat::Fp8E4M3PerHead)
        .await
        .unwrap();
    let used = m.used_blocks();
    assert_eq!(used.len(), 4, "an int8 and an fp8 pool, made on first use");
    assert_eq!(&used[2..], &[4, 4]);
    let s = m.stats();
    assert_eq!(s.compressed_blocks, 8);
    assert!(s.compressed_memory_bytes > 0);
    // A later call brings it back to its device.
    m.extend_request(ExtendItem::tokens(RequestId(1), &[1]))
        .await
        .unwrap();
    assert_eq!(m.get_cache_device(RequestId(1)), Some(Device::Gpu(0)));
    assert_eq!(m.stats().compressed_blocks, 4);
}

#[tokio::test]
async fn no_room_names_the_missing_blocks_then_the_scheduler_preempts_and_retries() {
    // 16 blocks: two 8-block requests fill the device.
    let m = manager(16, PreemptionPolicy::Scheduler);
    let a = m
        .allocate_request(&request(1, prompt(64, 1)))
        .await
        .unwrap();
    assert_eq!((a.blocks, a.computed_tokens), (8, 0));
    let _b = m
        .allocate_request(&request(2, prompt(64, 2)))
        .await
        .unwrap();
    let mut events = Vec::new();
    m.drain_events(&mut events);
    assert!(
        events.iter().any(|e| matches!(
            e,
            ManagerEvent::Stored {
                tier: Tier::Device(Device::Gpu(0)),
                ..
            }
        )),
        "the prompts' blocks were published: {events:?}"
    );
    let before = snapshot(&m);
    let e = m
        .allocate_request(&request(3, prompt(24, 3)))
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            ManagerError::NoRoom {
                device: Device::Gpu(0),
                missing: 3
            }
        ),
        "{e}"
    );
    let e = m
        .extend_request(ExtendItem::tokens(RequestId(1), &[1]))
        .await
        .unwrap_err();
    assert!(matches!(e, ManagerError::NoRoom { missing: 1, .. }), "{e}");
    assert_eq!(snapshot(&m), before, "no room changed nothing");
    // The scheduler preempts request 2 (swap) and retries.
    let p = m.preempt(RequestId(2), PreemptMode::Swap).await.unwrap();
    assert_eq!((p.request, p.blocks), (RequestId(2), 8));
    assert_eq!(m.get_cache_device(RequestId(2)), Some(Device::Cpu));
    let c = m
        .allocate_request(&request(3, prompt(24, 3)))
        .await
        .unwrap();
    assert_eq!(c.blocks, 3);
    assert!(
        c.preempted.is_empty(),
        "the manager preempted nothing itself"
    );
    events.clear();
    m.drain_events(&mut events);
    assert!(events.contains(&ManagerEvent::Preempted(p)));
    assert!(
        events.iter().any(|e| matches!(
            e,
            ManagerEvent::Stored {
                tier: Tier::Host,
                ..
            }
        )),
        "the swapped blocks were published on the host tier: {events:?}"
    );
    // Request 2 back: room made by preempting request 1 (recompute).
    m.preempt(RequestId(1), PreemptMode::Recompute)
        .await
        .unwrap();
    assert!(m.get_handle(RequestId(1)).is_none(), "recompute frees it");
    // Its prompt is still cached: the recomputation hits it.
    let again = m
        .allocate_request(&request(1, prompt(64, 1)))
        .await
        .unwrap();
    assert_eq!(again.device_hit_blocks, 8, "{again:?}");
    assert_eq!(again.computed_tokens, 64);
    m.deallocate(RequestId(1)).await.unwrap();
    m.deallocate(RequestId(3)).await.unwrap();
    let x = m
        .extend_request(ExtendItem::tokens(RequestId(2), &[1]))
        .await
        .unwrap();
    assert!(x.swapped_in, "request 2 came back to its device");
    assert_eq!(m.get_cache_device(RequestId(2)), Some(Device::Gpu(0)));
    m.check_invariants().unwrap();
}

#[tokio::test]
async fn adapters_and_multimodal_items_key_the_blocks() {
    let m = manager(64, PreemptionPolicy::Scheduler);
    let image = |content_hash| pagedkv_manager::core::MmItem {
        content_hash,
        offset: 4,
        len: 8,
    };
    let with = |id, adapter, mm: Vec<_>| {
        let mut r = request(id, prompt(32, 5));
        r.adapter = adapter;
        r.mm_items = mm;
        r
    };
    let a = m
        .allocate_request(&with(1, Some(7), vec![image(1)]))
        .await
        .unwrap();
    assert_eq!(a.computed_tokens, 0);
    // Same ids, same adapter and image: every block hits.
    let b = m
        .allocate_request(&with(2, Some(7), vec![image(1)]))
        .await
        .unwrap();
    assert_eq!((b.device_hit_blocks, b.computed_tokens), (4, 32));
    // Another adapter, or no adapter: nothing is shared.
    for (id, adapter) in [(3, Some(8)), (4, None)] {
        let c = m
            .allocate_request(&with(id, adapter, vec![image(1)]))
            .await
            .unwrap();
        assert_eq!(c.computed_tokens, 0, "adapter {adapter:?}");
    }
    // Another image over tokens 4..12: the first block (tokens 0..8) holds
    // part of it, so no block is shared.
    let d = m
        .allocate_request(&with(5, Some(7), vec![image(2)]))
        .await
        .unwrap();
    assert_eq!(d.computed_tokens, 0);
    m.check_invariants().unwrap();
}

#[tokio::test]
async fn a_request_named_twice_in_a_batch_is_refused_the_second_time() {
    let m = with_request(20).await;
    let items = [
        ExtendItem::tokens(RequestId(1), &[5]),
        ExtendItem::tokens(RequestId(1), &[6]),
    ];
    let mut out = Vec::new();
    m.extend_batch(&items, &mut out).await;
    assert!(out[0].is_ok());
    assert!(matches!(
        out[1],
        Err(ManagerError::DuplicateRequest(RequestId(1)))
    ));
    assert_eq!(m.get_handle(RequestId(1)).unwrap().num_tokens(), 21);
    // The next batch may name it again.
    m.extend_batch(&items[..1], &mut out).await;
    assert!(out[0].is_ok());
    let before = snapshot(&m);
    let item = ExportItem {
        request: RequestId(1),
        new_tokens: 1,
        lookahead: 0,
    };
    let mut t = KernelTables::default();
    let e = m.export_tables(&[item, item], &mut t).unwrap_err();
    assert!(
        matches!(e, ManagerError::DuplicateRequest(RequestId(1))),
        "{e}"
    );
    assert!(t.block_tables.is_empty() && t.slot_mapping.is_empty());
    // Lookahead past u32: refused before any buffer is sized.
    for (new_tokens, lookahead) in [(1, u32::MAX), (u32::MAX, 1), (u32::MAX, u32::MAX)] {
        let item = ExportItem {
            request: RequestId(1),
            new_tokens,
            lookahead,
        };
        assert!(m.export_tables(&[item], &mut t).is_err());
        assert!(t.slot_mapping.is_empty());
    }
    assert_eq!(snapshot(&m), before);
}

#[tokio::test]
async fn impossible_extensions_are_refused_before_anything_moves() {
    let m = with_request(17).await;
    // A fork shares the partial block: its next append needs a copy.
    let _b = m.fork(RequestId(1), RequestId(2)).await.unwrap();
    let _c = m
        .allocate_request(&request(3, prompt(16, 3)))
        .await
        .unwrap();
    m.preempt(RequestId(3), PreemptMode::Swap).await.unwrap();
    let before = snapshot(&m);
    for id in [2, 3] {
        for (count, lookahead) in [(1, u32::MAX), (1, 5000), (u32::MAX, 0)] {
            let item = ExtendItem {
                request: RequestId(id),
                tokens: None,
                count,
                lookahead,
            };
            let e = m.extend_request(item).await.unwrap_err();
            assert!(
                matches!(
                    e,
                    ManagerError::InvalidRequest(InvalidRequest::TooLong { .. })
                        | ManagerError::Core(_)
                ),
                "request {id}, {count} + {lookahead}: {e}"
            );
        }
    }
    // No copy made, no swap-in, nothing preempted.
    assert_eq!(snapshot(&m), before);
    assert_eq!(m.get_cache_device(RequestId(3)), Some(Device::Cpu));
    let mut events = Vec::new();
    m.drain_events(&mut events);
    assert_eq!(
        events
            .iter()
            .filter(|e| matches!(e, ManagerEvent::Preempted(_)))
            .count(),
        1,
        "only the scheduler's preemption"
    );
}

#[tokio::test]
async fn an_empty_extension_changes_only_the_lookahead() {
    let m = with_request(12).await;
    let x = m
        .extend_request(ExtendItem {
            request: RequestId(1),
            tokens: None,
            count: 0,
            lookahead: 6,
        })
        .await
        .unwrap();
    assert_eq!(x.new_blocks, 1, "12 tokens and 6 slots: 3 blocks");
    // The request still publishes: its next full block is a prefix hit.
    let rest: Vec<u32> = prompt(16, 1)[12..].to_vec();
    m.extend_request(ExtendItem::tokens(RequestId(1), &rest))
        .await
        .unwrap();
    let b = m
        .allocate_request(&request(2, prompt(16, 1)))
        .await
        .unwrap();
    assert_eq!(b.device_hit_blocks, 2, "both full blocks were published");
}

#[tokio::test]
async fn seven_devices_then_no_slot_left_for_compression() {
    let mut cfg = config(16);
    cfg.host_blocks = 64;
    cfg.target_devices = (0..7).map(Device::Gpu).collect();
    let m = HostManager::new(HostBackend::new(), cfg.clone()).unwrap();
    let mut r = request(1, prompt(40, 1));
    r.device = Some(Device::Gpu(6));
    m.allocate_request(&r).await.unwrap();
    assert_eq!(m.get_cache_device(RequestId(1)), Some(Device::Gpu(6)));
    m.move_cache(RequestId(1), Device::Gpu(3)).await.unwrap();
    m.preempt(RequestId(1), PreemptMode::Swap).await.unwrap();
    m.extend_request(ExtendItem::tokens(RequestId(1), &[1]))
        .await
        .unwrap();
    assert_eq!(m.get_cache_device(RequestId(1)), Some(Device::Gpu(3)));
    // Seven devices and the host tier take all eight pool slots.
    let before = snapshot(&m);
    let e = m
        .compress_with(RequestId(1), QuantFormat::Int8PerHead)
        .await
        .unwrap_err();
    assert!(matches!(e, ManagerError::NoPoolSlot(_)), "{e}");
    assert_eq!(snapshot(&m), before);
    // Eight devices: more than the core's pools less the host tier.
    cfg.target_devices = (0..8).map(Device::Gpu).collect();
    let r = HostManager::new(HostBackend::new(), cfg);
    assert!(matches!(r, Err(ManagerError::Config { .. })));
}

/// gc frees a request only if it is still idle when freed: a request used
/// again (extended, swapped back in) after it went idle stays.
#[tokio::test]
async fn gc_frees_only_requests_still_idle() {
    let mut cfg = config(32);
    cfg.host_blocks = 32;
    cfg.request_ttl_seconds = Some(1);
    let m = HostManager::new(HostBackend::new(), cfg).unwrap();
    for id in 1..=3 {
        m.allocate_request(&request(id, prompt(16, id as u32)))
            .await
            .unwrap();
    }
    m.preempt(RequestId(2), PreemptMode::Swap).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    // All three idle past the TTL; 1 is extended, 2 swapped back in.
    m.extend_request(ExtendItem::tokens(RequestId(1), &[1]))
        .await
        .unwrap();
    pagedkv_manager::AdvancedKvCacheManager::swap_in(&m, RequestId(2))
        .await
        .unwrap();
    let g = m.gc().await.unwrap();
    assert_eq!(g.caches_freed, 1);
    assert!(m.get_handle(RequestId(1)).is_some());
    assert!(m.get_handle(RequestId(2)).is_some());
    assert!(m.get_handle(RequestId(3)).is_none());
    m.check_invariants().unwrap();
}

/// A handle belongs to one allocation: after its request is freed and the
/// id allocated again, the old handle sees nothing of the new request.
#[tokio::test]
async fn an_old_handle_never_reads_a_new_request_of_its_id() {
    let m = with_request(20).await;
    let old = m.get_handle(RequestId(1)).unwrap();
    assert!(old.is_valid());
    m.preempt(RequestId(1), PreemptMode::Recompute)
        .await
        .unwrap();
    m.allocate_request(&request(1, prompt(40, 9)))
        .await
        .unwrap();
    assert!(!old.is_valid());
    assert_eq!(old.num_tokens(), 0);
    assert!(old.block_table().physical_blocks.is_empty());
    assert!(old.key_cache(0).is_err());
    let new = m.get_handle(RequestId(1)).unwrap();
    assert_eq!(new.num_tokens(), 40);
}

/// Blocks released by a swap-out (not a free) are stamped then: the prefix
/// TTL counts from there, not from the manager's start.
#[tokio::test]
async fn prefix_ttl_counts_from_a_swap_out_too() {
    let mut cfg = config(32);
    cfg.host_blocks = 32;
    cfg.prefix_cache_config = Some(PrefixCacheConfig {
        prefix_ttl_seconds: 1,
        ..PrefixCacheConfig::default()
    });
    let m = HostManager::new(HostBackend::new(), cfg).unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    m.allocate_request(&request(1, prompt(32, 1)))
        .await
        .unwrap();
    m.preempt(RequestId(1), PreemptMode::Swap).await.unwrap();
    let g = m.gc().await.unwrap();
    assert_eq!(g.prefixes_expired, 0, "released just now");
    let b = m
        .allocate_request(&request(2, prompt(32, 1)))
        .await
        .unwrap();
    assert_eq!(b.device_hit_blocks, 4);
}

/// The pressure callback may call the manager (no lock is held), and
/// levels arrive in the order they happened.
#[tokio::test]
async fn the_pressure_callback_may_call_the_manager() {
    let m = std::sync::Arc::new(manager(16, PreemptionPolicy::Scheduler));
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let (weak, s2) = (std::sync::Arc::downgrade(&m), seen.clone());
    m.set_pressure_callback(Box::new(move |level| {
        let used = weak.upgrade().map_or(0, |m| m.stats().used_memory_bytes);
        s2.lock().unwrap().push((level, used));
    }));
    m.allocate_request(&request(1, prompt(120, 1)))
        .await
        .unwrap();
    m.deallocate(RequestId(1)).await.unwrap();
    let seen = seen.lock().unwrap().clone();
    assert!(seen.len() >= 2, "{seen:?}");
    assert!(seen[0].1 > 0, "the callback read the manager's stats");
    assert_eq!(seen.last().unwrap().0, pagedkv_manager::MemoryPressure::Low);
}
