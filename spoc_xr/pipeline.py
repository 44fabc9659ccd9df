"""The only module that knows the order of the stages: stack → reference → detection → products."""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import pandas as pd
import xarray as xr
import xarray.ufuncs as xu
import zarr
from dask._task_spec import convert_legacy_graph, cull
from dask.base import tokenize
from dask.core import flatten
from dask.highlevelgraph import HighLevelGraph

from spoc_xr import __version__, kernels
from spoc_xr.detect import (
    DEFAULT_TOLERANCE,
    MAX_REALIGN,
    NOISE_DATES,
    NOISE_FLOOR_SHARE,
    OBJECT_REACH,
    REALIGN_FROM,
    DetectParams,
    classification_chunks,
    classify,
    kept_medians,
    noise_floor,
    noise_sample_objects,
    pad_and_overlap,
    per_date_levels,
    pixel_size_note,
    reference_products,
    sample_departures,
    spatial_chunks,
    whole_pixel_shift,
)
from spoc_xr.errors import (
    InputError,
    NoDataError,
    OutputError,
    ParameterError,
    SpocError,
    StoreError,
)
from spoc_xr.ingest import pixel_metres
from spoc_xr.products import (
    WaterIndex,
    choose_water_index,
    date_summary,
    heatmap,
    mask_from_codes,
    second_index_band,
    stored_date_summary,
    uncover_water_values,
    valid_from_codes,
    water_mask,
    water_threshold,
)
from spoc_xr.reference import (
    MAX_SAMPLE_DIRT,
    MIN_CLEANING_DATES,
    MISREGISTRATION,
    OVERVIEW_SIDE,
    QUANTISATION_SIGMA,
    SHIFT_AXES,
    Radiometry,
    ReferenceArgument,
    build_reference,
    clean_date_values,
    compute_overview,
    date_shifts,
    fit_composite,
    nanmiddle_pair,
    noise_sample_indices,
    normalise_values,
    outlier_limits,
    overview_stride,
    parse_reference,
    plan_radiometry,
    reference_ceilings,
    reference_text,
    saturation_levels,
    valid_pixels,
)

STACK_DIMS = ("time", "band", "y", "x")
#: Below this many dates a run says that its results are weaker (a probe: 3 dates missed a
#: whole cloud and the reference date's boats, 4 dates found them: IoU 0.98, recall 0.98).
FEW_DATES = 4
#: With fewer clean dates than this for the noise model (:func:`noise_sample_indices`), a run
#: says that its masks are weaker: the semi-real ports built with 6 dates (at most 5 noise dates)
#: scored boat F1 0.52-0.96 where 12 dates scored 0.90-0.999 (session 30, benchmarks/HISTORY.md).
FEW_NOISE_DATES = 6


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
    times = pd.Index(stack.time.values)
    repeated = times[times.duplicated()].unique()
    if repeated.size:
        # Two images of one time stamp would be compared as two dates (ingest refuses them too).
        raise InputError(
            f"the stack holds {repeated.size} time stamp(s) more than once (first "
            f"{str(repeated[0])[:19]}); keep one image per date, e.g. "
            "stack.drop_duplicates('time')"
        )
    return stack.transpose(*STACK_DIMS)


def annotate(
    stack: xr.DataArray,
    *,
    reference: ReferenceArgument = "auto",
    kernel: int = 5,
    threshold: str | float | None = "auto",
    params: DetectParams | None = None,
    overview: np.ndarray | None = None,
) -> xr.Dataset:
    """Annotate a time stack: mask cube, heatmap and reference, as one lazy Dataset.

    Only the small overview (at most 256 × 256 pixels per date) is read to choose the reference and
    fit each date's radiometry; everything else stays a Dask graph, computed when written.

    Parameters
    ----------
    stack : xarray.DataArray
        ``(time, band, y, x)`` raw values (e.g. from :func:`spoc_xr.open_stack`).
    reference : str, numpy.datetime64 or datetime
        ``"auto"`` (cleanest date), ``"median"`` (per-pixel temporal median) or a date (a string
        such as ``"2023-05-01"`` or one of the stack's time values).
    kernel : int
        Side of the k×k median filter (odd).
    threshold : "auto" or float
        Change threshold in noise scales.
    params : DetectParams, optional
        Full parameter set; overrides ``kernel`` and ``threshold`` when given.
    overview : numpy.ndarray, optional
        Precomputed overview of the stack as stored (see
        :func:`spoc_xr.reference.compute_overview`, :func:`spoc_xr.ingest.read_overview`);
        ``params.zero_level`` is taken off it as off the stack.

    Returns
    -------
    xarray.Dataset
        ``mask`` (time, y, x) uint8, ``valid`` (time, y, x) uint8, ``heatmap`` (y, x) uint16,
        ``reference`` (band, y, x) float32, ``water`` (y, x) uint8, per-date fractions and
        ``misregistration`` (time, axis) float32, each date's measured shift in pixels.

    Examples
    --------
    >>> stack = spoc_xr.open_stack("stack.zarr")  # doctest: +SKIP
    >>> result = spoc_xr.annotate(stack, reference="median")  # doctest: +SKIP
    >>> result.heatmap.plot()  # doctest: +SKIP
    """
    stack, radiometry, params = plan_annotation(
        stack,
        reference=reference,
        kernel=kernel,
        threshold=threshold,
        params=params,
        overview=overview,
    )
    return build_annotations(stack, radiometry, params)


def check_annotation_parameters(
    stack: xr.DataArray,
    *,
    reference: ReferenceArgument = "auto",
    kernel: int = 5,
    threshold: str | float | None = "auto",
    params: DetectParams | None = None,
) -> tuple[xr.DataArray, DetectParams]:
    """Check a stack and the annotation parameters without reading any pixel."""
    stack = check_stack(stack)
    from spoc_xr.detect import parse_threshold

    if stack.sizes["time"] < 2:
        # One date has nothing to be compared with: every pixel would come out "clear".
        raise InputError(
            f"the stack holds {stack.sizes['time']} date; annotating needs at least 2 dates of "
            "the same place (add dates with spoc-xr ingest --append)"
        )
    if params is None:
        params = DetectParams(kernel=kernel, threshold=parse_threshold(threshold))
    params.check_against((stack.sizes["y"], stack.sizes["x"]))
    parse_reference(reference, stack.time)
    if stack.chunks is None:
        stack = stack.chunk({"time": 1})
    return above_zero_level(stack, params.zero_levels), params


def above_zero_level(stack: xr.DataArray, zero_level: Sequence[float]) -> xr.DataArray:
    """``stack`` less its zero level (see :class:`DetectParams`), lazily: float32, NaN where
    the stack is invalid (its nodata value no longer applies); the stack itself without one.

    Examples
    --------
    >>> stack = xr.DataArray(np.full((1, 2, 1, 1), 1500, np.uint16), dims=STACK_DIMS)
    >>> above_zero_level(stack, [1000.0]).values.ravel().tolist()
    [500.0, 500.0]
    """
    if not zero_level or stack.attrs.get(ZERO_LEVEL_ATTR) is not None:
        return stack
    n_band = stack.sizes["band"]
    if len(zero_level) not in (1, n_band):
        raise ParameterError(
            f"zero_level gives {len(zero_level)} values for {n_band} bands "
            f"({', '.join(str(b) for b in stack.band.values)}); give one for every band or one "
            "per band"
        )
    levels = np.broadcast_to(np.asarray(zero_level, dtype=np.float32), (n_band,))
    shifted = (stack.astype(np.float32) - xr.DataArray(levels, dims="band")).where(
        valid_pixels(stack)
    )
    shifted.attrs = {key: value for key, value in stack.attrs.items() if key != "nodata"}
    # Planning checks its stack again: what was taken off once is not taken off twice.
    shifted.attrs[ZERO_LEVEL_ATTR] = levels.tolist()
    return shifted.transpose(*STACK_DIMS)


