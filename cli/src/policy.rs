//! Block eviction policies by name, the time split of a trace into its
//! tuning and test halves, and how much of the gap from LRU to the offline
//! optimum (Belady) a policy closes, with a bootstrap interval.

use anyhow::{Result, bail};
use pagedkv_core::EvictionPolicy;

use crate::workload::{Rng, Workload};

/// The policies `--policy` knows (`belady` is the offline reference).
pub const NAMES: &str = "lru, protect, tail-first, protect-tail, belady";

/// Share of the pool the protected class may hold by default (tuned on the
/// first half of the Mooncake conversation trace, the built-in workload and
/// the agentic sessions; see the policy issue's note).
pub const PROTECT_PERCENT: u8 = 10;

/// The core's eviction policy named `name`; `None` for `belady` (offline:
/// computed by the simulator, not run by the manager).
pub fn block_policy(name: &str, protect_percent: u8) -> Result<Option<EvictionPolicy>> {
    if protect_percent == 0 || protect_percent > 100 {
        bail!("--protect-percent must be between 1 and 100, not {protect_percent}");
    }
    Ok(Some(match name {
        "lru" => EvictionPolicy::LRU,
        "protect" => EvictionPolicy::protect(protect_percent),
        "tail-first" => EvictionPolicy::TAIL_FIRST,
        "protect-tail" => EvictionPolicy {
            protect_percent,
            tail_first: true,
        },
        "belady" => return Ok(None),
        other => bail!("unknown block eviction policy `{other}` ({NAMES})"),
    }))
}

/// Which part of a trace, by time, to replay.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Split {
    /// Everything.
    All,
    /// Requests arriving before the midpoint of the first and last arrival
    /// (where policies are tuned).
    FirstHalf,
    /// The rest (where they are tested).
    SecondHalf,
}

impl Split {
    /// `all`, `first-half` or `second-half`.
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "all" => Self::All,
            "first-half" => Self::FirstHalf,
            "second-half" => Self::SecondHalf,
            other => bail!("unknown --split `{other}` (all, first-half, second-half)"),
        })
    }

    /// Keeps the requests of this part of `w` (arrivals shifted to start at
    /// zero); refuses a part with no request.
    pub fn apply(self, w: &mut Workload) -> Result<()> {
        if self == Self::All {
            return Ok(());
        }
        let (Some(first), Some(last)) = (w.requests.first(), w.requests.last()) else {
            return Ok(());
        };
        let mid = first.arrival_s + (last.arrival_s - first.arrival_s) / 2.0;
        w.requests
            .retain(|r| (r.arrival_s < mid) == (self == Self::FirstHalf));
        let Some(t0) = w.requests.first().map(|r| r.arrival_s) else {
            bail!("the {self:?} of {} has no request", w.name);
        };
        for r in &mut w.requests {
            r.arrival_s -= t0;
        }
        w.name = format!(
            "{} ({})",
            w.name,
            if self == Self::FirstHalf {
                "first half"
            } else {
                "second half"
            }
        );
        Ok(())
    }
}

/// Time windows of the bootstrap.
const WINDOWS: usize = 20;
/// Bootstrap resamples.
const RESAMPLES: usize = 2000;

/// The share of the LRU-to-Belady gap that `hits` closes, and its 95%
/// bootstrap interval: requests are cut into 20 windows of consecutive
/// arrivals, and windows are resampled with replacement (seeded). `None`
/// when Belady's hits exceed LRU's by less than 1% (no gap to close).
pub fn gap_closed(hits: &[u32], lru: &[u32], belady: &[u32], seed: u64) -> Option<(f64, [f64; 2])> {
    let n = hits.len();
    if n == 0 || lru.len() != n || belady.len() != n {
        return None;
    }
    let per = n.div_ceil(WINDOWS);
    let sum = |v: &[u32], w: usize| -> f64 {
        v.iter()
            .skip(w * per)
            .take(per)
            .map(|&h| f64::from(h))
            .sum()
    };
    let windows: Vec<[f64; 3]> = (0..n.div_ceil(per))
        .map(|w| [sum(hits, w), sum(lru, w), sum(belady, w)])
        .collect();
    let share = |pick: &mut dyn FnMut() -> usize| {
        let mut t = [0.0; 3];
        for _ in 0..windows.len() {
            let w = windows[pick()];
            for k in 0..3 {
                t[k] += w[k];
            }
        }
        // A gap under 1% of the optimum's hits says nothing of a policy.
        let gap = t[2] - t[1];
        (gap > 0.01 * t[2]).then(|| (t[0] - t[1]) / gap)
    };
    let mut all = 0..windows.len();
    let point = share(&mut || all.next().unwrap_or(0))?;
    let mut rng = Rng::new(seed);
    let k = windows.len() as u64;
    let mut draws: Vec<f64> = (0..RESAMPLES)
        .filter_map(|_| share(&mut || (rng.next_u64() % k) as usize))
        .collect();
    if draws.is_empty() {
        return None;
    }
    draws.sort_by(f64::total_cmp);
    let at = |q: f64| draws[((draws.len() - 1) as f64 * q).round() as usize];
    Some((point, [at(0.025), at(0.975)]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gap_closed_is_the_share_of_the_gap_with_an_interval_around_it() {
        let lru = vec![10; 100];
        let belady = vec![20; 100];
        let half: Vec<u32> = (0..100u32).map(|i| 14 + i % 3).collect();
        let (p, [lo, hi]) = gap_closed(&half, &lru, &belady, 1).unwrap();
        assert!((p - 0.499).abs() < 0.01, "{p}");
        assert!(lo <= p && p <= hi && hi - lo < 0.1, "{lo} {p} {hi}");
        assert_eq!(gap_closed(&lru, &lru, &belady, 1).unwrap().0, 0.0);
        assert_eq!(gap_closed(&lru, &lru, &lru, 1), None);
        let barely: Vec<u32> = (0..100).map(|i| 10 + u32::from(i == 0)).collect();
        assert_eq!(gap_closed(&half, &lru, &barely, 1), None);
    }

    #[test]
    fn policies_by_name() {
        assert_eq!(block_policy("lru", 20).unwrap(), Some(EvictionPolicy::LRU));
        assert_eq!(block_policy("belady", 20).unwrap(), None);
        assert_eq!(
            block_policy("protect", 30).unwrap(),
            Some(EvictionPolicy::protect(30))
        );
        assert!(block_policy("mru", 20).is_err());
        assert!(block_policy("protect", 0).is_err());
        assert!(block_policy("protect", 101).is_err());
    }
}
