"""The .spoc accessor: thin, lazy wrappers that give the same results as the plain functions."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

import spoc_xr.accessor  # noqa: F401  (registers .spoc)
from spoc_xr.detect import DetectParams
from spoc_xr.errors import ParameterError
from spoc_xr.pipeline import annotate
from spoc_xr.plots import HEATMAP_LABEL, LARGE_LABEL, SMALL_LABEL
from tests.helpers import make_stack, raise_if_dask_computes

PARAMS = DetectParams(kernel=3, tolerance=3, open_size=5, close_size=5, background_size=9)


@pytest.fixture(scope="module")
def stack() -> xr.DataArray:
    return make_stack(5, (31, 37)).chunk({"time": 1, "y": 16, "x": 16})


def test_annotate_equals_the_pipeline_function_and_stays_lazy(stack: xr.DataArray) -> None:
    result = stack.spoc.annotate(params=PARAMS)
    assert result.mask.chunks is not None
    expected = annotate(stack, params=PARAMS)
    xr.testing.assert_identical(result.compute(), expected.compute())


def test_heatmap_is_the_lazy_heatmap_of_annotate(stack: xr.DataArray) -> None:
    heat = stack.spoc.heatmap(params=PARAMS)
    assert heat.name == "heatmap" and heat.dims == ("y", "x")
    assert heat.chunks is not None
    expected = annotate(stack, params=PARAMS)["heatmap"].values
    np.testing.assert_array_equal(heat.values, expected)


def test_accessor_passes_options_through_and_their_checks(stack: xr.DataArray) -> None:
    with pytest.raises(ParameterError):
        stack.spoc.annotate(kernel=4)
    with pytest.raises(ParameterError):
        stack.spoc.annotate(reference="1999-01-01")


def test_stack_quicklook_accepts_the_whole_annotation_dataset(stack: xr.DataArray) -> None:
    result = stack.spoc.annotate(params=PARAMS)
    fig = stack.spoc.quicklook(result, dates=[2, 3])
    assert len(fig.axes) == 2
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [SMALL_LABEL, LARGE_LABEL]
    assert stack.spoc.quicklook().legends == []


def test_dataset_accessor_draws_each_figure(stack: xr.DataArray, tmp_path) -> None:
    result = stack.spoc.annotate(params=PARAMS).compute()
    assert len(result.spoc.quicklook(stack, dates=0).axes) == 1
    heat = result.spoc.heatmap_figure()
    assert any(ax.get_ylabel() == HEATMAP_LABEL for ax in heat.axes)
    counts = result.spoc.counts_figure()
    assert len(counts.axes[0].patches) == stack.sizes["time"]
    page = result.spoc.report(stack, tmp_path / "r")
    assert page.name == "report.html" and (tmp_path / "r" / "heatmap.png").is_file()
    # Each date's row ends with its measured shift, or "-" where it is unknown (also for stores
    # written before shifts were kept).
    shifts = result.misregistration.values
    cells = ["-" if np.isnan(pair).any() else f"{pair[0]:+.2f}, {pair[1]:+.2f}" for pair in shifts]
    text = page.read_text()
    assert "shift y, x (px)" in text
    assert all(f'<td class="num">{cell}</td></tr>' in text for cell in cells)
    old = result.drop_vars("misregistration").spoc.report(stack, tmp_path / "old")
    assert old.read_text().count('<td class="num">-</td></tr>') == stack.sizes["time"]


def test_building_the_accessor_graph_computes_nothing_after_the_overview(
    stack: xr.DataArray,
) -> None:
    from spoc_xr.reference import compute_overview

    overview = compute_overview(stack)
    with raise_if_dask_computes():
        result = stack.spoc.annotate(params=PARAMS, overview=overview)
        heat = stack.spoc.heatmap(params=PARAMS, overview=overview)
    assert result.mask.chunks is not None and heat.chunks is not None
