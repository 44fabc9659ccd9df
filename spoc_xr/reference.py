"""Choosing or building the clean reference image, and the per-date radiometry relative to it.

Global statistics (which date is cleanest, each date's gain and offset) come from an *overview*: the
stack subsampled on a fixed pixel grid (every ``stride``-th pixel), small enough to hold in memory
(``OVERVIEW_SIDE``² pixels per date and band). The grid depends only on the image shape, never on
the chunking, so chunked and unchunked runs see the same statistics.

The full-resolution reference is lazy: a single date (``auto`` or a date string) or a per-pixel
temporal median of the radiometrically normalised dates (``median``).
"""

from __future__ import annotations

import datetime
import functools
import itertools
import math
import os
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import dask
import dask.array as da
import numpy as np
import pandas as pd
import scipy.ndimage as ndi
import scipy.special
import xarray as xr
from dask.base import tokenize
from dask.highlevelgraph import HighLevelGraph

from spoc_xr.compiled import compiled
from spoc_xr.errors import NoDataError, ParameterError

# An overview of 256 x 256 pixels per date holds ~65k samples: plenty for a robust gain/offset
# fit and small enough (4 bands x 100 dates x 256 kB) to keep in the driver's memory.
OVERVIEW_SIDE = 256
# A residual above this many robust standard deviations marks a pixel as changed (cloud, boat).
OUTLIER_SIGMA = 4.0
# Dates whose valid fraction is below this share of the best date's are never picked as reference.
MIN_VALID_SHARE = 0.95
# Histogram of log illumination ratios: +-1.5 covers a factor 4.5 either way, in 0.005 steps.
RATIO_RANGE = 1.5
RATIO_BINS = 600
RATIO_SMOOTHING_BINS = 3.0
# Pixels within this log-ratio distance of the mode (about +-10 %) count as unchanged.
RATIO_INLIER_WIDTH = 0.1
# Illumination and atmosphere change reflectance by well under a factor 1.5 between dates of
# one place; a larger apparent gain means the scene itself changed (overcast, snow) ...
MAX_LOG_GAIN = float(np.log(1.5))
# ... unless every band tells the same larger gain: in each band at least ILLUMINATION_SHARE of
# the pixels lie within RATIO_INLIER_WIDTH of the band's mode, and every band's mode within a
# factor ILLUMINATION_AGREEMENT of the bands' median mode. Then the date is lit differently
# (a low sun, radiance or raw counts, a reference picked on a bright date), and its gains follow
# up to the histogram's range. Cloud, haze or snow adds light, so its ratio to the ground spreads
# with the ground's brightness and differs between bands. Measured: a demo stack (seed 3) whose
# reference is its brightest date held 7 of 16 dates at 1.5 (their modes 1.35-1.74, every band's
# share 0.37-0.60, within 1.23 of their median); of the real Landsat stack's 61 dates held there
# (clouds, snow), none has every share above 0.25 with modes within 1.36 of each other.
# The ratio must hold over a scene with texture: the pixels near the mode must span a factor
# exp(ILLUMINATION_TEXTURE) between the quartiles of the target's values in some band (a flat
# scene under a flat veil of cloud has one ratio too; blue is often flat where NIR is not).
ILLUMINATION_SHARE = 0.35
ILLUMINATION_AGREEMENT = float(np.log(1.25))
ILLUMINATION_TEXTURE = 2 * RATIO_INLIER_WIDTH
# Robust fits need a minimum of clean samples; below it a date keeps gain 1 and offset 0.
MIN_FIT_SAMPLES = 64
# MAD -> standard deviation for Gaussian noise.
MAD_TO_SIGMA = 1.4826
#: The spread of a difference of two values each rounded to a whole number (two uniform
#: rounding errors of variance 1/12): on integer data whose noise is below 1 DN (8-bit imagery of
#: a calm scene) the values flicker by 1 DN between dates, the spread measured is about 0, and
#: every flicker (more so once normalised by gains near 1) would be many noise scales. Residual
#: scales and the noise model are held at least this high (in DN, times the band's gain).
QUANTISATION_SIGMA = float(1 / np.sqrt(6))
# The least number of clean dates whose median may clean the reference date.
MIN_CLEANING_DATES = 3
# Memory per spatial block when all dates of a block are needed at once (temporal median).
MEDIAN_BLOCK_BYTES = 64 * 2**20


@dataclass(frozen=True)
class Radiometry:
    """Per-date statistics that the detection needs, computed from the overview.

    Attributes
    ----------
    reference : str
        How the reference was built: ``"date"`` or ``"median"``.
    reference_index : int or None
        Index of the reference date (``None`` for a median reference).
    gains, offsets : numpy.ndarray
        ``(time, band)`` float64: ``gain * date + offset`` matches the reference radiometry.
    valid_fraction : numpy.ndarray
        ``(time,)`` share of valid pixels per date in the overview.
    change_fraction : numpy.ndarray
        ``(time,)`` share of valid overview pixels that differ from the temporal composite
        (clouds, objects): the cleanliness score used by ``auto``.
    brightness : numpy.ndarray or None
        ``(time, 2)`` dark and bright levels of each normalised date (:func:`brightness_levels`),
        NaN where unknown: how bright the date's clouds are, for the thin haze test.
    water_threshold : float
        Water index value above which a pixel is water, fitted on the overview's composite
        (:func:`spoc_xr.products.water_threshold`; set by the pipeline).
    water_mapping : tuple of numpy.ndarray or None
        ``(gain, offset)`` per band that map a reference date onto the overview's temporal
        median, where the water index is read (``None`` for a median reference, which is in that
        radiometry already).
    median_dates : tuple of int or None
        The dates a median reference is the median of (:attr:`CompositeFit.from_dates`);
        ``None`` for all of them.
    choice : str
        Why ``auto`` chose its date (empty for a reference the user named); ``notes`` hold
        what the user should be warned of.
    saturation : numpy.ndarray or None
        ``(band,)`` float32, the value at which each band clipped (:func:`saturation_levels`),
        +inf where it did not: the ``ceilings`` the fits left out.
    """

    reference: str
    reference_index: int | None
    gains: np.ndarray
    offsets: np.ndarray
    valid_fraction: np.ndarray
    change_fraction: np.ndarray
    notes: list[str] = field(default_factory=list)
    residual_scale: np.ndarray | None = None
    brightness: np.ndarray | None = None
    water_threshold: float = 0.0
    water_mapping: tuple[np.ndarray, np.ndarray] | None = None
    median_dates: tuple[int, ...] | None = None
    choice: str = ""
    saturation: np.ndarray | None = None


#: A band clipped (saturated) where at least this share of its valid overview pixels, and at
#: least SATURATION_MIN_PIXELS, hold exactly its largest value: 8-bit true-colour products
#: (Sentinel-2's TCI clips at reflectance 0.2-0.3) saturate on roofs, sand and clouds; values
#: that were measured reach their largest value at a handful of pixels.
SATURATION_SHARE = 0.0005
SATURATION_MIN_PIXELS = 16


def saturation_levels(overview: np.ndarray) -> np.ndarray:
    """The value at which each band of a stack clipped, from its overview: ``(band,)`` float32,
    +inf for a band that did not (see ``SATURATION_SHARE``).

    A clipped pixel only says that the truth was at least the ceiling: detection reads no fall
    from a date where it is clipped, nor a rise where the reference is (a probe: an 8-bit
    true-colour stack of a port with 1-3 % of its pixels clipped, boat precision 0.40).

    Examples
    --------
    >>> view = np.full((2, 2, 8, 8), 100.0)
    >>> view[:, 0, :4] = 255.0  # band 0 clipped on half the image
    >>> view[0, 1, 0, 0] = 200.0  # band 1's largest value at one pixel
    >>> saturation_levels(view).tolist()
    [255.0, inf]
    """
    n_band = overview.shape[1]
    levels = np.full(n_band, np.inf, dtype=np.float32)
    for band in range(n_band):
        values = np.asarray(overview[:, band], dtype=np.float32)
        values = values[np.isfinite(values)]
        if values.size == 0:
            continue
        top = values.max()
        at_top = np.count_nonzero(values == top)
        if at_top >= max(SATURATION_MIN_PIXELS, SATURATION_SHARE * values.size):
            levels[band] = top
    return levels


def reference_ceilings(radiometry: Radiometry) -> np.ndarray:
    """Where the reference ``(band,)`` may hold clipped values, in its own (normalised) units:
    the lowest value that any date's ceiling maps to (a median reference is made of every date,
    and a date reference is cleaned of its objects with other dates' values: a probe's date
    reference held clipped values of other dates at 0.93 of the ceiling). +inf for bands that
    never clip."""
    saturation = radiometry.saturation
    n_band = radiometry.gains.shape[1]
    if saturation is None:
        return np.full(n_band, np.inf, dtype=np.float32)
    clipped = np.isfinite(saturation)
    level = np.where(clipped, saturation, 0).astype(np.float64)
    mapped = (radiometry.gains * level + radiometry.offsets).min(axis=0)
    # float32 arithmetic of the normalisation may land a hair below the float64 product.
    ceilings = mapped - np.abs(mapped) * 1e-5
    return np.where(clipped, ceilings, np.inf).astype(np.float32)


