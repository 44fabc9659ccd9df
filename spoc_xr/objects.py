"""Connected objects of the mask cube, one table row per object per date.

Labelling
---------
Objects are the 8-connected components of each class of the *stored* mask, labelled date by date
(an object is never joined across dates: a boat seen on two dates is two rows). Each date is
labelled whole, in memory, with :func:`spoc_xr.kernels.label` (OpenCV, numbered exactly as
``scipy.ndimage.label``) rather than lazily with ``dask_image.ndmeasure.label``:

- one date of a Sentinel-2 tile is 10980 x 10980 px, 120 MB as uint8 (about 0.5 GB of int32
  labels), which fits in a worker, so an object cut by a chunk border is one object for free;
- ``dask_image``'s label needs a global relabelling pass over all chunks (a graph whose size grows
  with chunks x dates) and a second pass to measure objects, while in-memory labelling reads each
  date once;
- the mask is read from the store, never recomputed from a lazy chain, so labelling costs one
  read of one date per task. Dates are independent tasks (one ``dask.delayed`` per date, run on the
  active Dask client if there is one), each opening the store itself and reading only its date.

Object ids are unique per date: small objects are numbered 1..n_small in raster order of their
first pixel, large objects follow (n_small + 1 ..).

What a row says it is
---------------------
``class`` is the mask class ("small": boat-sized change; "large": cloud, shadow or other large
change). ``on_water`` is True when more than half of the object's pixels lie on the store's
``water`` layer (the rule of :func:`spoc_xr.evaluate.boat_components`, reused here), where water
comes from the reference's water index named in ``water_index`` ("NDWI", "MNDWI"); with
``water_index == "none"`` (no band allows one) every object counts as on water, as the evaluation
does. ``is_boat`` is ``class == "small" and on_water``; ``category`` names the same three-way split
the COCO export uses: "boat", "small_object" (small, on land) or "large_object".

Columns
-------
``date``, ``object_id``, ``class``, ``category``, ``area_px``, ``area_m2``, ``row_min``,
``col_min``, ``row_max``, ``col_max`` (pixel box, max exclusive), ``minx``, ``miny``, ``maxx``,
``maxy`` (box of the pixel *edges* in map coordinates, equal to the polygon's bounds),
``centroid_x``, ``centroid_y`` (mean of pixel centres, map coordinates), ``lon``, ``lat``
(centroid in WGS 84), ``length_m``, ``width_m`` (sides of the minimum rotated rectangle of the
outline), ``mean_<band>`` (mean raw value of each band of the stack on that date over the object's
pixels that are not nodata; only when the stack is given), ``on_water``, ``is_boat``,
``water_index`` and ``geometry`` (outline along pixel edges, in the stack's CRS).

Lengths and areas are in metres on the ground. In a projected CRS they come from the grid itself
(``area_m2`` is pixel count x pixel area, the rectangle is measured in map units, converted to
metres where the unit is another, such as the US survey foot), divided by the projection's scale at
the object where that departs from 1 by more than 1 % (Web Mercator's 10 m pixels are 5 m on the
ground at 60 degrees north; UTM's scale stays within it). In a
geographic CRS (e.g. EPSG:4326) each outline is projected into the UTM zone of its centroid, on
the CRS's own datum, and measured there (UTM's scale error is at most about 0.1 % in length and
0.2 % in area); the geometry, box and centroid columns stay in degrees of the stack's CRS. Any
other CRS (engineering, geocentric, ...) is refused with a
:class:`~spoc_xr.errors.GeoreferenceError`.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask
import geopandas as gpd
import numpy as np
import pandas as pd
import pyproj
import rasterio.features
import shapely
import xarray as xr
from affine import Affine
from pyproj.crs import ProjectedCRS
from pyproj.crs.coordinate_operation import UTMConversion
from scipy import ndimage
from shapely.geometry import MultiPolygon, Polygon, shape

from spoc_xr.detect import LARGE, SMALL
from spoc_xr.errors import GeoreferenceError, InputError, StoreError
from spoc_xr.evaluate import boat_components
from spoc_xr.ingest import metres_per_unit, projection_scales
from spoc_xr.store import check_output_path, open_store, remove_store

__all__ = [
    "CATEGORY_IDS",
    "LabeledDate",
    "check_object_inputs",
    "date_objects",
    "label_objects",
    "object_table",
    "open_annotation_store",
    "open_stack_store",
    "store_crs",
    "write_objects",
]

PathLike = str | os.PathLike[str]

CONNECTIVITY = 8
# COCO category ids of the export, also named in the ``category`` column.
CATEGORY_IDS: dict[str, int] = {"boat": 1, "small_object": 2, "large_object": 3}
WGS84 = "EPSG:4326"

BASE_COLUMNS = [
    "date",
    "object_id",
    "class",
    "category",
    "area_px",
    "area_m2",
    "row_min",
    "col_min",
    "row_max",
    "col_max",
    "minx",
    "miny",
    "maxx",
    "maxy",
    "centroid_x",
    "centroid_y",
    "lon",
    "lat",
    "length_m",
    "width_m",
]
TAIL_COLUMNS = ["on_water", "is_boat", "water_index"]


@dataclass(frozen=True)
class LabeledDate:
    """Objects of one date.

    Attributes
    ----------
    labels : numpy.ndarray
        int32 (y, x) object ids, 0 where no object.
    count : int
        Number of objects (ids run 1..count).
    classes : numpy.ndarray
        uint8 mask class (1 small, 2 large) per id; index 0 unused.
    on_water : numpy.ndarray
        bool per id; index 0 unused.
    """

    labels: np.ndarray
    count: int
    classes: np.ndarray
    on_water: np.ndarray

    @property
    def categories(self) -> np.ndarray:
        """COCO category id per object id (see :data:`CATEGORY_IDS`); index 0 is 0."""
        cats = np.where(
            self.classes == LARGE,
            CATEGORY_IDS["large_object"],
            np.where(self.on_water, CATEGORY_IDS["boat"], CATEGORY_IDS["small_object"]),
        ).astype(np.uint8)
        cats[0] = 0
        return cats


def label_objects(mask: np.ndarray, water: np.ndarray | None = None) -> LabeledDate:
    """Label the objects of one date's mask, small objects first.

    Parameters
    ----------
    mask : numpy.ndarray
        (y, x) uint8 mask: 0 clear, 1 small, 2 large.
    water : numpy.ndarray, optional
        (y, x) water layer (nonzero = water); None when the stack had no water index.

    Returns
    -------
    LabeledDate

    Examples
    --------
    >>> m = np.array([[1, 0, 2], [0, 1, 2]], dtype=np.uint8)
    >>> found = label_objects(m)
    >>> found.count, found.labels.tolist(), found.classes.tolist()
    (2, [[1, 0, 2], [0, 1, 2]], [0, 1, 2])
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise InputError(f"a date's mask must be 2-D (y, x), got shape {mask.shape}")
    small, n_small, small_wet = boat_components(mask == SMALL, water)
    large, n_large, large_wet = boat_components(mask == LARGE, water)
    labels = small
    labels[large > 0] = large[large > 0] + n_small
    classes = np.concatenate(
        [[0], np.full(n_small, SMALL, np.uint8), np.full(n_large, LARGE, np.uint8)]
    ).astype(np.uint8)
    on_water = np.concatenate([[False], small_wet[1:], large_wet[1:]]).astype(bool)
    return LabeledDate(labels, n_small + n_large, classes, on_water)


