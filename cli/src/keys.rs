//! Maps and sets keyed by block keys. Block keys are uniform 128-bit hashes
//! already: their low 64 bits are the hash, no second hashing.

use std::collections::{HashMap, HashSet};

/// The identity hasher of block keys.
#[derive(Default, Clone, Copy)]
pub struct KeyHasher(u64);

impl std::hash::Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes.iter().take(8) {
            self.0 = (self.0 << 8) | u64::from(b);
        }
    }
    fn write_u128(&mut self, v: u128) {
        self.0 = v as u64;
    }
}

type KeyBuild = std::hash::BuildHasherDefault<KeyHasher>;
/// A map from block keys.
pub type KeyMap<V> = HashMap<u128, V, KeyBuild>;
/// A set of block keys.
pub type KeySet = HashSet<u128, KeyBuild>;
