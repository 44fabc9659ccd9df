"""Tests for spoc_xr.synthetic: files, truth format, realism constraints and the paste hook."""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio
from scipy import ndimage

from spoc_xr.errors import InputError, OutputError, ParameterError
from spoc_xr.synthetic import (
    BAND_NAMES,
    MAX_BOAT_LENGTH,
    HarbourScene,
    TruthArrays,
    make_boat_cutout,
    make_harbour,
    paste_objects,
    read_truth,
    render_harbour,
    write_truth,
)

# Non-square on purpose, so a y/x swap cannot pass.
SHAPE = (160, 224)
N_DATES = 6
SEED = 7


@pytest.fixture(scope="module")
def rendered() -> tuple[np.ndarray, TruthArrays]:
    return render_harbour(n_dates=N_DATES, shape=SHAPE, seed=SEED, cloud_fraction=0.5)


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> HarbourScene:
    out = tmp_path_factory.mktemp("harbour")
    return make_harbour(out, n_dates=N_DATES, shape=SHAPE, seed=SEED, cloud_fraction=0.5)


def _tifs(scene: HarbourScene) -> list[Path]:
    return sorted(scene.image_dir.glob("*.tif"))


def test_file_names_are_the_dates(written: HarbourScene) -> None:
    names = [p.name for p in _tifs(written)]
    expected = [f"harbour_{np.datetime_as_string(d, unit='D')}.tif" for d in written.dates]
    assert names == expected
    assert all(re.fullmatch(r"harbour_\d{4}-\d{2}-\d{2}\.tif", n) for n in names)
    assert str(written.dates[0]).startswith("2023-03-01T10:30")


def test_dates_follow_the_revisit(written: HarbourScene) -> None:
    days = np.diff(np.array(written.dates, dtype="datetime64[D]")).astype(int)
    assert set(days.tolist()) <= {5, 10}
    assert all(d != np.datetime64(d, "D") for d in written.dates)  # a time of day is kept


def test_geotiff_profile(written: HarbourScene) -> None:
    for path in _tifs(written):
        with rasterio.open(path) as src:
            assert src.count == 4
            assert src.descriptions == BAND_NAMES
            assert src.crs.to_epsg() == 32631
            assert src.nodata == 0
            assert src.res == (10.0, 10.0)
            assert (src.transform.c, src.transform.f) == (500000.0, 4650000.0)
            assert src.dtypes == ("uint16",) * 4
            assert (src.height, src.width) == SHAPE
            assert src.profile["tiled"]
            assert src.compression is not None and src.compression.name.lower() == "deflate"
            data = src.read()
        assert data.min() >= 1  # 0 is reserved for nodata


def test_files_hold_the_rendered_images(
    written: HarbourScene, rendered: tuple[np.ndarray, TruthArrays]
) -> None:
    images, truth = rendered
    for t, path in enumerate(_tifs(written)):
        with rasterio.open(path) as src:
            data = src.read()
        np.testing.assert_array_equal(data, np.clip(np.rint(images[t]), 1, 65535))
    ds = read_truth(written.truth_path)
    np.testing.assert_array_equal(ds["boats"].values, truth.boats)
    np.testing.assert_array_equal(ds["clouds"].values, truth.clouds)
    np.testing.assert_array_equal(ds["water"].values, truth.water)
    assert written.n_boats == truth.n_boats


def test_truth_store_format(written: HarbourScene) -> None:
    assert (written.truth_path / "zarr.json").exists()  # Zarr v3
    ds = read_truth(written.truth_path)
    assert ds["boats"].dims == ("time", "y", "x")
    assert ds["boats"].shape == (N_DATES, *SHAPE)
    assert ds["boats"].dtype == np.int32
    assert ds["clouds"].dtype == np.uint8
    assert ds["water"].dims == ("y", "x")
    assert ds["water"].dtype == np.uint8
    assert ds["time"].dtype == np.dtype("datetime64[ns]")
    np.testing.assert_array_equal(ds["time"].values, np.array(written.dates, "datetime64[ns]"))
    # Coordinates are the GeoTIFF pixel centres.
    assert ds["x"].values[0] == 500005.0
    assert ds["y"].values[0] == 4649995.0
    # read_truth also takes the scene folder itself.
    assert read_truth(written.truth_path.parent)["boats"].shape == ds["boats"].shape


