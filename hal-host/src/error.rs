use core::fmt;

use pagedkv_core::{BackendError, ErrorKind};

/// Why the host backend refused an operation.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct HostError {
    /// The broad reason.
    pub kind: ErrorKind,
    /// What exactly.
    pub reason: &'static str,
}

impl HostError {
    pub(crate) const fn new(kind: ErrorKind, reason: &'static str) -> Self {
        Self { kind, reason }
    }
    pub(crate) const fn oom(reason: &'static str) -> Self {
        Self::new(ErrorKind::OutOfMemory, reason)
    }
    pub(crate) const fn other(reason: &'static str) -> Self {
        Self::new(ErrorKind::Other, reason)
    }
    pub(crate) const fn unsupported(reason: &'static str) -> Self {
        Self::new(ErrorKind::Unsupported, reason)
    }
}

impl fmt::Display for HostError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "host backend: {:?}: {}", self.kind, self.reason)
    }
}

impl core::error::Error for HostError {}

impl BackendError for HostError {
    fn kind(&self) -> ErrorKind {
        self.kind
    }
}
