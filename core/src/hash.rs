//! Chained, keyed 128-bit block keys.
//!
//! # The key of a block
//!
//! The key of block `i` of a sequence is `H(parent_i, tokens_i, extra_i)` where
//! `parent_0 = root(salt)` and `parent_i = key_{i-1}`: equal keys mean equal
//! content *and* equal everything before it, so a lookup walks the chain and
//! stops at the first miss.
//!
//! The bytes fed to the hash are fixed by this module and pinned by test
//! vectors (`tests` below, and `tests/tests/hash_vectors.rs`), so keys stay
//! stable across releases and platforms (all integers little-endian):
//!
//! | field | bytes |
//! |---|---|
//! | domain tag `0x01` (block) | 1 |
//! | parent key | 16 |
//! | token count `n` | 4 |
//! | tokens | `4 n` |
//! | adapter: `0x00`, or `0x01` then the id | 1 or 9 |
//! | multimodal item count `m` | 4 |
//! | per item: content hash, start offset relative to the block (i64) | `24 m` |
//!
//! A caller's precomputed key `k` of a block bound into a chain (a salted or
//! adapted prompt given by keys) is `H` over tag `0x03`, the parent key (16
//! bytes), `k` (16 bytes), then the adapter and multimodal fields as above.
//!
//! The root of a chain is `H` over tag `0x02`, then `0x00` (no salt) or `0x01`
//! and the 16-byte salt. Different salts give unrelated roots, hence disjoint
//! chains: tenants never share a block.
//!
//! # Why keyed
//!
//! An unkeyed fast hash lets anyone who can submit prompts craft two prompts
//! with colliding block keys and read another request's KV through the prefix
//! cache (vLLM advisory GHSA-rm76-4mrf-v9r8, after which vLLM moved to
//! SHA-256). The default here is SipHash-1-3 with 128-bit output under a
//! secret 128-bit key: a PRF, so collisions cannot be found without the key,
//! at a fraction of SHA-256's cost. [`Sha256BlockHasher`] gives keys that agree
//! across processes without a shared secret. Both implement [`BlockHasher`];
//! a caller may plug in its own.
#![allow(
    clippy::cast_possible_truncation,
    reason = "token counts are u32 by contract (prompt lengths are checked against u32 before hashing); key halves are split on purpose"
)]

use sha2::Digest as _;
use siphasher::sip128::{Hasher128 as _, SipHasher13};

use crate::ids::{BlockHash, CacheSalt};

/// A multimodal item placed in a prompt: its content hash and where it starts.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct MmItem {
    /// Hash of the item's content (image, audio...), computed by the caller.
    pub content_hash: u128,
    /// Token position where the item's placeholder tokens start.
    pub offset: u32,
    /// Number of placeholder tokens the item occupies.
    pub len: u32,
}

/// Extra inputs that distinguish blocks with equal token ids.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct ExtraKeys<'a> {
    /// LoRA adapter (or other model variant) the KV was computed with.
    pub adapter: Option<u64>,
    /// Multimodal items of the whole prompt; those overlapping a block enter its key.
    pub mm: &'a [MmItem],
}

/// Sink for the canonical key bytes.
pub trait KeyWriter {
    /// Appends bytes to the message.
    fn write(&mut self, bytes: &[u8]);
}

/// A block-key hash function. Implementations must be deterministic for a
/// given instance; the provided methods define the canonical message.
pub trait BlockHasher {
    /// The running state of one key computation.
    type State: KeyWriter;
    /// A fresh state.
    fn begin(&self) -> Self::State;
    /// The 128-bit digest of the message written to `state`.
    fn finish(&self, state: Self::State) -> u128;

    /// The root key of a chain for `salt`.
    fn root(&self, salt: Option<CacheSalt>) -> BlockHash {
        let mut s = self.begin();
        match salt {
            None => s.write(&[0x02, 0x00]),
            Some(CacheSalt(v)) => {
                s.write(&[0x02, 0x01]);
                s.write(&v.to_le_bytes());
            }
        }
        BlockHash(self.finish(s))
    }

    /// The key of a block covering token positions `[start, start + tokens.len())`.
    fn hash_block(
        &self,
        parent: BlockHash,
        tokens: &[u32],
        start: u32,
        extra: &ExtraKeys<'_>,
    ) -> BlockHash {
        let mut s = self.begin();
        s.write(&[0x01]);
        s.write(&parent.0.to_le_bytes());
        s.write(&(tokens.len() as u32).to_le_bytes());
        write_tokens(&mut s, tokens);
        write_extra(&mut s, start, tokens.len() as u64, extra);
        BlockHash(self.finish(s))
    }

    /// The key of a block known by a caller's precomputed `key`, bound into
    /// this chain (its salt through `parent`) and its extra inputs: the
    /// block covers positions `[start, start + len)`.
    fn bind_key(
        &self,
        parent: BlockHash,
        key: BlockHash,
        start: u32,
        len: u32,
        extra: &ExtraKeys<'_>,
    ) -> BlockHash {
        let mut s = self.begin();
        s.write(&[0x03]);
        s.write(&parent.0.to_le_bytes());
        s.write(&key.0.to_le_bytes());
        write_extra(&mut s, start, u64::from(len), extra);
        BlockHash(self.finish(s))
    }
}

