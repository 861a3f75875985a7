#!/usr/bin/env bash
# One-call GPU benchmark of ekfac against curvlinops (issue 13, item 5).
#
#   bash tools/device_bench.sh prepare          # here: build and gather what is carried
#   bash tools/device_bench.sh [OUT] [--accuracy]   # on the GPU machine
#
# `prepare` (on a machine with Rust, apt and pip) fills tools/device_bench/ (ignored by
# git; carry it to the GPU machine):
#   bench             the prebuilt release `bench` example (cargo build --release --example bench)
#   jacobi            the prebuilt release tests/jacobi.rs binary (for --accuracy)
#   debs/*.deb        the Vulkan loader (libvulkan1), unpacked at start with dpkg-deb
#   wheels/*.whl      curvlinops-for-pytorch 3.0.1 and its pure-Python dependencies
#                     (torch, torchvision, numpy and scipy are expected on the GPU
#                     machine)
#
# The run (a bare Linux machine with an NVIDIA GPU and its driver, Python 3 with torch;
# no Rust, no network) takes at most about 8 minutes:
#   1. unpacks the Vulkan loader into $WORK/vulkan and points the loader at the NVIDIA
#      ICD (the driver's nvidia_icd.json, or one written for libGLX_nvidia.so.0);
#   2. installs the wheels into a virtual environment that sees the system's torch;
#   3. `bench` on both full workloads (mlp, cnn; 5 runs each, the GPU Jacobi), writing
#      their inputs, then `tools/bench_curvlinops.py --device cuda` on the same inputs;
#   4. writes both tables, nvidia-smi's card name and the adapter into $OUT (default
#      device_bench.txt).
# `--accuracy` then runs the ignored n = 1024 and 2048 Jacobi accuracy test
# (`blocked_path_large`; 15–20 minutes per matrix on the software driver, minutes on a
# GPU) as a second part, appended to the same file.
#
# Untested on a GPU so far (no GPU was lent when it was written); `prepare` and the
# unpacking and ICD steps were tried on the development machine.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CARRY="$ROOT/tools/device_bench"

prepare() {
    mkdir -p "$CARRY/debs" "$CARRY/wheels"
    (cd "$ROOT" && cargo build --release --example bench)
    cp "$ROOT/target/release/examples/bench" "$CARRY/bench"
    # The test binary's name has a hash: ask cargo for it.
    local jacobi
    jacobi="$(cd "$ROOT" && cargo test --release --test jacobi --no-run --message-format=json \
        | python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "jacobi":
        print(m["executable"])')"
    cp "$jacobi" "$CARRY/jacobi"
    (cd "$CARRY/debs" && apt-get download libvulkan1)
    # The versions of the fixture venv (/work/venv); torch, torchvision, numpy and scipy
    # come from the GPU machine.
    python3 -m pip download --no-deps -d "$CARRY/wheels" \
        curvlinops-for-pytorch==3.0.1 backpack-for-pytorch==1.7.1 einconv==0.1.0 \
        einops==0.8.2 linear_operator==0.6.1 opt_einsum==3.4.0 tqdm==4.70.1 \
        safetensors==0.8.0 unfoldNd==0.2.3 packaging
    du -sh "$CARRY"
}

run() {
    local out="${1:-device_bench.txt}" accuracy="${2:-}"
    local work
    work="$(mktemp -d)"
    [ -x "$CARRY/bench" ] || { echo "error: $CARRY/bench is missing: run 'bash tools/device_bench.sh prepare' and carry tools/device_bench" >&2; exit 1; }

    # 1. The Vulkan loader, and the NVIDIA ICD.
    for deb in "$CARRY"/debs/*.deb; do dpkg-deb -x "$deb" "$work/vulkan"; done
    export LD_LIBRARY_PATH="$work/vulkan/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    local icd=""
    for f in /usr/share/vulkan/icd.d/nvidia_icd.json /etc/vulkan/icd.d/nvidia_icd.json \
        /usr/share/vulkan/icd.d/nvidia_icd.x86_64.json; do
        [ -f "$f" ] && { icd="$f"; break; }
    done
    if [ -z "$icd" ]; then
        local lib
        lib="$(ldconfig -p 2>/dev/null | awk '/libGLX_nvidia.so.0/{print $NF; exit}')"
        [ -n "$lib" ] || lib="$(ls /usr/lib/x86_64-linux-gnu/libGLX_nvidia.so.0 2>/dev/null || true)"
        [ -n "$lib" ] || { echo "error: no NVIDIA Vulkan ICD (nvidia_icd.json or libGLX_nvidia.so.0); the container needs NVIDIA_DRIVER_CAPABILITIES=graphics,compute" >&2; exit 1; }
        icd="$work/nvidia_icd.json"
        printf '{"file_format_version":"1.0.0","ICD":{"library_path":"%s","api_version":"1.3"}}\n' "$lib" > "$icd"
    fi
    export VK_ICD_FILENAMES="$icd" WGPU_BACKEND=vulkan XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp}"

    # 2. curvlinops next to the system's torch.
    python3 -m venv --system-site-packages "$work/venv"
    "$work/venv/bin/pip" install --quiet --no-index --find-links "$CARRY/wheels" \
        curvlinops-for-pytorch==3.0.1

    # 3. and 4. Both tables into one file.
    {
        echo "# ekfac device benchmark, $(date -u +%FT%TZ)"
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "nvidia-smi: not available"
        echo
        echo "## ekfac (examples/bench, full workloads, GPU Jacobi)"
        timeout 300 "$CARRY/bench" --runs 5 --write-inputs "$work/inputs"
        for w in mlp cnn; do
            echo
            echo "## curvlinops 3.0.1 on the same inputs: $w"
            timeout 90 "$work/venv/bin/python" "$ROOT/tools/bench_curvlinops.py" "$work/inputs/$w" \
                --device cuda --runs 5
        done
    } 2>&1 | tee "$out"

    if [ "$accuracy" = "--accuracy" ]; then
        {
            echo
            echo "## Jacobi accuracy at n = 1024 and 2048 (tests/jacobi.rs blocked_path_large)"
            EKFAC_REQUIRE_GPU=1 "$CARRY/jacobi" --ignored --exact blocked_path_large --nocapture
        } 2>&1 | tee -a "$out"
    fi
    echo "wrote $out"
}

case "${1:-}" in
    prepare) prepare ;;
    --accuracy) run device_bench.txt --accuracy ;;
    *) run "${1:-device_bench.txt}" "${2:-}" ;;
esac
