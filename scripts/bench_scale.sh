#!/usr/bin/env bash
# Scale, measured: load + slice + split over KiTS19-sized phantoms (512x512, slice counts
# drawn like the real data's), against nibabel + numpy on the same cases.
#
#   scripts/bench_scale.sh [CASES=60] [WORK=/tmp/kpipe-scale] [SMALL=10]
#
# Reports (stdout, and WORK/report.txt): the machine's load, the data, the load and the
# slice + split wall times and slices/s on this machine's cores, `scripts/bench_slicing.py
# --folder` on the same cases (2 processes; with and without saving the outputs), the
# slice stage's peak RSS at SMALL and CASES cases (`/usr/bin/time -v`; load is cached
# first, so the process is slice + split), the slice store's size in float32 and float16,
# a no-op rerun of the whole pipeline, and `kpipe verify --cache` in MB/s.
#
# The data stays in WORK (reused when there) until `rm -rf WORK`; KPIPE picks the binary
# (default: $CARGO_TARGET_DIR/debug/kpipe, built with `cargo build`). Needs python3 with
# nibabel and numpy, and GNU time.
set -euo pipefail

CASES=${1:-60}
WORK=${2:-/tmp/kpipe-scale}
SMALL=${3:-10}
KPIPE=${KPIPE:-${CARGO_TARGET_DIR:-target}/debug/kpipe}
KPIPE=$(realpath "$KPIPE")
HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$WORK"
cd "$WORK"
REPORT=$WORK/report.txt
: >"$REPORT"
say() { echo "$*" | tee -a "$REPORT"; }

# `timed LABEL CMD...`: runs CMD under GNU time; sets WALL (s) and RSS (MB); keeps stderr
# in LABEL.err.
timed() {
    local label=$1
    shift
    /usr/bin/time -v -o "$label.time" "$@" >"$label.out" 2>"$label.err"
    WALL=$(awk -F': ' '/Elapsed \(wall clock\)/ {n = split($2, t, ":"); s = 0; for (i = 1; i <= n; i++) s = s * 60 + t[i]; print s}' "$label.time")
    RSS=$(awk -F': ' '/Maximum resident set size/ {printf "%.0f", $2 / 1024}' "$label.time")
}

# Seconds a stage took, from a run's stderr (`ran  slice (12.34s)`).
stage_s() { sed -n "s/^ *ran  $1 (\([0-9.]*\)s)$/\1/p" "$2"; }

say "== kpipe scale benchmark, $(date -u +%FT%TZ), $(nproc) cores"
say "load at start: $(uptime)"

if [ ! -f data/kits.json ]; then
    timed synth "$KPIPE" synth --out data --cases "$CASES" --kits19-size --seed 0
    say "synth: $CASES KiTS19-sized cases in ${WALL}s (peak RSS ${RSS} MB)"
fi

# Slice counts from the segmentations' headers.
python3 - "$WORK/data" "$SMALL" "$(nproc)" >counts.txt <<'EOF'
import gzip, os, struct, sys
root, small, cores = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
cases = sorted(d for d in os.listdir(root) if d.startswith("case_"))
n = {}
for c in cases:
    with gzip.open(os.path.join(root, c, "segmentation.nii.gz")) as f:
        h = f.read(348)
    n[c] = struct.unpack("<8h", h[40:56])[1]
big = max(cases, key=n.get)
# The small set: the largest volumes, one per core (a slice worker holds one case at a
# time and keeps its buffers), then the first cases: both sets then hold the same
# biggest volumes, and any growth of the peak is the case count's.
largest = sorted(cases, key=n.get, reverse=True)[:cores]
subset = sorted(largest + [c for c in cases if c not in largest][: small - len(largest)])
print(len(cases), sum(n.values()), min(n.values()), max(n.values()), big, sum(n[c] for c in subset), max(n[c] for c in subset))
print(" ".join(subset))
print(" ".join(str(n[c]) for c in sorted(cases, key=n.get, reverse=True)[:cores]))
EOF
read -r NCASES SLICES MINS MAXS BIG SMALL_SLICES SMALL_MAX < <(sed -n 1p counts.txt)
SUBSET=$(sed -n 2p counts.txt)
LARGEST=$(sed -n 3p counts.txt)
say "data: $NCASES cases, $SLICES slices (min $MINS, max $MAXS: $BIG), $(du -shL data | cut -f1) on disk"
rm -rf data_small && mkdir data_small
for c in $SUBSET; do ln -s "$WORK/data/$c" data_small/; done
say "small set: $SMALL cases with the $(nproc) largest ($LARGEST slices), $SMALL_SLICES slices"

