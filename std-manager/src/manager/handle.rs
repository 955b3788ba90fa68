//! Request handles: live views of a request's state, and the kernel views
//! (block addresses and strides) of its layers.
#![allow(
    clippy::cast_possible_truncation,
    reason = "layer and block indices are below u32 limits"
)]

use std::sync::Arc;
use std::time::Instant;

use pagedkv_core::{BlockId, BlockTable, KvPart, MemoryKind, SeqInfo};

use super::{ManagedBackend, Shared, lock};
use crate::error::{InvalidRequest, Result};
use crate::traits::{KvCacheHandle, KvView};
use crate::types::{CacheHandleStats, Device, ManagerConfig, RequestId};

/// What a handle sees of its request at one moment.
pub(super) struct RequestSnapshot {
    info: SeqInfo,
    table: Vec<BlockId>,
    /// The request's device (where it runs, or returns to).
    device: usize,
    /// Whether it is on that device now.
    on_device: bool,
}

/// What a handle reads of the manager (object-safe, so handles need not
/// carry the backend type).
pub(super) trait SharedView: Send + Sync {
    fn snapshot(&self, id: Allocated) -> Option<RequestSnapshot>;
    fn view(&self, id: Allocated, layer: usize, part: KvPart) -> Result<Option<KvView>>;
    fn config(&self) -> &ManagerConfig;
    fn device_of(&self, index: usize) -> Device;
    fn epoch(&self) -> Instant;
    fn last_access(&self, id: Allocated) -> Option<Instant>;
}

/// One allocation of a request: its id and the allocation's serial number,
/// so a handle never reads a later request that reused the id.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) struct Allocated {
    pub(super) id: RequestId,
    pub(super) serial: u64,
}

impl super::Inner {
    /// The state of allocation `a`, if it is still live.
    fn allocation(&self, a: Allocated) -> Option<&super::ReqState> {
        self.reqs.get(&a.id).filter(|s| s.serial == a.serial)
    }
}

impl<B: ManagedBackend> SharedView for Shared<B> {
    fn snapshot(&self, id: Allocated) -> Option<RequestSnapshot> {
        let inner = lock(&self.inner);
        let st = inner.allocation(id)?;
        let info = inner.cache.info(st.seq).ok()?;
        Some(RequestSnapshot {
            table: inner.cache.table(st.seq).ok()?.to_vec(),
            device: st.device,
            on_device: self.pools.device_of(info.pool).is_some(),
            info,
        })
    }

    fn view(&self, id: Allocated, layer: usize, part: KvPart) -> Result<Option<KvView>> {
        let l = self.config.layout;
        if layer >= l.layers as usize {
            return Err(InvalidRequest::Layer {
                layer,
                layers: l.layers as usize,
            }
            .into());
        }
        let inner = lock(&self.inner);
        let st = inner
            .allocation(id)
            .ok_or(crate::ManagerError::UnknownRequest(id.id))?;
        let info = inner.cache.info(st.seq)?;
        let Some(d) = self.pools.device_of(info.pool).filter(|_| !info.moving) else {
            return Ok(None);
        };
        let mem = self.pools.mem(info.pool);
        let per = inner
            .blocks_per_region
            .get(mem)
            .copied()
            .unwrap_or(1)
            .max(1);
        let bases = inner.bases.get(mem).map_or(&[][..], |b| &b[..]);
        let mut addrs = Vec::with_capacity(info.blocks as usize);
        for (k, &b) in inner.cache.table(st.seq)?.iter().enumerate() {
            if (k as u32) < info.first_live {
                addrs.push(0);
                continue;
            }
            let (r, local) = ((b.0 / per) as usize, BlockId(b.0 % per));
            let off = l.offset(per, local, layer as u32, part)?;
            addrs.push(bases.get(r).copied().unwrap_or(0) + off);
        }
        let elem = u64::from(l.dtype.size_bytes());
        Ok(Some(KvView {
            memory: match self.devices.get(d) {
                Some(Device::Gpu(n)) => MemoryKind::Device(*n),
                _ => MemoryKind::Host,
            },
            dtype: l.dtype,
            block_addrs: addrs,
            token_stride: u64::from(l.kv_heads) * u64::from(l.head_size) * elem,
            head_stride: u64::from(l.head_size) * elem,
            tokens_per_block: l.tokens_per_block,
            num_tokens: info.tokens as usize,
        }))
    }

