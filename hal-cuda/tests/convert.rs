//! The kernels' element conversions, compiled as plain C by the machine's C
//! compiler, give the bits of the `half` and `float8` crates hal-host uses:
//! every f16, bf16 and E4M3 value, and f32 inputs that cover every exponent,
//! every rounding case and the specials. Together with IEEE arithmetic in
//! the kernels (NVRTC `--fmad=false --prec-div=true --ftz=false`), this is
//! why the GPU's quantized bytes equal hal-host's.
#![allow(clippy::cast_possible_truncation, reason = "bit patterns")]

use std::io::Write;
use std::process::{Command, Stdio};

use float8::F8E4M3;
use half::{bf16, f16};

const DRIVER: &str = r#"
#include <stdio.h>
#include PKV_SOURCE
int main(void) {
    u32 x;
    while (fread(&x, 4, 1, stdin) == 1) {
        float f = pkv_u2f(x);
        u32 out[6];
        out[0] = pkv_f32_to_f16(f);
        out[1] = pkv_f32_to_bf16(f);
        out[2] = pkv_f32_to_e4m3(f);
        out[3] = (u32)(u8)pkv_f32_to_i8(f);
        out[4] = pkv_f2u(pkv_f16_to_f32((u16)x));
        out[5] = pkv_f2u(pkv_bf16_to_f32((u16)x));
        u32 e = pkv_f2u(pkv_e4m3_to_f32((u8)x));
        fwrite(out, 4, 6, stdout);
        fwrite(&e, 4, 1, stdout);
    }
    return 0;
}
"#;

/// hal-host's int8 rounding (`quant.rs`): half away from zero, saturating.
fn i8_of(v: f32) -> i8 {
    let r = if v >= 0.0 { v + 0.5 } else { v - 0.5 };
    (r as i32).clamp(-127, 127) as i8
}

fn inputs() -> Vec<u32> {
    let mut v: Vec<u32> = (0..=0xFFFFu32).collect(); // every 16-bit pattern
    // Every exponent with mantissas near each rounding boundary.
    for e in 0..=255u32 {
        for m in [
            0, 1, 0xFFF, 0x1000, 0x1001, 0x2FFF, 0x3000, 0x7FFF, 0x8000, 0x8001, 0x7F_FFFF,
        ] {
            for s in [0, 0x8000_0000] {
                v.push(s | (e << 23) | m);
            }
        }
    }
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    for _ in 0..200_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.push(x as u32);
    }
    // Values around the int8 and E4M3 ranges.
    for i in -140_000..140_000 {
        v.push((i as f32 / 1000.0).to_bits());
    }
    v
}

#[test]
fn kernel_conversions_match_the_host_crates_bit_for_bit() {
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let dir = std::env::temp_dir().join(format!("pagedkv-convert-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let c = dir.join("driver.c");
    let exe = dir.join("driver");
    std::fs::write(&c, DRIVER).unwrap();
    let src = concat!(env!("CARGO_MANIFEST_DIR"), "/kernels/pagedkv.cu");
    let built = Command::new(&cc)
        .args(["-O2", "-std=c99", "-Wall", "-Werror", "-x", "c"])
        .arg(format!("-DPKV_SOURCE=\"{src}\""))
        .arg(&c)
        .arg("-o")
        .arg(&exe)
        .output();
    let built = match built {
        Ok(o) => o,
        Err(e) => {
            assert!(
                std::env::var("PAGEDKV_REQUIRE_CC").as_deref() != Ok("1"),
                "no C compiler ({cc}): {e}"
            );
            eprintln!("skipped: no C compiler ({cc}): {e}");
            return;
        }
    };
    assert!(
        built.status.success(),
        "the conversion section does not compile as C:\n{}",
        String::from_utf8_lossy(&built.stderr)
    );
    let xs = inputs();
    let mut child = Command::new(&exe)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let bytes: Vec<u8> = xs.iter().flat_map(|x| x.to_le_bytes()).collect();
    let mut stdin = child.stdin.take().unwrap();
    let feeder = std::thread::spawn(move || stdin.write_all(&bytes).unwrap());
    let out = child.wait_with_output().unwrap();
    feeder.join().unwrap();
    let words: Vec<u32> = out
        .stdout
        .chunks(4)
        .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(words.len(), xs.len() * 7);
    let mut bad = 0;
    for (x, got) in xs.iter().zip(words.chunks(7)) {
        let f = f32::from_bits(*x);
        let want = [
            u32::from(f16::from_f32(f).to_bits()),
            u32::from(bf16::from_f32(f).to_bits()),
            u32::from(F8E4M3::from_f32(f).to_bits()),
            u32::from(i8_of(f) as u8),
            f16::from_bits(*x as u16).to_f32().to_bits(),
            bf16::from_bits(*x as u16).to_f32().to_bits(),
            F8E4M3::from_bits(*x as u8).to_f32().to_bits(),
        ];
        if got != want {
            bad += 1;
            if bad < 10 {
                eprintln!("input {x:#010x}: kernel {got:08x?}, host {want:08x?}");
            }
        }
    }
    assert_eq!(bad, 0, "{bad} of {} inputs convert differently", xs.len());
    let _ = std::fs::remove_dir_all(&dir);
}