cat >scale.toml <<'EOF'
[pipeline]
name = "scale"
seed = 1

[stages.load]
kind = "load"
source = "kits19"
path = "data"

[stages.slice]
kind = "slice"
input = "load"

[stages.split]
kind = "split"
input = "load"
EOF
# The same load stage alone (same seed and id: the same cache key).
sed '/^\[stages.slice\]/,$d' scale.toml | sed 's/^name = "scale"/name = "scale-load"/' >load.toml

# `measure TAG PATH`: a fresh cache; load alone, then the whole pipeline (load cached).
measure() {
    local tag=$1 path=$2
    rm -rf "cache_$tag"
    export KPIPE_CACHE_DIR=$WORK/cache_$tag
    timed "load_$tag" "$KPIPE" --no-progress run load.toml --set "stages.load.path=$path"
    LOAD_WALL=$WALL LOAD_RSS=$RSS
    timed "slice_$tag" "$KPIPE" --no-progress run scale.toml --set "stages.load.path=$path"
    SLICE_WALL=$WALL SLICE_RSS=$RSS
    SLICE_STAGE=$(stage_s slice "slice_$tag.err")
}

# Both sides read the volumes from the page cache.
cat data/*/*.nii.gz >/dev/null
say "load at kpipe runs: $(uptime)"
measure all data
TOTAL=$(echo "$LOAD_WALL + $SLICE_WALL" | bc -l)
say "kpipe load: ${LOAD_WALL}s (peak RSS ${LOAD_RSS} MB)"
say "kpipe slice + split: ${SLICE_WALL}s wall (slice stage ${SLICE_STAGE}s), peak RSS ${SLICE_RSS} MB at $NCASES cases"
say "kpipe load + slice + split: ${TOTAL}s, $(echo "$SLICES / $TOTAL" | bc) slices/s (slice stage alone $(echo "$SLICES / $SLICE_STAGE" | bc) slices/s)"

NOOP=()
for _ in 1 2 3; do
    timed noop "$KPIPE" --no-progress run scale.toml --set "stages.load.path=data"
    NOOP+=("$WALL")
done
say "no-op rerun of load -> slice -> split: ${NOOP[*]} s"

ENTRIES=$(du -sb "$KPIPE_CACHE_DIR/entries" | cut -f1)
timed verify "$KPIPE" --no-progress verify --cache
say "verify --cache: $(echo "$ENTRIES / 1000000" | bc) MB in ${WALL}s: $(echo "$ENTRIES / 1000000 / $WALL" | bc) MB/s ($(tail -n 1 verify.out))"

timed f16 "$KPIPE" --no-progress run scale.toml --set "stages.load.path=data" --set 'stages.slice.storage="float16"'
for e in "$KPIPE_CACHE_DIR"/entries/*/; do
    if [ -f "$e/out/slices.json" ]; then
        # float32, the default, is not written
        storage=$(grep -o '"storage": *"[a-z0-9]*"' "$e/out/slices.json" | head -n 1 | sed 's/.*"\([a-z0-9]*\)"$/\1/' || true)
        say "slice store ${storage:-float32}: $(du -sb "$e" | cut -f1 | awk '{printf "%.2f GB", $1 / 1e9}') ($(du -sb "$e/out/cases" | cut -f1 | awk '{printf "%.2f GB", $1 / 1e9}') of .npy)"
    fi
done

say "load at the small run: $(uptime)"
measure small data_small
say "kpipe slice + split at $SMALL cases: ${SLICE_WALL}s (slice stage ${SLICE_STAGE}s), peak RSS ${SLICE_RSS} MB"

say "load at python: $(uptime)"
timed py "python3" "$HERE/bench_slicing.py" --folder data --jobs 2
say "$(cat py.out)"
rm -rf py_npy
timed pyw "python3" "$HERE/bench_slicing.py" --folder data --jobs 2 --out py_npy
say "$(cat pyw.out) (saving .npy: $(du -sh py_npy | cut -f1))"
rm -rf py_npy
say "load at end: $(uptime)"
