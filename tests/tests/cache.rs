//! What an engine relies on, one behaviour per test.
#![allow(clippy::cast_possible_truncation, reason = "small test values")]

use pagedkv_core::{
    BlockHash, CacheConfig, CacheSalt, HOLE, KvEvent, MmItem, PoolId, PoolKind, Prompt,
};
use pagedkv_tests::cache_with;

const BS: u32 = 4;
const GPU: PoolId = PoolId(0);
const HOST: PoolId = PoolId(1);

fn config() -> CacheConfig {
    CacheConfig {
        tokens_per_block: BS,
        max_seqs: 16,
        max_blocks_per_seq: 32,
        max_plans: 4,
    }
}

fn toks(n: u32, salt: u32) -> Vec<u32> {
    (0..n).map(|i| i * 31 + salt).collect()
}

#[test]
fn freed_prompt_is_a_prefix_hit_and_stats_count_it() {
    let mut c = cache_with(config(), &[64], 0);
    let p = toks(18, 0);
    let a = c.allocate(GPU, &Prompt::ids(&p)).unwrap();
    assert_eq!(a.hit_blocks, 0);
    let a_blocks = c.table(a.seq).unwrap().to_vec();
    c.free(a.seq).unwrap();
    let mut q = p[..13].to_vec();
    q.extend([999, 998, 997]);
    let b = c.allocate(GPU, &Prompt::ids(&q)).unwrap();
    // Blocks 0..3 match (12 tokens); block 3 differs at token 13.
    assert_eq!((b.hit_blocks, b.hit_tokens), (3, 12));
    assert_eq!(c.table(b.seq).unwrap()[..3], a_blocks[..3]);
    let st = c.pool(GPU).unwrap().stats();
    assert_eq!(
        (st.hit_blocks, st.miss_blocks, st.hit_tokens),
        (3, 4 + 1, 12)
    );
    assert_eq!(st.query_tokens, 16 + 16);
    c.check_invariants().unwrap();
}

#[test]
fn finished_request_is_evicted_tail_first_and_lru_across_requests() {
    let mut c = cache_with(config(), &[8], 0);
    let a = c.allocate(GPU, &Prompt::ids(&toks(12, 1))).unwrap().seq;
    let ta = c.table(a).unwrap().to_vec();
    let b = c.allocate(GPU, &Prompt::ids(&toks(8, 2))).unwrap().seq;
    let tb = c.table(b).unwrap().to_vec();
    c.free(a).unwrap();
    c.free(b).unwrap();
    let order: Vec<_> = c.pool(GPU).unwrap().eviction_order().collect();
    assert_eq!(order, vec![ta[2], ta[1], ta[0], tb[1], tb[0]]);
    // 3 never-used blocks go first, then a's tail.
    let d = c.allocate(GPU, &Prompt::len(4 * BS)).unwrap().seq;
    assert!(c.table(d).unwrap().contains(&ta[2]));
    assert!(!c.table(d).unwrap().contains(&ta[1]));
    let again = c.allocate(GPU, &Prompt::ids(&toks(12, 1))).unwrap();
    assert_eq!(
        again.hit_blocks, 2,
        "a's head survives, its tail was evicted"
    );
    c.check_invariants().unwrap();
}

#[test]
fn fork_shares_blocks_and_copy_on_write_splits_the_partial_block() {
    let mut c = cache_with(config(), &[16], 0);
    let a = c.allocate(GPU, &Prompt::ids(&toks(6, 0))).unwrap().seq;
    let child = c.fork(a).unwrap();
    assert_eq!(c.table(a).unwrap(), c.table(child).unwrap());
    let shared_last = c.table(a).unwrap()[1];
    let out = c.append(child, &[77]).unwrap();
    let cow = out.cow.expect("partial shared block is copied");
    assert_eq!(cow.src, shared_last);
    assert_eq!(c.table(child).unwrap()[1], cow.dst);
    assert_eq!(c.table(a).unwrap()[1], shared_last);
    assert_eq!(c.table(child).unwrap()[0], c.table(a).unwrap()[0]);
    // The parent is now sole holder of its block: no copy.
    assert_eq!(c.append(a, &[5]).unwrap().cow, None);
    c.check_invariants().unwrap();
}

