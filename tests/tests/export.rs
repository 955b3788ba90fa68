//! The incremental block-table export (`export_block_tables_since`) leaves
//! the caller's matrix exactly as the full export writes it, whatever
//! happened to the tables in between: appends, copy-on-write after a fork,
//! windows, reservations that grow and shrink, relocations in a shrunk
//! pool, planned copies, shared prefixes, swaps out and in, frees and reused
//! sequence slots, a batch that changes order, size, stride (0 included)
//! and pad.
#![allow(clippy::cast_possible_truncation, reason = "small test values")]

use pagedkv_core::{CacheConfig, ExportedRow, PoolId, Prompt, SeqId};
use pagedkv_tests::cache_with;

const GPU: PoolId = PoolId(0);
const HOST: PoolId = PoolId(1);
const MAX_SEQS: usize = 12;
const WIDTH: usize = 24;

/// SplitMix64.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// One random operation on a random live sequence (refusals are fine: they
/// change nothing, and the export is compared either way).
fn operate(
    c: &mut pagedkv_core::KvCache<'static, pagedkv_core::SipBlockHasher>,
    live: &mut Vec<SeqId>,
    swapped: &mut Vec<SeqId>,
    rng: &mut Rng,
) {
    let pick = |rng: &mut Rng, v: &[SeqId]| (!v.is_empty()).then(|| v[rng.below(v.len())]);
    match rng.below(16) {
        0 | 1 => {
            // Prompts share prefixes (hits on held and cached blocks).
            let base = rng.below(3) as u32;
            let n = 1 + rng.below(40) as u32;
            let p: Vec<u32> = (0..n)
                .map(|i| {
                    if i < 16 {
                        i + base * 1000
                    } else {
                        rng.next() as u32
                    }
                })
                .collect();
            if let Ok(a) = c.allocate(GPU, &Prompt::ids(&p)) {
                live.push(a.seq);
            }
        }
        2..=4 => {
            if let Some(s) = pick(rng, live) {
                let t: Vec<u32> = (0..1 + rng.below(6)).map(|_| rng.next() as u32).collect();
                let _ = c.append(s, &t);
            }
        }
        5 => {
            if let Some(s) = pick(rng, live)
                && let Ok(child) = c.fork(s)
            {
                live.push(child);
            }
        }
        6 => {
            if let Some(s) = pick(rng, live) {
                let tokens = c.info(s).unwrap().tokens;
                let _ = c.set_window(s, 4 + rng.below(16) as u32, tokens);
            }
        }
        7 => {
            if let Some(s) = pick(rng, live) {
                let _ = c.reserve(s, rng.below(12) as u32);
            }
        }
        8 => {
            if let Some(s) = pick(rng, live)
                && let Ok(p) = c.relocate(s)
            {
                if rng.below(4) == 0 {
                    c.abort(p).unwrap();
                } else {
                    c.commit(p).unwrap();
                }
            }
        }
        9 => {
            if let Some(s) = pick(rng, live)
                && let Ok(p) = c.swap_out(s, HOST)
            {
                c.commit(p).unwrap();
                live.retain(|&x| x != s);
                swapped.push(s);
            }
        }
        10 => {
            if let Some(s) = pick(rng, swapped)
                && let Ok(p) = c.swap_in(s, GPU)
            {
                c.commit(p).unwrap();
                swapped.retain(|&x| x != s);
                live.push(s);
            }
        }
        11 => {
            // Planned copy-on-write of a shared or published last block.
            if let Some(s) = pick(rng, live)
                && let Ok(Some(p)) = c.cow(s)
            {
                c.commit(p).unwrap();
            }
        }
        12 => {
            // A new empty sequence, sometimes given another's prefix.
            if let Ok(t) = c.create(GPU, None) {
                if let Some(s) = pick(rng, live) {
                    let tokens = c.info(s).unwrap().tokens;
                    let _ = c.share_prefix(s, t, tokens.min(rng.below(24) as u32));
                }
                live.push(t);
            }
        }
        13 => {
            // The pool shrinks (relocations then move real blocks) or grows back.
            let cap = c.pool(GPU).unwrap().capacity();
            let _ = if cap > 64 && rng.below(2) == 0 {
                c.shrink(GPU, cap - 8)
            } else {
                c.grow(GPU, 96 - cap).map(|_| ())
            };
        }
        _ => {
            if let Some(s) = pick(rng, live) {
                c.free(s).unwrap();
                live.retain(|&x| x != s);
            }
        }
    }
}