def test_truth_records_each_dates_shift(written: HarbourScene) -> None:
    from spoc_xr.synthetic import MAX_SHIFT_PX, _prepare

    shifts = read_truth(written.truth_path)["misregistration"]
    assert shifts.dims == ("time", "axis") and list(shifts.axis.values) == ["y", "x"]
    # The very shifts each date was rendered with; the first date is the scene's own grid.
    _, plan = _prepare(N_DATES, SHAPE, SEED, 0.5, None)
    expected = np.array([day.shift for day in plan.days], dtype=np.float32)
    np.testing.assert_array_equal(shifts.values, expected)
    assert (shifts.values[0] == 0).all() and (shifts.values[1:] != 0).all()
    assert (np.abs(shifts.values) <= MAX_SHIFT_PX).all()


def test_boat_ids_are_unique_over_the_stack(rendered: tuple[np.ndarray, TruthArrays]) -> None:
    _, truth = rendered
    seen: set[int] = set()
    for t in range(N_DATES):
        ids = set(np.unique(truth.boats[t]).tolist()) - {0}
        assert ids, f"date {t} has no boat"
        assert not ids & seen
        seen |= ids
    assert truth.n_boats == len(seen)


def test_boats_lie_in_water_or_touch_a_quay(rendered: tuple[np.ndarray, TruthArrays]) -> None:
    _, truth = rendered
    # One pixel of tolerance: misregistration (< 0.6 px) and anti-aliasing at the quay side.
    near_water = ndimage.binary_dilation(truth.water.astype(bool))
    boat = truth.boats > 0
    assert near_water[np.nonzero(boat)[1:]].all()
    # Most boat pixels are plainly in water.
    assert truth.water[np.nonzero(boat)[1:]].mean() > 0.9


def test_boat_sizes(rendered: tuple[np.ndarray, TruthArrays]) -> None:
    _, truth = rendered
    lengths = [
        max(s.stop - s.start for s in sl)
        for t in range(N_DATES)
        for sl in ndimage.find_objects(truth.boats[t])
        if sl is not None
    ]
    lengths_arr = np.array(lengths)
    assert lengths_arr.min() >= 1
    # A 35 px hull can touch 36 pixels at >= 50 % coverage when it straddles pixel edges.
    assert lengths_arr.max() <= MAX_BOAT_LENGTH + 1
    assert (lengths_arr <= 3).any() and (lengths_arr >= 8).any()  # small and large both present


def test_clouds_on_some_date_never_the_first(rendered: tuple[np.ndarray, TruthArrays]) -> None:
    _, truth = rendered
    cover = truth.clouds.reshape(N_DATES, -1).mean(axis=1)
    assert cover[0] == 0
    assert (cover > 0.02).any()
    assert set(np.unique(truth.clouds).tolist()) <= {0, 1}


def test_no_clouds_when_cloud_fraction_is_zero() -> None:
    images, truth = render_harbour(n_dates=3, shape=(128, 128), seed=1, cloud_fraction=0.0)
    assert truth.clouds.max() == 0
    assert np.percentile(images[:, 0], 99) < 3000  # no cloud or haze brightening anywhere


def test_clouds_are_bright(rendered: tuple[np.ndarray, TruthArrays]) -> None:
    images, truth = rendered
    t = int(np.argmax(truth.clouds.reshape(N_DATES, -1).sum(axis=1)))
    # Cloud truth mixes bright cloud and dark shadow; its brightest part must be cloud-bright.
    blue = images[t, 0][truth.clouds[t] == 1]
    assert np.percentile(blue, 90) > 2000


def test_first_date_has_few_boats(rendered: tuple[np.ndarray, TruthArrays]) -> None:
    _, truth = rendered
    counts = [np.unique(truth.boats[t]).size - 1 for t in range(N_DATES)]
    assert counts[0] <= np.median(counts[1:])


def test_boats_are_brighter_than_water(rendered: tuple[np.ndarray, TruthArrays]) -> None:
    images, truth = rendered
    t = 1
    boat = (truth.boats[t] > 0) & (truth.clouds[t] == 0)
    water = (truth.water == 1) & (truth.boats[t] == 0) & (truth.clouds[t] == 0)
    assert np.median(images[t, 3][boat]) > np.median(images[t, 3][water]) + 200


def test_same_seed_same_stack_other_seed_differs() -> None:
    a, ta = render_harbour(n_dates=2, shape=(128, 128), seed=3)
    b, tb = render_harbour(n_dates=2, shape=(128, 128), seed=3)
    c, tc = render_harbour(n_dates=2, shape=(128, 128), seed=4)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(ta.boats, tb.boats)
    assert not np.array_equal(a, c)
    assert not np.array_equal(ta.water, tc.water)


