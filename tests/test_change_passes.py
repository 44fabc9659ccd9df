"""The compiled per-pixel passes of detection against plain numpy.

The numpy expressions below are the passes as they were written before they were compiled, one
band at a time over whole planes; the compiled passes must give the same values bit for bit,
NaN (unknown reference pixels), infinities, nodata and every input dtype included.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
import scipy.ndimage as ndi
from hypothesis import given, settings
from hypothesis import strategies as st

from spoc_xr.detect import (
    _CELL_NETWORK,
    BACKGROUND_CELL,
    DENSITY_STEPS,
    EDGE_CONTRAST,
    HAZE_LEVEL,
    HULL_NIR_RATIO,
    LARGE_MAGNITUDE,
    MAD_TO_SIGMA,
    SCORE_CEILING,
    SHADOW_BANDS,
    SNOW_INDEX,
    SNOW_RISE_RATIO,
    SNOW_SWIR_SHARE,
    SURFACE_BAND_RATIO,
    THIN_OPACITY,
    THIN_ROOM_SHARE,
    _cell_grid,
    _cell_median,
    _cells_to_median,
    _hull_coloured,
    _large_tests,
    _plain_tests,
    _residual_cells,
    change_direction,
    change_passes,
    change_score,
    density,
    local_background,
    object_rings,
)
from spoc_xr.errors import ParameterError

SHAPE = (4, 37, 53)


def numpy_score(
    date: np.ndarray,
    low: np.ndarray,
    high: np.ndarray,
    noise: np.ndarray,
    gain: np.ndarray,
    offset: np.ndarray,
    nodata: float | None,
    ceilings: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    valid = np.isfinite(low).all(axis=0)
    score = np.zeros(date.shape[1:], dtype=np.float32)
    for band in range(date.shape[0]):
        if nodata is not None and not np.isnan(nodata):
            valid &= date[band] != nodata
        if date.dtype.kind == "f":
            valid &= np.isfinite(date[band])
        values = np.multiply(date[band], gain[band], dtype=np.float32) + offset[band]
        above, below = censored(values - high[band], low[band] - values, date, high, band, ceilings)
        excess = np.maximum(above, below) / noise[band]
        np.fmax(score, excess, out=score)
    score[~valid] = 0
    np.maximum(score, 0, out=score)
    if date.dtype.kind == "f":
        np.nan_to_num(score, copy=False, nan=0.0, posinf=SCORE_CEILING)
    return score, valid


def censored(
    above: np.ndarray,
    below: np.ndarray,
    date: np.ndarray,
    high: np.ndarray,
    band: int,
    ceilings: tuple[np.ndarray, np.ndarray] | None,
) -> tuple[np.ndarray, np.ndarray]:
    """No rise over a clipped range's top, no fall from a clipped date (NaN stays NaN)."""
    if ceilings is None:
        return above, below
    date_ceiling, reference_ceiling = ceilings
    minus = np.float32(-np.inf)
    return (
        np.where(high[band] >= reference_ceiling[band], minus, above),
        np.where(date[band] >= date_ceiling[band], minus, below),
    )


