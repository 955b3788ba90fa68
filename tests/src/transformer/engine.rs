//! A small inference engine around the tiny transformer, using the manager
//! as an engine's scheduler would: two KV groups (the full-attention layers,
//! and the sliding-window layer with its own window, as vLLM's hybrid
//! allocator keeps them), prefix hits skipping prefill (the computed tokens
//! of both groups), chunked prefill, forks for parallel sampling, batched
//! decode steps, speculative decoding into lookahead slots, preemption by
//! swap when the manager answers "no room", defragmentation, compression.
//!
//! With `check`, every forward pass also runs on the request's contiguous
//! reference KV, and the logits must be equal bit for bit (within the
//! stated bound once a request went through lossy compression).

use std::collections::BTreeMap;
use std::sync::Arc;

use pagedkv_manager::core::QuantFormat;
use pagedkv_manager::{
    AllocationRequest, BlockAllocator, BlockOrder, DType, Device, ExtendItem, HostBackend,
    HostManager, KvCacheHandle, KvCacheManager, KvLayout, ManagerConfig, ManagerError,
    MultiDeviceCacheManager, PreemptMode, PrefixCacheConfig, RequestId,
};

use super::{Config, ContigKv, Model, PagedKv, argmax, ranked};
use crate::block_on;

/// Tokens per block.
pub const BLOCK_TOKENS: u32 = 4;

/// Longest request (prompt, output and lookahead).
pub const MAX_LEN: usize = 1024;

/// The engine's memory.
#[derive(Clone, Copy, Debug)]
pub struct EngineConfig {
    /// Device blocks of the full-attention group.
    pub full_blocks: usize,
    /// Device blocks of the window group.
    pub window_blocks: usize,
    /// Host blocks of each group (swap space).
    pub host_blocks: usize,
    /// Prefix caching.
    pub prefix: bool,
    /// Compare every logit with the contiguous reference.
    pub check: bool,
}

/// What a run exercised (a test asserts each is non-zero).
#[derive(Clone, Copy, Debug, Default)]
pub struct Seen {
    /// Prefix-hit blocks on the device, full group.
    pub device_hit_blocks: u64,
    /// Prefix-hit blocks from the host tier, full group.
    pub host_hit_blocks: u64,
    /// Prompt tokens whose prefill was skipped.
    pub skipped_tokens: u64,
    /// Prefill chunks placed by extensions.
    pub chunks: u64,
    /// Copy-on-write copies answered.
    pub copies: u64,
    /// Requests the engine preempted (swap) on "no room".
    pub preemptions: u64,
    /// Requests swapped back in by an extension.
    pub swapped_in: u64,
    /// Draft tokens accepted (their KV already in lookahead slots).
    pub drafts_accepted: u64,
    /// Draft tokens rejected.
    pub drafts_rejected: u64,
    /// Blocks the window group released.
    pub window_released: u64,
    /// Forward passes.
    pub forwards: u64,
    /// Logits compared with the reference.
    pub logits_checked: u64,
    /// Largest |paged − reference| logit of a lossy request.
    pub max_lossy_error: f32,
}

struct Req {
    /// Tokens in the cache (and, while verifying drafts, the drafts).
    tokens: Vec<u32>,
    /// The next token (predicted, not in the cache yet).
    next: u32,
    last_logits: Vec<f32>,
    reference: ContigKv,
    full: Arc<dyn KvCacheHandle>,
    window: Arc<dyn KvCacheHandle>,
    lossy: bool,
    generated: usize,
}

/// The engine.
pub struct Engine {
    /// The model.
    pub model: Model,
    /// The full-attention layers' KV group.
    pub full: HostManager,
    /// The sliding-window layer's KV group.
    pub window: HostManager,
    reqs: BTreeMap<u64, Req>,
    /// What ran.
    pub seen: Seen,
    check: bool,
}

fn manager(layout: KvLayout, blocks: usize, cfg: &EngineConfig) -> HostManager {
    let mut c = ManagerConfig::new(layout, blocks);
    // Backed 8 blocks at a time: the pool grows, and defragmenting gives
    // regions back.
    c.initial_blocks = 8;
    c.host_blocks = cfg.host_blocks;
    c.max_sequences = 64;
    c.max_sequence_length = MAX_LEN;
    c.hash_key = Some(*b"tiny-transformer");
    c.prefix_cache_config = cfg.prefix.then(PrefixCacheConfig::default);
    HostManager::new(HostBackend::new(), c).expect("engine config")
}

