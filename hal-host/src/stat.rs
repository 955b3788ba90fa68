//! `StaticBackend`: regions carved out of a caller's byte arena; no allocator.

use core::marker::PhantomData;
use core::ptr::NonNull;

use pagedkv_core::{Backend, RegionDesc};

use crate::region::{Stamp, region_len};
use crate::{HostError, HostFence, HostRegion, REGION_ALIGN};

/// A backend over one caller-provided arena (for firmware: a `static mut`
/// byte array, or a linker-placed SRAM section). Regions are carved out in
/// order; destroying the most recent region returns its bytes, others stay
/// reserved until [`reset`](Self::reset). Memory kinds are recorded but all
/// live in the arena.
#[derive(Debug)]
pub struct StaticBackend<'a> {
    base: NonNull<u8>,
    len: usize,
    next: usize,
    live: usize,
    stamp: Stamp,
    _arena: PhantomData<&'a mut [u8]>,
}

// SAFETY: the backend holds the arena's unique borrow (`&'a mut [u8]`), so
// moving it to another thread moves that borrow; nothing is thread-bound.
unsafe impl Send for StaticBackend<'_> {}

impl<'a> StaticBackend<'a> {
    /// A backend over `arena`, which it borrows exclusively for `'a`.
    pub fn new(arena: &'a mut [u8]) -> Self {
        let len = arena.len();
        Self {
            base: NonNull::from(arena).cast(),
            len,
            next: 0,
            live: 0,
            stamp: Stamp::new(),
            _arena: PhantomData,
        }
    }

    /// Bytes of the arena not yet carved.
    pub fn remaining(&self) -> usize {
        self.len - self.next
    }

    /// Forgets every region at once (all must have been destroyed).
    pub fn reset(&mut self) -> Result<(), HostError> {
        if self.live != 0 {
            return Err(HostError::other("regions still live"));
        }
        self.next = 0;
        Ok(())
    }
}

impl Backend for StaticBackend<'_> {
    type Region = HostRegion;
    type Fence = HostFence;
    type Error = HostError;

    fn create_region(&mut self, desc: &RegionDesc) -> Result<HostRegion, HostError> {
        let RegionDesc {
            block_count: _,
            layout: _,
            memory: _,
        } = *desc;
        let len = region_len(desc)?;
        let addr = self.base.as_ptr() as usize + self.next;
        let pad = addr.next_multiple_of(REGION_ALIGN) - addr;
        let start = self.next + pad;
        let end = start
            .checked_add(len)
            .filter(|&e| e <= self.len)
            .ok_or(HostError::oom("arena exhausted"))?;
        // SAFETY: `start < end <= self.len`, so the offset stays inside the
        // arena borrowed for `'a`.
        let ptr = unsafe { NonNull::new_unchecked(self.base.as_ptr().add(start)) };
        // Fresh regions read as zeros, like the heap backend's.
        // SAFETY: the range is inside the arena and belongs to no other region.
        unsafe { core::ptr::write_bytes(ptr.as_ptr(), 0, len) };
        self.next = end;
        self.live += 1;
        Ok(HostRegion {
            ptr,
            len,
            desc: *desc,
            owner: self.stamp.owner(),
        })
    }

    unsafe fn destroy_region(&mut self, region: HostRegion) {
        if self.stamp.check(&region).is_err() {
            return;
        }
        self.live -= 1;
        let base = self.base.as_ptr() as usize;
        let start = region.ptr.as_ptr() as usize - base;
        let end = start + region.len;
        // The most recent region (up to the alignment padding that followed
        // it) gives its bytes back.
        if end == self.next
            || (end < self.next && (base + end).next_multiple_of(REGION_ALIGN) - base == self.next)
        {
            self.next = start;
        }
        if self.live == 0 {
            self.next = 0;
        }
    }

    crate::common::backend_methods!();
}

crate::common::quantize_impl!(StaticBackend<'_>);
