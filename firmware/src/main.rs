//! pagedkv's core on a Cortex-M3 (QEMU `lm3s6965evb`): every structure in
//! static storage, no allocator. A workload of allocate, fork with
//! copy-on-write, prefix hits, swap out and in, and free, with the KV bytes
//! in a static arena moved by hal-host's `StaticBackend`; then a pool shared
//! by the main loop and the SysTick interrupt. Logs go out through defmt over
//! semihosting; the result is the process exit code (0: every check passed).
#![no_std]
#![no_main]

use core::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use cortex_m::peripheral::syst::SystClkSource;
use cortex_m_rt::{entry, exception};
use cortex_m_semihosting::debug::{self, EXIT_FAILURE, EXIT_SUCCESS};
use defmt_semihosting as _;
use pagedkv_core::{
    Backend, BatchValidator, BlockId, BlockOrder, BlockPool, BlockSlot, CacheConfig, CacheStorage,
    DType, HOLE, KvCache, KvLayout, MemoryKind, PlanSlot, PoolConfig, PoolId, Prompt, RegionDesc,
    SeqSlot, Shared, SipBlockHasher, buckets_for, validator_words,
};
use pagedkv_hal_host::{HostRegion, StaticBackend};

const BS: u32 = 4;
const DEV_BLOCKS: u32 = 48;
const HOST_BLOCKS: u32 = 24;
const SHARED_BLOCKS: u32 = 32;
const ARENA: usize = 20 * 1024;

const LAYOUT: KvLayout = KvLayout {
    layers: 1,
    kv_heads: 2,
    head_size: 8,
    tokens_per_block: BS,
    dtype: DType::F16,
    order: BlockOrder::BlockMajor,
};
/// Bytes of one block of `LAYOUT`.
const BLOCK_BYTES: usize = 2 * 2 * 8 * BS as usize * 2;

/// A pool shared by `main` and the SysTick handler.
static SHARED: Shared<Option<BlockPool<'static>>> = Shared::new(None);
static TICK_WANTED: AtomicU32 = AtomicU32::new(0);
static TICK_DONE: AtomicU32 = AtomicU32::new(0);
static TICK_DEFERRED: AtomicU32 = AtomicU32::new(0);
static TICKING: AtomicBool = AtomicBool::new(false);

