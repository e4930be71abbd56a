#!/usr/bin/env bash
# Issue 14's GPU measurements in one call on a lent machine (an NVIDIA H200): the study's
# U-Net (base 64, 256x256, batch 8, no batch norm) trained and run by kpipe on burn-wgpu,
# with each shader compiler (WGSL; SPIR-V, the `vulkan` feature) and each precision (f32,
# flex32, f16), beside PyTorch CUDA (strict fp32, TF32, bf16 autocast); then the batch
# that fills the GPU, autotune's choices and a kernel profile of the f32 training step.
#
# Here, once (two GPU builds of the dev profile: on 2 cores about 48 minutes for the first
# from nothing, 35 more for the second):
#     bash scripts/bench_gpu.sh pack     # in the checkout the device tool sends
# writes .gpu/ (both binaries, stripped and xz-compressed) and .gl/ (the Vulkan loader's
# Debian packages: the GPU machine's image has the NVIDIA driver but no loader). Then, on
# the device tool:
#     run(command = "bash scripts/bench_gpu.sh run", carry = [".gpu", ".gl"], timeout_s = 560)
# Every figure and log lands in $OUT; the table comes last in the output. Runs are in
# order of importance and each is cut off at RUN_LIMIT seconds; once BUDGET seconds have
# passed the rest are skipped, saying so. SIZE, BASE, BATCH, STEPS, WARMUP, PRECISIONS override the
# configuration (a quick check here on lavapipe: SIZE=32 BASE=4 STEPS=1 WARMUP=1).
set -uo pipefail
cd "$(dirname "$0")/.."

pack() {
  set -e
  local target="${CARGO_TARGET_DIR:-$HOME/.cache/kpipe-target}"
  mkdir -p .gpu .gl
  for v in wgsl:gpu spirv:vulkan; do
    CARGO_TARGET_DIR="$target" cargo build --locked --features "${v#*:}"
    strip -o ".gpu/kpipe-${v%%:*}" "$target/debug/kpipe"
    xz -T0 -6 -f ".gpu/kpipe-${v%%:*}"
  done
  local o='-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=/tmp/amd64'
  mkdir -p /tmp/amd64/partial
  # shellcheck disable=SC2086
  apt-get $o update -qq
  # shellcheck disable=SC2086
  (cd .gl && apt-get $o download libvulkan1)
  du -sh .gpu .gl
}

