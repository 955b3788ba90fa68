//! A request's life: allocate (with prefix reuse across tiers), append
//! (copy-on-write as a two-phase plan), fork, free.
#![allow(
    clippy::cast_possible_truncation,
    reason = "token and block counts are checked against u32 before narrowing"
)]

use std::sync::Arc;
use std::time::Instant;

use pagedkv_core::{BlockHash, CacheSalt, Prompt, SeqId};

use super::handle::Handle;
use super::preempt::Room;
use super::wait::backoff;
use super::{Inner, KvManager, ManagedBackend, ReqState, lock};
use crate::engine::Allocation;
use crate::error::{InvalidRequest, ManagerError, Result};
use crate::traits::KvCacheHandle;
use crate::types::{AllocationRequest, Device, HostAdmission, RequestId};

/// How a request's prompt is matched, decided once per allocation.
pub(super) struct PromptPlan {
    pub(super) device: usize,
    use_prefix: bool,
    salt: Option<CacheSalt>,
    /// Chained keys (only when the host tier needs them).
    pub(super) keys: Vec<BlockHash>,
    len: u32,
}

pub(super) fn too_long() -> ManagerError {
    pagedkv_core::Error::LengthOverflow.into()
}

impl<B: ManagedBackend> KvManager<B> {
    pub(super) fn check_request(&self, req: &AllocationRequest) -> Result<()> {
        let l = &self.shared.config.layout;
        for (what, got, want) in [
            ("num_layers", req.num_layers, l.layers),
            ("num_heads", req.num_heads, l.kv_heads),
            ("head_dim", req.head_dim, l.head_size),
        ] {
            if got != want as usize {
                return Err(InvalidRequest::Layout {
                    what,
                    got,
                    want: want as usize,
                }
                .into());
            }
        }
        if req.dtype != l.dtype {
            return Err(InvalidRequest::DType {
                got: req.dtype,
                want: l.dtype,
            }
            .into());
        }
        if !req.prompt.is_empty() && req.prompt.len() != req.initial_tokens {
            return Err(InvalidRequest::PromptLength {
                prompt: req.prompt.len(),
                initial: req.initial_tokens,
            }
            .into());
        }
        let max = self
            .shared
            .config
            .max_sequence_length
            .min(req.max_sequence_length);
        if req.initial_tokens > max
            || req.max_sequence_length > self.shared.config.max_sequence_length
        {
            return Err(InvalidRequest::TooLong {
                tokens: req.initial_tokens.max(req.max_sequence_length),
                max: self.shared.config.max_sequence_length,
            }
            .into());
        }
        if let Some(d) = req.device {
            self.device_index(d)?;
        }
        for (what, zero) in [
            ("prefill_chunk", req.prefill_chunk == Some(0)),
            ("sliding_window", req.sliding_window == Some(0)),
        ] {
            if zero {
                return Err(InvalidRequest::Zero { what }.into());
            }
        }
        Ok(())
    }

    pub(super) fn device_index(&self, d: Device) -> Result<usize> {
        self.shared
            .devices
            .iter()
            .position(|&x| x == d)
            .ok_or(ManagerError::UnknownDevice(d))
    }

    pub(super) fn choose_device(
        &self,
        inner: &Inner,
        req: &AllocationRequest,
        blocks: u32,
    ) -> Result<usize> {
        if let Some(d) = req.device {
            return self.device_index(d);
        }
        let pools = &self.shared.pools;
        let pick = inner.preference.iter().copied().find(|&d| {
            inner
                .cache
                .pool(pools.device(d))
                .is_ok_and(|p| p.available() >= blocks)
        });
        Ok(pick.or(inner.preference.first().copied()).unwrap_or(0))
    }

    fn salt_for(&self, inner: &Inner, req: &AllocationRequest) -> Option<CacheSalt> {
        let shared = inner
            .prefix
            .as_ref()
            .is_none_or(|p| p.enable_cross_request_sharing);
        match (req.cache_salt, shared) {
            (Some(s), true) => Some(CacheSalt(s)),
            (s, false) => Some(CacheSalt(
                (u128::from(req.request_id.0) << 64) ^ s.unwrap_or(0) ^ 0x5a17,
            )),
            (None, true) => None,
        }
    }

