//! Cache events for a KV-aware router (Dynamo's `KvCacheEvent` shape): what
//! was stored in and removed from a pool's prefix index, in a bounded queue
//! the caller drains. Consecutive events of one kind coalesce: stores that
//! continue the same chain share one event, as do consecutive removals.

use heapless::Vec;

use crate::ids::{BlockHash, PoolId};
use crate::storage::Slots;

/// Keys carried by one event.
pub const KEYS_PER_EVENT: usize = 4;
/// Events a pool with owned storage buffers before it starts dropping (and
/// counting) them.
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

    #[inline]
    pub(crate) fn stored(&mut self, pool: PoolId, parent: Option<BlockHash>, key: BlockHash) {
        if !self.enabled {
            return;
        }
        if let Some(KvEvent::BlockStored { keys, .. }) = self.back_mut()
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
        if let Some(KvEvent::BlockRemoved { keys, .. }) = self.back_mut()
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
        self.len = 0;
        self.push(KvEvent::AllCleared { pool });
    }
}