#[test]
fn tenants_with_different_salts_never_share() {
    let mut c = cache_with(config(), &[32], 0);
    let p = toks(16, 3);
    let a = c
        .allocate(GPU, &Prompt::ids(&p).with_salt(CacheSalt(1)))
        .unwrap();
    let b = c
        .allocate(GPU, &Prompt::ids(&p).with_salt(CacheSalt(2)))
        .unwrap();
    let n = c.allocate(GPU, &Prompt::ids(&p)).unwrap();
    assert_eq!(b.hit_blocks, 0);
    assert_eq!(n.hit_blocks, 0);
    let same = c
        .allocate(GPU, &Prompt::ids(&p).with_salt(CacheSalt(1)))
        .unwrap();
    assert_eq!(same.hit_blocks, 4);
    assert_eq!(c.table(same.seq).unwrap(), c.table(a.seq).unwrap());
    c.check_invariants().unwrap();
}

#[test]
fn adapters_and_images_are_part_of_the_key() {
    let mut c = cache_with(config(), &[32], 0);
    let p = toks(8, 4);
    c.allocate(GPU, &Prompt::ids(&p)).unwrap();
    let lora = Prompt {
        adapter: Some(3),
        ..Prompt::ids(&p)
    };
    assert_eq!(c.allocate(GPU, &lora).unwrap().hit_blocks, 0);
    let cat = [MmItem {
        content_hash: 1,
        offset: 4,
        len: 4,
    }];
    let dog = [MmItem {
        content_hash: 2,
        offset: 4,
        len: 4,
    }];
    let with_cat = Prompt {
        mm: &cat,
        ..Prompt::ids(&p)
    };
    let with_dog = Prompt {
        mm: &dog,
        ..Prompt::ids(&p)
    };
    // Block 0 holds no image tokens: it is shared; block 1 is not.
    assert_eq!(c.allocate(GPU, &with_cat).unwrap().hit_blocks, 1);
    assert_eq!(c.allocate(GPU, &with_dog).unwrap().hit_blocks, 1);
    assert_eq!(c.allocate(GPU, &with_cat).unwrap().hit_blocks, 2);
    c.check_invariants().unwrap();
}

#[test]
fn decode_blocks_register_and_are_hit_by_a_later_prompt() {
    let mut c = cache_with(config(), &[32], 0);
    let p = toks(6, 5);
    let a = c.allocate(GPU, &Prompt::ids(&p)).unwrap().seq;
    c.append(a, &[100, 101, 102]).unwrap();
    let mut all = p.clone();
    all.extend([100, 101, 102]);
    c.free(a).unwrap();
    assert_eq!(c.allocate(GPU, &Prompt::ids(&all)).unwrap().hit_blocks, 2);
}

#[test]
fn same_block_computed_twice_at_once_keeps_one_key() {
    let mut c = cache_with(config(), &[32], 0);
    // Two sequences reach the same content through decode, independently.
    let a = c.allocate(GPU, &Prompt::ids(&[1, 2])).unwrap().seq;
    let b = c.allocate(GPU, &Prompt::ids(&[1, 2, 3])).unwrap().seq;
    // The prompt [1, 2] missed for b (partial block): both own a block for [1, 2, 3, 4].
    c.append(b, &[4]).unwrap();
    c.append(a, &[3, 4]).unwrap();
    let (ba, bb) = (c.table(a).unwrap()[0], c.table(b).unwrap()[0]);
    assert_ne!(ba, bb);
    let pool = c.pool(GPU).unwrap();
    assert_eq!(pool.indexed_len(), 1);
    assert_eq!(
        pool.key_of(ba).unwrap(),
        None,
        "the later one stays unkeyed"
    );
    c.free(a).unwrap();
    c.free(b).unwrap();
    assert_eq!(c.pool(GPU).unwrap().cached_len(), 1);
    c.check_invariants().unwrap();
}

