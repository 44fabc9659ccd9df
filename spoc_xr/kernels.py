"""Per-chunk numpy kernels: fast filters that return exactly what scipy.ndimage returns.

Every function here works on one in-memory array (a Dask block, say) and holds no Dask. The
contract is value-for-value equality with :mod:`scipy.ndimage` using ``mode="nearest"`` (edge
replication) on the array given, with a full square footprint of odd side ``size`` applied over
the last two axes only, independently for every leading index (time, band): leading axes are
never mixed.

Speed comes from OpenCV, used only where OpenCV was checked to compute exactly what scipy does
(``tests/test_kernels.py`` pins this down for each route); everything else falls back to scipy.

=====================  ===============================================  ======================
kernel                 OpenCV route (exact)                             otherwise
=====================  ===============================================  ======================
median_filter          uint8, bool, int8 any size; uint16, int16,       scipy.ndimage
                       float32, float16 size <= 5
minimum/maximum        uint8, bool, int8, uint16, int16, float16,       scipy.ndimage
                       float32, float64, int32, uint32 (via float64)
label                  ``cv2.connectedComponentsWithAlgorithm`` (SAUF)  relabelled to scipy's
components             the same with statistics (BBDT), any numbering   (same partition)
=====================  ===============================================  ======================

int8, float16, int32 and uint32 reach OpenCV through lossless, order-preserving casts (int8 by
flipping the sign bit into uint8; float16 into float32; 32-bit integers into float64, which holds
them exactly), so order statistics are unchanged. scipy has no float16 loops, so for float16 the
contract is scipy on the (exact) float32 values, cast back.

Float input holding NaN always goes to scipy: OpenCV and scipy order NaN differently, and
scipy's answer is the contract (near NaN it is scipy's arbitrary one, so fill NaN before
filtering if the values there matter; expect scipy's speed then). Arrays in non-native byte
order also go to scipy. OpenCV runs on its own thread pool; callers inside Dask workers may want
``cv2.setNumThreads`` to avoid oversubscription.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable

import cv2
import numpy as np
import scipy.ndimage as ndi

from spoc_xr.errors import ParameterError

__all__ = [
    "binary_closing",
    "binary_dilation",
    "binary_erosion",
    "binary_opening",
    "block_mean",
    "check_size",
    "components",
    "label",
    "maximum_filter",
    "median_filter",
    "minimum_filter",
    "upsample_linear",
]

# cv2.medianBlur takes 16-bit and float32 images only for ksize 3 and 5 (it raises otherwise);
# uint8 has a histogram implementation for any odd size.
CV2_MEDIAN_MAX_SIZE_WIDE = 5

# Flipping the top bit maps int8 onto uint8 monotonically (-128 -> 0, 127 -> 255), so order
# statistics computed on the uint8 view map back exactly.
_INT8_SIGN_BIT = np.uint8(0x80)


def _dtypes(*types: type[np.generic]) -> frozenset[np.dtype]:
    return frozenset(np.dtype(t) for t in types)


# Dtypes cv2.medianBlur handles natively (sizes limited as above except uint8).
_MEDIAN_NATIVE = _dtypes(np.uint8, np.uint16, np.int16, np.float32)
# Dtypes cv2.erode / cv2.dilate handle natively with BORDER_REPLICATE.
_MORPH_NATIVE = _dtypes(np.uint8, np.uint16, np.int16, np.float32, np.float64)
# Integer dtypes that float64 represents exactly (|v| < 2**53), so erode/dilate reach OpenCV
# through float64 (OpenCV has no 32-bit integer morphology).
_MORPH_VIA_FLOAT64 = _dtypes(np.int32, np.uint32)

# (encode, decode, dtype OpenCV sees)
_Codec = tuple[Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray], np.dtype]


def check_size(size: int, *, shape: tuple[int, ...] | None = None, name: str = "kernel") -> int:
    """Check a filter size: a positive odd integer, optionally no larger than an image.

    Parameters
    ----------
    size : int
        Side of the square footprint in pixels.
    shape : tuple of int, optional
        Shape of the image the filter will run on; when given, ``size`` may not exceed either of
        its last two dimensions. The kernels themselves accept images smaller than the footprint
        (as scipy does), so they do not pass ``shape``; callers that work on whole scenes do.
    name : str
        What the size is for, used in the error message (e.g. ``"median_size"``).

    Returns
    -------
    int
        ``size`` as a plain Python int.

    Raises
    ------
    ParameterError
        If ``size`` is not an integer, is below 1, is even, or exceeds the image.

    Examples
    --------
    >>> check_size(5)
    5
    >>> check_size(4, name="median_size")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    spoc_xr.errors.ParameterError: median_size must be odd ... got 4; use 3 or 5
    """
    if isinstance(size, bool) or not isinstance(size, numbers.Integral):
        raise ParameterError(
            f"{name} must be an integer number of pixels, got {size!r} "
            f"({type(size).__name__}); pass an odd int such as 3 or 5"
        )
    value = int(size)
    if value < 1:
        raise ParameterError(f"{name} must be at least 1 pixel, got {value}; pass an odd int >= 1")
    if value % 2 == 0:
        raise ParameterError(
            f"{name} must be odd so the footprint has a centre pixel, got {value}; "
            f"use {value - 1} or {value + 1}"
        )
    if shape is not None:
        if len(shape) < 2:
            raise ParameterError(f"{name} needs an image with at least 2 dimensions, got {shape}")
        smallest = min(shape[-2:])
        if value > smallest:
            largest_odd = smallest if smallest % 2 else smallest - 1
            raise ParameterError(
                f"{name}={value} is larger than the image ({shape[-2]} x {shape[-1]} pixels); "
                f"use at most {max(largest_odd, 1)} or a larger image"
            )
    return value


def _check_image(image: np.ndarray, what: str) -> np.ndarray:
    array = np.asarray(image)
    if array.ndim < 2:
        raise ParameterError(
            f"{what} needs an array with at least 2 dimensions (..., y, x), got shape "
            f"{array.shape}; reshape a single row to (1, n)"
        )
    return array


def _has_nan(array: np.ndarray) -> bool:
    return array.dtype.kind in "fc" and bool(np.isnan(array).any())


def _identity(array: np.ndarray) -> np.ndarray:
    return array


def _codec(array: np.ndarray, native: frozenset[np.dtype]) -> _Codec | None:
    """Return (encode, decode, dtype) mapping ``array`` losslessly onto a dtype in ``native``.

    None means no exact OpenCV route exists and the caller must use scipy.
    """
    dtype = array.dtype
    if not dtype.isnative or _has_nan(array):
        return None
    if dtype in native:
        return _identity, _identity, dtype
    if dtype == np.bool_ and np.dtype(np.uint8) in native:
        # bool is stored as 0/1 bytes, and every filter here maps 0/1 inputs to 0/1 outputs.
        return (lambda a: a.view(np.uint8)), (lambda a: a.view(np.bool_)), np.dtype(np.uint8)
    if dtype == np.int8 and np.dtype(np.uint8) in native:
        return (
            lambda a: a.view(np.uint8) ^ _INT8_SIGN_BIT,
            lambda a: (a ^ _INT8_SIGN_BIT).view(np.int8),
            np.dtype(np.uint8),
        )
    if dtype == np.float16 and np.dtype(np.float32) in native:
        return (
            (lambda a: a.astype(np.float32)),
            (lambda a: a.astype(np.float16)),
            np.dtype(np.float32),
        )
    if dtype in _MORPH_VIA_FLOAT64 and np.dtype(np.float64) in native:
        return (lambda a: a.astype(np.float64)), (lambda a: a.astype(dtype)), np.dtype(np.float64)
    return None


def _per_slice(
    array: np.ndarray, codec: _Codec, func: Callable[[np.ndarray], np.ndarray]
) -> np.ndarray:
    """Apply a 2-D OpenCV ``func`` to every (y, x) slice of ``array``; leading axes stay apart."""
    encode, decode, _ = codec
    if array.ndim == 2:
        # OpenCV returns a new array: no copy into a second one.
        return decode(func(np.ascontiguousarray(encode(array)))).reshape(array.shape)
    out = np.empty(array.shape, dtype=array.dtype)
    height, width = array.shape[-2:]
    # reshape copies only when the leading axes cannot be merged as a view; either way the input
    # is never written to.
    source = array.reshape(-1, height, width)
    target = out.reshape(-1, height, width)
    for index in range(source.shape[0]):
        # cv2 needs C-contiguous 2-D input; a strided view would be rejected or misread.
        plane = np.ascontiguousarray(encode(source[index]))
        target[index] = decode(func(plane))
    return out


def _scipy_filter(func: Callable[..., np.ndarray], array: np.ndarray, size: int) -> np.ndarray:
    """Run a scipy.ndimage filter over the last two axes, with edge replication."""
    footprint = (1,) * (array.ndim - 2) + (size, size)
    if array.dtype == np.float16:
        # scipy.ndimage has no float16 loops; float32 holds every float16 exactly.
        return func(array.astype(np.float32), size=footprint, mode="nearest").astype(np.float16)
    return func(array, size=footprint, mode="nearest")


def median_filter(image: np.ndarray, size: int) -> np.ndarray:
    """Median over a ``size`` x ``size`` square with edge replication, slice by slice.

    Equal to ``scipy.ndimage.median_filter(image, size=(1, ..., size, size), mode="nearest")``.
    OpenCV's ``medianBlur`` is used for uint8/bool/int8 at any size and for uint16, int16,
    float16 and float32 up to size 5 (100-300x faster); other cases, and float input with NaN,
    use scipy.

    Parameters
    ----------
    image : numpy.ndarray
        Array of shape ``(..., y, x)``; the filter runs over the last two axes only.
    size : int
        Odd side of the square footprint; 1 returns a copy.

    Returns
    -------
    numpy.ndarray
        Filtered array, same shape and dtype as ``image``.

    Examples
    --------
    >>> a = np.array([[0, 0, 0], [0, 9, 0], [0, 0, 0]], dtype=np.uint16)
    >>> median_filter(a, 3)[1, 1]
    np.uint16(0)
    """
    size = check_size(size, name="median size")
    array = _check_image(image, "median_filter")
    if size == 1 or array.size == 0:
        return array.copy()
    codec = _codec(array, _MEDIAN_NATIVE)
    if codec is not None and (size <= CV2_MEDIAN_MAX_SIZE_WIDE or codec[2] == np.uint8):
        return _per_slice(array, codec, lambda plane: cv2.medianBlur(plane, size))
    return _scipy_filter(ndi.median_filter, array, size)


def _morphology(image: np.ndarray, size: int, *, op: str) -> np.ndarray:
    size = check_size(size, name=f"{op} size")
    array = _check_image(image, f"{op}_filter")
    if size == 1 or array.size == 0:
        return array.copy()
    codec = _codec(array, _MORPH_NATIVE)
    if codec is None:
        scipy_filter = ndi.minimum_filter if op == "minimum" else ndi.maximum_filter
        return _scipy_filter(scipy_filter, array, size)
    cv2_filter = cv2.erode if op == "minimum" else cv2.dilate
    footprint = np.ones((size, size), dtype=np.uint8)
    return _per_slice(
        array,
        codec,
        lambda plane: cv2_filter(plane, footprint, borderType=cv2.BORDER_REPLICATE),
    )


def minimum_filter(image: np.ndarray, size: int) -> np.ndarray:
    """Minimum over a ``size`` x ``size`` square with edge replication, slice by slice.

    Equal to ``scipy.ndimage.minimum_filter(image, size=(1, ..., size, size), mode="nearest")``,
    computed with ``cv2.erode`` for every dtype except 64-bit integers and NaN-holding floats.

    Parameters
    ----------
    image : numpy.ndarray
        Array of shape ``(..., y, x)``; the filter runs over the last two axes only.
    size : int
        Odd side of the square footprint; 1 returns a copy.

    Returns
    -------
    numpy.ndarray
        Filtered array, same shape and dtype as ``image``.

    Examples
    --------
    >>> minimum_filter(np.array([[5, 1], [7, 9]], dtype=np.int16), 3)
    array([[1, 1],
           [1, 1]], dtype=int16)
    """
    return _morphology(image, size, op="minimum")


def maximum_filter(image: np.ndarray, size: int) -> np.ndarray:
    """Maximum over a ``size`` x ``size`` square with edge replication, slice by slice.

    Equal to ``scipy.ndimage.maximum_filter(image, size=(1, ..., size, size), mode="nearest")``,
    computed with ``cv2.dilate`` for every dtype except 64-bit integers and NaN-holding floats.

    Parameters
    ----------
    image : numpy.ndarray
        Array of shape ``(..., y, x)``; the filter runs over the last two axes only.
    size : int
        Odd side of the square footprint; 1 returns a copy.

    Returns
    -------
    numpy.ndarray
        Filtered array, same shape and dtype as ``image``.

    Examples
    --------
    >>> maximum_filter(np.array([[5, 1], [7, 9]], dtype=np.float32), 3)
    array([[9., 9.],
           [9., 9.]], dtype=float32)
    """
    return _morphology(image, size, op="maximum")


def _as_bool(mask: np.ndarray, what: str) -> np.ndarray:
    array = _check_image(mask, what)
    # Nonzero counts as True, as in scipy.ndimage's binary functions.
    return array if array.dtype == np.bool_ else array.astype(bool)


def binary_erosion(mask: np.ndarray, size: int) -> np.ndarray:
    """Erode a boolean mask by a ``size`` x ``size`` square with edge replication.

    Equal to ``minimum_filter(mask.astype(bool), size)``. Unlike
    ``scipy.ndimage.binary_erosion`` (whose default ``border_value=0`` eats objects touching the
    edge), pixels beyond the edge copy the nearest edge pixel, so a chunk border does not erode.

    Parameters
    ----------
    mask : numpy.ndarray
        Array of shape ``(..., y, x)``; nonzero counts as True.
    size : int
        Odd side of the square footprint; 1 returns a copy.

    Returns
    -------
    numpy.ndarray
        Boolean array of the same shape.

    Examples
    --------
    >>> m = np.zeros((5, 5), bool); m[1:4, 1:4] = True
    >>> binary_erosion(m, 3).sum()
    np.int64(1)
    """
    return minimum_filter(_as_bool(mask, "binary_erosion"), size)


def binary_dilation(mask: np.ndarray, size: int) -> np.ndarray:
    """Dilate a boolean mask by a ``size`` x ``size`` square with edge replication.

    Equal to ``maximum_filter(mask.astype(bool), size)``.

    Parameters
    ----------
    mask : numpy.ndarray
        Array of shape ``(..., y, x)``; nonzero counts as True.
    size : int
        Odd side of the square footprint; 1 returns a copy.

    Returns
    -------
    numpy.ndarray
        Boolean array of the same shape.

    Examples
    --------
    >>> m = np.zeros((5, 5), bool); m[2, 2] = True
    >>> binary_dilation(m, 3).sum()
    np.int64(9)
    """
    return maximum_filter(_as_bool(mask, "binary_dilation"), size)


def dilated_at(mask: np.ndarray, indices: np.ndarray, size: int) -> np.ndarray:
    """``binary_dilation(mask, size)`` at the flat ``indices`` of a 2-D mask only.

    Read from a summed-area table (``cv2.integral``): whether the ``size`` x ``size`` square
    around each pixel, clipped at the edges, holds a True pixel. For a few pixels and a wide
    square this costs a fraction of the whole dilation.

    Examples
    --------
    >>> m = np.zeros((5, 5), bool); m[0, 0] = True
    >>> dilated_at(m, np.array([6, 12]), 3)
    array([ True, False])
    """
    size = check_size(size, name="dilation size")
    array = _as_bool(mask, "dilated_at")
    if array.ndim != 2:
        raise ParameterError(f"dilated_at needs a 2-D mask, got shape {array.shape}")
    height, width = array.shape
    positions = np.asarray(indices, dtype=np.int64)
    if positions.size == 0:
        return np.zeros(0, dtype=bool)
    if positions.min() < 0 or positions.max() >= array.size:
        raise ParameterError(f"dilated_at: flat indices must lie in [0, {array.size})")
    table = cv2.integral(np.ascontiguousarray(array).view(np.uint8), sdepth=cv2.CV_32S)
    rows, columns = np.divmod(positions, width)
    radius = size // 2
    top, bottom = np.maximum(rows - radius, 0), np.minimum(rows + radius + 1, height)
    left, right = np.maximum(columns - radius, 0), np.minimum(columns + radius + 1, width)
    total = table[bottom, right] - table[top, right] - table[bottom, left] + table[top, left]
    return np.asarray(total > 0)


def binary_opening(mask: np.ndarray, size: int) -> np.ndarray:
    """Open a boolean mask: erosion then dilation, each with edge replication.

    Removes objects (and parts) narrower than ``size``.

    Parameters
    ----------
    mask : numpy.ndarray
        Array of shape ``(..., y, x)``; nonzero counts as True.
    size : int
        Odd side of the square footprint; 1 returns a copy.

    Returns
    -------
    numpy.ndarray
        Boolean array of the same shape.

    Examples
    --------
    >>> m = np.zeros((7, 7), bool); m[1:4, 1:4] = True; m[5, 5] = True
    >>> int(binary_opening(m, 3).sum())
    9
    """
    return binary_dilation(binary_erosion(mask, size), size)


def binary_closing(mask: np.ndarray, size: int) -> np.ndarray:
    """Close a boolean mask: dilation then erosion, each with edge replication.

    Fills holes and gaps narrower than ``size``.

    Parameters
    ----------
    mask : numpy.ndarray
        Array of shape ``(..., y, x)``; nonzero counts as True.
    size : int
        Odd side of the square footprint; 1 returns a copy.

    Returns
    -------
    numpy.ndarray
        Boolean array of the same shape.

    Examples
    --------
    >>> m = np.ones((5, 5), bool); m[2, 2] = False
    >>> bool(binary_closing(m, 3).all())
    True
    """
    return binary_erosion(binary_dilation(mask, size), size)


_CONNECTIVITIES = (4, 8)


def _raster_starts(mask: np.ndarray, connectivity: int) -> np.ndarray:
    """Pixels that may be the first of their component in raster order.

    A component's first pixel has no foreground neighbour already visited (left, and the row
    above); every such pixel qualifies, so the set is small but always contains each first pixel.
    """
    visited = np.zeros(mask.shape, dtype=bool)
    visited[:, 1:] |= mask[:, :-1]
    visited[1:, :] |= mask[:-1, :]
    if connectivity == 8:
        visited[1:, 1:] |= mask[:-1, :-1]
        visited[1:, :-1] |= mask[:-1, 1:]
    return mask & ~visited


def _foreground(mask: np.ndarray, connectivity: int, caller: str) -> np.ndarray:
    """The mask as a contiguous bool array, after checking its shape and the connectivity."""
    if connectivity not in _CONNECTIVITIES:
        raise ParameterError(
            f"connectivity must be 4 or 8, got {connectivity!r}; use 8 to join diagonal "
            f"neighbours or 4 for edge neighbours only"
        )
    array = np.asarray(mask)
    if array.ndim != 2:
        raise ParameterError(
            f"{caller} needs a 2-D mask (y, x), got shape {array.shape}; label each time step "
            f"separately"
        )
    return np.ascontiguousarray(array if array.dtype == np.bool_ else array != 0)


# Foreground pixels per tile below which components() skips OpenCV's statistics pass (1 in N).
SPARSE_COMPONENTS_SHARE = 64


def components(mask: np.ndarray, *, connectivity: int = 8) -> tuple[np.ndarray, int, np.ndarray]:
    """Connected components in any numbering, with the extent of each one's bounding box.

    The components are scipy's (``scipy.ndimage.label``), numbered 1..n in no particular order;
    ``extents[i]`` is the longer side of component ``i``'s bounding box (``extents[0]`` is the
    background's). For callers that only need the partition: OpenCV's block-based algorithm with
    statistics takes half the time of :func:`label` plus ``scipy.ndimage.find_objects``.

    Returns
    -------
    labels : numpy.ndarray
        int32 array of the mask's shape, 0 on the background.
    count : int
        Number of components.
    extents : numpy.ndarray
        int32 ``(count + 1,)``.

    Examples
    --------
    >>> labels, count, extents = components(np.array([[1, 1, 0], [0, 0, 0], [0, 0, 1]]))
    >>> count, sorted(extents[1:].tolist())
    (2, [1, 2])
    """
    foreground = _foreground(mask, connectivity, "components")
    if foreground.size == 0:
        return np.zeros(foreground.shape, dtype=np.int32), 0, np.zeros(1, dtype=np.int32)
    members = np.flatnonzero(foreground)
    if members.size * SPARSE_COMPONENTS_SHARE > foreground.size:
        total, labels, stats, _ = cv2.connectedComponentsWithStatsWithAlgorithm(
            foreground.view(np.uint8), connectivity, cv2.CV_32S, cv2.CCL_BBDT
        )
        extents = np.maximum(stats[:, cv2.CC_STAT_WIDTH], stats[:, cv2.CC_STAT_HEIGHT])
        extents[0] = 0
        return np.asarray(labels, dtype=np.int32), int(total) - 1, extents.astype(np.int32)
    # Sparse masks: OpenCV's statistics pass over every pixel costs more than the labelling;
    # the bounding boxes from the foreground pixels alone.
    total, found = cv2.connectedComponentsWithAlgorithm(
        foreground.view(np.uint8), connectivity, cv2.CV_32S, cv2.CCL_BBDT
    )
    numbered = np.asarray(found, dtype=np.int32)
    member_labels = numbered.reshape(-1)[members]
    extents = np.zeros(int(total), dtype=np.int32)
    for coordinate in np.divmod(members, foreground.shape[1]):
        lowest = np.full(int(total), np.iinfo(np.intp).max, dtype=np.intp)
        highest = np.full(int(total), -1, dtype=np.intp)
        np.minimum.at(lowest, member_labels, coordinate)
        np.maximum.at(highest, member_labels, coordinate)
        side = (highest - lowest + 1)[1:]
        np.maximum(extents[1:], side, out=extents[1:])
    return numbered, int(total) - 1, extents


def label(mask: np.ndarray, *, connectivity: int = 8) -> tuple[np.ndarray, int]:
    """Label connected components of a 2-D mask, numbered as scipy numbers them.

    Labels are equal (not just up to renumbering) to ``scipy.ndimage.label(mask != 0,
    structure=s)`` with ``s = np.ones((3, 3))`` for 8-connectivity or the cross for 4: background
    is 0 and components are numbered 1..n in the raster order of their first pixel. OpenCV's SAUF
    algorithm, which is 2-4x faster than scipy, already numbers them so; a cheap check on the
    candidate first pixels confirms it for every call and relabels if it ever does not.

    Parameters
    ----------
    mask : numpy.ndarray
        2-D array; nonzero counts as foreground.
    connectivity : {8, 4}
        8 joins diagonal neighbours, 4 only edge neighbours.

    Returns
    -------
    labels : numpy.ndarray
        int32 array of the mask's shape.
    count : int
        Number of components.

    Examples
    --------
    >>> labels, count = label(np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]]))
    >>> count
    1
    >>> label(np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]]), connectivity=4)[1]
    3
    """
    foreground = _foreground(mask, connectivity, "label")
    if foreground.size == 0:
        return np.zeros(foreground.shape, dtype=np.int32), 0
    total, raw = cv2.connectedComponentsWithAlgorithm(
        foreground.view(np.uint8), connectivity, cv2.CV_32S, cv2.CCL_SAUF
    )
    labels = np.asarray(raw, dtype=np.int32)
    count = int(total) - 1
    if count == 0:
        return labels, 0
    # Labels met at candidate first pixels, in raster order; components are in scipy's order iff
    # each label met for the first time is one above the largest met so far.
    starts = _raster_starts(foreground, connectivity)
    met = labels[starts]
    running_max = np.maximum.accumulate(met)
    if met[0] == 1 and not (np.diff(running_max) > 1).any():
        return labels, count
    first = np.full(count + 1, labels.size, dtype=np.int64)
    np.minimum.at(first, met, np.flatnonzero(starts))
    order = np.argsort(first[1:], kind="stable")
    lookup = np.zeros(count + 1, dtype=np.int32)
    lookup[order + 1] = np.arange(1, count + 1, dtype=np.int32)
    return np.take(lookup, labels), count


def block_mean(image: np.ndarray, factor: int) -> np.ndarray:
    """Mean of every ``factor`` x ``factor`` block of a 2-D float32 image.

    The image's sides must be multiples of ``factor``. ``cv2.resize`` with ``INTER_AREA`` at an
    integer factor averages the blocks exactly as this says; blocks are independent, so a block's
    mean does not depend on what surrounds it.

    Examples
    --------
    >>> block_mean(np.arange(16, dtype=np.float32).reshape(4, 4), 2)
    array([[ 2.5,  4.5],
           [10.5, 12.5]], dtype=float32)
    """
    array = np.ascontiguousarray(image, dtype=np.float32)
    height, width = array.shape
    if height % factor or width % factor:
        raise ParameterError(
            f"block_mean needs sides that are multiples of {factor}, got {array.shape}; pad first"
        )
    if factor == 1:
        return array.copy()
    size = (width // factor, height // factor)
    return np.asarray(cv2.resize(array, size, interpolation=cv2.INTER_AREA), dtype=np.float32)


def upsample_linear(image: np.ndarray, factor: int) -> np.ndarray:
    """Bilinear upsampling of a 2-D float32 image by an integer ``factor``, cell centres aligned.

    Output pixel ``i`` samples the input at ``(i + 0.5) / factor - 0.5`` (edges clamped), so the
    value at a pixel depends only on its position within its cell and on the neighbouring cells.

    Examples
    --------
    >>> upsample_linear(np.array([[0.0, 4.0]], dtype=np.float32), 2)
    array([[0., 1., 3., 4.],
           [0., 1., 3., 4.]], dtype=float32)
    """
    array = np.ascontiguousarray(image, dtype=np.float32)
    if factor == 1:
        return array.copy()
    height, width = array.shape
    size = (width * factor, height * factor)
    return np.asarray(cv2.resize(array, size, interpolation=cv2.INTER_LINEAR), dtype=np.float32)
