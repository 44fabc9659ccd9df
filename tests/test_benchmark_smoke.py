"""A tiny run of every contender of ``benchmarks/run.py`` (no timing asserts)."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import xarray as xr
import zarr

from spoc_xr.ingest import open_stack
from tests.helpers import load_benchmark


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_benchmark("run")


@pytest.fixture(scope="module")
def store(bench: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bench") / "stack.zarr"
    return bench.build_stack(path, size=160, n_dates=3, n_bands=4)


def test_build_stack_layout_and_reuse(bench: ModuleType, store: Path) -> None:
    stack = open_stack(store)
    assert stack.dims == ("time", "band", "y", "x")
    assert stack.shape == (3, 4, 160, 160)
    assert stack.dtype == np.uint16
    assert stack.attrs["nodata"] == 0
    assert list(stack.band.values) == ["B02", "B03", "B04", "B08"]
    values = stack.values
    assert values.min() >= 1
    # Dates differ (gain and noise), even where the rendered date is reused.
    assert not np.array_equal(values[0], values[1])
    stamp = (store / "stack" / "zarr.json").stat().st_mtime_ns
    bench.build_stack(store, size=160, n_dates=3, n_bands=4)
    assert (store / "stack" / "zarr.json").stat().st_mtime_ns == stamp


def test_contenders_write_their_outputs(bench: ModuleType, store: Path, tmp_path: Path) -> None:
    bench.read_only(store, 3)
    bench.spoc_annotate(store, tmp_path / "a.zarr", 3)
    bench.dask_image_composition(store, tmp_path / "d.zarr", 2)
    bench.numpy_loop(store, tmp_path / "n.zarr", 2)
    annotated = xr.open_zarr(tmp_path / "a.zarr", consolidated=False)
    assert annotated["mask"].shape == (3, 160, 160)
    composed = xr.open_zarr(tmp_path / "d.zarr", consolidated=False)
    looped = zarr.open_array(tmp_path / "n.zarr", mode="r")
    assert composed["mask"].shape == looped.shape == (2, 160, 160)
    # Both textbook versions compute the same chain; dask-image's opening treats the image
    # border its own way, so the outer kernel-wide frame may differ.
    inner = (slice(None), slice(5, -5), slice(5, -5))
    np.testing.assert_array_equal(composed["mask"].values[inner], looped[:][inner])
    compared, differing = bench.check_identical(
        store, tmp_path / "a.zarr", 3, dates=[1, 2], window=64
    )
    assert compared == 2 * 64 * 64
    assert differing == 0


def test_table_and_options(bench: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    row = bench.Measure("read only", "threads", 2.0, 10.0)
    assert row.rate == 5.0
    bench.print_table([row])
    assert "| read only | threads | 10.0 | 2.0 | 5.0 |" in capsys.readouterr().out
    quick = bench.parse_args(["--quick"])
    assert (quick.size, quick.dates, quick.baseline_dates) == (1024, 8, 2)
    default = bench.parse_args(["--size", "512"])
    assert (default.size, default.dates, default.memory_limit) == (512, 40, "2GB")


def test_larger_than_memory_helpers(bench: ModuleType, store: Path, tmp_path: Path) -> None:
    # Peak per tenth of the run: each sample lands in its slice, the last one in the last slice.
    timeline = [(0.0, 1e6), (4.0, 5e6), (5.0, 2e6), (10.0, 3e6)]
    assert bench.timeline_slices(timeline, 5) == [1.0, 0.0, 5.0, 0.0, 3.0]
    assert bench.timeline_slices([]) == []
    assert bench.chunks_written(tmp_path / "missing.zarr") == 0
    bench.spoc_annotate(store, tmp_path / "a.zarr", 3)
    assert bench.chunks_written(tmp_path / "a.zarr") == 3
    ltm = bench.parse_args(["--larger-than-memory", "--ltm-gb", "6", "--memory-limit", "1GB"])
    assert (ltm.larger_than_memory, ltm.ltm_gb, ltm.memory_limit) == (True, 6.0, "1GB")


def test_events_per_slice(bench: ModuleType) -> None:
    # Cumulative spill writes 0, 0, 3, 3, 7 over 10 s: 3 events in the middle, 4 at the end.
    cumulative = [(0.0, 0.0), (2.0, 0.0), (5.0, 3.0), (7.0, 3.0), (10.0, 7.0)]
    assert bench.events_per_slice(cumulative, 5) == [0, 0, 3, 0, 4]
    assert bench.events_per_slice([], 5) == []
