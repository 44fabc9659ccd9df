"""Synthetic harbour time stacks with exact ground truth.

:func:`make_harbour` writes what ``spoc-xr ingest`` reads -- one GeoTIFF per date -- plus a truth
store; :func:`render_harbour` returns the same scene in memory for tests and benchmarks. The scenes
are meant to be hard: textured land and water, a turbid plume, per-date illumination gain, seasonal
vegetation, sensor noise, sub-pixel misregistration, soft clouds with haze and displaced shadows,
boats of 2-35 px (some moored against quays, some with faint wakes, some dark hulls) and bright
boat-sized objects on land that are *not* boats.

Image files
-----------
``out_dir/images/harbour_YYYY-MM-DD.tif``: 4 bands described ``B02 B03 B04 B08``, reflectance
x 10000 as uint16 (real pixels >= 1, nodata = 0), EPSG:32631, 10 m pixels, origin
(500000, 4650000), tiled, DEFLATE. The acquisition time of day is in the ``TIFFTAG_DATETIME``
tag (``YYYY:MM:DD HH:MM:SS``).

Truth format
------------
Other tools and users may write truth in this format; :func:`read_truth` reads it.

* Zarr v3 store (``truth.zarr``) holding an xarray Dataset:

  ``boats`` : (time, y, x) int32
      Instance labels: 0 background, every boat on every date a distinct positive id, unique over
      the whole stack. A pixel belongs to a boat when the boat covers at least half of it. Boats
      under clouds stay in this layer (an evaluator should exclude them with ``clouds``).
  ``clouds`` : (time, y, x) uint8, optional
      1 where cloud (opacity of cloud and haze > 0.2) or cloud shadow (darkening > 15 %);
      absent means no cloud.
  ``water`` : (y, x) uint8, optional
      1 for open water (quays, piers and breakwaters are not water); absent means all water.
  ``misregistration`` : (time, axis) float32, optional
      Each date's true sub-pixel shift ``(dy, dx)`` in pixels (``axis`` = ``y``, ``x``): the
      date is the scene moved as ``scipy.ndimage.shift`` moves it by that vector. When present,
      the evaluation also scores the shifts that annotate measured (written under the same name).
  ``time`` : datetime64[ns] coordinate
      Equal to the image dates (with time of day).
  ``y``, ``x`` : float64 coordinates, optional
      Pixel-centre map coordinates of the image grid.

* Or a ``.npz`` file (or a directory holding ``truth.npz``) with arrays of the same names, where
  ``time`` holds ISO 8601 strings.
"""

from __future__ import annotations

import shutil
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.fft
import xarray as xr
from scipy import ndimage

from spoc_xr.errors import InputError, OutputError, ParameterError
from spoc_xr.reference import MISREGISTRATION, SHIFT_AXES

__all__ = [
    "BAND_NAMES",
    "HarbourScene",
    "TruthArrays",
    "cloud_layer",
    "make_boat_cutout",
    "make_harbour",
    "paste_objects",
    "read_truth",
    "render_harbour",
    "write_truth",
]

BAND_NAMES: tuple[str, ...] = ("B02", "B03", "B04", "B08")
N_BANDS = len(BAND_NAMES)
CRS_EPSG = 32631
PIXEL_SIZE_M = 10.0
ORIGIN_X = 500000.0
ORIGIN_Y = 4650000.0
START_DATE = np.datetime64("2023-03-01T10:30:21")
REVISIT_DAYS = 5
# Sentinel-2 sometimes misses a pass (or the lead drops a useless date); a 10-day gap now and then
# keeps downstream code from assuming an even time step.
SKIPPED_PASS_PROBABILITY = 0.15
# The scene is built around one harbour; smaller images cannot hold its piers and breakwater.
MIN_SIDE = 128
# Piers and breakwaters are rooted this far inside the land, and may run at most this much longer
# than planned to reach it (an irregular coast); further than that they are dropped.
PIER_ROOT_DEPTH = 4.0
PIER_MAX_EXTRA = 60.0
SUPPORTED_DTYPES = ("uint16", "int16", "float32")

# Boat geometry (pixels): 2x1 is a 20 x 10 m boat, 35x9 a 350 m ship.
MIN_BOAT_LENGTH = 2.0
MAX_BOAT_LENGTH = 35.0
BOAT_ASPECT = 4.0
MAX_BOAT_WIDTH = 9.0
# Boats are drawn from 4x super-resolved cut-outs so their edges are anti-aliased.
BOAT_CUTOUT_UPSAMPLE = 4
# A pixel joins a boat's truth instance when the boat covers at least this fraction of it.
TRUTH_COVERAGE = 0.5
BOATS_PER_DATE_512 = (10, 30)
FIRST_DATE_BOATS_512 = (3, 7)
# Largest sub-pixel misregistration between dates, in pixels.
MAX_SHIFT_PX = 0.6
# Sensor noise: Gaussian, relative part plus a floor (DN).
NOISE_RELATIVE = (0.01, 0.015)
NOISE_FLOOR_DN = 15.0
# Truth thresholds for clouds and shadows.
# A pixel whose reflectance is more than a fifth cloud (or haze) is cloud: at that opacity a
# 3000-8000 DN cloud adds 600-1600 DN, several times water's own reflectance, as Fmask would flag.
CLOUD_ALPHA_TRUTH = 0.2
SHADOW_DARKENING_TRUTH = 0.15

# Reflectance x 10000 for B02, B03, B04, B08.
WATER_SPECTRUM = np.array([750.0, 650.0, 400.0, 200.0])
SHALLOW_DELTA = np.array([120.0, 220.0, 140.0, 20.0])
PLUME_DELTA = np.array([220.0, 450.0, 500.0, 250.0])
CONCRETE_SPECTRUM = np.array([1750.0, 1800.0, 1900.0, 2050.0])
ROCK_SPECTRUM = np.array([1050.0, 1120.0, 1200.0, 1450.0])
SAND_SPECTRUM = np.array([1450.0, 1700.0, 1950.0, 2300.0])
SOIL_SPECTRUM = np.array([850.0, 1150.0, 1450.0, 2000.0])
VEG_SPECTRUM = np.array([380.0, 700.0, 480.0, 3300.0])
ASPHALT_SPECTRUM = np.array([850.0, 900.0, 950.0, 1050.0])


@dataclass(frozen=True)
class HarbourScene:
    """Where :func:`make_harbour` wrote a scene, and what it holds.

    Attributes
    ----------
    image_dir : Path
        Folder with the dated GeoTIFFs.
    truth_path : Path
        The truth Zarr store.
    dates : list of numpy.datetime64
        Acquisition date and time of each image, in order.
    n_boats : int
        Total boat instances over all dates.
    """

    image_dir: Path
    truth_path: Path
    dates: list[np.datetime64]
    n_boats: int


@dataclass(frozen=True)
class TruthArrays:
    """In-memory truth returned by :func:`render_harbour` (see the module docstring)."""

    boats: np.ndarray
    clouds: np.ndarray
    water: np.ndarray
    dates: list[np.datetime64]

    @property
    def n_boats(self) -> int:
        """Number of distinct boat instances over all dates."""
        ids = np.unique(self.boats)
        return int(np.count_nonzero(ids))


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def _fractal_noise(shape: tuple[int, int], rng: np.random.Generator, beta: float) -> np.ndarray:
    """Zero-mean, unit-variance noise with a 1/f**beta power spectrum (larger beta = smoother)."""
    white = rng.standard_normal(shape, dtype=np.float32)
    spec = scipy.fft.rfft2(white, workers=1)
    fy = np.fft.fftfreq(shape[0]).astype(np.float32)[:, None]
    fx = np.fft.rfftfreq(shape[1]).astype(np.float32)[None, :]
    freq = np.sqrt(fy * fy + fx * fx)
    freq[0, 0] = 1.0
    spec *= freq ** (-beta / 2.0)
    spec[0, 0] = 0.0
    out = scipy.fft.irfft2(spec, s=shape, workers=1).astype(np.float32)
    out -= out.mean()
    out /= out.std() + 1e-12
    return out


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def _segment_mask(
    shape: tuple[int, int], p0: np.ndarray, p1: np.ndarray, width: float
) -> np.ndarray:
    """Pixels whose centres lie in the rectangle of the given width around segment p0-p1."""
    from skimage.draw import polygon

    d = p1 - p0
    d = d / (np.hypot(*d) + 1e-12)
    n = np.array([d[1], -d[0]]) * width / 2.0
    corners = np.array([p0 + n, p1 + n, p1 - n, p0 - n])
    # Continuous coordinates put pixel (r, c) on [r, r+1); skimage uses pixel centres at (r, c).
    rr, cc = polygon(corners[:, 0] - 0.5, corners[:, 1] - 0.5, shape=shape)
    out = np.zeros(shape, dtype=bool)
    out[rr, cc] = True
    return out


def _root_on_land(
    land: np.ndarray, tip: np.ndarray, sea_dir: np.ndarray, max_back: float
) -> np.ndarray | None:
    """Walk back from a pier tip towards the land; return a point a little inside it, or None."""
    h, w = land.shape
    for step in np.arange(0.0, max_back, 1.0):
        p = tip - sea_dir * step
        r, c = int(p[0]), int(p[1])
        if not (0 <= r < h and 0 <= c < w):
            return None
        if land[r, c]:
            return p - sea_dir * PIER_ROOT_DEPTH
    return None