def overview_stride(shape: tuple[int, int], side: int = OVERVIEW_SIDE) -> int:
    """Return the subsampling step so that the overview is at most ``side`` pixels a side."""
    return max(1, math.ceil(max(shape) / side))


def valid_pixels(stack: xr.DataArray) -> xr.DataArray:
    """Lazy boolean array: pixel is finite and not the stack's nodata value, in every band.

    Parameters
    ----------
    stack : xarray.DataArray
        ``(..., band, y, x)`` raw values with an optional ``nodata`` attribute.
    """
    data = stack
    ok = xr.ones_like(data, dtype=bool)
    nodata = stack.attrs.get("nodata")
    if nodata is not None and not (isinstance(nodata, float) and math.isnan(nodata)):
        ok = ok & (data != nodata)
    if np.issubdtype(stack.dtype, np.floating):
        ok = ok & np.isfinite(data)
    return ok.all("band")


def to_float(stack: xr.DataArray) -> xr.DataArray:
    """Cast to float32 with invalid pixels (nodata, non-finite) set to NaN, lazily."""
    valid = valid_pixels(stack)
    return stack.astype(np.float32).where(valid)


#: Name of the overview variable in a stack store, and of its grid's dimensions.
OVERVIEW_NAME = "overview"
OVERVIEW_DIMS = ("time", "band", "overview_y", "overview_x")


def overview_of(stack: xr.DataArray, side: int = OVERVIEW_SIDE) -> xr.DataArray:
    """Lazy overview ``(time, band, overview_y, overview_x)`` float32, NaN where invalid.

    Every ``stride``-th pixel of the stack (see :func:`overview_stride`), one chunk per date: what
    :func:`compute_overview` reads, in the form ingest stores next to the stack.
    """
    stride = overview_stride((stack.sizes["y"], stack.sizes["x"]), side)
    sub = to_float(stack.isel(y=slice(None, None, stride), x=slice(None, None, stride)))
    sub = sub.transpose("time", "band", "y", "x").rename({"y": "overview_y", "x": "overview_x"})
    if sub.chunks is not None:
        sub = sub.chunk({"time": 1, "band": -1, "overview_y": -1, "overview_x": -1})
    sub = sub.drop_vars([name for name in sub.coords if name not in ("time", "band")])
    sub.attrs = {"long_name": "every stride-th pixel of the stack, NaN where invalid"}
    sub.attrs["stride"] = stride
    return sub.rename(OVERVIEW_NAME)


def compute_overview(stack: xr.DataArray, side: int = OVERVIEW_SIDE) -> np.ndarray:
    """Read the overview ``(time, band, h, w)`` float32 with NaN for invalid pixels.

    This reads every chunk of the stack once (Zarr decompresses whole chunks); stores written by
    ``spoc-xr ingest`` carry it precomputed (see :func:`spoc_xr.ingest.read_overview`).
    """
    sub = overview_of(stack, side)
    if sub.chunks is None:
        return np.asarray(sub.values, dtype=np.float32)
    # One result per date, gathered by the client one by one: a single concatenated result would
    # be assembled on one worker and grow with the number of dates.
    dates = dask.compute(*(sub.data[t] for t in range(sub.sizes["time"])))
    return np.stack([np.asarray(d, dtype=np.float32) for d in dates])


def robust_linear_fit(
    source: np.ndarray,
    target: np.ndarray,
    ceiling: float = np.inf,
    max_log_gain: float = MAX_LOG_GAIN,
) -> tuple[float, float]:
    """Fit ``target ≈ gain * source + offset`` on the pixels that did not change.

    Clouds can cover most of a date, so neither least squares nor a median ratio is safe. The
    unchanged pixels share one illumination ratio, so they form the *mode* of the histogram of
    ``log(target / source)``, however many pixels changed (clouds and shadows spread over a wide
    range of ratios). Gain and offset are then fitted by least squares on the pixels near that
    mode only. Pairs with a value at or above ``ceiling`` (where the band clipped, see
    :func:`saturation_levels`) are left out: clipped on both sides they put a mode at ratio 1
    whatever the illumination. Gains stay within ``max_log_gain`` (see ``MAX_LOG_GAIN``).
    Returns (1, 0) when too few pixels are usable.
    """
    pairs = _log_ratio_mode(source, target, ceiling)
    if pairs is None:
        return 1.0, 0.0
    x, y, log_ratio, mode = pairs
    if abs(mode) > max_log_gain:
        # A whole-scene change (overcast, snow) is no illumination change: mapping it onto the
        # reference would hide it. Keep the largest plausible gain and no offset.
        return float(np.exp(np.clip(mode, -max_log_gain, max_log_gain))), 0.0
    return _line_near_mode(mode, *_pairs_near(x, y, log_ratio, mode), max_log_gain)


def _pairs_near(
    x: np.ndarray, y: np.ndarray, log_ratio: np.ndarray, mode: float
) -> tuple[np.ndarray, np.ndarray]:
    """The pairs whose log ratio lies within ``RATIO_INLIER_WIDTH`` of ``mode``."""
    near_x, near_y = np.empty(x.size), np.empty(x.size)
    near = _pairs_near_mode(log_ratio, x, y, mode, RATIO_INLIER_WIDTH, near_x, near_y)
    return near_x[:near], near_y[:near]


def _line_near_mode(
    mode: float, near_x: np.ndarray, near_y: np.ndarray, max_log_gain: float
) -> tuple[float, float]:
    """:func:`robust_linear_fit`'s line through the pairs near the mode (the mode's ratio alone
    when they are too few or the line's gain is out of bounds)."""
    if near_x.size < MIN_FIT_SAMPLES or np.ptp(near_x) == 0:
        return float(np.exp(mode)), 0.0
    gain, offset = _least_squares_line(near_x, near_y)
    if not gain > 0 or abs(np.log(gain)) > max_log_gain:
        return float(np.exp(mode)), 0.0
    return float(gain), float(offset)


def _log_ratio_mode(
    source: np.ndarray, target: np.ndarray, ceiling: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float] | None:
    """The usable pairs ``x``, ``y`` (float64), their log ratios and its histogram's mode, or
    None when fewer than MIN_FIT_SAMPLES pairs are usable."""
    source_values, target_values = (_fit_values(values) for values in (source, target))
    if source_values.size != target_values.size:
        raise ValueError(f"source {source.shape} and target {target.shape} differ in shape")
    if np.isfinite(ceiling):
        # NaN pairs are not usable either: the compiled pass skips them as it skips these.
        below = (source_values < ceiling) & (target_values < ceiling)
        source_values, target_values = source_values[below], target_values[below]
    x, y, ratio = (np.empty(source_values.size) for _ in range(3))
    usable = _usable_pairs(source_values, target_values, x, y, ratio)
    if usable < MIN_FIT_SAMPLES:
        return None
    # numpy's logarithm (its own SIMD code here), so that the ratios' bins are numpy's.
    log_ratio = np.log(ratio[:usable], out=ratio[:usable])
    counts = _ratio_counts(log_ratio, RATIO_EDGES, RATIO_RANGE, RATIO_BIN_WIDTH)
    smoothed = ndi.gaussian_filter1d(counts.astype(np.float64), RATIO_SMOOTHING_BINS)
    peak = int(np.argmax(smoothed))
    return x[:usable], y[:usable], log_ratio, 0.5 * (RATIO_EDGES[peak] + RATIO_EDGES[peak + 1])


def _fit_values(values: np.ndarray) -> np.ndarray:
    """Flat values for the compiled passes: float32 and float64 as they are, anything else as
    float64 (exact for the integers and float16 an overview can hold)."""
    if values.dtype not in (np.float32, np.float64):
        values = values.astype(np.float64)
    return np.ascontiguousarray(values).ravel()


# The fit's passes over the pixels, compiled: 160 fits of 256² (40 dates x 4 bands, done twice
# for an automatic reference) ran on the client before any tile task could start, 1.9 ms each as
# numpy masks and gathers, 1.0 ms so. Values are numpy's, in the same order: the gains are the
# same to the bit (tests/test_reference.py keeps the numpy expressions).
@compiled
def _usable_pairs(source, target, x, y, ratio):  # pragma: no cover - compiled
    """Pairs with both values finite and positive into ``x``, ``y`` (float64) and ``ratio``
    (``y / x``); returns how many."""
    count = 0
    for i in range(source.size):
        s, t = source[i], target[i]
        if np.isfinite(s) and np.isfinite(t) and s > 0 and t > 0:
            x[count], y[count] = np.float64(s), np.float64(t)
            ratio[count] = y[count] / x[count]
            count += 1
    return count


@compiled
def _ratio_counts(log_ratio, edges, half_range, width):  # pragma: no cover - compiled
    """np.histogram's counts of ``log_ratio`` on its uniform ``edges`` over ``±half_range``: the
    bin from the value's offset, then numpy's rounding fix (a value on an edge goes to the bin
    the edge opens; the last bin is closed)."""
    n_bins = edges.size - 1
    counts = np.zeros(n_bins, dtype=np.int64)
    for value in log_ratio:
        if abs(value) <= half_range:
            index = min(int((value + half_range) / width), n_bins - 1)
            if value < edges[index]:
                index -= 1
            if value >= edges[index + 1] and index != n_bins - 1:
                index += 1
            counts[index] += 1
    return counts


