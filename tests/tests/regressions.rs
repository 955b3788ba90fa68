//! Regression tests of the defects found by probing the core as a hostile
//! caller would (issue 8): each failed on the code before its fix. The
//! manager's and the CLI's are in their own crates' tests.
#![allow(clippy::cast_possible_truncation, reason = "small test values")]

use pagedkv_core::{
    BlockHash, BlockOrder, BlockPool, CacheConfig, CacheSalt, DType, Error, Fidelity, KvCache,
    KvLayout, KvPart, PoolConfig, PoolId, Prompt, SipBlockHasher,
};
use pagedkv_tests::{cache_with, fingerprint};

const BS: u32 = 4;
const GPU: PoolId = PoolId(0);
const GPU1: PoolId = PoolId(1);
/// The host pool of a cache with one device pool.
const HOST: PoolId = PoolId(1);

fn config() -> CacheConfig {
    CacheConfig {
        tokens_per_block: BS,
        max_seqs: 8,
        max_blocks_per_seq: 8,
        max_plans: 4,
    }
}

fn toks(n: u32, seed: u32) -> Vec<u32> {
    (0..n).map(|i| i * 7 + seed).collect()
}

/// Defect 1: a key repeated in one prompt was counted twice as a pinned hit:
/// `available - pinned` underflowed (a panic with overflow checks; in
/// release a refused allocation left a block at ref count 2 with no holder).
#[test]
fn d01_a_key_repeated_in_one_prompt_is_a_miss_from_there() {
    let mut c = cache_with(config(), &[3], 4);
    // Block `42` cached; the pool's two other blocks held by `other`.
    let k = [BlockHash(42)];
    let first = c.allocate(GPU, &Prompt::keys(&k, BS)).unwrap().seq;
    c.free(first).unwrap();
    let other = c.allocate(GPU, &Prompt::len(2 * BS)).unwrap().seq;
    let keys = [BlockHash(42); 3];
    let before = fingerprint(&c, true);
    let r = c.allocate(GPU, &Prompt::keys(&keys, 3 * BS));
    assert_eq!(
        r,
        Err(Error::OutOfBlocks {
            needed: 2,
            available: 0
        }),
        "one hit, then two fresh blocks with none left"
    );
    assert_eq!(fingerprint(&c, true), before, "the refusal changed nothing");
    c.check_invariants().unwrap();
    c.free(other).unwrap();
    let a = c.allocate(GPU, &Prompt::keys(&keys, 3 * BS)).unwrap();
    assert_eq!(a.hit_blocks, 1, "the repeated key ends the match");
    let t = c.table(a.seq).unwrap().to_vec();
    assert!(t[0] != t[1] && t[1] != t[2] && t[0] != t[2], "{t:?}");
    c.free(a.seq).unwrap();
    c.check_invariants().unwrap();
    assert_eq!(c.pool(GPU).unwrap().used_len(), 0, "no block leaked");
}

/// Defect 1, a held block: a repeated key naming a block another sequence
/// holds was served twice (position 1 got position 0's KV).
#[test]
fn d01_a_repeated_key_never_serves_one_block_twice() {
    let mut c = cache_with(config(), &[8], 4);
    let keys = [BlockHash(7), BlockHash(8)];
    let held = c.allocate(GPU, &Prompt::keys(&keys, 2 * BS)).unwrap().seq;
    let dup = [BlockHash(7), BlockHash(7)];
    let a = c.allocate(GPU, &Prompt::keys(&dup, 2 * BS)).unwrap();
    assert_eq!(a.hit_blocks, 1);
    let t = c.table(a.seq).unwrap();
    assert_ne!(t[0], t[1]);
    assert_eq!(t[0], c.table(held).unwrap()[0]);
    c.check_invariants().unwrap();
}