#[test]
fn swap_out_and_in_are_two_phase() {
    let mut c = cache_with(config(), &[16], 16);
    let a = c.allocate(GPU, &Prompt::ids(&toks(10, 6))).unwrap().seq;
    let dev_table = c.table(a).unwrap().to_vec();
    // Abort: nothing moved.
    let p = c.swap_out(a, HOST).unwrap();
    assert_eq!(c.plan(p).unwrap().len(), 3);
    c.abort(p).unwrap();
    assert_eq!(c.table(a).unwrap(), &dev_table[..]);
    assert_eq!(c.pool(HOST).unwrap().used_len(), 0);
    assert_eq!(
        c.pool(HOST).unwrap().indexed_len(),
        0,
        "aborted targets are never published"
    );
    // Commit: the sequence lives on the host, its full blocks keyed there.
    let p = c.swap_out(a, HOST).unwrap();
    let copies: Vec<_> = c.plan(p).unwrap().copies().collect();
    assert_eq!(copies.iter().map(|x| x.src).collect::<Vec<_>>(), dev_table);
    assert_eq!(c.pool(HOST).unwrap().indexed_len(), 0, "not before commit");
    c.commit(p).unwrap();
    assert_eq!(c.info(a).unwrap().pool, HOST);
    assert_eq!(c.pool(HOST).unwrap().indexed_len(), 2);
    assert_eq!(c.pool(GPU).unwrap().used_len(), 0);
    assert_eq!(
        c.pool(GPU).unwrap().cached_len(),
        2,
        "device copies stay cached"
    );
    let p = c.swap_in(a, GPU).unwrap();
    c.commit(p).unwrap();
    assert_eq!(c.info(a).unwrap().pool, GPU);
    c.append(a, &[1, 2, 3]).unwrap();
    c.check_invariants().unwrap();
}

#[test]
fn events_mirror_the_index_for_a_router() {
    let mut c = cache_with(config(), &[4], 0);
    let a = c.allocate(GPU, &Prompt::ids(&toks(12, 7))).unwrap().seq;
    let keys: Vec<BlockHash> = c
        .table(a)
        .unwrap()
        .iter()
        .map(|&b| c.pool(GPU).unwrap().key_of(b).unwrap().unwrap())
        .collect();
    match c.pop_event(GPU).unwrap() {
        Some(KvEvent::BlockStored {
            pool: p,
            parent: None,
            keys: k,
            tokens,
            block_size,
            medium,
        }) => {
            assert_eq!(p, GPU);
            assert_eq!(&k[..], &keys[..], "one chain, one event");
            assert_eq!(&tokens[..], &toks(12, 7)[..], "the blocks' token ids");
            assert_eq!((block_size, medium), (BS, PoolKind::Device));
        }
        e => panic!("unexpected {e:?}"),
    }
    // A block filled by decode is stored with the tokens that filled it.
    c.append(a, &[70, 71, 72, 73]).unwrap();
    let fourth = match c.pop_event(GPU).unwrap() {
        Some(KvEvent::BlockStored {
            parent,
            tokens,
            keys: k,
            ..
        }) => {
            assert_eq!(parent, Some(keys[2]));
            assert_eq!(&tokens[..], &[70, 71, 72, 73]);
            assert_eq!(k.len(), 1);
            k[0]
        }
        e => panic!("unexpected {e:?}"),
    };
    c.free(a).unwrap();
    c.allocate(GPU, &Prompt::len(3 * BS)).unwrap();
    match c.pop_event(GPU).unwrap() {
        Some(KvEvent::BlockRemoved {
            keys: k, medium, ..
        }) => {
            assert_eq!(medium, PoolKind::Device);
            assert_eq!(&k[..], &[fourth, keys[2], keys[1]], "tail evicted first");
        }
        e => panic!("unexpected {e:?}"),
    }
    c.reset_prefix_cache(GPU).unwrap();
    assert_eq!(
        c.pop_event(GPU).unwrap(),
        Some(KvEvent::AllCleared { pool: GPU })
    );
    assert_eq!(c.pop_event(GPU).unwrap(), None);
    assert_eq!(c.pool(GPU).unwrap().indexed_len(), 0);
    c.check_invariants().unwrap();
}

