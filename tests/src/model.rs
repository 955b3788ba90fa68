//! The model of the core's model-based tests (proptest in
//! `tests/model.rs`, and the `core_ops` fuzz target): random operation sequences on a
//! `KvCache` with two device pools and a host tier, against a plain model
//! that tracks each sequence's tokens and simulates the KV bytes of every
//! block (a block's "content" is the tenant and the token prefix it encodes).
//!
//! After every step:
//! - `check_invariants` (free + cached + used = capacity, ref counts equal
//!   holders, the eviction order holds exactly the evictable blocks, every
//!   indexed key names a block carrying it);
//! - every live sequence's blocks hold exactly its expected content, so a
//!   prefix hit that returned a block with another key, a missing
//!   copy-on-write, or a move that lost KV would all be caught;
//! - no block is shared by two tenants;
//! - a refused operation changed nothing.
//!
//! The number of cases is `PAGEDKV_MODEL_CASES` (default 3,500 cases of
//! 1–600 operations, 300 on average: over 1,000,000 operations per run).
#![allow(clippy::cast_possible_truncation, reason = "small test values")]

use std::collections::{HashMap, HashSet};

use pagedkv_core::{
    BlockHash, BlockId, CacheConfig, CacheSalt, Error, Fidelity, KvCache, KvEvent, PlanId, PoolId,
    Prompt, SeqId, SipBlockHasher,
};

use crate::{cache_with, fingerprint};

/// Tokens per block of the model's cache.
pub const BS: u32 = 4;
const DEV: [PoolId; 2] = [PoolId(0), PoolId(1)];
const HOST: PoolId = PoolId(2);

fn dev_pool(d: u8) -> PoolId {
    DEV[d as usize % 2]
}

/// One operation on the cache. Fields are free-form (any value is valid:
/// they are taken modulo their range), so a fuzzer can generate them.
#[derive(Clone, Debug)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[allow(missing_docs, reason = "the fields are the operation's arguments")]
pub enum Op {
    Allocate {
        dev: u8,
        salt: u8,
        base: u8,
        prefix: u8,
        suffix: u8,
        seed: u32,
    },
    AllocateLen {
        dev: u8,
        len: u8,
    },
    Append {
        pick: u8,
        n: u8,
        known: bool,
        seed: u32,
    },
    Fork {
        pick: u8,
    },
    Free {
        pick: u8,
    },
    FreeStale {
        pick: u8,
    },
    Share {
        src: u8,
        same_salt: bool,
        frac: u8,
    },
    SwapOut {
        pick: u8,
    },
    SwapIn {
        pick: u8,
        dev: u8,
    },
    Move {
        pick: u8,
        dev: u8,
    },
    Commit {
        pick: u8,
    },
    Abort {
        pick: u8,
        garbage: bool,
    },
    Evict {
        pool: u8,
    },
    Lookup {
        pick: u8,
    },
    Window {
        pick: u8,
        w: u8,
    },
    Shrink {
        dev: u8,
        frac: u8,
    },
    Grow {
        dev: u8,
    },
    Policy {
        pool: u8,
        protect: u8,
        tail_first: bool,
    },
    Relocate {
        pick: u8,
    },
    /// A prompt given by precomputed keys (a chain over its tokens), maybe
    /// under a salt, maybe with a key repeated.
    AllocateKeys {
        dev: u8,
        salt: u8,
        base: u8,
        prefix: u8,
        dup: Option<(u8, u8)>,
    },
    /// Allocation in the host pool: refused.
    AllocateHost,
    /// Chunked prefill: the prompt matched whole, placed up to a chunk.
    AllocateChunk {
        dev: u8,
        base: u8,
        prefix: u8,
        chunk: u8,
    },
    /// Lookahead slots reserved (or released) past a sequence's end.
    Reserve {
        pick: u8,
        n: u8,
    },
    /// Copy-on-write ahead of an append, as a plan.
    Cow {
        pick: u8,
    },
    /// A lossy move (compression): the KV changes, keys do not follow.
    SwapOutLossy {
        pick: u8,
    },
    SwapInLossy {
        pick: u8,
        dev: u8,
    },
    /// Cached blocks of a device to the host tier.
    Offload {
        dev: u8,
        n: u8,
    },
    /// A sequence's prompt blocks back from the host tier to a device.
    Promote {
        pick: u8,
        dev: u8,
    },
}

/// What a block's bytes encode: the tenant and the whole token prefix, and
/// whether they went through a lossy transform (or were computed over KV
/// that did).
#[derive(Clone, PartialEq, Eq, Debug)]
struct Content {
    salt: Option<CacheSalt>,
    prefix: Vec<u32>,
    lossy: bool,
}