#: Attribute of a stack whose zero level :func:`above_zero_level` took off.
ZERO_LEVEL_ATTR = "zero_level_taken_off"


def plan_annotation(
    stack: xr.DataArray,
    *,
    reference: ReferenceArgument = "auto",
    kernel: int = 5,
    threshold: str | float | None = "auto",
    params: DetectParams | None = None,
    overview: np.ndarray | None = None,
) -> tuple[xr.DataArray, Radiometry, DetectParams]:
    """Check the inputs, read the overview and fit the radiometry (the only eager step)."""
    stack, params = check_annotation_parameters(
        stack, reference=reference, kernel=kernel, threshold=threshold, params=params
    )
    choice = parse_reference(reference, stack.time)
    if overview is None:
        overview = compute_overview(stack)
    else:
        check_overview(overview, stack)
        if params.zero_levels:
            # The stored overview holds the stack's values as stored, NaN where invalid.
            levels = np.asarray(params.zero_levels, dtype=np.float32)
            overview = np.asarray(overview, dtype=np.float32) - levels[None, :, None, None]
    saturation = saturation_levels(overview)
    fitted = fit_composite(overview, ceilings=saturation)
    radiometry = plan_radiometry(overview, choice, fitted, saturation)
    cut = water_threshold(fitted.composite, [str(b) for b in stack.band.values])
    size_note = pixel_size_note(pixel_metres(stack), params)
    notes = radiometry.notes + ([size_note] if size_note else [])
    notes += missing_band_notes(overview, stack)
    notes += categorical_band_notes([str(band) for band in stack.band.values])
    notes += nodata_inside_notes(overview, stack)
    notes += saturation_notes(saturation, overview, stack)
    notes += few_dates_notes(stack.sizes["time"], radiometry)
    return stack, replace(radiometry, water_threshold=cut, notes=notes), params


def few_dates_notes(n_time: int, radiometry: Radiometry) -> list[str]:
    """Notes for a stack too short for the reference and noise model to be reliable.

    Examples
    --------
    >>> rad = Radiometry("date", 0, np.ones((5, 1)), np.zeros((5, 1)), np.ones(5),
    ...                  np.array([0.0, 0.1, 0.9, 0.2, 0.1]), [])
    >>> print(few_dates_notes(5, rad)[0][:60])
    only 3 of 5 dates are clean enough for the noise model (at m
    """
    if n_time < FEW_DATES:
        return [
            f"only {n_time} dates: each date's clouds and objects weigh on the "
            "reference and the noise model that it is compared with (a probe's 3-date stack "
            f"missed a whole cloud); {FEW_DATES} dates or more "
            "annotate as the tables in the README were measured"
        ]
    clean = noise_sample_indices(radiometry, NOISE_DATES, min_dates=0)
    if len(clean) >= FEW_NOISE_DATES:
        return []
    return [
        f"only {len(clean)} of {n_time} dates are clean enough for the noise model (at most "
        f"{MAX_SAMPLE_DIRT:.0%} changed): with few of them hazy dates and ships moored on most "
        "dates weigh on it, and boats are missed (semi-real ports of 6 dates: boat F1 0.52-0.96, "
        f"0.90-0.999 with 12); add dates where the archive has them ({FEW_NOISE_DATES + 1} "
        "or more with little cloud)"
    ]


def saturation_notes(
    saturation: np.ndarray, overview: np.ndarray, stack: xr.DataArray
) -> list[str]:
    """A note naming the bands that clipped (:func:`spoc_xr.reference.saturation_levels`), with
    the share of the overview's valid pixels at the ceiling."""
    clipped = []
    for band, level, values in zip(
        stack.band.values, saturation, np.asarray(overview).swapaxes(0, 1), strict=True
    ):
        if np.isfinite(level):
            values = values[np.isfinite(values)]
            clipped.append(
                f"{band} at {level:g} ({np.count_nonzero(values == level) / values.size:.1%})"
            )
    if not clipped:
        return []
    return [
        f"band(s) {', '.join(clipped)} clipped (saturated); a clipped value only says the "
        "truth was at least that: no fall is read from a date where it is clipped, no rise "
        "where the reference is, so changes there can be missed (a product that does not clip, "
        "such as 16-bit surface reflectance instead of 8-bit true colour, avoids it)"
    ]


def clipping_ceilings(radiometry: Radiometry) -> tuple[np.ndarray, np.ndarray] | None:
    """The stack's and the reference's ceilings ``(band,)`` for :func:`spoc_xr.detect.classify`,
    None where no band clipped."""
    saturation = radiometry.saturation
    if saturation is None or not np.isfinite(saturation).any():
        return None
    return saturation.astype(np.float32), reference_ceilings(radiometry)


def check_overview(overview: np.ndarray, stack: xr.DataArray) -> None:
    """Refuse an overview that was not made for ``stack``'s dates and bands."""
    shape = np.shape(overview)
    wanted = (stack.sizes["time"], stack.sizes["band"])
    if len(shape) != 4 or tuple(shape[:2]) != wanted:
        raise ParameterError(
            f"the overview given holds {shape[:2] if len(shape) == 4 else shape} (dates, bands) "
            f"but the stack {wanted}: pass read_overview(store, stack) for this very stack (a "
            "selection of the store's dates included), or no overview"
        )


#: Band names of classifications and quality flags (Sentinel-2's SCL and cloud/snow
#: probabilities, Landsat's QA bands, Fmask): codes, not reflectance, whose flips between dates
#: detection would take for objects (a probe: an SCL band added 7-17 false small pixels a date).
CATEGORICAL_BAND = re.compile(
    r"^(scl|fmask|classification|class|qa|qa_.*|.*_qa|.*_qa_.*|.*mask.*|msk_.*|.*cldprb|.*snwprb)$",
    re.IGNORECASE,
)


def categorical_band_notes(bands: Sequence[str]) -> list[str]:
    """A note naming the bands that look like classifications or quality flags.

    Examples
    --------
    >>> categorical_band_notes(["B02", "B08", "SCL", "QA_PIXEL"])[0][:34]
    'band(s) SCL, QA_PIXEL look like cl'
    >>> categorical_band_notes(["B02", "B8A", "red", "swir1"])
    []
    """
    flagged = [band for band in bands if CATEGORICAL_BAND.match(band.strip())]
    if not flagged:
        return []
    return [
        f"band(s) {', '.join(flagged)} look like classification or quality bands; detection "
        "compares every band as reflectance, so their changes of class become objects: "
        "annotate the stack without them (stack.drop_sel(band=[...]) in Python, or ingest "
        "files without them, e.g. gdal_translate -b)"
    ]


#: A nodata value with at least this share of a band's valid overview pixels on either side of
#: it lies inside the band's values.
NODATA_INSIDE_SHARE = 0.01


