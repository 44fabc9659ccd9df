"""Tests for spoc_xr.ingest: dated GeoTIFFs -> validated lazy stack -> Zarr store and back."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dask
import numpy as np
import pytest
import rasterio
import rasterio.shutil
import xarray as xr
import zarr
from affine import Affine
from dask.callbacks import Callback
from rasterio.crs import CRS

import spoc_xr
from spoc_xr.errors import (
    BandMismatchError,
    CorruptFileError,
    DateParseError,
    DuplicateDateError,
    GeoreferenceError,
    NoInputFilesError,
    OutputError,
    ParameterError,
    SpocError,
)
from spoc_xr.ingest import find_geotiffs, ingest, open_geotiffs, parse_date, pixel_metres
from spoc_xr.store import is_complete

# 37 x 45 px in chunks of 16: tiles do not divide the shape, so edge tiles are exercised.
HEIGHT, WIDTH, CHUNKS = 37, 45, 16
TRANSFORM = Affine(10.0, 0.0, 500_000.0, 0.0, -10.0, 4_000_000.0)
CRS_UTM = CRS.from_epsg(32631)
DATES = ["2023-05-11", "2023-05-01", "2023-06-03T10:04:09", "2023-05-21"]
SHARED_DATA = Path(__file__).parents[1] / ".." / "shared" / "data"


def write_tif(
    path: Path,
    data: np.ndarray,
    *,
    crs: CRS | str | None = CRS_UTM,
    transform: Affine | None = TRANSFORM,
    nodata: float | None = None,
    descriptions: tuple[str, ...] | None = None,
) -> Path:
    """Write ``data`` (bands, y, x) as a tiled GeoTIFF of 16 px blocks."""
    profile: dict[str, Any] = {
        "driver": "GTiff",
        "height": data.shape[1],
        "width": data.shape[2],
        "count": data.shape[0],
        "dtype": data.dtype,
        "tiled": True,
        "blockxsize": 16,
        "blockysize": 16,
    }
    if crs is not None:
        profile["crs"] = crs
    if transform is not None:
        profile["transform"] = transform
    if nodata is not None:
        profile["nodata"] = nodata
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
        if descriptions:
            for index, name in enumerate(descriptions, start=1):
                dst.set_band_description(index, name)
    return path


def random_data(rng: np.random.Generator, dtype: str, nbands: int) -> np.ndarray:
    if np.dtype(dtype).kind == "f":
        return rng.normal(0.1, 0.05, (nbands, HEIGHT, WIDTH)).astype(dtype)
    info = np.iinfo(dtype)
    low, high = max(info.min, -3000), min(info.max, 3000)
    return rng.integers(low, high, (nbands, HEIGHT, WIDTH)).astype(dtype)


def write_series(
    folder: Path,
    *,
    dtype: str = "uint16",
    nbands: int = 2,
    descriptions: tuple[str, ...] | None = ("B04", "B08"),
    nodata: float | None = None,
    names: list[str] | None = None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """One GeoTIFF per date in ``folder``; returns the written data by file name."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = names or [f"S2_{date}.tif" for date in DATES]
    written = {}
    for name in names:
        data = random_data(rng, dtype, nbands)
        if nodata is not None and not np.isnan(nodata):
            data[:, :3, :5] = nodata
        write_tif(folder / name, data, nodata=nodata, descriptions=descriptions)
        written[name] = data
    return written


# ---------------------------------------------------------------------------------- dates


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("2023-05-01.tif", "2023-05-01T00:00:00"),
        ("2023-05-01T10:04:09.tif", "2023-05-01T10:04:09"),
        ("20230501.tif", "2023-05-01T00:00:00"),
        ("20230501T100409.tif", "2023-05-01T10:04:09"),
        ("S2_20230501.tif", "2023-05-01T00:00:00"),
        ("honolulu_2023-05-01.tif", "2023-05-01T00:00:00"),
        ("LS_2008-04-19.tif", "2008-04-19T00:00:00"),
        ("S2A_MSIL2A_20230501T100409_N0509_R122_T33TUM.tif", "2023-05-01T10:04:09"),
        # Implausible candidates (month 13, year 1234) are skipped; the first plausible one wins.
        ("x_20231301_20230601.tif", "2023-06-01T00:00:00"),
        ("12340101_2023-06-01_2023-07-01.TIFF", "2023-06-01T00:00:00"),
        ("/data/2019-01-01/S2_2023-05-01.tif", "2023-05-01T00:00:00"),
        ("2024-02-29.tif", "2024-02-29T00:00:00"),
    ],
)
def test_parse_date_reads_every_accepted_form(name: str, expected: str) -> None:
    parsed = parse_date(name)
    assert parsed == np.datetime64(expected)
    assert parsed.dtype == np.dtype("datetime64[s]")