fn rid(id: u64) -> RequestId {
    RequestId(id)
}

impl Engine {
    /// An engine for `model`.
    pub fn new(model: Model, cfg: EngineConfig) -> Self {
        let (full, window) = (
            manager(
                Self::layout(&model.cfg, model.cfg.full_layers),
                cfg.full_blocks,
                &cfg,
            ),
            manager(Self::layout(&model.cfg, 1), cfg.window_blocks, &cfg),
        );
        Self {
            model,
            full,
            window,
            reqs: BTreeMap::new(),
            seen: Seen::default(),
            check: cfg.check,
        }
    }

    /// The KV layout of a group of `layers` layers.
    pub fn layout(c: &Config, layers: usize) -> KvLayout {
        KvLayout {
            layers: layers as u32,
            kv_heads: c.kv_heads as u32,
            head_size: c.head_dim as u32,
            tokens_per_block: BLOCK_TOKENS,
            dtype: DType::F32,
            order: BlockOrder::LayerMajor,
        }
    }

    /// Running requests.
    pub fn running(&self) -> Vec<u64> {
        self.reqs.keys().copied().collect()
    }

    /// Tokens request `id` generated.
    pub fn generated(&self, id: u64) -> usize {
        self.reqs.get(&id).map_or(0, |r| r.generated)
    }

    /// Whether request `id` has its full group on its device.
    pub fn on_device(&self, id: u64) -> bool {
        matches!(self.full.get_cache_device(rid(id)), Some(Device::Gpu(_)))
    }

    /// One forward pass of request `id` at `pos` (its token there is
    /// `tokens[pos]`) through the paged KV; with `check`, on the reference
    /// too, compared. Returns the logits that drive decoding (the
    /// reference's for a lossy request: teacher forcing keeps both on one
    /// sequence).
    fn forward(&mut self, id: u64, pos: usize) -> Vec<f32> {
        let r = self.reqs.get_mut(&id).expect("running");
        let token = r.tokens[pos];
        let mut paged = PagedKv::new(&self.model.cfg, &*r.full, &*r.window)
            .expect("views")
            .expect("both groups on their device");
        let logits = self.model.forward(token, pos, &mut paged);
        self.seen.forwards += 1;
        if !self.check {
            return logits;
        }
        r.reference.truncate(pos);
        for p in r.reference.len()..pos {
            self.model.forward(r.tokens[p], p, &mut r.reference);
        }
        let want = self.model.forward(token, pos, &mut r.reference);
        self.seen.logits_checked += want.len() as u64;
        if r.lossy {
            let err = logits
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            self.seen.max_lossy_error = self.seen.max_lossy_error.max(err);
            return want;
        }
        for (i, (a, b)) in logits.iter().zip(&want).enumerate() {
            assert_eq!(
                a.to_bits(),
                b.to_bits(),
                "request {id}, position {pos}, logit {i}: paged {a} != contiguous {b}"
            );
        }
        logits
    }

