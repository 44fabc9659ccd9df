"""Pictures of a time stack and its annotations: quicklooks, the heatmap, counts per date.

Every function draws with matplotlib's object API on a new :class:`~matplotlib.figure.Figure` (or
on a given axes), returns the figure and never calls ``plt.show``, so it works in notebooks, in
scripts and under the Agg backend of ``spoc-xr annotate`` alike. Only a display-sized subsample of
each image is read (at most ``DISPLAY_SIDE`` pixels a side), so a quicklook of a 10 980 px
Sentinel-2 tile reads a few megabytes, not the whole date.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr
from matplotlib.axes import Axes
from matplotlib.colors import BoundaryNorm, ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from spoc_xr import kernels
from spoc_xr.errors import InputError, ParameterError

# Screens and PNGs rarely show more than ~1000 px of one panel; reading more only costs time.
DISPLAY_SIDE = 1024
# Quicklook panels side by side before wrapping to a new row.
MAX_COLUMNS = 4
# Dates shown by default (and by save_figures): enough to compare, few enough to see boats.
DEFAULT_QUICKLOOK_DATES = 4
# Mask colours: small objects (boats) must stand out on dark water and bright land, so an
# opaque, saturated magenta that no natural surface has; large objects (clouds, shadows) cover
# much of a date, so a translucent cyan that leaves the scene readable beneath.
SMALL_COLOUR = (1.0, 0.0, 1.0)
SMALL_ALPHA = 1.0
LARGE_COLOUR = (0.0, 0.9, 1.0)
LARGE_ALPHA = 0.45
# Pixels without data (nodata or outside the swath) are drawn mid-grey, distinct from black water.
NODATA_COLOUR = (0.5, 0.5, 0.5)
# Band names, in red, green, blue order, tried in turn (Sentinel-2, Landsat 8/9, plain names).
RGB_NAMES = (("b04", "b03", "b02"), ("red", "green", "blue"), ("b4", "b3", "b2"), ("r", "g", "b"))
# A scale bar about a fifth of the panel wide reads at a glance without hiding the scene.
SCALE_BAR_SHARE = 0.2
HEATMAP_LABEL = "dates with a small object on water"
SMALL_LABEL = "small object (boat)"
LARGE_LABEL = "large object (cloud, shadow)"
FIGURE_DPI = 100


# --------------------------------------------------------------------------------------------
# helpers shared by the figures


def rgb_band_indices(bands: Sequence[str]) -> list[int]:
    """Positions of the bands to show as red, green, blue (or one band, shown in grey).

    Sentinel-2 ``B04/B03/B02``, Landsat ``B4/B3/B2`` or ``red/green/blue`` are found by name
    (any case); otherwise the first three bands are used, or the only band.

    Parameters
    ----------
    bands : sequence of str
        Band names of the stack, in order.

    Returns
    -------
    list of int
        Three indices (red, green, blue) or one (grey).

    Examples
    --------
    >>> rgb_band_indices(["B02", "B03", "B04", "B08"])
    [2, 1, 0]
    >>> rgb_band_indices(["pan"])
    [0]
    """
    lower = [str(b).lower() for b in bands]
    for names in RGB_NAMES:
        if all(name in lower for name in names):
            return [lower.index(name) for name in names]
    if len(lower) >= 3:
        return [0, 1, 2]
    if len(lower) >= 1:
        return [0]
    raise InputError("the stack has no band; ingest at least one band")


def _choose_bands(stack: xr.DataArray, bands: Sequence[str] | None) -> list[str]:
    names = [str(b) for b in stack.band.values]
    if bands is None:
        return [names[i] for i in rgb_band_indices(names)]
    chosen = [str(b) for b in bands]
    missing = [b for b in chosen if b not in names]
    if missing or len(chosen) not in (1, 3):
        raise ParameterError(
            f"bands={list(bands)!r} must name 1 or 3 of the stack's bands {names}; "
            "e.g. bands=('B04', 'B03', 'B02')"
        )
    return chosen


def display_stride(shape: tuple[int, int], side: int | None = None) -> int:
    """Subsampling step so that an image of ``shape`` is at most ``side`` pixels a side.

    Examples
    --------
    >>> display_stride((10980, 10980))
    11
    """
    return max(1, math.ceil(max(shape) / (DISPLAY_SIDE if side is None else side)))


def _subsample(array: xr.DataArray, stride: int) -> xr.DataArray:
    return array.isel(y=slice(None, None, stride), x=slice(None, None, stride))


def _any_in_blocks(array: xr.DataArray, stride: int) -> xr.DataArray:
    """Block maximum of a boolean (…, y, x) array: a 1-px boat survives the subsampling."""
    if stride == 1:
        return array
    coarse = array.astype(np.uint8).coarsen(y=stride, x=stride, boundary="pad").max()
    return coarse > 0


def date_indices(times: xr.DataArray | np.ndarray, dates: Any) -> list[int]:
    """Positions of ``dates`` (ints, date strings or datetimes) in ``times``.

    A date without a time of day matches the acquisition on that day; an int is a position
    (negative counts from the end).

    Parameters
    ----------
    times : xarray.DataArray or numpy.ndarray
        The stack's ``time`` coordinate.
    dates : int, str, datetime-like or a sequence of them

    Returns
    -------
    list of int

    Examples
    --------
    >>> t = np.array(["2023-03-01T10:30", "2023-03-06T10:30"], dtype="datetime64[ns]")
    >>> date_indices(t, ["2023-03-06", 0])
    [1, 0]
    """
    stamps = pd.DatetimeIndex(np.asarray(times))
    items = [dates] if isinstance(dates, str | int | np.integer | np.datetime64) else list(dates)
    if not items:
        raise ParameterError("dates is empty; pass at least one date or position")
    found = []
    for item in items:
        if isinstance(item, int | np.integer) and not isinstance(item, bool):
            if not -len(stamps) <= int(item) < len(stamps):
                raise ParameterError(
                    f"date position {item} is outside the stack's {len(stamps)} dates"
                )
            found.append(int(item) % len(stamps))
            continue
        try:
            wanted = pd.Timestamp(item)
        except (ValueError, TypeError) as err:
            raise ParameterError(
                f"{item!r} is neither a date nor a position; pass e.g. '2023-05-01' or 0"
            ) from err
        hits = np.flatnonzero(stamps == wanted)
        if hits.size == 0 and wanted == wanted.normalize():
            hits = np.flatnonzero(stamps.normalize() == wanted)
        if hits.size != 1:
            raise ParameterError(
                f"date {item!r} is not in the stack ({len(stamps)} dates from "
                f"{stamps.min().date()} to {stamps.max().date()}); pass one of its dates"
            )
        found.append(int(hits[0]))
    return found


def stretch(
    values: np.ndarray, percentiles: tuple[float, float] = (2, 98), *, axis: tuple[int, ...]
) -> np.ndarray:
    """Linear percentile stretch to [0, 1], with the limits computed once over ``axis``.

    NaN stays NaN. Computing the limits over all shown dates at once (rather than per date)
    keeps dates comparable: a hazy date looks hazy instead of being stretched back to contrast.

    Parameters
    ----------
    values : numpy.ndarray
        Float values, NaN where invalid.
    percentiles : tuple of float
        Lower and upper percentile mapped to 0 and 1.
    axis : tuple of int
        Axes the percentiles are taken over (the others, e.g. band, get their own limits).

    Examples
    --------
    >>> stretch(np.array([0.0, 5.0, 10.0]), (0, 100), axis=(0,)).tolist()
    [0.0, 0.5, 1.0]
    """
    low, high = percentiles
    if not 0 <= low < high <= 100:
        raise ParameterError(
            f"percentiles={percentiles!r} must be two numbers with 0 <= low < high <= 100, "
            "e.g. (2, 98)"
        )
    if not np.isfinite(values).any():
        return np.full(values.shape, np.nan)
    lo = np.nanpercentile(values, low, axis=axis, keepdims=True)
    hi = np.nanpercentile(values, high, axis=axis, keepdims=True)
    span = np.where(hi > lo, hi - lo, 1.0)
    return np.clip((values - lo) / span, 0.0, 1.0)


def overlay_mask(rgb: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Blend a mask onto an RGB image: small objects magenta, large objects translucent cyan.

    Parameters
    ----------
    rgb : numpy.ndarray
        ``(..., y, x, 3)`` floats in [0, 1].
    mask : numpy.ndarray
        ``(..., y, x)`` codes: 0 clear, 1 small object, 2 large object.

    Returns
    -------
    numpy.ndarray
        A blended copy of ``rgb``.

    Examples
    --------
    >>> out = overlay_mask(np.zeros((1, 2, 3)), np.array([[0, 1]]))
    >>> out[0, 1].tolist()
    [1.0, 0.0, 1.0]
    """
    out = np.array(rgb, dtype=np.float64, copy=True)
    for code, colour, alpha in ((2, LARGE_COLOUR, LARGE_ALPHA), (1, SMALL_COLOUR, SMALL_ALPHA)):
        where = mask == code
        out[where] = (1 - alpha) * out[where] + alpha * np.asarray(colour)
    return out


