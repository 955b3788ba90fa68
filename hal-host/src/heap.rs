//! `HostBackend`: regions from the global allocator.

use alloc::alloc::{Layout, alloc_zeroed, dealloc};
use core::ptr::NonNull;

use pagedkv_core::{Backend, MemoryKind, RegionDesc};

use crate::region::{Stamp, region_len};
use crate::{HostError, HostFence, HostRegion, REGION_ALIGN};

/// Simulated devices whose bytes are counted (and limited): `Device(0..16)`.
pub(crate) const SIMULATED_DEVICES: usize = 16;

pub(crate) fn kind_slot(m: MemoryKind) -> Result<usize, HostError> {
    match m {
        MemoryKind::Host => Ok(0),
        MemoryKind::PinnedHost => Ok(1),
        MemoryKind::Device(d) if (d as usize) < SIMULATED_DEVICES => Ok(2 + d as usize),
        MemoryKind::Device(_) => Err(HostError::unsupported("simulated device id past 15")),
    }
}

/// Host memory from the global allocator, with optional per-kind limits
/// (so tests can simulate small devices and see out-of-memory).
#[derive(Debug)]
pub struct HostBackend {
    stamp: Stamp,
    limits: [u64; 2 + SIMULATED_DEVICES],
    used: [u64; 2 + SIMULATED_DEVICES],
}

impl Default for HostBackend {
    fn default() -> Self {
        Self::new()
    }
}

impl HostBackend {
    /// A backend with no limits (beyond the allocator's).
    pub fn new() -> Self {
        Self {
            stamp: Stamp::new(),
            limits: [u64::MAX; 2 + SIMULATED_DEVICES],
            used: [0; 2 + SIMULATED_DEVICES],
        }
    }

    /// Caps the bytes of regions of one memory kind.
    pub fn with_limit(mut self, memory: MemoryKind, bytes: u64) -> Result<Self, HostError> {
        self.limits[kind_slot(memory)?] = bytes;
        Ok(self)
    }

    /// Bytes of live regions of a memory kind.
    pub fn used_bytes(&self, memory: MemoryKind) -> u64 {
        kind_slot(memory).map_or(0, |k| self.used[k])
    }
}

impl Backend for HostBackend {
    type Region = HostRegion;
    type Fence = HostFence;
    type Error = HostError;

    fn create_region(&mut self, desc: &RegionDesc) -> Result<HostRegion, HostError> {
        let RegionDesc {
            block_count: _,
            layout: _,
            memory,
        } = *desc;
        let len = region_len(desc)?;
        let k = kind_slot(memory)?;
        let total = self.used[k].saturating_add(len as u64);
        if total > self.limits[k] {
            return Err(HostError::oom("memory kind limit reached"));
        }
        let layout = Layout::from_size_align(len, REGION_ALIGN)
            .map_err(|_| HostError::oom("region too large"))?;
        // SAFETY: `len` is non-zero (at least one block of a validated,
        // non-empty layout) and the alignment is a power of two.
        let ptr = unsafe { alloc_zeroed(layout) };
        let ptr = NonNull::new(ptr).ok_or(HostError::oom("allocator refused the region"))?;
        self.used[k] = total;
        Ok(HostRegion {
            ptr,
            len,
            desc: *desc,
            owner: self.stamp.owner(),
        })
    }

    unsafe fn destroy_region(&mut self, region: HostRegion) {
        if self.stamp.check(&region).is_err() {
            return; // Not ours: leaking is the only safe answer.
        }
        if let Ok(k) = kind_slot(region.desc.memory) {
            self.used[k] -= region.len as u64;
        }
        // SAFETY: the region came from `create_region` of this backend (owner
        // checked) with exactly this size and alignment, and the caller
        // guarantees no batch still uses it.
        unsafe {
            dealloc(
                region.ptr.as_ptr(),
                Layout::from_size_align_unchecked(region.len, REGION_ALIGN),
            )
        };
    }

    crate::common::backend_methods!();
}

crate::common::quantize_impl!(HostBackend);
