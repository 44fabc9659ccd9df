"""Object tables: labels and boxes against scipy, per-date objects, GeoParquet, polygons, CLI."""

from __future__ import annotations

import contextlib
from pathlib import Path

import geopandas as gpd
import numpy as np
import pyproj
import pytest
import rioxarray  # noqa: F401  (registers .rio)
import shapely
import xarray as xr
from affine import Affine
from scipy import ndimage
from shapely import box as shapely_box

from spoc_xr import cli
from spoc_xr.errors import GeoreferenceError, InputError, OutputError, StoreError
from spoc_xr.objects import (
    _rectangle_sides,
    date_objects,
    label_objects,
    object_table,
    store_transform,
    write_objects,
)
from spoc_xr.store import write_dataset
from tests.helpers import make_stack

SHAPE = (15, 16)
# Chunks that do not divide the shape and are smaller than the objects below.
CHUNKS = {"time": 1, "y": 4, "x": 5}


def hand_masks(n_time: int = 3, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    masks = np.zeros((n_time, *SHAPE), dtype=np.uint8)
    for t in range(n_time):
        masks[t] = np.where(rng.random(SHAPE) < 0.15, 1, 0)
        masks[t, 9:14, 10:16] = 2  # a large object across chunk borders (y 12, x 10 and 15)
    masks[:2, 1:8, 2:10] = 0  # a clear ring keeps the object below apart from random pixels
    masks[:2, 2:7, 3:9] = 1  # one small object over chunk borders y=4 and x=5, on dates 0 and 1
    return masks


def write_annotations(
    path: Path,
    masks: np.ndarray,
    *,
    water: np.ndarray | None = None,
    chunks: dict[str, int] | None = None,
    crs: str = "EPSG:32631",
    xy: tuple[np.ndarray, np.ndarray] | None = None,
) -> None:
    stack = make_stack(n_time=masks.shape[0], shape=masks.shape[1:])
    if xy is not None:  # pixel-centre x/y of another grid (e.g. degrees for a lon/lat CRS)
        stack = stack.assign_coords(x=xy[0], y=xy[1])
    if water is None:
        water = np.zeros(masks.shape[1:], dtype=np.uint8)
        water[:, : masks.shape[2] // 2] = 1
    ds = xr.Dataset(
        {
            "mask": (("time", "y", "x"), masks),
            "valid": (("time", "y", "x"), np.ones_like(masks)),
            "water": (("y", "x"), water, {"index": "NDWI"}),
            "reference": (("band", "y", "x"), stack.isel(time=0).values.astype(np.float32)),
        },
        coords={"time": stack.time, "y": stack.y, "x": stack.x, "band": stack.band},
        attrs={"spoc_xr": {"kind": "annotations"}},
    ).rio.write_crs(crs)
    write_dataset(ds.chunk(chunks or CHUNKS), path, overwrite=False)


def write_stack(path: Path, n_time: int, shape: tuple[int, int]) -> xr.DataArray:
    stack = make_stack(n_time=n_time, shape=shape).rio.write_crs("EPSG:32631")
    ds = stack.to_dataset()
    ds.attrs["spoc_xr"] = {"kind": "stack"}
    write_dataset(ds.chunk({"time": 1}), path, overwrite=False)
    return stack


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, np.ndarray]:
    # Read-only inputs, written once per module: small chunks make many files.
    folder = tmp_path_factory.mktemp("objects")
    masks = hand_masks()
    write_annotations(folder / "out.zarr", masks)
    write_stack(folder / "stack.zarr", masks.shape[0], SHAPE)
    return folder / "out.zarr", folder / "stack.zarr", masks


def scipy_boxes(mask: np.ndarray) -> set[tuple[str, int, int, int, int]]:
    boxes = set()
    for value, name in ((1, "small"), (2, "large")):
        labels, _ = ndimage.label(mask == value, structure=np.ones((3, 3)))
        for box in ndimage.find_objects(labels):
            boxes.add((name, box[0].start, box[1].start, box[0].stop, box[1].stop))
    return boxes


def test_counts_and_boxes_equal_scipy_across_chunk_borders(stores) -> None:
    annotations, _, masks = stores
    table = object_table(annotations)
    for t, date in enumerate(xr.open_zarr(annotations, consolidated=False).time.values):
        rows = table[table["date"] == date]
        expected = scipy_boxes(masks[t])
        found = {
            (r["class"], r.row_min, r.col_min, r.row_max, r.col_max) for _, r in rows.iterrows()
        }
        assert len(rows) == len(expected)
        assert found == expected
        assert rows["object_id"].is_unique
    # The 5 x 6 object crossing two chip borders is one object of 30 pixels on date 0.
    big = table[(table.row_min == 2) & (table.col_min == 3) & (table["class"] == "small")]
    assert len(big) == 2
    assert set(big.area_px) == {30.0}
    assert set(big.area_m2) == {3000.0}


def test_an_object_on_two_dates_is_two_rows(stores) -> None:
    annotations, _, _ = stores
    table = object_table(annotations)
    rows = table[(table.row_min == 2) & (table.col_min == 3) & (table["class"] == "small")]
    assert rows["date"].nunique() == 2


def test_boxes_sit_on_the_polygons(stores) -> None:
    annotations, _, _ = stores
    table = object_table(annotations)
    bounds = np.array([g.bounds for g in table.geometry])
    np.testing.assert_allclose(bounds, table[["minx", "miny", "maxx", "maxy"]].to_numpy())
    np.testing.assert_allclose(table.geometry.area, table.area_m2)
    assert table.geometry.is_valid.all()


def test_box_map_coordinates_are_pixel_edges(stores) -> None:
    annotations, _, _ = stores
    transform = store_transform(xr.open_zarr(annotations, consolidated=False))
    table = object_table(annotations)
    row = table.iloc[0]
    assert (row.minx, row.maxy) == transform @ (row.col_min, row.row_min)
    assert (row.maxx, row.miny) == transform @ (row.col_max, row.row_max)


def test_water_and_boat_columns(stores) -> None:
    annotations, _, _ = stores
    table = object_table(annotations)
    big = table[(table.row_min == 2) & (table.col_min == 3)].iloc[0]
    # Columns 3..8 lie on the water half (x < 8) for 5 of 6 columns.
    assert big.on_water and big.is_boat and big.category == "boat"
    cloud = table[table["class"] == "large"].iloc[0]
    assert not cloud.is_boat and cloud.category == "large_object"
    assert set(table.water_index) == {"NDWI"}
    assert (table.is_boat == ((table["class"] == "small") & table.on_water)).all()


def test_band_means_come_from_the_stack(stores) -> None:
    annotations, stack_path, masks = stores
    table = object_table(annotations, stack=stack_path)
    stack = xr.open_zarr(stack_path, consolidated=False)["stack"].values
    big = table[(table.row_min == 2) & (table.col_min == 3)].iloc[0]
    pixels = masks[0] == 0
    pixels[:] = False
    pixels[2:7, 3:9] = True
    assert big.mean_B08 == pytest.approx(stack[0, 3][pixels].mean())
    assert "mean_B02" not in object_table(annotations).columns


def test_rotated_rectangle_length_and_width() -> None:
    mask = np.zeros((20, 20), dtype=np.uint8)
    for k in range(8):  # a diagonal bar, 1 px wide
        mask[2 + k, 2 + k] = 1
    rows = date_objects(mask, Affine(10, 0, 0, 0, -10, 200), "EPSG:32631")
    assert len(rows) == 1
    assert rows.length_m[0] == pytest.approx(np.hypot(80, 80), rel=0.15)
    assert rows.width_m[0] < rows.length_m[0] / 3


def test_label_objects_numbers_small_then_large() -> None:
    mask = np.array([[2, 0, 1], [0, 0, 0], [1, 0, 2]], dtype=np.uint8)
    found = label_objects(mask)
    assert found.count == 4
    assert found.classes.tolist() == [0, 1, 1, 2, 2]
    assert found.labels.tolist() == [[3, 0, 1], [0, 0, 0], [2, 0, 4]]


def test_geoparquet_round_trip_with_crs(stores, tmp_path: Path) -> None:
    annotations, stack_path, _ = stores
    table = object_table(annotations, stack=stack_path)
    written = write_objects(table, tmp_path / "objects.parquet", geojson=True)
    back = gpd.read_parquet(written[0])
    assert back.crs.to_epsg() == 32631
    assert back.geometry.equals(table.geometry)
    assert list(back.columns) == list(table.columns)
    lonlat = gpd.read_file(written[1])
    assert lonlat.crs.to_epsg() == 4326
    bounds = lonlat.geometry.bounds
    assert ((bounds.minx <= table.lon) & (table.lon <= bounds.maxx)).all()
    assert ((bounds.miny <= table.lat) & (table.lat <= bounds.maxy)).all()
    with pytest.raises(OutputError):
        write_objects(table, tmp_path / "objects.parquet")


def test_missing_or_foreign_store_is_refused(tmp_path: Path, stores) -> None:
    annotations, stack_path, _ = stores
    with pytest.raises(InputError):
        object_table(tmp_path / "nope.zarr")
    with pytest.raises(StoreError):
        object_table(stack_path)
    small = tmp_path / "small_stack.zarr"
    write_stack(small, 3, (12, 12))
    with pytest.raises(InputError, match="px"):
        object_table(annotations, stack=small)


def test_object_table_of_an_annotated_stack_finds_the_boat(tmp_path: Path) -> None:
    from spoc_xr.pipeline import annotate

    stack = make_stack().rio.write_crs("EPSG:32631")
    write_dataset(annotate(stack.chunk({"time": 1})), tmp_path / "out.zarr", overwrite=False)
    table = object_table(tmp_path / "out.zarr")
    boats = table[table.is_boat]
    assert len(boats) == 1
    assert (boats.row_min.iloc[0], boats.col_min.iloc[0]) == (5, 5)
    assert str(boats.date.iloc[0])[:10] == "2023-03-11"


@pytest.fixture
def no_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "_client", lambda args, quiet=False: contextlib.nullcontext())


