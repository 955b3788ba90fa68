//! What a prompt brings for prefix matching, and how its block keys are
//! derived: token ids hashed along the chain, or a caller's precomputed
//! keys, bound into the chain of the prompt's salt and extra keys.

use crate::error::{Error, Result};
use crate::hash::{BlockHasher, ExtraKeys, MmItem};
use crate::ids::{BlockHash, CacheSalt};

/// What a prompt brings for prefix matching.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum PromptTokens<'p> {
    /// Token ids: full blocks are hashed, looked up and registered; decode
    /// tokens appended later are hashed too.
    Ids(&'p [u32]),
    /// Precomputed keys of the first full blocks (for example a trace's or a
    /// router's block hashes) and the prompt length. Equal keys must mean
    /// equal content and equal preceding content. Without a salt, adapter or
    /// multimodal items the keys are used as they are; with any of them each
    /// key is bound into the chain of those extra inputs (one keyed hash per
    /// block), so tenants never share a block. A key repeated within one
    /// prompt ends the prefix match there. Blocks past the keys, and decode
    /// blocks, are not registered.
    Keys {
        /// Keys of full blocks `0..keys.len()`.
        keys: &'p [BlockHash],
        /// Prompt length in tokens.
        len: u32,
    },
    /// A length only: no prefix caching for this sequence.
    Len(u32),
}

/// A prompt to allocate.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Prompt<'p> {
    /// Tokens, keys or length.
    pub tokens: PromptTokens<'p>,
    /// Tenant salt: sequences with different salts never share a block.
    pub salt: Option<CacheSalt>,
    /// Adapter id, part of every key.
    pub adapter: Option<u64>,
    /// Multimodal items of the prompt.
    pub mm: &'p [MmItem],
}

impl<'p> Prompt<'p> {
    /// A plain text prompt.
    pub fn ids(tokens: &'p [u32]) -> Self {
        Self::of(PromptTokens::Ids(tokens))
    }
    /// A prompt with precomputed block keys.
    pub fn keys(keys: &'p [BlockHash], len: u32) -> Self {
        Self::of(PromptTokens::Keys { keys, len })
    }
    /// A prompt known by length only.
    pub fn len(len: u32) -> Self {
        Self::of(PromptTokens::Len(len))
    }
    fn of(tokens: PromptTokens<'p>) -> Self {
        Self {
            tokens,
            salt: None,
            adapter: None,
            mm: &[],
        }
    }
    /// The same prompt under a tenant salt.
    pub fn with_salt(self, salt: CacheSalt) -> Self {
        Self {
            salt: Some(salt),
            ..self
        }
    }
    /// The same prompt computed with adapter `adapter` (a LoRA id).
    pub fn with_adapter(self, adapter: u64) -> Self {
        Self {
            adapter: Some(adapter),
            ..self
        }
    }
    /// The same prompt with multimodal items.
    pub fn with_mm(self, mm: &'p [MmItem]) -> Self {
        Self { mm, ..self }
    }
    /// Prompt length in tokens.
    pub fn token_len(&self) -> Result<u32> {
        match self.tokens {
            PromptTokens::Ids(t) => u32::try_from(t.len()).map_err(|_| Error::LengthOverflow),
            PromptTokens::Keys { len, .. } | PromptTokens::Len(len) => Ok(len),
        }
    }
    /// The extra inputs every key of this prompt includes.
    pub(crate) fn extra(&self) -> ExtraKeys<'p> {
        ExtraKeys {
            adapter: self.adapter,
            mm: self.mm,
        }
    }
}

