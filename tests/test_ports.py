"""Semi-real port stacks from the shared sen2ships scenes (skipped without the shared data)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
from scipy import ndimage

from spoc_xr.errors import InputError, OutputError, ParameterError
from spoc_xr.ingest import ingest
from spoc_xr.ports import (
    MAX_SHIFT_PX,
    PORT_BANDS,
    PortScene,
    clean_background,
    decode_rle,
    find_port,
    load_port,
    load_port_scene,
    make_port_stack,
    port_dirs,
    water_from_mndwi,
)
from spoc_xr.synthetic import read_truth

PORTS = port_dirs()
needs_data = pytest.mark.skipif(
    not {"casablanca", "busan"} <= set(PORTS),
    reason="shared data ../shared/data/sen2ships (casablanca, busan) is absent; set "
    "SPOC_XR_SHARED_DATA to a folder holding it",
)
CROP = 256
N_DATES = 4


# --------------------------------------------------------------------------------------------
# Without data
# --------------------------------------------------------------------------------------------


def test_decode_rle_is_column_major() -> None:
    # Runs: 1 background, 2 object, 3 background over a 2 x 3 image read down the columns.
    assert decode_rle([1, 2, 3], [2, 3]).tolist() == [
        [False, True, False],
        [True, False, False],
    ]


def test_decode_rle_rejects_runs_of_another_size() -> None:
    with pytest.raises(InputError, match="size 2 x 3"):
        decode_rle([1, 2, 2], [2, 3])


def test_clean_background_fills_a_ship_from_the_water() -> None:
    rng = np.random.default_rng(0)
    image = (2000 + 20 * rng.standard_normal((5, 48, 48))).astype(np.float32)
    labels = np.zeros((48, 48), dtype=np.int32)
    labels[20:24, 15:30] = 1
    image[:, labels > 0] = 9000
    clean = clean_background(image, labels)
    assert np.abs(clean[:, labels > 0] - 2000).max() < 100


def test_unknown_port_names_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="unknown port 'atlantis'"):
        find_port("atlantis", tmp_path)


def test_folder_without_labels_is_not_a_port(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"coco\.json"):
        find_port(tmp_path)


# --------------------------------------------------------------------------------------------
# On the shared data
# --------------------------------------------------------------------------------------------


@needs_data
# pycocotools 2.0.11 itself trips a NumPy 2 copy-keyword deprecation.
@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
def test_decode_rle_matches_pycocotools() -> None:
    mask_api = pytest.importorskip("pycocotools.mask")
    coco = json.loads((PORTS["busan"] / "coco.json").read_text())
    for ann in coco["annotations"]:
        seg = ann["segmentation"]
        h, w = seg["size"]
        expected = mask_api.decode(mask_api.frPyObjects(seg, h, w)).astype(bool)
        assert np.array_equal(decode_rle(seg["counts"], seg["size"]), expected)
        # The compressed form of the same mask decodes to the same pixels.
        compressed = mask_api.encode(np.asfortranarray(expected.astype(np.uint8)))
        assert np.array_equal(decode_rle(compressed["counts"].decode(), seg["size"]), expected)


@pytest.fixture(scope="module")
def stacks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, PortScene]:
    if not {"casablanca", "busan"} <= set(PORTS):
        pytest.skip("shared sen2ships data is absent")
    root = tmp_path_factory.mktemp("ports")
    pair = {"casablanca": "busan", "busan": "casablanca"}
    return {
        port: make_port_stack(
            PORTS[port],
            root / port,
            n_dates=N_DATES,
            seed=3,
            donor_dirs=[PORTS[donor]],
            cloud_fraction=0.5,
            crop=CROP,
        )
        for port, donor in pair.items()
    }


@needs_data
@pytest.mark.parametrize("port", ["casablanca", "busan"])
def test_stack_files_ingest_on_the_source_grid(
    stacks: dict[str, PortScene], port: str, tmp_path: Path
) -> None:
    scene = stacks[port]
    files = sorted(scene.image_dir.glob("*.tif"))
    assert len(files) == N_DATES
    with rasterio.open(files[0]) as src, rasterio.open(PORTS[port] / "B02.tif") as ref:
        assert src.descriptions == PORT_BANDS
        assert src.dtypes[0] == "uint16" and src.nodata == 0
        assert src.crs == ref.crs
        r0, c0, rows, cols = scene.window
        assert (src.height, src.width) == (rows, cols) == (CROP, min(CROP, ref.width))
        assert src.transform.almost_equals(ref.transform @ ref.transform.translation(c0, r0))
        assert src.read().min() >= 1
    stack = ingest(scene.image_dir, tmp_path / "stack.zarr")
    truth = read_truth(scene.truth_path)
    assert stack.sizes == {"time": N_DATES, "band": 5, "y": CROP, "x": CROP}
    assert list(stack.band.values) == list(PORT_BANDS)
    assert np.array_equal(stack.time.values, truth.time.values)
    np.testing.assert_allclose(stack.y.values, truth.y.values)
    np.testing.assert_allclose(stack.x.values, truth.x.values)
    assert truth.boats.shape == (N_DATES, CROP, CROP)


@needs_data
@pytest.mark.parametrize("port", ["casablanca", "busan"])
def test_real_date_is_the_real_scene_with_its_labels(
    stacks: dict[str, PortScene], port: str
) -> None:
    scene = stacks[port]
    assert 1 <= scene.real_index < N_DATES
    real = load_port(PORTS[port], crop=scene.window)
    truth = read_truth(scene.truth_path)
    boats = truth.boats.values[scene.real_index]
    assert np.array_equal(boats > 0, real.labels > 0)
    # Same instances up to renumbering: one truth id per real id.
    pairs = np.unique(np.stack([boats[boats > 0], real.labels[real.labels > 0]]), axis=1)
    assert pairs.shape[1] == real.n_ships == len(np.unique(boats[boats > 0]))
    assert truth.clouds.values[scene.real_index].max() == 0
    # The real date is the scene's own grid; every other date was shifted by up to MAX_SHIFT_PX.
    shifts = truth.misregistration.values
    others = np.delete(shifts, scene.real_index, axis=0)
    assert (shifts[scene.real_index] == 0).all() and (others != 0).all()
    assert (np.abs(others) <= MAX_SHIFT_PX).all()
    files = sorted(scene.image_dir.glob("*.tif"))
    with rasterio.open(files[scene.real_index]) as src:
        assert np.array_equal(src.read(), np.clip(real.image, 1, None).astype(np.uint16))


@needs_data
@pytest.mark.parametrize("port", ["casablanca", "busan"])
def test_synthetic_boats_are_real_moored_ships_or_on_open_water(
    stacks: dict[str, PortScene], port: str
) -> None:
    scene = stacks[port]
    real = load_port(PORTS[port], crop=scene.window)
    truth = read_truth(scene.truth_path)
    water = truth.water.values.astype(bool)
    pasted = moored = 0
    for t in range(N_DATES):
        if t == scene.real_index:
            continue
        boats = truth.boats.values[t]
        for box_id in np.unique(boats[boats > 0]):
            pixels = boats == box_id
            ids = np.unique(real.labels[pixels])
            if ids.size == 1 and ids[0] > 0 and np.array_equal(pixels, real.labels == ids[0]):
                moored += 1  # a real ship, kept at its own quay berth
            else:
                assert water[pixels].all()  # pasted: always on open water
                pasted += 1
    assert pasted >= 2 * (N_DATES - 1)
    assert moored >= 1
    # Truth clouds only on synthetic dates, and at least one cloudy date.
    assert truth.clouds.values.sum(axis=(1, 2)).astype(bool).sum() >= 1


@needs_data
def test_clean_background_has_no_ship_bright_pixels_at_removed_ships() -> None:
    real = load_port(PORTS["casablanca"])
    clean = clean_background(real.image, real.labels, rng=np.random.default_rng(0))
    water = water_from_mndwi(clean)
    nir = PORT_BANDS.index("B08")
    level = np.median(clean[nir][water])
    spread = np.percentile(clean[nir][water], 99)
    checked = 0
    for k in np.unique(real.labels[real.labels > 0]):
        ship = real.labels == k
        ring = ndimage.binary_dilation(ship, iterations=6) & ~ndimage.binary_dilation(
            real.labels > 0, iterations=3
        )
        if not water[ring].all():
            continue  # moored: its fill borrows from the quay
        assert real.image[nir][ship].max() > spread
        assert clean[nir][ship].max() <= spread
        assert abs(np.median(clean[nir][ship]) - level) < spread - level
        checked += 1
    assert checked >= 1


@needs_data
def test_stack_records_itself_and_refuses_to_overwrite(stacks: dict[str, PortScene]) -> None:
    scene = stacks["casablanca"]
    assert load_port_scene(scene.image_dir.parent) == scene
    with pytest.raises(OutputError, match="not empty"):
        make_port_stack(PORTS["casablanca"], scene.image_dir.parent, crop=CROP)


@needs_data
def test_same_seed_same_stack(tmp_path: Path) -> None:
    kwargs = {"n_dates": 2, "seed": 5, "donor_dirs": [PORTS["busan"]], "crop": 64}
    a = make_port_stack("casablanca", tmp_path / "a", **kwargs)
    b = make_port_stack("casablanca", tmp_path / "b", **kwargs)
    for fa, fb in zip(
        sorted(a.image_dir.glob("*.tif")), sorted(b.image_dir.glob("*.tif")), strict=True
    ):
        with rasterio.open(fa) as ra, rasterio.open(fb) as rb:
            assert np.array_equal(ra.read(), rb.read())


@needs_data
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_dates": 1}, "n_dates=1"),
        ({"seed": -1}, "seed=-1"),
        ({"cloud_fraction": 1.5}, "cloud_fraction"),
        ({"crop": 8}, "crop=8"),
        ({"crop": (0, 0, 64, 9999)}, "inside"),
    ],
)
def test_bad_parameters_raise_before_any_output(
    tmp_path: Path, kwargs: dict[str, object], match: str
) -> None:
    with pytest.raises(ParameterError, match=match):
        make_port_stack("casablanca", tmp_path / "out", **kwargs)  # type: ignore[arg-type]
    assert not (tmp_path / "out").exists()


@needs_data
def test_cli_synth_ports_writes_an_ingestible_stack(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from spoc_xr.cli import main

    out = tmp_path / "casa"
    assert main(["synth", "ports", "casablanca", str(out), "--dates", "2", "--crop", "64"]) == 0
    assert "real scene is date 1" in capsys.readouterr().out
    assert len(list((out / "images").glob("casablanca_*.tif"))) == 2
    assert load_port_scene(out).window[2:] == (64, 64)


def test_cli_synth_reports_bad_input_as_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from spoc_xr.cli import main

    assert main(["synth", "ports", str(tmp_path), str(tmp_path / "out")]) == 2
    assert "coco.json" in capsys.readouterr().err
    assert main(["synth", "harbour", str(tmp_path / "h"), "--dates", "1", "--size", "128"]) == 0
    assert (tmp_path / "h" / "truth.zarr").is_dir()


# Bands B02 B03 B04 B08 B11: water (MNDWI > 0), bright quay (MNDWI < 0).
WATER = np.array([800.0, 700.0, 400.0, 200.0, 100.0])
QUAY = np.array([2000.0, 2100.0, 2200.0, 2300.0, 2600.0])


def _quay_scene(shape: tuple[int, int], ship: tuple[slice, slice]) -> tuple[np.ndarray, np.ndarray]:
    """Water over the first 20 columns, quay beyond, and one bright ship labelled 1."""
    columns = np.arange(shape[1])[None, None, :]
    image = np.where(columns < 20, WATER[:, None, None], QUAY[:, None, None])
    image = np.repeat(image, shape[0], axis=1).astype(np.float32)
    labels = np.zeros(shape, dtype=int)
    labels[ship] = 1
    image[:, labels > 0] = 6000.0
    return image, labels


def test_a_ship_moored_at_a_quay_is_replaced_by_water_not_quay() -> None:
    image, labels = _quay_scene((30, 40), (slice(12, 16), slice(14, 20)))  # touches the quay
    clean = clean_background(image, labels)
    np.testing.assert_allclose(clean[:, 13, 16], WATER)
    np.testing.assert_allclose(clean[:, 13, 25], QUAY)


def test_a_ship_whose_water_lies_beyond_the_first_ring_is_replaced_by_that_water() -> None:
    # A ship in a slip too narrow to read as water (the water map's opening drops it) lies 9 px
    # from the open water, with quay all around in between.
    image, labels = _quay_scene((40, 60), (slice(15, 20), slice(30, 37)))
    clean = clean_background(image, labels)
    np.testing.assert_allclose(clean[:, 17, 33], WATER)  # not the quay the inpainting would give
    np.testing.assert_allclose(clean[:, 17, 45], QUAY)
