//! Helpers shared by the manager's tests: a small layout, a backend wrapper
//! that injects faults and slow fences, and checksums.
#![allow(
    dead_code,
    unreachable_pub,
    missing_docs,
    clippy::cast_possible_truncation,
    reason = "test helpers"
)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use pagedkv_core::{
    Backend, BackendError, ErrorKind, QuantFormat, Quantize, RegionDesc, ValidatedBatch,
};
use pagedkv_hal_host::{HostBackend, HostError, HostFence, HostRegion};
use pagedkv_manager::{AllocationRequest, BlockOrder, DType, KvLayout, ManagerConfig, RequestId};

pub fn layout() -> KvLayout {
    KvLayout {
        layers: 2,
        kv_heads: 2,
        head_size: 32,
        tokens_per_block: 8,
        dtype: DType::F16,
        order: BlockOrder::BlockMajor,
    }
}

pub fn config(blocks: usize) -> ManagerConfig {
    let mut c = ManagerConfig::new(layout(), blocks);
    c.hash_key = Some(*b"manager-test-key");
    c.max_sequence_length = 4096;
    c
}

pub fn request(id: u64, prompt: Vec<u32>) -> AllocationRequest {
    AllocationRequest::for_prompt(RequestId(id), prompt, 1024, &layout())
}

/// Knobs shared with a `Faulty` backend after it moved into a manager.
#[derive(Debug, Default)]
pub struct Knobs {
    /// Transfers (copy, quantize, dequantize) so far.
    pub transfers: AtomicU64,
    /// Fence polls so far.
    pub polls: AtomicU64,
    /// Fail the transfer with this 1-based number (0: never).
    pub fail_transfer: AtomicU64,
    /// Fail the poll with this 1-based number (0: never).
    pub fail_poll: AtomicU64,
    /// Each fence reports "not done" this many times first.
    pub slow_polls: AtomicU64,
    /// Regions created and not yet destroyed.
    pub live_regions: AtomicU64,
}

impl Knobs {
    pub fn reset(&self) {
        for a in [
            &self.transfers,
            &self.polls,
            &self.fail_transfer,
            &self.fail_poll,
            &self.slow_polls,
        ] {
            a.store(0, Ordering::SeqCst);
        }
    }
}

/// `HostBackend` with injected faults: the k-th transfer or fence poll fails
/// (after the transfer ran half way: its first half of copies is done).
pub struct Faulty {
    pub inner: HostBackend,
    pub knobs: Arc<Knobs>,
}

impl Faulty {
    pub fn new() -> (Self, Arc<Knobs>) {
        let knobs = Arc::new(Knobs::default());
        (
            Self {
                inner: HostBackend::new(),
                knobs: Arc::clone(&knobs),
            },
            knobs,
        )
    }

    fn transfer(&self) -> Result<(), HostError> {
        let n = self.knobs.transfers.fetch_add(1, Ordering::SeqCst) + 1;
        if n == self.knobs.fail_transfer.load(Ordering::SeqCst) {
            return Err(HostError {
                kind: ErrorKind::DeviceLost,
                reason: "injected transfer fault",
            });
        }
        Ok(())
    }
}

#[derive(Debug)]
pub struct SlowFence {
    inner: HostFence,
    left: AtomicU64,
}

impl Backend for Faulty {
    type Region = HostRegion;
    type Fence = SlowFence;
    type Error = HostError;