_TRACING = threading.Lock()


def _shapes(
    window: np.ndarray, *, connectivity: int, transform: Affine
) -> list[tuple[dict[str, Any], float]]:
    """``rasterio.features.shapes`` of the True pixels of ``window``, without rasterio's warnings.

    rasterio warns (NotGeoreferencedWarning) for its in-memory mask, for an identity transform and,
    now and then, when two threads trace at once; ``warnings.catch_warnings`` is not thread-safe
    (chips and dates are traced in parallel tasks). So no mask is passed (the False regions are
    traced and dropped), pixel-coordinate outlines are traced one pixel off and moved back,
    exactly (integer coordinates), and one thread traces at a time.
    """
    moved = transform.is_identity
    with _TRACING:
        traced = rasterio.features.shapes(
            window.astype(np.uint8),
            connectivity=connectivity,
            transform=Affine.translation(1, 1) if moved else transform,
        )
        kept = [(geom, value) for geom, value in traced if value == 1]
    if not moved:
        return kept
    return [
        (
            {
                "type": geom["type"],
                "coordinates": [
                    [(x - 1.0, y - 1.0) for x, y in ring] for ring in geom["coordinates"]
                ],
            },
            value,
        )
        for geom, value in kept
    ]


def outline(window: np.ndarray, transform: Affine) -> Polygon | MultiPolygon:
    """Outline of the True pixels of ``window`` along pixel edges, as a valid shapely geometry."""
    pieces = [
        shape(geom) for geom, _ in _shapes(window, connectivity=CONNECTIVITY, transform=transform)
    ]
    geom: Polygon | MultiPolygon = pieces[0] if len(pieces) == 1 else MultiPolygon(pieces)
    if not geom.is_valid:
        # Pixels joined only at a corner give a self-touching ring; make_valid splits it there.
        geom = shapely.make_valid(geom)
    return geom


