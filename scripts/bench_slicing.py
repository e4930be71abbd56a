#!/usr/bin/env python3
"""The Python side of `kpipe bench slicing`: nibabel + numpy doing the same work on one
core: load a case's imaging and segmentation, clip to the HU window and scale to [0, 1],
2x2-mean the images to half size and take every other label (the centre-pixel pick
kpipe's nearest resize makes at exactly 1/2).

    python3 scripts/bench_slicing.py IMAGING SEGMENTATION [--repeat 5]

Prints the median seconds and slices per second. Needs nibabel and numpy.
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


def main():
    p = argparse.ArgumentParser()
    p.add_argument("imaging")
    p.add_argument("segmentation")
    p.add_argument("--repeat", type=int, default=5)
    a = p.parse_args()
    times = []
    for _ in range(a.repeat):
        t = time.perf_counter()
        small, labels = once(a.imaging, a.segmentation)
        times.append(time.perf_counter() - t)
    med = statistics.median(times)
    print(f"nibabel+numpy: median {med:.3f} s over {a.repeat} runs, {small.shape[0] / med:.0f} slices/s, output {small.shape} {labels.shape}")


if __name__ == "__main__":
    main()
