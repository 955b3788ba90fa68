//! The manager's errors: typed, each keeping its cause. A wrapper either
//! shows its cause in its own message or hands it on as `source()`, never
//! both, so a report that walks the chain says everything once.

use pagedkv_core::{DType, ErrorKind};

use crate::types::{Device, RequestId};

/// Why a manager operation failed. Nothing was leaked and no request moved.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ManagerError {
    /// The core refused (bad input, or no room); the cause says which.
    #[error(transparent)]
    Core(#[from] pagedkv_core::Error),
    /// The memory backend failed; the operation was rolled back. The
    /// backend's own error is the `source()`.
    #[error("backend failure ({kind:?}) while {op}")]
    Backend {
        /// The backend's broad reason.
        kind: ErrorKind,
        /// What the manager was doing.
        op: &'static str,
        /// The backend's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// No live request has this id.
    #[error("unknown request {0}")]
    UnknownRequest(RequestId),
    /// The id is already allocated.
    #[error("request {0} already allocated")]
    DuplicateRequest(RequestId),
    /// The request itself is wrong; nothing was done.
    #[error("invalid request: {0}")]
    InvalidRequest(InvalidRequest),
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
    /// No room on the device (after growing its pool) and preemption is
    /// the scheduler's: `missing` more blocks must be freed (`preempt`) first.
    #[error("no room on {device:?}: {missing} more blocks needed")]
    NoRoom {
        /// The device.
        device: Device,
        /// Blocks missing.
        missing: u32,
    },
    /// Not enough memory even after preempting and growing.
    #[error("out of memory: {needed} blocks needed on {device:?}")]
    OutOfMemory {
        /// Blocks needed.
        needed: usize,
        /// Where.
        device: Device,
    },
    /// A configuration value is invalid.
    #[error("invalid configuration: `{field}` {problem}")]
    Config {
        /// The field.
        field: &'static str,
        /// What is wrong with it.
        problem: String,
    },
    /// Every pool slot of the cache is taken (devices, host tier and the
    /// compressed pools made so far).
    #[error("no pool slot left for a {0:?} compressed pool")]
    NoPoolSlot(pagedkv_core::QuantFormat),
    /// A raw block list given to `free_blocks` is not one `allocate_blocks` result.
    #[error("blocks were not handed out together by allocate_blocks")]
    NotAnAllocation,
}

/// What is wrong with a request the manager refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidRequest {
    /// A dimension of the request differs from the manager's layout.
    #[error("{what} is {got}, the cache's layout has {want}")]
    Layout {
        /// Which dimension.
        what: &'static str,
        /// The request's value.
        got: usize,
        /// The layout's value.
        want: usize,
    },
    /// The element type differs from the manager's layout.
    #[error("element type {got:?}, the cache holds {want:?}")]
    DType {
        /// The request's.
        got: DType,
        /// The layout's.
        want: DType,
    },
    /// The prompt's token ids are not `initial_tokens` long.
    #[error("the prompt has {prompt} token ids but initial_tokens is {initial}")]
    PromptLength {
        /// Token ids given.
        prompt: usize,
        /// `initial_tokens`.
        initial: usize,
    },
    /// Longer than the request's or the manager's maximum sequence length.
    #[error("{tokens} tokens exceed the maximum sequence length of {max}")]
    TooLong {
        /// Tokens asked for.
        tokens: usize,
        /// The limit.
        max: usize,
    },
    /// A block index past the request's table.
    #[error("block {index} is past the request's {blocks} blocks")]
    BlockIndex {
        /// Index asked for.
        index: usize,
        /// Blocks in the table.
        blocks: usize,
    },
    /// Block bytes of the wrong size.
    #[error("{got} bytes given, a block holds {want}")]
    BlockBytes {
        /// Bytes given.
        got: usize,
        /// Bytes of a block.
        want: usize,
    },
    /// An extension's token ids are not as many as its token count.
    #[error("{ids} token ids given for {count} new tokens")]
    TokenCount {
        /// Ids given.
        ids: usize,
        /// Tokens to add.
        count: usize,
    },
    /// A size that must not be zero (`prefill_chunk`, `sliding_window`).
    #[error("{what} is 0")]
    Zero {
        /// Which field.
        what: &'static str,
    },
    /// A layer past the model's.
    #[error("layer {layer} is past the model's {layers} layers")]
    Layer {
        /// Layer asked for.
        layer: usize,
        /// Layers of the model.
        layers: usize,
    },
}

impl From<InvalidRequest> for ManagerError {
    fn from(e: InvalidRequest) -> Self {
        ManagerError::InvalidRequest(e)
    }
}

impl ManagerError {
    /// A backend error `e` met while doing `op`.
    pub(crate) fn backend<E: pagedkv_core::BackendError + Send + Sync + 'static>(
        op: &'static str,
    ) -> impl FnOnce(E) -> Self {
        move |e| ManagerError::Backend {
            kind: e.kind(),
            op,
            source: Box::new(e),
        }
    }
}

/// Result alias.
pub type Result<T, E = ManagerError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    /// The whole chain, as a report (anyhow's `{:#}`) prints it.
    fn chain(e: &dyn std::error::Error) -> String {
        let mut s = e.to_string();
        let mut cause = e.source();
        while let Some(c) = cause {
            s.push_str(": ");
            s.push_str(&c.to_string());
            cause = c.source();
        }
        s
    }

    /// Issue 8, defect 15: a wrapped cause was printed twice in a report.
    #[test]
    fn a_report_says_each_cause_once() {
        let core = ManagerError::from(pagedkv_core::Error::UnknownPool(pagedkv_core::PoolId(3)));
        assert_eq!(chain(&core), "pool#3 is unknown");
        #[derive(Debug)]
        struct Dead;
        impl std::fmt::Display for Dead {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("device fell off the bus")
            }
        }
        impl std::error::Error for Dead {}
        impl pagedkv_core::BackendError for Dead {
            fn kind(&self) -> ErrorKind {
                ErrorKind::DeviceLost
            }
        }
        let be = ManagerError::backend("copying blocks")(Dead);
        let text = chain(&be);
        assert_eq!(
            text,
            "backend failure (DeviceLost) while copying blocks: device fell off the bus"
        );
        let bad = ManagerError::from(InvalidRequest::TooLong { tokens: 9, max: 8 });
        assert_eq!(
            chain(&bad).matches("9 tokens").count(),
            1,
            "{}",
            chain(&bad)
        );
    }
}