def pixel_size(array: xr.DataArray | xr.Dataset) -> float | None:
    """Ground size of a pixel in metres from the ``x`` coordinate spacing, if it is known.

    ``None`` when there is no ``x`` coordinate, a single column, or a geographic CRS (degrees).

    Examples
    --------
    >>> pixel_size(xr.DataArray(np.zeros((2, 3)), dims=("y", "x"), coords={"x": [5, 15, 25]}))
    10.0
    """
    if "x" not in array.coords or array.sizes.get("x", 0) < 2:
        return None
    if _is_geographic(array):
        return None
    step = abs(float(array.x.values[1]) - float(array.x.values[0]))
    return step if step > 0 else None


def _is_geographic(array: xr.DataArray | xr.Dataset) -> bool:
    if "spatial_ref" not in array.coords:
        return False
    wkt = array.coords["spatial_ref"].attrs.get("crs_wkt") or array.coords["spatial_ref"].attrs.get(
        "spatial_ref"
    )
    if not wkt:
        return False
    from pyproj import CRS

    return bool(CRS.from_wkt(wkt).is_geographic)


def nice_length(target: float) -> float:
    """The 1, 2 or 5 × 10^k value at or below ``target`` (a round scale-bar length).

    Examples
    --------
    >>> nice_length(830.0)
    500.0
    """
    if target <= 0:
        raise ParameterError(f"scale bar length must be positive, got {target}")
    power = 10.0 ** math.floor(math.log10(target))
    for step in (5.0, 2.0, 1.0):
        if step * power <= target:
            return step * power
    return power


