//! `Faulty`: the host backend with injected faults and slow fences, for
//! fault-injection, cancellation and model tests of the manager.
#![allow(clippy::cast_possible_truncation, reason = "small test values")]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use pagedkv_core::{Backend, ErrorKind, QuantFormat, Quantize, RegionDesc, ValidatedBatch};
use pagedkv_hal_host::{HostBackend, HostError, HostFence, HostRegion};

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
    /// Every counter and fault back to zero (regions stay counted).
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
    /// The backend doing the work.
    pub inner: HostBackend,
    /// Its fault knobs.
    pub knobs: Arc<Knobs>,
}

impl Faulty {
    /// A backend and the knobs to drive it after it moved into a manager.
    #[allow(clippy::new_ret_no_self, reason = "the knobs come back too")]
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

/// A fence that reports "not done" a set number of times first.
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
