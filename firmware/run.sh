#!/usr/bin/env bash
# Builds the firmware (release), prints its section sizes, runs it under QEMU
# (lm3s6965evb, Cortex-M3) with its defmt logs decoded by defmt-print, and
# exits with the firmware's own exit code (0: every check passed).
#
#   ./run.sh                  stable toolchain, panic = "abort"
#   ./run.sh immediate-abort  nightly, core rebuilt with panic = immediate-abort
#                             (no panic messages: the size-optimized build)
set -euo pipefail
cd "$(dirname "$0")"
variant="${1:-stable}"
case "$variant" in
  stable)
    cargo build --release
    elf=target/thumbv7m-none-eabi/release/pagedkv-firmware
    ;;
  immediate-abort)
    RUSTFLAGS="-C link-arg=-Tlink.x -C link-arg=-Tdefmt.x -Zunstable-options -Cpanic=immediate-abort" \
      cargo +nightly build --release -Z build-std=core --target-dir target/immediate-abort
    elf=target/immediate-abort/thumbv7m-none-eabi/release/pagedkv-firmware
    ;;
  *) echo "usage: $0 [stable|immediate-abort]" >&2; exit 2 ;;
esac
arm-none-eabi-size "$elf"
arm-none-eabi-size -A "$elf" | awk '$1 ~ /^\.(vector_table|text|rodata|data|bss)$/ {printf "  %-14s %7d bytes\n", $1, $2}'
text=$(arm-none-eabi-size -A "$elf" | awk '$1 == ".text" {print $2}')
echo "$variant build: .text = $text bytes ($(( (text + 1023) / 1024 )) KiB; target 24 KiB)"
# No panic path of the ELF may lie in pagedkv's core.
./panics.sh "$elf" | tail -n 1
set +e
timeout 120 qemu-system-arm -cpu cortex-m3 -machine lm3s6965evb -nographic \
  -semihosting-config enable=on,target=native -kernel "$elf" 2>/dev/null | defmt-print -e "$elf"
codes=("${PIPESTATUS[@]}")
set -e
if [ "${codes[0]}" -ne 0 ]; then
  echo "firmware exited with ${codes[0]}" >&2
  exit "${codes[0]}"
fi
echo "firmware exited with 0"
