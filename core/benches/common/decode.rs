//! The core's decode step of 256 sequences, shared by the core's
//! `workloads` bench and the manager's `decode_step` bench (which measures
//! the manager doing the same work in the same run): 256 sequences of
//! 496-token prompts each append one known token, then the vLLM block
//! tables (into the matrix kept from the last step, as vLLM's persistent
//! block table: only what changed is written) and slot mapping and the
//! FlashInfer tables of the batch (likewise) are exported; sequences restart
//! (untimed) every 256 steps.

use std::hint::black_box;
use std::time::{Duration, Instant};

use pagedkv_core::{
    BlockPool, CacheConfig, ExportedRow, KvCache, PoolConfig, PoolId, Prompt, SeqId, SipBlockHasher,
};

/// Sequences in a step.
pub(crate) const SEQS: usize = 256;
/// Prompt tokens of each.
pub(crate) const PROMPT: u32 = 496;
/// Steps before the sequences restart.
pub(crate) const STEPS: u32 = 256;
/// Tokens per block.
pub(crate) const BS: u32 = 16;

/// The prompt of sequence `r`.
pub(crate) fn prompt(r: usize) -> Vec<u32> {
    (0..PROMPT).map(|i| i * 7 + r as u32 * 100_003).collect()
}

/// The token sequence `r` appends at `step`.
pub(crate) fn token(step: u32, r: usize) -> u32 {
    step * 13 + r as u32
}

/// Times `step` alone over `iters` steps, calling `restart` (untimed)
/// every `STEPS` steps; `at` says how many steps ran since the last.
pub(crate) fn timed<R>(
    run: &mut R,
    iters: u64,
    at: fn(&R) -> u32,
    step: fn(&mut R),
    restart: fn(&mut R),
) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        if at(run) == STEPS {
            restart(run);
        }
        let t = Instant::now();
        step(run);
        total += t.elapsed();
    }
    total
}

/// The core doing a decode step.
pub(crate) struct Decode {
    cache: KvCache<'static, SipBlockHasher>,
    seqs: Vec<SeqId>,
    /// Steps since the last restart.
    pub(crate) step: u32,
    block_tables: Vec<i32>,
    exported: Vec<ExportedRow>,
    flashinfer: Vec<ExportedRow>,
    slots: Vec<i64>,
    indptr: Vec<i32>,
    indices: Vec<i32>,
    last: Vec<i32>,
}

impl Decode {
    /// 256 sequences on one pool with room for all of them.
    pub(crate) fn new() -> Self {
        let width = (PROMPT + STEPS) / BS + 1;
        let config = CacheConfig {
            tokens_per_block: BS,
            max_seqs: SEQS as u32,
            max_blocks_per_seq: width,
            max_plans: 1,
        };
        let mut cache = KvCache::with_config(config, SipBlockHasher::new([7; 16])).unwrap();
        let mut pool =
            BlockPool::with_capacity(PoolConfig::device(0, BS), SEQS as u32 * width).unwrap();
        pool.set_events_enabled(false);
        cache.add_pool(pool).unwrap();
        let mut d = Self {
            cache,
            seqs: Vec::new(),
            step: 0,
            block_tables: Vec::new(),
            exported: vec![ExportedRow::default(); SEQS],
            flashinfer: vec![ExportedRow::default(); SEQS],
            slots: vec![0; SEQS],
            indptr: vec![0; SEQS + 1],
            indices: Vec::new(),
            last: vec![0; SEQS],
        };
        d.restart();
        d
    }

    /// Frees the sequences and allocates them anew.
    pub(crate) fn restart(&mut self) {
        for s in self.seqs.drain(..) {
            self.cache.free(s).unwrap();
        }
        for r in 0..SEQS {
            let a = self
                .cache
                .allocate(PoolId(0), &Prompt::ids(&prompt(r)))
                .unwrap();
            self.seqs.push(a.seq);
        }
        self.step = 0;
    }

    /// One step: every sequence appends a known token, then the batch's
    /// tables are exported.
    pub(crate) fn step(&mut self) {
        let (mut max_blocks, mut pages) = (0, 0);
        for (r, &s) in self.seqs.iter().enumerate() {
            self.cache.append(s, &[token(self.step, r)]).unwrap();
            let info = self.cache.info(s).unwrap();
            max_blocks = max_blocks.max(info.blocks as usize);
            pages += info.blocks as usize;
        }
        self.block_tables.resize(SEQS * max_blocks, -1);
        self.indices.resize(pages, 0);
        let c = &self.cache;
        c.export_block_tables_since(
            &self.seqs,
            max_blocks,
            -1,
            &mut self.block_tables,
            &mut self.exported,
        )
        .unwrap();
        for (k, &s) in self.seqs.iter().enumerate() {
            let last = c.info(s).unwrap().tokens - 1;
            c.export_slots(s, last, 1, &mut self.slots[k..]).unwrap();
        }
        c.export_flashinfer_since(
            &self.seqs,
            &mut self.indptr,
            &mut self.indices,
            &mut self.last,
            &mut self.flashinfer,
        )
        .unwrap();
        black_box((&self.block_tables, &self.slots, &self.indices));
        self.step += 1;
    }

    /// `iters` timed steps.
    pub(crate) fn timed(&mut self, iters: u64) -> Duration {
        timed(self, iters, |d| d.step, Self::step, Self::restart)
    }
}