def _format_metres(metres: float) -> str:
    return f"{metres / 1000:g} km" if metres >= 1000 else f"{metres:g} m"


def add_scale_bar(ax: Axes, metres_per_unit: float, width_units: float) -> float:
    """Draw a scale bar in the lower left of ``ax`` (data units along x); return its metres.

    matplotlib-scalebar is not a dependency: a white bar with a dark outline and a label reads
    on both water and land.
    """
    metres = nice_length(SCALE_BAR_SHARE * width_units * metres_per_unit)
    length = metres / metres_per_unit
    x0, x1 = ax.get_xlim()
    y0, y1 = ax.get_ylim()
    # imshow axes run downwards (y0 > y1); place the bar 5% in from the lower-left corner.
    left = min(x0, x1) + 0.05 * abs(x1 - x0)
    bottom_y = y0 - 0.06 * (y0 - y1)
    text_y = y0 - 0.1 * (y0 - y1)
    ax.plot(
        [left, left + length],
        [bottom_y, bottom_y],
        color="white",
        linewidth=4,
        solid_capstyle="butt",
        path_effects=_outline(),
        gid="scale_bar",
    )
    ax.text(
        left + length / 2,
        text_y,
        _format_metres(metres),
        color="white",
        ha="center",
        va="bottom",
        fontsize=9,
        path_effects=_outline(),
        gid="scale_bar_label",
    )
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)
    return metres


