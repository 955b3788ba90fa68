//! Exercises the core with caller storage only: no allocator, no `std`.
#![no_std]

use core::panic::PanicInfo;

use pagedkv_core::{
    BlockPool, BlockSlot, CacheConfig, CacheStorage, HOLE, KvCache, PlanSlot, PoolConfig, Prompt,
    SeqSlot, SipBlockHasher, buckets_for,
};

const BLOCKS: u32 = 64;
const BUCKETS: usize = buckets_for(BLOCKS);

#[panic_handler]
fn panic(_: &PanicInfo<'_>) -> ! {
    loop {}
}

/// Allocates a prompt twice (the second time from the prefix cache), forks,
/// appends with copy-on-write, frees; returns the prefix-hit blocks, or
/// `u32::MAX` on any error or broken invariant.
#[unsafe(no_mangle)]
pub extern "C" fn pagedkv_nostd_demo() -> u32 {
    run().unwrap_or(u32::MAX)
}

fn run() -> Option<u32> {
    let mut slots = [BlockSlot::EMPTY; BLOCKS as usize];
    let mut index = [0u32; BUCKETS];
    let mut seqs = [SeqSlot::EMPTY; 4];
    let mut tables = [HOLE; 4 * 16];
    let mut pending = [0u32; 4 * 4];
    let mut plans = [PlanSlot::EMPTY; 1];
    let mut targets = [HOLE; 16];
    let mut sources = [HOLE; 16];
    let config = CacheConfig {
        tokens_per_block: 4,
        max_seqs: 4,
        max_blocks_per_seq: 16,
        max_plans: 1,
    };
    let storage = CacheStorage {
        seqs: (&mut seqs).into(),
        tables: (&mut tables).into(),
        pending: (&mut pending).into(),
        plans: (&mut plans).into(),
        plan_targets: (&mut targets).into(),
        plan_sources: (&mut sources).into(),
    };
    let mut cache =
        KvCache::new(config, storage, SipBlockHasher::new(*b"nostd-check-key!")).ok()?;
    let pool = BlockPool::new(PoolConfig::device(0, 4), &mut slots, &mut index).ok()?;
    let gpu = cache.add_pool(pool).ok()?;
    let prompt = [1u32, 2, 3, 4, 5, 6, 7, 8, 9, 10];
    let a = cache.allocate(gpu, &Prompt::ids(&prompt)).ok()?.seq;
    cache.free(a).ok()?;
    let b = cache.allocate(gpu, &Prompt::ids(&prompt)).ok()?;
    let child = cache.fork(b.seq).ok()?;
    cache.append(child, &[11]).ok()?.cow?;
    cache.free(child).ok()?;
    cache.free(b.seq).ok()?;
    cache.check_invariants().ok()?;
    Some(b.hit_blocks)
}
