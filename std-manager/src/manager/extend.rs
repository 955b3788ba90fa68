//! Extending a request: room made as the preemption policy says,
//! copy-on-write as a two-phase plan, lookahead slots reserved.
#![allow(
    clippy::cast_possible_truncation,
    reason = "token and block counts are checked against u32 before narrowing"
)]

use std::time::Instant;

use pagedkv_core::SeqId;

use super::preempt::Room;
use super::requests::too_long;
use super::transfer::CopyOp;
use super::wait::backoff;
use super::{Inner, KvManager, ManagedBackend, ReqState, lock};
use crate::engine::Extension;
use crate::error::{InvalidRequest, Result};
use crate::types::RequestId;

/// Waits (growing to 1 ms each, so about a second in all) for another task
/// to finish moving a request before an append gives up.
const BUSY_WAITS: u32 = 1000;

impl<B: ManagedBackend> KvManager<B> {
    /// Appends `n` tokens (ids when known) to a request on its device, then
    /// holds `lookahead` slots reserved past its new end. A shared or
    /// published partial block is first copied by a two-phase plan (its
    /// source stays held until the copy landed); the reservation and the
    /// append then happen in the critical section of the commit. Room is
    /// never made by preempting a request of `batch` (the step's others).
    pub(super) async fn append(
        &self,
        id: RequestId,
        n: usize,
        tokens: Option<&[u32]>,
        lookahead: u32,
        batch: &[RequestId],
    ) -> Result<Extension> {
        let n = u32::try_from(n).map_err(|_| too_long())?;
        // `ensure_on_device_keeping` marks the request used.
        let mut room = {
            let inner = lock(&self.shared.inner);
            let st = inner.req(id)?;
            // Before anything moves (a swap-in, a copy, preemptions).
            self.check_fits(&inner, st, n, lookahead)?;
            Room::on(st.device, Some(id)).keeping(batch)
        };
        let swapped_in = self
            .ensure_on_device_keeping(id, batch, &mut room.preempted)
            .await?;
        let res = loop {
            let r = self.append_once(id, n, tokens, lookahead).await;
            match self.with_room(r, &mut room).await {
                Ok(Some(x)) => break Ok(x),
                Ok(None) => {}
                Err(e) => break Err(e),
            }
        };
        match res {
            Ok(mut x) => {
                self.shared.policy.record_access(id, Instant::now());
                self.notify_pressure();
                x.swapped_in = swapped_in;
                x.preempted = room.preempted;
                Ok(x)
            }
            Err(e) => {
                lock(&self.shared.inner).stats.failures += 1;
                Err(e)
            }
        }
    }

    /// Refuses an extension that can never fit: past the longest sequence,
    /// or more blocks than its device pool has.
    fn check_fits(&self, inner: &Inner, st: &ReqState, n: u32, lookahead: u32) -> Result<()> {
        let info = inner.cache.info(st.seq)?;
        let end = u64::from(info.tokens) + u64::from(n) + u64::from(lookahead);
        let max = self.shared.config.max_sequence_length;
        if end > max as u64 {
            return Err(InvalidRequest::TooLong {
                tokens: usize::try_from(end).unwrap_or(usize::MAX),
                max,
            }
            .into());
        }
        let bs = u64::from(self.shared.config.layout.tokens_per_block);
        let capacity = inner
            .cache
            .pool(self.shared.pools.device(st.device))?
            .max_blocks();
        let needed = end.div_ceil(bs);
        if needed > u64::from(capacity) {
            return Err(pagedkv_core::Error::LargerThanPool { needed, capacity }.into());
        }
        Ok(())
    }

