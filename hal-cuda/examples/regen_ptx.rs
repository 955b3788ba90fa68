//! Regenerates `kernels/pagedkv.ptx` from `kernels/pagedkv.cu` with NVRTC
//! (put NVIDIA's libnvrtc on the library path, for example from the
//! `nvidia-cuda-nvrtc-cu12` wheel). `--check` compares instead of writing.

use pagedkv_hal_cuda::kernels;

fn main() {
    let check = std::env::args().any(|a| a == "--check");
    let Some(version) = kernels::nvrtc_version() else {
        eprintln!("libnvrtc not found: put it on LD_LIBRARY_PATH");
        std::process::exit(2);
    };
    let ptx = match kernels::compile(kernels::COMMITTED_ARCH) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1);
        }
    };
    let file = kernels::ptx_file(&ptx, version);
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/kernels/pagedkv.ptx");
    if check {
        let old = std::fs::read_to_string(path).unwrap_or_default();
        if old != file {
            eprintln!("{path} differs from NVRTC {version:?}'s output: regenerate it");
            std::process::exit(1);
        }
        println!("{path} is NVRTC {version:?}'s output for the current source");
    } else {
        std::fs::write(path, file).expect("writing the PTX");
        println!("wrote {path} (NVRTC {}.{})", version.0, version.1);
    }
}