def test_existing_output_is_refused_then_overwritten(tmp_path: Path) -> None:
    (tmp_path / "something.txt").write_text("keep me")
    with pytest.raises(OutputError, match="overwrite=True"):
        make_harbour(tmp_path, n_dates=1, shape=(128, 128))
    scene = make_harbour(tmp_path, n_dates=2, shape=(128, 128), overwrite=True)
    assert len(_tifs(scene)) == 2
    scene = make_harbour(tmp_path, n_dates=1, shape=(128, 128), overwrite=True)
    assert len(_tifs(scene)) == 1  # stale dates removed
    assert read_truth(scene.truth_path)["boats"].shape[0] == 1


@pytest.mark.parametrize(
    "kwargs",
    [
        {"shape": (64, 512)},
        {"n_dates": 0},
        {"cloud_fraction": 1.5},
        {"seed": -1},
        {"dtype": "uint8"},
    ],
)
def test_bad_parameters_raise(tmp_path: Path, kwargs: dict[str, object]) -> None:
    with pytest.raises(ParameterError):
        make_harbour(tmp_path / "out", **kwargs)  # type: ignore[arg-type]
    assert not (tmp_path / "out").exists()  # checked before any work


def test_float32_files(tmp_path: Path) -> None:
    scene = make_harbour(tmp_path, n_dates=1, shape=(128, 128), dtype="float32")
    with rasterio.open(_tifs(scene)[0]) as src:
        assert src.dtypes[0] == "float32"
        assert src.read().min() >= 1.0


def test_paste_objects_exact_and_rotated() -> None:
    img = np.zeros((2, 10, 10), dtype=np.float32)
    mask = np.ones((1, 3), dtype=bool)
    patch = np.stack([np.full((1, 3), 5.0), np.full((1, 3), 7.0)])
    out, lab = paste_objects(img, [mask], [patch], [(4.5, 4.5)], [0.0], first_label=9)
    assert np.argwhere(lab == 9).tolist() == [[4, 3], [4, 4], [4, 5]]
    assert out[:, 4, 4].tolist() == [5.0, 7.0]
    assert out[:, 3, 4].tolist() == [0.0, 0.0]
    _, lab90 = paste_objects(img, [mask], [patch], [(4.5, 4.5)], [90.0])
    assert np.argwhere(lab90 == 1).tolist() == [[3, 4], [4, 4], [5, 4]]
    assert not img.any()  # input untouched


def test_paste_objects_antialiases_and_keeps_tiny_objects() -> None:
    img = np.zeros((1, 8, 8), dtype=np.float32)
    one = np.ones((1, 1, 1), dtype=np.float32) * 100
    # Centred on a pixel corner: four pixels each a quarter covered.
    out, lab = paste_objects(img, [np.ones((1, 1), bool)], [one], [(4.0, 4.0)], [0.0])
    np.testing.assert_allclose(out[0, 3:5, 3:5], 25.0)
    assert (lab > 0).sum() == 1  # below 50 % everywhere, yet the object keeps one pixel
    # Half a pixel off: two pixels half covered, both join the label.
    out, lab = paste_objects(img, [np.ones((1, 1), bool)], [one], [(4.5, 4.0)], [0.0])
    np.testing.assert_allclose(out[0, 4, 3:5], 50.0)
    assert (lab > 0).sum() == 2


def test_paste_objects_rejects_mismatched_inputs() -> None:
    img = np.zeros((4, 8, 8), dtype=np.float32)
    with pytest.raises(ParameterError, match="cutout shape"):
        paste_objects(img, [np.ones((2, 2), bool)], [np.ones((3, 2, 2))], [(4, 4)], [0])
    with pytest.raises(ParameterError, match="one cutout"):
        paste_objects(img, [np.ones((2, 2), bool)], [], [(4, 4)], [0])


def test_boat_cutout_shape_and_taper() -> None:
    patch, mask = make_boat_cutout(10, 2.5, np.full(4, 2000.0), rng=np.random.default_rng(0))
    assert patch.shape == (4, 10, 40)
    assert mask[:, 0].all() and not mask[:, -1].all()  # square stern, pointed bow


def test_real_cutouts_hook() -> None:
    patch = np.full((4, 3, 12), 2500.0, dtype=np.float32)
    mask = np.ones((3, 12), dtype=bool)
    _, truth = render_harbour(
        n_dates=2, shape=(128, 128), seed=2, cloud_fraction=0, boat_cutouts=[(patch, mask)]
    )
    sizes = ndimage.sum_labels(truth.boats > 0, truth.boats, np.unique(truth.boats)[1:])
    assert truth.n_boats > 0
    assert np.all((sizes >= 30) & (sizes <= 50))  # each is the 3x12 cut-out (36 px)