    /// The reservation and append of an extension, in the core, once no copy
    /// is needed. All or nothing. Appending no token changes only the
    /// reservation (an empty append would stop the request's publishing).
    /// With `window` (device, time), the blocks this append may release
    /// from the window's front are stamped first (for the prefix TTL).
    pub(super) fn core_extend(
        inner: &mut Inner,
        seq: SeqId,
        n: u32,
        tokens: Option<&[u32]>,
        lookahead: u32,
        window: Option<(usize, u32)>,
    ) -> Result<Extension> {
        let info = inner.cache.info(seq)?;
        let before = info.reserved;
        if let Some((d, now)) = window {
            let bs = inner.cache.config().tokens_per_block;
            let k = (n / bs + 2) as usize;
            let Inner {
                cache, released_at, ..
            } = &mut *inner;
            if let (Ok(table), Some(stamps)) = (cache.table(seq), released_at.get_mut(d)) {
                for b in table.iter().skip(info.first_live as usize).take(k) {
                    if let Some(s) = stamps.get_mut(b.index()) {
                        *s = now;
                    }
                }
            }
        }
        let delta = inner
            .cache
            .reserve(seq, n.checked_add(lookahead).ok_or_else(too_long)?)?;
        let out = match tokens {
            _ if n == 0 => Ok(pagedkv_core::Appended {
                new_blocks: 0,
                cow: None,
                window_freed: 0,
            }),
            Some(t) => inner.cache.append(seq, t),
            None => inner.cache.append_len(seq, n),
        };
        let out = match out {
            Ok(o) => o,
            Err(e) => {
                // Undo the reservation (it only grew or shrank the tail).
                let _ = inner.cache.reserve(seq, before);
                return Err(e.into());
            }
        };
        Ok(Extension {
            new_blocks: u32::try_from(delta.max(0)).unwrap_or(u32::MAX),
            released_blocks: u32::try_from((-delta).max(0)).unwrap_or(u32::MAX) + out.window_freed,
            copies: u32::from(out.cow.is_some()),
            ..Extension::default()
        })
    }

    async fn append_once(
        &self,
        id: RequestId,
        n: u32,
        tokens: Option<&[u32]>,
        lookahead: u32,
    ) -> Result<Extension> {
        for attempt in 0..BUSY_WAITS {
            let (seq, pool, cow, needed, stamp) = {
                let mut guard = lock(&self.shared.inner);
                let inner = &mut *guard;
                let st = inner.req_mut(id)?;
                st.last_access = Instant::now();
                let seq = st.seq;
                let stamp = self.window_stamp(st);
                let info = inner.cache.info(seq)?;
                match inner.cache.append_needs(seq, n) {
                    Err(pagedkv_core::Error::SequenceBusy(_)) => (seq, info.pool, None, 0, None),
                    Err(e) => return Err(e.into()),
                    Ok(needs) if needs.cow => {
                        let end = u64::from(info.tokens) + u64::from(n) + u64::from(lookahead);
                        let bs = u64::from(self.shared.config.layout.tokens_per_block);
                        let target = u32::try_from(end.div_ceil(bs)).map_err(|_| too_long())?;
                        let needed = target.saturating_sub(info.blocks);
                        (seq, info.pool, inner.cache.cow(seq)?, needed, stamp)
                    }
                    Ok(_) => return Self::core_extend(inner, seq, n, tokens, lookahead, stamp),
                }
            };
            let Some(plan) = cow else {
                // Another task is moving it: let that finish.
                self.shared.timer.sleep(backoff(attempt)).await;
                continue;
            };
            return self
                .run_plan_then(plan, CopyOp::Copy, "copy-on-write", |inner, plan| {
                    let available = inner.cache.pool(pool)?.available();
                    if available < needed {
                        inner.cache.abort(plan)?;
                        return Err(pagedkv_core::Error::OutOfBlocks { needed, available }.into());
                    }
                    inner.cache.commit(plan)?;
                    let mut x = Self::core_extend(inner, seq, n, tokens, lookahead, stamp)?;
                    x.copies += 1;
                    Ok(x)
                })
                .await;
        }
        Err(pagedkv_core::Error::SequenceBusy(self.seq_of(id)?).into())
    }
}
