//! One decode step of 256 running requests through the manager, as an
//! engine's scheduler runs it: `extend_batch` by one known token each (full
//! blocks published for prefix reuse), then `export_tables` of the batch
//! (vLLM `block_tables` / `slot_mapping`, FlashInfer `indptr` / `indices` /
//! `last_page_len`) into buffers the engine reuses. Against the core alone
//! doing the same work (append, then the three exports) in the same run.
//! Prompts of 496 tokens, 16 tokens per block; requests restart (untimed)
//! every 256 steps so tables stay 32 to 48 blocks long.
//! `cargo bench -p pagedkv-manager --bench decode_step`
#![allow(missing_docs, reason = "criterion macros generate undocumented items")]
#![allow(clippy::cast_possible_truncation, reason = "small bench values")]

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use pagedkv_core::{CacheConfig, KvCache, Prompt, SeqId};
use pagedkv_manager::{
    AllocationRequest, BlockOrder, DType, ExportItem, ExtendItem, HostBackend, HostManager,
    KernelTables, KvCacheManager, KvLayout, ManagerConfig, RequestId,
};
use pagedkv_tests::{block_on, cache_with};

const REQUESTS: usize = 256;
const PROMPT: u32 = 496;
const STEPS: u32 = 256;
const BS: u32 = 16;

/// A layout with tiny blocks: the step's cost is bookkeeping, not bytes.
fn layout() -> KvLayout {
    KvLayout {
        layers: 1,
        kv_heads: 1,
        head_size: 8,
        tokens_per_block: BS,
        dtype: DType::F16,
        order: BlockOrder::BlockMajor,
    }
}

fn prompt(r: usize) -> Vec<u32> {
    (0..PROMPT).map(|i| i * 7 + r as u32 * 100_003).collect()
}

struct ManagerRun {
    m: HostManager,
    step: u32,
    tokens: Vec<[u32; 1]>,
    out: Vec<pagedkv_manager::Result<pagedkv_manager::Extension>>,
    exports: Vec<ExportItem>,
    tables: KernelTables,
}

impl ManagerRun {
    fn new() -> Self {
        let blocks = REQUESTS * ((PROMPT + STEPS) / BS + 1) as usize;
        let mut cfg = ManagerConfig::new(layout(), blocks);
        cfg.max_sequences = REQUESTS;
        cfg.max_sequence_length = (PROMPT + STEPS + BS) as usize;
        cfg.prefix_cache_config = Some(pagedkv_manager::PrefixCacheConfig::default());
        let m = HostManager::new(HostBackend::new(), cfg).unwrap();
        let mut run = Self {
            m,
            step: 0,
            tokens: vec![[0]; REQUESTS],
            out: Vec::with_capacity(REQUESTS),
            exports: (0..REQUESTS)
                .map(|r| ExportItem {
                    request: RequestId(r as u64),
                    new_tokens: 1,
                    lookahead: 0,
                })
                .collect(),
            tables: KernelTables {
                pad: -1,
                ..KernelTables::default()
            },
        };
        run.restart();
        run
    }

    fn restart(&mut self) {
        for r in 0..REQUESTS {
            let id = RequestId(r as u64);
            let _ = block_on(self.m.deallocate(id));
            let max = (PROMPT + STEPS + BS) as usize;
            let req = AllocationRequest::for_prompt(id, prompt(r), max, &layout());
            block_on(self.m.allocate_request(&req)).unwrap();
        }
        self.step = 0;
    }

    fn decode(&mut self) {
        for (r, t) in self.tokens.iter_mut().enumerate() {
            t[0] = self.step * 13 + r as u32;
        }
        let items: Vec<ExtendItem<'_>> = self
            .tokens
            .iter()
            .enumerate()
            .map(|(r, t)| ExtendItem::tokens(RequestId(r as u64), t))
            .collect();
        block_on(self.m.extend_batch(&items, &mut self.out));
        debug_assert!(self.out.iter().all(Result::is_ok));
        self.m
            .export_tables(&self.exports, &mut self.tables)
            .unwrap();
        black_box(&self.tables);
        self.step += 1;
    }
}

