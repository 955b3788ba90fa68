//! `Backend` and `Quantize` for [`CudaBackend`].

use cudarc::driver::{LaunchConfig, PushKernelArg, result, sys};
use pagedkv_core::{
    Backend, ErrorKind, MemoryKind, QuantFormat, Quantize, RegionDesc, ValidatedBatch,
};

use crate::lower::{self, CopyStrategy, Width};
use crate::region::{self, CudaRegion};
use crate::{CudaBackend, CudaError, CudaFence};

/// Makes `g`'s context current. Unlike cudarc's `bind_to_thread`, this
/// does not first report an error recorded by an earlier drop (which would
/// leave the context unbound).
pub(crate) fn bind(g: &crate::Gpu) -> Result<(), CudaError> {
    // SAFETY: a context retained by `g` for its whole life.
    unsafe { result::ctx::set_current(g.ctx.cu_ctx()) }
        .map_err(CudaError::driver("binding a context"))
}

impl CudaBackend {
    /// An error met after work may have been queued on `exec`'s stream:
    /// waits for that work first, so the caller, told the batch failed, may
    /// reuse its blocks at once.
    fn settle(&self, exec: usize, e: CudaError) -> CudaError {
        if let Ok(g) = self.opened(exec) {
            let _ = g.stream.synchronize();
        }
        e
    }

    fn check(&self, r: &CudaRegion) -> Result<(), CudaError> {
        if r.owner == self.owner {
            Ok(())
        } else {
            Err(CudaError::other("region of another backend"))
        }
    }

    /// Checks a batch's regions: ours, shaped alike, the block counts and
    /// pairing the batch was validated against.
    fn check_batch(
        &self,
        src: &CudaRegion,
        dst: &CudaRegion,
        batch: &ValidatedBatch<'_>,
    ) -> Result<(), CudaError> {
        self.check(src)?;
        self.check(dst)?;
        if batch.src_blocks() != src.desc.block_count || batch.dst_blocks() != dst.desc.block_count
        {
            return Err(CudaError::other(
                "batch validated against other block counts",
            ));
        }
        if batch.same_region() != (src.id == dst.id) {
            return Err(CudaError::other(
                "batch validated for another region pairing",
            ));
        }
        Ok(())
    }

    /// The device that runs work between `a` and `b`: the target's GPU, else
    /// the source's, else home. Its stream first waits for the other GPU's
    /// stream, so work started there before is ordered before this.
    fn exec_device(&mut self, target: &CudaRegion, other: &CudaRegion) -> Result<usize, CudaError> {
        let exec = target.ordinal.or(other.ordinal).unwrap_or(self.home);
        self.gpu(exec)?;
        if let Some(o) = other.ordinal.filter(|&o| o != exec) {
            self.gpu(o)?;
            let (Some(Some(e)), Some(Some(g))) = (self.gpus.get(exec), self.gpus.get(o)) else {
                return Err(CudaError::other("device not open"));
            };
            let ev = g
                .stream
                .record_event(None)
                .map_err(CudaError::driver("ordering two devices' streams"))?;
            e.stream
                .wait(&ev)
                .map_err(CudaError::driver("ordering two devices' streams"))?;
        }
        Ok(exec)
    }

    fn fence(&self, exec: usize) -> Result<CudaFence, CudaError> {
        let g = self.opened(exec)?;
        let event = g
            .stream
            .record_event(None)
            .map_err(CudaError::driver("recording a fence"))?;
        Ok(CudaFence { event })
    }

    fn opened(&self, ordinal: usize) -> Result<&crate::Gpu, CudaError> {
        self.gpus
            .get(ordinal)
            .and_then(Option::as_ref)
            .ok_or(CudaError::other("device not open"))
    }

