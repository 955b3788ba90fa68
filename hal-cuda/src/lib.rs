#![doc = include_str!("../README.md")]
#![deny(
    unsafe_op_in_unsafe_fn,
    clippy::undocumented_unsafe_blocks,
    clippy::missing_safety_doc
)]

mod backend;
mod error;
pub mod kernels;
pub mod lower;
mod region;

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream, result, sys};

pub use error::CudaError;
pub use kernels::KernelOrigin;
pub use lower::CopyStrategy;
pub use region::CudaRegion;

/// Completion of a batch: a CUDA event recorded on the backend's stream
/// after the batch's work. Polling it never blocks.
#[derive(Debug)]
pub struct CudaFence {
    event: cudarc::driver::CudaEvent,
}

/// What [`probe`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Probe {
    /// CUDA devices.
    pub devices: usize,
    /// The driver's CUDA version, as `major * 1000 + minor * 10`.
    pub driver_version: i32,
}

/// Looks for a CUDA driver and devices without touching anything that could
/// panic: first whether `libcuda` can be opened, then `cuInit` and the
/// device count. No driver or no device is an `Unsupported` error.
pub fn probe() -> Result<Probe, CudaError> {
    // SAFETY: only tries to open the library (dlopen); nothing is called.
    if !unsafe { sys::is_culib_present() } {
        return Err(CudaError::unsupported(
            "no CUDA driver library (libcuda) on this machine",
        ));
    }
    result::init().map_err(CudaError::driver("initializing the CUDA driver"))?;
    let devices =
        result::device::get_count().map_err(CudaError::driver("counting CUDA devices"))?;
    if devices <= 0 {
        return Err(CudaError::unsupported("the CUDA driver sees no device"));
    }
    let mut driver_version = 0;
    // SAFETY: the library is loaded and initialized; writes one integer.
    unsafe { sys::cuDriverGetVersion(&mut driver_version) }
        .result()
        .map_err(CudaError::driver("reading the driver version"))?;
    Ok(Probe {
        devices: usize::try_from(devices).unwrap_or(0),
        driver_version,
    })
}

/// Why a test that needs a GPU should skip, or `None` to run it. With
/// `PAGEDKV_REQUIRE_CUDA=1` a missing GPU panics instead (for GPU machines,
/// where skipping would hide a failure).
pub fn skip_reason() -> Option<String> {
    match probe() {
        Ok(_) => None,
        Err(e) if std::env::var("PAGEDKV_REQUIRE_CUDA").as_deref() == Ok("1") => {
            panic!("PAGEDKV_REQUIRE_CUDA=1 but no GPU is usable: {e}")
        }
        Err(e) => Some(format!("skipped: no CUDA GPU here ({e})")),
    }
}

/// One opened device: its context, the stream every batch runs on, and the
/// loaded kernels.
#[derive(Debug)]
struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    copy: [CudaFunction; 4],
    quant: CudaFunction,
    sms: u32,
    origin: KernelOrigin,
    _module: Arc<CudaModule>,
}

impl Gpu {
    fn open(ordinal: usize) -> Result<Self, CudaError> {
        let ctx = CudaContext::new(ordinal).map_err(CudaError::driver("opening a CUDA device"))?;
        // SAFETY: the backend orders its work itself (one stream per device,
        // events between streams); it never hands `CudaSlice`s to other
        // streams, which is what cudarc's event tracking guards.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx
            .new_stream()
            .map_err(CudaError::driver("creating a stream"))?;
        let cc = ctx
            .compute_capability()
            .map_err(CudaError::driver("reading the compute capability"))?;
        let sms = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(CudaError::driver("reading the multiprocessor count"))?;
        let mut loaded = None;
        let mut last = CudaError::other("no kernel image to load");
        for (image, origin) in kernels::candidates(cc)? {
            match ctx.load_module(image) {
                Ok(m) => {
                    loaded = Some((m, origin));
                    break;
                }
                Err(e) => last = CudaError::driver("loading the kernels")(e),
            }
        }
        let (module, origin) = loaded.ok_or(last)?;
        let f = |name| {
            module
                .load_function(name)
                .map_err(CudaError::driver("finding a kernel"))
        };
        Ok(Self {
            copy: [
                f("pagedkv_copy_16")?,
                f("pagedkv_copy_8")?,
                f("pagedkv_copy_4")?,
                f("pagedkv_copy_1")?,
            ],
            quant: f("pagedkv_quant")?,
            sms: u32::try_from(sms).unwrap_or(1),
            origin,
            ctx,
            stream,
            _module: module,
        })
    }
}

