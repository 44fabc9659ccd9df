"""Small in-memory stacks and laziness checks shared by the tests."""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import dask
import numpy as np
import xarray as xr

BANDS = ["B02", "B03", "B04", "B08"]
WATER = np.array([700.0, 600.0, 400.0, 200.0])
LAND = np.array([900.0, 1000.0, 1100.0, 2800.0])


def make_stack(
    n_time: int = 5, shape: tuple[int, int] = (31, 37), seed: int = 0, nodata: int = 0
) -> xr.DataArray:
    """A numpy-backed (time, band, y, x) uint16 stack: water left, textured land right.

    Dates differ by a per-band gain and noise; date 2 carries a 2 x 2 boat on water at
    [5:7, 5:7], date 3 a bright 14 x 16 cloud at [12:26, 18:34].
    """
    rng = np.random.default_rng(seed)
    n_y, n_x = shape
    land = np.zeros(shape, dtype=bool)
    land[:, n_x // 2 :] = True
    base = np.where(land[None], LAND[:, None, None], WATER[:, None, None])
    texture = 1 + 0.1 * np.sin(np.arange(n_x) / 3.0)[None, None, :] * land[None]
    base = base * texture
    dates = []
    for t in range(n_time):
        gain = rng.uniform(0.85, 1.15, size=(4, 1, 1))
        image = base * gain + rng.normal(0, 8, size=(4, *shape))
        if t == 2:
            image[:, 5:7, 5:7] += 1500 * gain
        if t == 3 and n_y >= 26 and n_x >= 34:
            image[:, 12:26, 18:34] += 4000
        dates.append(image)
    data = np.clip(np.stack(dates), 1, 65535).astype(np.uint16)
    times = np.datetime64("2023-03-01T10:30:00") + np.arange(n_time) * np.timedelta64(5, "D")
    return xr.DataArray(
        data,
        dims=("time", "band", "y", "x"),
        coords={
            "time": times.astype("datetime64[ns]"),
            "band": BANDS,
            "y": 4650000.0 - 10 * np.arange(n_y) - 5,
            "x": 500000.0 + 10 * np.arange(n_x) + 5,
        },
        name="stack",
        attrs={"nodata": nodata},
    )


@contextlib.contextmanager
def raise_if_dask_computes(max_computes: int = 0) -> Iterator[None]:
    """Fail if Dask computes anything inside the block (as xarray's own test helper does)."""
    count = 0

    def scheduler(dsk, keys, **kwargs):
        nonlocal count
        count += 1
        if count > max_computes:
            raise RuntimeError(f"Too many computes: {count} > {max_computes}")
        return dask.get(dsk, keys, **kwargs)

    with dask.config.set(scheduler=scheduler):
        yield


def worker_addresses(client: Any) -> list[str]:
    """Addresses of every worker, sorted, asked of the scheduler now.

    ``client.scheduler_info()`` returns a cache that the client's periodic refresh overwrites
    with a summary that lists no workers, so a test reading it can see none at all.
    """
    identity = client.sync(client.scheduler.identity, n_workers=-1)
    return sorted(identity["workers"])


#: The benchmark scripts, which tests import by path (benchmarks/ is no package).
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(script: str) -> ModuleType:
    """Import ``benchmarks/<script>.py`` as module ``spoc_benchmark_<script>``."""
    spec = importlib.util.spec_from_file_location(
        f"spoc_benchmark_{script}", BENCHMARKS / f"{script}.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
