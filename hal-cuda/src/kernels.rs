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

/// The PTX ISA version the committed file declares: 7.0, the first with
/// `sm_80` (CUDA 11.0 drivers load it). NVRTC 12.8 writes 8.7, which drivers
/// before R570 refuse, although these kernels use nothing newer than 7.0's
/// instructions (`ptxas` assembles the file unchanged otherwise).
pub const COMMITTED_ISA: &str = ".version 7.0";

/// A PTX file for `ptx` compiled from [`SOURCE`] by NVRTC `version`: the
/// header line, then the PTX with its `.version` set to [`COMMITTED_ISA`].
pub fn ptx_file(ptx: &str, version: (i32, i32)) -> String {
    let body: String = ptx
        .lines()
        .map(|l| {
            if l.starts_with(".version ") {
                COMMITTED_ISA
            } else {
                l
            }
        })
        .flat_map(|l| [l, "\n"])
        .collect();
    format!(
        "{HEADER}{:016x} nvrtc {}.{} {COMMITTED_ARCH}\n{body}",
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

/// The real architecture (`sm_XY`) of a virtual one (`compute_XY`).
fn real_arch(arch: &'static str) -> Option<&'static str> {
    Some(match arch {
        "compute_80" => "sm_80",
        "compute_86" => "sm_86",
        "compute_87" => "sm_87",
        "compute_89" => "sm_89",
        "compute_90" => "sm_90",
        "compute_100" => "sm_100",
        "compute_120" => "sm_120",
        _ => return None,
    })
}

/// Compiles [`SOURCE`] to a CUBIN for `sm` (`"sm_90"`): machine code, which
/// the driver loads without the PTX version check PTX is subject to.
pub fn compile_cubin(sm: &'static str) -> Result<Vec<u8>, CudaError> {
    use cudarc::nvrtc::{result, sys};
    if !nvrtc_present() {
        return Err(CudaError::unsupported(
            "NVRTC (libnvrtc) is not on this machine",
        ));
    }
    let fail =
        |what| move |e: result::NvrtcError| CudaError::other(what).with_detail(format!("{e:?}"));
    let src =
        std::ffi::CString::new(SOURCE).map_err(|_| CudaError::other("NUL in the kernel source"))?;
    let prog = result::create_program(&src, Some(c"pagedkv.cu"))
        .map_err(fail("creating an NVRTC program"))?;
    let opts = options(sm);
    let mut args: Vec<String> = Vec::new();
    args.extend(opts.ftz.map(|v| format!("--ftz={v}")));
    args.extend(opts.prec_div.map(|v| format!("--prec-div={v}")));
    args.extend(opts.prec_sqrt.map(|v| format!("--prec-sqrt={v}")));
    args.extend(opts.fmad.map(|v| format!("--fmad={v}")));
    args.push(format!("--gpu-architecture={sm}"));
    // SAFETY: `prog` is a live program (created above, destroyed below);
    // the options are valid strings; the size query writes one usize and
    // the buffer has exactly that size.
    unsafe {
        let r =
            result::compile_program(prog, &args).map_err(fail("compiling the kernels to a CUBIN"));
        let r = r.and_then(|()| {
            let mut n = 0usize;
            sys::nvrtcGetCUBINSize(prog, &mut n)
                .result()
                .map_err(fail("sizing the CUBIN"))?;
            let mut buf = vec![0u8; n];
            sys::nvrtcGetCUBIN(prog, buf.as_mut_ptr().cast())
                .result()
                .map_err(fail("reading the CUBIN"))?;
            Ok(buf)
        });
        let _ = result::destroy_program(prog);
        r
    }
}

/// Where a device's kernels came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelOrigin {
    /// Compiled by NVRTC to machine code for the device (`sm_XY`).
    Nvrtc(&'static str),
    /// The committed `compute_80` PTX, JIT-compiled by the driver (no NVRTC,
    /// an architecture NVRTC 12.8 does not name, NVRTC's code refused, or
    /// `PAGEDKV_CUDA_KERNELS=committed`).
    Committed,
}

/// The kernel images to try, in order, on a device of compute capability
/// `cc`: NVRTC's CUBIN for its architecture where NVRTC is present, then the
/// committed PTX. `PAGEDKV_CUDA_KERNELS=committed` or `=nvrtc` keeps only
/// that one (to test each on a machine that has both).
pub fn candidates(cc: (i32, i32)) -> Result<Vec<(Ptx, KernelOrigin)>, CudaError> {
    if cc.0 < 8 {
        return Err(CudaError::unsupported(
            "pagedkv's kernels need compute capability 8.0 (Ampere) or later",
        ));
    }
    let only = std::env::var("PAGEDKV_CUDA_KERNELS").ok();
    let mut out = Vec::new();
    if only.as_deref() != Some("committed") {
        let sm = arch_of(cc).and_then(real_arch).filter(|_| nvrtc_present());
        match sm.map(compile_cubin) {
            Some(Ok(bin)) => {
                out.push((Ptx::from_binary(bin), KernelOrigin::Nvrtc(sm.unwrap_or(""))))
            }
            Some(Err(e)) if only.as_deref() == Some("nvrtc") => return Err(e),
            _ if only.as_deref() == Some("nvrtc") => {
                return Err(CudaError::unsupported(
                    "PAGEDKV_CUDA_KERNELS=nvrtc but NVRTC cannot compile for this device",
                ));
            }
            _ => {}
        }
    }
    if only.as_deref() != Some("nvrtc") {
        out.push((Ptx::from_src(COMMITTED_PTX), KernelOrigin::Committed));
    }
    Ok(out)
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
        let f = ptx_file(".version 8.7\n.target sm_80\n", (12, 8));
        assert_eq!(recorded_hash(&f), Some(fnv1a(SOURCE)));
        assert!(f.ends_with(".version 7.0\n.target sm_80\n"));
        assert_eq!(recorded_hash(".version 8.7"), None);
        assert_eq!(arch_of((9, 0)), Some("compute_90"));
        assert_eq!(arch_of((7, 5)), None);
        assert!(candidates((7, 5)).is_err(), "Turing is refused");
        assert!(f.contains(COMMITTED_ISA));
    }
}