def nodata_inside_notes(overview: np.ndarray, stack: xr.DataArray) -> list[str]:
    """A note when the stack's nodata value lies inside a band's values: pixels that read it are
    taken as missing, and a stack scaled after it was opened keeps a nodata attribute that no
    longer marks its missing pixels (a probe: ``stack * 1e-4 - 0.1`` took its old fill for
    valid data and every pixel that became 0.0 for missing).

    Examples
    --------
    >>> values = np.linspace(-0.05, 0.3, 64, dtype=np.float32).reshape(1, 1, 8, 8)
    >>> stack = xr.DataArray(values, dims=STACK_DIMS, coords={"band": ["nir"]}, attrs={"nodata": 0})
    >>> nodata_inside_notes(values, stack)[0][:44]
    'the stack declares nodata 0, inside band nir'
    """
    nodata = stack.attrs.get("nodata")
    if nodata is None or not np.isfinite(nodata):
        return []
    inside = []
    for band, values in zip(stack.band.values, np.asarray(overview).swapaxes(0, 1), strict=True):
        values = values[np.isfinite(values)]
        if values.size == 0:
            continue
        below = np.count_nonzero(values < nodata) / values.size
        above = np.count_nonzero(values > nodata) / values.size
        if min(below, above) >= NODATA_INSIDE_SHARE:
            inside.append(f"{band} ({below:.0%} of its values below it)")
    if not inside:
        return []
    return [
        f"the stack declares nodata {nodata:g}, inside band {', '.join(inside)}: pixels that "
        "read it are taken as missing; if the stack was scaled or offset after it was opened, "
        "its attrs['nodata'] no longer marks the missing pixels: mask them before scaling "
        "(stack.where(stack != stack.attrs['nodata'])) and drop the attribute"
    ]


