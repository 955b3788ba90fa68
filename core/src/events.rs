//! Cache events for a KV-aware router (Dynamo's `KvCacheEvent` shape): what
//! was stored in and removed from a pool's prefix index, in a bounded queue
//! the caller drains. Consecutive events of one kind coalesce: stores that
//! continue the same chain share one event, as do consecutive removals.

use heapless::{Deque, Vec};

use crate::ids::{BlockHash, PoolId};

/// Keys carried by one event.
pub const KEYS_PER_EVENT: usize = 4;
/// Events a pool buffers before it starts dropping (and counting) them.
pub const EVENT_QUEUE_LEN: usize = 32;

/// A batch of keys, in chain order for stores.
pub type KeyBatch = Vec<BlockHash, KEYS_PER_EVENT>;

/// One change to a pool's prefix index.
#[derive(Clone, PartialEq, Eq, Debug)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
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
    },
    /// These keys are no longer cached in the pool (evicted or cleared).
    BlockRemoved {
        /// The pool the blocks lived in.
        pool: PoolId,
        /// Keys removed.
        keys: KeyBatch,
    },
    /// Every key of the pool was dropped.
    AllCleared {
        /// The pool cleared.
        pool: PoolId,
    },
}

/// Bounded event queue. When full, new events are dropped and counted: a
/// router that sees [`EventQueue::lost`] grow must resynchronise.
#[derive(Debug)]
pub(crate) struct EventQueue {
    queue: Deque<KvEvent, EVENT_QUEUE_LEN>,
    lost: u64,
    enabled: bool,
}

impl EventQueue {
    pub(crate) const fn new() -> Self {
        Self {
            queue: Deque::new(),
            lost: 0,
            enabled: true,
        }
    }

    pub(crate) fn set_enabled(&mut self, on: bool) {
        self.enabled = on;
        if !on {
            self.queue.clear();
        }
    }

    pub(crate) fn lost(&self) -> u64 {
        self.lost
    }

    pub(crate) fn pop(&mut self) -> Option<KvEvent> {
        self.queue.pop_front()
    }

    pub(crate) fn len(&self) -> usize {
        self.queue.len()
    }

    fn push(&mut self, e: KvEvent) {
        if self.queue.push_back(e).is_err() {
            self.lost += 1;
        }
    }

    #[inline]
    pub(crate) fn stored(&mut self, pool: PoolId, parent: Option<BlockHash>, key: BlockHash) {
        if !self.enabled {
            return;
        }
        if let Some(KvEvent::BlockStored { keys, .. }) = self.queue.back_mut()
            && parent.is_some()
            && keys.last().copied() == parent
            && keys.push(key).is_ok()
        {
            return;
        }
        let mut keys = KeyBatch::new();
        let _ = keys.push(key);
        self.push(KvEvent::BlockStored { pool, parent, keys });
    }

    #[inline]
    pub(crate) fn removed(&mut self, pool: PoolId, key: BlockHash) {
        if !self.enabled {
            return;
        }
        if let Some(KvEvent::BlockRemoved { keys, .. }) = self.queue.back_mut()
            && keys.push(key).is_ok()
        {
            return;
        }
        let mut keys = KeyBatch::new();
        let _ = keys.push(key);
        self.push(KvEvent::BlockRemoved { pool, keys });
    }

    pub(crate) fn cleared(&mut self, pool: PoolId) {
        if !self.enabled {
            return;
        }
        // Everything queued before a clear is superseded by it.
        self.queue.clear();
        self.push(KvEvent::AllCleared { pool });
    }
}
