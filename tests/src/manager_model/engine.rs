//! The engine-facing half of the manager model: per-request answers,
//! batched steps and kernel tables, scheduler preemption, and the event
//! mirror a KV-aware router keeps.

use std::collections::{BTreeMap, BTreeSet};

use pagedkv_manager::{
    Allocation, BlockTable, Device, ExportItem, ExtendItem, Extension, KernelTables, ManagerError,
    ManagerEvent, MultiDeviceCacheManager, PreemptMode, Preemption, PreemptionPolicy, RequestId,
    Tier,
};

use super::{BS, MOp, ManagerModel};
use crate::block_on;

/// The keys a router believes each tier holds, from the events alone.
#[derive(Default)]
pub(super) struct Mirror {
    tiers: BTreeMap<Tier, BTreeSet<u128>>,
}

/// Request ids of a list of preemptions.
fn ids(p: &[Preemption]) -> impl Iterator<Item = RequestId> + '_ {
    p.iter().map(|p| p.request)
}

impl ManagerModel {
    /// Checks an allocation's answer against the prompt of `len` tokens and
    /// its chunk; returns the prefix-hit blocks.
    pub(super) fn check_allocation(
        &mut self,
        a: &Allocation,
        len: usize,
        chunk: Option<usize>,
    ) -> usize {
        let hits = (a.device_hit_blocks + a.host_hit_blocks) as usize;
        assert_eq!(
            a.computed_tokens,
            hits * BS,
            "computed tokens are the hits'"
        );
        let placed = chunk.map_or(len, |c| (hits * BS + c).min(len));
        assert_eq!(a.placed_tokens, placed, "hits and one chunk placed");
        assert_eq!(
            a.blocks as usize,
            placed.div_ceil(BS),
            "blocks of the placed tokens"
        );
        self.chunked += u64::from(placed < len);
        self.note_answer(&a.preempted);
        hits
    }

    /// Preemptions an answer reported: only the manager makes them, only
    /// under its policy.
    fn note_answer(&mut self, p: &[Preemption]) {
        assert!(
            p.is_empty() || self.policy == PreemptionPolicy::Automatic,
            "the manager preempted under the scheduler's policy: {p:?}"
        );
        assert!(p.iter().all(|p| p.mode == PreemptMode::Swap));
        self.answered.extend(ids(p));
    }

    /// The ids of `n` new tokens of request `id`: its pending prompt first.
    pub(super) fn next_tokens(&self, id: u64, n: usize) -> Vec<u32> {
        let r = &self.reqs[&id];
        let old = r.tokens.len();
        r.pending
            .iter()
            .copied()
            .chain((r.pending.len()..).map(|i| 200 + (old + i) as u32 % 13))
            .take(n)
            .collect()
    }

    /// Records a done extension of `id` by `new` (ids the manager knows
    /// when `known`), holding `lookahead` slots; the "kernel" writes its KV.
    pub(super) fn extended(&mut self, id: u64, new: Vec<u32>, known: bool, lookahead: u32) {
        let old = self.reqs[&id].tokens.len();
        let r = self.reqs.get_mut(&id).expect("picked");
        if known {
            let used = new.len().min(r.pending.len());
            r.pending.drain(..used);
        } else {
            r.pending.clear();
        }
        r.tokens.extend(new);
        r.lookahead = lookahead;
        // Appending brings a compressed request back, decompressed.
        self.write(id, old / BS);
    }

    /// Checks an extension's answer: blocks added and released are the
    /// table's change, the table covers the tokens and the lookahead.
    pub(super) fn check_extension(
        &mut self,
        id: u64,
        x: &Extension,
        blocks_before: usize,
        n: usize,
        lookahead: u32,
    ) {
        let r = &self.reqs[&id];
        let after = r.handle.block_table().physical_blocks.len();
        let want = (r.tokens.len() + n + lookahead as usize).div_ceil(BS);
        assert_eq!(after, want, "req {id}: table covers tokens and lookahead");
        assert_eq!(
            after as i64 - blocks_before as i64,
            i64::from(x.new_blocks) - i64::from(x.released_blocks),
            "req {id}: {x:?} is not the table's change"
        );
        assert!(x.copies <= 1, "req {id}: one partial block at most");
        self.copies += u64::from(x.copies);
        self.lookaheads += u64::from(lookahead > 0);
        self.note_answer(&x.preempted);
    }

