//! `Backend` and `Quantize` for [`VulkanBackend`].

use ash::vk;
use pagedkv_core::{Backend, QuantFormat, Quantize, RegionDesc, ValidatedBatch};

use crate::{VulkanBackend, VulkanError, VulkanFence, VulkanRegion};

/// Byte ranges per `vkCmdCopyBuffer`. A batch is one command buffer; its
/// ranges go in commands of at most this many, because the validation layer
/// checks the regions of one command pairwise: 18,000 ranges in one command
/// took 43 s to validate on lavapipe, in chunks of 256 well under a second.
/// Drivers execute the ranges one by one either way.
pub const REGIONS_PER_COMMAND: usize = 256;

impl VulkanBackend {
    /// Checks a batch's regions: live ones of this backend, alike in block
    /// layout, with the block counts and pairing the batch was validated
    /// against.
    pub(crate) fn check_batch(
        &self,
        src: &VulkanRegion,
        dst: &VulkanRegion,
        batch: &ValidatedBatch<'_>,
    ) -> Result<(), VulkanError> {
        self.check(src)?;
        self.check(dst)?;
        if batch.src_blocks() != src.desc.block_count || batch.dst_blocks() != dst.desc.block_count
        {
            return Err(VulkanError::other(
                "batch validated against other block counts",
            ));
        }
        if batch.same_region() != (src.id == dst.id) {
            return Err(VulkanError::other(
                "batch validated for another region pairing",
            ));
        }
        Ok(())
    }

    /// A fence for "everything submitted to lane `lane` so far".
    pub(crate) fn last_fence(&self, lane: u8) -> VulkanFence {
        VulkanFence {
            lane,
            value: self.lane(lane).map_or(0, submit_value),
            owner: self.owner,
        }
    }

    pub(crate) fn reclaim(&mut self) -> Result<(), VulkanError> {
        let d = &self.o.device;
        self.compute.reclaim(d, &mut self.free_sets)?;
        if let Some(t) = self.transfer.as_mut() {
            t.reclaim(d, &mut self.free_sets)?;
        }
        Ok(())
    }

    fn fence_lane(&self, f: &VulkanFence) -> Result<&crate::submit::Lane, VulkanError> {
        if f.owner != self.owner {
            return Err(VulkanError::other("fence of another backend"));
        }
        self.lane(f.lane)
            .ok_or(VulkanError::other("fence of another backend"))
    }
}

fn submit_value(l: &crate::submit::Lane) -> u64 {
    l.last()
}

impl Backend for VulkanBackend {
    type Region = VulkanRegion;
    type Fence = VulkanFence;
    type Error = VulkanError;

    fn create_region(&mut self, desc: &RegionDesc) -> Result<VulkanRegion, VulkanError> {
        self.new_region(desc)
    }

    fn region_desc(&self, region: &VulkanRegion) -> RegionDesc {
        region.desc
    }

    unsafe fn destroy_region(&mut self, region: VulkanRegion) {
        if region.owner != self.owner {
            return;
        }
        if let Some((buffer, memory)) = self.live.remove(&region.id) {
            // SAFETY: ours and live (just removed from the live set, so freed
            // once); the caller guarantees no batch in flight uses it.
            unsafe {
                self.o.device.destroy_buffer(buffer, None);
                self.o.device.free_memory(memory, None);
            }
        }
    }

    unsafe fn copy_blocks(
        &mut self,
        src: &VulkanRegion,
        dst: &VulkanRegion,
        batch: ValidatedBatch<'_>,
    ) -> Result<VulkanFence, VulkanError> {
        self.check_batch(src, dst, &batch)?;
        let (sl, dl) = (&src.desc.layout, &dst.desc.layout);
        if sl.block_bytes()? != dl.block_bytes()? || sl.order != dl.order || sl.layers != dl.layers
        {
            return Err(VulkanError::other("regions have different block layouts"));
        }
        self.reclaim()?;
        let lane = u8::from(self.transfer.is_some());
        let mut ranges = std::mem::take(&mut self.ranges);
        ranges.clear();
        sl.expand(
            batch.src_blocks(),
            batch.dst_blocks(),
            batch.copies(),
            |r| {
                ranges.push(vk::BufferCopy {
                    src_offset: r.src,
                    dst_offset: r.dst,
                    size: r.len,
                });
            },
        )?;
        if ranges.is_empty() {
            self.ranges = ranges;
            return Ok(self.last_fence(lane));
        }
        let d = self.o.device.clone();
        let l = match lane {
            0 => &mut self.compute,
            _ => self
                .transfer
                .as_mut()
                .ok_or(VulkanError::other("no transfer queue"))?,
        };
        let result = l.begin(&d).and_then(|cmd| {
            for chunk in ranges.chunks(REGIONS_PER_COMMAND) {
                // SAFETY: recording; both buffers live (checked); every range
                // lies in both (the core expands a batch validated against
                // their block counts) and, within one buffer, no two overlap.
                unsafe { d.cmd_copy_buffer(cmd, src.buffer, dst.buffer, chunk) };
            }
            l.submit(&d, cmd, Vec::new(), None)
        });
        self.ranges = ranges;
        Ok(VulkanFence {
            lane,
            value: result?,
            owner: self.owner,
        })
    }

    fn write_bytes(
        &mut self,
        region: &VulkanRegion,
        offset: u64,
        data: &[u8],
    ) -> Result<(), VulkanError> {
        self.write(region, offset, data)
    }

    fn read_bytes(
        &mut self,
        region: &VulkanRegion,
        offset: u64,
        out: &mut [u8],
    ) -> Result<(), VulkanError> {
        self.read(region, offset, out)
    }

    fn region_address(&self, region: &VulkanRegion) -> Option<u64> {
        region.address
    }

    fn poll(&mut self, fence: &VulkanFence) -> Result<bool, VulkanError> {
        self.fence_lane(fence)?.is_done(&self.o.device, fence.value)
    }

    fn wait(&mut self, fence: &VulkanFence) -> Result<(), VulkanError> {
        self.fence_lane(fence)?.wait(&self.o.device, fence.value)
    }
}

impl Quantize for VulkanBackend {
    unsafe fn quantize(
        &mut self,
        src: &VulkanRegion,
        dst: &VulkanRegion,
        batch: ValidatedBatch<'_>,
        format: QuantFormat,
    ) -> Result<VulkanFence, VulkanError> {
        self.quant(src, dst, &batch, format, false)
    }

    unsafe fn dequantize(
        &mut self,
        src: &VulkanRegion,
        dst: &VulkanRegion,
        batch: ValidatedBatch<'_>,
        format: QuantFormat,
    ) -> Result<VulkanFence, VulkanError> {
        self.quant(src, dst, &batch, format, true)
    }
}
