//! The kernels' source, their compilation by NVRTC, and the committed PTX
//! used where NVRTC is missing.
//!
//! `kernels/pagedkv.ptx` is `kernels/pagedkv.cu` compiled by NVRTC for
//! `compute_80` (it JIT-compiles on every later architecture). Its first
//! line records the FNV-1a hash of the source it came from, so a test fails
//! when the source changes and the PTX was not regenerated:
//! `cargo run -p pagedkv-hal-cuda --example regen_ptx` with NVRTC on the
//! library path (NVIDIA's `nvidia-cuda-nvrtc-cu12` wheel is enough).

use cudarc::nvrtc::{CompileOptions, Ptx};

use crate::CudaError;

/// The CUDA C source of every kernel.
pub const SOURCE: &str = include_str!("../kernels/pagedkv.cu");
/// The committed PTX, with its header line.
pub const COMMITTED_PTX: &str = include_str!("../kernels/pagedkv.ptx");
/// The architecture the committed PTX targets.
pub const COMMITTED_ARCH: &str = "compute_80";
/// Every kernel the backend loads.
pub const KERNELS: [&str; 5] = [
    "pagedkv_copy_16",
    "pagedkv_copy_8",
    "pagedkv_copy_4",
    "pagedkv_copy_1",
    "pagedkv_quant",
];

const HEADER: &str = "// pagedkv-source-fnv1a64: ";

/// FNV-1a (64-bit) of `text`: the source fingerprint in the PTX header.
pub fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// The source hash a PTX file's header records, if it has the header.
pub fn recorded_hash(ptx_file: &str) -> Option<u64> {
    let line = ptx_file.lines().next()?;
    let hex = line.strip_prefix(HEADER)?.split_whitespace().next()?;
    u64::from_str_radix(hex, 16).ok()
}

/// A PTX file for `ptx` compiled from [`SOURCE`] by NVRTC `version`.
pub fn ptx_file(ptx: &str, version: (i32, i32)) -> String {
    format!(
        "{HEADER}{:016x} nvrtc {}.{} {COMMITTED_ARCH}\n{ptx}",
        fnv1a(SOURCE),
        version.0,
        version.1
    )
}

/// The NVRTC options: IEEE division, no fused multiply-add, no flushing of
/// subnormals, so quantization rounds as hal-host does.
pub fn options(arch: &'static str) -> CompileOptions {
    CompileOptions {
        ftz: Some(false),
        prec_div: Some(true),
        prec_sqrt: Some(true),
        fmad: Some(false),
        arch: Some(arch),
        name: Some("pagedkv.cu".into()),
        ..Default::default()
    }
}

/// Whether NVRTC can be loaded on this machine.
pub fn nvrtc_present() -> bool {
    // SAFETY: only tries to open the library (dlopen); nothing is called.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// NVRTC's version, if it is present.
pub fn nvrtc_version() -> Option<(i32, i32)> {
    if !nvrtc_present() {
        return None;
    }
    let (mut major, mut minor) = (0, 0);
    // SAFETY: the library is present (checked just above); the call writes
    // two integers through valid pointers.
    let r = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    (r == cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS).then_some((major, minor))
}

/// Compiles [`SOURCE`] for `arch` (`"compute_80"`, `"sm_90"`, ...) and
/// returns the PTX text.
pub fn compile(arch: &'static str) -> Result<String, CudaError> {
    if !nvrtc_present() {
        return Err(CudaError::unsupported(
            "NVRTC (libnvrtc) is not on this machine",
        ));
    }
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(SOURCE, options(arch)).map_err(|e| {
        CudaError::other("compiling the kernels with NVRTC").with_detail(e.to_string())
    })?;
    Ok(ptx.to_src())
}

/// The virtual architecture NVRTC compiles for on a device of compute
/// capability `cc`, where NVRTC 12.8 knows it.
pub fn arch_of(cc: (i32, i32)) -> Option<&'static str> {
    Some(match cc {
        (8, 0) => "compute_80",
        (8, 6) => "compute_86",
        (8, 7) => "compute_87",
        (8, 9) => "compute_89",
        (9, 0) => "compute_90",
        (10, 0) => "compute_100",
        (12, 0) => "compute_120",
        _ => return None,
    })
}

/// Where a device's kernels came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelOrigin {
    /// Compiled by NVRTC for the device's architecture.
    Nvrtc(&'static str),
    /// The committed `compute_80` PTX (no NVRTC, or an architecture NVRTC
    /// 12.8 does not name).
    Committed,
}

/// The PTX for a device of compute capability `cc`: NVRTC's for its
/// architecture where NVRTC is present and compiles, else the committed one.
pub fn ptx_for(cc: (i32, i32)) -> Result<(Ptx, KernelOrigin), CudaError> {
    if cc.0 < 8 {
        return Err(CudaError::unsupported(
            "pagedkv's kernels need compute capability 8.0 (Ampere) or later",
        ));
    }
    if let Some(arch) = arch_of(cc).filter(|_| nvrtc_present())
        && let Ok(src) = compile(arch)
    {
        return Ok((Ptx::from_src(src), KernelOrigin::Nvrtc(arch)));
    }
    Ok((Ptx::from_src(COMMITTED_PTX), KernelOrigin::Committed))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The committed PTX was generated from the current source.
    #[test]
    fn the_committed_ptx_is_current() {
        assert_eq!(
            recorded_hash(COMMITTED_PTX),
            Some(fnv1a(SOURCE)),
            "kernels/pagedkv.ptx is stale: regenerate it with \
             `cargo run -p pagedkv-hal-cuda --example regen_ptx` (needs libnvrtc)"
        );
        for k in KERNELS {
            assert!(
                COMMITTED_PTX.contains(&format!(".entry {k}(")),
                "the committed PTX lacks {k}"
            );
        }
    }

    #[test]
    fn the_header_round_trips() {
        let f = ptx_file(".version 8.7\n", (12, 8));
        assert_eq!(recorded_hash(&f), Some(fnv1a(SOURCE)));
        assert!(f.ends_with(".version 8.7\n"));
        assert_eq!(recorded_hash(".version 8.7"), None);
        assert_eq!(arch_of((9, 0)), Some("compute_90"));
        assert_eq!(arch_of((7, 5)), None);
        assert!(ptx_for((7, 5)).is_err(), "Turing is refused");
    }
}
