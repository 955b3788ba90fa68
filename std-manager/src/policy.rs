//! Eviction policies: which requests to preempt under pressure.

use std::sync::Mutex;
use std::time::Instant;

use crate::traits::{CacheEvictionPolicy, Candidate};
use crate::types::RequestId;

fn take_until(
    required: usize,
    ordered: impl Iterator<Item = (RequestId, usize)>,
) -> Vec<RequestId> {
    let mut freed = 0;
    let mut out = Vec::new();
    for (id, blocks) in ordered {
        if freed >= required {
            break;
        }
        out.push(id);
        freed += blocks;
    }
    out
}

#[derive(Debug, Default)]
struct Accesses {
    /// Per request: last use and uses.
    seen: hashbrown::HashMap<RequestId, (Instant, u64)>,
}

impl Accesses {
    fn record(m: &Mutex<Self>, ids: &mut dyn Iterator<Item = RequestId>, at: Instant) {
        let mut a = lock(m);
        for id in ids {
            let e = a.seen.entry(id).or_insert((at, 0));
            *e = (at, e.1 + 1);
        }
    }

    fn forget(m: &Mutex<Self>, id: RequestId) {
        lock(m).seen.remove(&id);
    }

    fn last(&self, id: RequestId) -> Option<Instant> {
        self.seen.get(&id).map(|e| e.0)
    }
}

/// Least recently used first. A request never seen counts as the oldest
/// (the seed treated it as the newest, so it could never be chosen).
#[derive(Debug, Default)]
pub struct LruEvictionPolicy(Mutex<Accesses>);

impl LruEvictionPolicy {
    /// A new policy.
    pub fn new() -> Self {
        Self::default()
    }
}

fn lock(m: &Mutex<Accesses>) -> std::sync::MutexGuard<'_, Accesses> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl CacheEvictionPolicy for LruEvictionPolicy {
    fn select_eviction_candidates(&self, required: usize, c: &[Candidate]) -> Vec<RequestId> {
        let a = lock(&self.0);
        let mut v: Vec<_> = c.iter().map(|c| (a.last(c.request_id), c)).collect();
        // `None` (never seen) sorts first: oldest.
        v.sort_by_key(|&(t, c)| (t, c.request_id));
        take_until(
            required,
            v.into_iter().map(|(_, c)| (c.request_id, c.blocks)),
        )
    }
    fn record_access(&self, id: RequestId, at: Instant) {
        Accesses::record(&self.0, &mut std::iter::once(id), at);
    }
    fn record_accesses(&self, ids: &mut dyn Iterator<Item = RequestId>, at: Instant) {
        Accesses::record(&self.0, ids, at);
    }
    fn forget(&self, id: RequestId) {
        Accesses::forget(&self.0, id);
    }
    fn name(&self) -> &str {
        "lru"
    }
}

/// Least frequently used first (ties: least recently used).
#[derive(Debug, Default)]
pub struct LfuEvictionPolicy(Mutex<Accesses>);

impl LfuEvictionPolicy {
    /// A new policy.
    pub fn new() -> Self {
        Self::default()
    }
}

impl CacheEvictionPolicy for LfuEvictionPolicy {
    fn select_eviction_candidates(&self, required: usize, c: &[Candidate]) -> Vec<RequestId> {
        let a = lock(&self.0);
        let mut v: Vec<_> = c
            .iter()
            .map(|c| {
                (
                    a.seen.get(&c.request_id).map_or(0, |e| e.1),
                    a.last(c.request_id),
                    c,
                )
            })
            .collect();
        v.sort_by_key(|&(n, t, c)| (n, t, c.request_id));
        take_until(
            required,
            v.into_iter().map(|(_, _, c)| (c.request_id, c.blocks)),
        )
    }
    fn record_access(&self, id: RequestId, at: Instant) {
        Accesses::record(&self.0, &mut std::iter::once(id), at);
    }
    fn record_accesses(&self, ids: &mut dyn Iterator<Item = RequestId>, at: Instant) {
        Accesses::record(&self.0, ids, at);
    }
    fn forget(&self, id: RequestId) {
        Accesses::forget(&self.0, id);
    }
    fn name(&self) -> &str {
        "lfu"
    }
}

