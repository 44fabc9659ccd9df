"""Throughput, memory and scaling of spoc-xr annotate against reading, dask-image and numpy.

Builds a synthetic stack store (a rendered harbour, mirror-tiled to the chosen size and varied per
date), then measures, side by side in one run and on that same store:

1. reading the store (every chunk decompressed, nothing computed): threads, LocalCluster 2 workers;
2. ``spoc_xr.annotate`` + ``write_dataset`` end to end (overview pass included): threads,
   LocalCluster with 1 and 2 workers, and 2 workers on twice the dates;
3. the textbook dask-image composition of the same steps (one Dask layer per operation);
4. a numpy/scipy loop over the dates;

then the ratios between them, the peak memory of each worker, and a check that annotate's mask
equals, value for value, the scipy reference implementation of the chain on one tile.
``--larger-than-memory`` instead runs only an annotate over a stack larger than the workers'
memory, on 2 workers with a memory limit.

Run::

    python benchmarks/run.py                 # 2048 x 2048, 40 dates (80 for the scaling row)
    python benchmarks/run.py --quick         # 1024 x 1024, 8 dates: under two minutes
    python benchmarks/run.py --larger-than-memory --ltm-gb 12 --memory-limit 2GB
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import scipy.ndimage as ndi
import xarray as xr
import zarr

from spoc_xr import kernels
from spoc_xr.detect import (
    band_roles,
    classify_tile,
    per_date_levels,
    reference_products,
    window_span,
)
from spoc_xr.ingest import add_overview, open_stack, read_overview
from spoc_xr.pipeline import (
    annotate,
    annotate_store,
    build_annotations,
    clipping_ceilings,
    plan_annotation,
)
from spoc_xr.reference import date_shifts
from spoc_xr.store import mark_complete, write_dataset
from spoc_xr.synthetic import BAND_NAMES, render_harbour

#: Spatial chunk side of the stack store, as ``spoc-xr ingest`` writes it by default.
CHUNK = 1024
#: The harbour is rendered at most this size and mirror-tiled beyond it: rendering costs ~1 s per
#: 1024² date, far more than the pipeline, and tiling keeps the scene's statistics.
BASE_SIDE = 1024
#: Distinct rendered dates; later dates reuse them with their own gain and noise.
BASE_DATES = 8
#: Per-date sensor noise added to the reused dates (± this many reflectance × 10000 units), so
#: no two dates compress alike.
DATE_NOISE = 6
#: Seconds between two samples of every worker's resident memory.
SAMPLE_INTERVAL_S = 0.2
#: Fixed change threshold of the textbook baselines, in reflectance × 10000: well above the
#: synthetic noise, well below a boat's contrast.
BASELINE_THRESHOLD = 400.0
#: Worker log lines that mean memory pressure (pausing, spilling, unmanaged memory warnings).
PRESSURE_PATTERN = re.compile(r"spill|pausing|memory use is high|unmanaged memory", re.IGNORECASE)
#: Seconds between two progress lines of a long (larger-than-memory) run.
PROGRESS_EVERY_S = 60.0
#: The larger-than-memory run reports its peak worker memory in this many equal slices of its
#: wall time: flat slices mean memory does not grow with the dates processed.
TIMELINE_SLICES = 10
MB = 1e6


# ---------------------------------------------------------------------------------------------
# The synthetic stack


def stack_dates(n_dates: int) -> np.ndarray:
    """Acquisition times of a synthetic stack: every 5 days from 2023-03-01 at 10:30."""
    start = np.datetime64("2023-03-01T10:30:00", "ns")
    return start + np.arange(n_dates) * np.timedelta64(5, "D")


def band_names(n_bands: int) -> list[str]:
    """The harbour's band names, extended with ``B10``, ``B11``... for more than 4 bands."""
    extra = [f"B{10 + i}" for i in range(max(0, n_bands - len(BAND_NAMES)))]
    return [*BAND_NAMES, *extra][:n_bands]