    fn config(&self) -> &ManagerConfig {
        &self.config
    }

    fn device_of(&self, index: usize) -> Device {
        self.devices.get(index).copied().unwrap_or(Device::Cpu)
    }

    fn epoch(&self) -> Instant {
        self.epoch
    }

    fn last_access(&self, id: Allocated) -> Option<Instant> {
        lock(&self.inner).allocation(id).map(|s| s.last_access)
    }
}

/// The handle of a live request.
pub struct Handle {
    id: RequestId,
    /// The allocation it was made for.
    of: Allocated,
    shared: Arc<dyn SharedView>,
}

impl Handle {
    pub(super) fn new(of: Allocated, shared: Arc<dyn SharedView>) -> Arc<Self> {
        Arc::new(Self {
            id: of.id,
            of,
            shared,
        })
    }
}

impl std::fmt::Debug for Handle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handle").field("id", &self.id).finish()
    }
}

impl KvCacheHandle for Handle {
    fn request_id(&self) -> RequestId {
        self.id
    }
    fn block_table(&self) -> BlockTable {
        let bs = self.shared.config().layout.tokens_per_block as usize;
        let (physical_blocks, sequence_length) = self
            .shared
            .snapshot(self.of)
            .map_or((Vec::new(), 0), |s| (s.table, s.info.tokens as usize));
        BlockTable {
            physical_blocks,
            sequence_length,
            block_size: bs,
        }
    }
    fn device(&self) -> Device {
        match self.shared.snapshot(self.of) {
            Some(s) if s.on_device => self.shared.device_of(s.device),
            _ => Device::Cpu,
        }
    }
    fn num_tokens(&self) -> usize {
        self.shared
            .snapshot(self.of)
            .map_or(0, |s| s.info.tokens as usize)
    }
    fn num_layers(&self) -> usize {
        self.shared.config().layout.layers as usize
    }
    fn num_heads(&self) -> usize {
        self.shared.config().layout.kv_heads as usize
    }
    fn head_dim(&self) -> usize {
        self.shared.config().layout.head_size as usize
    }
    fn key_cache(&self, layer: usize) -> Result<Option<KvView>> {
        self.shared.view(self.of, layer, KvPart::Key)
    }
    fn value_cache(&self, layer: usize) -> Result<Option<KvView>> {
        self.shared.view(self.of, layer, KvPart::Value)
    }
    fn stats(&self) -> CacheHandleStats {
        let l = self.shared.config().layout;
        let bb = l.block_bytes().unwrap_or(0) as usize;
        let (blocks, tokens) = self.shared.snapshot(self.of).map_or((0, 0), |s| {
            (
                (s.info.blocks - s.info.first_live) as usize,
                s.info.tokens as usize,
            )
        });
        let cap = blocks * l.tokens_per_block as usize;
        CacheHandleStats {
            memory_bytes: blocks * bb,
            blocks_allocated: blocks,
            tokens_stored: tokens,
            utilization: if cap == 0 {
                0.0
            } else {
                tokens as f32 / cap as f32
            },
            last_access_secs: self.shared.last_access(self.of).map_or(0.0, |t| {
                t.saturating_duration_since(self.shared.epoch())
                    .as_secs_f64()
            }),
        }
    }
    fn is_valid(&self) -> bool {
        self.shared.snapshot(self.of).is_some()
    }
    fn cache_id(&self) -> String {
        self.id.to_string()
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}
