//! The `Backend` and `Quantize` methods both host backends share: they
//! differ only in where regions come from (`create_region`, `destroy_region`)
//! and each provides `check` (the region is its own) and `fence`.

/// The shared `Backend` methods (inside `impl Backend for ...`).
macro_rules! backend_methods {
    () => {
        fn region_desc(&self, region: &$crate::HostRegion) -> pagedkv_core::RegionDesc {
            *region.desc()
        }

        unsafe fn copy_blocks(
            &mut self,
            src: &$crate::HostRegion,
            dst: &$crate::HostRegion,
            batch: pagedkv_core::ValidatedBatch<'_>,
        ) -> Result<$crate::HostFence, $crate::HostError> {
            self.stamp.check(src)?;
            self.stamp.check(dst)?;
            // SAFETY: both regions are this backend's and live (the caller's
            // contract), and the caller keeps other accesses off the batch's
            // blocks during the call.
            unsafe { $crate::copy::copy_batch(src, dst, &batch)? };
            Ok(self.stamp.fence())
        }

        fn write_bytes(
            &mut self,
            region: &$crate::HostRegion,
            offset: u64,
            data: &[u8],
        ) -> Result<(), $crate::HostError> {
            self.stamp.check(region)?;
            // SAFETY: ours, hence live until `destroy_region` consumes it;
            // copies complete synchronously, so nothing else touches it now.
            unsafe { $crate::copy::write(region, offset, data) }
        }

        fn read_bytes(
            &mut self,
            region: &$crate::HostRegion,
            offset: u64,
            out: &mut [u8],
        ) -> Result<(), $crate::HostError> {
            self.stamp.check(region)?;
            // SAFETY: as in `write_bytes`.
            unsafe { $crate::copy::read(region, offset, out) }
        }

        fn region_address(&self, region: &$crate::HostRegion) -> Option<u64> {
            Some(region.as_ptr() as u64)
        }

        fn poll(&mut self, _fence: &$crate::HostFence) -> Result<bool, $crate::HostError> {
            Ok(true)
        }

        fn wait(&mut self, _fence: &$crate::HostFence) -> Result<(), $crate::HostError> {
            Ok(())
        }
    };
}

/// `impl Quantize for $t` over the shared quantization code.
macro_rules! quantize_impl {
    ($t:ty) => {
        impl pagedkv_core::Quantize for $t {
            unsafe fn quantize(
                &mut self,
                src: &$crate::HostRegion,
                dst: &$crate::HostRegion,
                batch: pagedkv_core::ValidatedBatch<'_>,
                format: pagedkv_core::QuantFormat,
            ) -> Result<$crate::HostFence, $crate::HostError> {
                // SAFETY: forwarded contract (as `copy_blocks`).
                unsafe {
                    $crate::common::quant_batch(
                        &mut self.stamp,
                        src,
                        dst,
                        &batch,
                        format,
                        $crate::quant::Direction::Quantize,
                    )
                }
            }

            unsafe fn dequantize(
                &mut self,
                src: &$crate::HostRegion,
                dst: &$crate::HostRegion,
                batch: pagedkv_core::ValidatedBatch<'_>,
                format: pagedkv_core::QuantFormat,
            ) -> Result<$crate::HostFence, $crate::HostError> {
                // SAFETY: forwarded contract (as `copy_blocks`).
                unsafe {
                    $crate::common::quant_batch(
                        &mut self.stamp,
                        src,
                        dst,
                        &batch,
                        format,
                        $crate::quant::Direction::Dequantize,
                    )
                }
            }
        }
    };
}

/// Checks both regions are the backend's, runs the conversion, fences.
///
/// # Safety
///
/// As `Backend::copy_blocks`: both regions live, no other access to the
/// batch's blocks during the call.
pub(crate) unsafe fn quant_batch(
    stamp: &mut crate::region::Stamp,
    src: &crate::HostRegion,
    dst: &crate::HostRegion,
    batch: &pagedkv_core::ValidatedBatch<'_>,
    format: pagedkv_core::QuantFormat,
    dir: crate::quant::Direction,
) -> Result<crate::HostFence, crate::HostError> {
    stamp.check(src)?;
    stamp.check(dst)?;
    // SAFETY: the regions are the backend's (checked) and live; the caller
    // keeps other accesses off the batch's blocks.
    unsafe { crate::quant::run(src, dst, batch, format, dir)? };
    Ok(stamp.fence())
}

pub(crate) use {backend_methods, quantize_impl};