@pytest.mark.parametrize(
    "name",
    [
        "scene.tif",
        "S2_2023-13-01.tif",
        "S2_2023-02-30.tif",
        "2023-02-29.tif",  # not a leap year
        "S2_18990101.tif",
        "S2_21010101.tif",
        "tile_1202305011.tif",  # inside a longer digit run
        "2023-5-1.tif",
    ],
)
def test_parse_date_rejects_names_without_a_plausible_date(name: str) -> None:
    with pytest.raises(DateParseError, match="YYYY-MM-DD") as info:
        parse_date(name)
    assert name in str(info.value)


# ------------------------------------------------------------------------------ discovery


def test_find_geotiffs_keeps_only_tif_and_tiff_files(tmp_path: Path) -> None:
    for name in ["b_2023-01-02.TIF", "a_2023-01-01.tiff", "notes.txt", "._c_2023-01-03.tif"]:
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sub.tif").mkdir()
    assert [p.name for p in find_geotiffs(tmp_path)] == ["a_2023-01-01.tiff", "b_2023-01-02.TIF"]


def test_find_geotiffs_missing_or_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(NoInputFilesError, match="does not exist"):
        find_geotiffs(tmp_path / "nope")
    with pytest.raises(NoInputFilesError, match="no GeoTIFF"):
        find_geotiffs(tmp_path)


def test_geotiffs_in_sub_folders_are_named_not_silently_skipped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from spoc_xr.cli import main

    write_series(tmp_path / "src" / "2023", names=[f"S2_{d}.tif" for d in DATES[:2]])
    with pytest.raises(NoInputFilesError, match=r"sub-folders hold 2, e\.g\. .*2023.*pass the sub"):
        find_geotiffs(tmp_path / "src")
    write_series(tmp_path / "src", names=[f"S2_{d}.tif" for d in DATES[2:]])
    assert main(["ingest", str(tmp_path / "src"), str(tmp_path / "s.zarr"), "--workers", "1"]) == 0
    printed = capsys.readouterr().out
    assert "note: 2 GeoTIFF(s) in sub-folders" in printed
    assert "written 2 dates" in printed


# ------------------------------------------------------------------------------ round trip


ROUND_TRIP_CASES = {
    "uint16-named": {"dtype": "uint16", "nbands": 4, "descriptions": ("B02", "B03", "B04", "B08")},
    "int16-nodata": {"dtype": "int16", "nbands": 3, "nodata": -9999,
                     "descriptions": ("red", "nir", "swir1")},
    "float32-nan-nodata": {"dtype": "float32", "nbands": 2, "nodata": float("nan"),
                           "descriptions": ("red", "nir")},
    "uint8-single-band": {"dtype": "uint8", "nbands": 1, "descriptions": ("pan",)},
    "float64-unnamed": {"dtype": "float64", "nbands": 3, "descriptions": None},
    "int32-unnamed-single": {"dtype": "int32", "nbands": 1, "descriptions": None},
}  # fmt: skip


