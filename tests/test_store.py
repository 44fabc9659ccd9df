"""Tests for spoc_xr.store: output-path checks, writing with a completion marker, reading back."""

from __future__ import annotations

import warnings
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import rioxarray  # noqa: F401  (the .rio accessor)
import xarray as xr
from affine import Affine
from dask.delayed import Delayed
from rasterio.crs import CRS

from spoc_xr.errors import OutputError, ParameterError, StoreError
from spoc_xr.store import (
    COMPLETE_ATTR,
    _on_a_zarr_grid,
    check_output_path,
    is_complete,
    mark_complete,
    open_store,
    remove_store,
    write_dataset,
)

TRANSFORM = Affine(30.0, 0.0, 336_375.0, 0.0, -30.0, 4_462_425.0)


def small_dataset(kind: str = "stack") -> xr.Dataset:
    data = da.arange(2 * 3 * 5, dtype="int16", chunks=5).reshape(2, 3, 5).rechunk((1, 3, 5))
    cube = xr.DataArray(
        data,
        dims=("time", "y", "x"),
        coords={
            "time": np.array(["2023-01-01", "2023-01-02"], dtype="datetime64[ns]"),
            "y": 4_462_410.0 - 30.0 * np.arange(3),
            "x": 336_390.0 + 30.0 * np.arange(5),
            "label": ("time", np.array(["clear", "cloudy"])),
        },
        name="cube",
    )
    cube = cube.rio.write_crs("EPSG:32613").rio.write_transform(TRANSFORM)
    dataset = cube.to_dataset()
    dataset.attrs["spoc_xr"] = {"version": "test", "kind": kind}
    return dataset


def make_store(path: Path) -> Path:
    write_dataset(small_dataset(), path, overwrite=False)
    return path


# ------------------------------------------------------------------------- check_output_path


def test_new_output_is_accepted(tmp_path: Path) -> None:
    out = check_output_path(tmp_path / "new.zarr", inputs=[tmp_path / "src"], overwrite=False)
    assert out == tmp_path / "new.zarr"


def test_output_equal_to_an_input_is_refused_even_when_spelled_differently(
    tmp_path: Path,
) -> None:
    (tmp_path / "src").mkdir()
    with pytest.raises(OutputError, match="also an input"):
        check_output_path(tmp_path / "x" / ".." / "src", inputs=[tmp_path / "src"], overwrite=True)


def test_existing_output_needs_overwrite_and_is_not_deleted(tmp_path: Path) -> None:
    store = make_store(tmp_path / "old.zarr")
    with pytest.raises(OutputError, match=r"exists; pass --overwrite to replace it"):
        check_output_path(store, overwrite=False)
    assert check_output_path(store, overwrite=True) == store
    assert is_complete(store)  # checking deletes nothing


def test_output_inside_an_input_store_is_refused(tmp_path: Path) -> None:
    store = make_store(tmp_path / "in.zarr")
    with pytest.raises(OutputError, match="inside the input store"):
        check_output_path(store / "cube.zarr", inputs=[store], overwrite=False)


