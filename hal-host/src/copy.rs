//! The copy engine shared by both backends.

use pagedkv_core::ValidatedBatch;

use crate::{HostError, HostRegion};

/// Checks that both regions have the layout's bytes for the block counts
/// the batch was validated against, and that their blocks have one size.
pub(crate) fn check_pair(
    src: &HostRegion,
    dst: &HostRegion,
    batch: &ValidatedBatch<'_>,
) -> Result<(), HostError> {
    let (sl, dl) = (&src.desc.layout, &dst.desc.layout);
    if sl.block_bytes() != dl.block_bytes() || sl.order != dl.order {
        return Err(HostError::other("regions have different block layouts"));
    }
    if batch.src_blocks() != src.desc.block_count || batch.dst_blocks() != dst.desc.block_count {
        return Err(HostError::other(
            "batch validated against other block counts",
        ));
    }
    if batch.same_region() != core::ptr::eq(src, dst) {
        return Err(HostError::other(
            "batch validated for another region pairing",
        ));
    }
    Ok(())
}

/// Copies a validated batch byte range by byte range.
///
/// # Safety
///
/// - `src` and `dst` point to live allocations of `len` bytes each (a
///   `HostRegion` of a backend that has not freed it).
/// - No other access to the batch's target bytes, nor writes to its source
///   bytes, happen during the call.
pub(crate) unsafe fn copy_batch(
    src: &HostRegion,
    dst: &HostRegion,
    batch: &ValidatedBatch<'_>,
) -> Result<(), HostError> {
    check_pair(src, dst, batch)?;
    let layout = src.desc.layout;
    let mut bad = false;
    layout
        .expand(
            batch.src_blocks(),
            batch.dst_blocks(),
            batch.copies(),
            |r| {
                let (Ok(s), Ok(d), Ok(n)) = (
                    usize::try_from(r.src),
                    usize::try_from(r.dst),
                    usize::try_from(r.len),
                ) else {
                    bad = true;
                    return;
                };
                if s.checked_add(n).is_none_or(|e| e > src.len)
                    || d.checked_add(n).is_none_or(|e| e > dst.len)
                {
                    bad = true;
                    return;
                }
                // SAFETY: both ranges were just checked to lie inside their
                // allocations (the caller guarantees those are live). The batch
                // is validated: within one region no block is both read and
                // written and no target repeats, so merged ranges of one batch
                // never overlap each other's source and target.
                unsafe {
                    core::ptr::copy_nonoverlapping(
                        src.ptr.as_ptr().add(s),
                        dst.ptr.as_ptr().add(d),
                        n,
                    );
                }
            },
        )
        .map_err(|_| HostError::other("layout expansion failed"))?;
    if bad {
        return Err(HostError::other("copy range outside a region"));
    }
    Ok(())
}

/// # Safety
/// `region` is live; no other access to those bytes during the call.
pub(crate) unsafe fn write(region: &HostRegion, offset: u64, data: &[u8]) -> Result<(), HostError> {
    let at = region.range(offset, data.len())?;
    // SAFETY: in bounds (checked above), live (caller), no other access
    // (caller); `data` is a Rust slice, so it cannot overlap memory the
    // backend owns exclusively.
    unsafe {
        core::ptr::copy_nonoverlapping(data.as_ptr(), region.ptr.as_ptr().add(at), data.len())
    };
    Ok(())
}

/// # Safety
/// `region` is live; no writes to those bytes during the call.
pub(crate) unsafe fn read(
    region: &HostRegion,
    offset: u64,
    out: &mut [u8],
) -> Result<(), HostError> {
    let at = region.range(offset, out.len())?;
    // SAFETY: in bounds, live, not written meanwhile (caller); `out` is an
    // exclusive Rust slice, so it cannot overlap the region's memory.
    unsafe {
        core::ptr::copy_nonoverlapping(region.ptr.as_ptr().add(at), out.as_mut_ptr(), out.len())
    };
    Ok(())
}