def _outline() -> list[Any]:
    from matplotlib import patheffects

    return [patheffects.withStroke(linewidth=2.5, foreground="black")]


#: Height / width of a panel, clamped: a strip image (37 x 1001 px) made a figure too flat to lay
#: out (matplotlib warned and drew nothing useful), a tall one a figure metres high.
PANEL_ASPECT_RANGE = (0.3, 3.0)


def _panel_aspect(height: int, width: int) -> float:
    return min(max(height / width, PANEL_ASPECT_RANGE[0]), PANEL_ASPECT_RANGE[1])


def _new_figure(width: float, height: float) -> Figure:
    # Figure() without pyplot: no global state, no GUI backend, nothing left open to leak.
    return Figure(figsize=(width, height), dpi=FIGURE_DPI, layout="constrained")


def date_label(value: Any) -> str:
    return str(np.datetime_as_string(np.datetime64(value, "m"), unit="D"))


# --------------------------------------------------------------------------------------------
# quicklook


def _display_rgb(
    stack: xr.DataArray, indices: list[int], bands: list[str], stride: int
) -> np.ndarray:
    from spoc_xr.reference import to_float

    picked = _subsample(stack.isel(time=indices).sel(band=bands), stride)
    values = np.asarray(to_float(picked).transpose("time", "y", "x", "band").values, np.float64)
    return values


def quicklook(
    stack: xr.DataArray,
    mask: xr.DataArray | None = None,
    *,
    dates: Any = None,
    bands: Sequence[str] | None = None,
    percentiles: tuple[float, float] = (2, 98),
    ax: Axes | None = None,
) -> Figure:
    """RGB pictures of chosen dates, the same stretch for all, with the mask drawn over them.

    Parameters
    ----------
    stack : xarray.DataArray
        ``(time, band, y, x)`` raw values (e.g. from :func:`spoc_xr.open_stack`).
    mask : xarray.DataArray, optional
        ``(time, y, x)`` mask cube of :func:`spoc_xr.pipeline.annotate` (same dates and grid):
        small objects in opaque magenta, large objects in translucent cyan, with a legend.
    dates : int, str or sequence, optional
        Dates (``"2023-05-01"``) or positions to show; by default up to
        ``DEFAULT_QUICKLOOK_DATES`` evenly spaced dates.
    bands : sequence of str, optional
        Three band names for red, green, blue, or one for grey; by default B04/B03/B02 (or
        red/green/blue), else the first three bands.
    percentiles : tuple of float
        Percentiles mapped to black and white, computed once over all shown dates so that
        their brightness compares.
    ax : matplotlib.axes.Axes, optional
        Draw one date into this axes instead of a new figure.

    Returns
    -------
    matplotlib.figure.Figure

    Examples
    --------
    >>> stack = spoc_xr.open_stack("stack.zarr")  # doctest: +SKIP
    >>> fig = quicklook(stack, dates=[0, "2023-03-06"])  # doctest: +SKIP
    >>> fig.savefig("two_dates.png")  # doctest: +SKIP
    """
    from spoc_xr.pipeline import check_stack

    stack = check_stack(stack)
    n_time = stack.sizes["time"]
    if dates is None:
        count = min(n_time, DEFAULT_QUICKLOOK_DATES)
        indices = sorted({int(i) for i in np.linspace(0, n_time - 1, count).round()})
    else:
        indices = date_indices(stack.time, dates)
    if ax is not None and len(indices) != 1:
        raise ParameterError(
            f"ax= draws a single date but {len(indices)} were chosen; pass dates=<one date> "
            "or leave ax out"
        )
    chosen = _choose_bands(stack, bands)
    if mask is not None:
        _check_mask(mask, stack)
    stride = display_stride((stack.sizes["y"], stack.sizes["x"]))
    values = _display_rgb(stack, indices, chosen, stride)
    shown = stretch(values, percentiles, axis=(0, 1, 2))
    if len(chosen) == 1:
        shown = np.repeat(shown, 3, axis=-1)
    invalid = ~np.isfinite(shown).all(axis=-1)
    shown = np.where(invalid[..., None], np.asarray(NODATA_COLOUR), shown)
    if mask is not None:
        codes = _display_mask(mask.isel(time=indices), stride)
        shown = overlay_mask(shown, codes)

    if ax is None:
        n_cols = min(len(indices), MAX_COLUMNS)
        n_rows = math.ceil(len(indices) / n_cols)
        aspect = _panel_aspect(shown.shape[1], shown.shape[2])
        fig = _new_figure(3.2 * n_cols, 3.2 * n_rows * aspect + (0.6 if mask is not None else 0.3))
        axes = list(np.atleast_1d(fig.subplots(n_rows, n_cols, squeeze=False)).ravel())
    else:
        fig = ax.get_figure()  # type: ignore[assignment]
        axes = [ax]
    metres = pixel_size(stack)
    for i, axis in enumerate(axes):
        if i >= len(indices):
            axis.set_axis_off()
            continue
        axis.imshow(shown[i], interpolation="nearest")
        axis.set_title(date_label(stack.time.values[indices[i]]), fontsize=10)
        axis.set_xticks([])
        axis.set_yticks([])
        if metres is not None:
            add_scale_bar(axis, metres * stride, shown.shape[2])
    band_text = "/".join(chosen) if len(chosen) == 3 else f"{chosen[0]} (grey)"
    if ax is None:
        fig.suptitle(
            f"{band_text}, stretch {percentiles[0]:g}-{percentiles[1]:g} % over shown dates",
            fontsize=10,
        )
    if mask is not None:
        handles = [
            Patch(facecolor=SMALL_COLOUR, edgecolor="black", label=SMALL_LABEL),
            Patch(facecolor=LARGE_COLOUR, alpha=LARGE_ALPHA, edgecolor="black", label=LARGE_LABEL),
        ]
        if ax is None:
            fig.legend(handles=handles, loc="outside lower center", ncols=2, fontsize=9)
        else:
            ax.legend(handles=handles, loc="upper right", fontsize=8)
    return fig


