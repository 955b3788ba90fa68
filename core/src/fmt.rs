//! Logging shim (embassy's `fmt.rs` idea): `trace!` and `debug!` go to defmt
//! when the `defmt` feature is on, and compile to nothing otherwise. Nothing
//! above `debug` is logged on hot paths.
#![allow(unused_macros)]

macro_rules! trace {
    ($($arg:tt)*) => {{
        #[cfg(feature = "defmt")]
        ::defmt::trace!($($arg)*);
    }};
}

macro_rules! debug {
    ($($arg:tt)*) => {{
        #[cfg(feature = "defmt")]
        ::defmt::debug!($($arg)*);
    }};
}

pub(crate) use {debug, trace};
