#!/usr/bin/env bash
# The CUDA backend on a real GPU (H100 / H200), in under 5 minutes (the
# step limits add up to 4 min 45 s, the usual run to about 2 minutes).
#
#   hal-cuda/device-check.sh build   # here, with cargo: builds the test and
#                                    # bench executables (release, stripped)
#                                    # into target/device-check/ (git-ignored)
#   hal-cuda/device-check.sh         # on the GPU machine (no Rust needed):
#                                    # runs them from target/device-check/
#
# The run: the GPU's name and driver; the conformance suite, hal-cuda's GPU
# tests (quantization bit-exact with hal-host) and the manager's swap /
# compress / defragment tests, all with PAGEDKV_REQUIRE_CUDA=1 (a missing GPU
# fails); the kernels compiled by the machine's NVRTC where it has one; the
# CLI replaying a workload with its bytes on the GPU; then the copy and
# quantize rates as fractions of a contiguous copy, every copied block
# checksummed. Exits non-zero on the first failure.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=target/device-check

if [[ "${1:-run}" == build ]]; then
  rm -rf "$dir" && mkdir -p "$dir"
  collect() { # name, cargo args...
    local name=$1; shift
    local exe
    exe=$(cargo "$@" --message-format=json | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable"):
        print(m["executable"])' | tail -1) || { echo "building $name failed: cargo $*" >&2; exit 1; }
    [[ -n "$exe" ]] || { echo "building $name gave no executable: cargo $*" >&2; exit 1; }
    cp "$exe" "$dir/$name"
    strip "$dir/$name"
    echo "$dir/$name ($(du -h "$dir/$name" | cut -f1))"
  }
  collect hal-cuda-gpu test --release --no-run -p pagedkv-hal-cuda --test gpu
  collect hal-cuda-nvrtc test --release --no-run -p pagedkv-hal-cuda --test nvrtc
  collect conformance-cuda test --release --no-run -p pagedkv-tests --test conformance_cuda
  collect manager-cuda test --release --no-run -p pagedkv-manager --features cuda --test cuda
  collect device-bench bench --no-run -p pagedkv-hal-cuda --bench device
  collect pagedkv build --release -p pagedkv-cli --bin pagedkv
  du -sh "$dir"
  exit 0
fi

[[ -x "$dir/device-bench" ]] || { echo "no executables in $dir: run '$0 build' where cargo is" >&2; exit 1; }
step() { printf '\n=== %s ===\n' "$*"; }
export PAGEDKV_REQUIRE_CUDA=1

step "GPU and driver"
nvidia-smi --query-gpu=name,driver_version,memory.total,pcie.link.gen.max,pcie.link.width.max --format=csv,noheader || true

step "NVRTC"
nvrtc=
if ldconfig -p 2>/dev/null | grep 'libnvrtc.so.12 ' >/dev/null; then nvrtc=system; fi
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib \
         $(python3 -c 'import nvidia.cuda_nvrtc as m, os; print(os.path.join(list(m.__path__)[0], "lib"))' 2>/dev/null || true); do
  if [[ -e "$d/libnvrtc.so.12" ]]; then
    export LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}"
    echo "libnvrtc from $d"
    nvrtc=$d
    break
  fi
done
if [[ -n "$nvrtc" ]]; then
  PAGEDKV_REQUIRE_NVRTC=1 timeout 120 "$dir/hal-cuda-nvrtc"
else
  echo "no libnvrtc.so.12 here: the backend loads the committed PTX"
fi

step "hal-cuda on the GPU (hal-host's bytes for copies and quantization, bad batches)"
if [[ -n "$nvrtc" ]]; then
  echo "-- with NVRTC's machine code"
  PAGEDKV_CUDA_KERNELS=nvrtc timeout 60 "$dir/hal-cuda-gpu" --test-threads=1 --nocapture
fi
echo "-- with the committed PTX"
PAGEDKV_CUDA_KERNELS=committed timeout 60 "$dir/hal-cuda-gpu" --test-threads=1 --nocapture

step "the backend conformance suite"
timeout 45 "$dir/conformance-cuda" --test-threads=1

step "the manager's swap / compress / defragment on the GPU"
timeout 30 "$dir/manager-cuda" --test-threads=1

step "the CLI: a replay with its KV bytes on the GPU"
timeout 30 "$dir/pagedkv" simulate --conversations 40 --with-bytes --backend cuda

step "copy and quantize rates (2,000 blocks of Llama-3-8B, layer-major)"
timeout 120 "$dir/device-bench"

echo
echo "device check passed"