    /// A decode step: `extend_batch` by one known token each, then the
    /// batch's kernel tables, checked against every request's table.
    pub(super) fn batch(&mut self, first: u8, count: u8, look: u8) {
        let n = self.reqs.len();
        if n == 0 {
            return;
        }
        let lookahead = u32::from(look % 3);
        let picked: Vec<u64> = self
            .reqs
            .iter()
            .cycle()
            .skip(first as usize % n)
            .take((count as usize % 4 + 1).min(n))
            .filter(|(_, r)| r.tokens.len() + 1 + lookahead as usize <= 64)
            .map(|(&id, _)| id)
            .collect();
        let new: Vec<Vec<u32>> = picked.iter().map(|&id| self.next_tokens(id, 1)).collect();
        let before: Vec<(Option<Device>, BlockTable)> = picked
            .iter()
            .map(|&id| {
                let rid = RequestId(id);
                (
                    self.m.get_cache_device(rid),
                    self.reqs[&id].handle.block_table(),
                )
            })
            .collect();
        let items: Vec<ExtendItem<'_>> = picked
            .iter()
            .zip(&new)
            .map(|(&id, t)| ExtendItem {
                request: RequestId(id),
                tokens: Some(t),
                count: 1,
                lookahead,
            })
            .collect();
        let mut out = Vec::new();
        block_on(self.m.extend_batch(&items, &mut out));
        assert_eq!(out.len(), items.len(), "one answer per item");
        let mut exports = Vec::new();
        for ((&id, t), (r, (place, table))) in picked.iter().zip(new).zip(out.iter().zip(before)) {
            match r {
                Ok(x) => {
                    self.check_extension(id, x, table.physical_blocks.len(), 1, lookahead);
                    self.extended(id, t, true, lookahead);
                    exports.push(ExportItem {
                        request: RequestId(id),
                        new_tokens: 1,
                        lookahead,
                    });
                }
                Err(e) => {
                    self.assert_acceptable(e, &MOp::Batch { first, count, look });
                    let now = self.reqs[&id].handle.block_table();
                    assert_eq!(now.sequence_length, table.sequence_length, "refused, grown");
                    // Another item's room may have preempted it: the step
                    // then requires its event (`check_preemptions_reported`).
                    let now_place = self.m.get_cache_device(RequestId(id));
                    if place != Some(Device::Cpu) && now_place != Some(Device::Cpu) {
                        assert_eq!(
                            (now_place, now),
                            (place, table),
                            "a refused batch item changed its request: {e} (answered {:?}, reported {:?})",
                            self.answered,
                            self.reported
                        );
                    }
                }
            }
        }
        self.check_exports(&exports);
    }

    /// Exports the kernel tables of `items` and checks each entry against
    /// the requests' block tables.
    fn check_exports(&mut self, items: &[ExportItem]) {
        // Every few exports start from fresh tables; the others reuse the
        // last ones (incremental block tables).
        if self.batched.is_multiple_of(7) {
            self.tables = KernelTables {
                pad: -1,
                ..KernelTables::default()
            };
        }
        let r = self.m.export_tables(items, &mut self.tables);
        let t = &self.tables;
        let off_device = items
            .iter()
            .any(|it| !matches!(self.m.get_cache_device(it.request), Some(Device::Gpu(_))));
        if let Err(e) = r {
            // A later item's room may have preempted an earlier one.
            assert!(off_device, "export refused: {e}");
            assert!(
                t.block_tables.is_empty()
                    && t.exported.is_empty()
                    && t.exported_indices.is_empty()
                    && t.indices.is_empty(),
                "a refused export left rows behind"
            );
            return;
        }
        assert!(!off_device, "exported a request off its device");
        let width = t.max_blocks;
        assert_eq!(t.block_tables.len(), items.len() * width);
        assert_eq!(t.indptr.first(), Some(&0));
        let mut slots = t.slot_mapping.iter();
        for (i, it) in items.iter().enumerate() {
            let table = self.reqs[&it.request.0].handle.block_table();
            let ids: Vec<i32> = table.physical_blocks.iter().map(|b| b.0 as i32).collect();
            let row = &t.block_tables[i * width..(i + 1) * width];
            assert_eq!(&row[..ids.len()], &ids[..], "block_tables row {i}");
            assert!(row[ids.len()..].iter().all(|&x| x == -1), "row {i} padding");
            let tokens = table.sequence_length;
            let first = tokens - it.new_tokens as usize;
            for pos in first..tokens + it.lookahead as usize {
                let want = i64::from(ids[pos / BS]) * BS as i64 + (pos % BS) as i64;
                assert_eq!(slots.next(), Some(&want), "slot of token {pos} of item {i}");
            }
            let pages = tokens.div_ceil(BS);
            let (a, b) = (t.indptr[i] as usize, t.indptr[i + 1] as usize);
            assert_eq!(
                &t.indices[a..b],
                &ids[..pages],
                "FlashInfer pages of item {i}"
            );
            let last = if pages == 0 {
                0
            } else {
                tokens - (pages - 1) * BS
            };
            assert_eq!(
                t.last_page_len[i] as usize, last,
                "last_page_len of item {i}"
            );
        }
        assert_eq!(slots.next(), None, "slot_mapping has no extra entries");
        self.batched += items.len() as u64;
    }

