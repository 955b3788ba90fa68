//! The backend's error: a broad [`ErrorKind`], what was being done, and the
//! driver's or NVRTC's own words.

use core::fmt;

use cudarc::driver::{DriverError, sys::CUresult};
use pagedkv_core::{BackendError, ErrorKind};

/// Why the CUDA backend refused or failed an operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CudaError {
    /// The broad reason.
    pub kind: ErrorKind,
    /// What the backend was doing.
    pub what: &'static str,
    /// The driver's code and message, or NVRTC's log, when they gave one.
    pub detail: Option<String>,
}

impl CudaError {
    pub(crate) const fn new(kind: ErrorKind, what: &'static str) -> Self {
        Self {
            kind,
            what,
            detail: None,
        }
    }

    pub(crate) const fn unsupported(what: &'static str) -> Self {
        Self::new(ErrorKind::Unsupported, what)
    }

    pub(crate) const fn other(what: &'static str) -> Self {
        Self::new(ErrorKind::Other, what)
    }

    pub(crate) fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    /// Wraps a driver error met while doing `what`.
    pub(crate) fn driver(what: &'static str) -> impl FnOnce(DriverError) -> Self {
        move |e| Self::new(kind_of(e.0), what).with_detail(format!("{e}"))
    }
}

/// The broad reason of a driver result code.
pub(crate) fn kind_of(code: CUresult) -> ErrorKind {
    use CUresult as R;
    match code {
        R::CUDA_ERROR_OUT_OF_MEMORY => ErrorKind::OutOfMemory,
        R::CUDA_ERROR_NO_DEVICE
        | R::CUDA_ERROR_INVALID_DEVICE
        | R::CUDA_ERROR_NOT_SUPPORTED
        | R::CUDA_ERROR_STUB_LIBRARY
        | R::CUDA_ERROR_NOT_FOUND
        | R::CUDA_ERROR_UNSUPPORTED_PTX_VERSION
        | R::CUDA_ERROR_NO_BINARY_FOR_GPU
        | R::CUDA_ERROR_JIT_COMPILER_NOT_FOUND
        | R::CUDA_ERROR_SYSTEM_DRIVER_MISMATCH
        | R::CUDA_ERROR_COMPAT_NOT_SUPPORTED_ON_DEVICE => ErrorKind::Unsupported,
        // Sticky errors: the context, and every region in it, is gone.
        R::CUDA_ERROR_ILLEGAL_ADDRESS
        | R::CUDA_ERROR_LAUNCH_FAILED
        | R::CUDA_ERROR_ECC_UNCORRECTABLE
        | R::CUDA_ERROR_HARDWARE_STACK_ERROR
        | R::CUDA_ERROR_ILLEGAL_INSTRUCTION
        | R::CUDA_ERROR_MISALIGNED_ADDRESS
        | R::CUDA_ERROR_INVALID_PC
        | R::CUDA_ERROR_DEVICE_UNAVAILABLE
        | R::CUDA_ERROR_CONTEXT_IS_DESTROYED
        | R::CUDA_ERROR_DEINITIALIZED => ErrorKind::DeviceLost,
        _ => ErrorKind::Other,
    }
}

impl fmt::Display for CudaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cuda backend: {:?}: {}", self.kind, self.what)?;
        if let Some(d) = &self.detail {
            write!(f, " ({d})")?;
        }
        Ok(())
    }
}

impl std::error::Error for CudaError {}

impl BackendError for CudaError {
    fn kind(&self) -> ErrorKind {
        self.kind
    }
}

impl From<pagedkv_core::Error> for CudaError {
    fn from(e: pagedkv_core::Error) -> Self {
        Self::other("layout arithmetic").with_detail(format!("{e}"))
    }
}
