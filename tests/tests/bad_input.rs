//! Bad input, one test per case: each call returns a typed error naming the
//! reason, and changes nothing (invariants hold, every observable of the
//! cache, stats included, is as before).
#![allow(clippy::cast_possible_truncation, reason = "small test values")]

use pagedkv_core::{
    BatchValidator, BlockCopy, BlockHash, BlockId, BlockOrder, BlockPool, BlockSlot, BlockTable,
    CacheConfig, CacheSalt, CacheStorage, DType, Error, KvCache, KvLayout, PlanSlot, PoolConfig,
    PoolId, PressureMonitor, PressureThresholds, Prompt, SeqId, SeqSlot, SipBlockHasher, Slots,
    buckets_for,
};
use pagedkv_tests::{TEST_KEY, cache_with, fingerprint};

const BS: u32 = 4;
const GPU: PoolId = PoolId(0);
const GPU1: PoolId = PoolId(1);
const HOST: PoolId = PoolId(2);

fn config() -> CacheConfig {
    CacheConfig {
        tokens_per_block: BS,
        max_seqs: 4,
        max_blocks_per_seq: 8,
        max_plans: 1,
    }
}

/// A cache with some history: a live sequence `a` (10 tokens, 3 blocks), its
/// fork `b`, and cached blocks of a freed sequence.
fn setup() -> (KvCache<'static, SipBlockHasher>, SeqId, SeqId, SeqId) {
    let mut c = cache_with(config(), &[16, 16], 16);
    let tokens: Vec<u32> = (0..10).collect();
    let a = c.allocate(GPU, &Prompt::ids(&tokens)).unwrap().seq;
    let b = c.fork(a).unwrap();
    let gone = c.allocate(GPU, &Prompt::ids(&[9, 9, 9, 9, 8])).unwrap().seq;
    c.free(gone).unwrap();
    c.check_invariants().unwrap();
    (c, a, b, gone)
}

/// Asserts that `$call` on `$c` fails with `$err` and changes nothing.
macro_rules! refused {
    ($c:expr, $call:expr, $err:pat) => {{
        let before = fingerprint(&$c, false);
        let r = $call;
        assert!(matches!(r, Err($err)), "got {:?}", r.map(|_| ()));
        let e = r.map(|_| ()).unwrap_err();
        assert!(!e.to_string().is_empty());
        assert_eq!(fingerprint(&$c, false), before, "{e} changed state");
        $c.check_invariants().unwrap();
    }};
}

#[test]
fn stale_seq_id() {
    let (mut c, _, _, gone) = setup();
    refused!(c, c.append(gone, &[1]), Error::UnknownSequence(_));
    refused!(c, c.free(gone), Error::UnknownSequence(_));
}

#[test]
fn never_issued_seq_id() {
    let (mut c, a, _, _) = setup();
    let bogus = SeqId { index: 999, ..a };
    refused!(c, c.fork(bogus), Error::UnknownSequence(_));
    refused!(c, c.info(bogus), Error::UnknownSequence(_));
}

#[test]
fn zero_tokens_per_block() {
    let cfg = CacheConfig {
        tokens_per_block: 0,
        ..config()
    };
    assert_eq!(
        KvCache::with_config(cfg, SipBlockHasher::new(TEST_KEY)).unwrap_err(),
        Error::ZeroTokensPerBlock
    );
    assert_eq!(
        BlockPool::with_capacity(PoolConfig::device(0, 0), 8).unwrap_err(),
        Error::ZeroTokensPerBlock
    );
    assert_eq!(BlockTable::new(0).unwrap_err(), Error::ZeroTokensPerBlock);
    assert_eq!(
        BlockTable::blocks_needed_for_length(5, 0),
        Err(Error::ZeroTokensPerBlock)
    );
}

#[test]
fn zero_capacity() {
    assert_eq!(
        BlockPool::with_capacity(PoolConfig::device(0, 4), 0).unwrap_err(),
        Error::ZeroCapacity
    );
    let cfg = CacheConfig {
        max_seqs: 0,
        ..config()
    };
    assert_eq!(
        KvCache::with_config(cfg, SipBlockHasher::new(TEST_KEY)).unwrap_err(),
        Error::ZeroCapacity
    );
}

#[test]
fn capacity_beyond_block_ids() {
    assert!(matches!(
        BlockPool::with_capacity(PoolConfig::device(0, 4), u32::MAX),
        Err(Error::CapacityTooLarge { .. })
    ));
}