#[test]
fn kernel_exports() {
    let mut c = cache_with(config(), &[32], 0);
    let a = c.allocate(GPU, &Prompt::len(6)).unwrap().seq;
    let b = c.allocate(GPU, &Prompt::len(9)).unwrap().seq;
    let (ta, tb) = (c.table(a).unwrap().to_vec(), c.table(b).unwrap().to_vec());
    let mut tables = [0i32; 8];
    c.export_block_tables(&[a, b], 4, -1, &mut tables).unwrap();
    let i = |x: pagedkv_core::BlockId| x.0 as i32;
    assert_eq!(
        tables,
        [i(ta[0]), i(ta[1]), -1, -1, i(tb[0]), i(tb[1]), i(tb[2]), -1]
    );
    let mut slots = [0i64; 3];
    assert_eq!(
        c.export_slot_mapping(&[(a, 1), (b, 2)], &mut slots)
            .unwrap(),
        3
    );
    let s = |b: pagedkv_core::BlockId, off: u32| i64::from(b.0 * BS + off);
    assert_eq!(slots, [s(ta[1], 1), s(tb[1], 3), s(tb[2], 0)]);
    let (mut indptr, mut idx, mut last) = ([0i32; 3], [0i32; 5], [0i32; 2]);
    assert_eq!(
        c.export_flashinfer(&[a, b], &mut indptr, &mut idx, &mut last)
            .unwrap(),
        5
    );
    assert_eq!(indptr, [0, 2, 5]);
    assert_eq!(idx, [i(ta[0]), i(ta[1]), i(tb[0]), i(tb[1]), i(tb[2])]);
    assert_eq!(last, [2, 1]);
    let bt = c.block_table(b).unwrap();
    assert_eq!(
        (bt.num_blocks(), bt.free_tokens(), bt.has_free_space()),
        (3, 3, true)
    );
}

#[test]
fn sliding_window_frees_blocks_that_left_it() {
    let mut c = cache_with(config(), &[32], 0);
    let a = c.allocate(GPU, &Prompt::ids(&toks(10, 8))).unwrap().seq;
    // Nothing written yet (a prompt to prefill): every block stays.
    assert_eq!(c.set_window(a, 4, 0).unwrap(), 0);
    assert_eq!(c.set_window(a, 4, 10).unwrap(), 1);
    assert_eq!(c.table(a).unwrap()[0], HOLE);
    let out = c.append(a, &toks(8, 9)).unwrap();
    // 18 tokens, window 4: this step computes positions 10..18, and
    // position 10 attends to 7..=10, so block 1 (4..8) stays this step.
    assert_eq!(out.window_freed, 0);
    let info = c.info(a).unwrap();
    assert_eq!((info.first_live, info.blocks), (1, 5));
    // Next step: position 18 attends to 15..=18; blocks 1 and 2 leave.
    let out = c.append(a, &[1]).unwrap();
    assert_eq!(out.window_freed, 2);
    assert_eq!(c.info(a).unwrap().first_live, 3);
    let mut idx = [0i32; 8];
    let (mut ip, mut last) = ([0i32; 2], [0i32; 1]);
    assert_eq!(
        c.export_flashinfer(&[a], &mut ip, &mut idx, &mut last)
            .unwrap(),
        2
    );
    c.check_invariants().unwrap();
}