struct CoreRun {
    cache: KvCache<'static, pagedkv_core::SipBlockHasher>,
    seqs: Vec<SeqId>,
    step: u32,
    block_tables: Vec<i32>,
    slots: Vec<i64>,
    indptr: Vec<i32>,
    indices: Vec<i32>,
    last: Vec<i32>,
}

impl CoreRun {
    fn new() -> Self {
        let width = (PROMPT + STEPS) / BS + 1;
        let config = CacheConfig {
            tokens_per_block: BS,
            max_seqs: REQUESTS as u32,
            max_blocks_per_seq: width,
            max_plans: 4,
        };
        let cache = cache_with(config, &[REQUESTS as u32 * width], 0);
        let mut run = Self {
            cache,
            seqs: Vec::new(),
            step: 0,
            block_tables: Vec::new(),
            slots: vec![0; REQUESTS],
            indptr: vec![0; REQUESTS + 1],
            indices: Vec::new(),
            last: vec![0; REQUESTS],
        };
        run.restart();
        run
    }

    fn restart(&mut self) {
        for s in self.seqs.drain(..) {
            self.cache.free(s).unwrap();
        }
        let pool = self.cache.pools()[0].id();
        for r in 0..REQUESTS {
            let a = self.cache.allocate(pool, &Prompt::ids(&prompt(r))).unwrap();
            self.seqs.push(a.seq);
        }
        self.step = 0;
    }

    fn decode(&mut self) {
        let mut max_blocks = 0;
        let mut pages = 0;
        for (r, &s) in self.seqs.iter().enumerate() {
            self.cache.append(s, &[self.step * 13 + r as u32]).unwrap();
            let info = self.cache.info(s).unwrap();
            max_blocks = max_blocks.max(info.blocks as usize);
            pages += info.blocks as usize;
        }
        self.block_tables.resize(REQUESTS * max_blocks, -1);
        self.indices.resize(pages, 0);
        let c = &self.cache;
        c.export_block_tables(&self.seqs, max_blocks, -1, &mut self.block_tables)
            .unwrap();
        for (k, &s) in self.seqs.iter().enumerate() {
            let last = c.info(s).unwrap().tokens - 1;
            c.export_slots(s, last, 1, &mut self.slots[k..]).unwrap();
        }
        c.export_flashinfer(
            &self.seqs,
            &mut self.indptr,
            &mut self.indices,
            &mut self.last,
        )
        .unwrap();
        black_box((&self.block_tables, &self.slots, &self.indices));
        self.step += 1;
    }
}

/// Times `decode` alone, restarting (untimed) every `STEPS` steps.
fn timed<R>(
    run: &mut R,
    iters: u64,
    decode: fn(&mut R),
    step: fn(&R) -> u32,
    restart: fn(&mut R),
) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        if step(run) == STEPS {
            restart(run);
        }
        let t = Instant::now();
        decode(run);
        total += t.elapsed();
    }
    total
}

fn decode_step(c: &mut Criterion) {
    let mut g = c.benchmark_group("decode_step_256_requests");
    let mut core = CoreRun::new();
    g.bench_function("core_only", |b| {
        b.iter_custom(|iters| {
            timed(
                &mut core,
                iters,
                CoreRun::decode,
                |r| r.step,
                CoreRun::restart,
            )
        })
    });
    drop(core);
    let mut mgr = ManagerRun::new();
    g.bench_function("manager_extend_batch_and_export_tables", |b| {
        b.iter_custom(|iters| {
            timed(
                &mut mgr,
                iters,
                ManagerRun::decode,
                |r| r.step,
                ManagerRun::restart,
            )
        })
    });
    g.finish();
}

criterion_group!(benches, decode_step);
criterion_main!(benches);
