#!/usr/bin/env bash
# Lists every call to a panic entry point in a firmware ELF with the
# (inlined) functions it sits in, and fails if any of them is pagedkv's
# core: no panic is reachable from a core path. Needs arm-none-eabi-objdump
# and arm-none-eabi-addr2line (binutils-arm-none-eabi); the ELF must carry
# debug info (the firmware's release profile keeps it).
#
#   ./panics.sh target/thumbv7m-none-eabi/release/pagedkv-firmware
set -euo pipefail
elf="${1:?usage: $0 ELF}"
# Panic entry points: core::panicking::* (panic, panic_fmt, panic_bounds_check,
# panic_const_*), slice index failures, unwrap/expect failures.
pattern='core9panicking|core5slice5index|unwrap_failed|expect_failed|len_mismatch_fail|panic_const'
sites=$(arm-none-eabi-objdump -d --no-show-raw-insn "$elf" |
  awk -v pat="$pattern" '$2 ~ /^b/ && $NF ~ pat { sub(":", "", $1); print $1 }')
core=0
for a in $sites; do
  frames=$(arm-none-eabi-addr2line -e "$elf" -i -f -C "$a" | paste -d' ' - - | awk '{print $1}')
  where=$(echo "$frames" | tr '\n' ' ')
  if echo "$frames" | grep -q '^pagedkv_core::'; then
    echo "core panic path at 0x$a: $where"
    core=$((core + 1))
  else
    echo "panic path at 0x$a (not the core): $where"
  fi
done
symbols=$(arm-none-eabi-nm -C "$elf" | grep -cE 'core::panicking::panic_bounds_check|panic_const' || true)
echo "panic_bounds_check / panic_const_* symbols in the ELF: $symbols; call sites in pagedkv_core: $core"
[ "$core" -eq 0 ]