#[test]
fn precomputed_keys_hit_like_tokens() {
    let mut c = cache_with(config(), &[32], 0);
    let keys = [BlockHash(11), BlockHash(12), BlockHash(13)];
    let a = c.allocate(GPU, &Prompt::keys(&keys, 14)).unwrap();
    assert_eq!(a.hit_blocks, 0);
    let b = c.allocate(GPU, &Prompt::keys(&keys[..2], 9)).unwrap();
    assert_eq!(b.hit_blocks, 2);
    assert_eq!(c.table(a.seq).unwrap()[..2], c.table(b.seq).unwrap()[..2]);
    c.check_invariants().unwrap();
}

#[test]
fn share_prefix_then_append_copies_the_shared_partial_block() {
    let mut c = cache_with(config(), &[32], 0);
    let src = c.allocate(GPU, &Prompt::ids(&toks(8, 10))).unwrap().seq;
    let dst = c.create(GPU, None).unwrap();
    c.share_prefix(src, dst, 6).unwrap();
    assert_eq!(c.table(dst).unwrap(), c.table(src).unwrap());
    let out = c.append(dst, &[1]).unwrap();
    assert_eq!(out.cow.map(|x| x.src), Some(c.table(src).unwrap()[1]));
    c.free(src).unwrap();
    c.check_invariants().unwrap();
}

#[test]
fn shrink_then_relocate_compacts_a_pool() {
    let mut c = cache_with(config(), &[16], 0);
    let filler = c.allocate(GPU, &Prompt::len(10 * BS)).unwrap().seq;
    let a = c.allocate(GPU, &Prompt::ids(&toks(12, 11))).unwrap().seq;
    let child = c.fork(a).unwrap();
    c.free(filler).unwrap();
    assert!(c.table(a).unwrap().iter().all(|b| b.0 >= 10));
    c.shrink(GPU, 8).unwrap();
    assert_eq!(c.pool(GPU).unwrap().draining_len(), 3);
    let draining: Vec<_> = c.draining_seqs(GPU).collect();
    assert_eq!(draining.len(), 2);
    for s in draining {
        let p = c.relocate(s).unwrap();
        assert_eq!(c.plan(p).unwrap().len(), 3);
        c.commit(p).unwrap();
        c.check_invariants().unwrap();
    }
    assert!(c.table(a).unwrap().iter().all(|b| b.0 < 8));
    assert!(c.table(child).unwrap().iter().all(|b| b.0 < 8));
    let pool = c.pool(GPU).unwrap();
    assert_eq!((pool.draining_len(), pool.capacity()), (0, 8));
    // The relocated full blocks kept their keys: still prefix hits.
    c.free(a).unwrap();
    c.free(child).unwrap();
    assert_eq!(
        c.allocate(GPU, &Prompt::ids(&toks(12, 11)))
            .unwrap()
            .hit_blocks,
        3
    );
    c.grow(GPU, 8).unwrap();
    c.check_invariants().unwrap();
}

