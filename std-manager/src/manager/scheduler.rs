//! What an engine's scheduler calls each step, with per-request answers:
//! allocate (computed tokens by tier), extend one request or a whole batch
//! (new blocks, copies, lookahead), batched kernel tables into the engine's
//! buffers, explicit preemption, and the cache's events for a router.

use std::time::Instant;

use pagedkv_core::QuantFormat;

use super::{KvManager, ManagedBackend, Place, lock};
use crate::engine::{
    Allocation, ExportItem, ExtendItem, Extension, KernelTables, ManagerEvent, PreemptMode,
    Preemption, Tier,
};
use crate::error::{ManagerError, Result};
use crate::types::{AllocationRequest, RequestId};

impl<B: ManagedBackend> KvManager<B> {
    /// The placeholder answer of a batch item left to the one-by-one path
    /// (which answers a truly unknown `u64::MAX` as unknown too).
    const SLOW: ManagerError = ManagerError::UnknownRequest(RequestId(u64::MAX));

    fn is_slow(r: &Result<Extension>) -> bool {
        matches!(r, Err(ManagerError::UnknownRequest(RequestId(u64::MAX))))
    }

    /// Allocates `req` and says what it got: the prompt tokens already
    /// computed (prefix hits, by tier: skip their prefill), the tokens placed
    /// (the hits and one chunk with `prefill_chunk`), the preemptions made for
    /// it (automatic policy). Without room, and preemption left to the
    /// scheduler: [`ManagerError::NoRoom`] with the blocks missing.
    pub async fn allocate_request(&self, req: &AllocationRequest) -> Result<Allocation> {
        self.allocate_inner(req).await
    }

    /// Extends one request by `item.count` tokens and holds `item.lookahead`
    /// slots reserved past its end. Says what it took: new and released
    /// blocks, copy-on-write copies, whether it was swapped back in first,
    /// preemptions made for it.
    pub async fn extend_request(&self, item: ExtendItem<'_>) -> Result<Extension> {
        self.extend_item(item, &[]).await
    }

    async fn extend_item(&self, item: ExtendItem<'_>, batch: &[RequestId]) -> Result<Extension> {
        if let Some(t) = item.tokens
            && t.len() != item.count as usize
        {
            return Err(crate::InvalidRequest::TokenCount {
                ids: t.len(),
                count: item.count as usize,
            }
            .into());
        }
        self.append(
            item.request,
            item.count as usize,
            item.tokens,
            item.lookahead,
            batch,
        )
        .await
    }

