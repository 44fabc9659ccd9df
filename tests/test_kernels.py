"""spoc_xr.kernels must equal scipy.ndimage (mode="nearest") value for value, on every route."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from unittest import mock

import cv2
import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
import scipy.ndimage as ndi
from hypothesis import given, settings
from hypothesis import strategies as st

from spoc_xr import kernels
from spoc_xr.errors import ParameterError

# Dtypes the pipeline meets (the first five) plus the ones that reach OpenCV through a cast or
# fall back to scipy.
MAIN_DTYPES = ["uint8", "uint16", "int16", "float32", "float64"]
OTHER_DTYPES = ["bool", "int8", "float16", "int32", "uint32", "int64"]
SIZES = st.sampled_from([1, 3, 5, 7, 9])

EXAMPLES = 200


def _values(dtype: np.dtype) -> st.SearchStrategy[Any]:
    if dtype == np.bool_:
        return st.booleans()
    if dtype.kind == "f":
        # Both a wide range and a handful of small values, so ties and +-inf both occur.
        return st.one_of(
            st.sampled_from([-2.0, -0.0, 0.0, 1.0, 3.0]),
            st.floats(allow_nan=False, width=dtype.itemsize * 8),
        )
    info = np.iinfo(dtype)
    return st.one_of(
        st.integers(min_value=max(info.min, -3), max_value=3),
        st.integers(min_value=int(info.min), max_value=int(info.max)),
    )


@st.composite
def images(draw: st.DrawFn, dtypes: list[str]) -> np.ndarray:
    dtype = np.dtype(draw(st.sampled_from(dtypes)))
    leading = draw(st.lists(st.integers(1, 3), max_size=2))
    # y and x from 1 so images smaller than the footprint (3 x 2 with size 5) are covered.
    shape = (*leading, draw(st.integers(1, 14)), draw(st.integers(1, 14)))
    return draw(hnp.arrays(dtype, shape, elements=_values(dtype)))


def _scipy(func: Callable[..., np.ndarray], image: np.ndarray, size: int) -> np.ndarray:
    footprint = (1,) * (image.ndim - 2) + (size, size)
    if image.dtype == np.float16:
        # scipy has no float16 loops; the contract is scipy on the exact float32 values.
        return func(image.astype(np.float32), size=footprint, mode="nearest").astype(np.float16)
    return func(image, size=footprint, mode="nearest")


def _assert_same(result: np.ndarray, expected: np.ndarray, image: np.ndarray) -> None:
    assert result.dtype == image.dtype
    assert result.shape == image.shape
    np.testing.assert_array_equal(result, expected, strict=True)


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (kernels.median_filter, ndi.median_filter),
        (kernels.minimum_filter, ndi.minimum_filter),
        (kernels.maximum_filter, ndi.maximum_filter),
    ],
    ids=["median", "minimum", "maximum"],
)
@settings(max_examples=EXAMPLES, deadline=None)
@given(image=images(MAIN_DTYPES + OTHER_DTYPES), size=SIZES)
def test_filters_equal_scipy_nearest(
    ours: Callable[[np.ndarray, int], np.ndarray],
    theirs: Callable[..., np.ndarray],
    image: np.ndarray,
    size: int,
) -> None:
    before = image.copy()
    _assert_same(ours(image, size), _scipy(theirs, image, size), image)
    np.testing.assert_array_equal(image, before, strict=True)


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (kernels.binary_erosion, ndi.minimum_filter),
        (kernels.binary_dilation, ndi.maximum_filter),
    ],
    ids=["erosion", "dilation"],
)
@settings(max_examples=EXAMPLES, deadline=None)
@given(image=images(["bool"]), size=SIZES)
def test_binary_erosion_dilation_equal_minmax_filter_on_bool(
    ours: Callable[[np.ndarray, int], np.ndarray],
    theirs: Callable[..., np.ndarray],
    image: np.ndarray,
    size: int,
) -> None:
    _assert_same(ours(image, size), _scipy(theirs, image, size), image)


@settings(max_examples=EXAMPLES, deadline=None)
@given(image=images(["bool"]), size=SIZES)
def test_binary_opening_closing_compose_nearest_steps(image: np.ndarray, size: int) -> None:
    eroded = _scipy(ndi.minimum_filter, image, size)
    dilated = _scipy(ndi.maximum_filter, image, size)
    opened = _scipy(ndi.maximum_filter, eroded, size)
    closed = _scipy(ndi.minimum_filter, dilated, size)
    _assert_same(kernels.binary_opening(image, size), opened, image)
    _assert_same(kernels.binary_closing(image, size), closed, image)


def test_binary_functions_treat_nonzero_as_true() -> None:
    mask = np.array([[0, 2, 0], [0, 0, 0], [0, 0, 0]], dtype=np.uint8)
    result = kernels.binary_dilation(mask, 3)
    assert result.dtype == np.bool_
    np.testing.assert_array_equal(result, [[1, 1, 1], [1, 1, 1], [0, 0, 0]])


@pytest.mark.parametrize("func", [kernels.median_filter, kernels.minimum_filter])
def test_filters_do_not_mix_leading_slices(func: Callable[[np.ndarray, int], np.ndarray]) -> None:
    cube = np.zeros((3, 2, 9, 9), dtype=np.uint16)
    cube[1] = 1000
    cube[2, 0] = 7
    result = func(cube, 5)
    np.testing.assert_array_equal(result[0], 0)
    np.testing.assert_array_equal(result[1], 1000)
    np.testing.assert_array_equal(result[2, 0], 7)
    np.testing.assert_array_equal(result[2, 1], 0)


@pytest.mark.parametrize("dtype", ["uint16", "float32", "int64"])
def test_non_contiguous_views_are_filtered_as_their_values(dtype: str) -> None:
    rng = np.random.default_rng(3)
    base = rng.integers(0, 500, size=(4, 20, 30)).astype(dtype)
    view = base[::2, 1::2, ::-3].transpose(0, 2, 1)
    assert not view.flags.c_contiguous
    for func, ref in [
        (kernels.median_filter, ndi.median_filter),
        (kernels.maximum_filter, ndi.maximum_filter),
    ]:
        _assert_same(func(view, 5), _scipy(ref, view, 5), view)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_nan_input_goes_to_scipy_and_still_equals_it(dtype: str) -> None:
    rng = np.random.default_rng(4)
    image = rng.normal(size=(2, 12, 13)).astype(dtype)
    image[0, 3:5, 4] = np.nan
    image[1, 0, 0] = np.nan
    for func, ref in [
        (kernels.median_filter, ndi.median_filter),
        (kernels.minimum_filter, ndi.minimum_filter),
        (kernels.maximum_filter, ndi.maximum_filter),
    ]:
        _assert_same(func(image, 3), _scipy(ref, image, 3), image)


@pytest.mark.parametrize(
    ("dtype", "size"),
    [("uint8", 9), ("bool", 7), ("int8", 11), ("uint16", 5), ("int16", 3), ("float32", 5)],
)
def test_median_takes_the_opencv_route_where_exact(
    monkeypatch: pytest.MonkeyPatch, dtype: str, size: int
) -> None:
    image = np.arange(14 * 15).reshape(14, 15).astype(dtype)
    expected = _scipy(ndi.median_filter, image, size)

    def refuse(*args: object, **kwargs: object) -> np.ndarray:
        raise AssertionError("fell back to scipy")

    monkeypatch.setattr(kernels.ndi, "median_filter", refuse)
    _assert_same(kernels.median_filter(image, size), expected, image)


@pytest.mark.parametrize("dtype", ["int32", "uint32", "float16", "int8", "bool"])
def test_min_max_take_the_opencv_route_through_lossless_casts(
    monkeypatch: pytest.MonkeyPatch, dtype: str
) -> None:
    info_max = 1 if dtype == "bool" else 100
    image = (np.arange(9 * 11).reshape(9, 11) % (info_max + 1)).astype(dtype)
    if dtype in ("int32", "uint32"):
        # Values beyond float32's 24-bit mantissa, which a float32 detour would round.
        image = image * np.array(2**25 + 1, dtype=dtype)
    expected_min = _scipy(ndi.minimum_filter, image, 5)
    expected_max = _scipy(ndi.maximum_filter, image, 5)

    def refuse(*args: object, **kwargs: object) -> np.ndarray:
        raise AssertionError("fell back to scipy")

    monkeypatch.setattr(kernels.ndi, "minimum_filter", refuse)
    monkeypatch.setattr(kernels.ndi, "maximum_filter", refuse)
    _assert_same(kernels.minimum_filter(image, 5), expected_min, image)
    _assert_same(kernels.maximum_filter(image, 5), expected_max, image)


@pytest.mark.parametrize("size", [11, 15, 31])
def test_uint8_median_equals_scipy_for_large_sizes(size: int) -> None:
    # OpenCV switches between histogram algorithms by size; each must stay exact.
    image = np.random.default_rng(7).integers(0, 256, size=(48, 150), dtype=np.uint8)
    _assert_same(kernels.median_filter(image, size), _scipy(ndi.median_filter, image, size), image)


def test_non_native_byte_order_is_filtered_by_value() -> None:
    image = np.arange(10 * 12, dtype=">u2").reshape(10, 12) * 37 % 1000
    result = kernels.median_filter(image, 3)
    assert result.dtype == image.dtype
    np.testing.assert_array_equal(result, _scipy(ndi.median_filter, image, 3))


def test_size_one_returns_a_copy() -> None:
    image = np.arange(12, dtype=np.uint16).reshape(3, 4)
    result = kernels.median_filter(image, 1)
    np.testing.assert_array_equal(result, image)
    result[0, 0] = 99
    assert image[0, 0] == 0


def test_empty_array_returns_empty_copy() -> None:
    image = np.zeros((2, 0, 5), dtype=np.float32)
    assert kernels.maximum_filter(image, 3).shape == (2, 0, 5)


@pytest.mark.parametrize(
    ("size", "fragment"),
    [
        (4, "got 4; use 3 or 5"),
        (0, "at least 1 pixel, got 0"),
        (-3, "got -3"),
        (3.0, "integer number of pixels, got 3.0"),
        ("5", "got '5'"),
        (True, "got True"),
    ],
)
def test_check_size_rejects_bad_sizes_naming_value_and_fix(size: object, fragment: str) -> None:
    with pytest.raises(ParameterError, match=fragment):
        kernels.check_size(size, name="median_size")  # type: ignore[arg-type]


def test_check_size_rejects_size_larger_than_image() -> None:
    with pytest.raises(ParameterError, match=r"median_size=7 is larger than the image \(5 x 6"):
        kernels.check_size(7, shape=(3, 5, 6), name="median_size")
    with pytest.raises(ParameterError, match="use at most 5"):
        kernels.check_size(7, shape=(6, 6))


def test_check_size_accepts_numpy_ints_and_fitting_sizes() -> None:
    value = kernels.check_size(np.int64(5), shape=(5, 9))
    assert value == 5
    assert type(value) is int


@pytest.mark.parametrize(
    "func",
    [
        kernels.median_filter,
        kernels.minimum_filter,
        kernels.maximum_filter,
        kernels.binary_erosion,
        kernels.binary_dilation,
        kernels.binary_opening,
        kernels.binary_closing,
    ],
)
def test_filters_check_arguments_before_work(func: Callable[[np.ndarray, int], np.ndarray]) -> None:
    with pytest.raises(ParameterError, match="got 2"):
        func(np.zeros((4, 4), dtype=np.uint8), 2)
    with pytest.raises(ParameterError, match="at least 2 dimensions"):
        func(np.zeros(4, dtype=np.uint8), 3)


@st.composite
def masks(draw: st.DrawFn) -> np.ndarray:
    shape = (draw(st.integers(1, 25)), draw(st.integers(1, 25)))
    density = draw(st.sampled_from([0.1, 0.4, 0.6, 0.9]))
    seed = draw(st.integers(0, 2**32 - 1))
    return np.random.default_rng(seed).random(shape) < density


STRUCTURES = {8: np.ones((3, 3), dtype=bool), 4: ndi.generate_binary_structure(2, 1)}


@pytest.mark.parametrize("connectivity", [8, 4])
@settings(max_examples=150, deadline=None)
@given(mask=masks())
def test_label_equals_scipy_exactly(mask: np.ndarray, connectivity: int) -> None:
    labels, count = kernels.label(mask, connectivity=connectivity)
    expected, expected_count = ndi.label(mask, structure=STRUCTURES[connectivity])
    assert count == expected_count
    np.testing.assert_array_equal(labels, expected.astype(np.int32), strict=True)


@pytest.mark.parametrize("connectivity", [8, 4])
# Both ways to the extents: OpenCV's statistics (dense) and the foreground pixels (sparse).
@pytest.mark.parametrize("sparse_share", [1, 2**40])
@settings(max_examples=150, deadline=None)
@given(mask=masks())
def test_components_are_scipys_with_their_extents(
    mask: np.ndarray, connectivity: int, sparse_share: int
) -> None:
    with mock.patch.object(kernels, "SPARSE_COMPONENTS_SHARE", sparse_share):
        labels, count, extents = kernels.components(mask, connectivity=connectivity)
    expected, expected_count = ndi.label(mask, structure=STRUCTURES[connectivity])
    assert count == expected_count
    assert labels.dtype == np.int32 and extents.shape == (count + 1,) and extents[0] == 0
    # The same partition: each scipy component is exactly one of ours and vice versa.
    assert not labels[~mask].any()
    pairs = np.unique(np.stack([labels[mask], expected[mask]]), axis=1)
    assert pairs.shape[1] == count
    assert len(set(pairs[0])) == len(set(pairs[1])) == count
    boxes = ndi.find_objects(expected)
    for ours, theirs in pairs.T:
        box = boxes[theirs - 1]
        assert extents[ours] == max(side.stop - side.start for side in box)


def test_components_of_empty_masks() -> None:
    labels, count, extents = kernels.components(np.zeros((3, 4), dtype=np.uint8))
    assert (count, extents.tolist(), labels.any()) == (0, [0], False)
    assert kernels.components(np.zeros((0, 3), dtype=bool))[1] == 0
    with pytest.raises(ParameterError, match=r"components needs a 2-D mask"):
        kernels.components(np.zeros((2, 3, 3), dtype=bool))


@pytest.mark.parametrize("connectivity", [8, 4])
def test_label_relabels_when_opencv_numbers_out_of_order(
    monkeypatch: pytest.MonkeyPatch, connectivity: int
) -> None:
    mask = np.random.default_rng(5).random((40, 50)) < 0.4
    expected, expected_count = ndi.label(mask, structure=STRUCTURES[connectivity])
    original = cv2.connectedComponentsWithAlgorithm

    def shuffled(*args: Any) -> tuple[int, np.ndarray]:
        total, labels = original(*args)
        permutation = np.concatenate([[0], np.random.default_rng(6).permutation(total - 1) + 1])
        return total, permutation.astype(np.int32)[labels]

    monkeypatch.setattr(kernels.cv2, "connectedComponentsWithAlgorithm", shuffled)
    labels, count = kernels.label(mask, connectivity=connectivity)
    assert count == expected_count > 10
    np.testing.assert_array_equal(labels, expected.astype(np.int32), strict=True)


def test_label_handles_empty_and_non_bool_masks() -> None:
    labels, count = kernels.label(np.zeros((3, 4), dtype=np.uint8))
    assert count == 0
    assert labels.dtype == np.int32
    assert not labels.any()
    labels, count = kernels.label(np.array([[0, 2, 0, 5]], dtype=np.uint16), connectivity=4)
    assert count == 2
    np.testing.assert_array_equal(labels, [[0, 1, 0, 2]])
    assert kernels.label(np.zeros((0, 3), dtype=bool))[1] == 0


def test_label_rejects_bad_connectivity_and_shape() -> None:
    with pytest.raises(ParameterError, match="connectivity must be 4 or 8, got 6"):
        kernels.label(np.zeros((3, 3), dtype=bool), connectivity=6)
    with pytest.raises(ParameterError, match=r"2-D mask \(y, x\), got shape \(2, 3, 3\)"):
        kernels.label(np.zeros((2, 3, 3), dtype=bool))


def test_block_mean_and_upsample_linear():
    rng = np.random.default_rng(7)
    image = rng.random((12, 20)).astype(np.float32)
    means = kernels.block_mean(image, 4)
    expected = image.reshape(3, 4, 5, 4).mean(axis=(1, 3))
    np.testing.assert_allclose(means, expected, rtol=1e-6)
    with pytest.raises(ParameterError, match="multiples of 4"):
        kernels.block_mean(image[:10], 4)
    up = kernels.upsample_linear(np.array([[0.0, 4.0]], dtype=np.float32), 2)
    np.testing.assert_array_equal(up, [[0, 1, 3, 4], [0, 1, 3, 4]])
    # Cell centres keep their cell's value; a constant image stays constant.
    assert kernels.upsample_linear(np.full((3, 3), 2.5, np.float32), 4).shape == (12, 12)
    assert (kernels.upsample_linear(np.full((3, 3), 2.5, np.float32), 4) == 2.5).all()


@given(
    mask=hnp.arrays(np.bool_, hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=30)),
    size=st.sampled_from([1, 3, 9, 21, 61]),
    data=st.data(),
)
@settings(max_examples=EXAMPLES, deadline=None)
def test_dilated_at_equals_the_dilation_at_those_pixels(mask, size, data):
    indices = np.array(
        data.draw(st.lists(st.integers(0, mask.size - 1), max_size=20)), dtype=np.int64
    )
    expected = ndi.maximum_filter(mask, size, mode="nearest").reshape(-1)[indices]
    np.testing.assert_array_equal(kernels.dilated_at(mask, indices, size), expected)


def test_dilated_at_refuses_indices_outside_the_mask():
    with pytest.raises(ParameterError, match="flat indices"):
        kernels.dilated_at(np.zeros((3, 3), bool), np.array([9]), 3)