#[test]
fn storage_too_small() {
    let mut slots = [BlockSlot::EMPTY; 8];
    let mut index = [0u32; 4];
    assert_eq!(
        BlockPool::new(PoolConfig::device(0, 4), &mut slots, &mut index).unwrap_err(),
        Error::StorageTooSmall {
            needed: buckets_for(8),
            provided: 4
        }
    );
    let storage = CacheStorage {
        seqs: Slots::from(vec![SeqSlot::EMPTY; 4]),
        tables: Slots::from(vec![BlockId(0); 3]),
        pending: Slots::from(vec![0; 16]),
        plans: Slots::from(vec![PlanSlot::EMPTY; 1]),
        plan_targets: Slots::from(vec![BlockId(0); 8]),
        plan_sources: Slots::from(vec![BlockId(0); 8]),
    };
    assert!(matches!(
        KvCache::new(config(), storage, SipBlockHasher::new(TEST_KEY)),
        Err(Error::StorageTooSmall {
            needed: 32,
            provided: 3
        })
    ));
}

#[test]
fn length_overflow_on_append() {
    let (mut c, a, _, _) = setup();
    refused!(c, c.append_len(a, u32::MAX), Error::LengthOverflow);
    // The seed's `blocks_needed_for_length` overflowed here; ours cannot.
    assert_eq!(
        BlockTable::blocks_needed_for_length(usize::MAX, 16),
        Ok(usize::MAX / 16 + 1)
    );
}

#[test]
fn prompt_larger_than_pool() {
    let cfg = CacheConfig {
        max_blocks_per_seq: 64,
        ..config()
    };
    let mut c = cache_with(cfg, &[16], 0);
    refused!(
        c,
        c.allocate(GPU, &Prompt::len(17 * BS)),
        Error::LargerThanPool {
            needed: 17,
            capacity: 16
        }
    );
}

#[test]
fn prompt_longer_than_a_table_row() {
    let (mut c, _, _, _) = setup();
    refused!(
        c,
        c.allocate(GPU, &Prompt::len(9 * BS)),
        Error::SequenceTooLong {
            blocks: 9,
            max_blocks: 8
        }
    );
}

#[test]
fn append_past_a_table_row() {
    let (mut c, a, _, _) = setup();
    refused!(c, c.append_len(a, 100), Error::SequenceTooLong { .. });
}

#[test]
fn fork_of_a_freed_sequence() {
    let (mut c, _, _, gone) = setup();
    refused!(c, c.fork(gone), Error::UnknownSequence(_));
}

#[test]
fn swap_in_without_swap_out() {
    let (mut c, a, _, _) = setup();
    refused!(c, c.swap_in(a, GPU1), Error::NotSwappedOut(_));
}

#[test]
fn swap_out_of_a_swapped_out_sequence() {
    let (mut c, a, _, _) = setup();
    let p = c.swap_out(a, HOST).unwrap();
    c.commit(p).unwrap();
    refused!(c, c.swap_out(a, HOST), Error::NotOnDevice(_));
}

#[test]
fn commit_of_an_aborted_plan() {
    let (mut c, a, _, _) = setup();
    let p = c.swap_out(a, HOST).unwrap();
    c.abort(p).unwrap();
    refused!(c, c.commit(p), Error::UnknownPlan(_));
    refused!(c, c.abort(p), Error::UnknownPlan(_));
}

#[test]
fn commit_twice() {
    let (mut c, a, _, _) = setup();
    let p = c.swap_out(a, HOST).unwrap();
    c.commit(p).unwrap();
    refused!(c, c.commit(p), Error::UnknownPlan(_));
}

#[test]
fn duplicate_registration() {
    let mut pool = BlockPool::with_capacity(PoolConfig::device(0, BS), 4).unwrap();
    let b0 = pool.allocate_one().unwrap();
    pool.register(b0, BlockHash(6), None).unwrap();
    let (order, stats) = (pool.eviction_order().count(), pool.stats());
    assert_eq!(
        pool.register(b0, BlockHash(7), None),
        Err(Error::AlreadyRegistered(b0))
    );
    assert_eq!(
        (pool.eviction_order().count(), pool.stats()),
        (order, stats)
    );
    assert_eq!(pool.lookup(BlockHash(6)), Some(b0));
    pool.check_invariants().unwrap();
}

#[test]
fn salts_mixed() {
    let (mut c, a, _, _) = setup();
    let t = c.create(GPU, Some(CacheSalt(5))).unwrap();
    refused!(c, c.share_prefix(a, t, 4), Error::SaltMismatch { .. });
}

