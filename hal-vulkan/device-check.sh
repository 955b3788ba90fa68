#!/usr/bin/env bash
# The Vulkan backend on an NVIDIA H100 / H200 (NVIDIA's Vulkan driver is
# installed there; the loader and the validation layer are not, and there is
# no Rust toolchain).
#
#   hal-vulkan/device-check.sh build   # here, with cargo and apt: builds the
#                                      # test and bench executables and
#                                      # unpacks Debian's libvulkan1 and
#                                      # vulkan-validationlayers into
#                                      # target/device-check-vulkan/
#   hal-vulkan/device-check.sh         # on the GPU machine: runs them
#
# The run prints the device, runs the conformance suite and hal-vulkan's
# tests on the GPU under the validation layer (PAGEDKV_REQUIRE_VULKAN=1: no
# device fails, a validation message fails), replays a workload with its KV
# on the GPU, and prints the throughput of 2,000 scattered layer-major
# blocks as a fraction of one contiguous vkCmdCopyBuffer of the same bytes,
# every copied block checked.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=target/device-check-vulkan

if [[ "${1:-run}" == build ]]; then
  rm -rf "$dir" && mkdir -p "$dir/deb" "$dir/vk"
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
  collect conformance-vulkan test --release --no-run -p pagedkv-tests --test conformance_vulkan
  collect hal-vulkan-tests test --release --no-run -p pagedkv-hal-vulkan --test vulkan
  collect manager-vulkan test --release --no-run -p pagedkv-manager --features vulkan --test vulkan
  collect device-bench bench --no-run -p pagedkv-hal-vulkan --bench device
  collect pagedkv build --release -p pagedkv-cli --bin pagedkv
  (cd "$dir/deb" && apt-get download libvulkan1 vulkan-validationlayers)
  for d in "$dir"/deb/*.deb; do dpkg -x "$d" "$dir/vk"; done
  rm -rf "$dir/deb" "$dir/vk/usr/share/doc"
  du -sh "$dir"
  exit 0
fi

[[ -x "$dir/device-bench" ]] || { echo "no executables in $dir: run '$0 build' where cargo is" >&2; exit 1; }
step() { printf '\n=== %s ===\n' "$*"; }
vk="$PWD/$dir/vk"
export LD_LIBRARY_PATH="$vk/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}"
export VK_LAYER_PATH="$vk/usr/share/vulkan/explicit_layer.d"
if [[ -z "${VK_DRIVER_FILES:-}" ]]; then
  for f in /usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json /usr/share/vulkan/icd.d/nvidia_icd.json \
           /etc/vulkan/icd.d/nvidia_icd.json; do
    if [[ -e "$f" ]]; then export VK_DRIVER_FILES="$f"; break; fi
  done
fi
export PAGEDKV_REQUIRE_VULKAN=1 PAGEDKV_VULKAN_VALIDATION=1

step "GPU, driver, Vulkan driver file"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader || true
echo "VK_DRIVER_FILES=${VK_DRIVER_FILES:-(loader default)}"

step "the conformance suite on the GPU, validation layer on"
timeout 120 "$dir/conformance-vulkan" --test-threads=1 --nocapture 2>&1 | grep -v '^$'

step "hal-vulkan's tests (quantization against hal-host, bad batches)"
timeout 60 "$dir/hal-vulkan-tests" --test-threads=1 --nocapture

step "the manager's swap / compress / defragment on the GPU"
timeout 60 "$dir/manager-vulkan" --test-threads=1

step "the CLI: a replay with its KV bytes on the GPU"
timeout 60 "$dir/pagedkv" simulate --conversations 40 --with-bytes --backend vulkan

step "2,000 scattered layer-major blocks vs one contiguous copy"
PAGEDKV_VULKAN_VALIDATION=0 timeout 120 "$dir/device-bench"

echo
echo "vulkan device check passed"