    /// One `cuMemcpyAsync` (or peer copy) per merged byte range.
    fn copy_ranges(
        &self,
        exec: usize,
        src: &CudaRegion,
        dst: &CudaRegion,
        batch: &ValidatedBatch<'_>,
    ) -> Result<(), CudaError> {
        let g = self.opened(exec)?;
        bind(g)?;
        let peer = match (src.ordinal, dst.ordinal) {
            (Some(s), Some(d)) if s != d => {
                Some((self.opened(s)?.ctx.cu_ctx(), self.opened(d)?.ctx.cu_ctx()))
            }
            _ => None,
        };
        let stream = g.stream.cu_stream();
        let mut failed = Ok(());
        src.desc.layout.expand(
            batch.src_blocks(),
            batch.dst_blocks(),
            batch.copies(),
            |r| {
                if failed.is_err() {
                    return;
                }
                let Ok(len) = usize::try_from(r.len) else {
                    failed = Err(CudaError::other("range larger than the address space"));
                    return;
                };
                // SAFETY: `r` lies within both regions (the core expands a
                // batch validated against their block counts, checked in
                // `check_batch`); both regions are live and the caller keeps
                // other work off these blocks until the fence.
                let res = unsafe {
                    match peer {
                        Some((sc, dc)) => result::memcpy_peer_async(
                            dc,
                            dst.addr + r.dst,
                            sc,
                            src.addr + r.src,
                            len,
                            stream,
                        ),
                        None => sys::cuMemcpyAsync(dst.addr + r.dst, src.addr + r.src, len, stream)
                            .result(),
                    }
                };
                if let Err(e) = res {
                    failed = Err(CudaError::driver("copying a byte range")(e));
                }
            },
        )?;
        failed
    }