#[test]
fn share_into_a_non_empty_target() {
    let (mut c, a, b, _) = setup();
    refused!(c, c.share_prefix(a, b, 4), Error::TargetNotEmpty(_));
}

#[test]
fn share_with_itself() {
    let (mut c, a, _, _) = setup();
    refused!(c, c.share_prefix(a, a, 4), Error::SameSequence(_));
}

#[test]
fn share_more_tokens_than_the_source_holds() {
    let (mut c, a, _, _) = setup();
    let t = c.create(GPU, None).unwrap();
    refused!(
        c,
        c.share_prefix(a, t, 11),
        Error::TooManyTokens {
            requested: 11,
            available: 10
        }
    );
}

#[test]
fn double_free_of_a_block() {
    let mut p = BlockPool::with_capacity(PoolConfig::device(0, 4), 4).unwrap();
    let b = p.allocate_one().unwrap();
    p.release(b).unwrap();
    let st = p.stats();
    assert_eq!(p.release(b), Err(Error::BlockNotInUse(b)));
    assert_eq!(p.add_ref(b), Err(Error::BlockNotInUse(b)));
    assert_eq!(p.stats(), st);
    p.check_invariants().unwrap();
}

#[test]
fn unknown_block() {
    let mut p = BlockPool::with_capacity(PoolConfig::device(0, 4), 4).unwrap();
    assert_eq!(p.release(BlockId(4)), Err(Error::UnknownBlock(BlockId(4))));
    assert_eq!(
        p.ref_count(BlockId(99)),
        Err(Error::UnknownBlock(BlockId(99)))
    );
    p.check_invariants().unwrap();
}

#[test]
fn batch_free_with_one_release_too_many_changes_nothing() {
    let mut p = BlockPool::with_capacity(PoolConfig::device(0, 4), 4).unwrap();
    let mut ids = [BlockId(0); 2];
    p.allocate(&mut ids).unwrap();
    let st = p.stats();
    assert_eq!(
        p.free(&[ids[0], ids[1], ids[0]]),
        Err(Error::BlockNotInUse(ids[0]))
    );
    assert_eq!(p.stats(), st);
    assert_eq!(p.ref_count(ids[0]), Ok(1));
    p.check_invariants().unwrap();
}

#[test]
fn swap_out_to_a_device_pool_or_the_same_pool() {
    let (mut c, a, _, _) = setup();
    refused!(c, c.swap_out(a, GPU1), Error::WrongPoolKind(_));
    refused!(c, c.move_to(a, GPU), Error::SamePool(_));
}

#[test]
fn unknown_pool() {
    let (mut c, a, _, _) = setup();
    refused!(
        c,
        c.allocate(PoolId(7), &Prompt::len(3)),
        Error::UnknownPool(PoolId(7))
    );
    refused!(c, c.move_to(a, PoolId(9)), Error::UnknownPool(PoolId(9)));
}

#[test]
fn pool_with_other_tokens_per_block() {
    let (mut c, _, _, _) = setup();
    let p = BlockPool::with_capacity(PoolConfig::device(5, 8), 4).unwrap();
    assert_eq!(
        c.add_pool(p).unwrap_err(),
        Error::TokensPerBlockMismatch {
            expected: 4,
            found: 8
        }
    );
}

#[test]
fn busy_sequence() {
    let (mut c, a, _, _) = setup();
    c.swap_out(a, HOST).unwrap();
    refused!(c, c.append(a, &[1]), Error::SequenceBusy(_));
    refused!(c, c.free(a), Error::SequenceBusy(_));
    refused!(c, c.fork(a), Error::SequenceBusy(_));
}

#[test]
fn append_to_a_swapped_out_sequence() {
    let (mut c, a, _, _) = setup();
    let p = c.swap_out(a, HOST).unwrap();
    c.commit(p).unwrap();
    refused!(c, c.append(a, &[1]), Error::SequenceSwappedOut(_));
}

#[test]
fn too_many_sequences() {
    let (mut c, _, _, _) = setup();
    c.allocate(GPU, &Prompt::len(1)).unwrap();
    c.allocate(GPU, &Prompt::len(1)).unwrap();
    refused!(
        c,
        c.allocate(GPU, &Prompt::len(1)),
        Error::TooManySequences { capacity: 4 }
    );
}

