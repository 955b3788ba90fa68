//! Sequences and their block tables across pools: [`KvCache`], the object an
//! engine (or the manager) drives every scheduler step.
//!
//! # Workflow
//!
//! 1. [`KvCache::allocate`] a prompt: full blocks are hashed along the chain,
//!    the prefix index is walked until the first miss (each hit gains a
//!    holder), the rest comes from the free stack or by eviction, and newly
//!    filled blocks are registered under their keys.
//! 2. [`KvCache::append`] decode tokens: a new block when the last one fills;
//!    copy-on-write when the last block is shared and partly filled (the copy
//!    is returned for the backend to execute).
//! 3. [`KvCache::fork`] for parallel sampling; [`KvCache::share_prefix`] to
//!    give an empty sequence another's prefix.
//! 4. Under pressure, [`KvCache::swap_out`] / [`KvCache::swap_in`] /
//!    [`KvCache::move_to`] plan a two-phase move: targets reserved, copies
//!    listed by [`KvCache::plan`]; then [`KvCache::commit`] (sources released,
//!    keys published in the target pool) or [`KvCache::abort`] (nothing moved).
//! 5. [`KvCache::free`]: blocks lose a holder, tail first, so a finished
//!    request's last blocks are evicted before its first ones.
//!
//! Registration is immediate, as in vLLM v1: a block is published once its
//! tokens are known, because a caller runs the step that computes it before
//! any later step can read it. Moves publish their target blocks only at
//! commit, so a failed transfer can never be hit.
#![allow(
    clippy::cast_possible_truncation,
    reason = "block and token counts are checked against u32 limits (table rows, pool capacity, LengthOverflow) before narrowing"
)]

use core::num::NonZeroU32;

use crate::error::{Error, Result};
use crate::hash::{BlockHasher, ExtraKeys, MmItem};
use crate::ids::{BlockHash, BlockId, CacheSalt, PlanId, PoolId, SeqId, next_generation};
use crate::plan::BlockCopy;
use crate::pool::{BlockPool, Invariant, PoolKind, ensure};
use crate::storage::Slots;

/// Pools one cache can hold.
pub const MAX_POOLS: usize = 8;
const NIL: u32 = u32::MAX;
/// Table entry of a block dropped by a sliding window (never exported as a real id).
pub const HOLE: BlockId = BlockId(u32::MAX);

/// Shape of a [`KvCache`]'s fixed storage.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct CacheConfig {
    /// Tokens per block (all pools agree).
    pub tokens_per_block: u32,
    /// Sequences alive at once.
    pub max_seqs: u32,
    /// Blocks in one sequence's table (longest sequence / tokens per block).
    pub max_blocks_per_seq: u32,
    /// Two-phase moves pending at once.
    pub max_plans: u32,
}

impl CacheConfig {
    fn validate(&self) -> Result<()> {
        if self.tokens_per_block == 0 {
            return Err(Error::ZeroTokensPerBlock);
        }
        if self.max_seqs == 0 || self.max_blocks_per_seq == 0 {
            return Err(Error::ZeroCapacity);
        }
        if self.max_seqs == NIL || self.max_plans == NIL {
            return Err(Error::CapacityTooLarge {
                requested: u64::from(self.max_seqs.max(self.max_plans)),
                max: NIL - 1,
            });
        }
        Ok(())
    }
    fn table_len(&self) -> Result<usize> {
        (self.max_seqs as usize)
            .checked_mul(self.max_blocks_per_seq as usize)
            .ok_or(Error::LengthOverflow)
    }
    fn pending_len(&self) -> Result<usize> {
        (self.max_seqs as usize)
            .checked_mul(self.tokens_per_block as usize)
            .ok_or(Error::LengthOverflow)
    }
    fn plan_targets_len(&self) -> Result<usize> {
        (self.max_plans as usize)
            .checked_mul(self.max_blocks_per_seq as usize)
            .ok_or(Error::LengthOverflow)
    }
}

/// Per-sequence metadata (opaque; `EMPTY` for static storage).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct SeqSlot {
    generation: u32,
    live: bool,
    hashing: bool,
    moving: bool,
    pool: u16,
    tokens: u32,
    blocks: u32,
    first_live: u32,
    keyed_blocks: u32,
    window: u32,
    next_free: u32,
    plan: u32,
    salt: Option<CacheSalt>,
    adapter: Option<u64>,
    tip: BlockHash,
}

impl SeqSlot {
    /// An unused slot.
    pub const EMPTY: Self = Self {
        generation: 1,
        live: false,
        hashing: false,
        moving: false,
        pool: 0,
        tokens: 0,
        blocks: 0,
        first_live: 0,
        keyed_blocks: 0,
        window: 0,
        next_free: NIL,
        plan: NIL,
        salt: None,
        adapter: None,
        tip: BlockHash(0),
    };
}

/// A pending two-phase move (opaque; `EMPTY` for static storage).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct PlanSlot {
    generation: u32,
    live: bool,
    seq: u32,
    src: u16,
    dst: u16,
    len: u32,
    next_free: u32,
}

impl PlanSlot {
    /// An unused slot.
    pub const EMPTY: Self = Self {
        generation: 1,
        live: false,
        seq: 0,
        src: 0,
        dst: 0,
        len: 0,
        next_free: NIL,
    };
}

/// Storage of a [`KvCache`], borrowed or owned. Lengths from [`CacheConfig`]:
/// `seqs` = `max_seqs`, `tables` = `max_seqs × max_blocks_per_seq`, `pending`
/// = `max_seqs × tokens_per_block`, `plans` = `max_plans`, `plan_targets` =
/// `max_plans × max_blocks_per_seq`.
#[derive(Debug)]
pub struct CacheStorage<'a> {
    /// Sequence slots.
    pub seqs: Slots<'a, SeqSlot>,
    /// Block-table rows.
    pub tables: Slots<'a, BlockId>,
    /// Tokens of each sequence's partly filled last block.
    pub pending: Slots<'a, u32>,
    /// Plan slots.
    pub plans: Slots<'a, PlanSlot>,
    /// Target blocks of each plan.
    pub plan_targets: Slots<'a, BlockId>,
}

impl CacheStorage<'_> {
    /// Owned storage sized for `config`.
    #[cfg(feature = "alloc")]
    pub fn owned(config: &CacheConfig) -> Result<Self> {
        config.validate()?;
        Ok(Self {
            seqs: Slots::owned(config.max_seqs as usize, SeqSlot::EMPTY),
            tables: Slots::owned(config.table_len()?, HOLE),
            pending: Slots::owned(config.pending_len()?, 0),
            plans: Slots::owned(config.max_plans as usize, PlanSlot::EMPTY),
            plan_targets: Slots::owned(config.plan_targets_len()?, HOLE),
        })
    }
}

