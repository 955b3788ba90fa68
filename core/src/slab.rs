//! A generational slab over caller storage, written once for sequences and
//! plans (slotmap's idea): a free list threaded through the unused slots,
//! and a generation per slot that moves on when the slot is freed, so a
//! stale id can never name whatever reuses the slot.
#![allow(
    clippy::cast_possible_truncation,
    reason = "entry indices are below the slab's u32 capacity"
)]

use core::num::NonZeroU32;

use crate::pool::{Invariant, ensure};
use crate::storage::Slots;

/// End of the free list.
pub(crate) const NIL: u32 = u32::MAX;

/// The bookkeeping every slab entry carries.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) struct Links {
    pub(crate) generation: u32,
    pub(crate) live: bool,
    pub(crate) next_free: u32,
}

impl Links {
    pub(crate) const EMPTY: Self = Self {
        generation: 1,
        live: false,
        next_free: NIL,
    };
}

/// A slab entry: plain data with [`Links`] inside.
pub(crate) trait Entry: Copy {
    /// An unused entry.
    const EMPTY: Self;
    fn links(&self) -> &Links;
    fn links_mut(&mut self) -> &mut Links;
}

/// A generation counter that skips zero and wraps.
#[inline]
fn next_generation(g: u32) -> u32 {
    match g.wrapping_add(1) {
        0 => 1,
        n => n,
    }
}

#[derive(Debug)]
pub(crate) struct Slab<'a, T> {
    slots: Slots<'a, T>,
    cap: u32,
    free: u32,
    live: u32,
}

impl<'a, T: Entry> Slab<'a, T> {
    /// A slab of `cap` entries over `slots` (at least `cap` long; checked by the caller).
    pub(crate) fn new(mut slots: Slots<'a, T>, cap: u32) -> Self {
        let mut next = NIL;
        for (i, s) in slots.iter_mut().take(cap as usize).enumerate().rev() {
            *s = T::EMPTY;
            s.links_mut().next_free = next;
            next = i as u32;
        }
        Self {
            slots,
            cap,
            free: next,
            live: 0,
        }
    }

    /// Live entries.
    #[inline]
    pub(crate) fn len(&self) -> u32 {
        self.live
    }

    /// Entries in all.
    #[inline]
    pub(crate) fn capacity(&self) -> u32 {
        self.cap
    }

    /// The index the next [`insert`](Self::insert) will use, if any is free.
    #[inline]
    pub(crate) fn vacant(&self) -> Option<u32> {
        (self.free != NIL).then_some(self.free)
    }

    /// Fills the vacant entry with `value`; returns its index and generation.
    pub(crate) fn insert(&mut self, value: T) -> Option<(u32, NonZeroU32)> {
        let i = self.vacant()?;
        let s = self.slots.get_mut(i as usize)?;
        let generation = s.links().generation;
        self.free = s.links().next_free;
        *s = value;
        *s.links_mut() = Links {
            generation,
            live: true,
            next_free: NIL,
        };
        self.live += 1;
        Some((i, NonZeroU32::new(generation).unwrap_or(NonZeroU32::MIN)))
    }

    /// Frees entry `i`: its generation moves on.
    pub(crate) fn remove(&mut self, i: u32) {
        let free = self.free;
        let Some(s) = self.slots.get_mut(i as usize) else {
            return;
        };
        if !s.links().live {
            return;
        }
        let generation = next_generation(s.links().generation);
        *s = T::EMPTY;
        *s.links_mut() = Links {
            generation,
            live: false,
            next_free: free,
        };
        self.free = i;
        self.live -= 1;
    }

    /// The live entry `i` of generation `generation`.
    #[inline]
    pub(crate) fn get(&self, i: u32, generation: NonZeroU32) -> Option<&T> {
        self.slots
            .get(i as usize)
            .filter(|s| s.links().live && s.links().generation == generation.get())
    }

    /// Entry `i`, live or not (for ids the slab itself handed out).
    #[inline]
    pub(crate) fn at(&self, i: u32) -> Option<&T> {
        self.slots.get(i as usize)
    }

    #[inline]
    pub(crate) fn at_mut(&mut self, i: u32) -> Option<&mut T> {
        self.slots.get_mut(i as usize)
    }

    /// The current generation of entry `i`.
    #[inline]
    pub(crate) fn generation(&self, i: u32) -> NonZeroU32 {
        let g = self.at(i).map_or(1, |s| s.links().generation);
        NonZeroU32::new(g).unwrap_or(NonZeroU32::MIN)
    }

    /// Live entries with their index.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (u32, &T)> + '_ {
        self.slots
            .iter()
            .take(self.cap as usize)
            .enumerate()
            .filter(|(_, s)| s.links().live)
            .map(|(i, s)| (i as u32, s))
    }

    /// The free list holds exactly the entries that are not live.
    pub(crate) fn check(&self, what: &'static str) -> Result<(), Invariant> {
        let (mut free, mut i) = (0u32, self.free);
        while i != NIL {
            let s = self.at(i).filter(|_| i < self.cap);
            ensure(s.is_some(), "slab free link out of range", Some(i))?;
            let s = s.map_or(&Links::EMPTY, |s| s.links());
            ensure(!s.live, "live entry on a slab free list", Some(i))?;
            free += 1;
            ensure(free <= self.cap, "slab free list cycle", Some(i))?;
            i = s.next_free;
        }
        let live = self.iter().count() as u32;
        ensure(live == self.live, what, None)?;
        ensure(live + free == self.cap, "slab entries leaked", None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Copy, PartialEq, Eq, Debug)]
    struct E {
        links: Links,
        v: u32,
    }
    impl Entry for E {
        const EMPTY: Self = Self {
            links: Links::EMPTY,
            v: 0,
        };
        fn links(&self) -> &Links {
            &self.links
        }
        fn links_mut(&mut self) -> &mut Links {
            &mut self.links
        }
    }

    #[test]
    fn stale_ids_never_alias_and_the_free_list_is_exact() {
        let mut slab = Slab::new(Slots::owned(3, E::EMPTY), 3);
        let (a, ga) = slab.insert(E { v: 7, ..E::EMPTY }).unwrap();
        let (b, _) = slab.insert(E { v: 8, ..E::EMPTY }).unwrap();
        assert_eq!((a, b), (0, 1));
        slab.remove(a);
        slab.remove(a); // twice: nothing
        assert!(slab.get(a, ga).is_none(), "stale generation refused");
        let (a2, ga2) = slab.insert(E { v: 9, ..E::EMPTY }).unwrap();
        assert_eq!(a2, a);
        assert_ne!(ga2, ga);
        assert_eq!(slab.get(a2, ga2).map(|e| e.v), Some(9));
        slab.insert(E::EMPTY).unwrap();
        assert!(slab.insert(E::EMPTY).is_none(), "full");
        assert_eq!(slab.len(), 3);
        slab.check("live count").unwrap();
        assert_eq!(next_generation(u32::MAX), 1);
    }
}
