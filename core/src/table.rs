//! Block tables: the seed's `BlockTable` (fixed), and batch exports in the
//! shapes attention kernels read.
//!
//! Fixes to the seed's `BlockTable`:
//! - `blocks_needed_for_length` computed `(length + block_size - 1) /
//!   block_size`, which overflows near `usize::MAX` and divides by zero for a
//!   zero block size; here it is `div_ceil` and returns an error for zero.
//! - `logical_to_physical` was always the identity and is dropped (state that
//!   can be derived).
//! - `new` with a zero block size is refused instead of producing a table
//!   every method of which divides by zero.
//! - `extend_sequence` checks its addition, and reports a typed error.
#![allow(
    clippy::cast_possible_truncation,
    reason = "counts narrowed here were checked against u32 limits by the cache"
)]

use crate::cache::{HOLE, KvCache};
use crate::error::{Error, Result};
use crate::hash::BlockHasher;
use crate::ids::{BlockId, SeqId};

/// What [`KvCache::export_block_tables_since`] last wrote in one row of a
/// caller's persistent block-table matrix. `Default`: a row never written.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct ExportedRow {
    seq: Option<SeqId>,
    edits: u32,
    len: u32,
    stride: u32,
    pad: i32,
    /// Where the row starts in a concatenated export (FlashInfer's indices).
    at: u32,
}

/// The seed's block table: an owned snapshot of a sequence's blocks.
#[cfg(feature = "alloc")]
#[derive(Clone, PartialEq, Eq, Debug)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct BlockTable {
    /// Physical blocks in logical order ([`HOLE`] where a window dropped one).
    pub physical_blocks: alloc::vec::Vec<BlockId>,
    /// Tokens stored.
    pub sequence_length: usize,
    /// Tokens per block.
    pub block_size: usize,
}

#[cfg(feature = "alloc")]
impl BlockTable {
    /// An empty table. Refuses a zero block size.
    pub fn new(block_size: usize) -> Result<Self> {
        if block_size == 0 {
            return Err(Error::ZeroTokensPerBlock);
        }
        Ok(Self {
            physical_blocks: alloc::vec::Vec::new(),
            sequence_length: 0,
            block_size,
        })
    }

    /// Blocks in the table.
    pub fn num_blocks(&self) -> usize {
        self.physical_blocks.len()
    }

    /// Blocks needed to hold `length` tokens. Cannot overflow.
    pub fn blocks_needed_for_length(length: usize, block_size: usize) -> Result<usize> {
        if block_size == 0 {
            return Err(Error::ZeroTokensPerBlock);
        }
        Ok(length.div_ceil(block_size))
    }

    /// Whether the last block has room for another token.
    pub fn has_free_space(&self) -> bool {
        self.free_tokens() > 0
    }

    /// Token slots left in the table's blocks.
    pub fn free_tokens(&self) -> usize {
        self.num_blocks()
            .saturating_mul(self.block_size)
            .saturating_sub(self.sequence_length)
    }

    /// Appends blocks.
    pub fn add_blocks(&mut self, blocks: &[BlockId]) {
        self.physical_blocks.extend_from_slice(blocks);
    }

    /// Grows the length if the blocks hold it.
    pub fn extend_sequence(&mut self, additional_tokens: usize) -> Result<()> {
        let new_len = self
            .sequence_length
            .checked_add(additional_tokens)
            .ok_or(Error::LengthOverflow)?;
        let needed = Self::blocks_needed_for_length(new_len, self.block_size)?;
        if needed > self.num_blocks() {
            return Err(Error::OutOfBlocks {
                needed: u32::try_from(needed - self.num_blocks()).unwrap_or(u32::MAX),
                available: 0,
            });
        }
        self.sequence_length = new_len;
        Ok(())
    }
}

fn check_out(needed: usize, provided: usize) -> Result<()> {
    if provided < needed {
        Err(Error::OutputTooSmall { needed, provided })
    } else {
        Ok(())
    }
}