@compiled
def _pairs_near_mode(log_ratio, x, y, mode, width, near_x, near_y):  # pragma: no cover - compiled
    """The pairs whose log ratio lies within ``width`` of ``mode``, into ``near_x``/``near_y``;
    returns how many."""
    count = 0
    for i in range(log_ratio.size):
        if abs(log_ratio[i] - mode) < width:
            near_x[count], near_y[count] = x[i], y[i]
            count += 1
    return count


RATIO_BIN_WIDTH = 2 * RATIO_RANGE / RATIO_BINS
RATIO_EDGES = np.linspace(-RATIO_RANGE, RATIO_RANGE, RATIO_BINS + 1)


def _least_squares_line(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    # The closed form of a degree-1 least-squares fit (np.polyfit's answer, without its SVD).
    # Sums, not np.dot: BLAS threads made each small dot product take milliseconds.
    x_mean, y_mean = x.mean(), y.mean()
    dx = x - x_mean
    gain = float((dx * (y - y_mean)).sum() / (dx * dx).sum())
    return gain, float(y_mean - gain * x_mean)


def map_on_cores(function: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
    """``[function(item) for item in items]`` on a thread per core.

    For the planning steps that run on the client before any tile task can start, and spend
    their time in numpy, which releases the GIL: the cores are otherwise idle then.
    """
    workers = min(len(items), os.cpu_count() or 1)
    if workers <= 1:
        return [function(item) for item in items]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(function, items))


def fit_radiometry(
    overview: np.ndarray, target: np.ndarray, ceilings: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Gains and offsets ``(time, band)`` that map each date of the overview onto ``target``.

    The fits are independent and spend their time in numpy, which releases the GIL: they run on
    a thread per core (40 dates x 4 bands of 256²: 0.47 -> 0.29 s on 2 cores), before any tile
    task can start. ``ceilings`` ``(band,)``: values at or above are left out of each band's fit
    (:func:`robust_linear_fit`).
    """
    n_time, n_band = overview.shape[:2]
    pairs = list(itertools.product(range(n_time), range(n_band)))
    tops = np.full(n_band, np.inf) if ceilings is None else np.asarray(ceilings, np.float64)
    fits = map_on_cores(
        lambda pair: robust_linear_fit(overview[pair], target[pair[1]], tops[pair[1]]), pairs
    )
    gains = np.ones((n_time, n_band))
    offsets = np.zeros((n_time, n_band))
    for (t, b), (gain, offset) in zip(pairs, fits, strict=True):
        gains[t, b], offsets[t, b] = gain, offset
    # Dates held at the gain's limit in some band: lit differently when every band agrees.
    held = np.isclose(np.abs(np.log(gains)), MAX_LOG_GAIN, rtol=0, atol=1e-9).any(axis=1)
    for date in np.flatnonzero(held):  # few dates: on threads these took longer (measured)
        relit = illumination_fit(overview[date], target, tops)
        if relit is not None:
            gains[date], offsets[date] = relit
    checks = map_on_cores(
        lambda t: common_offset_fit(overview[t], target, gains[t], offsets[t]), range(n_time)
    )
    for t, common in enumerate(checks):
        if common is not None:
            gains[t], offsets[t] = common
    return gains, offsets


def illumination_fit(
    date: np.ndarray, target: np.ndarray, ceilings: np.ndarray
) -> tuple[np.ndarray, np.ndarray] | None:
    """Gains and offsets ``(band,)`` mapping ``date`` onto ``target`` (both ``(band, h, w)``)
    beyond ``MAX_LOG_GAIN`` when every band agrees on an illumination change (see
    ``ILLUMINATION_SHARE``), else None.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> target = rng.gamma(2.0, 400.0, (3, 64, 64))
    >>> gains, offsets = illumination_fit(target / 1.8, target, np.full(3, np.inf))
    >>> np.round(gains, 2).tolist()
    [1.8, 1.8, 1.8]
    """
    found = []
    for band in range(date.shape[0]):  # most dates fail on one band: stop there
        pairs = _log_ratio_mode(date[band], target[band], ceilings[band])
        if pairs is None:
            return None
        x, y, log_ratio, mode = pairs
        near_x, near_y = _pairs_near(x, y, log_ratio, mode)
        if not near_x.size >= ILLUMINATION_SHARE * x.size:
            return None
        found.append((mode, near_x, near_y))
    modes = np.array([mode for mode, _, _ in found])
    # The interquartile range of the target's log values near each band's mode.
    textures = [np.subtract(*np.percentile(np.log(near_y), [75, 25])) for _, _, near_y in found]
    if max(textures) < ILLUMINATION_TEXTURE:
        return None  # a flat scene: one veil of cloud over it has a constant ratio too
    if (np.abs(modes - np.median(modes)) > ILLUMINATION_AGREEMENT).any():
        return None
    # The modes lie within the histogram's range: the lines are robust_linear_fit's with no bound
    # but that range, from the pairs found above.
    fits = [_line_near_mode(*band_pairs, RATIO_RANGE) for band_pairs in found]
    gains, offsets = (np.array(values) for values in zip(*fits, strict=True))
    return gains, offsets


#: A date whose every band differs from the target by one constant is a processing offset
#: (Sentinel-2 L2A from processing baseline 04.00 stores reflectance + 1000 DN; a stack that
#: spans January 2022 mixes both), not a changed scene: fitted as a gain (a probe, 6 of 12
#: dates + 1000 DN), its visible gains sat at their limits and 94 % of those dates became large.
#: It is taken for one when, in every band, that constant explains at least as many pixels as
#: the gain fit (within RATIO_INLIER_WIDTH), in some band COMMON_OFFSET_GAIN_FACTOR times as
#: many, the bands' offsets agree within COMMON_OFFSET_AGREEMENT of their median, and the gains
#: refitted on those pixels stay within COMMON_OFFSET_MAX_LOG_GAIN of 1. A veil of haze or thin
#: cloud adds more to blue than to NIR and dims what lies under it: it stays a change.
COMMON_OFFSET_AGREEMENT = 0.1
COMMON_OFFSET_GAIN_FACTOR = 1.25
COMMON_OFFSET_MAX_LOG_GAIN = float(np.log(1.1))
#: Only dates whose gain fit explains less than this share of some band's pixels are checked.
COMMON_OFFSET_CHECK_SHARE = 0.5


def common_offset_fit(
    date: np.ndarray, target: np.ndarray, gains: np.ndarray, offsets: np.ndarray
) -> tuple[np.ndarray, np.ndarray] | None:
    """Gains and offsets ``(band,)`` mapping ``date`` onto ``target`` (both ``(band, h, w)``)
    when the date differs from it by one constant in every band (see
    ``COMMON_OFFSET_AGREEMENT``), else None; ``gains``/``offsets`` are the date's gain fits.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> target = rng.uniform(100, 3000, (4, 64, 64))
    >>> gains, offsets = common_offset_fit(target + 1000, target, np.full(4, 2 / 3), np.zeros(4))
    >>> np.round(gains, 3).tolist(), np.round(offsets).tolist()
    ([1.0, 1.0, 1.0, 1.0], [-1000.0, -1000.0, -1000.0, -1000.0])
    """
    if date.shape[0] < 2:
        return None  # one band cannot tell an offset from a veil
    # Most dates: the gain fits explain most of every band. Checked on whole bands at once, on
    # every other pixel (every fit runs on the client before any tile task can start).
    gains, offsets = gains[:, None, None], offsets[:, None, None]
    sparse = (slice(None), slice(None, None, 2), slice(None, None, 2))
    sampled = _within(target[sparse], gains * date[sparse] + offsets).sum(axis=(1, 2))
    sampled_usable = np.isfinite(date[sparse]) & (target[sparse] > 0)
    if (sampled >= COMMON_OFFSET_CHECK_SHARE * sampled_usable.sum(axis=(1, 2))).all():
        return None
    explained = _within(target, gains * date + offsets).sum(axis=(1, 2))
    usable = np.isfinite(date) & (target > 0)
    fitted, wins = [], False
    for band, before in enumerate(explained):
        x, y = (values[band][usable[band]].astype(np.float64) for values in (date, target))
        if x.size < MIN_FIT_SAMPLES:
            return None
        offset = _difference_mode(x, y)
        near = _within(y, x + offset)
        count = int(near.sum())
        if count < max(before, MIN_FIT_SAMPLES) or np.ptp(x[near]) == 0:
            return None
        wins |= count >= COMMON_OFFSET_GAIN_FACTOR * before
        fitted.append(_least_squares_line(x[near], y[near]))
    gains_out, offsets_out = (np.array(values) for values in zip(*fitted, strict=True))
    middle = float(np.median(offsets_out))
    if not (
        wins
        and (gains_out > 0).all()
        and (np.abs(np.log(gains_out)) <= COMMON_OFFSET_MAX_LOG_GAIN).all()
        and (np.abs(offsets_out - middle) <= COMMON_OFFSET_AGREEMENT * abs(middle)).all()
    ):
        return None
    return gains_out, offsets_out


def _within(values: np.ndarray, line: np.ndarray) -> np.ndarray:
    """Where ``values`` lie within ``RATIO_INLIER_WIDTH`` of a positive ``line`` in log ratio
    (as multiplications: no logarithm of every pixel); False where either is NaN."""
    return (values > line * np.exp(-RATIO_INLIER_WIDTH)) & (
        values < line * np.exp(RATIO_INLIER_WIDTH)
    )


def _difference_mode(x: np.ndarray, y: np.ndarray) -> float:
    """The most common ``y - x`` (a histogram over ``RATIO_RANGE`` times the mean ``x`` or
    ``y``, the larger, in ``RATIO_BINS`` bins, smoothed as the ratios' is)."""
    reach = RATIO_RANGE * max(float(np.mean(x)), float(np.mean(y)))
    counts, edges = np.histogram(y - x, bins=RATIO_BINS, range=(-reach, reach))
    peak = int(np.argmax(ndi.gaussian_filter1d(counts.astype(np.float64), RATIO_SMOOTHING_BINS)))
    return float(0.5 * (edges[peak] + edges[peak + 1]))


# Quantiles (percent) of a normalised date's band mean taken as its dark and bright levels: the
# bright one is the brightest cloud tops on a cloudy date (a cloud covering 1 % of the date is
# enough), the brightest surfaces on a clear one.
DARK_QUANTILE = 1.0
BRIGHT_QUANTILE = 99.0
# Fewer valid overview pixels than this leave a date's levels unknown.
MIN_LEVEL_SAMPLES = 64


def brightness_levels(overview: np.ndarray, gains: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Dark and bright levels ``(time, 2)`` of each date's band mean, mapped onto the reference.

    The ``DARK_QUANTILE`` and ``BRIGHT_QUANTILE`` of the normalised band mean over each date's
    valid overview pixels; NaN for dates with fewer than ``MIN_LEVEL_SAMPLES`` of them. Clouds
    are far brighter than water and most land, so on a cloudy date the bright level is its
    clouds' own brightness, which varies from date to date (30-70 % reflectance): the thin haze
    test of :mod:`spoc_xr.detect` measures a rise as a share of the room up to it.

    Examples
    --------
    >>> view = np.stack([np.full((2, 8, 8), 100.0), np.full((2, 8, 8), 50.0)])
    >>> brightness_levels(view, np.array([[1.0, 1.0], [2.0, 2.0]]), np.zeros((2, 2)))
    array([[100., 100.],
           [100., 100.]])
    """
    levels = np.full((overview.shape[0], 2), np.nan)
    for t in range(overview.shape[0]):
        date = overview[t].astype(np.float64) * gains[t][:, None, None] + offsets[t][:, None, None]
        mean = date.mean(axis=0)
        values = mean[np.isfinite(mean)]
        if values.size >= MIN_LEVEL_SAMPLES:
            levels[t] = np.percentile(values, [DARK_QUANTILE, BRIGHT_QUANTILE])
    return levels


def change_fractions(
    overview: np.ndarray,
    target: np.ndarray,
    gains: np.ndarray,
    offsets: np.ndarray,
    *,
    scale_quantile: float = 0.5,
    floor: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Share of valid pixels per date departing from ``target``, and the per-band residual scale.

    The scale is the ``scale_quantile`` of the absolute deviations, as a Gaussian's sigma (the
    median, 0.5, is the MAD): a lower quantile holds while more of the deviations are changes.
    It is at least ``floor`` times the band's median gain (:func:`quantisation_sigma`).
    """
    # |normalised - target|, in place: this runs on every pixel of the overview, on the client.
    deviation = overview * gains[:, :, None, None]
    deviation += offsets[:, :, None, None]
    deviation -= target[None]
    np.abs(deviation, out=deviation)

    # Band by band on the finite values: np.nanmedian over several axes is ~10x slower.
    def band_scale(band: int) -> float:
        values = deviation[:, band]
        finite = values[np.isfinite(values)]
        if not finite.size:
            return np.nan
        if scale_quantile == 0.5:
            return float(MAD_TO_SIGMA * np.median(finite))
        return float(np.quantile(finite, scale_quantile) / _half_normal_quantile(scale_quantile))

    scale = np.array(map_on_cores(band_scale, range(deviation.shape[1])), dtype=np.float64)
    scale = np.where(scale > 0, scale, 1.0)
    scale = np.maximum(scale, floor * np.median(gains, axis=0))
    outlier = (deviation > OUTLIER_SIGMA * scale[None, :, None, None]).any(axis=1)
    valid = np.isfinite(deviation).all(axis=1)
    counts = valid.sum(axis=(1, 2))
    shares = np.where(counts > 0, (outlier & valid).sum(axis=(1, 2)) / np.maximum(counts, 1), 1.0)
    return shares, scale


#: What ``reference=`` takes: "auto", "median" or a date (a string or one of the time values).
ReferenceArgument = str | np.datetime64 | datetime.date | xr.DataArray


def reference_text(reference: object) -> str:
    """A ``reference`` argument as the text a store records: ``"auto"``, ``"median"`` or a date.

    Dates may come as strings or as the stack's own time values (``numpy.datetime64``,
    ``pandas.Timestamp``, ``datetime``, a 0-d array such as ``stack.time[3]``).

    Examples
    --------
    >>> reference_text(np.datetime64("2023-05-01"))
    '2023-05-01T00:00:00'
    >>> reference_text("median")
    'median'
    """
    if isinstance(reference, str):
        return reference
    if isinstance(reference, xr.DataArray | np.ndarray) and np.ndim(reference) == 0:
        reference = np.asarray(reference)[()]
    if isinstance(reference, np.datetime64 | datetime.date):  # a pandas.Timestamp is a datetime
        stamp = pd.Timestamp(reference)
        if not pd.isna(stamp):
            return stamp.isoformat()
    raise ParameterError(
        f"reference {reference!r} must be 'auto', 'median' or a date: a string such as "
        "'2023-05-01' or one of the stack's time values (numpy.datetime64, pandas.Timestamp)"
    )


def parse_reference(reference: object, times: xr.DataArray) -> str | int:
    """Check a ``reference`` argument: ``"auto"``, ``"median"`` or a date (returns its index)."""
    reference = reference_text(reference)
    if reference in ("auto", "median"):
        return reference
    try:
        wanted = pd.Timestamp(reference)
    except (ValueError, TypeError) as err:
        raise ParameterError(
            f"reference {reference!r} is neither 'auto', 'median' nor a date; "
            "pass e.g. --reference 2023-05-01"
        ) from err
    stamps = pd.DatetimeIndex(times.values)
    exact = np.flatnonzero(stamps == wanted)
    if exact.size == 0:
        # A date without a time of day picks the acquisition on that day.
        same_day = np.flatnonzero(stamps.normalize() == wanted.normalize())
        exact = same_day if wanted == wanted.normalize() else exact
    if exact.size > 1:
        times_of_day = ", ".join(stamps[i].strftime("%H:%M:%S") for i in exact)
        raise ParameterError(
            f"reference date {reference!r} matches {exact.size} acquisitions of that day "
            f"({times_of_day}); give the time too, e.g. --reference "
            f"{stamps[exact[0]].strftime('%Y-%m-%dT%H:%M:%S')}"
        )
    if exact.size != 1:
        first, last = stamps.min().date(), stamps.max().date()
        raise ParameterError(
            f"reference date {reference!r} is not in the stack ({len(stamps)} dates from {first} "
            f"to {last}); pass one of its dates, 'auto' or 'median'"
        )
    return int(exact[0])


def overview_composite(overview: np.ndarray) -> np.ndarray:
    """The temporal median ``(band, h, w)`` of an overview: single dates' clouds and boats drop
    out of it."""

    def band_median(band: int) -> np.ndarray:
        with np.errstate(all="ignore"):
            return nanmedian_first(overview[:, band])

    # Band by band on a thread per core (pixels are independent): the same values.
    return np.stack(map_on_cores(band_median, range(overview.shape[1])))


#: Share of dates departing on most of their area from each pixel's darker quarter of dates from
#: which the median is checked (:func:`fit_composite`): 0.08-0.31 on the port stacks and the demo,
#: 0.40 on the Landsat stack. Subsets of the Landsat stack with fewer overcast dates: at 0.4 none
#: took the fallback; at 0.3 those with 22 % and 29 % of the dates mostly overcast (by Fmask) did,
#: cloud IoU 0.513 -> 0.518 and 0.567 -> 0.603, the one with 12 % kept the median (0.399; the
#: fallback there: 0.395); 0.25 took it there too.
OVERCAST_SHARE = 0.3
#: ... and the median failed when this share of the dates depart from it on most of their area
#: (or its scale grew, SCALE_GROWTH): 0.4, so that a flood on 4 of 12 dates keeps the median.
MEDIAN_FAILED_SHARE = 0.4
#: The per-pixel quantile (percent) of the dates that :func:`fit_composite` falls back on: clouds
#: are bright, so a pixel's darker quarter of dates is clear wherever it is overcast on fewer than
#: three quarters of them.
CLEAR_QUANTILE = 25.0


@dataclass(frozen=True)
class CompositeFit:
    """The overview's composite and every date's fit to it (:func:`fit_composite`).

    Attributes
    ----------
    composite : numpy.ndarray
        ``(band, h, w)`` float: what a clean date of the scene looks like.
    gains, offsets : numpy.ndarray
        ``(time, band)``: ``gain * date + offset`` matches the composite.
    changed : numpy.ndarray
        ``(time,)`` share of each date's valid overview pixels that depart from the composite.
    scale : numpy.ndarray
        ``(band,)`` residual scale of the dates around the composite.
    notes : list of str
        What the user should know about the choice.
    from_dates : numpy.ndarray or None
        ``(time,)`` bool: the dates the composite is the median of; ``None`` for all of them.
    """

    composite: np.ndarray
    gains: np.ndarray
    offsets: np.ndarray
    changed: np.ndarray
    scale: np.ndarray
    notes: list[str] = field(default_factory=list)
    from_dates: np.ndarray | None = None


def _half_normal_quantile(quantile: float) -> float:
    """The ``quantile`` of ``|X|`` for a standard normal ``X``."""
    return float(scipy.special.ndtri((1 + quantile) / 2))


#: A median's residual scale this many times the darker quarter's (on the lower quartile of the
#: deviations) grew with the clouds: 0.4-2.4 on the port stacks and the demo, 3.5 on the Landsat
#: stack (44 % of its dates mostly overcast), 10-100 where the same area is overcast on half of
#: the dates or more.
SCALE_GROWTH = 3.0
#: The quantile of the absolute deviations that scales the darker-quarter check: the deviations of
#: dates overcast on half of the stack or more are the larger half of them.
CHECK_SCALE_QUANTILE = 0.25


def _fit_to(
    overview: np.ndarray,
    composite: np.ndarray,
    scale_quantile: float = 0.5,
    floor: float = 0.0,
    ceilings: np.ndarray | None = None,
) -> CompositeFit:
    gains, offsets = fit_radiometry(overview, composite, ceilings)
    changed, scale = change_fractions(
        overview, composite, gains, offsets, scale_quantile=scale_quantile, floor=floor
    )
    return CompositeFit(composite, gains, offsets, changed, scale)


def quantisation_sigma(values: np.ndarray) -> float:
    """``QUANTISATION_SIGMA`` when every finite value is a whole number (integer data, as
    an overview holds it in floats), else 0: float data have no step to floor the spread at.

    Examples
    --------
    >>> quantisation_sigma(np.array([3.0, 4.0, np.nan])) > 0, quantisation_sigma(np.array([0.25]))
    (True, 0.0)
    """
    finite = values[np.isfinite(values)]
    whole = finite.size > 0 and bool(np.all(finite == np.round(finite)))
    return QUANTISATION_SIGMA if whole else 0.0


def darker_quarter(overview: np.ndarray) -> np.ndarray:
    """Each pixel's ``CLEAR_QUANTILE`` of an overview's dates ``(band, h, w)``, NaN ignored.

    The value of rank ``round(q * (n - 1))`` among the pixel's ``n`` valid dates (no
    interpolation; NaN where none is valid): a sort, 100x faster than ``numpy.nanpercentile``.

    Examples
    --------
    >>> view = np.array([4.0, 1.0, np.nan, 3.0, 2.0, 5.0]).reshape(6, 1, 1, 1)
    >>> darker_quarter(view)[0].tolist()
    [[2.0]]
    """

    def band_quantile(band: int) -> np.ndarray:
        ordered = np.sort(overview[:, band], axis=0)  # NaN sort last
        count = np.isfinite(ordered).sum(axis=0)
        rank = np.rint(CLEAR_QUANTILE / 100 * np.maximum(count - 1, 0)).astype(np.intp)
        return np.take_along_axis(ordered, rank[None], axis=0)[0]

    return np.stack(map_on_cores(band_quantile, range(overview.shape[1])))


#: Overview pixels (per side) on which :func:`fit_composite` checks the median against the darker
#: quarter: a sixteenth of the overview's, plenty for shares of dates' areas (the same dates and
#: scale ratios within 0.1 as on 128 px on the port stacks, the demo and Landsat) and 0.06 s of
#: planning at 40 dates (0.12 s on 128 px).
CHECK_SIDE = OVERVIEW_SIDE // 4


def fit_composite(
    overview: np.ndarray, composite: np.ndarray | None = None, ceilings: np.ndarray | None = None
) -> CompositeFit:
    """The composite that stands for a clean date, and every date's radiometric fit to it.

    The temporal median (:func:`overview_composite`, or ``composite`` when the caller has it)
    drops each date's own clouds and boats. Where the same area is overcast on half of the
    dates or more, the median there is cloud (or half cloud): clear dates depart from it, and
    a cloudy date would become the reference. So when ``OVERCAST_SHARE`` of the dates depart
    on more than ``MAX_SAMPLE_DIRT`` of their area from each pixel's darker quarter of dates
    (``CLEAR_QUANTILE``; clouds are bright) and the median failed too (``MEDIAN_FAILED_SHARE``
    of the dates depart from it, or its residual scale grew ``SCALE_GROWTH`` times), the
    composite is the median of the dates that agree with the darker quarter, when at least
    ``MIN_CLEAN_SAMPLES`` do. A note says so either way. ``ceilings`` ``(band,)``: where the
    bands clipped (:func:`saturation_levels`), left out of the fits.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> view = 1000 + 20 * rng.standard_normal((6, 2, 32, 32))
    >>> view[3:] += 5000  # overcast on half of the dates
    >>> fit = fit_composite(view)
    >>> (fit.changed > 0.5).tolist()
    [False, False, False, True, True, True]
    """
    if composite is None:
        composite = overview_composite(overview)
    floor = quantisation_sigma(overview)
    median = _fit_to(overview, composite, floor=floor, ceilings=ceilings)
    n_time = overview.shape[0]
    # The median's own fit cannot tell: half cloud departs from cloud and from the surface
    # alike, and the residual scale grows to match. The darker quarter can, on a coarser view.
    step = max(1, -(-max(overview.shape[2:]) // CHECK_SIDE))
    view = overview[:, :, ::step, ::step]
    darker = _fit_to(view, darker_quarter(view), CHECK_SCALE_QUANTILE, floor, ceilings)
    dirty = int((darker.changed > MAX_SAMPLE_DIRT).sum())
    # Only where the median failed visibly: many dates depart from it too, or its residual
    # scale grew with the clouds. A dark change on a third of the dates (a flood) also leaves
    # the other dates apart from the darker quarter, and there the median is right.
    failed = (median.changed > MAX_SAMPLE_DIRT).sum() >= MEDIAN_FAILED_SHARE * n_time or bool(
        (median.scale > SCALE_GROWTH * darker.scale).any()
    )
    if dirty < OVERCAST_SHARE * n_time or not failed:
        return median
    said = (
        f"{dirty} of {n_time} dates depart on more than half of their area from the darker "
        "quarter of each pixel's dates, and from the temporal median too (overcast dates: "
        "clouds are bright; or a scene whose surface changes through the stack)"
    )
    agree = (darker.changed <= MAX_SAMPLE_DIRT) & np.isfinite(view).all(axis=1).any(axis=(1, 2))
    if agree.sum() < MIN_CLEAN_SAMPLES:
        return replace(
            median,
            notes=[
                f"{said}, and fewer than {MIN_CLEAN_SAMPLES} dates agree with each other: where "
                "the same area is overcast on half of the dates or more, its clouds may become "
                "the reference (clear dates then show them as large objects); drop overcast "
                "dates before ingesting"
            ],
        )
    note = (
        f"{said}: the reference and the noise model are taken from the {int(agree.sum())} dates "
        "that agree with that quarter, not from the median of all dates, which is cloud where "
        "the same area is overcast on half of them"
    )
    return replace(
        _fit_to(
            overview,
            overview_composite(overview[agree]),
            CHECK_SCALE_QUANTILE,
            floor,
            ceilings,
        ),
        notes=[note],
        from_dates=agree,
    )


def plan_radiometry(
    overview: np.ndarray,
    reference: str | int,
    fitted: CompositeFit | None = None,
    ceilings: np.ndarray | None = None,
) -> Radiometry:
    """Choose the reference date (for ``auto``) and fit every date's radiometry to it.

    Parameters
    ----------
    overview : numpy.ndarray
        ``(time, band, h, w)`` float with NaN where invalid, from :func:`compute_overview`.
    reference : {"auto", "median"} or int
        Reference kind, or the index of the reference date.
    fitted : CompositeFit, optional
        The overview's composite and fits (:func:`fit_composite`), when the caller has them.
    ceilings : numpy.ndarray, optional
        ``(band,)`` where the bands clipped (:func:`saturation_levels`): left out of the fits.

    Returns
    -------
    Radiometry
    """
    valid = np.isfinite(overview).all(axis=1)
    valid_fraction = valid.mean(axis=(1, 2))
    if not valid_fraction.any():
        raise NoDataError("every date of the stack is entirely nodata; check the nodata value")
    if fitted is None:
        fitted = fit_composite(overview, ceilings=ceilings)
    gains, offsets, changed, scale = fitted.gains, fitted.offsets, fitted.changed, fitted.scale
    notes = list(fitted.notes)
    water_mapping, choice = None, ""
    if reference == "median":
        index = None
    elif reference == "auto":
        eligible = valid_fraction >= MIN_VALID_SHARE * valid_fraction.max()
        dirt = changed + (1 - valid_fraction)
        index = int(np.argmin(np.where(eligible, dirt, np.inf)))
        choice = (
            f"auto: the fewest changed pixels ({changed[index]:.1%}) among dates with >= "
            f"{MIN_VALID_SHARE:.0%} of the best coverage"
        )
        # A date is cleaned of its own objects by the median of MIN_CLEANING_DATES clean
        # others; without them its boats would stay in the reference (a probe: the reference
        # date of every 3-date subset of a stack lost all its boats), while the median of
        # the dates drops each date's own.
        clean_others = int(np.count_nonzero(dirt <= MAX_SAMPLE_DIRT)) - int(
            dirt[index] <= MAX_SAMPLE_DIRT
        )
        if clean_others < MIN_CLEANING_DATES:
            index = None
            choice = (
                f"auto: the temporal median, as fewer than {MIN_CLEANING_DATES} clean dates "
                "beside the cleanest one could clean a date of its own objects"
            )
    else:
        index = int(reference)
        if valid_fraction[index] == 0:
            raise NoDataError(
                f"the reference date (index {index}) is entirely nodata; pick another date, "
                "'auto' or 'median'"
            )
    if index is not None:
        # The fit onto the composite maps the reference date into the radiometry where the
        # water index is read: a single date's band gains move a ratio index by up to ~0.2.
        water_mapping = (gains[index].copy(), offsets[index].copy())
        gains, offsets = fit_radiometry(overview, overview[index], ceilings)
        gains[index], offsets[index] = 1.0, 0.0
    return Radiometry(
        "median" if index is None else "date",
        index,
        gains,
        offsets,
        valid_fraction,
        changed,
        notes,
        scale,
        brightness_levels(overview, gains, offsets),
        water_mapping=water_mapping,
        # A median reference is the median of the dates the composite was taken from.
        median_dates=(
            None
            if index is not None or fitted.from_dates is None
            else tuple(int(t) for t in np.flatnonzero(fitted.from_dates))
        ),
        choice=choice,
        saturation=None if ceilings is None else np.asarray(ceilings, dtype=np.float32),
    )


def normalise(
    stack: xr.DataArray, radiometry: Radiometry, indices: list[int] | None = None
) -> xr.DataArray:
    """Lazy float32 stack mapped onto the reference radiometry, NaN where invalid.

    ``indices`` gives the positions of ``stack``'s dates in the full stack, when it is a subset.
    """
    rows = slice(None) if indices is None else indices
    gains = xr.DataArray(radiometry.gains[rows].astype(np.float32), dims=("time", "band"))
    offsets = xr.DataArray(radiometry.offsets[rows].astype(np.float32), dims=("time", "band"))
    gains = gains.assign_coords(time=stack.time, band=stack.band)
    offsets = offsets.assign_coords(time=stack.time, band=stack.band)
    return (to_float(stack) * gains + offsets).astype(np.float32)


def build_reference(stack: xr.DataArray, radiometry: Radiometry) -> xr.DataArray:
    """Lazy full-resolution reference ``(band, y, x)`` float32 before cleaning, NaN where unknown.

    A date reference is that date as float; a median reference takes the per-pixel median over
    all dates, or over :attr:`Radiometry.median_dates` (to keep memory per task independent of
    the number of dates, the spatial blocks shrink as the dates grow).
    :func:`clean_date_values` then removes a date reference's own transient objects.
    """
    if radiometry.reference_index is not None:
        return to_float(stack.isel(time=radiometry.reference_index)).drop_vars("time")
    dates = radiometry.median_dates
    if dates is None:
        normalised = normalise(stack, radiometry)
    else:
        normalised = normalise(stack.isel(time=list(dates)), radiometry, list(dates))
    n_time, n_band = normalised.sizes["time"], normalised.sizes["band"]
    side = max(16, int(math.sqrt(MEDIAN_BLOCK_BYTES / (4 * n_time * n_band))))
    columns = normalised.chunk({"time": -1, "band": -1, "y": side, "x": side})
    median = temporal_median(columns)
    stack_chunks = stack.chunksizes
    return (
        median.chunk({"y": stack_chunks["y"], "x": stack_chunks["x"]}) if stack_chunks else median
    )


def normalise_values(
    raw: np.ndarray, gains: np.ndarray, offsets: np.ndarray, nodata: float | None
) -> np.ndarray:
    """:func:`normalise` of in-memory dates ``(time, band, y, x)``, value for value.

    ``gains``/``offsets`` are ``(time, band)``; pixels where any band is nodata or not finite
    become NaN in every band.
    """
    values = raw.astype(np.float32)
    valid = np.ones((raw.shape[0], *raw.shape[2:]), dtype=bool)
    if nodata is not None and not np.isnan(nodata):
        valid &= (raw != nodata).all(axis=1)
    if np.issubdtype(raw.dtype, np.floating):
        valid &= np.isfinite(raw).all(axis=1)
    values *= gains.astype(np.float32)[:, :, None, None]
    values += offsets.astype(np.float32)[:, :, None, None]
    np.copyto(values, np.float32(np.nan), where=~valid[:, None])
    return values


def outlier_limits(scale: np.ndarray) -> np.ndarray:
    """How far ``(band,)`` a value lies from the clean dates' before it is another date's object:
    OUTLIER_SIGMA residual scales ``scale`` (float32)."""
    return np.asarray(scale, dtype=np.float32) * np.float32(OUTLIER_SIGMA)


def clean_date_values(
    date: np.ndarray, lower: np.ndarray, upper: np.ndarray, scale: np.ndarray
) -> np.ndarray:
    """The reference date ``(band, y, x)`` with its own transient objects replaced by the median.

    Even the cleanest date carries boats and the odd cloud; left in, they are invisible on that
    date and blind every other date where they lie. ``lower`` and ``upper`` are the two middle
    values of the cleanest dates (the ones the noise model uses; :func:`nanmiddle_pair`). Where
    the date lies outside them by more than OUTLIER_SIGMA residual scales ``scale`` ``(band,)``
    in any band, their median takes its place. Outside both, not merely away from their mean: a
    ship moored on half of an even number of dates puts water and hull in the middle, and the
    water of the date would have been replaced by half a hull (seen on the semi-real ports: a
    berth then departed on every date and its ships went unseen on all of them). The date's holes
    (nodata: saturated or defective pixels, scan-line gaps) take the median too, band by band:
    left unknown, every date was invalid there, and the tolerance window spread each hole over
    its neighbours (1 % of scattered holes left 91 % of every date valid, against 99 % with a
    median reference).
    """
    limit = outlier_limits(scale)[:, None, None]
    median = (lower + upper) / np.float32(2)
    with np.errstate(invalid="ignore"):
        departs = ((date < lower - limit) | (date > upper + limit)).any(axis=0)
    departs &= np.isfinite(median).all(axis=0)
    cleaned = np.where(departs[None], median, date)
    return np.where(np.isnan(cleaned), median, cleaned).astype(np.float32)


def nanmiddle_pair(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The two middle values along the first axis, NaN ignored: equal for an odd number of
    values, their mean the median (:func:`nanmedian_first`); NaN where every value is NaN."""
    values = np.asarray(values)
    n_dates = values.shape[0]
    if n_dates == 0:
        empty = np.full(values.shape[1:], np.nan, dtype=np.float32)
        return empty, empty.copy()
    if n_dates > NETWORK_MAX_DATES:
        ordered = values.astype(np.float32).reshape(n_dates, -1)  # a copy, sorted in place
        lower, upper = _middle_pair(ordered, None)
    else:
        columns = np.ascontiguousarray(values, dtype=np.float32).reshape(n_dates, -1)
        lower = np.empty(columns.shape[1], dtype=np.float32)
        upper = np.empty_like(lower)
        network = np.asarray(sorting_network(n_dates), dtype=np.int64).reshape(-1, 2)
        _middle_pair_columns(columns, network, lower, upper)
    return lower.reshape(values.shape[1:]), upper.reshape(values.shape[1:])


@compiled
def compare_exchange_row(first, second, width):  # pragma: no cover - compiled
    """One comparator of a sorting network along a row: ``first[:width]`` gets the smaller and
    ``second[:width]`` the larger of each pair (values without NaN). Written with conditional
    expressions, which numba vectorises: its ``min``/``max`` (NaN-aware) ran 4x slower."""
    for x in range(width):
        a, b = first[x], second[x]
        smaller = a < b
        first[x] = a if smaller else b
        second[x] = b if smaller else a


# Columns per piece of _middle_pair_columns: 8 dates of a piece stay in the CPU's L1 cache.
MIDDLE_PIECE_COLUMNS = 512


@compiled
def _middle_pair_columns(values, network, lower, upper):  # pragma: no cover - compiled
    # _middle_pair compiled, a piece of columns at a time: NaN sort last as +inf through the
    # network (applied along the piece, vectorised) and the middle of the values present is read
    # off. 4x numpy's speed: no whole-strip temporaries per comparator.
    n_dates, n_columns = values.shape
    piece = min(n_columns, MIDDLE_PIECE_COLUMNS)
    ordered = np.empty((n_dates, piece), dtype=np.float32)
    count = np.empty(piece, dtype=np.int64)
    infinity, nan = np.float32(np.inf), np.float32(np.nan)
    for start in range(0, n_columns, piece):
        width = min(piece, n_columns - start)
        count[:] = 0
        for t in range(n_dates):
            row, line = values[t], ordered[t]
            for x in range(width):
                value = row[start + x]
                missing = value != value
                line[x] = infinity if missing else value
                count[x] += 0 if missing else 1
        for pair in range(network.shape[0]):
            compare_exchange_row(ordered[network[pair, 0]], ordered[network[pair, 1]], width)
        for x in range(width):
            if count[x] == 0:
                lower[start + x] = nan
                upper[start + x] = nan
            else:
                lower[start + x] = ordered[(count[x] - 1) // 2, x]
                upper[start + x] = ordered[count[x] // 2, x]


def temporal_median(values: xr.DataArray) -> xr.DataArray:
    """Lazy per-pixel median over ``time`` ignoring NaN (all-NaN pixels stay NaN, silently).

    Equal, value for value, to ``np.nanmedian(values, axis=time)`` as float32. Each task sees all
    dates of one spatial block with ``time`` first, as the stack stores them (no transposition).
    """
    dims = ("time", *(d for d in values.dims if d != "time"))
    ordered = values.transpose(*dims)
    if not isinstance(ordered.data, da.Array):
        median = nanmedian_first(np.asarray(ordered.values))
        return xr.DataArray(median, dims=dims[1:], coords=_coords_without_time(ordered))
    data = ordered.data.rechunk({0: -1})
    median_data = data.map_blocks(
        nanmedian_first,
        drop_axis=0,
        dtype=np.float32,
        meta=np.empty((0,) * (data.ndim - 1), dtype=np.float32),
    )
    return xr.DataArray(median_data, dims=dims[1:], coords=_coords_without_time(ordered))


def _coords_without_time(values: xr.DataArray) -> dict[Hashable, xr.DataArray]:
    return {
        name: coord
        for name, coord in values.coords.items()
        if "time" not in coord.dims and name != "time"
    }


# Above this many dates a sort beats the sorting network's pairwise passes.
NETWORK_MAX_DATES = 24


def nanmedian_first(values: np.ndarray) -> np.ndarray:
    """``np.nanmedian(values, axis=0)`` as float32, value for value, without warnings.

    For up to ``NETWORK_MAX_DATES`` dates the dates are ordered by a sorting network (Batcher's
    odd-even merge sort): whole-plane minimum and maximum, contiguous and vectorised, where
    ``np.sort`` along the first axis would sort millions of strided 8-element rows. Pixels go
    through in pieces that stay in the CPU cache. NaN sort last (as +inf); the middle of the
    valid values gives the median, summed in float32 and halved as numpy does. All-NaN pixels
    stay NaN.
    """
    values = np.asarray(values)
    n_dates = values.shape[0]
    if n_dates > NETWORK_MAX_DATES or n_dates == 0:
        return _nanmedian_last(np.moveaxis(values, 0, -1)).astype(np.float32)
    ordered = values.astype(np.float32).reshape(n_dates, -1)  # a copy, sorted in place
    median = np.empty(ordered.shape[1], dtype=np.float32)
    network = sorting_network(n_dates)
    middle = middle_network(n_dates)
    step = max(1, MEDIAN_PIECE_BYTES // (4 * n_dates))
    for start in range(0, ordered.shape[1], step):
        piece = ordered[:, start : start + step]
        if np.isnan(piece.sum()):
            median[start : start + step] = _network_median(piece, network)
        else:  # no date missing (most pieces): the two middle values are the median
            median[start : start + step] = _middle_median(piece, middle)
    return median.reshape(values.shape[1:])


# Pixels per piece of nanmedian_first: all dates of a piece fit in a typical L2 cache.
MEDIAN_PIECE_BYTES = 1 << 20


def _compare_exchange(piece: np.ndarray, network: list[tuple[int, int]]) -> None:
    """Apply ``network``'s comparators to the dates (first axis) of ``piece``, in place."""
    for first, second in network:
        low = np.minimum(piece[first], piece[second])
        np.maximum(piece[first], piece[second], out=piece[second])
        piece[first] = low


def _network_median(piece: np.ndarray, network: list[tuple[int, int]]) -> np.ndarray:
    low_value, high_value = _middle_pair(piece, network)
    return (low_value + high_value) / np.float32(2)


def _middle_pair(
    piece: np.ndarray, network: list[tuple[int, int]] | None
) -> tuple[np.ndarray, np.ndarray]:
    """The two middle values of the non-NaN dates (first axis) of ``piece``, which is sorted in
    place (NaN as +inf) by ``network``, or by ``np.sort`` without one; NaN where none is."""
    missing = np.isnan(piece)
    count = piece.shape[0] - np.count_nonzero(missing, axis=0)
    piece[missing] = np.inf
    if network is None:
        piece.sort(axis=0)
    else:
        _compare_exchange(piece, network)
    last = piece.shape[0] - 1
    pair = []
    for position in (np.maximum(count - 1, 0) // 2, np.minimum(count // 2, last)):
        middle = np.take_along_axis(piece, position[None], axis=0)[0]
        middle[count == 0] = np.nan
        pair.append(middle)
    return pair[0], pair[1]


def _middle_median(piece: np.ndarray, network: list[tuple[int, int]]) -> np.ndarray:
    _compare_exchange(piece, network)
    size = piece.shape[0]
    median = piece[(size - 1) // 2] + piece[size // 2]
    median /= np.float32(2)
    return median


@functools.lru_cache(maxsize=NETWORK_MAX_DATES + 1)
def middle_network(size: int) -> list[tuple[int, int]]:
    """The comparators of :func:`sorting_network` that the two middle positions depend on.

    Applied in order, they leave at positions ``(size - 1) // 2`` and ``size // 2`` what the
    whole sort leaves there (19 -> 17 comparators for 8 elements).
    """
    needed = {(size - 1) // 2, size // 2}
    kept: list[tuple[int, int]] = []
    for first, second in reversed(sorting_network(size)):
        if first in needed or second in needed:
            kept.append((first, second))
            needed |= {first, second}
    return kept[::-1]


def sorting_network(size: int) -> list[tuple[int, int]]:
    """Comparator pairs of Batcher's odd-even merge sort for ``size`` elements (any size).

    Applying ``(i, j)`` as ``a[i], a[j] = min, max`` in order sorts ``a`` ascending.
    """
    pairs: list[tuple[int, int]] = []
    p = 1
    while p < size:
        k = p
        while k >= 1:
            for j in range(k % p, size - k, 2 * k):
                pairs.extend(
                    (i + j, i + j + k)
                    for i in range(min(k, size - j - k))
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p)
                )
            k //= 2
        p *= 2
    return pairs


def _nanmedian_last(values: np.ndarray) -> np.ndarray:
    # Integers are summed in float64, as np.median's mean does.
    if not np.issubdtype(values.dtype, np.floating):
        values = values.astype(np.float64)
    ordered = np.sort(values, axis=-1)
    count = np.count_nonzero(~np.isnan(ordered), axis=-1)[..., None]
    last = max(ordered.shape[-1] - 1, 0)
    low = np.take_along_axis(ordered, np.maximum(count - 1, 0) // 2, axis=-1)
    high = np.take_along_axis(ordered, np.minimum(count // 2, last), axis=-1)
    return ((low + high) / 2)[..., 0]


#: A date with more than this share of its pixels changed or invalid (an overcast date) is no
#: noise sample while enough cleaner dates remain (:func:`noise_sample_indices`): in a stack of 6
#: dates, 2 of them overcast, their clouds were the spread at every boat pixel of the others (each
#: date's own objects are left out of its samples) and the boats of the clear dates were lost.
MAX_SAMPLE_DIRT = 0.5
#: ... enough: two (one date gives no spread); with fewer the cleanest dates are taken whatever
#: their dirt.
MIN_CLEAN_SAMPLES = 2


def noise_sample_indices(
    radiometry: Radiometry, max_dates: int, min_dates: int = MIN_CLEAN_SAMPLES
) -> list[int]:
    """The cleanest dates (fewest changed pixels, never the reference) for the noise model.

    Clouds on a sample date inflate the spread wherever they lie, so the cleanest dates give
    the truest picture of ordinary date-to-date variation; ties keep time order. Dates more than
    ``MAX_SAMPLE_DIRT`` changed or invalid are left out while ``min_dates`` cleaner ones remain:
    in a short stack every date would otherwise be a sample, overcast ones too.

    Examples
    --------
    >>> rad = Radiometry("date", 0, np.ones((5, 1)), np.zeros((5, 1)), np.ones(5),
    ...                  np.array([0.0, 1.0, 0.01, 0.02, 0.9]), [])
    >>> noise_sample_indices(rad, 8)
    [2, 3]
    >>> noise_sample_indices(rad, 8, min_dates=3)
    [2, 3, 4]
    """
    n_time = radiometry.change_fraction.size
    dirt = radiometry.change_fraction + (1 - radiometry.valid_fraction)
    order = [int(t) for t in np.argsort(dirt, kind="stable") if t != radiometry.reference_index]
    clean = [t for t in order if dirt[t] <= MAX_SAMPLE_DIRT]
    chosen = clean if len(clean) >= min_dates else order[:min_dates]
    return sorted(chosen[:max_dates]) if n_time else []


def is_lazy(array: xr.DataArray) -> bool:
    """True when the array is backed by Dask."""
    return isinstance(array.data, da.Array)


# ---------------------------------------------------------------------------------------------
# Misregistration of each date against the reference.

#: Side (px) of the windows in which a date's shift against the reference is measured: two,
#: centred in the image's top-left and bottom-right quadrants (one, the whole image, where a side
#: is under twice this), fixed by the image shape, so that the chunking never changes a shift.
#: Measuring costs a fixed ~15 ms per date and window of 4 bands alone (several times that
#: inside annotate, beside the other thread), whatever the image size; all four quadrants gave
#: the same demo results at twice the cost. Windows of 128 px disagreed on most demo dates.
SHIFT_WINDOW = 256
#: Name of each date's shift ``(time, axis)`` in annotation outputs and in truth, and the
#: labels of its ``axis`` (not ``shift``: ``Dataset.shift`` is a method).
MISREGISTRATION = "misregistration"
SHIFT_AXES = ("y", "x")
#: The shift is measured to 1/SHIFT_UPSAMPLING px (upsampled cross-correlation).
SHIFT_UPSAMPLING = 20
#: Each window band is high-passed (minus its Gaussian blur of this sigma, px) before the
#: cross-correlation: clouds, haze and illumination are smooth and drop out, the edges that carry
#: the shift stay. On demo seeds 0-3 (64 dates, known shifts, against the reference's own offset)
#: the mean error fell from 0.08 px (phase correlation of the raw bands, pixel-locked towards
#: whole pixels: a true 0.45 px read 0.2-0.3) to 0.04 px, and none is off by more than 0.15 px
#: (15 were); sigmas of 2-8 px measured alike.
SHIFT_HIGH_PASS_SIGMA = 3.0
#: More than half of the (window, band) measurements must agree with their median within this
#: (px, median absolute deviation) for the shift to count; water alone, or a cloud over the
#: window, gives measurements scattered over the window.
SHIFT_AGREEMENT = 0.1
#: A window band is measured where at least this share of its pixels is valid in the date and the
#: reference.
SHIFT_VALID_SHARE = 0.5
# A window whose high-passed date varies less than this share of the reference's is flat.
SHIFT_MIN_TEXTURE = 0.01


def shift_windows(height: int, width: int) -> list[tuple[slice, slice]]:
    """The windows ``(rows, columns)`` in which :func:`estimate_shift` measures a date."""

    def spans(size: int) -> list[slice]:
        if size < 2 * SHIFT_WINDOW:
            return [slice(0, size)]
        starts = (round(size * quarter - SHIFT_WINDOW / 2) for quarter in (0.25, 0.75))
        return [slice(start, start + SHIFT_WINDOW) for start in starts]

    rows, columns = spans(height), spans(width)
    # The diagonal of the grid: opposite corners of the image, where a rotation or a local
    # distortion would make the two windows disagree.
    return (
        list(zip(rows, columns, strict=True))
        if len(rows) == len(columns)
        else list(itertools.product(rows, columns))
    )


def estimate_shift(
    dates: list[np.ndarray],
    references: list[np.ndarray],
    gain: np.ndarray,
    offset: np.ndarray,
    nodata: float | None,
) -> np.ndarray:
    """Sub-pixel shift ``(dy, dx)`` of one date against the reference, NaN where unknown.

    ``dates`` and ``references`` are the date's raw values and the reference's in the windows of
    :func:`shift_windows`, each ``(band, y, x)``. The date is normalised by ``gain`` and
    ``offset`` (``(band,)``), both are high-passed (``SHIFT_HIGH_PASS_SIGMA``) and
    cross-correlated per window and band (:func:`skimage.registration.phase_cross_correlation`,
    to 1/``SHIFT_UPSAMPLING`` px); the shift is their median. The date
    looks like the reference moved by ``(dy, dx)`` px (``scipy.ndimage.shift`` of it): a
    positive ``dy`` brought the content from the rows above.

    Returns NaN in both axes when fewer than two measurements could be made or when most of them
    disagree (``SHIFT_AGREEMENT``): the detection then allows a shift either way.
    """
    from skimage.registration import phase_cross_correlation

    measured = []
    for raw, reference in zip(dates, references, strict=True):
        values = normalise_values(raw[None], gain[None], offset[None], nodata)[0]
        for date_band, reference_band in zip(values, reference, strict=True):
            usable = np.isfinite(date_band) & np.isfinite(reference_band)
            if usable.mean() < SHIFT_VALID_SHARE:
                continue
            date_edges, reference_edges = (
                _high_pass(band, usable) for band in (date_band, reference_band)
            )
            # A flat window (a uniform cloud deck, a saturated or filled area) has nothing to
            # match: its rounding residue peaked at the correlation's corner (-0.75 px).
            texture = float(np.std(reference_edges))
            if not (texture > 0 and np.std(date_edges) > SHIFT_MIN_TEXTURE * texture):
                continue
            shift, _, _ = phase_cross_correlation(
                date_edges, reference_edges, upsample_factor=SHIFT_UPSAMPLING, normalization=None
            )
            measured.append(shift)
    unknown = np.full(2, np.nan)
    if len(measured) < 2:
        return unknown
    measured_array = np.asarray(measured, dtype=np.float64)
    median = np.median(measured_array, axis=0)
    deviation = np.median(np.abs(measured_array - median), axis=0)
    return median if bool((deviation <= SHIFT_AGREEMENT).all()) else unknown


def _high_pass(band: np.ndarray, usable: np.ndarray) -> np.ndarray:
    """``band`` minus its Gaussian blur, zero where not ``usable`` (float32)."""
    import cv2

    values = band.astype(np.float32)
    if not usable.all():
        # The window's typical value blurs into its neighbours without an edge; the unusable
        # pixels themselves then correlate with nothing.
        values[~usable] = np.median(values[usable])
    edges = values - cv2.GaussianBlur(values, (0, 0), SHIFT_HIGH_PASS_SIGMA)
    edges[~usable] = 0
    return edges


def date_shifts(stack: xr.DataArray, reference: xr.DataArray, radiometry: Radiometry) -> da.Array:
    """Lazy ``(time, 2)`` float64 shift of every date against ``reference`` (NaN: unknown).

    One small task per date (:func:`estimate_shift`) cuts the windows of :func:`shift_windows`
    from the date's blocks that the detection reads too, and takes the reference's same windows
    (computed once). Cut by the task itself: as Dask selections, rechunks and per-date
    arrays of gains, the windows were about 7 more tasks per date, each a scheduler round trip on
    a distributed worker.
    """
    stack = stack.transpose("time", "band", "y", "x")
    data = stack.data if isinstance(stack.data, da.Array) else da.from_array(stack.data)
    data = data.rechunk({0: 1, 1: -1})  # as the detection reads the dates: the same blocks
    reference_data = reference.transpose("band", "y", "x").data
    if not isinstance(reference_data, da.Array):
        reference_data = da.from_array(reference_data)
    windows = shift_windows(stack.sizes["y"], stack.sizes["x"])
    references = [
        reference_data[:, rows, columns].astype(np.float32).rechunk(-1) for rows, columns in windows
    ]
    starts = [np.cumsum((0, *sizes[:-1])) for sizes in data.chunks[2:]]
    # The blocks any window reaches, and where each starts in the image.
    needed = sorted(
        {
            (i, j)
            for rows, columns in windows
            for i, first in enumerate(starts[0])
            for j, left in enumerate(starts[1])
            if first < rows.stop and first + data.chunks[2][i] > rows.start
            if left < columns.stop and left + data.chunks[3][j] > columns.start
        }
    )
    origins = [(int(starts[0][i]), int(starts[1][j])) for i, j in needed]
    nodata = stack.attrs.get("nodata")
    nodata = None if nodata is None else float(nodata)
    name = f"shift_date-{tokenize(data, *references, radiometry.gains, radiometry.offsets)}"
    layer: dict[Any, Any] = {
        (name, t, 0): (
            _shift_date,
            [(data.name, t, 0, i, j) for i, j in needed],
            origins,
            windows,
            [(window.name, 0, 0, 0) for window in references],
            radiometry.gains[t],
            radiometry.offsets[t],
            nodata,
        )
        for t in range(data.numblocks[0])
    }
    graph = HighLevelGraph.from_collections(name, layer, dependencies=[data, *references])
    return da.Array(graph, name, (data.chunks[0], (2,)), meta=np.empty((0, 0), dtype=np.float64))


def _shift_date(
    blocks: list[np.ndarray],
    origins: list[tuple[int, int]],
    windows: list[tuple[slice, slice]],
    references: list[np.ndarray],
    gain: np.ndarray,
    offset: np.ndarray,
    nodata: float | None,
) -> np.ndarray:
    """:func:`estimate_shift` of one date from its blocks ``(1, band, y, x)`` starting at
    ``origins`` (image ``(y, x)``), as a ``(1, 2)`` block."""
    dates = []
    for rows, columns in windows:
        height, width = rows.stop - rows.start, columns.stop - columns.start
        window = np.empty((blocks[0].shape[1], height, width), dtype=blocks[0].dtype)
        for block, (first, left) in zip(blocks, origins, strict=True):
            top, bottom = max(rows.start, first), min(rows.stop, first + block.shape[2])
            start, stop = max(columns.start, left), min(columns.stop, left + block.shape[3])
            if top < bottom and start < stop:
                target = window[:, top - rows.start : bottom - rows.start]
                target[:, :, start - columns.start : stop - columns.start] = block[
                    0, :, top - first : bottom - first, start - left : stop - left
                ]
        dates.append(window)
    return estimate_shift(dates, references, gain, offset, nodata)[None]
