//! Cache events for a KV-aware router (Dynamo's `KvCacheEvent` shape): what
//! was stored in and removed from a pool's prefix index, in a bounded queue
//! the caller drains. Consecutive events of one kind coalesce: stores that
//! continue the same chain share one event, as do consecutive removals.
//! Each event says which kind of memory (`medium`) it concerns, and stores
//! carry the block size and, where the prompt gave them, the blocks' token
//! ids: what vLLM's `BlockStored` carries, so a router can check a prompt
//! against it without knowing the cache's hash key.

use heapless::Vec;

use crate::ids::{BlockHash, PoolId};
use crate::pool::PoolKind;
use crate::storage::Slots;

/// Keys carried by one event.
pub const KEYS_PER_EVENT: usize = 4;
/// Token ids carried by one event (4 blocks of 16 tokens).
pub const TOKENS_PER_EVENT: usize = 64;
/// Events a pool with owned storage buffers before it starts dropping (and
/// counting) them.
pub const EVENT_QUEUE_LEN: usize = 32;

/// A batch of keys, in chain order for stores.
pub type KeyBatch = Vec<BlockHash, KEYS_PER_EVENT>;
/// The token ids of an event's blocks, in order.
pub type TokenBatch = Vec<u32, TOKENS_PER_EVENT>;

/// One change to a pool's prefix index.
#[derive(Clone, PartialEq, Eq, Debug)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[allow(
    clippy::large_enum_variant,
    reason = "events live in fixed caller storage, a ring of slots: no heap to box into"
)]
pub enum KvEvent {
    /// Blocks were registered under these keys; `parent` is the key before
    /// the first one (`None` at the start of a chain).
    BlockStored {
        /// The pool the blocks live in.
        pool: PoolId,
        /// The chain parent of `keys[0]`.
        parent: Option<BlockHash>,
        /// Keys stored, each the child of the one before.
        keys: KeyBatch,
        /// The blocks' token ids (`keys.len() * block_size` of them), or
        /// none: blocks keyed from a trace's or router's keys, blocks moved
        /// in from another tier (tokens are not kept), and blocks of more
        /// than [`TOKENS_PER_EVENT`] tokens.
        tokens: TokenBatch,
        /// Tokens per block.
        block_size: u32,
        /// The kind of memory the blocks live in.
        medium: PoolKind,
    },
    /// These keys are no longer cached in the pool (evicted or cleared).
    BlockRemoved {
        /// The pool the blocks lived in.
        pool: PoolId,
        /// Keys removed.
        keys: KeyBatch,
        /// The kind of memory they lived in.
        medium: PoolKind,
    },
    /// Every key of the pool was dropped.
    AllCleared {
        /// The pool cleared.
        pool: PoolId,
    },
}

/// Bounded event queue over caller storage (a ring). When full, new events
/// are dropped and counted: a router that sees [`BlockPool::events_lost`]
/// grow must resynchronise. With no storage, events are not recorded.
///
/// [`BlockPool::events_lost`]: crate::BlockPool::events_lost
#[derive(Debug)]
pub(crate) struct EventQueue<'a> {
    buf: Slots<'a, KvEvent>,
    head: usize,
    len: usize,
    lost: u64,
    enabled: bool,
}

impl KvEvent {
    /// A placeholder for event storage (`static mut EVENTS: [KvEvent; N] = [KvEvent::EMPTY; N]`).
    pub const EMPTY: Self = KvEvent::AllCleared { pool: PoolId(0) };
}

impl<'a> EventQueue<'a> {
    pub(crate) fn new(buf: Slots<'a, KvEvent>) -> Self {
        let enabled = !buf.is_empty();
        Self {
            buf,
            head: 0,
            len: 0,
            lost: 0,
            enabled,
        }
    }

    pub(crate) fn set_enabled(&mut self, on: bool) {
        self.enabled = on && !self.buf.is_empty();
        if !self.enabled {
            self.len = 0;
        }
    }

    pub(crate) fn lost(&self) -> u64 {
        self.lost
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn pop(&mut self) -> Option<KvEvent> {
        if self.len == 0 {
            return None;
        }
        let e = core::mem::replace(self.buf.get_mut(self.head)?, KvEvent::EMPTY);
        self.head = self.wrap(self.head + 1);
        self.len -= 1;
        Some(e)
    }

    /// `i` modulo the ring's length (`i` is below twice the length).
    #[inline]
    fn wrap(&self, i: usize) -> usize {
        i.checked_sub(self.buf.len()).unwrap_or(i)
    }

    fn back_mut(&mut self) -> Option<&mut KvEvent> {
        if self.len == 0 {
            return None;
        }
        let i = self.wrap(self.head + self.len - 1);
        self.buf.get_mut(i)
    }

    fn push(&mut self, e: KvEvent) {
        if self.len == self.buf.len() {
            self.lost += 1;
            return;
        }
        let i = self.wrap(self.head + self.len);
        if let Some(slot) = self.buf.get_mut(i) {
            *slot = e;
            self.len += 1;
        }
    }

    /// Block `key` (child of `parent`) stored in `pool`, with its
    /// `tokens` (empty where unknown).
    #[inline]
    pub(crate) fn stored(
        &mut self,
        (pool, medium, block_size): (PoolId, PoolKind, u32),
        parent: Option<BlockHash>,
        key: BlockHash,
        tokens: &[u32],
    ) {
        if !self.enabled {
            return;
        }
        // Tokens are all or nothing per event: kept only where every block
        // of the event has its `block_size` ids.
        let whole = tokens.len() == block_size as usize && tokens.len() <= TOKENS_PER_EVENT;
        if let Some(KvEvent::BlockStored {
            keys, tokens: t, ..
        }) = self.back_mut()
            && parent.is_some()
            && keys.last().copied() == parent
            && !keys.is_full()
            && (if t.is_empty() {
                !whole
            } else {
                whole && t.extend_from_slice(tokens).is_ok()
            })
        {
            let _ = keys.push(key);
            return;
        }
        let mut keys = KeyBatch::new();
        let _ = keys.push(key);
        let mut t = TokenBatch::new();
        if whole {
            let _ = t.extend_from_slice(tokens);
        }
        self.push(KvEvent::BlockStored {
            pool,
            parent,
            keys,
            tokens: t,
            block_size,
            medium,
        });
    }

    #[inline]
    pub(crate) fn removed(&mut self, pool: PoolId, medium: PoolKind, key: BlockHash) {
        if !self.enabled {
            return;
        }
        if let Some(KvEvent::BlockRemoved { keys, .. }) = self.back_mut()
            && keys.push(key).is_ok()
        {
            return;
        }
        let mut keys = KeyBatch::new();
        let _ = keys.push(key);
        self.push(KvEvent::BlockRemoved { pool, keys, medium });
    }

    pub(crate) fn cleared(&mut self, pool: PoolId) {
        if !self.enabled {
            return;
        }
        // Everything queued before a clear is superseded by it.
        self.len = 0;
        self.push(KvEvent::AllCleared { pool });
    }
}
