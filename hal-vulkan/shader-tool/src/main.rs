//! Rewrites hal-vulkan's committed SPIR-V from its WGSL.

use pagedkv_vulkan_shaders::{SHADERS, root, spirv};

fn main() {
    for (wgsl, spv) in SHADERS {
        let src = std::fs::read_to_string(root().join(wgsl)).expect("reading the WGSL");
        match spirv(&src) {
            Ok(bytes) => {
                std::fs::write(root().join(spv), &bytes).expect("writing the SPIR-V");
                println!("{spv}: {} bytes", bytes.len());
            }
            Err(e) => {
                eprintln!("{wgsl}: {e}");
                std::process::exit(1);
            }
        }
    }
}