    /// Admits a request: allocates both groups (prefill in chunks of
    /// `chunk`), skips the prompt tokens both groups have computed (all but
    /// the last, whose logits give the first token), prefills the rest. On
    /// an error nothing is held.
    pub fn admit(
        &mut self,
        id: u64,
        prompt: &[u32],
        chunk: Option<usize>,
    ) -> Result<(), ManagerError> {
        let cfg = self.model.cfg;
        let req = |layers, window: Option<u32>| {
            let mut r = AllocationRequest::for_prompt(
                rid(id),
                prompt.to_vec(),
                MAX_LEN,
                &Self::layout(&cfg, layers),
            );
            r.prefill_chunk = chunk;
            r.sliding_window = window;
            r
        };
        let a = block_on(self.full.allocate_request(&req(cfg.full_layers, None)))?;
        let b = match block_on(
            self.window
                .allocate_request(&req(1, Some(cfg.window as u32))),
        ) {
            Ok(b) => b,
            Err(e) => {
                block_on(self.full.deallocate(rid(id)))?;
                return Err(e);
            }
        };
        let len = prompt.len();
        let computed = a.computed_tokens.min(b.computed_tokens).min(len - 1);
        self.seen.device_hit_blocks += u64::from(a.device_hit_blocks);
        self.seen.host_hit_blocks += u64::from(a.host_hit_blocks);
        self.seen.skipped_tokens += computed as u64;
        self.reqs.insert(
            id,
            Req {
                tokens: prompt.to_vec(),
                next: 0,
                last_logits: Vec::new(),
                reference: ContigKv::new(&cfg),
                full: a.handle,
                window: b.handle,
                lossy: false,
                generated: 0,
            },
        );
        let mut placed = [a.placed_tokens, b.placed_tokens];
        let mut cursor = computed;
        while cursor < len {
            let end = chunk.map_or(len, |c| (cursor + c).min(len));
            for g in 0..2 {
                if placed[g] < end {
                    let m = if g == 0 { &self.full } else { &self.window };
                    let item = ExtendItem::tokens(rid(id), &prompt[placed[g]..end]);
                    if let Err(e) = block_on(m.extend_request(item)) {
                        self.finish(id)?;
                        return Err(e);
                    }
                    placed[g] = end;
                    self.seen.chunks += 1;
                }
            }
            for p in cursor..end {
                let logits = self.forward(id, p);
                self.reqs.get_mut(&id).expect("admitted").last_logits = logits;
            }
            cursor = end;
        }
        let r = self.reqs.get_mut(&id).expect("admitted");
        r.next = argmax(&r.last_logits);
        Ok(())
    }

    /// Forks `parent` into `child` (parallel sampling): the child shares
    /// every block and starts from the parent's `rank`-th best token.
    pub fn fork(&mut self, parent: u64, child: u64, rank: usize) -> Result<(), ManagerError> {
        let full = block_on(self.full.fork(rid(parent), rid(child)))?;
        let window = match block_on(self.window.fork(rid(parent), rid(child))) {
            Ok(h) => h,
            Err(e) => {
                block_on(self.full.deallocate(rid(child)))?;
                return Err(e);
            }
        };
        let p = &self.reqs[&parent];
        let r = Req {
            tokens: p.tokens.clone(),
            next: ranked(&p.last_logits, rank),
            last_logits: p.last_logits.clone(),
            reference: p.reference.clone(),
            full,
            window,
            lossy: p.lossy,
            generated: p.generated,
        };
        self.reqs.insert(child, r);
        Ok(())
    }

    /// One decode step of `ids` (a batch: one token each, both groups).
    /// A request the manager has no room for is preempted (swapped out;
    /// a later step brings it back). Returns the requests paused.
    pub fn step(&mut self, ids: &[u64]) -> Vec<u64> {
        let next: Vec<[u32; 1]> = ids.iter().map(|id| [self.reqs[id].next]).collect();
        let items: Vec<ExtendItem<'_>> = ids
            .iter()
            .zip(&next)
            .map(|(&id, t)| ExtendItem::tokens(rid(id), t))
            .collect();
        let mut out = Vec::with_capacity(items.len());
        block_on(self.full.extend_batch(&items, &mut out));
        let mut go = Vec::new();
        let mut paused = Vec::new();
        for (item, r) in items.iter().zip(out) {
            match r {
                Ok(x) => {
                    self.seen.copies += u64::from(x.copies);
                    self.seen.swapped_in += u64::from(x.swapped_in);
                    go.push(*item);
                }
                Err(ManagerError::NoRoom { .. }) => {
                    // This request was not extended: preempting it is safe.
                    if self.on_device(item.request.0) {
                        block_on(self.full.preempt(item.request, PreemptMode::Swap))
                            .expect("swap out a request that got no room");
                        self.seen.preemptions += 1;
                    }
                    paused.push(item.request.0);
                }
                Err(e) => panic!("request {}: {e}", item.request),
            }
        }
        let mut out = Vec::with_capacity(go.len());
        block_on(self.window.extend_batch(&go, &mut out));
        for (item, r) in go.iter().zip(out) {
            let x = r.expect("the window group has room");
            self.seen.copies += u64::from(x.copies);
            self.seen.window_released += u64::from(x.released_blocks);
            let id = item.request.0;
            let r = self.reqs.get_mut(&id).expect("running");
            r.tokens.push(r.next);
            let pos = r.tokens.len() - 1;
            let logits = self.forward(id, pos);
            let r = self.reqs.get_mut(&id).expect("running");
            r.next = argmax(&logits);
            r.last_logits = logits;
            r.generated += 1;
        }
        paused
    }