def test_cli_objects_writes_parquet_and_geojson(stores, tmp_path: Path, no_cluster) -> None:
    annotations, stack_path, _ = stores
    out = tmp_path / "objects.parquet"
    args = ["objects", str(annotations), str(out), "--stack", str(stack_path), "--geojson"]
    assert cli.main(args) == 0
    assert out.is_file() and out.with_suffix(".geojson").is_file()
    assert cli.main(args) == 2  # exists without --overwrite
    assert cli.main([*args, "--overwrite"]) == 0


def test_cli_objects_bad_input_returns_2(tmp_path: Path, no_cluster) -> None:
    assert cli.main(["objects", str(tmp_path / "none.zarr"), str(tmp_path / "o.parquet")]) == 2
    assert not (tmp_path / "o.parquet").exists()


# --------------------------------------------------------------------------------------------
# Metres in a geographic CRS

GEOD = pyproj.Geod(ellps="WGS84")
STEP = 0.0001  # degrees per pixel: about 11 m north-south, 8 m east-west at 45 degrees


def geodesic_area(west: float, south: float, east: float, north: float) -> float:
    """Geodesic area (m²) of a lon/lat box, from pyproj.Geod (no projection)."""
    return abs(GEOD.geometry_area_perimeter(shapely_box(west, south, east, north))[0])


