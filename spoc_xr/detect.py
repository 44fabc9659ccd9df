"""Change detection: every date against the reference, lazily, one fused task per chunk.

The method (each step chosen for a failure of the textbook version measured on harbour scenes):

1. Radiometric normalisation: each date is mapped onto the reference by a per-band gain and offset
   (fitted robustly in :mod:`spoc_xr.reference`), so illumination changes do not light up the scene.
2. Tolerance instead of blurring: a date pixel is compared with the *range* of the reference in its
   ``tolerance``-pixel neighbourhood (min and max filters of the reference), so sub-pixel
   misregistration of edges is not a change, while a 2-3 px boat, never blurred, still is.
   Along an axis where a date is measured as shifted (:func:`spoc_xr.reference.estimate_shift`,
   :func:`shift_reach`), the top of the range comes only from the side its content came from
   where the other side is a bright edge (a quay), so a boat moored against it still shows.
3. A per-pixel noise scale from the time series (robust spread of the normalised dates around the
   reference, smoothed by a k×k median filter, lowered where the range of step 2 already explains
   it): vegetation, surf and unstable edges need a larger change than calm water. The excess over
   the range, in units of that scale, is the change score.
4. Local background: haze and cloud bodies raise the score over wide areas. A local median of the
   score (wider than twice any ship) is the wide change; what stands out of it by the threshold
   (``auto``: a fixed number of noise scales) and by several local spreads (a constant false-alarm
   rate where the change is textured) is a small-object candidate. Candidates keep only crisp
   objects (their surroundings changed much less than they did; inside a cloud body, stood out of
   the cloud's own change much less than they did), up to MAX_SMALL_EXTENT px long; isolated
   single pixels need twice the threshold, and next to haze or a cloud body five times.
5. Morphology for the large class: the wide change above the threshold, closed (joins soft edges
   and haze fragments) then opened with an ``open_size`` square (removes anything narrower, so no
   boat is ever large): clouds, shadows, construction, flooding; of what the closing added, only
   pixels that changed (or lie deep inside an object) stay. A pixel that brightened by less than
   a share of the room up to the date's own cloud brightness is thin haze, not a cloud; a pixel
   darkened in one band alone is no shadow; snow (SWIR fell while visible light rose) is
   neither; the wide change must be dense in pixels that pass these tests, so that no sparse
   speckle is closed into an object. Small objects take precedence, so a boat seen through haze
   stays a boat.

Everything after the reference products runs in one task per (date, tile), on tiles
padded by the depth the chain needs, so a chunked result equals the unchunked one exactly.
"""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, cast

import dask
import dask.array as da
import numpy as np
import xarray as xr
from dask.array.overlap import ensure_minimum_chunksize
from dask.base import tokenize
from dask.highlevelgraph import HighLevelGraph

from spoc_xr import kernels
from spoc_xr.compiled import compiled as _compiled
from spoc_xr.errors import ParameterError
from spoc_xr.reference import compare_exchange_row, middle_network, sorting_network

# Change scores are in units of the per-pixel noise scale: at 6 scales beyond the reference's
# neighbourhood range, Gaussian noise false alarms are ~1e-9 per pixel and band.
AUTO_THRESHOLD = 6.0
# Ships are at most ~60 m wide (6 px at 10 m); anything that survives an opening by a 15 px square
# (150 m) is far wider than any ship.
DEFAULT_OPEN_SIZE = 15
# Misregistration tolerated without a change, as a window side in pixels (1 px each way).
DEFAULT_TOLERANCE = 3
# Local background window: a 35 x 9 px ship covers less than half of 31 x 31, so the median
# ignores it.
DEFAULT_BACKGROUND_SIZE = 31
# A small object must exceed its local background by this many local spreads (CFAR).
CFAR_FACTOR = 6.0
# Small objects longer than this (px) are not boats or planes but wakes, roads or edges. Ships
# moored side by side or bow to stern join into one object far longer than one ship, and the real
# sen2ships labels reach 53 px: at 48 px (session 19) such objects were dropped whole (36 of the
# 5,899 true boats of the seed-0 port stacks are longer), real ships on the real date among them.
# Session 20, 48 -> 64 / 80 / 96 / 200 px: ports seed 0 real-date recall
# algiers 0.815 -> 0.926, athens 0.896 -> 0.938 / 0.979 (80 and above), gdynia 0.950 -> 1.000;
# boat F1 up at 6 of 8 ports, held-out seed 1 up at all 8 (0.002-0.006); precision unchanged
# everywhere, even at 200 px. Each pixel of it widens every tile's halo by one.
MAX_SMALL_EXTENT = 80
# Pixels of context an object's test needs beyond the object (its 2 px ring plus neighbours).
SMALL_CONTEXT = 6
# Mean change 2 px around a small object must stay below this share of its peak.
SHARPNESS = 0.15
# Inside a cloud body (the ring's mean local background above CLOUD_BODY_LEVEL x the threshold) the
# ring's change is the cloud's own: a hull seen through it keeps a crisp edge over that background,
# so the ring may instead add at most CLOUD_BODY_SHARPNESS x the object's peak over the background.
# Measured with levels of 2-3.3 thresholds and shares of 0.05-0.1 alike (demo recall 0.808 ->
# 0.817, boat F1 up or equal on all 8 ports); at 1 threshold haze fringes pass (hedland F1 0.938 ->
# 0.918).
CLOUD_BODY_LEVEL = 3.0
CLOUD_BODY_SHARPNESS = 0.1
# Within HAZE_WINDOW px (a square side) of a local background above HAZE_LEVEL x the threshold, a
# small object needs HAZE_FACTOR x the threshold: scattered cloud puffs around haze and cloud
# bodies look like boats. 211 px (~1 km each way at 10 m: puffs scatter that far around cumulus
# and haze). Session 10, from 91 px (the best of 31-121 in session 5, on the demo and four ports):
# boat F1 at 151 / 181 / 211 / 241 px, demo seed 0 0.885 -> 0.898 / 0.902 / 0.909 / 0.906, seeds
# 1-3 up to 0.920 / 0.915 / 0.806 from 0.894 / 0.911 / 0.808; at 211 px the 16 port stacks (seeds
# 0 and 1) gained up to 0.022 (busan seed 1), casablanca lost 0.003-0.005, athens seed 1 0.001,
# real-date recall unchanged. It widens every tile's halo (124 -> 184 px).
HAZE_LEVEL = 0.5
#: A surface change, not a cloud or shadow: a band rose while one whose range's top is this many
#: times lower fell (see :func:`change_direction`). Above 1 so that bands alike in the reference
#: (where the order is the noise's) never make one; soil to vegetation in the demo harbour is 1.5,
#: vegetation's NIR to red 3-8.
SURFACE_BAND_RATIO = 1.2
HAZE_FACTOR = 5.0
HAZE_WINDOW = 211
# ... unless the pixel rose in NIR by more than HULL_NIR_RATIO x its largest rise in visible light:
# a veil of cloud or haze adds nearly grey light (or bluish: scattering), so over dark water it
# rises about as much in visible light as in NIR (ratio ~1.1 for a grey cloud over clear water),
# while a hull over water, which absorbs NIR, rises more in NIR. Measured 1.0, 1.1, 1.2, 1.25,
# 1.3 on demo seeds 0-3 (F1 at 1.0 fell by 0.03-0.04: veils pass; 1.2-1.3 alike) and the 8 ports.
HULL_NIR_RATIO = 1.25
# A wide change is a cloud, shadow or other large object only where it is also large in absolute
# terms: at least this many noise floors (the floor is half the band's typical noise scale, the
# same for every pixel of the scene). Calm water has a tiny noise scale, so thin haze over it is
# many of its own noise scales without being opaque; measured on the scene's floor, thin haze over
# water and over land compare alike.
LARGE_MAGNITUDE = 32.0
# Thin haze is no cloud: a cloud's truth is the share of the pixel's light that comes from the
# cloud (Fmask-like masks flag more than about a fifth). Where a pixel brightened, that share is
# estimated as its rise over the reference divided by the room left up to the date's own cloud
# brightness (the BRIGHT_QUANTILE of the normalised date's band mean, see
# :func:`spoc_xr.reference.brightness_levels`): below THIN_OPACITY the pixel is thin haze, however
# many noise scales it rose (a veil of 0.05 over a 40 % reflectance cloud date adds 2 %, tens of
# calm water's noise scales). Only where the reference is in the darker part of the date's range
# (room above THIN_ROOM_SHARE of the date's dark-to-bright span): over a surface as bright as the
# cloud the share cannot be told. Measured 0.10, 0.12, 0.15, 0.20: 0.15 best on 7 of 8 ports.
THIN_OPACITY = 0.15
THIN_ROOM_SHARE = 0.5
# The large class's wide change must be supported by at least this share of qualifying pixels
# (cell median over the background's window): a sparse speckle of pixels that pass (a radiometric
# residue over calm water, 3 % of its pixels) would otherwise be closed into a solid mass and
# kept as a cloud's interior. 0.5 also cut real haze-cloud edges.
LARGE_DENSITY = 0.25
# The share is taken on the log-quantised cell median (1/16 octave steps): on this scale (0-64)
# its steps are ~3 % of a share.
DENSITY_STEPS = 64.0
# A shadow dims every band by the same share of what the surface reflects: a pixel whose largest
# excess is a darkening seen in fewer than this many bands (one noise scale below the range) is a
# radiometric residue of one band (e.g. SWIR over water), not a shadow.
SHADOW_BANDS = 2
# Snow is no cloud: it is as bright as a cloud in visible light but absorbs shortwave infrared, so
# where snow falls on the ground the SWIR drops while visible light soars; a veil of cloud adds
# light in SWIR as well (water clouds are 0.2-0.5 there), a shadow dims visible light too. A pixel
# whose SWIR fell below its range by more than a noise scale and by more than SNOW_SWIR_SHARE of
# the range's bottom, while a visible band rose by more than SNOW_RISE_RATIO times that, is snow,
# a surface change (:func:`change_direction`), if the date's own snow index (brightest visible
# band against that SWIR band, normalised difference of the values as stored: on a date mostly
# under snow the radiometric fit maps snow onto the reference, its gains at their limits) also
# exceeds SNOW_INDEX: a thick cloud over bright desert (SWIR 0.45 -> 0.38, visible 0.25 -> 0.7)
# passes the first test, but its index is 0.3 where snow's is 0.6-0.9. Real Landsat stack (red,
# NIR, SWIR1; SWIR 1,296 -> 639 and red 344 -> 3,834 in the medians on Fmask's snow): cloud IoU
# 0.617 -> 0.746 (SWIR normalised as :func:`_snow_rows` says; a ratio of 3 gave 0.682, 2 0.721,
# 0.5 0.748, 0 0.750: the snowy dates' fits lower visible light's gain too). Ice clouds absorb
# SWIR as snow does; no test without thermal tells them apart.
SNOW_SWIR_SHARE = 0.1
SNOW_RISE_RATIO = 1.0
SNOW_INDEX = 0.4
#: Band names (lower case) of visible light: Sentinel-2's coastal, blue, green and red bands and
#: plain words. Landsat's numbered bands are left out: "B4" is red on Landsat 8, NIR on Landsat 5/7.
VISIBLE_NAMES = frozenset({"b01", "b02", "b03", "b04", "coastal", "blue", "green", "red"})
#: Band names (lower case) of near infrared, Sentinel-2 and Landsat style and plain words.
NIR_NAMES = ("b08", "b8a", "nir", "nir08", "b8", "b5_nir", "nir1")
#: Band names (lower case) of shortwave infrared, SWIR1 (1.6 um) first, as the water index
#: prefers it (:func:`spoc_xr.products.choose_water_index`), and for the snow test
#: (:func:`swir_bands`): Sentinel-2's and plain words only. "B6" is SWIR on Landsat 8-9, but red
#: edge on Sentinel-2 (unpadded) and thermal on Landsat 4-7, where clouds (cold) fall as snow
#: does: taken for SWIR, every cloud would read as snow, and MNDWI would find no water.
SWIR_NAMES = ("b11", "swir1", "swir", "swir16", "swir_1", "b12", "swir2", "swir22", "swir_2")
# An isolated single pixel needs this multiple of the threshold.
ISOLATED_FACTOR = 2.0
# Scores are capped here (noise scales) before quantisation; nothing real is above it.
SCORE_CEILING = 65535.0
LOG_STEPS_PER_OCTAVE = 16
MAD_TO_SIGMA = 1.4826
# The local background and spread are computed on cells of this side (px), anchored on the
# image grid: wide and smooth quantities need no full-resolution median.
BACKGROUND_CELL = 4
# The comparators that place the two middle values of a cell's pixels (local_background's spread).
_CELL_NETWORK = np.asarray(middle_network(BACKGROUND_CELL**2), dtype=np.int64).reshape(-1, 2)
# Noise scale floor, as a share of the band's typical scale: quantised calm water can show a spread
# of ~0 over a few dates, which would make any flicker an object.
NOISE_FLOOR_SHARE = 0.5
# Dates that feed the per-pixel noise model; a bounded number keeps memory per task constant.
NOISE_DATES = 8
# The noise model leaves out a sample date at a pixel where that date departs from the reference
# like an object: by more than OBJECT_FACTOR x its local median departure (over the local
# background's window, so that a ship covering less than half of it is no part of that median)
# and by more than OBJECT_FACTOR residual scales. A ship moored on half the sample dates
# otherwise became the pixel's noise and hid itself on every date (real-date recall of the
# semi-real ports built with seed 2: athens 0.729 -> 0.854, busan and algiers 0.778 -> 0.852 and
# 0.815). Measured 4, 5, 6 and 8: athens and busan (seed 2) alike (F1 0.938-0.943, 0.886-0.895);
# the demo's cloud IoU 0.799 at 4-5, 0.802 at 8 (as before): the noise floor, a median over the
# image, falls with every pixel whose spread falls, and thin haze at the magnitude test follows.
OBJECT_FACTOR = 8.0
# ... unless fewer than this many dates would be left: pixels that depart on most dates are
# variable, not occupied.
MIN_NOISE_DATES = 3
# A date measured as shifted against the reference by more than this (px) along an axis
# (:func:`spoc_xr.reference.estimate_shift`) is compared, along that axis, with the reference on
# the side its content came from only: a boat moored against a bright quay on the other side is
# then no misregistered quay. Measured with 0.1, 0.15, 0.2 and 0.25 on the demo harbour, seeds
# 0-3 (with both sides of the range narrowed): 0.2 raised boat F1 on all four; 0.1 lost precision
# (seed 1: 0.953 -> 0.867) on a date measured 0.1 px off. As used (the top only, EDGE_CONTRAST):
# 0.912 / 0.922 / 0.917 / 0.816 -> 0.931 / 0.927 / 0.927 / 0.853. Session 13 measures shifts to
# about 0.04 px (high-passed bands): still 0.2 (0.1 and 0.15 again lost seed 1's precision,
# 0.954 -> 0.842 / 0.877). The temporal-median reference is blurrier than any one date, so a
# sharp date about as placed as the reference is brighter than it at a bright edge's foot: that
# is no shift, and only the whole window explains it.
SHIFT_MARGIN = 0.2
# Only the top of the range is narrowed so (what a bright edge explains), and only where the
# side left out is brighter than the rest of the window by more than EDGE_CONTRAST noise scales
# (a quay): elsewhere the noise model, measured against the whole window, must keep it. The
# bottom stays: narrowed, a thin bright structure in the reference (a mast, a moored ship's rail)
# absent on the date became a false boat (athens, seed 0: precision 0.987 -> 0.971).
EDGE_CONTRAST = 3.0
# A date measured as shifted by at least REALIGN_FROM px along an axis is compared with the
# reference moved by the nearest whole pixels (at most MAX_REALIGN), and the rest of its shift
# is left to the tolerance window as above: a window of radius 1 explains about a pixel, so a
# date 1-2 px off (a probe: (1, 1) and (0, 2) px, measured exactly) lined every coast and field
# edge with false objects (precision 0.99 -> 0.63). From 0.75 px: the demo's and the port
# stacks' dates, shifted by up to 0.6 px and aligned by the window as before, keep their masks.
REALIGN_FROM = 0.75
MAX_REALIGN = 4
# Mask codes.
CLEAR, SMALL, LARGE, INVALID = 0, 1, 2, 255
FLAG_VALUES = [CLEAR, SMALL, LARGE]
FLAG_MEANINGS = "clear small_object large_object"