    /// The core prompt of `req` under plan `pp`.
    fn prompt<'r>(
        req: &'r AllocationRequest,
        pp: &PromptPlan,
        keys: &'r [BlockHash],
    ) -> Prompt<'r> {
        let prompt = if !pp.use_prefix {
            Prompt::len(pp.len)
        } else if !req.block_keys.is_empty() {
            Prompt::keys(keys, pp.len)
        } else {
            Prompt::ids(&req.prompt)
        };
        Prompt {
            salt: pp.salt,
            adapter: req.adapter,
            mm: &req.mm_items,
            ..prompt
        }
    }

    /// The prompt's placement and chained keys; `touch` counts the prompt
    /// for the host tier's admission (an allocation does, a prefetch not).
    pub(super) fn plan_prompt(
        &self,
        req: &AllocationRequest,
        raw_keys: &[BlockHash],
        touch: bool,
    ) -> Result<PromptPlan> {
        let len = u32::try_from(req.initial_tokens).map_err(|_| too_long())?;
        let blocks = len.div_ceil(self.shared.config.layout.tokens_per_block);
        let mut inner = lock(&self.shared.inner);
        if inner.reqs.contains_key(&req.request_id) {
            return Err(ManagerError::DuplicateRequest(req.request_id));
        }
        let device = self.choose_device(&inner, req, blocks)?;
        let long_enough = req.initial_tokens >= 1
            && (req.prompt.len() == req.initial_tokens || !req.block_keys.is_empty());
        let use_prefix = long_enough
            && inner
                .prefix
                .as_ref()
                .is_some_and(|p| req.initial_tokens >= p.min_prefix_length.max(1));
        let mut pp = PromptPlan {
            device,
            use_prefix,
            salt: self.salt_for(&inner, req),
            keys: Vec::new(),
            len,
        };
        if use_prefix && self.shared.pools.host().is_some() {
            let prompt = Self::prompt(req, &pp, raw_keys);
            let mut keys = Vec::new();
            inner.cache.prompt_keys(&prompt, |k| keys.push(k))?;
            // The host tier's admission counts prompts asking for each key.
            let cfg = &self.shared.config;
            if touch && cfg.offload_evicted_prefixes && cfg.host_admission != HostAdmission::Every {
                for &k in &keys {
                    inner.touches.touch(k);
                }
            }
            pp.keys = keys;
        }
        Ok(pp)
    }

    /// Allocates a request: host-tier hits promoted first, evicted prefixes
    /// offloaded, room made as the preemption policy says; then the core
    /// places the prompt (or its hits and one chunk).
    pub(super) async fn allocate_inner(&self, req: &AllocationRequest) -> Result<Allocation> {
        self.check_request(req)?;
        let raw_keys: Vec<BlockHash> = req.block_keys.iter().map(|&k| BlockHash(k)).collect();
        let pp = self.plan_prompt(req, &raw_keys, true)?;
        let device = pp.device;
        let mut host_hits = 0;
        #[cfg(feature = "redis")]
        let remote = self.import_remote(req.request_id, device, &pp.keys);
        #[cfg(not(feature = "redis"))]
        let remote = 0;
        if !pp.keys.is_empty() {
            host_hits = self.promote(device, &pp.keys).await?;
        }
        let prompt = Self::prompt(req, &pp, &raw_keys);
        let offload = self.shared.config.offload_evicted_prefixes && !pp.keys.is_empty();
        let mut room = Room::on(device, None);
        let res = loop {
            if offload {
                let blocks = pp.len.div_ceil(self.shared.config.layout.tokens_per_block);
                if let Err(e) = self.offload_before(device, blocks, &pp.keys).await {
                    break Err(e);
                }
            }
            let r = self.allocate_once(req, &pp, &prompt, &raw_keys, (host_hits, remote));
            match self.with_room(r, &mut room).await {
                Ok(Some(a)) => break Ok(a),
                Ok(None) => {}
                Err(e) => break Err(e),
            }
        };
        match res {
            Ok(mut a) => {
                self.shared
                    .policy
                    .record_access(req.request_id, Instant::now());
                self.notify_pressure();
                a.preempted = room.preempted;
                Ok(a)
            }
            Err(e) => {
                lock(&self.shared.inner).stats.failures += 1;
                Err(e)
            }
        }
    }

    /// One try of an allocation in the core, recorded as a request.
    fn allocate_once(
        &self,
        req: &AllocationRequest,
        pp: &PromptPlan,
        prompt: &Prompt<'_>,
        raw_keys: &[BlockHash],
        (host_hits, remote): (u64, u64),
    ) -> Result<Allocation> {
        let mut guard = lock(&self.shared.inner);
        let inner = &mut *guard;
        let chunk = req
            .prefill_chunk
            .map_or(u32::MAX, |c| u32::try_from(c).unwrap_or(u32::MAX));
        let pool = self.shared.pools.device(pp.device);
        let a = inner.cache.allocate_chunk(pool, prompt, chunk)?;
        if let Some(w) = req.sliding_window
            && let Err(e) = inner.cache.set_window(a.seq, w, a.hit_tokens)
        {
            let _ = inner.cache.free(a.seq);
            return Err(e.into());
        }
        inner.serials += 1;
        let serial = inner.serials;
        let handle = self.new_handle(req.request_id, serial);
        inner.reqs.insert(
            req.request_id,
            ReqState {
                seq: a.seq,
                priority: req.priority,
                handle: Arc::downgrade(&handle),
                device: pp.device,
                last_access: Instant::now(),
                mark: 0,
                window: req.sliding_window.is_some(),
                serial,
            },
        );
        inner.stats.allocations += 1;
        let from_host = host_hits.min(u64::from(a.hit_blocks)) as u32;
        if pp.use_prefix {
            let queried = if req.block_keys.is_empty() {
                pp.len / self.shared.config.layout.tokens_per_block
            } else {
                raw_keys.len() as u32
            };
            inner.stats.queries += u64::from(queried);
            inner.stats.host_hits += u64::from(from_host);
            inner.stats.device_hits += u64::from(a.hit_blocks - from_host);
        }
        Ok(Allocation {
            handle,
            computed_tokens: a.hit_tokens.min(pp.len) as usize,
            device_hit_blocks: a.hit_blocks - from_host,
            host_hit_blocks: from_host,
            remote_hit_blocks: remote.min(u64::from(from_host)) as u32,
            placed_tokens: a.tokens as usize,
            blocks: inner.cache.info(a.seq)?.blocks,
            preempted: Vec::new(),
        })
    }

    pub(super) fn seq_of(&self, id: RequestId) -> Result<SeqId> {
        lock(&self.shared.inner).req(id).map(|s| s.seq)
    }

    /// A new request `child` sharing every block of `parent` (parallel
    /// sampling, beam search); the first write to a shared partial block
    /// copies it.
    pub async fn fork(
        &self,
        parent: RequestId,
        child: RequestId,
    ) -> Result<Arc<dyn KvCacheHandle>> {
        self.ensure_on_device(parent).await?;
        let mut inner = lock(&self.shared.inner);
        if inner.reqs.contains_key(&child) {
            return Err(ManagerError::DuplicateRequest(child));
        }
        let st = inner.req(parent)?;
        let (pseq, priority, device, window) = (st.seq, st.priority, st.device, st.window);
        let seq = inner.cache.fork(pseq)?;
        inner.serials += 1;
        let serial = inner.serials;
        let handle = self.new_handle(child, serial);
        inner.reqs.insert(
            child,
            ReqState {
                seq,
                priority,
                handle: Arc::downgrade(&handle),
                device,
                last_access: Instant::now(),
                mark: 0,
                window,
                serial,
            },
        );
        drop(inner);
        self.shared.policy.record_access(child, Instant::now());
        Ok(handle)
    }

    pub(super) fn new_handle(&self, id: RequestId, serial: u64) -> Arc<Handle> {
        let of = super::handle::Allocated { id, serial };
        Handle::new(of, Arc::clone(&self.shared) as _)
    }

    /// The handle of a live request: the one the engine holds, or a new one.
    pub(super) fn handle_of(&self, id: RequestId, st: &mut ReqState) -> Arc<dyn KvCacheHandle> {
        match st.handle.upgrade() {
            Some(h) => h,
            None => {
                let h = self.new_handle(id, st.serial);
                st.handle = Arc::downgrade(&h);
                h
            }
        }
    }

    /// Seconds since the manager started (the prefix TTL's clock).
    pub(super) fn now_secs(&self) -> u32 {
        self.shared.epoch.elapsed().as_secs() as u32
    }

    /// What an extension of `st` stamps: its device and the time, if it
    /// has a sliding window (whose blocks an extension releases).
    pub(super) fn window_stamp(&self, st: &ReqState) -> Option<(usize, u32)> {
        st.window.then(|| (st.device, self.now_secs()))
    }

    /// Stamps the release time of every live block of `seq` (on a device),
    /// before they are released: by a free or a move off the device.
    pub(super) fn stamp_release(&self, inner: &mut Inner, seq: SeqId) {
        let now = self.now_secs();
        let Ok(info) = inner.cache.info(seq) else {
            return;
        };
        let Some(d) = self.shared.pools.device_of(info.pool) else {
            return;
        };
        let Inner {
            cache, released_at, ..
        } = inner;
        let (Ok(table), Some(stamps)) = (cache.table(seq), released_at.get_mut(d)) else {
            return;
        };
        for b in table.iter().skip(info.first_live as usize) {
            if let Some(s) = stamps.get_mut(b.index()) {
                *s = now;
            }
        }
    }

    pub(super) fn enforce_max_prefixes(&self, inner: &mut Inner) -> usize {
        let Some(max) = inner.prefix.as_ref().map(|p| p.max_prefixes) else {
            return 0;
        };
        let mut n = 0;
        for pool in self.shared.pools.device_ids() {
            while inner
                .cache
                .pool(pool)
                .is_ok_and(|p| p.cached_len() as usize > max)
            {
                if !matches!(inner.cache.evict_one(pool), Ok(Some(_))) {
                    break;
                }
                n += 1;
            }
        }
        n
    }

    pub(super) async fn free_request(&self, id: RequestId) -> Result<()> {
        // A pending move always ends (its fences complete or fail): wait for it.
        for attempt in 0.. {
            {
                let mut guard = lock(&self.shared.inner);
                let inner = &mut *guard;
                let seq = inner.req(id)?.seq;
                self.stamp_release(inner, seq);
                match inner.cache.free(seq) {
                    Ok(()) => {
                        inner.reqs.remove(&id);
                        self.enforce_max_prefixes(inner);
                        drop(guard);
                        self.shared.policy.forget(id);
                        self.notify_pressure();
                        return Ok(());
                    }
                    Err(pagedkv_core::Error::SequenceBusy(_)) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            // Another task is moving it: let that finish.
            self.shared.timer.sleep(backoff(attempt)).await;
        }
        Err(pagedkv_core::Error::SequenceBusy(self.seq_of(id)?).into())
    }
}
