"""The temporal median used by the reference, the water step and the noise model."""

from __future__ import annotations

import itertools
import os
import warnings
from dataclasses import replace

import dask.array as da
import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
import xarray as xr
from hypothesis import given, settings
from hypothesis import strategies as st

from spoc_xr.reference import (
    CLEAR_QUANTILE,
    SHIFT_WINDOW,
    Radiometry,
    clean_date_values,
    common_offset_fit,
    darker_quarter,
    date_shifts,
    estimate_shift,
    fit_composite,
    fit_radiometry,
    middle_network,
    nanmedian_first,
    nanmiddle_pair,
    overview_composite,
    plan_radiometry,
    robust_linear_fit,
    shift_windows,
    sorting_network,
    temporal_median,
)


@pytest.mark.parametrize("size", range(1, 13))
def test_sorting_network_sorts_every_zero_one_input(size):
    # The 0-1 principle: a comparator network that sorts every 0/1 sequence sorts everything.
    network = sorting_network(size)
    for bits in itertools.product((0, 1), repeat=size):
        values = list(bits)
        for first, second in network:
            if values[first] > values[second]:
                values[first], values[second] = values[second], values[first]
        assert values == sorted(values), (size, bits)


#: Values along dates, NaN (missing dates) and ties included.
DATES_WITH_GAPS = hnp.arrays(
    np.float32,
    hnp.array_shapes(min_dims=2, max_dims=3, min_side=1, max_side=30),
    elements=st.one_of(st.floats(-1e4, 1e4, width=32), st.just(float("nan")), st.just(0.5)),
)


