"""The detection chain: chunked results equal plain numpy/scipy, value for value, and stay lazy."""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np
import pandas as pd
import pytest
import scipy.ndimage as ndi
import xarray as xr
from dask._task_spec import convert_legacy_graph
from hypothesis import given, settings
from hypothesis import strategies as st

from spoc_xr import kernels
from spoc_xr.detect import (
    CLASSIFY_TILE_CONFIG_KEY,
    CLEAR,
    FRAGMENT_EXTENT,
    INVALID,
    LARGE,
    LINK_REACH,
    MAX_REALIGN,
    MAX_SMALL_EXTENT,
    OBJECT_REACH,
    SEA_CLUTTER_COUNT,
    SEA_CLUTTER_WINDOW,
    SMALL,
    SMALL_CONTEXT,
    DetectParams,
    band_roles,
    classification_chunks,
    classify,
    classify_tile,
    nir_band,
    noise_sample_objects,
    pad_and_overlap,
    parse_threshold,
    pixel_size_note,
    reference_products,
    sizes_for_pixels,
    small_objects,
    swir_bands,
    visible_bands,
    whole_pixel_shift,
    window_span,
    without_sea_clutter,
)
from spoc_xr.errors import InputError, ParameterError, SpocError
from spoc_xr.pipeline import (
    annotate,
    build_annotations,
    read_apart,
    reference_and_spread,
    shift_notes,
)
from spoc_xr.products import choose_water_index, uncover_water_values, water_threshold
from spoc_xr.reference import compute_overview, plan_radiometry
from tests.helpers import make_stack, raise_if_dask_computes

PARAMS = DetectParams(kernel=3, tolerance=3, open_size=5, close_size=5, background_size=9)


def scipy_products(reference: np.ndarray, spread: np.ndarray, params: DetectParams) -> dict:
    size = (1, params.tolerance, params.tolerance)
    low = ndi.minimum_filter(np.nan_to_num(reference), size, mode="nearest")
    high = ndi.maximum_filter(np.nan_to_num(reference), size, mode="nearest")
    unknown = ndi.maximum_filter(np.isnan(reference), size, mode="nearest")
    low[unknown], high[unknown] = np.nan, np.nan
    ksize = (1, params.kernel, params.kernel)
    noise = ndi.median_filter(np.nan_to_num(spread), ksize, mode="nearest")
    noise[np.isnan(spread)] = np.nan
    return {"low": low, "high": high, "noise": noise}


class ScipyKernels:
    """scipy.ndimage stand-ins for every OpenCV-backed kernel the chain uses."""

    @staticmethod
    def _size(image, size):
        return (1,) * (image.ndim - 2) + (size, size)

    def median_filter(self, image, size):
        return ndi.median_filter(image, self._size(image, size), mode="nearest")

    def minimum_filter(self, image, size):
        return ndi.minimum_filter(image, self._size(image, size), mode="nearest")

    def maximum_filter(self, image, size):
        return ndi.maximum_filter(image, self._size(image, size), mode="nearest")

    def binary_opening(self, mask, size):
        return self.maximum_filter(self.minimum_filter(mask, size), size)

    def binary_closing(self, mask, size):
        return self.minimum_filter(self.maximum_filter(mask, size), size)

    def label(self, mask, connectivity=8):
        labels, count = ndi.label(mask, structure=np.ones((3, 3)))
        return labels.astype(np.int32), count


def scipy_codes(monkeypatch, date, low, high, noise, gain, offset, *, params, scale, **options):
    """The whole chain with scipy kernels on the whole image (the reference padded by the
    tolerance's radius, edges replicated)."""
    if options.get("reference") is not None:
        radius = params.tolerance // 2
        options["reference"] = np.pad(
            options["reference"], ((0, 0), (radius, radius), (radius, radius)), mode="edge"
        )
    with monkeypatch.context() as patch:
        for name in (
            "median_filter",
            "minimum_filter",
            "maximum_filter",
            "binary_opening",
            "binary_closing",
            "label",
        ):
            patch.setattr(kernels, name, getattr(ScipyKernels(), name))
        # options: nodata, levels, visible, as classify_tile takes them.
        return classify_tile(
            date, low, high, noise, gain, offset, params=params, scale=scale, **options
        )


@pytest.fixture(scope="module")
def stack() -> xr.DataArray:
    return make_stack(n_time=5, shape=(31, 37), seed=1)


def _prepared(stack: xr.DataArray, chunks: dict):
    chunked = stack.chunk({"time": 1, **chunks})
    radiometry = plan_radiometry(compute_overview(chunked), "auto")
    reference, spread = reference_and_spread(chunked, radiometry)
    return chunked, radiometry, reference, spread


@pytest.mark.parametrize("chunks", [{"y": 7, "x": 9}, {"y": 13, "x": 37}, {"y": -1, "x": -1}])
def test_reference_products_equal_scipy(stack, chunks):
    _, _, reference, spread = _prepared(stack, chunks)
    products = reference_products(reference, spread, PARAMS).compute()
    expected = scipy_products(reference.values, spread.values, PARAMS)
    for name in ("low", "high"):
        np.testing.assert_array_equal(products[name].values, expected[name])
    # The floored noise equals the scipy median wherever the median is above the floor.
    above = expected["noise"] > products["noise"].values.min(axis=(1, 2), keepdims=True)
    np.testing.assert_array_equal(products["noise"].values[above], expected["noise"][above])


#: Dates shifted either way along each axis, unknown, within the margin, and by whole pixels
#: (date 3, realigned by (-2, 1) with (-0.2, -0.2) left; date 2 carries the boat).
SHIFTS = np.array([[0.5, -0.5], [np.nan, np.nan], [0.0, 0.1], [-2.2, 0.8], [0.25, -0.25]])


def realigned_scipy_codes(monkeypatch, date, shift, *arguments, **options):
    """:func:`scipy_codes` of ``date`` moved back by the whole pixels of ``shift`` (edges
    replicated), its codes moved to the date's pixels; invalid where the reference has none."""
    step = whole_pixel_shift(shift)
    height, width = date.shape[1:]
    padded = np.pad(date, ((0, 0), (MAX_REALIGN,) * 2, (MAX_REALIGN,) * 2), mode="edge")
    rows = slice(MAX_REALIGN + step[0], MAX_REALIGN + step[0] + height)
    columns = slice(MAX_REALIGN + step[1], MAX_REALIGN + step[1] + width)
    residual = None if shift is None else shift - np.asarray(step)
    aligned = scipy_codes(
        monkeypatch, padded[:, rows, columns], *arguments, shift=residual, **options
    )
    expected = np.full((height, width), INVALID, dtype=np.uint8)
    dy, dx = step
    expected[max(dy, 0) : height + min(dy, 0), max(dx, 0) : width + min(dx, 0)] = aligned[
        max(-dy, 0) : height - max(dy, 0), max(-dx, 0) : width - max(dx, 0)
    ]
    return expected


@pytest.mark.parametrize("with_shifts", [False, True])
@pytest.mark.parametrize("chunks", [{"y": 4, "x": 5}, {"y": 11, "x": 6}, {"y": -1, "x": -1}])
def test_classify_equals_scipy_chain(stack, chunks, with_shifts, monkeypatch):
    chunked, radiometry, reference, spread = _prepared(stack, chunks)
    products = reference_products(reference, spread, PARAMS)
    levels = radiometry.brightness
    assert levels is not None and np.isfinite(levels).all()
    shifts = SHIFTS if with_shifts else None
    arguments = (chunked, products, radiometry.gains, radiometry.offsets, PARAMS, levels)
    codes = classify(*arguments, shifts=shifts).values
    computed = products.compute()
    for t in range(stack.sizes["time"]):
        expected = realigned_scipy_codes(
            monkeypatch,
            stack.values[t],
            None if shifts is None else shifts[t],
            computed.low.values,
            computed.high.values,
            computed.noise.values,
            radiometry.gains[t].astype(np.float32),
            radiometry.offsets[t].astype(np.float32),
            nodata=0,
            params=PARAMS,
            scale=computed.scale.values,
            levels=tuple(levels[t]),
            **band_roles(list(stack.band.values)),
            reference=computed.reference.values if with_shifts else None,
        )
        np.testing.assert_array_equal(codes[t], expected, err_msg=f"date {t}")
    assert (codes == SMALL).any() and (codes == LARGE).any()
    if with_shifts:
        # Dates 1 and 2 keep the whole tolerance window: exactly the unshifted codes.
        np.testing.assert_array_equal(codes[1:3], classify(*arguments).values[1:3])
        # Date 3 moved 2 px up and 1 px right: its last 2 rows and first column showed ground
        # the reference has not seen.
        assert (codes[3, -2:] == INVALID).all() and (codes[3, :, 0] == INVALID).all()
        assert (codes[3, :-2, 1:] != INVALID).all()


def test_a_date_shifted_by_whole_pixels_is_realigned_before_it_is_compared():
    # Textured land right of water; date 4's content moved down 1 px and right 2 px. Compared
    # in place, its coast and every land edge changed (367 large and 3 small pixels here).
    rng = np.random.default_rng(5)
    height, width, n_time = 96, 120, 6
    texture = ndi.gaussian_filter(rng.normal(0, 1, (height, width)), 2)
    land = np.arange(width)[None, :] >= 60
    base = np.where(land, 1800 + 400 * texture / texture.std(), 400.0)
    base = base[None] * np.array([1.0, 1.1, 1.2, 1.5])[:, None, None]
    dates = []
    for t in range(n_time):
        image = base * rng.uniform(0.95, 1.05, (4, 1, 1)) + rng.normal(0, 8, (4, height, width))
        if t == 4:
            image = np.pad(image, ((0, 0), (1, 0), (2, 0)), mode="edge")[:, :height, :width]
        dates.append(image)
    data = np.clip(np.stack(dates), 1, 65535).astype(np.uint16)
    stack = make_stack(n_time=n_time, shape=(height, width)).copy(data=data)
    result = annotate(stack.chunk({"time": 1, "y": 40, "x": 50}), params=PARAMS).compute()
    assert whole_pixel_shift(result.misregistration.values[4]) == (1, 2)
    assert (result["mask"].values == CLEAR).all()
    # Its first row and two columns show ground the reference has not seen: not "clear".
    valid = result["valid"].values[4].astype(bool)
    assert not valid[0].any() and not valid[:, :2].any() and valid[1:, 2:].all()
    assert result["valid"].values[[0, 1, 2, 3, 5]].all()
    # The run says so, and names a date shifted further than detection realigns.
    (note,) = shift_notes(result)
    assert note.startswith("1 date(s) shifted by 0.75 px or more") and "2.0 px" in note
    result["misregistration"][2] = [0.0, -6.2]
    notes = shift_notes(result)
    assert len(notes) == 2 and "2023-03-11" in notes[1] and "6.2 px" in notes[1]
    # An overcast date's clouds correlate too (a probe: 56 and 61 px): it is not realigned.
    assert whole_pixel_shift((55.9, -61.2)) == (0, 0) and whole_pixel_shift((4.4, 0)) == (4, 0)