/// Defect 3: the blocks of a lossy move (compression) were published under
/// the exact prefix keys, so a later request got lossy KV as a prefix hit.
#[test]
fn d03_lossy_moves_publish_nothing() {
    let mut c = cache_with(config(), &[8], 8);
    let prompt = toks(12, 1);
    let a = c.allocate(GPU, &Prompt::ids(&prompt)).unwrap().seq;
    let out = c.swap_out_as(a, HOST, Fidelity::Lossy).unwrap();
    c.commit(out).unwrap();
    assert_eq!(
        c.pool(HOST).unwrap().indexed_len(),
        0,
        "nothing on the host"
    );
    // The exact copies leave the device; the lossy KV comes back.
    while c.evict_one(GPU).unwrap().is_some() {}
    let back = c.swap_in_as(a, GPU, Fidelity::Lossy).unwrap();
    c.commit(back).unwrap();
    assert!(c.info(a).unwrap().lossy);
    assert_eq!(c.pool(GPU).unwrap().indexed_len(), 0);
    // Its later blocks are computed over lossy KV: not published either.
    c.append(a, &toks(8, 99)).unwrap();
    assert_eq!(c.pool(GPU).unwrap().indexed_len(), 0);
    c.free(a).unwrap();
    let again = c.allocate(GPU, &Prompt::ids(&prompt)).unwrap();
    assert_eq!(again.hit_blocks, 0, "no lossy block served as exact");
    c.check_invariants().unwrap();
}

/// Defect 6: precomputed keys ignored the tenant salt (and the adapter), so
/// two tenants shared a block through the core API.
#[test]
fn d06_salts_and_adapters_bind_precomputed_keys() {
    let mut c = cache_with(config(), &[16], 4);
    let keys = [BlockHash(1), BlockHash(2)];
    let p = Prompt::keys(&keys, 2 * BS);
    let a = c.allocate(GPU, &p.with_salt(CacheSalt(1))).unwrap().seq;
    let b = c.allocate(GPU, &p.with_salt(CacheSalt(2))).unwrap();
    assert_eq!(b.hit_blocks, 0, "another tenant's keys never hit");
    let lora = c
        .allocate(GPU, &p.with_salt(CacheSalt(1)).with_adapter(5))
        .unwrap();
    assert_eq!(lora.hit_blocks, 0, "another adapter's KV never hits");
    let same = c.allocate(GPU, &p.with_salt(CacheSalt(1))).unwrap();
    assert_eq!(same.hit_blocks, 2, "the same tenant hits");
    let ta = c.table(a).unwrap().to_vec();
    assert!(c.table(b.seq).unwrap().iter().all(|x| !ta.contains(x)));
    // Unsalted keys are used as given (a trace's or router's hashes).
    let raw = c.allocate(GPU, &p).unwrap().seq;
    let k0 = c
        .pool(GPU)
        .unwrap()
        .key_of(c.table(raw).unwrap()[0])
        .unwrap();
    assert_eq!(k0, Some(BlockHash(1)));
    c.check_invariants().unwrap();
}

/// Defect 14: `validate` accepted a layout whose part count (2 × layers)
/// overflows `u32`, and `offset` overflowed `u64` for a block inside the region.
#[test]
fn d14_huge_layouts_are_refused_and_offsets_checked() {
    let l = KvLayout {
        layers: 1 << 31,
        kv_heads: 1,
        head_size: 1,
        tokens_per_block: 1,
        dtype: DType::F32,
        order: BlockOrder::LayerMajor,
    };
    assert_eq!(l.validate(), Err(Error::LayoutTooLarge));
    assert_eq!(l.parts_per_copy(), 1 << 32);
    let wide = KvLayout {
        layers: 1,
        kv_heads: 1 << 30,
        head_size: 1 << 20,
        order: BlockOrder::BlockMajor,
        ..l
    };
    assert!(wide.validate().is_ok(), "a block's size fits in u64");
    assert_eq!(
        wide.offset(1 << 20, pagedkv_core::BlockId(1 << 19), 0, KvPart::Value),
        Err(Error::LengthOverflow)
    );
}

/// Defect 15: a duplicate pool id was "unknown"; sharing across pools said
/// "source and target are both" one pool.
#[test]
fn d15_errors_say_what_is_wrong() {
    let mut c = cache_with(config(), &[8, 8], 0);
    let dup = BlockPool::with_capacity(PoolConfig::device(0, BS), 4).unwrap();
    let e = c.add_pool(dup).unwrap_err();
    assert_eq!(e, Error::DuplicatePool(GPU));
    assert!(e.to_string().contains("duplicate"), "{e}");
    let s = c.allocate(GPU, &Prompt::ids(&toks(8, 0))).unwrap().seq;
    let t = c.create(GPU1, None).unwrap();
    let before = fingerprint(&c, false);
    let e = c.share_prefix(s, t, 4).unwrap_err();
    assert_eq!(
        e,
        Error::DifferentPools {
            source: GPU,
            target: GPU1
        }
    );
    let msg = e.to_string();
    assert!(msg.contains("pool#0") && msg.contains("pool#1"), "{msg}");
    assert_eq!(fingerprint(&c, false), before);
}