def _edge_box(transform: Affine, r0: int, c0: int, r1: int, c1: int) -> tuple[float, ...]:
    xs, ys = zip(*(transform @ (c, r) for r in (r0, r1) for c in (c0, c1)), strict=True)
    return min(xs), min(ys), max(xs), max(ys)


def _rectangle_sides(geom: Polygon | MultiPolygon) -> tuple[float, float]:
    rect = shapely.minimum_rotated_rectangle(geom)
    corners = np.asarray(rect.exterior.coords) if isinstance(rect, Polygon) else None
    if corners is None or len(corners) < 4:
        return 0.0, 0.0
    sides = np.hypot(*np.diff(corners[:3], axis=0).T)
    return float(sides.max()), float(sides.min())


def _check_crs(crs: pyproj.CRS, where: str) -> None:
    """Raise GeoreferenceError unless metres can be had from ``crs`` (projected or geographic)."""
    if crs.is_projected or crs.is_geographic:
        return
    raise GeoreferenceError(
        f"{where} is in CRS {crs.name!r} ({crs.type_name}), neither projected nor geographic, "
        "so object areas and lengths cannot be given in metres: reproject the GeoTIFFs to a "
        "projected or geographic CRS (e.g. gdalwarp -t_srs EPSG:32631 in.tif out.tif) and "
        "ingest again"
    )


#: A projection whose scale at an object departs from 1 by more than this has its map lengths
#: and areas divided by it (Web Mercator: 1.27 at 38 degrees, 2 at 60): within it (UTM's
#: 0.9996-1.001) an area stays pixel count x pixel area, as users of such grids count it.
GROUND_SCALE_TOLERANCE = 0.01


