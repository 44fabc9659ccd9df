"""The only module that knows the order of the stages: stack → reference → detection → products."""

from __future__ import annotations

from typing import Any

import numpy as np
import xarray as xr

from spoc_xr import __version__
from spoc_xr.detect import NOISE_DATES, DetectParams, classify, reference_products
from spoc_xr.errors import InputError, NoDataError, ParameterError
from spoc_xr.products import (
    choose_water_index,
    date_summary,
    heatmap,
    mask_from_codes,
    valid_from_codes,
    water_mask,
)
from spoc_xr.reference import (
    Radiometry,
    build_reference,
    compute_overview,
    parse_reference,
    plan_radiometry,
    temporal_deviation,
)

STACK_DIMS = ("time", "band", "y", "x")


def check_stack(stack: xr.DataArray) -> xr.DataArray:
    """Check that ``stack`` is a ``(time, band, y, x)`` array and return it in that order."""
    if not isinstance(stack, xr.DataArray):
        raise InputError(
            f"expected an xarray.DataArray (time, band, y, x), got {type(stack).__name__}; "
            "open a store with spoc_xr.open_stack"
        )
    if set(stack.dims) != set(STACK_DIMS):
        raise InputError(
            f"stack has dims {stack.dims}, expected {STACK_DIMS}; build it with spoc-xr ingest"
        )
    if stack.sizes["time"] < 1:
        raise InputError("the stack has no date; ingest at least one GeoTIFF")
    if not (np.issubdtype(stack.dtype, np.integer) or np.issubdtype(stack.dtype, np.floating)):
        raise InputError(f"stack dtype {stack.dtype} is not numeric; ingest integer or float data")
    return stack.transpose(*STACK_DIMS)


def annotate(
    stack: xr.DataArray,
    *,
    reference: str = "auto",
    kernel: int = 5,
    threshold: str | float | None = "auto",
    params: DetectParams | None = None,
    overview: np.ndarray | None = None,
) -> xr.Dataset:
    """Annotate a time stack: mask cube, heatmap and reference, as one lazy Dataset.

    Only the small overview (at most 512 × 512 pixels per date) is read to choose the reference and
    fit each date's radiometry; everything else stays a Dask graph, computed when written.

    Parameters
    ----------
    stack : xarray.DataArray
        ``(time, band, y, x)`` raw values (e.g. from :func:`spoc_xr.open_stack`).
    reference : str
        ``"auto"`` (cleanest date), ``"median"`` (per-pixel temporal median) or a date.
    kernel : int
        Side of the k×k median filter (odd).
    threshold : "auto" or float
        Change threshold in noise scales.
    params : DetectParams, optional
        Full parameter set; overrides ``kernel`` and ``threshold`` when given.
    overview : numpy.ndarray, optional
        Precomputed overview (see :func:`spoc_xr.reference.compute_overview`).

    Returns
    -------
    xarray.Dataset
        ``mask`` (time, y, x) uint8, ``valid`` (time, y, x) uint8, ``heatmap`` (y, x) uint16,
        ``reference`` (band, y, x) float32, ``water`` (y, x) uint8 and per-date fractions.

    Examples
    --------
    >>> stack = spoc_xr.open_stack("stack.zarr")  # doctest: +SKIP
    >>> result = spoc_xr.annotate(stack, reference="median")  # doctest: +SKIP
    >>> result.heatmap.plot()  # doctest: +SKIP
    """
    stack = check_stack(stack)
    from spoc_xr.detect import parse_threshold

    if params is None:
        params = DetectParams(kernel=kernel, threshold=parse_threshold(threshold))
    params.check_against((stack.sizes["y"], stack.sizes["x"]))
    if not isinstance(reference, str):
        raise ParameterError(f"reference {reference!r} must be 'auto', 'median' or a date string")
    choice = parse_reference(reference, stack.time)
    if stack.chunks is None:
        stack = stack.chunk({"time": 1})
    if overview is None:
        overview = compute_overview(stack)
    radiometry = plan_radiometry(overview, choice)
    return build_annotations(stack, radiometry, params)


def build_annotations(
    stack: xr.DataArray, radiometry: Radiometry, params: DetectParams
) -> xr.Dataset:
    """Lazy annotation Dataset once the radiometry is known (computes nothing)."""
    ref = build_reference(stack, radiometry)
    if (
        radiometry.reference_index is not None
        and radiometry.valid_fraction[radiometry.reference_index] == 0
    ):
        raise NoDataError("the reference date holds no valid pixel; pick another reference")
    spread = temporal_deviation(stack, ref, radiometry, max_dates=NOISE_DATES)
    products = reference_products(ref, spread, params)
    codes = classify(stack, products, radiometry.gains, radiometry.offsets, params)
    codes = codes.chunk(_output_chunks(stack))
    index = choose_water_index([str(b) for b in stack.band.values])
    water = water_mask(products["smooth"], index).chunk(_output_chunks(stack, time=False))
    summary = date_summary(codes)
    result = xr.Dataset(
        {
            "mask": mask_from_codes(codes),
            "valid": valid_from_codes(codes),
            "heatmap": heatmap(codes, water),
            "reference": ref.astype(np.float32).chunk(_output_chunks(stack, time=False)),
            "water": water.astype(np.uint8),
            **summary.data_vars,
        }
    )
    result["heatmap"].attrs["water_index"] = index.describe()
    result["water"].attrs = {"long_name": "water (widened by 2 px for quays)", "index": index.name}
    result["reference"].attrs = {
        "long_name": "clean image every date was compared with (reference radiometry)",
        "method": radiometry.reference,
        **(
            {"date": str(stack.time.values[radiometry.reference_index])[:19]}
            if radiometry.reference_index is not None
            else {}
        ),
    }
    result = result.assign_coords(time=stack.time, y=stack.y, x=stack.x)
    if "spatial_ref" in stack.coords:
        result = result.assign_coords(spatial_ref=stack.coords["spatial_ref"])
        for name in ("mask", "valid", "heatmap", "reference", "water"):
            result[name].attrs["grid_mapping"] = "spatial_ref"
    result.attrs = {
        "spoc_xr": {
            "version": __version__,
            "kind": "annotations",
            "parameters": params.as_attrs(),
            "reference": radiometry.reference,
            "reference_index": radiometry.reference_index,
            "water_index": index.name,
            "water_index_description": index.describe(),
            "notes": list(radiometry.notes),
            "dates": [str(t)[:19] for t in stack.time.values],
        }
    }
    result["gain"] = (("time", "band"), radiometry.gains.astype(np.float32))
    result["offset"] = (("time", "band"), radiometry.offsets.astype(np.float32))
    result = result.assign_coords(band=stack.band)
    return result


def _output_chunks(stack: xr.DataArray, *, time: bool = True) -> dict[str, Any]:
    chunks = stack.chunksizes
    spatial = {"y": chunks["y"][0], "x": chunks["x"][0]} if chunks else {"y": -1, "x": -1}
    return {"time": 1, **spatial} if time else spatial
