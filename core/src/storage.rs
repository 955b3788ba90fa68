//! Caller-provided or owned storage for fixed-capacity arrays (smoltcp's
//! `managed::ManagedSlice` idea).
//!
//! Firmware passes `&'static mut [T]` (every slot type has a `const EMPTY`);
//! `std` users pass a length and let the `alloc` feature box it.

use core::ops::{Deref, DerefMut};

#[cfg(feature = "alloc")]
use crate::error::Error;

/// Fixed-size storage: borrowed from the caller, or owned (feature `alloc`).
/// It never grows after construction.
#[derive(Debug)]
pub enum Slots<'a, T> {
    /// Storage the caller owns (for example a `static` array).
    Borrowed(&'a mut [T]),
    /// Storage owned by the structure.
    #[cfg(feature = "alloc")]
    Owned(alloc::boxed::Box<[T]>),
}

impl<T> Slots<'_, T> {
    /// Owned storage of `len` copies of `value`.
    #[cfg(feature = "alloc")]
    pub fn owned(len: usize, value: T) -> Self
    where
        T: Clone,
    {
        Slots::Owned(alloc::vec![value; len].into_boxed_slice())
    }

    /// Owned storage of `len` copies of `value`, or
    /// [`Error::AllocationFailed`] when the allocator cannot provide it
    /// (instead of aborting the process).
    #[cfg(feature = "alloc")]
    pub fn try_owned(len: usize, value: T) -> Result<Self, Error>
    where
        T: Clone,
    {
        let mut v = alloc::vec::Vec::new();
        v.try_reserve_exact(len)
            .map_err(|_| Error::AllocationFailed {
                bytes: (len as u64).saturating_mul(core::mem::size_of::<T>() as u64),
            })?;
        v.resize(len, value);
        Ok(Slots::Owned(v.into_boxed_slice()))
    }
}

impl<'a, T> From<&'a mut [T]> for Slots<'a, T> {
    fn from(s: &'a mut [T]) -> Self {
        Slots::Borrowed(s)
    }
}

impl<'a, T, const N: usize> From<&'a mut [T; N]> for Slots<'a, T> {
    fn from(s: &'a mut [T; N]) -> Self {
        Slots::Borrowed(&mut s[..])
    }
}

#[cfg(feature = "alloc")]
impl<T> From<alloc::boxed::Box<[T]>> for Slots<'_, T> {
    fn from(b: alloc::boxed::Box<[T]>) -> Self {
        Slots::Owned(b)
    }
}

#[cfg(feature = "alloc")]
impl<T> From<alloc::vec::Vec<T>> for Slots<'_, T> {
    fn from(v: alloc::vec::Vec<T>) -> Self {
        Slots::Owned(v.into_boxed_slice())
    }
}

impl<T> Deref for Slots<'_, T> {
    type Target = [T];
    #[inline]
    fn deref(&self) -> &[T] {
        match self {
            Slots::Borrowed(s) => s,
            #[cfg(feature = "alloc")]
            Slots::Owned(b) => b,
        }
    }
}

impl<T> DerefMut for Slots<'_, T> {
    #[inline]
    fn deref_mut(&mut self) -> &mut [T] {
        match self {
            Slots::Borrowed(s) => s,
            #[cfg(feature = "alloc")]
            Slots::Owned(b) => b,
        }
    }
}
