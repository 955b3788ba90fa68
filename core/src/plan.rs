//! Two-phase moves: a plan reserves its target blocks, the caller copies
//! (the backend's job), then commits (targets published, sources released)
//! or aborts (targets returned, nothing moved). Every move that crosses
//! memory is one: swap out and in, moves between devices, relocation for
//! defragmentation, copy-on-write ahead of an append, and the tier moves of
//! cached blocks (offload, promote; see `tier.rs`).
//!
//! A plan holds a reference on each of its target blocks (and, for tier
//! plans, on its source blocks) until it ends, so nothing it reads or writes
//! is evicted or reused while the copy is in flight, and no target is
//! published before its copy landed.
#![allow(
    clippy::cast_possible_truncation,
    reason = "plan lengths are below max_blocks_per_seq (u32)"
)]

pub use crate::batch::BlockCopy;
use crate::cache::{HOLE, KvCache, SeqSlot, row_of, row_of_mut};
use crate::error::{Error, Result};
use crate::hash::BlockHasher;
use crate::ids::{BlockHash, BlockId, PlanId, PoolId, SeqId};
use crate::pool::{BlockPool, PoolKind};
use crate::slab::{Entry, Links, NIL, Slab};

/// What a plan does.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum PlanKind {
    /// A sequence to another pool; `lossy`: the copy changes the bytes
    /// (quantization), so no key follows the blocks.
    Move { lossy: bool },
    /// A sequence's blocks past its pool's capacity to blocks below it.
    Relocate,
    /// A sequence's shared or published partial last block to a private copy.
    Cow,
    /// Cached blocks to another tier (see `tier.rs`).
    Offload,
    /// Cached blocks back from another tier (see `tier.rs`).
    Promote,
}

/// A pending two-phase move (opaque; `EMPTY` for static storage).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct PlanSlot {
    pub(crate) links: Links,
    pub(crate) kind: PlanKind,
    /// The sequence moved, or `NIL` for a tier plan.
    pub(crate) seq: u32,
    pub(crate) src: u16,
    pub(crate) dst: u16,
    pub(crate) len: u32,
}

impl PlanSlot {
    /// An unused slot.
    pub const EMPTY: Self = Self {
        links: Links::EMPTY,
        kind: PlanKind::Relocate,
        seq: NIL,
        src: 0,
        dst: 0,
        len: 0,
    };
}

impl Entry for PlanSlot {
    const EMPTY: Self = PlanSlot::EMPTY;
    fn links(&self) -> &Links {
        &self.links
    }
    fn links_mut(&mut self) -> &mut Links {
        &mut self.links
    }
}

/// Whether a copy reproduces the bytes exactly.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Fidelity {
    /// A plain copy: the target blocks are published under the source keys.
    Exact,
    /// A transform that changes the bytes (quantization): the target blocks
    /// are never published, and the sequence stops publishing its blocks
    /// (its later KV is computed over lossy KV).
    Lossy,
}

/// A pending move, as [`KvCache::plan`] shows it.
#[derive(Clone, Copy, Debug)]
pub struct PlanView<'c> {
    /// The sequence moved (`None` for a tier move of cached blocks).
    pub seq: Option<SeqId>,
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
    /// The copies, in table order (blocks a plan keeps in place, or holds
    /// without copying, are not listed).
    pub fn copies(&self) -> impl Iterator<Item = BlockCopy> + 'c {
        let same = self.src_pool == self.dst_pool;
        self.sources
            .iter()
            .zip(self.targets)
            .filter(move |&(&s, &d)| s != HOLE && !(same && s == d))
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

/// Which pools a sequence move may go between.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Route {
    SwapOut,
    SwapIn,
    Any,
    Same,
}

/// See [`KvCache::plan_sources`] (a free function, so callers can borrow
/// other fields mutably meanwhile).
fn sources_of<'s>(
    plan_sources: &'s [BlockId],
    tables: &'s [BlockId],
    seqs: &Slab<'_, SeqSlot>,
    width: usize,
    index: u32,
    p: &PlanSlot,
) -> &'s [BlockId] {
    let sources = if p.seq == NIL {
        row_of(plan_sources, index, width)
    } else {
        let first = seqs.at(p.seq).map_or(0, |s| s.first_live as usize);
        row_of(tables, p.seq, width).get(first..).unwrap_or(&[])
    };
    sources.get(..p.len as usize).unwrap_or(&[])
}