/// A failed check: what, and a number to print.
struct Fail(&'static str, u32);

fn check(cond: bool, what: &'static str, n: u32) -> Result<(), Fail> {
    if cond { Ok(()) } else { Err(Fail(what, n)) }
}

#[entry]
fn main() -> ! {
    defmt::info!("pagedkv firmware: core with static storage, no allocator");
    let code = match workload().and_then(|()| shared_pool()) {
        Ok(()) => {
            defmt::info!("all checks passed");
            EXIT_SUCCESS
        }
        Err(Fail(what, n)) => {
            defmt::error!("check failed: {=str} ({=u32})", what, n);
            EXIT_FAILURE
        }
    };
    debug::exit(code);
    loop {
        cortex_m::asm::wfi();
    }
}

/// The KV a "kernel" writes for a block: a function of its tokens.
fn kv_bytes(tokens: &[u32], out: &mut [u8; BLOCK_BYTES]) {
    let seed = tokens
        .iter()
        .fold(17u32, |h, &t| h.wrapping_mul(31).wrapping_add(t));
    for (j, b) in out.iter_mut().enumerate() {
        *b = (seed.wrapping_add(j as u32 * 7) >> 3) as u8;
    }
}

fn block_offset(b: BlockId) -> u64 {
    b.0 as u64 * BLOCK_BYTES as u64
}

fn read_block(
    be: &mut StaticBackend<'_>,
    r: &HostRegion,
    b: BlockId,
) -> Result<[u8; BLOCK_BYTES], Fail> {
    let mut out = [0u8; BLOCK_BYTES];
    be.read_bytes(r, block_offset(b), &mut out)
        .map_err(|_| Fail("read_bytes", b.0))?;
    Ok(out)
}

fn workload() -> Result<(), Fail> {
    // Static storage for every structure (cortex-m's `singleton!` hands out
    // each `static` once, as `&'static mut`).
    let seqs =
        cortex_m::singleton!(: [SeqSlot; 8] = [SeqSlot::EMPTY; 8]).ok_or(Fail("storage", 0))?;
    let tables = cortex_m::singleton!(: [BlockId; 128] = [HOLE; 128]).ok_or(Fail("storage", 1))?;
    let pending = cortex_m::singleton!(: [u32; 32] = [0; 32]).ok_or(Fail("storage", 2))?;
    let plans =
        cortex_m::singleton!(: [PlanSlot; 2] = [PlanSlot::EMPTY; 2]).ok_or(Fail("storage", 3))?;
    let targets = cortex_m::singleton!(: [BlockId; 32] = [HOLE; 32]).ok_or(Fail("storage", 4))?;
    let sources = cortex_m::singleton!(: [BlockId; 32] = [HOLE; 32]).ok_or(Fail("storage", 11))?;
    let dev_slots = cortex_m::singleton!(: [BlockSlot; DEV_BLOCKS as usize] = [BlockSlot::EMPTY; DEV_BLOCKS as usize])
        .ok_or(Fail("storage", 5))?;
    let dev_index =
        cortex_m::singleton!(: [u32; buckets_for(DEV_BLOCKS)] = [0; buckets_for(DEV_BLOCKS)])
            .ok_or(Fail("storage", 6))?;
    let host_slots = cortex_m::singleton!(: [BlockSlot; HOST_BLOCKS as usize] = [BlockSlot::EMPTY; HOST_BLOCKS as usize])
        .ok_or(Fail("storage", 7))?;
    let host_index =
        cortex_m::singleton!(: [u32; buckets_for(HOST_BLOCKS)] = [0; buckets_for(HOST_BLOCKS)])
            .ok_or(Fail("storage", 8))?;
    let bits = cortex_m::singleton!(: [u64; validator_words(DEV_BLOCKS)] = [0; validator_words(DEV_BLOCKS)])
        .ok_or(Fail("storage", 9))?;
    let arena = cortex_m::singleton!(: [u8; ARENA] = [0; ARENA]).ok_or(Fail("storage", 10))?;

    let config = CacheConfig {
        tokens_per_block: BS,
        max_seqs: 8,
        max_blocks_per_seq: 16,
        max_plans: 2,
    };
    let storage = CacheStorage {
        seqs: seqs.into(),
        tables: tables.into(),
        pending: pending.into(),
        plans: plans.into(),
        plan_targets: targets.into(),
        plan_sources: sources.into(),
    };
    let mut cache = KvCache::new(config, storage, SipBlockHasher::new(*b"firmware-key-001"))
        .map_err(|_| Fail("cache", 0))?;
    let dev = cache
        .add_pool(
            BlockPool::new(PoolConfig::device(0, BS), dev_slots, dev_index)
                .map_err(|_| Fail("pool", 0))?,
        )
        .map_err(|_| Fail("pool", 1))?;
    let host = cache
        .add_pool(
            BlockPool::new(PoolConfig::host(1, BS), host_slots, host_index)
                .map_err(|_| Fail("pool", 2))?,
        )
        .map_err(|_| Fail("pool", 3))?;
    let mut validator = BatchValidator::new(DEV_BLOCKS, bits).map_err(|_| Fail("validator", 0))?;
    let mut be = StaticBackend::new(arena);
    let dev_r = be
        .create_region(&RegionDesc {
            block_count: DEV_BLOCKS,
            layout: LAYOUT,
            memory: MemoryKind::Device(0),
        })
        .map_err(|_| Fail("region", 0))?;
    let host_r = be
        .create_region(&RegionDesc {
            block_count: HOST_BLOCKS,
            layout: LAYOUT,
            memory: MemoryKind::Host,
        })
        .map_err(|_| Fail("region", 1))?;
    let region = |p: PoolId| if p == dev { &dev_r } else { &host_r };

    // 1. A prompt of 22 tokens: 5 full blocks and a partial one. The
    //    "kernel" writes the KV of each block.
    let mut prompt = [0u32; 22];
    for (i, t) in prompt.iter_mut().enumerate() {
        *t = i as u32 * 7 + 3;
    }
    let a = cache
        .allocate(dev, &Prompt::ids(&prompt))
        .map_err(|_| Fail("allocate", 0))?;
    check(a.hit_blocks == 0, "cold cache hit", a.hit_blocks)?;
    let mut kv = [0u8; BLOCK_BYTES];
    let table_a: [BlockId; 6] = cache
        .table(a.seq)
        .map_err(|_| Fail("table", 0))?
        .try_into()
        .map_err(|_| Fail("table", 1))?;
    for (i, &b) in table_a.iter().enumerate() {
        let end = ((i + 1) * BS as usize).min(prompt.len());
        kv_bytes(prompt.get(..end).unwrap_or(&prompt), &mut kv);
        be.write_bytes(&dev_r, block_offset(b), &kv)
            .map_err(|_| Fail("write", b.0))?;
    }
    defmt::info!("allocated a prompt of 22 tokens in 6 blocks");

    // 2. Fork, then append to the child: the shared partial block is copied.
    let child = cache.fork(a.seq).map_err(|_| Fail("fork", 0))?;
    let out = cache.append(child, &[99]).map_err(|_| Fail("append", 0))?;
    let cow = out.cow.ok_or(Fail("no copy-on-write", 0))?;
    let copies = [cow];
    let batch = validator
        .validate(&copies, DEV_BLOCKS, DEV_BLOCKS, true)
        .map_err(|_| Fail("validate", 0))?;
    // SAFETY: both regions belong to `be`; copies complete synchronously.
    unsafe { be.copy_blocks(&dev_r, &dev_r, batch) }.map_err(|_| Fail("copy", 0))?;
    check(
        read_block(&mut be, &dev_r, cow.dst)? == read_block(&mut be, &dev_r, cow.src)?,
        "copy-on-write bytes",
        cow.dst.0,
    )?;
    let mut child_tokens = [99u32; 23];
    for (c, &t) in child_tokens.iter_mut().zip(&prompt) {
        *c = t;
    }
    kv_bytes(&child_tokens, &mut kv);
    be.write_bytes(&dev_r, block_offset(cow.dst), &kv)
        .map_err(|_| Fail("write", 1))?;
    kv_bytes(&prompt, &mut kv);
    check(
        read_block(&mut be, &dev_r, table_a[5])? == kv,
        "parent's block untouched",
        table_a[5].0,
    )?;
    defmt::info!(
        "fork + append: block {=u32} copied to {=u32}",
        cow.src.0,
        cow.dst.0
    );

    // 3. Free both; the same prompt again hits the 5 full blocks, whose KV
    //    is reused as written.
    cache.free(child).map_err(|_| Fail("free", 0))?;
    cache.free(a.seq).map_err(|_| Fail("free", 1))?;
    let b = cache
        .allocate(dev, &Prompt::ids(&prompt))
        .map_err(|_| Fail("allocate", 1))?;
    check(b.hit_blocks == 5, "prefix hits", b.hit_blocks)?;
    let table_b: [BlockId; 6] = cache
        .table(b.seq)
        .map_err(|_| Fail("table", 2))?
        .try_into()
        .map_err(|_| Fail("table", 3))?;
    for (i, &blk) in table_b.iter().take(5).enumerate() {
        let end = (i + 1) * BS as usize;
        kv_bytes(prompt.get(..end).unwrap_or(&prompt), &mut kv);
        check(
            read_block(&mut be, &dev_r, blk)? == kv,
            "hit block bytes",
            i as u32,
        )?;
    }
    kv_bytes(&prompt, &mut kv);
    be.write_bytes(&dev_r, block_offset(table_b[5]), &kv)
        .map_err(|_| Fail("write", 2))?;
    defmt::info!("prefix hit: 5 of 6 blocks reused");

    // 4. Swap out to the host tier and back, two-phase, bytes checked.
    let mut expect = [[0u8; BLOCK_BYTES]; 6];
    for (e, &blk) in expect.iter_mut().zip(&table_b) {
        *e = read_block(&mut be, &dev_r, blk)?;
    }
    for (dir, to) in [(0u32, host), (1, dev)] {
        let plan = if dir == 0 {
            cache.swap_out(b.seq, to)
        } else {
            cache.swap_in(b.seq, to)
        }
        .map_err(|_| Fail("plan", dir))?;
        let view = cache.plan(plan).map_err(|_| Fail("plan view", dir))?;
        let mut buf = [BlockCopy0; 16];
        let n = view
            .copies_into(&mut buf)
            .map_err(|_| Fail("copies", dir))?;
        let (s, d) = (view.src_pool, view.dst_pool);
        let (sn, dn) = if s == dev {
            (DEV_BLOCKS, HOST_BLOCKS)
        } else {
            (HOST_BLOCKS, DEV_BLOCKS)
        };
        let batch = validator
            .validate(buf.get(..n).unwrap_or(&[]), sn, dn, false)
            .map_err(|_| Fail("validate", dir))?;
        // SAFETY: both regions belong to `be`; nothing else runs meanwhile.
        unsafe { be.copy_blocks(region(s), region(d), batch) }.map_err(|_| Fail("copy", dir))?;
        cache.commit(plan).map_err(|_| Fail("commit", dir))?;
        let info = cache.info(b.seq).map_err(|_| Fail("info", dir))?;
        check(info.pool == to, "sequence moved", dir)?;
        let t = cache.table(b.seq).map_err(|_| Fail("table", 4))?;
        check(t.len() == expect.len(), "table length after move", dir)?;
        for (i, (&blk, want)) in t.iter().zip(&expect).enumerate() {
            check(
                read_block(&mut be, region(to), blk)? == *want,
                "KV after move",
                i as u32,
            )?;
        }
    }
    defmt::info!("swapped out to the host tier and back: KV intact");

    cache.free(b.seq).map_err(|_| Fail("free", 2))?;
    cache
        .check_invariants()
        .map_err(|_| Fail("invariants", 0))?;
    let p = cache.pool(dev).map_err(|_| Fail("pool", 4))?;
    check(
        p.used_len() == 0 && p.free_len() + p.cached_len() == DEV_BLOCKS,
        "blocks all returned",
        p.used_len(),
    )?;
    defmt::info!(
        "device pool: {=u32} cached, {=u32} free, {=u64} hits, {=u64} evictions",
        p.cached_len(),
        p.free_len(),
        p.stats().hit_blocks,
        p.stats().evictions
    );
    Ok(())
}

#[allow(non_upper_case_globals)]
const BlockCopy0: pagedkv_core::BlockCopy = pagedkv_core::BlockCopy {
    src: BlockId(0),
    dst: BlockId(0),
};

fn one_op(p: &mut Option<BlockPool<'static>>) -> bool {
    let Some(pool) = p.as_mut() else { return false };
    match pool.allocate_one() {
        Ok(b) => pool.release(b).is_ok(),
        Err(_) => false,
    }
}

/// The main loop and SysTick use one pool at once; the handler never
/// blocks (it defers when the lock is taken). No update may be lost.
fn shared_pool() -> Result<(), Fail> {
    let slots = cortex_m::singleton!(: [BlockSlot; SHARED_BLOCKS as usize] = [BlockSlot::EMPTY; SHARED_BLOCKS as usize])
        .ok_or(Fail("storage", 11))?;
    let index =
        cortex_m::singleton!(: [u32; buckets_for(SHARED_BLOCKS)] = [0; buckets_for(SHARED_BLOCKS)])
            .ok_or(Fail("storage", 12))?;
    let pool =
        BlockPool::new(PoolConfig::device(2, BS), slots, index).map_err(|_| Fail("pool", 5))?;
    SHARED.with(|p| *p = Some(pool));
    let mut cp = cortex_m::Peripherals::take().ok_or(Fail("peripherals", 0))?;
    cp.SYST.set_clock_source(SystClkSource::Core);
    cp.SYST.set_reload(4_000);
    cp.SYST.clear_current();
    TICKING.store(true, Ordering::SeqCst);
    cp.SYST.enable_interrupt();
    cp.SYST.enable_counter();
    let mut main_ops = 0u32;
    let mut rounds = 0u32;
    while TICK_DONE.load(Ordering::SeqCst) < 200 && rounds < 2_000_000 {
        rounds += 1;
        // Hold the lock for a while, so ticks land inside it.
        let ok = SHARED.with(|p| {
            let mut ok = true;
            for _ in 0..4 {
                ok &= one_op(p);
            }
            ok
        });
        check(ok, "main loop op", rounds)?;
        main_ops += 4;
    }
    TICKING.store(false, Ordering::SeqCst);
    cp.SYST.disable_interrupt();
    cp.SYST.disable_counter();
    // Ticks that found the lock taken are done now, in order.
    let wanted = TICK_WANTED.load(Ordering::SeqCst);
    while TICK_DONE.load(Ordering::SeqCst) < wanted {
        check(SHARED.with(one_op), "deferred tick op", 0)?;
        TICK_DONE.fetch_add(1, Ordering::SeqCst);
    }
    let done = TICK_DONE.load(Ordering::SeqCst);
    let (allocations, used) = SHARED.with(|p| {
        p.as_ref()
            .map_or((0, u32::MAX), |p| (p.stats().allocations, p.used_len()))
    });
    defmt::info!(
        "shared pool: {=u32} main ops, {=u32} tick ops ({=u32} deferred while main held the lock), {=u64} allocations",
        main_ops,
        done,
        TICK_DEFERRED.load(Ordering::SeqCst),
        allocations
    );
    check(done >= 200, "ticks ran", done)?;
    check(
        allocations == u64::from(main_ops) + u64::from(done),
        "lost update",
        allocations as u32,
    )?;
    check(used == 0, "blocks leaked", used)?;
    Ok(())
}

#[exception]
fn SysTick() {
    if !TICKING.load(Ordering::SeqCst) {
        return;
    }
    let wanted = TICK_WANTED.fetch_add(1, Ordering::SeqCst) + 1;
    // Catch up on ticks deferred earlier, if the lock is free now.
    let _ = SHARED.try_with(|p| {
        while TICK_DONE.load(Ordering::SeqCst) < wanted {
            if !one_op(p) {
                break;
            }
            TICK_DONE.fetch_add(1, Ordering::SeqCst);
        }
    });
    if TICK_DONE.load(Ordering::SeqCst) < wanted {
        TICK_DEFERRED.fetch_add(1, Ordering::SeqCst);
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    // Only the line: formatting the message would pull in `core::fmt`.
    defmt::error!(
        "panic at line {=u32}",
        info.location().map_or(0, |l| l.line())
    );
    debug::exit(EXIT_FAILURE);
    loop {
        cortex_m::asm::wfi();
    }
}