/// What a prompt brings for prefix matching.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum PromptTokens<'p> {
    /// Token ids: full blocks are hashed, looked up and registered; decode
    /// tokens appended later are hashed too.
    Ids(&'p [u32]),
    /// Precomputed keys of the first full blocks (for example a trace's
    /// block hashes) and the prompt length. Blocks past the keys, and decode
    /// blocks, are not registered.
    Keys {
        /// Keys of full blocks `0..keys.len()`.
        keys: &'p [BlockHash],
        /// Prompt length in tokens.
        len: u32,
    },
    /// A length only: no prefix caching for this sequence.
    Len(u32),
}

/// A prompt to allocate.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Prompt<'p> {
    /// Tokens, keys or length.
    pub tokens: PromptTokens<'p>,
    /// Tenant salt: sequences with different salts never share a block.
    pub salt: Option<CacheSalt>,
    /// Adapter id, part of every key.
    pub adapter: Option<u64>,
    /// Multimodal items of the prompt.
    pub mm: &'p [MmItem],
}

impl<'p> Prompt<'p> {
    /// A plain text prompt.
    pub fn ids(tokens: &'p [u32]) -> Self {
        Self {
            tokens: PromptTokens::Ids(tokens),
            salt: None,
            adapter: None,
            mm: &[],
        }
    }
    /// A prompt with precomputed block keys.
    pub fn keys(keys: &'p [BlockHash], len: u32) -> Self {
        Self {
            tokens: PromptTokens::Keys { keys, len },
            salt: None,
            adapter: None,
            mm: &[],
        }
    }
    /// A prompt known by length only.
    pub fn len(len: u32) -> Self {
        Self {
            tokens: PromptTokens::Len(len),
            salt: None,
            adapter: None,
            mm: &[],
        }
    }
    /// The same prompt under a tenant salt.
    pub fn with_salt(self, salt: CacheSalt) -> Self {
        Self {
            salt: Some(salt),
            ..self
        }
    }
    fn token_len(&self) -> Result<u32> {
        match self.tokens {
            PromptTokens::Ids(t) => u32::try_from(t.len()).map_err(|_| Error::LengthOverflow),
            PromptTokens::Keys { len, .. } | PromptTokens::Len(len) => Ok(len),
        }
    }
}

/// Result of [`KvCache::allocate`].
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Allocated {
    /// The new sequence.
    pub seq: SeqId,
    /// Leading full blocks found in the prefix cache (their KV is computed).
    pub hit_blocks: u32,
    /// Tokens covered by those blocks.
    pub hit_tokens: u32,
}

/// Result of [`KvCache::append`].
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Appended {
    /// Blocks added at the end of the table.
    pub new_blocks: u32,
    /// A copy-on-write the backend must execute (within the sequence's pool)
    /// before the new tokens are written.
    pub cow: Option<BlockCopy>,
    /// Blocks freed at the front by the sliding window.
    pub window_freed: u32,
}

/// Where a sequence is and what it holds.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct SeqInfo {
    /// The pool holding its blocks.
    pub pool: PoolId,
    /// Tokens.
    pub tokens: u32,
    /// Table length (including holes left by a sliding window).
    pub blocks: u32,
    /// First table entry that is not a hole.
    pub first_live: u32,
    /// Whether a move is pending.
    pub moving: bool,
    /// Tenant salt.
    pub salt: Option<CacheSalt>,
}

/// A pending move, as [`KvCache::plan`] shows it.
#[derive(Clone, Copy, Debug)]
pub struct PlanView<'c> {
    /// The sequence moved.
    pub seq: SeqId,
    /// Pool read.
    pub src_pool: PoolId,
    /// Pool written.
    pub dst_pool: PoolId,
    sources: &'c [BlockId],
    targets: &'c [BlockId],
}

impl<'c> PlanView<'c> {
    /// Blocks copied.
    pub fn len(&self) -> usize {
        self.copies().count()
    }
    /// Whether nothing is copied.
    pub fn is_empty(&self) -> bool {
        self.copies().next().is_none()
    }
    /// The copies, in table order (a relocation leaves some blocks in place:
    /// they are not listed).
    pub fn copies(&self) -> impl Iterator<Item = BlockCopy> + 'c {
        let same = self.src_pool == self.dst_pool;
        self.sources
            .iter()
            .zip(self.targets)
            .filter(move |(s, d)| !same || s != d)
            .map(|(&src, &dst)| BlockCopy { src, dst })
    }
    /// Writes the copies into `out`; returns how many.
    pub fn copies_into(&self, out: &mut [BlockCopy]) -> Result<usize> {
        if out.len() < self.len() {
            return Err(Error::OutputTooSmall {
                needed: self.len(),
                provided: out.len(),
            });
        }
        for (o, c) in out.iter_mut().zip(self.copies()) {
            *o = c;
        }
        Ok(self.len())
    }
}

/// Copies `len` elements from `src` to `dst` within one slice, where the two
/// ranges are rows of different sequences (never overlapping): a `memcpy`,
/// not the `memmove` of `copy_within` (smaller code on microcontrollers).
fn copy_disjoint<T: Copy>(v: &mut [T], src: usize, dst: usize, len: usize) {
    if src == dst || len == 0 {
        return;
    }
    if src < dst {
        let (a, b) = v.split_at_mut(dst);
        b[..len].copy_from_slice(&a[src..src + len]);
    } else {
        let (a, b) = v.split_at_mut(src);
        a[dst..dst + len].copy_from_slice(&b[..len]);
    }
}

/// Which pools a move may go between.
#[derive(Clone, Copy, PartialEq, Eq)]
enum MoveKind {
    SwapOut,
    SwapIn,
    Any,
    Relocate,
}

/// Sequences, block tables, tiers of pools and two-phase moves.
#[derive(Debug)]
pub struct KvCache<'a, H: BlockHasher> {
    config: CacheConfig,
    hasher: H,
    pools: heapless::Vec<BlockPool<'a>, MAX_POOLS>,
    seqs: Slots<'a, SeqSlot>,
    tables: Slots<'a, BlockId>,
    pending: Slots<'a, u32>,
    plans: Slots<'a, PlanSlot>,
    plan_targets: Slots<'a, BlockId>,
    seq_free: u32,
    plan_free: u32,
    live_seqs: u32,
    live_plans: u32,
}