def test_a_boat_against_a_quay_is_found_on_a_date_shifted_away_from_the_quay():
    # Water (200) left of a bright quay (3000) from column 30; a 2 x 1 px boat (2800) against it.
    params = DetectParams()
    shape = (4, 60, 60)
    reference = np.full(shape, 200, dtype=np.float32)
    reference[:, :, 30:] = 3000
    date = reference.copy()
    date[:, 20:22, 29] = 2800
    radius = params.tolerance // 2
    low = ndi.minimum_filter(reference, (1, 3, 3), mode="nearest")
    high = ndi.maximum_filter(reference, (1, 3, 3), mode="nearest")
    noise = np.full_like(reference, 20.0)
    wide = np.pad(reference, ((0, 0), (radius,) * 2, (radius,) * 2), mode="edge")

    def boat_found(shift):
        codes = classify_tile(
            date, low, high, noise, np.ones(4, np.float32), np.zeros(4, np.float32),
            nodata=None, params=params, reference=wide, shift=shift,
        )  # fmt: skip
        return bool((codes[20:22, 29] == SMALL).all())

    # The quay's edge moved left by up to a pixel would explain the boat, unless the date's
    # content came from the left (a positive dx): then nothing bright can have moved there.
    assert not boat_found(None)
    assert not boat_found(np.array([0.0, -0.5]))
    assert boat_found(np.array([0.0, 0.5]))


def test_annotate_chunked_equals_single_chunk(stack):
    whole = annotate(stack.chunk({"time": 1, "y": -1, "x": -1}), params=PARAMS).compute()
    tiled = annotate(stack.chunk({"time": 1, "y": 6, "x": 10}), params=PARAMS).compute()
    for name in ("mask", "valid", "heatmap", "reference", "water", "misregistration"):
        np.testing.assert_array_equal(tiled[name].values, whole[name].values, err_msg=name)


@pytest.mark.parametrize(
    ("y_chunks", "tiled"),
    [
        (110, True),  # tiles are runs of whole chunks: written as they are
        ((110, 130, 230), False),  # a tile starts inside a stored chunk: cut to them
    ],
)
def test_the_masks_are_stored_in_the_stacks_chunks_whatever_the_tiles(y_chunks, tiled, tmp_path):
    import zarr

    from spoc_xr.store import write_dataset

    # Several tiles of 220 px (see the test below): no tile may be shorter than the halo.
    assert PARAMS.depth <= 220 and 2 * PARAMS.depth < 450
    big = make_stack(n_time=3, shape=(470, 450), seed=2)
    with dask.config.set({CLASSIFY_TILE_CONFIG_KEY: 220}):
        result = annotate(big.chunk({"time": 1, "y": y_chunks, "x": 110}), params=PARAMS)
    # Tiles of 220 px, the short ones joined to a neighbour (y: 240 + 230 when irregular, so
    # cut to the stored 110 px chunks; x stays in tiles).
    expected_y = (220, 250) if tiled else (110,) * 4 + (30,)
    assert result["mask"].chunks[1:] == (expected_y, (220, 230))
    write_dataset(result, tmp_path / "out.zarr", overwrite=False)
    group = zarr.open_group(tmp_path / "out.zarr", mode="r")
    for name in ("mask", "valid", "heatmap", "water"):
        assert group[name].chunks[-2:] == (110, 110), name
    whole = annotate(big.chunk({"time": 1, "y": -1, "x": -1}), params=PARAMS).compute()
    stored = xr.open_zarr(tmp_path / "out.zarr", consolidated=False)
    for name in ("mask", "valid", "heatmap", "water"):
        np.testing.assert_array_equal(stored[name].values, whole[name].values, err_msg=name)
    assert (whole["mask"] == SMALL).any()


def test_annotate_outputs_the_shift_each_date_was_classified_with(stack):
    from spoc_xr.pipeline import build_annotations, plan_annotation
    from spoc_xr.reference import date_shifts
    from tests.helpers import raise_if_dask_computes

    # Only the overview is read eagerly (the plan); the shifts are part of the lazy graph.
    planned, radiometry, params = plan_annotation(stack, params=PARAMS)
    with raise_if_dask_computes():
        result = build_annotations(planned, radiometry, params)
    shifts = result.misregistration
    assert shifts.dims == ("time", "axis") and shifts.dtype == np.float32
    assert list(shifts.axis.values) == ["y", "x"] and shifts.attrs["units"] == "pixel"
    # The very tasks the classification reads (one layer, shared with the masks' graph): in one
    # compute each date is measured once.
    layers = [
        {name for name in array.data.__dask_graph__().layers if "shift_date" in name}
        for array in (shifts, result["mask"])
    ]
    assert len(layers[0]) == 1 and layers[0] == layers[1]
    expected = date_shifts(planned, result.reference, radiometry).compute()
    np.testing.assert_array_equal(shifts.values, expected.astype(np.float32))
    assert np.isfinite(shifts.values).any()


def test_classification_tiles_of_merged_chunks_equal_the_whole_image():
    # Larger than twice the halo (PARAMS.depth), so that several classification tiles exist,
    # each no shorter than the halo.
    assert PARAMS.depth <= 220 and 2 * PARAMS.depth < 450
    big = make_stack(n_time=3, shape=(470, 450), seed=2)
    chunked, radiometry, reference, spread = _prepared(big, {"y": 110, "x": 110})
    products = reference_products(reference, spread, PARAMS)
    whole = classify(
        big.chunk({"time": 1}), products, radiometry.gains, radiometry.offsets, PARAMS
    ).values
    with dask.config.set({CLASSIFY_TILE_CONFIG_KEY: 220}):
        codes = classify(chunked, products, radiometry.gains, radiometry.offsets, PARAMS)
    # Chunks merged into tiles up to 220 px (the 30 and 10 px left over joined to their
    # neighbours): 2 x 2 tiles per date, one chunk each.
    layers = codes.data.dask.layers
    tiles = [name for name in layers if name.startswith("classify-")]
    assert len(tiles) == 1 and len(layers[tiles[0]]) == 3 * 2 * 2
    assert codes.chunks[1:] == ((220, 250), (220, 230))
    np.testing.assert_array_equal(codes.values, whole)
    assert (whole == SMALL).any()


@pytest.mark.parametrize(
    ("chunks", "side", "depth", "tiles"),
    [
        ((1024,) * 10 + (740,), 2048, 124, (2048,) * 5 + (740,)),
        ((1024, 1024, 60), 2048, 124, (2108,)),  # too short for the halo: joins its neighbour
        ((3000, 3000, 500), 2048, 124, (3000, 3000, 500)),  # larger chunks stay whole
        ((37, 37, 26), 1, 50, (100,)),
        ((6, 6, 6, 6, 6), 1, 10, (12, 18)),
    ],
)
def test_classification_chunks_merge_whole_chunks(chunks, side, depth, tiles):
    with dask.config.set({CLASSIFY_TILE_CONFIG_KEY: side}):
        assert classification_chunks(chunks, depth) == tiles


class _FakeClient:
    def __init__(self, limits: list[float]) -> None:
        self.limits = limits

    def scheduler_info(self, n_workers: int = -1) -> dict:
        return {"workers": {f"w{i}": {"memory_limit": v} for i, v in enumerate(self.limits)}}