def _check_mask(mask: xr.DataArray, stack: xr.DataArray) -> None:
    if not isinstance(mask, xr.DataArray) or set(mask.dims) != {"time", "y", "x"}:
        raise InputError(
            "mask must be the (time, y, x) 'mask' variable of spoc_xr.annotate's result, "
            f"got {getattr(mask, 'dims', type(mask).__name__)}"
        )
    for dim in ("time", "y", "x"):
        if mask.sizes[dim] != stack.sizes[dim]:
            raise InputError(
                f"mask has {mask.sizes[dim]} {dim} steps but the stack has {stack.sizes[dim]}; "
                "pass the annotations of this stack"
            )


def _display_mask(mask: xr.DataArray, stride: int) -> np.ndarray:
    mask = mask.transpose("time", "y", "x")
    small = _any_in_blocks(mask == 1, stride)
    large = _any_in_blocks(mask == 2, stride)
    small_v, large_v = xr.align(small, large, join="exact")
    # A block holding a boat and a cloud shows the boat: it is the rarer, more telling class.
    codes = np.where(small_v.values, 1, np.where(large_v.values, 2, 0))
    return codes.astype(np.uint8)


# --------------------------------------------------------------------------------------------
# heatmap


def grey_background(reference: xr.DataArray, percentiles: tuple[float, float] = (2, 98)) -> Any:
    """Stretched grey image (y, x) in [0, 1] of a ``(band, y, x)`` reference (mean of RGB bands)."""
    if "band" in reference.dims:
        names = [str(b) for b in reference.band.values]
        picks = [names[i] for i in rgb_band_indices(names)]
        reference = reference.sel(band=picks).mean("band", skipna=False)
    values = np.asarray(reference.transpose("y", "x").values, dtype=np.float64)
    return stretch(values, percentiles, axis=(0, 1))


