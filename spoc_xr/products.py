"""Products of the mask cube: water index, boat-route heatmap and per-date summaries."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr

from spoc_xr.detect import CLEAR, INVALID, LARGE, NIR_NAMES, SMALL, SWIR_NAMES, find_band
from spoc_xr.reference import nanmedian_first

# Band names that carry green, Sentinel-2 style (padded or not) and plain words ("B3" is red on
# Landsat 4-7; with no NIR or SWIR name known there, no index is chosen and the message says how
# to name the bands). NIR and SWIR names: spoc_xr.detect.
GREEN_NAMES = ("b03", "green", "b3", "g")
# A pixel whose water shows on this share of the clean dates is water (see uncover_water),
# given at least MIN_WET_DATES such dates.
WET_SHARE = 0.25
# ... and where the index rises by this much above the reference's (water ~0.5, ships < 0).
WET_INCREASE = 0.2
MIN_WET_DATES = 3
# An adaptive water cut may drop at most this share of the pixels with a positive index (quays
# and roofs are a few percent of a port; more means the cut splits water from water).
WATER_SPLIT_SHARE = 0.15
# Fewer pixels with a known index than this give no histogram to cut.
MIN_THRESHOLD_PIXELS = 256


@dataclass(frozen=True)
class WaterIndex:
    """Which water index a stack's bands allow.

    Attributes
    ----------
    name : str
        ``"MNDWI"`` (green, SWIR), ``"NDWI"`` (green, NIR) or ``"none"``.
    bands : tuple of str
        The two band names used, empty for ``"none"``.
    threshold : float
        Water is where the index exceeds this (0, or the scene's own cut from
        :func:`water_threshold`).
    searched : tuple of str
        For ``"none"``, the stack's band names, which the message names so that the user can
        see why none matched.
    """

    name: str
    bands: tuple[str, ...]
    threshold: float = 0.0
    searched: tuple[str, ...] = ()

    @property
    def available(self) -> bool:
        """True when a water index can be computed."""
        return self.name != "none"

    def describe(self) -> str:
        """One line for command output and attributes."""
        if not self.available:
            names = f" ({', '.join(self.searched)})" if self.searched else ""
            return (
                f"no water index (the bands{names} lack green plus NIR or SWIR): the heatmap "
                "counts all small objects; if the bands hold them under other names (Landsat's "
                "SR_B3 is green on Landsat 8-9, red on 4-7), ingest again with --band-names, "
                "e.g. blue,green,red,nir"
            )
        return f"{self.name} from bands {self.bands[0]} and {self.bands[1]} > {self.threshold:.3g}"


def _find_band(bands: list[str], names: tuple[str, ...]) -> str | None:
    found = find_band(bands, names)
    return None if found is None else bands[found]


def choose_water_index(bands: list[str], threshold: float = 0.0) -> WaterIndex:
    """Pick MNDWI (green, SWIR) where present, else NDWI (green, NIR), else none.

    ``threshold`` is the index value above which a pixel is water (:func:`water_threshold`).

    Examples
    --------
    >>> choose_water_index(["B02", "B03", "B04", "B08"]).name
    'NDWI'
    >>> choose_water_index(["red", "nir", "swir1"]).name
    'none'
    >>> choose_water_index(["SR_B3", "SR_B5"]).describe()[:48]
    'no water index (the bands (SR_B3, SR_B5) lack gr'
    """
    green = _find_band(bands, GREEN_NAMES)
    swir = _find_band(bands, SWIR_NAMES)
    nir = _find_band(bands, NIR_NAMES)
    if green and swir:
        return WaterIndex("MNDWI", (green, swir), threshold)
    if green and nir:
        return WaterIndex("NDWI", (green, nir), threshold)
    return WaterIndex("none", (), searched=tuple(bands))


def water_threshold(image: np.ndarray, bands: list[str]) -> float:
    """The index value above which ``image`` ``(band, y, x)`` is water: 0 or the scene's own cut.

    NDWI and MNDWI are positive on water, but bright concrete, roofs and piers can read slightly
    positive too (NDWI 0.02-0.09 where harbour water reads 0.5): with a cut at 0 a quay counts
    as water and whatever changes on it as a boat. Among the pixels with a positive index, the
    ISODATA cut (scikit-image's ``threshold_isodata``: midway between the means of the two sides,
    so in the middle of the gap between the structures and the water mode, where Otsu's cut
    would sit at one edge of it) splits the two, as automatic water mapping splits its index
    histogram. The cut is kept only when at most ``WATER_SPLIT_SHARE`` of those
    pixels fall below it: a cut that removes more splits two kinds of water (clear and turbid,
    or one water mode in halves), not water from what stands in it.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> green = np.r_[rng.normal(900, 20, 600), rng.normal(1500, 20, 30), rng.normal(600, 20, 600)]
    >>> nir = np.r_[rng.normal(1400, 20, 600), rng.normal(1300, 20, 30), rng.normal(200, 20, 600)]
    >>> image = np.stack([green, nir])[:, None, :]  # land, bright pier, water
    >>> 0.07 < water_threshold(image, ["B03", "B08"]) < 0.45
    True
    """
    from skimage.filters import threshold_isodata

    index = choose_water_index(bands)
    if not index.available:
        return 0.0
    ratio = _normalised_difference(
        image[bands.index(index.bands[0])].astype(np.float64),
        image[bands.index(index.bands[1])].astype(np.float64),
    )
    positive = ratio[np.isfinite(ratio) & (ratio > 0)]
    if positive.size < MIN_THRESHOLD_PIXELS or positive.min() == positive.max():
        return 0.0
    cut = float(threshold_isodata(positive))
    if (positive <= cut).mean() > WATER_SPLIT_SHARE:
        return 0.0
    return cut


def _index_ratio(image: xr.DataArray, index: WaterIndex) -> xr.DataArray:
    green = image.sel(band=index.bands[0], drop=True)
    other = image.sel(band=index.bands[1], drop=True)
    return _normalised_difference(green, other)


def _normalised_difference(green: Any, other: Any) -> Any:
    # NDWI/MNDWI for numpy or xarray operands; NaN where both bands are 0 or unknown.
    with np.errstate(invalid="ignore", divide="ignore"):
        return (green - other) / (green + other)


def second_index_band(bands: list[str], index: WaterIndex) -> str | None:
    """The NIR band that gives NDWI next to an MNDWI ``index``, else ``None``.

    Examples
    --------
    >>> second_index_band(["B03", "B08", "B11"], choose_water_index(["B03", "B08", "B11"]))
    'B08'
    >>> second_index_band(["B03", "B08"], choose_water_index(["B03", "B08"])) is None
    True
    """
    if index.name != "MNDWI":
        return None
    return _find_band(bands, NIR_NAMES)


def uncover_water_values(
    reference: np.ndarray,
    samples: np.ndarray,
    index: WaterIndex,
    bands: list[str],
    floor: np.ndarray | None = None,
    date: np.ndarray | None = None,
    margin: np.ndarray | None = None,
) -> np.ndarray:
    """The reference ``(band, y, x)`` with water put back where ships moored on most dates hid it.

    A berth that holds a ship on most dates holds one in every clean image, so the reference
    does too, and a ship there is no change. Where at least ``WET_SHARE`` of the clean ``samples``
    dates ``(time, band, y, x)`` (normalised, NaN where invalid; ``bands`` names their band axis)
    show the water uncovered (the index turns clearly wetter and the pixel darker in every band;
    haze brightens the visible bands, noise on shore and roofs moves the index far less), the
    reference takes the median of those water values.

    A white hull can be as wet as water by MNDWI (green as bright as SWIR; at Casablanca water
    reads 0.04-0.07 and a moored white ship 0.17), never by NDWI (its NIR is bright). So where
    ``index`` is MNDWI and the bands hold NIR, NDWI turning clearly wetter also tells water
    uncovered, given ``floor`` ``(band, y, x)``, the reference's minimum over the misregistration
    window: the date must then be darker than ``floor`` in every band, so that water which a 1 px
    shift of a static edge shows (a pier's, a quay's) is not taken for a ship gone. The MNDWI test
    stays as it was: a small ship has no pixel beyond the reach of the water around it.

    ``date`` ``(band, y, x)`` is the reference date's own values (normalised, before its objects
    were cleaned away) where the reference was cleaned with the samples' median: in a short
    stack a ship moored on most sample dates is that median, and the cleaning painted it over
    the water that the reference date itself shows (a 6-date stack lost the ship on all of its
    dates). Where the date shows the water uncovered, lower than the reference by more than
    ``margin`` ``(band,)`` in every band (misregistration at an edge lowers only some bands), it
    counts as one more wet date; the water values stay the samples' where any shows it.
    """
    if not index.available or samples.shape[0] < MIN_WET_DATES:
        return reference
    n_samples = samples.shape[0]
    uncovered = _uncovered(reference, samples, index, bands, floor)
    count = uncovered.sum(axis=0)
    wet = count >= WET_SHARE * n_samples
    if date is not None and margin is not None:
        with np.errstate(invalid="ignore"):
            well_below = (date < reference - margin[:, None, None]).all(axis=0)
        wet |= (
            _uncovered(reference, date[None], index, bands, floor)[0]
            & well_below
            & (count + 1 >= WET_SHARE * (n_samples + 1))
        )
    if not wet.any():
        return reference
    # Berths are few: the median of the water values only where the reference takes it.
    rows, columns = np.nonzero(wet)
    picked = samples[:, :, rows, columns]
    shown = uncovered[:, rows, columns]
    water = nanmedian_first(np.where(shown[:, None], picked, np.float32(np.nan)))
    if date is not None and margin is not None:
        only_date = ~shown.any(axis=0)
        water[:, only_date] = date[:, rows[only_date], columns[only_date]]
    out = reference.astype(np.float32)
    out[:, rows, columns] = water
    return out


def _uncovered(
    reference: np.ndarray,
    dates: np.ndarray,
    index: WaterIndex,
    bands: list[str],
    floor: np.ndarray | None,
) -> np.ndarray:
    """Where each of ``dates`` ``(time, band, y, x)`` shows water that ``reference`` hides
    (see :func:`uncover_water_values`), ``(time, y, x)``."""
    green, other = bands.index(index.bands[0]), bands.index(index.bands[1])
    ratio = _normalised_difference(reference[green], reference[other])
    date_ratio = _normalised_difference(dates[:, green], dates[:, other])
    nir = second_index_band(bands, index)
    with np.errstate(invalid="ignore"):
        wetter = date_ratio > ratio + np.float32(WET_INCREASE)
        if floor is not None and nir is not None:
            near = bands.index(nir)
            wetter |= (
                _normalised_difference(dates[:, green], dates[:, near])
                > _normalised_difference(reference[green], reference[near])
                + np.float32(WET_INCREASE)
            ) & (dates < floor[None]).all(axis=1)
        return (date_ratio > 0) & wetter & (dates < reference[None]).all(axis=1)


def water_mask(reference: xr.DataArray, index: WaterIndex) -> xr.DataArray:
    """Lazy ``(y, x)`` boolean water mask from a (smoothed) reference.

    Not widened: a ship moored at a quay still lies mostly on water (the clean reference shows
    water under it), while a car or container on a pier 3-5 px wide would lie wholly on a 2 px
    margin (measured: demo seeds 0-3 F1 0.853/0.848/0.847/0.798 with that margin, 0.859/0.866/
    0.892/0.805 without; every port's F1 equal or up, real-date recall unchanged).
    Without a usable index every pixel counts as water, so the heatmap holds every small object.
    """
    plane = reference.isel(band=0, drop=True)
    if not index.available:
        return xr.ones_like(plane, dtype=bool).rename("water")
    return (_index_ratio(reference, index) > index.threshold).rename("water")


def mask_from_codes(codes: xr.DataArray) -> xr.DataArray:
    """The public mask cube: codes with invalid pixels as clear, CF flag attributes."""
    mask = codes.where(codes != INVALID, CLEAR).astype(np.uint8).rename("mask")
    mask.attrs = {
        "flag_values": [CLEAR, SMALL, LARGE],
        "flag_meanings": "clear small_object large_object",
        "long_name": "objects found by comparison with the reference",
        "comment": "pixels with no valid data are 0 here and 0 in the `valid` variable",
    }
    return mask


def valid_from_codes(codes: xr.DataArray) -> xr.DataArray:
    """``(time, y, x)`` uint8: 1 where the date and the reference had valid data."""
    valid = (codes != INVALID).astype(np.uint8).rename("valid")
    valid.attrs = {"flag_values": [0, 1], "flag_meanings": "nodata valid"}
    return valid


def heatmap(codes: xr.DataArray, water: xr.DataArray) -> xr.DataArray:
    """On how many dates each pixel was a small object on water (a lazy tree reduction).

    Parameters
    ----------
    codes : xarray.DataArray
        ``(time, y, x)`` mask codes from :func:`spoc_xr.detect.classify`.
    water : xarray.DataArray
        ``(y, x)`` boolean water mask.
    """
    counts = ((codes == SMALL) & water).sum("time", dtype=np.uint16).rename("heatmap")
    counts.attrs = {
        "long_name": "number of dates with a small object on water",
        "units": "dates",
    }
    return counts


def date_summary(codes: xr.DataArray) -> xr.Dataset:
    """Per-date pixel shares of valid data, small objects and large objects (lazy)."""
    total = codes.sizes["y"] * codes.sizes["x"]
    invalid, small, large = _counts_per_date(codes, (INVALID, SMALL, LARGE))
    return _summary(total - invalid, small, large, total)


def stored_date_summary(mask: xr.DataArray, valid: xr.DataArray) -> xr.Dataset:
    """:func:`date_summary` from an annotation store's ``mask`` and ``valid`` (lazy).

    The mask is clear where no data was valid, so its classes need no masking: equal to the
    summary of the codes, without rebuilding them (a whole-cube ``where`` per date).
    """
    (n_valid,) = _counts_per_date(valid, (1,))
    n_small, n_large = _counts_per_date(mask, (SMALL, LARGE))
    return _summary(n_valid, n_small, n_large, valid.sizes["y"] * valid.sizes["x"])


def _counts_per_date(array: xr.DataArray, values: tuple[int, ...]) -> list[xr.DataArray]:
    """Pixels of each date equal to each of ``values``, int64 ``(time,)`` each (lazy).

    One task per chunk counts every value (``np.count_nonzero``, 0.2 ms per 1024² chunk for
    three values); an xarray ``sum`` per value was three comparison and sum tasks per chunk.
    """
    data = array.transpose("time", "y", "x").data
    if isinstance(data, da.Array):
        per_chunk = da.map_blocks(
            _count_values,
            data,
            values=values,
            new_axis=3,
            chunks=(
                data.chunks[0],
                (1,) * data.numblocks[1],
                (1,) * data.numblocks[2],
                (len(values),),
            ),
            dtype=np.int64,
            meta=np.empty((0, 0, 0, 0), dtype=np.int64),
        )
        # Every date's counts in one chunk first: the sums and the shares made from them are
        # then one task each, not one per date.
        totals = per_chunk.rechunk({0: -1}).sum(axis=(1, 2))
    else:
        totals = _count_values(np.asarray(data), values=values)[:, 0, 0]
    # The scalar coordinates (e.g. the CRS) stay, as a reduction over y and x keeps them.
    coords = {
        name: coord for name, coord in array.coords.items() if not {"y", "x"} & set(coord.dims)
    }
    return [xr.DataArray(totals[:, i], dims=("time",), coords=coords) for i in range(len(values))]


def _count_values(block: np.ndarray, values: tuple[int, ...]) -> np.ndarray:
    counts = np.empty((block.shape[0], 1, 1, len(values)), dtype=np.int64)
    for t, date in enumerate(block):
        counts[t, 0, 0] = [np.count_nonzero(date == value) for value in values]
    return counts


def _summary(
    n_valid: xr.DataArray, n_small: xr.DataArray, n_large: xr.DataArray, total: int
) -> xr.Dataset:
    safe = n_valid.where(n_valid > 0)
    return xr.Dataset(
        {
            "valid_fraction": (n_valid / total).astype(np.float32),
            "small_fraction": (n_small / safe).astype(np.float32),
            "large_fraction": (n_large / safe).astype(np.float32),
        }
    )
