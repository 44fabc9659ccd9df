"""Time each spoc_xr.kernels function against scipy.ndimage on a 2048 x 2048 uint16 image.

One run each, no assertions: ``python benchmarks/kernels_bench.py``.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import scipy.ndimage as ndi

from spoc_xr import kernels

SIDE = 2048
SIZE = 5  # the median size the pipeline uses by default; the widest OpenCV route for uint16


def _mpix_per_s(func: Callable[[], object], pixels: int) -> float:
    start = time.perf_counter()
    func()
    return pixels / (time.perf_counter() - start) / 1e6


def main() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 10_000, size=(SIDE, SIDE), dtype=np.uint16)
    mask = ndi.uniform_filter(rng.random((SIDE, SIDE)), 5) > 0.55
    nearest = {"size": SIZE, "mode": "nearest"}
    cases: list[tuple[str, Callable[[], object], Callable[[], object]]] = [
        (
            f"median {SIZE}",
            lambda: kernels.median_filter(image, SIZE),
            lambda: ndi.median_filter(image, **nearest),
        ),
        (
            "median 7 (scipy route)",
            lambda: kernels.median_filter(image, 7),
            lambda: ndi.median_filter(image, size=7, mode="nearest"),
        ),
        (
            f"minimum {SIZE}",
            lambda: kernels.minimum_filter(image, SIZE),
            lambda: ndi.minimum_filter(image, **nearest),
        ),
        (
            f"maximum {SIZE}",
            lambda: kernels.maximum_filter(image, SIZE),
            lambda: ndi.maximum_filter(image, **nearest),
        ),
        (
            f"binary_opening {SIZE}",
            lambda: kernels.binary_opening(mask, SIZE),
            lambda: ndi.maximum_filter(ndi.minimum_filter(mask, **nearest), **nearest),
        ),
        (
            "label 8",
            lambda: kernels.label(mask),
            lambda: ndi.label(mask, structure=np.ones((3, 3))),
        ),
    ]
    print(f"{'kernel':<24}{'spoc Mpix/s':>12}{'scipy Mpix/s':>14}{'ratio':>8}")
    for name, ours, theirs in cases:
        fast, slow = _mpix_per_s(ours, image.size), _mpix_per_s(theirs, image.size)
        print(f"{name:<24}{fast:>12.1f}{slow:>14.1f}{fast / slow:>7.1f}x")


if __name__ == "__main__":
    main()
