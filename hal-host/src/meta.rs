//! `MetadataBackend`: regions without bytes, for simulations of pools far
//! larger than memory (the CLI's default). Batches are validated and
//! counted; reads and writes are refused as unsupported.

use pagedkv_core::{Backend, QuantFormat, Quantize, RegionDesc, ValidatedBatch};

use crate::{HostError, HostFence};

/// A region that records its description only.
#[derive(Debug)]
pub struct MetaRegion {
    desc: RegionDesc,
}

/// A backend that moves no bytes: every copy completes at once and is
/// counted (blocks and bytes that a real backend would have moved).
#[derive(Debug, Default)]
pub struct MetadataBackend {
    /// Blocks copied (or quantized) so far.
    pub blocks_moved: u64,
    /// Bytes those copies would have moved.
    pub bytes_moved: u64,
    fences: u64,
}

impl MetadataBackend {
    /// A new backend.
    pub fn new() -> Self {
        Self::default()
    }

    fn count(&mut self, batch: &ValidatedBatch<'_>, block_bytes: u64) -> HostFence {
        let n = batch.copies().len() as u64;
        self.blocks_moved += n;
        self.bytes_moved += n * block_bytes;
        self.fences += 1;
        HostFence(self.fences)
    }
}

fn block_bytes(r: &MetaRegion) -> u64 {
    r.desc.layout.block_bytes().unwrap_or(0)
}

impl Backend for MetadataBackend {
    type Region = MetaRegion;
    type Fence = HostFence;
    type Error = HostError;

    fn create_region(&mut self, desc: &RegionDesc) -> Result<MetaRegion, HostError> {
        desc.layout
            .validate()
            .map_err(|_| HostError::other("invalid layout"))?;
        Ok(MetaRegion { desc: *desc })
    }
    fn region_desc(&self, region: &MetaRegion) -> RegionDesc {
        region.desc
    }
    unsafe fn destroy_region(&mut self, _region: MetaRegion) {}
    unsafe fn copy_blocks(
        &mut self,
        src: &MetaRegion,
        _dst: &MetaRegion,
        batch: ValidatedBatch<'_>,
    ) -> Result<HostFence, HostError> {
        Ok(self.count(&batch, block_bytes(src)))
    }
    fn write_bytes(&mut self, _: &MetaRegion, _: u64, _: &[u8]) -> Result<(), HostError> {
        Err(HostError::unsupported("a metadata backend holds no bytes"))
    }
    fn read_bytes(&mut self, _: &MetaRegion, _: u64, _: &mut [u8]) -> Result<(), HostError> {
        Err(HostError::unsupported("a metadata backend holds no bytes"))
    }
    fn poll(&mut self, _: &HostFence) -> Result<bool, HostError> {
        Ok(true)
    }
    fn wait(&mut self, _: &HostFence) -> Result<(), HostError> {
        Ok(())
    }
}

impl Quantize for MetadataBackend {
    unsafe fn quantize(
        &mut self,
        src: &MetaRegion,
        _dst: &MetaRegion,
        batch: ValidatedBatch<'_>,
        _format: QuantFormat,
    ) -> Result<HostFence, HostError> {
        Ok(self.count(&batch, block_bytes(src)))
    }
    unsafe fn dequantize(
        &mut self,
        src: &MetaRegion,
        _dst: &MetaRegion,
        batch: ValidatedBatch<'_>,
        _format: QuantFormat,
    ) -> Result<HostFence, HostError> {
        Ok(self.count(&batch, block_bytes(src)))
    }
}