    /// The gather kernel: every pair, every part, one launch.
    fn copy_kernel(
        &mut self,
        exec: usize,
        src: &CudaRegion,
        dst: &CudaRegion,
        batch: &ValidatedBatch<'_>,
    ) -> Result<(), CudaError> {
        lower::flatten(batch.copies(), &mut self.pairs);
        let g = self.opened(exec)?;
        let (sg, dg) = (
            lower::geometry(&src.desc, src.addr)?,
            lower::geometry(&dst.desc, dst.addr)?,
        );
        let l = lower::plan_copy(&src.desc.layout, batch.copies().len(), &sg, &dg, g.sms)?;
        let pairs = g
            .stream
            .clone_htod(&self.pairs)
            .map_err(CudaError::driver("uploading the batch"))?;
        let f = &g.copy[match l.width {
            Width::W16 => 0,
            Width::W8 => 1,
            Width::W4 => 2,
            Width::W1 => 3,
        }];
        let cfg = LaunchConfig {
            grid_dim: (l.grid, 1, 1),
            block_dim: (l.block, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = g.stream.launch_builder(f);
        b.arg(&pairs)
            .arg(&l.items)
            .arg(&l.parts)
            .arg(&l.chunks)
            .arg(&l.unit)
            .arg(&l.chunk)
            .arg(&sg)
            .arg(&dg);
        // SAFETY: the arguments match `pagedkv_copy_*`'s parameters in order
        // and type; every address the kernel forms lies in `src` or `dst`
        // (see `lower`), both live; `pairs` is freed in stream order after
        // the kernel (cudarc's `free_async` on drop).
        unsafe { b.launch(cfg) }.map_err(CudaError::driver("launching the copy kernel"))?;
        Ok(())
    }

    fn quant(
        &mut self,
        src: &CudaRegion,
        dst: &CudaRegion,
        batch: &ValidatedBatch<'_>,
        format: QuantFormat,
        dequantize: bool,
    ) -> Result<CudaFence, CudaError> {
        self.check_batch(src, dst, batch)?;
        if batch.same_region() {
            return Err(CudaError::other("quantization needs two regions"));
        }
        let (full, q) = if dequantize { (dst, src) } else { (src, dst) };
        if let (Some(a), Some(b)) = (src.ordinal, dst.ordinal)
            && a != b
        {
            return Err(CudaError::unsupported("quantizing between two GPUs"));
        }
        let exec = self.exec_device(dst, src)?;
        let plan = {
            let g = self.opened(exec)?;
            lower::plan_quant(
                &full.desc.layout,
                &q.desc.layout,
                format,
                batch.copies().len(),
                g.sms,
            )?
        };
        if !batch.copies().is_empty() {
            lower::flatten(batch.copies(), &mut self.pairs);
            let g = self.opened(exec)?;
            let fg = lower::geometry(&full.desc, full.addr)?;
            let qg = lower::geometry(&q.desc, q.addr)?;
            let pairs = g
                .stream
                .clone_htod(&self.pairs)
                .map_err(CudaError::driver("uploading the batch"))?;
            let dir = u32::from(dequantize);
            let cfg = LaunchConfig {
                grid_dim: (plan.grid, 1, 1),
                block_dim: (plan.block, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut b = g.stream.launch_builder(&g.quant);
            b.arg(&pairs)
                .arg(&plan.items)
                .arg(&plan.parts)
                .arg(&plan.heads)
                .arg(&plan.tokens)
                .arg(&plan.dim)
                .arg(&fg)
                .arg(&plan.full_type)
                .arg(&qg)
                .arg(&plan.q_type)
                .arg(&plan.q_data)
                .arg(&dir);
            // SAFETY: arguments match `pagedkv_quant`'s parameters; the
            // layouts were checked to be one shape in two element types, so
            // every element and scale the kernel addresses lies in its region.
            unsafe { b.launch(cfg) }
                .map_err(CudaError::driver("launching the quantize kernel"))
                .map_err(|e| self.settle(exec, e))?;
        }
        self.fence(exec).map_err(|e| self.settle(exec, e))
    }
}

/// An offset already checked against a region, as a host `usize`.
fn host_offset(at: u64) -> Result<usize, CudaError> {
    usize::try_from(at).map_err(|_| CudaError::other("offset beyond the address space"))
}

impl Backend for CudaBackend {
    type Region = CudaRegion;
    type Fence = CudaFence;
    type Error = CudaError;

    fn create_region(&mut self, desc: &RegionDesc) -> Result<CudaRegion, CudaError> {
        desc.layout.validate()?;
        let bytes = desc
            .layout
            .region_bytes(desc.block_count)
            .map_err(|_| CudaError::new(ErrorKind::OutOfMemory, "region larger than 2^64 bytes"))?;
        let (ordinal, device) = match desc.memory {
            MemoryKind::Device(n) => (Some(usize::from(n)), usize::from(n)),
            MemoryKind::PinnedHost | MemoryKind::Host => (None, self.home),
        };
        let g = self.gpu(device)?;
        bind(g)?;
        let (addr, host) = if bytes == 0 {
            (0, None)
        } else if ordinal.is_some() {
            (region::alloc_device(bytes)?, None)
        } else {
            let (h, d) = region::alloc_pinned(bytes)?;
            (d, Some(h))
        };
        self.next_id += 1;
        Ok(CudaRegion {
            desc: *desc,
            addr,
            host,
            bytes,
            ordinal,
            owner: self.owner,
            id: self.next_id,
        })
    }

    fn region_desc(&self, region: &CudaRegion) -> RegionDesc {
        region.desc
    }

    unsafe fn destroy_region(&mut self, region: CudaRegion) {
        if self.check(&region).is_err() {
            // Not ours: its memory belongs to another backend; leaking is the
            // only safe answer.
            return;
        }
        let device = region.ordinal.unwrap_or(self.home);
        if let Ok(g) = self.gpu(device)
            && bind(g).is_ok()
        {
            // SAFETY: ours and live (the caller's contract: not destroyed
            // before, no batch in flight on it).
            if let Err(e) = unsafe { region::free(&region) } {
                eprintln!("pagedkv-hal-cuda: leaking a region: {e}");
            }
        }
    }

    unsafe fn copy_blocks(
        &mut self,
        src: &CudaRegion,
        dst: &CudaRegion,
        batch: ValidatedBatch<'_>,
    ) -> Result<CudaFence, CudaError> {
        self.check_batch(src, dst, &batch)?;
        lower::check_pair(&src.desc, &dst.desc)?;
        let exec = self.exec_device(dst, src)?;
        if !batch.copies().is_empty() {
            let cross = matches!((src.ordinal, dst.ordinal), (Some(a), Some(b)) if a != b);
            let engine = match self.strategy {
                CopyStrategy::Kernel => cross,
                CopyStrategy::Memcpy => true,
                CopyStrategy::Auto => {
                    cross
                        || lower::wants_memcpy(
                            &src.desc.layout,
                            batch.copies(),
                            batch.src_blocks(),
                            batch.dst_blocks(),
                        )
                }
            };
            let queued = if engine {
                self.copy_ranges(exec, src, dst, &batch)
            } else {
                self.copy_kernel(exec, src, dst, &batch)
            };
            queued.map_err(|e| self.settle(exec, e))?;
        }
        self.fence(exec).map_err(|e| self.settle(exec, e))
    }

    fn write_bytes(
        &mut self,
        region: &CudaRegion,
        offset: u64,
        data: &[u8],
    ) -> Result<(), CudaError> {
        self.check(region)?;
        let at = host_offset(region.range(offset, data.len())?)?;
        self.sync_all()?;
        if data.is_empty() {
            return Ok(());
        }
        match region.host {
            Some(h) => {
                // SAFETY: in bounds (checked), live (ours, not destroyed), and
                // no GPU work is in flight (every stream synchronized).
                unsafe {
                    core::ptr::copy_nonoverlapping(data.as_ptr(), h.as_ptr().add(at), data.len());
                }
                Ok(())
            }
            None => {
                let g = self.gpu(region.ordinal.unwrap_or(self.home))?;
                bind(g)?;
                // On the backend's stream, then waited: a plain
                // `cuMemcpyHtoD` from pageable memory may return before the
                // bytes land, unordered with the (non-blocking) stream.
                // SAFETY: the target range lies in the live device region;
                // `data` outlives the copy (the stream is synchronized).
                unsafe {
                    result::memcpy_htod_async(region.addr + at as u64, data, g.stream.cu_stream())
                }
                .map_err(CudaError::driver("writing device memory"))?;
                g.stream
                    .synchronize()
                    .map_err(CudaError::driver("writing device memory"))
            }
        }
    }

    fn read_bytes(
        &mut self,
        region: &CudaRegion,
        offset: u64,
        out: &mut [u8],
    ) -> Result<(), CudaError> {
        self.check(region)?;
        let at = host_offset(region.range(offset, out.len())?)?;
        self.sync_all()?;
        if out.is_empty() {
            return Ok(());
        }
        match region.host {
            Some(h) => {
                // SAFETY: as in `write_bytes`; `out` is an exclusive slice.
                unsafe {
                    core::ptr::copy_nonoverlapping(h.as_ptr().add(at), out.as_mut_ptr(), out.len());
                }
                Ok(())
            }
            None => {
                let g = self.gpu(region.ordinal.unwrap_or(self.home))?;
                bind(g)?;
                // SAFETY: the source range lies in the live device region.
                unsafe { result::memcpy_dtoh_sync(out, region.addr + at as u64) }
                    .map_err(CudaError::driver("reading device memory"))
            }
        }
    }

    fn region_address(&self, region: &CudaRegion) -> Option<u64> {
        Some(region.addr)
    }

    fn poll(&mut self, fence: &CudaFence) -> Result<bool, CudaError> {
        fence
            .event
            .try_is_complete()
            .map_err(CudaError::driver("polling a fence"))
    }

    fn wait(&mut self, fence: &CudaFence) -> Result<(), CudaError> {
        fence
            .event
            .synchronize()
            .map_err(CudaError::driver("waiting for a fence"))
    }
}

impl Quantize for CudaBackend {
    unsafe fn quantize(
        &mut self,
        src: &CudaRegion,
        dst: &CudaRegion,
        batch: ValidatedBatch<'_>,
        format: QuantFormat,
    ) -> Result<CudaFence, CudaError> {
        self.quant(src, dst, &batch, format, false)
    }

    unsafe fn dequantize(
        &mut self,
        src: &CudaRegion,
        dst: &CudaRegion,
        batch: ValidatedBatch<'_>,
        format: QuantFormat,
    ) -> Result<CudaFence, CudaError> {
        self.quant(src, dst, &batch, format, true)
    }
}