@pytest.mark.parametrize(
    ("limits", "side"),
    [
        (None, 2048),  # no distributed client: Dask's local schedulers
        ([2e9, 2e9], 2048),
        ([0, 0], 2048),  # workers without a limit
        ([2e9, 1e9], 1024),  # one small worker is enough
    ],
)
def test_workers_with_little_memory_classify_smaller_tiles(monkeypatch, limits, side):
    from spoc_xr import store

    monkeypatch.setattr(store, "active_client", lambda: limits and _FakeClient(limits))
    chunks = (1024,) * 4
    assert classification_chunks(chunks, 124) == (side,) * (4096 // side)
    with dask.config.set({CLASSIFY_TILE_CONFIG_KEY: 4096}):  # the setting wins
        assert classification_chunks(chunks, 124) == (4096,)


def test_default_parameters_chunked_equal_single_chunk(stack):
    # Default windows (15 px) are larger than these chunks: depth handling must still be exact.
    whole = annotate(stack.chunk({"time": 1, "y": -1, "x": -1})).compute()
    tiled = annotate(stack.chunk({"time": 1, "y": 8, "x": 12})).compute()
    np.testing.assert_array_equal(tiled.mask.values, whole.mask.values)


def test_heatmap_counts_small_objects_on_water(stack):
    result = annotate(stack.chunk({"time": 1, "y": 10, "x": 10}), params=PARAMS).compute()
    expected = ((result.mask.values == SMALL) & result.water.values.astype(bool)).sum(0)
    np.testing.assert_array_equal(result.heatmap.values, expected)
    assert set(np.unique(result.mask.values)) <= {0, 1, 2}


def test_detects_planted_boat_and_cloud(stack):
    result = annotate(stack.chunk({"time": 1, "y": 10, "x": 10}), params=PARAMS).compute()
    # make_stack plants a 2 x 2 boat on water on date 2 and a 14 x 16 cloud on date 3.
    assert (result.mask.values[2, 5:7, 5:7] == SMALL).all()
    assert (result.mask.values[3, 12:26, 18:34] == LARGE).mean() > 0.9
    assert result.heatmap.values[5:7, 5:7].min() >= 1


def test_building_the_graph_computes_nothing(stack):
    chunked, radiometry, _, _ = _prepared(stack, {"y": 10, "x": 10})
    with raise_if_dask_computes():
        result = build_annotations(chunked, radiometry, PARAMS)
    assert isinstance(result.mask.data, dask.array.Array)
    assert isinstance(result.heatmap.data, dask.array.Array)


def test_nodata_pixels_are_invalid_not_clear(stack):
    holed = stack.copy(data=stack.values.copy())
    holed.values[2, :, 0:4, :] = 0
    result = annotate(holed.chunk({"time": 1}), params=PARAMS).compute()
    assert (result.valid.values[2, 0:4] == 0).all()
    assert (result.valid.values[2, 4:] == 1).all()
    assert result.valid_fraction.values[2] == pytest.approx(1 - 4 / 31)


@pytest.mark.parametrize("value", [0, -1, 2, 4, 1.5, "3"])
def test_bad_kernel_rejected(value):
    with pytest.raises(ParameterError):
        DetectParams(kernel=value)  # type: ignore[arg-type]


def test_kernel_larger_than_image_rejected(stack):
    with pytest.raises(ParameterError, match="kernel"):
        annotate(stack, kernel=41)


def test_an_image_thinner_than_the_misregistration_window_is_refused_without_hidden_options():
    strip = make_stack(n_time=3, shape=(2, 40))
    with pytest.raises(
        ParameterError, match=r"\(2 x 40 pixels\) is smaller .* at least 3 px"
    ) as no:
        annotate(strip, kernel=1)
    assert "tolerance=" not in str(no.value)  # no option of that name to change


@pytest.mark.parametrize("value", ["nan", "inf", "-1", "0", "abc"])
def test_bad_threshold_rejected(value):
    with pytest.raises(ParameterError):
        parse_threshold(value)


def test_threshold_auto_and_number():
    assert parse_threshold("auto") is None
    assert parse_threshold("7.5") == 7.5


def test_reference_date_not_in_stack_rejected(stack):
    with pytest.raises(ParameterError, match="not in the stack"):
        annotate(stack, reference="1999-01-01")


@pytest.mark.parametrize(
    "as_given",
    [str, np.datetime64, pd.Timestamp, lambda t: pd.Timestamp(t).to_pydatetime()],
    ids=["string", "datetime64", "Timestamp", "datetime"],
)
def test_a_reference_date_may_be_one_of_the_stacks_own_time_values(stack, as_given):
    value = stack.time.values[2]
    result = annotate(stack, reference=as_given(value), params=PARAMS)
    assert result.attrs["spoc_xr"]["reference_index"] == 2
    from_coordinate = annotate(stack, reference=stack.time[3], params=PARAMS)
    assert from_coordinate.attrs["spoc_xr"]["reference_index"] == 3


@pytest.mark.parametrize("value", [2, 2.0, None, np.datetime64("NaT"), ["2023-03-11"]])
def test_a_reference_that_is_no_date_is_refused_before_any_work(stack, value):
    with pytest.raises(ParameterError, match="must be 'auto', 'median' or a date"):
        annotate(stack, reference=value)


def test_a_stack_with_a_repeated_time_stamp_is_refused(stack):
    times = stack.time.values.copy()
    times[3] = times[1]
    with pytest.raises(InputError, match=r"1 time stamp\(s\) more than once .*drop_duplicates"):
        annotate(stack.assign_coords(time=times), params=PARAMS)
    # Unsorted but distinct time stamps are fine.
    assert annotate(stack.isel(time=[2, 0, 1, 4, 3]), params=PARAMS).sizes["time"] == 5


def test_reference_date_is_used_with_its_own_objects_removed(stack):
    result = annotate(stack.chunk({"time": 1}), reference="2023-03-11", params=PARAMS)
    assert result.attrs["spoc_xr"]["reference_index"] == 2
    reference = result.reference.values
    date = stack.isel(time=2).values.astype(np.float32)
    # The date's boat at [5:7, 5:7] is cleaned away (water again); elsewhere it is the date.
    assert (reference[:, 5:7, 5:7] < date[:, 5:7, 5:7] - 1000).all()
    untouched = np.ones(date.shape[1:], dtype=bool)
    untouched[4:8, 4:8] = False
    assert (reference[:, untouched] == date[:, untouched]).mean() > 0.95


def test_median_reference_is_temporal_median_of_normalised_dates(stack):
    chunked = stack.chunk({"time": 1, "y": 9, "x": 11})
    result = annotate(chunked, reference="median", params=PARAMS)
    gains = result.gain.values[:, :, None, None]
    offsets = result.offset.values[:, :, None, None]
    expected = np.median(stack.values.astype(np.float32) * gains + offsets, axis=0)
    np.testing.assert_allclose(result.reference.values, expected, rtol=1e-5)


# Sentinel-2 style values (with the +1000 offset) for B02 B03 B04 B08 B11: water is barely wet
# by MNDWI (~0.05) and a white hull is wetter still (~0.17), while NDWI tells them apart (0.32
# against 0.04). The index is MNDWI, so only NDWI can tell that a berth's hull is gone.
S2_BANDS = ["B02", "B03", "B04", "B08", "B11"]
S2_WATER = np.array([1300.0, 2250.0, 1100.0, 1150.0, 2050.0])
S2_HULL = np.array([13800.0, 13850.0, 13700.0, 12900.0, 9800.0])
S2_LAND = np.array([3000.0, 4000.0, 5000.0, 9000.0, 12000.0])
BERTH = (slice(20, 34), slice(28, 34))  # a 14 x 6 px hull beside the quay at column 40
NEW_SHIP = (slice(50, 53), slice(10, 14))
MOORED_DATES = {0, 1, 2, 3, 4, 5, 6}


def moored_ship_stack(
    seed: int = 0,
    n_dates: int = 12,
    moored: set[int] = MOORED_DATES,
    new_ship: int | None = 9,
) -> xr.DataArray:
    """Water left, quay right; a white ship at its berth on the ``moored`` dates and a new ship
    on date ``new_ship``: by default 12 dates, the ship at its berth on 7, the new one on 9."""
    rng = np.random.default_rng(seed)
    shape = (64, 64)
    quay = np.arange(shape[1])[None, None, :] >= 40
    base = np.where(quay, S2_LAND[:, None, None], S2_WATER[:, None, None])
    base = np.broadcast_to(base, (5, *shape)).copy()
    dates = []
    for t in range(n_dates):
        image = base.copy()
        if t in moored:
            image[(slice(None), *BERTH)] = S2_HULL[:, None, None]
        if t == new_ship:
            image[(slice(None), *NEW_SHIP)] = S2_HULL[:, None, None]
        dates.append(image + rng.normal(0, 10, size=image.shape))
    times = np.datetime64("2023-03-01T10:30:00") + np.arange(n_dates) * np.timedelta64(5, "D")
    return xr.DataArray(
        np.clip(np.stack(dates), 1, 65535).astype(np.uint16),
        dims=("time", "band", "y", "x"),
        coords={
            "time": times.astype("datetime64[ns]"),
            "band": S2_BANDS,
            "y": 4650000.0 - 10 * np.arange(shape[0]) - 5,
            "x": 500000.0 + 10 * np.arange(shape[1]) + 5,
        },
        name="stack",
        attrs={"nodata": 0},
    )


def test_the_empty_berth_of_a_white_ship_moored_on_most_dates_is_no_object():
    stack = moored_ship_stack()
    result = annotate(stack.chunk({"time": 1})).compute()
    assert result.attrs["spoc_xr"]["reference_index"] in MOORED_DATES  # the ship is in it
    # The hull's water is put back (its 1 px rim is within reach of misregistration)...
    np.testing.assert_allclose(
        result.reference.values[:, 22:32, 29:33].mean((1, 2)), S2_WATER, atol=50
    )
    mask = result.mask.values
    for t in set(range(12)) - MOORED_DATES:
        # ... so the empty berth is no "dark boat" (MNDWI alone leaves the hull in the reference).
        assert not (mask[(t, *BERTH)] == SMALL).any(), f"date {t}: the empty berth is an object"
    assert (mask[(9, *NEW_SHIP)] == SMALL).all()  # a ship that is new is still found
    chunked = annotate(stack.chunk({"time": 1, "y": 21, "x": 30})).compute()
    for name in ("mask", "reference", "spread", "water"):
        np.testing.assert_array_equal(chunked[name].values, result[name].values, err_msg=name)


def test_a_ship_moored_on_most_dates_of_a_short_stack_is_not_cleaned_into_the_reference():
    # 6 dates, the ship at its berth on 4 of the 5 that are not the reference: their median, which
    # cleans the reference date of its own objects, is the ship, and only 1 of 5 samples shows
    # the water (under WET_SHARE); the reference date's own water is the second.
    moored = {1, 2, 3, 4}
    stack = moored_ship_stack(n_dates=6, moored=moored, new_ship=None)
    result = annotate(stack.chunk({"time": 1}), reference="2023-03-01").compute()
    inside = (slice(None), slice(21, 33), slice(29, 33))  # beyond misregistration's reach
    np.testing.assert_allclose(result.reference.values[inside].mean((1, 2)), S2_WATER, atol=50)
    assert result.water.values[inside[1:]].all()  # where the heatmap counts boats
    # (Found on its dates in the semi-real 6-date stacks; here the ship departs on 4 of the 5
    # noise samples, too many to leave out, and its pixels' noise model stays wide.)


def test_the_reference_dates_own_water_counts_only_where_every_band_fell():
    index = choose_water_index(S2_BANDS)
    shape = (12, 12)
    water = np.broadcast_to(S2_WATER[:, None, None], (5, *shape)).astype(np.float32)
    reference = water.copy()
    reference[:, 2:8, 2:8] = S2_HULL[:, None, None]  # the samples' ship, cleaned in
    samples = np.repeat(reference[None], 5, axis=0)
    samples[0] = water  # the water shows on 1 of 5 samples only
    date = water.copy()
    # Where only NIR fell (a pier's edge shifted, a hull's shadow), the date is no water shown.
    date[:, 2:8, 7] = reference[:, 2:8, 7]
    date[3, 2:8, 7] = S2_WATER[3]
    margin = np.full(5, 40.0, dtype=np.float32)
    floor = ndi.minimum_filter(reference, (1, 3, 3), mode="nearest")
    alone = uncover_water_values(reference, samples, index, S2_BANDS, floor=floor)
    np.testing.assert_array_equal(alone, reference)  # 1 of 5 is too few
    both = uncover_water_values(
        reference, samples, index, S2_BANDS, floor=floor, date=date, margin=margin
    )
    gone = ~np.isclose(both, reference).all(axis=0)
    expected = np.zeros(shape, dtype=bool)
    expected[3:7, 3:7] = True  # the hull beyond a 1 px shift's reach, NIR-only column out
    np.testing.assert_array_equal(gone, expected)
    np.testing.assert_allclose(both[:, 4, 4], S2_WATER)  # the samples' water values


def test_ndwi_uncovers_a_white_hull_but_not_a_white_pier_shifted_by_a_pixel():
    index = choose_water_index(S2_BANDS)
    shape = (20, 30)
    reference = np.broadcast_to(S2_WATER[:, None, None], (5, *shape)).astype(np.float32).copy()
    reference[:, 5:11, 4:10] = S2_HULL[:, None, None]  # a 6 x 6 hull on open water
    reference[:, :, 20:] = S2_HULL[:, None, None]  # a white pier from column 20
    samples = np.repeat(reference[None], 8, axis=0)
    samples[:2, :, 5:11, 4:10] = S2_WATER[:, None, None]  # the hull is gone on 2 of 8 dates
    samples[:4, :, :, 20] = S2_WATER[None, :, None]  # the pier's edge shifts by 1 px
    floor = ndi.minimum_filter(reference, (1, 3, 3), mode="nearest")
    uncovered = uncover_water_values(reference, samples, index, S2_BANDS, floor=floor)
    gone = ~np.isclose(uncovered, reference).all(axis=0)
    expected = np.zeros(shape, dtype=bool)
    expected[6:10, 5:9] = True  # the hull beyond the reach of a 1 px shift
    np.testing.assert_array_equal(gone, expected)
    np.testing.assert_allclose(uncovered[:, 7, 6], S2_WATER)
    # MNDWI alone (no floor) sees no water uncovered: the hull is as wet as water by it.
    np.testing.assert_array_equal(
        uncover_water_values(reference, samples, index, S2_BANDS), reference
    )


def test_noise_model_forgives_what_the_tolerance_range_explains():
    from spoc_xr.pipeline import range_consistent_spread

    shape = (1, 12, 16)
    spread = xr.DataArray(np.full(shape, 100.0, np.float32), dims=("band", "y", "x"))
    excess = xr.DataArray(np.zeros(shape, np.float32), dims=("band", "y", "x"))
    excess[0, :, 8:] = 150.0  # beyond the range as much as around the reference: real flicker
    excess[0, 0, 0] = np.nan  # no sample date: the spread around the reference stands
    spread[0, 11, 15] = np.nan  # unknown stays unknown
    combined = range_consistent_spread(spread, excess).values[0]
    # Typical spread 100: a misregistered edge (no excess) keeps max(typical, half) = 100 here...
    assert combined[5, 3] == 100.0 and combined[0, 0] == 100.0
    spread[0, :, :4] = 400.0  # ...and an edge whose spread is 4x typical drops to half of it
    combined = range_consistent_spread(spread, excess).values[0]
    assert combined[5, 1] == 200.0 and combined[5, 9] == 100.0 and np.isnan(combined[11, 15])


@pytest.mark.parametrize("chunks", [{"y": 7, "x": 9}, {"y": -1, "x": -1}])
def test_excess_spread_equals_numpy(stack, chunks):
    from spoc_xr.detect import (
        MAD_TO_SIGMA,
        NOISE_DATES,
        OBJECT_REACH,
        noise_floor,
        noise_sample_objects,
    )
    from spoc_xr.reference import QUANTISATION_SIGMA, noise_sample_indices, normalise_values

    _, radiometry, reference, spread = _prepared(stack, chunks)
    indices = noise_sample_indices(radiometry, NOISE_DATES)
    samples = normalise_values(
        stack.values[indices], radiometry.gains[indices], radiometry.offsets[indices], 0
    )
    ref = reference.values
    size = (1, DetectParams().tolerance, DetectParams().tolerance)
    # Objects on the sample dates are left out, by their departure beyond the range over the
    # whole image, edges replicated as the tiles' halos replicate them.
    pad = OBJECT_REACH + DetectParams().tolerance // 2
    padded_ref = np.pad(ref, ((0, 0), (pad, pad), (pad, pad)), mode="edge")
    padded = np.pad(samples, ((0, 0), (0, 0), (pad, pad), (pad, pad)), mode="edge")
    low = ndi.minimum_filter(
        np.where(np.isnan(padded_ref), np.inf, padded_ref), size, mode="nearest"
    )
    high = ndi.maximum_filter(
        np.where(np.isnan(padded_ref), -np.inf, padded_ref), size, mode="nearest"
    )
    units = radiometry.residual_scale[None, :, None, None]
    departures = np.nanmax(np.maximum(np.maximum(padded - high, low - padded), 0) / units, axis=1)
    left_out = noise_sample_objects(np.nan_to_num(departures).astype(np.float32), (-pad, -pad))
    left_out = left_out[:, pad:-pad, pad:-pad]
    assert left_out.any() and not left_out.all()  # the test below covers both cases
    samples[np.broadcast_to(left_out[:, None], samples.shape)] = np.nan
    low, high = (a[:, pad:-pad, pad:-pad] for a in (low, high))
    beyond = np.maximum(np.maximum(samples - high, low - samples), 0)
    # Integer data: no spread below the rounding's, times the band's median gain.
    rounding = QUANTISATION_SIGMA * np.median(radiometry.gains[indices], axis=0)[:, None, None]
    excess = np.maximum(np.nanmedian(beyond, axis=0) * MAD_TO_SIGMA, rounding)
    around = np.maximum(np.nanmedian(np.abs(samples - ref), axis=0) * MAD_TO_SIGMA, rounding)
    typical = 2 * noise_floor(xr.DataArray(around, dims=("band", "y", "x"))).values[:, None, None]
    expected = np.minimum(around, np.maximum(np.fmax(excess, typical), around / 2))
    np.testing.assert_allclose(spread.values, expected, rtol=1e-5)
    assert (spread.values < around - 1e-3).any()  # the range explains part of the spread here
    # The reference task's planes before they are combined (what annotate_store stores).
    from spoc_xr.pipeline import reference_planes

    _, planes = reference_planes(stack.chunk({"time": 1, **chunks}), radiometry)
    planes = planes.compute()
    np.testing.assert_array_equal(planes[0], ref)
    np.testing.assert_allclose(planes[1], around, rtol=1e-5)
    np.testing.assert_allclose(planes[2], excess, rtol=1e-5)


def test_replicate_beyond_image_is_np_pad_edge_of_the_inside():
    from spoc_xr.pipeline import _replicate_beyond_image

    image = np.arange(2 * 6 * 5, dtype=np.float32).reshape(2, 6, 5)
    # A window from image (-3, 1) of 8 x 6: three rows above and two columns to the right beyond.
    window = np.full((2, 8, 6), np.nan, dtype=np.float32)
    window[:, 3:, :4] = image[:, :5, 1:]
    _replicate_beyond_image(window, (-3, 1), image.shape[1:])
    expected = np.pad(image, ((0, 0), (3, 0), (0, 2)), mode="edge")[:, :8, 1:7]
    np.testing.assert_array_equal(window, expected)


def test_a_hull_inside_a_cloud_body_stays_small_a_fading_puff_does_not():
    threshold = 6.0
    score = np.zeros((40, 60), dtype=np.float32)
    background = np.zeros_like(score)
    background[:, :30] = score[:, :30] = 20.0  # a cloud body, 3.3 thresholds over the left half
    score[18:21, 10:14] += 30.0  # a hull seen through it: crisp over the cloud's own change
    score[18:21, 40:44] = 30.0  # a puff on clear water that fades out slowly around it
    score[16:23, 38:46] = np.maximum(score[16:23, 38:46], 12.0)
    candidates = score - background > 25.0
    small = small_objects(candidates, score, background, score - background, threshold)
    assert small[18:21, 10:14].all()
    assert not small[:, 30:].any()
    # The plain ring test alone drops the hull: its ring holds the cloud (20 > 0.15 x 50).
    clear = small_objects(candidates, score, np.zeros_like(score), score, threshold)
    assert not clear[18:21, 10:14].any()


def test_ships_moored_in_a_row_stay_small_a_longer_streak_does_not():
    threshold = 6.0
    score = np.zeros((40, 200), dtype=np.float32)
    # Three 24 px hulls bow to stern (the real sen2ships labels reach 53 px; rows of moored ships
    # join into one object far longer than any one ship) ...
    row = 3 * 24
    score[10:14, 5 : 5 + row] = 30.0
    # ... and a crisp streak longer than the longest object kept (a road's edge, a wake).
    score[25:28, 5 : 5 + MAX_SMALL_EXTENT + 20] = 30.0
    assert 48 < row <= MAX_SMALL_EXTENT
    candidates = score > threshold
    small = small_objects(candidates, score, np.zeros_like(score), score, threshold)
    assert small[10:14, 5 : 5 + row].all()
    assert not small[25:28].any()


def test_a_wake_tail_piece_is_dropped_a_faint_boat_on_its_own_is_not():
    threshold = 6.0
    score = np.zeros((30, 80), dtype=np.float32)
    score[10:12, 40:45] = 150.0  # a hull
    # Its wake, fading behind it: above the threshold next to the hull, just below it further
    # on, where one speck crosses it again.
    for d in range(1, 26):
        score[11, 40 - d] = 18.0 * (1 - d / 30)
    score[11, 18:20] = 8.0  # the speck, 21-22 px behind the hull
    score[11, 70] = score[11, 71] = 8.0  # a faint boat on open water, as faint as the speck
    needed = np.full_like(score, 2.0)
    valid = np.ones(score.shape, dtype=bool)
    candidates = score > threshold
    small = small_objects(
        candidates, score, np.zeros_like(score), score, threshold, needed=needed, valid=valid
    )
    assert small[10:12, 40:45].all()
    assert not small[11, 18:20].any()
    assert small[11, 70:72].all()
    # Without the CFAR level the test is not made: the speck stays.
    plain = small_objects(candidates, score, np.zeros_like(score), score, threshold)
    assert plain[11, 18:20].all()
    # A piece standing well out of its level (FRAGMENT_FACTOR) is an object of its own.
    score[11, 18:20] = 20.0
    kept = small_objects(
        score > threshold, score, np.zeros_like(score), score, threshold, needed=needed, valid=valid
    )
    assert kept[11, 18:20].all()


def test_a_trailing_piece_is_told_within_the_context_the_halo_covers():
    # The speck and its path reach no further than an object's test may (tilings agree).
    assert FRAGMENT_EXTENT + LINK_REACH + 1 <= MAX_SMALL_EXTENT + SMALL_CONTEXT


def _flat_scene(shape=(4, 120, 160), water=500.0, noise=10.0, seed=0):
    """Products of a calm water reference (noisy, as any real date) and another noisy date."""
    rng = np.random.default_rng(seed)
    values = water + rng.normal(0, noise, shape).astype(np.float32)
    reference = xr.DataArray(values, dims=("band", "y", "x"))
    spread = xr.DataArray(np.full(shape, noise, np.float32), dims=("band", "y", "x"))
    products = reference_products(reference, spread, DetectParams()).compute()
    date = water + rng.normal(0, noise, shape).astype(np.float32)
    return products, date


def _tile_codes(products, date, levels=None, visible=None, nir=None):
    n_bands = date.shape[0]
    return classify_tile(
        date,
        products.low.values,
        products.high.values,
        products.noise.values,
        np.ones(n_bands, np.float32),
        np.zeros(n_bands, np.float32),
        nodata=None,
        params=DetectParams(),
        scale=products.scale.values,
        levels=levels,
        visible=visible,
        nir=nir,
    )


def test_near_haze_a_hull_coloured_rise_is_spared_the_haze_factor_a_grey_puff_is_not():
    bands = ["B02", "B03", "B04", "B08"]
    water = np.array([650.0, 680.0, 380.0, 200.0], np.float32)[:, None, None]
    products, date = _flat_scene(water=water)
    date[:, :, :50] += 60.0  # haze over the left: 4-5 noise scales, above half the threshold
    # 30 px from the haze, two objects 18-19 noise scales strong (3 thresholds, less than the
    # haze factor's 5): a hull that rises in NIR over water, a grey puff that rises alike in all.
    hull, puff = (slice(30, 33), slice(80, 86)), (slice(80, 83), slice(80, 86))
    date[(slice(None), *hull)] += np.array([10.0, 10.0, 20.0, 200.0])[:, None, None]
    date[(slice(None), *puff)] += np.array([200.0, 200.0, 190.0, 200.0])[:, None, None]
    codes = _tile_codes(products, date, visible=visible_bands(bands), nir=nir_band(bands))
    assert (codes[hull] == SMALL).all()
    assert not (codes[puff] == SMALL).any()
    # Without a NIR band to tell them apart both are held to the haze factor.
    assert not (_tile_codes(products, date, visible=visible_bands(bands)) == SMALL).any()


def test_thin_haze_is_no_cloud_but_an_opaque_cloud_is():
    from spoc_xr.reference import brightness_levels

    products, date = _flat_scene()
    cloud = 8000.0
    # A veil of opacity 0.08 over the left half: +600 DN, 60 noise scales of calm water, but 8 %
    # of the way to the date's own clouds. An opaque cloud (0.9) over a block of the right half.
    date[:, :, :80] += 0.08 * (cloud - date[:, :, :80])
    date[:, 30:90, 100:150] += 0.9 * (cloud - date[:, 30:90, 100:150])
    levels = brightness_levels(date[None], np.ones((1, 4)), np.zeros((1, 4)))[0]
    assert levels[1] > 0.85 * cloud  # the date's bright level is its cloud
    codes = _tile_codes(products, date, tuple(levels))
    assert (codes[40:80, 110:140] == LARGE).all()
    assert (codes[:, 10:70] != LARGE).all()
    # Without the date's levels the veil, many noise floors above calm water, is a cloud.
    assert (_tile_codes(products, date)[:, 10:70] == LARGE).mean() > 0.9


def test_one_band_darkened_alone_is_no_shadow_a_shadow_dims_every_band():
    products, date = _flat_scene(shape=(5, 120, 160))
    # A radiometric residue of one band (SWIR over water) over the left half: 10 noise scales.
    date[4, :, :80] -= 100.0
    # A cloud shadow on the right: every band dimmed by 40 %.
    date[:, 30:90, 100:150] *= 0.6
    codes = _tile_codes(products, date)
    assert (codes[:, 10:70] != LARGE).all()
    assert (codes[40:80, 110:140] == LARGE).all()


def test_a_rise_of_swir_alone_is_no_cloud_a_rise_of_red_with_nir_down_is_one():
    bands = ["B02", "B03", "B04", "B08", "B11"]
    products, date = _flat_scene(shape=(5, 120, 160))
    # Left: the surface changed (vegetation drying): SWIR up 15 noise scales, NIR down 12, the
    # visible bands unchanged. Right: a cloud over vegetation: red up as much, NIR down alike.
    date[4, 20:100, 10:70] += 150.0
    date[2, 20:100, 90:150] += 150.0
    date[3, 20:100, 10:70] -= 120.0
    date[3, 20:100, 90:150] -= 120.0
    surface, cloud = (slice(40, 80), slice(25, 55)), (slice(40, 80), slice(105, 135))
    codes = _tile_codes(products, date, visible=visible_bands(bands))
    assert (codes[surface] != LARGE).all()
    assert (codes[cloud] == LARGE).all()
    # Without band names any rise is taken for a cloud's, as before.
    assert (_tile_codes(products, date)[surface] == LARGE).all()


def test_a_bright_pier_that_reads_slightly_wet_is_no_water_so_a_car_on_it_is_no_boat():
    stack = make_stack(n_time=6, shape=(41, 61)).astype(np.float32)
    # A pier 7 px wide into the water (left half), a few percent of the scene as in a port:
    # concrete, green a little above NIR.
    pier = (slice(8, 24), slice(5, 12))
    stack.values[:, 1, pier[0], pier[1]] = 1450.0
    stack.values[:, 3, pier[0], pier[1]] = 1400.0
    stack.values[:, [0, 2], pier[0], pier[1]] = 1420.0
    stack.values[4, :, 15:17, 7:9] += 2000.0  # a car on the pier's middle on date 4
    index_on_pier = (1450.0 - 1400.0) / (1450.0 + 1400.0)
    assert index_on_pier > 0  # a cut at 0 would take the pier for water
    result = annotate(stack.astype(np.uint16).chunk({"time": 1, "y": 10, "x": 10})).compute()
    cut = result.attrs["spoc_xr"]["water_threshold"]
    assert index_on_pier < cut < 0.5  # between the pier and the water (NDWI 0.5)
    water = result.water.values.astype(bool)
    assert not water[9:23, 6:11].any()  # the whole pier, edges included, is dry
    assert water[2, 2] and water[28, 2]  # open water stays water
    assert (result.mask.values[4, 15:17, 7:9] == SMALL).all()  # the car is found...
    assert result.heatmap.values[15:17, 7:9].max() == 0  # ...but is no boat on water


def test_water_is_read_in_the_stacks_radiometry_not_in_the_reference_dates():
    stack = make_stack(n_time=6, shape=(31, 37)).astype(np.float32)
    # Water whose NDWI is low (0.09, as offsets and turbidity give real water)...
    stack.values[:, 1, :, :18] = 1.2 * stack.values[:, 3, :, :18]
    # ...and a reference date whose own band gains push it below 0.
    stack.values[1, 1] *= 0.8
    stack.values[1, 3] *= 1.15
    assert (stack.values[1, 1, :, :18] < stack.values[1, 3, :, :18]).mean() > 0.9
    date = str(stack.time.values[1])[:10]
    result = annotate(stack.astype(np.uint16).chunk({"time": 1}), reference=date).compute()
    assert result.attrs["spoc_xr"]["reference_index"] == 1
    water = result.water.values.astype(bool)
    assert water[:, :18].all()  # the water half is water...
    assert not water[:, 21:].any()  # ...and the land half land
    gain, _ = result.attrs["spoc_xr"]["water_mapping"]
    assert gain[1] > 1.1 and gain[3] < 0.95  # the date's gains undone


def test_the_water_cut_never_splits_clear_from_turbid_water():
    rng = np.random.default_rng(1)
    # Mostly water: clear (NDWI ~0.5), turbid (~0.12) and a little land (~-0.4).
    green = np.r_[rng.normal(600, 10, 700), rng.normal(560, 10, 500), rng.normal(900, 10, 60)]
    nir = np.r_[rng.normal(200, 10, 700), rng.normal(440, 10, 500), rng.normal(2100, 10, 60)]
    image = np.stack([green, nir])[:, None, :]
    assert water_threshold(image, ["B03", "B08"]) == 0.0
    assert water_threshold(image, ["B04", "B08"]) == 0.0  # no water index at all
    # The same scene with bright piers instead of turbid water: the cut rises above the piers.
    green[700:760], nir[700:760] = 1500.0, 1400.0
    keep = np.r_[0:760, 1200:1260]
    cut = water_threshold(np.stack([green[keep], nir[keep]])[:, None, :], ["B03", "B08"])
    assert (1500.0 - 1400.0) / 2900.0 < cut < 0.45


def test_the_summary_of_a_stored_mask_equals_that_of_the_codes():
    from spoc_xr.products import (
        date_summary,
        mask_from_codes,
        stored_date_summary,
        valid_from_codes,
    )

    rng = np.random.default_rng(4)
    codes = rng.choice(
        np.array([0, 1, 2, 255], dtype=np.uint8), (3, 17, 23), p=[0.6, 0.1, 0.2, 0.1]
    )
    codes[1] = 255  # a date without any valid pixel
    codes = xr.DataArray(codes, dims=("time", "y", "x")).chunk({"time": 1, "y": 7})
    expected = date_summary(codes).compute()
    stored = stored_date_summary(mask_from_codes(codes), valid_from_codes(codes)).compute()
    xr.testing.assert_identical(stored, expected)
    assert np.isnan(stored.small_fraction[1]) and stored.valid_fraction[0] > 0.8
    plain = codes.values
    n_valid = (plain != 255).sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        shares = {
            "valid_fraction": n_valid / plain[0].size,
            "small_fraction": np.where(
                n_valid > 0, (plain == 1).sum(axis=(1, 2)) / n_valid, np.nan
            ),
            "large_fraction": np.where(
                n_valid > 0, (plain == 2).sum(axis=(1, 2)) / n_valid, np.nan
            ),
        }
    for name, share in shares.items():
        np.testing.assert_array_equal(expected[name].values, share.astype(np.float32))
        assert expected[name].dtype == np.float32
    # Unchunked codes give the same shares.
    xr.testing.assert_identical(date_summary(codes.compute()), expected)


def test_read_apart_computes_the_same_values_under_keys_of_its_own() -> None:
    data = np.arange(6 * 2 * 10 * 12).reshape(6, 2, 10, 12)
    # A slice: dask's getitem then aliases whole chunks (Alias nodes, which dask's own clone
    # leaves pointing at the original keys: its copy misses them and cannot be computed).
    array = da.from_array(data, chunks=(1, 2, 4, 5))[:5][[1, 3]]
    apart = read_apart(array, seed="noise-samples")
    tasks = convert_legacy_graph(dict(apart.__dask_graph__()))
    assert all(node.dependencies <= set(tasks) for node in tasks.values())
    assert not set(tasks) & set(dict(array.__dask_graph__()))
    np.testing.assert_array_equal(apart.compute(), data[:5][[1, 3]])
    # The same keys every time: both reference tasks share one read of each date.
    assert read_apart(array, seed="noise-samples").name == apart.name


def test_part_of_an_annotation_computes_on_its_own(stack) -> None:
    # Computing part of a result culls the graph to what it needs: every key a task names must
    # survive that (the noise dates' copy once named the stack's own reads).
    annotations = annotate(stack.chunk({"time": 1, "y": 16, "x": 16}).isel(time=slice(0, 4)))
    reference = annotations["reference"][:, :8, :8].compute()
    mask = annotations["mask"][2, 20:, 20:].compute()
    full = annotations.compute()
    np.testing.assert_array_equal(reference, full["reference"][:, :8, :8])
    np.testing.assert_array_equal(mask, full["mask"][2, 20:, 20:])


def _departures(n_dates=8, shape=(90, 100), seed=0):
    """Sample dates' departures in residual scales: noise about 1 everywhere."""
    rng = np.random.default_rng(seed)
    return np.abs(rng.normal(0, 1, (n_dates, *shape))).astype(np.float32)


def test_a_ship_moored_on_half_the_sample_dates_is_left_out_of_the_noise_model():
    departures = _departures()
    departures[:4, 40:43, 50:58] += 30.0  # moored on 4 of 8 sample dates
    departures[:, :, :35] += 15.0  # wide variation on every date (surf, vegetation)
    departures[:6, 70:72, 80:83] += 30.0  # occupied on 6 of 8: too few dates would remain
    left_out = noise_sample_objects(departures)
    # The ship and a pixel around it, on its own dates only.
    assert left_out[:4, 39:44, 49:59].all() and not left_out[4:, 40:43, 50:58].any()
    assert not left_out[:, :, :25].any()  # wide variation is the pixel's own noise
    assert not left_out[:, 70:72, 80:83].any()
    assert not left_out[:, :, 60:78].any()  # noise alone is never an object


@pytest.mark.parametrize("top, left", [(0, 0), (13, 27), (31, 6)])
def test_objects_on_sample_dates_do_not_depend_on_the_tiling(top, left):
    departures = _departures(seed=3)
    departures[:3, 20:23, 30:36] += 25.0
    departures[2:6, 50:54, 61:63] += 12.0
    departures[:, 60:, :40] += 9.0
    whole = noise_sample_objects(departures)
    tile = departures[:, top : top + 60, left : left + 70]
    part = noise_sample_objects(tile, origin=(top, left))
    reach = OBJECT_REACH
    inner = (slice(None), slice(reach, -reach), slice(reach, -reach))
    expected = whole[:, top : top + 60, left : left + 70]
    np.testing.assert_array_equal(part[inner], expected[inner])
    assert whole.any()


def test_a_moored_ship_does_not_become_its_pixels_noise():
    # Calm water, 9 dates; a ship moored at the same berth on 4 of them.
    rng = np.random.default_rng(5)
    shape, n_time = (60, 70), 9
    data = 500 + rng.normal(0, 8, (n_time, 4, *shape))
    data[1:5, :, 30:33, 20:28] += 1500
    times = np.datetime64("2023-03-01T10:30:00") + np.arange(n_time) * np.timedelta64(5, "D")
    stack = xr.DataArray(
        np.clip(data, 1, 65535).astype(np.uint16),
        dims=("time", "band", "y", "x"),
        coords={"time": times.astype("datetime64[ns]"), "band": ["B02", "B03", "B04", "B08"]},
        attrs={"nodata": 0},
    ).chunk({"time": 1, "y": 25, "x": 30})
    # The temporal median (water) is the reference; the sample dates are the other 8.
    radiometry = plan_radiometry(compute_overview(stack), "median")
    _, spread = reference_and_spread(stack, radiometry)
    spread = spread.values
    calm = np.median(spread[:, :20, :], axis=(1, 2))
    # Around the reference, the ship's dates would have made its spread ~1500 x 1.48.
    assert (spread[:, 30:33, 20:28] < 3 * calm[:, None, None]).all()


def _numpy_departures(raw, gains, offsets, nodata, low, high, units):
    from spoc_xr.reference import normalise_values

    samples = normalise_values(raw, gains, offsets, nodata)
    beyond = np.maximum(samples - high[None], low[None] - samples)
    beyond /= units.astype(np.float32)[None, :, None, None]
    with np.errstate(invalid="ignore"):
        departures = np.fmax.reduce(beyond, axis=1)
    return np.nan_to_num(np.maximum(departures, 0), nan=0.0)


def _numpy_kept_medians(raw, gains, offsets, nodata, low, high, left_out):
    from spoc_xr.detect import MAD_TO_SIGMA
    from spoc_xr.reference import nanmedian_first, normalise_values

    samples = normalise_values(raw, gains, offsets, nodata)
    beyond = np.maximum(np.maximum(samples - high[None], low[None] - samples), 0)
    if left_out is not None:
        beyond[np.broadcast_to(left_out[:, None], beyond.shape)] = np.nan
    return nanmedian_first(beyond) * np.float32(MAD_TO_SIGMA)


# -9999 is -10000 as float16: numpy compares the stored values in float16 with it.
@pytest.mark.parametrize(
    "dtype, nodata",
    [(np.uint16, 0.0)]
    + [
        (dtype, nodata)
        for dtype in (np.int16, np.float16, np.float32, np.float64)
        for nodata in (0.0, -9999.0)
    ],
)
@pytest.mark.parametrize("n_dates", [1, 4, 8])
def test_sample_passes_equal_numpy(dtype, nodata, n_dates):
    from spoc_xr.detect import kept_medians, sample_departures

    rng = np.random.default_rng(n_dates)
    shape = (n_dates, 3, 17, 23)
    raw = rng.uniform(1, 3000, shape).astype(dtype)
    fill = np.array(nodata).astype(dtype)
    raw[rng.random(shape) < 0.03] = fill  # nodata in single bands
    raw[:, 2, 0, 0] = fill  # no date with data: NaN
    if np.dtype(dtype).kind == "f":
        raw[rng.random(shape) < 0.02] = np.nan
        raw[0, 1, 2, 3] = np.inf
    gains = rng.uniform(0.8, 1.2, (n_dates, 3))
    offsets = rng.uniform(-20, 20, (n_dates, 3))
    reference = rng.uniform(1, 3000, shape[1:]).astype(np.float32)
    reference[:, 5, 6] = np.nan  # unknown in every band
    reference[1, 7, 8] = np.nan  # unknown in one band
    low = np.where(np.isnan(reference), np.inf, reference - 100).astype(np.float32)
    high = np.where(np.isnan(reference), -np.inf, reference + 100).astype(np.float32)
    units = np.array([50.0, 70.0, 90.0])
    expected = _numpy_departures(raw, gains, offsets, nodata, low, high, units)
    departures = sample_departures(raw, gains, offsets, nodata, low, high, units)
    np.testing.assert_array_equal(departures, expected)
    assert departures.dtype == np.float32 and (departures > 0).any()
    left_out = rng.random((n_dates, *shape[2:])) < 0.3
    for low_, high_ in ((low, high), (reference, reference)):  # the excess, then around
        for mask in (None, left_out):
            medians = kept_medians(raw, gains, offsets, nodata, low_, high_, mask)
            expected = _numpy_kept_medians(raw, gains, offsets, nodata, low_, high_, mask)
            np.testing.assert_array_equal(medians, expected)
            assert np.isnan(medians).any() and np.isfinite(medians).any()


@given(
    chunks=st.lists(st.integers(1, 9), min_size=1, max_size=5),
    depth=st.integers(0, 12),
    edge=st.sampled_from([None, 0, 1, 3]),
    merge=st.booleans(),
)
@settings(max_examples=60, deadline=None)
def test_windows_reach_depth_inside_and_edge_beyond_the_array(chunks, depth, edge, merge):
    rng = np.random.default_rng(len(chunks) + depth)
    values = rng.integers(0, 100, (2, sum(chunks), 5)).astype(np.int16)
    array = da.from_array(values, chunks=((2,), tuple(chunks), (5,)))
    tiles = (sum(chunks),) if merge else tuple(chunks)
    reach = depth if edge is None else min(edge, depth)
    windows = pad_and_overlap(array, depth, [1], tiles=[tiles], edge=edge).compute()
    # Replicated beyond the array by as much as any window reaches, then cut as planned.
    padded = np.pad(values, ((0, 0), (reach, reach), (0, 0)), mode="edge")
    expected, first = [], 0
    for side in tiles:
        start, stop = max(first - depth, -reach), min(first + side + depth, sum(chunks) + reach)
        assert window_span(first, first + side, depth, sum(chunks), edge) == (start, stop)
        expected.append(padded[:, start + reach : stop + reach])
        first += side
    np.testing.assert_array_equal(windows, np.concatenate(expected, axis=1))


def _overcast_stack(
    n_time: int, boats: dict[int, tuple[int, int]], overcast: tuple[int, ...]
) -> xr.DataArray:
    """A 40 x 48 px stack: a 2 x 3 hull on water at ``boats[t]`` (its top-left corner) on clear
    dates, the ``overcast`` dates a bright textured cloud end to end."""
    stack = make_stack(n_time=n_time, shape=(40, 48), seed=4)
    values = stack.values.copy()
    rng = np.random.default_rng(1)
    for t, (y, x) in boats.items():
        values[t, :, y : y + 2, x : x + 3] += np.uint16(2500)
    for t in overcast:
        values[t] = (6000 + rng.normal(0, 300, values[t].shape)).astype(np.uint16)
    return stack.copy(data=values)


def test_overcast_dates_of_a_short_stack_do_not_hide_the_boats_of_the_clear_ones():
    # Six dates, two of them overcast end to end: as noise samples their clouds were the spread
    # at every boat pixel of the clear dates (each date's own objects are left out of its
    # samples), and those boats were lost.
    boats = {0: (8, 6), 2: (20, 10), 4: (30, 14), 5: (12, 18)}
    stack = _overcast_stack(6, boats, overcast=(1, 3))
    result = annotate(stack, params=PARAMS).compute()
    for t, (y, x) in boats.items():
        assert (result["mask"][t, y : y + 2, x : x + 3] == SMALL).any(), t
    assert (result["mask"][[1, 3]] == LARGE).mean() > 0.9


def test_a_stack_overcast_on_half_of_its_dates_keeps_the_boats_of_the_clear_ones():
    # Half the dates overcast end to end: the temporal median was half cloud, every date
    # departed from it alike, and every date came out clear, the overcast ones too.
    boats = {0: (8, 6), 2: (20, 10), 4: (30, 14), 6: (12, 18)}
    stack = _overcast_stack(8, boats, overcast=(1, 3, 5, 7))
    for reference in ("auto", "median"):
        result = annotate(stack, reference=reference, params=PARAMS).compute()
        assert (
            result.attrs["spoc_xr"]["reference_index"]
            in {"auto": boats, "median": [None]}[reference]
        )
        for t, (y, x) in boats.items():
            assert (result["mask"][t, y : y + 2, x : x + 3] == SMALL).any(), (reference, t)
        assert (result["mask"][[1, 3, 5, 7]] == LARGE).mean() > 0.9, reference


def test_holes_of_the_reference_date_are_filled_not_spread_over_every_date():
    # Scattered nodata pixels (saturated or defective), 1 % of each date: with a date reference
    # left with holes, every date was invalid there and the tolerance window spread each hole
    # over its neighbours (valid ~0.91 of every date); filled from the other dates' median, each
    # date loses its own holes only.
    stack = make_stack(n_time=6, shape=(60, 64), seed=5)
    values = stack.values.copy()
    holes = np.random.default_rng(2).random((6, 1, 60, 64)) < 0.01
    values[np.broadcast_to(holes, values.shape)] = 0  # the stack's nodata
    result = annotate(stack.copy(data=values), params=PARAMS).compute()
    assert result.attrs["spoc_xr"]["reference_index"] is not None  # a date reference
    for t in range(6):
        np.testing.assert_array_equal(result["valid"][t].values, ~holes[t, 0])


def test_a_stack_of_one_date_is_refused_before_any_work():
    one = make_stack(n_time=1)
    with raise_if_dask_computes(), pytest.raises(SpocError, match=r"1 date.*at least 2 dates"):
        annotate(one.chunk({"time": 1}), params=PARAMS)


def _fine_stack(metres: float) -> xr.DataArray:
    """Six dates of 240 px at ``metres`` per pixel; date 2 holds a 70 x 20 px ship on water."""
    stack = make_stack(n_time=6, shape=(240, 240), seed=3)
    centres = metres * (np.arange(240) + 0.5)
    stack = stack.assign_coords(y=4650000.0 - centres, x=500000.0 + centres)
    values = stack.values.copy()
    values[2, :, 60:130, 30:50] += np.uint16(1500)
    return stack.copy(data=values).rio.write_crs("EPSG:32631")


def test_fine_pixels_get_a_note_whose_sizes_keep_a_wide_ship_small():
    # At 3 m a 60 m wide ship is 20 px: wider than the 15 px opening, it went to the large
    # class. The note's sizes (the defaults' ground extents) keep it small.
    stack = _fine_stack(3.0)
    defaults = annotate(stack).compute()
    notes = defaults.attrs["spoc_xr"]["notes"]
    said = [note for note in notes if note.startswith("pixels of 3 m")]
    assert said and "--open-size 51 --background-size 105" in said[0], notes
    assert (defaults["mask"][2, 60:130, 30:50] == LARGE).mean() > 0.5
    scaled = DetectParams(open_size=51, close_size=51, background_size=105)
    result = annotate(stack, params=scaled).compute()
    assert (result["mask"][2, 60:130, 30:50] == SMALL).mean() > 0.9
    assert not any(note.startswith("pixels of") for note in result.attrs["spoc_xr"]["notes"])


@pytest.mark.parametrize(("metres", "noted"), [(10.0, False), (30.0, False), (4.0, True)])
def test_the_pixel_size_note_is_given_below_5_m_only(metres: float, noted: bool) -> None:
    assert (pixel_size_note(metres, DetectParams()) is not None) == noted
    assert pixel_size_note(None, DetectParams()) is None


@pytest.mark.parametrize(
    ("metres", "sizes"),
    [(10.0, (15, 31)), (3.0, (51, 105)), (0.5, (301, 621)), (30.0, (5, 11))],
)
def test_sizes_for_pixels_cover_the_defaults_ground_extents(metres, sizes) -> None:
    scaled = sizes_for_pixels(metres)
    assert (scaled["open_size"], scaled["background_size"]) == sizes
    DetectParams(**scaled)  # odd and positive: accepted


def _forest_stack(band_names: list[str]) -> xr.DataArray:
    """8 dates of textured forest (red, NIR, SWIR1 as Landsat sees it): snow on date 3 and a
    cloud on date 5, each over [10:34, 12:36]."""
    rng = np.random.default_rng(2)
    forest = np.array([344.0, 2854.0, 1296.0])[:, None, None] * (
        1 + 0.08 * rng.standard_normal((1, 48, 48))
    )
    dates = [
        forest * rng.uniform(0.95, 1.05, (3, 1, 1)) + rng.normal(0, 10, forest.shape)
        for _ in range(8)
    ]
    patch = (slice(None), slice(10, 34), slice(12, 36))
    dates[3][patch] = np.array([3834.0, 4547.0, 639.0])[:, None, None]
    dates[5][patch] = np.array([2809.0, 4201.0, 2685.0])[:, None, None]
    for t in (3, 5):
        dates[t][patch] += rng.normal(0, 60, dates[t][patch].shape)
    times = np.datetime64("2023-01-01", "ns") + np.arange(8) * np.timedelta64(16, "D")
    return xr.DataArray(
        np.clip(np.stack(dates), 1, None).astype(np.uint16),
        dims=("time", "band", "y", "x"),
        coords={"time": times, "band": band_names},
    )


def test_snow_is_not_large_where_a_swir_band_tells_it_from_cloud():
    result = annotate(_forest_stack(["red", "nir", "swir1"]), params=PARAMS).compute()
    inside = result["mask"][:, 14:30, 16:32]
    assert (inside[5] == LARGE).mean() > 0.9  # the cloud
    assert (inside[3] == LARGE).mean() < 0.05  # the snow: a surface change
    # Landsat's "B6" may be thermal (Landsat 4-7): not taken for SWIR, the snow stays large.
    unnamed = annotate(_forest_stack(["red", "nir", "B6"]), params=PARAMS).compute()
    assert (unnamed["mask"][3, 14:30, 16:32] == LARGE).mean() > 0.9


@pytest.mark.parametrize(
    ("bands", "expected"),
    [
        (["B2", "B3", "B4", "B8", "B11"], ("MNDWI", ("B3", "B11"))),  # Sentinel-2, unpadded
        (["B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B12"], ("MNDWI", ("B3", "B12"))),
        (["B02", "B03", "B04", "B08", "B12", "B11"], ("MNDWI", ("B03", "B11"))),  # SWIR1 first
        # Landsat 4-7 numbering: B3 is red, B6 thermal: no index rather than a wrong one.
        (["B1", "B2", "B3", "B4", "B5", "B6", "B7"], ("none", ())),
    ],
)
def test_the_water_index_takes_no_ambiguous_landsat_number(bands, expected):
    index = choose_water_index(bands)
    assert (index.name, index.bands) == expected
    # Sentinel-2's unpadded B6 is red edge and Landsat 4-7's B6 thermal: never SWIR.
    assert "B6" not in [bands[i] for i in swir_bands(bands) or ()]


def test_eight_bit_data_whose_noise_is_below_one_step_is_no_overcast_stack():
    # Values that flicker by 1 DN between dates (noise 0.3 DN, rounded): the spread measured was
    # about 0, every flicker many noise scales: the overcast fallback, 100-150 false one-pixel
    # objects a date and a third of the image large on two dates.
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:64, 0:64]
    water = xx < 28
    land = 40 + 8 * np.sin(xx / 7.0) * np.cos(yy / 11.0)
    base = np.stack(
        [np.where(water, level, land + 3 * b) for b, level in enumerate((18, 18, 5, 5))]
    )
    dates = []
    for t in range(6):
        image = base + rng.normal(0, 0.3, base.shape)
        image[:, 10 + 6 * t : 12 + 6 * t, 8:11] += 120  # a 2 x 3 boat on water
        dates.append(np.clip(np.round(image), 0, 255))
    stack = xr.DataArray(
        np.stack(dates).astype(np.uint8),
        dims=("time", "band", "y", "x"),
        coords={
            "time": np.datetime64("2023-01-01", "ns") + np.arange(6) * np.timedelta64(30, "D"),
            "band": ["B02", "B03", "B04", "B08"],
        },
    )
    result = annotate(stack, params=PARAMS).compute()
    assert (result["mask"] == SMALL).sum(("y", "x")).values.tolist() == [6] * 6
    assert not (result["mask"] == LARGE).any()
    assert not any("depart" in note for note in result.attrs["spoc_xr"]["notes"])