impl Content {
    /// Whether a block holding `self` serves a sequence expecting `want`: same
    /// tenant, same exactness, and the same tokens up to the sequence's
    /// length (slots past it, in a partly filled block shared with a longer
    /// sequence, are not read).
    fn serves(&self, want: &Content) -> bool {
        self.salt == want.salt
            && self.lossy == want.lossy
            && self.prefix.get(..want.prefix.len()) == Some(&want.prefix[..])
    }
}

#[derive(Clone, Debug)]
struct MSeq {
    salt: Option<CacheSalt>,
    tokens: Vec<u32>,
    lossy: bool,
}

/// Raw precomputed keys of a token sequence's full blocks: each the hash of
/// the whole prefix (equal key, equal content and history), unsalted.
fn raw_keys(tokens: &[u32]) -> Vec<BlockHash> {
    use std::hash::{Hash, Hasher};
    (1..=tokens.len() / BS as usize)
        .map(|i| {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            tokens[..i * BS as usize].hash(&mut h);
            BlockHash(u128::from(h.finish()) << 64 | 0xabcd)
        })
        .collect()
}

/// The cache under test and what every block of it should hold.
pub struct Model {
    cache: KvCache<'static, SipBlockHasher>,
    seqs: HashMap<SeqId, MSeq>,
    order: Vec<SeqId>,
    dead: Vec<SeqId>,
    plans: Vec<PlanId>,
    dead_plans: Vec<PlanId>,
    lossy_plans: Vec<PlanId>,
    mem: HashMap<(PoolId, BlockId), Content>,
    bases: [Vec<u32>; 3],
    /// Chain parent of every key a pool published (from its events).
    parents: HashMap<(PoolId, BlockHash), Option<BlockHash>>,
    /// Keys the eviction order chose as victims.
    policy_evictions: u64,
    /// Keys published after a block their sequence computed a second time
    /// (the first copy stayed the published one, held by another
    /// sequence): no order can keep them behind that parent.
    after_duplicate: std::collections::HashSet<(PoolId, BlockHash)>,
    /// Since an operation that releases a chain out of order (a sliding
    /// window, a move, a swap, an offload, a shrink), descendants may
    /// rightly outlive their parents: the eviction check stops for the case.
    reordered: bool,
}

impl Op {
    /// Whether the operation may release a chain out of order (a sliding
    /// window, a move, a swap, an offload, a shrink): descendants may then
    /// rightly outlive their parents.
    pub fn reorders_chains(&self) -> bool {
        matches!(
            self,
            Op::Window { .. }
                | Op::Shrink { .. }
                | Op::Relocate { .. }
                | Op::SwapOut { .. }
                | Op::SwapIn { .. }
                | Op::Move { .. }
                | Op::Commit { .. }
                | Op::Abort { .. }
                | Op::SwapOutLossy { .. }
                | Op::SwapInLossy { .. }
                | Op::Offload { .. }
                | Op::Promote { .. }
        )
    }
}

fn rng(seed: u32) -> impl FnMut() -> u32 {
    let mut x = u64::from(seed) | 1;
    move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x % 50) as u32
    }
}

fn salt_of(s: u8) -> Option<CacheSalt> {
    match s % 3 {
        0 => None,
        k => Some(CacheSalt(u128::from(k))),
    }
}

