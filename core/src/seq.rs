//! A sequence's life in one pool: allocate a prompt, append decode tokens
//! (with copy-on-write and a sliding window), fork, share a prefix, free.
#![allow(
    clippy::cast_possible_truncation,
    reason = "block and token counts are checked against u32 limits (table rows, pool capacity, LengthOverflow) before narrowing"
)]

use crate::batch::BlockCopy;
use crate::cache::{KvCache, SeqSlot, row_of_mut};
use crate::error::{Error, Result};
use crate::hash::{BlockHasher, ExtraKeys};
use crate::ids::{BlockHash, CacheSalt, PoolId, SeqId};
use crate::pool::PoolKind;
use crate::prompt::{KeyChain, Prompt};

/// Result of [`KvCache::allocate`].
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Allocated {
    /// The new sequence.
    pub seq: SeqId,
    /// Leading full blocks found in the prefix cache (their KV is computed).
    pub hit_blocks: u32,
    /// Tokens covered by those blocks.
    pub hit_tokens: u32,
    /// Tokens placed (the whole prompt, or its hits and one chunk).
    pub tokens: u32,
}

/// Result of [`KvCache::append`].
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Appended {
    /// Blocks added at the end of the table.
    pub new_blocks: u32,
    /// A copy-on-write the backend must execute (within the sequence's pool)
    /// before the new tokens are written, and before the next call on this
    /// cache: its source block has already lost this sequence as a holder.
    pub cow: Option<BlockCopy>,
    /// Blocks freed at the front by the sliding window.
    pub window_freed: u32,
}

/// What appending tokens to a sequence would take (see [`KvCache::append_needs`]).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct AppendNeeds {
    /// Fresh blocks at the end of the table.
    pub new_blocks: u32,
    /// Whether the partly filled last block must be copied first.
    pub cow: bool,
}