#[test]
fn incremental_block_tables_equal_the_full_export_after_any_operations() {
    let config = CacheConfig {
        tokens_per_block: 4,
        max_seqs: MAX_SEQS as u32,
        max_blocks_per_seq: WIDTH as u32,
        max_plans: 4,
    };
    let mut c = cache_with(config, &[96], 64);
    let mut rng = Rng(0x5eed_00e4);
    let (mut live, mut swapped) = (Vec::new(), Vec::new());
    let mut out = vec![i32::MIN; MAX_SEQS * WIDTH];
    let mut rows = vec![ExportedRow::default(); MAX_SEQS];
    let (mut whole, mut appended, mut refused, mut empty) = (0usize, 0usize, 0usize, 0usize);
    // FlashInfer's buffers and rows, kept across exports likewise.
    let mut fi = (
        vec![0; MAX_SEQS + 1],
        vec![i32::MIN; MAX_SEQS * WIDTH],
        vec![0; MAX_SEQS],
    );
    let mut fi_rows = vec![ExportedRow::default(); MAX_SEQS];
    let mut fi_refused = 0usize;
    let steps = if cfg!(miri) { 300 } else { 30_000 };
    for _ in 0..steps {
        // Several operations between two exports, now and then (a shrink
        // and a regrowth in between leave the length as it was).
        for _ in 0..1 + rng.below(3) {
            operate(&mut c, &mut live, &mut swapped, &mut rng);
        }
        // The batch: the live sequences, sometimes rotated or cut short, and
        // now and then a swapped-out one (its host blocks are exported).
        let mut batch = live.clone();
        if !batch.is_empty() && rng.below(8) == 0 {
            let k = rng.below(batch.len());
            batch.rotate_left(k);
        }
        if rng.below(8) == 0 {
            batch.truncate(rng.below(batch.len() + 1));
        }
        if rng.below(40) == 0
            && let Some(&s) = swapped.first()
        {
            batch.push(s);
        }
        // Now and then only the empty sequences: a batch of width 0.
        if rng.below(30) == 0 {
            batch.retain(|&s| c.table(s).unwrap().is_empty());
        }
        let longest = batch
            .iter()
            .map(|&s| c.table(s).unwrap().len())
            .max()
            .unwrap_or(0);
        // Mostly a fixed stride (an engine's max model length), sometimes
        // the batch's longest table; a rare other pad.
        // And now and then one too short for the longest table: refused.
        let stride = match rng.below(20) {
            0 | 1 => longest,
            2 => longest.saturating_sub(1),
            _ => WIDTH,
        };
        let pad = if rng.below(50) == 0 { -2 } else { -1 };
        let n = batch.len() * stride;
        empty += usize::from(stride == 0 && !batch.is_empty());
        let mut full = vec![i32::MAX; n];
        let expect = c.export_block_tables(&batch, stride, pad, &mut full);
        let got = c.export_block_tables_since(&batch, stride, pad, &mut out[..n], &mut rows);
        assert_eq!(expect.is_ok(), got.is_ok(), "{expect:?} vs {got:?}");
        match got {
            Ok(w) => {
                assert_eq!(&out[..n], &full[..], "incremental export differs");
                if stride == 0 {
                    // Width 0 keeps no row: the caller may drop its matrix
                    // (the manager does), and the next export rewrites it.
                    out.fill(i32::MIN);
                }
                whole += w;
                appended += batch.len() - w;
            }
            Err(_) => refused += 1,
        }
        // FlashInfer's indices, now and then into too small a buffer.
        let cap = if rng.below(25) == 0 {
            1
        } else {
            MAX_SEQS * WIDTH
        };
        let m = batch.len();
        let mut full = (vec![0; m + 1], vec![i32::MAX; cap], vec![0; m]);
        let expect = c.export_flashinfer(&batch, &mut full.0, &mut full.1, &mut full.2);
        let got = c.export_flashinfer_since(
            &batch,
            &mut fi.0[..=m],
            &mut fi.1[..cap],
            &mut fi.2[..m],
            &mut fi_rows,
        );
        assert_eq!(expect, got);
        match got {
            Ok(k) => {
                assert_eq!(fi.0[..=m], full.0[..], "indptr differs");
                assert_eq!(fi.1[..k], full.1[..k], "indices differ");
                assert_eq!(fi.2[..m], full.2[..], "last page lengths differ");
            }
            Err(_) => fi_refused += 1,
        }
        c.check_invariants().unwrap();
    }
    assert!(fi_refused > 0 || cfg!(miri), "no refused FlashInfer export");
    // Both paths ran, many times.
    let least = steps / 10;
    assert!(
        whole > least && appended > least,
        "{whole} whole, {appended} appended"
    );
    if !cfg!(miri) {
        assert!(refused > 0, "no refused export was compared");
        assert!(empty > 0, "no batch of width 0 was exported");
    }
}