fn to_i32(b: BlockId) -> Result<i32> {
    i32::try_from(b.0).map_err(|_| Error::LengthOverflow)
}

/// A row of block ids as i32, [`HOLE`]s as `pad` (ids checked to fit).
#[inline]
fn write_ids(out: &mut [i32], ids: &[BlockId], pad: i32) {
    for (o, &b) in out.iter_mut().zip(ids) {
        *o = if b == HOLE { pad } else { b.0 as i32 };
    }
}

impl<H: BlockHasher> KvCache<'_, H> {
    /// Whether every block id of every pool is an `i32` (pools of at most
    /// 2^31 blocks: always, in practice), so exports convert without a
    /// check per entry.
    fn ids_fit_i32(&self) -> bool {
        self.pools
            .iter()
            .all(|p| i32::try_from(p.max_blocks()).is_ok())
    }

    /// The checks of a block-table export, before anything is written:
    /// the matrix fits `out_len`, every table fits a row, every id an i32.
    fn check_block_tables(&self, seqs: &[SeqId], max_blocks: usize, out_len: usize) -> Result<()> {
        let needed = seqs
            .len()
            .checked_mul(max_blocks)
            .ok_or(Error::LengthOverflow)?;
        check_out(needed, out_len)?;
        let fit = self.ids_fit_i32();
        for &s in seqs {
            let t = self.table(s)?;
            check_out(t.len(), max_blocks)?;
            if !fit {
                for &b in t.iter().filter(|&&b| b != HOLE) {
                    to_i32(b)?;
                }
            }
        }
        Ok(())
    }

    /// An owned snapshot of a sequence's table in the seed's shape.
    #[cfg(feature = "alloc")]
    pub fn block_table(&self, id: SeqId) -> Result<BlockTable> {
        let info = self.info(id)?;
        Ok(BlockTable {
            physical_blocks: self.table(id)?.to_vec(),
            sequence_length: info.tokens as usize,
            block_size: self.config().tokens_per_block as usize,
        })
    }

    /// vLLM-style `block_tables`: a `seqs.len() × max_blocks` row-major i32
    /// matrix, rows padded (and window holes filled) with `pad`. Nothing is
    /// written past it (with `max_blocks = 0`, nothing at all).
    pub fn export_block_tables(
        &self,
        seqs: &[SeqId],
        max_blocks: usize,
        pad: i32,
        out: &mut [i32],
    ) -> Result<()> {
        self.check_block_tables(seqs, max_blocks, out.len())?;
        if max_blocks == 0 {
            return Ok(());
        }
        for (row, &s) in out.chunks_exact_mut(max_blocks).zip(seqs) {
            let t = self.table(s)?;
            let (head, tail) = row.split_at_mut(t.len());
            write_ids(head, t, pad);
            tail.fill(pad);
        }
        Ok(())
    }

    /// [`export_block_tables`](Self::export_block_tables) into a matrix the
    /// caller keeps from step to step (what vLLM's persistent block table
    /// does): row `r` of `out` is written whole only if `rows[r]` says it is
    /// out of date (another sequence, another stride or pad, or a table
    /// changed anywhere but at its end since: a copy-on-write, a window, a
    /// move, a smaller reservation); otherwise only the entries appended
    /// since are written. A decode step thus writes a few entries per
    /// sequence instead of whole rows.
    ///
    /// `out` must hold what the previous calls with the same `rows` wrote,
    /// on this cache (rows start as `ExportedRow::default()`: written
    /// whole; reset them for a buffer changed otherwise); `rows` needs
    /// an entry per sequence, and may be longer (a batch that shrinks and
    /// grows again). Another `max_blocks` or `pad` than the last call's
    /// rewrites every row. Same checks as the full export, made before
    /// anything is written. Returns the rows written whole.
    pub fn export_block_tables_since(
        &self,
        seqs: &[SeqId],
        max_blocks: usize,
        pad: i32,
        out: &mut [i32],
        rows: &mut [ExportedRow],
    ) -> Result<usize> {
        check_out(seqs.len(), rows.len())?;
        self.check_block_tables(seqs, max_blocks, out.len())?;
        if max_blocks == 0 {
            // Nothing written, and no row left: every row is rewritten next.
            rows.fill(ExportedRow::default());
            return Ok(0);
        }
        let stride = u32::try_from(max_blocks).unwrap_or(u32::MAX);
        // Another stride or pad moves or changes every row: all are rewritten.
        if rows
            .iter()
            .any(|r| r.seq.is_some() && (r.stride != stride || r.pad != pad))
        {
            rows.fill(ExportedRow::default());
        }
        let mut whole = 0;
        for ((row, &s), r) in out.chunks_exact_mut(max_blocks).zip(seqs).zip(rows) {
            let (slot, t) = self.slot_table(s)?;
            let edits = slot.edits;
            let len = t.len() as u32;
            let same = r.seq == Some(s) && r.edits == edits && r.len <= len;
            let from = if same { r.len as usize } else { 0 };
            let (head, tail) = row.split_at_mut(t.len());
            write_ids(
                head.get_mut(from..).unwrap_or(&mut []),
                t.get(from..).unwrap_or(&[]),
                pad,
            );
            if !same {
                tail.fill(pad);
                whole += 1;
            }
            *r = ExportedRow {
                seq: Some(s),
                edits,
                len,
                stride,
                pad,
                at: 0,
            };
        }
        Ok(whole)
    }

    /// vLLM-style `slot_mapping` of the last `new_tokens` tokens of each
    /// sequence (the tokens this step writes): `block × tokens_per_block +
    /// offset`, concatenated. Returns the entries written.
    pub fn export_slot_mapping(&self, seqs: &[(SeqId, u32)], out: &mut [i64]) -> Result<usize> {
        let mut needed = 0usize;
        for &(s, n) in seqs {
            let info = self.info(s)?;
            if n > info.tokens || info.tokens - n < info.first_live * self.bs.get() {
                return Err(Error::TooManyTokens {
                    requested: u64::from(n),
                    available: info.tokens,
                });
            }
            needed += n as usize;
        }
        check_out(needed, out.len())?;
        let mut k = 0;
        for &(s, n) in seqs {
            let info = self.info(s)?;
            let rest = out.get_mut(k..).unwrap_or(&mut []);
            k += self.export_slots(s, info.tokens - n, n, rest)?;
        }
        Ok(k)
    }

    /// The slots (`block × tokens_per_block + offset`) of token positions
    /// `first..first + count` of `seq`, which may reach into its reserved
    /// lookahead slots (the draft tokens of a speculative step). Returns the
    /// entries written; nothing is written unless every position is live.
    pub fn export_slots(
        &self,
        seq: SeqId,
        first: u32,
        count: u32,
        out: &mut [i64],
    ) -> Result<usize> {
        let (info, t) = self.slot_table(seq)?;
        let end = u64::from(first) + u64::from(count);
        let bs = self.bs;
        let live_from = u64::from(info.first_live) * u64::from(bs.get());
        if end > u64::from(info.tokens) + u64::from(info.reserve) || u64::from(first) < live_from {
            return Err(Error::TooManyTokens {
                requested: end,
                available: info.tokens.saturating_add(info.reserve),
            });
        }
        check_out(count as usize, out.len())?;
        let mut k = 0;
        for (pos, o) in (first..first + count).zip(out.iter_mut()) {
            let b = t.get((pos / bs) as usize).copied().unwrap_or(HOLE);
            *o = i64::from(b.0) * i64::from(bs.get()) + i64::from(pos % bs);
            k += 1;
        }
        Ok(k)
    }

    /// FlashInfer-style paged KV indices: `indptr` (`seqs.len() + 1`),
    /// `indices` (the live blocks of each sequence, concatenated) and
    /// `last_page_len`. Returns the number of indices written.
    pub fn export_flashinfer(
        &self,
        seqs: &[SeqId],
        indptr: &mut [i32],
        indices: &mut [i32],
        last_page_len: &mut [i32],
    ) -> Result<usize> {
        self.flashinfer(seqs, indptr, indices, last_page_len, &mut [])
    }

    /// [`export_flashinfer`](Self::export_flashinfer) into the buffers kept
    /// from the last call with the same `rows` (one per sequence): a
    /// sequence whose blocks only grew since, at the same place in
    /// `indices`, gets only its new indices written (a decode step writes
    /// `indptr` and `last_page_len`, and a block per sequence every
    /// `tokens_per_block` steps). `rows` of `Default` rewrite everything.
    pub fn export_flashinfer_since(
        &self,
        seqs: &[SeqId],
        indptr: &mut [i32],
        indices: &mut [i32],
        last_page_len: &mut [i32],
        rows: &mut [ExportedRow],
    ) -> Result<usize> {
        check_out(seqs.len(), rows.len())?;
        let done = self.flashinfer(seqs, indptr, indices, last_page_len, rows);
        if done.is_err() {
            // Whatever was written, nothing is known to be: all rewritten next.
            rows.fill(ExportedRow::default());
        }
        // Rows past this batch may have had their indices overwritten.
        rows.get_mut(seqs.len()..)
            .unwrap_or(&mut [])
            .fill(ExportedRow::default());
        done
    }

    /// Both FlashInfer exports (`rows` empty: everything written).
    fn flashinfer(
        &self,
        seqs: &[SeqId],
        indptr: &mut [i32],
        indices: &mut [i32],
        last_page_len: &mut [i32],
        rows: &mut [ExportedRow],
    ) -> Result<usize> {
        check_out(seqs.len() + 1, indptr.len())?;
        check_out(seqs.len(), last_page_len.len())?;
        let fit = self.ids_fit_i32();
        let bs = self.bs;
        // The written blocks past the window of each sequence.
        let live_of = |s: SeqId| -> Result<(&[BlockId], u32, u32)> {
            let (slot, t) = self.slot_table(s)?;
            let pages = slot.tokens / bs + u32::from(slot.tokens % bs != 0);
            let live = t
                .get(slot.first_live as usize..pages as usize)
                .unwrap_or(&[]);
            let last = if pages == 0 {
                0
            } else {
                slot.tokens - (pages - 1) * bs.get()
            };
            Ok((live, last, slot.edits))
        };
        let mut total = 0usize;
        for &s in seqs {
            let (live, ..) = live_of(s)?;
            total += live.len();
            if !fit {
                for &b in live {
                    to_i32(b)?;
                }
            }
        }
        check_out(total, indices.len())?;
        let i32_of = |x: usize| i32::try_from(x).map_err(|_| Error::LengthOverflow);
        i32_of(total)?;
        let mut k = 0usize;
        if let Some(p) = indptr.first_mut() {
            *p = 0;
        }
        let ptrs = indptr.get_mut(1..).unwrap_or(&mut []);
        let each = seqs.iter().zip(ptrs).zip(last_page_len.iter_mut());
        for (i, ((&s, p), last)) in each.enumerate() {
            let (live, last_len, edits) = live_of(s)?;
            let (len, at) = (live.len() as u32, k as u32);
            // Written at the same place, and only grown since: the rest.
            let from = match rows.get_mut(i) {
                Some(r) => {
                    let same = r.seq == Some(s) && r.edits == edits && r.at == at && r.len <= len;
                    let from = if same { r.len as usize } else { 0 };
                    *r = ExportedRow {
                        seq: Some(s),
                        edits,
                        len,
                        at,
                        ..ExportedRow::default()
                    };
                    from
                }
                None => 0,
            };
            // Sized above: `total` entries fit.
            let dst = indices
                .get_mut(k + from..k + live.len())
                .ok_or(Error::LengthOverflow)?;
            for (o, &b) in dst.iter_mut().zip(live.get(from..).unwrap_or(&[])) {
                *o = b.0 as i32;
            }
            k += live.len();
            // Both at most `total`, an i32.
            *p = k as i32;
            *last = i32_of(last_len as usize)?;
        }
        Ok(k)
    }
}