def missing_band_notes(overview: np.ndarray, stack: xr.DataArray) -> list[str]:
    """A note per date without a valid pixel whose raw bands hold data in some bands but none in
    others: a pixel needs every band, so such a date is not annotated, and "no valid data" alone
    would not say which band is missing. Only those dates are read, on a sparse grid of pixels
    (the overview has no band of an invalid pixel)."""
    empty = np.flatnonzero(~np.isfinite(overview).all(axis=1).any(axis=(1, 2)))
    if not empty.size:
        return []
    stride = overview_stride((stack.sizes["y"], stack.sizes["x"]), OVERVIEW_SIDE // 4)
    sample = stack.isel(time=empty, y=slice(None, None, stride), x=slice(None, None, stride))
    raw = np.asarray(sample.transpose("time", "band", "y", "x").values)
    seen: np.ndarray = np.isfinite(raw) if raw.dtype.kind == "f" else np.ones(raw.shape, bool)
    nodata = stack.attrs.get("nodata")
    if nodata is not None and not np.isnan(nodata):
        seen &= raw != nodata
    band_seen = np.any(seen, axis=(2, 3))  # (empty date, band)
    notes = []
    for row in np.flatnonzero(band_seen.any(axis=1) & ~band_seen.all(axis=1)):
        t = empty[row]
        missing = [str(stack.band.values[b]) for b in np.flatnonzero(~band_seen[row])]
        notes.append(
            f"date {str(stack.time.values[t])[:19]}: band(s) {', '.join(missing)} hold no valid "
            "data while the others do; a pixel needs every band, so the date is not annotated: "
            "export that date again with every band, or leave the band out of every file"
        )
    return notes


def shift_notes(annotations: xr.Dataset) -> list[str]:
    """Notes on the dates that detection realigned by whole pixels
    (:func:`spoc_xr.detect.whole_pixel_shift`), and on those measured further off than it
    realigns, from the stored ``misregistration``."""
    if MISREGISTRATION not in annotations:
        return []
    shifts = np.asarray(annotations[MISREGISTRATION].values, dtype=np.float64)
    realigned = np.array([whole_pixel_shift(shift) != (0, 0) for shift in shifts], dtype=bool)
    size = np.where(np.isfinite(shifts), np.abs(shifts), 0.0).max(axis=1)
    labels = [str(time)[:19] for time in annotations.time.values]
    notes = []
    if realigned.any():
        moved = np.flatnonzero(realigned)
        notes.append(
            f"{moved.size} date(s) shifted by {REALIGN_FROM:g} px or more against the reference "
            f"were compared with it moved by whole pixels (first: {labels[moved[0]]}, largest "
            f"{size[moved].max():.1f} px; misregistration holds each date's shift); the pixels "
            "at the image's edge that the reference never saw are not valid there"
        )
    # Off by REALIGN_FROM or more, yet not realigned: beyond MAX_REALIGN.
    beyond = np.flatnonzero((size >= REALIGN_FROM) & ~realigned)
    if beyond.size:
        named = ", ".join(f"{labels[t]} ({size[t]:.1f} px)" for t in beyond[:5])
        more = ", ..." if beyond.size > 5 else ""
        notes.append(
            f"{beyond.size} date(s) measured further off than the {MAX_REALIGN} px that "
            f"detection realigns were compared in place: {named}{more}; a date mostly under "
            "cloud measures its clouds, not the ground (nothing to do then), but if such a date "
            "is clear, co-register the dates before ingesting"
        )
    return notes


def build_annotations(
    stack: xr.DataArray,
    radiometry: Radiometry,
    params: DetectParams,
    *,
    stored_reference: xr.DataArray | None = None,
    stored_spread: xr.DataArray | None = None,
) -> xr.Dataset:
    """Lazy annotation Dataset once the radiometry is known (computes nothing).

    ``stored_reference`` and ``stored_spread`` (``(band, y, x)``, as written in an annotation
    store) replace the reference and noise model built from ``stack``: resumed and appended runs
    compare new dates with exactly what the old dates were compared with.
    """
    if (
        radiometry.reference_index is not None
        and radiometry.valid_fraction[radiometry.reference_index] == 0
    ):
        raise NoDataError("the reference date holds no valid pixel; pick another reference")
    index = choose_water_index([str(b) for b in stack.band.values], radiometry.water_threshold)
    if stored_reference is None or stored_spread is None:
        ref, spread = reference_and_spread(stack, radiometry, params.tolerance)
    else:
        ref, spread = stored_reference, stored_spread
    products = reference_products(ref, spread, params)
    # One graph for both: the classification reads the same shift tasks the output stores.
    shifts = date_shifts(stack, ref, radiometry)
    water = _water(products["smooth"], radiometry, index)
    codes = classify(
        stack,
        products,
        radiometry.gains,
        radiometry.offsets,
        params,
        radiometry.brightness,
        shifts=shifts,
        # Without a water index every pixel counts as water (for the heatmap): sea clutter
        # would then be dropped on land too (cars in a car park).
        water=water if index.available else None,
        ceilings=clipping_ceilings(radiometry),
    )
    codes = _on_output_grid(codes, stack)
    water = water.chunk({dim: codes.chunksizes[dim] for dim in ("y", "x")})
    summary = date_summary(codes)
    result = xr.Dataset(
        {
            "mask": mask_from_codes(codes),
            "valid": valid_from_codes(codes),
            "heatmap": heatmap(codes, water),
            "reference": ref.astype(np.float32).chunk(_output_chunks(stack, time=False)),
            "spread": spread.astype(np.float32).chunk(_output_chunks(stack, time=False)),
            "water": water.astype(np.uint8),
            MISREGISTRATION: misregistration_variable(shifts),
            **summary.data_vars,
        }
    )
    stored_chunks = _output_chunks(stack)
    for name in ("mask", "valid", "heatmap", "water"):
        dims = result[name].dims
        result[name].encoding["chunks"] = tuple(stored_chunks[str(dim)] for dim in dims)
    result["heatmap"].attrs["water_index"] = index.describe()
    result["water"].attrs = {"long_name": "water, from the smoothed reference", "index": index.name}
    result["reference"].attrs = {
        "long_name": "clean image every date was compared with (reference radiometry)",
        "method": radiometry.reference,
        **(
            {"date": str(stack.time.values[radiometry.reference_index])[:19]}
            if radiometry.reference_index is not None
            else {}
        ),
    }
    result["spread"].attrs = {
        "long_name": "robust spread of the normalised dates around the reference (noise model)"
    }
    result = result.assign_coords(time=stack.time, y=stack.y, x=stack.x)
    if "spatial_ref" in stack.coords:
        result = result.assign_coords(spatial_ref=stack.coords["spatial_ref"])
        for name in ("mask", "valid", "heatmap", "reference", "spread", "water"):
            result[name].attrs["grid_mapping"] = "spatial_ref"
    result.attrs = {
        "spoc_xr": {
            "version": __version__,
            "kind": "annotations",
            "parameters": params.as_attrs(),
            "reference": radiometry.reference,
            "reference_index": radiometry.reference_index,
            "reference_choice": radiometry.choice,
            "water_index": index.name,
            "water_index_description": index.describe(),
            "notes": list(radiometry.notes),
            # What a resumed run needs to rebuild the same reference and noise model.
            "overview_valid_fraction": [float(v) for v in radiometry.valid_fraction],
            "overview_change_fraction": [float(v) for v in radiometry.change_fraction],
            "residual_scale": None
            if radiometry.residual_scale is None
            else [float(v) for v in radiometry.residual_scale],
            "overview_brightness": brightness_attr(radiometry.brightness),
            # Where each band clipped (None: it did not), for a resumed or appended run.
            "saturation": None
            if radiometry.saturation is None
            else [float(v) if np.isfinite(v) else None for v in radiometry.saturation],
            "water_threshold": radiometry.water_threshold,
            "water_mapping": None
            if radiometry.water_mapping is None
            else [[float(v) for v in part] for part in radiometry.water_mapping],
            "dates": [str(t)[:19] for t in stack.time.values],
        }
    }
    result["gain"] = (("time", "band"), radiometry.gains.astype(np.float32))
    result["offset"] = (("time", "band"), radiometry.offsets.astype(np.float32))
    result = result.assign_coords(band=stack.band)
    return result


def misregistration_variable(shifts: da.Array) -> xr.DataArray:
    """The measured shifts ``(time, 2)`` as the output's ``misregistration`` ``(time, axis)``.

    Named :data:`spoc_xr.reference.MISREGISTRATION` because ``Dataset.shift`` is a method:
    ``result.misregistration`` reads it.
    """
    return xr.DataArray(
        shifts.astype(np.float32),
        dims=("time", "axis"),
        coords={"axis": list(SHIFT_AXES)},
        attrs={
            "long_name": "misregistration of the date against the reference",
            "units": "pixel",
            "description": (
                "the date looks like the reference moved by (y, x) px: a positive y brought its "
                "content from the rows above, a positive x from the columns to the left; "
                "NaN where it could not be measured (too few usable, agreeing windows)"
            ),
        },
    )


def reference_and_spread(
    stack: xr.DataArray, radiometry: Radiometry, tolerance: int = DEFAULT_TOLERANCE
) -> tuple[xr.DataArray, xr.DataArray]:
    """Lazy reference and noise model ``(band, y, x)`` float32, in one task per spatial tile.

    Per tile, the NOISE_DATES cleanest dates are read once and normalised; a date reference is
    cleaned of its own transient objects with their median, water hidden by ships moored on most
    dates is put back, and the robust spread of those dates around the result is the noise model,
    each date's objects left out (:func:`spoc_xr.detect.noise_sample_objects`: a ship moored on
    half the dates would otherwise be its own pixels' noise). The noise model is then lowered
    where the reference's ``tolerance`` range explains that spread
    (:func:`range_consistent_spread`): the same task also gives the spread beyond that range. Memory
    per task is bounded by NOISE_DATES, whatever the length of the stack. The uncover test and
    the object test look at the reference's neighbours: tiles carry that context (REFERENCE_HALO,
    OBJECT_REACH and the tolerance's reach), so a chunked result equals the unchunked one.
    :func:`annotate_store` stores the task's three planes (:func:`reference_planes`) before it
    combines them, so that no step holds the whole image.
    """
    base, planes = reference_planes(stack, radiometry, tolerance)
    ref, spread, excess = (base.copy(data=planes[i]) for i in range(3))
    return ref, range_consistent_spread(spread, excess)


def _noise_samples(
    stack: xr.DataArray, radiometry: Radiometry, tolerance: int
) -> tuple[da.Array, list[tuple[int, ...]], list[int], int]:
    """The raw noise-sample dates ``(date, band, y, x)`` in spatial tiles, the tiles' chunks, the
    dates' indices and the reference task's halo."""
    stack = stack.transpose(*STACK_DIMS)
    bands = [str(b) for b in stack.band.values]
    indices = noise_sample_indices(radiometry, NOISE_DATES)
    if not isinstance(stack.data, da.Array):
        stack = stack.chunk({"time": 1})
    # Only the NDWI side of the uncover test looks at neighbours (see uncover_water_values); the
    # test for objects on the sample dates looks OBJECT_REACH px around the final reference's
    # tolerance range.
    index = choose_water_index(bands)
    halo = REFERENCE_HALO if second_index_band(bands, index) is not None else 0
    halo += OBJECT_REACH + tolerance // 2
    spatial = [spatial_chunks(chunks, halo) for chunks in stack.data.chunks[2:]]
    # The noise dates are read under keys of their own: reads shared with the classification
    # would keep those dates in memory from the reference pass until each is classified
    # (measured: 270 MB per worker at 2048², 40 dates).
    source = read_apart(stack.data[indices], seed="noise-samples")
    samples = source.rechunk((-1, -1, *spatial))
    return samples, spatial, indices, halo


def read_apart(array: da.Array, *, seed: str) -> da.Array:
    """``array`` computed by tasks of its own: its graph (culled to it) under new keys.

    Dask keeps a task's result in memory until every task that needs it has run; reads shared by
    two passes over a stack stay in memory from the first pass to the second. A copy under other
    keys reads again instead. ``dask.graph_manipulation.clone`` would do this, but leaves the keys
    inside the graph's ``Task``/``Alias`` nodes unchanged (dask issue 12455: a sliced stack's
    copy then pointed at the original reads, and computing part of a result could fail with
    "Missing dependency"). The renaming uses dask's task nodes (``dask._task_spec``, private in the
    pinned dask; ``tests/test_detect.py`` checks the copy is whole and apart).
    """
    keys = set(flatten(array.__dask_keys__()))
    graph = array.__dask_graph__()
    if isinstance(graph, HighLevelGraph):  # culled by layer: the rest is never materialised
        graph = graph.cull(keys)
    tasks = cull(convert_legacy_graph(dict(graph)), keys)
    suffix = tokenize(seed, array.name)

    def renamed(key: Any) -> Any:
        return (f"{key[0]}-{suffix}", *key[1:]) if isinstance(key, tuple) else f"{key}-{suffix}"

    names = {key: renamed(key) for key in tasks}
    copied = {names[key]: node.substitute(names, key=names[key]) for key, node in tasks.items()}
    return da.Array(copied, renamed(array.name), chunks=array.chunks, meta=array._meta)


def reference_planes(
    stack: xr.DataArray, radiometry: Radiometry, tolerance: int = DEFAULT_TOLERANCE
) -> tuple[xr.DataArray, da.Array]:
    """The reference task's lazy output ``(plane, band, y, x)`` float32 and the base reference
    it is laid out as (see :func:`reference_and_spread`).

    The planes: the reference; the sample dates' robust spread around it (the raw spread); their
    spread beyond its ``tolerance`` range. Objects on the sample dates are left out of both.
    """
    stack = stack.transpose(*STACK_DIMS)
    bands = [str(b) for b in stack.band.values]
    samples, spatial, indices, halo = _noise_samples(stack, radiometry, tolerance)
    date_reference = radiometry.reference_index is not None
    base = build_reference(stack, radiometry).transpose("band", "y", "x")
    base_data = base.data if isinstance(base.data, da.Array) else da.from_array(base.values)
    nodata = stack.attrs.get("nodata")
    # Blocks pair by position: each tile's dates with its padded base; block_info places the
    # tile in the image (the object test's cells are anchored there).
    planes = da.map_blocks(
        _reference_tile,
        pad_and_overlap(samples, halo, [2, 3]),
        pad_and_overlap(base_data.rechunk((-1, *spatial)), halo, [1, 2]),
        chunks=((3,), (len(bands),), *spatial),
        dtype=np.float32,
        meta=np.empty((0, 0, 0, 0), dtype=np.float32),
        halo=halo,
        reach=tolerance // 2,
        gains=radiometry.gains[indices],
        offsets=radiometry.offsets[indices],
        nodata=None if nodata is None else float(nodata),
        scale=radiometry.residual_scale if date_reference else None,
        units=radiometry.residual_scale,
        index=choose_water_index(bands),
        bands=bands,
    )
    return base, planes


def range_consistent_spread(
    spread: xr.DataArray, excess: xr.DataArray, *, floor: xr.DataArray | None = None
) -> xr.DataArray:
    """The noise model, lowered where the tolerance range already explains the dates' spread.

    A date inside the reference's tolerance range scores 0, so the spread that small shifts put
    into the dates at edges (quays, piers: misregistration) is forgiven once by the range; counted
    again in the noise scale it hid boats moored there. Where the spread beyond the range
    (``excess``) is lower, the noise model follows it, but never below half the spread around the
    reference nor below the band's typical spread (calm water keeps its scale).
    Measured on the 8 semi-real ports: real-date recall up on 5 (athens 0.771 -> 0.833).
    ``floor`` is :func:`spoc_xr.detect.noise_floor` of ``spread``, when it is known already.
    """
    floor = noise_floor(spread) if floor is None else floor
    typical = floor / np.float32(NOISE_FLOOR_SHARE)
    share = spread * np.float32(EXCESS_SPREAD_MIN_SHARE)
    lowered = xu.maximum(xu.fmax(excess, typical), share)
    return xu.minimum(spread, lowered).astype(np.float32)


#: The noise model follows the spread beyond the tolerance range down to this share of the spread
#: around the reference (lower let edge flicker through: demo precision 0.004 with no bound).
EXCESS_SPREAD_MIN_SHARE = 0.5


def _reference_range(reference: np.ndarray, reach: int) -> tuple[np.ndarray, np.ndarray]:
    """The reference's range over ``2 reach + 1`` px, exact ``reach`` px inside the edges."""
    # Unknown neighbours do not narrow the range; an unknown pixel stays NaN through the spread.
    unknown = np.isnan(reference)
    size = 2 * reach + 1
    low = kernels.minimum_filter(np.where(unknown, np.float32(np.inf), reference), size)
    high = kernels.maximum_filter(np.where(unknown, np.float32(-np.inf), reference), size)
    return low, high


def _tile_origin(block_info: dict[Any, Any] | None, pad: int) -> tuple[int, int]:
    """Image ``(y, x)`` of a padded tile's first pixel, from the output block's location."""
    if block_info is None:  # called directly, on a whole image
        return (-pad, -pad)
    location = block_info[None]["array-location"]
    return (location[-2][0] - pad, location[-1][0] - pad)


def _sample_objects(
    samples_raw: np.ndarray,
    low: np.ndarray,
    high: np.ndarray,
    gains: np.ndarray,
    offsets: np.ndarray,
    nodata: float | None,
    units: np.ndarray | None,
    origin: tuple[int, int],
) -> np.ndarray | None:
    """Where the padded tile's sample dates hold objects (:func:`noise_sample_objects`), or
    ``None`` without residual scales (stores written before they were kept)."""
    if units is None or samples_raw.shape[0] == 0:
        return None
    departures = sample_departures(
        samples_raw, gains, offsets, nodata, low, high, np.asarray(units)
    )
    return noise_sample_objects(departures, origin)


# Pixels of context of the reference task: the uncover test compares a date with the reference's
# minimum over the detection's misregistration window.
REFERENCE_HALO = DEFAULT_TOLERANCE // 2


def _reference_tile(
    samples_raw: np.ndarray,
    base: np.ndarray,
    *,
    halo: int,
    reach: int,
    units: np.ndarray | None,
    block_info: dict[Any, Any] | None = None,
    **settings: Any,
) -> np.ndarray:
    # The final reference in strips of rows (dates x bands temporaries stay small, in the CPU
    # cache): per pixel but for the uncover test's floor, a minimum over REFERENCE_HALO
    # neighbours (each strip reads that many rows more on each side). Then the objects on the
    # sample dates, which need that reference's range (`reach`) OBJECT_REACH px around, and the
    # spreads without them, around the reference and beyond its range (compiled passes, no
    # dates x bands temporaries). The tile's own `halo` of context is cropped.
    height, width = base.shape[1:]
    uncover = halo - OBJECT_REACH - reach
    reference = np.empty(base.shape, dtype=np.float32)
    for top in range(0, height, REFERENCE_STRIP_ROWS):
        bottom = min(top + REFERENCE_STRIP_ROWS, height)
        first, last = max(top - uncover, 0), min(bottom + uncover, height)
        reference[:, top:bottom] = _reference_strip(
            samples_raw[:, :, first:last],
            base[:, first:last],
            rows=slice(top - first, bottom - first),
            halo=uncover,
            **settings,
        )
    origin = _tile_origin(block_info, halo)
    # Beyond the image the range and the object test see the final reference's edge replicated
    # (np.pad's "edge" of the whole image's reference), not a reference computed from replicated
    # dates.
    image_shape = (
        (height - 2 * halo, width - 2 * halo)
        if block_info is None
        else tuple(block_info[None]["shape"][-2:])
    )
    _replicate_beyond_image(reference, origin, image_shape)
    low, high = _reference_range(reference, reach)
    left_out = _sample_objects(
        samples_raw,
        low,
        high,
        settings["gains"],
        settings["offsets"],
        settings["nodata"],
        units,
        origin,
    )
    core = (slice(None), slice(halo, height - halo), slice(halo, width - halo))
    out = np.empty((3, *reference[core].shape), dtype=np.float32)
    out[0] = reference[core]
    # The spread around the reference, then beyond its range.
    ranges = [(reference[core], reference[core]), (low[core], high[core])]
    for plane, (lower, upper) in enumerate(ranges, start=1):
        out[plane] = kept_medians(
            samples_raw[(slice(None), *core)],
            settings["gains"],
            settings["offsets"],
            settings["nodata"],
            lower,
            upper,
            None if left_out is None else left_out[core],
        )
    if samples_raw.dtype.kind in "iu":
        # Integer data: no spread below the rounding's (QUANTISATION_SIGMA); NaN stays NaN.
        step = np.median(np.asarray(settings["gains"], dtype=np.float32), axis=0)
        floor = (np.float32(QUANTISATION_SIGMA) * step).astype(np.float32)[:, None, None]
        np.maximum(out[1:], floor[None], out=out[1:])
    return out


def _replicate_beyond_image(
    window: np.ndarray, origin: tuple[int, int], image_shape: tuple[int, ...]
) -> None:
    """Overwrite, in place, the rows and columns of a ``(band, y, x)`` window that lie beyond
    the image (``origin``: the image position of its first pixel) with the image's outermost
    ones, rows first (as np.pad, and the halo tasks, replicate)."""
    for axis, (start, size) in enumerate(zip(origin, image_shape, strict=True), start=1):
        length = window.shape[axis]
        before = min(max(-start, 0), length)
        after = min(max(start + length - size, 0), length)
        where: list[slice] = [slice(None)] * window.ndim
        source: list[slice] = [slice(None)] * window.ndim
        if before:
            where[axis], source[axis] = slice(0, before), slice(before, before + 1)
            window[tuple(where)] = window[tuple(source)]
        if after:
            where[axis] = slice(length - after, length)
            source[axis] = slice(length - after - 1, length - after)
            window[tuple(where)] = window[tuple(source)]


# Rows per strip of the reference task (8 dates x 4 bands x 32 rows x 1024 px x 4 B = 4 MB).
REFERENCE_STRIP_ROWS = 32


def _reference_strip(
    samples_raw: np.ndarray,
    base: np.ndarray,
    *,
    rows: slice,
    halo: int,
    gains: np.ndarray,
    offsets: np.ndarray,
    nodata: float | None,
    scale: np.ndarray | None,
    index: WaterIndex,
    bands: list[str],
) -> np.ndarray:
    """The final reference of a strip's ``rows``: cleaned of its own objects, water put back."""
    samples = normalise_values(samples_raw, gains, offsets, nodata)
    reference = base.astype(np.float32)
    # The date's own values count in the uncover test where its objects were cleaned away.
    date, margin = None, None
    if scale is not None and samples.shape[0] >= MIN_CLEANING_DATES:
        reference = clean_date_values(reference, *nanmiddle_pair(samples), scale)
        date = base[:, rows].astype(np.float32)
        margin = outlier_limits(scale)
    floor = None
    if second_index_band(bands, index) is not None:
        # NaN (unknown) neighbours do not lower the floor; an unknown pixel is never uncovered.
        known = np.where(np.isnan(reference), np.float32(np.inf), reference)
        floor = kernels.minimum_filter(known, 2 * halo + 1)[:, rows]
    samples, reference = samples[:, :, rows], reference[:, rows]
    return uncover_water_values(
        reference, samples, index, bands, floor=floor, date=date, margin=margin
    )


def _output_chunks(stack: xr.DataArray, *, time: bool = True) -> dict[str, Any]:
    """Chunks of the output's arrays on disk: the stack's spatial chunks, one date each."""
    chunks = stack.chunksizes
    spatial = (
        {"y": chunks["y"][0], "x": chunks["x"][0]}
        if chunks
        else {"y": stack.sizes["y"], "x": stack.sizes["x"]}
    )
    return {"time": 1, **spatial} if time else spatial


def _on_output_grid(codes: xr.DataArray, stack: xr.DataArray) -> xr.DataArray:
    """``codes`` in chunks that each cover whole Zarr chunks of the output.

    The classification tiles are runs of the stack's chunks: kept as they are, each store task
    writes a tile's Zarr chunks in one call (40 dates of 2048², 1024² chunks: 88 store tasks
    instead of 336, 2.0-2.5 -> 1.3-1.4 thread-seconds). Irregular stack chunks make tiles that
    do not start on the output's chunks: along such an axis the codes are cut to the output's
    chunks.
    """
    from spoc_xr.store import covers_whole_chunks

    stored = _output_chunks(stack)
    chunks = {
        dim: sizes if covers_whole_chunks(sizes, stored[dim]) else stored[dim]
        for dim, sizes in ((dim, codes.chunksizes[dim]) for dim in ("y", "x"))
    }
    return codes.chunk(chunks)


# ---------------------------------------------------------------------------------------------
# Resumable, appendable annotation stores

#: Variables written date by date; the others (reference, spread, water, heatmap and the per-date
#: shares, summed from the stored masks) once per store.
DATE_VARIABLES = ("mask", "valid", MISREGISTRATION)
#: Bytes of reference products (low, high, noise per band, scale; float32, with the tile's halo)
#: that one compute of :func:`annotate_store` may hold: every date of a tile shares them, so a
#: compute over the whole image held them for every tile (1.5 GB per worker and spilling for
#: 4096² on 2 x 2 GB workers). Larger images are written in windows of whole tiles below this.
TILE_GROUP_BYTES = 2**30
#: Dask configuration key overriding :data:`TILE_GROUP_BYTES` (``DASK_SPOC_XR__TILE_GROUP_BYTES``).
TILE_GROUP_CONFIG_KEY = "spoc_xr.tile-group-bytes"


def tile_windows(stack: xr.DataArray, params: DetectParams) -> list[dict[str, slice]]:
    """Chunk-aligned spatial windows whose reference products fit :data:`TILE_GROUP_BYTES`.

    Windows run along rows of tiles (a tile's neighbours in the row share its halo computations);
    the whole image is one window when it fits.

    Examples
    --------
    A 10980² Sentinel-2 tile of 4 bands in 1024 px chunks: classification tiles of 2048 px
    (:func:`spoc_xr.detect.classification_chunks`), three of them per window.

    >>> tile_windows(open_stack("s2_tile.zarr"), DetectParams())  # doctest: +SKIP
    [{'y': slice(0, 2048, None), 'x': slice(0, 6144, None)}, ...]
    """
    budget = dask.config.get(TILE_GROUP_CONFIG_KEY, TILE_GROUP_BYTES)
    if isinstance(budget, bool) or not isinstance(budget, int | float) or budget <= 0:
        raise ParameterError(
            f"{TILE_GROUP_CONFIG_KEY} = {budget!r} must be a positive number of bytes, e.g. 2**30"
        )
    sizes = stack.chunksizes
    tiles = [
        classification_chunks(sizes[dim] if sizes else (stack.sizes[dim],), params.depth)
        for dim in ("y", "x")
    ]
    padded = (max(tiles[0]) + 2 * params.depth) * (max(tiles[1]) + 2 * params.depth)
    per_tile = (3 * stack.sizes["band"] + 1) * padded * np.dtype(np.float32).itemsize
    per_window = max(1, int(budget // per_tile))
    if len(tiles[0]) * len(tiles[1]) <= per_window:
        return [{}]
    rows, columns = ([int(edge) for edge in np.cumsum((0, *sides))] for sides in tiles)
    windows = []
    for top, bottom in itertools.pairwise(rows):
        for first in range(0, len(columns) - 1, per_window):
            last = min(first + per_window, len(columns) - 1)
            windows.append({"y": slice(top, bottom), "x": slice(columns[first], columns[last])})
    return windows


def annotate_store(
    stack: xr.DataArray,
    output: str | os.PathLike[str],
    *,
    reference: ReferenceArgument = "auto",
    params: DetectParams | None = None,
    overwrite: bool = False,
    source: str | os.PathLike[str] | None = None,
    progress: bool = False,
    overview: np.ndarray | None = None,
) -> str:
    """Annotate ``stack`` into a Zarr store that survives being killed and grows with the stack.

    The store is created first (metadata, radiometry), then the reference, its noise model
    (``spread``) and the water mask are written, then the dates batch by batch, each batch recorded
    in the store's progress record, and last the heatmap (summed from the stored masks) and the
    completion marker. Running it again:

    * on a complete store made from the same recipe and dates: writes nothing (``"complete"``);
    * on a complete store whose stack gained later dates: classifies only the new dates against
      the stored reference and noise model and updates the heatmap (``"appended"``);
    * on an unfinished store of the same recipe and dates: writes only what is missing
      (``"resumed"``); an unfinished store of another recipe is refused.

    Parameters
    ----------
    stack : xarray.DataArray
        ``(time, band, y, x)`` raw values.
    output : str or os.PathLike
        Local path of the annotation store.
    reference : str, numpy.datetime64 or datetime, default "auto"
        ``"auto"``, ``"median"`` or a date (as for :func:`annotate`).
    params : DetectParams, optional
        Detection parameters (defaults when omitted).
    overwrite : bool, default False
        Delete an existing store first.
    source : str or os.PathLike, optional
        Path of the stack store, recorded in the provenance (a resume from another input is
        refused).
    progress : bool, default False
        Show progress bars.
    overview : numpy.ndarray, optional
        The stack's stored overview (:func:`spoc_xr.ingest.read_overview`); read from the stack
        when omitted.

    Returns
    -------
    str
        ``"written"``, ``"resumed"``, ``"appended"`` or ``"complete"``.

    Raises
    ------
    OutputError
        If ``output`` exists, was made otherwise, and ``overwrite`` is False.
    StoreError
        If an unfinished store was started with other parameters, another run holds its lock,
        or a task fails (the store then stays incomplete and resumable).

    Examples
    --------
    >>> annotate_store(open_stack("stack.zarr"), "out.zarr", source="stack.zarr")  # doctest: +SKIP
    'written'
    """
    from spoc_xr import store as st

    reference = reference_text(reference)
    stack, params = check_annotation_parameters(stack, reference=reference, params=params)
    # Whatever ``overwrite`` says, a store of another kind (a stack) is never replaced.
    out = Path(st.check_output_path(output, overwrite=True, kind="annotations"))
    recipe = {
        "kind": "annotations",
        "version": __version__,
        "parameters": params.as_attrs(),
        "reference": reference,
        "input": None if source is None else str(Path(source).expanduser().resolve()),
    }
    dates = st.date_labels(stack.time.values)
    with st.store_lock(out):
        if overwrite and os.path.lexists(out):
            st.remove_store(out)
        if not os.path.lexists(out):
            _annotate_fresh(stack, out, reference, params, recipe, dates, progress, overview)
            return "written"
        attrs = st.read_attrs(out) or {}
        provenance = attrs.get(st.PROVENANCE_ATTR)
        if not isinstance(provenance, dict):
            raise OutputError(
                f"{str(out)!r} exists and was not written by spoc-xr annotate; "
                "pass --overwrite to replace it"
            )
        same = st.same_record(provenance.get("recipe"), recipe)
        stored = list(provenance.get("dates", []))
        if st.COMPLETE_ATTR in attrs:
            if not same:
                raise OutputError(
                    f"{str(out)!r} exists (made with other parameters or from another input); "
                    "pass --overwrite to replace it"
                )
            if stored == dates:
                return "complete"
            if len(dates) > len(stored) and dates[: len(stored)] == stored:
                st.unmark_complete(
                    out, progress={"stage": "append", "dates": dates, "done": stored}
                )
                _annotate_finish(stack, out, params, recipe, dates, progress)
                return "appended"
            raise OutputError(
                f"{str(out)!r} holds {len(stored)} dates that are not the first dates of the "
                f"stack ({len(dates)} dates); pass --overwrite to annotate it anew"
            )
        state = attrs.get(st.PROGRESS_ATTR) or {}
        # A fresh run's target dates are its provenance's; an append records its own.
        if not same or state.get("dates", stored) != dates:
            raise StoreError(
                f"{str(out)!r} is an unfinished annotation that was started with other "
                "parameters, input or dates; pass --overwrite to start it again"
            )
        if state.get("stage") is None:  # killed while creating its arrays: start again
            st.remove_store(out)
            _annotate_fresh(stack, out, reference, params, recipe, dates, progress, overview)
        else:
            _annotate_finish(stack, out, params, recipe, dates, progress)
        return "resumed"


def _annotate_fresh(
    stack: xr.DataArray,
    out: Path,
    reference: str,
    params: DetectParams,
    recipe: dict[str, Any],
    dates: list[str],
    progress: bool,
    overview: np.ndarray | None = None,
) -> None:
    from spoc_xr import store as st

    try:
        stack, radiometry, params = plan_annotation(
            stack, reference=reference, params=params, overview=overview
        )
    except (SpocError, KeyboardInterrupt):
        raise
    except Exception as exc:  # a failing read task: name it, write nothing
        message = " ".join(str(exc).split())[:500]
        raise InputError(
            f"reading the stack's overview failed ({type(exc).__name__}: {message}); nothing "
            f"was written to {str(out)!r}: fix the input and run the command again"
        ) from exc
    full = build_annotations(stack, radiometry, params)
    st.create_store(full, out, provenance={"recipe": recipe, "dates": dates})
    st.set_stage(out, "created", dates=dates)
    _write_reference_pass(stack, radiometry, params, out, progress)
    st.set_stage(out, "reference")
    _annotate_finish(stack, out, params, recipe, dates, progress)


def _write_reference_pass(
    stack: xr.DataArray, radiometry: Radiometry, params: DetectParams, out: Path, progress: bool
) -> None:
    """Write the reference, the noise model and the water mask, in three passes over the store.

    The final noise model needs a floor taken over the whole image; computed in one graph with
    the reference, Dask held the reference tasks' outputs of every tile until then (spilling on
    8192² images with 2 GB workers). The reference task's three planes are stored first: the
    reference, the raw spread and the spread beyond the range (in :data:`EXCESS_VARIABLE`, removed
    once used); the floor and the final spread then read them back, and the water mask the
    reference, with nothing to recompute. A run killed in between starts this pass again (the
    stage stays ``created``).
    """
    from spoc_xr import store as st

    chunks = _output_chunks(stack, time=False)
    base, planes = reference_planes(stack, radiometry, params.tolerance)
    first = xr.Dataset(
        {
            name: base.copy(data=planes[plane]).astype(np.float32).chunk(chunks)
            for plane, name in enumerate(("reference", "spread", EXCESS_VARIABLE))
        }
    )
    st.remove_variable(out, EXCESS_VARIABLE)  # a killed pass's
    st.add_variables(first[[EXCESS_VARIABLE]], out)
    st.write_region(first, out, region={}, progress=progress)
    stored = _open_unfinished(out)
    reference, spread = stored["reference"], stored["spread"]
    # Computed before the final spread overwrites the raw one, block by block.
    floor = noise_floor(spread).compute()
    final = range_consistent_spread(spread, stored[EXCESS_VARIABLE], floor=floor)
    final = final.astype(np.float32).chunk(chunks)
    st.write_region(final.to_dataset(name="spread"), out, region={}, progress=progress)
    st.remove_variable(out, EXCESS_VARIABLE)
    # A pass of its own: sharing the reference's blocks with the spread's pass held them.
    index = choose_water_index([str(b) for b in stack.band.values], radiometry.water_threshold)
    smooth = reference_products(reference, spread, params)["smooth"]
    water = _water(smooth, radiometry, index).astype(np.uint8).chunk(chunks)
    st.write_region(water.to_dataset(name="water"), out, region={}, progress=progress)


#: The spread beyond the tolerance range, kept in an unfinished annotation store between the
#: reference pass's first write and the final noise model.
EXCESS_VARIABLE = "spread_beyond_range"


def _stored_radiometry(stored: xr.Dataset) -> Radiometry:
    info = stored.attrs["spoc_xr"]
    gains = np.asarray(stored["gain"].values, dtype=np.float64)
    n_time = gains.shape[0]
    # Appended dates have no overview statistics: they never feed the noise model or the
    # cleaning of the reference (both are stored by then).
    valid = np.ones(n_time)
    changed = np.ones(n_time)
    known_valid = info.get("overview_valid_fraction", [])
    known_changed = info.get("overview_change_fraction", [])
    valid[: len(known_valid)] = known_valid
    changed[: len(known_changed)] = known_changed
    scale = info.get("residual_scale")
    mapping = info.get("water_mapping")
    saturation = info.get("saturation")
    # Dates without stored levels (stores written before they were) get no thin haze test.
    brightness = np.full((n_time, 2), np.nan)
    for t, pair in enumerate((info.get("overview_brightness") or [])[:n_time]):
        if pair is not None:
            brightness[t] = pair
    return Radiometry(
        info["reference"],
        info["reference_index"],
        gains,
        np.asarray(stored["offset"].values, dtype=np.float64),
        valid,
        changed,
        list(info.get("notes", [])),
        None if scale is None else np.asarray(scale, dtype=np.float64),
        brightness,
        # Stores written before the cut was fitted used 0, and the reference as it is.
        float(info.get("water_threshold", 0.0)),
        None if mapping is None else (np.asarray(mapping[0]), np.asarray(mapping[1])),
        choice=str(info.get("reference_choice", "")),
        # Stores written before clipping was looked for compared every value as it was.
        saturation=None if saturation is None else _ceilings_from_attr(saturation),
    )


def _ceilings_from_attr(levels: Sequence[float | None]) -> np.ndarray:
    return np.array([np.inf if v is None else v for v in levels], dtype=np.float32)


def _water(smooth: xr.DataArray, radiometry: Radiometry, index: WaterIndex) -> xr.DataArray:
    """The lazy water mask of the smoothed reference, read in the radiometry of the overview's
    temporal median (:attr:`Radiometry.water_mapping`)."""
    if radiometry.water_mapping is not None:
        gain, offset = (
            xr.DataArray(part.astype(np.float32), dims="band", coords={"band": smooth.band})
            for part in radiometry.water_mapping
        )
        smooth = smooth * gain + offset
    return water_mask(smooth, index)


def brightness_attr(levels: np.ndarray | None) -> list[list[float] | None] | None:
    """Per-date ``[dark, bright]`` levels as JSON (``None`` for an unknown date)."""
    if levels is None:
        return None
    return [None if pair is None else list(pair) for pair in per_date_levels(levels, len(levels))]


def _open_unfinished(out: Path) -> xr.Dataset:
    return xr.open_zarr(out, consolidated=False, zarr_format=3, chunks={}, decode_coords="all")


def _annotate_finish(
    stack: xr.DataArray,
    out: Path,
    params: DetectParams,
    recipe: dict[str, Any],
    dates: list[str],
    progress: bool,
) -> None:
    from spoc_xr import store as st
    from spoc_xr.detect import SMALL
    from spoc_xr.reference import brightness_levels, fit_radiometry

    state = (st.read_attrs(out) or {}).get(st.PROGRESS_ATTR) or {}
    if state.get("stage") == "created":
        radiometry = _stored_radiometry(_open_unfinished(out))
        _write_reference_pass(stack, radiometry, params, out, progress)
        st.set_stage(out, "reference")
    elif state.get("stage") == "append":
        # New dates get gains fitted against the stored reference; old dates keep theirs.
        stored = _open_unfinished(out)
        old = stored.sizes["time"] if "done" not in state else len(state["done"])
        new = stack.isel(time=slice(old, None))
        ref_stored = stored["reference"].expand_dims(time=1).transpose(*STACK_DIMS)
        overview = compute_overview(new)
        gains, offsets = fit_radiometry(overview, compute_overview(ref_stored)[0])
        info = dict(stored.attrs["spoc_xr"])
        known = list(info.get("overview_brightness") or [None] * old)[:old]
        known += brightness_attr(brightness_levels(overview, gains, offsets)) or []
        st.update_attrs(out, {"spoc_xr": {**info, "overview_brightness": known}})
        st.grow_time(out, stack.time.values)
        group = zarr.open_group(out, mode="r+")
        for name, values in (("gain", gains), ("offset", offsets)):
            array = group[name]
            assert isinstance(array, zarr.Array)
            array[old:] = values.astype(np.float32)
        st.set_stage(out, "reference")
    stored = _open_unfinished(out)
    radiometry = _stored_radiometry(stored)
    part = build_annotations(
        stack,
        radiometry,
        params,
        stored_reference=stored["reference"],
        stored_spread=stored["spread"],
    )
    windows = tile_windows(stack, params)
    # Stores written before the shifts were kept have no misregistration array.
    names = [name for name in DATE_VARIABLES if name in stored.data_vars]
    st.write_dates(part[names], out, progress=progress, windows=windows)
    st.set_stage(out, "heatmap")
    stored = _open_unfinished(out)
    counts = ((stored["mask"] == SMALL) & (stored["water"] == 1)).sum("time", dtype=np.uint16)
    st.write_region(counts.to_dataset(name="heatmap"), out, region={}, progress=progress)
    # A pass of its own: sharing the mask blocks with the heatmap's sum over time held them
    # (458 MB per worker at the end of 358 dates of 2048²).
    summary = stored_date_summary(stored["mask"], stored["valid"])
    st.write_region(summary, out, region={}, progress=progress)
    info = dict(stored.attrs["spoc_xr"])
    info["dates"] = [str(t)[:19] for t in stack.time.values]
    st.update_attrs(out, {st.PROVENANCE_ATTR: {"recipe": recipe, "dates": dates}, "spoc_xr": info})
    st.mark_complete(out)
