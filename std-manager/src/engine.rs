//! What an engine's scheduler gets back from each call: per-request answers
//! (prefix hits by tier, blocks added, copies made, preemptions), the
//! preemption choices, batched kernel tables in buffers the engine owns, and
//! the cache's events for a KV-aware router.

use std::sync::Arc;

use pagedkv_core::{BlockHash, KvEvent};
use serde::{Deserialize, Serialize};

use crate::traits::KvCacheHandle;
use crate::types::{Device, RequestId};

/// Who preempts when a device has no room.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default, Serialize, Deserialize)]
pub enum PreemptionPolicy {
    /// The engine's scheduler: a call without room answers
    /// [`ManagerError::NoRoom`](crate::ManagerError::NoRoom) with the blocks
    /// missing, and the scheduler calls `preempt` on the requests it chooses.
    #[default]
    Scheduler,
    /// The manager: it swaps requests chosen by its eviction policy to the
    /// host tier, and reports each preemption (in the call's answer and as an
    /// event).
    Automatic,
}

/// How a request is preempted.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum PreemptMode {
    /// Its KV moves to the host tier; `swap_in` (or any call on it) brings
    /// it back.
    Swap,
    /// Its KV is dropped (the request is freed; its published blocks stay
    /// cached, so a recomputation may hit them); the engine re-admits it.
    Recompute,
}

/// A request preempted to make room.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Preemption {
    /// The request.
    pub request: RequestId,
    /// How.
    pub mode: PreemptMode,
    /// Device blocks it gave back.
    pub blocks: u32,
}

/// What an allocation did.
#[derive(Clone, Debug)]
pub struct Allocation {
    /// The request's handle (the manager owns the request until
    /// `deallocate`; dropping the handle frees nothing).
    pub handle: Arc<dyn KvCacheHandle>,
    /// Prompt tokens whose KV is already computed (prefix hits): the engine
    /// skips their prefill.
    pub computed_tokens: usize,
    /// Prefix-hit blocks already on the device.
    pub device_hit_blocks: u32,
    /// Prefix-hit blocks brought back from the host tier.
    pub host_hit_blocks: u32,
    /// Of those, blocks the host tier had just fetched from the remote tier
    /// (feature `redis`): computed by another replica.
    pub remote_hit_blocks: u32,
    /// Prompt tokens placed now (the whole prompt, or the hits and one chunk
    /// with `prefill_chunk`).
    pub placed_tokens: usize,
    /// Blocks in the request's table.
    pub blocks: u32,
    /// Requests preempted to make room (automatic preemption only).
    pub preempted: Vec<Preemption>,
}

/// What an extension did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Extension {
    /// Blocks added to the request's table (for new tokens and lookahead).
    pub new_blocks: u32,
    /// Blocks released: lookahead no longer reserved, or left behind a
    /// sliding window.
    pub released_blocks: u32,
    /// Copy-on-write copies made (a shared or published partial block).
    pub copies: u32,
    /// Whether the request was first brought back from the host tier.
    pub swapped_in: bool,
    /// Requests preempted to make room (automatic preemption only).
    pub preempted: Vec<Preemption>,
}

/// One request's part of a batched extension.
#[derive(Clone, Copy, Debug)]
pub struct ExtendItem<'a> {
    /// The request.
    pub request: RequestId,
    /// The new tokens' ids (`None`: `count` tokens of unknown ids, whose
    /// blocks are then not published).
    pub tokens: Option<&'a [u32]>,
    /// Tokens added (the length of `tokens` when given).
    pub count: u32,
    /// Lookahead slots to hold reserved past the new end (speculative
    /// decoding); 0 releases any.
    pub lookahead: u32,
}

impl<'a> ExtendItem<'a> {
    /// `tokens` appended, no lookahead.
    pub fn tokens(request: RequestId, tokens: &'a [u32]) -> Self {
        Self {
            request,
            tokens: Some(tokens),
            count: u32::try_from(tokens.len()).unwrap_or(u32::MAX),
            lookahead: 0,
        }
    }
}

/// One request's part of a batched export.
#[derive(Clone, Copy, Debug)]
pub struct ExportItem {
    /// The request (on a device).
    pub request: RequestId,
    /// Its last tokens this step writes (their `slot_mapping` entries).
    pub new_tokens: u32,
    /// Lookahead slots past its end this step writes (draft tokens).
    pub lookahead: u32,
}

