//! The manager's error: typed, with the core or backend cause kept.

use pagedkv_core::ErrorKind;

use crate::types::{Device, RequestId};

/// Why a manager operation failed. Nothing was leaked and no sequence moved.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ManagerError {
    /// The core refused (bad input or no room); see the cause.
    #[error("cache: {0}")]
    Core(#[from] pagedkv_core::Error),
    /// The memory backend failed; the operation was rolled back.
    #[error("backend ({kind:?}) during {during}: {message}")]
    Backend {
        /// The backend's broad reason.
        kind: ErrorKind,
        /// What the manager was doing.
        during: &'static str,
        /// The backend's own message.
        message: String,
    },
    /// No live request has this id.
    #[error("unknown request {0}")]
    UnknownRequest(RequestId),
    /// The id is already allocated.
    #[error("request {0} already allocated")]
    DuplicateRequest(RequestId),
    /// The request's shape does not match the manager's layout.
    #[error("request does not match the cache layout: {0}")]
    LayoutMismatch(&'static str),
    /// The device is not managed here.
    #[error("unknown device {0:?}")]
    UnknownDevice(Device),
    /// No format reaches this compression ratio.
    #[error("no format reaches a compression ratio of {requested} (best: {best})")]
    UnreachableRatio {
        /// Ratio asked for.
        requested: f32,
        /// Best ratio available for the layout.
        best: f32,
    },
    /// There is no host tier to swap to.
    #[error("no host tier configured")]
    NoHostTier,
    /// Not enough memory even after preempting and growing.
    #[error("out of memory: {needed} blocks needed on {device:?}")]
    OutOfMemory {
        /// Blocks needed.
        needed: usize,
        /// Where.
        device: Device,
    },
    /// A configuration value is invalid.
    #[error("invalid configuration: {0}")]
    Config(&'static str),
    /// A raw block list given to `free_blocks` is not one `allocate_blocks` result.
    #[error("blocks were not handed out together by allocate_blocks")]
    NotAnAllocation,
}

/// Result alias.
pub type Result<T, E = ManagerError> = std::result::Result<T, E>;