impl<'a, H: BlockHasher> KvCache<'a, H> {
    /// A cache over `storage` (see [`CacheStorage`] for the lengths).
    pub fn new(config: CacheConfig, storage: CacheStorage<'a>, hasher: H) -> Result<Self> {
        config.validate()?;
        let CacheStorage {
            mut seqs,
            tables,
            pending,
            mut plans,
            plan_targets,
        } = storage;
        let checks = [
            (config.max_seqs as usize, seqs.len()),
            (config.table_len()?, tables.len()),
            (config.pending_len()?, pending.len()),
            (config.max_plans as usize, plans.len()),
            (config.plan_targets_len()?, plan_targets.len()),
        ];
        for (needed, provided) in checks {
            if provided < needed {
                return Err(Error::StorageTooSmall { needed, provided });
            }
        }
        let ns = config.max_seqs as usize;
        for (i, s) in seqs[..ns].iter_mut().enumerate() {
            *s = SeqSlot::EMPTY;
            s.next_free = if i + 1 == ns { NIL } else { i as u32 + 1 };
        }
        let np = config.max_plans as usize;
        for (i, p) in plans[..np].iter_mut().enumerate() {
            *p = PlanSlot::EMPTY;
            p.next_free = if i + 1 == np { NIL } else { i as u32 + 1 };
        }
        Ok(Self {
            config,
            hasher,
            pools: heapless::Vec::new(),
            seqs,
            tables,
            pending,
            plans,
            plan_targets,
            seq_free: 0,
            plan_free: if np == 0 { NIL } else { 0 },
            live_seqs: 0,
            live_plans: 0,
        })
    }

    /// A cache with owned storage.
    #[cfg(feature = "alloc")]
    pub fn with_config(config: CacheConfig, hasher: H) -> Result<Self> {
        let storage = CacheStorage::owned(&config)?;
        Self::new(config, storage, hasher)
    }

    /// The configuration.
    pub fn config(&self) -> &CacheConfig {
        &self.config
    }

    /// The block hasher.
    pub fn hasher(&self) -> &H {
        &self.hasher
    }

    /// Adds a pool; its id must be unused and its tokens per block the cache's.
    pub fn add_pool(&mut self, pool: BlockPool<'a>) -> Result<PoolId> {
        let id = pool.id();
        if pool.tokens_per_block() != self.config.tokens_per_block {
            return Err(Error::TokensPerBlockMismatch {
                expected: self.config.tokens_per_block,
                found: pool.tokens_per_block(),
            });
        }
        if self.pools.iter().any(|p| p.id() == id) {
            return Err(Error::UnknownPool(id));
        }
        self.pools.push(pool).map_err(|_| Error::TooManyPools)?;
        Ok(id)
    }

    fn pool_index(&self, id: PoolId) -> Result<usize> {
        self.pools
            .iter()
            .position(|p| p.id() == id)
            .ok_or(Error::UnknownPool(id))
    }

