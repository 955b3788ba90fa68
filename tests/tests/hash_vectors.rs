//! Test vectors of the block-key hashes: keys are stable across releases and
//! platforms. A change here breaks every persisted or fleet-shared key: it
//! needs a new hasher name, not an edit of these numbers.
#![allow(clippy::cast_possible_truncation, reason = "small test values")]

use pagedkv_core::{
    BlockHash, BlockHasher, CacheSalt, ExtraKeys, MmItem, Sha256BlockHasher, SipBlockHasher,
};

const KEY: [u8; 16] = *b"pagedkv-vectors!";

fn vectors<H: BlockHasher>(h: &H) -> [u128; 6] {
    let root = h.root(None);
    let tokens: Vec<u32> = (0..16).map(|i| i * 1000 + 7).collect();
    let b0 = h.hash_block(root, &tokens, 0, &ExtraKeys::default());
    let b1 = h.hash_block(b0, &tokens, 16, &ExtraKeys::default());
    let salted = h.root(Some(CacheSalt(0x0123_4567_89ab_cdef)));
    let lora = h.hash_block(
        root,
        &tokens,
        0,
        &ExtraKeys {
            adapter: Some(42),
            mm: &[],
        },
    );
    let img = [MmItem {
        content_hash: 0xfeed,
        offset: 4,
        len: 100,
    }];
    let mm = h.hash_block(
        root,
        &tokens,
        0,
        &ExtraKeys {
            adapter: None,
            mm: &img,
        },
    );
    [root.0, b0.0, b1.0, salted.0, lora.0, mm.0]
}

#[test]
fn siphash13_128_vectors() {
    let got = vectors(&SipBlockHasher::new(KEY));
    let want: [u128; 6] = SIP;
    assert_eq!(got, want, "got {got:#x?}");
}

#[test]
fn sha256_vectors() {
    let got = vectors(&Sha256BlockHasher);
    let want: [u128; 6] = SHA;
    assert_eq!(got, want, "got {got:#x?}");
}

#[test]
fn all_vectors_distinct() {
    let mut all: Vec<u128> = SIP.iter().chain(SHA.iter()).copied().collect();
    all.sort_unstable();
    all.dedup();
    assert_eq!(all.len(), 12);
    assert_ne!(BlockHash(SIP[0]), BlockHash(0));
}

/// SHA-256 truncated to the first 16 bytes, read little-endian. The first two
/// were checked independently against Python's `hashlib` over the documented
/// message bytes.
const SHA: [u128; 6] = [
    0xd542fd35b04e8ebd1320ca88fb5ebe99,
    0xe677e07579538af6eb0092d84156427a,
    0x7d15c928e96c5b1634066455300b6308,
    0x279972a9580abb8770af027fa0e774f2,
    0x0dc29d1db56620fbc89d3ee4e761db73,
    0x9edec5d237e8d0377f9779dea2c3f58b,
];
/// SipHash-1-3-128 under `KEY` (pinned from the first release).
const SIP: [u128; 6] = [
    0xb42dfe1bca460a1baa8ae6723c1e932b,
    0x5d834635360163273c3eef9e228a0e9e,
    0x569a58482f79e646dfdc6d0a2459c7d1,
    0x9ab55003b014a72d762148860f2c4ec3,
    0xf5f5277ba1ba2f19be0297d304ee6cfe,
    0x4272fd0438894ddcf72cf23c64c6e0cd,
];