#[test]
fn too_many_plans() {
    let (mut c, a, b, _) = setup();
    c.swap_out(a, HOST).unwrap();
    refused!(c, c.swap_out(b, HOST), Error::TooManyPlans { capacity: 1 });
}

#[test]
fn more_keys_than_full_blocks() {
    let (mut c, _, _, _) = setup();
    let keys = [BlockHash(1), BlockHash(2)];
    refused!(
        c,
        c.allocate(GPU, &Prompt::keys(&keys, 7)),
        Error::TooManyKeys {
            keys: 2,
            full_blocks: 1
        }
    );
}

#[test]
fn out_of_blocks_loses_nothing() {
    let (mut c, _, _, _) = setup();
    c.allocate(GPU, &Prompt::len(8 * BS)).unwrap();
    // 16 blocks: 3 held by a/b, 8 by the new sequence, 2 cached, 3 free: 5 available.
    let before = fingerprint(&c, true);
    let failures = c.pool(GPU).unwrap().stats().allocation_failures;
    assert_eq!(
        c.allocate(GPU, &Prompt::len(6 * BS)).unwrap_err(),
        Error::OutOfBlocks {
            needed: 6,
            available: 5
        }
    );
    assert_eq!(fingerprint(&c, true), before);
    assert_eq!(
        c.pool(GPU).unwrap().stats().allocation_failures,
        failures + 1
    );
    c.check_invariants().unwrap();
}

#[test]
fn export_into_short_buffers() {
    let (c, a, b, _) = setup();
    let mut out = [0i32; 5];
    refused!(
        c,
        c.export_block_tables(&[a, b], 3, -1, &mut out),
        Error::OutputTooSmall {
            needed: 6,
            provided: 5
        }
    );
    let mut wide = [0i32; 4];
    refused!(
        c,
        c.export_block_tables(&[a, b], 2, -1, &mut wide),
        Error::OutputTooSmall {
            needed: 3,
            provided: 2
        }
    );
    let (mut ip, mut idx, mut last) = ([0i32; 3], [0i32; 5], [0i32; 2]);
    refused!(
        c,
        c.export_flashinfer(&[a, b], &mut ip, &mut idx, &mut last),
        Error::OutputTooSmall {
            needed: 6,
            provided: 5
        }
    );
    let mut slots = [0i64; 4];
    refused!(
        c,
        c.export_slot_mapping(&[(a, 11)], &mut slots),
        Error::TooManyTokens { .. }
    );
}

#[test]
fn bad_copy_batches() {
    let mut v = BatchValidator::with_capacity(16);
    let c = |s, d| BlockCopy {
        src: BlockId(s),
        dst: BlockId(d),
    };
    assert_eq!(
        v.validate(&[c(0, 16)], 16, 16, false).unwrap_err(),
        Error::CopyOutOfBounds { copy: 0 }
    );
    assert_eq!(
        v.validate(&[c(0, 1), c(2, 1)], 16, 16, false).unwrap_err(),
        Error::DuplicateTarget { copy: 1 }
    );
    assert_eq!(
        v.validate(&[c(0, 1), c(1, 2)], 16, 16, true).unwrap_err(),
        Error::ReadWriteOverlap { copy: 0 }
    );
    assert!(matches!(
        v.validate(&[], 17, 1, false),
        Err(Error::CapacityTooLarge { .. })
    ));
}

#[test]
fn bad_layouts_and_thresholds() {
    let l = KvLayout {
        layers: 0,
        kv_heads: 8,
        head_size: 128,
        tokens_per_block: 16,
        dtype: DType::F16,
        order: BlockOrder::BlockMajor,
    };
    assert_eq!(l.validate(), Err(Error::ZeroLayoutDimension));
    let huge = KvLayout {
        layers: u32::MAX,
        kv_heads: u32::MAX,
        head_size: u32::MAX,
        ..l
    };
    assert_eq!(huge.validate(), Err(Error::LayoutTooLarge));
    let wide = KvLayout { layers: 4, ..huge };
    assert_eq!(wide.validate(), Err(Error::LengthOverflow));
    let t = PressureThresholds {
        medium: 0.9,
        high: 0.5,
        critical: 0.95,
    };
    assert_eq!(
        PressureMonitor::new(t, 0.05).unwrap_err(),
        Error::InvalidThresholds
    );
    let nan = PressureThresholds {
        medium: f32::NAN,
        ..PressureThresholds::default()
    };
    assert_eq!(nan.validate(), Err(Error::InvalidThresholds));
}