/// Where keys come from.
#[derive(Clone, Copy)]
enum Source<'p> {
    Ids(&'p [u32]),
    Raw(&'p [BlockHash]),
    Bound(&'p [BlockHash]),
    None,
}

/// The keys of a prompt's matchable full blocks, one at a time along the
/// chain: `key(i, parent)` where `parent` is the key of block `i - 1` (or
/// [`root`](Self::root)).
#[derive(Clone, Copy)]
pub(crate) struct KeyChain<'p, 'h, H> {
    hasher: &'h H,
    source: Source<'p>,
    extra: ExtraKeys<'p>,
    bs: u32,
    matchable: u32,
    root: BlockHash,
}

impl<'p, 'h, H: BlockHasher> KeyChain<'p, 'h, H> {
    /// The chain of `prompt` (of `full` full blocks of `bs` tokens).
    pub(crate) fn new(hasher: &'h H, prompt: &Prompt<'p>, bs: u32, full: u32) -> Result<Self> {
        let bound = prompt.salt.is_some() || prompt.adapter.is_some() || !prompt.mm.is_empty();
        let (source, matchable) = match prompt.tokens {
            PromptTokens::Ids(t) => (Source::Ids(t), full),
            PromptTokens::Keys { keys, .. } => {
                let n = u32::try_from(keys.len())
                    .ok()
                    .filter(|&n| n <= full)
                    .ok_or(Error::TooManyKeys {
                        keys: keys.len(),
                        full_blocks: full,
                    })?;
                (
                    if bound {
                        Source::Bound(keys)
                    } else {
                        Source::Raw(keys)
                    },
                    n,
                )
            }
            PromptTokens::Len(_) => (Source::None, 0),
        };
        let root = match source {
            Source::Ids(_) | Source::Bound(_) => hasher.root(prompt.salt),
            Source::Raw(_) | Source::None => BlockHash(0),
        };
        Ok(Self {
            hasher,
            source,
            extra: prompt.extra(),
            bs,
            matchable,
            root,
        })
    }

    /// Blocks whose key is known.
    #[inline]
    pub(crate) fn matchable(&self) -> u32 {
        self.matchable
    }

    /// The parent of block 0.
    #[inline]
    pub(crate) fn root(&self) -> BlockHash {
        self.root
    }

    /// Whether decode blocks can be keyed after the prompt (token ids known).
    pub(crate) fn by_ids(&self) -> bool {
        matches!(self.source, Source::Ids(_))
    }

    /// The token ids of block `i` (empty unless the prompt gave them).
    #[inline]
    pub(crate) fn tokens(&self, i: u32) -> &'p [u32] {
        match self.source {
            Source::Ids(t) => {
                let s = (i * self.bs) as usize;
                t.get(s..s + self.bs as usize).unwrap_or(&[])
            }
            _ => &[],
        }
    }

    /// The key of block `i` (`i < matchable`) whose parent key is `parent`.
    #[inline]
    pub(crate) fn key(&self, i: u32, parent: BlockHash) -> BlockHash {
        let start = i * self.bs;
        match self.source {
            Source::Ids(t) => {
                let s = start as usize;
                let tokens = t.get(s..s + self.bs as usize).unwrap_or(&[]);
                self.hasher.hash_block(parent, tokens, start, &self.extra)
            }
            Source::Raw(k) => k.get(i as usize).copied().unwrap_or(parent),
            Source::Bound(k) => {
                let key = k.get(i as usize).copied().unwrap_or(parent);
                self.hasher
                    .bind_key(parent, key, start, self.bs, &self.extra)
            }
            Source::None => parent,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::SipBlockHasher;

    #[test]
    fn precomputed_keys_are_raw_unless_something_binds_them() {
        let h = SipBlockHasher::new(*b"prompt-test-key!");
        let keys = [BlockHash(5), BlockHash(5)];
        let raw = Prompt::keys(&keys, 8);
        let c = KeyChain::new(&h, &raw, 4, 2).unwrap();
        assert_eq!(
            (c.key(0, c.root()), c.key(1, BlockHash(5))),
            (keys[0], keys[1])
        );
        assert!(!c.by_ids());
        // Bound: a salt (or adapter) makes every key a chained keyed hash,
        // so equal raw keys at two positions differ, and tenants differ.
        for bound in [raw.with_salt(CacheSalt(1)), raw.with_adapter(3)] {
            let c = KeyChain::new(&h, &bound, 4, 2).unwrap();
            let k0 = c.key(0, c.root());
            let k1 = c.key(1, k0);
            assert!(k0 != keys[0] && k1 != k0);
        }
        let other = KeyChain::new(&h, &raw.with_salt(CacheSalt(2)), 4, 2).unwrap();
        let mine = KeyChain::new(&h, &raw.with_salt(CacheSalt(1)), 4, 2).unwrap();
        assert_ne!(other.key(0, other.root()), mine.key(0, mine.root()));
        // More keys than full blocks: refused.
        assert_eq!(
            KeyChain::new(&h, &raw, 4, 1).err(),
            Some(Error::TooManyKeys {
                keys: 2,
                full_blocks: 1
            })
        );
        let len = Prompt::len(9);
        assert_eq!(KeyChain::new(&h, &len, 4, 2).unwrap().matchable(), 0);
    }
}
