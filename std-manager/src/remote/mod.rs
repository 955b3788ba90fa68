//! A remote prefix tier below host memory, shared by every replica of a
//! model: blocks leaving the host tier are written to a store (Redis, or any
//! [`RemoteStore`]), and a prompt whose chain misses device and host asks the
//! store for the rest of it.
//!
//! - **Keys** are namespaced ([`Namespace`]: model, layout fingerprint,
//!   dtype, block size, tensor-parallel rank) and derived from the core's
//!   128-bit block key by SHA-256, keyed with a secret the cluster shares
//!   ([`KeyScheme`]). Tenant salts are inside the block keys, so tenants
//!   never share a remote block.
//! - **Values** ([`value`]) carry a header that must match (magic, version,
//!   layout, codec, block key, length, checksum); a value that does not is
//!   a miss, deleted and counted. Content under a key never changes (`SET
//!   NX`).
//! - **The scheduler never waits** ([`RemoteTier`]): lookups and stores are
//!   started and return at once; every network operation has a timeout;
//!   repeated errors turn the tier off until a probe with backoff finds the
//!   store again; bytes in flight are capped.

use std::time::Duration;

use async_trait::async_trait;
use pagedkv_core::BlockHash;
use sha2::{Digest, Sha256};

mod redis;
mod tier;
pub mod value;

pub use redis::RedisStore;
pub use tier::{Fetched, Lookup, LookupEnd, RemoteStats, RemoteTier, TierState};
pub use value::Codec;

/// The most chained keys one lookup asks about (one round trip).
pub const MAX_LOOKUP_KEYS: usize = 128;

/// What a remote store's operations fail with.
#[derive(Clone, PartialEq, Eq, Debug, thiserror::Error)]
pub enum StoreError {
    /// The connection failed or was lost.
    #[error("remote store unreachable: {0}")]
    Io(String),
    /// The store did not answer in time.
    #[error("remote store timed out")]
    Timeout,
    /// The store answered with an error.
    #[error("remote store error: {0}")]
    Server(String),
}

/// What a conditional write did.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum PutOutcome {
    /// The value was written.
    Written,
    /// A value was already stored under the key (content never changes).
    Exists,
    /// The store refused the write for lack of memory.
    Refused,
}

/// A key-value store the remote tier can sit on. Each method is one round
/// trip; the tier bounds each with its timeout.
#[async_trait]
pub trait RemoteStore: Send + Sync + 'static {
    /// How many of `keys`, from the first, are present (stops at the first
    /// absent one). At most [`MAX_LOOKUP_KEYS`] keys.
    async fn leading(&self, keys: &[Vec<u8>]) -> Result<usize, StoreError>;
    /// The values under `keys`, `None` where absent.
    async fn get(&self, keys: &[Vec<u8>]) -> Result<Vec<Option<Vec<u8>>>, StoreError>;
    /// Writes each value unless its key already holds one.
    async fn put_nx(&self, items: &[(Vec<u8>, Vec<u8>)]) -> Result<Vec<PutOutcome>, StoreError>;
    /// Deletes `keys` (values found bad).
    async fn delete(&self, keys: &[Vec<u8>]) -> Result<(), StoreError>;
    /// Whether the store answers.
    async fn ping(&self) -> Result<(), StoreError>;
}

/// What a block's bytes mean: replicas share remote blocks only when every
/// field is equal.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Namespace {
    /// The model (name and revision).
    pub model: String,
    /// The KV layout's fingerprint (heads, head size, layers, order).
    pub layout: u64,
    /// The element type (`"f16"`, `"bf16"`, `"fp8"`...).
    pub dtype: String,
    /// Tokens per block.
    pub block_size: u32,
    /// This replica's tensor-parallel rank (each rank holds its own heads).
    pub tp_rank: u32,
}

impl Namespace {
    /// The namespace of `model`'s KV in `layout` at tensor-parallel rank
    /// `tp_rank`: the layout fingerprint, dtype and block size derived from
    /// the layout itself (`KvManager::set_remote_tier` checks them).
    pub fn for_layout(model: &str, layout: &pagedkv_core::KvLayout, tp_rank: u32) -> Self {
        Self {
            model: model.to_string(),
            layout: layout_fingerprint(layout),
            dtype: format!("{:?}", layout.dtype).to_lowercase(),
            block_size: layout.tokens_per_block,
            tp_rank,
        }
    }

    /// The key prefix: readable, so an operator can scan or flush one model.
    /// The value format's version and the codec are part of it, so builds of
    /// different formats, and replicas of different codecs, never read (or
    /// delete) each other's values.
    pub fn prefix(&self, codec: Codec) -> String {
        format!(
            "pagedkv:v{}:{}:{:016x}:{}:b{}:tp{}:{codec:?}:",
            value::VERSION,
            self.model,
            self.layout,
            self.dtype,
            self.block_size,
            self.tp_rank
        )
    }