def _ground_scales(crs: pyproj.CRS, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The projection's linear and areal scale at map points (map over ground), 1 where within
    ``GROUND_SCALE_TOLERANCE`` of it or unknown (:func:`spoc_xr.ingest.projection_scales`)."""
    linear, areal = projection_scales(crs, x, y)
    off = np.abs(linear - 1) > GROUND_SCALE_TOLERANCE
    return np.where(off, linear, 1.0), np.where(off, areal, 1.0)


def _utm_key(lon: float, lat: float) -> tuple[str, str]:
    """UTM zone number and hemisphere of a point (longitude from the CRS's prime meridian)."""
    # The plain 6-degree zone, without the Norway/Svalbard exceptions: those are conventions for
    # maps, while the plain zone keeps the point nearest its central meridian (least scale error).
    zone = int(np.floor((lon + 180.0) / 6.0)) % 60 + 1
    return str(zone), "S" if lat < 0 else "N"


def _geographic_sizes(
    geoms: Sequence[Polygon | MultiPolygon], crs: pyproj.CRS, lon: np.ndarray, lat: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Area (m²), length and width (m) of outlines in a geographic CRS.

    Parameters
    ----------
    geoms : sequence of shapely geometries
        Outlines in ``crs`` (x longitude, y latitude, in the CRS's angular unit).
    crs : pyproj.CRS
        The geographic CRS of the grid.
    lon, lat : numpy.ndarray
        WGS 84 centroid of each outline; picks its UTM zone.

    Returns
    -------
    tuple of numpy.ndarray
        ``area_m2``, ``length_m`` and ``width_m``, one value per outline.
    """
    geodetic = crs.geodetic_crs
    if geodetic is None:  # a geographic CRS always has one; this keeps the type checker sure
        raise GeoreferenceError(f"{crs.name} has no geodetic CRS; reproject to a projected CRS")
    meridian = crs.prime_meridian
    # Longitudes of a CRS on a non-Greenwich meridian (e.g. NTF Paris) count from that meridian.
    meridian_deg = (
        0.0
        if meridian is None
        else float(np.degrees(float(meridian.longitude) * float(meridian.unit_conversion_factor)))
    )
    # UTM on the CRS's own datum: a pure projection, no datum shift between the outline and the
    # plane it is measured on. One transformer per zone (building one takes tens of ms).
    transformers: dict[tuple[str, str], pyproj.Transformer] = {}
    sizes = np.zeros((len(geoms), 3))
    for index, geom in enumerate(geoms):
        key = _utm_key(float(lon[index]) - meridian_deg, float(lat[index]))
        if key not in transformers:
            utm = ProjectedCRS(UTMConversion(*key), geodetic_crs=geodetic)
            transformers[key] = pyproj.Transformer.from_crs(crs, utm, always_xy=True)
        to_utm = transformers[key]

        def project(xy: np.ndarray, to_utm: pyproj.Transformer = to_utm) -> np.ndarray:
            return np.column_stack(to_utm.transform(xy[:, 0], xy[:, 1]))

        metric = shapely.transform(geom, project)
        sizes[index] = (metric.area, *_rectangle_sides(metric))
    return sizes[:, 0], sizes[:, 1], sizes[:, 2]


def date_objects(
    mask: np.ndarray,
    transform: Affine,
    crs: Any,
    *,
    date: Any = None,
    water: np.ndarray | None = None,
    water_index: str = "none",
    image: Any = None,
    band_names: Sequence[str] = (),
    nodata: float | None = None,
) -> pd.DataFrame:
    """Object rows of one date (see the module docstring for the columns).

    Parameters
    ----------
    mask : numpy.ndarray
        (y, x) uint8 mask of the date.
    transform : affine.Affine
        Pixel-edge transform of the grid.
    crs : pyproj.CRS or str
        CRS of the grid, projected or geographic (see the module docstring for how metres are
        had in a geographic CRS).
    date : datetime-like, optional
        Value of the ``date`` column.
    water : numpy.ndarray, optional
        (y, x) water layer; None counts every object as on water.
    water_index : str
        Name of the water index, copied into the ``water_index`` column.
    image : array-like, optional
        (band, y, x) image of the date; read one band at a time (a lazily indexed store variable
        keeps memory at one band).
    band_names : sequence of str
        Names of the bands of ``image`` (columns ``mean_<band>``).
    nodata : float, optional
        Image value left out of the band means.

    Returns
    -------
    pandas.DataFrame
        With a ``geometry`` column of shapely objects.

    Raises
    ------
    GeoreferenceError
        If ``crs`` is neither projected nor geographic.

    Examples
    --------
    >>> m = np.zeros((4, 4), np.uint8); m[1:3, 1:3] = 1
    >>> rows = date_objects(m, Affine(10, 0, 0, 0, -10, 40), "EPSG:32631")
    >>> rows[["area_px", "minx", "maxy", "length_m"]].values.tolist()
    [[4.0, 10.0, 30.0, 20.0]]
    """
    crs = pyproj.CRS.from_user_input(crs)
    _check_crs(crs, "the grid")
    found = label_objects(mask, water)
    columns = BASE_COLUMNS + [f"mean_{b}" for b in band_names] + TAIL_COLUMNS + ["geometry"]
    if found.count == 0:
        return pd.DataFrame({name: [] for name in columns})
    labels = found.labels
    ids = np.arange(1, found.count + 1)
    area = np.bincount(labels.ravel(), minlength=found.count + 1)[1:]
    pixel_m2 = abs(transform.a * transform.e - transform.b * transform.d)
    rows: dict[str, list[Any]] = {name: [] for name in [*BASE_COLUMNS, "geometry"]}
    for obj, box in zip(ids, ndimage.find_objects(labels), strict=True):
        r0, r1, c0, c1 = box[0].start, box[0].stop, box[1].start, box[1].stop
        window = labels[box] == obj
        rr, cc = np.nonzero(window)
        cx, cy = transform @ (c0 + cc.mean() + 0.5, r0 + rr.mean() + 0.5)
        geom = outline(window, transform @ Affine.translation(c0, r0))
        # In degrees the rectangle means nothing; a geographic CRS measures it after the loop.
        length, width = _rectangle_sides(geom) if crs.is_projected else (np.nan, np.nan)
        minx, miny, maxx, maxy = _edge_box(transform, r0, c0, r1, c1)
        values = [r0, c0, r1, c1, minx, miny, maxx, maxy, cx, cy, length, width, geom]
        names = ["row_min", "col_min", "row_max", "col_max", "minx", "miny", "maxx", "maxy"]
        names += ["centroid_x", "centroid_y", "length_m", "width_m", "geometry"]
        for name, value in zip(names, values, strict=True):
            rows[name].append(value)
    to_lonlat = pyproj.Transformer.from_crs(crs, WGS84, always_xy=True)
    lon, lat = to_lonlat.transform(np.asarray(rows["centroid_x"]), np.asarray(rows["centroid_y"]))
    # Metres per map unit: 1 for metres, 0.3048 for feet (EPSG:2263 and the like).
    metre = metres_per_unit(crs)
    area_m2: Any = area * pixel_m2 * metre**2
    length_m: Any = np.asarray(rows["length_m"], dtype=np.float64) * metre
    width_m: Any = np.asarray(rows["width_m"], dtype=np.float64) * metre
    if crs.is_geographic:
        # Degrees are no metres: measure each outline again in a local metric CRS.
        area_m2, length_m, width_m = _geographic_sizes(
            rows["geometry"], crs, np.atleast_1d(lon), np.atleast_1d(lat)
        )
    elif found.count:
        linear, areal = _ground_scales(
            crs,
            np.asarray(rows["centroid_x"], dtype=np.float64),
            np.asarray(rows["centroid_y"], dtype=np.float64),
        )
        area_m2, length_m, width_m = area_m2 / areal, length_m / linear, width_m / linear
    classes = found.classes[1:]
    names_by_id = {v: k for k, v in CATEGORY_IDS.items()}
    table = pd.DataFrame(
        {
            "date": pd.Series([pd.Timestamp(date) if date is not None else pd.NaT] * found.count),
            "object_id": ids.astype(np.int64),
            "class": np.where(classes == SMALL, "small", "large"),
            "category": [names_by_id[c] for c in found.categories[1:]],
            "area_px": area.astype(np.float64),
            "area_m2": area_m2,
            **{k: rows[k] for k in BASE_COLUMNS[6:16]},
            "lon": np.asarray(lon),
            "lat": np.asarray(lat),
            "length_m": length_m,
            "width_m": width_m,
        }
    )
    if image is not None:
        for index, band in enumerate(band_names):
            band_values = np.asarray(image[index], dtype=np.float64)
            good = np.isfinite(band_values)
            if nodata is not None:
                good &= band_values != nodata
            flat = labels.ravel()[good.ravel()]
            weights = band_values.ravel()[good.ravel()]
            sums = np.bincount(flat, weights=weights, minlength=ids.size + 1)
            counts = np.bincount(flat, minlength=ids.size + 1)
            with np.errstate(invalid="ignore", divide="ignore"):
                table[f"mean_{band}"] = (sums / counts)[1:]
    table["on_water"] = found.on_water[1:]
    table["is_boat"] = (classes == SMALL) & found.on_water[1:]
    table["water_index"] = water_index
    table["geometry"] = rows["geometry"]
    return table[columns]


# --------------------------------------------------------------------------------------------
# Stores


def open_annotation_store(path: PathLike) -> xr.Dataset:
    """Open an annotation store of ``spoc-xr annotate`` lazily and check it holds a mask.

    Examples
    --------
    >>> ann = open_annotation_store("out.zarr")  # doctest: +SKIP
    """
    if not Path(path).expanduser().exists():
        raise InputError(f"annotation store {str(path)!r} does not exist; run spoc-xr annotate")
    ds = open_store(path)
    if "mask" not in ds.data_vars:
        raise StoreError(
            f"{str(path)!r} holds no 'mask' variable; pass a store written by spoc-xr annotate"
        )
    return ds


def open_stack_store(path: PathLike) -> xr.Dataset:
    """Open a stack store of ``spoc-xr ingest`` lazily and check it holds ``stack``.

    Examples
    --------
    >>> stack = open_stack_store("stack.zarr")["stack"]  # doctest: +SKIP
    """
    if not Path(path).expanduser().exists():
        raise InputError(f"stack store {str(path)!r} does not exist; run spoc-xr ingest")
    ds = open_store(path)
    if "stack" not in ds.data_vars:
        raise StoreError(
            f"{str(path)!r} holds no 'stack' variable; pass a store written by spoc-xr ingest"
        )
    return ds


def check_same_grid(annotations: xr.Dataset, stack: xr.Dataset, names: Sequence[str]) -> None:
    """Raise InputError unless both stores share the y/x grid and every annotated date."""
    a_shape = (annotations.sizes["y"], annotations.sizes["x"])
    s_shape = (stack.sizes["y"], stack.sizes["x"])
    if a_shape != s_shape:
        raise InputError(
            f"{names[0]!r} is {a_shape[0]} x {a_shape[1]} px but {names[1]!r} is "
            f"{s_shape[0]} x {s_shape[1]} px; pass the stack the annotation was made from"
        )
    missing = np.setdiff1d(annotations.time.values, stack.time.values)
    if missing.size:
        raise InputError(
            f"{missing.size} annotated date(s) (first {str(missing[0])[:19]}) are not in "
            f"{names[1]!r}; pass the stack the annotation was made from"
        )


def store_crs(ds: xr.Dataset | xr.DataArray) -> pyproj.CRS:
    """CRS of a store: rioxarray's, else the ``crs_wkt`` of ``spatial_ref``.

    Raises
    ------
    GeoreferenceError
        If the store carries no CRS.

    Examples
    --------
    >>> store_crs(open_annotation_store("out.zarr"))  # doctest: +SKIP
    <Projected CRS: EPSG:32631>
    """
    import rioxarray  # noqa: F401  (registers .rio)

    var = ds["mask"] if isinstance(ds, xr.Dataset) and "mask" in ds else ds
    crs = var.rio.crs
    if crs is not None:
        return pyproj.CRS.from_user_input(crs.to_wkt())
    wkt = ds.coords["spatial_ref"].attrs.get("crs_wkt") if "spatial_ref" in ds.coords else None
    if not wkt:
        raise GeoreferenceError(
            "the store carries no CRS (no spatial_ref coordinate); ingest georeferenced GeoTIFFs"
        )
    return pyproj.CRS.from_wkt(wkt)


def store_transform(ds: xr.Dataset) -> Affine:
    """Pixel-edge transform of a store's grid, from its pixel-centre ``x``/``y`` coordinates."""
    x, y = ds["x"].values.astype(np.float64), ds["y"].values.astype(np.float64)
    if x.size < 2 or y.size < 2:
        import rioxarray  # noqa: F401

        return ds.rio.transform()
    dx, dy = x[1] - x[0], y[1] - y[0]
    return Affine(dx, 0.0, x[0] - dx / 2, 0.0, dy, y[0] - dy / 2)


def _raw_store(path: PathLike) -> xr.Dataset:
    # Inside a task: no Dask, lazily indexed, so only the chunks of one date are read.
    return xr.open_zarr(Path(path).expanduser(), chunks=None, consolidated=False, zarr_format=3)


def _objects_of_date(
    annotations: PathLike,
    index: int,
    stack: PathLike | None,
    transform: Affine,
    crs_wkt: str,
) -> pd.DataFrame:
    ann = _raw_store(annotations)
    date = ann.time.values[index]
    water_index = str(ann["water"].attrs.get("index", "none")) if "water" in ann else "none"
    water = None
    if "water" in ann and water_index != "none":
        water = np.asarray(ann["water"].values).astype(bool)
    mask = np.asarray(ann["mask"].isel(time=index).values)
    image, bands, nodata = None, [], None
    if stack is not None:
        st = _raw_store(stack)
        position = int(np.flatnonzero(st.time.values == date)[0])
        image = st["stack"].variable[position]
        bands = [str(b) for b in st["band"].values.tolist()]
        nodata = st["stack"].attrs.get("nodata")
    return date_objects(
        mask,
        transform,
        pyproj.CRS.from_wkt(crs_wkt),
        date=date,
        water=water,
        water_index=water_index,
        image=image,
        band_names=bands,
        nodata=nodata,
    )


def check_object_inputs(
    annotations: PathLike, *, stack: PathLike | None = None
) -> tuple[xr.Dataset, list[str], pyproj.CRS]:
    """Check the stores :func:`object_table` reads (cheap: metadata only).

    Returns
    -------
    tuple
        The lazily opened annotation Dataset, the stack's band names (empty without a stack)
        and the CRS (projected or geographic).

    Raises
    ------
    GeoreferenceError
        If the annotation store has no CRS, or one neither projected nor geographic.

    Examples
    --------
    >>> ann, bands, crs = check_object_inputs("out.zarr", stack="stack.zarr")  # doctest: +SKIP
    """
    ann = open_annotation_store(annotations)
    bands: list[str] = []
    if stack is not None:
        st = open_stack_store(stack)
        check_same_grid(ann, st, [str(annotations), str(stack)])
        bands = [str(b) for b in st["band"].values.tolist()]
    try:
        crs = store_crs(ann)
    except GeoreferenceError as error:
        raise GeoreferenceError(
            f"{str(annotations)!r} carries no CRS (no spatial_ref coordinate), so object areas "
            "and lengths cannot be given in metres: give the GeoTIFFs a CRS (gdal_edit.py -a_srs, "
            "or gdalwarp -t_srs to reproject) and ingest again"
        ) from error
    _check_crs(crs, repr(str(annotations)))
    return ann, bands, crs


def object_table(annotations: PathLike, *, stack: PathLike | None = None) -> gpd.GeoDataFrame:
    """One row per object per date of an annotation store, as a GeoDataFrame.

    Dates are labelled in parallel (one task per date, on the active Dask client if any).

    Parameters
    ----------
    annotations : str or os.PathLike
        Annotation store written by ``spoc-xr annotate``.
    stack : str or os.PathLike, optional
        The stack store the annotation was made from; gives the ``mean_<band>`` columns (left
        out without it).

    Returns
    -------
    geopandas.GeoDataFrame
        In the stack's CRS; columns as in the module docstring.

    Raises
    ------
    InputError, StoreError, GeoreferenceError
        If a store is missing or not a spoc_xr store, the grids differ, or the CRS is missing
        or neither projected nor geographic.

    Examples
    --------
    >>> table = object_table("out.zarr", stack="stack.zarr")  # doctest: +SKIP
    >>> table[table.is_boat].plot()  # doctest: +SKIP
    """
    ann, bands, crs = check_object_inputs(annotations, stack=stack)
    transform = store_transform(ann)
    tasks = [
        dask.delayed(_objects_of_date, pure=True)(
            annotations, index, stack, transform, crs.to_wkt()
        )
        for index in range(ann.sizes["time"])
    ]
    parts = [part for part in dask.compute(*tasks) if len(part)]
    columns = BASE_COLUMNS + [f"mean_{b}" for b in bands] + TAIL_COLUMNS
    if parts:
        table = pd.concat(parts, ignore_index=True)
    else:
        table = pd.DataFrame({name: [] for name in [*columns, "geometry"]})
        table["date"] = pd.to_datetime(table["date"])
    return gpd.GeoDataFrame(table, geometry="geometry", crs=crs)


def write_objects(
    table: gpd.GeoDataFrame, path: PathLike, *, geojson: bool = False, overwrite: bool = False
) -> list[Path]:
    """Write an object table as GeoParquet, and as GeoJSON (WGS 84) beside it on request.

    Parameters
    ----------
    table : geopandas.GeoDataFrame
        From :func:`object_table`.
    path : str or os.PathLike
        The ``.parquet`` file; the GeoJSON gets the same name with suffix ``.geojson``.
    geojson : bool
        Also write the GeoJSON (GeoJSON requires longitude/latitude, so it is reprojected).
    overwrite : bool
        Replace existing files.

    Returns
    -------
    list of pathlib.Path
        The files written.

    Examples
    --------
    >>> write_objects(object_table("out.zarr"), "objects.parquet", geojson=True)  # doctest: +SKIP
    [PosixPath('objects.parquet'), PosixPath('objects.geojson')]
    """
    outputs = objects_outputs(path, geojson=geojson)
    for out in outputs:
        check_output_path(out, overwrite=overwrite, kind="file")
    for out in outputs:
        remove_store(out)
    table.to_parquet(outputs[0])
    if geojson:
        table.to_crs(WGS84).to_file(outputs[1], driver="GeoJSON")
    return outputs


def objects_outputs(path: PathLike, *, geojson: bool) -> list[Path]:
    """The files :func:`write_objects` writes for ``path``."""
    parquet = Path(path).expanduser()
    return [parquet, parquet.with_suffix(".geojson")] if geojson else [parquet]
