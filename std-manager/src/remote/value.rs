//! The bytes stored under one remote key: a fixed header, then the block's
//! bytes. A value is read back only when every header field matches what
//! the reader expects and the checksum covers header and bytes alike: a
//! value cut short, overwritten in part or written by another layout is a
//! miss, never KV.
//!
//! The checksum is keyed when the cluster shares a secret
//! ([`KeyScheme::Keyed`](super::KeyScheme::Keyed)): SipHash-2-4 under a key
//! derived from it, a MAC that a writer without the secret cannot forge
//! (so a value planted in the store, or edited and re-summed, is refused).
//! Without a secret ([`KeyScheme::Sha256`](super::KeyScheme::Sha256)) it is
//! xxh3, which catches corruption but trusts every writer of the store.

use core::hash::Hasher as _;

use pagedkv_core::BlockHash;
use siphasher::sip::SipHasher24;
use xxhash_rust::xxh3::Xxh3;

/// The first bytes of every value.
pub const MAGIC: [u8; 4] = *b"PKVB";
/// The header's format version.
pub const VERSION: u16 = 1;
/// Header length in bytes.
pub const HEADER_LEN: usize = 48;

/// How a block's bytes are encoded.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
pub enum Codec {
    /// The pool's own bytes, as the device holds them.
    None,
    /// Quantized to int8 (with the engine's scales inside the bytes).
    Int8,
    /// Quantized to fp8.
    Fp8,
}

impl Codec {
    fn to_byte(self) -> u8 {
        match self {
            Codec::None => 0,
            Codec::Int8 => 1,
            Codec::Fp8 => 2,
        }
    }
    fn from_byte(b: u8) -> Option<Self> {
        match b {
            0 => Some(Codec::None),
            1 => Some(Codec::Int8),
            2 => Some(Codec::Fp8),
            _ => None,
        }
    }
}

/// Why a value was refused.
#[derive(Clone, Copy, PartialEq, Eq, Debug, thiserror::Error)]
pub enum BadValue {
    /// Shorter than a header, or not ours.
    #[error("not a pagedkv block value (magic or length)")]
    NotAValue,
    /// Written by another version of the format.
    #[error("value format version {0} (this build reads {VERSION})")]
    Version(u16),
    /// Written for another layout (model, dtype, block size, rank).
    #[error("value written for another layout")]
    Layout,
    /// Its codec is unknown or not the one expected.
    #[error("value codec {0} unknown or not expected")]
    Codec(u8),
    /// Written under another block key.
    #[error("value holds another block")]
    Key,
    /// Its length field does not match the bytes present (truncated).
    #[error("value length {stated} but {present} bytes present")]
    Length {
        /// What the header says.
        stated: u64,
        /// What arrived.
        present: u64,
    },
    /// The checksum does not match (bytes changed after writing).
    #[error("value checksum mismatch")]
    Checksum,
}

/// The checksum of a value: a MAC under `mac` (128 bits) when given.
fn checksum(mac: Option<[u8; 16]>, head: &[u8], payload: &[u8]) -> u64 {
    match mac {
        Some(k) => {
            let mut h = SipHasher24::new_with_key(&k);
            h.write(head);
            h.write(payload);
            h.finish()
        }
        None => {
            let mut h = Xxh3::new();
            h.update(head);
            h.update(payload);
            h.digest()
        }
    }
}

/// Encodes `payload` (the bytes of the block with `key`) as a value, its
/// checksum keyed with `mac` if given.
pub fn encode(
    key: BlockHash,
    layout: u64,
    codec: Codec,
    mac: Option<[u8; 16]>,
    payload: &[u8],
) -> Vec<u8> {
    let mut v = Vec::with_capacity(HEADER_LEN + payload.len());
    v.extend_from_slice(&MAGIC);
    v.extend_from_slice(&VERSION.to_le_bytes());
    v.push(codec.to_byte());
    v.push(0);
    v.extend_from_slice(&layout.to_le_bytes());
    v.extend_from_slice(&key.0.to_le_bytes());
    v.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    let sum = checksum(mac, &v, payload);
    v.extend_from_slice(&sum.to_le_bytes());
    v.extend_from_slice(payload);
    v
}

