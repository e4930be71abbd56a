#!/usr/bin/env bash
# Issue 15's CPU table: `kpipe bench train|infer` beside scripts/bench_unet_torch.py, run
# alternately in one session, U-Net batch 8, for 1 and 2 threads, 64/128/256 px, base 16
# and 32. Prints one markdown row per cell: slices/s of each, the ratio kpipe/PyTorch and
# the GFLOP/s each reaches (the convolutions' count; a training step is 3x the forward).
#
#   scripts/bench_cpu.sh [kpipe-binary] [python-with-torch]
#
# Defaults: target/debug/kpipe (the build profile is optimised) and python3. Env:
# THREADS="1 2" SIZES="64 128 256" BASES="16 32" narrow the grid; REPEATS=3 (default 1)
# runs each cell that many times, the two alternating, and reports the medians (shared
# machines drift by 10-15% from minute to minute).
set -euo pipefail
kpipe=${1:-target/debug/kpipe}
py=${2:-python3}
here=$(cd "$(dirname "$0")" && pwd)
median() { printf '%s\n' "$@" | sort -g | awk '{v[NR] = $1} END {print NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2}'; }
echo "| threads | size | base | kpipe train | torch train | ratio | kpipe infer | torch infer | ratio | GFLOP/s train kpipe/torch | GFLOP/s infer kpipe/torch |"
echo "|---|---|---|---|---|---|---|---|---|---|---|"
for t in ${THREADS:-1 2}; do
  for s in ${SIZES:-64 128 256}; do
    for b in ${BASES:-16 32}; do
      steps=$([ "$s" -le 64 ] && echo 5 || echo 3)
      common=(--size "$s" --base "$b" --batch 8 --threads "$t" --steps "$steps")
      kts=() tts=() kis=() tis=()
      for _ in $(seq "${REPEATS:-1}"); do
        kts+=("$("$kpipe" bench train "${common[@]}" | sed -E 's/^kpipe train: ([0-9.]+).*/\1/')")
        torch=$("$py" "$here/bench_unet_torch.py" "${common[@]}")
        kis+=("$("$kpipe" bench infer "${common[@]}" | sed -E 's/^kpipe infer: ([0-9.]+).*/\1/')")
        tts+=("$(echo "$torch" | sed -nE 's/^torch train: ([0-9.]+).*/\1/p')")
        tis+=("$(echo "$torch" | sed -nE 's/^torch infer: ([0-9.]+).*/\1/p')")
      done
      kt=$(median "${kts[@]}") tt=$(median "${tts[@]}") ki=$(median "${kis[@]}") ti=$(median "${tis[@]}")
      gf=$(echo "$torch" | sed -nE 's/.*; ([0-9.]+) GFLOP per forward slice.*/\1/p' | head -1)
      awk -v t="$t" -v s="$s" -v b="$b" -v kt="$kt" -v tt="$tt" -v ki="$ki" -v ti="$ti" -v gf="$gf" 'BEGIN {
        printf "| %s | %s | %s | %.2f | %.2f | %.2fx | %.2f | %.2f | %.2fx | %.0f / %.0f | %.0f / %.0f |\n",
          t, s, b, kt, tt, kt / tt, ki, ti, ki / ti, kt * gf * 3, tt * gf * 3, ki * gf, ti * gf }'
    done
  done
done