def test_a_date_missing_one_band_is_named_with_that_band():
    stack = make_stack(n_time=5, shape=(31, 37), seed=2)
    values = stack.values.copy()
    values[1, 3] = 0  # B08 of date 1 is nodata (0) everywhere, the other bands are fine
    result = annotate(stack.copy(data=values), params=PARAMS)
    notes = [n for n in result.attrs["spoc_xr"]["notes"] if "hold no valid data" in n]
    assert len(notes) == 1 and f"band(s) {stack.band.values[3]} hold" in notes[0]
    assert float(result["valid_fraction"][1]) == 0.0


def test_a_cloud_two_or_three_local_windows_across_is_large():
    # A soft round cloud 30 px across: the local median shrank it below the opening's square,
    # and it was too wide and soft to be small: every one of its pixels came out clear.
    from scipy import ndimage as ndi

    rng = np.random.default_rng(0)
    side, n_time = 128, 8
    base = rng.uniform(500, 3000, (4, 1, 1)) * (1 + 0.05 * rng.standard_normal((1, side, side)))
    gains = rng.uniform(0.95, 1.05, (n_time, 4, 1, 1))
    data = base * gains + rng.normal(0, 20, (n_time, 4, side, side))
    yy, xx = np.mgrid[0:side, 0:side]
    alpha = ndi.gaussian_filter(((yy - 50) ** 2 + (xx - 50) ** 2 < 15**2).astype(float), 3)
    data[2] = data[2] * (1 - 0.8 * alpha) + 0.8 * alpha * 5000
    stack = xr.DataArray(
        np.clip(data, 1, None).astype(np.uint16),
        dims=("time", "band", "y", "x"),
        coords={
            "time": np.datetime64("2023-01-01", "ns") + np.arange(n_time) * np.timedelta64(10, "D"),
            "band": ["B02", "B03", "B04", "B08"],
        },
    )
    mask = annotate(stack).compute()["mask"]
    assert (mask[2].values[alpha > 0.5] == LARGE).mean() > 0.95
    assert not (mask[[0, 1, 3, 4, 5, 6, 7]] == LARGE).any()