/// Defect 17: `allocate` accepted a host pool; `export_block_tables` with
/// `max_blocks = 0` wrote the pad value.
#[test]
fn d17_host_pools_run_no_sequence_and_empty_exports_write_nothing() {
    let mut c = cache_with(config(), &[8], 4);
    let before = fingerprint(&c, false);
    assert_eq!(
        c.allocate(HOST, &Prompt::ids(&toks(4, 0))).map(|a| a.seq),
        Err(Error::NotADevicePool(HOST))
    );
    assert_eq!(fingerprint(&c, false), before);
    let empty = c.create(GPU, None).unwrap();
    let mut out = [7i32; 4];
    c.export_block_tables(&[empty, empty], 0, -1, &mut out)
        .unwrap();
    assert_eq!(out, [7; 4], "nothing written");
}

/// The copy-on-write source (issue 8, "read too"): the one-call `append`
/// releases it at once, so its caller must copy before the next call on the
/// cache (single-threaded use, as firmware); the two-phase `cow` plan keeps
/// it held until the copy landed, so under concurrent use (the manager) no
/// other request can take or overwrite it meanwhile.
#[test]
fn cow_plans_hold_their_source_until_commit() {
    let mut c = cache_with(config(), &[4], 4);
    let a = c.allocate(GPU, &Prompt::ids(&toks(6, 3))).unwrap().seq;
    let b = c.fork(a).unwrap();
    let src = c.table(b).unwrap()[1];
    let plan = c.cow(b).unwrap().expect("shared partial block");
    c.free(a).unwrap();
    assert_eq!(
        c.pool(GPU).unwrap().ref_count(src),
        Ok(1),
        "still held by the plan's sequence"
    );
    // The pool is full: nothing can take the source while the copy runs.
    assert!(matches!(
        c.allocate(GPU, &Prompt::len(2 * BS)),
        Err(Error::OutOfBlocks { .. })
    ));
    let dst = c.plan(plan).unwrap().copies().next().unwrap().dst;
    c.commit(plan).unwrap();
    assert_eq!(c.table(b).unwrap()[1], dst);
    assert_eq!(c.pool(GPU).unwrap().ref_count(src), Ok(0));
    assert!(!c.append_needs(b, 1).unwrap().cow, "now private");
    c.append(b, &[1]).unwrap();
    c.check_invariants().unwrap();
    // The one-call append copies too, releasing its source at once.
    let d = c.fork(b).unwrap();
    let out = c.append(d, &[2]).unwrap();
    let cow = out.cow.expect("shared partial block");
    assert_eq!(c.pool(GPU).unwrap().ref_count(cow.src), Ok(1), "b's only");
    c.check_invariants().unwrap();
}

/// Tier moves (issue 9): a promotion publishes nothing before its commit,
/// and an abort (a failed copy) publishes nothing at all.
#[test]
fn tier_plans_publish_only_at_commit() {
    let mut c: KvCache<'static, SipBlockHasher> = cache_with(config(), &[4], 8);
    let p = toks(16, 5);
    let a = c.allocate(GPU, &Prompt::ids(&p)).unwrap().seq;
    c.free(a).unwrap();
    let off = c
        .offload(GPU, HOST, 4, |_| false)
        .unwrap()
        .expect("cached blocks");
    assert_eq!(c.pool(HOST).unwrap().indexed_len(), 0, "not before commit");
    c.commit(off).unwrap();
    assert_eq!(c.pool(HOST).unwrap().indexed_len(), 4);
    assert_eq!(
        c.pool(GPU).unwrap().indexed_len(),
        0,
        "offloaded blocks left"
    );
    let mut keys = Vec::new();
    c.prompt_keys(&Prompt::ids(&p), |k| keys.push(k)).unwrap();
    let up = c.promote(HOST, GPU, &keys).unwrap().expect("host hits");
    assert_eq!(c.pool(GPU).unwrap().indexed_len(), 0);
    c.abort(up).unwrap();
    assert_eq!(
        c.pool(GPU).unwrap().indexed_len(),
        0,
        "an abort publishes nothing"
    );
    assert_eq!(c.pool(GPU).unwrap().used_len(), 0);
    let up = c.promote(HOST, GPU, &keys).unwrap().expect("host hits");
    c.commit(up).unwrap();
    let again = c.allocate(GPU, &Prompt::ids(&p)).unwrap();
    assert_eq!(again.hit_blocks, 4);
    c.check_invariants().unwrap();
}
