"""Bad input through the ``spoc-xr`` CLI: exit status 2, one line naming the culprit, no output.

One test per item of the reliability issue's list; the library-level checks behind them are
tested in test_ingest.py and test_detect.py.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
import zarr
from affine import Affine

import spoc_xr.cli as cli_module
from spoc_xr.cli import main
from spoc_xr.errors import OutputError
from spoc_xr.ingest import ingest
from spoc_xr.store import open_store, safe_child
from tests.helpers import make_stack
from tests.test_ingest import write_tif

SIDE = 40
TRANSFORM = Affine(10.0, 0.0, 500_000.0, 0.0, -10.0, 4_650_000.0)
BANDS = ("B02", "B03", "B04", "B08")


def write_scene(
    folder: Path,
    *,
    n_time: int = 5,
    dtype: str = "uint16",
    nodata: float | None = None,
    blank: int | None = None,
    nan_box: bool = False,
    side: int = SIDE,
) -> Path:
    """A harbour-like series of GeoTIFFs; date ``blank`` all nodata; NaN box on date 1."""
    folder.mkdir(parents=True, exist_ok=True)
    stack = make_stack(n_time=n_time, shape=(side, side))
    for t in range(n_time):
        data = stack.values[t].astype(dtype)
        if blank == t:
            data[:] = nodata
        if nan_box and t == 1:
            data[:, 10:14, 10:14] = np.nan
        name = f"S2_{str(stack.time.values[t])[:10]}.tif"
        write_tif(folder / name, data, transform=TRANSFORM, nodata=nodata, descriptions=BANDS)
    return folder


@pytest.fixture(autouse=True)
def no_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run the commands on Dask's local threads: these tests are about refusals, not clusters."""
    monkeypatch.setattr(cli_module, "_client", lambda args, quiet=False: contextlib.nullcontext())


def cli(capsys: pytest.CaptureFixture[str], *argv: Any) -> tuple[int, str, str]:
    status = main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def assert_refused(status: int, err: str, *needles: str) -> None:
    assert status == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("spoc-xr ")
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.fixture
def stack_store(tmp_path: Path) -> Path:
    store = tmp_path / "stack.zarr"
    ingest(write_scene(tmp_path / "src"), store, chunks=32)
    return store


def one(src: Path, name: str, **options: Any) -> None:
    data = options.pop("data", np.ones((2, SIDE, SIDE), "uint16"))
    options.setdefault("descriptions", ("B04", "B08"))
    options.setdefault("transform", TRANSFORM)
    src.mkdir(parents=True, exist_ok=True)
    write_tif(src / name, data, **options)


A = "a_2023-01-01.tif"
B = "b_2023-01-02.tif"