    fn create_region(&mut self, desc: &RegionDesc) -> Result<HostRegion, HostError> {
        let r = self.inner.create_region(desc)?;
        self.knobs.live_regions.fetch_add(1, Ordering::SeqCst);
        Ok(r)
    }
    fn region_desc(&self, region: &HostRegion) -> RegionDesc {
        self.inner.region_desc(region)
    }
    unsafe fn destroy_region(&mut self, region: HostRegion) {
        self.knobs.live_regions.fetch_sub(1, Ordering::SeqCst);
        // SAFETY: forwarded contract.
        unsafe { self.inner.destroy_region(region) }
    }
    unsafe fn copy_blocks(
        &mut self,
        src: &HostRegion,
        dst: &HostRegion,
        batch: ValidatedBatch<'_>,
    ) -> Result<SlowFence, HostError> {
        let fail = self.transfer();
        // A failing transfer still writes garbage into its first target, as
        // a device that died mid-copy would.
        if fail.is_err()
            && let Some(c) = batch.copies().first()
        {
            let off = batch_offset(dst, c.dst.0);
            let _ = self.inner.write_bytes(dst, off, &[0xEE; 16]);
        }
        fail?;
        // SAFETY: forwarded contract.
        let f = unsafe { self.inner.copy_blocks(src, dst, batch)? };
        Ok(SlowFence {
            inner: f,
            left: AtomicU64::new(self.knobs.slow_polls.load(Ordering::SeqCst)),
        })
    }
    fn write_bytes(
        &mut self,
        region: &HostRegion,
        offset: u64,
        data: &[u8],
    ) -> Result<(), HostError> {
        self.inner.write_bytes(region, offset, data)
    }
    fn read_bytes(
        &mut self,
        region: &HostRegion,
        offset: u64,
        out: &mut [u8],
    ) -> Result<(), HostError> {
        self.inner.read_bytes(region, offset, out)
    }
    fn region_address(&self, region: &HostRegion) -> Option<u64> {
        self.inner.region_address(region)
    }
    fn poll(&mut self, fence: &SlowFence) -> Result<bool, HostError> {
        let n = self.knobs.polls.fetch_add(1, Ordering::SeqCst) + 1;
        if n == self.knobs.fail_poll.load(Ordering::SeqCst) {
            return Err(HostError {
                kind: ErrorKind::DeviceLost,
                reason: "injected fence fault",
            });
        }
        if fence.left.load(Ordering::SeqCst) > 0 {
            fence.left.fetch_sub(1, Ordering::SeqCst);
            return Ok(false);
        }
        self.inner.poll(&fence.inner)
    }
    fn wait(&mut self, fence: &SlowFence) -> Result<(), HostError> {
        let n = self.knobs.polls.fetch_add(1, Ordering::SeqCst) + 1;
        if n == self.knobs.fail_poll.load(Ordering::SeqCst) {
            return Err(HostError {
                kind: ErrorKind::DeviceLost,
                reason: "injected fence fault",
            });
        }
        fence.left.store(0, Ordering::SeqCst);
        self.inner.wait(&fence.inner)
    }
}

fn batch_offset(dst: &HostRegion, block: u32) -> u64 {
    let l = dst.desc().layout;
    l.offset(
        dst.desc().block_count,
        pagedkv_core::BlockId(block),
        0,
        pagedkv_core::KvPart::Key,
    )
    .unwrap_or(0)
}

impl Quantize for Faulty {
    unsafe fn quantize(
        &mut self,
        src: &HostRegion,
        dst: &HostRegion,
        batch: ValidatedBatch<'_>,
        f: QuantFormat,
    ) -> Result<SlowFence, HostError> {
        self.transfer()?;
        // SAFETY: forwarded contract.
        let fence = unsafe { self.inner.quantize(src, dst, batch, f)? };
        Ok(SlowFence {
            inner: fence,
            left: AtomicU64::new(self.knobs.slow_polls.load(Ordering::SeqCst)),
        })
    }
    unsafe fn dequantize(
        &mut self,
        src: &HostRegion,
        dst: &HostRegion,
        batch: ValidatedBatch<'_>,
        f: QuantFormat,
    ) -> Result<SlowFence, HostError> {
        self.transfer()?;
        // SAFETY: forwarded contract.
        let fence = unsafe { self.inner.dequantize(src, dst, batch, f)? };
        Ok(SlowFence {
            inner: fence,
            left: AtomicU64::new(self.knobs.slow_polls.load(Ordering::SeqCst)),
        })
    }
}

/// A simple checksum (FNV-1a 64).
pub fn checksum(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// Deterministic f16 KV bytes of (request, block): finite values in [-8, 8].
pub fn kv_bytes(block_bytes: usize, seed: u64) -> Vec<u8> {
    (0..block_bytes / 2)
        .flat_map(|i| {
            let x = ((i as u64 * 2_654_435_761 + seed * 97) % 4001) as f32 / 250.0 - 8.0;
            half::f16::from_f32(x).to_bits().to_le_bytes()
        })
        .collect()
}

pub fn _assert_kind(e: &dyn BackendError) -> ErrorKind {
    e.kind()
}