    /// A pool.
    pub fn pool(&self, id: PoolId) -> Result<&BlockPool<'a>> {
        Ok(&self.pools[self.pool_index(id)?])
    }

    /// A pool, mutably (for eviction, events, stats).
    pub fn pool_mut(&mut self, id: PoolId) -> Result<&mut BlockPool<'a>> {
        let i = self.pool_index(id)?;
        Ok(&mut self.pools[i])
    }

    /// Every pool.
    pub fn pools(&self) -> &[BlockPool<'a>] {
        &self.pools
    }

    /// Every pool, mutably.
    pub fn pools_mut(&mut self) -> &mut [BlockPool<'a>] {
        &mut self.pools
    }

    /// Live sequences.
    pub fn len(&self) -> u32 {
        self.live_seqs
    }

    /// Whether no sequence is live.
    pub fn is_empty(&self) -> bool {
        self.live_seqs == 0
    }

    /// Pending plans.
    pub fn pending_plans(&self) -> u32 {
        self.live_plans
    }

    // ---- sequence slots ---------------------------------------------------

    fn slot(&self, id: SeqId) -> Result<&SeqSlot> {
        match self.seqs.get(id.index as usize) {
            Some(s) if s.live && s.generation == id.generation.get() => Ok(s),
            _ => Err(Error::UnknownSequence(id)),
        }
    }

    fn seq_id(&self, index: u32) -> SeqId {
        let g = self.seqs[index as usize].generation;
        SeqId {
            index,
            generation: NonZeroU32::new(g).unwrap_or(NonZeroU32::MIN),
        }
    }

    fn row(&self, index: u32) -> &[BlockId] {
        let w = self.config.max_blocks_per_seq as usize;
        &self.tables[index as usize * w..][..w]
    }

    fn take_seq_slot(&mut self) -> Result<u32> {
        if self.seq_free == NIL {
            return Err(Error::TooManySequences {
                capacity: self.config.max_seqs,
            });
        }
        Ok(self.seq_free)
    }

    fn commit_seq_slot(&mut self, i: u32, slot: SeqSlot) -> SeqId {
        debug_assert_eq!(self.seq_free, i);
        let generation = self.seqs[i as usize].generation;
        self.seq_free = self.seqs[i as usize].next_free;
        self.seqs[i as usize] = SeqSlot {
            generation,
            live: true,
            next_free: NIL,
            ..slot
        };
        self.live_seqs += 1;
        self.seq_id(i)
    }

    fn release_seq_slot(&mut self, i: u32) {
        let s = &mut self.seqs[i as usize];
        let g = NonZeroU32::new(s.generation).unwrap_or(NonZeroU32::MIN);
        *s = SeqSlot {
            generation: next_generation(g).get(),
            next_free: self.seq_free,
            ..SeqSlot::EMPTY
        };
        self.seq_free = i;
        self.live_seqs -= 1;
    }

    fn blocks_for(&self, tokens: u64) -> u64 {
        tokens.div_ceil(u64::from(self.config.tokens_per_block))
    }

    fn check_table_fits(&self, blocks: u64, pool: &BlockPool<'_>) -> Result<()> {
        if blocks > u64::from(self.config.max_blocks_per_seq) {
            return Err(Error::SequenceTooLong {
                blocks,
                max_blocks: self.config.max_blocks_per_seq,
            });
        }
        if blocks > u64::from(pool.max_blocks()) {
            return Err(Error::LargerThanPool {
                needed: blocks,
                capacity: pool.max_blocks(),
            });
        }
        Ok(())
    }

    // ---- allocate -------------------------------------------------------------

    /// Allocates a sequence for `prompt` in device pool `pool`: leading full
    /// blocks found in the prefix cache are shared, the rest allocated (evicting
    /// cached blocks in LRU order if needed), and new full blocks registered.
    /// All or nothing. O(blocks) plus one hash per full block.
    pub fn allocate(&mut self, pool: PoolId, prompt: &Prompt<'_>) -> Result<Allocated> {
        let pi = self.pool_index(pool)?;
        let bs = self.config.tokens_per_block;
        let len = prompt.token_len()?;
        let nblocks = self.blocks_for(u64::from(len));
        self.check_table_fits(nblocks, &self.pools[pi])?;
        let nblocks = nblocks as u32;
        let full = len / bs;
        let (keys, ids): (&[BlockHash], &[u32]) = match prompt.tokens {
            PromptTokens::Ids(t) => (&[], t),
            PromptTokens::Keys { keys, .. } => {
                if keys.len() > full as usize {
                    return Err(Error::TooManyKeys {
                        keys: keys.len(),
                        full_blocks: full,
                    });
                }
                (keys, &[])
            }
            PromptTokens::Len(_) => (&[], &[]),
        };
        let si = self.take_seq_slot()?;
        let extra = ExtraKeys {
            adapter: prompt.adapter,
            mm: prompt.mm,
        };
        let by_ids = matches!(prompt.tokens, PromptTokens::Ids(_));
        // Blocks that can be matched: every full block (ids) or those with keys.
        let matchable = if by_ids { full } else { keys.len() as u32 };
        let root = if by_ids {
            self.hasher.root(prompt.salt)
        } else {
            BlockHash(0)
        };

        // Pass 1: walk the index until the first miss; hits go into the row
        // (no holder taken yet), so a refusal below changes nothing.
        let w = self.config.max_blocks_per_seq as usize;
        let row_start = si as usize * w;
        let mut tip = root;
        let mut hits = 0u32;
        let mut pinned = 0u32;
        let mut first_miss: Option<BlockHash> = None;
        {
            let pool_ref = &self.pools[pi];
            while hits < matchable {
                let key = if by_ids {
                    let s = (hits * bs) as usize;
                    self.hasher
                        .hash_block(tip, &ids[s..s + bs as usize], hits * bs, &extra)
                } else {
                    keys[hits as usize]
                };
                match pool_ref.lookup_cached(key) {
                    Some((b, cached)) => {
                        self.tables[row_start + hits as usize] = b;
                        pinned += u32::from(cached);
                        tip = key;
                        hits += 1;
                    }
                    None => {
                        first_miss = Some(key);
                        break;
                    }
                }
            }
        }
        let fresh = nblocks - hits;
        let p = &mut self.pools[pi];
        let available = p.available() - pinned;
        if fresh > available {
            p.stats_mut().allocation_failures += 1;
            return Err(Error::OutOfBlocks {
                needed: fresh,
                available,
            });
        }
        // Pass 2: take the hits, allocate the rest, register new full blocks.
        for k in 0..hits as usize {
            let b = self.tables[row_start + k];
            let got = p.acquire_block(b);
            debug_assert!(got);
        }
        p.allocate(&mut self.tables[row_start + hits as usize..row_start + nblocks as usize])?;
        let mut keyed = hits;
        if matchable > 0 {
            let mut next_key = first_miss;
            while keyed < matchable {
                let key = match next_key.take() {
                    Some(k) => k,
                    None if by_ids => {
                        let s = (keyed * bs) as usize;
                        self.hasher
                            .hash_block(tip, &ids[s..s + bs as usize], keyed * bs, &extra)
                    }
                    None => keys[keyed as usize],
                };
                let parent = (keyed > 0).then_some(tip);
                let b = self.tables[row_start + keyed as usize];
                p.register(b, key, parent)?;
                tip = key;
                keyed += 1;
            }
            let st = p.stats_mut();
            st.hit_blocks += u64::from(hits);
            st.miss_blocks += u64::from(matchable - hits);
            st.hit_tokens += u64::from(hits * bs);
            st.query_tokens += u64::from(matchable * bs);
        }
        // Tokens of the partly filled last block, for hashing it once it fills.
        let rem = (len % bs) as usize;
        if by_ids && rem > 0 {
            let w = bs as usize;
            let dst = &mut self.pending[si as usize * w..][..rem];
            dst.copy_from_slice(&ids[(full * bs) as usize..]);
        }
        // Decode blocks are hashed only if every token and extra key is known:
        // not for keys/length prompts, nor when a multimodal item reaches past
        // the last full block (its hash would be missing from later keys).
        let mm_past = prompt
            .mm
            .iter()
            .any(|m| u64::from(m.offset) + u64::from(m.len) > u64::from(full * bs));
        let slot = SeqSlot {
            hashing: by_ids && !mm_past,
            pool: pool.0,
            tokens: len,
            blocks: nblocks,
            keyed_blocks: keyed,
            salt: prompt.salt,
            adapter: prompt.adapter,
            tip,
            ..SeqSlot::EMPTY
        };
        let seq = self.commit_seq_slot(si, slot);
        Ok(Allocated {
            seq,
            hit_blocks: hits,
            hit_tokens: hits * bs,
        })
    }

    /// An empty sequence in `pool` (a target for [`share_prefix`](Self::share_prefix)).
    pub fn create(&mut self, pool: PoolId, salt: Option<CacheSalt>) -> Result<SeqId> {
        let prompt = Prompt {
            salt,
            ..Prompt::ids(&[])
        };
        Ok(self.allocate(pool, &prompt)?.seq)
    }

    // ---- append -------------------------------------------------------------

    fn active(&self, id: SeqId) -> Result<(&SeqSlot, usize)> {
        let s = self.slot(id)?;
        if s.moving {
            return Err(Error::SequenceBusy(id));
        }
        let pi = self.pool_index(PoolId(s.pool))?;
        if self.pools[pi].kind() != PoolKind::Device {
            return Err(Error::SequenceSwappedOut(id));
        }
        Ok((s, pi))
    }

    /// Appends decode tokens (ids known: full blocks get registered).
    pub fn append(&mut self, id: SeqId, tokens: &[u32]) -> Result<Appended> {
        let n = u32::try_from(tokens.len()).map_err(|_| Error::LengthOverflow)?;
        self.append_inner(id, n, Some(tokens))
    }

    /// Appends `n` tokens whose ids are unknown: this sequence's later blocks
    /// are not registered in the prefix cache.
    pub fn append_len(&mut self, id: SeqId, n: u32) -> Result<Appended> {
        self.append_inner(id, n, None)
    }

    fn append_inner(&mut self, id: SeqId, n: u32, tokens: Option<&[u32]>) -> Result<Appended> {
        let (s, pi) = self.active(id)?;
        let s = *s;
        let bs = self.config.tokens_per_block;
        let new_len = s.tokens.checked_add(n).ok_or(Error::LengthOverflow)?;
        let new_blocks = self.blocks_for(u64::from(new_len));
        self.check_table_fits(new_blocks, &self.pools[pi])?;
        let add = new_blocks as u32 - s.blocks;
        let w = self.config.max_blocks_per_seq as usize;
        let row_start = id.index as usize * w;
        let last =
            (s.blocks > s.first_live).then(|| self.tables[row_start + s.blocks as usize - 1]);
        let p = &mut self.pools[pi];
        // The partly filled last block is written in place only if this
        // sequence is its sole holder and it is not published under a key (a
        // shorter sequence may hold a prefix of a full, registered block,
        // after `share_prefix`): otherwise copy-on-write.
        let cow_src = match last {
            Some(b)
                if n > 0
                    && s.tokens % bs != 0
                    && (p.ref_count(b)? > 1 || p.key_of(b)?.is_some()) =>
            {
                Some(b)
            }
            _ => None,
        };
        let need = add + u32::from(cow_src.is_some());
        if need > p.available() {
            p.stats_mut().allocation_failures += 1;
            return Err(Error::OutOfBlocks {
                needed: need,
                available: p.available(),
            });
        }
        let cow = match cow_src {
            Some(src) => {
                let dst = p.allocate_one()?;
                p.release(src)?;
                self.tables[row_start + s.blocks as usize - 1] = dst;
                Some(BlockCopy { src, dst })
            }
            None => None,
        };
        for k in s.blocks..s.blocks + add {
            let b = p.allocate_one()?;
            self.tables[row_start + k as usize] = b;
        }
        let mut slot = s;
        slot.tokens = new_len;
        slot.blocks += add;
        // Hash and register blocks as they fill.
        match tokens {
            Some(t) if s.hashing => {
                let extra = ExtraKeys {
                    adapter: s.adapter,
                    mm: &[],
                };
                let wpend = bs as usize;
                let pstart = id.index as usize * wpend;
                let mut fill = (s.tokens % bs) as usize;
                let mut rest = t;
                while !rest.is_empty() {
                    let take = (wpend - fill).min(rest.len());
                    self.pending[pstart + fill..pstart + fill + take]
                        .copy_from_slice(&rest[..take]);
                    fill += take;
                    rest = &rest[take..];
                    if fill == wpend {
                        let kb = slot.keyed_blocks;
                        let key = self.hasher.hash_block(
                            slot.tip,
                            &self.pending[pstart..pstart + wpend],
                            kb * bs,
                            &extra,
                        );
                        let b = self.tables[row_start + kb as usize];
                        let parent = (kb > 0).then_some(slot.tip);
                        self.pools[pi].register(b, key, parent)?;
                        slot.tip = key;
                        slot.keyed_blocks += 1;
                        fill = 0;
                    }
                }
            }
            _ => slot.hashing = false,
        }
        let window_freed = self.apply_window(&mut slot, pi, row_start, s.tokens)?;
        self.seqs[id.index as usize] = slot;
        Ok(Appended {
            new_blocks: add,
            cow,
            window_freed,
        })
    }

    // ---- sliding window ----------------------------------------------------------

    /// Keeps only the blocks that overlap the last `tokens` tokens (0: no
    /// window). Blocks that leave the window are released at once and on
    /// every later append. Returns the blocks released now.
    pub fn set_window(&mut self, id: SeqId, tokens: u32) -> Result<u32> {
        let (s, pi) = self.active(id)?;
        let mut slot = *s;
        slot.window = tokens;
        let w = self.config.max_blocks_per_seq as usize;
        let written = slot.tokens;
        let freed = self.apply_window(&mut slot, pi, id.index as usize * w, written)?;
        self.seqs[id.index as usize] = slot;
        Ok(freed)
    }

    /// Releases the blocks wholly before the window. Only blocks whose KV is
    /// already written (wholly before `written` tokens) go: a block that
    /// receives tokens of the current step stays until the next one, or it
    /// would be published (and reusable) before its KV exists.
    fn apply_window(
        &mut self,
        slot: &mut SeqSlot,
        pi: usize,
        row_start: usize,
        written: u32,
    ) -> Result<u32> {
        if slot.window == 0 || slot.tokens <= slot.window {
            return Ok(0);
        }
        let start = (slot.tokens - slot.window).min(written);
        let keep_from = (start / self.config.tokens_per_block).min(slot.blocks);
        let mut freed = 0;
        while slot.first_live < keep_from {
            let e = &mut self.tables[row_start + slot.first_live as usize];
            let b = core::mem::replace(e, HOLE);
            self.pools[pi].release(b)?;
            slot.first_live += 1;
            freed += 1;
        }
        Ok(freed)
    }

    // ---- fork, share, free -------------------------------------------------------

    /// A child sharing every block of `parent` (parallel sampling, beam
    /// search). The first append to a shared, partly filled last block copies
    /// it (copy-on-write). O(blocks).
    pub fn fork(&mut self, parent: SeqId) -> Result<SeqId> {
        let (s, pi) = self.active(parent)?;
        let s = *s;
        let ci = self.take_seq_slot()?;
        let w = self.config.max_blocks_per_seq as usize;
        let (ps, cs) = (parent.index as usize * w, ci as usize * w);
        for k in s.first_live as usize..s.blocks as usize {
            let b = self.tables[ps + k];
            if let Err(e) = self.pools[pi].add_ref(b) {
                for u in s.first_live as usize..k {
                    self.pools[pi].release(self.tables[ps + u])?;
                }
                return Err(e);
            }
        }
        copy_disjoint(&mut self.tables, ps, cs, s.blocks as usize);
        let tw = self.config.tokens_per_block as usize;
        copy_disjoint(
            &mut self.pending,
            parent.index as usize * tw,
            ci as usize * tw,
            tw,
        );
        Ok(self.commit_seq_slot(ci, s))
    }

    /// Gives the empty sequence `target` the first `tokens` tokens of
    /// `source` (shared by reference, copy-on-write on the partial last
    /// block), as the seed's `share_prefix`. Both must be in the same pool,
    /// with the same salt and adapter.
    pub fn share_prefix(&mut self, source: SeqId, target: SeqId, tokens: u32) -> Result<()> {
        if source == target {
            self.slot(source)?;
            return Err(Error::SameSequence(source));
        }
        let (s, pi) = self.active(source)?;
        let s = *s;
        let (t, _) = self.active(target)?;
        let t = *t;
        if s.salt != t.salt || s.adapter != t.adapter {
            return Err(Error::SaltMismatch { source, target });
        }
        if t.pool != s.pool {
            return Err(Error::SamePool(PoolId(t.pool)));
        }
        if t.tokens != 0 || t.blocks != 0 {
            return Err(Error::TargetNotEmpty(target));
        }
        let bs = self.config.tokens_per_block;
        let resident = s.tokens - s.first_live * bs;
        if tokens > s.tokens || (s.first_live > 0 && tokens > 0) {
            return Err(Error::TooManyTokens {
                requested: u64::from(tokens),
                available: if s.first_live > 0 { 0 } else { resident },
            });
        }
        let k = tokens.div_ceil(bs);
        let w = self.config.max_blocks_per_seq as usize;
        let (ss, ts) = (source.index as usize * w, target.index as usize * w);
        for i in 0..k as usize {
            let b = self.tables[ss + i];
            if let Err(e) = self.pools[pi].add_ref(b) {
                for u in 0..i {
                    self.pools[pi].release(self.tables[ss + u])?;
                }
                return Err(e);
            }
        }
        copy_disjoint(&mut self.tables, ss, ts, k as usize);
        // Chain state: the target's keyed prefix is the source's, cut at `tokens`.
        let keyed = s.keyed_blocks.min(tokens / bs);
        let rem = (tokens % bs) as usize;
        let mut hashing = s.hashing;
        let tip = if keyed == 0 {
            self.hasher.root(s.salt)
        } else if keyed == s.keyed_blocks {
            s.tip
        } else {
            match self.pools[pi].key_of(self.tables[ss + keyed as usize - 1])? {
                Some(key) => key,
                None => {
                    hashing = false;
                    BlockHash(0)
                }
            }
        };
        if rem > 0 {
            // The partial block's tokens are known only if it is the source's partial block.
            if hashing && k == s.blocks && s.tokens % bs != 0 {
                let tw = bs as usize;
                copy_disjoint(
                    &mut self.pending,
                    source.index as usize * tw,
                    target.index as usize * tw,
                    rem,
                );
            } else {
                hashing = false;
            }
        }
        let slot = &mut self.seqs[target.index as usize];
        slot.tokens = tokens;
        slot.blocks = k;
        slot.keyed_blocks = keyed;
        slot.tip = tip;
        slot.hashing = hashing && (keyed == tokens / bs);
        Ok(())
    }

    /// Frees a sequence: its blocks lose a holder, tail first (a finished
    /// request's last blocks are evicted first). The id becomes stale.
    pub fn free(&mut self, id: SeqId) -> Result<()> {
        let s = *self.slot(id)?;
        if s.moving {
            return Err(Error::SequenceBusy(id));
        }
        let pi = self.pool_index(PoolId(s.pool))?;
        let w = self.config.max_blocks_per_seq as usize;
        let rs = id.index as usize * w;
        for k in (s.first_live as usize..s.blocks as usize).rev() {
            let b = self.tables[rs + k];
            self.pools[pi].release(b)?;
        }
        self.release_seq_slot(id.index);
        Ok(())
    }

    // ---- views ------------------------------------------------------------------

    /// Where a sequence is and what it holds.
    pub fn info(&self, id: SeqId) -> Result<SeqInfo> {
        let s = self.slot(id)?;
        Ok(SeqInfo {
            pool: PoolId(s.pool),
            tokens: s.tokens,
            blocks: s.blocks,
            first_live: s.first_live,
            moving: s.moving,
            salt: s.salt,
        })
    }

    /// The block table of a sequence (entries before `first_live` are [`HOLE`]).
    pub fn table(&self, id: SeqId) -> Result<&[BlockId]> {
        let s = self.slot(id)?;
        Ok(&self.row(id.index)[..s.blocks as usize])
    }

    /// Ids of the live sequences.
    pub fn seq_ids(&self) -> impl Iterator<Item = SeqId> + '_ {
        (0..self.config.max_seqs)
            .filter(|&i| self.seqs[i as usize].live)
            .map(|i| self.seq_id(i))
    }

    // ---- two-phase moves --------------------------------------------------------

    /// Plans moving a sequence from its device pool to host pool `to`.
    pub fn swap_out(&mut self, id: SeqId, to: PoolId) -> Result<PlanId> {
        self.plan_move(id, to, MoveKind::SwapOut)
    }

    /// Plans moving a swapped-out sequence back to device pool `to`.
    pub fn swap_in(&mut self, id: SeqId, to: PoolId) -> Result<PlanId> {
        self.plan_move(id, to, MoveKind::SwapIn)
    }

    /// Plans moving a sequence to any other pool (for example another device).
    pub fn move_to(&mut self, id: SeqId, to: PoolId) -> Result<PlanId> {
        self.plan_move(id, to, MoveKind::Any)
    }

    /// Plans moving the sequence's blocks that lie at or past its pool's
    /// [`capacity`](BlockPool::capacity) (after [`BlockPool::shrink`]) to
    /// blocks below it, in the same pool: the step of a defragmentation.
    /// Blocks already below stay (the plan copies only the others).
    pub fn relocate(&mut self, id: SeqId) -> Result<PlanId> {
        let pool = PoolId(self.slot(id)?.pool);
        self.plan_move(id, pool, MoveKind::Relocate)
    }

    /// Live sequences holding blocks at or past their pool's capacity.
    pub fn draining_seqs(&self, pool: PoolId) -> impl Iterator<Item = SeqId> + '_ {
        let online = self.pool(pool).map(|p| p.capacity()).unwrap_or(u32::MAX);
        self.seq_ids().filter(move |&s| {
            let info = self.info(s).ok();
            info.is_some_and(|i| i.pool == pool)
                && self
                    .table(s)
                    .is_ok_and(|t| t.iter().any(|&b| b != HOLE && b.0 >= online))
        })
    }

    fn plan_move(&mut self, id: SeqId, to: PoolId, kind: MoveKind) -> Result<PlanId> {
        let s = *self.slot(id)?;
        if s.moving {
            return Err(Error::SequenceBusy(id));
        }
        let src = self.pool_index(PoolId(s.pool))?;
        let dst = self.pool_index(to)?;
        let (sk, dk) = (self.pools[src].kind(), self.pools[dst].kind());
        match kind {
            MoveKind::SwapOut if sk != PoolKind::Device => return Err(Error::NotOnDevice(id)),
            MoveKind::SwapOut if dk != PoolKind::Host => return Err(Error::WrongPoolKind(to)),
            MoveKind::SwapIn if sk != PoolKind::Host => return Err(Error::NotSwappedOut(id)),
            MoveKind::SwapIn if dk != PoolKind::Device => return Err(Error::WrongPoolKind(to)),
            _ => {}
        }
        if src == dst && kind != MoveKind::Relocate {
            return Err(Error::SamePool(to));
        }
        let n = s.blocks - s.first_live;
        let w = self.config.max_blocks_per_seq as usize;
        let live = id.index as usize * w + s.first_live as usize;
        // Blocks that move: all of them, or for a relocation those out of service.
        let online = self.pools[src].capacity();
        let moving = |b: BlockId| kind != MoveKind::Relocate || b.0 >= online;
        let m = self.tables[live..live + n as usize]
            .iter()
            .filter(|&&b| moving(b))
            .count() as u32;
        if m > self.pools[dst].max_blocks() {
            return Err(Error::LargerThanPool {
                needed: u64::from(m),
                capacity: self.pools[dst].max_blocks(),
            });
        }
        if self.plan_free == NIL {
            return Err(Error::TooManyPlans {
                capacity: self.config.max_plans,
            });
        }
        let pi = self.plan_free;
        let ts = pi as usize * w;
        self.pools[dst].allocate(&mut self.plan_targets[ts..ts + m as usize])?;
        if m < n {
            // Spread the fresh blocks to the positions that move (from the
            // back, so no fresh block is overwritten before it is placed);
            // the others keep their own block (no copy).
            let mut j = m as usize;
            for k in (0..n as usize).rev() {
                let b = self.tables[live + k];
                if moving(b) {
                    j -= 1;
                    self.plan_targets[ts + k] = self.plan_targets[ts + j];
                } else {
                    self.plan_targets[ts + k] = b;
                }
            }
        }
        let p = &mut self.plans[pi as usize];
        self.plan_free = p.next_free;
        *p = PlanSlot {
            generation: p.generation,
            live: true,
            seq: id.index,
            src: s.pool,
            dst: to.0,
            len: n,
            next_free: NIL,
        };
        self.live_plans += 1;
        let seq = &mut self.seqs[id.index as usize];
        seq.moving = true;
        seq.plan = pi;
        Ok(PlanId {
            index: pi,
            generation: NonZeroU32::new(p.generation).unwrap_or(NonZeroU32::MIN),
        })
    }

    fn plan_slot(&self, id: PlanId) -> Result<PlanSlot> {
        match self.plans.get(id.index as usize) {
            Some(p) if p.live && p.generation == id.generation.get() => Ok(*p),
            _ => Err(Error::UnknownPlan(id)),
        }
    }

    /// A pending plan: pools and copies for the backend.
    pub fn plan(&self, id: PlanId) -> Result<PlanView<'_>> {
        let p = self.plan_slot(id)?;
        let s = &self.seqs[p.seq as usize];
        let w = self.config.max_blocks_per_seq as usize;
        Ok(PlanView {
            seq: self.seq_id(p.seq),
            src_pool: PoolId(p.src),
            dst_pool: PoolId(p.dst),
            sources: &self.row(p.seq)[s.first_live as usize..s.blocks as usize],
            targets: &self.plan_targets[id.index as usize * w..][..p.len as usize],
        })
    }

    fn finish_plan(&mut self, id: PlanId, p: &PlanSlot) {
        let slot = &mut self.plans[id.index as usize];
        let g = NonZeroU32::new(slot.generation).unwrap_or(NonZeroU32::MIN);
        *slot = PlanSlot {
            generation: next_generation(g).get(),
            next_free: self.plan_free,
            ..PlanSlot::EMPTY
        };
        self.plan_free = id.index;
        self.live_plans -= 1;
        let s = &mut self.seqs[p.seq as usize];
        s.moving = false;
        s.plan = NIL;
    }

    /// The copies are done: the sequence now lives in the target pool, its
    /// source blocks lose a holder (tail first) and its keyed blocks are
    /// published in the target pool under the same keys.
    pub fn commit(&mut self, id: PlanId) -> Result<()> {
        let p = self.plan_slot(id)?;
        let src = self.pool_index(PoolId(p.src))?;
        let dst = self.pool_index(PoolId(p.dst))?;
        let s = self.seqs[p.seq as usize];
        let w = self.config.max_blocks_per_seq as usize;
        let rs = p.seq as usize * w + s.first_live as usize;
        let ts = id.index as usize * w;
        if src == dst {
            // Relocation within a pool: release first, so the key leaves the
            // index (the old block is out of service) and can follow the block.
            for k in (0..p.len as usize).rev() {
                let (from, to) = (self.tables[rs + k], self.plan_targets[ts + k]);
                if from == to {
                    continue;
                }
                let key = self.pools[src].key_of(from)?;
                self.pools[src].release(from)?;
                if let Some(key) = key {
                    self.pools[dst].register(to, key, None)?;
                }
                self.tables[rs + k] = to;
            }
        } else {
            let mut parent = None;
            for k in 0..p.len as usize {
                let (from, to) = (self.tables[rs + k], self.plan_targets[ts + k]);
                let key = self.pools[src].key_of(from)?;
                if let Some(key) = key {
                    self.pools[dst].register(to, key, parent)?;
                }
                parent = key;
            }
            for k in (0..p.len as usize).rev() {
                let from = self.tables[rs + k];
                self.pools[src].release(from)?;
                self.tables[rs + k] = self.plan_targets[ts + k];
            }
        }
        self.seqs[p.seq as usize].pool = p.dst;
        self.finish_plan(id, &p);
        Ok(())
    }

    /// Cancels a plan: the reserved targets return to the free stack and the
    /// sequence is untouched.
    pub fn abort(&mut self, id: PlanId) -> Result<()> {
        let p = self.plan_slot(id)?;
        let dst = self.pool_index(PoolId(p.dst))?;
        let w = self.config.max_blocks_per_seq as usize;
        let ts = id.index as usize * w;
        let s = self.seqs[p.seq as usize];
        let rs = p.seq as usize * w + s.first_live as usize;
        for k in 0..p.len as usize {
            let to = self.plan_targets[ts + k];
            if p.src != p.dst || to != self.tables[rs + k] {
                self.pools[dst].release(to)?;
            }
        }
        self.finish_plan(id, &p);
        Ok(())
    }

    // ---- invariants -------------------------------------------------------------

    /// Checks every pool, every sequence and plan, and that each block's
    /// reference count equals the number of table entries and plan targets
    /// naming it. O(capacity + table entries) with `alloc`, quadratic in
    /// table entries without it (meant for tests and small firmware pools).
    pub fn check_invariants(&self) -> Result<(), Invariant> {
        self.check_invariants_with(&[])
    }

    /// [`check_invariants`](Self::check_invariants) where the caller holds
    /// references of its own (`extra`: one entry per reference), for example
    /// blocks pinned while a tier transfer is in flight.
    pub fn check_invariants_with(&self, extra: &[(PoolId, BlockId)]) -> Result<(), Invariant> {
        for p in &self.pools {
            p.check_invariants()?;
        }
        let mut live = 0;
        let mut free = 0;
        let mut i = self.seq_free;
        while i != NIL {
            ensure((i as usize) < self.seqs.len(), "seq free link", Some(i))?;
            ensure(
                !self.seqs[i as usize].live,
                "live seq on free list",
                Some(i),
            )?;
            free += 1;
            ensure(free <= self.config.max_seqs, "seq free list cycle", None)?;
            i = self.seqs[i as usize].next_free;
        }
        for (idx, s) in self.seqs[..self.config.max_seqs as usize]
            .iter()
            .enumerate()
        {
            let idx = idx as u32;
            if !s.live {
                continue;
            }
            live += 1;
            let bs = self.config.tokens_per_block;
            ensure(
                s.blocks == s.tokens.div_ceil(bs),
                "table length vs tokens",
                Some(idx),
            )?;
            ensure(s.first_live <= s.blocks, "first_live past end", Some(idx))?;
            ensure(
                s.keyed_blocks <= s.tokens / bs,
                "keyed past full blocks",
                Some(idx),
            )?;
            let pi = self.pool_index(PoolId(s.pool)).map_err(|_| Invariant {
                what: "seq in unknown pool",
                at: Some(idx),
            })?;
            let row = &self.row(idx)[..s.blocks as usize];
            for (k, &b) in row.iter().enumerate() {
                if (k as u32) < s.first_live {
                    ensure(b == HOLE, "hole expected", Some(idx))?;
                } else {
                    let rc = self.pools[pi].ref_count(b).unwrap_or(0);
                    ensure(rc > 0, "table names an unheld block", Some(idx))?;
                }
            }
            ensure(
                s.moving == (s.plan != NIL),
                "moving flag vs plan",
                Some(idx),
            )?;
        }
        ensure(live == self.live_seqs, "live sequence count", None)?;
        ensure(
            live + free == self.config.max_seqs,
            "seq slots leaked",
            None,
        )?;
        let mut plans = 0;
        for (idx, p) in self.plans[..self.config.max_plans as usize]
            .iter()
            .enumerate()
        {
            if p.live {
                plans += 1;
                let s = &self.seqs[p.seq as usize];
                ensure(
                    s.live && s.plan == idx as u32,
                    "plan without its sequence",
                    Some(idx as u32),
                )?;
                ensure(
                    p.len == s.blocks - s.first_live,
                    "plan length",
                    Some(idx as u32),
                )?;
            }
        }
        ensure(plans == self.live_plans, "live plan count", None)?;
        self.check_ref_counts(extra)
    }

    fn holders<'e>(
        &'e self,
        extra: &'e [(PoolId, BlockId)],
    ) -> impl Iterator<Item = (usize, BlockId)> + 'e {
        let w = self.config.max_blocks_per_seq as usize;
        let tables = (0..self.config.max_seqs).flat_map(move |i| {
            let s = &self.seqs[i as usize];
            let pi = if s.live {
                self.pool_index(PoolId(s.pool)).ok()
            } else {
                None
            };
            let row = &self.tables[i as usize * w..][s.first_live as usize..s.blocks as usize];
            row.iter().filter_map(move |&b| pi.map(|pi| (pi, b)))
        });
        let plans = (0..self.config.max_plans).flat_map(move |i| {
            let p = &self.plans[i as usize];
            let pi = if p.live {
                self.pool_index(PoolId(p.dst)).ok()
            } else {
                None
            };
            let s = &self.seqs[p.seq as usize];
            let src = &self.tables[p.seq as usize * w + s.first_live as usize..][..p.len as usize];
            let t = &self.plan_targets[i as usize * w..][..p.len as usize];
            let same_pool = p.src == p.dst;
            // A relocation leaves some blocks in place: those are held once.
            t.iter()
                .zip(src)
                .filter(move |(t, s)| !same_pool || t != s)
                .filter_map(move |(&b, _)| pi.map(|pi| (pi, b)))
        });
        let extra = extra
            .iter()
            .filter_map(move |&(p, b)| self.pool_index(p).ok().map(|pi| (pi, b)));
        tables.chain(plans).chain(extra)
    }

    #[cfg(feature = "alloc")]
    fn check_ref_counts(&self, extra: &[(PoolId, BlockId)]) -> Result<(), Invariant> {
        let mut counts: alloc::vec::Vec<alloc::vec::Vec<u32>> = self
            .pools
            .iter()
            .map(|p| alloc::vec![0; p.max_blocks() as usize])
            .collect();
        for (pi, b) in self.holders(extra) {
            let c = counts[pi].get_mut(b.index()).ok_or(Invariant {
                what: "table entry out of range",
                at: Some(b.0),
            })?;
            *c += 1;
        }
        for (pi, p) in self.pools.iter().enumerate() {
            for (b, &c) in counts[pi].iter().enumerate() {
                let rc = p.ref_count(BlockId(b as u32)).unwrap_or(u32::MAX);
                ensure(rc == c, "ref count differs from holders", Some(b as u32))?;
            }
        }
        Ok(())
    }

    #[cfg(not(feature = "alloc"))]
    fn check_ref_counts(&self, extra: &[(PoolId, BlockId)]) -> Result<(), Invariant> {
        for (pi, p) in self.pools.iter().enumerate() {
            for b in 0..p.max_blocks() {
                let c = self
                    .holders(extra)
                    .filter(|&(q, h)| q == pi && h.0 == b)
                    .count() as u32;
                let rc = p.ref_count(BlockId(b)).unwrap_or(u32::MAX);
                ensure(rc == c, "ref count differs from holders", Some(b))?;
            }
        }
        Ok(())
    }
}