def test_a_stack_of_fewer_than_four_dates_is_told_its_results_are_weaker():
    from spoc_xr.pipeline import FEW_DATES, plan_annotation

    for n_time, told in ((3, True), (FEW_DATES, False)):
        _, radiometry, _ = plan_annotation(make_stack(n_time=n_time, seed=1), params=PARAMS)
        said = [note for note in radiometry.notes if note.startswith(f"only {n_time} dates")]
        assert bool(said) == told, radiometry.notes


def test_a_stack_with_few_clean_noise_dates_is_told_so_and_a_longer_one_is_not():
    from spoc_xr.pipeline import FEW_NOISE_DATES, plan_annotation

    for n_time, told in ((FEW_NOISE_DATES, True), (FEW_NOISE_DATES + 2, False)):
        _, radiometry, _ = plan_annotation(make_stack(n_time=n_time, seed=1), params=PARAMS)
        said = [note for note in radiometry.notes if "clean enough for the noise model" in note]
        assert bool(said) == told, radiometry.notes
        if told:  # every date but the reference is a clean noise date here
            assert said[0].startswith(f"only {n_time - 1} of {n_time} dates")


def test_an_overview_of_other_dates_is_refused_with_what_to_pass():
    stack = make_stack(n_time=5, seed=1)
    with pytest.raises(
        ParameterError, match=r"holds \(4, 4\) \(dates, bands\) but the stack \(5, 4\)"
    ):
        annotate(stack, params=PARAMS, overview=np.zeros((4, 4, 8, 8), np.float32))


