//! pagedkv's simulator: workload parsers (built-in chat, Mooncake, Azure,
//! agentic sessions),
//! the replay of a workload through the real manager, the offline
//! references (ideal, Belady), the memory check of a run, and plots. The
//! `pagedkv` binary is its command line; the fuzz targets drive the parsers.
#![allow(
    clippy::cast_possible_truncation,
    reason = "a simulator on 64-bit hosts: trace token and block counts fit in u32"
)]

pub mod agentic;
pub mod check;
pub mod keys;
#[cfg(feature = "cli")]
pub mod plot;
pub mod policy;
pub mod replicas;
pub mod sim;
pub mod workload;