INGEST_CASES: dict[str, tuple[list[tuple[str, dict[str, Any]]], tuple[str, ...]]] = {
    "crs differs": ([(A, {}), (B, {"crs": "EPSG:32632"})], (B, "different CRS")),
    "shape differs": (
        [(A, {}), (B, {"data": np.ones((2, SIDE, SIDE + 1), "uint16")})], (B, "different shapes")
    ),
    "resolution differs": (
        [(A, {}), (B, {"transform": TRANSFORM @ Affine.scale(2.0)})], (B, "different resolutions")
    ),
    "origin differs": (
        [(A, {}), (B, {"transform": TRANSFORM @ Affine.translation(0.5, 0)})],
        (B, "different origins"),
    ),
    "band count differs": (
        [(A, {}), (B, {"data": np.ones((3, SIDE, SIDE), "uint16"),
                       "descriptions": ("B04", "B08", "B11")})],
        (B, "different band counts"),
    ),
    "band names differ": ([(A, {}), (B, {"descriptions": ("red", "nir")})], (B, "band names")),
    "dtype differs": (
        [(A, {}), (B, {"data": np.ones((2, SIDE, SIDE), "int16")})], (B, "different dtypes")
    ),
    "unsupported dtype": (
        [(B, {"data": np.ones((2, SIDE, SIDE), "int8")})], (B, "unsupported dtype int8")
    ),
    "missing crs": ([(A, {}), (B, {"crs": None})], (B, "no CRS")),
    "missing transform": ([(A, {}), (B, {"transform": None})], (B, "no geotransform")),
    "unparseable date": ([(A, {}), ("scene_final.tif", {})], ("scene_final.tif", "date")),
    "same date twice": (
        [("S2_2023-01-01.tif", {}), ("L8_20230101.tif", {})],
        ("L8_20230101.tif", "both carry the date"),
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(INGEST_CASES))
@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_bad_input_files_are_refused_before_any_output(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    files, needles = INGEST_CASES[case]
    src = tmp_path / "src"
    for name, options in files:
        one(src, name, **dict(options))
    status, _, err = cli(capsys, "ingest", src, tmp_path / "s.zarr")
    assert_refused(status, err, *needles)
    assert not (tmp_path / "s.zarr").exists()


def test_empty_folder_and_folder_without_geotiff(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "notes.txt").write_text("x")
    for folder in ("empty", "text"):
        status, _, err = cli(capsys, "ingest", tmp_path / folder, tmp_path / "s.zarr")
        assert_refused(status, err, "no GeoTIFF", folder)
    assert not (tmp_path / "s.zarr").exists()


def test_truncated_geotiff_is_found_at_ingest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = write_scene(tmp_path / "src", n_time=3)
    victim = sorted(src.iterdir())[1]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size * 2 // 3])
    status, _, err = cli(capsys, "ingest", src, tmp_path / "s.zarr")
    assert_refused(status, err, victim.name, "truncated")
    assert not (tmp_path / "s.zarr").exists()


def test_date_already_in_the_store_on_append(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], stack_store: Path
) -> None:
    before = (stack_store / "zarr.json").read_bytes()
    src = tmp_path / "more"
    src.mkdir()
    first = sorted((tmp_path / "src").iterdir())[0]
    (src / ("copy_" + first.name)).write_bytes(first.read_bytes())
    status, _, err = cli(capsys, "ingest", src, stack_store, "--append")
    assert_refused(status, err, "copy_" + first.name, "already holds")
    assert (stack_store / "zarr.json").read_bytes() == before


def test_an_ingested_file_whose_pixels_changed_is_refused_on_append(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src, store = write_scene(tmp_path / "src"), tmp_path / "tracked.zarr"
    assert cli(capsys, "ingest", src, store)[0] == 0
    first = sorted(src.iterdir())[1]
    # Touched only (a copy, a backup restored): same pixels, nothing to say.
    os.utime(first, ns=(first.stat().st_atime_ns, first.stat().st_mtime_ns + 10**9))
    assert cli(capsys, "ingest", src, store, "--append")[0] == 0
    with rasterio.open(first) as old:
        data, profile = old.read(), old.profile
    data[:, 3, 3] += 7
    with rasterio.open(first, "w", **profile) as new:
        new.write(data)
    before = zarr.open_group(store, mode="r")["stack"][1]
    status, _, err = cli(capsys, "ingest", src, store, "--append")
    assert_refused(status, err, first.name, "differs from the date", "--overwrite")
    assert (zarr.open_group(store, mode="r")["stack"][1] == before).all()


def test_append_of_an_earlier_date_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], stack_store: Path
) -> None:
    before = (stack_store / "zarr.json").read_bytes()
    src = tmp_path / "more"
    src.mkdir()
    first = sorted((tmp_path / "src").iterdir())[0]
    (src / "S2_2020-01-01.tif").write_bytes(first.read_bytes())
    status, _, err = cli(capsys, "ingest", src, stack_store, "--append")
    assert_refused(status, err, "S2_2020-01-01.tif", "not after")
    assert (stack_store / "zarr.json").read_bytes() == before


