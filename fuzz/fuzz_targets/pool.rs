//! The block pool alone: allocate, add holders, release, free batches,
//! register keys, hit them, evict, grow and shrink, against a model of each
//! block's holders and key. After every operation the pool's invariants
//! hold, every reference count and key agrees with the model, and a refused
//! operation changed nothing.
#![no_main]

use std::collections::HashMap;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use pagedkv_core::{BlockHash, BlockId, BlockPool, PoolConfig, Registered};

#[derive(Arbitrary, Debug)]
enum Op {
    Allocate(u8),
    AddRef(u8),
    Release(u8),
    Free(Vec<u8>),
    Register(u8, u8),
    Acquire(u8),
    EvictOne,
    Evict(u8),
    Grow(u8),
    Shrink(u8),
    Reset,
}

const CAP: u32 = 24;

struct Model {
    pool: BlockPool<'static>,
    /// Holders the model gave each block.
    holders: HashMap<BlockId, u32>,
    /// Keys of blocks (held or cached).
    keys: HashMap<BlockId, BlockHash>,
}

impl Model {
    fn held(&self, k: u8) -> Option<BlockId> {
        let mut v: Vec<BlockId> = self.holders.keys().copied().collect();
        v.sort_unstable();
        (!v.is_empty()).then(|| v[k as usize % v.len()])
    }

    fn snapshot(&self) -> (pagedkv_core::PoolStats, Vec<BlockId>) {
        let mut s = self.pool.stats();
        s.allocation_failures = 0;
        (s, self.pool.eviction_order().collect())
    }

    fn take(&mut self, b: BlockId) {
        *self.holders.entry(b).or_default() += 1;
    }

    fn drop_holder(&mut self, b: BlockId) {
        let n = self.holders.get_mut(&b).expect("held");
        *n -= 1;
        if *n == 0 {
            self.holders.remove(&b);
            // A block released past the capacity leaves service, key and all.
            if b.0 >= self.pool.capacity() {
                self.keys.remove(&b);
            }
        }
    }

    fn apply(&mut self, op: &Op) -> bool {
        match op {
            Op::Allocate(n) => {
                let mut out = vec![BlockId(0); usize::from(n % 6)];
                if self.pool.allocate(&mut out).is_err() {
                    return false;
                }
                for b in out {
                    // A fresh block: an evicted key is gone from the model.
                    self.keys.remove(&b);
                    self.take(b);
                }
            }
            Op::AddRef(k) => {
                let Some(b) = self.held(*k) else { return true };
                self.pool.add_ref(b).expect("held block");
                self.take(b);
            }
            Op::Release(k) => {
                let Some(b) = self.held(*k) else {
                    return self.pool.release(BlockId(u32::from(*k))).is_err();
                };
                self.pool.release(b).expect("held block");
                self.drop_holder(b);
            }
            Op::Free(ks) => {
                let blocks: Vec<BlockId> =
                    ks.iter().take(8).filter_map(|&k| self.held(k)).collect();
                let mut need: HashMap<BlockId, u32> = HashMap::new();
                for &b in &blocks {
                    *need.entry(b).or_default() += 1;
                }
                let ok = need
                    .iter()
                    .all(|(b, n)| self.holders.get(b).is_some_and(|h| h >= n));
                match self.pool.free(&blocks) {
                    Ok(()) => {
                        assert!(ok, "freed more than held");
                        for b in blocks {
                            self.drop_holder(b);
                        }
                    }
                    Err(_) => {
                        assert!(!ok, "a valid free refused");
                        return false;
                    }
                }
            }
            Op::Register(k, key) => {
                let Some(b) = self.held(*k) else { return true };
                let key = BlockHash(u128::from(*key) + 1);
                match self.pool.register(b, key, None) {
                    Ok(Registered::Stored) => {
                        assert!(
                            !self.keys.values().any(|&v| v == key),
                            "a key indexed twice"
                        );
                        self.keys.insert(b, key);
                    }
                    Ok(Registered::Duplicate(other)) => {
                        assert_eq!(self.keys.get(&other), Some(&key));
                    }
                    Ok(Registered::IndexFull) => {}
                    Err(_) => {
                        assert!(self.keys.contains_key(&b), "refused an unkeyed held block");
                        return false;
                    }
                }
            }
            Op::Acquire(key) => {
                let key = BlockHash(u128::from(*key) + 1);
                let want = self.keys.iter().find(|(_, v)| **v == key).map(|(b, _)| *b);
                let got = self.pool.acquire(key);
                assert_eq!(got, want, "a hit on the wrong block");
                if let Some(b) = got {
                    self.take(b);
                }
            }
            Op::EvictOne => {
                if let Some((b, key)) = self.pool.evict_one() {
                    assert!(!self.holders.contains_key(&b), "evicted a held block");
                    assert_eq!(self.keys.remove(&b), Some(key));
                }
            }
            Op::Evict(k) => {
                let b = BlockId(u32::from(*k) % CAP);
                match self.pool.evict(b) {
                    Ok(key) => {
                        assert!(!self.holders.contains_key(&b));
                        assert_eq!(self.keys.remove(&b), Some(key));
                    }
                    Err(_) => return false,
                }
            }
            Op::Grow(n) => {
                if self.pool.grow(u32::from(*n % 8)).is_err() {
                    return false;
                }
            }
            Op::Shrink(to) => {
                let to = u32::from(*to) % (CAP + 1);
                if self.pool.shrink(to).is_err() {
                    return false;
                }
                // Cached blocks past `to` were evicted.
                let cap = self.pool.capacity();
                self.keys
                    .retain(|b, _| b.0 < cap || self.holders.contains_key(b));
            }
            Op::Reset => {
                self.pool.reset_prefix_cache();
                self.keys.clear();
            }
        }
        true
    }

    fn check(&self) {
        if let Err(e) = self.pool.check_invariants() {
            panic!("{e}");
        }
        for b in 0..CAP {
            let b = BlockId(b);
            let want = self.holders.get(&b).copied().unwrap_or(0);
            assert_eq!(self.pool.ref_count(b), Ok(want), "{b}: holders");
            assert_eq!(
                self.pool.key_of(b).ok().flatten(),
                self.keys.get(&b).copied(),
                "{b}: key"
            );
        }
    }
}

fuzz_target!(|ops: Vec<Op>| {
    let pool = BlockPool::with_capacity(PoolConfig::device(0, 16), CAP).expect("pool");
    let mut m = Model {
        pool,
        holders: HashMap::new(),
        keys: HashMap::new(),
    };
    for op in ops.iter().take(1_000) {
        let before = m.snapshot();
        if !m.apply(op) {
            assert_eq!(m.snapshot(), before, "{op:?} refused but changed the pool");
        }
        m.check();
    }
});