#[test]
fn a_full_event_queue_counts_what_it_drops() {
    use pagedkv_core::{BlockPool, BlockSlot, KvEvent, PoolConfig, buckets_for};
    let mut slots = [BlockSlot::EMPTY; 8];
    let mut index = [0u32; buckets_for(8)];
    let mut events = [KvEvent::EMPTY; 2];
    let mut pool = BlockPool::new(PoolConfig::device(0, 4), &mut slots[..], &mut index[..])
        .unwrap()
        .with_events(&mut events[..]);
    // Unrelated keys (no parent chain): one event each.
    for k in 0..5u128 {
        let b = pool.allocate_one().unwrap();
        pool.register(b, BlockHash(100 + k), None).unwrap();
    }
    assert_eq!(pool.pending_events(), 2);
    assert_eq!(
        pool.events_lost(),
        3,
        "a router must learn it missed events"
    );
    assert!(matches!(
        pool.pop_event(),
        Some(KvEvent::BlockStored { .. })
    ));
    assert!(matches!(
        pool.pop_event(),
        Some(KvEvent::BlockStored { .. })
    ));
    assert_eq!(pool.pop_event(), None);
    // Without event storage nothing is recorded, and nothing counts as lost.
    let mut s2 = [BlockSlot::EMPTY; 4];
    let mut i2 = [0u32; buckets_for(4)];
    let mut quiet = BlockPool::new(PoolConfig::device(1, 4), &mut s2[..], &mut i2[..]).unwrap();
    let b = quiet.allocate_one().unwrap();
    quiet.register(b, BlockHash(7), None).unwrap();
    assert_eq!((quiet.pending_events(), quiet.events_lost()), (0, 0));
}

#[test]
fn imported_blocks_are_published_only_as_far_as_their_bytes_are_whole() {
    let mut c = cache_with(config(), &[8], 4);
    let keys: Vec<BlockHash> = (1..=5).map(|k| BlockHash(k * 1000)).collect();
    // The third block's bytes fail: two are published, the rest not, and
    // the block taken for the third goes back free.
    let mut filled = Vec::new();
    let n = c
        .import(HOST, Some(BlockHash(7)), &keys, |i, b| {
            filled.push(b);
            i != 2
        })
        .unwrap();
    assert_eq!(n, (2, 2));
    let host = c.pool(HOST).unwrap();
    assert!(host.lookup(keys[0]).is_some() && host.lookup(keys[1]).is_some());
    assert!(host.lookup(keys[2]).is_none());
    assert_eq!(
        (host.cached_len(), host.used_len(), host.free_len()),
        (2, 0, 2)
    );
    match c.pop_event(HOST).unwrap() {
        Some(KvEvent::BlockStored {
            parent,
            keys: k,
            medium,
            ..
        }) => {
            assert_eq!(parent, Some(BlockHash(7)));
            assert_eq!(&k[..], &keys[..2]);
            assert_eq!(medium, PoolKind::Host);
        }
        e => panic!("unexpected {e:?}"),
    }
    // Again: held keys are skipped (nothing filled), the rest imported
    // until the pool is full (never evicting the chain's own head).
    filled.clear();
    let n = c.import(HOST, Some(BlockHash(7)), &keys, |_, b| {
        filled.push(b);
        true
    });
    assert_eq!(n, Ok((4, 2)), "two held already, two published");
    assert_eq!(filled.len(), 2);
    let host = c.pool(HOST).unwrap();
    assert_eq!((host.cached_len(), host.used_len()), (4, 0));
    assert!(keys[..4].iter().all(|&k| host.lookup(k).is_some()));
    // The tail is next out: a one-block import evicts keys[3].
    assert_eq!(
        c.import(HOST, None, &[BlockHash(1)], |_, _| true),
        Ok((1, 1))
    );
    let host = c.pool(HOST).unwrap();
    assert!(host.lookup(keys[3]).is_none() && host.lookup(keys[0]).is_some());
    c.check_invariants().unwrap();
    // An unknown pool is refused.
    assert!(c.import(PoolId(9), None, &keys, |_, _| true).is_err());
    // So is a device pool (asked by key alone, its runs would be missed),
    // for an import as for an offload, changing nothing.
    let before = pagedkv_tests::fingerprint(&c, true);
    assert_eq!(
        c.import(GPU, None, &keys, |_, _| true),
        Err(pagedkv_core::Error::WrongPoolKind(GPU))
    );
    assert_eq!(
        c.offload(HOST, GPU, 4, |_| false),
        Err(pagedkv_core::Error::WrongPoolKind(GPU))
    );
    assert_eq!(pagedkv_tests::fingerprint(&c, true), before);
}
