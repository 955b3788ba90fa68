//! The model of the manager's model-based tests (proptest in
//! `tests/manager_model.rs`, and the `manager` fuzz target): random request
//! sequences on a `KvManager` over real host memory, against a model of
//! every request's tokens and of the KV bytes every block must hold.
//!
//! A block's bytes are a function of its tenant and of the whole token
//! prefix it ends (what a kernel would compute), written by the model after
//! each allocation and extension. After every step:
//! - the core's invariants hold, with every block a move holds in a plan;
//! - every live request on a device or the host tier holds exactly its KV
//!   (a compressed one, within the int8 bound), so a prefix hit on the wrong
//!   block, a lost copy-on-write or a move that lost KV are all caught;
//! - a prefix hit never serves lossy (compressed) KV as exact, nor another
//!   tenant's;
//! - a refused call changed no request's place or table;
//! - every answer is exact: computed (cached) tokens, placed tokens, blocks
//!   added and released, copies, preemptions; no request leaves its device
//!   unless a preemption was reported for it (as an event too);
//! - a router mirroring the drained events holds as many keys per tier as
//!   the cache indexes there;
//! - batched extensions and kernel tables (vLLM and FlashInfer) match each
//!   request's block table, lookahead slots included.
//!
//! Each case runs under one preemption policy: the scheduler's (no room is
//! a `NoRoom` answer) or the manager's (automatic, reported).
//!
//! Futures are polled once and dropped at random while a move waits on a
//! slow fence (cancellation), then the request must still be intact.
#![allow(clippy::cast_possible_truncation, reason = "small test values")]

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, Waker};

use pagedkv_manager::{
    AdvancedKvCacheManager, AllocationRequest, BlockAllocator, BlockOrder, BlockTable, DType,
    Device, ExtendItem, KvCacheHandle, KvCacheManager, KvLayout, KvManager, ManagerConfig,
    ManagerError, MultiDeviceCacheManager, PreemptionPolicy, PrefixCacheConfig, RequestId,
};

mod engine;

use engine::Mirror;

use crate::block_on;
use crate::faulty::{Faulty, Knobs};

/// Tokens per block.
pub const BS: usize = 4;

fn layout() -> KvLayout {
    KvLayout {
        layers: 1,
        kv_heads: 2,
        head_size: 8,
        tokens_per_block: BS as u32,
        dtype: DType::F16,
        order: BlockOrder::LayerMajor,
    }
}

/// One call on the manager. Fields are free-form (taken modulo their
/// range), so a fuzzer can generate them.
#[derive(Clone, Debug)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[allow(missing_docs, reason = "the fields are the call's arguments")]
pub enum MOp {
    Allocate {
        tenant: u8,
        base: u8,
        prefix: u8,
        suffix: u8,
        seed: u8,
        dev: u8,
        /// Chunked prefill when a multiple of 3 (the rest of the prompt
        /// follows by extensions with its ids).
        chunk: u8,
    },
    Extend {
        pick: u8,
        n: u8,
        known: bool,
        /// Odd: through `extend_request`, holding `look / 2 % 4` lookahead
        /// slots; even: the seed's calls (lookahead released).
        look: u8,
    },
    /// A decode step of several requests (`extend_batch` by one token,
    /// `look % 3` lookahead slots each), then their kernel tables.
    Batch {
        first: u8,
        count: u8,
        look: u8,
    },
    /// The scheduler preempts a request (swap, or recompute: freed).
    Preempt {
        pick: u8,
        recompute: bool,
    },
    Fork {
        pick: u8,
    },
    SwapOut {
        pick: u8,
    },
    SwapIn {
        pick: u8,
    },
    Compress {
        pick: u8,
    },
    Move {
        pick: u8,
        dev: u8,
    },
    Defragment,
    Gc,
    Free {
        pick: u8,
    },
    /// Poll one of the calls above once on slow fences, then drop it.
    Cancel {
        op: u8,
        pick: u8,
    },
    /// A call on an id that was never allocated: a typed error.
    Unknown {
        which: u8,
    },
}

#[derive(Clone, Debug)]
struct MReq {
    /// The engine keeps the handle while the request runs.
    handle: Arc<dyn KvCacheHandle>,
    tenant: u8,
    tokens: Vec<u32>,
    /// Went through compression: its KV is within the int8 bound.
    lossy: bool,
    /// Lookahead slots held past its end.
    lookahead: u32,
    /// Prompt ids not placed yet (chunked prefill); known extensions
    /// append them first.
    pending: Vec<u32>,
}

