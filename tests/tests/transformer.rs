//! The proof: a tiny transformer whose attention reads K and V only through
//! the manager's block tables (`KvView`s over hal-host regions) produces the
//! same logits, bit for bit, as the same model over contiguous per-request
//! KV, through a serving scenario of 16 requests that exercises everything
//! an engine does with its KV (see `pagedkv_tests::transformer`). Each step
//! asserts what it exercised, so the test cannot pass idle.

#![allow(clippy::cast_possible_truncation, reason = "small request ids")]

use pagedkv_manager::core::QuantFormat;
use pagedkv_manager::{KvCacheManager, ManagerError};
use pagedkv_tests::transformer::engine::{Engine, EngineConfig};
use pagedkv_tests::transformer::{Config, Model};

/// A system prompt of `n` tokens.
fn system(n: u32, salt: u32) -> Vec<u32> {
    (0..n).map(|i| (i * 7 + salt * 13) % 61).collect()
}

fn prompt(sys: &[u32], user: u32, n: u32) -> Vec<u32> {
    let mut p = sys.to_vec();
    p.extend((0..n).map(|i| (user * 17 + i * 5 + 3) % 61));
    p
}

fn engine(full_blocks: usize) -> Engine {
    Engine::new(
        Model::new(Config::tiny(), 2026),
        EngineConfig {
            full_blocks,
            window_blocks: 256,
            host_blocks: 256,
            prefix: true,
            check: true,
        },
    )
}

/// Decodes `ids` until each generated `until` tokens (or `steps` ran).
fn decode(e: &mut Engine, ids: &[u64], until: usize, steps: usize) {
    for _ in 0..steps {
        let batch: Vec<u64> = ids
            .iter()
            .copied()
            .filter(|&id| e.generated(id) < until)
            .collect();
        if batch.is_empty() {
            break;
        }
        e.step(&batch);
    }
}

#[test]
fn paged_attention_equals_contiguous_attention_bit_for_bit() {
    // 40 device blocks of 4 tokens for the full-attention group: 16 requests
    // of about 30 tokens each do not fit at once.
    let mut e = engine(40);
    let sys = [system(16, 1), system(12, 2)];

    // Chunked prefill of a fresh prompt.
    e.admit(0, &prompt(&sys[0], 0, 7), Some(5)).unwrap();
    assert!(e.seen.chunks >= 4, "prefilled in chunks: {:?}", e.seen);
    assert_eq!(e.seen.device_hit_blocks, 0);

    // Shared system prompts: prefix hits skip their prefill (both groups).
    for id in 1..=5 {
        e.admit(id, &prompt(&sys[0], id as u32, 6), None).unwrap();
    }
    for id in 6..=8 {
        e.admit(id, &prompt(&sys[1], id as u32, 9), Some(6))
            .unwrap();
    }
    assert!(e.seen.device_hit_blocks >= 5 * 4 + 2 * 3, "{:?}", e.seen);
    assert!(e.seen.skipped_tokens >= 5 * 16 + 2 * 12, "{:?}", e.seen);

    // Parallel sampling: three forks of request 3 start from its 1st, 2nd
    // and 3rd best tokens; their first step copies the shared partial block.
    for (child, rank) in [(9, 1), (10, 2), (11, 3)] {
        e.fork(3, child, rank).unwrap();
    }
    let copies = e.seen.copies;
    e.step(&[3, 9, 10, 11]);
    assert!(
        e.seen.copies > copies,
        "copy-on-write of the forks: {:?}",
        e.seen
    );

    // Speculative decoding into lookahead slots: two drafts accepted, one
    // rejected, on two requests.
    assert_eq!(e.speculate(1, 3).unwrap(), 2);
    assert_eq!(e.speculate(6, 3).unwrap(), 2);
    assert_eq!((e.seen.drafts_accepted, e.seen.drafts_rejected), (4, 2));

    // Batched decoding of all twelve under pressure: "no room" answers, the
    // engine preempts (swap out), later steps bring them back.
    let running = e.running();
    decode(&mut e, &running, 6, 8);
    assert!(
        e.seen.preemptions > 0,
        "swapped out under pressure: {:?}",
        e.seen
    );

    // Defragment mid-run: blocks move, the next steps read them where they went.
    for id in [2, 4, 9] {
        e.finish(id).unwrap();
    }
    let moved = e.defragment().unwrap();
    assert!(moved > 0, "defragment moved no request's blocks");

    // Four late requests: a prefix hit on a system prompt, chunked prefill,
    // admitted as room allows.
    let mut waiting: Vec<(u64, Vec<u32>)> = (12..16)
        .map(|id| (id, prompt(&sys[(id % 2) as usize], id as u32, 8)))
        .collect();
    for _ in 0..200 {
        waiting.retain(|(id, p)| match e.admit(*id, p, Some(8)) {
            Ok(()) => false,
            Err(ManagerError::NoRoom { .. }) => true,
            Err(err) => panic!("admit {id}: {err}"),
        });
        let running = e.running();
        if waiting.is_empty() && running.iter().all(|&id| e.generated(id) >= 16) {
            break;
        }
        decode(&mut e, &running, 16, 1);
        // Finished requests leave.
        for id in running {
            if e.generated(id) >= 16 && id % 3 == 0 {
                e.finish(id).unwrap();
            }
        }
    }
    assert!(waiting.is_empty(), "requests never admitted: {waiting:?}");
    assert!(
        e.seen.swapped_in > 0,
        "preempted requests came back: {:?}",
        e.seen
    );
    assert!(
        e.seen.window_released > 0,
        "the window group released blocks"
    );
    for id in e.running() {
        e.finish(id).unwrap();
    }
    assert!(
        e.full.used_blocks().iter().all(|&u| u == 0),
        "{:?}",
        e.full.used_blocks()
    );
    assert!(e.window.used_blocks().iter().all(|&u| u == 0));
    e.full.check_invariants().unwrap();
    e.window.check_invariants().unwrap();
    assert_eq!(e.full.stats().active_caches, 0);
    println!("transformer scenario: {:?}", e.seen);
    assert!(e.seen.logits_checked > 10_000);
}

/// Compressed KV (int8 or fp8 per head) is lossy: the logits of the steps
/// after decompression stay within a stated bound of the reference (fed the
/// reference's tokens, so both decode one sequence).
#[test]
fn compressed_kv_stays_within_its_bound() {
    // Bounds on |paged - reference| of any logit (logits here are of order
    // 1): int8 keeps 1/254 of each head's range (measured 0.0015), fp8 E4M3
    // 3 mantissa bits, a relative error up to 1/16 (measured 0.0068).
    for (format, bound) in [
        (QuantFormat::Int8PerHead, 0.01_f32),
        (QuantFormat::Fp8E4M3PerHead, 0.05),
    ] {
        let mut e = engine(64);
        e.admit(0, &prompt(&system(16, 3), 0, 9), None).unwrap();
        decode(&mut e, &[0], 3, 3);
        e.compress(0, format).unwrap();
        assert_eq!(e.full.stats().compressed_blocks, 7, "{format:?}");
        decode(&mut e, &[0], 12, 20);
        let err = e.seen.max_lossy_error;
        println!("{format:?}: largest logit error {err}");
        assert!(err > 0.0, "{format:?}: the KV was not lossy at all?");
        assert!(err <= bound, "{format:?}: logit error {err} > {bound}");
        e.finish(0).unwrap();
    }
}