impl<H: BlockHasher> KvCache<'_, H> {
    /// Allocates a sequence for `prompt` in device pool `pool`: leading full
    /// blocks found in the prefix cache are shared, the rest allocated (evicting
    /// cached blocks in LRU order if needed), and new full blocks registered.
    /// All or nothing: a refusal leaves every pool exactly as it was (its
    /// eviction order included). O(blocks) plus one hash per full block.
    pub fn allocate(&mut self, pool: PoolId, prompt: &Prompt<'_>) -> Result<Allocated> {
        self.allocate_chunk(pool, prompt, u32::MAX)
    }

    /// [`allocate`](Self::allocate) for chunked prefill: the prefix cache is
    /// matched over the whole prompt, but only its hits and at most `chunk`
    /// more tokens are placed now ([`Allocated::tokens`]); the rest follows
    /// by [`append`](Self::append) (with the prompt's ids, so its full blocks
    /// are still published). The whole prompt must fit a table row and the pool.
    pub fn allocate_chunk(
        &mut self,
        pool: PoolId,
        prompt: &Prompt<'_>,
        chunk: u32,
    ) -> Result<Allocated> {
        let pi = self.pool_index(pool)?;
        if self.pools.get(pi).map(|p| p.kind()) != Some(PoolKind::Device) {
            return Err(Error::NotADevicePool(pool));
        }
        let nz = self.bs;
        let bs = nz.get();
        let prompt_len = prompt.token_len()?;
        self.check_table_fits(self.blocks_for(u64::from(prompt_len)), pi)?;
        let full = prompt_len / self.bs;
        let si = self.seqs.vacant().ok_or(Error::TooManySequences {
            capacity: self.seqs.capacity(),
        })?;
        let Self {
            hasher,
            pools,
            tables,
            pending,
            width,
            ..
        } = self;
        let chain = KeyChain::new(&*hasher, prompt, bs, full)?;
        let p = pools.get_mut(pi).ok_or(Error::UnknownPool(pool))?;
        let row = row_of_mut(tables, si, *width);

        // Pass 1: pin each hit until the first miss (a key repeated within
        // the prompt counts as a miss): the pool's `available` is then exact.
        let mut tip = chain.root();
        let mut hits = 0u32;
        let mut first_miss: Option<BlockHash> = None;
        let mut last = None;
        while hits < chain.matchable() {
            let key = chain.key(hits, tip);
            match (p.pin_hit(last, key), row.get_mut(hits as usize)) {
                (Some(b), Some(e)) => {
                    *e = b;
                    last = Some(b);
                    tip = key;
                    hits += 1;
                }
                (pinned, _) => {
                    if let Some(b) = pinned {
                        p.unpin_hits(&[b]);
                    }
                    first_miss = Some(key);
                    break;
                }
            }
        }
        // What is placed now: the hits, and up to `chunk` more tokens.
        let len = prompt_len.min((hits * bs).saturating_add(chunk));
        let nblocks = (len / nz + u32::from(len % nz != 0)).max(hits);
        let placed_full = len / nz;
        let row = row.get_mut(..nblocks as usize).unwrap_or(&mut []);
        let (hit_row, fresh_row) = row
            .split_at_mut_checked(hits as usize)
            .unwrap_or((&mut [], &mut []));
        let fresh = nblocks - hits;
        let available = p.available();
        if fresh > available {
            p.unpin_hits(hit_row);
            p.stats_mut().allocation_failures += 1;
            return Err(Error::OutOfBlocks {
                needed: fresh,
                available,
            });
        }
        // Pass 2: hold the hits, allocate the rest, register new full blocks.
        p.hold_hits(hit_row);
        // The fresh blocks the prompt fills are published as they are taken.
        let keyed = chain.matchable().min(placed_full).max(hits);
        let mut next_key = first_miss;
        let runs = chain.by_ids();
        p.allocate_keyed(last, fresh_row, (keyed - hits) as usize, runs, |k| {
            let at = hits + k as u32;
            let key = next_key.take().unwrap_or_else(|| chain.key(at, tip));
            let parent = (at > 0).then_some(tip);
            tip = key;
            (key, parent, chain.tokens(at))
        })?;
        if chain.matchable() > 0 {
            let st = p.stats_mut();
            st.hit_blocks += u64::from(hits);
            st.miss_blocks += u64::from(chain.matchable() - hits);
            st.hit_tokens += u64::from(hits * bs);
            st.query_tokens += u64::from(chain.matchable() * bs);
        }
        // Tokens of the partly filled last block, for hashing it once it fills.
        if let crate::prompt::PromptTokens::Ids(ids) = prompt.tokens {
            let rem = ids
                .get((placed_full * bs) as usize..len as usize)
                .unwrap_or(&[]);
            for (d, s) in row_of_mut(pending, si, bs as usize).iter_mut().zip(rem) {
                *d = *s;
            }
        }
        // Decode blocks are hashed only if every token and extra key is known:
        // not for keys/length prompts, nor when a multimodal item reaches past
        // the last full block (its hash would be missing from later keys).
        let mm_past = prompt
            .mm
            .iter()
            .any(|m| u64::from(m.offset) + u64::from(m.len) > u64::from(placed_full * bs));
        let slot = SeqSlot {
            hashing: chain.by_ids() && !mm_past,
            pool: pool.0,
            tokens: len,
            blocks: nblocks,
            keyed_blocks: keyed,
            hits,
            salt: prompt.salt,
            adapter: prompt.adapter,
            tip,
            ..SeqSlot::EMPTY
        };
        let (index, generation) = self.seqs.insert(slot).ok_or(Error::TooManySequences {
            capacity: self.seqs.capacity(),
        })?;
        Ok(Allocated {
            seq: SeqId { index, generation },
            hit_blocks: hits,
            hit_tokens: hits * bs,
            tokens: len,
        })
    }

    /// An empty sequence in `pool` (a target for [`share_prefix`](Self::share_prefix)).
    pub fn create(&mut self, pool: PoolId, salt: Option<CacheSalt>) -> Result<SeqId> {
        let prompt = Prompt {
            salt,
            ..Prompt::ids(&[])
        };
        Ok(self.allocate(pool, &prompt)?.seq)
    }

    // ---- append -------------------------------------------------------------

    fn needs(&self, index: u32, s: &SeqSlot, pi: usize, n: u32) -> Result<AppendNeeds> {
        let new_len = s.tokens.checked_add(n).ok_or(Error::LengthOverflow)?;
        // Appended tokens take reserved (lookahead) slots first.
        let reserve = s.reserve.saturating_sub(n);
        let new_blocks = self.blocks_for(u64::from(new_len) + u64::from(reserve));
        self.check_table_fits(new_blocks, pi)?;
        Ok(AppendNeeds {
            new_blocks: (new_blocks as u32).saturating_sub(s.blocks),
            cow: n > 0 && self.last_needs_copy(index, s, pi)?,
        })
    }

    /// The table index of the partly filled block the next token goes into.
    pub(crate) fn partial_block(&self, s: &SeqSlot) -> Option<u32> {
        (s.tokens % self.bs != 0).then(|| s.tokens / self.bs)
    }

    /// Whether the partly filled last block of `s` may not be written in
    /// place: it has another holder, or it is published under a key (a
    /// shorter sequence may hold a prefix of a full, registered block after
    /// `share_prefix`).
    pub(crate) fn last_needs_copy(&self, index: u32, s: &SeqSlot, pi: usize) -> Result<bool> {
        let Some(k) = self.partial_block(s).filter(|&k| k >= s.first_live) else {
            return Ok(false);
        };
        let Some(&b) = self.row(index).get(k as usize) else {
            return Ok(false);
        };
        let p = self
            .pools
            .get(pi)
            .ok_or(Error::UnknownPool(PoolId(s.pool)))?;
        Ok(p.ref_count(b)? > 1 || p.key_of(b)?.is_some())
    }

    /// What appending `n` tokens to `id` takes: fresh blocks, and whether the
    /// last block must be copied first. Checks the append is possible
    /// (length, table row, pool size) without changing anything.
    pub fn append_needs(&self, id: SeqId, n: u32) -> Result<AppendNeeds> {
        let (s, pi) = self.active(id)?;
        self.needs(id.index, s, pi, n)
    }

    /// Appends decode tokens (ids known: full blocks get registered).
    pub fn append(&mut self, id: SeqId, tokens: &[u32]) -> Result<Appended> {
        let n = u32::try_from(tokens.len()).map_err(|_| Error::LengthOverflow)?;
        self.append_inner(id, n, Some(tokens))
    }

    /// Appends `n` tokens whose ids are unknown: this sequence's later blocks
    /// are not registered in the prefix cache.
    pub fn append_len(&mut self, id: SeqId, n: u32) -> Result<Appended> {
        self.append_inner(id, n, None)
    }

    fn append_inner(&mut self, id: SeqId, n: u32, tokens: Option<&[u32]>) -> Result<Appended> {
        let (s, pi) = self.active(id)?;
        let s = *s;
        let needs = self.needs(id.index, &s, pi, n)?;
        let partial = self.partial_block(&s);
        let self_bs = self.bs;
        let bs = self_bs.get();
        let Self {
            hasher,
            pools,
            tables,
            pending,
            width,
            seqs,
            ..
        } = self;
        let p = pools
            .get_mut(pi)
            .ok_or(Error::UnknownPool(PoolId(s.pool)))?;
        let need = needs.new_blocks + u32::from(needs.cow);
        if need > p.available() {
            p.stats_mut().allocation_failures += 1;
            return Err(Error::OutOfBlocks {
                needed: need,
                available: p.available(),
            });
        }
        let row = row_of_mut(tables, id.index, *width);
        let cow = match partial.and_then(|k| row.get_mut(k as usize)) {
            Some(last) if needs.cow => {
                let src = *last;
                let dst = p.allocate_one()?;
                p.release(src)?;
                *last = dst;
                Some(BlockCopy { src, dst })
            }
            _ => None,
        };
        let grown = (s.blocks + needs.new_blocks) as usize;
        if let Some(fresh) = row.get_mut(s.blocks as usize..grown) {
            p.allocate(fresh)?;
        }
        let mut slot = s;
        slot.tokens += n;
        slot.reserve = s.reserve.saturating_sub(n);
        slot.blocks += needs.new_blocks;
        // Hash and register blocks as they fill.
        match tokens {
            Some(t) if s.hashing => {
                let extra = ExtraKeys {
                    adapter: s.adapter,
                    mm: &[],
                };
                let pend = row_of_mut(pending, id.index, bs as usize);
                let mut fill = (s.tokens % self_bs) as usize;
                for &tok in t {
                    if let Some(e) = pend.get_mut(fill) {
                        *e = tok;
                    }
                    fill += 1;
                    if fill == bs as usize {
                        let kb = slot.keyed_blocks;
                        let key = hasher.hash_block(slot.tip, pend, kb * bs, &extra);
                        let parent = (kb > 0).then_some(slot.tip);
                        // Published after its chain's previous block: in
                        // its run, or as a head. Not if that block is an
                        // unkeyed copy (a key another block published
                        // first): a run may then hold this key after the
                        // other block, which only a walk from the root finds.
                        // (Nor if a window released it.)
                        let prev = kb.checked_sub(1).and_then(|k| row.get(k as usize));
                        let prev_keyed = prev.is_none_or(|&b| p.key_of(b).ok().flatten().is_some())
                            && (kb == 0 || kb > slot.first_live);
                        if let Some(&b) = row.get(kb as usize).filter(|_| prev_keyed) {
                            let _ = p.publish_after(prev.copied(), b, key, parent, pend);
                        }
                        slot.tip = key;
                        slot.keyed_blocks += 1;
                        fill = 0;
                    }
                }
            }
            _ => slot.hashing = false,
        }
        let window_freed = Self::apply_window(&mut slot, p, row, self_bs, s.tokens)?;
        if cow.is_some() || window_freed > 0 {
            slot.edits = slot.edits.wrapping_add(1);
        }
        // Only what an append changes is written back (the slot is large).
        if let Some(e) = seqs.at_mut(id.index) {
            e.tokens = slot.tokens;
            e.reserve = slot.reserve;
            e.blocks = slot.blocks;
            e.first_live = slot.first_live;
            e.hashing = slot.hashing;
            e.edits = slot.edits;
            if slot.keyed_blocks != s.keyed_blocks {
                e.keyed_blocks = slot.keyed_blocks;
                e.tip = slot.tip;
            }
        }
        Ok(Appended {
            new_blocks: needs.new_blocks,
            cow,
            window_freed,
        })
    }

    /// Reserves slots for `tokens` tokens past the sequence's end (lookahead
    /// for speculative decoding: the engine writes draft tokens' KV there),
    /// allocating blocks as needed; appended tokens use them first. A smaller
    /// reservation releases the trailing blocks it no longer needs (never one
    /// holding a written token). All or nothing. Returns the blocks added
    /// (positive) or released (negative).
    pub fn reserve(&mut self, id: SeqId, tokens: u32) -> Result<i64> {
        let (s, pi) = self.active(id)?;
        let s = *s;
        let end = u64::from(s.tokens) + u64::from(tokens);
        if end > u64::from(u32::MAX) {
            return Err(Error::LengthOverflow);
        }
        let target = self.blocks_for(end);
        self.check_table_fits(target, pi)?;
        let target = target as u32;
        let p = self
            .pools
            .get_mut(pi)
            .ok_or(Error::UnknownPool(PoolId(s.pool)))?;
        let row = row_of_mut(&mut self.tables, id.index, self.width);
        if target > s.blocks {
            let fresh = row
                .get_mut(s.blocks as usize..target as usize)
                .unwrap_or(&mut []);
            p.allocate(fresh)?;
        } else {
            for &b in row
                .get(target as usize..s.blocks as usize)
                .unwrap_or(&[])
                .iter()
                .rev()
            {
                p.release(b)?;
            }
        }
        if let Some(e) = self.seqs.at_mut(id.index) {
            e.reserve = tokens;
            if target < e.blocks {
                e.edits = e.edits.wrapping_add(1);
            }
            e.blocks = target;
        }
        Ok(i64::from(target) - i64::from(s.blocks))
    }
}