def numpy_direction(
    date: np.ndarray,
    low: np.ndarray,
    high: np.ndarray,
    noise: np.ndarray,
    gain: np.ndarray,
    offset: np.ndarray,
    levels: tuple[float, float] | None,
    visible: Sequence[int] | None,
    swir: Sequence[int] | None = None,
    ceilings: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    shape = date.shape[1:]
    net, rise, fall = (np.zeros(shape, dtype=np.float32) for _ in range(3))
    tops, bottoms = np.zeros(shape, dtype=np.float32), np.zeros(shape, dtype=np.float32)
    rise_top, fall_top = np.zeros(shape, dtype=np.float32), np.zeros(shape, dtype=np.float32)
    dimmed = np.zeros(shape, dtype=np.uint8)
    visible_rise = np.zeros(shape, dtype=bool) if visible else np.ones(shape, dtype=bool)
    swir_fall, swir_drop, swir_bottom, swir_value, visible_gain, visible_value = (
        np.zeros(shape, dtype=np.float32) for _ in range(6)
    )
    for band in range(date.shape[0]):
        values = np.multiply(date[band], gain[band], dtype=np.float32) + offset[band]
        above, below = values - high[band], low[band] - values
        if visible and band in visible:
            np.fmax(visible_gain, above, out=visible_gain)
            np.fmax(visible_value, date[band].astype(np.float32), out=visible_value)
        if visible and swir and band in swir:
            # SWIR normalised with no larger a gain than visible light's (see SNOW_SWIR_SHARE).
            lowest_gain = min(gain[band], *(gain[v] for v in visible))
            below = low[band] - (
                np.multiply(date[band], lowest_gain, dtype=np.float32) + offset[band]
            )
            falls = below / noise[band] > swir_fall
            swir_drop = np.where(falls, below, swir_drop)
            swir_bottom = np.where(falls, low[band], swir_bottom)
            swir_value = np.where(falls, date[band].astype(np.float32), swir_value)
            np.fmax(swir_fall, below / noise[band], out=swir_fall)
            below = low[band] - values
        net += above
        tops += high[band]
        bottoms += low[band]
        above, below = censored(above, below, date, high, band, ceilings)
        below /= noise[band]
        dimmed += below > 1
        fall_top = np.where(below > fall, high[band], fall_top)
        np.fmax(fall, below, out=fall)
        above /= noise[band]
        if visible and band in visible:
            visible_rise |= above > 1
        rise_top = np.where(above > rise, high[band], rise_top)
        np.fmax(rise, above, out=rise)
    surface = (rise > 1) & (fall > 1) & (rise_top > np.float32(SURFACE_BAND_RATIO) * fall_top)
    surface |= (
        (swir_fall > 1)
        & (swir_drop > np.float32(SNOW_SWIR_SHARE) * swir_bottom)
        & (visible_gain > np.float32(SNOW_RISE_RATIO) * swir_drop)
        & (visible_value - swir_value > np.float32(SNOW_INDEX) * (visible_value + swir_value))
    )
    darker = (net < 0) & ~surface
    darker &= ((fall < rise) & visible_rise) | (dimmed >= min(SHADOW_BANDS, date.shape[0]))
    thin = surface.copy()
    if levels is not None:
        dark, bright = levels
        n_bands, half = np.float32(date.shape[0]), np.float32(0.5)
        lift = (net + half * (tops - bottoms)) / n_bands
        room = np.float32(bright) - half * (tops + bottoms) / n_bands
        haze = lift < np.float32(THIN_OPACITY) * room
        haze &= room > np.float32(THIN_ROOM_SHARE * (bright - dark))
        thin |= haze & ~darker
    return darker, thin


def random_inputs(
    dtype: type[np.generic], seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A date with nodata, NaN and infinite pixels (float dtypes), a reference range with
    unknown (NaN) pixels and noise scales with a few zeros."""
    rng = np.random.default_rng(seed)
    low = rng.uniform(0, 3000, SHAPE).astype(np.float32)
    high = low + rng.exponential(200, SHAPE).astype(np.float32)
    unknown = rng.random(SHAPE[1:]) < 0.05
    low[:, unknown] = np.nan
    high[:, unknown] = np.nan
    noise = rng.uniform(0.5, 80, SHAPE).astype(np.float32)
    noise[rng.random(SHAPE) < 0.01] = 0
    values = rng.uniform(-500, 4000, SHAPE)
    if np.dtype(dtype).kind in "ui":
        info = np.iinfo(dtype)
        values = np.clip(np.round(values), info.min, info.max)
    date = values.astype(dtype)
    date[rng.random(SHAPE) < 0.03] = 0  # the nodata value
    if np.dtype(dtype).kind == "f":
        date[rng.random(SHAPE) < 0.02] = np.nan
        date[rng.random(SHAPE) < 0.01] = np.inf
    gain = rng.uniform(0.7, 1.3, SHAPE[0]).astype(np.float32)
    offset = rng.uniform(-40, 40, SHAPE[0]).astype(np.float32)
    return date, low, high, noise, gain, offset


DTYPES = [np.uint16, np.int16, np.uint8, np.int32, np.float16, np.float32, np.float64]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nodata", [None, 0.0, float("nan")])
def test_the_compiled_score_equals_numpy_bit_for_bit(
    dtype: type[np.generic], nodata: float | None
) -> None:
    date, low, high, noise, gain, offset = random_inputs(dtype, seed=len(str(dtype)))
    score, valid = change_score(date, low, high, noise, gain, offset, nodata=nodata)
    with np.errstate(divide="ignore", invalid="ignore"):  # zero noise scales
        expected_score, expected_valid = numpy_score(date, low, high, noise, gain, offset, nodata)
    np.testing.assert_array_equal(valid, expected_valid)
    assert score.dtype == np.float32
    # Bit for bit: array_equal would let -0.0 equal 0.0.
    np.testing.assert_array_equal(score.view(np.uint32), expected_score.view(np.uint32))
    assert 0 < valid.mean() < 1 and score.max() > 0  # the inputs exercise both sides


def random_ceilings(date: np.ndarray, high: np.ndarray, seed: int) -> tuple[np.ndarray, ...]:
    """Ceilings inside the values of some bands (a tenth of their pixels at or above), none in
    the others."""
    rng = np.random.default_rng(seed)
    with np.errstate(invalid="ignore"):
        date_ceiling = np.nanpercentile(date.astype(np.float64), 90, axis=(1, 2))
        reference_ceiling = np.nanpercentile(high, 90, axis=(1, 2))
    none = rng.random(date.shape[0]) < 0.3
    date_ceiling[none], reference_ceiling[none[::-1]] = np.inf, np.inf
    return date_ceiling.astype(np.float32), reference_ceiling.astype(np.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("visible", [None, (0, 2)])
def test_clipped_values_are_compared_as_numpy_censors_them(
    dtype: type[np.generic], visible: tuple[int, ...] | None
) -> None:
    date, low, high, noise, gain, offset = random_inputs(dtype, seed=11)
    date = np.where(date == 0, date.dtype.type(1), date)  # the nodata value is another test's
    ceilings = random_ceilings(date, high, seed=len(str(dtype)))
    score, _, darker, thin = change_passes(
        date, low, high, noise, gain, offset, visible=visible, ceilings=ceilings
    )
    with np.errstate(divide="ignore", invalid="ignore"):
        expected_score, _ = numpy_score(date, low, high, noise, gain, offset, None, ceilings)
        expected = numpy_direction(
            date, low, high, noise, gain, offset, None, visible, ceilings=ceilings
        )
        plain_score, _ = numpy_score(date, low, high, noise, gain, offset, None)
    np.testing.assert_array_equal(score.view(np.uint32), expected_score.view(np.uint32))
    np.testing.assert_array_equal(darker, expected[0])
    np.testing.assert_array_equal(thin, expected[1])
    # The ceilings changed scores (else this test would test nothing), never raised one.
    assert (score != plain_score).any()
    assert (score <= plain_score).all()


def test_a_clipped_date_shows_no_fall_and_a_clipped_range_no_rise() -> None:
    ones = np.ones((1, 1, 2), dtype=np.float32)
    low, high, noise = 100 * ones, 120 * ones, ones
    date = np.array([[[255, 250]]], dtype=np.uint8)  # both far above the range
    gain, offset = np.array([0.3], np.float32), np.zeros(1, np.float32)  # ... until normalised
    plain = change_passes(date, low, high, noise, gain, offset)[0]
    assert (plain > 20).all()  # a fall: 255 x 0.3 = 76.5 and 75 lie below 100
    clipped = (np.array([255.0], np.float32), np.array([np.inf], np.float32))
    score = change_passes(date, low, high, noise, gain, offset, ceilings=clipped)[0]
    assert score[0, 0] == 0 and score[0, 1] == plain[0, 1]  # 255 may hide any brighter value
    rise = np.array([[[200, 200]]], dtype=np.uint8)
    high_clipped = np.array([[[255.0, 120.0]]], dtype=np.float32)
    at_top = (np.array([np.inf], np.float32), np.array([255.0], np.float32))
    unit = np.ones(1, np.float32)
    score = change_passes(rise, low, high_clipped, noise, unit, 0 * unit, ceilings=at_top)[0]
    assert score[0, 0] == 0 and score[0, 1] == 80  # a clipped top hides how bright it was


def test_the_score_counts_known_pixels_from_the_caller_when_given() -> None:
    date, low, high, noise, gain, offset = random_inputs(np.uint16, seed=3)
    known = np.isfinite(low).all(axis=0)
    known[:5] = False
    score, valid = change_score(date, low, high, noise, gain, offset, nodata=None, known=known)
    assert not valid[:5].any() and not score[:5].any()
    np.testing.assert_array_equal(valid[5:], known[5:])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("levels", [None, (400.0, 2600.0), (400.0, float("nan"))])
@pytest.mark.parametrize(
    ("visible", "swir"), [(None, None), ((), None), ((0, 2), None), ((1,), None), ((0, 1), (2,))]
)
def test_the_compiled_direction_equals_numpy(
    dtype: type[np.generic],
    levels: tuple[float, float] | None,
    visible: tuple[int, ...] | None,
    swir: tuple[int, ...] | None,
) -> None:
    date, low, high, noise, gain, offset = random_inputs(dtype, seed=7)
    darker, thin = change_direction(
        date, low, high, noise, gain, offset, levels=levels, visible=visible, swir=swir
    )
    usable = levels if levels is not None and np.isfinite(levels).all() else None
    with np.errstate(divide="ignore", invalid="ignore"):
        expected = numpy_direction(date, low, high, noise, gain, offset, usable, visible, swir)
    np.testing.assert_array_equal(darker, expected[0])
    np.testing.assert_array_equal(thin, expected[1])
    assert 0 < darker.mean() < 1
    # Without levels only surface changes are thin (a band rose while a darker one fell).
    assert thin.mean() < 1
    if usable is not None or dtype != np.uint8:
        assert thin.mean() > 0
    elif swir is None:  # uint8 values lie below most ranges: no band rose over one
        assert not thin.any()
    assert not (thin & darker).any()


def numpy_reach_top(reference: np.ndarray, reach: tuple[int, int, int, int], pad: int):
    """The reference's max over the reach around every pixel of the unpadded tile, NaN where
    any pixel in reach is NaN (as the NaN-safe filters of the full range)."""
    up, down, left, right = reach
    height, width = reference.shape[1] - 2 * pad, reference.shape[2] - 2 * pad
    views = [
        reference[:, pad + dy : pad + dy + height, pad + dx : pad + dx + width]
        for dy in range(-up, down + 1)
        for dx in range(-left, right + 1)
    ]
    return np.maximum.reduce(views)


@pytest.mark.parametrize("dtype", [np.uint16, np.float32])
@pytest.mark.parametrize("reach", [(1, 0, 1, 1), (0, 1, 1, 0), (1, 1, 0, 1), (0, 0, 0, 0)])
@pytest.mark.parametrize("pad", [1, 2])
def test_the_top_over_a_reach_equals_numpy(
    dtype: type[np.generic], reach: tuple[int, int, int, int], pad: int
) -> None:
    date, _, _, noise, gain, offset = random_inputs(dtype, seed=11)
    rng = np.random.default_rng(5)
    padded_shape = (SHAPE[0], SHAPE[1] + 2 * pad, SHAPE[2] + 2 * pad)
    reference = rng.uniform(0, 3000, padded_shape).astype(np.float32)
    reference[:, rng.random(padded_shape[1:]) < 0.02] = np.nan
    # The full 3 x 3 range, and its top narrowed to the reach where that drops it by more than
    # EDGE_CONTRAST noise scales.
    inner = (slice(None), slice(pad - 1, pad + SHAPE[1] + 1), slice(pad - 1, pad + SHAPE[2] + 1))
    low = -numpy_reach_top(-reference[inner], (1, 1, 1, 1), 1)
    high = numpy_reach_top(reference[inner], (1, 1, 1, 1), 1)
    top = numpy_reach_top(reference, reach, pad)
    with np.errstate(invalid="ignore"):
        narrowed = np.where(high - top > np.float32(EDGE_CONTRAST) * noise, top, high)
    options = {"nodata": 0.0, "levels": (400.0, 2600.0), "visible": (0, 2)}
    got = change_passes(
        date, low, high, noise, gain, offset, reference=reference, reach=reach, **options
    )
    expected = change_passes(date, low, narrowed, noise, gain, offset, **options)
    for name, value, want in zip(("score", "valid", "darker", "thin"), got, expected, strict=True):
        np.testing.assert_array_equal(value, want, err_msg=name)
    # The narrower range changed the score where the date lies between the two tops.
    full_score = change_passes(date, low, high, noise, gain, offset, **options)[0]
    assert (got[0] > full_score).any() and (got[0] >= full_score).all()


def numpy_hull_coloured(date, low, high, gain, offset, pixels, nir, visible, reach_top, noise):
    """The hull test as numpy expressions over the gathered pixels (``reach_top`` the
    reference's top over the reach at every pixel, or None for the whole range)."""
    bands = np.array([nir, *visible])
    where = (bands[:, None], pixels[None])
    low_at, high_at, date_at = (a.reshape(a.shape[0], -1)[where] for a in (low, high, date))
    if reach_top is not None:
        top_at = reach_top.reshape(reach_top.shape[0], -1)[where]
        noise_at = noise.reshape(noise.shape[0], -1)[where]
        narrowed = high_at - top_at > np.float32(EDGE_CONTRAST) * noise_at
        high_at = np.where(narrowed, top_at, high_at)
    rise = date_at.astype(np.float32) * gain[bands, None] + offset[bands, None]
    rise -= (low_at + high_at) / 2
    visible_rise = np.maximum(rise[1:].max(axis=0), 0)
    return (rise[0] > 0) & (rise[0] > HULL_NIR_RATIO * visible_rise)


@pytest.mark.parametrize("dtype", [np.uint16, np.float32, np.float16])
@pytest.mark.parametrize("reach", [None, (1, 0, 1, 1), (0, 1, 0, 0)])
def test_the_compiled_hull_test_equals_numpy(
    dtype: type[np.generic], reach: tuple[int, int, int, int] | None
) -> None:
    date, low, high, noise, gain, offset = random_inputs(dtype, seed=13)
    rng = np.random.default_rng(8)
    # Dates that rose over the range, in NIR more than in visible light at some pixels.
    date = (date.astype(np.float64) + rng.uniform(0, 3000, SHAPE)).astype(dtype)
    pad = 2
    reference = rng.uniform(0, 3000, (SHAPE[0], SHAPE[1] + 2 * pad, SHAPE[2] + 2 * pad))
    reference = reference.astype(np.float32)
    reference[:, rng.random(reference.shape[1:]) < 0.02] = np.nan
    pixels = np.flatnonzero(rng.random(SHAPE[1:]) < 0.4)
    nir, visible = 3, (0, 1, 2)
    got = _hull_coloured(
        date, low, high, gain, offset, pixels, nir, visible, reference, reach, noise
    )
    top = None if reach is None else numpy_reach_top(reference, reach, pad)
    with np.errstate(invalid="ignore", over="ignore"):
        expected = numpy_hull_coloured(
            date, low, high, gain, offset, pixels, nir, visible, top, noise
        )
    np.testing.assert_array_equal(got, expected)
    assert 0 < got.mean() < 1  # both answers occur


def test_a_reach_needs_the_reference_padded_by_the_radius() -> None:
    date, low, high, noise, gain, offset = random_inputs(np.uint16, seed=1)
    with pytest.raises(ParameterError, match="padded by at least 1 px"):
        change_passes(date, low, high, noise, gain, offset, reference=low, reach=(1, 0, 1, 1))


def test_a_surface_change_is_neither_darker_nor_a_cloud() -> None:
    # Bands blue, green, red, NIR over vegetation (NIR brightest), reference range +-20, noise 10.
    reference = np.array([400.0, 600.0, 500.0, 3000.0], dtype=np.float32)
    pixels = {
        # Visible down, NIR up, summing to a fall in three bands: darker by the sum alone.
        "greening": [330.0, 520.0, 380.0, 3300.0],
        "shadow": [300.0, 420.0, 350.0, 1800.0],  # every band down
        "veiled shadow": [520.0, 650.0, 560.0, 2100.0],  # visible up, NIR down
        "cloud": [1800.0, 1900.0, 1850.0, 2950.0],  # visible up, NIR in its range
    }
    date = np.array(list(pixels.values()), dtype=np.float32).T[:, None, :]
    low = np.repeat(reference[:, None, None] - 20, len(pixels), axis=2)
    high, noise = low + 40, np.full(low.shape, 10.0, dtype=np.float32)
    unit, zero = np.ones(4, dtype=np.float32), np.zeros(4, dtype=np.float32)
    darker, thin = change_direction(date, low, high, noise, unit, zero, visible=(0, 1, 2))
    assert darker[0].tolist() == [False, True, False, False]
    assert thin[0].tolist() == [True, False, False, False]
    # Without the surface test the greening would have been darker (a shadow): its bands sum
    # below the range's top and three of them fell by more than a noise scale.
    greening = date[:, 0, 0]
    assert (greening - high[:, 0, 0]).sum() < 0
    assert ((low[:, 0, 0] - greening) / noise[:, 0, 0] > 1).sum() >= SHADOW_BANDS


def test_snow_is_a_surface_change_and_a_cloud_is_not() -> None:
    # Bands red, NIR, SWIR1 over forest (Landsat's medians on the shared stack), range +-20,
    # noise 10: snow absorbs SWIR while it lights up the visible; a cloud brightens SWIR too.
    reference = np.array([344.0, 2854.0, 1296.0], dtype=np.float32)[:, None].repeat(5, axis=1)
    reference[:, 4] = [2500.0, 3000.0, 4500.0]  # desert
    pixels = {
        "snow": [3834.0, 4547.0, 639.0],
        "cloud": [2809.0, 4201.0, 2685.0],
        "shadow": [200.0, 900.0, 400.0],
        "thin snow": [900.0, 3000.0, 1200.0],  # SWIR within a tenth of its range: undecided
        # A thick cloud over bright desert: SWIR falls, visible soars, but its index is 0.3.
        "desert cloud": [7000.0, 7200.0, 3800.0],
    }
    date = np.array(list(pixels.values()), dtype=np.float32).T[:, None, :]
    low = reference[:, None, :] - 20
    high, noise = low + 40, np.full(low.shape, 10.0, dtype=np.float32)
    unit, zero = np.ones(3, dtype=np.float32), np.zeros(3, dtype=np.float32)
    darker, thin = change_direction(date, low, high, noise, unit, zero, visible=(0,), swir=(2,))
    assert thin[0].tolist() == [True, False, False, False, False]
    assert darker[0].tolist() == [False, False, True, False, False]
    # Without a SWIR band (or without a visible one) nothing is snow.
    for visible, swir in (((0,), None), (None, (2,))):
        _, thin = change_direction(date, low, high, noise, unit, zero, visible=visible, swir=swir)
        assert not thin[0, 0]


@pytest.mark.parametrize("seed", [0, 1])
def test_the_compiled_plain_tests_equal_numpy(seed: int) -> None:
    rng = np.random.default_rng(seed)
    shape = SHAPE[1:]
    residual = rng.normal(0, 8, shape).astype(np.float32)
    needed = rng.exponential(6, shape).astype(np.float32)
    needed[rng.random(shape) < 0.05] = np.nan
    background = rng.exponential(4, shape).astype(np.float32)
    valid = rng.random(shape) > 0.1
    threshold = 6.0
    candidates, hazy_seed, wide = _plain_tests(residual, needed, background, valid, threshold)
    np.testing.assert_array_equal(
        candidates, (residual > np.maximum(needed, np.float32(threshold))) & valid
    )
    np.testing.assert_array_equal(hazy_seed, background > HAZE_LEVEL * threshold)
    np.testing.assert_array_equal(wide, (background > threshold) & valid)
    assert 0 < candidates.mean() < 1 and 0 < wide.mean() < 1


@pytest.mark.parametrize("with_scale", [False, True])
def test_the_compiled_large_tests_equal_numpy(with_scale: bool) -> None:
    rng = np.random.default_rng(5)
    shape = SHAPE[1:]
    darker, thin, valid = (rng.random(shape) < share for share in (0.3, 0.3, 0.9))
    score = rng.exponential(6, shape).astype(np.float32)
    background = rng.exponential(5, shape).astype(np.float32)
    scale = rng.uniform(0, 12, shape).astype(np.float32) if with_scale else None
    threshold = 6.0
    qualifies, changed = _large_tests(darker, thin, score, valid, background, scale, threshold)
    expected_qualifies = ~thin
    expected_changed = (score > threshold) & valid & ~thin
    if scale is not None:
        expected_qualifies &= darker | (background * scale > LARGE_MAGNITUDE)
        expected_changed &= darker | (score * scale > LARGE_MAGNITUDE)
    np.testing.assert_array_equal(qualifies, expected_qualifies)
    np.testing.assert_array_equal(changed, expected_changed)
    assert 0 < qualifies.mean() < 1 and 0 < changed.mean() < 1


def test_without_a_writable_cache_the_passes_compile_per_process(monkeypatch):
    import numba

    from spoc_xr import detect

    original, asked = numba.njit, []

    def no_locator(*args, cache=False, **options):
        asked.append(cache)
        if cache:  # what numba raises when no cache folder is writable
            raise RuntimeError("cannot cache function: no locator available")
        return original(*args, **options)

    monkeypatch.setattr(numba, "njit", no_locator)

    def double(values, out):
        for i in range(values.shape[0]):
            out[i] = values[i] * 2

    compiled = detect._compiled(double)
    out = np.zeros(3)
    compiled(np.arange(3.0), out)
    np.testing.assert_array_equal(out, [0.0, 2.0, 4.0])
    assert asked == [True, False]  # tried the cache, then compiled without it


def dense_rings(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The ring as whole-tile filters computed it before: scipy's maximum filter of the labels
    and binary dilation of the objects."""
    outer = ndi.maximum_filter(labels, size=5, mode="nearest")
    near = ndi.binary_dilation(labels > 0, structure=np.ones((3, 3), bool))
    ring = np.flatnonzero((outer > 0) & ~near)
    return ring, outer.reshape(-1)[ring]


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    shape=st.tuples(st.integers(1, 23), st.integers(1, 31)),
    share=st.floats(0.0, 0.6),
)
def test_object_rings_equal_the_whole_tile_filters(
    seed: int, shape: tuple[int, int], share: float
) -> None:
    rng = np.random.default_rng(seed)
    objects = rng.random(shape) < share
    # Any numbering: a ring pixel between two objects belongs to the larger label.
    labels = ndi.label(objects, structure=np.ones((3, 3), bool))[0].astype(np.int32)
    labels[labels > 0] = (rng.permutation(labels.max()) + 1)[labels[labels > 0] - 1]
    ring, owners = object_rings(labels, np.flatnonzero(labels))
    expected_ring, expected_owners = dense_rings(labels)
    np.testing.assert_array_equal(ring, expected_ring)
    np.testing.assert_array_equal(owners, expected_owners)


def test_object_rings_of_two_objects_at_a_corner() -> None:
    labels = np.zeros((6, 7), dtype=np.int32)
    labels[0, 0] = 3
    labels[5, 6] = 1
    ring, owners = object_rings(labels, np.flatnonzero(labels))
    # Clipped at the border: the corner pixel's ring is the 5 px at distance 2 inside the image.
    assert ring.tolist() == [2, 9, 14, 15, 16, 25, 26, 27, 32, 39]
    assert owners.tolist() == [3, 3, 3, 3, 3, 1, 1, 1, 1, 1]


# Tiles of any size at any offset from the background's cell grid, from empty to full.
cell_tiles = given(
    seed=st.integers(0, 2**32 - 1),
    shape=st.tuples(st.integers(1, 70), st.integers(1, 70)),
    origin=st.tuples(st.integers(-9, 9), st.integers(-9, 9)),
    share=st.floats(0.0, 1.0),
)


@settings(max_examples=40, deadline=None)
@cell_tiles
def test_the_fused_residual_pass_equals_the_numpy_steps(
    seed: int, shape: tuple[int, int], origin: tuple[int, int], share: float
) -> None:
    rng = np.random.default_rng(seed)
    score = (rng.gamma(0.5, 3.0, shape) * (rng.random(shape) < share)).astype(np.float32)
    if seed % 5 == 0:  # a cell with a missing value has a missing median, as numpy's
        score[rng.random(shape) < 0.02] = np.nan
    # The steps as whole-tile numpy: the residual, numpy's median of |residual| over each cell
    # (the tile edge-replicated to whole cells), their median over 9 x 9 cells.
    with np.errstate(invalid="ignore"):  # NaN quantised
        background, residual, spread = local_background(score, 31, origin, spread_factor=6.0)
        expected_residual = score - _cell_median(score, 9, origin)
    top, left, grid = _cell_grid(shape, origin)
    bottom = grid[0] * BACKGROUND_CELL - shape[0] - top
    right = grid[1] * BACKGROUND_CELL - shape[1] - left
    padded = np.pad(np.abs(expected_residual), ((top, bottom), (left, right)), mode="edge")
    cells = padded.reshape(grid[0], BACKGROUND_CELL, grid[1], BACKGROUND_CELL).swapaxes(1, 2)
    factor = np.float32(MAD_TO_SIGMA * 6.0)
    with np.errstate(invalid="ignore"):
        expected_medians = np.median(cells.reshape(*grid, -1), axis=-1).astype(np.float32)
        expected_spread = _cells_to_median(expected_medians, 9, shape, top, left, factor)
    np.testing.assert_array_equal(residual, expected_residual)
    np.testing.assert_array_equal(spread, expected_spread)
    # The cell medians before their quantised median (which would hide a last-bit difference).
    medians = np.empty(grid, dtype=np.float32)
    _residual_cells(
        score, background, top, left, BACKGROUND_CELL, _CELL_NETWORK, np.empty_like(score), medians
    )
    np.testing.assert_array_equal(medians, expected_medians)


@settings(max_examples=40, deadline=None)
@cell_tiles
def test_the_counted_density_equals_the_cell_median_of_the_float_mask(
    seed: int, shape: tuple[int, int], origin: tuple[int, int], share: float
) -> None:
    mask = np.random.default_rng(seed).random(shape) < share
    expected = _cell_median(mask.view(np.uint8) * np.float32(DENSITY_STEPS), 9, origin)
    np.testing.assert_array_equal(density(mask, 9, origin), expected)


def test_a_dense_anchorage_does_not_raise_the_local_spread_above_its_hulls() -> None:
    # 600 hulls of 1 x 2 px at random in 120 x 120 px (8 % of it): most 4 x 4 cells hold a hull
    # pixel or two. A cell mean of |residual| put the CFAR level (6 spreads) above 28 % of the
    # hull pixels; the cell median follows the water between them.
    rng = np.random.default_rng(5)
    score = np.abs(rng.normal(0.0, 1.0, (200, 200))).astype(np.float32)
    hulls = np.zeros(score.shape, dtype=bool)
    rows, columns = rng.integers(40, 159, 600), rng.integers(40, 158, 600)
    hulls[rows, columns] = hulls[rows, columns + 1] = True
    score[hulls] = 20.0
    _, residual, spread = local_background(score, 31, spread_factor=6.0)
    assert (residual[hulls] > spread[hulls]).all()
    # ... and open water's level stays what it was (the median of |residual| scaled to sigma).
    assert 3.0 < np.median(spread[:30, :30]) < 5.0