run() {
  local out="${OUT:-$(mktemp -d)}" size="${SIZE:-256}" base="${BASE:-64}" batch="${BATCH:-8}"
  local steps="${STEPS:-20}" warmup="${WARMUP:-10}" budget="${BUDGET:-480}" limit="${RUN_LIMIT:-120}"
  local start; start=$(date +%s)
  exec > >(tee "$out/gpu-bench.log") 2>&1
  echo "gpu-bench: U-Net base $base, ${size}x$size, batch $batch, no batch norm; $warmup warm-up, $steps timed steps; $(date -u +%FT%TZ)"
  # The Vulkan loader, unpacked where the image lacks it; the driver's ICD where it is not
  # registered.
  if ! ldconfig -p | grep -q libvulkan.so.1; then
    for f in .gl/*.deb; do dpkg -x "$f" /; done
    ldconfig
  fi
  if [ -e /usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json ] && ! ls /usr/share/vulkan/icd.d/nvidia* /etc/vulkan/icd.d/nvidia* >/dev/null 2>&1; then
    export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
  fi
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  local bin; bin=$(mktemp -d)
  for c in wgsl spirv; do
    if [ -e ".gpu/kpipe-$c.xz" ]; then xz -dc ".gpu/kpipe-$c.xz" >"$bin/kpipe-$c"; chmod +x "$bin/kpipe-$c"; fi
  done
  # autotune's choices (cubecl reads cubecl.toml from the working directory)
  local work; work=$(mktemp -d)
  cat >"$work/cubecl.toml" <<EOF
[autotune.logger]
level = "minimal"
file = "$out/autotune.log"
append = true
EOF
  local table="$out/table.md"
  printf '| run | slices/s | TFLOP/s | peak GiB | epoch (31,500 slices) |\n| --- | --- | --- | --- | --- |\n' >"$table"
  # One timed command: its median slices/s, peak GPU memory (nvidia-smi, sampled), a row.
  measure() {
    local name="$1"; shift
    if (( $(date +%s) - start > budget )); then
      echo "gpu-bench: $name skipped: the ${budget}s budget is spent"
      echo "| $name | skipped (budget) | | | |" >>"$table"
      return
    fi
    echo "== $name: $*" | tee -a "$out/autotune.log"
    local mem="$out/mem-$name.txt" smi=
    if command -v nvidia-smi >/dev/null; then
      nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 >"$mem" &
      smi=$!
    fi
    local text rc
    text=$(cd "$work" && timeout "$limit" "$@" 2>&1); rc=$?
    [ -n "$smi" ] && kill "$smi" 2>/dev/null
    echo "$text" | tail -n 5
    local rate flops peak
    rate=$(echo "$text" | grep -oE '(train|infer): [0-9.]+ slices/s' | tail -1 | grep -oE '[0-9.]+ ' | tr -d ' ')
    if [ -z "$rate" ]; then
      echo "| $name | failed (exit $rc) | | | |" >>"$table"
      return
    fi
    flops=$(python3 -c 'import sys; r, name, size, base = float(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]); print("%.3g" % (r * 96.2e9 * (3 if name.startswith("train") else 1) * (size / 256) ** 2 * (base / 64) ** 2 / 1e12))' "$rate" "$name" "$size" "$base")
    peak=$( [ -s "$mem" ] && sort -n "$mem" | tail -1 | awk '{printf "%.1f", $1 / 1024}' || echo "?")
    local epoch=""
    case "$name" in train*) epoch=$(python3 -c "print(f'{31500 / $rate / 60:.1f} min')") ;; esac
    echo "| $name | $rate | $flops | $peak | $epoch |" >>"$table"
  }
  local net=(--size "$size" --base "$base" --no-batch-norm --warmup "$warmup" --steps "$steps")
  if python3 -c 'import torch; assert torch.cuda.is_available()' 2>/dev/null; then
    echo "== torch: fp32, tf32, bf16"
    timeout $((3 * limit)) python3 scripts/bench_unet_torch.py --device cuda --mode all --batch "$batch" "${net[@]}" | tee "$out/torch.txt"
    # its lines: torch MODE: RATE slices/s (PRECISION, without batch norm, T TFLOP/s, peak M GiB; ...)
    sed -nE 's/^torch (train|infer): ([0-9.]+) slices\/s \(([a-z0-9]+),.* ([0-9.]+) TFLOP\/s, peak ([0-9.]+) GiB.*/| torch \1 \3 | \2 | \4 | \5 | |/p' "$out/torch.txt" >>"$table"
  else
    echo "gpu-bench: no CUDA PyTorch here: the PyTorch figures are skipped"
  fi
  local c p mode
  for p in ${PRECISIONS:-f32 flex32 f16}; do
    for c in wgsl spirv; do
      [ -x "$bin/kpipe-$c" ] || { echo "gpu-bench: no .gpu/kpipe-$c.xz: $c skipped"; continue; }
      for mode in train infer; do
        measure "$mode-$c-$p" "$bin/kpipe-$c" bench "$mode" --backend gpu --precision "$p" --batch "$batch" "${net[@]}"
      done
    done
  done
  # The compiler that trained fastest in f32: the batch that fills the GPU, and where a
  # training step's time goes (cubecl's per-kernel profile, a few steps).
  local best
  best=$(sed -nE 's/^\| train-(wgsl|spirv)-f32 \| ([0-9.]+) .*/\2 \1/p' "$table" | sort -rn | head -1 | cut -d' ' -f2)
  if [ -n "$best" ]; then
    echo "gpu-bench: $best trained fastest in f32"
    measure "train-$best-f32-batch32" "$bin/kpipe-$best" bench train --backend gpu --batch 32 "${net[@]}"
    cat >>"$work/cubecl.toml" <<EOF
[profiling.logger]
level = "medium"
file = "$out/profile-$best.log"
EOF
    measure "train-$best-f32-profiled" "$bin/kpipe-$best" bench train --backend gpu --batch "$batch" --size "$size" --base "$base" --no-batch-norm --warmup "$warmup" --steps 3
  fi
  echo "gpu-bench: done in $(( $(date +%s) - start ))s; TFLOP/s: 96.2 GFLOP per base-64 256x256 forward slice, a training step 3x; H200 peaks about 67 (fp32) and 990 (dense bf16)"
  cat "$table"
}

case "${1:-run}" in
  pack) pack ;;
  run) run ;;
  *) echo "usage: $0 [pack|run]" >&2; exit 2 ;;
esac