def geodesic_rectangle(west: float, south: float, east: float, north: float) -> tuple[float, ...]:
    """Geodesic area, long side and short side of a lon/lat box."""
    area = geodesic_area(west, south, east, north)
    _, _, ns = GEOD.inv(west, south, west, north)
    # The east-west sides differ a little (parallels shrink poleward); take their mean.
    ew = np.mean([GEOD.inv(west, lat, east, lat)[2] for lat in (south, north)])
    return area, max(ns, ew), min(ns, ew)


def relative_error(found: float, expected: float) -> float:
    return abs(found - expected) / expected


@pytest.mark.parametrize(
    ("west", "north"),
    [
        (5.975, 45.02),  # objects on both sides of 6 E, the border of UTM zones 31 and 32
        (-70.02, -59.98),  # southern hemisphere, high latitude
    ],
)
def test_geographic_grid_sizes_match_geodesic(west: float, north: float) -> None:
    mask = np.zeros((300, 500), dtype=np.uint8)
    rectangles = [(40, 60, 100, 180), (120, 340, 280, 380)]  # rows r0:r1, cols c0:c1
    for r0, c0, r1, c1 in rectangles:
        mask[r0:r1, c0:c1] = 1
    diagonal = np.zeros_like(mask, dtype=bool)
    for k in range(120):  # a band 3 px thick, at 45 degrees in pixels
        diagonal[170 + k // 2, 20 + k : 23 + k] = True
    mask[diagonal] = 2
    transform = Affine(STEP, 0, west, 0, -STEP, north)
    rows = date_objects(mask, transform, "EPSG:4326")
    assert len(rows) == 3
    errors = []
    for r0, c0, r1, c1 in rectangles:
        row = rows[(rows.row_min == r0) & (rows.col_min == c0)].iloc[0]
        (west_e, north_e), (east_e, south_e) = transform @ (c0, r0), transform @ (c1, r1)
        expected = geodesic_rectangle(west_e, south_e, east_e, north_e)
        found = (row.area_m2, row.length_m, row.width_m)
        errors += [relative_error(f, e) for f, e in zip(found, expected, strict=True)]
        # Geometry and boxes stay in degrees of the grid.
        assert row.geometry.bounds == pytest.approx((west_e, south_e, east_e, north_e))
        assert (row.minx, row.maxy) == (west_e, north_e)
    band = rows[rows["class"] == "large"].iloc[0]
    # Pixel count times the geodesic area of one pixel at the band's centroid.
    lon, lat = transform @ (band.col_min, (band.row_min + band.row_max) / 2)
    pixel = geodesic_area(lon, lat - STEP / 2, lon + STEP, lat + STEP / 2)
    errors.append(relative_error(band.area_m2, diagonal.sum() * pixel))
    assert band.length_m > 3 * band.width_m > 0
    assert max(errors) < 0.01, errors
    assert rows.lon.between(west, west + 0.05).all() and rows.lat.between(north - 0.03, north).all()


def test_projected_grid_sizes_are_the_pixel_and_map_values() -> None:
    # A projected grid near true scale (UTM) keeps the plain values: pixel count x pixel area and
    # the rectangle of the outline in map units, exactly (no reprojection, no rounding).
    crs = "EPSG:32631"
    mask = np.zeros((40, 40), dtype=np.uint8)
    mask[3:9, 4:16] = 1
    mask[20:35, 5:30] = 2
    for k in range(10):
        mask[12 + k, 20 + k] = 1
    rows = date_objects(mask, Affine(10, 0, 500000, 0, -10, 5600000), crs)
    assert rows.area_m2.tolist() == (rows.area_px * 100.0).tolist()
    sides = [_rectangle_sides(geom) for geom in rows.geometry]
    assert rows.length_m.tolist() == [s[0] for s in sides]
    assert rows.width_m.tolist() == [s[1] for s in sides]
    first = rows[(rows.row_min == 3) & (rows.col_min == 4)].iloc[0]
    assert (first.area_m2, first.length_m, first.width_m) == (7200.0, 120.0, 60.0)
    assert rows.geometry.map(lambda g: g.area).tolist() == rows.area_m2.tolist()


@pytest.mark.parametrize("latitude", [38.0, 60.0])
def test_web_mercator_sizes_are_on_the_ground(latitude: float) -> None:
    # Web Mercator's 10 m pixels are 10 cos(latitude) m on the ground (5 m at 60 degrees): the
    # table gave map units, 4 times the ground area there.
    from pyproj import Transformer

    x0, y0 = Transformer.from_crs(4326, 3857, always_xy=True).transform(10.0, latitude)
    mask = np.zeros((40, 40), dtype=np.uint8)
    mask[3:9, 4:16] = 1
    (row,) = date_objects(mask, Affine(10, 0, x0, 0, -10, y0), "EPSG:3857").itertuples()
    # The same outline measured on the ground, in its UTM zone (within 1 %: Web Mercator is
    # spherical on ellipsoidal coordinates, and pyproj's factors for it are off by 0.2-0.3 %).
    to_utm = Transformer.from_crs(3857, 32632, always_xy=True)
    utm = shapely.transform(row.geometry, lambda xy: np.column_stack(to_utm.transform(*xy.T)))
    assert row.area_m2 == pytest.approx(utm.area, rel=1e-2)
    scale = 1 / np.cos(np.radians(row.lat))
    assert (row.length_m, row.width_m) == pytest.approx((120 / scale, 60 / scale), rel=1e-2)


def test_a_grid_in_feet_gives_metres() -> None:
    mask = np.zeros((10, 10), dtype=np.uint8)
    mask[3:9, 4:6] = 1
    # EPSG:2263 (New York Long Island) counts in US survey feet: 1200/3937 m each.
    (row,) = date_objects(mask, Affine(10, 0, 1000000, 0, -10, 200000), "EPSG:2263").itertuples()
    foot = 1200 / 3937
    assert row.area_m2 == pytest.approx(12 * 100 * foot**2, rel=1e-9)
    assert (row.length_m, row.width_m) == pytest.approx((60 * foot, 20 * foot), rel=1e-9)


def lonlat_xy(shape: tuple[int, int], west: float, north: float) -> tuple[np.ndarray, ...]:
    """Pixel-centre x/y coordinates of a north-up lon/lat grid of STEP-degree pixels."""
    n_y, n_x = shape
    return west + STEP * (np.arange(n_x) + 0.5), north - STEP * (np.arange(n_y) + 0.5)


def test_object_table_of_a_lonlat_store(tmp_path: Path, no_cluster) -> None:
    masks = hand_masks()
    path = tmp_path / "lonlat.zarr"
    write_annotations(path, masks, crs="EPSG:4326", xy=lonlat_xy(SHAPE, 12.5, 45.0))
    table = object_table(path)
    assert table.crs.to_epsg() == 4326
    assert len(table) == sum(len(scipy_boxes(m)) for m in masks)
    for column in ("area_m2", "length_m", "width_m"):
        assert np.isfinite(table[column]).all() and (table[column] > 0).all(), column
    # The 5 x 6 px object: 30 pixels of about 11.1 m x 7.9 m.
    big = table[(table.row_min == 2) & (table.col_min == 3) & (table["class"] == "small")]
    assert big.area_m2.to_numpy() == pytest.approx(30 * 11.1 * 7.87, rel=0.01)
    assert table.geometry.total_bounds == pytest.approx([12.5, 45.0 - 15 * STEP, 12.5016, 45.0])
    out = tmp_path / "objects.parquet"
    assert cli.main(["objects", str(path), str(out), "--geojson"]) == 0
    assert gpd.read_parquet(out).area_m2.tolist() == table.area_m2.tolist()


ENGINEERING = (
    'ENGCRS["site grid",EDATUM["site"],CS[Cartesian,2],AXIS["easting (x)",east,'
    'LENGTHUNIT["metre",1]],AXIS["northing (y)",north,LENGTHUNIT["metre",1]]]'
)


def test_a_crs_neither_projected_nor_geographic_is_refused(tmp_path: Path, no_cluster) -> None:
    path = tmp_path / "local.zarr"
    write_annotations(path, hand_masks(n_time=1), crs=ENGINEERING)
    with pytest.raises(GeoreferenceError, match=r"local\.zarr.*site grid.*gdalwarp -t_srs"):
        object_table(path)
    assert cli.main(["objects", str(path), str(tmp_path / "o.parquet")]) == 2
    assert not (tmp_path / "o.parquet").exists()
    with pytest.raises(GeoreferenceError, match="neither projected nor geographic"):
        date_objects(np.ones((2, 2), np.uint8), Affine.identity(), "EPSG:4978")  # geocentric


def test_a_store_without_crs_is_refused_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "nocrs.zarr"
    write_annotations(path, hand_masks(n_time=1))
    ds = xr.open_zarr(path, consolidated=False)
    assert "spatial_ref" in ds.coords
    bare = ds.drop_vars("spatial_ref")
    for name in bare.data_vars:
        bare[name].attrs.pop("grid_mapping", None)
        bare[name].encoding.pop("grid_mapping", None)
    write_dataset(bare, tmp_path / "bare.zarr", overwrite=False)
    with pytest.raises(GeoreferenceError, match=r"bare\.zarr.*no CRS.*-a_srs"):
        object_table(tmp_path / "bare.zarr")