/// Two distinct pools of `pools`, mutably (or the one, twice, as `None`).
pub(crate) fn two_pools<'p, 'a>(
    pools: &'p mut [BlockPool<'a>],
    src: usize,
    dst: usize,
) -> Result<(&'p mut BlockPool<'a>, Option<&'p mut BlockPool<'a>>)> {
    if src == dst {
        let p = pools.get_mut(src).ok_or(Error::TooManyPools)?;
        return Ok((p, None));
    }
    let [a, b] = pools
        .get_disjoint_mut([src, dst])
        .map_err(|_| Error::TooManyPools)?;
    Ok((a, Some(b)))
}

impl<H: BlockHasher> KvCache<'_, H> {
    /// Plans moving a sequence from its device pool to host pool `to`.
    pub fn swap_out(&mut self, id: SeqId, to: PoolId) -> Result<PlanId> {
        self.plan_seq(id, to, Route::SwapOut, PlanKind::Move { lossy: false })
    }

    /// Plans moving a swapped-out sequence back to device pool `to`.
    pub fn swap_in(&mut self, id: SeqId, to: PoolId) -> Result<PlanId> {
        self.plan_seq(id, to, Route::SwapIn, PlanKind::Move { lossy: false })
    }

    /// [`swap_out`](Self::swap_out) through a transform of the given
    /// fidelity (for example quantization into a compressed pool).
    pub fn swap_out_as(&mut self, id: SeqId, to: PoolId, fidelity: Fidelity) -> Result<PlanId> {
        let lossy = fidelity == Fidelity::Lossy;
        self.plan_seq(id, to, Route::SwapOut, PlanKind::Move { lossy })
    }

    /// [`swap_in`](Self::swap_in) through a transform of the given fidelity.
    pub fn swap_in_as(&mut self, id: SeqId, to: PoolId, fidelity: Fidelity) -> Result<PlanId> {
        let lossy = fidelity == Fidelity::Lossy;
        self.plan_seq(id, to, Route::SwapIn, PlanKind::Move { lossy })
    }

    /// Plans moving a sequence to any other pool (for example another device).
    pub fn move_to(&mut self, id: SeqId, to: PoolId) -> Result<PlanId> {
        self.plan_seq(id, to, Route::Any, PlanKind::Move { lossy: false })
    }

    /// Plans moving the sequence's blocks that lie at or past its pool's
    /// [`capacity`](BlockPool::capacity) (after [`shrink`](Self::shrink)) to
    /// blocks below it, in the same pool: the step of a defragmentation.
    /// Blocks already below stay (the plan copies only the others).
    pub fn relocate(&mut self, id: SeqId) -> Result<PlanId> {
        let pool = PoolId(self.slot(id)?.pool);
        self.plan_seq(id, pool, Route::Same, PlanKind::Relocate)
    }

    /// Plans the copy-on-write an append to `id` needs first, if any: its
    /// partly filled last block is shared, or published under a key. The
    /// source stays held until the commit, so no other request can take it
    /// while the copy is in flight; after the commit the append writes in
    /// place. `None`: no copy needed.
    pub fn cow(&mut self, id: SeqId) -> Result<Option<PlanId>> {
        let (s, pi) = self.active(id)?;
        if !self.last_needs_copy(id.index, s, pi)? {
            return Ok(None);
        }
        let pool = PoolId(s.pool);
        self.plan_seq(id, pool, Route::Same, PlanKind::Cow)
            .map(Some)
    }

    /// Live sequences holding blocks at or past their pool's capacity.
    pub fn draining_seqs(&self, pool: PoolId) -> impl Iterator<Item = SeqId> + '_ {
        let online = self.pool(pool).map(|p| p.capacity()).unwrap_or(u32::MAX);
        self.seqs
            .iter()
            .filter(move |(i, s)| {
                s.pool == pool.0
                    && row_of(&self.tables, *i, self.width)
                        .get(s.first_live as usize..s.blocks as usize)
                        .unwrap_or(&[])
                        .iter()
                        .any(|b| b.0 >= online)
            })
            .map(|(i, _)| self.seq_id(i))
    }

    fn plan_seq(&mut self, id: SeqId, to: PoolId, route: Route, kind: PlanKind) -> Result<PlanId> {
        let s = *self.slot(id)?;
        if s.plan != NIL {
            return Err(Error::SequenceBusy(id));
        }
        let src = self.pool_index(PoolId(s.pool))?;
        let dst = self.pool_index(to)?;
        let kind_of = |i: usize| self.pools.get(i).map(BlockPool::kind);
        let (sk, dk) = (kind_of(src), kind_of(dst));
        match route {
            Route::SwapOut if sk != Some(PoolKind::Device) => return Err(Error::NotOnDevice(id)),
            Route::SwapOut if dk != Some(PoolKind::Host) => return Err(Error::WrongPoolKind(to)),
            Route::SwapIn if sk != Some(PoolKind::Host) => return Err(Error::NotSwappedOut(id)),
            Route::SwapIn if dk != Some(PoolKind::Device) => return Err(Error::WrongPoolKind(to)),
            _ => {}
        }
        if src == dst && route != Route::Same {
            return Err(Error::SamePool(to));
        }
        let n = (s.blocks - s.first_live) as usize;
        let online = self.pools.get(src).map_or(0, BlockPool::capacity);
        let partial = self
            .partial_block(&s)
            .and_then(|k| k.checked_sub(s.first_live))
            .map(|k| k as usize);
        // Positions that move: all, those out of service, or the partial one.
        let moving = |k: usize, b: BlockId| match kind {
            PlanKind::Relocate => b.0 >= online,
            PlanKind::Cow => Some(k) == partial,
            _ => true,
        };
        let live = row_of(&self.tables, id.index, self.width)
            .get(s.first_live as usize..s.blocks as usize)
            .unwrap_or(&[]);
        let m = live
            .iter()
            .enumerate()
            .filter(|&(k, &b)| moving(k, b))
            .count();
        let dst_pool = self.pools.get_mut(dst).ok_or(Error::UnknownPool(to))?;
        if m as u64 > u64::from(dst_pool.max_blocks()) {
            return Err(Error::LargerThanPool {
                needed: m as u64,
                capacity: dst_pool.max_blocks(),
            });
        }
        let pi = self.plans.vacant().ok_or(Error::TooManyPlans {
            capacity: self.plans.capacity(),
        })?;
        let targets = row_of_mut(&mut self.plan_targets, pi, self.width);
        dst_pool.allocate(targets.get_mut(..m).unwrap_or(&mut []))?;
        if m < n {
            // Spread the fresh blocks to the positions that move (from the
            // back, so no fresh block is overwritten before it is placed);
            // the others keep their own block (no copy).
            let mut j = m;
            for k in (0..n).rev() {
                let b = live.get(k).copied().unwrap_or(HOLE);
                let t = if moving(k, b) {
                    j -= 1;
                    targets.get(j).copied().unwrap_or(HOLE)
                } else {
                    b
                };
                if let Some(e) = targets.get_mut(k) {
                    *e = t;
                }
            }
        }
        let plan = PlanSlot {
            kind,
            seq: id.index,
            src: s.pool,
            dst: to.0,
            len: n as u32,
            ..PlanSlot::EMPTY
        };
        self.insert_plan(plan, Some(id))
    }

    /// Records a plan whose targets (and sources) are in place.
    pub(crate) fn insert_plan(&mut self, plan: PlanSlot, seq: Option<SeqId>) -> Result<PlanId> {
        let (index, generation) = self.plans.insert(plan).ok_or(Error::TooManyPlans {
            capacity: self.plans.capacity(),
        })?;
        if let Some(s) = seq.and_then(|s| self.seqs.at_mut(s.index)) {
            s.plan = index;
        }
        Ok(PlanId { index, generation })
    }

    fn plan_slot(&self, id: PlanId) -> Result<PlanSlot> {
        self.plans
            .get(id.index, id.generation)
            .copied()
            .ok_or(Error::UnknownPlan(id))
    }

    /// The blocks a plan reads: a sequence's live table entries, or a tier
    /// plan's own sources.
    pub(crate) fn plan_sources(&self, index: u32, p: &PlanSlot) -> &[BlockId] {
        sources_of(
            &self.plan_sources,
            &self.tables,
            &self.seqs,
            self.width,
            index,
            p,
        )
    }

    pub(crate) fn plan_targets(&self, index: u32, p: &PlanSlot) -> &[BlockId] {
        row_of(&self.plan_targets, index, self.width)
            .get(..p.len as usize)
            .unwrap_or(&[])
    }

    /// A pending plan: pools and copies for the backend.
    pub fn plan(&self, id: PlanId) -> Result<PlanView<'_>> {
        let p = self.plan_slot(id)?;
        Ok(PlanView {
            seq: (p.seq != NIL).then(|| self.seq_id(p.seq)),
            src_pool: PoolId(p.src),
            dst_pool: PoolId(p.dst),
            sources: self.plan_sources(id.index, &p),
            targets: self.plan_targets(id.index, &p),
        })
    }

    /// The copies are done: publish and release as the plan's kind says. A
    /// sequence now lives in the target pool, its source blocks lose a
    /// holder (tail first) and, for an exact copy, its keyed blocks are
    /// published in the target pool under the same keys.
    pub fn commit(&mut self, id: PlanId) -> Result<()> {
        let p = self.plan_slot(id)?;
        if p.seq == NIL {
            return self.commit_tier(id, &p);
        }
        let src = self.pool_index(PoolId(p.src))?;
        let dst = self.pool_index(PoolId(p.dst))?;
        let first = self.seqs.at(p.seq).map_or(0, |s| s.first_live as usize);
        let (sp, dp) = two_pools(&mut self.pools, src, dst)?;
        let row = row_of_mut(&mut self.tables, p.seq, self.width);
        let row = row.get_mut(first..).unwrap_or(&mut []);
        let targets = row_of(&self.plan_targets, id.index, self.width);
        match (p.kind, dp) {
            (PlanKind::Relocate | PlanKind::Cow, None) => {
                // Within a pool. A relocation releases first, so the key
                // leaves the index (the old block is out of service) and can
                // follow the block; a copy-on-write leaves the key where it is.
                for (from, &to) in row.iter_mut().zip(targets).take(p.len as usize).rev() {
                    if *from == to {
                        continue;
                    }
                    let key = sp.key_of(*from)?;
                    sp.release(*from)?;
                    let left = sp.key_of(*from)?.is_none();
                    if let (Some(key), PlanKind::Relocate, true) = (key, p.kind, left) {
                        let _ = sp.register(to, key, None);
                    }
                    *from = to;
                }
            }
            (PlanKind::Move { lossy }, Some(dp)) => {
                // (A chain past its window: a target run may hold its keys.)
                if !lossy && (first == 0 || dp.kind() != crate::PoolKind::Device) {
                    let pairs = row.iter().zip(targets).take(p.len as usize);
                    dp.publish_chain(
                        pairs.map(|(&from, &to)| (to, sp.key_of(from).ok().flatten())),
                    );
                }
                for (from, &to) in row.iter_mut().zip(targets).take(p.len as usize).rev() {
                    sp.release(*from)?;
                    *from = to;
                }
            }
            _ => return Err(Error::UnknownPlan(id)),
        }
        if let Some(s) = self.seqs.at_mut(p.seq) {
            s.pool = p.dst;
            s.plan = NIL;
            s.edits = s.edits.wrapping_add(1);
            if p.kind == (PlanKind::Move { lossy: true }) {
                s.lossy = true;
                s.hashing = false;
                s.keyed_blocks = 0;
                s.tip = BlockHash(0);
            }
        }
        self.plans.remove(id.index);
        Ok(())
    }

    /// Cancels a plan: its reserved targets return to the free stack, the
    /// blocks it held are released, and the sequence (if any) is untouched.
    pub fn abort(&mut self, id: PlanId) -> Result<()> {
        let p = self.plan_slot(id)?;
        let src = self.pool_index(PoolId(p.src))?;
        let dst = self.pool_index(PoolId(p.dst))?;
        let sources = sources_of(
            &self.plan_sources,
            &self.tables,
            &self.seqs,
            self.width,
            id.index,
            &p,
        );
        let targets = row_of(&self.plan_targets, id.index, self.width);
        let (sp, mut dp) = two_pools(&mut self.pools, src, dst)?;
        let tier = p.seq == NIL;
        for (&s, &t) in sources.iter().zip(targets).rev() {
            if tier && s != HOLE {
                sp.release(s)?;
            }
            if tier || dp.is_some() || s != t {
                dp.as_deref_mut().unwrap_or(&mut *sp).release(t)?;
            }
        }
        if let Some(s) = self.seqs.at_mut(p.seq) {
            s.plan = NIL;
        }
        self.plans.remove(id.index);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_view_lists_only_real_copies() {
        let b = |i| BlockId(i);
        let (src, dst) = ([b(1), b(2), HOLE], [b(1), b(7), b(8)]);
        let v = |same: bool| PlanView {
            seq: None,
            src_pool: PoolId(0),
            dst_pool: PoolId(u16::from(!same)),
            sources: &src,
            targets: &dst,
        };
        // Same pool: a block kept in place is no copy; a HOLE source never is.
        assert!(v(true).copies().eq([BlockCopy {
            src: b(2),
            dst: b(7)
        }]));
        assert_eq!(v(false).len(), 2);
        let mut out = [BlockCopy {
            src: b(0),
            dst: b(0),
        }; 1];
        assert!(v(false).copies_into(&mut out).is_err());
    }
}