#[test]
fn a_decode_step_writes_only_the_entries_appended() {
    let config = CacheConfig {
        tokens_per_block: 4,
        max_seqs: 4,
        max_blocks_per_seq: 8,
        max_plans: 1,
    };
    let mut c = cache_with(config, &[32], 0);
    let seqs: Vec<SeqId> = (0..3)
        .map(|r| {
            c.allocate(GPU, &Prompt::ids(&[r, r + 1, r + 2]))
                .unwrap()
                .seq
        })
        .collect();
    let mut out = vec![0; 3 * 8];
    let mut rows = vec![ExportedRow::default(); 3];
    assert_eq!(
        c.export_block_tables_since(&seqs, 8, -1, &mut out, &mut rows),
        Ok(3)
    );
    // A marker where no entry changed stays: those entries are not written.
    out[0] = 12345;
    for &s in &seqs {
        c.append(s, &[7, 8]).unwrap(); // 3 + 2 tokens: a second block
    }
    assert_eq!(
        c.export_block_tables_since(&seqs, 8, -1, &mut out, &mut rows),
        Ok(0)
    );
    assert_eq!(out[0], 12345, "an unchanged entry was rewritten");
    out[0] = c.table(seqs[0]).unwrap()[0].0 as i32;
    for (k, &s) in seqs.iter().enumerate() {
        assert_eq!(out[k * 8 + 1], c.table(s).unwrap()[1].0 as i32);
    }
    // A fork's copy-on-write changes an entry in place: that row is whole again.
    let child = c.fork(seqs[1]).unwrap();
    c.append(seqs[1], &[9]).unwrap();
    assert_eq!(
        c.export_block_tables_since(&seqs, 8, -1, &mut out, &mut rows),
        Ok(1)
    );
    assert_eq!(out[8 + 1], c.table(seqs[1]).unwrap()[1].0 as i32);
    c.free(child).unwrap();
    // A reservation shrunk and grown again between two exports: same
    // length, other blocks (another sequence took the released ones).
    c.reserve(seqs[2], 8).unwrap();
    c.export_block_tables_since(&seqs, 8, -1, &mut out, &mut rows)
        .unwrap();
    c.reserve(seqs[2], 0).unwrap();
    let other = c.allocate(GPU, &Prompt::ids(&[50; 8])).unwrap().seq;
    c.reserve(seqs[2], 8).unwrap();
    c.export_block_tables_since(&seqs, 8, -1, &mut out, &mut rows)
        .unwrap();
    let mut full = vec![0; 3 * 8];
    c.export_block_tables(&seqs, 8, -1, &mut full).unwrap();
    assert_eq!(out, full);
    c.free(other).unwrap();
}