    /// Extends a batch (a decode step): one lock for every request that is
    /// on its device and needs neither a copy nor room; the others one by one,
    /// as [`extend_request`](Self::extend_request), except that automatic
    /// preemption never picks a request of the batch (the KV of their new
    /// slots is not written yet). A request named twice is refused the
    /// second time (`DuplicateRequest`). `out` gets one answer per item, in
    /// order (cleared first; its capacity is reused).
    pub async fn extend_batch(&self, items: &[ExtendItem<'_>], out: &mut Vec<Result<Extension>>) {
        out.clear();
        let mut slow = false;
        {
            let mut guard = lock(&self.shared.inner);
            let inner = &mut *guard;
            inner.batches += 1;
            let (batch, now) = (inner.batches, Instant::now());
            for item in items {
                let answer = match inner.reqs.get_mut(&item.request) {
                    Some(st) if st.mark == batch => {
                        Err(ManagerError::DuplicateRequest(item.request))
                    }
                    Some(st) => {
                        st.mark = batch;
                        st.last_access = now;
                        let seq = st.seq;
                        let stamp = self.window_stamp(st);
                        let ids_match = item.tokens.is_none_or(|t| t.len() == item.count as usize);
                        let on_device = inner.cache.info(seq).is_ok_and(|i| {
                            !i.moving && self.shared.pools.device_of(i.pool).is_some()
                        });
                        let plain = ids_match
                            && on_device
                            && inner
                                .cache
                                .append_needs(seq, item.count)
                                .is_ok_and(|n| !n.cow);
                        match plain {
                            true => Self::core_extend(
                                inner,
                                seq,
                                item.count,
                                item.tokens,
                                item.lookahead,
                                stamp,
                            )
                            .map_err(|_| Self::SLOW),
                            false => Err(Self::SLOW),
                        }
                    }
                    None => Err(ManagerError::UnknownRequest(item.request)),
                };
                slow |= Self::is_slow(&answer);
                out.push(answer);
            }
            // One policy call for the step (the lock order is inner, then
            // the policy's, as when it picks victims).
            let mut done = items
                .iter()
                .zip(out.iter())
                .filter(|(_, r)| r.is_ok())
                .map(|(i, _)| i.request);
            self.shared.policy.record_accesses(&mut done, now);
        }
        if slow {
            let batch: Vec<RequestId> = items.iter().map(|i| i.request).collect();
            for (item, r) in items.iter().zip(out.iter_mut()) {
                if Self::is_slow(r) {
                    *r = self.extend_item(*item, &batch).await;
                }
            }
        }
        self.notify_pressure();
    }

    /// Writes the kernel tables of a batch of requests on their devices
    /// into `tables`, whose buffers the engine owns and reuses (no allocation
    /// once they reached the batch's size): vLLM `block_tables` (rows as wide
    /// as the longest table, which includes lookahead slots) and
    /// `slot_mapping` (each item's new tokens, then its lookahead slots), and
    /// FlashInfer `indptr` / `indices` / `last_page_len`. All or nothing: on
    /// an error (an unknown request, one named twice, one off its device,
    /// more new tokens than it holds or lookahead than it reserved) the
    /// buffers are left empty (and the next export writes every row).
    pub fn export_tables(&self, items: &[ExportItem], tables: &mut KernelTables) -> Result<()> {
        let mut guard = lock(&self.shared.inner);
        let inner = &mut *guard;
        let r = Self::export_into(inner, &self.shared.pools, items, tables);
        if r.is_err() {
            for v in [
                &mut tables.block_tables,
                &mut tables.indptr,
                &mut tables.indices,
            ] {
                v.clear();
            }
            tables.last_page_len.clear();
            tables.slot_mapping.clear();
            tables.exported.clear();
            tables.exported_indices.clear();
            tables.max_blocks = 0;
        }
        r
    }

    fn export_into(
        inner: &mut super::Inner,
        pools: &super::pools::PoolMap,
        items: &[ExportItem],
        tables: &mut KernelTables,
    ) -> Result<()> {
        let mut seqs = std::mem::take(&mut inner.scratch);
        seqs.clear();
        let r = Self::export_with(inner, pools, items, tables, &mut seqs);
        inner.scratch = seqs;
        r
    }

    fn export_with(
        inner: &mut super::Inner,
        pools: &super::pools::PoolMap,
        items: &[ExportItem],
        tables: &mut KernelTables,
        seqs: &mut Vec<pagedkv_core::SeqId>,
    ) -> Result<()> {
        inner.batches += 1;
        let batch = inner.batches;
        let bs = u64::from(inner.cache.config().tokens_per_block);
        let mut max_blocks = 0usize;
        let mut slots = 0u64;
        // Everything is checked before anything is written.
        for it in items {
            let st = inner
                .reqs
                .get_mut(&it.request)
                .ok_or(ManagerError::UnknownRequest(it.request))?;
            if st.mark == batch {
                return Err(ManagerError::DuplicateRequest(it.request));
            }
            st.mark = batch;
            let info = inner.cache.info(st.seq)?;
            if pools.device_of(info.pool).is_none() || info.moving {
                return Err(pagedkv_core::Error::SequenceSwappedOut(st.seq).into());
            }
            let (tokens, new) = (u64::from(info.tokens), u64::from(it.new_tokens));
            let first_kept = u64::from(info.first_live) * bs;
            if new > tokens || tokens - new < first_kept || it.lookahead > info.reserved {
                return Err(pagedkv_core::Error::TooManyTokens {
                    requested: new + u64::from(it.lookahead),
                    available: info
                        .tokens
                        .saturating_sub(info.first_live * inner.cache.config().tokens_per_block)
                        + info.reserved,
                }
                .into());
            }
            max_blocks = max_blocks.max(info.blocks as usize);
            slots += new + u64::from(it.lookahead);
            seqs.push(st.seq);
        }
        let slots = usize::try_from(slots).map_err(|_| pagedkv_core::Error::LengthOverflow)?;
        let n = items.len();
        tables.max_blocks = max_blocks;
        // The rows kept from the last export are rewritten only where their
        // tables changed; rows past the batch are forgotten with their bytes.
        tables.block_tables.resize(n * max_blocks, tables.pad);
        tables.exported.truncate(n);
        tables
            .exported
            .resize(n, pagedkv_core::ExportedRow::default());
        tables.exported_indices.truncate(n);
        tables
            .exported_indices
            .resize(n, pagedkv_core::ExportedRow::default());
        tables.slot_mapping.clear();
        tables.slot_mapping.resize(slots, 0);
        tables.indptr.clear();
        tables.indptr.resize(n + 1, 0);
        tables.last_page_len.clear();
        tables.last_page_len.resize(n, 0);
        let c = &inner.cache;
        c.export_block_tables_since(
            seqs,
            max_blocks,
            tables.pad,
            &mut tables.block_tables,
            &mut tables.exported,
        )?;
        let mut k = 0;
        for (it, &s) in items.iter().zip(seqs.iter()) {
            let info = c.info(s)?;
            let first = info.tokens - it.new_tokens; // checked above
            let count = it.new_tokens + it.lookahead; // at most `slots`
            let out = tables.slot_mapping.get_mut(k..).unwrap_or(&mut []);
            k += c.export_slots(s, first, count, out)?;
        }
        let pages: usize = seqs
            .iter()
            .filter_map(|&s| c.info(s).ok())
            .map(|i| (i.tokens.div_ceil(c.config().tokens_per_block) - i.first_live) as usize)
            .sum();
        // Kept like the block tables: only the spans that changed are written.
        tables.indices.resize(pages, 0);
        c.export_flashinfer_since(
            seqs,
            &mut tables.indptr,
            &mut tables.indices,
            &mut tables.last_page_len,
            &mut tables.exported_indices,
        )?;
        Ok(())
    }

    /// Preempts a request as the scheduler chose: `Swap` moves its KV to the
    /// host tier (any later call on it brings it back); `Recompute` frees it
    /// (its published blocks stay cached for the recomputation to hit). The
    /// preemption is also queued as an event.
    pub async fn preempt(&self, id: RequestId, mode: PreemptMode) -> Result<Preemption> {
        match mode {
            PreemptMode::Swap => {
                let p = self.preempt_swap(id).await?;
                self.notify_pressure();
                Ok(p)
            }
            PreemptMode::Recompute => {
                let blocks = self.held_blocks(id)?;
                self.free_request(id).await?;
                let p = Preemption {
                    request: id,
                    mode,
                    blocks,
                };
                self.record(ManagerEvent::Preempted(p));
                Ok(p)
            }
        }
    }

    /// Compresses a request into its device's pool of `format` (created on
    /// first use; counted in the stats). Lossy: never published.
    pub async fn compress_with(&self, id: RequestId, format: QuantFormat) -> Result<()> {
        let device = {
            let inner = lock(&self.shared.inner);
            inner.req(id)?.device
        };
        // The pool first: a refusal then moves nothing.
        self.compressed_pool(device, format)?;
        self.ensure_on_device(id).await?;
        self.move_request(id, Place::Compressed(device, format))
            .await?;
        self.notify_pressure();
        Ok(())
    }

    /// Moves the events since the last call into `out` (appended): blocks
    /// stored and removed on each device and the host tier (with
    /// `record_events`), then the preemptions; `Lost` last when any were
    /// dropped for want of draining (resynchronize after applying the
    /// others).
    pub fn drain_events(&self, out: &mut Vec<ManagerEvent>) {
        let mut guard = lock(&self.shared.inner);
        let inner = &mut *guard;
        let pools = &self.shared.pools;
        let tiers = pools
            .device_ids()
            .zip(self.shared.devices.iter())
            .map(|(p, &d)| (p, Tier::Device(d)))
            .chain(pools.host().map(|h| (h, Tier::Host)));
        for (pool, tier) in tiers {
            while let Ok(Some(e)) = inner.cache.pop_event(pool) {
                out.push(ManagerEvent::from_core(e, tier));
            }
        }
        out.extend(inner.events.drain(..));
        let lost: u64 = inner
            .cache
            .pools()
            .iter()
            .map(pagedkv_core::BlockPool::events_lost)
            .sum::<u64>()
            + inner.events_lost;
        if lost > inner.lost_reported {
            out.push(ManagerEvent::Lost {
                count: lost - inner.lost_reported,
            });
            inner.lost_reported = lost;
        }
    }
}