    /// The scheduler preempts request `id`.
    pub(super) fn preempt(&mut self, id: u64, recompute: bool) -> Result<(), ManagerError> {
        let rid = RequestId(id);
        let mode = if recompute {
            PreemptMode::Recompute
        } else {
            PreemptMode::Swap
        };
        let live = {
            let t = self.reqs[&id].handle.block_table();
            t.physical_blocks.len()
        };
        let p = block_on(self.m.preempt(rid, mode))?;
        assert_eq!((p.request, p.mode), (rid, mode));
        assert_eq!(p.blocks as usize, live, "the blocks it held");
        self.preemptions += 1;
        if recompute {
            let r = self.reqs.remove(&id).expect("picked");
            assert!(!r.handle.is_valid(), "a recomputed request is freed");
        } else {
            assert_eq!(self.m.get_cache_device(rid), Some(Device::Cpu));
        }
        Ok(())
    }

    /// Drains the events into the mirror; it must agree with the cache's
    /// indexed keys on every tier.
    pub(super) fn mirror_events(&mut self) {
        let mut events = Vec::new();
        self.m.drain_events(&mut events);
        for e in events {
            match e {
                ManagerEvent::Stored { tier, keys, .. } => {
                    let set = self.mirror.tiers.entry(tier).or_default();
                    for k in keys {
                        assert!(set.insert(k.0), "{tier:?}: key stored twice");
                        self.events += 1;
                    }
                }
                ManagerEvent::Removed { tier, keys } => {
                    let set = self.mirror.tiers.entry(tier).or_default();
                    for k in keys {
                        assert!(set.remove(&k.0), "{tier:?}: a key removed unstored");
                        self.events += 1;
                    }
                }
                ManagerEvent::Cleared { tier } => {
                    self.mirror.tiers.remove(&tier);
                }
                ManagerEvent::Preempted(p) => self.reported.push(p.request),
                ManagerEvent::Lost { count } => panic!("{count} events lost"),
            }
        }
        let indexed = self.m.indexed_keys();
        let tiers = [
            Tier::Device(Device::Gpu(0)),
            Tier::Device(Device::Gpu(1)),
            Tier::Host,
        ];
        for (pool, tier) in tiers.iter().enumerate() {
            let mirrored = self.mirror.tiers.get(tier).map_or(0, BTreeSet::len);
            assert_eq!(
                mirrored, indexed[pool] as usize,
                "{tier:?}: the mirror drifted"
            );
        }
        // Compression pools never publish.
        assert!(indexed.iter().skip(tiers.len()).all(|&k| k == 0));
    }

    /// Every request that left its device during the step either was the
    /// call's own target (a swap, a move, a preemption it asked for) or was
    /// preempted with a report: in the answer and as an event.
    pub(super) fn check_preemptions_reported(
        &mut self,
        op: &MOp,
        target: Option<u64>,
        before: &[(u64, Option<Device>, BlockTable)],
    ) {
        for id in &self.answered {
            assert!(
                self.reported.contains(id),
                "{op:?}: {id} answered, no event"
            );
        }
        self.preemptions += self.answered.len() as u64;
        for (id, was, _) in before {
            if Some(*id) == target || !matches!(was, Some(Device::Gpu(_))) {
                continue;
            }
            if self.m.get_cache_device(RequestId(*id)) == Some(Device::Cpu) {
                assert!(
                    self.reported.contains(&RequestId(*id)),
                    "{op:?}: request {id} was preempted silently"
                );
            }
        }
    }
}
