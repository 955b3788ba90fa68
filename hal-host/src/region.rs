use core::ptr::NonNull;
use core::sync::atomic::{AtomicUsize, Ordering};

use pagedkv_core::RegionDesc;

use crate::{HostError, HostFence};

/// A region of host memory: `desc.block_count` blocks of `desc.layout`.
///
/// It owns no memory itself: the backend that created it does, and frees it
/// in `destroy_region`. The bytes are reached only through raw pointers
/// derived from the allocation, so copies between blocks of one region never
/// alias a Rust reference.
#[derive(Debug)]
pub struct HostRegion {
    pub(crate) ptr: NonNull<u8>,
    pub(crate) len: usize,
    pub(crate) desc: RegionDesc,
    /// Which backend instance made it (refused by any other).
    pub(crate) owner: usize,
}

// SAFETY: a region is a pointer to memory that no thread-local state guards;
// access is governed by the backend's contracts (`&mut` for writes through
// the backend, the unsafe copy contract for batches), not by the thread.
unsafe impl Send for HostRegion {}
// SAFETY: shared references only read the description and pointer; reads
// and writes of the bytes go through the backend as above.
unsafe impl Sync for HostRegion {}

impl HostRegion {
    /// What the region was created with.
    pub fn desc(&self) -> &RegionDesc {
        &self.desc
    }

    /// Bytes in the region.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the region has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The base address, for a kernel that reads host memory directly.
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    /// Checks `offset..offset + len` lies in the region.
    pub(crate) fn range(&self, offset: u64, len: usize) -> Result<usize, HostError> {
        let start = usize::try_from(offset).map_err(|_| HostError::other("offset out of range"))?;
        start
            .checked_add(len)
            .filter(|&end| end <= self.len)
            .map(|_| start)
            .ok_or(HostError::other("byte range outside the region"))
    }
}

static NEXT_OWNER: AtomicUsize = AtomicUsize::new(1);

/// Which backend instance made a region, and its fence counter: the
/// bookkeeping both host backends share.
#[derive(Debug)]
pub(crate) struct Stamp {
    owner: usize,
    fences: u64,
}

impl Stamp {
    /// A new, unique owner.
    pub(crate) fn new() -> Self {
        Self {
            owner: NEXT_OWNER.fetch_add(1, Ordering::Relaxed),
            fences: 0,
        }
    }

    /// The owner id to put in the regions it makes.
    pub(crate) fn owner(&self) -> usize {
        self.owner
    }

    /// Refuses a region of another backend.
    pub(crate) fn check(&self, r: &HostRegion) -> Result<(), HostError> {
        if r.owner == self.owner {
            Ok(())
        } else {
            Err(HostError::other("region of another backend"))
        }
    }

    /// The fence of a batch that just completed.
    pub(crate) fn fence(&mut self) -> HostFence {
        self.fences += 1;
        HostFence(self.fences)
    }
}

pub(crate) fn region_len(desc: &RegionDesc) -> Result<usize, HostError> {
    desc.layout
        .validate()
        .map_err(|_| HostError::other("invalid layout"))?;
    if desc.block_count == 0 {
        return Err(HostError::other("a region needs at least one block"));
    }
    let bytes = desc
        .layout
        .region_bytes(desc.block_count)
        .map_err(|_| HostError::oom("region size overflows"))?;
    usize::try_from(bytes).map_err(|_| HostError::oom("region larger than the address space"))
}
