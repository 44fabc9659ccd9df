"""Hypothesis properties of the pipeline on random small stacks and random chunkings."""

from __future__ import annotations

import dask
import numpy as np
import xarray as xr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spoc_xr.detect import SMALL
from spoc_xr.pipeline import annotate
from tests.helpers import make_stack

settings.register_profile(
    "ci",
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
)
CI = settings.get_profile("ci")


@st.composite
def stacks(draw: st.DrawFn) -> tuple[xr.DataArray, dict[str, int]]:
    """A random small stack with random boats, and a random spatial chunking of it."""
    n_y = draw(st.integers(16, 40))
    n_x = draw(st.integers(16, 40))
    n_time = draw(st.integers(3, 5))
    seed = draw(st.integers(0, 2**16))
    stack = make_stack(n_time=n_time, shape=(n_y, n_x), seed=seed)
    data = stack.values.astype(np.float64)
    rng = np.random.default_rng(seed)
    for _ in range(draw(st.integers(0, 4))):
        t = int(rng.integers(n_time))
        y, x = int(rng.integers(n_y - 3)), int(rng.integers(max(1, n_x // 2 - 3)))
        size = int(rng.integers(1, 4))
        data[t, :, y : y + size, x : x + size] += rng.uniform(800, 3000)
    stack = stack.copy(data=np.clip(data, 1, 65535).astype(np.uint16))
    chunks = {"y": draw(st.integers(5, n_y)), "x": draw(st.integers(5, n_x))}
    return stack, chunks


def _computed(stack: xr.DataArray, chunks: dict[str, int]) -> xr.Dataset:
    with dask.config.set(scheduler="synchronous"):
        return annotate(stack.chunk({"time": 1, **chunks})).compute()


@settings(CI)
@given(stacks())
def test_chunked_equals_single_chunk_and_masks_are_well_formed(
    case: tuple[xr.DataArray, dict[str, int]],
) -> None:
    stack, chunks = case
    whole = _computed(stack, {"y": -1, "x": -1})
    tiled = _computed(stack, chunks)
    for name in ("mask", "valid", "heatmap", "water", "reference", "valid_fraction"):
        np.testing.assert_array_equal(tiled[name].values, whole[name].values, err_msg=name)
    assert set(np.unique(tiled.mask.values)) <= {0, 1, 2}
    expected = ((tiled.mask == SMALL) & (tiled.water == 1)).sum("time")
    np.testing.assert_array_equal(tiled.heatmap.values, expected.values)