def _block_noise(shape: tuple[int, int], block: int, rng: np.random.Generator) -> np.ndarray:
    """Uniform [0, 1) values constant over block x block squares (roofs, plots)."""
    ny, nx = -(-shape[0] // block) + 1, -(-shape[1] // block) + 1
    vals = rng.random((ny, nx), dtype=np.float32)
    oy, ox = rng.integers(0, block, size=2)
    big = np.repeat(np.repeat(vals, block, axis=0), block, axis=1)
    return big[oy : oy + shape[0], ox : ox + shape[1]]


def _check_parameters(
    n_dates: int, shape: tuple[int, int], seed: int, cloud_fraction: float
) -> tuple[int, int]:
    if isinstance(n_dates, bool) or not isinstance(n_dates, int | np.integer) or n_dates < 1:
        raise ParameterError(f"n_dates={n_dates!r} must be a positive integer, e.g. n_dates=16.")
    try:
        h, w = (int(s) for s in shape)
    except (TypeError, ValueError):
        raise ParameterError(
            f"shape={shape!r} must be two integers (rows, columns), e.g. shape=(512, 512)."
        ) from None
    if h < MIN_SIDE or w < MIN_SIDE:
        raise ParameterError(
            f"shape={shape!r} is too small for a harbour; use at least ({MIN_SIDE}, {MIN_SIDE})."
        )
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ParameterError(f"seed={seed!r} must be a non-negative integer.")
    if not 0.0 <= float(cloud_fraction) <= 1.0:
        raise ParameterError(f"cloud_fraction={cloud_fraction!r} must lie in [0, 1].")
    return h, w


# --------------------------------------------------------------------------------------------
# Pasting objects
# --------------------------------------------------------------------------------------------


def _per_object(value: float | Sequence[float], n: int, name: str) -> np.ndarray:
    arr = (
        np.broadcast_to(np.asarray(value, dtype=np.float64), (n,))
        if np.ndim(value) == 0
        else (np.asarray(value, dtype=np.float64))
    )
    if arr.shape != (n,):
        raise ParameterError(f"{name} must be one value or one per object ({n}), got {arr.shape}.")
    return arr


def paste_objects(
    image: np.ndarray,
    masks: Sequence[np.ndarray],
    cutouts: Sequence[np.ndarray],
    positions: Sequence[tuple[float, float]] | np.ndarray,
    angles: Sequence[float] | np.ndarray,
    *,
    pixel_size: float | Sequence[float] = 1.0,
    opacity: float | Sequence[float] = 1.0,
    first_label: int = 1,
    min_coverage: float = TRUTH_COVERAGE,
    supersample: int = BOAT_CUTOUT_UPSAMPLE,
) -> tuple[np.ndarray, np.ndarray]:
    """Paste masked patches into an image at sub-pixel centres and arbitrary rotations.

    Each output pixel is sampled ``supersample x supersample`` times; the fraction of samples that
    fall on the patch mask is the object's coverage, and the pixel becomes
    ``(1 - opacity * coverage) * background + opacity * mean(mask * patch)``, so edges are
    anti-aliased. Later objects are drawn over earlier ones.

    Parameters
    ----------
    image : numpy.ndarray
        Background, shape (band, y, x); not modified.
    masks : sequence of numpy.ndarray
        One boolean (h, w) mask per object.
    cutouts : sequence of numpy.ndarray
        One (band, h, w) patch per object, in the image's units. The patch's column axis is the
        object's long axis.
    positions : sequence of (float, float)
        Object centres as (row, col) in continuous pixel coordinates: pixel (r, c) spans
        [r, r + 1) x [c, c + 1), so its centre is (r + 0.5, c + 0.5).
    angles : sequence of float
        Rotation in degrees, counter-clockwise as displayed (north up); 0 keeps the patch's
        columns along the image's x axis.
    pixel_size : float or sequence of float
        Size of one patch pixel in image pixels (0.25 for a 4x super-resolved patch).
    opacity : float or sequence of float
        1 replaces the background; smaller values blend (wakes, haze-like features).
    first_label : int
        Label of object 0; object k gets ``first_label + k``.
    min_coverage : float
        Coverage at which a pixel joins the object's label. An object inside the image that
        reaches it nowhere still gets its ``max(1, round(total coverage))`` best-covered pixels,
        so tiny objects are never lost.
    supersample : int
        Samples per pixel along each axis.

    Returns
    -------
    image : numpy.ndarray
        New float32 image (band, y, x).
    labels : numpy.ndarray
        int32 (y, x) instance labels, 0 where no object.

    Examples
    --------
    >>> img = np.zeros((1, 8, 8), dtype=np.float32)
    >>> out, lab = paste_objects(img, [np.ones((1, 3), bool)], [np.full((1, 1, 3), 5.0)],
    ...                          [(4.5, 4.5)], [0.0])
    >>> lab[4, 3:6].tolist(), float(out[0, 4, 4])
    ([1, 1, 1], 5.0)
    """
    image = np.asarray(image)
    if image.ndim != 3:
        raise ParameterError(f"image must be (band, y, x), got shape {image.shape}.")
    n = len(masks)
    positions = np.asarray(positions, dtype=np.float64).reshape(-1, 2) if n else np.zeros((0, 2))
    angles = np.asarray(angles, dtype=np.float64).reshape(-1)
    if len(cutouts) != n or len(positions) != n or len(angles) != n:
        raise ParameterError(
            f"paste_objects needs one cutout, position and angle per mask; got {n} masks, "
            f"{len(cutouts)} cutouts, {len(positions)} positions, {len(angles)} angles."
        )
    if supersample < 1:
        raise ParameterError(f"supersample={supersample} must be >= 1.")
    sizes = _per_object(pixel_size, n, "pixel_size")
    opac = _per_object(opacity, n, "opacity")
    out = image.astype(np.float32, copy=True)
    nb, ny, nx = out.shape
    labels = np.zeros((ny, nx), dtype=np.int32)
    s = int(supersample)
    for k in range(n):
        mask = np.asarray(masks[k], dtype=bool)
        patch = np.asarray(cutouts[k], dtype=np.float32)
        if mask.ndim != 2 or patch.shape != (nb, *mask.shape):
            raise ParameterError(
                f"object {k}: cutout shape {patch.shape} does not match image bands ({nb}) and "
                f"mask shape {mask.shape}; cutouts must be (band, h, w) with an (h, w) mask."
            )
        h, w = mask.shape
        cy, cx = positions[k]
        ps = sizes[k]
        reach = 0.5 * ps * np.hypot(h, w) + 1.0
        r0, r1 = max(int(np.floor(cy - reach)), 0), min(int(np.ceil(cy + reach)), ny)
        c0, c1 = max(int(np.floor(cx - reach)), 0), min(int(np.ceil(cx + reach)), nx)
        if r0 >= r1 or c0 >= c1:
            continue
        ys = r0 + (np.arange((r1 - r0) * s) + 0.5) / s - cy
        xs = c0 + (np.arange((c1 - c0) * s) + 0.5) / s - cx
        theta = np.deg2rad(angles[k])
        sin, cos = np.sin(theta), np.cos(theta)
        # Long axis (patch columns) points along (-sin, cos) in (y, x): y grows downwards.
        u = -ys[:, None] * sin + xs[None, :] * cos
        v = ys[:, None] * cos + xs[None, :] * sin
        col = np.floor(u / ps + w / 2.0).astype(np.int64)
        row = np.floor(v / ps + h / 2.0).astype(np.int64)
        valid = (col >= 0) & (col < w) & (row >= 0) & (row < h)
        col = np.where(valid, col, 0)
        row = np.where(valid, row, 0)
        inside = valid & mask[row, col]
        nr, nc = r1 - r0, c1 - c0
        cov = inside.reshape(nr, s, nc, s).mean(axis=(1, 3), dtype=np.float32)
        if not cov.any():
            continue
        vals = patch[:, row, col] * inside
        mean_vals = vals.reshape(nb, nr, s, nc, s).mean(axis=(2, 4), dtype=np.float32)
        a = np.float32(opac[k])
        region = out[:, r0:r1, c0:c1]
        region *= 1.0 - a * cov
        region += a * mean_vals
        sel = cov >= min_coverage
        if not sel.any():
            n_px = max(1, round(float(cov.sum())))
            best = np.argsort(cov, axis=None)[::-1][:n_px]
            best = best[cov.ravel()[best] > 0]
            sel = np.zeros(cov.size, dtype=bool)
            sel[best] = True
            sel = sel.reshape(cov.shape)
        labels[r0:r1, c0:c1][sel] = first_label + k
    return out, labels


def make_boat_cutout(
    length: float,
    width: float,
    spectrum: np.ndarray,
    *,
    rng: np.random.Generator,
    upsample: int = BOAT_CUTOUT_UPSAMPLE,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one synthetic boat as a super-resolved (patch, mask) pair for :func:`paste_objects`.

    The hull has a tapered bow (towards +columns) and, on larger boats, a brighter
    superstructure; paste it with ``pixel_size=1 / upsample``.

    Parameters
    ----------
    length, width : float
        Hull size in image pixels.
    spectrum : numpy.ndarray
        Hull reflectance per band (x 10000).
    rng : numpy.random.Generator
        Source of the small random details.
    upsample : int
        Patch pixels per image pixel.

    Returns
    -------
    patch : numpy.ndarray
        float32 (band, h, w).
    mask : numpy.ndarray
        bool (h, w).

    Examples
    --------
    >>> patch, mask = make_boat_cutout(8, 2, np.full(4, 2000.0), rng=np.random.default_rng(0))
    >>> patch.shape, mask.shape
    ((4, 8, 32), (8, 32))
    """
    if length <= 0 or width <= 0:
        raise ParameterError(f"boat length={length} and width={width} must be positive.")
    spectrum = np.asarray(spectrum, dtype=np.float32)
    hh = max(1, round(width * upsample))
    ww = max(1, round(length * upsample))
    u = (np.arange(ww) + 0.5) / ww  # 0 stern .. 1 bow
    v = (np.arange(hh) + 0.5) / hh * 2.0 - 1.0  # -1 .. 1 across
    half = np.ones_like(u)
    if length >= 6:
        # Bows taper over the last quarter of the hull.
        half = np.where(u > 0.75, 1.0 - 0.75 * (u - 0.75) / 0.25, 1.0)
    mask = np.abs(v)[:, None] <= half[None, :]
    patch = np.broadcast_to(spectrum[:, None, None], (spectrum.size, hh, ww)).copy()
    if length >= 8:
        # Superstructure: brighter block amidships, sometimes darker (shadowed or dark deck).
        gain = rng.uniform(1.1, 1.35) if rng.random() < 0.75 else rng.uniform(0.75, 0.9)
        us = rng.uniform(0.25, 0.45)
        cab = (u > us) & (u < us + rng.uniform(0.15, 0.35))
        cabv = np.abs(v) < 0.6
        patch[:, cabv[:, None] & cab[None, :]] *= gain
    patch *= rng.uniform(0.97, 1.03, size=(1, hh, ww)).astype(np.float32)
    return patch.astype(np.float32), mask


# --------------------------------------------------------------------------------------------
# Static scene
# --------------------------------------------------------------------------------------------


@dataclass
class _Pier:
    start: np.ndarray  # on land
    direction: np.ndarray  # unit, towards the sea
    length: float
    width: float


@dataclass
class _Scene:
    shape: tuple[int, int]
    base: np.ndarray  # (band, y, x) float32 surface without season or plume
    water: np.ndarray  # bool
    structure: np.ndarray  # bool: quays, piers, breakwater
    water_dist: np.ndarray  # float32 distance from water pixels to the nearest non-water pixel
    land_dist: np.ndarray  # float32 distance from non-water pixels to water
    veg_delta: np.ndarray  # (band, y, x) float32 fully-green minus bare spectrum (0 off fields)
    veg_texture: np.ndarray  # float32 greenness offset inside fields
    field_id: np.ndarray  # int32
    field_is_veg: np.ndarray  # bool per field
    plume: np.ndarray  # float32 weight 0..1
    piers: list[_Pier]
    routes: list[np.ndarray]
    harbour_centre: np.ndarray
    sea_dir: np.ndarray


def _build_scene(shape: tuple[int, int], rng: np.random.Generator) -> _Scene:
    h, w = shape
    size = float(max(h, w))
    scale = np.sqrt(h * w) / 512.0
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    yy += 0.5
    xx += 0.5

    # Coast: a tilted ramp plus smooth fractal noise, thresholded to 35-50 % land.
    theta = rng.uniform(0, 2 * np.pi)
    sea_dir = np.array([np.sin(theta), np.cos(theta)])
    ramp = ((yy - h / 2) * sea_dir[0] + (xx - w / 2) * sea_dir[1]) / size
    field_ = ramp + 0.22 * _fractal_noise(shape, rng, beta=3.4)
    land = field_ < np.quantile(field_, rng.uniform(0.35, 0.5))
    lab, nlab = ndimage.label(land)
    if nlab > 1:
        sizes = ndimage.sum_labels(land, lab, index=np.arange(1, nlab + 1))
        keep = np.zeros(nlab + 1, dtype=bool)
        keep[1:] = sizes >= 150 * scale**2
        land = keep[lab]
    lab, nlab = ndimage.label(~land)
    if nlab > 1:
        sizes = ndimage.sum_labels(~land, lab, index=np.arange(1, nlab + 1))
        lakes = np.zeros(nlab + 1, dtype=bool)
        lakes[1:] = sizes < 400 * scale**2
        land |= lakes[lab]

    # Harbour: on the mainland coast (the largest land mass) near the image centre.
    lab, nlab = ndimage.label(land)
    mainland = land
    if nlab > 1:
        mainland = lab == 1 + int(np.argmax(ndimage.sum_labels(land, lab, np.arange(1, nlab + 1))))
    coast = mainland & ndimage.binary_dilation(~land)
    cy, cx = np.nonzero(coast)
    target = np.array([h / 2, w / 2]) + rng.uniform(-0.12, 0.12, 2) * np.array([h, w])
    i = int(np.argmin((cy - target[0]) ** 2 + (cx - target[1]) ** 2))
    hc = np.array([cy[i] + 0.5, cx[i] + 0.5])
    tang = np.array([sea_dir[1], -sea_dir[0]])

    structure = np.zeros(shape, dtype=bool)
    rock = np.zeros(shape, dtype=bool)
    piers: list[_Pier] = []
    n_piers = int(rng.integers(3, 6))
    spacing = rng.uniform(24, 40) * min(scale, 1.5) ** 0.5
    pier_len_max = 0.0
    for k in range(n_piers):
        off = (k - (n_piers - 1) / 2) * spacing + rng.uniform(-3, 3)
        length = rng.uniform(30, 75) * min(scale, 1.5) ** 0.5
        width = rng.uniform(4, 10)
        tip = hc + tang * off + sea_dir * length
        start = _root_on_land(land, tip, sea_dir, length + PIER_MAX_EXTRA)
        if start is None:
            continue
        full = float(np.hypot(*(tip - start)))
        structure |= _segment_mask(shape, start, tip, width)
        piers.append(_Pier(start=start, direction=sea_dir.copy(), length=full, width=width))
        pier_len_max = max(pier_len_max, length)
    span = (n_piers - 1) * spacing
    # Quay front along the coast inside the harbour.
    dist_to_water = ndimage.distance_transform_edt(land)
    near_h = (yy - hc[0]) ** 2 + (xx - hc[1]) ** 2 < (span / 2 + 25) ** 2
    structure |= land & near_h & (dist_to_water <= rng.uniform(5, 9))
    # Breakwater: out from the coast on one side, then parallel to it, leaving a mouth.
    side = rng.choice([-1.0, 1.0])
    b1 = hc + tang * side * (span / 2 + 22) + sea_dir * (pier_len_max + 25)
    b0 = _root_on_land(land, b1, sea_dir, pier_len_max + 25 + PIER_MAX_EXTRA)
    if b0 is None:
        b0 = b1 - sea_dir * (pier_len_max + 35)
    b2 = b1 - tang * side * (span * 0.8 + 30)
    bw = rng.uniform(3, 6)
    rock |= _segment_mask(shape, b0, b1, bw) | _segment_mask(shape, b1, b2, bw)
    structure |= rock
    water = ~land & ~structure
    mouth = b2 - tang * side * 20 + sea_dir * 5

    base = np.empty((N_BANDS, h, w), dtype=np.float32)
    # Water: waves, shallow margin, and the dark sea.
    wave = _fractal_noise(shape, rng, beta=1.6)
    wdist = ndimage.distance_transform_edt(water).astype(np.float32)
    shallow = np.exp(-wdist / rng.uniform(6, 15))
    for b in range(N_BANDS):
        base[b] = WATER_SPECTRUM[b] * (1 + 0.03 * wave) + SHALLOW_DELTA[b] * shallow

    # Land cover: Voronoi fields, urban around the harbour, sand on open coast.
    n_seeds = max(8, int(h * w / 45.0**2))
    seeds = np.zeros(shape, dtype=bool)
    sy = rng.integers(0, h, n_seeds)
    sx = rng.integers(0, w, n_seeds)
    seeds[sy, sx] = True
    idx = ndimage.distance_transform_edt(~seeds, return_distances=False, return_indices=True)
    seed_index = np.full(shape, -1, dtype=np.int64)
    seed_index[sy, sx] = np.arange(n_seeds)
    field_id = seed_index[idx[0], idx[1]].astype(np.int32)
    n_fields = int(field_id.max()) + 1
    seed_pos = np.zeros((n_fields, 2))
    seed_pos[field_id[sy, sx]] = np.stack([sy, sx], axis=1)
    dist_h = np.hypot(seed_pos[:, 0] - hc[0], seed_pos[:, 1] - hc[1])
    r_urban = 0.2 * size
    cls = rng.choice(3, size=n_fields, p=[0.6, 0.25, 0.15])  # veg, soil, urban
    cls[dist_h < r_urban * rng.uniform(0.7, 1.3, n_fields)] = 2
    field_is_veg = cls == 0

    tex = _fractal_noise(shape, rng, beta=2.0)
    soil = (
        SOIL_SPECTRUM[:, None, None]
        * (1 + 0.08 * tex)[None]
        * rng.uniform(0.8, 1.2, n_fields)[field_id][None]
    )
    land_px = land & ~structure
    urban = land_px & (cls[field_id] == 2)
    fields = land_px & ~urban
    base[:, fields] = soil[:, fields]

    roof = 0.6 * _block_noise(shape, 3, rng) + 0.4 * _block_noise(shape, 7, rng)
    tint = _block_noise(shape, 5, rng)
    brightness = 500 + 2300 * roof
    urban_spec = np.stack(
        [
            brightness * 0.92,
            brightness * (0.95 + 0.05 * tint),
            brightness * (1.0 + 0.25 * (tint > 0.8)),
            brightness * (1.05 + 0.1 * tint),
        ]
    )
    gardens = (tint < 0.12) & (roof < 0.5)
    urban_spec[:, gardens] = (VEG_SPECTRUM * 0.8)[:, None]
    base[:, urban] = urban_spec[:, urban]
    # Roads: a few asphalt lines across the land.
    roads = np.zeros(shape, dtype=bool)
    for _ in range(int(rng.integers(2, 5) * max(scale, 1))):
        p0 = rng.uniform(0, 1, 2) * np.array([h, w])
        ang = rng.uniform(0, np.pi)
        d = np.array([np.sin(ang), np.cos(ang)]) * size
        roads |= _segment_mask(shape, p0 - d, p0 + d, rng.uniform(1.5, 3))
    roads &= land_px
    base[:, roads] = ASPHALT_SPECTRUM[:, None] * rng.uniform(0.9, 1.1)
    sand = (
        land_px
        & (dist_to_water <= rng.uniform(2, 5))
        & (_fractal_noise(shape, rng, beta=3.0) > 0)
        & ~near_h
    )
    base[:, sand] = SAND_SPECTRUM[:, None] * (1 + 0.05 * tex[sand])

    # Structures: concrete piers and quays with stains, rock breakwater.
    stain = 1 + 0.12 * _fractal_noise(shape, rng, beta=1.2)
    conc = structure & ~rock
    base[:, conc] = CONCRETE_SPECTRUM[:, None] * stain[conc] * rng.uniform(0.85, 1.15)
    rock_tex = 1 + 0.2 * rng.standard_normal(shape).astype(np.float32)
    base[:, rock] = ROCK_SPECTRUM[:, None] * rock_tex[rock]

    veg_delta = np.zeros_like(base)
    veg_fields = fields & field_is_veg[field_id]
    green = VEG_SPECTRUM[:, None] * (1 + 0.08 * tex[veg_fields]) * rng.uniform(0.8, 1.2)
    veg_delta[:, veg_fields] = green - base[:, veg_fields]
    veg_texture = (0.12 * _fractal_noise(shape, rng, beta=1.8)).astype(np.float32)

    # Turbid plume from a river mouth on the open coast, stretched seawards.
    coast_far = coast & ~near_h
    py, px = np.nonzero(coast_far if coast_far.any() else coast)
    j = int(rng.integers(0, py.size))
    p = np.array([py[j], px[j]], dtype=np.float64)
    along = (yy - p[0]) * sea_dir[0] + (xx - p[1]) * sea_dir[1]
    across = (yy - p[0]) * tang[0] + (xx - p[1]) * tang[1]
    r_plume = rng.uniform(0.1, 0.2) * size
    plume = np.exp(-((along / (2 * r_plume)) ** 2) - (across / r_plume) ** 2)
    plume *= np.clip(1 + 0.5 * _fractal_noise(shape, rng, beta=2.5), 0, None)
    plume = (np.clip(plume, 0, 1) * water).astype(np.float32)

    water_dist = ndimage.distance_transform_edt(water).astype(np.float32)
    land_dist = ndimage.distance_transform_edt(~water).astype(np.float32)
    routes = _make_routes(shape, water_dist, mouth, sea_dir, rng)
    return _Scene(
        shape=shape,
        base=base,
        water=water,
        structure=structure,
        water_dist=water_dist,
        land_dist=land_dist,
        veg_delta=veg_delta,
        veg_texture=veg_texture,
        field_id=field_id,
        field_is_veg=field_is_veg,
        plume=plume,
        piers=piers,
        routes=routes,
        harbour_centre=hc,
        sea_dir=sea_dir,
    )


def _make_routes(
    shape: tuple[int, int],
    water_dist: np.ndarray,
    mouth: np.ndarray,
    sea_dir: np.ndarray,
    rng: np.random.Generator,
) -> list[np.ndarray]:
    """2-4 shipping lanes: least-cost paths through water keeping clear of the shore."""
    from skimage.graph import MCP_Geometric

    h, w = shape
    clear = 6.0
    cost = np.where(water_dist >= clear, 1.0, np.where(water_dist > 0, 60.0, np.inf))
    edge = np.zeros(shape, dtype=bool)
    edge[[0, -1], :] = True
    edge[:, [0, -1]] = True
    ends = np.argwhere(edge & (water_dist >= clear))
    if ends.size == 0:
        return []
    ok = np.argwhere(water_dist >= clear)
    m = np.clip(np.round(mouth - 0.5).astype(int), 0, [h - 1, w - 1])
    start = tuple(ok[np.argmin(((ok - m) ** 2).sum(axis=1))])
    mcp = MCP_Geometric(cost)
    costs, _ = mcp.find_costs([start])
    # Water can be split (lakes, a closed bay): only edge points reachable from the start count.
    reach = ends[np.isfinite(costs[ends[:, 0], ends[:, 1]])]
    routes = []
    n_routes = int(rng.integers(2, 5))
    for k in range(n_routes):
        if (k == n_routes - 1 and n_routes > 2) or len(reach) == 0:
            # A coastal lane not through the harbour: between two edge points.
            a = tuple(ends[rng.integers(len(ends))])
            mcp2 = MCP_Geometric(cost)
            costs2, _ = mcp2.find_costs([a])
            reach2 = ends[np.isfinite(costs2[ends[:, 0], ends[:, 1]])]
            far = reach2[np.argmax(((reach2 - np.array(a)) ** 2).sum(axis=1))]
            path = np.array(mcp2.traceback(tuple(far)), dtype=np.float64)
        else:
            end = tuple(reach[rng.integers(len(reach))])
            path = np.array(mcp.traceback(end), dtype=np.float64)
        if len(path) < 10:
            continue
        # Smooth the stair-stepped path, keep every 4th vertex.
        sm = np.stack([ndimage.uniform_filter1d(path[:, i], 9, mode="nearest") for i in (0, 1)], 1)
        routes.append(sm[::4] + 0.5)
    return routes


# --------------------------------------------------------------------------------------------
# Plan: what appears on each date
# --------------------------------------------------------------------------------------------


@dataclass
class _Boat:
    cy: float
    cx: float
    length: float
    width: float
    angle: float  # degrees
    patch: np.ndarray
    mask: np.ndarray
    pixel_size: float
    wake: bool = False


@dataclass
class _DatePlan:
    boats: list[_Boat] = field(default_factory=list)
    land_objects: list[_Boat] = field(default_factory=list)
    shift: tuple[float, float] = (0.0, 0.0)
    gain: np.ndarray = field(default_factory=lambda: np.ones(N_BANDS))
    offset: np.ndarray = field(default_factory=lambda: np.zeros(N_BANDS))
    cloudy: bool = False
    haze_only: bool = False
    greenness: np.ndarray = field(default_factory=lambda: np.zeros(1))
    plume_strength: float = 1.0
    wave_amp: float = 0.02


@dataclass
class _Plan:
    dates: list[np.datetime64]
    days: list[_DatePlan]
    first_ids: list[int]
    shadow_dir: float


def _boat_spectrum(rng: np.random.Generator) -> np.ndarray:
    r = rng.random()
    if r < 0.15:
        # Dark hull: only a little brighter than water but > 4x the noise (~17 DN).
        c = rng.uniform(150, 350)
        return WATER_SPECTRUM + c * np.array([1.0, 1.0, 1.0, 1.4])
    if r < 0.4:
        colour = rng.uniform(0.6, 1.3, N_BANDS)
        base = rng.uniform(1200, 2600)
        return np.clip(base * colour, 1000, 3200) * np.array([1, 1, 1, 1.1])
    v = rng.uniform(1500, 3000)
    return v * np.array([1.0, 1.0, 1.0, rng.uniform(1.0, 1.2)])


def _boat_size(rng: np.random.Generator) -> tuple[float, float]:
    # Log-uniform: small boats are far more common than ships.
    length = float(np.exp(rng.uniform(np.log(MIN_BOAT_LENGTH), np.log(MAX_BOAT_LENGTH))))
    width = float(np.clip(length / BOAT_ASPECT * rng.uniform(0.8, 1.2), 1.0, MAX_BOAT_WIDTH))
    return length, width


def _footprint(cy: float, cx: float, length: float, width: float, angle: float) -> np.ndarray:
    """Sample points (every 0.5 px) on a boat rectangle, as (n, 2) (row, col)."""
    t = np.deg2rad(angle)
    eu = np.array([-np.sin(t), np.cos(t)])
    ev = np.array([np.cos(t), np.sin(t)])
    us = np.linspace(-length / 2 + 0.05, length / 2 - 0.05, max(2, int(np.ceil(length * 2)) + 1))
    vs = np.linspace(-width / 2 + 0.05, width / 2 - 0.05, max(2, int(np.ceil(width * 2)) + 1))
    uu, vv = np.meshgrid(us, vs)
    return np.array([cy, cx]) + uu.ravel()[:, None] * eu + vv.ravel()[:, None] * ev


def _fits_water(scene: _Scene, pts: np.ndarray, margin: float) -> bool:
    h, w = scene.shape
    edge = MAX_SHIFT_PX + 2.0
    if (
        pts[:, 0].min() < edge
        or pts[:, 1].min() < edge
        or pts[:, 0].max() > h - edge
        or pts[:, 1].max() > w - edge
    ):
        return False
    r = pts[:, 0].astype(int)
    c = pts[:, 1].astype(int)
    return bool((scene.water_dist[r, c] > margin).all())


def _fits_land(scene: _Scene, pts: np.ndarray) -> bool:
    h, w = scene.shape
    if pts.min() < 2 or pts[:, 0].max() > h - 2 or pts[:, 1].max() > w - 2:
        return False
    return bool((scene.land_dist[pts[:, 0].astype(int), pts[:, 1].astype(int)] > 1.0).all())


def _free(occupied: list[tuple[float, float, float]], cy: float, cx: float, r: float) -> bool:
    return all(np.hypot(cy - oy, cx - ox) > r + orad + 1.5 for oy, ox, orad in occupied)


def _new_boat(
    rng: np.random.Generator,
    cy: float,
    cx: float,
    length: float,
    width: float,
    angle: float,
    spectrum: np.ndarray,
    cutouts: Sequence[tuple[np.ndarray, np.ndarray]] | None,
    cutout_index: int | None,
) -> _Boat:
    if cutouts is not None and cutout_index is not None:
        patch, mask = cutouts[cutout_index]
        return _Boat(
            cy, cx, length, width, angle, np.asarray(patch, np.float32), np.asarray(mask, bool), 1.0
        )
    patch, mask = make_boat_cutout(length, width, spectrum, rng=rng)
    return _Boat(cy, cx, length, width, angle, patch, mask, 1.0 / BOAT_CUTOUT_UPSAMPLE)


def _pick_size(
    rng: np.random.Generator, cutouts: Sequence[tuple[np.ndarray, np.ndarray]] | None
) -> tuple[float, float, int | None]:
    if cutouts:
        k = int(rng.integers(len(cutouts)))
        mh, mw = np.asarray(cutouts[k][1]).shape
        return float(max(mh, mw)), float(min(mh, mw)), k
    length, width = _boat_size(rng)
    return length, width, None


def _try_moored(
    scene: _Scene, rng: np.random.Generator, length: float, width: float
) -> tuple[float, float, float] | None:
    if not scene.piers:
        return None
    for _ in range(30):
        pier = scene.piers[int(rng.integers(len(scene.piers)))]
        d = pier.direction
        n = np.array([d[1], -d[0]]) * rng.choice([-1.0, 1.0])
        along = rng.uniform(length / 2, pier.length - length / 2) if pier.length > length else -1
        if along < 0:
            continue
        gap = rng.uniform(0.05, 0.4)
        c = pier.start + d * along + n * (pier.width / 2 + width / 2 + gap)
        angle = float(np.rad2deg(np.arctan2(-d[0], d[1]))) + rng.choice([0.0, 180.0])
        if _fits_water(scene, _footprint(c[0], c[1], length, width, angle), 0.0):
            return float(c[0]), float(c[1]), angle
    return None


def _try_route(
    scene: _Scene, rng: np.random.Generator, length: float, width: float
) -> tuple[float, float, float] | None:
    if not scene.routes:
        return None
    for _ in range(20):
        route = scene.routes[int(rng.integers(len(scene.routes)))]
        seg = np.diff(route, axis=0)
        seglen = np.hypot(seg[:, 0], seg[:, 1])
        cum = np.concatenate([[0], np.cumsum(seglen)])
        s = rng.uniform(0, cum[-1])
        i = int(np.clip(np.searchsorted(cum, s) - 1, 0, len(seg) - 1))
        f = (s - cum[i]) / max(seglen[i], 1e-9)
        p = route[i] + f * seg[i]
        tdir = seg[i] / max(seglen[i], 1e-9)
        p = p + np.array([tdir[1], -tdir[0]]) * rng.normal(0, 4.0)
        angle = float(np.rad2deg(np.arctan2(-tdir[0], tdir[1])) + rng.normal(0, 6))
        angle += float(rng.choice([0.0, 180.0]))
        if _fits_water(scene, _footprint(p[0], p[1], length, width, angle), 0.7):
            return float(p[0]), float(p[1]), angle
    return None


def _try_anchored(
    scene: _Scene, rng: np.random.Generator, length: float, width: float
) -> tuple[float, float, float] | None:
    h, w = scene.shape
    for _ in range(30):
        if rng.random() < 0.5:
            # Anchorage off the harbour mouth.
            c = scene.harbour_centre + scene.sea_dir * rng.uniform(60, 160) + rng.normal(0, 40, 2)
        else:
            c = rng.uniform(0, 1, 2) * np.array([h, w])
        angle = rng.uniform(0, 360)
        if _fits_water(scene, _footprint(c[0], c[1], length, width, angle), 1.0):
            return float(c[0]), float(c[1]), angle
    return None


def _land_object(scene: _Scene, rng: np.random.Generator) -> _Boat | None:
    h, w = scene.shape
    length = float(np.exp(rng.uniform(np.log(2.0), np.log(20.0))))
    width = float(np.clip(length / rng.uniform(2, 4), 1.0, 7.0))
    for _ in range(20):
        # Most on or near the quays (containers, cranes), the rest anywhere on land (cars, works).
        if rng.random() < 0.6:
            c = scene.harbour_centre + rng.normal(0, 40, 2)
        else:
            c = rng.uniform(0, 1, 2) * np.array([h, w])
        angle = rng.uniform(0, 360)
        if _fits_land(scene, _footprint(c[0], c[1], length, width, angle)):
            spec = _boat_spectrum(rng)
            if spec[0] < 1100:
                spec = spec + 1200.0
            patch, mask = make_boat_cutout(length, width, spec, rng=rng)
            return _Boat(c[0], c[1], length, width, angle, patch, mask, 1 / BOAT_CUTOUT_UPSAMPLE)
    return None


def _make_plan(
    scene: _Scene,
    n_dates: int,
    cloud_fraction: float,
    rng: np.random.Generator,
    cutouts: Sequence[tuple[np.ndarray, np.ndarray]] | None,
) -> _Plan:
    h, w = scene.shape
    area_scale = h * w / 512.0**2
    steps = np.where(rng.random(n_dates) < SKIPPED_PASS_PROBABILITY, 2 * REVISIT_DAYS, REVISIT_DAYS)
    steps[0] = 0
    seconds = rng.integers(0, 20, n_dates)
    dates = [
        START_DATE + np.timedelta64(int(d), "D") + np.timedelta64(int(s), "s")
        for d, s in zip(np.cumsum(steps), seconds, strict=True)
    ]

    n_cloudy = min(round(cloud_fraction * n_dates), n_dates - 1)
    if cloud_fraction > 0 and n_dates > 1:
        n_cloudy = max(n_cloudy, 1)
    cloudy = set((rng.permutation(n_dates - 1)[:n_cloudy] + 1).tolist())

    n_fields = scene.field_is_veg.size
    g0 = rng.uniform(0.2, 0.8, n_fields)
    rate = rng.uniform(-0.1, 0.6, n_fields)
    harvest = np.where(rng.random(n_fields) < 0.25, rng.integers(1, max(n_dates, 2), n_fields), -1)
    season_len = max(n_dates - 1, 1)

    # Persistent boats: (first date, last date, boat).
    persistent: list[tuple[int, int, _Boat]] = []
    days: list[_DatePlan] = []
    first_ids: list[int] = []
    next_id = 1
    land_pool = [o for o in (_land_object(scene, rng) for _ in range(int(8 * area_scale))) if o]

    for t in range(n_dates):
        lo, hi = FIRST_DATE_BOATS_512 if t == 0 else BOATS_PER_DATE_512
        # Small test scenes still get a couple of boats per date.
        target = max(1 if t == 0 else 2, round(rng.uniform(lo, hi) * area_scale))
        occ: list[tuple[float, float, float]] = []
        boats = [b for t0, t1, b in persistent if t0 <= t <= t1]
        occ = [(b.cy, b.cx, b.length / 2) for b in boats]
        kinds = rng.choice(
            ["moored", "anchored", "route"], size=max(target - len(boats), 0), p=[0.3, 0.2, 0.5]
        )
        for kind in kinds:
            length, width, ci = _pick_size(rng, cutouts)
            if kind == "moored":
                pos = _try_moored(scene, rng, length, width)
                dur = int(rng.integers(2, 6))
            elif kind == "anchored":
                pos = _try_anchored(scene, rng, length, width)
                dur = int(rng.integers(1, 7))
            else:
                pos = _try_route(scene, rng, length, width) or _try_anchored(
                    scene, rng, length, width
                )
                dur = 1
            if pos is None:
                continue
            t1 = min(t + dur - 1, n_dates - 1)
            # A persistent boat must be clear of every boat it will share a date with.
            others = [
                (b.cy, b.cx, b.length / 2) for t0, tt1, b in persistent if t0 <= t1 and tt1 >= t
            ]
            if not _free(occ + others, pos[0], pos[1], length / 2):
                continue
            boat = _new_boat(
                rng, pos[0], pos[1], length, width, pos[2], _boat_spectrum(rng), cutouts, ci
            )
            boat.wake = kind == "route" and dur == 1 and rng.random() < 0.4
            occ.append((pos[0], pos[1], length / 2))
            boats.append(boat)
            if dur > 1:
                persistent.append((t, t1, boat))
        first_ids.append(next_id)
        next_id += len(boats)

        land_objects = [o for o in land_pool if rng.random() < 0.5]
        extra = [_land_object(scene, rng) for _ in range(int(rng.integers(2, 7) * area_scale))]
        land_objects += [o for o in extra if o is not None]

        season = t / season_len
        green = np.clip(g0 + rate * season, 0.05, 0.95)
        green = np.where((harvest >= 0) & (t >= harvest), 0.08, green)
        green = np.where(scene.field_is_veg, green, 0.0)
        is_cloudy = t in cloudy
        days.append(
            _DatePlan(
                boats=boats,
                land_objects=land_objects,
                shift=(0.0, 0.0) if t == 0 else tuple(rng.uniform(-MAX_SHIFT_PX, MAX_SHIFT_PX, 2)),
                gain=rng.uniform(0.75, 1.25) * rng.uniform(0.95, 1.05, N_BANDS),
                offset=rng.uniform(-40, 40, N_BANDS),
                cloudy=is_cloudy,
                haze_only=(not is_cloudy) and t > 0 and cloud_fraction > 0 and rng.random() < 0.2,
                greenness=green.astype(np.float32),
                plume_strength=float(rng.uniform(0.3, 1.2)),
                wave_amp=float(rng.uniform(0.01, 0.05)),
            )
        )
    if days:
        # The first date is the cleanest: neutral gain, no haze.
        days[0].gain = np.ones(N_BANDS)
        days[0].offset = np.zeros(N_BANDS)
        days[0].wave_amp = 0.015
    return _Plan(dates=dates, days=days, first_ids=first_ids, shadow_dir=rng.uniform(0, 2 * np.pi))


# --------------------------------------------------------------------------------------------
# Rendering one date
# --------------------------------------------------------------------------------------------


def cloud_layer(
    shape: tuple[int, int],
    rng: np.random.Generator,
    *,
    shadow_dir: float,
    cloudy: bool = True,
    haze: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Draw one date's soft clouds, haze and cloud shadows.

    Clouds are thresholded smooth fractal noise (5-40 % cover) with a soft 10-30 px edge; their
    shadows are the cloud opacity moved 10-40 px towards ``shadow_dir``; haze is a thin, smooth
    veil. Combine them as :func:`render_harbour` does: darken by ``shadow``, then blend towards
    the cloud spectrum by ``1 - (1 - alpha) * (1 - haze)``.

    Parameters
    ----------
    shape : tuple of int
        (rows, columns).
    rng : numpy.random.Generator
        Source of randomness (the draws are the same as :func:`render_harbour`'s).
    shadow_dir : float
        Direction from clouds to their shadows, radians (0 = +x, pi/2 = +y).
    cloudy : bool
        Draw clouds and shadows; otherwise ``alpha`` and ``shadow`` are zero.
    haze : bool
        Draw haze; otherwise it is zero.

    Returns
    -------
    alpha : numpy.ndarray
        float32 cloud opacity in [0, 1].
    texture : numpy.ndarray
        float32 cloud brightness factor (about 0.8-1.2; ones without clouds).
    haze : numpy.ndarray
        float32 haze opacity in [0, 0.35].
    shadow : numpy.ndarray
        float32 shadow darkening in [0, 0.6].

    Examples
    --------
    >>> a, tex, hz, sh = cloud_layer((128, 128), np.random.default_rng(0), shadow_dir=1.0)
    >>> a.shape, bool(a.max() > 0.5), bool(sh.max() > 0)
    ((128, 128), True, True)
    """
    alpha: np.ndarray = np.zeros(shape, dtype=np.float32)
    texture: np.ndarray = np.ones(shape, dtype=np.float32)
    dark: np.ndarray = np.zeros(shape, dtype=np.float32)
    if cloudy:
        noise = _fractal_noise(shape, rng, beta=3.2)
        cover = rng.uniform(0.05, 0.40)
        blob = noise > np.quantile(noise, 1 - cover)
        sd = ndimage.distance_transform_edt(blob) - ndimage.distance_transform_edt(~blob)
        ramp = rng.uniform(10, 30)
        alpha = _smoothstep(sd.astype(np.float32) / ramp + 0.5).astype(np.float32)
        texture = 0.8 + 0.2 * _fractal_noise(shape, rng, beta=2.2)
        ang = shadow_dir + rng.normal(0, 0.15)
        dist = rng.uniform(10, 40)
        sh = ndimage.shift(alpha, (dist * np.sin(ang), dist * np.cos(ang)), order=1, cval=0.0)
        dark = rng.uniform(0.3, 0.6) * sh.astype(np.float32)
    veil: np.ndarray = np.zeros(shape, dtype=np.float32)
    if haze:
        hn = _fractal_noise(shape, rng, beta=3.0)
        hmax = rng.uniform(0.1, 0.35)
        veil = (hmax * _smoothstep((hn - rng.uniform(-0.2, 0.8)) / 1.5)).astype(np.float32)
    return alpha, texture, veil, dark


def _cloud_layers(
    shape: tuple[int, int], rng: np.random.Generator, plan: _Plan, day: _DatePlan
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Cloud opacity, cloud brightness texture, haze opacity and shadow darkening."""
    return cloud_layer(
        shape,
        rng,
        shadow_dir=plan.shadow_dir,
        cloudy=day.cloudy,
        haze=day.cloudy or day.haze_only,
    )


def _render_date(
    scene: _Scene, plan: _Plan, t: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render one date: (band, y, x) float32 image, int32 boat labels and uint8 cloud truth."""
    day = plan.days[t]
    rng = np.random.default_rng([seed, 1, t])
    img = scene.base.copy()
    g = day.greenness[scene.field_id] + scene.veg_texture
    np.clip(g, 0.0, 1.0, out=g)
    img += scene.veg_delta * g[None]
    wave = _fractal_noise(scene.shape, rng, beta=1.4)
    wf = (1 + day.wave_amp * wave) * scene.water + (~scene.water)
    img *= wf[None]
    img += (day.plume_strength * scene.plume)[None] * PLUME_DELTA[:, None, None].astype(np.float32)

    if day.land_objects:
        lo = day.land_objects
        img, _ = paste_objects(
            img,
            [o.mask for o in lo],
            [o.patch for o in lo],
            [(o.cy, o.cx) for o in lo],
            [o.angle for o in lo],
            pixel_size=[o.pixel_size for o in lo],
        )
    dy, dx = day.shift
    if dy or dx:
        for b in range(N_BANDS):
            img[b] = ndimage.shift(img[b], (dy, dx), order=1, mode="nearest")

    boats = day.boats
    wakes = [b for b in boats if b.wake]
    if wakes:
        masks, patches, pos, angs = [], [], [], []
        for boat in wakes:
            wl = boat.length * rng.uniform(1.0, 3.0)
            ww = max(boat.width * 1.5, 1.0)
            m = np.ones((max(1, round(ww * 2)), max(1, round(wl * 2))), dtype=bool)
            fade = np.linspace(0.2, 1.0, m.shape[1], dtype=np.float32)  # faint far behind
            lift = rng.uniform(80, 250)
            p = (WATER_SPECTRUM[:, None, None] + lift * fade[None, None, :]) * np.ones(m.shape)
            th = np.deg2rad(boat.angle)
            # Behind the stern: the stern is at -u, and u points along (-sin, cos).
            back = np.array([np.sin(th), -np.cos(th)]) * (boat.length + wl) / 2
            masks.append(m)
            patches.append(p.astype(np.float32))
            pos.append((boat.cy + dy + back[0], boat.cx + dx + back[1]))
            angs.append(boat.angle)
        img, _ = paste_objects(img, masks, patches, pos, angs, pixel_size=0.5, opacity=0.6)
    img, labels = paste_objects(
        img,
        [b.mask for b in boats],
        [b.patch for b in boats],
        [(b.cy + dy, b.cx + dx) for b in boats],
        [b.angle for b in boats],
        pixel_size=[b.pixel_size for b in boats],
        first_label=plan.first_ids[t],
    )

    alpha, texture, haze, dark = _cloud_layers(scene.shape, rng, plan, day)
    clouds = np.zeros(scene.shape, dtype=np.uint8)
    if day.cloudy or day.haze_only:
        img *= (1.0 - dark)[None]
        total = 1.0 - (1.0 - alpha) * (1.0 - haze)
        level = rng.uniform(3000, 8000)
        cloud_spec = (level * np.array([1.05, 1.02, 1.0, 0.97], dtype=np.float32))[:, None, None]
        img *= (1.0 - total)[None]
        img += total[None] * cloud_spec * texture[None]
        clouds = ((total > CLOUD_ALPHA_TRUTH) | (dark > SHADOW_DARKENING_TRUTH)).astype(np.uint8)

    img *= day.gain.astype(np.float32)[:, None, None]
    img += day.offset.astype(np.float32)[:, None, None]
    sigma = np.sqrt(NOISE_FLOOR_DN**2 + (rng.uniform(*NOISE_RELATIVE) * np.abs(img)) ** 2)
    img += sigma * rng.standard_normal(img.shape, dtype=np.float32)
    np.clip(img, 1.0, None, out=img)
    return img.astype(np.float32, copy=False), labels, clouds


def _prepare(
    n_dates: int,
    shape: tuple[int, int],
    seed: int,
    cloud_fraction: float,
    boat_cutouts: Sequence[tuple[np.ndarray, np.ndarray]] | None,
) -> tuple[_Scene, _Plan]:
    h, w = _check_parameters(n_dates, shape, seed, cloud_fraction)
    if boat_cutouts is not None:
        for i, (patch, mask) in enumerate(boat_cutouts):
            if np.asarray(patch).shape != (N_BANDS, *np.asarray(mask).shape):
                raise ParameterError(
                    f"boat_cutouts[{i}]: patch {np.asarray(patch).shape} must be "
                    f"({N_BANDS}, h, w) matching its (h, w) mask {np.asarray(mask).shape}."
                )
            if max(np.asarray(mask).shape) > MAX_BOAT_LENGTH:
                raise ParameterError(
                    f"boat_cutouts[{i}] is {np.asarray(mask).shape} px; boats are at most "
                    f"{MAX_BOAT_LENGTH:g} px long at 10 m. Crop or downsample it."
                )
    rng = np.random.default_rng([int(seed), 0])
    scene = _build_scene((h, w), rng)
    plan = _make_plan(scene, int(n_dates), float(cloud_fraction), rng, boat_cutouts)
    return scene, plan


def render_harbour(
    *,
    n_dates: int = 16,
    shape: tuple[int, int] = (512, 512),
    seed: int = 0,
    cloud_fraction: float = 0.3,
    boat_cutouts: Sequence[tuple[np.ndarray, np.ndarray]] | None = None,
) -> tuple[np.ndarray, TruthArrays]:
    """Render a synthetic harbour stack in memory.

    Parameters
    ----------
    n_dates : int
        Number of dates (first 2023-03-01, then about every 5 days).
    shape : tuple of int
        (rows, columns), each at least 128.
    seed : int
        Seed; the same seed gives the same stack.
    cloud_fraction : float
        About this fraction of dates get clouds (never the first).
    boat_cutouts : sequence of (patch, mask), optional
        Real boat cut-outs, (4, h, w) reflectance x 10000 with an (h, w) bool mask at 10 m, long
        axis along columns; when given, every boat is one of them instead of a synthetic hull.

    Returns
    -------
    images : numpy.ndarray
        float32 (time, band, y, x), reflectance x 10000 before quantisation (>= 1).
    truth : TruthArrays
        Boats, clouds, water and dates (see the module docstring).

    Examples
    --------
    >>> images, truth = render_harbour(n_dates=2, shape=(128, 128), seed=1)
    >>> images.shape, truth.boats.shape
    ((2, 4, 128, 128), (2, 128, 128))
    """
    scene, plan = _prepare(n_dates, shape, seed, cloud_fraction, boat_cutouts)
    h, w = scene.shape
    images = np.empty((n_dates, N_BANDS, h, w), dtype=np.float32)
    boats = np.empty((n_dates, h, w), dtype=np.int32)
    clouds = np.empty((n_dates, h, w), dtype=np.uint8)
    for t in range(n_dates):
        images[t], boats[t], clouds[t] = _render_date(scene, plan, t, int(seed))
    truth = TruthArrays(
        boats=boats, clouds=clouds, water=scene.water.astype(np.uint8), dates=list(plan.dates)
    )
    return images, truth


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def _quantise(img: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "float32":
        return np.clip(img, 1.0, None).astype(np.float32)
    top = np.iinfo(dtype).max
    return np.clip(np.rint(img), 1, top).astype(dtype)


def _grid_coords(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    h, w = shape
    y = ORIGIN_Y - (np.arange(h) + 0.5) * PIXEL_SIZE_M
    x = ORIGIN_X + (np.arange(w) + 0.5) * PIXEL_SIZE_M
    return y, x


def _write_geotiff(path: Path, data: np.ndarray, date: np.datetime64) -> None:
    import rasterio
    from rasterio.crs import CRS
    from rasterio.transform import Affine

    _, h, w = data.shape
    block = 256 if min(h, w) >= 256 else 128
    profile = {
        "driver": "GTiff",
        "height": h,
        "width": w,
        "count": N_BANDS,
        "dtype": data.dtype.name,
        "crs": CRS.from_epsg(CRS_EPSG),
        "transform": Affine(PIXEL_SIZE_M, 0.0, ORIGIN_X, 0.0, -PIXEL_SIZE_M, ORIGIN_Y),
        "nodata": 0,
        "tiled": True,
        "blockxsize": block,
        "blockysize": block,
        "compress": "deflate",
        "predictor": 3 if data.dtype.kind == "f" else 2,
    }
    stamp = np.datetime_as_string(date, unit="s").replace("-", ":").replace("T", " ")
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
        for i, name in enumerate(BAND_NAMES, start=1):
            dst.set_band_description(i, name)
        dst.update_tags(TIFFTAG_DATETIME=stamp)


def _truth_dataset(
    boats: np.ndarray,
    clouds: np.ndarray,
    water: np.ndarray | None,
    dates: Sequence[np.datetime64],
    y: np.ndarray | None,
    x: np.ndarray | None,
    shifts: np.ndarray | None = None,
) -> xr.Dataset:
    time = np.asarray(dates, dtype="datetime64[ns]")
    data_vars: dict[str, tuple[tuple[str, ...], np.ndarray]] = {
        "boats": (("time", "y", "x"), np.asarray(boats, dtype=np.int32)),
        "clouds": (("time", "y", "x"), np.asarray(clouds, dtype=np.uint8)),
    }
    if water is not None:
        data_vars["water"] = (("y", "x"), np.asarray(water, dtype=np.uint8))
    coords: dict[str, np.ndarray] = {"time": time}
    if shifts is not None:
        data_vars[MISREGISTRATION] = (("time", "axis"), np.asarray(shifts, dtype=np.float32))
        # Object strings: numpy's fixed-width ones have no Zarr v3 data type (zarr warns).
        coords["axis"] = np.array(SHIFT_AXES, dtype=object)
    if y is not None and x is not None:
        coords["y"] = np.asarray(y, dtype=np.float64)
        coords["x"] = np.asarray(x, dtype=np.float64)
    ds = xr.Dataset(data_vars, coords=coords)
    ds.attrs["description"] = "spoc_xr truth: boats instance labels, clouds incl. shadow, water"
    return ds


def _zarr_encoding(ds: xr.Dataset) -> dict[str, dict[str, object]]:
    h, w = ds.sizes["y"], ds.sizes["x"]
    enc: dict[str, dict[str, object]] = {
        name: {"chunks": (1, h, w)} for name in ("boats", "clouds") if name in ds
    }
    # Seconds keep the time of day exact and let later dates be appended with the same units.
    enc["time"] = {"units": "seconds since 1970-01-01", "dtype": "int64"}
    return enc


def _prepare_output(path: Path, overwrite: bool, what: str) -> None:
    if path.exists():
        if not overwrite:
            raise OutputError(
                f"{what} {path} already exists; pass overwrite=True or choose another path."
            )
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def write_truth(
    path: str | Path,
    *,
    boats: np.ndarray,
    clouds: np.ndarray,
    water: np.ndarray,
    dates: Sequence[np.datetime64],
    overwrite: bool = False,
    y: np.ndarray | None = None,
    x: np.ndarray | None = None,
    shifts: np.ndarray | None = None,
) -> Path:
    """Write truth arrays to a Zarr v3 store in the format of the module docstring.

    Parameters
    ----------
    path : str or Path
        Store to create.
    boats : numpy.ndarray
        (time, y, x) integer instance labels.
    clouds : numpy.ndarray
        (time, y, x) 0/1 cloud-or-shadow mask.
    water : numpy.ndarray
        (y, x) 0/1 water mask.
    dates : sequence of numpy.datetime64
        One per time step.
    overwrite : bool
        Replace an existing store instead of raising :class:`OutputError`.
    y, x : numpy.ndarray, optional
        Pixel-centre map coordinates.
    shifts : numpy.ndarray, optional
        (time, 2) true misregistration of each date in pixels, ``(dy, dx)``: the date is the
        scene moved as ``scipy.ndimage.shift(scene, (dy, dx))`` moves it. Stored as
        ``misregistration (time, axis)``; :func:`spoc_xr.evaluate.evaluate` then scores the
        measured shifts.

    Returns
    -------
    Path
        The store written.

    Examples
    --------
    >>> import tempfile
    >>> b = np.zeros((1, 4, 4), np.int32); b[0, 1, 1] = 1
    >>> p = write_truth(Path(tempfile.mkdtemp()) / "t.zarr", boats=b, clouds=b * 0,
    ...                 water=np.ones((4, 4)), dates=[np.datetime64("2023-03-01")])
    >>> int(read_truth(p).boats.max())
    1
    """
    path = Path(path)
    boats = np.asarray(boats)
    clouds = np.asarray(clouds)
    water = np.asarray(water)
    if boats.ndim != 3 or clouds.shape != boats.shape or water.shape != boats.shape[1:]:
        raise ParameterError(
            f"truth shapes disagree: boats {boats.shape}, clouds {clouds.shape} must be "
            f"(time, y, x) and water {water.shape} must be (y, x)."
        )
    if len(dates) != boats.shape[0]:
        raise ParameterError(f"{len(dates)} dates given for {boats.shape[0]} time steps.")
    if not np.issubdtype(boats.dtype, np.integer):
        raise ParameterError(f"boats must hold integer labels, got dtype {boats.dtype}.")
    if shifts is not None:
        shifts = np.asarray(shifts, dtype=np.float64)
        if shifts.shape != (boats.shape[0], 2) or not np.isfinite(shifts).all():
            raise ParameterError(
                f"shifts must be finite (time, 2) pixels, one (dy, dx) per date; got shape "
                f"{shifts.shape} for {boats.shape[0]} dates."
            )
    _prepare_output(path, overwrite, "Truth store")
    ds = _truth_dataset(boats, clouds, water, dates, y, x, shifts)
    ds.to_zarr(path, mode="w", zarr_format=3, consolidated=False, encoding=_zarr_encoding(ds))
    return path


#: The dims each array of a truth ``.npz`` must have.
NPZ_DIMS = {
    "boats": ("time", "y", "x"),
    "clouds": ("time", "y", "x"),
    "water": ("y", "x"),
    MISREGISTRATION: ("time", "axis"),
}


def _open_npz(path: Path) -> xr.Dataset:
    if path.is_file() and not zipfile.is_zipfile(path):
        # np.load would take it for a pickle and say so, which tells the user nothing.
        raise InputError(
            f"truth file {path} is not a .npz archive; write one with numpy.savez(path, "
            "boats=..., time=..., clouds=...)"
        )
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read truth file {path}: {exc}") from exc
    if "time" not in arrays or "boats" not in arrays:
        raise InputError(
            f"truth file {path} needs arrays 'boats' (time, y, x) and 'time' (ISO strings); "
            f"it has {sorted(arrays)}."
        )
    try:
        time = np.asarray(arrays["time"]).astype("datetime64[ns]")
    except ValueError as exc:
        raise InputError(f"truth file {path}: 'time' must hold ISO 8601 strings ({exc}).") from exc
    data_vars: dict[str, tuple[tuple[str, ...], np.ndarray]] = {}
    for name, dims in NPZ_DIMS.items():
        if name not in arrays:
            continue
        if arrays[name].ndim != len(dims):
            raise InputError(
                f"truth file {path}: {name!r} has shape {arrays[name].shape}, but must be "
                f"({', '.join(dims)}); store one such array"
            )
        data_vars[name] = (dims, arrays[name])
    coords: dict[str, np.ndarray] = {"time": time}
    for c in ("y", "x"):
        if c in arrays:
            coords[c] = arrays[c]
    try:
        return xr.Dataset(data_vars, coords=coords)
    except ValueError as exc:
        sizes = {name: arrays[name].shape for name in data_vars}
        raise InputError(
            f"truth file {path}: the arrays' sizes do not fit together ({sizes}, time "
            f"{arrays['time'].shape}); give every array the same number of dates and pixels"
        ) from exc


def read_truth(path: str | Path) -> xr.Dataset:
    """Read truth written by :func:`write_truth`, :func:`make_harbour` or by hand.

    Parameters
    ----------
    path : str or Path
        A truth Zarr store, a ``.npz`` file, or a folder holding ``truth.zarr`` or
        ``truth.npz`` (such as the ``out_dir`` of :func:`make_harbour`).

    Returns
    -------
    xarray.Dataset
        ``boats`` int32 (time, y, x), ``clouds`` uint8 (time, y, x) (zeros when absent),
        ``water`` uint8 (y, x) (ones when absent), ``time`` datetime64[ns]. Zarr-backed variables
        stay lazy.

    Examples
    --------
    >>> import tempfile
    >>> scene = make_harbour(tempfile.mkdtemp(), n_dates=2, shape=(128, 128))
    >>> read_truth(scene.truth_path).boats.dims
    ('time', 'y', 'x')
    """
    p = Path(path)
    if p.is_dir() and not (p / "zarr.json").exists() and not (p / ".zgroup").exists():
        if (p / "truth.zarr").exists():
            p = p / "truth.zarr"
        elif (p / "truth.npz").exists():
            p = p / "truth.npz"
        else:
            raise InputError(
                f"{p} is neither a truth Zarr store nor a folder holding truth.zarr or truth.npz."
            )
    if not p.exists():
        raise InputError(f"truth path {p} does not exist.")
    if p.suffix == ".npz":
        ds = _open_npz(p)
    else:
        try:
            ds = xr.open_zarr(p, consolidated=False)
        except Exception as exc:  # zarr raises many types for a bad store
            raise InputError(f"cannot open truth store {p}: {exc}") from exc
    if "boats" not in ds or ds["boats"].dims != ("time", "y", "x"):
        raise InputError(f"truth {p} needs a 'boats' variable with dims (time, y, x).")
    if not np.issubdtype(ds["boats"].dtype, np.integer):
        raise InputError(f"truth {p}: 'boats' must hold integer labels, not {ds['boats'].dtype}.")
    if not np.issubdtype(ds["time"].dtype, np.datetime64):
        raise InputError(f"truth {p}: 'time' must be datetimes, not {ds['time'].dtype}.")
    ds["boats"] = ds["boats"].astype(np.int32)
    if "clouds" in ds:
        if ds["clouds"].dims != ("time", "y", "x"):
            raise InputError(f"truth {p}: 'clouds' must have dims (time, y, x).")
        ds["clouds"] = ds["clouds"].astype(np.uint8)
    else:
        ds["clouds"] = xr.zeros_like(ds["boats"], dtype=np.uint8)
    if "water" in ds:
        if ds["water"].dims != ("y", "x"):
            raise InputError(f"truth {p}: 'water' must have dims (y, x).")
        ds["water"] = ds["water"].astype(np.uint8)
    else:
        ds["water"] = xr.ones_like(ds["boats"].isel(time=0, drop=True), dtype=np.uint8)
    if MISREGISTRATION in ds:
        shifts = ds[MISREGISTRATION]
        if shifts.dims != ("time", "axis") or shifts.sizes["axis"] != len(SHIFT_AXES):
            raise InputError(
                f"truth {p}: '{MISREGISTRATION}' must have dims (time, axis) with "
                f"{len(SHIFT_AXES)} values per date (dy, dx), not {dict(shifts.sizes)}; fix it or "
                "leave it out (shifts are then not scored)"
            )
        if not np.issubdtype(shifts.dtype, np.number):
            raise InputError(f"truth {p}: '{MISREGISTRATION}' must be numbers, not {shifts.dtype}.")
    ds["time"] = ds["time"].astype("datetime64[ns]")
    return ds


def make_harbour(
    out_dir: str | Path,
    *,
    n_dates: int = 16,
    shape: tuple[int, int] = (512, 512),
    seed: int = 0,
    cloud_fraction: float = 0.3,
    overwrite: bool = False,
    dtype: str = "uint16",
    boat_cutouts: Sequence[tuple[np.ndarray, np.ndarray]] | None = None,
) -> HarbourScene:
    """Write a synthetic harbour stack: one GeoTIFF per date plus a truth Zarr store.

    Dates are rendered and written one at a time, so memory stays bounded for long, large stacks.

    Parameters
    ----------
    out_dir : str or Path
        Output folder; gets ``images/harbour_YYYY-MM-DD.tif`` and ``truth.zarr``.
    n_dates, shape, seed, cloud_fraction, boat_cutouts
        As in :func:`render_harbour`.
    overwrite : bool
        Replace earlier output in ``out_dir`` instead of raising :class:`OutputError`.
    dtype : str
        File data type: "uint16" (default), "int16" or "float32"; values are reflectance x
        10000, real pixels >= 1, nodata 0.

    Returns
    -------
    HarbourScene
        Paths, dates and the number of boat instances.

    Examples
    --------
    >>> import tempfile
    >>> scene = make_harbour(tempfile.mkdtemp(), n_dates=2, shape=(128, 128), seed=3)
    >>> sorted(p.name for p in scene.image_dir.iterdir())[0]
    'harbour_2023-03-01.tif'
    """
    if dtype not in SUPPORTED_DTYPES:
        raise ParameterError(f"dtype={dtype!r} is not supported; use one of {SUPPORTED_DTYPES}.")
    _check_parameters(n_dates, shape, seed, cloud_fraction)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OutputError(f"out_dir {out} is a file; give a folder path.")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise OutputError(
            f"out_dir {out} is not empty; pass overwrite=True to replace its scene or choose "
            "an empty folder."
        )
    scene, plan = _prepare(n_dates, shape, seed, cloud_fraction, boat_cutouts)
    image_dir = out / "images"
    truth_path = out / "truth.zarr"
    for p in (image_dir, truth_path):
        _prepare_output(p, True, "Output")
    image_dir.mkdir(parents=True)
    y, x = _grid_coords(scene.shape)
    n_boats = 0
    for t, date in enumerate(plan.dates):
        img, labels, clouds = _render_date(scene, plan, t, int(seed))
        name = f"harbour_{np.datetime_as_string(date, unit='D')}.tif"
        _write_geotiff(image_dir / name, _quantise(img, dtype), date)
        n_boats += int(np.count_nonzero(np.unique(labels)))
        ds = _truth_dataset(
            labels[None],
            clouds[None],
            scene.water if t == 0 else None,
            [date],
            y,
            x,
            np.asarray([plan.days[t].shift]),
        )
        if t == 0:
            ds.to_zarr(
                truth_path,
                mode="w",
                zarr_format=3,
                consolidated=False,
                encoding=_zarr_encoding(ds),
            )
        else:
            ds.drop_vars(["y", "x", "axis"]).to_zarr(
                truth_path, append_dim="time", zarr_format=3, consolidated=False
            )
    return HarbourScene(
        image_dir=image_dir, truth_path=truth_path, dates=list(plan.dates), n_boats=n_boats
    )