@pytest.mark.parametrize("case", list(ROUND_TRIP_CASES))
def test_ingest_round_trips_values_dates_bands_grid_and_nodata(tmp_path: Path, case: str) -> None:
    options = ROUND_TRIP_CASES[case]
    written = write_series(tmp_path / "src", **options)
    store = tmp_path / "stack.zarr"

    stack = ingest(tmp_path / "src", store, chunks=CHUNKS)

    order = sorted(written, key=parse_date)
    assert stack.name == "stack"
    assert stack.dims == ("time", "band", "y", "x")
    assert stack.dtype == np.dtype(options["dtype"])
    assert stack.time.dtype == np.dtype("datetime64[ns]")
    np.testing.assert_array_equal(
        stack.time.values, np.array([parse_date(n) for n in order], dtype="datetime64[ns]")
    )
    names = options["descriptions"] or tuple(str(i) for i in range(1, options["nbands"] + 1))
    assert stack.band.values.tolist() == list(names)
    assert stack.band.dtype.kind == "U"
    np.testing.assert_array_equal(stack.values, np.stack([written[n] for n in order]))
    assert stack.rio.crs == CRS_UTM
    assert stack.rio.transform() == TRANSFORM
    nodata = options.get("nodata")
    if nodata is None:
        assert "nodata" not in stack.attrs
    elif np.isnan(nodata):
        assert np.isnan(stack.attrs["nodata"])
    else:
        assert stack.attrs["nodata"] == nodata
        assert (stack.isel(time=0, y=0, x=0).values == nodata).all()  # kept raw, not masked
    assert is_complete(store)
    meta = xr.open_zarr(store, consolidated=False).attrs["spoc_xr"]
    assert meta == {"version": spoc_xr.__version__, "kind": "stack", "source_files": order}


def test_coordinates_and_grid_match_rioxarray(tmp_path: Path) -> None:
    import rioxarray

    written = write_series(tmp_path / "src")
    stack = open_geotiffs(tmp_path / "src", chunks=CHUNKS)
    reference = rioxarray.open_rasterio(tmp_path / "src" / next(iter(written)))
    np.testing.assert_allclose(stack.x.values, reference.x.values, rtol=0, atol=1e-9)
    np.testing.assert_allclose(stack.y.values, reference.y.values, rtol=0, atol=1e-9)
    assert stack.rio.transform() == reference.rio.transform()


def test_store_chunks_are_one_date_all_bands_and_square_tiles(tmp_path: Path) -> None:
    write_series(tmp_path / "src", nbands=3, descriptions=("a", "b", "c"))
    store = tmp_path / "stack.zarr"
    stack = ingest(tmp_path / "src", store, chunks=CHUNKS)
    assert zarr.open_array(store / "stack", mode="r").chunks == (1, 3, CHUNKS, CHUNKS)
    assert stack.chunks == ((1,) * len(DATES), (3,), (16, 16, 5), (16, 16, 13))


def test_plain_open_zarr_gives_back_crs_and_transform(tmp_path: Path) -> None:
    write_series(tmp_path / "src")
    store = tmp_path / "stack.zarr"
    ingest(tmp_path / "src", store, chunks=CHUNKS)
    stack = xr.open_zarr(store, consolidated=False)["stack"]
    assert stack.rio.crs == CRS_UTM
    assert stack.rio.transform() == TRANSFORM


def test_open_geotiffs_accepts_a_list_of_files_and_one_file(tmp_path: Path) -> None:
    written = write_series(tmp_path / "src")
    files = [tmp_path / "src" / name for name in written]
    assert open_geotiffs(files[:2]).sizes["time"] == 2
    assert open_geotiffs(files[0]).sizes["time"] == 1
    with pytest.raises(NoInputFilesError, match=r"missing\.tif"):
        open_geotiffs([*files, tmp_path / "missing.tif"])


def test_same_crs_spelled_differently_and_tiny_transform_jitter_pass(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    data = np.ones((1, HEIGHT, WIDTH), "uint16")
    write_tif(src / "a_2023-01-01.tif", data, crs="EPSG:32631")
    write_tif(
        src / "b_2023-01-02.tif",
        data,
        crs=CRS.from_proj4("+proj=utm +zone=31 +datum=WGS84 +units=m +no_defs"),
        transform=TRANSFORM @ Affine.translation(1e-8, -1e-8),
    )
    assert open_geotiffs(src).sizes["time"] == 2


# ------------------------------------------------------------------------------ validation


def _one(src: Path, name: str, **kwargs: Any) -> None:
    data = kwargs.pop("data", np.ones((2, HEIGHT, WIDTH), "uint16"))
    kwargs.setdefault("descriptions", ("B04", "B08"))
    write_tif(src / name, data, **kwargs)


def _truncated(src: Path, *, header_first: bool) -> None:
    """A second date cut to 2/3 of its size.

    GDAL's GTiff writer puts the directory at the end, so cutting it breaks the open; a COG keeps
    its directory first, so the open succeeds and only reading the last block can notice.
    """
    _one(src, "a_2023-01-01.tif")
    path = src / "b_2023-01-02.tif"
    data = np.arange(2 * HEIGHT * WIDTH, dtype="uint16").reshape(2, HEIGHT, WIDTH)
    if header_first:
        _one(src, "plain.tif", data=data)
        rasterio.shutil.copy(src / "plain.tif", path, driver="COG", BLOCKSIZE=16)
        (src / "plain.tif").unlink()
        with rasterio.open(path) as check:
            assert check.descriptions == ("B04", "B08")
    else:
        _one(src, path.name, data=data)
    path.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])