/// The manager under test and what every request's blocks should hold.
pub struct ManagerModel {
    m: KvManager<Faulty>,
    knobs: Arc<Knobs>,
    reqs: BTreeMap<u64, MReq>,
    next_id: u64,
    bases: [Vec<u32>; 3],
    policy: PreemptionPolicy,
    /// The cache as a router mirrors it from the drained events.
    mirror: Mirror,
    /// Kernel tables kept from export to export, as an engine keeps them
    /// (the block tables are written incrementally).
    tables: pagedkv_manager::KernelTables,
    /// Preemptions reported (events) during the current step.
    reported: Vec<RequestId>,
    /// Preemptions reported in answers during the current step.
    answered: Vec<RequestId>,
    /// Operations applied.
    pub ops: u64,
    /// Prefix hits checked (a test asserts the model exercised them).
    pub hits: u64,
    /// Calls cancelled while a move was pending.
    pub cancelled: u64,
    /// Preemptions reported (by the manager or asked for).
    pub preemptions: u64,
    /// Batch items extended and exported.
    pub batched: u64,
    /// Copy-on-write copies answered.
    pub copies: u64,
    /// Extensions that held lookahead slots.
    pub lookaheads: u64,
    /// Allocations placed in chunks.
    pub chunked: u64,
    /// Stored and removed keys mirrored from events.
    pub events: u64,
}

/// Polls a call once and drops it: `None` if it was still pending (then
/// cancelled), else whether it succeeded.
fn poll_once_then_drop<T, F: Future<Output = Result<T, ManagerError>>>(f: F) -> Option<bool> {
    let mut f = std::pin::pin!(f);
    let mut cx = Context::from_waker(Waker::noop());
    match f.as_mut().poll(&mut cx) {
        Poll::Pending => None,
        Poll::Ready(r) => Some(r.is_ok()),
    }
}

/// The KV of a block ending token prefix `tokens` of `tenant`: f16 values
/// in [-8, 8], a function of the whole prefix.
fn kv(tenant: u8, tokens: &[u32], bytes: usize) -> Vec<u8> {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ u64::from(tenant);
    for &t in tokens {
        h = (h ^ u64::from(t)).wrapping_mul(0x100_0000_01b3);
    }
    (0..bytes / 2)
        .flat_map(|i| {
            let x = ((h.wrapping_add(i as u64 * 2_654_435_761) >> 20) % 4001) as f32 / 250.0 - 8.0;
            half::f16::from_f32(x).to_bits().to_le_bytes()
        })
        .collect()
}

/// Whether `got` is `want` through int8 quantization (per-head scales of at
/// most 8 / 127, plus f16 rounding).
fn within_int8(got: &[u8], want: &[u8]) -> bool {
    got.len() == want.len()
        && got.chunks(2).zip(want.chunks(2)).all(|(g, w)| {
            let g = half::f16::from_le_bytes([g[0], g[1]]).to_f32();
            let w = half::f16::from_le_bytes([w[0], w[1]]).to_f32();
            (g - w).abs() <= 8.0 / 254.0 + 0.01
        })
}