impl Model {
    /// A cache of two device pools and a host tier, empty.
    #[allow(
        clippy::new_without_default,
        reason = "a model is built, not defaulted"
    )]
    pub fn new() -> Self {
        let config = CacheConfig {
            tokens_per_block: BS,
            max_seqs: 10,
            max_blocks_per_seq: 16,
            max_plans: 3,
        };
        let cache = cache_with(config, &[24, 40], 32);
        let bases = [
            (0..64).map(|i| i * 7 % 50).collect(),
            (0..64).map(|i| (i * 11 + 3) % 50).collect(),
            (0..64).map(|i| i % 5).collect(),
        ];
        Self {
            cache,
            seqs: HashMap::new(),
            order: Vec::new(),
            dead: Vec::new(),
            plans: Vec::new(),
            dead_plans: Vec::new(),
            lossy_plans: Vec::new(),
            mem: HashMap::new(),
            bases,
            parents: HashMap::new(),
            policy_evictions: 0,
            after_duplicate: std::collections::HashSet::new(),
            reordered: false,
        }
    }

    /// The first `prefix` tokens of base prompt `base` (any values: taken
    /// modulo the ranges the property test draws from).
    fn base(&self, base: u8, prefix: u8) -> Vec<u32> {
        let b = &self.bases[base as usize % 3];
        b[..(prefix as usize % 48).min(b.len())].to_vec()
    }

    fn pick(&self, k: u8) -> Option<SeqId> {
        (!self.order.is_empty()).then(|| self.order[k as usize % self.order.len()])
    }

    fn expected(&self, s: &MSeq, block: usize) -> Content {
        let end = ((block + 1) * BS as usize).min(s.tokens.len());
        Content {
            salt: s.salt,
            prefix: s.tokens[..end].to_vec(),
            lossy: s.lossy,
        }
    }

    /// The "kernel" writes the KV of blocks `from..` of `seq`.
    fn write_blocks(&mut self, seq: SeqId, from: usize) {
        let s = self.seqs[&seq].clone();
        let info = self.cache.info(seq).unwrap();
        let table = self.cache.table(seq).unwrap().to_vec();
        for (i, &b) in table
            .iter()
            .enumerate()
            .skip(from.max(info.first_live as usize))
        {
            let c = self.expected(&s, i);
            self.mem.insert((info.pool, b), c);
        }
    }

    /// A new sequence's `hits` leading blocks must already hold its KV;
    /// the "kernel" computes the rest.
    fn check_hits_then_write(&mut self, seq: SeqId, pool: PoolId, hits: u32) -> Result<(), Error> {
        for i in 0..hits as usize {
            let b = self.cache.table(seq)?[i];
            assert_eq!(
                self.mem.get(&(pool, b)),
                Some(&self.expected(&self.seqs[&seq], i)),
                "prefix hit returned a block with other content"
            );
        }
        self.write_blocks(seq, hits as usize);
        Ok(())
    }

    fn check_seq(&self, seq: SeqId) {
        let s = &self.seqs[&seq];
        let info = self.cache.info(seq).unwrap();
        assert_eq!(info.tokens as usize, s.tokens.len());
        let table = self.cache.table(seq).unwrap();
        let written = s.tokens.len().div_ceil(BS as usize);
        for (i, &b) in table
            .iter()
            .enumerate()
            .take(written)
            .skip(info.first_live as usize)
        {
            let want = self.expected(s, i);
            let got = self.mem.get(&(info.pool, b));
            assert!(
                got.is_some_and(|c| c.serves(&want)),
                "{seq} block {i} ({b}) in {} holds the wrong KV: {got:?}, want {want:?}",
                info.pool
            );
        }
    }

    fn check_all(&self) {
        if let Err(e) = self.cache.check_invariants() {
            panic!("{e}");
        }
        let mut owner: HashMap<(PoolId, BlockId), Option<CacheSalt>> = HashMap::new();
        for &seq in &self.order {
            self.check_seq(seq);
            let info = self.cache.info(seq).unwrap();
            for &b in &self.cache.table(seq).unwrap()[info.first_live as usize..] {
                let prev = owner.insert((info.pool, b), self.seqs[&seq].salt);
                assert!(
                    prev.is_none() || prev == Some(self.seqs[&seq].salt),
                    "tenants share {b}"
                );
            }
        }
        assert_eq!(self.cache.len() as usize, self.order.len());
        // No key is held twice in a pool (runs included), and the pool
        // counts what it holds.
        for pool in [DEV[0], DEV[1], HOST] {
            let p = self.cache.pool(pool).unwrap();
            let (mut keys, mut held) = (HashSet::new(), 0);
            for i in 0..p.max_blocks() {
                if let Some(k) = p.key_of(BlockId(i)).unwrap() {
                    assert!(keys.insert(k), "{pool}: {k:?} held twice (again at {i})");
                    held += 1;
                }
            }
            assert_eq!(held, p.indexed_len());
        }
    }

    fn add_seq(&mut self, id: SeqId, m: MSeq) {
        self.seqs.insert(id, m);
        self.order.push(id);
    }

    fn remove_seq(&mut self, id: SeqId) {
        self.seqs.remove(&id);
        self.order.retain(|&s| s != id);
        self.dead.push(id);
    }

    /// Applies `op`, then checks everything (see the module docs).
    pub fn step(&mut self, op: &Op) {
        let before = fingerprint(&self.cache, true);
        let result: Result<(), Error> = self.apply(op);
        if let Err(e) = result {
            assert_eq!(
                fingerprint(&self.cache, true),
                before,
                "{op:?} failed with {e} but changed state"
            );
        }
        self.check_evictions(op);
        self.check_all();
    }

    /// Reads the pools' events; when `op` only allocates or evicts the next
    /// victim (so every key it removed was the eviction order's choice), no
    /// removed key may be the parent of a key still indexed: a block is never
    /// evicted before its descendants, under every eviction policy.
    fn check_evictions(&mut self, op: &Op) {
        let allocates = matches!(
            op,
            Op::Allocate { .. }
                | Op::AllocateLen { .. }
                | Op::AllocateKeys { .. }
                | Op::AllocateChunk { .. }
                | Op::AllocateHost
                | Op::Append { .. }
                | Op::Fork { .. }
                | Op::Cow { .. }
                | Op::Reserve { .. }
                | Op::Evict { .. }
        );
        // Sequences holding an unpublished copy before published blocks.
        for &seq in &self.order {
            let (Ok(info), Ok(table)) = (self.cache.info(seq), self.cache.table(seq)) else {
                continue;
            };
            let p = self.cache.pool(info.pool).unwrap();
            let mut dup = false;
            for &b in &table[info.first_live as usize..] {
                match p.key_of(b).unwrap() {
                    Some(k) if dup => {
                        self.after_duplicate.insert((info.pool, k));
                    }
                    Some(_) => {}
                    None => dup = true,
                }
            }
        }
        let mut removed = Vec::new();
        for pool in [DEV[0], DEV[1], HOST] {
            assert_eq!(self.cache.pool(pool).unwrap().events_lost(), 0);
            while let Some(e) = self.cache.pop_event(pool).unwrap() {
                match e {
                    KvEvent::BlockStored {
                        pool, parent, keys, ..
                    } => {
                        let mut p = parent;
                        for &k in keys.iter() {
                            self.parents.insert((pool, k), p);
                            p = Some(k);
                        }
                    }
                    KvEvent::BlockRemoved { pool, keys, .. } => {
                        removed.extend(keys.iter().map(|&k| (pool, k)));
                    }
                    KvEvent::AllCleared { pool } => self.parents.retain(|(p, _), _| *p != pool),
                }
            }
        }
        if op.reorders_chains() {
            self.reordered = true;
        }
        if self.reordered || !allocates || removed.is_empty() {
            return;
        }
        // Every key each pool holds (in a run or not).
        let held: HashSet<(PoolId, BlockHash)> = [DEV[0], DEV[1], HOST]
            .into_iter()
            .flat_map(|pool| {
                let p = self.cache.pool(pool).unwrap();
                (0..p.max_blocks())
                    .filter_map(move |i| p.key_of(BlockId(i)).unwrap().map(|k| (pool, k)))
            })
            .collect();
        // A key evicted and published again in the same step is not gone.
        removed.retain(|pk| !held.contains(pk));
        self.policy_evictions += removed.len() as u64;
        for (&(pool, k), &parent) in &self.parents {
            let indexed = held.contains(&(pool, k));
            if let Some(p) = parent
                && indexed
                && !self.after_duplicate.contains(&(pool, k))
            {
                assert!(
                    !removed.contains(&(pool, p)),
                    "{op:?} evicted {p:?} from {pool:?} before its child {k:?} ({:?})",
                    self.cache.pool(pool).unwrap().eviction_policy()
                );
            }
        }
    }

    /// The run events of the device pools so far: splits (a run head lost
    /// its parent's key), merges (an allocation continued a run) and trims
    /// (a block evicted from inside a run).
    pub fn run_stats(&self) -> [u64; 3] {
        let mut r = [0; 3];
        for pool in DEV {
            let st = self.cache.pool(pool).unwrap().stats();
            for (r, v) in r
                .iter_mut()
                .zip([st.run_splits, st.run_merges, st.run_trims])
            {
                *r += v;
            }
        }
        r
    }

    /// Blocks the eviction order chose as victims so far.
    pub fn policy_evictions(&self) -> u64 {
        self.policy_evictions
    }

    fn apply(&mut self, op: &Op) -> Result<(), Error> {
        match *op {
            Op::Allocate {
                dev,
                salt,
                base,
                prefix,
                suffix,
                seed,
            } => {
                let mut r = rng(seed);
                let mut tokens = self.base(base, prefix);
                tokens.extend((0..suffix % 12).map(|_| r()));
                let salt = salt_of(salt);
                let pool = dev_pool(dev);
                let available = self.cache.pool(pool)?.available();
                let prompt = Prompt {
                    salt,
                    ..Prompt::ids(&tokens)
                };
                let res = self.cache.allocate(pool, &prompt);
                let nblocks = tokens.len().div_ceil(BS as usize) as u32;
                match res {
                    Err(e @ Error::OutOfBlocks { .. }) => {
                        assert!(
                            available < nblocks,
                            "refused with {available} available for {nblocks}"
                        );
                        Err(e)
                    }
                    Err(e @ Error::TooManySequences { .. }) => Err(e),
                    Err(e) => panic!("unexpected {e}"),
                    Ok(a) => {
                        let m = MSeq {
                            salt,
                            tokens,
                            lossy: false,
                        };
                        self.add_seq(a.seq, m);
                        self.check_hits_then_write(a.seq, pool, a.hit_blocks)
                    }
                }
            }
            Op::AllocateLen { dev, len } => {
                let a = self
                    .cache
                    .allocate(dev_pool(dev), &Prompt::len(u32::from(len % 40)))?;
                // Unknown ids: the model still needs some; use a reserved range.
                let tokens = (0..u32::from(len % 40)).map(|i| 1000 + i).collect();
                self.add_seq(
                    a.seq,
                    MSeq {
                        salt: None,
                        tokens,
                        lossy: false,
                    },
                );
                assert_eq!(a.hit_blocks, 0);
                self.write_blocks(a.seq, 0);
                Ok(())
            }
            Op::Append {
                pick,
                n,
                known,
                seed,
            } => {
                let Some(seq) = self.pick(pick) else {
                    return Ok(());
                };
                let mut r = rng(seed);
                let n = n % 10;
                let new: Vec<u32> = (0..n).map(|_| r()).collect();
                let old_len = self.seqs[&seq].tokens.len();
                let info = self.cache.info(seq)?;
                let res = if known {
                    self.cache.append(seq, &new)
                } else {
                    self.cache.append_len(seq, u32::from(n))
                };
                let out = match res {
                    Err(e @ (Error::SequenceBusy(_) | Error::SequenceSwappedOut(_))) => {
                        assert!(info.moving || info.pool == HOST);
                        return Err(e);
                    }
                    Err(e @ (Error::OutOfBlocks { .. } | Error::SequenceTooLong { .. })) => {
                        return Err(e);
                    }
                    Err(e) => panic!("unexpected {e}"),
                    Ok(out) => out,
                };
                if let Some(c) = out.cow {
                    let v = self
                        .mem
                        .get(&(info.pool, c.src))
                        .cloned()
                        .expect("cow source has KV");
                    self.mem.insert((info.pool, c.dst), v);
                }
                self.seqs.get_mut(&seq).unwrap().tokens.extend(new);
                if n > 0 {
                    self.write_blocks(seq, old_len / BS as usize);
                }
                Ok(())
            }
            Op::Fork { pick } => {
                let Some(seq) = self.pick(pick) else {
                    return Ok(());
                };
                match self.cache.fork(seq) {
                    Ok(child) => {
                        let m = self.seqs[&seq].clone();
                        self.add_seq(child, m);
                        Ok(())
                    }
                    Err(
                        e @ (Error::TooManySequences { .. }
                        | Error::SequenceBusy(_)
                        | Error::SequenceSwappedOut(_)),
                    ) => Err(e),
                    Err(e) => panic!("unexpected {e}"),
                }
            }
            Op::Free { pick } => {
                let Some(seq) = self.pick(pick) else {
                    return Ok(());
                };
                match self.cache.free(seq) {
                    Ok(()) => {
                        self.remove_seq(seq);
                        Ok(())
                    }
                    Err(e @ Error::SequenceBusy(_)) => Err(e),
                    Err(e) => panic!("unexpected {e}"),
                }
            }
            Op::FreeStale { pick } => {
                if self.dead.is_empty() {
                    return Ok(());
                }
                let seq = self.dead[pick as usize % self.dead.len()];
                assert_eq!(self.cache.free(seq), Err(Error::UnknownSequence(seq)));
                assert_eq!(
                    self.cache.append(seq, &[1]).unwrap_err(),
                    Error::UnknownSequence(seq)
                );
                Err(Error::UnknownSequence(seq))
            }
            Op::Share {
                src,
                same_salt,
                frac,
            } => {
                let Some(source) = self.pick(src) else {
                    return Ok(());
                };
                let s = self.seqs[&source].clone();
                let info = self.cache.info(source)?;
                let salt = if same_salt {
                    s.salt
                } else {
                    Some(CacheSalt(99))
                };
                let target = self.cache.create(info.pool, salt)?;
                self.add_seq(
                    target,
                    MSeq {
                        salt,
                        tokens: vec![],
                        lossy: false,
                    },
                );
                let tokens = (s.tokens.len() * frac as usize / 255) as u32;
                match self.cache.share_prefix(source, target, tokens) {
                    Ok(()) => {
                        assert_eq!(salt, s.salt, "salts mixed but shared");
                        let t = self.seqs.get_mut(&target).unwrap();
                        t.tokens = s.tokens[..tokens as usize].to_vec();
                        t.lossy = s.lossy && tokens > 0;
                        assert_eq!(self.cache.info(target)?.lossy, t.lossy);
                        Ok(())
                    }
                    Err(Error::SaltMismatch { .. }) if salt != s.salt => Ok(()),
                    Err(
                        Error::SequenceBusy(_)
                        | Error::SequenceSwappedOut(_)
                        | Error::TooManyTokens { .. },
                    ) => Ok(()),
                    Err(e) => panic!("unexpected {e}"),
                }
            }
            Op::SwapOut { pick } | Op::SwapIn { pick, .. } | Op::Move { pick, .. } => {
                let Some(seq) = self.pick(pick) else {
                    return Ok(());
                };
                let res = match *op {
                    Op::SwapOut { .. } => self.cache.swap_out(seq, HOST),
                    Op::SwapIn { dev, .. } => self.cache.swap_in(seq, dev_pool(dev)),
                    Op::Move { dev, .. } => self.cache.move_to(seq, dev_pool(dev)),
                    _ => unreachable!(),
                };
                match res {
                    Ok(p) => {
                        self.plans.push(p);
                        Ok(())
                    }
                    Err(
                        e @ (Error::OutOfBlocks { .. }
                        | Error::SequenceBusy(_)
                        | Error::NotOnDevice(_)
                        | Error::NotSwappedOut(_)
                        | Error::SamePool(_)
                        | Error::TooManyPlans { .. }
                        | Error::LargerThanPool { .. }),
                    ) => Err(e),
                    Err(e) => panic!("unexpected {e}"),
                }
            }
            Op::Commit { pick } => {
                if self.plans.is_empty() {
                    if let Some(&p) = self.dead_plans.first() {
                        assert_eq!(self.cache.commit(p), Err(Error::UnknownPlan(p)));
                    }
                    return Ok(());
                }
                let p = self.plans.remove(pick as usize % self.plans.len());
                // Execute the copies (the backend's job), then commit.
                let lossy = self.lossy_plans.contains(&p);
                let view = self.cache.plan(p)?;
                let copies: Vec<_> = view.copies().collect();
                let (sp, dp, seq) = (view.src_pool, view.dst_pool, view.seq);
                for c in copies {
                    // A reserved (lookahead) block holds no KV yet.
                    match self.mem.get(&(sp, c.src)).cloned() {
                        Some(mut v) => {
                            v.lossy |= lossy;
                            self.mem.insert((dp, c.dst), v);
                        }
                        None => {
                            self.mem.remove(&(dp, c.dst));
                        }
                    }
                }
                self.cache.commit(p)?;
                if let (true, Some(seq)) = (lossy, seq) {
                    self.seqs.get_mut(&seq).unwrap().lossy = true;
                }
                self.dead_plans.push(p);
                Ok(())
            }
            Op::Abort { pick, garbage } => {
                if self.plans.is_empty() {
                    return Ok(());
                }
                let p = self.plans.remove(pick as usize % self.plans.len());
                if garbage {
                    // A transfer that failed half way wrote garbage into the targets.
                    let view = self.cache.plan(p)?;
                    let dp = view.dst_pool;
                    for c in view.copies().collect::<Vec<_>>() {
                        self.mem.insert(
                            (dp, c.dst),
                            Content {
                                salt: Some(CacheSalt(666)),
                                prefix: vec![],
                                lossy: true,
                            },
                        );
                    }
                }
                self.cache.abort(p)?;
                assert_eq!(self.cache.abort(p), Err(Error::UnknownPlan(p)));
                self.dead_plans.push(p);
                Ok(())
            }
            Op::Evict { pool } => {
                let pool = PoolId(u16::from(pool % 3));
                let before = self.cache.pool(pool)?.cached_len();
                let evicted = self.cache.evict_one(pool)?;
                let p = self.cache.pool(pool)?;
                match evicted {
                    Some((b, key)) => {
                        assert_eq!(p.cached_len(), before - 1);
                        assert_eq!(p.key_of(b)?, None);
                        assert_ne!(p.lookup(key), Some(b));
                        assert_eq!(p.ref_count(b)?, 0);
                    }
                    None => assert_eq!(before, 0),
                }
                Ok(())
            }
            Op::Lookup { pick } => {
                let Some(seq) = self.pick(pick) else {
                    return Ok(());
                };
                let s = self.seqs[&seq].clone();
                let info = self.cache.info(seq)?;
                let h = *self.cache.hasher();
                let mut tip = pagedkv_core::BlockHasher::root(&h, s.salt);
                // A chain walk in each pool (run blocks follow their parent's).
                let mut prev = [None; 3];
                for i in 0..s.tokens.len() / BS as usize {
                    let t = &s.tokens[i * BS as usize..(i + 1) * BS as usize];
                    tip = pagedkv_core::BlockHasher::hash_block(
                        &h,
                        tip,
                        t,
                        i as u32 * BS,
                        &Default::default(),
                    );
                    for (pool, prev) in [DEV[0], DEV[1], HOST].into_iter().zip(&mut prev) {
                        *prev = self.cache.pool(pool)?.lookup_after(*prev, tip);
                        if let Some(b) = *prev {
                            // Published KV is always exact.
                            let exact = Content {
                                lossy: false,
                                ..self.expected(&s, i)
                            };
                            assert_eq!(
                                self.mem.get(&(pool, b)),
                                Some(&exact),
                                "lookup returned a block with another key ({pool}, {b}, {})",
                                info.pool
                            );
                        }
                    }
                }
                Ok(())
            }
            Op::Shrink { dev, frac } => {
                let pool = dev_pool(dev);
                let p = self.cache.pool(pool)?;
                let to = (p.max_blocks() * u32::from(frac) / 255).max(1);
                let before = p.capacity();
                self.cache.shrink(pool, to)?;
                assert_eq!(self.cache.pool(pool)?.capacity(), before.min(to));
                Ok(())
            }
            Op::Grow { dev } => {
                let pool = dev_pool(dev);
                let p = self.cache.pool(pool)?;
                let n = p.max_blocks() - p.capacity();
                self.cache.grow(pool, n)?;
                let p = self.cache.pool(pool)?;
                assert_eq!(p.capacity(), p.max_blocks());
                Ok(())
            }
            Op::Policy {
                pool,
                protect,
                tail_first,
            } => {
                // Percentages past 100 are refused (and change nothing).
                let pool = PoolId(u16::from(pool % 3));
                let p = pagedkv_core::EvictionPolicy {
                    protect_percent: protect % 128,
                    tail_first,
                };
                self.cache.set_eviction_policy(pool, p)?;
                assert_eq!(self.cache.pool(pool)?.eviction_policy(), p);
                Ok(())
            }
            Op::Relocate { pick } => {
                let Some(seq) = self.pick(pick) else {
                    return Ok(());
                };
                match self.cache.relocate(seq) {
                    Ok(p) => {
                        let view = self.cache.plan(p)?;
                        let online = self.cache.pool(view.src_pool)?.capacity();
                        assert!(view.copies().all(|c| c.src.0 >= online && c.dst.0 < online));
                        self.plans.push(p);
                        Ok(())
                    }
                    Err(
                        e @ (Error::OutOfBlocks { .. }
                        | Error::SequenceBusy(_)
                        | Error::TooManyPlans { .. }),
                    ) => Err(e),
                    Err(e) => panic!("unexpected {e}"),
                }
            }
            Op::AllocateKeys {
                dev,
                salt,
                base,
                prefix,
                dup,
            } => {
                let tokens = self.base(base, prefix);
                let mut keys = raw_keys(&tokens);
                if let Some((i, j)) = dup
                    && keys.len() >= 2
                {
                    let i = i as usize % keys.len();
                    let j = j as usize % keys.len();
                    keys[i.max(j)] = keys[i.min(j)];
                }
                let salt = salt_of(salt);
                let pool = dev_pool(dev);
                let mut prompt = Prompt::keys(&keys, tokens.len() as u32);
                prompt.salt = salt;
                let a = match self.cache.allocate(pool, &prompt) {
                    Err(e @ (Error::OutOfBlocks { .. } | Error::TooManySequences { .. })) => {
                        return Err(e);
                    }
                    Err(e) => panic!("unexpected {e}"),
                    Ok(a) => a,
                };
                let m = MSeq {
                    salt,
                    tokens,
                    lossy: false,
                };
                self.add_seq(a.seq, m);
                self.check_hits_then_write(a.seq, pool, a.hit_blocks)
            }
            Op::AllocateChunk {
                dev,
                base,
                prefix,
                chunk,
            } => {
                let tokens = self.base(base, prefix);
                let pool = dev_pool(dev);
                let a = match self.cache.allocate_chunk(
                    pool,
                    &Prompt::ids(&tokens),
                    u32::from(chunk % 12),
                ) {
                    Err(e @ (Error::OutOfBlocks { .. } | Error::TooManySequences { .. })) => {
                        return Err(e);
                    }
                    Err(e) => panic!("unexpected {e}"),
                    Ok(a) => a,
                };
                assert!(a.tokens >= a.hit_tokens && a.tokens as usize <= tokens.len());
                assert!(a.tokens <= a.hit_tokens + u32::from(chunk % 12));
                let m = MSeq {
                    salt: None,
                    tokens: tokens[..a.tokens as usize].to_vec(),
                    lossy: false,
                };
                self.add_seq(a.seq, m);
                self.check_hits_then_write(a.seq, pool, a.hit_blocks)
            }
            Op::Reserve { pick, n } => {
                let Some(seq) = self.pick(pick) else {
                    return Ok(());
                };
                let n = u32::from(n % 9);
                match self.cache.reserve(seq, n) {
                    Ok(_) => {
                        let info = self.cache.info(seq)?;
                        assert_eq!(info.reserved, n);
                        Ok(())
                    }
                    Err(
                        e @ (Error::OutOfBlocks { .. }
                        | Error::SequenceBusy(_)
                        | Error::SequenceSwappedOut(_)
                        | Error::SequenceTooLong { .. }),
                    ) => Err(e),
                    Err(e) => panic!("unexpected {e}"),
                }
            }
            Op::AllocateHost => {
                let r = self.cache.allocate(HOST, &Prompt::ids(&[1, 2, 3, 4, 5]));
                assert_eq!(r.unwrap_err(), Error::NotADevicePool(HOST));
                Err(Error::NotADevicePool(HOST))
            }
            Op::Cow { pick } => {
                let Some(seq) = self.pick(pick) else {
                    return Ok(());
                };
                match self.cache.cow(seq) {
                    Ok(Some(p)) => {
                        self.plans.push(p);
                        Ok(())
                    }
                    Ok(None) => Ok(()),
                    Err(
                        e @ (Error::OutOfBlocks { .. }
                        | Error::SequenceBusy(_)
                        | Error::SequenceSwappedOut(_)
                        | Error::TooManyPlans { .. }),
                    ) => Err(e),
                    Err(e) => panic!("unexpected {e}"),
                }
            }
            Op::SwapOutLossy { pick } | Op::SwapInLossy { pick, .. } => {
                let Some(seq) = self.pick(pick) else {
                    return Ok(());
                };
                let res = match *op {
                    Op::SwapInLossy { dev, .. } => {
                        self.cache.swap_in_as(seq, dev_pool(dev), Fidelity::Lossy)
                    }
                    _ => self.cache.swap_out_as(seq, HOST, Fidelity::Lossy),
                };
                match res {
                    Ok(p) => {
                        self.plans.push(p);
                        self.lossy_plans.push(p);
                        Ok(())
                    }
                    Err(
                        e @ (Error::OutOfBlocks { .. }
                        | Error::SequenceBusy(_)
                        | Error::NotOnDevice(_)
                        | Error::NotSwappedOut(_)
                        | Error::TooManyPlans { .. }
                        | Error::LargerThanPool { .. }),
                    ) => Err(e),
                    Err(e) => panic!("unexpected {e}"),
                }
            }
            Op::Offload { dev, n } => {
                match self
                    .cache
                    .offload(dev_pool(dev), HOST, u32::from(n), |_| false)
                {
                    Ok(Some(p)) => {
                        assert!(self.cache.plan(p)?.len() <= n as usize);
                        self.plans.push(p);
                        Ok(())
                    }
                    Ok(None) => Ok(()),
                    Err(e @ (Error::OutOfBlocks { .. } | Error::TooManyPlans { .. })) => Err(e),
                    Err(e) => panic!("unexpected {e}"),
                }
            }
            Op::Promote { pick, dev } => {
                let Some(seq) = self.pick(pick) else {
                    return Ok(());
                };
                let s = self.seqs[&seq].clone();
                let h = *self.cache.hasher();
                let mut tip = pagedkv_core::BlockHasher::root(&h, s.salt);
                let keys: Vec<BlockHash> = s
                    .tokens
                    .chunks_exact(BS as usize)
                    .enumerate()
                    .map(|(i, t)| {
                        tip = pagedkv_core::BlockHasher::hash_block(
                            &h,
                            tip,
                            t,
                            i as u32 * BS,
                            &Default::default(),
                        );
                        tip
                    })
                    .collect();
                match self.cache.promote(HOST, dev_pool(dev), &keys) {
                    Ok(Some(p)) => {
                        self.plans.push(p);
                        Ok(())
                    }
                    Ok(None) => Ok(()),
                    Err(e @ (Error::OutOfBlocks { .. } | Error::TooManyPlans { .. })) => Err(e),
                    Err(e) => panic!("unexpected {e}"),
                }
            }
            Op::Window { pick, w } => {
                let Some(seq) = self.pick(pick) else {
                    return Ok(());
                };
                match self.cache.set_window(seq, u32::from(w % 16) * 3, u32::MAX) {
                    Ok(_) | Err(Error::SequenceBusy(_) | Error::SequenceSwappedOut(_)) => Ok(()),
                    Err(e) => panic!("unexpected {e}"),
                }
            }
        }
    }

    /// Frees everything; every block must be free or cached afterwards.
    pub fn drain(&mut self) {
        for p in std::mem::take(&mut self.plans) {
            self.cache.abort(p).unwrap();
        }
        for seq in self.order.clone() {
            self.cache.free(seq).unwrap();
            self.remove_seq(seq);
        }
        self.check_all();
        for p in self.cache.pools() {
            assert_eq!(p.used_len(), 0, "leaked blocks in {}", p.id());
            assert_eq!(p.free_len() + p.cached_len(), p.capacity());
        }
    }
}