def test_annotate_prints_the_note_that_the_reference_was_chosen_among_the_clear_dates(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    stack = make_stack(n_time=12, shape=(SIDE, SIDE))
    for t in range(12):
        data = stack.values[t].astype("float32")
        if t % 2:  # a cloud bank over the top 60 % of rows on every other date but one
            data[:, : SIDE * 6 // 10] += 4000 if t < 10 else 0
        name = f"S2_{str(stack.time.values[t])[:10]}.tif"
        write_tif(src / name, data.astype("uint16"), transform=TRANSFORM, descriptions=BANDS)
    store = tmp_path / "stack.zarr"
    assert cli(capsys, "ingest", src, store)[0] == 0
    status, printed, _ = cli(capsys, "annotate", store, tmp_path / "out.zarr", "--no-report")
    assert status == 0
    assert "note: 5 of 12 dates depart on more than half of their area" in printed
    assert "taken from the 7 dates that agree" in printed


def test_all_nodata_date_is_reported_not_called_empty(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = tmp_path / "stack.zarr"
    ingest(write_scene(tmp_path / "src", nodata=0, blank=3), store, chunks=32)
    out = tmp_path / "out.zarr"
    status, printed, _ = cli(capsys, "annotate", store, out, "--no-report")
    assert status == 0
    assert "1 date(s) hold no valid data" in printed
    result = open_store(out)
    assert int(result.valid.isel(time=3).sum()) == 0
    assert float(result.valid_fraction.isel(time=3)) == 0
    assert float(result.valid_fraction.isel(time=2)) == 1


def test_all_nodata_reference_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = tmp_path / "stack.zarr"
    ingest(write_scene(tmp_path / "src", nodata=0, blank=3), store, chunks=32)
    date = str(open_store(store).time.values[3])[:10]
    out = tmp_path / "out.zarr"
    status, _, err = cli(capsys, "annotate", store, out, "--reference", date, "--no-report")
    assert_refused(status, err, "nodata")
    assert not out.exists()


def test_nans_in_a_float_stack_are_nodata(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = tmp_path / "stack.zarr"
    ingest(write_scene(tmp_path / "src", dtype="float32", nan_box=True), store, chunks=32)
    out = tmp_path / "out.zarr"
    status, _, _ = cli(capsys, "annotate", store, out, "--no-report")
    assert status == 0
    result = open_store(out)
    assert (result.valid.isel(time=1, y=slice(10, 14), x=slice(10, 14)) == 0).all()
    assert (result.mask.isel(time=1, y=slice(10, 14), x=slice(10, 14)) == 0).all()
    assert int(result.valid.isel(time=1).sum()) == SIDE * SIDE - 16


@pytest.mark.parametrize(
    ("option", "value", "needle"),
    [
        ("--reference", "1999-01-01", "not in the stack"),
        ("--reference", "yesterday", "yesterday"),
        ("--kernel", "4", "kernel"),
        ("--kernel", "0", "kernel"),
        ("--kernel", "-3", "kernel"),
        ("--kernel", str(SIDE + 1), "kernel"),
        ("--open-size", "6", "open_size"),
        ("--open-size", "0", "open_size"),
        ("--background-size", "-5", "background_size"),
        ("--threshold", "nan", "nan"),
        ("--threshold", "inf", "inf"),
        ("--threshold", "-2", "-2"),
        ("--threshold", "0", "0"),
        ("--threshold", "lots", "lots"),
        ("--zero-level", "lots", "lots"),
        ("--zero-level", "nan", "zero_level"),
        ("--zero-level", "1000,1000", "2 values for 4 bands"),
    ],
)
def test_bad_parameters_are_refused_before_any_output(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    stack_store: Path,
    option: str,
    value: str,
    needle: str,
) -> None:
    out = tmp_path / "out.zarr"
    status, _, err = cli(capsys, "annotate", stack_store, out, option, value)
    assert_refused(status, err, needle)
    assert not out.exists()
    assert not list(tmp_path.glob("out*"))


def test_annotate_takes_the_sizes_and_the_store_records_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], stack_store: Path
) -> None:
    out = tmp_path / "out.zarr"
    options = ("--open-size", "9", "--background-size", "21", "--no-report")
    status, printed, _ = cli(capsys, "annotate", stack_store, out, *options)
    assert status == 0
    assert "kernel 5, open 9 px, background 21 px" in printed
    # Why auto chose its date is said on the reference's line; notes are kept for warnings.
    assert "; auto: the fewest changed pixels" in printed.split("reference: ")[1].split("\n")[0]
    assert "note: auto" not in printed
    recorded = open_store(out).attrs["spoc_xr"]["parameters"]
    assert (recorded["open_size"], recorded["close_size"], recorded["background_size"]) == (
        9,
        9,
        21,
    )


def test_annotate_takes_a_zero_level_and_the_store_records_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], stack_store: Path
) -> None:
    out = tmp_path / "out.zarr"
    options = ("--zero-level", "1", "--no-report")
    status, printed, _ = cli(capsys, "annotate", stack_store, out, *options)
    assert status == 0
    assert "background 31 px, zero level [1.0]" in printed
    assert open_store(out).attrs["spoc_xr"]["parameters"]["zero_level"] == [1.0]
    # The values less their zero level are compared: the reference is stored so.
    plain = tmp_path / "plain.zarr"
    assert cli(capsys, "annotate", stack_store, plain, "--no-report")[0] == 0
    difference = open_store(out)["reference"].values - open_store(plain)["reference"].values
    assert np.median(difference) == pytest.approx(-1, abs=0.01)
    assert "zero_level" not in open_store(plain).attrs["spoc_xr"]["parameters"]


def test_output_equal_to_the_input_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], stack_store: Path
) -> None:
    before = sorted(p.name for p in stack_store.rglob("*"))
    status, _, err = cli(capsys, "annotate", stack_store, stack_store, "--overwrite")
    assert_refused(status, err, "also an input")
    src = tmp_path / "src"
    status, _, err = cli(capsys, "ingest", src, src, "--overwrite")
    assert_refused(status, err, "also an input")
    assert sorted(p.name for p in stack_store.rglob("*")) == before
    assert len(list(src.iterdir())) == 5