/// Lowest priority first; within a priority, least recently used.
#[derive(Debug, Default)]
pub struct PriorityEvictionPolicy(LruEvictionPolicy);

impl PriorityEvictionPolicy {
    /// A new policy.
    pub fn new() -> Self {
        Self::default()
    }
}

impl CacheEvictionPolicy for PriorityEvictionPolicy {
    fn select_eviction_candidates(&self, required: usize, c: &[Candidate]) -> Vec<RequestId> {
        let a = lock(&(self.0).0);
        let mut v: Vec<_> = c
            .iter()
            .map(|c| (c.priority, a.last(c.request_id), c))
            .collect();
        v.sort_by_key(|&(p, t, c)| (p, t, c.request_id));
        take_until(
            required,
            v.into_iter().map(|(_, _, c)| (c.request_id, c.blocks)),
        )
    }
    fn record_access(&self, id: RequestId, at: Instant) {
        self.0.record_access(id, at);
    }
    fn record_accesses(&self, ids: &mut dyn Iterator<Item = RequestId>, at: Instant) {
        self.0.record_accesses(ids, at);
    }
    fn forget(&self, id: RequestId) {
        self.0.forget(id);
    }
    fn name(&self) -> &str {
        "priority"
    }
}

/// Most bytes freed per token of recompute first: long-idle big blocks of
/// short sequences go before long sequences whose KV is costly to rebuild.
#[derive(Debug, Default)]
pub struct CostAwareEvictionPolicy;

impl CostAwareEvictionPolicy {
    /// A new policy.
    pub fn new() -> Self {
        Self
    }
}

impl CacheEvictionPolicy for CostAwareEvictionPolicy {
    fn select_eviction_candidates(&self, required: usize, c: &[Candidate]) -> Vec<RequestId> {
        let score = |c: &Candidate| (c.blocks * c.block_bytes) as f64 / c.tokens.max(1) as f64;
        let mut v: Vec<&Candidate> = c.iter().collect();
        v.sort_by(|a, b| {
            score(b)
                .total_cmp(&score(a))
                .then(a.request_id.cmp(&b.request_id))
        });
        take_until(required, v.into_iter().map(|c| (c.request_id, c.blocks)))
    }
    fn record_access(&self, _: RequestId, _: Instant) {}
    fn forget(&self, _: RequestId) {}
    fn name(&self) -> &str {
        "cost-aware"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::Priority;

    fn cand(id: u64, blocks: usize, tokens: usize, priority: Priority) -> Candidate {
        Candidate {
            request_id: RequestId(id),
            blocks,
            tokens,
            priority,
            block_bytes: 100,
        }
    }

    #[test]
    fn lru_treats_never_seen_as_oldest() {
        let p = LruEvictionPolicy::new();
        let t = Instant::now();
        p.record_access(RequestId(1), t);
        p.record_access(RequestId(2), t + std::time::Duration::from_secs(1));
        let c = [
            cand(1, 1, 1, Priority::Normal),
            cand(2, 1, 1, Priority::Normal),
            cand(3, 1, 1, Priority::Normal),
        ];
        assert_eq!(
            p.select_eviction_candidates(2, &c),
            vec![RequestId(3), RequestId(1)]
        );
    }

    #[test]
    fn lfu_priority_and_cost() {
        let t = Instant::now();
        let lfu = LfuEvictionPolicy::new();
        for _ in 0..3 {
            lfu.record_access(RequestId(1), t);
        }
        lfu.record_access(RequestId(2), t);
        let c = [
            cand(1, 4, 10, Priority::Low),
            cand(2, 4, 100, Priority::High),
        ];
        assert_eq!(lfu.select_eviction_candidates(1, &c), vec![RequestId(2)]);
        let pr = PriorityEvictionPolicy::new();
        assert_eq!(pr.select_eviction_candidates(1, &c), vec![RequestId(1)]);
        let cost = CostAwareEvictionPolicy::new();
        // 400 bytes / 10 tokens beats 400 bytes / 100 tokens.
        assert_eq!(
            cost.select_eviction_candidates(8, &c),
            vec![RequestId(1), RequestId(2)]
        );
    }
}