/// The kernel tables of a batch, in buffers the engine owns and reuses: no
/// allocation per step once they reached the batch's size.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct KernelTables {
    /// Width of a `block_tables` row (the longest table of the batch).
    pub max_blocks: usize,
    /// vLLM `block_tables`: `items × max_blocks`, row-major, padded with `pad`.
    pub block_tables: Vec<i32>,
    /// Pad value of `block_tables` (and of window holes).
    pub pad: i32,
    /// vLLM `slot_mapping`: each item's new tokens, then its lookahead slots.
    pub slot_mapping: Vec<i64>,
    /// FlashInfer `indptr` (`items + 1`).
    pub indptr: Vec<i32>,
    /// FlashInfer `indices`: the written pages of each item.
    pub indices: Vec<i32>,
    /// FlashInfer `last_page_len`.
    pub last_page_len: Vec<i32>,
    /// What each row of `block_tables` holds, so that the next export writes
    /// only what changed (on a decode step: a new block now and then).
    /// Clear it if `block_tables` is changed by anything else.
    pub exported: Vec<pagedkv_core::ExportedRow>,
    /// What each item's span of `indices` holds, likewise. Clear it if
    /// `indices` is changed by anything else.
    pub exported_indices: Vec<pagedkv_core::ExportedRow>,
}

/// Which tier an event happened in.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize, Deserialize)]
pub enum Tier {
    /// A device pool.
    Device(Device),
    /// The host tier.
    Host,
}

/// What a KV-aware router needs to mirror the cache.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum ManagerEvent {
    /// Blocks published (a chain: `keys[0]`'s parent is `parent`).
    Stored {
        /// Where.
        tier: Tier,
        /// The chain parent of the first key.
        parent: Option<BlockHash>,
        /// The keys, in chain order.
        keys: Vec<BlockHash>,
        /// Their token ids (`keys.len() * block_size`), or empty where not
        /// known (see [`KvEvent::BlockStored`]).
        tokens: Vec<u32>,
        /// Tokens per block.
        block_size: u32,
    },
    /// Blocks no longer cached there.
    Removed {
        /// Where.
        tier: Tier,
        /// Their keys.
        keys: Vec<BlockHash>,
    },
    /// Every block of a tier dropped.
    Cleared {
        /// Where.
        tier: Tier,
    },
    /// A preemption the manager did (automatic policy) or was asked for.
    Preempted(Preemption),
    /// Events were dropped (a full queue): resynchronize.
    Lost {
        /// How many.
        count: u64,
    },
}

impl ManagerEvent {
    /// The event of core event `e` in `tier`.
    pub(crate) fn from_core(e: KvEvent, tier: Tier) -> Self {
        match e {
            KvEvent::BlockStored {
                parent,
                keys,
                tokens,
                block_size,
                ..
            } => ManagerEvent::Stored {
                tier,
                parent,
                keys: keys.to_vec(),
                tokens: tokens.to_vec(),
                block_size,
            },
            KvEvent::BlockRemoved { keys, .. } => ManagerEvent::Removed {
                tier,
                keys: keys.to_vec(),
            },
            KvEvent::AllCleared { .. } => ManagerEvent::Cleared { tier },
        }
    }
}

#[cfg(test)]
mod tests {
    use pagedkv_core::{KeyBatch, PoolId, PoolKind, TokenBatch};

    use super::*;

    fn keys(k: &[u128]) -> KeyBatch {
        let mut b = KeyBatch::new();
        for &x in k {
            b.push(BlockHash(x)).unwrap();
        }
        b
    }

    #[test]
    fn core_events_keep_their_chain_and_take_the_tier() {
        let tier = Tier::Device(Device::Gpu(1));
        let stored = KvEvent::BlockStored {
            pool: PoolId(3),
            parent: Some(BlockHash(9)),
            keys: keys(&[1, 2]),
            tokens: TokenBatch::from_slice(&[5, 6, 7, 8]).unwrap(),
            block_size: 2,
            medium: PoolKind::Device,
        };
        assert_eq!(
            ManagerEvent::from_core(stored, tier),
            ManagerEvent::Stored {
                tier,
                parent: Some(BlockHash(9)),
                keys: vec![BlockHash(1), BlockHash(2)],
                tokens: vec![5, 6, 7, 8],
                block_size: 2,
            }
        );
        let removed = KvEvent::BlockRemoved {
            pool: PoolId(3),
            keys: keys(&[2]),
            medium: PoolKind::Host,
        };
        assert_eq!(
            ManagerEvent::from_core(removed, Tier::Host),
            ManagerEvent::Removed {
                tier: Tier::Host,
                keys: vec![BlockHash(2)],
            }
        );
        let cleared = KvEvent::AllCleared { pool: PoolId(3) };
        assert_eq!(
            ManagerEvent::from_core(cleared, tier),
            ManagerEvent::Cleared { tier }
        );
    }

    #[test]
    fn an_extension_of_ids_counts_them() {
        let ids = [4, 5, 6];
        let item = ExtendItem::tokens(RequestId(1), &ids);
        assert_eq!((item.count, item.lookahead), (3, 0));
        assert_eq!(item.tokens, Some(&ids[..]));
    }

    #[test]
    fn tiers_order_devices_before_the_host() {
        let mut t = [
            Tier::Host,
            Tier::Device(Device::Gpu(1)),
            Tier::Device(Device::Gpu(0)),
        ];
        t.sort();
        assert_eq!(t[2], Tier::Host);
        assert_eq!(PreemptionPolicy::default(), PreemptionPolicy::Scheduler);
    }
}
