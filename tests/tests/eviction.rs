//! The eviction order's guarantee under every policy: a block is never
//! evicted before its descendants in a prefix chain (a cached child whose
//! parent is gone can never hit). Random conversations (shared system
//! prompts, turns that extend earlier prompts, shorter prompts that stop
//! inside a chain, forks, decode blocks, several sequences alive at once)
//! run on a small pool under a random policy; after every step every
//! indexed block's parent (from the pool's events) must still be indexed.
//!
//! Excluded, because no order can keep it: two sequences that compute the
//! same block at once (the second copy stays unpublished, so its children
//! hang off a block the first sequence holds alone). Appended tokens are
//! unique per sequence here.
#![allow(clippy::cast_possible_truncation, reason = "small test values")]

use std::collections::HashMap;

use pagedkv_core::{
    BlockHash, BlockId, CacheConfig, EvictionPolicy, KvCache, KvEvent, PoolId, Prompt, SeqId,
    SipBlockHasher,
};
use pagedkv_tests::cache_with;
use proptest::prelude::*;

const BS: u32 = 4;
const POOL: PoolId = PoolId(0);

#[derive(Clone, Debug)]
enum Step {
    /// A turn of conversation `conv`: its history (or its first `cut`
    /// tokens when `cut` is short of it) plus `extra` new tokens.
    Turn { conv: u8, cut: u8, extra: u8 },
    /// A sequence decodes `n` tokens.
    Append { pick: u8, n: u8 },
    /// A sequence forks (beam search, parallel sampling).
    Fork { pick: u8 },
    /// A sequence finishes; a conversation's turn becomes its history.
    Free { pick: u8 },
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (0..6u8, any::<u8>(), 1..14u8).prop_map(|(conv, cut, extra)| Step::Turn { conv, cut, extra }),
        2 => (any::<u8>(), 1..9u8).prop_map(|(pick, n)| Step::Append { pick, n }),
        1 => any::<u8>().prop_map(|pick| Step::Fork { pick }),
        4 => any::<u8>().prop_map(|pick| Step::Free { pick }),
    ]
}

fn policy() -> impl Strategy<Value = EvictionPolicy> {
    (prop_oneof![Just(0u8), 1..=100u8], any::<bool>()).prop_map(|(protect_percent, tail_first)| {
        EvictionPolicy {
            protect_percent,
            tail_first,
        }
    })
}

struct World {
    cache: KvCache<'static, SipBlockHasher>,
    parent: HashMap<BlockHash, Option<BlockHash>>,
    history: [Vec<u32>; 6],
    live: Vec<(SeqId, Option<u8>, Vec<u32>)>,
    fresh: u32,
    evictions: u64,
}

impl World {
    fn new(policy: EvictionPolicy, blocks: u32) -> Self {
        let config = CacheConfig {
            tokens_per_block: BS,
            max_seqs: 6,
            max_blocks_per_seq: 24,
            max_plans: 1,
        };
        let mut cache = cache_with(config, &[blocks], 0);
        cache.set_eviction_policy(POOL, policy).unwrap();
        // Conversations 0..3 share an 8-token system prompt.
        let history = core::array::from_fn(|c| {
            if c < 3 {
                (0..8).collect()
            } else {
                (0..2).map(|t| 1000 * c as u32 + t).collect()
            }
        });
        Self {
            cache,
            parent: HashMap::new(),
            history,
            live: Vec::new(),
            fresh: 1 << 20,
            evictions: 0,
        }
    }

    fn unique(&mut self, n: u8) -> Vec<u32> {
        let t = (self.fresh..self.fresh + u32::from(n)).collect();
        self.fresh += u32::from(n);
        t
    }

    fn run(&mut self, s: &Step) {
        let pick = |p: u8, n: usize| (n > 0).then(|| p as usize % n);
        match *s {
            Step::Turn { conv, cut, extra } => {
                let h = &self.history[conv as usize];
                let keep = if usize::from(cut) < h.len() && cut % 3 == 0 {
                    usize::from(cut)
                } else {
                    h.len()
                };
                let mut prompt = h[..keep].to_vec();
                prompt.extend(self.unique(extra));
                if let Ok(a) = self.cache.allocate(POOL, &Prompt::ids(&prompt)) {
                    self.live.push((a.seq, Some(conv), prompt));
                }
            }
            Step::Append { pick: p, n } => {
                if let Some(i) = pick(p, self.live.len()) {
                    let t = self.unique(n);
                    if self.cache.append(self.live[i].0, &t).is_ok() {
                        self.live[i].2.extend(t);
                    }
                }
            }
            Step::Fork { pick: p } => {
                if let Some(i) = pick(p, self.live.len())
                    && let Ok(child) = self.cache.fork(self.live[i].0)
                {
                    let tokens = self.live[i].2.clone();
                    self.live.push((child, None, tokens));
                }
            }
            Step::Free { pick: p } => {
                if let Some(i) = pick(p, self.live.len()) {
                    let (seq, conv, tokens) = self.live.swap_remove(i);
                    self.cache.free(seq).unwrap();
                    if let Some(c) = conv
                        && tokens.len() < 80
                    {
                        self.history[c as usize] = tokens;
                    }
                }
            }
        }
    }

    /// Every indexed block's parent is indexed.
    fn check(&mut self) {
        while let Some(e) = self.cache.pop_event(POOL).unwrap() {
            match e {
                KvEvent::BlockStored { parent, keys, .. } => {
                    let mut p = parent;
                    for &k in keys.iter() {
                        self.parent.insert(k, p);
                        p = Some(k);
                    }
                }
                KvEvent::BlockRemoved { .. } => self.evictions += 1,
                _ => {}
            }
        }
        let pool = self.cache.pool(POOL).unwrap();
        pool.check_invariants().unwrap();
        let held: std::collections::HashSet<BlockHash> = (0..pool.max_blocks())
            .filter_map(|i| pool.key_of(BlockId(i)).unwrap())
            .collect();
        for (&k, &p) in &self.parent {
            if held.contains(&k)
                && let Some(p) = p
            {
                assert!(
                    held.contains(&p),
                    "block {k:?} is indexed but its parent {p:?} was evicted ({:?})",
                    pool.eviction_policy()
                );
            }
        }
    }
}

#[test]
fn no_policy_evicts_a_parent_before_its_children() {
    use std::sync::atomic::{AtomicU64, Ordering};
    static EVICTIONS: AtomicU64 = AtomicU64::new(0);
    proptest!(ProptestConfig::with_cases(400), |(
        p in policy(),
        blocks in 12..40u32,
        steps in prop::collection::vec(step(), 1..200),
    )| {
        let mut w = World::new(p, blocks);
        for s in &steps {
            w.run(s);
            w.check();
        }
        EVICTIONS.fetch_add(w.evictions, Ordering::Relaxed);
    });
    // The pools were small enough that the policies had to choose.
    assert!(EVICTIONS.load(Ordering::Relaxed) > 10_000);
}
