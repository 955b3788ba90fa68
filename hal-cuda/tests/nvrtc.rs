//! The kernels compile with NVRTC for Ampere (compute_80) and Hopper
//! (compute_90), and the committed PTX is NVRTC's output for the current
//! source. Needs libnvrtc on the library path (CI unpacks NVIDIA's
//! `nvidia-cuda-nvrtc-cu12` wheel); skips without it unless
//! `PAGEDKV_REQUIRE_NVRTC=1`.

use pagedkv_hal_cuda::kernels;

fn nvrtc() -> Option<(i32, i32)> {
    let v = kernels::nvrtc_version();
    if v.is_none() {
        assert!(
            std::env::var("PAGEDKV_REQUIRE_NVRTC").as_deref() != Ok("1"),
            "PAGEDKV_REQUIRE_NVRTC=1 but libnvrtc cannot be loaded (set LD_LIBRARY_PATH)"
        );
        eprintln!("skipped: libnvrtc is not on the library path");
    }
    v
}

#[test]
fn every_kernel_compiles_for_ampere_and_hopper() {
    if nvrtc().is_none() {
        return;
    }
    for arch in ["compute_80", "compute_90"] {
        let ptx = kernels::compile(arch).unwrap_or_else(|e| panic!("{arch}: {e}"));
        for k in kernels::KERNELS {
            assert!(ptx.contains(&format!(".entry {k}(")), "{arch}: no {k}");
        }
        // IEEE arithmetic: no fused multiply-add, divisions rounded.
        assert!(
            !ptx.contains("fma."),
            "{arch}: fused multiply-add in the kernels"
        );
        assert!(ptx.contains("div.rn.f32"), "{arch}: division is not IEEE");
    }
}

#[test]
fn the_committed_ptx_is_nvrtcs_output() {
    let Some(version) = nvrtc() else { return };
    let ptx = kernels::compile(kernels::COMMITTED_ARCH).unwrap();
    let file = kernels::ptx_file(&ptx, version);
    let recorded = kernels::COMMITTED_PTX.lines().next().unwrap_or("");
    if !recorded.contains(&format!("nvrtc {}.{} ", version.0, version.1)) {
        eprintln!(
            "NVRTC {version:?} differs from the one that made the committed PTX ({recorded}); compiled only"
        );
        return;
    }
    assert!(
        file == kernels::COMMITTED_PTX,
        "kernels/pagedkv.ptx is stale: `cargo run -p pagedkv-hal-cuda --example regen_ptx`"
    );
}

#[test]
fn every_kernel_compiles_to_ampere_and_hopper_machine_code() {
    if nvrtc().is_none() {
        return;
    }
    for sm in ["sm_80", "sm_90"] {
        let bin = kernels::compile_cubin(sm).unwrap_or_else(|e| panic!("{sm}: {e}"));
        assert_eq!(&bin[..4], b"\x7fELF", "{sm}: a CUBIN is an ELF image");
        for k in kernels::KERNELS {
            assert!(
                bin.windows(k.len()).any(|w| w == k.as_bytes()),
                "{sm}: no {k} in the CUBIN"
            );
        }
    }
}