@pytest.mark.parametrize("zero_level", [1000, (1000, 1000, 1000, 1000)])
def test_values_stored_with_an_offset_annotate_as_without_it_given_their_zero_level(zero_level):
    from spoc_xr.pipeline import ZERO_LEVEL_ATTR, above_zero_level

    stack = make_stack(n_time=6, shape=(41, 53), seed=2)
    stack[:, :, :3, :5] = 0  # nodata: stays missing, and not 1000 DN less
    # Sentinel-2 L2A from baseline 04.00 on: reflectance + 1000 DN, nodata still 0.
    offset = (stack + 1000).where(stack != 0, 0).astype(np.uint16).assign_attrs(stack.attrs)
    plain = annotate(stack, params=PARAMS).compute()
    params = DetectParams(**{**PARAMS.__dict__, "zero_level": zero_level})
    for overview in (None, compute_overview(offset)):
        shifted = annotate(offset, params=params, overview=overview)
        assert shifted.attrs["spoc_xr"]["parameters"]["zero_level"] == list(params.zero_levels)
        shifted = shifted.compute()
        for name in ("mask", "valid", "heatmap", "gain"):
            np.testing.assert_array_equal(shifted[name].values, plain[name].values, err_msg=name)
    # The ratios of the stored values are not the ratios of reflectance: without it, not so.
    unaware = annotate(offset, params=PARAMS).compute()
    assert not np.array_equal(unaware["gain"].values, plain["gain"].values)
    taken = above_zero_level(offset, params.zero_levels)
    assert taken.attrs[ZERO_LEVEL_ATTR] == [1000.0] * 4 and "nodata" not in taken.attrs
    assert above_zero_level(taken, params.zero_levels) is taken  # never taken off twice


