//! Sharing between sequences (fork, `share_prefix`), the sliding window,
//! and freeing a sequence.
#![allow(
    clippy::cast_possible_truncation,
    reason = "block and token counts are checked against u32 limits before narrowing"
)]

use crate::cache::{HOLE, KvCache, SeqSlot, row_of, row_of_mut};
use crate::error::{Error, Result};
use crate::hash::BlockHasher;
use crate::ids::{BlockHash, BlockId, PoolId, SeqId};
use crate::pool::{BlockPool, Retention};
use crate::slab::NIL;

/// Copies `len` elements from `src` to `dst` within one slice, where the two
/// ranges are rows of different sequences (never overlapping).
fn copy_rows<T: Copy>(v: &mut [T], src: usize, dst: usize, len: usize) {
    if src == dst || len == 0 {
        return;
    }
    if let Ok([a, b]) = v.get_disjoint_mut([src..src + len, dst..dst + len]) {
        for (d, s) in b.iter_mut().zip(a.iter()) {
            *d = *s;
        }
    }
}

/// Adds a holder to each block of `blocks`; all or nothing.
fn add_refs(p: &mut BlockPool<'_>, blocks: &[BlockId]) -> Result<()> {
    for (k, &b) in blocks.iter().enumerate() {
        if let Err(e) = p.add_ref(b) {
            for &u in blocks.iter().take(k) {
                let _ = p.release(u);
            }
            return Err(e);
        }
    }
    Ok(())
}