def build_stack(path: Path, *, size: int, n_dates: int, n_bands: int = 4, seed: int = 0) -> Path:
    """Write a synthetic ``(time, band, y, x)`` uint16 stack store laid out as ingest writes it.

    A harbour of at most ``BASE_SIDE`` px is rendered for up to ``BASE_DATES`` dates, mirror-tiled
    to ``size`` and varied per date (gain, noise). Chunks are ``(1, band, 1024, 1024)``, zarr v3,
    ``nodata = 0``, marked complete like an ingested store. An existing store built with the same
    parameters is reused.

    Parameters
    ----------
    path : pathlib.Path
        Where the store goes.
    size : int
        Side of the square images in pixels (at least 128).
    n_dates, n_bands : int
        Dates and bands of the stack.
    seed : int
        Seed of the rendering and of the per-date variation.

    Returns
    -------
    pathlib.Path
        ``path``.

    Examples
    --------
    >>> build_stack(Path("/tmp/s.zarr"), size=256, n_dates=3)  # doctest: +SKIP
    PosixPath('/tmp/s.zarr')
    """
    if size < 128 or n_dates < 1 or n_bands < 1:
        raise ValueError(f"size {size} must be >= 128, dates {n_dates} and bands {n_bands} >= 1")
    # Format 2: the stack compressed as ingest compresses image values (store.IMAGE_COMPRESSOR).
    recipe = {"size": size, "dates": n_dates, "bands": n_bands, "seed": seed, "format": 2}
    if (path / "zarr.json").exists():
        with contextlib.suppress(Exception):
            group = zarr.open_group(path, mode="r")
            if group.attrs.get("benchmark") == recipe:
                if "overview" not in group:  # built before ingest stored overviews
                    add_overview(path)
                return path
    shutil.rmtree(path, ignore_errors=True)
    side = min(size, BASE_SIDE)
    base, _ = render_harbour(n_dates=min(n_dates, BASE_DATES), shape=(side, side), seed=seed)
    chunk = min(CHUNK, size)
    lazy = da.zeros(
        (n_dates, n_bands, size, size), dtype=np.uint16, chunks=(1, n_bands, chunk, chunk)
    )
    y = 4_000_000.0 - 10.0 * (np.arange(size) + 0.5)
    x = 400_000.0 + 10.0 * (np.arange(size) + 0.5)
    stack = xr.DataArray(
        lazy,
        dims=("time", "band", "y", "x"),
        coords={"time": stack_dates(n_dates), "band": band_names(n_bands), "y": y, "x": x},
        name="stack",
        attrs={"nodata": 0},
    )
    dataset = stack.to_dataset()
    dataset["band"] = dataset["band"].astype(object)
    dataset.attrs = {"spoc_xr": {"kind": "stack", "source_files": []}, "benchmark": recipe}
    # Only the arrays' metadata, through the writer ingest uses (its compressors, its options);
    # the dates are filled in below.
    write_dataset(dataset, path, overwrite=False, compute=False)
    target = zarr.open_array(path / "stack", mode="r+")
    rng = np.random.default_rng(seed)
    pad = size - side
    for t in range(n_dates):
        image = base[t % len(base)]
        bands = np.stack(
            [image[b % len(image)] * (1 + 0.05 * (b // len(image))) for b in range(n_bands)]
        )
        if pad:
            bands = np.pad(bands, ((0, 0), (0, pad), (0, pad)), mode="symmetric")
        gain = np.float32(1 + 0.03 * math.sin(t))
        noise = rng.integers(-DATE_NOISE, DATE_NOISE + 1, size=bands.shape, dtype=np.int16)
        values = np.clip(np.rint(bands * gain) + noise, 1, np.iinfo(np.uint16).max)
        target[t] = values.astype(np.uint16)
    mark_complete(path)
    # Ingest stores the overview beside the stack; here it takes one more pass (not timed).
    add_overview(path)
    return path


# ---------------------------------------------------------------------------------------------
# Measurement helpers


@dataclass
class Measure:
    """One timed run."""

    what: str
    scheduler: str
    seconds: float
    mpix_dates: float
    peak_worker_mb: float | None = None
    note: str = ""

    @property
    def rate(self) -> float:
        """Mega-pixel·dates per second (pixels of one band-stacked date count once)."""
        return self.mpix_dates / self.seconds


@dataclass
class Pressure:
    """Memory pressure of a LocalCluster run."""

    peak_worker_mb: float
    limit_mb: float | None
    spilled_mb: float
    spill_events: int
    log_lines: list[str] = field(default_factory=list)
    paused_samples: int = 0
    timeline: list[tuple[float, float]] = field(default_factory=list)
    spill_timeline: list[tuple[float, float]] = field(default_factory=list)
    held_at_peak: list[tuple[str, float]] = field(default_factory=list)


class PeakMemory:
    """Sample every worker's resident memory in a background thread; keep each one's peak.

    Every sample also goes to ``timeline`` (seconds since the start, highest worker RSS in bytes)
    and to ``spill_timeline`` (seconds, spill-to-disk writes of all workers so far), and samples
    where a worker was paused (Dask's 80 % threshold) are counted. ``progress``, if
    given, is called every ``progress_every`` seconds with the elapsed seconds and the latest
    RSS of each worker, for runs long enough to watch.
    """

    def __init__(
        self,
        client: Any,
        interval: float = SAMPLE_INTERVAL_S,
        *,
        progress: Callable[[float, dict[str, float]], None] | None = None,
        progress_every: float = PROGRESS_EVERY_S,
    ) -> None:
        self.client = client
        self.interval = interval
        self.peaks: dict[str, float] = {}
        self.timeline: list[tuple[float, float]] = []
        self.spill_timeline: list[tuple[float, float]] = []
        #: What the worker with the highest peak held in memory at that peak (task group, bytes).
        self.held_at_peak: list[tuple[str, float]] = []
        self.paused_samples = 0
        self.progress = progress
        self.progress_every = progress_every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        start = last_report = time.perf_counter()
        while not self._stop.is_set():
            with contextlib.suppress(Exception):
                states = self.client.run(_worker_state)
                now = time.perf_counter()
                latest = {worker: state[0] for worker, state in states.items()}
                for worker, (rss, _, _, held) in states.items():
                    if rss > max(self.peaks.values(), default=0.0):
                        self.held_at_peak = held
                    self.peaks[worker] = max(self.peaks.get(worker, 0.0), rss)
                self.timeline.append((now - start, max(latest.values(), default=0.0)))
                spills = sum(state[2] for state in states.values())
                self.spill_timeline.append((now - start, spills))
                self.paused_samples += any(state[1] for state in states.values())
                if self.progress is not None and now - last_report >= self.progress_every:
                    last_report = now
                    self.progress(now - start, latest)
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak_mb(self) -> float:
        """The highest resident memory of any one worker, in MB."""
        return max(self.peaks.values(), default=0.0) / MB


def _worker_state(dask_worker: Any) -> tuple[float, bool, float, list[tuple[str, float]]]:
    """A worker's RSS (bytes), whether it is paused, its disk writes, and what it holds.

    What it holds: the three task groups (key names without their token) with the most bytes
    in the worker's in-memory store.
    """
    import psutil

    paused = getattr(dask_worker.status, "name", "") == "paused"
    spills, _ = _disk_write_metrics(dask_worker)
    weights = getattr(getattr(dask_worker.data, "fast", None), "weights", {})
    groups: dict[str, float] = {}
    for key, size in list(weights.items()):
        name = key[0] if isinstance(key, tuple) else key
        group = str(name).rsplit("-", 1)[0]
        groups[group] = groups.get(group, 0.0) + float(size)
    held = sorted(groups.items(), key=lambda item: -item[1])[:3]
    return float(psutil.Process().memory_info().rss), paused, spills, held


def _disk_write_metrics(dask_worker: Any) -> tuple[float, float]:
    metrics = getattr(dask_worker.data, "cumulative_metrics", {})
    return (
        float(metrics.get(("disk-write", "count"), 0.0)),
        float(metrics.get(("disk-write", "bytes"), 0.0)),
    )


@contextlib.contextmanager
def local_cluster(
    n_workers: int, memory_limit: str | None, *, log_level: str = "error"
) -> Iterator[Any]:
    """A LocalCluster of ``n_workers`` single-threaded worker processes, quietly.

    ``log_level`` is that of the ``distributed`` loggers: ``"warning"`` keeps the workers'
    memory warnings (pausing, unmanaged memory), which :func:`pressure_of` then counts.
    """
    from spoc_xr.cluster import dask_client

    with (
        dask.config.set({"distributed.worker.daemon": False, "logging.distributed": log_level}),
        dask_client(
            workers=n_workers, threads_per_worker=1, memory_limit=memory_limit, quiet=True
        ) as client,
    ):
        yield client


def pressure_of(client: Any, peaks: PeakMemory, memory_limit: str | None) -> Pressure:
    """Peak memory, spilled bytes and memory-pressure log lines of the workers of ``client``."""
    from dask.utils import parse_bytes

    events, spilled = 0, 0.0
    for count, size in client.run(_disk_write_metrics).values():
        events += int(count)
        spilled += size
    lines = [
        message
        for logs in client.get_worker_logs().values()
        for _, message in logs
        if PRESSURE_PATTERN.search(message)
    ]
    limit = parse_bytes(memory_limit) / MB if memory_limit else None
    return Pressure(
        peaks.peak_mb,
        limit,
        spilled / MB,
        events,
        lines,
        peaks.paused_samples,
        peaks.timeline,
        peaks.spill_timeline,
        peaks.held_at_peak,
    )


#: Dates of spoc-xr annotate's untimed warm-up. Each compiled kernel is loaded from numba's cache
#: (0.3-0.4 s each) the first time its path runs: two dates (the warm-up until session 15) never
#: reached the density and large-object passes, which the timed run then loaded (0.7 s of its
#: 11-13 s); four reached every one on the default stack, eight leave a margin.
ANNOTATE_WARM_UP_DATES = 8


def timed(function: Callable[[], object], warm_up: Callable[[], object] | None = None) -> float:
    """Seconds ``function`` takes, after an untimed ``warm_up`` run when one is given.

    Each threaded contender first runs once on a few dates, untimed: imports, first calls,
    thread pools and loading compiled kernels happen once per process, not per date, and are no
    throughput (the first spoc-xr annotate in a fresh process spends about 2 s on them).
    """
    if warm_up is not None:
        warm_up()
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def mpix_dates(path: Path, n_dates: int) -> float:
    """Mega-pixel·dates of the first ``n_dates`` dates of a stack store."""
    shape = zarr.open_array(path / "stack", mode="r").shape
    return shape[2] * shape[3] * n_dates / MB


# ---------------------------------------------------------------------------------------------
# The four contenders


def _touch(block: np.ndarray) -> np.ndarray:
    return block[:1, :1, :1, :1]


def read_only(path: Path, n_dates: int) -> None:
    """Read (decompress) every chunk of the first ``n_dates`` dates, as annotate opens them."""
    stack = open_stack(path).isel(time=slice(0, n_dates)).data
    touched = stack.map_blocks(_touch, chunks=(1, 1, 1, 1), dtype=stack.dtype)
    touched.sum().compute()


def spoc_annotate(path: Path, out: Path, n_dates: int) -> None:
    """``annotate`` + ``write_dataset`` of the full output, as ``spoc-xr annotate`` runs it.

    The overview comes from the store (ingest writes it in the same pass as the stack).
    """
    stack = open_stack(path).isel(time=slice(0, n_dates))
    write_dataset(annotate(stack, overview=read_overview(path, stack)), out, overwrite=True)


def spoc_annotate_store(path: Path, out: Path, n_dates: int) -> None:
    """``annotate_store``: what ``spoc-xr annotate STACK OUT`` runs for local paths.

    Dates are written batch by batch (each batch one compute, recorded as done) and the heatmap is
    summed from the stored masks at the end.
    """
    stack = open_stack(path).isel(time=slice(0, n_dates))
    annotate_store(stack, out, source=path, overview=read_overview(path, stack))


def dask_image_composition(path: Path, out: Path, n_dates: int, *, kernel: int = 5) -> None:
    """The textbook chain from dask-image functions, one Dask layer per operation.

    k×k median of every date and of the reference (the first date), largest band difference,
    fixed threshold, k×k binary opening, small = changed and not opened, heatmap = sum over time;
    the mask cube (1 small, 2 large) and the heatmap are written to Zarr.
    """
    from dask_image import ndfilters, ndmorph

    stack = open_stack(path).isel(time=slice(0, n_dates))
    data = stack.data
    median = ndfilters.median_filter(data, size=(1, 1, kernel, kernel), mode="nearest")
    reference = ndfilters.median_filter(data[0], size=(1, kernel, kernel), mode="nearest")
    difference = abs(median.astype(np.float32) - reference.astype(np.float32)[None]).max(axis=1)
    changed = difference > BASELINE_THRESHOLD
    opened = ndmorph.binary_opening(changed, structure=np.ones((1, kernel, kernel), dtype=bool))
    small = changed & ~opened
    mask = small.astype(np.uint8) + 2 * opened.astype(np.uint8)
    result = xr.Dataset(
        {
            "mask": (("time", "y", "x"), mask),
            "heatmap": (("y", "x"), small.sum(axis=0, dtype=np.uint16)),
        }
    )
    result.to_zarr(out, mode="w", zarr_format=3, consolidated=False)


def numpy_loop(path: Path, out: Path, n_dates: int, *, kernel: int = 5) -> None:
    """The same steps with numpy/scipy, date by date, plus connected components per date."""
    source = zarr.open_array(path / "stack", mode="r")
    _, n_band, height, width = source.shape
    reference = np.asarray(source[0], dtype=np.float32)
    reference = np.stack([ndi.median_filter(reference[b], size=kernel) for b in range(n_band)])
    shutil.rmtree(out, ignore_errors=True)
    chunk = min(CHUNK, height), min(CHUNK, width)
    masks = zarr.create_array(
        out, shape=(n_dates, height, width), chunks=(1, *chunk), dtype=np.uint8, zarr_format=3
    )
    heat = np.zeros((height, width), dtype=np.uint16)
    structure = np.ones((kernel, kernel), dtype=bool)
    for t in range(n_dates):
        date = np.asarray(source[t])
        median = np.stack([ndi.median_filter(date[b], size=kernel) for b in range(n_band)])
        changed = np.abs(median.astype(np.float32) - reference).max(axis=0) > BASELINE_THRESHOLD
        opened = ndi.binary_opening(changed, structure=structure)
        small = changed & ~opened
        ndi.label(small, structure=np.ones((3, 3)))
        heat += small
        masks[t] = small.astype(np.uint8) + 2 * opened.astype(np.uint8)
    zarr.create_array(out.with_suffix(".heatmap.zarr"), data=heat, zarr_format=3, overwrite=True)


# ---------------------------------------------------------------------------------------------
# Value-for-value check against the scipy implementation


class _ScipyKernels:
    """scipy.ndimage stand-ins, with the kernels' contract: edge replication, last two axes."""

    @staticmethod
    def _size(image: np.ndarray, size: int) -> tuple[int, ...]:
        return (1,) * (image.ndim - 2) + (size, size)

    def median_filter(self, image: np.ndarray, size: int) -> np.ndarray:
        return ndi.median_filter(image, self._size(image, size), mode="nearest")

    def minimum_filter(self, image: np.ndarray, size: int) -> np.ndarray:
        return ndi.minimum_filter(image, self._size(image, size), mode="nearest")

    def maximum_filter(self, image: np.ndarray, size: int) -> np.ndarray:
        return ndi.maximum_filter(image, self._size(image, size), mode="nearest")

    def binary_erosion(self, mask: np.ndarray, size: int) -> np.ndarray:
        return self.minimum_filter(mask.astype(bool), size)

    def binary_dilation(self, mask: np.ndarray, size: int) -> np.ndarray:
        return self.maximum_filter(mask.astype(bool), size)

    def binary_opening(self, mask: np.ndarray, size: int) -> np.ndarray:
        return self.binary_dilation(self.binary_erosion(mask, size), size)

    def binary_closing(self, mask: np.ndarray, size: int) -> np.ndarray:
        return self.binary_erosion(self.binary_dilation(mask, size), size)

    def label(self, mask: np.ndarray, *, connectivity: int = 8) -> tuple[np.ndarray, int]:
        structure = np.ones((3, 3)) if connectivity == 8 else None
        labels, count = ndi.label(mask, structure=structure)
        return labels.astype(np.int32), int(count)

    def components(
        self, mask: np.ndarray, *, connectivity: int = 8
    ) -> tuple[np.ndarray, int, np.ndarray]:
        labels, count = self.label(mask, connectivity=connectivity)
        extents = [0] + [
            max(side.stop - side.start for side in box) for box in ndi.find_objects(labels)
        ]
        return labels, count, np.asarray(extents, dtype=np.int32)


@contextlib.contextmanager
def scipy_kernels() -> Iterator[None]:
    """Swap every OpenCV-backed kernel of :mod:`spoc_xr.kernels` for scipy, then restore."""
    names = (
        "median_filter",
        "minimum_filter",
        "maximum_filter",
        "binary_erosion",
        "binary_dilation",
        "binary_opening",
        "binary_closing",
        "label",
        "components",
    )
    saved = {name: getattr(kernels, name) for name in names}
    stand_in = _ScipyKernels()
    try:
        for name in names:
            setattr(kernels, name, getattr(stand_in, name))
        yield
    finally:
        for name, function in saved.items():
            setattr(kernels, name, function)


def _window(
    array: np.ndarray | xr.DataArray, rows: slice, cols: slice, depth: int, edge: int = 0
) -> np.ndarray:
    """``array[..., rows ± depth, cols ± depth]``, reaching at most ``edge`` beyond the image
    (edge-replicated there), as annotate's tile windows do (:func:`spoc_xr.detect.window_span`)."""
    height, width = array.shape[-2:]
    y0, y1 = window_span(rows.start, rows.stop, depth, height, edge)
    x0, x1 = window_span(cols.start, cols.stop, depth, width, edge)
    inner = np.asarray(array[..., max(y0, 0) : min(y1, height), max(x0, 0) : min(x1, width)])
    pad = [(0, 0)] * (inner.ndim - 2) + [
        (max(0, -y0), max(0, y1 - height)),
        (max(0, -x0), max(0, x1 - width)),
    ]
    return np.pad(inner, pad, mode="edge")


def check_identical(
    path: Path, annotations: Path, n_dates: int, *, dates: list[int], window: int = 256
) -> tuple[int, int]:
    """Compare annotate's stored codes with the scipy implementation on one tile of ``dates``.

    The tile (``window`` px a side) straddles the corner where four stack chunks meet, so the
    chunk seams are part of the check. Reference products and the fused chain are recomputed
    with every kernel swapped for scipy (``mode="nearest"`` on the whole image, which the
    overlapping tiles must reproduce exactly).

    Returns
    -------
    tuple of int
        Pixels compared and pixels that differ.
    """
    stack = open_stack(path).isel(time=slice(0, n_dates))
    height, width = stack.sizes["y"], stack.sizes["x"]
    cy, cx = min(CHUNK, height // 2), min(CHUNK, width // 2)
    half = window // 2
    rows = slice(max(0, cy - half), min(height, cy + half))
    cols = slice(max(0, cx - half), min(width, cx + half))
    stored = xr.open_zarr(annotations, consolidated=False, zarr_format=3)
    with scipy_kernels(), dask.config.set(scheduler="threads"):
        stack, radiometry, params = plan_annotation(stack)
        # The reference and noise model exactly as annotate builds them.
        built = build_annotations(stack, radiometry, params)
        products = reference_products(built["reference"], built["spread"], params)
        depth = params.depth
        # Only the chunks the window needs are computed (products are exact per tile).
        local = {
            name: _window(products[name].transpose("band", "y", "x").data, rows, cols, depth)
            for name in ("low", "high", "noise")
        }
        local["scale"] = _window(products["scale"].transpose("y", "x").data, rows, cols, depth)
        # Shifted dates take their range from the reference, one pixel further out.
        radius = params.tolerance // 2
        local["reference"] = _window(
            products["reference"].transpose("band", "y", "x").data,
            rows,
            cols,
            depth + radius,
            edge=radius,
        )
        # Where the window starts in the image (clipped at its edges), and the tile in it.
        top = window_span(rows.start, rows.stop, depth, height, 0)[0]
        left = window_span(cols.start, cols.stop, depth, width, 0)[0]
        core = (
            slice(rows.start - top, rows.stop - top),
            slice(cols.start - left, cols.stop - left),
        )
        shifts = date_shifts(stack, built["reference"], radiometry).compute()
        # The water mask the annotation used (sea clutter is dropped on it), None without an index.
        water = None
        if stored["water"].attrs.get("index", "none") != "none":
            water = _window(stored["water"].values.astype(bool), rows, cols, depth)
        compared = differing = 0
        levels = per_date_levels(radiometry.brightness, stack.sizes["time"])
        band_names = [str(band) for band in stack.band.values]
        for t in dates:
            date = _window(stack.data[t], rows, cols, depth)
            codes = classify_tile(
                date,
                local["low"],
                local["high"],
                local["noise"],
                radiometry.gains[t].astype(np.float32),
                radiometry.offsets[t].astype(np.float32),
                nodata=stack.attrs.get("nodata"),
                params=params,
                origin=(top, left),
                scale=local["scale"],
                levels=levels[t],
                **band_roles(band_names),
                reference=local["reference"],
                shift=shifts[t],
                water=water,
                ceilings=clipping_ceilings(radiometry),
            )[core]
            mask = stored["mask"][t, rows, cols].values
            valid = stored["valid"][t, rows, cols].values
            written = np.where(valid == 1, mask, 255).astype(np.uint8)
            compared += codes.size
            differing += int(np.count_nonzero(codes != written))
    return compared, differing


# ---------------------------------------------------------------------------------------------
# The run


def machine() -> str:
    """CPU model, cores and memory of this machine."""
    model = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name"):
                model = line.split(":", 1)[1].strip()
    import psutil

    memory = psutil.virtual_memory().total / 2**30
    return f"{model}, {os.cpu_count()} cores, {memory:.0f} GiB RAM, Python {sys.version.split()[0]}"


def print_table(rows: list[Measure]) -> None:
    """Print the measures as a Markdown table."""
    print("| what | scheduler | Mpix·dates | seconds | Mpix·date/s | peak MB/worker | note |")
    print("|---|---|---:|---:|---:|---:|---|")
    for row in rows:
        peak = "" if row.peak_worker_mb is None else f"{row.peak_worker_mb:,.0f}"
        print(
            f"| {row.what} | {row.scheduler} | {row.mpix_dates:,.1f} | {row.seconds:.1f} | "
            f"{row.rate:.1f} | {peak} | {row.note} |"
        )


def cluster_run(
    rows: list[Measure],
    what: str,
    function: Callable[[], object],
    work: float,
    *,
    n_workers: int,
    memory_limit: str | None,
    note: str = "",
    log_level: str = "error",
    progress: Callable[[float, dict[str, float]], None] | None = None,
    warm_up: Callable[[], object] | None = None,
) -> Pressure:
    """Time ``function`` on a fresh LocalCluster, appending its row; returns its memory record.

    ``warm_up`` runs first, untimed and before memory is sampled, on the same workers: as for
    the threaded rows (:func:`timed`), imports and loading compiled kernels happen once per
    worker process, not per date.
    """
    with local_cluster(n_workers, memory_limit, log_level=log_level) as client:
        if warm_up is not None:
            warm_up()
        with PeakMemory(client, progress=progress) as peaks:
            seconds = timed(function)
        pressure = pressure_of(client, peaks, memory_limit)
    scheduler = f"LocalCluster {n_workers}×1" + (f", {memory_limit}" if memory_limit else "")
    rows.append(Measure(what, scheduler, seconds, work, pressure.peak_worker_mb, note))
    return pressure


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Build the stack and run every measurement; print the table and the ratios."""
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    n_dates, size = args.dates, args.size
    print(f"machine: {machine()}")
    print(
        f"stack: {2 * n_dates} dates x {args.bands} bands x {size} x {size} uint16 "
        f"({2 * n_dates * args.bands * size * size * 2 / 1e9:.2f} GB raw), chunks (1, "
        f"{args.bands}, {min(CHUNK, size)}, {min(CHUNK, size)}); the first {n_dates} dates are "
        "the main input, all of them the 2x-dates row"
    )
    start = time.perf_counter()
    path = build_stack(
        workdir / f"stack_{size}_{2 * n_dates}_{args.bands}.zarr",
        size=size,
        n_dates=2 * n_dates,
        n_bands=args.bands,
    )
    print(f"stack ready in {time.perf_counter() - start:.0f} s: {path}")
    out = workdir / "annotations.zarr"
    work = mpix_dates(path, n_dates)
    rows: list[Measure] = []
    limit = args.memory_limit

    # Warm the page cache so that every contender reads the same (warm) store.
    read_only(path, 2 * n_dates)
    rows.append(Measure("read only", "threads", timed(lambda: read_only(path, n_dates)), work))
    cluster_run(
        rows,
        "read only",
        lambda: read_only(path, n_dates),
        work,
        n_workers=2,
        memory_limit=limit,
        warm_up=lambda: read_only(path, 1),
    )

    def warm_annotate() -> None:
        spoc_annotate(path, out, min(ANNOTATE_WARM_UP_DATES, n_dates))

    seconds = timed(lambda: spoc_annotate(path, out, n_dates), warm_up=warm_annotate)
    rows.append(Measure("spoc-xr annotate", "threads", seconds, work))
    identical = check_identical(path, out, n_dates, dates=[1, n_dates - 1])
    pressures = {}
    for workers in (1, 2):
        pressures[workers] = cluster_run(
            rows,
            "spoc-xr annotate",
            lambda: spoc_annotate(path, out, n_dates),
            work,
            n_workers=workers,
            memory_limit=limit,
            warm_up=warm_annotate,
        )
    pressures[0] = cluster_run(
        rows,
        "spoc-xr annotate, 2x dates",
        lambda: spoc_annotate(path, out, 2 * n_dates),
        2 * work,
        n_workers=2,
        memory_limit=limit,
        warm_up=warm_annotate,
    )
    subset = min(args.baseline_dates, n_dates)
    sub_work = mpix_dates(path, subset)
    note = f"{subset} of {n_dates} dates"

    def dask_image_run() -> None:
        dask_image_composition(path, workdir / "dask_image.zarr", subset)

    def warm_dask_image() -> None:
        dask_image_composition(path, workdir / "dask_image.zarr", 1)

    seconds = timed(dask_image_run, warm_up=warm_dask_image)
    rows.append(Measure("dask-image composition", "threads", seconds, sub_work, note=note))
    cluster_run(
        rows,
        "dask-image composition",
        dask_image_run,
        sub_work,
        n_workers=2,
        memory_limit=limit,
        note=note,
        warm_up=warm_dask_image,
    )
    seconds = timed(
        lambda: numpy_loop(path, workdir / "numpy_loop.zarr", subset),
        warm_up=lambda: numpy_loop(path, workdir / "numpy_loop.zarr", 1),
    )
    rows.append(Measure("numpy/scipy loop", "1 thread", seconds, sub_work, note=note))
    print()
    print_table(rows)
    return summarise(rows, identical, pressures)


def _best(rows: list[Measure], what: str, scheduler: str | None = None) -> float:
    rates = [
        r.rate for r in rows if r.what == what and (scheduler is None or scheduler in r.scheduler)
    ]
    return max(rates, default=float("nan"))


def summarise(
    rows: list[Measure], identical: tuple[int, int], pressures: dict[int, Pressure]
) -> dict[str, Any]:
    """Print the ratios against the issue's targets; return them."""
    ratios = {}
    annotate_rate = _best(rows, "spoc-xr annotate")
    for label, what, target in (
        ("annotate / read only", "read only", 0.5),
        ("annotate / dask-image composition", "dask-image composition", 20.0),
        ("annotate / numpy loop", "numpy/scipy loop", 30.0),
    ):
        ratios[label] = annotate_rate / _best(rows, what)
        verdict = "meets" if ratios[label] >= target else "MISSES"
        print(f"{label}: {ratios[label]:.2f} (target >= {target:g}: {verdict})")
    print("(best rate of each contender over its schedulers; rates are per Mpix·date)")
    one, two = _best(rows, "spoc-xr annotate", "1×1"), _best(rows, "spoc-xr annotate", "2×1")
    print(f"annotate scaling 1 -> 2 workers: {two / one:.2f}x")
    print(
        f"peak memory per worker, annotate (2 workers): {pressures[2].peak_worker_mb:,.0f} MB at "
        f"N dates, {pressures[0].peak_worker_mb:,.0f} MB at 2N dates; spill events "
        f"{pressures[2].spill_events} / {pressures[0].spill_events}"
    )
    compared, differing = identical
    print(
        f"identical to the scipy implementation: {differing} of {compared:,} pixels differ "
        f"({'identical' if differing == 0 else 'DIFFERENT'})"
    )
    return {"ratios": ratios, "identical": identical, "rows": rows}


def chunks_written(store: Path, variable: str = "valid") -> int:
    """Chunk files of ``variable`` already written in a Zarr v3 store (progress of a run).

    Zarr skips chunks that hold only the fill value, so this counts ``valid`` (1 wherever a
    pixel has data), not ``mask`` (all 0 on a date without detections).
    """
    root = store / variable / "c"
    return sum(len(files) for _, _, files in os.walk(root)) if root.exists() else 0


def timeline_slices(
    timeline: list[tuple[float, float]], n_slices: int = TIMELINE_SLICES, *, scale: float = MB
) -> list[float]:
    """Highest value / ``scale`` in each of ``n_slices`` equal slices of a sampled run.

    With the default ``scale``: the peak memory (MB) of the highest worker in each slice. For a
    cumulative count (spill writes), differences of consecutive slices are events per slice.
    """
    if not timeline:
        return []
    end = timeline[-1][0] or 1.0
    peaks = [0.0] * n_slices
    for elapsed, value in timeline:
        index = min(int(elapsed / end * n_slices), n_slices - 1)
        peaks[index] = max(peaks[index], value / scale)
    return peaks


def events_per_slice(
    cumulative: list[tuple[float, float]], n_slices: int = TIMELINE_SLICES
) -> list[int]:
    """Events in each of ``n_slices`` equal slices of a run, from a sampled cumulative count."""
    highest = timeline_slices(cumulative, n_slices, scale=1.0)
    counts: list[int] = []
    running = previous = 0.0
    for value in highest:
        running = max(running, value)  # a slice without samples holds the count before it
        counts.append(int(running - previous))
        previous = running
    return counts


def larger_than_memory(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Annotate a stack larger than the workers' memory on 2 workers with a memory limit.

    Prints a progress line every ``PROGRESS_EVERY_S`` seconds (date tiles written, each worker's
    RSS), then the row, the peak worker memory against the limit, the peak in each tenth of the
    run (flat: memory does not grow with the dates done), spill events, paused samples and the
    workers' memory warnings.
    """
    size, bands = args.size, args.bands
    per_date = size * size * bands * 2
    n_dates = math.ceil(args.ltm_gb * 1e9 / per_date)
    print(f"machine: {machine()}")
    print(
        f"larger than memory: {n_dates} dates x {bands} x {size} x {size} uint16 = "
        f"{n_dates * per_date / 1e9:.1f} GB raw, LocalCluster 2 workers x {args.memory_limit}",
        flush=True,
    )
    start = time.perf_counter()
    path = build_stack(
        workdir / f"stack_ltm_{size}_{n_dates}_{bands}.zarr",
        size=size,
        n_dates=n_dates,
        n_bands=bands,
    )
    on_disk = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    print(
        f"stack ready in {time.perf_counter() - start:.0f} s ({on_disk / 1e9:.1f} GB on disk)",
        flush=True,
    )
    out = workdir / "annotations_ltm.zarr"
    shutil.rmtree(out, ignore_errors=True)
    tiles_per_date = math.ceil(size / CHUNK) ** 2
    total = n_dates * tiles_per_date

    def progress(elapsed: float, rss: dict[str, float]) -> None:
        memory = ", ".join(f"{value / MB:,.0f}" for value in rss.values())
        print(
            f"  {elapsed:6.0f} s: {chunks_written(out)} of {total} date tiles written; "
            f"worker RSS {memory} MB",
            flush=True,
        )

    failure: list[BaseException] = []

    def run() -> None:
        # A failure (a worker killed for memory) is reported with the memory record, not raised.
        try:
            if args.ltm_writer == "store":
                spoc_annotate_store(path, out, n_dates)
            else:
                spoc_annotate(path, out, n_dates)
        except Exception as err:
            failure.append(err)

    rows: list[Measure] = []
    work = mpix_dates(path, n_dates)
    pressure = cluster_run(
        rows,
        f"spoc-xr annotate (larger than memory, {args.ltm_writer} writer)",
        run,
        work,
        n_workers=2,
        memory_limit=args.memory_limit,
        log_level="warning",
        progress=progress,
    )
    print_table(rows)
    under = pressure.limit_mb is None or pressure.peak_worker_mb < pressure.limit_mb
    outcome = f"FAILED: {failure[0]!r}" if failure else "completed"
    print(
        f"{outcome} ({chunks_written(out)} of {total} date tiles); peak worker memory "
        f"{pressure.peak_worker_mb:,.0f} MB of {pressure.limit_mb or 0:,.0f} MB "
        f"({'under' if under else 'OVER'} the limit); spill events {pressure.spill_events} "
        f"({pressure.spilled_mb:,.0f} MB); samples with a paused worker "
        f"{pressure.paused_samples}; memory-pressure log lines {len(pressure.log_lines)}"
    )
    slices = ", ".join(f"{peak:,.0f}" for peak in timeline_slices(pressure.timeline))
    print(f"peak worker MB in each tenth of the run: {slices}")
    spills = ", ".join(str(count) for count in events_per_slice(pressure.spill_timeline))
    print(f"spill writes in each tenth of the run: {spills}")
    held = ", ".join(f"{group} {size / MB:,.0f} MB" for group, size in pressure.held_at_peak)
    print(f"held in the worker's memory store at the peak: {held or 'nothing'}")
    for line in pressure.log_lines[:5]:
        print(f"  {line}")
    if not args.keep:
        shutil.rmtree(path, ignore_errors=True)
    return {"rows": rows, "pressure": pressure, "failure": failure}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (``--quick`` shrinks the defaults it is not told otherwise)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, help="image side in px (default 2048; quick 1024)")
    parser.add_argument("--dates", type=int, help="dates of the main input (default 40; quick 8)")
    parser.add_argument("--bands", type=int, default=4)
    parser.add_argument(
        "--baseline-dates", type=int, help="dates for dask-image/numpy (4; quick 2)"
    )
    parser.add_argument("--workdir", default="/tmp/spoc_bench")
    parser.add_argument("--memory-limit", default="2GB", help="per LocalCluster worker")
    parser.add_argument("--quick", action="store_true", help="small sizes: under two minutes")
    parser.add_argument(
        "--larger-than-memory",
        action="store_true",
        help="only annotate a stack of --ltm-gb GB on 2 workers x --memory-limit",
    )
    parser.add_argument("--ltm-gb", type=float, default=12.0, help="larger-than-memory stack, GB")
    parser.add_argument(
        "--ltm-writer",
        choices=("store", "dataset"),
        default="store",
        help="larger-than-memory run through annotate_store (the CLI's batched, resumable writer) "
        "or annotate + write_dataset (one graph)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the larger-than-memory stack")
    args = parser.parse_args(argv)
    defaults = (
        {"size": 1024, "dates": 8, "baseline_dates": 2}
        if args.quick
        else {
            "size": 2048,
            "dates": 40,
            "baseline_dates": 4,
        }
    )
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``python benchmarks/run.py``."""
    args = parse_args(argv)
    if args.larger_than_memory:
        workdir = Path(args.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        larger_than_memory(args, workdir)
    else:
        run_benchmark(args)


if __name__ == "__main__":
    main()