def test_truth_round_trip_zarr_and_npz(tmp_path: Path) -> None:
    boats = np.zeros((2, 5, 6), dtype=np.int32)
    boats[0, 1, 1] = 1
    boats[1, 2, 3] = 2
    clouds = np.zeros_like(boats, dtype=np.uint8)
    clouds[1, 0, :] = 1
    water = np.ones((5, 6), dtype=np.uint8)
    dates = [np.datetime64("2023-03-01T10:30:21"), np.datetime64("2023-03-06T10:30:21")]
    path = write_truth(tmp_path / "t.zarr", boats=boats, clouds=clouds, water=water, dates=dates)
    with pytest.raises(OutputError):
        write_truth(path, boats=boats, clouds=clouds, water=water, dates=dates)
    ds = read_truth(path)
    np.testing.assert_array_equal(ds["boats"].values, boats)
    np.testing.assert_array_equal(ds["clouds"].values, clouds)
    assert ds["time"].values[1] == np.datetime64("2023-03-06T10:30:21", "ns")

    assert "misregistration" not in ds.data_vars  # optional
    shifts = np.array([[0.0, 0.0], [0.25, -0.5]])
    moved = write_truth(
        tmp_path / "s.zarr", boats=boats, clouds=clouds, water=water, dates=dates, shifts=shifts
    )
    np.testing.assert_array_equal(read_truth(moved)["misregistration"].values, shifts)
    with pytest.raises(ParameterError, match=r"shifts must be finite \(time, 2\)"):
        write_truth(tmp_path / "bad.zarr", boats=boats, clouds=clouds, water=water,
                    dates=dates, shifts=shifts[:1])  # fmt: skip
    assert not (tmp_path / "bad.zarr").exists()

    npz_dir = tmp_path / "npz"
    npz_dir.mkdir()
    stamps = np.array([str(d) for d in dates])
    np.savez(npz_dir / "truth.npz", boats=boats, time=stamps, misregistration=shifts)
    dn = read_truth(npz_dir)
    np.testing.assert_array_equal(dn["misregistration"].values, shifts)
    np.testing.assert_array_equal(dn["boats"].values, boats)
    assert dn["clouds"].values.max() == 0  # absent clouds mean none
    assert dn["water"].values.min() == 1  # absent water means everywhere
    np.testing.assert_array_equal(dn["time"].values, ds["time"].values)
    # Three values per date is no (dy, dx) shift: refused by name, not a broadcasting error later.
    np.savez(npz_dir / "truth.npz", boats=boats, time=stamps, misregistration=np.zeros((2, 3)))
    with pytest.raises(InputError, match=r"'misregistration' must have dims \(time, axis\) with 2"):
        read_truth(npz_dir)


def test_read_truth_errors_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="neither"):
        read_truth(tmp_path)
    np.savez(tmp_path / "bad.npz", boats=np.zeros((1, 2, 2), np.int32))
    with pytest.raises(InputError, match=r"bad\.npz"):
        read_truth(tmp_path / "bad.npz")


def test_a_malformed_truth_npz_gets_one_plain_line_without_array_dumps(tmp_path: Path) -> None:
    stamps = np.array(["2023-01-01", "2023-01-06"])
    (tmp_path / "text.npz").write_text("boats,time\n")
    with pytest.raises(InputError, match=r"text\.npz is not a \.npz archive.*numpy\.savez"):
        read_truth(tmp_path / "text.npz")
    np.savez(tmp_path / "flat.npz", boats=np.zeros((4, 5), np.int32), time=stamps)
    with pytest.raises(InputError, match=r"'boats' has shape \(4, 5\), but must be \(time, y, x\)"):
        read_truth(tmp_path / "flat.npz")
    np.savez(tmp_path / "short.npz", boats=np.zeros((3, 4, 5), np.int32), time=stamps)
    with pytest.raises(InputError, match=r"sizes do not fit together") as refused:
        read_truth(tmp_path / "short.npz")
    assert "\n" not in str(refused.value) and "array(" not in str(refused.value)


@pytest.mark.slow
def test_render_is_fast_enough() -> None:
    start = time.perf_counter()
    _, truth = render_harbour(n_dates=16, shape=(512, 512), seed=0)
    elapsed = time.perf_counter() - start
    counts = [np.unique(truth.boats[t]).size - 1 for t in range(1, 16)]
    assert 8 <= np.median(counts) <= 32  # about 10-30 boats per date at 512 x 512
    # Budget is 5 s; the slack absorbs a busy shared CI machine.
    assert elapsed < 10.0, f"render_harbour took {elapsed:.1f} s"
