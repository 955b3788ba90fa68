//! The hardware abstraction: where KV bytes live and how blocks move.
//!
//! Small on purpose (embedded-hal's rule: a method is added only when two
//! backends implement it and the manager uses it), with wgpu-hal-style
//! contracts: the core validates, backends execute.
//!
//! # Workflow
//!
//! 1. [`Backend::create_region`] backs `N` blocks of a [`KvLayout`] in some
//!    [`MemoryKind`]; a pool of the core indexes them.
//! 2. The core plans copies (swap, move, copy-on-write) and validates them into
//!    a [`ValidatedBatch`] (bounds, no duplicate target, no block both read and
//!    written).
//! 3. [`Backend::copy_blocks`] starts the whole batch (one batch, one driver
//!    call) and returns a fence; [`Backend::poll`] or [`Backend::wait`] tell
//!    when it is done.
//! 4. Only then does the caller commit the plan in the core.
//!
//! # Design choices
//!
//! - Static dispatch; an object-safe layer for choosing a backend at run time
//!   lives in the manager.
//! - Resources are plain structs ([`RegionDesc`]); backends destructure them
//!   without `..`, so a new field breaks every backend until handled.
//! - Errors carry a [`ErrorKind`] and keep their rich cause.
//! - Compression is a separate capability trait ([`Quantize`]).
#![allow(unsafe_code)]

use crate::batch::ValidatedBatch;
use crate::layout::KvLayout;

/// What memory a region lives in.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum MemoryKind {
    /// Accelerator memory of device `0..`.
    Device(u16),
    /// Page-locked host memory, reachable by DMA.
    PinnedHost,
    /// Ordinary host memory.
    Host,
}

/// Description of a region: `block_count` blocks of `layout` in `memory`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct RegionDesc {
    /// Blocks in the region.
    pub block_count: u32,
    /// Shape of each block.
    pub layout: KvLayout,
    /// Where the bytes live.
    pub memory: MemoryKind,
}

/// The broad reason of a backend error.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum ErrorKind {
    /// The memory kind has no room for the region.
    OutOfMemory,
    /// The device stopped answering; its regions are lost.
    DeviceLost,
    /// The backend does not offer this operation or format.
    Unsupported,
    /// Anything else.
    Other,
}

/// What every backend error tells: a broad [`ErrorKind`], and its rich cause
/// (`Display`, `source()`), kept by whoever wraps it.
pub trait BackendError: core::error::Error {
    /// The broad reason.
    fn kind(&self) -> ErrorKind;
}

/// A memory backend.
///
/// # Safety contracts (for callers)
///
/// Regions and fences are plain handles; the backend cannot see whether a
/// region is still in use by an unfinished batch, so the unsafe methods state
/// what the caller guarantees. A caller that only uses the `pagedkv-manager`
/// crate never calls them directly.
pub trait Backend {
    /// A region of blocks.
    type Region;
    /// Completion of a batch.
    type Fence;
    /// The backend's error.
    type Error: BackendError;

    /// Backs a region. Its contents are unspecified until written.
    fn create_region(&mut self, desc: &RegionDesc) -> Result<Self::Region, Self::Error>;

    /// The description a region was created with.
    fn region_desc(&self, region: &Self::Region) -> RegionDesc;

    /// Frees a region.
    ///
    /// # Safety
    ///
    /// - `region` was created by this backend.
    /// - No batch reading or writing it is still in flight (its fences were waited).
    unsafe fn destroy_region(&mut self, region: Self::Region);

    /// Starts copying a validated batch from `src` to `dst` (which may be the
    /// same region) and returns the fence that signals its completion.
    ///
    /// # Safety
    ///
    /// - `src` and `dst` were created by this backend, are not destroyed, have
    ///   the layout's block size, and their block counts are those the batch
    ///   was validated against.
    /// - Until the fence signals, nothing else writes the batch's source or
    ///   target blocks, nor reads its target blocks.
    unsafe fn copy_blocks(
        &mut self,
        src: &Self::Region,
        dst: &Self::Region,
        batch: ValidatedBatch<'_>,
    ) -> Result<Self::Fence, Self::Error>;

    /// Writes `data` at byte `offset` of `region` (uploads, tests, restores).
    /// Ordered after every batch started before it; returns once written.
    fn write_bytes(
        &mut self,
        region: &Self::Region,
        offset: u64,
        data: &[u8],
    ) -> Result<(), Self::Error>;

    /// Reads `out.len()` bytes at `offset` of `region` (downloads,
    /// checksums). Ordered after every batch started before it.
    fn read_bytes(
        &mut self,
        region: &Self::Region,
        offset: u64,
        out: &mut [u8],
    ) -> Result<(), Self::Error>;

    /// The address of the region's first byte as a kernel sees it (a host
    /// pointer, a device pointer, a buffer device address), if the backend
    /// exposes one.
    fn region_address(&self, region: &Self::Region) -> Option<u64> {
        let _ = region;
        None
    }

    /// Whether the batch behind `fence` has completed.
    fn poll(&mut self, fence: &Self::Fence) -> Result<bool, Self::Error>;

    /// Blocks until the batch behind `fence` has completed.
    fn wait(&mut self, fence: &Self::Fence) -> Result<(), Self::Error>;
}

/// A compressed block format.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum QuantFormat {
    /// Symmetric int8 with one f32 scale per (block, layer, K/V, head).
    Int8PerHead,
    /// OCP FP8 E4M3FN with one f32 scale per (block, layer, K/V, head).
    Fp8E4M3PerHead,
}

/// Optional capability: quantize blocks into a smaller format and back.
pub trait Quantize: Backend {
    /// Quantizes each copy's source block of `src` into its target block of
    /// `dst` (a region whose layout has the format's element type).
    ///
    /// # Safety
    ///
    /// As [`Backend::copy_blocks`]; additionally `dst` was created for `format`.
    unsafe fn quantize(
        &mut self,
        src: &Self::Region,
        dst: &Self::Region,
        batch: ValidatedBatch<'_>,
        format: QuantFormat,
    ) -> Result<Self::Fence, Self::Error>;

    /// The inverse of [`quantize`](Self::quantize), within the format's documented error bound.
    ///
    /// # Safety
    ///
    /// As [`Backend::copy_blocks`]; additionally `src` was created for `format`.
    unsafe fn dequantize(
        &mut self,
        src: &Self::Region,
        dst: &Self::Region,
        batch: ValidatedBatch<'_>,
        format: QuantFormat,
    ) -> Result<Self::Fence, Self::Error>;
}