def test_existing_output_from_another_command_needs_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], stack_store: Path
) -> None:
    out = tmp_path / "out.zarr"
    assert cli(capsys, "annotate", stack_store, out, "--no-report")[0] == 0
    before = (out / "zarr.json").read_bytes()
    status, _, err = cli(capsys, "annotate", stack_store, out, "--kernel", "7", "--no-report")
    assert_refused(status, err, str(out), "--overwrite")
    assert (out / "zarr.json").read_bytes() == before
    other = write_scene(tmp_path / "other", n_time=3)
    status, _, err = cli(capsys, "ingest", other, stack_store)
    assert_refused(status, err, "stack.zarr", "--overwrite")
    status, _, err = cli(capsys, "ingest", other, tmp_path / "plain")
    assert status == 0  # a fresh path is fine
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "keep.txt").write_text("x")
    status, _, err = cli(capsys, "ingest", other, tmp_path / "folder", "--overwrite")
    assert_refused(status, err, "not a Zarr store")
    assert (tmp_path / "folder" / "keep.txt").exists()
    # A mistyped output never replaces a store of another kind, even with --overwrite: the
    # annotations are no stack, the stack no object table.
    stack_before = (stack_store / "zarr.json").read_bytes()
    for command in (
        ("ingest", other, out, "--overwrite"),
        ("annotate", tmp_path / "plain", stack_store, "--overwrite", "--no-report"),
        ("objects", out, stack_store, "--overwrite"),
    ):
        status, _, err = cli(capsys, *command)
        assert_refused(status, err, "even with --overwrite")
    assert (out / "zarr.json").read_bytes() == before
    assert (stack_store / "zarr.json").read_bytes() == stack_before


@pytest.mark.parametrize(
    "name", ["../escape.tif", "a/../../escape.tif", "/etc/passwd", "", "a\x00b", "..\\x.tif"]
)
def test_output_names_that_escape_the_folder_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(OutputError, match="escape"):
        safe_child(tmp_path / "chips", name)
    assert safe_child(tmp_path / "chips", "train/B04_2023-05-01.tif") == (
        tmp_path / "chips" / "train" / "B04_2023-05-01.tif"
    )


def test_output_name_through_a_symlink_out_of_the_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "chips").mkdir()
    (tmp_path / "chips" / "link").symlink_to(tmp_path)
    with pytest.raises(OutputError, match="outside"):
        safe_child(tmp_path / "chips", "link/x.tif")


def test_append_with_another_grid_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], stack_store: Path
) -> None:
    src = tmp_path / "more"
    data = np.ones((4, SIDE, SIDE), "uint16")
    one(src, "S2_2024-01-01.tif", data=data, descriptions=BANDS,
        transform=TRANSFORM @ Affine.translation(3, 0))  # fmt: skip
    status, _, err = cli(capsys, "ingest", src, stack_store, "--append")
    assert_refused(status, err, "different grids")
    assert zarr.open_group(stack_store, mode="r")["stack"].shape[0] == 5
    with rasterio.open(src / "S2_2024-01-01.tif") as check:
        assert check.count == 4


def test_a_system_error_during_a_run_ends_with_one_line_not_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def disk_full(args: Any) -> None:
        raise OSError(28, "No space left on device", str(tmp_path / "out.zarr"))

    monkeypatch.setitem(cli_module.COMMANDS, "annotate", disk_full)
    status, _, err = cli(capsys, "annotate", tmp_path / "stack.zarr", tmp_path / "out.zarr")
    assert_refused(status, err, "No space left on device", "out.zarr", "free space")


def test_overwrite_without_a_report_removes_the_replaced_stores_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], stack_store: Path
) -> None:
    out = tmp_path / "out.zarr"
    report = tmp_path / "out_report"
    assert cli(capsys, "annotate", stack_store, out)[0] == 0
    assert (report / "report.html").is_file()
    (report / "notes.txt").write_text("mine")  # a file of the user's: never touched
    status, printed, _ = cli(capsys, "annotate", stack_store, out, "--overwrite", "--no-report")
    assert status == 0 and "removed the replaced store's report" in printed
    assert sorted(p.name for p in report.iterdir()) == ["notes.txt"]
    # Without --overwrite nothing is removed (the store is complete: nothing to do).
    assert cli(capsys, "annotate", stack_store, out, "--overwrite")[0] == 0
    assert cli(capsys, "annotate", stack_store, out, "--no-report")[0] == 0
    assert (report / "report.html").is_file()


def test_an_interrupt_is_one_line_and_silences_exit_handlers(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def interrupted(args: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setitem(cli_module.COMMANDS, "annotate", interrupted)
    monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)  # restored after the test
    status, _, err = cli(capsys, "annotate", "a.zarr", "b.zarr")
    assert status == 130 and err.strip() == "spoc-xr annotate: interrupted"
    # distributed's exit handler, interrupted while a local cluster started, raised in atexit.
    assert sys.unraisablehook is cli_module._quiet_unraisable