def test_a_nodata_value_inside_the_values_is_named_in_a_note():
    from spoc_xr.pipeline import plan_annotation

    stack = make_stack(n_time=5, seed=1)  # nodata 0, values from 1 up
    _, radiometry, _ = plan_annotation(stack, params=PARAMS)
    assert not [note for note in radiometry.notes if "declares nodata" in note]
    # Scaled to reflectance with an offset, the attribute stays and points inside the values.
    scaled = stack * 1e-4 - 0.1
    assert scaled.attrs["nodata"] == 0
    _, radiometry, _ = plan_annotation(scaled, params=PARAMS)
    (note,) = [note for note in radiometry.notes if "declares nodata" in note]
    assert note.startswith("the stack declares nodata 0, inside band B02 (")
    assert "stack.where(stack != stack.attrs['nodata'])" in note


def test_a_zero_level_is_checked_before_any_pixel_is_read():
    for bad in ("1000", float("nan"), (1, None), True):
        with pytest.raises(ParameterError, match="zero_level"):
            DetectParams(zero_level=bad)
    assert DetectParams(zero_level=np.float32(0)).zero_level == ()
    assert DetectParams(zero_level=np.array([1, 2])).zero_level == (1.0, 2.0)
    with raise_if_dask_computes(), pytest.raises(ParameterError, match="2 values for 4 bands"):
        annotate(make_stack().chunk(), params=DetectParams(zero_level=(1, 2)))


def test_classification_and_quality_bands_are_named_in_a_note():
    from spoc_xr.pipeline import categorical_band_notes, plan_annotation

    spectral = ["B01", "B02", "B8A", "B11", "blue", "nir", "swir1", "SR_B5", "ST_B10", "coastal"]
    assert categorical_band_notes(spectral) == []
    flagged = ["SCL", "QA_PIXEL", "SR_QA_AEROSOL", "Fmask", "cloud_mask", "MSK_CLDPRB"]
    (note,) = categorical_band_notes([*spectral, *flagged])
    assert note.startswith(f"band(s) {', '.join(flagged)} look like classification")
    stack = make_stack(n_time=5, seed=1)
    stack = stack.assign_coords(band=["B02", "B03", "B04", "SCL"])
    _, radiometry, _ = plan_annotation(stack, params=PARAMS)
    assert any(note.startswith("band(s) SCL look like") for note in radiometry.notes)


