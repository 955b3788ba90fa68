//! Regions: device memory, or page-locked host memory mapped into every
//! context (so kernels read and write it over the bus directly).

use core::ptr::NonNull;

use cudarc::driver::{result, sys};
use pagedkv_core::{MemoryKind, RegionDesc};

use crate::CudaError;

/// A region of blocks in GPU memory or mapped pinned host memory.
///
/// It owns no memory itself: the backend that created it frees it in
/// `destroy_region`. Regions are not `Clone`, so safe code cannot use one
/// after `destroy_region` consumed it.
#[derive(Debug)]
pub struct CudaRegion {
    pub(crate) desc: RegionDesc,
    /// Device address of the first byte (for host memory: its mapping).
    pub(crate) addr: u64,
    /// The host pointer of pinned host memory.
    pub(crate) host: Option<NonNull<u8>>,
    pub(crate) bytes: u64,
    /// The CUDA device ordinal of device memory.
    pub(crate) ordinal: Option<usize>,
    /// Which backend instance made it.
    pub(crate) owner: usize,
    /// Unique within its backend (tells one region from two).
    pub(crate) id: u64,
}

// SAFETY: a region is an address and a description; its bytes are reached
// only through the backend (`&mut`) or by kernels under the unsafe batch
// contract, never through thread-local state.
unsafe impl Send for CudaRegion {}
// SAFETY: shared references read the description and addresses only.
unsafe impl Sync for CudaRegion {}

impl CudaRegion {
    /// What the region was created with.
    pub fn desc(&self) -> &RegionDesc {
        &self.desc
    }

    /// Bytes in the region.
    pub fn len(&self) -> u64 {
        self.bytes
    }

    /// Whether the region has no bytes.
    pub fn is_empty(&self) -> bool {
        self.bytes == 0
    }

    /// The device address a kernel uses (for pinned host memory, its mapping).
    pub fn device_ptr(&self) -> u64 {
        self.addr
    }

    /// Checks `offset..offset + len` lies in the region.
    pub(crate) fn range(&self, offset: u64, len: usize) -> Result<u64, CudaError> {
        offset
            .checked_add(len as u64)
            .filter(|&end| end <= self.bytes)
            .map(|_| offset)
            .ok_or(CudaError::other("byte range outside the region"))
    }
}

/// Allocates `bytes` of device memory in the current context.
pub(crate) fn alloc_device(bytes: u64) -> Result<u64, CudaError> {
    let n = usize::try_from(bytes).map_err(|_| too_large())?;
    // SAFETY: a plain allocation in the context the caller made current; the
    // memory's contents are unspecified, as `create_region` documents.
    unsafe { result::malloc_sync(n) }.map_err(CudaError::driver("allocating device memory"))
}

fn too_large() -> CudaError {
    CudaError::new(
        pagedkv_core::ErrorKind::OutOfMemory,
        "region larger than the address space",
    )
}

/// Allocates `bytes` of page-locked host memory, mapped and portable, in the
/// current context; returns the host pointer and its device address.
pub(crate) fn alloc_pinned(bytes: u64) -> Result<(NonNull<u8>, u64), CudaError> {
    let n = usize::try_from(bytes).map_err(|_| too_large())?;
    let flags = sys::CU_MEMHOSTALLOC_DEVICEMAP | sys::CU_MEMHOSTALLOC_PORTABLE;
    // SAFETY: a plain allocation; its contents are unspecified until written.
    let p = unsafe { result::malloc_host(n, flags) }
        .map_err(CudaError::driver("allocating pinned host memory"))?;
    let Some(host) = NonNull::new(p.cast::<u8>()) else {
        return Err(CudaError::other("the driver returned a null host pointer"));
    };
    let mut dptr: sys::CUdeviceptr = 0;
    // SAFETY: `p` was just returned by cuMemHostAlloc with DEVICEMAP; the call
    // writes one device pointer through a valid `&mut`.
    let r = unsafe { sys::cuMemHostGetDevicePointer_v2(&mut dptr, p, 0) }.result();
    if let Err(e) = r {
        // SAFETY: `p` came from `malloc_host` and nothing else holds it.
        let _ = unsafe { result::free_host(p) };
        return Err(CudaError::driver("mapping pinned host memory")(e));
    }
    Ok((host, dptr))
}

/// Frees a region's memory (the caller made its device's context current).
///
/// # Safety
/// The region's memory is live and no work in flight touches it.
pub(crate) unsafe fn free(region: &CudaRegion) -> Result<(), CudaError> {
    if region.bytes == 0 {
        return Ok(());
    }
    match (region.host, region.desc.memory) {
        (Some(h), _) => {
            // SAFETY: `h` came from `malloc_host` (caller: live, idle).
            unsafe { result::free_host(h.as_ptr().cast()) }
                .map_err(CudaError::driver("freeing pinned host memory"))
        }
        (None, MemoryKind::Device(_)) => {
            // SAFETY: `addr` came from `malloc_sync` (caller: live, idle).
            unsafe { result::free_sync(region.addr) }
                .map_err(CudaError::driver("freeing device memory"))
        }
        (None, _) => Err(CudaError::other("host region without a host pointer")),
    }
}