fn field<const N: usize>(v: &[u8], at: usize) -> [u8; N] {
    let mut out = [0; N];
    if let Some(s) = v.get(at..at + N) {
        out.copy_from_slice(s);
    }
    out
}

/// Checks `value` against the block with `key` in `layout`, encoded with
/// `codec`, summed under `mac`; returns its payload.
pub fn decode(
    value: &[u8],
    key: BlockHash,
    layout: u64,
    codec: Codec,
    mac: Option<[u8; 16]>,
) -> Result<&[u8], BadValue> {
    if value.len() < HEADER_LEN || value[..4] != MAGIC {
        return Err(BadValue::NotAValue);
    }
    let version = u16::from_le_bytes(field(value, 4));
    if version != VERSION {
        return Err(BadValue::Version(version));
    }
    let c = value[6];
    if Codec::from_byte(c) != Some(codec) {
        return Err(BadValue::Codec(c));
    }
    if u64::from_le_bytes(field(value, 8)) != layout {
        return Err(BadValue::Layout);
    }
    if u128::from_le_bytes(field(value, 16)) != key.0 {
        return Err(BadValue::Key);
    }
    let stated = u64::from_le_bytes(field(value, 32));
    let payload = &value[HEADER_LEN..];
    if stated != payload.len() as u64 {
        return Err(BadValue::Length {
            stated,
            present: payload.len() as u64,
        });
    }
    if u64::from_le_bytes(field(value, 40)) != checksum(mac, &value[..40], payload) {
        return Err(BadValue::Checksum);
    }
    Ok(payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_reads_back_only_whole_and_for_its_own_block() {
        let k = BlockHash(0x1234_5678_9abc_def0_0fed_cba9_8765_4321);
        for mac in [None, Some([9; 16])] {
            let v = encode(k, 7, Codec::Int8, mac, b"kv bytes");
            let d = |v: &[u8], k, l, c| decode(v, k, l, c, mac).map(<[u8]>::to_vec);
            assert_eq!(d(&v, k, 7, Codec::Int8), Ok(b"kv bytes".to_vec()));
            assert_eq!(d(&v, BlockHash(1), 7, Codec::Int8), Err(BadValue::Key));
            assert_eq!(d(&v, k, 8, Codec::Int8), Err(BadValue::Layout));
            assert_eq!(d(&v, k, 7, Codec::None), Err(BadValue::Codec(1)));
            let short = d(&v[..v.len() - 1], k, 7, Codec::Int8);
            assert_eq!(
                short,
                Err(BadValue::Length {
                    stated: 8,
                    present: 7
                })
            );
            assert_eq!(d(&v[..20], k, 7, Codec::Int8), Err(BadValue::NotAValue));
            for i in 0..v.len() {
                let mut bad = v.clone();
                bad[i] ^= 0x40;
                assert!(
                    d(&bad, k, 7, Codec::Int8).is_err(),
                    "flip at {i} went unseen"
                );
            }
        }
    }

    #[test]
    fn a_value_summed_without_the_secret_is_refused() {
        let k = BlockHash(5);
        // A writer that knows the format but not the secret: its own
        // checksum (unkeyed, or under another key) does not pass.
        let forged = encode(k, 7, Codec::None, None, b"poison");
        let key = Some([1; 16]);
        assert_eq!(
            decode(&forged, k, 7, Codec::None, key),
            Err(BadValue::Checksum)
        );
        let other = encode(k, 7, Codec::None, Some([2; 16]), b"poison");
        assert_eq!(
            decode(&other, k, 7, Codec::None, key),
            Err(BadValue::Checksum)
        );
    }
}