def window_cells(size: int) -> int:
    """Side, in grid cells (odd), of the cell median that stands for a ``size`` px window."""
    return -(-size // BACKGROUND_CELL) | 1


#: Pixels of the tolerance window on each side of a pixel: ``(above, below, left, right)``.
Reach = tuple[int, int, int, int]


def shift_reach(shift: np.ndarray | Sequence[float] | None, radius: int) -> Reach:
    """Which sides of the tolerance window (``radius`` px) can explain a date shifted by ``shift``.

    A date whose content moved down (``dy`` > ``SHIFT_MARGIN``) took it from the rows above:
    only those, and the pixel's own row, are within reach; likewise for every side. An unknown
    (NaN) or small shift keeps the whole window.

    Examples
    --------
    >>> shift_reach((0.5, 0.0), 1)
    (1, 0, 1, 1)
    >>> shift_reach(None, 1)
    (1, 1, 1, 1)
    """
    if shift is None or not np.isfinite(np.asarray(shift, dtype=np.float64)).all():
        return (radius,) * 4
    dy, dx = (float(value) for value in np.asarray(shift, dtype=np.float64).reshape(2))
    return (
        radius if dy > -SHIFT_MARGIN else 0,
        radius if dy < SHIFT_MARGIN else 0,
        radius if dx > -SHIFT_MARGIN else 0,
        radius if dx < SHIFT_MARGIN else 0,
    )


def whole_pixel_shift(shift: np.ndarray | Sequence[float] | None) -> tuple[int, int]:
    """The whole pixels ``(dy, dx)`` by which a date shifted by ``shift`` is realigned.

    Each axis measured at least ``REALIGN_FROM`` px off moves by its nearest whole number of
    pixels; an unknown (NaN) or smaller shift does not move, and neither does a date measured
    further off than ``MAX_REALIGN`` along an axis: that is rather a date mostly under cloud
    (its clouds correlated, not the ground) than a misregistration that small.

    Examples
    --------
    >>> whole_pixel_shift((1.1, -0.4))
    (1, 0)
    >>> whole_pixel_shift((-2.6, 4.2))
    (-3, 4)
    >>> whole_pixel_shift((0.0, 9.0)), whole_pixel_shift(None)
    ((0, 0), (0, 0))
    """
    values = np.asarray(np.nan if shift is None else shift, dtype=np.float64).reshape(-1)
    if values.size != 2 or not np.isfinite(values).all():
        return (0, 0)
    if np.round(np.abs(values)).max() > MAX_REALIGN:
        return (0, 0)
    steps = [int(np.round(value)) if abs(value) >= REALIGN_FROM else 0 for value in values]
    return steps[0], steps[1]


@dataclass(frozen=True)
class DetectParams:
    """Parameters of the detection chain, checked on creation.

    Parameters
    ----------
    kernel : int
        Side of the k×k median filter applied to the reference and to the noise model (odd, ≥ 1).
    threshold : float or None
        Change score above which a pixel changed, in noise scales; ``None`` for ``auto``.
    tolerance : int
        Side of the reference neighbourhood whose range a date may take without a change.
    open_size : int
        Side of the square opening that separates small from large objects.
    close_size : int
        Side of the square closing applied to large objects.
    background_size : int
        Side of the window of the local median background of the change score.
    zero_level : float or tuple of float
        The stored value at which a band reads no light, one for every band or one per band
        (``()``: zero). Detection's illumination gains and colour tests are ratios, so values
        stored with an offset must have it taken off: 1000 for Sentinel-2 L2A from processing
        baseline 04.00 (January 2022) on, unless harmonised; 7273 for Landsat Collection 2
        Level-2 surface reflectance (its 0.2 offset over its 2.75e-5 scale).
    """

    kernel: int = 5
    threshold: float | None = None
    tolerance: int = DEFAULT_TOLERANCE
    open_size: int = DEFAULT_OPEN_SIZE
    close_size: int = DEFAULT_OPEN_SIZE
    background_size: int = DEFAULT_BACKGROUND_SIZE
    zero_level: float | tuple[float, ...] = ()

    def __post_init__(self) -> None:
        for name in ("kernel", "tolerance", "open_size", "close_size", "background_size"):
            kernels.check_size(getattr(self, name), name=name)
        levels = self.zero_level
        levels = (levels,) if isinstance(levels, numbers.Real) else levels
        if isinstance(levels, np.ndarray):
            levels = tuple(levels.ravel().tolist())
        if not isinstance(levels, tuple | list) or not all(
            isinstance(v, numbers.Real) and not isinstance(v, bool) and np.isfinite(v)
            for v in levels
        ):
            raise ParameterError(
                f"zero_level {self.zero_level!r} must be a finite number or one per band; pass "
                "e.g. 1000 (Sentinel-2 L2A from baseline 04.00) or (1000, 1000, 1000, 1000)"
            )
        # Zero everywhere is no offset: the stack is compared as stored.
        levels = () if all(v == 0 for v in levels) else tuple(float(v) for v in levels)
        object.__setattr__(self, "zero_level", levels)
        if self.threshold is not None:
            value = self.threshold
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ParameterError(f"threshold {value!r} is not a number; pass e.g. 6 or 'auto'")
            if not np.isfinite(value) or value <= 0:
                raise ParameterError(
                    f"threshold {value!r} must be a finite number > 0 (in noise scales); "
                    f"pass e.g. {AUTO_THRESHOLD:g} or 'auto'"
                )

    @property
    def zero_levels(self) -> tuple[float, ...]:
        """``zero_level`` as checked: a tuple, empty for none."""
        return cast(tuple[float, ...], self.zero_level)

    @property
    def effective_threshold(self) -> float:
        """The threshold in use (``auto`` resolved)."""
        return AUTO_THRESHOLD if self.threshold is None else float(self.threshold)

    @property
    def depth(self) -> int:
        """Pixels of context each tile needs on each side for an exact result."""
        # Large: background median, then closing and opening. Small: background median plus an
        # object up to MAX_SMALL_EXTENT long and its ring, so that any object reaching pixels
        # whose background is unreliable is too long to be small in every tiling alike.
        background = self.background_reach
        # The spread is a median of |score - background|: twice the background's reach.
        # (the opening, the join of changed pixels next to it, and the erosion that keeps the
        # interior of the large class whole: four open_size reaches).
        # The density of qualifying pixels is a median of a test on the background: twice its
        # reach.
        large = 2 * background + 2 * (self.close_size // 2) + 4 * (self.open_size // 2)
        # The haze test widens the background's reach by HAZE_WINDOW.
        small = max(2 * background, background + HAZE_WINDOW // 2)
        # Sea clutter is told by the objects of one or two pixels within SEA_CLUTTER_WINDOW // 2
        # of one, a wake's piece by a path of LINK_REACH px from it: as long as these are
        # shorter than MAX_SMALL_EXTENT, they are exact already.
        extent = max(
            MAX_SMALL_EXTENT, SEA_CLUTTER_WINDOW // 2 + 2, FRAGMENT_EXTENT + LINK_REACH + 1
        )
        needed = max(large, small + extent + SMALL_CONTEXT)
        # A multiple of the background's cell: tiles on a cell-aligned grid (chunks of 1024 px)
        # then start on a cell edge and their cells need no padded copy.
        return -(-needed // BACKGROUND_CELL) * BACKGROUND_CELL

    @property
    def background_reach(self) -> int:
        """Pixels the local background at a pixel draws on (cells, median, interpolation)."""
        cells = window_cells(self.background_size)
        return BACKGROUND_CELL * (cells // 2 + 2)

    def check_against(self, shape: tuple[int, int]) -> None:
        """Raise :class:`ParameterError` when a window is larger than the image."""
        kernels.check_size(self.kernel, shape=shape, name="kernel")
        if min(shape) < self.tolerance:
            # Not a command-line option: the advice is about the image, not the parameter.
            raise ParameterError(
                f"the image ({shape[0]} x {shape[1]} pixels) is smaller than the "
                f"{self.tolerance} x {self.tolerance} px misregistration window detection needs; "
                f"annotate images of at least {self.tolerance} px in each direction"
            )

    def as_attrs(self) -> dict[str, Any]:
        """Parameters as Zarr-serialisable attributes."""
        attrs = asdict(self)
        attrs["threshold"] = "auto" if self.threshold is None else float(self.threshold)
        if not self.zero_level:
            # Left out as stores before it was a parameter recorded it: they resume.
            del attrs["zero_level"]
        else:
            attrs["zero_level"] = list(self.zero_levels)
        attrs["effective_threshold"] = self.effective_threshold
        return attrs


#: Pixels of context :func:`noise_sample_objects` needs around a pixel: the reach of the local
#: median's cells and the dilation of what departs (and the tolerance's reach, for the range).
OBJECT_REACH = DetectParams().background_reach + 1


#: The pixel size (metres) the size defaults stand for: Sentinel-2's 10 m (Landsat's 30 m pixels
#: work with them too: ships are 1-3 px, clouds far wider than the opening).
DEFAULT_PIXEL_METRES = 10.0
#: Pixels finer than this (metres) get a note with sizes scaled to them: at 3 m a 60 m wide ship
#: is 20 px, wider than the 15 px opening, and a 200 m long one outgrows the 31 px background.
FINE_PIXEL_METRES = 5.0


def sizes_for_pixels(metres: float) -> dict[str, int]:
    """``open_size`` and ``background_size``: the smallest odd sides in ``metres`` pixels that
    cover the defaults' ground extents (at ``DEFAULT_PIXEL_METRES``).

    Examples
    --------
    >>> sizes_for_pixels(3.0)
    {'open_size': 51, 'background_size': 105}
    """
    scale = DEFAULT_PIXEL_METRES / metres

    def odd(size: float) -> int:
        # The smallest odd side that covers the extent (less a rounding error's worth).
        return max(1, 2 * math.ceil((size - 1) / 2 - 1e-6) + 1)

    return {
        "open_size": odd(DEFAULT_OPEN_SIZE * scale),
        "background_size": odd(DEFAULT_BACKGROUND_SIZE * scale),
    }


def pixel_size_note(metres: float | None, params: DetectParams) -> str | None:
    """A note when the pixels are finer than ``FINE_PIXEL_METRES`` and the sizes are defaults."""
    defaults = DetectParams()
    sizes = (params.open_size, params.close_size, params.background_size)
    if metres is None or metres >= FINE_PIXEL_METRES:
        return None
    if sizes != (defaults.open_size, defaults.close_size, defaults.background_size):
        return None
    scaled = sizes_for_pixels(metres)
    return (
        f"pixels of {metres:.3g} m: the default sizes are set for 10-30 m pixels (objects "
        f"narrower than {defaults.open_size} px are small, over a {defaults.background_size} px "
        f"local background); here a 60 m wide ship is {60 / metres:.0f} px wide and may be sent "
        f"to the large class: pass --open-size {scaled['open_size']} --background-size "
        f"{scaled['background_size']} (Python: DetectParams(open_size=..., close_size=..., "
        "background_size=...))"
    )


def parse_threshold(value: str | float | None) -> float | None:
    """Read a ``--threshold`` value: ``"auto"``/``None`` or a positive finite number."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError) as err:
        raise ParameterError(
            f"threshold {value!r} is neither 'auto' nor a number; pass e.g. --threshold 6"
        ) from err
    DetectParams(threshold=number)
    return number


# ---------------------------------------------------------------------------------------------
# Reference products: computed once per tile and shared by every date.


def pad_and_overlap(
    array: da.Array,
    depth: int,
    axes: Sequence[int],
    tiles: Sequence[tuple[int, ...]] | None = None,
    edge: int | None = None,
) -> da.Array:
    """Pad ``axes`` by edge replication and add ``depth`` of overlap to every block along them.

    Equivalent to ``dask.array.overlap.overlap(..., boundary="nearest")`` but also valid when a
    chunk, or the whole array, is smaller than ``depth``: every block along ``axes`` gains exactly
    ``depth`` on each side, the array's own edges replicated outward. With ``tiles`` (chunks along
    each of ``axes``, covering the same lengths) the output blocks are those tiles plus ``depth``,
    assembled straight from the array's own blocks. With ``edge`` (< ``depth``) blocks reach at
    most ``edge`` beyond the array's ends (:func:`window_span`): ``edge=0`` adds overlap only.

    Each padded block is one task that copies the parts of the blocks it reaches straight into
    place (Dask's overlap slices, pads, rechunks and concatenates: three copies, four layers).
    """
    axes = sorted(axis % array.ndim for axis in axes)
    if depth == 0 and tiles is None:
        return array
    tile_chunks = [array.chunks[axis] for axis in axes] if tiles is None else list(tiles)
    name = f"halo-{tokenize(array, depth, axes, tile_chunks, edge)}"
    plans = [
        window_plans(array.chunks[axis], chunks, depth, edge)
        for axis, chunks in zip(axes, tile_chunks, strict=True)
    ]
    layer: dict[Any, Any] = {}
    others = [
        range(1) if axis in axes else range(array.numblocks[axis]) for axis in range(array.ndim)
    ]
    for base in itertools.product(*others):
        for tile in itertools.product(*(range(len(chunks)) for chunks in tile_chunks)):
            window = [plans[position][index] for position, index in enumerate(tile)]
            index = list(base)
            for axis, position in zip(axes, tile, strict=True):
                index[axis] = position
            layer[(name, *index)] = (
                _assemble_window,
                _window_keys(array, base, axes, window),
                window,
                axes,
            )
    out_chunks = list(array.chunks)
    for axis, axis_plans in zip(axes, plans, strict=True):
        out_chunks[axis] = tuple(plan_length(plan) for plan in axis_plans)
    return da.Array(_graph(name, layer, array), name, tuple(out_chunks), meta=array._meta)


def _graph(name: str, layer: dict[Any, Any], *dependencies: da.Array) -> HighLevelGraph:
    # dask.array.Array does not satisfy dask's own DaskCollection protocol for mypy.
    return HighLevelGraph.from_collections(name, layer, dependencies=list(dependencies))  # type: ignore[arg-type]


#: How one window along one axis is filled: the pieces ``(block, block_start, block_stop,
#: out_start, out_stop)`` and how many positions before and after it lie beyond the array.
WindowPlan = tuple[tuple[tuple[int, int, int, int, int], ...], int, int]


def window_plans(
    chunks: Sequence[int], tiles: Sequence[int], depth: int, edge: int | None = None
) -> list[WindowPlan]:
    """Plans of the windows ``tile ± depth`` along one axis, in the blocks of ``chunks``.

    A window reaches at most ``edge`` (default ``depth``) beyond the array's ends, replicated:
    ``edge=0`` clips the windows to the array.
    """
    bounds = [int(end) for end in np.cumsum((0, *chunks))]
    tile_bounds = [int(end) for end in np.cumsum((0, *tiles))]
    if bounds[-1] != tile_bounds[-1]:
        raise ParameterError(f"tiles {tuple(tiles)} do not cover the chunks {tuple(chunks)}")
    size = bounds[-1]
    plans: list[WindowPlan] = []
    for first, last in itertools.pairwise(tile_bounds):
        start, stop = window_span(first, last, depth, size, edge)
        low, high = max(start, 0), min(stop, size)
        pieces = []
        for block, (begin, end) in enumerate(itertools.pairwise(bounds)):
            top, bottom = max(low, begin), min(high, end)
            if top < bottom:
                pieces.append((block, top - begin, bottom - begin, top - start, bottom - start))
        plans.append((tuple(pieces), low - start, stop - high))
    return plans


def shifted_plan(plan: WindowPlan, margin: int, step: int) -> WindowPlan:
    """The plan of ``plan``'s window less ``margin`` on each side, moved by ``step``
    (``|step| <= margin``): pieces clipped to it (an empty piece stays, reading nothing)."""
    pieces, before, after = plan
    length = plan_length(plan)
    low, high = margin + step, length - margin + step
    clipped = []
    for block, block_start, _block_stop, out_start, out_stop in pieces:
        start, stop = min(max(out_start, low), high), max(min(out_stop, high), low)
        stop = max(stop, start)
        clipped.append(
            (
                block,
                block_start + start - out_start,
                block_start + stop - out_start,
                start - low,
                stop - low,
            )
        )
    new_before = min(max(before - low, 0), high - low)
    new_after = min(max(high - (length - after), 0), high - low)
    return tuple(clipped), new_before, new_after


def plan_length(plan: WindowPlan) -> int:
    """Length of a planned window along its axis."""
    pieces, before, after = plan
    return before + sum(piece[4] - piece[3] for piece in pieces) + after


def window_span(
    first: int, last: int, depth: int, size: int, edge: int | None = None
) -> tuple[int, int]:
    """Where the window of the tile ``[first, last)`` starts and stops along an axis of ``size``:
    ``depth`` around the tile, at most ``edge`` (default ``depth``) of it beyond the axis."""
    reach = depth if edge is None else edge
    return max(first - depth, -reach), min(last + depth, size + reach)


def _window_keys(
    array: da.Array, base: Sequence[int], axes: Sequence[int], window: Sequence[WindowPlan]
) -> list[tuple[Any, ...]]:
    """Keys of the blocks a window reaches, in the order :func:`_assemble_window` takes them."""
    keys = []
    for combination in itertools.product(*(plan[0] for plan in window)):
        index = list(base)
        for axis, piece in zip(axes, combination, strict=True):
            index[axis] = piece[0]
        keys.append((array.name, *index))
    return keys


def _assemble_window(
    blocks: list[np.ndarray], window: Sequence[WindowPlan], axes: Sequence[int]
) -> np.ndarray:
    """One window from the parts of ``blocks`` it covers, edges replicated beyond the array."""
    shape = list(blocks[0].shape)
    for axis, plan in zip(axes, window, strict=True):
        shape[axis] = plan_length(plan)
    out = np.empty(shape, dtype=blocks[0].dtype)
    combinations = itertools.product(*(plan[0] for plan in window))
    for block, combination in zip(blocks, combinations, strict=True):
        source: list[slice] = [slice(None)] * out.ndim
        target: list[slice] = [slice(None)] * out.ndim
        for axis, (_, first, last, top, bottom) in zip(axes, combination, strict=True):
            source[axis], target[axis] = slice(first, last), slice(top, bottom)
        out[tuple(target)] = block[tuple(source)]
    # Beyond the array's edges: replicate its outermost row/column, one axis after the other
    # (as np.pad does), so corners take the corner pixel.
    for axis, (_, before, after) in zip(axes, window, strict=True):
        length = out.shape[axis]
        for fill, edge in (
            (slice(0, before), before),
            (slice(length - after, length), length - after - 1),
        ):
            if fill.start < fill.stop:
                where: list[slice] = [slice(None)] * out.ndim
                source = [slice(None)] * out.ndim
                where[axis], source[axis] = fill, slice(edge, edge + 1)
                out[tuple(where)] = out[tuple(source)]
    return out


def spatial_chunks(chunks: tuple[int, ...], depth: int) -> tuple[int, ...]:
    """Chunks along one axis, merged where needed so that every chunk is at least ``depth``."""
    if depth == 0 or min(chunks) >= depth:
        return tuple(chunks)
    size = sum(chunks)
    return tuple(ensure_minimum_chunksize(depth, tuple(chunks))) if size >= depth else (size,)


def filter_spatial(array: xr.DataArray, function: Any, depth: int, **kwargs: Any) -> xr.DataArray:
    """Apply a per-tile numpy filter over ``y``/``x`` with exact overlap, lazily.

    ``function(block, **kwargs)`` must return a block of the same shape; ``depth`` is the filter's
    radius. The time and band axes are never filtered across (they get no overlap).
    """
    data = array.data if isinstance(array.data, da.Array) else da.from_array(array.data)
    axes = [array.get_axis_num("y"), array.get_axis_num("x")]
    overlapped = pad_and_overlap(data, depth, axes)
    out_chunks = tuple(
        _core_chunks(c, depth) if a in axes else c for a, c in enumerate(overlapped.chunks)
    )

    def run(block: np.ndarray) -> np.ndarray:
        result = function(block, **kwargs)
        core = tuple(slice(depth, -depth) if a in axes else slice(None) for a in range(block.ndim))
        return result[core] if depth else result

    result = da.map_blocks(
        run,
        overlapped,
        dtype=data.dtype,
        chunks=out_chunks,
        meta=np.empty((0,) * data.ndim, data.dtype),
    )
    return array.copy(data=result)


def _core_chunks(chunks: tuple[int, ...], depth: int) -> tuple[int, ...]:
    return tuple(c - 2 * depth for c in chunks)


def _nan_safe(function: Any) -> Any:
    """Wrap a kernel so NaN (unknown reference pixels) are filled before and restored after."""

    def run(block: np.ndarray, **kwargs: Any) -> np.ndarray:
        missing = np.isnan(block)
        if not missing.any():
            return np.asarray(function(block, **kwargs))
        filled = np.where(missing, 0, block).astype(block.dtype)
        result = np.asarray(function(filled, **kwargs), dtype=block.dtype)
        return np.where(missing, np.nan, result).astype(block.dtype)

    return run


def reference_products(
    reference: xr.DataArray, spread: xr.DataArray, params: DetectParams
) -> xr.Dataset:
    """Lazy products of the reference that every date is compared with.

    Parameters
    ----------
    reference : xarray.DataArray
        ``(band, y, x)`` float32, NaN where unknown.
    spread : xarray.DataArray
        ``(band, y, x)`` robust temporal spread (see :func:`spoc_xr.pipeline.reference_and_spread`).
    params : DetectParams

    Returns
    -------
    xarray.Dataset
        ``low``/``high`` (the reference's range over the tolerance window), ``noise`` (per-pixel
        scale, k×k median of the spread, floored), ``smooth`` (k×k median of the reference),
        ``scale`` ``(y, x)`` (the noise scale in units of the band's floor, mean over bands),
        ``known`` ``(y, x)`` (the range is known in every band) and the ``reference`` itself
        (for the ranges of shifted dates, see :func:`classify`).
    """
    half_tol = params.tolerance // 2
    low = filter_spatial(
        reference, _nan_safe(kernels.minimum_filter), half_tol, size=params.tolerance
    )
    high = filter_spatial(
        reference, _nan_safe(kernels.maximum_filter), half_tol, size=params.tolerance
    )
    # NaN must win over filled values so that unknown reference pixels stay unknown.
    unknown = filter_spatial(
        reference.isnull().astype(np.uint8), kernels.maximum_filter, half_tol, size=params.tolerance
    ).astype(bool)
    low = low.where(~unknown)
    high = high.where(~unknown)
    half_k = params.kernel // 2
    smooth = filter_spatial(reference, _nan_safe(kernels.median_filter), half_k, size=params.kernel)
    noise = filter_spatial(spread, _nan_safe(kernels.median_filter), half_k, size=params.kernel)
    floor = noise_floor(spread)
    noise = noise.fillna(floor).clip(min=floor).astype(np.float32)
    scale = (noise / floor).mean("band").astype(np.float32)
    # Where the reference's range is known in every band: the same for every date.
    known = low.notnull().all("band")
    return xr.Dataset(
        {
            "reference": reference,
            "low": low,
            "high": high,
            "noise": noise,
            "smooth": smooth,
            "scale": scale,
            "known": known,
        }
    )


def noise_floor(spread: xr.DataArray) -> xr.DataArray:
    """Per-band floor of the noise scale: a share of the band's median spread.

    The median is taken on a fixed pixel grid (at most 512 a side), so it depends on the image
    only, never on the chunking, and needs no pass over every pixel.
    """
    stride = max(1, int(np.ceil(max(spread.sizes["y"], spread.sizes["x"]) / 512)))
    sample = spread.isel(y=slice(None, None, stride), x=slice(None, None, stride))
    if sample.chunks is not None:
        sample = sample.chunk({"y": -1, "x": -1})
    typical = sample.median(("y", "x"), skipna=True)
    floor = (typical * NOISE_FLOOR_SHARE).fillna(1.0)
    return floor.clip(min=1e-6).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# The fused per-tile chain.


def change_score(
    date: np.ndarray,
    low: np.ndarray,
    high: np.ndarray,
    noise: np.ndarray,
    gain: np.ndarray,
    offset: np.ndarray,
    *,
    nodata: float | None,
    known: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel change score (in noise scales) and validity of one date.

    The score is the largest, over bands ``(band, y, x)``, excess of the normalised date beyond
    the reference's neighbourhood range, divided by the pixel's noise scale; 0 inside the range.
    Which way the pixel changed is :func:`change_direction`'s (:func:`change_passes` computes
    both in one pass). ``gain`` and ``offset`` are float32 (the arithmetic is float32 throughout).
    """
    score, valid, _, _ = change_passes(
        date, low, high, noise, gain, offset, nodata=nodata, known=known, direction=False
    )
    return score, valid


def change_direction(
    date: np.ndarray,
    low: np.ndarray,
    high: np.ndarray,
    noise: np.ndarray,
    gain: np.ndarray,
    offset: np.ndarray,
    *,
    levels: tuple[float, float] | None = None,
    visible: Sequence[int] | None = None,
    swir: Sequence[int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Where one date darkened (shadows) and where it is only thin haze, per pixel.

    ``darker`` tells where the date fell below the top of the range, summed over bands (shadows,
    wet ground), except where the largest excess is a darkening of fewer than ``SHADOW_BANDS``
    bands. ``thin`` tells where a pixel that is not darker rose over the middle of the range by
    less than ``THIN_OPACITY`` of the room up to the date's cloud brightness (band means;
    ``levels`` is the date's ``(dark, bright)`` band-mean levels, see ``THIN_OPACITY``); all False
    without ``levels``. Only the large class needs them, on dates with a wide change.

    A surface change is neither: where a band rose while a band ``SURFACE_BAND_RATIO`` times
    darker in the reference (by the range's top) fell, each by more than a noise scale (the
    largest rise and fall), the pixel is not darker and counts as ``thin``, so the large class
    leaves it out. Vegetation greening (NIR up, red down) does that; a veil adds about the same
    light to every band and a shadow takes the same share of each, so together they change a
    darker band up, or less down, than a brighter one, never the other way round. Measured on the
    demo harbour, seeds 0-3: cloud IoU 0.793 / 0.680 / 0.737 / 0.685 -> 0.802 / 0.683 / 0.741 /
    0.716 (fields greening between dates), boats unchanged; the 8 ports (seeds 0 and 1) and
    Landsat unchanged. Snow is one too: with ``visible`` and ``swir`` (band indices), where a
    SWIR band fell as ``SNOW_SWIR_SHARE`` and ``SNOW_RISE_RATIO`` say while visible light rose.
    """
    _, _, darker, thin = change_passes(
        date,
        low,
        high,
        noise,
        gain,
        offset,
        levels=levels,
        visible=visible,
        swir=swir,
        score=False,
    )
    return darker, thin


def change_passes(
    date: np.ndarray,
    low: np.ndarray,
    high: np.ndarray,
    noise: np.ndarray,
    gain: np.ndarray,
    offset: np.ndarray,
    *,
    nodata: float | None = None,
    known: np.ndarray | None = None,
    levels: tuple[float, float] | None = None,
    visible: Sequence[int] | None = None,
    swir: Sequence[int] | None = None,
    score: bool = True,
    direction: bool = True,
    reference: np.ndarray | None = None,
    reach: Reach | None = None,
    ceilings: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """:func:`change_score` and :func:`change_direction` of one date in one compiled pass.

    Both read every band of the date, the range and the noise scale at every pixel; the pass is
    bound by that reading, so doing both costs little more than either. ``score`` or
    ``direction`` False skips one (its outputs are then empty).

    With a ``reach`` (:func:`shift_reach`), the top of the range is the ``reference``'s over the
    reach where that is lower than ``high`` by more than ``EDGE_CONTRAST`` noise scales;
    ``reference`` is then ``(band, y, x)``, padded beyond the date on every side by at least the
    reach.

    ``ceilings`` ``(date's, reference's)``, each ``(band,)``: where a band clipped
    (:func:`spoc_xr.reference.saturation_levels`, in the date's values as given, and
    :func:`spoc_xr.reference.reference_ceilings`). A clipped value is only a lower bound: a date
    clipped in a band shows no fall there, and a range whose top is clipped no rise.

    Returns
    -------
    score, valid, darker, thin : numpy.ndarray
        float32 and bool ``(y, x)``.
    """
    height, width = date.shape[1:]
    shape = (height, width)
    empty = (height, 0)
    if score and known is None:
        known = np.isfinite(low).all(axis=0)
    if levels is not None and not all(np.isfinite(levels)):
        levels = None
    dark, bright = (0.0, 0.0) if levels is None else levels
    is_visible = np.zeros(date.shape[0], dtype=bool)
    is_visible[list(visible or ())] = True
    directed = reach is not None
    if reach is not None:
        if reference is None:
            raise ParameterError("a reach needs the reference to take the range from")
        radius = max(reach)
        pad = (reference.shape[1] - height) // 2
        if reference.shape[1:] != (height + 2 * pad, width + 2 * pad) or pad < radius:
            raise ParameterError(
                f"reference {reference.shape} must be the date {date.shape} padded by at least "
                f"{radius} px on every side"
            )
    else:
        reference, pad, reach = np.empty((1, 1, 1), dtype=np.float32), 0, (0, 0, 0, 0)
    n_band = date.shape[0]
    unclipped = np.full(n_band, np.inf, dtype=np.float32)
    date_ceiling, reference_ceiling = (
        (unclipped, unclipped) if ceilings is None else _float32(*ceilings)
    )
    outputs = (
        np.empty(shape if score else empty, dtype=np.float32),
        np.empty(shape if score else empty, dtype=bool),
        np.empty(shape if direction else empty, dtype=bool),
        np.empty(shape if direction else empty, dtype=bool),
    )
    _change_rows(
        _compiled_date(date),
        low,
        high,
        noise,
        *_float32(gain, offset),
        date_ceiling,
        reference_ceiling,
        score,
        *_nodata_arguments(date, nodata),
        np.float32(SCORE_CEILING),
        known if score else np.empty(empty, dtype=bool),
        direction,
        is_visible,
        bool(visible),
        np.int64(min(SHADOW_BANDS, date.shape[0])),
        levels is not None,
        np.float32(bright),
        np.float32(THIN_OPACITY),
        np.float32(THIN_ROOM_SHARE * (bright - dark)),
        np.float32(SURFACE_BAND_RATIO),
        directed,
        np.ascontiguousarray(reference, dtype=np.float32),
        np.int64(pad),
        *(np.int64(side) for side in reach),
        np.float32(EDGE_CONTRAST),
        *outputs,
    )
    if direction and visible and swir:
        # A pass of its own, on stacks with SWIR only: folded into the pass above, its few
        # comparisons per band stopped numba vectorising that loop (8x slower on every stack).
        gain32, offset32 = _float32(gain, offset)
        # Illumination scales every band alike: a SWIR gain above visible light's is the fit
        # mapping snow onto the reference (Landsat's snowy dates: SWIR 1.33-1.5 where red is
        # 0.67-1.0), which hides the fall the test looks for.
        swir_gain = gain32.copy()
        swir_gain[list(swir)] = np.minimum(gain32[list(swir)], gain32[list(visible)].min())
        _snow_rows(
            _compiled_date(date),
            low,
            high,
            noise,
            gain32,
            swir_gain,
            offset32,
            np.asarray(visible, dtype=np.int64),
            np.asarray(swir, dtype=np.int64),
            np.float32(SNOW_SWIR_SHARE),
            np.float32(SNOW_RISE_RATIO),
            np.float32(SNOW_INDEX),
            outputs[2],
            outputs[3],
        )
    return outputs


@_compiled
def _snow_rows(  # pragma: no cover - compiled
    date,
    low,
    high,
    noise,
    gain,
    swir_gain,
    offset,
    visible,
    swir,
    share,
    ratio,
    index,
    darker,
    thin,
):
    """Snow (see SNOW_SWIR_SHARE) is a surface change: neither darker nor a cloud (thin).
    ``swir_gain`` is ``gain`` with the SWIR bands' no larger than visible light's."""
    width = date.shape[2]
    visible_gain = np.empty(width, dtype=np.float32)
    visible_value = np.empty(width, dtype=np.float32)
    swir_fall = np.empty(width, dtype=np.float32)
    swir_drop = np.empty(width, dtype=np.float32)
    swir_bottom = np.empty(width, dtype=np.float32)
    swir_value = np.empty(width, dtype=np.float32)
    for y in range(date.shape[1]):
        visible_gain[:] = 0
        visible_value[:] = 0
        swir_fall[:] = 0
        for band in visible:
            values, highs, g, o = date[band, y], high[band, y], gain[band], offset[band]
            for x in range(width):
                normalised = np.float32(values[x]) * g + o
                above = normalised - highs[x]
                if above > visible_gain[x]:  # np.fmax: NaN loses
                    visible_gain[x] = above
                # The index is the date's own, as stored: on a date mostly under snow the
                # radiometric fit maps snow onto the reference (gains at their limits).
                if np.float32(values[x]) > visible_value[x]:
                    visible_value[x] = np.float32(values[x])
        for band in swir:
            values, lows, noises = date[band, y], low[band, y], noise[band, y]
            g, o = swir_gain[band], offset[band]
            for x in range(width):
                normalised = np.float32(values[x]) * g + o
                below = lows[x] - normalised
                fallen = below / noises[x]
                if fallen > swir_fall[x]:
                    swir_fall[x] = fallen
                    swir_drop[x] = below
                    swir_bottom[x] = lows[x]
                    swir_value[x] = np.float32(values[x])
        for x in range(width):
            if (
                swir_fall[x] > 1
                and swir_drop[x] > share * swir_bottom[x]
                and visible_gain[x] > ratio * swir_drop[x]
                and visible_value[x] - swir_value[x] > index * (visible_value[x] + swir_value[x])
            ):
                darker[y, x] = False
                thin[y, x] = True


def _float32(*arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    return tuple(np.ascontiguousarray(a, dtype=np.float32) for a in arrays)


def _compiled_date(date: np.ndarray) -> np.ndarray:
    # numba has no float16 arithmetic; float32 holds every float16 exactly, and numpy casts the
    # date to float32 before it scales it anyway.
    return date.astype(np.float32) if date.dtype == np.float16 else date


def _nodata_arguments(date: np.ndarray, nodata: float | None) -> tuple[np.generic, bool, bool]:
    """What the compiled passes need to tell missing values in ``date`` as stored (before
    :func:`_compiled_date`): the nodata value as numpy compares it (:func:`_nodata_value`),
    whether to compare it at all, and whether non-finite values are missing (float dates)."""
    return (
        _nodata_value(date, nodata),
        nodata is not None and not np.isnan(nodata),
        date.dtype.kind == "f",
    )


def _nodata_value(date: np.ndarray, nodata: float | None) -> np.generic:
    """``nodata`` as numpy compares it with the date: in the date's own float type, or as a
    float64 for integer dates (numpy compares an integer array with a Python float so); a
    float16 value as the float32 that :func:`_compiled_date` compares it with (exact)."""
    value = 0.0 if nodata is None or np.isnan(nodata) else nodata
    if date.dtype.kind != "f":
        return np.float64(value)
    exact = date.dtype.type(value)
    return np.float32(exact) if date.dtype == np.float16 else exact


# The per-pixel pass over a date, compiled: every pixel's bands are read once and nothing but the
# outputs is written (as numpy, one band at a time, the score and the direction made ~10
# full-tile temporaries each: 2.5x slower, and memory-bound, so two workers slowed each other
# down). The arithmetic is numpy's float32 arithmetic, in the same order, so the results are
# identical, NaN included (tests/test_change_passes.py checks them against the plain numpy
# expressions).
@_compiled
def _change_rows(  # pragma: no cover - compiled
    date,
    low,
    high,
    noise,
    gain,
    offset,
    date_ceiling,
    reference_ceiling,
    with_score,
    nodata,
    check_nodata,
    is_float,
    ceiling,
    known,
    with_direction,
    is_visible,
    any_visible,
    shadow_bands,
    has_levels,
    bright,
    thin_opacity,
    thin_room,
    surface_ratio,
    directed,
    reference,
    pad,
    up,
    down,
    left,
    right,
    edge_contrast,
    score,
    valid,
    darker,
    thin,
):
    width = date.shape[2]
    infinity = np.float32(np.inf)
    n_bands = np.float32(date.shape[0])
    half = np.float32(0.5)
    zero = np.float32(0.0)
    # Per row, for the direction: sum over bands of the date minus the range's top (negative
    # where it darkened), the largest rise and darkening in noise scales, the bands dimmed by
    # more than a noise scale, whether a visible band rose by more than one, and the range's top
    # and bottom band sums; the range's top in the bands that rose and fell most.
    net = np.empty(width, dtype=np.float32)
    rise = np.empty(width, dtype=np.float32)
    fall = np.empty(width, dtype=np.float32)
    dimmed = np.empty(width, dtype=np.int64)
    visible_rise = np.empty(width, dtype=np.bool_)
    tops = np.empty(width, dtype=np.float32)
    bottoms = np.empty(width, dtype=np.float32)
    rise_top = np.empty(width, dtype=np.float32)
    fall_top = np.empty(width, dtype=np.float32)
    reach_top = np.empty(width, dtype=np.float32)
    for y in range(date.shape[1]):
        row_score = score[y]
        row_valid = valid[y]
        if with_score:
            row_score[:] = zero
            row_valid[:] = known[y]
        if with_direction:
            net[:] = 0
            rise[:] = 0
            fall[:] = 0
            dimmed[:] = 0
            visible_rise[:] = not any_visible
            tops[:] = 0
            bottoms[:] = 0
            rise_top[:] = 0
            fall_top[:] = 0
        for band in range(date.shape[0]):
            values, lows, highs, noises = date[band, y], low[band, y], high[band, y], noise[band, y]
            g, o, seen = gain[band], offset[band], is_visible[band]
            date_top, reference_top = date_ceiling[band], reference_ceiling[band]
            if directed:
                # The top of the range over the reach only, used where it is lower than the
                # window's by more than edge_contrast noise scales (see EDGE_CONTRAST); one
                # np.maximum per neighbour along the row: vectorised, 4x faster than per pixel.
                reach_top[:] = -infinity
                for dy in range(-up, down + 1):
                    reference_row = reference[band, y + pad + dy]
                    for dx in range(-left, right + 1):
                        np.maximum(reach_top, reference_row[pad + dx : pad + dx + width], reach_top)
            for x in range(width):
                value = values[x]
                lowest, highest = lows[x], highs[x]
                # A NaN in reach is a NaN in the window: the comparison fails, NaN stays.
                if directed and highest - reach_top[x] > edge_contrast * noises[x]:
                    highest = reach_top[x]
                normalised = np.float32(value) * g + o
                above = normalised - highest
                below = lowest - normalised
                # Clipped values are lower bounds: no fall from a clipped date, no rise over
                # a clipped range (direction's sums below keep the values as they are).
                rise_evidence = -infinity if highest >= reference_top else above
                fall_evidence = -infinity if value >= date_top else below
                # np.maximum: NaN wins (then np.fmax into the score: NaN loses).
                rose = rise_evidence >= fall_evidence or rise_evidence != rise_evidence
                if with_direction:
                    # The score's excess in noise scales is one of these two quotients.
                    risen = rise_evidence / noises[x]
                    fallen = fall_evidence / noises[x]
                    net[x] += above
                    tops[x] += highest
                    bottoms[x] += lowest
                    if fallen > 1:
                        dimmed[x] += 1
                    if fallen > fall[x]:  # np.fmax: NaN loses
                        fall[x] = fallen
                        fall_top[x] = highest
                    if seen and risen > 1:
                        visible_rise[x] = True
                    if risen > rise[x]:
                        rise[x] = risen
                        rise_top[x] = highest
                    excess = risen if rose else fallen
                else:
                    excess = (rise_evidence if rose else fall_evidence) / noises[x]
                if with_score:
                    if check_nodata and value == nodata:
                        row_valid[x] = False
                    if is_float and not np.isfinite(value):
                        row_valid[x] = False
                    if excess > row_score[x]:
                        row_score[x] = excess
        if with_score:
            for x in range(width):
                if not row_valid[x]:
                    row_score[x] = zero
                elif is_float and row_score[x] == np.inf:
                    row_score[x] = ceiling
        if with_direction:
            for x in range(width):
                # A band rose while a band darker in the reference fell: see change_direction.
                surface = rise[x] > 1 and fall[x] > 1 and rise_top[x] > surface_ratio * fall_top[x]
                is_darker = (
                    (not surface)
                    and net[x] < 0
                    and ((fall[x] < rise[x] and visible_rise[x]) or dimmed[x] >= shadow_bands)
                )
                darker[y, x] = is_darker
                is_thin = surface
                if has_levels and not is_darker and not surface:
                    lift = (net[x] + half * (tops[x] - bottoms[x])) / n_bands
                    room = bright - half * (tops[x] + bottoms[x]) / n_bands
                    is_thin = lift < thin_opacity * room and room > thin_room
                thin[y, x] = is_thin


def _log_quantise(values: np.ndarray) -> np.ndarray:
    # uint8 on a log scale (1/16 octave steps up to 2**16 scales) so that OpenCV's exact and
    # fast uint8 median applies at any window size.
    levels = np.round(LOG_STEPS_PER_OCTAVE * np.log2(1 + np.minimum(values, SCORE_CEILING)))
    return np.clip(levels, 0, 255).astype(np.uint8)


def _log_restore(levels: np.ndarray) -> np.ndarray:
    return (np.exp2(levels.astype(np.float32) / LOG_STEPS_PER_OCTAVE) - 1).astype(np.float32)


def local_background(
    score: np.ndarray, size: int, origin: tuple[int, int] = (0, 0), *, spread_factor: float = 1.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Local median of the score, the residual from it and the robust spread of the residual.

    A boat covers less than half of a ``size`` window, so the median ignores it and follows
    what is wide: haze, cloud bodies, illumination residues. The spread (robust scale of the
    residual, in sigmas times ``spread_factor``) is large in textured changes (cloud tops, haze
    puffs) and ~0 on calm water.

    Both are wide and smooth, so they are computed on a grid of ``BACKGROUND_CELL`` px cells
    (the cell means of the score, a median over ``ceil(size / cell)`` cells, made odd, then
    interpolated back linearly): 16x fewer pixels than a full-resolution median of the same
    reach. The spread's cells hold the median of their pixels' absolute residual,
    not its mean: boats moored 1 px apart fill nearly every cell of a dense anchorage with a
    few hull pixels, whose mean raised the CFAR level above the hulls themselves (a probe's
    anchorage: 6 spreads reached 161 at its missed boats, their residual 112); a cell's median
    follows its water until hulls fill half of it. The cells are anchored on the image grid
    (``origin`` is the global ``(y, x)`` of ``score[0, 0]``), so every tiling sees the same cells.

    Returns
    -------
    background, residual, spread : numpy.ndarray
        float32 of the score's shape; ``residual`` is ``score - background``.
    """
    cells = window_cells(size)
    background = _cell_median(score, cells, origin)
    # The residual and the cell medians of its absolute value in one pass: as whole-tile numpy
    # steps they were two more tile-sized temporaries and an edge-padded copy.
    residual = np.empty_like(background)
    top, left, grid = _cell_grid(score.shape, origin)
    cell_medians = np.empty(grid, dtype=np.float32)
    _residual_cells(
        score, background, top, left, BACKGROUND_CELL, _CELL_NETWORK, residual, cell_medians
    )
    # The median of |x| is sigma / MAD_TO_SIGMA for Gaussian x (cells take the median of
    # |residual|); scaled on the cells, before they are brought back to full resolution.
    spread = _cells_to_median(
        cell_medians, cells, score.shape, top, left, np.float32(MAD_TO_SIGMA * spread_factor)
    )
    return background, residual, spread


def sample_departures(
    raw: np.ndarray,
    gains: np.ndarray,
    offsets: np.ndarray,
    nodata: float | None,
    low: np.ndarray,
    high: np.ndarray,
    units: np.ndarray,
) -> np.ndarray:
    """How far each sample date departs from the reference's range ``(time, y, x)`` float32.

    ``raw`` ``(time, band, y, x)`` are the dates as stored, normalised here as
    :func:`spoc_xr.reference.normalise_values` does (``gains``/``offsets`` ``(time, band)``,
    ``nodata``); ``low``/``high`` ``(band, y, x)`` the reference's range over the misregistration
    window (a shifted edge is no object); ``units`` ``(band,)`` the radiometry's residual scales.
    The departure is the largest over bands of ``max(date - high, low - date) / units``, at least
    0; 0 where the date has no data or the range is unknown in every band (as numpy's
    ``nan_to_num`` of the NaN). One compiled pass (no dates x bands temporaries); equal to the
    numpy expression in ``tests/test_detect.py``.
    """
    out = np.empty((raw.shape[0], *raw.shape[2:]), dtype=np.float32)
    _departure_rows(
        _compiled_date(raw),
        *_float32(gains, offsets, low, high, units),
        *_nodata_arguments(raw, nodata),
        out,
    )
    return out


def kept_medians(
    raw: np.ndarray,
    gains: np.ndarray,
    offsets: np.ndarray,
    nodata: float | None,
    low: np.ndarray,
    high: np.ndarray,
    left_out: np.ndarray | None,
) -> np.ndarray:
    """Robust spread ``(band, y, x)`` of the sample dates beyond ``low``/``high``, without the
    dates ``left_out`` ``(time, y, x)`` (:func:`noise_sample_objects`).

    ``MAD_TO_SIGMA x`` the median over dates of ``max(date - high, low - date, 0)``, dates
    normalised as :func:`sample_departures` does them; with ``low`` = ``high`` = the reference
    it is the spread around the reference. Missing dates (no data, left out) do not count; NaN
    where none remains. Equal, value for value, to ``nanmedian_first`` of the NaN-masked numpy
    expression (``tests/test_detect.py``).
    """
    out = np.empty((raw.shape[1], *raw.shape[2:]), dtype=np.float32)
    masked = left_out is not None
    _kept_median_rows(
        _compiled_date(raw),
        *_float32(gains, offsets, low, high),
        *_nodata_arguments(raw, nodata),
        left_out if masked else np.zeros((0, 0, 0), dtype=bool),
        masked,
        np.asarray(sorting_network(raw.shape[0]), dtype=np.int64).reshape(-1, 2),
        np.float32(MAD_TO_SIGMA),
        out,
    )
    return out


@_compiled
def _normalised_row(  # pragma: no cover - compiled
    date, t, y, gains, offsets, nodata, check_nodata, is_float, values, valid
):
    # normalise_values for row y of date t, band by band along the row (contiguous reads):
    # ``valid`` False where a band has no data (its values are then not to be used).
    valid[:] = True
    for band in range(date.shape[1]):
        row, g, o = date[t, band, y], gains[t, band], offsets[t, band]
        for x in range(row.shape[0]):
            value = row[x]
            if (check_nodata and value == nodata) or (is_float and not np.isfinite(value)):
                valid[x] = False
            values[band, x] = np.float32(value) * g + o


@_compiled
def _beyond(value, low, high):  # pragma: no cover - compiled
    # np.maximum(value - high, low - value): NaN when either is.
    above, below = value - high, low - value
    if np.isnan(above) or np.isnan(below):
        return np.float32(np.nan)
    return above if above >= below else below


@_compiled
def _departure_rows(  # pragma: no cover - compiled
    date, gains, offsets, low, high, units, nodata, check_nodata, is_float, out
):
    width = date.shape[3]
    values = np.empty((date.shape[1], width), dtype=np.float32)
    valid = np.empty(width, dtype=np.bool_)
    best = np.empty(width, dtype=np.float32)
    largest = np.float32(np.finfo(np.float32).max)
    for t in range(date.shape[0]):
        for y in range(date.shape[2]):
            _normalised_row(
                date, t, y, gains, offsets, nodata, check_nodata, is_float, values, valid
            )
            best[:] = np.nan  # np.fmax over bands: NaN only where every band is
            for band in range(date.shape[1]):
                lows, highs, unit = low[band, y], high[band, y], units[band]
                for x in range(width):
                    part = _beyond(values[band, x], lows[x], highs[x]) / unit
                    if not np.isnan(part) and (np.isnan(best[x]) or part > best[x]):
                        best[x] = part
            row = out[t, y]
            for x in range(width):
                if not valid[x] or np.isnan(best[x]):
                    row[x] = 0
                elif best[x] > largest:
                    row[x] = largest
                else:
                    row[x] = max(best[x], np.float32(0))


@_compiled
def _kept_median_rows(  # pragma: no cover - compiled
    date,
    gains,
    offsets,
    low,
    high,
    nodata,
    check_nodata,
    is_float,
    left_out,
    masked,
    network,
    scale,
    out,
):
    # As nanmedian_first: missing values sort last as +inf through a sorting network applied
    # along the row (vectorised), and the middle of the values present is the median.
    n_dates, n_bands, width = date.shape[0], date.shape[1], date.shape[3]
    values = np.empty((n_dates, n_bands, width), dtype=np.float32)
    valid = np.empty((n_dates, width), dtype=np.bool_)
    ordered = np.empty((n_dates, width), dtype=np.float32)
    count = np.empty(width, dtype=np.int64)
    infinity, zero, two = np.float32(np.inf), np.float32(0), np.float32(2)
    for y in range(date.shape[2]):
        for t in range(n_dates):
            _normalised_row(
                date, t, y, gains, offsets, nodata, check_nodata, is_float, values[t], valid[t]
            )
            if masked:
                for x in range(width):
                    valid[t, x] = valid[t, x] and not left_out[t, y, x]
        for band in range(n_bands):
            lows, highs, row = low[band, y], high[band, y], out[band, y]
            count[:] = 0
            for t in range(n_dates):
                line = ordered[t]
                for x in range(width):
                    part = _beyond(values[t, band, x], lows[x], highs[x])
                    if valid[t, x] and not np.isnan(part):
                        line[x] = max(part, zero)
                        count[x] += 1
                    else:
                        line[x] = infinity
            for pair in range(network.shape[0]):
                compare_exchange_row(ordered[network[pair, 0]], ordered[network[pair, 1]], width)
            for x in range(width):
                if count[x] == 0:
                    row[x] = np.nan
                else:
                    middle = ordered[(count[x] - 1) // 2, x] + ordered[count[x] // 2, x]
                    row[x] = middle / two * scale


def noise_sample_objects(departures: np.ndarray, origin: tuple[int, int] = (0, 0)) -> np.ndarray:
    """Where a noise-sample date holds an object, to be left out of the noise model.

    ``departures`` ``(time, y, x)`` from :func:`sample_departures`; ``origin`` is the image
    ``(y, x)`` of its first pixel, which anchors the local median's cells (as in
    :func:`local_background`, with the default window), so every tiling gives the same answer
    ``OBJECT_REACH`` px inside the edges. A date departs like an object where it exceeds
    ``OBJECT_FACTOR`` times its local median departure (at least 1): ships and planes on that
    date, not the wide variation of vegetation, surf or haze, nor the noise. The object and a
    pixel around it are left out. Where fewer than ``MIN_NOISE_DATES`` dates would remain, none
    is left out.

    Returns
    -------
    numpy.ndarray
        bool ``(time, y, x)``, True where the date is left out of the pixel's noise model.
    """
    cells = window_cells(DEFAULT_BACKGROUND_SIZE)
    left_out = np.empty(departures.shape, dtype=bool)
    one = np.float32(1.0)
    for t, departure in enumerate(departures):
        level = np.maximum(_cell_median(departure, cells, origin), one)
        level *= np.float32(OBJECT_FACTOR)
        left_out[t] = kernels.binary_dilation(departure > level, 3)
    remaining = departures.shape[0] - left_out.sum(axis=0)
    left_out &= (remaining >= MIN_NOISE_DATES)[None]
    return left_out


def _cell_grid(shape: tuple[int, ...], origin: tuple[int, int]) -> tuple[int, int, tuple[int, int]]:
    """Where the image grid's cells start in a tile (rows and columns of the first, partial
    cell before the tile) and how many cells cover it."""
    cell = BACKGROUND_CELL
    top, left = origin[0] % cell, origin[1] % cell
    return top, left, (-(-(shape[0] + top) // cell), -(-(shape[1] + left) // cell))


def _cell_median(
    values: np.ndarray, cells: int, origin: tuple[int, int], factor: np.float32 | None = None
) -> np.ndarray:
    """Median over ``cells`` x ``cells`` grid cells of the cell means (times ``factor``), back
    at full resolution. Partial cells at the tile's edges are completed by edge replication."""
    cell = BACKGROUND_CELL
    height, width = values.shape
    top, left, grid = _cell_grid(values.shape, origin)
    bottom, right = grid[0] * cell - height - top, grid[1] * cell - width - left
    padding = ((top, bottom), (left, right))
    if top or bottom or left or right:
        values = np.pad(values, padding, mode="edge")
    means = kernels.block_mean(values, cell)
    return _cells_to_median(means, cells, (height, width), top, left, factor)


def _cells_to_median(
    means: np.ndarray,
    cells: int,
    shape: tuple[int, ...],
    top: int,
    left: int,
    factor: np.float32 | None,
) -> np.ndarray:
    median = _log_restore(kernels.median_filter(_log_quantise(means), cells))
    if factor is not None:
        median *= factor
    full = kernels.upsample_linear(median, BACKGROUND_CELL)
    return full[top : top + shape[0], left : left + shape[1]]


@_compiled
def _residual_cells(
    score, background, top, left, cell, network, residual, medians
):  # pragma: no cover
    # Cell medians of |residual| as numpy's median over each cell's pixels gives them (the mean
    # of the two middle values, in float32; NaN in a cell with a NaN), over the tile
    # edge-replicated to whole cells. A row of cells at a time: its cells' values gathered one
    # cell position per line, then middle_network's comparators along the lines (vectorised).
    height, width = score.shape
    nans = 0
    for y in range(height):
        for x in range(width):
            value = score[y, x] - background[y, x]
            residual[y, x] = value
            nans += value != value
    rows = _replicated_indices(medians.shape[0] * cell, top, height)
    columns = _replicated_indices(medians.shape[1] * cell, left, width)
    n_cells = medians.shape[1]
    size = cell * cell
    ordered = np.empty((size, n_cells), dtype=np.float32)
    missing = np.zeros(n_cells, dtype=np.bool_)
    low, high = (size - 1) // 2, size // 2
    half, nan = np.float32(0.5), np.float32(np.nan)
    for cy in range(medians.shape[0]):
        for dy in range(cell):
            row = residual[rows[cy * cell + dy]]
            for dx in range(cell):
                line = ordered[dy * cell + dx]
                for cx in range(n_cells):
                    line[cx] = abs(row[columns[cx * cell + dx]])
        if nans:  # rare: checked apart, the gather above stays free of it
            missing[:] = False
            for position in range(size):
                line = ordered[position]
                for cx in range(n_cells):
                    missing[cx] |= line[cx] != line[cx]
        for pair in range(network.shape[0]):
            compare_exchange_row(ordered[network[pair, 0]], ordered[network[pair, 1]], n_cells)
        out = medians[cy]
        for cx in range(n_cells):
            middle = (ordered[low, cx] + ordered[high, cx]) * half
            out[cx] = nan if missing[cx] else middle


@_compiled
def _replicated_indices(size, before, length):  # pragma: no cover - compiled
    # Index into an axis of ``length`` for each of ``size`` positions starting ``before`` ahead
    # of it, edges replicated.
    indices = np.empty(size, dtype=np.int64)
    for i in range(size):
        indices[i] = min(max(i - before, 0), length - 1)
    return indices


def density(mask: np.ndarray, cells: int, origin: tuple[int, int]) -> np.ndarray:
    """Local share of ``mask``, in ``DENSITY_STEPS`` steps: the median over ``cells`` x ``cells``
    grid cells of each cell's share, back at full resolution (see :func:`local_background`).

    The same as the cell median of ``mask * DENSITY_STEPS`` as float32. Counted per cell in one
    pass: the cell means of such an image are exact in any order of summation, so no tile-sized
    float copy is needed.
    """
    top, left, grid = _cell_grid(mask.shape, origin)
    means = np.empty(grid, dtype=np.float32)
    _cell_shares(mask, top, left, BACKGROUND_CELL, np.float32(DENSITY_STEPS), means)
    return _cells_to_median(means, cells, mask.shape, top, left, None)


@_compiled
def _cell_shares(mask, top, left, cell, steps, means):  # pragma: no cover - compiled
    height, width = mask.shape
    rows = _replicated_indices(means.shape[0] * cell, top, height)
    columns = _replicated_indices(means.shape[1] * cell, left, width)
    counts = np.empty(means.shape[1], dtype=np.int64)
    step = steps / np.float32(cell * cell)
    for cy in range(means.shape[0]):
        counts[:] = 0
        for dy in range(cell):
            row = mask[rows[cy * cell + dy]]
            for i in range(columns.shape[0]):
                if row[columns[i]]:
                    counts[i // cell] += 1
        for cx in range(counts.shape[0]):
            means[cy, cx] = np.float32(counts[cx]) * step


def small_objects(
    candidates: np.ndarray,
    score: np.ndarray,
    background: np.ndarray,
    residual: np.ndarray,
    threshold: float,
    *,
    sharpness: float = SHARPNESS,
    needed: np.ndarray | None = None,
    valid: np.ndarray | None = None,
) -> np.ndarray:
    """The connected candidates that pass the small class's object tests.

    A single isolated pixel (no candidate among its 8 neighbours) needs a residual
    (``score - background``) above ``ISOLATED_FACTOR`` x ``threshold``: one pixel is weak
    evidence. Then the ring 2 px outside each object (within 2 px of it, not within 1 px of any
    candidate) must average below ``sharpness`` x the object's peak score: hulls have crisp edges
    over water, haze puffs and cloud fringes fade out slowly. Where the ring lies in a cloud body
    (its mean local ``background`` above ``CLOUD_BODY_LEVEL`` x ``threshold``), an object also
    passes when its ring stands out of the background by less than ``CLOUD_BODY_SHARPNESS`` x its
    peak residual: the cloud's own change around a hull is no fade. Objects longer than
    ``MAX_SMALL_EXTENT`` are dropped (wakes, roads, edges). With the CFAR level ``needed`` and
    ``valid``, faint pieces trailing a stronger object (a wake's tail) are dropped too
    (``LINK_LEVEL``).
    """
    if not candidates.any():
        return candidates
    # Any numbering will do here: only the kept pixels leave.
    labels, count, extents = kernels.components(candidates, connectivity=8)
    # Candidates and rings are sparse: flat indices of their pixels instead of whole-tile masks
    # (a boolean-mask gather or a label lookup over the tile costs more than the rest).
    members = np.flatnonzero(candidates)
    flat_labels = labels.reshape(-1)
    member_labels = flat_labels[members]
    # Isolated pixels are the components of one pixel; dropping the weak ones before the rings
    # are drawn lets the rings of their neighbours pass over them.
    area = np.bincount(member_labels, minlength=count + 1)
    weak = area[member_labels] == 1
    weak &= ~(residual.reshape(-1)[members] > ISOLATED_FACTOR * threshold)
    if weak.any():
        candidates = candidates.copy()
        candidates.reshape(-1)[members[weak]] = False
        flat_labels[members[weak]] = 0
        members, member_labels = members[~weak], member_labels[~weak]
        if members.size == 0:
            return candidates
    flat_score = score.reshape(-1)
    peak = np.zeros(count + 1, dtype=np.float64)
    np.maximum.at(peak, member_labels, flat_score[members])
    ring, ring_labels = object_rings(labels, members)
    ring_sum = np.bincount(ring_labels, weights=flat_score[ring], minlength=count + 1)
    ring_count = np.maximum(np.bincount(ring_labels, minlength=count + 1), 1)
    keep = ring_sum < sharpness * peak * ring_count
    ring_background = np.bincount(
        ring_labels, weights=background.reshape(-1)[ring], minlength=count + 1
    )
    in_body = ring_background > CLOUD_BODY_LEVEL * threshold * ring_count
    if in_body.any():
        peak_residual = np.zeros(count + 1, dtype=np.float64)
        np.maximum.at(peak_residual, member_labels, residual.reshape(-1)[members])
        standing_out = ring_sum - ring_background
        keep |= in_body & (standing_out < CLOUD_BODY_SHARPNESS * peak_residual * ring_count)
    keep &= extents <= MAX_SMALL_EXTENT
    keep[0] = False
    if needed is not None and valid is not None and np.count_nonzero(keep) > 1:
        kept = keep[member_labels]
        keep &= ~trailing_pieces(
            candidates,
            members[kept],
            member_labels[kept],
            peak,
            extents,
            score,
            residual,
            needed,
            valid,
            threshold,
        )
    dropped = members[~keep[member_labels]]
    if dropped.size == 0:
        return candidates
    small = candidates.copy()
    small.reshape(-1)[dropped] = False
    return small


# A ship's wake fades with distance behind it; where its change hovers about the threshold the
# tail breaks into specks apart from the ship (a probe: 2-5 px pieces 7-20 px behind 2 x 5 px
# hulls, peaks of 6-14 noise scales against the hull's 150, joined to the wake's stronger part by
# pixels of 3-6). A speck (at most FRAGMENT_EXTENT px long) that is weak evidence (no pixel above
# FRAGMENT_FACTOR x its level) is such a piece, not an object of its own, when a path of pixels
# above LINK_LEVEL x the candidate level, at most LINK_REACH px long, leads from it to a
# candidate pixel scoring over its peak / FRAGMENT_SHARE. Without the weak-evidence test, a real
# 7 x 13 px boat (peak 55) moored 3 px from a brighter one (277) was dropped (algiers, seed 2).
# Speck and path lie within MAX_SMALL_EXTENT + SMALL_CONTEXT of the core, which the tile's halo
# covers (a test module asserts it); comparing with the whole stronger object's peak would not.
LINK_LEVEL = 0.5
LINK_REACH = 24
FRAGMENT_EXTENT = 5
FRAGMENT_SHARE = 0.2
FRAGMENT_FACTOR = ISOLATED_FACTOR


def trailing_pieces(
    candidates: np.ndarray,
    members: np.ndarray,
    member_labels: np.ndarray,
    peak: np.ndarray,
    extents: np.ndarray,
    score: np.ndarray,
    residual: np.ndarray,
    needed: np.ndarray,
    valid: np.ndarray,
    threshold: float,
) -> np.ndarray:
    """Which labelled objects are faint pieces trailing a stronger one (see ``LINK_LEVEL``).

    ``members`` are the objects' pixels (flat indices, candidates all), ``member_labels`` their
    labels, ``peak`` each label's peak score and ``extents`` its longer side. Returns a boolean
    per label.
    """
    level = np.maximum(needed.reshape(-1)[members], np.float32(threshold))
    clear = residual.reshape(-1)[members] > np.float32(FRAGMENT_FACTOR) * level
    weak = np.zeros(peak.size, dtype=bool)
    weak[member_labels] = True
    weak[member_labels[clear]] = False
    weak &= extents <= FRAGMENT_EXTENT
    faint = np.zeros(peak.size, dtype=bool)
    if not weak.any():
        return faint
    # The weak objects' pixels, grouped by object.
    chosen = weak[member_labels]
    order = np.argsort(member_labels[chosen], kind="stable")
    pixels = members[chosen][order].astype(np.int64, copy=False)
    owners = member_labels[chosen][order]
    starts = np.flatnonzero(np.r_[True, owners[1:] != owners[:-1]])
    ends = np.r_[starts[1:], owners.size]
    found = np.zeros(starts.size, dtype=np.bool_)
    # Visited marks, one number per object searched, on a window that holds any search (the
    # object's box and the path's reach around it): no tile-sized array.
    side = FRAGMENT_EXTENT + 2 * (LINK_REACH + 1)
    stamp = np.zeros((side, side), dtype=np.int32)
    _trailing_rows(
        candidates,
        score,
        residual,
        needed,
        valid,
        pixels,
        starts,
        ends,
        (peak[owners[starts]] / FRAGMENT_SHARE).astype(np.float32),
        np.float32(threshold),
        np.float32(LINK_LEVEL),
        LINK_REACH,
        stamp,
        found,
    )
    faint[owners[starts][found]] = True
    return faint


@_compiled
def _trailing_rows(  # pragma: no cover - compiled
    candidates,
    score,
    residual,
    needed,
    valid,
    pixels,
    starts,
    ends,
    strong,
    threshold,
    share,
    reach,
    stamp,
    found,
):
    # Breadth first from each object, one ring of pixels a step, through pixels above share x
    # their level, until a candidate scoring over the object's `strong` is next to the front.
    height, width = score.shape
    for k in range(starts.size):
        mark = k + 1
        front = pixels[starts[k] : ends[k]].copy()
        top, left = height, width
        for p in front:
            top, left = min(top, p // width), min(left, p % width)
        top, left = top - reach - 1, left - reach - 1
        for p in front:
            stamp[p // width - top, p % width - left] = mark
        size = front.size
        for step in range(reach + 1):
            grown = np.empty(max(16, 2 * size), dtype=np.int64)
            count = 0
            for i in range(size):
                y, x = front[i] // width, front[i] % width
                for ny in range(max(0, y - 1), min(height, y + 2)):
                    for nx in range(max(0, x - 1), min(width, x + 2)):
                        if stamp[ny - top, nx - left] == mark:
                            continue
                        stamp[ny - top, nx - left] = mark
                        if candidates[ny, nx] and score[ny, nx] > strong[k]:
                            found[k] = True
                        if found[k] or step == reach or not valid[ny, nx]:
                            continue
                        level = needed[ny, nx]
                        if not (level >= threshold or level != level):
                            level = threshold
                        if not residual[ny, nx] > share * level:
                            continue
                        if count == grown.size:
                            wider = np.empty(2 * grown.size, dtype=np.int64)
                            wider[:count] = grown[:count]
                            grown = wider
                        grown[count] = ny * width + nx
                        count += 1
            if found[k]:
                break
            front, size = grown, count
            if size == 0:
                break


def object_rings(labels: np.ndarray, members: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The ring 2 px outside labelled objects: its pixels and the object each belongs to.

    A ring pixel lies within 2 px (a 5 x 5 window) of a labelled pixel and not within 1 px (3 x 3)
    of any; it belongs to the largest label in its 5 x 5 window. Windows are clipped at the
    border. The same as ``(maximum_filter(labels, 5) > 0) & ~binary_dilation(labels > 0, 3)``
    with scipy's defaults, but only the windows of the ``members`` (the flat indices of the
    labelled pixels, ascending) are visited: objects are sparse.

    Returns
    -------
    ring, ring_labels : numpy.ndarray
        Flat indices of the ring's pixels, ascending (int64), and their labels (int32).
    """
    labels = np.ascontiguousarray(labels, dtype=np.int32)
    # Each pixel is looked at once: the windows of neighbouring members overlap.
    seen = np.zeros(labels.size, dtype=np.bool_)
    found = np.empty(25 * members.size, dtype=np.int64)
    count = _ring_rows(labels, members.astype(np.int64, copy=False), seen, found)
    # Ascending, as a whole-tile mask would give them: the sums over each ring then add up in
    # the same order.
    ring = np.sort(found[:count])
    owners = np.empty(count, dtype=np.int32)
    _window_maxima(labels, ring, owners)
    return ring, owners


@_compiled
def _ring_rows(labels, members, seen, found):  # pragma: no cover - compiled
    height, width = labels.shape
    count = 0
    for member in members:
        y, x = member // width, member % width
        for qy in range(max(0, y - 2), min(height, y + 3)):
            for qx in range(max(0, x - 2), min(width, x + 3)):
                q = qy * width + qx
                if seen[q]:
                    continue
                seen[q] = True
                near = False
                for ny in range(max(0, qy - 1), min(height, qy + 2)):
                    for nx in range(max(0, qx - 1), min(width, qx + 2)):
                        if labels[ny, nx] > 0:
                            near = True
                if not near:
                    found[count] = q
                    count += 1
    return count


@_compiled
def _window_maxima(labels, ring, maxima):  # pragma: no cover - compiled
    height, width = labels.shape
    for i in range(ring.size):
        y, x = ring[i] // width, ring[i] % width
        best = 0
        for ny in range(max(0, y - 2), min(height, y + 3)):
            for nx in range(max(0, x - 2), min(width, x + 3)):
                if labels[ny, nx] > best:
                    best = labels[ny, nx]
        maxima[i] = best


def classify_tile(
    date: np.ndarray,
    low: np.ndarray,
    high: np.ndarray,
    noise: np.ndarray,
    gain: np.ndarray,
    offset: np.ndarray,
    *,
    nodata: float | None,
    params: DetectParams,
    origin: tuple[int, int] = (0, 0),
    scale: np.ndarray | None = None,
    known: np.ndarray | None = None,
    levels: tuple[float, float] | None = None,
    visible: Sequence[int] | None = None,
    nir: int | None = None,
    swir: Sequence[int] | None = None,
    reference: np.ndarray | None = None,
    shift: np.ndarray | None = None,
    water: np.ndarray | None = None,
    ceilings: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """Mask codes of one date tile: 0 clear, 1 small, 2 large, 255 invalid.

    Pure numpy on arrays ``(band, y, x)``; the whole chain the tile needs, with no cropping (the
    caller crops the overlap). ``origin`` is the image ``(y, x)`` of the tile's first pixel, which
    anchors the background's cells. Windows stop at the image's edges (the stages treat them as
    their filters do, edges replicated): a tile's result then depends on the image alone, not on
    how it was tiled. ``scale`` ``(y, x)`` is the noise scale in noise floors
    (:func:`reference_products`); without it the large class has no magnitude test. ``known``
    ``(y, x)``, where ``low`` is finite in every band, saves working it out for every date.
    ``levels`` is the date's ``(dark, bright)`` band-mean levels
    (:func:`spoc_xr.reference.brightness_levels`); without them thin haze is not told from clouds.
    ``visible`` indexes the bands of visible light (:func:`visible_bands`; see
    :func:`change_direction`) and ``nir`` the near-infrared band (:func:`nir_band`): with both,
    a pixel near haze whose rise is a hull's colour, not a veil's, is spared the haze factor
    (``HULL_NIR_RATIO``). ``swir`` indexes the shortwave-infrared bands (:func:`swir_bands`):
    with ``visible``, snow is told from clouds (``SNOW_SWIR_SHARE``). ``shift`` is the date's
    misregistration against the reference (:func:`spoc_xr.reference.estimate_shift`); where it
    narrows the tolerance window (:func:`shift_reach`), the range is taken from ``reference``
    ``(band, y, x)``, the tile padded
    by the tolerance's radius. ``water`` ``(y, x)`` bool, the water mask (None without a water
    index): sea clutter on it is dropped (:func:`without_sea_clutter`). ``ceilings``: where the
    date's and the reference's bands clipped (see :func:`change_passes`). Exposed for tests and
    for the reference implementation.
    """
    radius = params.tolerance // 2
    # Only a narrower reach needs the range of its own; the full one is low/high.
    reach = shift_reach(shift, radius) if reference is not None else None
    reach = None if reach == (radius,) * 4 else reach
    # The direction is needed only on dates with a wide change (most, on large tiles); read in
    # the score's pass, it costs less than a pass of its own.
    score, valid, darker, thin = change_passes(
        date,
        low,
        high,
        noise,
        gain,
        offset,
        nodata=nodata,
        known=known,
        levels=levels,
        visible=visible,
        swir=swir,
        reference=reference,
        reach=reach,
        ceilings=ceilings,
    )
    threshold = params.effective_threshold
    background, residual, needed = local_background(
        score, params.background_size, origin, spread_factor=CFAR_FACTOR
    )
    # Small: stands out of its local background by the threshold and by CFAR_FACTOR local
    # spreads (a constant false-alarm rate in textured changes), with crisp edges.
    # Near haze or a cloud body, puffs and fringes look like small objects: there a small object
    # must stand out HAZE_FACTOR times more.
    # Both tests at once: the residual must exceed the larger of the two levels.
    candidates, hazy_seed, wide = _plain_tests(residual, needed, background, valid, threshold)
    if hazy_seed.any():  # most dates have no haze
        # Only candidates can be held back: few, so taken by index, and whether haze lies
        # within HAZE_WINDOW of each is read at those pixels alone, not from a wide dilation.
        tested = np.flatnonzero(candidates)
        tested = tested[kernels.dilated_at(hazy_seed, tested, HAZE_WINDOW)]
        level = np.maximum(needed.reshape(-1)[tested], np.float32(HAZE_FACTOR * threshold))
        held = ~(residual.reshape(-1)[tested] > level)
        if nir is not None and visible is not None:
            held &= ~_hull_coloured(
                date, low, high, gain, offset, tested, nir, visible, reference, reach, noise
            )
        candidates.reshape(-1)[tested[held]] = False
    small = small_objects(
        candidates, score, background, residual, threshold, needed=needed, valid=valid
    )
    # Large: the wide change itself; closing joins the fragments of soft edges and haze, the
    # opening removes everything narrower than open_size, so no boat can be large.
    # Where the pixel brightened, both must also be large in noise floors (LARGE_MAGNITUDE) and
    # not thin haze (THIN_OPACITY of the date's cloud brightness). A shadow takes away at most
    # what the surface reflects, so darkening is held to no such magnitude. The wide change must
    # be dense in pixels that pass (LARGE_DENSITY), so that the closing does not turn a sparse
    # speckle into a solid object (the pixels that do not pass, inside a dense region, are only
    # bridged: below, only pixels that changed by the same tests stay large).
    # Mid-size objects (below) need the large class's tests too when nothing is wide.
    changed = None
    if wide.any() or np.count_nonzero(score > threshold) >= params.open_size**2:
        qualifies, changed = _large_tests(darker, thin, score, valid, background, scale, threshold)
    if wide.any():
        cells = window_cells(params.background_size)
        share = density(qualifies, cells, origin)
        wide &= share > np.float32(LARGE_DENSITY * DENSITY_STEPS)
    if wide.any():
        closed = kernels.binary_closing(wide, params.close_size)
        large = kernels.binary_opening(closed, params.open_size)
        # The median rounds corners and lags behind soft edges: changed pixels next to the
        # large class join it. The closing and the median also spread the class over pixels that
        # did not change by the large class's own test (thin haze around a cloud, the gaps the
        # closing bridged): only changed pixels are large, those in and next to the wide change.
        large |= changed & kernels.binary_dilation(large, params.open_size)
        # Deep inside the large class (an open_size erosion of it) unchanged pixels stay large:
        # holes of a cloud over a surface as bright as the cloud.
        large &= changed | kernels.binary_erosion(large, params.open_size)
    else:  # a clear date: nothing to close or open
        large = wide
    # Mid-size objects (a cloud 2-3 local windows across): the local median shrinks an object by
    # about half its window, so too little of it was wide to survive the opening, and it was
    # too wide or too soft to be small. Whatever changed by the large class's own tests over a
    # whole open_size square is large too (no boat is that wide).
    if changed is not None:
        large = large | kernels.binary_opening(changed, params.open_size)
    small, puffs = round_objects(small, params.open_size)
    if puffs is not None:
        large = large | puffs
    if water is not None:
        small = without_sea_clutter(small, water)
    codes = large.view(np.uint8) * np.uint8(LARGE)
    np.copyto(codes, np.uint8(SMALL), where=small)
    np.copyto(codes, np.uint8(INVALID), where=~valid)
    return codes


# A small object is a cloud puff (or its shadow), not a ship, when it is round: it holds a
# square of ROUND_WIDTH_SHARE of open_size (11 px: 110 m at 10 m, wider than any ship's beam),
# is less than 1.4 times as long as it is wide (eccentricity ROUND_ECCENTRICITY) and solid
# (ROUND_SOLIDITY of its convex hull). A probe's cumulus fields (25 soft puffs a date) left puffs
# of 130-590 px whose sharp cores passed the ring test as boats: large IoU 0.48 -> 0.59, false
# boats 1.83 -> 1.17 a date. Ships moored side by side form clusters as wide, but long (athens:
# eccentricity 0.79-0.99): at 0.8, one of them was lost (athens seed 1 recall 0.866 -> 0.859);
# every port, seeds 0 and 1, and the demo keep their figures at 0.7.
ROUND_WIDTH_SHARE = 0.75
ROUND_ECCENTRICITY = 0.7
ROUND_SOLIDITY = 0.85

# Sea clutter: on a windy date breaking waves leave foam in scattered pixels of open water
# (whitecaps), each rising in every band: as changes they are small objects of one or two pixels,
# by the hundred (a probe: whitecaps on 0.5 % of the water made 142-176 false boats on that one
# date, and as many heatmap pixels). Ships do not crowd open water as specks of one or two
# pixels: such objects on water with at least SEA_CLUTTER_COUNT of them (each counted once, itself
# included) in a SEA_CLUTTER_WINDOW px square around one are clutter, and clear. None of the 5,899
# labelled ships of sen2ships is that small; of the port stacks' (seeds 0-2) detections, 4 were
# clutter by this rule, none of them on a ship. On land (cars in a car park) nothing is dropped.
# Session 30, 8 -> 4: the haze fringes of clouds leave such specks too, sparser (gdynia's date
# 05-17: 299 false objects, 131 of 1-2 px): gdynia seed 0 precision 0.806 -> 0.840 (F1 0.878 ->
# 0.899), 6-date hedland 0.831 -> 0.843; the other ports (seeds 0 and 1), demo seeds 0-3 and
# Landsat unchanged. At 3 the demo lost boats (seed 0 recall 0.889 -> 0.865).
SEA_CLUTTER_COUNT = 4
SEA_CLUTTER_WINDOW = 63


def round_objects(small: np.ndarray, open_size: int) -> tuple[np.ndarray, np.ndarray | None]:
    """``small`` without its round objects (see ``ROUND_ECCENTRICITY``), and those objects
    (``None`` when there is none).

    Examples
    --------
    >>> yy, xx = np.mgrid[:40, :60]
    >>> puff = (yy - 20) ** 2 + (xx - 15) ** 2 < 10**2  # 20 px across
    >>> ship = (abs(yy - 20) < 3) & (abs(xx - 45) < 12)  # 23 x 5 px
    >>> kept, moved = round_objects(puff | ship, 15)
    >>> bool((kept == ship).all()), bool((moved == puff).all())
    (True, True)
    """
    import cv2
    from skimage.measure import regionprops

    width = int(ROUND_WIDTH_SHARE * open_size) | 1
    if np.count_nonzero(small) < width * width:
        return small, None
    core = kernels.binary_opening(small, width)
    if not core.any():
        return small, None
    # Only the objects that hold the square are labelled (small objects are at most
    # MAX_SMALL_EXTENT long, so they lie within that of the square's pixels), and measured each
    # on its own bounding box: labelling a whole tile with statistics cost 20 ms.
    left, top, span_x, span_y = cv2.boundingRect(core.view(np.uint8))
    top, left = max(top - MAX_SMALL_EXTENT, 0), max(left - MAX_SMALL_EXTENT, 0)
    area = (
        slice(top, top + span_y + 2 * MAX_SMALL_EXTENT),
        slice(left, left + span_x + 2 * MAX_SMALL_EXTENT),
    )
    _, labels, stats, _ = cv2.connectedComponentsWithStats(
        np.ascontiguousarray(small[area]).view(np.uint8), connectivity=8, ltype=cv2.CV_32S
    )
    puffs = None
    for label in np.unique(labels[core[area]]):
        x, y, box_width, box_height = (int(value) for value in stats[label, :4])
        box = (slice(y, y + box_height), slice(x, x + box_width))
        shape = labels[box] == label
        (region,) = regionprops(shape.view(np.uint8))
        if region.eccentricity <= ROUND_ECCENTRICITY and region.solidity >= ROUND_SOLIDITY:
            if puffs is None:
                puffs = np.zeros_like(small)
            puffs[area][box] |= shape
    if puffs is None:
        return small, None
    return small & ~puffs, puffs


def without_sea_clutter(small: np.ndarray, water: np.ndarray) -> np.ndarray:
    """``small`` without its sea clutter (see ``SEA_CLUTTER_COUNT``): objects of one or two
    pixels on ``water`` that crowd a ``SEA_CLUTTER_WINDOW`` px square by ``SEA_CLUTTER_COUNT``.

    Worked out from the small pixels alone (no tile-sized labelling). Returns ``small`` itself
    when nothing is dropped.

    Examples
    --------
    >>> small = np.zeros((40, 40), dtype=bool)
    >>> small[2:38:4, 2:38:4] = True  # 81 one-pixel specks, 4 px apart
    >>> small[20:23, 5:7] = True  # and a 3 x 2 px boat among them
    >>> kept = without_sea_clutter(small, np.ones_like(small))
    >>> int(kept.sum()), bool(kept[20:23, 5:7].all())
    (6, True)
    """
    pixels = np.flatnonzero(small)
    if pixels.size < SEA_CLUTTER_COUNT:
        return small
    rows, columns = np.divmod(pixels, small.shape[1])
    neighbours = np.empty(pixels.size, dtype=np.int8)
    partner = np.empty(pixels.size, dtype=np.int64)
    _small_neighbours(small, rows, columns, neighbours, partner)
    # One pixel: no neighbour. Two: one neighbour, itself with one; counted at the first.
    paired = neighbours == 1
    partner_neighbours = np.zeros(pixels.size, dtype=np.int8)
    partner_neighbours[paired] = neighbours[np.searchsorted(pixels, partner[paired])]
    first = (neighbours == 0) | (paired & (partner_neighbours == 1) & (pixels < partner))
    first &= water.reshape(-1)[pixels]
    if np.count_nonzero(first) < SEA_CLUTTER_COUNT:
        return small
    clutter = np.empty(np.count_nonzero(first), dtype=bool)
    _crowded(rows[first], columns[first], SEA_CLUTTER_WINDOW // 2, SEA_CLUTTER_COUNT, clutter)
    if not clutter.any():
        return small
    kept = small.copy()
    dropped = pixels[first][clutter]
    kept.reshape(-1)[dropped] = False
    twins = partner[first][clutter]
    kept.reshape(-1)[twins[twins >= 0]] = False
    return kept


@_compiled
def _small_neighbours(small, rows, columns, neighbours, partner):  # pragma: no cover - compiled
    # Each listed pixel's 8-connected neighbours in `small`, and the flat index of the last one
    # seen (-1 without any).
    height, width = small.shape
    for i in range(rows.size):
        y, x = rows[i], columns[i]
        count, last = 0, -1
        for v in range(max(y - 1, 0), min(y + 2, height)):
            for u in range(max(x - 1, 0), min(x + 2, width)):
                if (v != y or u != x) and small[v, u]:
                    count += 1
                    last = v * width + u
        neighbours[i] = count
        partner[i] = last


@_compiled
def _crowded(rows, columns, reach, count, crowded):  # pragma: no cover - compiled
    # Whether each point (in row-major order) has at least `count` points, itself included,
    # within `reach` in both rows and columns: the rows within reach are scanned outward from
    # it, until enough are found.
    n = rows.size
    for i in range(n):
        found = 1
        j = i - 1
        while j >= 0 and rows[i] - rows[j] <= reach and found < count:
            found += abs(columns[j] - columns[i]) <= reach
            j -= 1
        j = i + 1
        while j < n and rows[j] - rows[i] <= reach and found < count:
            found += abs(columns[j] - columns[i]) <= reach
            j += 1
        crowded[i] = found >= count


def _plain_tests(
    residual: np.ndarray,
    needed: np.ndarray,
    background: np.ndarray,
    valid: np.ndarray,
    threshold: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Small-object candidates before the haze test (the residual above both the threshold and
    the CFAR level ``needed``), where haze begins (``HAZE_LEVEL``) and the wide change, in one
    pass."""
    candidates, hazy_seed, wide = (np.empty(residual.shape, dtype=bool) for _ in range(3))
    _plain_rows(
        residual,
        needed,
        background,
        valid,
        np.float32(threshold),
        np.float32(HAZE_LEVEL * threshold),
        candidates,
        hazy_seed,
        wide,
    )
    return candidates, hazy_seed, wide


def _large_tests(
    darker: np.ndarray,
    thin: np.ndarray,
    score: np.ndarray,
    valid: np.ndarray,
    background: np.ndarray,
    scale: np.ndarray | None,
    threshold: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Which pixels qualify the wide change as large (not thin haze; darker, or large in noise
    floors, by the local background) and which changed by the large class's own tests (the
    same, by the pixel's score, and above the threshold), in one pass."""
    qualifies, changed = np.empty(score.shape, dtype=bool), np.empty(score.shape, dtype=bool)
    _large_rows(
        darker,
        thin,
        score,
        valid,
        background,
        score if scale is None else scale,
        scale is not None,
        np.float32(threshold),
        np.float32(LARGE_MAGNITUDE),
        qualifies,
        changed,
    )
    return qualifies, changed


@_compiled
def _plain_rows(  # pragma: no cover - compiled
    residual, needed, background, valid, threshold, haze_level, candidates, hazy_seed, wide
):
    for y in range(residual.shape[0]):
        for x in range(residual.shape[1]):
            level = needed[y, x]
            if not (level >= threshold or level != level):  # np.maximum: NaN wins
                level = threshold
            candidates[y, x] = residual[y, x] > level and valid[y, x]
            hazy_seed[y, x] = background[y, x] > haze_level
            wide[y, x] = background[y, x] > threshold and valid[y, x]


@_compiled
def _large_rows(  # pragma: no cover - compiled
    darker,
    thin,
    score,
    valid,
    background,
    scale,
    has_scale,
    threshold,
    magnitude,
    qualifies,
    changed,
):
    for y in range(score.shape[0]):
        for x in range(score.shape[1]):
            passes = not thin[y, x]
            qualifies[y, x] = passes and (
                not has_scale or darker[y, x] or background[y, x] * scale[y, x] > magnitude
            )
            changed[y, x] = (
                passes
                and valid[y, x]
                and score[y, x] > threshold
                and (not has_scale or darker[y, x] or score[y, x] * scale[y, x] > magnitude)
            )


def _classify_window(
    blocks: list[np.ndarray],
    window: Sequence[WindowPlan],
    low: np.ndarray,
    high: np.ndarray,
    noise: np.ndarray,
    scale: np.ndarray,
    known: np.ndarray,
    water: np.ndarray | None,
    reference: np.ndarray | None,
    shift: np.ndarray | None,
    gain: np.ndarray,
    offset: np.ndarray,
    levels: tuple[float, float] | None,
    origin: tuple[int, int],
    core: tuple[int, int, int, int],
    settings: dict[str, Any],
) -> np.ndarray:
    # The date's planned window reaches `margin` px further than the reference's on every side,
    # so that a date shifted by whole pixels is compared with the reference where its content
    # came from: the reference's window moved by `step` is assembled (contiguous: the compiled
    # passes ran several times slower over a view cut from the wider window).
    margin = settings["realign"]
    step = whole_pixel_shift(None if shift is None else shift[0])
    if margin:
        window = [shifted_plan(plan, margin, move) for plan, move in zip(window, step, strict=True)]
    date = _assemble_window(blocks, window, [2, 3])
    codes = classify_tile(
        date[0],
        low,
        high,
        noise,
        gain,
        offset,
        nodata=settings["nodata"],
        params=settings["params"],
        origin=origin,
        scale=scale,
        known=known,
        levels=levels,
        visible=settings["visible"],
        nir=settings["nir"],
        swir=settings["swir"],
        reference=reference,
        shift=None if shift is None else shift[0] - np.asarray(step),
        water=water,
        ceilings=settings["ceilings"],
    )
    top, left, height, width = core
    if step == (0, 0):
        return codes[None, top : top + height, left : left + width]
    # The date's pixel p is the reference's p - step; content from beyond the reference's
    # image (at the image's edges) has nothing to be compared with.
    out = np.full((1, height, width), INVALID, dtype=np.uint8)
    first, last = top - step[0], top - step[0] + height
    start, stop = left - step[1], left - step[1] + width
    source = codes[
        max(first, 0) : min(last, codes.shape[0]), max(start, 0) : min(stop, codes.shape[1])
    ]
    out[
        0,
        max(-first, 0) : max(-first, 0) + source.shape[0],
        max(-start, 0) : max(-start, 0) + source.shape[1],
    ] = source
    return out


#: Side (px) up to which classification merges neighbouring chunks into one tile: each tile
#: computes its halo (:attr:`DetectParams.depth`, 216 px by default) once, a smaller share of a
#: larger tile (up to 2480² computed per 2048² kept, against 1456² per 1024²; windows stop at the
#: image's edges). A tile's task holds about 40 bytes per window pixel of temporaries (~245 MB at
#: 2480²).
CLASSIFY_TILE = 2048
#: Dask configuration key overriding :data:`CLASSIFY_TILE` (``DASK_SPOC_XR__CLASSIFY_TILE``).
CLASSIFY_TILE_CONFIG_KEY = "spoc_xr.classify-tile"
#: Workers of the current distributed client with a memory limit below this classify tiles of
#: :data:`SMALL_WORKER_TILE` px instead: a 2048 px tile's task holds ~245 MB of temporaries and
#: its reference products ~280 MB, which beside Python, the libraries and the compiled kernels
#: (~450 MB) leave a 1 GB worker no room (measured, 40 dates of 2048²: 2 x 1 GB workers were
#: killed; with 1024 px tiles the run completed in 29.8 s, peak 883 MB, spilling; with the 184 px
#: halo of session 10, 47.5 s beside another job, peak 833 MB).
SMALL_WORKER_BYTES = 1.5e9
SMALL_WORKER_TILE = 1024


def default_tile_side() -> int:
    """:data:`CLASSIFY_TILE`, or :data:`SMALL_WORKER_TILE` when a worker of the current
    distributed client has less memory than :data:`SMALL_WORKER_BYTES` (tiling never changes
    the masks, only memory and speed)."""
    from spoc_xr.store import active_client

    client = active_client()
    if client is None:
        return CLASSIFY_TILE
    try:
        workers = client.scheduler_info(n_workers=-1)["workers"].values()
    except Exception:  # a scheduler that cannot answer leaves the default
        return CLASSIFY_TILE
    limits = [w.get("memory_limit") or 0 for w in workers]
    if any(0 < limit < SMALL_WORKER_BYTES for limit in limits):
        return SMALL_WORKER_TILE
    return CLASSIFY_TILE


def classification_chunks(chunks: Sequence[int], depth: int) -> tuple[int, ...]:
    """Classification tiles along one axis: runs of consecutive ``chunks`` merged while they fit
    the tile side (:func:`default_tile_side`, or the ``spoc_xr.classify-tile`` Dask setting; a
    larger chunk stays whole), none shorter than ``depth``.

    Examples
    --------
    >>> classification_chunks((1024,) * 10 + (740,), 124)
    (2048, 2048, 2048, 2048, 2048, 740)
    """
    side = dask.config.get(CLASSIFY_TILE_CONFIG_KEY, None)
    if side is None:
        side = default_tile_side()
    if isinstance(side, bool) or not isinstance(side, int) or side < 1:
        raise ParameterError(
            f"{CLASSIFY_TILE_CONFIG_KEY} = {side!r} must be a whole number of pixels >= 1, "
            f"e.g. {CLASSIFY_TILE}"
        )
    tiles: list[int] = []
    for size in chunks:
        if tiles and tiles[-1] + size <= side:
            tiles[-1] += size
        else:
            tiles.append(size)
    # A tile shorter than the halo joins its shorter neighbour: tiles stay unions of whole
    # chunks, so windows of tiles are windows of chunks too.
    while len(tiles) > 1 and min(tiles) < depth:
        short = tiles.index(min(tiles))
        if short == 0 or (short < len(tiles) - 1 and tiles[short + 1] < tiles[short - 1]):
            tiles[short : short + 2] = [tiles[short] + tiles[short + 1]]
        else:
            tiles[short - 1 : short + 1] = [tiles[short - 1] + tiles[short]]
    return tuple(tiles)


def visible_bands(bands: Sequence[str]) -> tuple[int, ...] | None:
    """Indices of the bands of visible light among ``bands``, or ``None`` when none is known.

    Examples
    --------
    >>> visible_bands(["B02", "B03", "B04", "B08", "B11"])
    (0, 1, 2)
    >>> visible_bands(["red", "nir", "swir1"])
    (0,)
    >>> visible_bands(["1", "2"]) is None
    True
    """
    found = tuple(i for i, band in enumerate(bands) if str(band).lower() in VISIBLE_NAMES)
    return found or None


def band_roles(bands: Sequence[str]) -> dict[str, Any]:
    """:func:`classify_tile`'s band arguments for a stack's band names: the indices of the
    ``visible``, ``nir`` and ``swir`` bands (each ``None`` where the names do not tell).

    Examples
    --------
    >>> band_roles(["B02", "B03", "B04", "B08", "B11"])
    {'visible': (0, 1, 2), 'nir': 3, 'swir': (4,)}
    """
    return {"visible": visible_bands(bands), "nir": nir_band(bands), "swir": swir_bands(bands)}


def swir_bands(bands: Sequence[str]) -> tuple[int, ...] | None:
    """Indices of the shortwave-infrared bands among ``bands`` (``SWIR_NAMES``), or ``None``.

    Examples
    --------
    >>> swir_bands(["B02", "B03", "B04", "B08", "B11", "B12"])
    (4, 5)
    >>> swir_bands(["red", "nir", "swir1"])
    (2,)
    >>> swir_bands(["B2", "B3", "B4", "B5", "B6"]) is None  # Landsat's B6: thermal on 4-7
    True
    """
    found = tuple(i for i, band in enumerate(bands) if str(band).lower() in SWIR_NAMES)
    return found or None


def find_band(bands: Sequence[str], names: Sequence[str]) -> int | None:
    """Index among ``bands`` of the first of ``names`` (lower case) present, or ``None``."""
    lowered = [str(band).lower() for band in bands]
    return next((lowered.index(name) for name in names if name in lowered), None)


def nir_band(bands: Sequence[str]) -> int | None:
    """Index of the near-infrared band among ``bands``, or ``None``.

    Examples
    --------
    >>> nir_band(["B02", "B03", "B04", "B08"])
    3
    >>> nir_band(["red", "swir1"]) is None
    True
    """
    return find_band(bands, NIR_NAMES)


def _hull_coloured(
    date: np.ndarray,
    low: np.ndarray,
    high: np.ndarray,
    gain: np.ndarray,
    offset: np.ndarray,
    pixels: np.ndarray,
    nir: int,
    visible: Sequence[int],
    reference: np.ndarray | None = None,
    reach: Reach | None = None,
    noise: np.ndarray | None = None,
) -> np.ndarray:
    """Which of ``pixels`` (flat indices) rose in NIR by more than ``HULL_NIR_RATIO`` x their
    largest rise in visible light, from the middle of the reference's range (its top over
    ``reach`` of the padded ``reference`` where given, as :func:`change_passes` takes it).

    One compiled pass over the pixels, float32 as numpy's expression
    (``tests/test_change_passes.py``): a tested pixel's bands gathered by numpy's fancy indexing
    cost 10 ms a date on a 2048² tile with 45,000 tested pixels.
    """
    if reference is not None and reach is not None and noise is not None:
        directed, pad, sides = True, (reference.shape[1] - date.shape[1]) // 2, reach
        reference = np.ascontiguousarray(reference, dtype=np.float32)
    else:  # placeholders the compiled pass does not read
        directed, pad, sides = False, 0, (0, 0, 0, 0)
        reference = noise = np.empty((1, 1, 1), dtype=np.float32)
    out = np.empty(pixels.size, dtype=bool)
    _hull_pixels(
        _compiled_date(date),
        low,
        high,
        *_float32(gain, offset),
        np.asarray(pixels, dtype=np.int64),
        np.array([nir, *visible], dtype=np.int64),
        directed,
        reference,
        np.int64(pad),
        *(np.int64(side) for side in sides),
        noise,
        np.float32(EDGE_CONTRAST),
        np.float32(HULL_NIR_RATIO),
        out,
    )
    return out


@_compiled
def _hull_pixels(  # pragma: no cover - compiled
    date,
    low,
    high,
    gain,
    offset,
    pixels,
    bands,
    directed,
    reference,
    pad,
    up,
    down,
    left,
    right,
    noise,
    edge_contrast,
    ratio,
    out,
):
    width = date.shape[2]
    zero, two = np.float32(0), np.float32(2)
    for i in range(pixels.size):
        y, x = pixels[i] // width, pixels[i] % width
        nir_rise = zero
        # np.max over the visible bands, then np.maximum with 0: NaN wins in both.
        visible_rise = zero
        for j in range(bands.size):
            band = bands[j]
            top = high[band, y, x]
            if directed:
                # np.max over the reach: NaN wins (once taken, no value is above it); a NaN top
                # narrows nothing.
                reach_top = -np.float32(np.inf)
                for dy in range(-up, down + 1):
                    for dx in range(-left, right + 1):
                        value = reference[band, y + pad + dy, x + pad + dx]
                        if value != value or value > reach_top:
                            reach_top = value
                if top - reach_top > edge_contrast * noise[band, y, x]:
                    top = reach_top
            rise = np.float32(date[band, y, x]) * gain[band] + offset[band]
            rise -= (low[band, y, x] + top) / two
            if j == 0:
                nir_rise = rise
            elif rise != rise or visible_rise != visible_rise:
                visible_rise = np.float32(np.nan)
            elif rise > visible_rise:
                visible_rise = rise
        out[i] = nir_rise > zero and nir_rise > ratio * visible_rise


def per_date_levels(levels: np.ndarray | None, n_dates: int) -> list[tuple[float, float] | None]:
    """Each date's ``(dark, bright)`` levels as :func:`classify_tile` takes them, None where
    unknown (``levels`` is :attr:`spoc_xr.reference.Radiometry.brightness`, or None)."""
    if levels is None:
        return [None] * n_dates
    return [
        (float(dark), float(bright)) if np.isfinite([dark, bright]).all() else None
        for dark, bright in np.asarray(levels, dtype=np.float64)
    ]


def classify(
    stack: xr.DataArray,
    products: xr.Dataset,
    gains: np.ndarray,
    offsets: np.ndarray,
    params: DetectParams,
    levels: np.ndarray | None = None,
    shifts: da.Array | np.ndarray | None = None,
    water: xr.DataArray | None = None,
    ceilings: tuple[np.ndarray, np.ndarray] | None = None,
) -> xr.DataArray:
    """Lazy mask codes ``(time, y, x)`` uint8 for every date of ``stack``.

    The bands of visible light are told by ``stack``'s band names (:func:`visible_bands`).

    Parameters
    ----------
    stack : xarray.DataArray
        ``(time, band, y, x)`` raw values, Dask-backed, with an optional ``nodata`` attribute.
    products : xarray.Dataset
        From :func:`reference_products`.
    gains, offsets : numpy.ndarray
        ``(time, band)`` radiometric normalisation of each date onto the reference.
    params : DetectParams
    levels : numpy.ndarray, optional
        ``(time, 2)`` dark and bright band-mean levels of each normalised date
        (:attr:`spoc_xr.reference.Radiometry.brightness`), NaN where unknown; without them
        thin haze is not told from clouds.
    shifts : dask.array.Array or numpy.ndarray, optional
        ``(time, 2)`` misregistration of each date against the reference
        (:func:`spoc_xr.reference.date_shifts`), NaN where unknown; needs ``products`` to hold
        the ``reference``. Without them every date may be shifted either way.
    water : xarray.DataArray, optional
        ``(y, x)`` bool water mask (:func:`spoc_xr.products.water_mask`), on the stack's grid;
        sea clutter on it is dropped (:func:`without_sea_clutter`). Without it none is.
    ceilings : tuple of numpy.ndarray, optional
        ``(band,)`` each: where the stack's bands clipped
        (:func:`spoc_xr.reference.saturation_levels`) and where the reference's did
        (:func:`spoc_xr.reference.reference_ceilings`); see :func:`change_passes`. Without them
        no value is taken for clipped.

    Returns
    -------
    xarray.DataArray
        ``(time, y, x)`` uint8 codes: 0 clear, 1 small, 2 large, 255 invalid (nodata); one chunk
        per date and classification tile (:func:`classification_chunks`: runs of the stack's
        chunks), as the tasks make them: cutting them back to the stack's chunks was one more
        task per chunk, and each chunk written was another store task.

    Examples
    --------
    >>> codes = classify(stack, products, radiometry.gains, radiometry.offsets, DetectParams())
    ... # doctest: +SKIP
    """
    stack = stack.transpose("time", "band", "y", "x")
    data = stack.data if isinstance(stack.data, da.Array) else da.from_array(stack.data)
    data = data.rechunk({0: 1, 1: -1})
    depth = params.depth
    spatial = [classification_chunks(data.chunks[axis], depth) for axis in (2, 3)]

    # Windows stop at the image's edges: every stage treats them as its own filters do (edges
    # replicated), and nothing is classified beyond them.
    def windowed(name: str, dims: tuple[str, ...] = ("band", "y", "x")) -> da.Array:
        array = products[name].transpose(*dims).data
        return pad_and_overlap(array, depth, [len(dims) - 2, len(dims) - 1], spatial, edge=0)

    low, high, noise = windowed("low"), windowed("high"), windowed("noise")
    # Without shifts every date keeps its whole tolerance window: no reference, no shift tasks.
    shifted: tuple[da.Array, ...] = ()
    if shifts is not None:
        # The range over the reach is taken around every pixel: the tolerance's radius more,
        # replicated beyond the image.
        radius = params.tolerance // 2
        reference = pad_and_overlap(
            products["reference"].transpose("band", "y", "x").data.astype(np.float32),
            depth + radius,
            [1, 2],
            tiles=spatial,
            edge=radius,
        )
        date_shifts = (
            shifts.rechunk((1, 2))
            if isinstance(shifts, da.Array)
            else da.from_array(np.asarray(shifts, dtype=np.float64), chunks=(1, 2))
        )
        shifted = (reference, date_shifts)
    scale, known = (windowed(name, ("y", "x")) for name in ("scale", "known"))
    water_windows = None
    if water is not None:
        water_data = water.transpose("y", "x").data
        if not isinstance(water_data, da.Array):
            water_data = da.from_array(np.asarray(water_data), chunks=data.chunks[2:])
        water_windows = pad_and_overlap(water_data.astype(bool), depth, [0, 1], spatial, edge=0)
    nodata = stack.attrs.get("nodata")
    band_names = [str(band) for band in stack.band.values]
    # Dates are realigned by whole pixels only where their shifts are known.
    margin = MAX_REALIGN if shifts is not None else 0
    settings = {
        "nodata": None if nodata is None else float(nodata),
        "params": params,
        "realign": margin,
        "ceilings": ceilings,
        **band_roles(band_names),
    }
    gains32, offsets32 = gains.astype(np.float32), offsets.astype(np.float32)
    date_levels = per_date_levels(levels, len(gains32))
    # One task per (date, tile) that assembles its window from the date's blocks itself:
    # no padded copy of every date waits in memory for its task.
    inputs = (data, low, high, noise, scale, known, *shifted)
    if water_windows is not None:
        inputs = (*inputs, water_windows)
    name = f"classify-{tokenize(*inputs, gains32, offsets32, date_levels, settings)}"
    layer: dict[Any, Any] = {}
    plans = [
        window_plans(data.chunks[axis], spatial[axis - 2], depth + margin, margin)
        for axis in (2, 3)
    ]
    # Where each tile starts in the image, and where its window starts (as the plans clip it).
    firsts = [[int(first) for first in np.cumsum((0, *sides[:-1]))] for sides in spatial]
    tops, lefts = (
        [
            window_span(first, first + side, depth, sum(sides), 0)[0]
            for first, side in zip(starts, sides, strict=True)
        ]
        for starts, sides in zip(firsts, spatial, strict=True)
    )
    for t, i, j in itertools.product(range(data.numblocks[0]), *(range(len(c)) for c in spatial)):
        window = [plans[0][i], plans[1][j]]
        core = (firsts[0][i] - tops[i], firsts[1][j] - lefts[j], spatial[0][i], spatial[1][j])
        layer[(name, t, i, j)] = (
            _classify_window,
            _window_keys(data, (t, 0, 0, 0), [2, 3], window),
            window,
            (low.name, 0, i, j),
            (high.name, 0, i, j),
            (noise.name, 0, i, j),
            (scale.name, i, j),
            (known.name, i, j),
            (water_windows.name, i, j) if water_windows is not None else None,
            (shifted[0].name, 0, i, j) if shifted else None,
            (shifted[1].name, t, 0) if shifted else None,
            gains32[t],
            offsets32[t],
            date_levels[t],
            (tops[i], lefts[j]),
            core,
            settings,
        )
    codes = da.Array(
        _graph(name, layer, *inputs),
        name,
        (data.chunks[0], *spatial),
        meta=np.empty((0, 0, 0), dtype=np.uint8),
    )
    coords = {name: stack.coords[name] for name in ("time", "y", "x")}
    return xr.DataArray(codes, dims=("time", "y", "x"), coords=coords, name="codes")
