//! One manager, 64 tokio tasks × 10,000 random operations (allocate, extend,
//! fork, share, swap out / in, compress, move, free). At the end every block
//! is free and the invariants hold. And: a dropped future of any async
//! method leaks nothing.
#![allow(clippy::cast_possible_truncation, reason = "small test values")]

mod common;

use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use common::{Faulty, config, request};
use pagedkv_manager::{
    AdvancedKvCacheManager, Device, HostBackend, KvCacheManager, KvManager, ManagerError,
    MultiDeviceCacheManager, PrefixCacheConfig, RequestId,
};

fn rng(seed: u64) -> impl FnMut() -> u64 {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    }
}

fn ops_per_task() -> usize {
    std::env::var("PAGEDKV_MANAGER_OPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000)
}

/// Errors a random workload may legitimately meet (no room, a request busy
/// in another task's move, a request preempted to the host meanwhile).
fn acceptable(e: &ManagerError) -> bool {
    use pagedkv_core::Error as E;
    matches!(
        e,
        ManagerError::OutOfMemory { .. }
            | ManagerError::Core(
                E::OutOfBlocks { .. }
                    | E::SequenceBusy(_)
                    | E::NotOnDevice(_)
                    | E::SequenceSwappedOut(_)
                    | E::TooManyPlans { .. }
                    | E::TooManySequences { .. }
            )
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixty_four_tasks_of_random_operations() {
    let mut cfg = config(256);
    cfg.initial_blocks = 64;
    cfg.host_blocks = 512;
    cfg.target_devices = vec![Device::Gpu(0), Device::Gpu(1)];
    cfg.prefix_cache_config = Some(PrefixCacheConfig::default());
    cfg.offload_evicted_prefixes = true;
    cfg.max_sequences = 1024;
    // The manager preempts on its own: its swaps race the tasks' own.
    cfg.preemption = pagedkv_manager::PreemptionPolicy::Automatic;
    let m = Arc::new(KvManager::new(HostBackend::new(), cfg).unwrap());
    let n = ops_per_task();
    let mut tasks = Vec::new();
    for t in 0..64u64 {
        let m = Arc::clone(&m);
        tasks.push(tokio::spawn(async move {
            let mut r = rng(t + 1);
            let mut live: Vec<RequestId> = Vec::new();
            let mut handles = Vec::new();
            let mut next = t * 1_000_000;
            let mut done = 0u64;
            for _ in 0..n {
                let pick = |r: &mut dyn FnMut() -> u64, live: &Vec<RequestId>| {
                    live[(r() % live.len() as u64) as usize]
                };
                let res: Result<(), ManagerError> = match r() % 12 {
                    0 | 1 if live.len() < 3 => {
                        next += 1;
                        let len = 8 + (r() % 56) as u32;
                        let base = (r() % 4) as u32;
                        let prompt: Vec<u32> = (0..len)
                            .map(|i| {
                                if i < 32 {
                                    base * 1000 + i
                                } else {
                                    r() as u32 % 50
                                }
                            })
                            .collect();
                        match m.allocate(&request(next, prompt)).await {
                            Ok(h) => {
                                live.push(RequestId(next));
                                handles.push(h);
                                Ok(())
                            }
                            Err(e) => Err(e),
                        }
                    }
                    2 | 3 if !live.is_empty() => {
                        m.extend(pick(&mut r, &live), 1 + (r() % 8) as usize).await
                    }
                    4 if !live.is_empty() => {
                        let toks: Vec<u32> = (0..1 + r() % 8).map(|_| r() as u32 % 50).collect();
                        m.extend_tokens(pick(&mut r, &live), &toks).await
                    }
                    5 if !live.is_empty() && live.len() < 3 => {
                        next += 1;
                        match m.fork(pick(&mut r, &live), RequestId(next)).await {
                            Ok(h) => {
                                live.push(RequestId(next));
                                handles.push(h);
                                Ok(())
                            }
                            Err(e) => Err(e),
                        }
                    }
                    6 if !live.is_empty() => m.swap_out(pick(&mut r, &live)).await,
                    7 if !live.is_empty() => m.swap_in(pick(&mut r, &live)).await,
                    8 if !live.is_empty() => m.compress_cache(pick(&mut r, &live), 0.51).await,
                    9 if !live.is_empty() => {
                        let d = Device::Gpu((r() % 2) as u16);
                        m.move_cache(pick(&mut r, &live), d).await
                    }
                    _ if !live.is_empty() => {
                        let i = (r() % live.len() as u64) as usize;
                        let id = live.swap_remove(i);
                        handles.retain(|h| h.request_id() != id);
                        m.deallocate(id).await
                    }
                    _ => Ok(()),
                };
                match res {
                    Ok(()) => done += 1,
                    Err(e) => assert!(acceptable(&e), "task {t}: {e}"),
                }
            }
            for id in live {
                m.deallocate(id).await.unwrap();
            }
            drop(handles);
            done
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    m.check_invariants().unwrap();
    assert_eq!(m.list_handles().len(), 0);
    assert!(
        m.used_blocks().iter().all(|&u| u == 0),
        "blocks still held: {:?}",
        m.used_blocks()
    );
    let s = m.stats();
    println!(
        "{total} of {} operations succeeded; {} swap outs, {} swap ins",
        64 * n,
        s.swap_outs,
        s.swap_ins
    );
    assert!(total > (64 * n as u64) / 2, "most operations succeed");
    assert!(s.swap_outs > 0 && s.swap_ins > 0);
    assert!(s.swap_ins <= s.swap_outs, "a swap in without a swap out");
}

/// Polls a future once, then drops it: the cancellation an engine causes
/// when a request is aborted mid-call.
fn poll_once_then_drop<F: Future>(f: F) -> bool {
    let mut f = std::pin::pin!(f);
    let mut cx = Context::from_waker(Waker::noop());
    matches!(f.as_mut().poll(&mut cx), Poll::Ready(_))
}

#[tokio::test]
async fn dropped_futures_leak_nothing() {
    let (be, knobs) = Faulty::new();
    let mut cfg = config(64);
    cfg.initial_blocks = 16;
    cfg.host_blocks = 64;
    cfg.target_devices = vec![Device::Gpu(0), Device::Gpu(1)];
    cfg.prefix_cache_config = Some(PrefixCacheConfig::default());
    cfg.offload_evicted_prefixes = true;
    let m = KvManager::new(be, cfg).unwrap();
    let prompt: Vec<u32> = (0..40).collect();
    let a = m.allocate(&request(1, prompt.clone())).await.unwrap();
    let _b = m.allocate(&request(2, (100..140).collect())).await.unwrap();
    // Every fence now needs three polls: each move is pending on its first poll.
    knobs
        .slow_polls
        .store(3, std::sync::atomic::Ordering::SeqCst);
    let mut pending = 0;
    for round in 0..2 {
        let id = RequestId(1);
        pending += usize::from(!poll_once_then_drop(m.swap_out(id)));
        pending += usize::from(!poll_once_then_drop(m.compress_cache(id, 0.51)));
        pending += usize::from(!poll_once_then_drop(m.move_cache(id, Device::Gpu(1))));
        if round == 1 {
            m.swap_out(id).await.unwrap();
            pending += usize::from(!poll_once_then_drop(m.swap_in(id)));
            pending += usize::from(!poll_once_then_drop(m.extend(id, 3)));
            pending += usize::from(!poll_once_then_drop(m.fork(id, RequestId(7))));
            pending += usize::from(!poll_once_then_drop(m.share_prefix(id, RequestId(2), 8)));
            m.swap_in(id).await.unwrap();
        }
        pending += usize::from(!poll_once_then_drop(m.rebalance_devices()));
        pending += usize::from(!poll_once_then_drop(m.gc()));
        m.check_invariants().unwrap();
    }
    assert!(pending >= 6, "only {pending} calls were cancelled mid-move");
    // Nothing moved, nothing leaked: the request still works.
    assert!(a.is_valid());
    m.extend(RequestId(1), 4).await.unwrap();
    for id in [1, 2] {
        m.deallocate(RequestId(id)).await.unwrap();
    }
    let _ = m.deallocate(RequestId(7)).await;
    m.check_invariants().unwrap();
    assert!(
        m.used_blocks().iter().all(|&u| u == 0),
        "{:?}",
        m.used_blocks()
    );
}