impl<H: BlockHasher> KvCache<'_, H> {
    /// Keeps only the blocks that overlap the last `tokens` tokens (0: no
    /// window). Blocks that left the window are released now, of the first
    /// `written` tokens (those whose KV exists: a new request's prefix hits,
    /// not the prompt it is about to prefill, whose first positions still
    /// attend to earlier ones), and on every later append. Returns the
    /// blocks released now.
    pub fn set_window(&mut self, id: SeqId, tokens: u32, written: u32) -> Result<u32> {
        let (s, pi) = self.active(id)?;
        let mut slot = *s;
        slot.window = tokens;
        let bs = self.bs;
        let p = self
            .pools
            .get_mut(pi)
            .ok_or(Error::UnknownPool(PoolId(slot.pool)))?;
        let row = row_of_mut(&mut self.tables, id.index, self.width);
        let written = written.min(slot.tokens);
        let freed = Self::apply_window(&mut slot, p, row, bs, written)?;
        if freed > 0 {
            slot.edits = slot.edits.wrapping_add(1);
        }
        if let Some(e) = self.seqs.at_mut(id.index) {
            *e = slot;
        }
        Ok(freed)
    }

    /// Releases the blocks no position from `written` on attends to: the
    /// step computes positions `written..tokens`, and position `p` attends
    /// to the window's tokens up to it, `p + 1 - window ..= p` (a block
    /// that receives tokens of the current step also stays until the next
    /// one, or it would be published, and reusable, before its KV exists).
    pub(crate) fn apply_window(
        slot: &mut SeqSlot,
        p: &mut BlockPool<'_>,
        row: &mut [BlockId],
        bs: crate::blocksize::BlockSize,
        written: u32,
    ) -> Result<u32> {
        if slot.window == 0 || slot.tokens <= slot.window {
            return Ok(0);
        }
        let start = slot
            .tokens
            .min(written.saturating_add(1))
            .saturating_sub(slot.window);
        let keep_from = (start / bs).min(slot.blocks);
        let mut freed = 0;
        while slot.first_live < keep_from {
            let Some(e) = row.get_mut(slot.first_live as usize) else {
                break;
            };
            let b = core::mem::replace(e, HOLE);
            p.release(b)?;
            slot.first_live += 1;
            freed += 1;
        }
        Ok(freed)
    }

    /// A child sharing every written block of `parent` (parallel sampling,
    /// beam search; not its reserved lookahead slots). The first append to a shared, partly filled last block copies
    /// it (copy-on-write). O(blocks).
    pub fn fork(&mut self, parent: SeqId) -> Result<SeqId> {
        let (s, pi) = self.active(parent)?;
        // The child shares the written blocks, not the parent's lookahead.
        let s = SeqSlot {
            reserve: 0,
            blocks: self.blocks_for(u64::from(s.tokens)) as u32,
            ..*s
        };
        let ci = self.seqs.vacant().ok_or(Error::TooManySequences {
            capacity: self.seqs.capacity(),
        })?;
        let p = self
            .pools
            .get_mut(pi)
            .ok_or(Error::UnknownPool(PoolId(s.pool)))?;
        let live = row_of(&self.tables, parent.index, self.width)
            .get(s.first_live as usize..s.blocks as usize)
            .unwrap_or(&[]);
        add_refs(p, live)?;
        let w = self.width;
        copy_rows(
            &mut self.tables,
            parent.index as usize * w,
            ci as usize * w,
            s.blocks as usize,
        );
        let tw = self.bs.get() as usize;
        copy_rows(
            &mut self.pending,
            parent.index as usize * tw,
            ci as usize * tw,
            tw,
        );
        let (index, generation) = self.seqs.insert(s).ok_or(Error::TooManySequences {
            capacity: self.seqs.capacity(),
        })?;
        Ok(SeqId { index, generation })
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
            return Err(Error::DifferentPools {
                source: PoolId(s.pool),
                target: PoolId(t.pool),
            });
        }
        if t.tokens != 0 || t.blocks != 0 {
            return Err(Error::TargetNotEmpty(target));
        }
        let bs = self.bs;
        let resident = s.tokens - s.first_live * bs.get();
        if tokens > s.tokens || (s.first_live > 0 && tokens > 0) {
            return Err(Error::TooManyTokens {
                requested: u64::from(tokens),
                available: if s.first_live > 0 { 0 } else { resident },
            });
        }
        let k = self.blocks_for(u64::from(tokens)) as u32;
        let p = self
            .pools
            .get_mut(pi)
            .ok_or(Error::UnknownPool(PoolId(s.pool)))?;
        let src_row = row_of(&self.tables, source.index, self.width);
        add_refs(p, src_row.get(..k as usize).unwrap_or(&[]))?;
        // Chain state: the target's keyed prefix is the source's, cut at `tokens`.
        let keyed = s.keyed_blocks.min(tokens / bs);
        let rem = tokens % bs;
        let mut hashing = s.hashing;
        let tip = if keyed == 0 {
            self.hasher.root(s.salt)
        } else if keyed == s.keyed_blocks {
            s.tip
        } else {
            let b = src_row.get(keyed as usize - 1).copied().unwrap_or(HOLE);
            match p.key_of(b).ok().flatten() {
                Some(key) => key,
                None => {
                    hashing = false;
                    BlockHash(0)
                }
            }
        };
        let w = self.width;
        copy_rows(
            &mut self.tables,
            source.index as usize * w,
            target.index as usize * w,
            k as usize,
        );
        if rem > 0 {
            // The partial block's tokens are known only if it is the source's partial block.
            let written = s.tokens / bs + u32::from(s.tokens % bs != 0);
            if hashing && k == written && s.tokens % bs != 0 {
                let tw = bs.get() as usize;
                copy_rows(
                    &mut self.pending,
                    source.index as usize * tw,
                    target.index as usize * tw,
                    rem as usize,
                );
            } else {
                hashing = false;
            }
        }
        if let Some(slot) = self.seqs.at_mut(target.index) {
            slot.edits = slot.edits.wrapping_add(1);
            slot.tokens = tokens;
            slot.blocks = k;
            slot.keyed_blocks = keyed;
            slot.tip = tip;
            slot.hashing = hashing && (keyed == tokens / bs);
            slot.lossy = s.lossy && tokens > 0;
        }
        Ok(())
    }

    /// Frees a sequence: its blocks lose a holder, tail first (a finished
    /// request's last blocks are evicted first). The id becomes stale.
    pub fn free(&mut self, id: SeqId) -> Result<()> {
        let s = *self.slot(id)?;
        if s.plan != NIL {
            return Err(Error::SequenceBusy(id));
        }
        let pi = self.pool_index(PoolId(s.pool))?;
        let p = self
            .pools
            .get_mut(pi)
            .ok_or(Error::UnknownPool(PoolId(s.pool)))?;
        let row = row_of(&self.tables, id.index, self.width);
        let first = s.first_live as usize;
        let live = row.get(first..s.blocks as usize).unwrap_or(&[]);
        if !p.is_ranked() {
            for &b in live.iter().rev() {
                p.release(b)?;
            }
            self.seqs.remove(id.index);
            return Ok(());
        }
        for (j, &b) in live.iter().enumerate().rev() {
            let j = (first + j) as u32;
            // The eviction policy's signals: the leading prefix hits, and
            // the chain's deepest block this sequence computed when its
            // keys were given (a trace's or a router's block hashes: the
            // last one covers the prompt's end, usually inside its block,
            // which the next turn rewrites). With token ids the partial
            // block is never published: the deepest one is full, and the
            // next turn reads it.
            let want = if j < s.hits {
                Retention::High
            } else if j + 1 == s.keyed_blocks && !s.hashing {
                Retention::Low
            } else {
                Retention::Normal
            };
            p.release_as(b, want)?;
        }
        self.seqs.remove(id.index);
        Ok(())
    }
}
