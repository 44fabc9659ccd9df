"""Pictures and the run report: rendered on small data and checked as a person would look."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest
import xarray as xr

from spoc_xr import plots
from spoc_xr.cli import main
from spoc_xr.detect import DetectParams
from spoc_xr.errors import InputError, OutputError, ParameterError
from spoc_xr.pipeline import annotate
from spoc_xr.plots import (
    HEATMAP_LABEL,
    LARGE_LABEL,
    SMALL_LABEL,
    counts_figure,
    date_indices,
    heatmap_figure,
    object_counts,
    overlay_mask,
    pixel_size,
    quicklook,
    rgb_band_indices,
    save_figures,
    stretch,
)
from spoc_xr.report import check_report_dir, report_dir_for, write_report
from tests.helpers import make_stack

SHAPE = (31, 37)


def fake_annotations(stack: xr.DataArray) -> xr.Dataset:
    """Annotations with known objects: date 1 two boats, date 2 one boat and a cloud."""
    n_time = stack.sizes["time"]
    mask = np.zeros((n_time, *SHAPE), dtype=np.uint8)
    mask[1, 3:5, 3:6] = 1
    mask[1, 10:12, 8:10] = 1
    mask[2, 20:22, 4:6] = 1
    mask[2, 5:20, 20:35] = 2
    heat = np.zeros(SHAPE, dtype=np.uint16)
    heat[3:5, 3:6] = 1
    heat[20:22, 4:6] = 3
    valid = np.ones(n_time, dtype=np.float32)
    valid[-1] = 0
    large = (mask == 2).mean(axis=(1, 2)).astype(np.float32)
    large[-1] = np.nan
    ds = xr.Dataset(
        {
            "mask": (("time", "y", "x"), mask),
            "heatmap": (("y", "x"), heat),
            "reference": stack.isel(time=0).astype(np.float32).drop_vars("time"),
            "water": (("y", "x"), (np.arange(SHAPE[1]) < SHAPE[1] // 2)[None].repeat(31, 0)),
            "valid_fraction": (("time",), valid),
            "small_fraction": (("time",), (mask == 1).mean(axis=(1, 2)).astype(np.float32)),
            "large_fraction": (("time",), large),
        },
        coords={"time": stack.time, "y": stack.y, "x": stack.x},
    )
    ds.attrs["spoc_xr"] = {
        "version": "0.1.0",
        "kind": "annotations",
        "parameters": {"kernel": 5, "threshold": "auto"},
        "reference": "date",
        "reference_index": 0,
        "water_index": "NDWI",
        "water_index_description": "NDWI from bands B03 and B08 > 0",
        "notes": ["auto reference: date 0 <cleanest>"],
    }
    return ds


@pytest.fixture(scope="module")
def stack() -> xr.DataArray:
    return make_stack(4, SHAPE)


@pytest.fixture(scope="module")
def annotations(stack: xr.DataArray) -> xr.Dataset:
    return fake_annotations(stack)


def shown(fig, index: int = 0) -> np.ndarray:
    return np.asarray(fig.axes[index].images[0].get_array())


def test_rgb_bands_are_found_by_name_else_first_three_else_grey() -> None:
    assert rgb_band_indices(["B02", "B03", "B04", "B08"]) == [2, 1, 0]
    assert rgb_band_indices(["nir", "Blue", "Green", "Red"]) == [3, 2, 1]
    assert rgb_band_indices(["a", "b", "c", "d"]) == [0, 1, 2]
    assert rgb_band_indices(["pan"]) == [0]


def test_stretch_is_shared_by_all_dates_so_a_bright_date_stays_brighter() -> None:
    rng = np.random.default_rng(0)
    dark = rng.uniform(100, 200, size=(1, 8, 8, 3))
    values = np.concatenate([dark, 2 * dark])
    out = stretch(values, (2, 98), axis=(0, 1, 2))
    assert out.min() == 0 and out.max() == 1
    assert out[1].mean() > out[0].mean() + 0.3
    with pytest.raises(ParameterError, match="percentiles"):
        stretch(values, (98, 2), axis=(0, 1, 2))


def test_overlay_changes_exactly_the_mask_pixels_in_two_colours() -> None:
    rgb = np.full((4, 5, 3), 0.3)
    mask = np.zeros((4, 5), dtype=np.uint8)
    mask[0, 0], mask[3, 4] = 1, 2
    out = overlay_mask(rgb, mask)
    changed = (out != rgb).any(axis=-1)
    np.testing.assert_array_equal(changed, mask > 0)
    assert out[0, 0].tolist() == list(plots.SMALL_COLOUR)
    assert not np.allclose(out[3, 4], out[0, 0])


def test_quicklook_draws_the_mask_where_it_is_with_a_two_class_legend(
    stack: xr.DataArray, annotations: xr.Dataset, tmp_path: Path
) -> None:
    plain = quicklook(stack, dates=[1, 2])
    masked = quicklook(stack, annotations["mask"], dates=[1, 2])
    for panel, t in enumerate([1, 2]):
        changed = (shown(plain, panel) != shown(masked, panel)).any(axis=-1)
        np.testing.assert_array_equal(changed, annotations["mask"].values[t] > 0)
    legend = masked.legends[0]
    assert [text.get_text() for text in legend.get_texts()] == [SMALL_LABEL, LARGE_LABEL]
    assert [ax.get_title() for ax in masked.axes] == ["2023-03-06", "2023-03-11"]
    path = tmp_path / "quicklook.png"
    masked.savefig(path, dpi=plots.FIGURE_DPI)
    height, width = mpimg.imread(path).shape[:2]
    expected = masked.get_size_inches() * plots.FIGURE_DPI
    assert (width, height) == tuple(np.round(expected).astype(int))


def test_quicklook_selects_dates_by_string_or_position_and_checks_them(
    stack: xr.DataArray,
) -> None:
    assert date_indices(stack.time, ["2023-03-11", -1, 0]) == [2, 3, 0]
    fig = quicklook(stack, dates="2023-03-06")
    assert len(fig.axes) == 1
    with pytest.raises(ParameterError, match="not in the stack"):
        quicklook(stack, dates="2024-01-01")
    with pytest.raises(ParameterError, match="outside"):
        quicklook(stack, dates=[9])
    with pytest.raises(ParameterError, match="bands"):
        quicklook(stack, bands=["B04", "nope", "B02"])
    with pytest.raises(ParameterError, match="single date"):
        quicklook(stack, dates=[0, 1], ax=fig.axes[0])


def test_quicklook_of_one_band_is_grey_and_nodata_is_grey(stack: xr.DataArray) -> None:
    holed = stack.copy(data=stack.values.copy())
    holed.values[0, :, :3, :3] = 0
    image = shown(quicklook(holed, dates=0, bands=["B08"]))
    np.testing.assert_array_equal(image[..., 0], image[..., 1])
    np.testing.assert_allclose(image[0, 0], plots.NODATA_COLOUR)


def test_quicklook_rejects_a_mask_of_another_stack(
    stack: xr.DataArray, annotations: xr.Dataset
) -> None:
    with pytest.raises(InputError, match="time steps"):
        quicklook(stack.isel(time=[0, 1]), annotations["mask"])


def test_quicklook_reads_a_subsample_of_large_images_and_keeps_one_pixel_boats(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    big = make_stack(1, (70, 64))
    mask = xr.zeros_like(big.isel(band=0), dtype=np.uint8)
    mask.values[0, 41, 13] = 1
    monkeypatch.setattr(plots, "DISPLAY_SIDE", 32)
    image = shown(quicklook(big, mask, dates=0))
    assert image.shape[:2] == (24, 22)  # every 3rd pixel
    magenta = (image == np.asarray(plots.SMALL_COLOUR)).all(axis=-1)
    assert magenta.sum() == 1 and magenta[41 // 3, 13 // 3]


def test_heatmap_figure_has_the_colour_bar_label_and_a_metre_scale_bar(
    annotations: xr.Dataset, tmp_path: Path
) -> None:
    fig = heatmap_figure(annotations.heatmap, annotations.reference, water=annotations.water)
    colorbar_axes = [ax for ax in fig.axes if ax.get_ylabel() == HEATMAP_LABEL]
    assert len(colorbar_axes) == 1
    # 37 px x 10 m = 370 m wide; a fifth is 74 m, rounded down to 50 m.
    labels = [t.get_text() for t in fig.axes[0].texts]
    assert "50 m" in labels
    counts = fig.axes[0].images[1].get_array()
    assert np.ma.count_masked(counts) == (annotations.heatmap.values == 0).sum()
    path = tmp_path / "heatmap.png"
    fig.savefig(path)
    assert mpimg.imread(path).shape[1] == round(fig.get_size_inches()[0] * fig.dpi)


def test_pixel_size_and_scale_bar_lengths() -> None:
    grid = xr.DataArray(np.zeros((2, 3)), dims=("y", "x"), coords={"x": [0.0, 20.0, 40.0]})
    assert pixel_size(grid) == 20.0
    assert pixel_size(grid.isel(x=[0])) is None
    assert [plots.nice_length(v) for v in (830, 190, 1.5, 3000)] == [500, 100, 1, 2000]
    assert plots._format_metres(2000) == "2 km"


def test_object_counts_count_components_with_8_connectivity() -> None:
    mask = np.zeros((2, 6, 6), dtype=np.uint8)
    mask[0, 0, 0] = mask[0, 1, 1] = 1  # diagonal neighbours: one object
    mask[0, 4, 4] = 1
    mask[1, 2:4, 2:4] = 2
    cube = xr.DataArray(mask, dims=("time", "y", "x"))
    assert object_counts(cube).tolist() == [2, 0]
    assert object_counts(cube, code=2).tolist() == [0, 1]
    assert object_counts(cube, connectivity=4).tolist() == [3, 0]


def test_counts_figure_bars_are_the_object_counts_and_empty_dates_say_no_data(
    annotations: xr.Dataset,
) -> None:
    fig = counts_figure(annotations)
    bars = [patch.get_height() for patch in fig.axes[0].patches]
    assert bars == [0, 2, 1, 0]
    cloud = fig.axes[1].lines[0].get_ydata()
    np.testing.assert_allclose(cloud[2], 100 * 225 / (31 * 37), rtol=1e-5)
    assert [t.get_text() for t in fig.axes[0].texts] == ["no data"]


def test_save_figures_and_report_link_three_pngs(
    stack: xr.DataArray, annotations: xr.Dataset, tmp_path: Path
) -> None:
    paths = save_figures(annotations, stack, tmp_path / "figs")
    assert sorted(paths) == ["counts", "heatmap", "quicklook"]
    assert all(p.is_file() and p.stat().st_size > 1000 for p in paths.values())
    page = write_report(annotations, stack, tmp_path / "run_report").read_text()
    assert sorted(re.findall(r'<img src="([^"]+)"', page)) == [
        "counts.png",
        "heatmap.png",
        "quicklook.png",
    ]
    assert all((tmp_path / "run_report" / name).is_file() for name in ("counts.png",))
    assert "<th>kernel</th><td>5</td>" in page
    assert "&lt;cleanest&gt;" in page  # notes are escaped
    assert "http" not in page  # no external asset


@pytest.mark.parametrize("shape", [(12, 400), (400, 12)], ids=["strip", "column"])
def test_figures_of_a_strip_image_lay_out_without_warnings_at_a_sane_size(
    tmp_path: Path, shape: tuple[int, int]
) -> None:
    stack = make_stack(3, shape)
    annotations = annotate(stack, params=DetectParams(kernel=3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib's "constrained_layout not applied" among them
        paths = save_figures(annotations, stack, tmp_path / "figs")
    for path in paths.values():
        height, width = mpimg.imread(path).shape[:2]
        assert 0.1 < height / width < 10, (path.name, height, width)


def test_report_folder_follows_the_overwrite_rule(tmp_path: Path) -> None:
    assert report_dir_for(tmp_path / "out.zarr") == tmp_path / "out_report"
    target = tmp_path / "out_report"
    assert check_report_dir(target, overwrite=False) == target
    target.mkdir()
    with pytest.raises(OutputError, match="--overwrite"):
        check_report_dir(target, overwrite=False)
    assert check_report_dir(target, overwrite=True) == target
    with pytest.raises(OutputError, match="contains"):
        check_report_dir(tmp_path, inputs=[tmp_path / "stack.zarr"], overwrite=True)


def test_annotate_refuses_an_existing_report_folder_before_writing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "out.zarr"
    (tmp_path / "out_report").mkdir()
    assert main(["annotate", str(tmp_path / "stack.zarr"), str(output)]) == 2
    assert "report folder" in capsys.readouterr().err
    assert not output.exists()
    # --no-report skips the check (and then fails on the missing stack instead).
    assert main(["annotate", str(tmp_path / "stack.zarr"), str(output), "--no-report"]) == 2
    assert "report folder" not in capsys.readouterr().err


def test_figures_draw_a_real_lazy_annotation(tmp_path: Path) -> None:
    stack = make_stack(5, SHAPE).chunk({"time": 1, "y": 16, "x": 16})
    params = DetectParams(kernel=3, tolerance=3, open_size=5, close_size=5, background_size=9)
    paths = save_figures(annotate(stack, params=params), stack, tmp_path)
    assert {p.name for p in paths.values()} == {"quicklook.png", "heatmap.png", "counts.png"}