def _numpy_nanmedian(values: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmedian(values, axis=0).astype(np.float32)


@settings(max_examples=60, deadline=None)
@given(DATES_WITH_GAPS)
def test_nanmedian_first_equals_numpy(values):
    np.testing.assert_array_equal(nanmedian_first(values), _numpy_nanmedian(values))


@settings(max_examples=60, deadline=None)
@given(DATES_WITH_GAPS)
def test_nanmiddle_pair_are_the_two_middle_values_and_their_mean_the_median(values):
    lower, upper = nanmiddle_pair(values)
    ordered = np.sort(values, axis=0)  # NaN last
    count = np.isfinite(values).sum(axis=0)
    some = count > 0
    below = np.take_along_axis(ordered, (np.maximum(count - 1, 0) // 2)[None], axis=0)[0]
    above = np.take_along_axis(ordered, (count // 2)[None], axis=0)[0]
    np.testing.assert_array_equal(lower[some], below[some])
    np.testing.assert_array_equal(upper[some], above[some])
    assert np.isnan(lower[~some]).all() and np.isnan(upper[~some]).all()
    np.testing.assert_array_equal((lower + upper) / np.float32(2), nanmedian_first(values))


def test_a_reference_keeps_its_water_where_ships_moor_on_half_the_dates():
    water, hull, scale = 500.0, 2000.0, np.array([10.0], dtype=np.float32)
    samples = np.full((8, 1, 1, 3), water, dtype=np.float32)
    samples[:4, :, :, 0] = hull  # moored on 4 of 8 dates: the middle is water and hull
    samples[:5, :, :, 1] = hull  # on 5 of 8: the hull is the clean state of the berth
    date = np.full((1, 1, 3), water, dtype=np.float32)
    date[..., 2] = hull  # a ship on the reference date alone
    cleaned = clean_date_values(date, *nanmiddle_pair(samples), scale)
    np.testing.assert_array_equal(cleaned[0, 0], [water, hull, water])


@pytest.mark.parametrize("size", range(1, 13))
def test_middle_network_places_the_two_middle_values_of_every_zero_one_input(size):
    network = middle_network(size)
    assert len(network) <= len(sorting_network(size))
    middle = [(size - 1) // 2, size // 2]
    for bits in itertools.product((0, 1), repeat=size):
        values = list(bits)
        for first, second in network:
            if values[first] > values[second]:
                values[first], values[second] = values[second], values[first]
        assert [values[i] for i in middle] == [sorted(bits)[i] for i in middle], (size, bits)


@settings(max_examples=40, deadline=None)
@given(
    hnp.arrays(
        np.float32,
        st.tuples(st.integers(1, 24), st.integers(1, 40), st.integers(1, 9)),
        elements=st.floats(-1e4, 1e4, width=32),
    )
)
def test_nanmedian_first_without_missing_dates_equals_numpy(values):
    np.testing.assert_array_equal(nanmedian_first(values), _numpy_nanmedian(values))


def test_nanmedian_first_beyond_the_network_equals_numpy():
    rng = np.random.default_rng(3)
    values = rng.normal(size=(31, 6, 7)).astype(np.float32)
    values[rng.random(values.shape) < 0.4] = np.nan
    np.testing.assert_array_equal(nanmedian_first(values), _numpy_nanmedian(values))


def test_temporal_median_chunked_equals_numpy_and_stays_lazy():
    rng = np.random.default_rng(4)
    values = rng.normal(size=(7, 2, 23, 19)).astype(np.float32)
    values[rng.random(values.shape) < 0.3] = np.nan
    values[:, :, 0, 0] = np.nan  # all-NaN pixel stays NaN
    array = xr.DataArray(
        da.from_array(values, chunks=(2, 1, 10, 7)), dims=("time", "band", "y", "x")
    )
    median = temporal_median(array)
    assert isinstance(median.data, da.Array)
    assert median.dims == ("band", "y", "x")
    np.testing.assert_array_equal(median.values, _numpy_nanmedian(values))


def test_fit_radiometry_on_threads_equals_one_fit_at_a_time(monkeypatch):
    rng = np.random.default_rng(7)
    target = rng.uniform(200, 3000, size=(3, 40, 40))
    gains_true = rng.uniform(0.8, 1.25, size=(5, 3))
    overview = (target[None] - 30.0) / gains_true[:, :, None, None]
    overview[2, :, :10] *= 3.0  # a cloud over a quarter of date 2: the mode ignores it
    overview[4, 1, 0, :5] = np.nan
    gains, offsets = fit_radiometry(overview, target)
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    serial = fit_radiometry(overview, target)
    np.testing.assert_array_equal(gains, serial[0])
    np.testing.assert_array_equal(offsets, serial[1])
    np.testing.assert_allclose(gains, gains_true, rtol=1e-6)
    np.testing.assert_allclose(offsets, 30.0, rtol=1e-4)


def _numpy_linear_fit(source: np.ndarray, target: np.ndarray) -> tuple[float, float]:
    """robust_linear_fit as numpy masks and gathers (session 17's code), for the compiled one."""
    import scipy.ndimage as ndi

    from spoc_xr import reference as ref

    ok = np.isfinite(source) & np.isfinite(target) & (source > 0) & (target > 0)
    x, y = source[ok].astype(np.float64), target[ok].astype(np.float64)
    if x.size < ref.MIN_FIT_SAMPLES:
        return 1.0, 0.0
    log_ratio = np.log(y / x)
    counts, _ = np.histogram(log_ratio, bins=ref.RATIO_EDGES)
    smoothed = ndi.gaussian_filter1d(counts.astype(np.float64), ref.RATIO_SMOOTHING_BINS)
    peak = int(np.argmax(smoothed))
    mode = 0.5 * (ref.RATIO_EDGES[peak] + ref.RATIO_EDGES[peak + 1])
    if abs(mode) > ref.MAX_LOG_GAIN:
        return float(np.exp(np.clip(mode, -ref.MAX_LOG_GAIN, ref.MAX_LOG_GAIN))), 0.0
    near = np.abs(log_ratio - mode) < ref.RATIO_INLIER_WIDTH
    if near.sum() < ref.MIN_FIT_SAMPLES or np.ptp(x[near]) == 0:
        return float(np.exp(mode)), 0.0
    x_near, y_near = x[near], y[near]
    dx = x_near - x_near.mean()
    gain = float((dx * (y_near - y_near.mean())).sum() / (dx * dx).sum())
    if not gain > 0 or abs(np.log(gain)) > ref.MAX_LOG_GAIN:
        return float(np.exp(mode)), 0.0
    return gain, float(y_near.mean() - gain * x_near.mean())


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.uint16])
@pytest.mark.parametrize("seed", range(6))
def test_the_compiled_fit_equals_numpy_to_the_bit(dtype, seed):
    rng = np.random.default_rng(seed)
    source = rng.gamma(2.0, 400.0, size=(90, 70))
    gain = rng.choice([rng.uniform(0.7, 1.4), 2.5, 0.3])  # within range, or a whole-scene change
    target = gain * source + rng.normal(30.0, 8.0, size=source.shape)
    target[: rng.integers(0, 60)] *= 2.2  # a cloud over up to most of the date
    if dtype == np.uint16:
        source, target = (np.clip(v, 0, 65535).astype(np.uint16) for v in (source, target))
    else:
        source, target = source.astype(dtype), target.astype(dtype)
        source[rng.random(source.shape) < 0.1] = np.nan
        target[rng.random(target.shape) < 0.05] = -1.0
        source.flat[:: rng.integers(5, 50)] = 0.0
    assert robust_linear_fit(source, target) == _numpy_linear_fit(source, target)
    few = source[:3, :10], target[:3, :10]  # under MIN_FIT_SAMPLES usable pairs
    assert robust_linear_fit(*few) == _numpy_linear_fit(*few) == (1.0, 0.0)
    with pytest.raises(ValueError, match="differ in shape"):
        robust_linear_fit(source, target[:-1])


def test_clipped_pairs_are_left_out_of_the_fit_and_the_saturation_is_found():
    from spoc_xr.reference import reference_ceilings, saturation_levels

    rng = np.random.default_rng(5)
    truth = rng.uniform(40, 400, (96, 96))
    reference = np.clip(np.round(truth), 1, 255)
    date = np.clip(np.round(truth / 0.9), 1, 255)  # a brighter date
    # 30-45 % of the pixels clip on both: their ratio 1 is the mode when they count.
    assert abs(robust_linear_fit(date, reference)[0] - 0.9) > 0.02
    gain, _ = robust_linear_fit(date, reference, 255.0)
    assert gain == pytest.approx(0.9, abs=0.01)
    view = np.stack([reference, date])[:, None]
    levels = saturation_levels(view)
    assert levels.tolist() == [255.0]
    assert saturation_levels(view * 0.999 + rng.uniform(0, 0.5, view.shape)).tolist() == [np.inf]
    radiometry = Radiometry(
        "date", 0, np.array([[1.0], [0.9]]), np.array([[0.0], [2.0]]), np.ones(2), np.zeros(2)
    )
    assert reference_ceilings(radiometry).tolist() == [np.inf]  # no saturation known
    radiometry = replace(radiometry, saturation=levels)
    # The date's clipped values map to 0.9 x 255 + 2 in the reference's units: the lower.
    assert reference_ceilings(radiometry)[0] == pytest.approx(231.5, rel=1e-4)


def test_the_compiled_ratio_counts_are_numpys_histogram_on_and_beside_every_edge():
    from spoc_xr.reference import RATIO_BIN_WIDTH, RATIO_EDGES, RATIO_RANGE, _ratio_counts

    rng = np.random.default_rng(3)
    # On an edge a value goes to the bin the edge opens (the last edge closes the last bin).
    values = np.concatenate(
        [
            RATIO_EDGES,
            np.nextafter(RATIO_EDGES, np.inf),
            np.nextafter(RATIO_EDGES, -np.inf),
            rng.uniform(-2 * RATIO_RANGE, 2 * RATIO_RANGE, 5000),
            [np.nan, np.inf, -np.inf],
        ]
    )
    counts = _ratio_counts(values, RATIO_EDGES, RATIO_RANGE, RATIO_BIN_WIDTH)
    expected, _ = np.histogram(values[np.isfinite(values)], bins=RATIO_EDGES)
    np.testing.assert_array_equal(counts, expected)


def _textured(seed: int, shape: tuple[int, int] = (160, 140)) -> np.ndarray:
    """Four bands of fine random texture with sharp edges, like fields and quays."""
    import scipy.ndimage as ndi

    rng = np.random.default_rng(seed)
    smooth = ndi.gaussian_filter(rng.normal(size=(4, *shape)), (0, 0.7, 0.7))
    return (2000 + 300 * smooth / smooth.std() + 300 * (smooth > 0.5)).astype(np.float32)


@pytest.mark.parametrize("shift", [(0.5, -0.4), (-0.3, 0.0), (0.0, 0.7), (0.25, -0.15)])
@pytest.mark.parametrize("order", [1, 3])
def test_estimate_shift_measures_a_sub_pixel_shift_and_its_sign(shift, order):
    import scipy.ndimage as ndi

    reference = _textured(0)
    moved = np.stack([ndi.shift(band, shift, order=order, mode="nearest") for band in reference])
    # A smooth veil of haze over part of the date: the high-pass leaves it out.
    rows, columns = np.mgrid[:160, :140]
    moved += 600 * np.exp(-((rows - 60) ** 2 + (columns - 90) ** 2) / (2 * 30.0**2))
    # The date as stored: another illumination (gain 1.25, offset -40) and uint16 rounding.
    gain, offset = np.full(4, 0.8), np.full(4, 32.0)
    raw = np.round((moved - offset[:, None, None]) / gain[:, None, None]).astype(np.uint16)
    windows = shift_windows(*reference.shape[1:])
    assert windows == [(slice(0, 160), slice(0, 140))]
    measured = estimate_shift([raw], [reference], gain, offset, nodata=0)
    # Within a step or so of 1/SHIFT_UPSAMPLING px. The phase correlation of the raw bands that
    # session 12 used read bilinear shifts short by up to 0.2 px (-0.3 as -0.1).
    np.testing.assert_allclose(measured, shift, atol=0.08)
    assert (np.sign(measured) == np.sign(shift)).all()


def test_estimate_shift_is_unknown_where_nothing_correlates():
    rng = np.random.default_rng(1)
    reference = rng.normal(1000, 50, (4, 96, 96)).astype(np.float32)
    raw = rng.normal(1000, 50, (4, 96, 96)).astype(np.float32)
    measured = estimate_shift([raw], [reference], np.ones(4), np.zeros(4), nodata=None)
    assert np.isnan(measured).all()
    # A date without valid pixels has nothing to measure either.
    empty = np.zeros((4, 96, 96), dtype=np.uint16)
    assert np.isnan(estimate_shift([empty], [reference], np.ones(4), np.zeros(4), 0)).all()


@pytest.mark.parametrize(("gain", "offset"), [(0.6, 13.0), (1.07, -20.3), (1.0, 0.0)])
def test_a_flat_date_has_no_shift_to_measure(gain: float, offset: float) -> None:
    # A uniform cloud deck: the blur's rounding leaves a constant residue (+-0.001 here),
    # which once read as a -0.75 px shift.
    flat = np.full((4, 128, 128), 9000, dtype=np.uint16)
    gains, offsets = np.full(4, gain), np.full(4, offset)
    measured = estimate_shift([flat], [_textured(0, (128, 128))], gains, offsets, nodata=0)
    assert np.isnan(measured).all(), measured


def test_shift_windows_sit_on_a_grid_fixed_by_the_image_shape():
    windows = shift_windows(700, 300)
    assert windows == [(slice(47, 303), slice(0, 300)), (slice(397, 653), slice(0, 300))]
    assert all(w[0].stop - w[0].start == SHIFT_WINDOW for w in windows)


def test_date_shifts_are_lazy_and_independent_of_the_chunks():
    import scipy.ndimage as ndi

    from spoc_xr.reference import Radiometry
    from tests.helpers import raise_if_dask_computes

    reference = _textured(2, (130, 150))
    shifts = [(0.0, 0.0), (0.6, 0.1), (-0.5, -0.5)]
    dates = np.stack(
        [np.stack([ndi.shift(b, s, order=3, mode="nearest") for b in reference]) for s in shifts]
    )
    stack = xr.DataArray(dates.astype(np.uint16), dims=("time", "band", "y", "x"))
    radiometry = Radiometry("date", 0, np.ones((3, 4)), np.zeros((3, 4)), np.ones(3), np.zeros(3))
    ref = xr.DataArray(reference, dims=("band", "y", "x"))
    results = []
    for chunks in ({"time": 1, "y": 50, "x": 70}, {"time": 1, "y": -1, "x": -1}):
        with raise_if_dask_computes():
            lazy = date_shifts(stack.chunk(chunks), ref.chunk({"y": 40, "x": 60}), radiometry)
        assert lazy.chunks == ((1, 1, 1), (2,))
        results.append(lazy.compute())
    np.testing.assert_array_equal(results[0], results[1])
    np.testing.assert_allclose(results[0], shifts, atol=0.15)


def _cloud_bank(n_cloudy: int, n_time: int = 12) -> np.ndarray:
    """An overview whose top 60 % of rows are overcast (bright, textured) on the last dates."""
    rng = np.random.default_rng(0)
    overview = 1000 + 20 * rng.standard_normal((n_time, 2, 64, 64))
    cloudy = slice(n_time - n_cloudy, None)
    overview[cloudy, :, :38] += 4000 + 500 * rng.standard_normal((n_cloudy, 2, 38, 64))
    return overview


@pytest.mark.parametrize(("n_cloudy", "noted"), [(3, False), (5, True), (6, True), (7, True)])
def test_a_cloud_bank_on_half_of_the_dates_or_more_does_not_become_the_reference(
    n_cloudy: int, noted: bool
) -> None:
    # On half of the dates or more the median is cloud (or half cloud): every date departed
    # from it alike, or the clear ones did, and a cloudy date became the reference.
    radiometry = plan_radiometry(_cloud_bank(n_cloudy), "auto")
    cloudy = np.arange(12) >= 12 - n_cloudy
    np.testing.assert_array_equal(radiometry.change_fraction > 0.5, cloudy)
    assert not cloudy[radiometry.reference_index]
    said = [note for note in radiometry.notes if "from the darker quarter" in note]
    assert bool(said) == noted, radiometry.notes
    if noted:
        assert said[0].startswith(f"{n_cloudy} of 12 dates depart on more than half")
        assert f"from the {12 - n_cloudy} dates that agree" in said[0]


def test_a_dark_change_on_a_third_of_the_dates_keeps_the_median() -> None:
    # A flood over 60 % of the scene on 4 of 12 dates: the dry dates depart from the darker
    # quarter, but the median is right (few dates depart from it, its scale did not grow).
    rng = np.random.default_rng(0)
    overview = 1800 + 20 * rng.standard_normal((12, 2, 64, 64))
    overview[:4, :, :38] = 500 + 20 * rng.standard_normal((4, 2, 38, 64))
    fitted = fit_composite(overview)
    assert fitted.from_dates is None and fitted.notes == []
    np.testing.assert_array_equal(fitted.changed > 0.5, np.arange(12) < 4)


def test_a_clean_stack_keeps_the_temporal_median_as_its_composite() -> None:
    overview = _cloud_bank(0)
    fitted = fit_composite(overview)
    np.testing.assert_array_equal(fitted.composite, overview_composite(overview))
    assert fitted.from_dates is None and fitted.notes == []


def test_without_two_dates_that_agree_the_median_stays_and_the_user_is_told() -> None:
    # Every date overcast on 60 % of its area, each in another place: no composite is clear.
    rng = np.random.default_rng(3)
    overview = 1000 + 20 * rng.standard_normal((8, 2, 40, 40))
    for t in range(8):
        cloud = rng.random((40, 40)) < 0.6
        overview[t, :, cloud] += 5000 + 800 * rng.standard_normal((int(cloud.sum()), 2))
    fitted = fit_composite(overview)
    assert fitted.from_dates is None
    np.testing.assert_array_equal(fitted.composite, overview_composite(overview))
    assert "fewer than 2 dates agree" in fitted.notes[0], fitted.notes


def test_a_median_reference_of_an_overcast_stack_is_the_median_of_the_clear_dates() -> None:
    assert plan_radiometry(_cloud_bank(6), "median").median_dates == tuple(range(6))
    assert plan_radiometry(_cloud_bank(3), "median").median_dates is None


@given(
    hnp.arrays(np.float64, (7, 1, 3, 4), elements=st.floats(-1e3, 1e3) | st.just(np.nan)),
)
def test_the_darker_quarter_is_the_nearest_rank_quantile_of_each_pixel(values) -> None:
    expected = np.full(values.shape[1:], np.nan)
    for index in np.ndindex(values.shape[1:]):
        column = values[(slice(None), *index)]
        if np.isfinite(column).any():
            expected[index] = np.nanpercentile(column, CLEAR_QUANTILE, method="nearest")
    np.testing.assert_array_equal(darker_quarter(values), expected)


def test_a_reference_day_with_two_acquisitions_asks_for_the_time() -> None:
    from spoc_xr.errors import ParameterError
    from spoc_xr.reference import parse_reference

    stamps = ["2023-05-01T10:04:09", "2023-05-01T14:30:00", "2023-05-02T10:04:09"]
    times = xr.DataArray(np.array(stamps, dtype="datetime64[ns]"), dims="time")
    assert parse_reference("2023-05-02", times) == 2  # one acquisition that day
    assert parse_reference("2023-05-01T14:30:00", times) == 1
    with pytest.raises(ParameterError, match=r"matches 2 acquisitions .*10:04:09, 14:30:00"):
        parse_reference("2023-05-01", times)


def _coast(n_time: int = 12) -> np.ndarray:
    """An overview of water (about 300-600) beside textured land (1,000-3,000), 4 bands."""
    rng = np.random.default_rng(4)
    land = np.arange(64)[None, :] >= 24
    surface = np.where(land, rng.uniform(1000, 3000, (4, 64, 64)), rng.uniform(300, 600, (4, 1, 1)))
    gains = rng.uniform(0.97, 1.03, (n_time, 4, 1, 1))
    return surface[None] * gains + 10 * rng.standard_normal((n_time, 4, 64, 64))


def test_a_constant_added_to_every_band_on_some_dates_is_normalised_away() -> None:
    # Sentinel-2 L2A from processing baseline 04.00 stores reflectance + 1000 DN: a stack that
    # spans January 2022 has it on its later dates. As gains, 94 % of those dates were large.
    overview = _coast()
    overview[6:] += 1000
    radiometry = plan_radiometry(overview, "auto")
    offset_dates = np.arange(12) >= 6
    reference_has_it = offset_dates[radiometry.reference_index]
    expected = np.where(
        offset_dates != reference_has_it, -1000.0 if not reference_has_it else 1000.0, 0
    )
    np.testing.assert_allclose(radiometry.offsets, expected[:, None].repeat(4, 1), atol=60)
    np.testing.assert_allclose(radiometry.gains, 1.0, atol=0.06)
    assert (radiometry.change_fraction < 0.05).all()


@pytest.mark.parametrize(
    ("added", "dimmed"),
    [
        ((800.0, 600.0, 450.0, 250.0), 1.0),  # haze: more in blue than in NIR
        ((600.0, 600.0, 600.0, 600.0), 0.75),  # a grey veil of thin cloud dims the surface
    ],
)
def test_a_veil_over_a_whole_date_is_no_processing_offset(added, dimmed) -> None:
    overview = _coast()
    date = overview[3] * dimmed + np.asarray(added)[:, None, None]
    target = overview[0]
    fits = [robust_linear_fit(date[band], target[band]) for band in range(4)]
    gains, offsets = (np.array(values) for values in zip(*fits, strict=True))
    assert common_offset_fit(date, target, gains, offsets) is None
    # The same date with one constant added to every band, undimmed, is one.
    offset_only = overview[3] + 600.0
    fits = [robust_linear_fit(offset_only[band], target[band]) for band in range(4)]
    gains, offsets = (np.array(values) for values in zip(*fits, strict=True))
    fitted = common_offset_fit(offset_only, target, gains, offsets)
    assert fitted is not None
    np.testing.assert_allclose(fitted[1], -600.0, atol=40)


@pytest.mark.parametrize(("n_time", "median"), [(2, True), (3, True), (4, False)])
def test_auto_takes_the_median_when_too_few_clean_dates_could_clean_a_date(n_time, median):
    # With fewer than 3 clean dates beside it, the chosen date kept its own boats in the
    # reference, so they were found on no date (a probe: every 3-date subset of a stack).
    radiometry = plan_radiometry(_coast(n_time), "auto")
    assert (radiometry.reference_index is None) == median
    assert ("temporal median" in radiometry.choice) == median


def test_a_mostly_overcast_stack_takes_the_median_of_its_clear_dates() -> None:
    # 7 of 10 dates overcast on 60 % of the area: 3 clear dates agree, too few to clean one.
    radiometry = plan_radiometry(_cloud_bank(7, n_time=10), "auto")
    assert radiometry.reference_index is None and radiometry.median_dates == (0, 1, 2)


def test_illumination_beyond_the_gain_limit_is_followed_only_when_every_band_agrees():
    from spoc_xr.reference import MAX_LOG_GAIN, fit_radiometry, illumination_fit

    rng = np.random.default_rng(3)
    target = rng.gamma(2.0, 400.0, (3, 80, 80)) + 50
    tops = np.full(3, np.inf)
    dim = target / 2.0 + rng.normal(0, 3, target.shape)
    gains, offsets = illumination_fit(dim, target, tops)
    np.testing.assert_allclose(gains, 2.0, rtol=0.02)
    np.testing.assert_allclose(offsets, 0.0, atol=15.0)
    # A veil of cloud adds light: its ratio to the ground spreads with the ground's brightness.
    veiled = target + 3000 + rng.normal(0, 30, target.shape)
    assert illumination_fit(veiled, target, tops) is None
    # The bands disagree (one dimmed 2x, the others 1.6x and 2.6x): no single illumination.
    mixed = target / np.array([2.0, 1.6, 2.6])[:, None, None]
    assert illumination_fit(mixed, target, tops) is None
    # A flat scene under a flat veil has one ratio too: it is no evidence.
    flat = np.full_like(target, 1000.0) + rng.normal(0, 5, target.shape)
    assert illumination_fit(flat * 1.7, flat, tops) is None
    # Through fit_radiometry: the dim date follows, the veiled one stays at the limit.
    overview = np.stack([target, dim, veiled])
    gains, _ = fit_radiometry(overview, target)
    np.testing.assert_allclose(gains[1], 2.0, rtol=0.02)
    assert (np.abs(np.log(gains[2])) <= MAX_LOG_GAIN + 1e-9).all()
