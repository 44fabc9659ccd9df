"""Object tables: labels and boxes against scipy, per-date objects, GeoParquet, polygons, CLI."""

from __future__ import annotations

import contextlib
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rioxarray  # noqa: F401  (registers .rio)
import xarray as xr
from scipy import ndimage

from spoc_xr import cli
from spoc_xr.errors import InputError, OutputError, StoreError
from spoc_xr.objects import (
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
) -> None:
    stack = make_stack(n_time=masks.shape[0], shape=masks.shape[1:])
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
    ).rio.write_crs("EPSG:32631")
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
    from affine import Affine

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