    /// The value header's layout fingerprint: every field of the namespace.
    pub fn fingerprint(&self) -> u64 {
        let d = Sha256::digest(self.prefix(Codec::None).as_bytes());
        u64::from_le_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]])
    }
}

/// A fingerprint of every field of a KV layout that decides what its bytes
/// mean (layers, heads, head size, block size, dtype, order).
pub fn layout_fingerprint(l: &pagedkv_core::KvLayout) -> u64 {
    let desc = format!(
        "layers={} kv_heads={} head_size={} tokens={} dtype={:?} order={:?}",
        l.layers, l.kv_heads, l.head_size, l.tokens_per_block, l.dtype, l.order
    );
    let d = Sha256::digest(desc.as_bytes());
    u64::from_le_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]])
}

/// How a block key becomes a remote key.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum KeyScheme {
    /// SHA-256 of the namespace and the block key.
    Sha256,
    /// SHA-256 keyed with a secret the cluster shares: a client without it
    /// can neither guess a key from a prompt nor plant a value that passes
    /// (values carry a MAC under a key derived from the secret). With
    /// [`Sha256`](Self::Sha256), anyone who can write to the store can plant
    /// KV under a key they compute: use it only on a store no one else
    /// writes to.
    Keyed([u8; 32]),
}

impl KeyScheme {
    /// The values' MAC key (derived from the secret; `None` unkeyed).
    pub fn mac_key(&self) -> Option<[u8; 16]> {
        match self {
            KeyScheme::Sha256 => None,
            KeyScheme::Keyed(secret) => {
                let mut h = Sha256::new();
                h.update(b"pagedkv value mac");
                h.update(secret);
                let d = h.finalize();
                let mut k = [0u8; 16];
                k.copy_from_slice(&d[..16]);
                Some(k)
            }
        }
    }

    /// The remote key of `key` in `ns`, for values of `codec`.
    pub fn key(&self, ns: &Namespace, codec: Codec, key: BlockHash) -> Vec<u8> {
        let prefix = ns.prefix(codec);
        let mut h = Sha256::new();
        if let KeyScheme::Keyed(secret) = self {
            h.update(secret);
        }
        h.update(prefix.as_bytes());
        h.update(key.0.to_le_bytes());
        let d = h.finalize();
        let mut out = prefix.into_bytes();
        for b in &d[..16] {
            out.extend_from_slice(format!("{b:02x}").as_bytes());
        }
        out
    }
}

/// The tier's limits.
#[derive(Clone, Debug)]
pub struct RemoteConfig {
    /// The longest any one network operation may take.
    pub op_timeout: Duration,
    /// Values fetched per pipelined batch.
    pub fetch_batch: usize,
    /// Bytes of writes in flight before new writes are skipped.
    pub max_bytes_in_flight: usize,
    /// Consecutive failures (errors or timeouts) that turn the tier off.
    pub errors_to_disable: u32,
    /// The first probe's delay once off; doubled per failed probe.
    pub probe_min: Duration,
    /// The longest delay between probes.
    pub probe_max: Duration,
}

impl Default for RemoteConfig {
    fn default() -> Self {
        Self {
            op_timeout: Duration::from_millis(200),
            fetch_batch: 32,
            max_bytes_in_flight: 64 << 20,
            errors_to_disable: 3,
            probe_min: Duration::from_millis(50),
            probe_max: Duration::from_millis(500),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ns() -> Namespace {
        Namespace {
            model: "m".into(),
            layout: 1,
            dtype: "f16".into(),
            block_size: 16,
            tp_rank: 0,
        }
    }

    #[test]
    fn keys_differ_by_namespace_codec_scheme_and_secret() {
        let k = BlockHash(42);
        let c = Codec::None;
        let a = KeyScheme::Sha256.key(&ns(), c, k);
        assert!(a.starts_with(b"pagedkv:v1:m:0000000000000001:f16:b16:tp0:None:"));
        assert_eq!(a, KeyScheme::Sha256.key(&ns(), c, k));
        let tail = |v: &[u8]| v[v.len() - 32..].to_vec();
        let rank1 = Namespace { tp_rank: 1, ..ns() };
        assert_ne!(tail(&a), tail(&KeyScheme::Sha256.key(&rank1, c, k)));
        assert_ne!(
            tail(&a),
            tail(&KeyScheme::Sha256.key(&ns(), Codec::Int8, k))
        );
        let s1 = KeyScheme::Keyed([1; 32]).key(&ns(), c, k);
        let s2 = KeyScheme::Keyed([2; 32]).key(&ns(), c, k);
        assert_ne!(s1, s2);
        assert_ne!(s1, a);
        assert_ne!(ns().fingerprint(), rank1.fingerprint());
        assert_eq!(KeyScheme::Sha256.mac_key(), None);
        assert_ne!(
            KeyScheme::Keyed([1; 32]).mac_key(),
            KeyScheme::Keyed([2; 32]).mac_key()
        );
    }
}