/// Writes the adapter and the multimodal items overlapping `[start, start + len)`.
fn write_extra<W: KeyWriter>(s: &mut W, start: u32, len: u64, extra: &ExtraKeys<'_>) {
    match extra.adapter {
        None => s.write(&[0x00]),
        Some(a) => {
            s.write(&[0x01]);
            s.write(&a.to_le_bytes());
        }
    }
    let end = u64::from(start) + len;
    let overlapping = |m: &&MmItem| {
        let m_end = u64::from(m.offset) + u64::from(m.len);
        u64::from(m.offset) < end && m_end > u64::from(start)
    };
    let count = extra.mm.iter().filter(overlapping).count() as u32;
    s.write(&count.to_le_bytes());
    for m in extra.mm.iter().filter(overlapping) {
        s.write(&m.content_hash.to_le_bytes());
        let rel = i64::from(m.offset) - i64::from(start);
        s.write(&rel.to_le_bytes());
    }
}

/// Writes tokens as little-endian `u32`s through a stack buffer (one `write`
/// per 32 tokens, so the hash sees long runs).
#[inline]
fn write_tokens<W: KeyWriter>(w: &mut W, tokens: &[u32]) {
    let mut buf = [0u8; 128];
    for chunk in tokens.chunks(32) {
        for (dst, t) in buf.chunks_exact_mut(4).zip(chunk) {
            dst.copy_from_slice(&t.to_le_bytes());
        }
        w.write(buf.get(..chunk.len() * 4).unwrap_or(&[]));
    }
}

/// The default: SipHash-1-3 with 128-bit output under a secret 128-bit key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SipBlockHasher {
    k0: u64,
    k1: u64,
}

impl SipBlockHasher {
    /// A hasher under `key` (keep it secret: it is what stops crafted collisions).
    pub const fn new(key: [u8; 16]) -> Self {
        let k = u128::from_le_bytes(key);
        Self {
            k0: k as u64,
            k1: (k >> 64) as u64,
        }
    }

    /// A hasher under a key drawn from the process's random source.
    #[cfg(feature = "std")]
    pub fn random() -> Self {
        use std::hash::{BuildHasher, RandomState};
        let a = RandomState::new().hash_one(0x5eed_u64);
        let b = RandomState::new().hash_one(0xcafe_u64);
        Self { k0: a, k1: b }
    }
}

impl KeyWriter for SipHasher13 {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        core::hash::Hasher::write(self, bytes);
    }
}

impl BlockHasher for SipBlockHasher {
    type State = SipHasher13;
    #[inline]
    fn begin(&self) -> SipHasher13 {
        SipHasher13::new_with_keys(self.k0, self.k1)
    }
    #[inline]
    fn finish(&self, state: SipHasher13) -> u128 {
        state.finish128().as_u128()
    }
}

/// SHA-256 truncated to 128 bits: keys that agree across processes and
/// machines without a shared secret (for example a fleet-wide KV router).
/// About 50x slower than [`SipBlockHasher`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sha256BlockHasher;

/// Running state of [`Sha256BlockHasher`].
#[derive(Clone, Debug)]
pub struct Sha256State(sha2::Sha256);

impl KeyWriter for Sha256State {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
}

impl BlockHasher for Sha256BlockHasher {
    type State = Sha256State;
    fn begin(&self) -> Sha256State {
        Sha256State(sha2::Sha256::new())
    }
    fn finish(&self, state: Sha256State) -> u128 {
        let d = state.0.finalize();
        let mut b = [0u8; 16];
        for (o, i) in b.iter_mut().zip(d.iter()) {
            *o = *i;
        }
        u128::from_le_bytes(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: [u8; 16] = *b"pagedkv-test-key";

    #[test]
    fn chain_depends_on_parent_tokens_and_extras() {
        let h = SipBlockHasher::new(KEY);
        let root = h.root(None);
        let t: [u32; 4] = [1, 2, 3, 4];
        let a = h.hash_block(root, &t, 0, &ExtraKeys::default());
        assert_eq!(a, h.hash_block(root, &t, 0, &ExtraKeys::default()));
        assert_ne!(a, h.hash_block(a, &t, 4, &ExtraKeys::default()));
        assert_ne!(
            a,
            h.hash_block(root, &[1, 2, 3, 5], 0, &ExtraKeys::default())
        );
        let lora = ExtraKeys {
            adapter: Some(7),
            mm: &[],
        };
        assert_ne!(a, h.hash_block(root, &t, 0, &lora));
        let img = [MmItem {
            content_hash: 9,
            offset: 2,
            len: 10,
        }];
        let mm = ExtraKeys {
            adapter: None,
            mm: &img,
        };
        let with_img = h.hash_block(root, &t, 0, &mm);
        assert_ne!(a, with_img);
        // An item that does not overlap the block does not change its key.
        assert_eq!(a, h.hash_block(root, &t, 100, &mm));
        let far = [MmItem {
            content_hash: 9,
            offset: 50,
            len: 10,
        }];
        assert_eq!(
            a,
            h.hash_block(
                root,
                &t,
                0,
                &ExtraKeys {
                    adapter: None,
                    mm: &far
                }
            )
        );
    }

    #[test]
    fn salts_give_disjoint_roots_and_keys_change_with_the_secret() {
        let h = SipBlockHasher::new(KEY);
        assert_ne!(h.root(None), h.root(Some(CacheSalt(0))));
        assert_ne!(h.root(Some(CacheSalt(1))), h.root(Some(CacheSalt(2))));
        let other = SipBlockHasher::new(*b"another-test-key");
        assert_ne!(h.root(None), other.root(None));
    }

    #[test]
    fn sha256_is_keyless_and_deterministic() {
        let a = Sha256BlockHasher.root(Some(CacheSalt(5)));
        assert_eq!(a, Sha256BlockHasher.root(Some(CacheSalt(5))));
        assert_ne!(a, Sha256BlockHasher.root(None));
    }
}