def test_output_inside_a_plain_input_folder_is_allowed(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    out = check_output_path(tmp_path / "src" / "stack.zarr", inputs=[tmp_path / "src"],
                            overwrite=False)  # fmt: skip
    assert out.parent == tmp_path / "src"


def test_output_containing_an_input_is_refused(tmp_path: Path) -> None:
    (tmp_path / "data" / "src").mkdir(parents=True)
    with pytest.raises(OutputError, match="would delete the input"):
        check_output_path(tmp_path / "data", inputs=[tmp_path / "data" / "src"], overwrite=True)


def test_overwriting_a_folder_that_is_not_a_store_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "home"
    folder.mkdir()
    (folder / "thesis.txt").write_text("precious")
    with pytest.raises(OutputError, match="not a Zarr store"):
        check_output_path(folder, overwrite=True)
    with pytest.raises(OutputError, match="not a Zarr store"):
        remove_store(folder)
    assert (folder / "thesis.txt").read_text() == "precious"


# ------------------------------------------------------------------------------ remove_store


def test_remove_store_deletes_a_store_and_ignores_a_missing_path(tmp_path: Path) -> None:
    store = make_store(tmp_path / "old.zarr")
    remove_store(store)
    assert not store.exists()
    remove_store(store)  # already gone: no error


# ------------------------------------------------------------------------ write / complete


def test_is_complete_false_before_marker_true_after(tmp_path: Path) -> None:
    store = tmp_path / "cube.zarr"
    pending = write_dataset(small_dataset(), store, overwrite=False, compute=False)
    assert isinstance(pending, Delayed)
    assert not is_complete(store)
    with pytest.raises(StoreError, match="incomplete"):
        open_store(store)
    pending.compute()
    assert not is_complete(store)
    mark_complete(store)
    assert is_complete(store)
    np.testing.assert_array_equal(open_store(store)["cube"].values, np.arange(30).reshape(2, 3, 5))


def test_write_dataset_marks_complete_when_computing(tmp_path: Path) -> None:
    store = make_store(tmp_path / "cube.zarr")
    assert is_complete(store)
    assert COMPLETE_ATTR in xr.open_zarr(store, consolidated=False).attrs


def test_rewrite_drops_the_old_marker_until_the_new_write_finishes(tmp_path: Path) -> None:
    store = make_store(tmp_path / "cube.zarr")
    # A dataset read from a complete store carries the marker attribute; it must not carry over.
    reread = open_store(store).load()
    target = tmp_path / "copy.zarr"
    pending = write_dataset(reread, target, overwrite=False, compute=False)
    assert pending is not None
    assert not is_complete(target)
    pending = write_dataset(small_dataset(), store, overwrite=True, compute=False)
    assert not is_complete(store)


def test_write_dataset_refuses_an_existing_store_without_overwrite(tmp_path: Path) -> None:
    store = make_store(tmp_path / "cube.zarr")
    with pytest.raises(OutputError, match="pass --overwrite"):
        write_dataset(small_dataset(), store, overwrite=False)


def test_store_chunks_follow_dask_chunks(tmp_path: Path) -> None:
    store = make_store(tmp_path / "cube.zarr")
    assert open_store(store)["cube"].encoding["chunks"] == (1, 3, 5)


def test_selections_starting_inside_a_chunk_are_written_on_a_grid_of_whole_zarr_chunks(
    tmp_path: Path,
) -> None:
    values = np.arange(3 * 40 * 50, dtype=np.uint16).reshape(3, 40, 50)
    tiles = xr.DataArray(da.from_array(values, chunks=(1, 20, 20)), dims=("time", "y", "x"))
    tiles.encoding["chunks"] = (1, 10, 10)  # Dask chunks of whole Zarr chunks, as annotate's
    plain = xr.DataArray(da.from_array(values, chunks=(1, 10, 10)), dims=("time", "y", "x"))
    ds = xr.Dataset({"tiles": tiles, "plain": plain}).isel(y=slice(5, None), x=slice(3, 47))
    # Chunks (15, 20) and (17, 20, 7) / (5, 10, ...): xarray alone refuses to write them.
    with pytest.raises(ValueError, match="chunk"):
        ds.to_zarr(tmp_path / "plain.zarr", zarr_format=3)
    write_dataset(ds, tmp_path / "cut.zarr", overwrite=False)
    back = xr.open_zarr(tmp_path / "cut.zarr", consolidated=False)
    assert back["tiles"].encoding["chunks"] == (1, 10, 10)
    assert back["plain"].encoding["chunks"] == (1, 10, 10)
    for name in ("tiles", "plain"):
        np.testing.assert_array_equal(back[name].values, values[:, 5:, 3:47])
    # Dask chunks already on the grid are left as they are (one store task per tile).
    kept = _on_a_zarr_grid(xr.Dataset({"tiles": tiles}))["tiles"]
    assert kept.data.name == tiles.data.name and kept.encoding["chunks"] == (1, 10, 10)


def test_plain_open_zarr_keeps_crs_and_string_coords_without_warnings(tmp_path: Path) -> None:
    store = tmp_path / "cube.zarr"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. zarr's unstable fixed-width string dtype
        write_dataset(small_dataset(), store, overwrite=False)
    cube = xr.open_zarr(store, consolidated=False)["cube"]
    assert cube.rio.crs == CRS.from_epsg(32613)
    assert cube.rio.transform() == TRANSFORM
    assert cube["label"].values.tolist() == ["clear", "cloudy"]


def test_progress_with_a_distributed_client(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    distributed = pytest.importorskip("distributed")
    shown: list[object] = []
    real_progress = distributed.progress

    def recording_progress(*futures: object, **kwargs: object) -> object:
        shown.extend(futures)
        return real_progress(*futures, **kwargs)

    monkeypatch.setattr(distributed, "progress", recording_progress)
    with (
        distributed.Client(processes=False, n_workers=1, threads_per_worker=1,
                           dashboard_address=None),
        warnings.catch_warnings(),
    ):  # fmt: skip
        warnings.simplefilter("ignore", ResourceWarning)
        write_dataset(small_dataset(), tmp_path / "cube.zarr", overwrite=False, progress=True)
    assert len(shown) == 1  # distributed's bar, not dask's local one
    assert is_complete(tmp_path / "cube.zarr")


# -------------------------------------------------------------------------------- open_store


def test_open_store_errors(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no store"):
        open_store(tmp_path / "missing.zarr")
    (tmp_path / "folder").mkdir()
    with pytest.raises(StoreError, match="not a Zarr store"):
        open_store(tmp_path / "folder")
    store = make_store(tmp_path / "cube.zarr")
    with pytest.raises(StoreError, match="not a mask store"):
        open_store(store, kind="mask")
    with pytest.raises(ParameterError, match="chunks"):
        open_store(store, chunks=16)  # type: ignore[arg-type]
    assert open_store(store, chunks={"time": 2})["cube"].chunks[0] == (2,)


def test_mark_complete_needs_a_store(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="not a Zarr store"):
        mark_complete(tmp_path)
    assert not is_complete(tmp_path / "missing.zarr")


def test_new_image_arrays_get_the_fast_compressor_and_keep_their_values(tmp_path: Path) -> None:
    import zarr

    from spoc_xr.store import IMAGE_COMPRESSOR

    rng = np.random.default_rng(0)
    ds = xr.Dataset(
        {
            "reference": (("band", "y", "x"), rng.normal(size=(2, 7, 9)).astype(np.float32)),
            "stack": (("band", "y", "x"), rng.integers(0, 4000, (2, 7, 9)).astype(np.uint16)),
            "mask": (("y", "x"), rng.integers(0, 3, (7, 9)).astype(np.uint8)),
        }
    ).chunk({"y": 4, "x": 4})
    store = tmp_path / "out.zarr"
    write_dataset(ds, store, overwrite=False)
    compressors = {name: zarr.open_array(store / name, mode="r").compressors for name in ds}
    # Image values decode 2-4x faster than with Zstandard; byte masks keep Zstandard.
    for name in ("reference", "stack"):
        (codec,) = compressors[name]
        assert (codec.cname, codec.clevel, codec.shuffle) == (
            IMAGE_COMPRESSOR.cname,
            IMAGE_COMPRESSOR.clevel,
            IMAGE_COMPRESSOR.shuffle,
        )
    assert [type(codec).__name__ for codec in compressors["mask"]] == ["ZstdCodec"]
    back = xr.open_zarr(store, consolidated=False).load()
    xr.testing.assert_equal(back[list(ds)], ds.load())


def test_small_variables_are_written_by_one_task_each_in_chunks_per_date(tmp_path: Path) -> None:
    import dask
    import zarr

    from spoc_xr.store import SMALL_VARIABLE_BYTES, create_store, write_region

    n_dates = 7
    shares = xr.DataArray(
        da.arange(n_dates, dtype=np.float32, chunks=1) / 10, dims="time", name="shares"
    )
    cube = xr.DataArray(
        da.ones((n_dates, 600, 600), dtype=np.uint8, chunks=(1, 600, 600)),
        dims=("time", "y", "x"),
    )
    assert cube.nbytes > SMALL_VARIABLE_BYTES >= shares.nbytes
    ds = xr.Dataset({"shares": shares, "cube": cube}, coords={"time": np.arange(n_dates)})
    pending = write_dataset(ds, tmp_path / "out.zarr", overwrite=False, compute=False)
    assert isinstance(pending, Delayed)
    writes = [key for key in dict(pending.__dask_graph__()) if "store-map" in str(key)]
    # One task writes every chunk of the small variable; the cube keeps a task per chunk.
    assert len(writes) == 1 + n_dates
    dask.compute(pending)
    stored = zarr.open_array(tmp_path / "out.zarr" / "shares", mode="r")
    assert stored.chunks == (1,)
    np.testing.assert_array_equal(stored[:], np.arange(n_dates, dtype=np.float32) / 10)

    # A region write (a batch of a resumable run) keeps the layout and writes only its dates.
    create_store(ds, tmp_path / "batched.zarr", provenance={"recipe": {}, "dates": []})
    write_region(ds.isel(time=slice(2, 5)), tmp_path / "batched.zarr", region={"time": slice(2, 5)})
    written = sorted(int(p.name) for p in (tmp_path / "batched.zarr" / "shares" / "c").iterdir())
    assert written == [2, 3, 4]
    back = zarr.open_array(tmp_path / "batched.zarr" / "shares", mode="r")
    assert back.chunks == (1,)
    np.testing.assert_array_equal(back[2:5], np.arange(2, 5, dtype=np.float32) / 10)


def test_add_variables_keeps_the_store_and_remove_variable_deletes_only_that_array(
    tmp_path: Path,
) -> None:
    from spoc_xr.store import add_variables, read_attrs, remove_variable, write_region

    store = make_store(tmp_path / "cube.zarr")
    before = read_attrs(store)
    extra = (small_dataset()["cube"] * 2).rename("doubled").to_dataset()
    add_variables(extra, store)
    assert read_attrs(store) == before  # the root attributes are the store's own
    write_region(extra, store, region={})
    back = open_store(store)
    np.testing.assert_array_equal(back["doubled"].values, 2 * back["cube"].values)
    remove_variable(store, "doubled")
    remove_variable(store, "doubled")  # gone already: nothing to do
    assert sorted(open_store(store).data_vars) == ["cube"]
    assert (store / "cube" / "zarr.json").is_file()


def test_a_store_of_another_kind_is_never_replaced_even_with_overwrite(tmp_path: Path) -> None:
    import zarr

    from spoc_xr.store import check_output_path

    stack = tmp_path / "stack.zarr"
    zarr.open_group(stack, mode="w", zarr_format=3).attrs["spoc_xr"] = {"kind": "stack"}
    # A mistyped output: annotating (or writing an object table) onto the input stack.
    for kind, wanted in (("annotations", "an annotations store"), ("file", "a file")):
        with pytest.raises(OutputError, match=f"spoc_xr stack store, not {wanted}.*even with"):
            check_output_path(stack, overwrite=True, kind=kind)
    assert (stack / "zarr.json").is_file()
    # The same kind, or no kind given (the Python writers), may be replaced with overwrite.
    assert check_output_path(stack, overwrite=True, kind="stack") == stack
    assert check_output_path(stack, overwrite=True) == stack
    foreign = tmp_path / "foreign.zarr"
    zarr.open_group(foreign, mode="w", zarr_format=3)
    assert check_output_path(foreign, overwrite=True, kind="annotations") == foreign
    with pytest.raises(OutputError, match="Zarr store, not a file"):
        check_output_path(foreign, overwrite=True, kind="file")


def test_an_output_in_a_folder_that_cannot_be_written_is_refused_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    from spoc_xr import store

    locked = tmp_path / "locked"
    locked.mkdir()
    # Root ignores permission bits, so the folder's answer is given by os.access itself.
    monkeypatch.setattr(store.os, "access", lambda path, mode: Path(path) != locked)
    with pytest.raises(OutputError, match=r"'.*locked' is not writable.*writable folder"):
        store.check_output_path(locked / "new" / "out.zarr", overwrite=False)
    assert not (locked / "new").exists() and os.listdir(locked) == []
    assert store.check_output_path(tmp_path / "out.zarr", overwrite=False) == tmp_path / "out.zarr"