def heatmap_figure(
    heatmap: xr.DataArray,
    reference: xr.DataArray,
    *,
    water: xr.DataArray | None = None,
    title: str | None = None,
    cmap: str = "plasma",
    ax: Axes | None = None,
) -> Figure:
    """The boat-route heatmap over the greyscale reference, with a colour bar and a scale bar.

    Pixels never visited are transparent so the harbour shows through; the colour bar counts
    dates (label ``"dates with a small object on water"``) and the scale bar is in metres, from
    the ``x`` coordinate spacing.

    Parameters
    ----------
    heatmap : xarray.DataArray
        ``(y, x)`` counts, the ``heatmap`` variable of :func:`spoc_xr.pipeline.annotate`.
    reference : xarray.DataArray
        ``(band, y, x)`` or ``(y, x)`` reference image of the same grid.
    water : xarray.DataArray, optional
        ``(y, x)`` water mask: its shore is outlined.
    title : str, optional
        Axes title (default: the share of water pixels ever visited).
    cmap : str
        Matplotlib colour map of the counts.
    ax : matplotlib.axes.Axes, optional
        Draw into this axes instead of a new figure.

    Returns
    -------
    matplotlib.figure.Figure

    Examples
    --------
    >>> ds = spoc_xr.annotate(stack)  # doctest: +SKIP
    >>> heatmap_figure(ds.heatmap, ds.reference).savefig("heatmap.png")  # doctest: +SKIP
    """
    for name, array in (("heatmap", heatmap), ("reference", reference)):
        if not isinstance(array, xr.DataArray) or not {"y", "x"} <= set(array.dims):
            raise InputError(f"{name} must be an xarray.DataArray with dims y and x")
    if (heatmap.sizes["y"], heatmap.sizes["x"]) != (reference.sizes["y"], reference.sizes["x"]):
        raise InputError(
            f"heatmap is {heatmap.sizes['y']} x {heatmap.sizes['x']} px but the reference is "
            f"{reference.sizes['y']} x {reference.sizes['x']}; pass both from one annotation"
        )
    stride = display_stride((heatmap.sizes["y"], heatmap.sizes["x"]))
    # Block maximum: a route one pixel wide must not vanish from the picture.
    counts_da = heatmap.coarsen(y=stride, x=stride, boundary="pad").max() if stride > 1 else heatmap
    counts = np.asarray(counts_da.transpose("y", "x").values, dtype=np.float64)
    counts = np.nan_to_num(counts, nan=0.0)
    grey = grey_background(_subsample(reference, stride))
    if ax is None:
        aspect = _panel_aspect(*counts.shape)
        fig = _new_figure(7.0, 6.0 * aspect + 0.4)
        ax = fig.subplots()
    else:
        fig = ax.get_figure()  # type: ignore[assignment]
    ax.imshow(np.nan_to_num(grey, nan=0.5), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    top = max(1, int(counts.max()))
    visited = np.ma.masked_less(counts, 1)
    colours = _colour_map(cmap, top)
    # Whole dates: one colour per count when there are few, so a count can be read off the bar.
    bounds = np.arange(0.5, top + 1.5) if top <= 20 else np.linspace(0.5, top + 0.5, 21)
    norm = BoundaryNorm(bounds, colours.N)
    image = ax.imshow(visited, cmap=colours, norm=norm, interpolation="nearest")
    if water is not None:
        shore = np.asarray(_subsample(water, stride).transpose("y", "x").values, dtype=float)
        ax.contour(shore, levels=[0.5], colors="white", linewidths=0.6, alpha=0.6)
    bar = fig.colorbar(image, ax=ax, shrink=0.85)
    bar.set_label(HEATMAP_LABEL)
    if top <= 20:
        bar.set_ticks(list(range(1, top + 1, max(1, top // 10))))
    ax.set_xticks([])
    ax.set_yticks([])
    metres = pixel_size(heatmap)
    if metres is not None:
        add_scale_bar(ax, metres * stride, counts.shape[1])
    if title is None:
        n_visited = int((np.asarray(heatmap.values) > 0).sum())
        title = f"small objects on water: {n_visited} px visited at least once"
    ax.set_title(title, fontsize=10)
    return fig


def _colour_map(name: str, levels: int) -> ListedColormap:
    from matplotlib import colormaps

    if name not in colormaps:
        raise ParameterError(f"cmap {name!r} is not a matplotlib colour map; try 'plasma'")
    # Skip the darkest fifth: near-black would vanish on the dark water of the grey reference.
    samples = colormaps[name](np.linspace(0.2, 1.0, max(2, min(levels, 20))))
    return ListedColormap(samples)


# --------------------------------------------------------------------------------------------
# counts per date


def object_counts(mask: xr.DataArray, *, code: int = 1, connectivity: int = 8) -> np.ndarray:
    """Number of connected objects of ``code`` (1 small, 2 large) on each date.

    Each date is read whole (objects crossing chunk borders count once) and labelled with
    :func:`spoc_xr.kernels.label`.

    Parameters
    ----------
    mask : xarray.DataArray
        ``(time, y, x)`` mask cube.
    code : int
        Mask value to count (1 small objects, 2 large objects).
    connectivity : {8, 4}
        Pixel connectivity of an object.

    Returns
    -------
    numpy.ndarray
        ``(time,)`` int64 counts.

    Examples
    --------
    >>> m = xr.DataArray(np.array([[[1, 0, 1], [0, 0, 0]]], np.uint8), dims=("time", "y", "x"))
    >>> object_counts(m).tolist()
    [2]
    """
    if code not in (1, 2):
        raise ParameterError(f"code must be 1 (small objects) or 2 (large objects), got {code!r}")
    mask = mask.transpose("time", "y", "x")
    counts = np.zeros(mask.sizes["time"], dtype=np.int64)
    for t in range(mask.sizes["time"]):
        counts[t] = kernels.label(
            np.asarray(mask.isel(time=t).values) == code, connectivity=connectivity
        )[1]
    return counts


def counts_figure(
    annotations: xr.Dataset, *, counts: np.ndarray | None = None, ax: Axes | None = None
) -> Figure:
    """Bar chart of small objects per date with cloud cover on a second axis.

    Cloud cover is ``large_fraction`` (share of valid pixels in large objects: clouds and their
    shadows); dates without valid data are marked "no data" instead of a zero bar.

    Parameters
    ----------
    annotations : xarray.Dataset
        Result of :func:`spoc_xr.pipeline.annotate` (or the store it was written to).
    counts : numpy.ndarray, optional
        Precomputed :func:`object_counts` of ``annotations.mask`` (saves reading the mask twice).
    ax : matplotlib.axes.Axes, optional
        Draw into this axes instead of a new figure.

    Returns
    -------
    matplotlib.figure.Figure

    Examples
    --------
    >>> counts_figure(spoc_xr.annotate(stack)).savefig("counts.png")  # doctest: +SKIP
    """
    check_annotations(annotations, ("mask", "large_fraction", "valid_fraction"))
    if counts is None:
        counts = object_counts(annotations["mask"])
    counts = np.asarray(counts)
    n_time = annotations.sizes["time"]
    if counts.shape != (n_time,):
        raise ParameterError(f"counts has shape {counts.shape}, expected ({n_time},)")
    fractions = annotations[["large_fraction", "valid_fraction"]].compute()
    cloud = 100 * np.nan_to_num(fractions.large_fraction.values.astype(float), nan=0.0)
    empty = fractions.valid_fraction.values == 0
    labels = [date_label(t) for t in annotations.time.values]
    if ax is None:
        fig = _new_figure(max(6.0, 0.45 * n_time + 2.5), 3.8)
        ax = fig.subplots()
    else:
        fig = ax.get_figure()  # type: ignore[assignment]
    positions = np.arange(n_time)
    ax.bar(positions, counts, color="#7b3294", label="small objects", gid="object_bars")
    ax.set_ylabel("small objects (count)", color="#7b3294")
    ax.set_xticks(positions, labels, rotation=60, ha="right", fontsize=8)
    top = max(1, int(counts.max()) if counts.size else 1)
    ax.set_ylim(0, top * 1.15)
    for x in positions[empty]:
        ax.text(x, top * 0.05, "no data", rotation=90, ha="center", va="bottom", fontsize=8)
    twin = ax.twinx()
    twin.plot(positions, cloud, color="#008bb0", marker="o", label="cloud cover", gid="cloud_line")
    twin.set_ylabel("cloud / large objects (% of valid px)", color="#008bb0")
    twin.set_ylim(0, max(5.0, float(cloud.max()) * 1.15))
    lines = [*ax.get_legend_handles_labels()[0], *twin.get_legend_handles_labels()[0]]
    ax.legend(handles=lines, loc="upper left", fontsize=8)
    ax.set_title("objects and cloud cover per date", fontsize=10)
    return fig


def check_annotations(annotations: Any, names: Sequence[str]) -> None:
    if not isinstance(annotations, xr.Dataset):
        raise InputError(
            f"expected the xarray.Dataset of spoc_xr.annotate, got {type(annotations).__name__}"
        )
    missing = [name for name in names if name not in annotations]
    if missing:
        raise InputError(
            f"annotations lack {missing}; pass the result of spoc_xr.annotate or a store written "
            "by spoc-xr annotate"
        )


# --------------------------------------------------------------------------------------------
# all figures at once


def pick_dates(annotations: xr.Dataset, n: int = DEFAULT_QUICKLOOK_DATES) -> list[int]:
    """Informative dates to show: the reference, the busiest, the cloudiest, then evenly spaced.

    Parameters
    ----------
    annotations : xarray.Dataset
        Result of :func:`spoc_xr.pipeline.annotate`.
    n : int
        Number of dates wanted (fewer if the stack is shorter).

    Returns
    -------
    list of int
        Sorted date positions.
    """
    check_annotations(annotations, ("small_fraction", "large_fraction"))
    n_time = annotations.sizes["time"]
    fractions = annotations[["small_fraction", "large_fraction"]].compute()
    wanted: list[int] = []
    reference = annotations.attrs.get("spoc_xr", {}).get("reference_index")
    if reference is not None:
        wanted.append(int(reference))
    for name in ("small_fraction", "large_fraction"):
        values = np.nan_to_num(fractions[name].values.astype(float), nan=-1.0)
        wanted.append(int(np.argmax(values)))
    wanted.extend(int(i) for i in np.linspace(0, n_time - 1, max(n, 1)).round())
    picked: list[int] = []
    for index in wanted:
        if index not in picked:
            picked.append(index)
    return sorted(picked[: min(n, n_time)])


FIGURE_NAMES = ("quicklook", "heatmap", "counts")


def save_figures(
    annotations: xr.Dataset,
    stack: xr.DataArray,
    out_dir: str | os.PathLike[str],
    *,
    dates: Any = None,
    counts: np.ndarray | None = None,
) -> dict[str, Path]:
    """Write ``quicklook.png``, ``heatmap.png`` and ``counts.png`` into ``out_dir``.

    Parameters
    ----------
    annotations : xarray.Dataset
        Annotations of ``stack`` (best read back from the written store, so nothing is
        recomputed).
    stack : xarray.DataArray
        The annotated stack.
    out_dir : str or os.PathLike
        Folder to write into (created if missing; files of the same names are replaced).
    dates : optional
        Dates of the quicklook (default: :func:`pick_dates`).
    counts : numpy.ndarray, optional
        Precomputed :func:`object_counts`.

    Returns
    -------
    dict of str to pathlib.Path
        ``{"quicklook": ..., "heatmap": ..., "counts": ...}``.

    Examples
    --------
    >>> annotations = xr.open_zarr("out.zarr")  # doctest: +SKIP
    >>> save_figures(annotations, open_stack("stack.zarr"), "out_report")  # doctest: +SKIP
    {'quicklook': PosixPath('out_report/quicklook.png'), ...}
    """
    check_annotations(annotations, ("mask", "heatmap", "reference"))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if dates is None:
        dates = pick_dates(annotations)
    figures = {
        "quicklook": quicklook(stack, annotations["mask"], dates=dates),
        "heatmap": heatmap_figure(
            annotations["heatmap"], annotations["reference"], water=annotations.get("water")
        ),
        "counts": counts_figure(annotations, counts=counts),
    }
    paths = {}
    for name, figure in figures.items():
        path = out / f"{name}.png"
        figure.savefig(path, dpi=FIGURE_DPI)
        paths[name] = path
    return paths
