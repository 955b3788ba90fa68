//! Translates hal-vulkan's WGSL compute shaders to SPIR-V with naga. Not
//! part of hal-vulkan's build: the SPIR-V is committed beside the WGSL, and
//! this crate's test regenerates it and compares bytes, so the two never
//! drift. `cargo run -p pagedkv-vulkan-shaders` rewrites the committed files.

use naga::back::spv;
use naga::valid::{Capabilities, ValidationFlags, Validator};

/// The shaders: (WGSL path, SPIR-V path), relative to `hal-vulkan/`.
pub const SHADERS: [(&str, &str); 1] = [("shaders/quant.wgsl", "shaders/quant.spv")];

/// `hal-vulkan/`.
pub fn root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The SPIR-V (1.3, little-endian words) of a WGSL compute shader, with
/// bounds checks on every buffer access (reads out of range give zero,
/// writes are skipped): a second guard behind the backend's own checks.
pub fn spirv(wgsl: &str) -> Result<Vec<u8>, String> {
    let module = naga::front::wgsl::parse_str(wgsl).map_err(|e| e.emit_to_string(wgsl))?;
    let info = Validator::new(ValidationFlags::all(), Capabilities::PUSH_CONSTANT)
        .validate(&module)
        .map_err(|e| e.emit_to_string(wgsl))?;
    let policy = naga::proc::BoundsCheckPolicy::ReadZeroSkipWrite;
    let options = spv::Options {
        lang_version: (1, 3),
        flags: spv::WriterFlags::empty(),
        bounds_check_policies: naga::proc::BoundsCheckPolicies {
            index: policy,
            buffer: policy,
            image_load: policy,
            binding_array: policy,
        },
        ..spv::Options::default()
    };
    let words = spv::write_vec(&module, &info, &options, None).map_err(|e| e.to_string())?;
    Ok(words.iter().flat_map(|w| w.to_le_bytes()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The committed SPIR-V is the translation of the committed WGSL.
    #[test]
    fn committed_spirv_matches_its_wgsl() {
        for (wgsl, spv) in SHADERS {
            let src = std::fs::read_to_string(root().join(wgsl)).unwrap();
            let want = spirv(&src).unwrap_or_else(|e| panic!("{wgsl}: {e}"));
            let got = std::fs::read(root().join(spv)).unwrap();
            assert!(
                got == want,
                "{spv} is stale: run `cargo run -p pagedkv-vulkan-shaders`"
            );
        }
    }
}
