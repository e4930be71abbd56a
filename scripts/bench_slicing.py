#!/usr/bin/env python3
"""The Python side of `kpipe bench slicing`: nibabel + numpy doing the same work on one
core: load a case's imaging and segmentation, clip to the HU window and scale to [0, 1],
2x2-mean the images to half size and take every other label (the centre-pixel pick
kpipe's nearest resize makes at exactly 1/2).

    python3 scripts/bench_slicing.py IMAGING SEGMENTATION [--repeat 5]
    python3 scripts/bench_slicing.py --folder KITS19_DIR [--jobs 2] [--out DIR]

Prints the median seconds and slices per second. With --folder: every
`case_XXXXX/{imaging,segmentation}.nii.gz` of a KiTS19 folder once, `--jobs` worker
processes (a case each at a time, as kpipe's slice stage), the total wall time and slices
per second; `--out` also saves each case's images (float32) and labels as `.npy`, as the
slice stage writes its store. Needs nibabel and numpy.
"""
import argparse
import os
import statistics
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402


def once(imaging, segmentation, lo=-79.0, hi=304.0):
    img = nib.load(imaging).get_fdata(dtype=np.float32)
    seg = np.asarray(nib.load(segmentation).dataobj)
    img = (np.clip(img, lo, hi) - lo) / (hi - lo)
    n, h, w = img.shape
    small = img.reshape(n, h // 2, 2, w // 2, 2).mean(axis=(2, 4))
    labels = seg[:, 1::2, 1::2]
    return small, labels


def one_case(job):
    case_dir, out = job
    small, labels = once(
        os.path.join(case_dir, "imaging.nii.gz"),
        os.path.join(case_dir, "segmentation.nii.gz"),
    )
    if out:
        name = os.path.basename(case_dir)
        np.save(os.path.join(out, f"{name}_image.npy"), small.astype(np.float32))
        np.save(os.path.join(out, f"{name}_labels.npy"), labels.astype(np.uint8))
    return small.shape[0]


def folder(a):
    import multiprocessing

    cases = sorted(
        os.path.join(a.folder, d)
        for d in os.listdir(a.folder)
        if d.startswith("case_") and os.path.isdir(os.path.join(a.folder, d))
    )
    if a.limit:
        cases = cases[: a.limit]
    if a.out:
        os.makedirs(a.out, exist_ok=True)
    jobs = [(c, a.out) for c in cases]
    t = time.perf_counter()
    if a.jobs > 1:
        with multiprocessing.Pool(a.jobs) as pool:
            counts = pool.map(one_case, jobs, chunksize=1)
    else:
        counts = [one_case(j) for j in jobs]
    wall = time.perf_counter() - t
    slices = sum(counts)
    print(f"nibabel+numpy: {len(cases)} cases, {slices} slices in {wall:.2f} s with {a.jobs} processes, {slices / wall:.0f} slices/s")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("imaging", nargs="?")
    p.add_argument("segmentation", nargs="?")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--folder", help="a KiTS19 folder: every case once")
    p.add_argument("--jobs", type=int, default=1, help="worker processes (with --folder)")
    p.add_argument("--limit", type=int, default=0, help="the first N cases only (with --folder)")
    p.add_argument("--out", help="save the outputs as .npy here (with --folder)")
    a = p.parse_args()
    if a.folder:
        return folder(a)
    if not (a.imaging and a.segmentation):
        p.error("IMAGING and SEGMENTATION, or --folder")
    times = []
    for _ in range(a.repeat):
        t = time.perf_counter()
        small, labels = once(a.imaging, a.segmentation)
        times.append(time.perf_counter() - t)
    med = statistics.median(times)
    print(f"nibabel+numpy: median {med:.3f} s over {a.repeat} runs, {small.shape[0] / med:.0f} slices/s, output {small.shape} {labels.shape}")


if __name__ == "__main__":
    main()