    /// A speculative step of request `id` with `k` drafts: the next token
    /// plus `k` lookahead slots on both groups; the drafts (an oracle's
    /// greedy tokens, the last one made wrong) are written into the slots
    /// and verified; the accepted ones are appended (their KV already in
    /// place), the other slots released. Returns the drafts accepted.
    pub fn speculate(&mut self, id: u64, k: u32) -> Result<u32, ManagerError> {
        let (next, len) = (self.reqs[&id].next, self.reqs[&id].tokens.len());
        let mut drafts = self.oracle(id, k as usize);
        if let Some(last) = drafts.last_mut() {
            *last = (*last + 1) % self.model.cfg.vocab as u32;
        }
        let one = [next];
        let item = ExtendItem {
            request: rid(id),
            tokens: Some(&one),
            count: 1,
            lookahead: k,
        };
        block_on(self.full.extend_request(item))?;
        block_on(self.window.extend_request(item)).expect("the window group has room");
        let r = self.reqs.get_mut(&id).expect("running");
        r.tokens.push(next);
        r.tokens.extend(&drafts);
        let mut preds = Vec::with_capacity(drafts.len() + 1);
        let mut logits = Vec::new();
        for pos in len..=len + drafts.len() {
            let l = self.forward(id, pos);
            preds.push(argmax(&l));
            logits.push(l);
        }
        let m = drafts
            .iter()
            .zip(&preds)
            .take_while(|(d, p)| d == p)
            .count();
        let r = self.reqs.get_mut(&id).expect("running");
        r.tokens.truncate(len + 1 + m);
        r.reference.truncate(len + 1 + m);
        r.next = preds[m];
        r.last_logits = logits.swap_remove(m);
        r.generated += 1 + m;
        for g in [&self.full, &self.window] {
            let x = block_on(g.extend_request(ExtendItem::tokens(rid(id), &drafts[..m])))
                .expect("accepted drafts fit their reserved slots");
            assert_eq!(x.new_blocks, 0, "the drafts' KV was in reserved slots");
        }
        self.seen.drafts_accepted += m as u64;
        self.seen.drafts_rejected += (drafts.len() - m) as u64;
        Ok(m as u32)
    }

    /// The reference's greedy continuation of request `id` by `k` tokens
    /// (a perfect draft model).
    fn oracle(&self, id: u64, k: usize) -> Vec<u32> {
        let r = &self.reqs[&id];
        let mut kv = r.reference.clone();
        for p in kv.len()..r.tokens.len() {
            self.model.forward(r.tokens[p], p, &mut kv);
        }
        let mut t = r.next;
        (0..k)
            .map(|i| {
                t = argmax(&self.model.forward(t, r.tokens.len() + i, &mut kv));
                t
            })
            .collect()
    }

    /// Compresses request `id` (both groups) into `format`; the next step
    /// brings it back, lossy.
    pub fn compress(&mut self, id: u64, format: QuantFormat) -> Result<(), ManagerError> {
        block_on(self.full.compress_with(rid(id), format))?;
        block_on(self.window.compress_with(rid(id), format))?;
        self.reqs.get_mut(&id).expect("running").lossy = true;
        Ok(())
    }

    /// Compacts the full group's device pool; returns the requests whose
    /// blocks moved.
    pub fn defragment(&mut self) -> Result<usize, ManagerError> {
        let tables = |e: &Self| -> Vec<_> {
            e.reqs
                .values()
                .map(|r| r.full.block_table().physical_blocks)
                .collect()
        };
        let before = tables(self);
        self.full.defragment()?;
        Ok(before
            .iter()
            .zip(tables(self))
            .filter(|(a, b)| *a != b)
            .count())
    }

    /// Frees request `id` in both groups.
    pub fn finish(&mut self, id: u64) -> Result<(), ManagerError> {
        self.reqs.remove(&id);
        block_on(self.full.deallocate(rid(id)))?;
        block_on(self.window.deallocate(rid(id)))
    }
}
