//! The backend's error: a broad [`ErrorKind`], what was being done, and
//! Vulkan's result code.

use core::fmt;

use ash::vk;
use pagedkv_core::{BackendError, ErrorKind};

/// Why the Vulkan backend refused or failed an operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VulkanError {
    /// The broad reason.
    pub kind: ErrorKind,
    /// What the backend was doing.
    pub what: &'static str,
    /// Vulkan's result code or the loader's message, when there is one.
    pub detail: Option<String>,
}

impl VulkanError {
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

    /// Wraps a Vulkan result met while doing `what`.
    pub(crate) fn vk(what: &'static str) -> impl FnOnce(vk::Result) -> Self {
        move |r| Self::new(kind_of(r), what).with_detail(format!("{r:?}"))
    }
}

/// The broad reason of a Vulkan result code.
pub(crate) fn kind_of(r: vk::Result) -> ErrorKind {
    match r {
        vk::Result::ERROR_OUT_OF_DEVICE_MEMORY | vk::Result::ERROR_OUT_OF_HOST_MEMORY => {
            ErrorKind::OutOfMemory
        }
        vk::Result::ERROR_DEVICE_LOST => ErrorKind::DeviceLost,
        vk::Result::ERROR_INITIALIZATION_FAILED
        | vk::Result::ERROR_INCOMPATIBLE_DRIVER
        | vk::Result::ERROR_LAYER_NOT_PRESENT
        | vk::Result::ERROR_EXTENSION_NOT_PRESENT
        | vk::Result::ERROR_FEATURE_NOT_PRESENT => ErrorKind::Unsupported,
        _ => ErrorKind::Other,
    }
}

impl fmt::Display for VulkanError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "vulkan backend: {:?}: {}", self.kind, self.what)?;
        if let Some(d) = &self.detail {
            write!(f, " ({d})")?;
        }
        Ok(())
    }
}

impl std::error::Error for VulkanError {}

impl BackendError for VulkanError {
    fn kind(&self) -> ErrorKind {
        self.kind
    }
}

impl From<pagedkv_core::Error> for VulkanError {
    fn from(e: pagedkv_core::Error) -> Self {
        Self::other("layout arithmetic").with_detail(format!("{e}"))
    }
}