def _not_a_tif(src: Path) -> None:
    _one(src, "a_2023-01-01.tif")
    (src / "b_2023-01-02.tif").write_text("not a GeoTIFF")


def _files(*specs: tuple[str, dict[str, Any]]) -> Callable[[Path], None]:
    """A builder writing one 2-band uint16 GeoTIFF per (name, write_tif options)."""

    def build(src: Path) -> None:
        for name, options in specs:
            _one(src, name, **options)

    return build


def _text_file(src: Path) -> None:
    (src / "a.txt").write_text("x")


A = ("a_2023-01-01.tif", {})  # the reference date the second file is compared with
B = "b_2023-01-02.tif"

VALIDATION_CASES: dict[str, tuple[Callable[[Path], None], type[SpocError], str]] = {
    "empty folder": (_files(), NoInputFilesError, "no GeoTIFF"),
    "no tif": (_text_file, NoInputFilesError, "no GeoTIFF"),
    "truncated directory": (
        lambda src: _truncated(src, header_first=False), CorruptFileError, B
    ),
    "truncated pixels, directory intact": (
        lambda src: _truncated(src, header_first=True), CorruptFileError, B
    ),
    "not a tif": (_not_a_tif, CorruptFileError, B),
    "no crs": (_files((B, {"crs": None})), GeoreferenceError, f"{B}' has no CRS"),
    "no transform": (_files((B, {"transform": None})), GeoreferenceError, "no geotransform"),
    "crs differs": (_files(A, (B, {"crs": "EPSG:32632"})), GeoreferenceError, "different CRS"),
    "shape differs": (
        _files(A, (B, {"data": np.ones((2, HEIGHT, WIDTH + 1), "uint16")})),
        GeoreferenceError,
        "different shapes",
    ),
    "resolution differs": (
        _files(A, (B, {"transform": TRANSFORM @ Affine.scale(2.0)})),
        GeoreferenceError,
        "different resolutions",
    ),
    "origin differs": (
        _files(A, (B, {"transform": TRANSFORM @ Affine.translation(0.5, 0)})),
        GeoreferenceError,
        "different origins",
    ),
    "band count differs": (
        _files(A, (B, {"data": np.ones((3, HEIGHT, WIDTH), "uint16"),
                       "descriptions": ("B04", "B08", "B11")})),
        BandMismatchError,
        "different band counts",
    ),
    "band names differ": (
        _files(A, (B, {"descriptions": ("red", "nir")})),
        BandMismatchError,
        r"'a_2023-01-01.tif' and 'b_2023-01-02.tif' have different band names "
        r"\(\['B04', 'B08'\] vs \['red', 'nir'\]\)",
    ),
    "dtype differs": (
        _files(A, (B, {"data": np.ones((2, HEIGHT, WIDTH), "int16")})),
        BandMismatchError,
        r"different dtypes \(uint16 vs int16\)",
    ),
    "nodata differs": (
        _files(("a_2023-01-01.tif", {"nodata": 0}), (B, {"nodata": 65535})),
        BandMismatchError,
        "different nodata",
    ),
    "unsupported dtype": (
        _files((B, {"data": np.ones((2, HEIGHT, WIDTH), "int8")})),
        BandMismatchError,
        "unsupported dtype int8",
    ),
    "bad date": (_files(A, ("scene_final.tif", {})), DateParseError, "scene_final"),
    "duplicate date": (
        _files(("S2_2023-01-01.tif", {}), ("L8_20230101.tif", {})),
        DuplicateDateError,
        r"'L8_20230101.tif' and 'S2_2023-01-01.tif' .* stack a date's band files into one",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(VALIDATION_CASES))
@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")  # the writer's
def test_invalid_inputs_fail_before_the_store_is_created(tmp_path: Path, case: str) -> None:
    build, error, message = VALIDATION_CASES[case]
    src = tmp_path / "src"
    src.mkdir()
    build(src)
    store = tmp_path / "stack.zarr"
    with pytest.raises(error, match=message):
        ingest(src, store, chunks=CHUNKS)
    assert not store.exists()


@pytest.mark.parametrize("kind", ["mask", "alpha"])
def test_files_that_mark_invalid_pixels_by_mask_or_alpha_are_refused(tmp_path, kind) -> None:
    # Their fill (0) would be read as data: a probe's swath fill became 10 % large objects.
    src = tmp_path / "src"
    src.mkdir()
    data = np.full((3, HEIGHT, WIDTH), 500, np.uint16)
    data[:, :, : WIDTH // 2] = 0
    path = src / f"S2_{DATES[0]}.tif"
    if kind == "mask":
        with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True):
            write_tif(path, data)
            with rasterio.open(path, "r+") as dst:
                dst.write_mask((data[0] > 0).astype(np.uint8) * 255)
        expected = r"marks its invalid pixels with a GDAL mask .*gdal_edit.py -a_nodata 0"
    else:
        alpha = np.where(data[:1] > 0, 65535, 0).astype(np.uint16)
        profile = {"driver": "GTiff", "height": HEIGHT, "width": WIDTH, "count": 4}
        profile |= {"dtype": "uint16", "crs": CRS_UTM, "transform": TRANSFORM}
        with rasterio.open(path, "w", photometric="RGB", alpha="YES", **profile) as dst:
            dst.write(np.concatenate([data, alpha]))
        expected = r"has an alpha band \(band 4\).* -dstnodata 0"
    with pytest.raises(BandMismatchError, match=expected):
        ingest(src, tmp_path / "stack.zarr", chunks=CHUNKS)
    assert not (tmp_path / "stack.zarr").exists()
    # Declared, the masked value is nodata, and the file is read.
    if kind == "mask":
        with rasterio.open(path, "r+") as dst:
            dst.nodata = 0
        ingest(src, tmp_path / "stack.zarr", chunks=CHUNKS)
        assert (tmp_path / "stack.zarr").exists()


@pytest.mark.parametrize("chunks", [0, -16, 1.5, True, "16"])
def test_bad_chunks_raise_parameter_error_before_anything_is_read(
    tmp_path: Path, chunks: Any
) -> None:
    store = tmp_path / "stack.zarr"
    with pytest.raises(ParameterError, match="chunks"):
        ingest(tmp_path / "does-not-exist", store, chunks=chunks)
    assert not store.exists()


def test_existing_store_needs_overwrite(tmp_path: Path) -> None:
    write_series(tmp_path / "src")
    store = tmp_path / "stack.zarr"
    ingest(tmp_path / "src", store, chunks=CHUNKS)
    with pytest.raises(OutputError, match="pass --overwrite"):
        ingest(tmp_path / "src", store, chunks=CHUNKS)
    for path in (tmp_path / "src").iterdir():
        if "06-03" in path.name:
            path.unlink()
    stack = ingest(tmp_path / "src", store, chunks=CHUNKS, overwrite=True)
    assert stack.sizes["time"] == len(DATES) - 1


def test_output_equal_to_the_input_is_refused(tmp_path: Path) -> None:
    write_series(tmp_path / "src")
    with pytest.raises(OutputError, match="also an input"):
        ingest(tmp_path / "src", tmp_path / "src" / ".." / "src", overwrite=True)
    assert len(list((tmp_path / "src").iterdir())) == len(DATES)


# ------------------------------------------------------------------------------ laziness


class _OpenCounter:
    """Counts rasterio.open calls per file name, wrapping the real function."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.counts: Counter[str] = Counter()
        real_open = rasterio.open

        def counting_open(fp: Any, *args: Any, **kwargs: Any) -> Any:
            self.counts[Path(fp).name] += 1
            return real_open(fp, *args, **kwargs)

        monkeypatch.setattr(rasterio, "open", counting_open)


class _TaskCounter(Callback):
    def __init__(self) -> None:
        super().__init__()
        self.ran = 0

    def _pretask(self, key: Any, dsk: Any, state: Any) -> None:
        self.ran += 1


@pytest.fixture
def many_dates(tmp_path: Path) -> Path:
    src = tmp_path / "many"
    src.mkdir()
    base = np.datetime64("2020-01-01")
    for index in range(40):
        data = np.full((2, 20, 30), index, "uint16")
        write_tif(src / f"S2_{base + np.timedelta64(3 * index, 'D')}.tif", data)
    return src


def test_open_geotiffs_builds_one_task_per_date_chunk_and_computes_nothing(
    many_dates: Path,
) -> None:
    with _TaskCounter() as tasks:
        stack = open_geotiffs(many_dates, chunks=10)
    assert tasks.ran == 0
    tiles_per_date = 2 * 3
    assert len(stack.data.__dask_graph__()) == 40 * tiles_per_date
    assert set(stack.chunks[0]) == {1}


def test_computing_one_date_reads_only_that_file(
    many_dates: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stack = open_geotiffs(many_dates, chunks=10)
    opened = _OpenCounter(monkeypatch)
    with dask.config.set(scheduler="synchronous"):
        values = stack.isel(time=7).values
    assert (values == 7).all()
    assert dict(opened.counts) == {"S2_2020-01-22.tif": 6}  # one open per spatial tile


def test_ingest_reads_each_tile_once_and_one_date_per_chunk(
    many_dates: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened = _OpenCounter(monkeypatch)
    stack = ingest(many_dates, tmp_path / "many.zarr", chunks=10)
    # One metadata scan plus one read per spatial tile: no file is read twice or all at once.
    assert set(opened.counts.values()) == {1 + 6}
    assert len(opened.counts) == 40
    np.testing.assert_array_equal(stack.isel(band=0, y=0, x=0).values, np.arange(40))


def test_progress_bar_is_shown(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_series(tmp_path / "src")
    ingest(tmp_path / "src", tmp_path / "stack.zarr", chunks=CHUNKS, progress=True)
    assert "100%" in capsys.readouterr().out


# ------------------------------------------------------------------------------ real data


@pytest.mark.shared_data
def test_ingest_real_landsat_stack(tmp_path: Path) -> None:
    folder = SHARED_DATA / "landsat_fmask"
    files = sorted(folder.glob("LS_*.tif")) if folder.is_dir() else []
    if not files:
        pytest.skip(f"real data not found in {os.path.normpath(folder)}")
    stack = ingest(folder, tmp_path / "landsat.zarr", chunks=32)
    assert stack.sizes == {"time": len(files), "band": 3, "y": 61, "x": 61}
    assert stack.dtype == np.int16
    assert stack.attrs["nodata"] == -9999
    assert stack.band.values.tolist() == ["red", "nir", "swir1"]
    assert str(stack.time.values[0])[:10] == "2008-04-19"
    assert stack.rio.crs == CRS.from_epsg(32613)
    with rasterio.open(files[-1]) as src:
        np.testing.assert_array_equal(stack.isel(time=-1).values, src.read())
        assert stack.rio.transform() == src.transform


# ---------------------------------------------------------------------------------- overview


def test_ingest_stores_the_overview_annotate_would_read(tmp_path: Path) -> None:
    from spoc_xr.ingest import add_overview, ingest_store, open_stack, read_overview
    from spoc_xr.reference import compute_overview

    first, later = sorted(DATES)[:3], sorted(DATES)[3:]
    write_series(tmp_path / "src", nodata=0, names=[f"S2_{d}.tif" for d in first])
    stack = ingest(tmp_path / "src", tmp_path / "a.zarr", chunks=16)
    expected = compute_overview(stack)
    stored = read_overview(tmp_path / "a.zarr", stack)
    assert stored is not None
    np.testing.assert_array_equal(stored, expected)
    assert np.isnan(stored).any()  # nodata pixels stay unknown
    # A selection of dates gets its rows; a spatial crop gets none (it has another grid).
    picked = stack.isel(time=[2, 0])
    np.testing.assert_array_equal(read_overview(tmp_path / "a.zarr", picked), expected[[2, 0]])
    assert read_overview(tmp_path / "a.zarr", stack.isel(x=slice(0, 10))) is None
    # Values changed after opening (scaled to reflectance) get none: fitted on the stored
    # values, the radiometry of a scaled stack was off by the scale; a cast keeps the values.
    assert read_overview(tmp_path / "a.zarr", stack * 1e-4) is None
    assert read_overview(tmp_path / "a.zarr", stack.astype(np.float32) + 1) is None
    np.testing.assert_array_equal(read_overview(tmp_path / "a.zarr", stack.astype(float)), expected)

    # The resumable writer stores it too, and an append extends it.
    assert ingest_store(tmp_path / "src", tmp_path / "b.zarr", chunks=16) == "written"
    write_series(tmp_path / "src", nodata=0, names=[f"S2_{d}.tif" for d in later], seed=5)
    assert ingest_store(tmp_path / "src", tmp_path / "b.zarr", append=True) == "appended"
    grown = open_stack(tmp_path / "b.zarr")
    assert grown.sizes["time"] == len(DATES)
    expected_grown = compute_overview(grown)
    np.testing.assert_array_equal(read_overview(tmp_path / "b.zarr", grown), expected_grown)

    # A store without one (older versions) gives None, and add_overview mends it in place.
    del zarr.open_group(tmp_path / "a.zarr", mode="r+")["overview"]
    assert read_overview(tmp_path / "a.zarr", stack) is None
    add_overview(tmp_path / "a.zarr")
    assert is_complete(tmp_path / "a.zarr")
    np.testing.assert_array_equal(read_overview(tmp_path / "a.zarr", stack), expected)


# ------------------------------------------------------------------------------ band names


def test_band_names_replace_the_descriptions_and_carry_over_to_appends(tmp_path: Path) -> None:
    from spoc_xr.cli import main
    from spoc_xr.ingest import open_stack
    from spoc_xr.products import choose_water_index

    first, later = sorted(DATES)[:3], sorted(DATES)[3:]
    # Landsat Collection 2 numbering: SR_B3 is green and SR_B5 NIR on Landsat 8/9 only.
    landsat = ("SR_B3", "SR_B5")
    write_series(tmp_path / "src", descriptions=landsat, names=[f"LC08_{d}.tif" for d in first])
    store = tmp_path / "stack.zarr"
    assert choose_water_index(list(landsat)).name == "none"
    args = ["ingest", str(tmp_path / "src"), str(store), "--band-names", "green, nir"]
    assert main([*args, "--workers", "1"]) == 0
    assert open_stack(store).band.values.tolist() == ["green", "nir"]
    assert choose_water_index(["green", "nir"]).name == "NDWI"
    assert main([*args, "--workers", "1"]) == 0  # the same recipe: complete, nothing to do
    # The appended dates are named as the store's were, without the option again.
    write_series(tmp_path / "src", descriptions=landsat, names=[f"LC08_{d}.tif" for d in later])
    assert main(["ingest", str(tmp_path / "src"), str(store), "--append", "--workers", "1"]) == 0
    grown = open_stack(store)
    assert grown.sizes["time"] == len(DATES) and grown.band.values.tolist() == ["green", "nir"]


def test_band_names_may_differ_in_the_files_but_not_in_count(tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_series(src, names=[f"a_{DATES[0]}.tif"], descriptions=("B04", "B08"))
    write_series(src, names=[f"b_{DATES[1]}.tif"], descriptions=None)  # no descriptions at all
    with pytest.raises(BandMismatchError, match="different band names"):
        open_geotiffs(src)
    stack = open_geotiffs(src, band_names=["red", "nir"])
    assert stack.band.values.tolist() == ["red", "nir"]
    with pytest.raises(BandMismatchError, match=r"3 band names given .* has 2 bands"):
        ingest(src, tmp_path / "s.zarr", band_names=["red", "nir", "swir1"])
    with pytest.raises(ParameterError, match="distinct and not empty"):
        ingest(src, tmp_path / "s.zarr", band_names=["red", "red"])
    assert not (tmp_path / "s.zarr").exists()


def test_files_describing_the_given_names_in_another_order_are_refused(tmp_path: Path) -> None:
    # Appended files that describe their bands as nir, red, ... stored NIR as "blue".
    src = tmp_path / "src"
    write_series(src, names=[f"a_{DATES[0]}.tif"], descriptions=("nir", "red"))
    with pytest.raises(BandMismatchError, match=r"describes its bands as \['nir', 'red'\]"):
        open_geotiffs(src, band_names=["red", "nir"])
    # The same names in the same order, or other names (a renaming), are fine.
    assert open_geotiffs(src, band_names=["NIR", "Red"]).band.values.tolist() == ["NIR", "Red"]
    assert open_geotiffs(src, band_names=["b8", "b4"]).band.values.tolist() == ["b8", "b4"]


@pytest.mark.parametrize(
    ("crs", "step", "metres"),
    [
        ("EPSG:32631", 10.0, 10.004),  # UTM's scale 0.9996 near its central meridian
        ("EPSG:2263", 10.0, 3.048006),  # US survey feet
        ("EPSG:3857", 10.0, 10.0 / 1.2673),  # Web Mercator at 37.9 degrees north
        ("EPSG:4326", 0.0001, 11.119 * np.sqrt(0.5)),  # at 60 degrees north
        (None, 10.0, None),
    ],
)
def test_pixel_metres_reads_the_grid_in_metres(crs, step, metres) -> None:
    grid = xr.DataArray(
        np.zeros((1, 1, 3, 4)),
        dims=("time", "band", "y", "x"),
        coords={"y": 60.0 - step * np.arange(3), "x": 5.0 + step * np.arange(4)},
    )
    if crs in ("EPSG:32631", "EPSG:2263", "EPSG:3857"):  # projected: place the grid on land
        origin = {"EPSG:32631": (500_000, 4_983_000), "EPSG:2263": (980_000, 200_000)}.get(
            crs, (2_627_000, 4_566_000)
        )
        grid = grid.assign_coords(x=grid.x + origin[0], y=grid.y + origin[1])
    if crs is not None:
        grid = grid.rio.write_crs(crs)
    measured = pixel_metres(grid)
    if metres is None:
        assert measured is None
    else:
        assert measured == pytest.approx(metres, rel=1e-3)


def test_pixel_metres_is_unknown_for_degrees_beyond_the_poles() -> None:
    # A UTM grid labelled EPSG:4326 (a mislabelled file): its "latitudes" are in millions, and
    # the pixel size must be unknown rather than NaN, which stopped annotate's planning.
    grid = xr.DataArray(
        np.zeros((1, 1, 3, 4)),
        dims=("time", "band", "y", "x"),
        coords={"y": 4e6 - 10.0 * np.arange(3), "x": 5e5 + 10.0 * np.arange(4)},
    ).rio.write_crs("EPSG:4326")
    assert pixel_metres(grid) is None


def test_an_append_says_that_it_keeps_the_stores_tiles(tmp_path: Path, capsys) -> None:
    from spoc_xr.cli import main
    from spoc_xr.ingest import open_stack

    first, later = sorted(DATES)[:3], sorted(DATES)[3:]
    write_series(tmp_path / "src", names=[f"S2_{d}.tif" for d in first])
    store = tmp_path / "stack.zarr"
    assert main(["ingest", str(tmp_path / "src"), str(store), "--chunks", "16"]) == 0
    write_series(tmp_path / "src", names=[f"S2_{d}.tif" for d in later], seed=1)
    capsys.readouterr()
    assert main(["ingest", str(tmp_path / "src"), str(store), "--append", "--chunks", "32"]) == 0
    assert "note: --chunks 32 is not used: appended dates keep the store's 16 px" in (
        capsys.readouterr().out
    )
    assert open_stack(store).data.chunksize[-2:] == (16, 16)


def test_files_declaring_different_offsets_get_a_note(tmp_path: Path) -> None:
    from spoc_xr.ingest import scale_offset_note

    src = tmp_path / "src"
    write_series(src)
    assert scale_offset_note(src) is None  # none declared: all alike
    # Sentinel-2 L2A from processing baseline 04.00 on: offset -0.1 on the later dates.
    for name in sorted(path.name for path in src.iterdir())[2:]:
        with rasterio.open(src / name, "r+") as dst:
            dst.scales, dst.offsets = (1e-4, 1e-4), (-0.1, -0.1)
    note = scale_offset_note(src)
    assert note is not None and "offsets [-0.1, -0.1]" in note and "subtract 1000 DN" in note
    assert scale_offset_note(tmp_path / "missing") is None  # ingest itself says what is wrong