impl ManagerModel {
    /// [`with_policy`](Self::with_policy) with automatic preemption.
    #[allow(
        clippy::new_without_default,
        reason = "a model is built, not defaulted"
    )]
    pub fn new() -> Self {
        Self::with_policy(PreemptionPolicy::Automatic)
    }

    /// Two devices of up to 24 blocks (growing by 8), a 48-block host tier,
    /// prefix caching with offload, events recorded, over `Faulty` host
    /// memory; `policy` preempts.
    pub fn with_policy(policy: PreemptionPolicy) -> Self {
        let (be, knobs) = Faulty::new();
        let mut c = ManagerConfig::new(layout(), 24);
        c.initial_blocks = 8;
        c.host_blocks = 48;
        c.target_devices = vec![Device::Gpu(0), Device::Gpu(1)];
        c.prefix_cache_config = Some(PrefixCacheConfig::default());
        c.offload_evicted_prefixes = true;
        c.max_sequences = 12;
        c.max_sequence_length = 64;
        c.hash_key = Some(*b"manager-model-k1");
        c.preemption = policy;
        c.record_events = true;
        let m = KvManager::new(be, c).expect("config");
        let bases = [
            (0..64).map(|i| i * 7 % 50).collect(),
            (0..64).map(|i| (i * 11 + 3) % 50).collect(),
            (0..64).map(|i| i % 5).collect(),
        ];
        Self {
            m,
            knobs,
            reqs: BTreeMap::new(),
            next_id: 1,
            bases,
            policy,
            mirror: Mirror::default(),
            tables: pagedkv_manager::KernelTables {
                pad: -1,
                ..Default::default()
            },
            reported: Vec::new(),
            answered: Vec::new(),
            ops: 0,
            hits: 0,
            cancelled: 0,
            preemptions: 0,
            batched: 0,
            copies: 0,
            lookaheads: 0,
            chunked: 0,
            events: 0,
        }
    }

    fn block_bytes() -> usize {
        layout().block_bytes().unwrap_or(0) as usize
    }

    fn pick(&self, k: u8) -> Option<u64> {
        let n = self.reqs.len();
        (n > 0).then(|| *self.reqs.keys().nth(k as usize % n).unwrap_or(&0))
    }

    /// The "kernel": writes the KV of blocks `from..` of request `id`.
    fn write(&self, id: u64, from: usize) {
        let r = &self.reqs[&id];
        let bb = Self::block_bytes();
        for b in from..r.tokens.len().div_ceil(BS) {
            let end = ((b + 1) * BS).min(r.tokens.len());
            let bytes = kv(r.tenant, &r.tokens[..end], bb);
            self.m
                .write_block(RequestId(id), b, &bytes)
                .expect("write a live block");
        }
    }

    /// Checks request `id` holds its KV (when it is readable).
    fn check(&self, id: u64) {
        let r = &self.reqs[&id];
        assert!(r.handle.is_valid(), "req {id}: its handle went stale");
        assert_eq!(
            r.handle.num_tokens(),
            r.tokens.len(),
            "req {id}: token count"
        );
        let table = r.handle.block_table().physical_blocks.len();
        let want = (r.tokens.len() + r.lookahead as usize).div_ceil(BS);
        assert_eq!(table, want, "req {id}: table of its tokens and lookahead");
        let bb = Self::block_bytes();
        for b in 0..r.tokens.len().div_ceil(BS) {
            let Ok(got) = self.m.read_block(RequestId(id), b) else {
                continue;
            };
            if got.len() != bb {
                continue; // compressed (int8 layout): checked once decompressed
            }
            let end = ((b + 1) * BS).min(r.tokens.len());
            let want = kv(r.tenant, &r.tokens[..end], bb);
            if r.lossy {
                assert!(within_int8(&got, &want), "req {id} block {b}: lossy KV off");
            } else {
                assert_eq!(got, want, "req {id} block {b}: wrong KV");
            }
        }
    }

    fn check_all(&self) {
        if let Err(e) = self.m.check_invariants() {
            panic!("{e}");
        }
        for &id in self.reqs.keys() {
            self.check(id);
        }
        assert_eq!(self.m.list_handles().len(), self.reqs.len());
    }

    fn places(&self) -> Vec<(u64, Option<Device>, BlockTable)> {
        self.reqs
            .iter()
            .map(|(&id, r)| {
                let place = self.m.get_cache_device(RequestId(id));
                (id, place, r.handle.block_table())
            })
            .collect()
    }

    /// The request `op` is about.
    fn target(&self, op: &MOp) -> Option<u64> {
        match *op {
            MOp::Extend { pick, .. }
            | MOp::Preempt { pick, .. }
            | MOp::Fork { pick }
            | MOp::SwapOut { pick }
            | MOp::SwapIn { pick }
            | MOp::Compress { pick }
            | MOp::Move { pick, .. }
            | MOp::Free { pick }
            | MOp::Cancel { pick, .. } => self.pick(pick),
            _ => None,
        }
    }

    /// Applies `op`, then checks everything (see the module docs).
    pub fn step(&mut self, op: &MOp) {
        let target = self.target(op);
        let before = self.places();
        self.reported.clear();
        self.answered.clear();
        let refused = match self.apply(op) {
            Ok(()) => false,
            Err(e) => {
                self.assert_acceptable(&e, op);
                true
            }
        };
        self.mirror_events();
        self.check_preemptions_reported(op, target, &before);
        // A refused call leaves its request's tokens as they were, and a
        // request that was on a device there (a call that first brings a
        // request back from the host may leave it back; making room may have
        // moved others). Its KV is checked below.
        if let (true, Some(id)) = (refused, target) {
            let now = self.places().into_iter().find(|p| p.0 == id);
            let was = before.into_iter().find(|p| p.0 == id);
            if let (Some(now), Some(was)) = (now, was) {
                assert_eq!(
                    now.2.sequence_length, was.2.sequence_length,
                    "{op:?} was refused but changed its request's length"
                );
                if was.1 != Some(Device::Cpu) {
                    assert_eq!(now, was, "{op:?} was refused but moved its request");
                }
            }
        }
        self.ops += 1;
        self.check_all();
    }

    /// An error a refused call may give under this model's policy.
    fn assert_acceptable(&self, e: &ManagerError, op: &MOp) {
        let no_room = matches!(e, ManagerError::NoRoom { .. });
        assert!(
            matches!(
                e,
                ManagerError::OutOfMemory { .. }
                    | ManagerError::Core(_)
                    | ManagerError::UnknownRequest(_)
                    | ManagerError::DuplicateRequest(_)
            ) || (no_room && self.policy == PreemptionPolicy::Scheduler),
            "{op:?}: unexpected error {e}"
        );
    }

    fn apply(&mut self, op: &MOp) -> Result<(), ManagerError> {
        match *op {
            MOp::Allocate {
                tenant,
                base,
                prefix,
                suffix,
                seed,
                dev,
                chunk,
            } => {
                if self.reqs.len() >= 10 {
                    return Ok(());
                }
                let chunk = (chunk % 3 == 0).then_some(usize::from(chunk / 3 % 12) + 1);
                let tenant = tenant % 3;
                let b = &self.bases[base as usize % 3];
                let mut tokens = b[..(prefix as usize % 40).min(b.len())].to_vec();
                tokens.extend((0..suffix % 8).map(|i| 100 + u32::from(seed) * 8 + u32::from(i)));
                let id = self.next_id;
                self.next_id += 1;
                let mut r =
                    AllocationRequest::for_prompt(RequestId(id), tokens.clone(), 64, &layout());
                r.cache_salt = (tenant > 0).then_some(u128::from(tenant));
                r.device = Some(Device::Gpu(u16::from(dev % 2)));
                r.prefill_chunk = chunk;
                let a = block_on(self.m.allocate_request(&r))?;
                let hits = self.check_allocation(&a, tokens.len(), chunk);
                let pending = tokens.split_off(a.placed_tokens);
                self.reqs.insert(
                    id,
                    MReq {
                        handle: a.handle,
                        tenant,
                        tokens,
                        lossy: false,
                        lookahead: 0,
                        pending,
                    },
                );
                // Hits hold the exact KV of this tenant's prefix already.
                let bb = Self::block_bytes();
                for b in 0..hits {
                    let want = kv(tenant, &self.reqs[&id].tokens[..(b + 1) * BS], bb);
                    let got = self.m.read_block(RequestId(id), b)?;
                    assert_eq!(got, want, "req {id}: prefix hit {b} holds other KV");
                }
                self.hits += hits as u64;
                self.write(id, hits);
                Ok(())
            }
            MOp::Extend {
                pick,
                n,
                known,
                look,
            } => {
                let Some(id) = self.pick(pick) else {
                    return Ok(());
                };
                let n = n as usize % 9;
                let lookahead = if look % 2 == 1 {
                    u32::from(look / 2 % 4)
                } else {
                    0
                };
                let old = self.reqs[&id].tokens.len();
                if old + n + lookahead as usize > 64 {
                    return Ok(());
                }
                let new = self.next_tokens(id, n);
                let blocks = self.reqs[&id].handle.block_table().physical_blocks.len();
                let rid = RequestId(id);
                if look % 2 == 1 {
                    let item = ExtendItem {
                        request: rid,
                        tokens: known.then_some(&new[..]),
                        count: n as u32,
                        lookahead,
                    };
                    let x = block_on(self.m.extend_request(item))?;
                    self.check_extension(id, &x, blocks, n, lookahead);
                } else if known {
                    block_on(self.m.extend_tokens(rid, &new))?;
                } else {
                    block_on(self.m.extend(rid, n))?;
                }
                self.extended(id, new, known, lookahead);
                Ok(())
            }
            MOp::Batch { first, count, look } => {
                self.batch(first, count, look);
                Ok(())
            }
            MOp::Preempt { pick, recompute } => {
                let Some(id) = self.pick(pick) else {
                    return Ok(());
                };
                self.preempt(id, recompute)
            }
            MOp::Fork { pick } => {
                let Some(id) = self.pick(pick) else {
                    return Ok(());
                };
                if self.reqs.len() >= 10 {
                    return Ok(());
                }
                let child = self.next_id;
                self.next_id += 1;
                let handle = block_on(self.m.fork(RequestId(id), RequestId(child)))?;
                // The child shares the written blocks, not the lookahead.
                let r = MReq {
                    handle,
                    lookahead: 0,
                    ..self.reqs[&id].clone()
                };
                self.reqs.insert(child, r);
                Ok(())
            }
            MOp::SwapOut { pick } | MOp::SwapIn { pick } | MOp::Compress { pick } => {
                let Some(id) = self.pick(pick) else {
                    return Ok(());
                };
                let rid = RequestId(id);
                match op {
                    MOp::SwapOut { .. } => block_on(self.m.swap_out(rid)),
                    MOp::SwapIn { .. } => block_on(self.m.swap_in(rid)),
                    _ => {
                        block_on(self.m.compress_cache(rid, 0.6))?;
                        if let Some(r) = self.reqs.get_mut(&id) {
                            r.lossy = true;
                        }
                        Ok(())
                    }
                }
            }
            MOp::Move { pick, dev } => {
                let Some(id) = self.pick(pick) else {
                    return Ok(());
                };
                block_on(
                    self.m
                        .move_cache(RequestId(id), Device::Gpu(u16::from(dev % 2))),
                )
            }
            MOp::Defragment => self.m.defragment(),
            MOp::Gc => block_on(self.m.gc()).map(|_| ()),
            MOp::Free { pick } => {
                let Some(id) = self.pick(pick) else {
                    return Ok(());
                };
                block_on(self.m.deallocate(RequestId(id)))?;
                self.reqs.remove(&id);
                Ok(())
            }
            MOp::Cancel { op, pick } => {
                let Some(id) = self.pick(pick) else {
                    return Ok(());
                };
                let rid = RequestId(id);
                let old = self.reqs[&id].tokens.len();
                if op % 5 == 4 && old + 3 > 64 {
                    return Ok(());
                }
                self.knobs.slow_polls.store(3, Ordering::SeqCst);
                let done = match op % 5 {
                    0 => poll_once_then_drop(self.m.swap_out(rid)),
                    1 => poll_once_then_drop(self.m.swap_in(rid)),
                    2 => poll_once_then_drop(self.m.compress_cache(rid, 0.6)),
                    3 => poll_once_then_drop(self.m.move_cache(rid, Device::Gpu(1))),
                    _ => poll_once_then_drop(self.m.extend(rid, 3)),
                };
                let done = match done {
                    Some(true) if op % 5 == 4 => {
                        // `extend` releases any lookahead.
                        if let Some(r) = self.reqs.get_mut(&id) {
                            r.lookahead = 0;
                        }
                        Some(true)
                    }
                    d => d,
                };
                self.knobs.slow_polls.store(0, Ordering::SeqCst);
                self.cancelled += u64::from(done.is_none());
                if done == Some(true) && op % 5 == 4 {
                    // The extension completed: the kernel writes its tokens,
                    // ids unknown to the manager (it keys nothing past them)
                    // that the model names for the bytes.
                    let r = self.reqs.get_mut(&id).expect("picked");
                    r.tokens.extend((0..3).map(|i| 300 + (old + i) as u32));
                    r.pending.clear();
                    self.write(id, old / BS);
                }
                if let (Some(true), 2, Some(r)) = (done, op % 5, self.reqs.get_mut(&id)) {
                    r.lossy = true;
                }
                Ok(())
            }
            MOp::Unknown { which } => {
                let ghost = RequestId(u64::MAX - u64::from(which));
                let r = match which % 4 {
                    0 => block_on(self.m.extend(ghost, 1)),
                    1 => block_on(self.m.deallocate(ghost)),
                    2 => block_on(self.m.swap_out(ghost)),
                    _ => block_on(self.m.fork(ghost, RequestId(u64::MAX))).map(|_| ()),
                };
                assert!(matches!(r, Err(ManagerError::UnknownRequest(_))), "{r:?}");
                r
            }
        }
    }

    /// Frees every request; nothing may stay held afterwards.
    pub fn drain(&mut self) {
        for id in std::mem::take(&mut self.reqs).into_keys() {
            block_on(self.m.deallocate(RequestId(id))).expect("deallocate");
        }
        self.check_all();
        assert!(
            self.m.used_blocks().iter().all(|&u| u == 0),
            "blocks still held: {:?}",
            self.m.used_blocks()
        );
    }
}