def _coast_scene(
    rng: np.random.Generator, side: int, water: float, land_mean: float, land_spread: float
) -> np.ndarray:
    """A ``side``² scene: smooth textured land, flat water on the left third."""
    land = ndi.gaussian_filter(rng.normal(size=(side, side)), 2)
    land = land_mean + land_spread * land / land.std()
    return np.where(np.arange(side)[None, :] < side // 3, water, land)


def _integer_stack(dates: np.ndarray, dtype: type, bands: list[str]) -> xr.DataArray:
    """``dates`` ``(time, band, y, x)`` rounded and clipped into ``dtype`` (0 is nodata), on a
    10 m grid, 5 days apart."""
    n_time, side = dates.shape[0], dates.shape[-1]
    return xr.DataArray(
        np.clip(np.round(dates), 1, np.iinfo(dtype).max).astype(dtype),
        dims=("time", "band", "y", "x"),
        coords={
            "time": pd.date_range("2023-01-01", periods=n_time, freq="5D"),
            "band": bands,
            "y": -10.0 * np.arange(side),
            "x": 10.0 * np.arange(side),
        },
        attrs={"nodata": 0},
    )


def clipped_true_colour_stack(seed: int, n_time: int = 8, side: int = 96) -> xr.DataArray:
    """8-bit red/green/blue dates that clip at 255 on a third of the scene (bright land under
    varying illumination), water on the left third, one 3 x 6 px boat on the water of date 5."""
    rng = np.random.default_rng(seed)
    scene = _coast_scene(rng, side, 40.0, 260, 70)
    bands = np.stack([scene * k for k in (1.0, 0.95, 0.9)])
    dates = np.stack(
        [bands * g + rng.normal(0, 1.5, bands.shape) for g in rng.uniform(0.85, 1.15, n_time)]
    )
    dates[5, :, 40:43, 10:16] = 130
    return _integer_stack(dates, np.uint8, ["B04", "B03", "B02"])


def assert_only_the_boat(codes: np.ndarray, date: int) -> np.ndarray:
    """The textured-coast stacks' boat (rows 40-42, columns 10-15 of ``date``) is small, and
    nothing else is an object; returns where the boat is."""
    boat = np.zeros(codes.shape, dtype=bool)
    boat[date, 40:43, 10:16] = True
    assert (codes[boat] == SMALL).all()
    assert not codes[~boat].any()
    return boat


@pytest.mark.parametrize("seed", [0, 6, 8])
def test_clipped_values_make_no_objects_and_the_boat_stays(seed, monkeypatch):
    from spoc_xr import pipeline

    stack = clipped_true_colour_stack(seed)
    assert (stack.values == 255).mean() > 0.2
    result = annotate(stack).compute()
    boat = assert_only_the_boat(result["mask"].values, 5)
    assert result.attrs["spoc_xr"]["saturation"] == [255.0, 255.0, 255.0]
    assert any("clipped" in note for note in result.attrs["spoc_xr"]["notes"])
    # Every value taken as measured (no ceiling): the clipped land shows objects.
    monkeypatch.setattr(
        pipeline, "saturation_levels", lambda view: np.full(view.shape[1], np.inf, np.float32)
    )
    plain = annotate(stack)["mask"].values
    assert np.count_nonzero(plain[~boat]) > 10


def test_round_solid_objects_are_puffs_and_ships_stay_small():
    from spoc_xr.detect import round_objects

    yy, xx = np.mgrid[:120, :160]

    def ellipse(y, x, radius, stretch=1.0):
        return (yy - y) ** 2 + ((xx - x) / stretch) ** 2 < radius**2

    puff = ellipse(20, 20, 11, 1.2)  # 22 x 26 px, round enough
    small_puff = ellipse(20, 60, 5)  # 9 px across: holds no 11 px square
    raft = (abs(yy - 20) < 8) & (abs(xx - 120) < 20)  # ships side by side: 15 x 39 px
    ring = ellipse(80, 30, 12) & ~ellipse(80, 30, 7)  # not solid
    kept, moved = round_objects(puff | small_puff | raft | ring, 15)
    assert moved is not None and (moved == puff).all()
    assert (kept == (small_puff | raft | ring)).all()
    assert round_objects(small_puff, 15) == (small_puff, None)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(4, 9), min_size=1, max_size=5),  # tiles longer than the margin
    st.integers(1, 6),
    st.integers(0, 3),
    st.data(),
)
def test_a_shifted_plan_assembles_the_wider_window_moved_by_whole_pixels(
    chunks, depth, margin, data
):
    from spoc_xr.detect import _assemble_window, shifted_plan, window_plans

    size = sum(chunks)
    image = np.arange(size, dtype=np.int32)[None, :] * 10 + np.arange(3)[:, None]
    blocks_of = np.split(image, np.cumsum(chunks)[:-1], axis=1)
    tiles = tuple(chunks)
    wide = window_plans(chunks, tiles, depth + margin, margin)
    plain = window_plans(chunks, tiles, depth, 0)
    for tile, (wide_plan, plain_plan) in enumerate(zip(wide, plain, strict=True)):
        step = data.draw(st.integers(-margin, margin))
        blocks = [blocks_of[piece[0]] for piece in wide_plan[0]]
        whole = _assemble_window(blocks, [wide_plan], [1])
        moved = _assemble_window(blocks, [shifted_plan(wide_plan, margin, step)], [1])
        expected = whole[:, margin + step : whole.shape[1] - margin + step]
        np.testing.assert_array_equal(moved, expected, err_msg=f"tile {tile}, step {step}")
        assert (
            moved.shape[1]
            == sum(p[4] - p[3] for p in plain_plan[0]) + plain_plan[1] + plain_plan[2]
        )


def _labelled_sea_clutter(small: np.ndarray, water: np.ndarray) -> np.ndarray:
    # The rule as scipy's labelling states it: components of one or two pixels, each counted at
    # its first pixel (row-major) where that lies on water, crowded by SEA_CLUTTER_COUNT of them
    # (brute force over pairs) within the window's half-width.
    labels, count = ndi.label(small, np.ones((3, 3)))
    sizes = ndi.sum(small, labels, np.arange(1, count + 1))
    tiny = [label for label in range(1, count + 1) if sizes[label - 1] <= 2]
    firsts = {}
    for label in tiny:
        first = int(np.flatnonzero(labels == label)[0])
        if water.reshape(-1)[first]:
            firsts[label] = np.unravel_index(first, small.shape)
    kept = small.copy()
    reach = SEA_CLUTTER_WINDOW // 2
    for label, (y, x) in firsts.items():
        near = sum(max(abs(y - v), abs(x - u)) <= reach for v, u in firsts.values())
        if near >= SEA_CLUTTER_COUNT:
            kept[labels == label] = False
    return kept


def test_four_specks_in_a_window_of_open_water_are_clutter_and_three_are_not():
    # The sparse specks of a cloud's haze fringe (gdynia, seed 0: 131 false boats of 1-2 px).
    water = np.ones((90, 90), dtype=bool)
    for count, dropped in ((SEA_CLUTTER_COUNT - 1, False), (SEA_CLUTTER_COUNT, True)):
        small = np.zeros_like(water)
        for speck in range(count):
            small[20 + 8 * speck, 30 : 30 + 1 + speck % 2] = True  # one and two pixels
        small[70:75, 60:63] = True  # a 5 x 3 px boat nearby is never clutter
        kept = without_sea_clutter(small, water)
        assert kept[70:75, 60:63].all()
        assert np.count_nonzero(kept) == (15 if dropped else np.count_nonzero(small))
    assert SEA_CLUTTER_COUNT == 4


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    shape=st.tuples(st.integers(1, 120), st.integers(1, 120)),
    share=st.floats(0.0, 0.08),
)
def test_sea_clutter_equals_the_labelled_rule(seed: int, shape: tuple[int, int], share: float):
    rng = np.random.default_rng(seed)
    small = rng.random(shape) < share
    small[: shape[0] // 3, : shape[1] // 3] |= rng.random((shape[0] // 3, shape[1] // 3)) < 0.3
    water = rng.random(shape) < 0.8
    kept = without_sea_clutter(small, water)
    np.testing.assert_array_equal(kept, _labelled_sea_clutter(small, water))
    # Only objects of one or two pixels on water are ever dropped.
    labels, count = ndi.label(small, np.ones((3, 3)))
    for label in range(1, count + 1):
        pixels = labels == label
        if pixels.sum() > 2 or not water[pixels].any():
            assert kept[pixels].all()


def _whitecap_stack() -> tuple[xr.DataArray, xr.DataArray]:
    # Date 1 of make_stack's scene with whitecaps: one pixel in 60 of the water (its left half)
    # rises by 600 in every band (foam), off the boat's corner.
    stack = make_stack(n_time=5, shape=(470, 450), seed=2)
    rng = np.random.default_rng(7)
    caps = (rng.random((470, 225)) < 1 / 60) & (np.arange(470)[:, None] > 20)
    values = stack.values.copy()
    values[1, :, :, :225] += (600 * caps).astype(np.uint16)
    stack = stack.copy(data=values)
    water = xr.DataArray(
        np.arange(450)[None, :].repeat(470, axis=0) < 225,
        dims=("y", "x"),
        coords={"y": stack.y, "x": stack.x},
    )
    return stack, water


def test_whitecaps_on_water_are_clutter_in_every_tiling():
    stack, water = _whitecap_stack()
    chunked, radiometry, reference, spread = _prepared(stack, {"y": 110, "x": 110})
    products = reference_products(reference, spread, PARAMS)
    arguments = (products, radiometry.gains, radiometry.offsets, PARAMS)
    plain = classify(stack.chunk({"time": 1}), *arguments).values
    whole = classify(stack.chunk({"time": 1}), *arguments, water=water).values
    with dask.config.set({CLASSIFY_TILE_CONFIG_KEY: 220}):
        tiled = classify(chunked, *arguments, water=water.chunk(110)).values
    np.testing.assert_array_equal(tiled, whole)
    # The whitecaps were hundreds of one-pixel objects; they are gone, the boat stays.
    specks = (plain[1, :, :225] == SMALL).sum()
    assert specks > 500 and (whole[1, :, :225] == SMALL).sum() < 0.02 * specks
    np.testing.assert_array_equal(whole[2], plain[2])
    assert (whole[2, 5:7, 5:7] == SMALL).all()


def dim_date_stack(seed: int, n_time: int = 8, side: int = 96) -> xr.DataArray:
    """uint16 dates of textured land beside water; date 3 lit 1.8 times darker in every band
    (a low sun, raw counts), a 3 x 6 px boat on the water of date 3."""
    rng = np.random.default_rng(seed)
    scene = _coast_scene(rng, side, 400.0, 2500, 600)
    bands = np.stack([scene * k for k in (1.0, 0.9, 1.2, 1.4)])
    lighting = rng.uniform(0.95, 1.05, n_time)
    lighting[3] = 1 / 1.8
    dates = np.stack([bands * g + rng.normal(0, 15, bands.shape) for g in lighting])
    dates[3, :, 40:43, 10:16] = 1500
    return _integer_stack(dates, np.uint16, ["B02", "B03", "B04", "B08"])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_date_lit_far_darker_in_every_band_is_followed_not_made_large(seed, monkeypatch):
    from spoc_xr import reference

    stack = dim_date_stack(seed)
    result = annotate(stack).compute()
    assert_only_the_boat(result["mask"].values, 3)
    np.testing.assert_allclose(result["gain"].values[3], 1.8, rtol=0.05)
    # Held at the old limit (1.5), the dim date's land came out large.
    monkeypatch.setattr(reference, "illumination_fit", lambda *args: None)
    held = annotate(stack)["mask"].values
    assert np.count_nonzero(held[3] == LARGE) > 0.3 * held[3].size