/// The CUDA backend: regions in device memory (`MemoryKind::Device(n)` is
/// CUDA device `n`) and in mapped, portable pinned host memory
/// (`PinnedHost`, and `Host`, which is backed the same way so that kernels
/// can reach it). Each device gets its own context and stream, opened on
/// first use; every batch is one kernel launch on one stream.
#[derive(Debug)]
pub struct CudaBackend {
    gpus: Vec<Option<Gpu>>,
    /// The device that runs host-to-host copies and maps host memory.
    home: usize,
    owner: usize,
    next_id: u64,
    strategy: CopyStrategy,
    pairs: Vec<u32>,
}

impl Drop for CudaBackend {
    /// Waits for every stream, so no kernel runs while the streams and
    /// modules it uses are destroyed (regions not destroyed stay allocated:
    /// their memory belongs to the caller's handles).
    fn drop(&mut self) {
        let _ = self.sync_all();
    }
}

static NEXT_OWNER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(1);

impl CudaBackend {
    /// A backend whose home is device 0.
    pub fn new() -> Result<Self, CudaError> {
        Self::with_home(0)
    }

    /// A backend whose home (host-to-host copies, host memory mapping) is
    /// device `ordinal`.
    pub fn with_home(ordinal: usize) -> Result<Self, CudaError> {
        let p = probe()?;
        if ordinal >= p.devices {
            return Err(CudaError::unsupported("no CUDA device with that ordinal"));
        }
        let mut be = Self {
            gpus: (0..p.devices).map(|_| None).collect(),
            home: ordinal,
            owner: NEXT_OWNER.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            next_id: 0,
            strategy: CopyStrategy::Auto,
            pairs: Vec::new(),
        };
        be.gpu(ordinal)?;
        Ok(be)
    }

    /// Chooses between the gather kernel and the copy engine (see
    /// [`CopyStrategy`]).
    pub fn set_copy_strategy(&mut self, strategy: CopyStrategy) {
        self.strategy = strategy;
    }

    /// The home device's name, compute capability, multiprocessors and where
    /// its kernels came from.
    pub fn describe(&self) -> String {
        let Some(Some(g)) = self.gpus.get(self.home) else {
            return "no device open".into();
        };
        format!(
            "{} (compute {:?}, {} SMs, kernels: {:?})",
            g.ctx.name().unwrap_or_else(|_| "unnamed".into()),
            g.ctx.compute_capability().unwrap_or((0, 0)),
            g.sms,
            g.origin
        )
    }

    /// The home device's context and stream (for benchmarks that compare
    /// with plain driver copies on the same stream).
    pub fn home_stream(&self) -> Option<Arc<CudaStream>> {
        self.gpus.get(self.home)?.as_ref().map(|g| g.stream.clone())
    }

    /// The device `ordinal`, opened on first use.
    fn gpu(&mut self, ordinal: usize) -> Result<&Gpu, CudaError> {
        let slot = self
            .gpus
            .get_mut(ordinal)
            .ok_or(CudaError::unsupported("no CUDA device with that ordinal"))?;
        if slot.is_none() {
            *slot = Some(Gpu::open(ordinal)?);
        }
        slot.as_ref()
            .ok_or(CudaError::other("device failed to open"))
    }

    /// Waits for every stream this backend has started work on.
    fn sync_all(&self) -> Result<(), CudaError> {
        for g in self.gpus.iter().flatten() {
            g.stream
                .synchronize()
                .map_err(CudaError::driver("waiting for a stream"))?;
        }
        Ok(())
    }
}
