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

use criterion::{Criterion, criterion_group, criterion_main};
use pagedkv_manager::{
    AllocationRequest, BlockOrder, DType, ExportItem, ExtendItem, HostBackend, HostManager,
    KernelTables, KvCacheManager, KvLayout, ManagerConfig, RequestId,
};
use pagedkv_tests::block_on;

#[path = "../../core/benches/common/decode.rs"]
#[allow(dead_code, reason = "shared with the core's bench")]
mod decode;

use decode::{BS, Decode, PROMPT, STEPS, prompt, timed, token};

const REQUESTS: usize = decode::SEQS;

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
            t[0] = token(self.step, r);
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

fn decode_step(c: &mut Criterion) {
    let mut g = c.benchmark_group("decode_step_256_requests");
    let mut core = Decode::new();
    g.bench_function("core_only", |b| b.iter_custom(|iters| core.timed(iters)));
    drop(core);
    let mut mgr = ManagerRun::new();
    g.bench_function("manager_extend_batch_and_export_tables", |b| {
        b.iter_custom(|iters| {
            timed(
                &mut mgr,
                iters,
                |r| r.step,
                ManagerRun::decode,
                ManagerRun::restart,
            )
        })
    });
    g.finish();
}

criterion_group!(benches, decode_step);
criterion_main!(benches);
