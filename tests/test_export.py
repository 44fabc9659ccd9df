"""Training chips: COCO validity, georeferencing, spatial splits, negatives, augmentation, CLI."""

from __future__ import annotations

import contextlib
import csv
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
import xarray as xr
from affine import Affine
from pycocotools.coco import COCO

from spoc_xr import cli
from spoc_xr.errors import OutputError, ParameterError
from spoc_xr.export import SPLITS, assign_splits, export_chips, parse_split, segmentation
from spoc_xr.objects import store_transform
from spoc_xr.store import write_dataset
from tests.test_objects import write_annotations, write_stack

SHAPE = (48, 52)  # not a multiple of the chip size: the last chip column is padded
SIZE = 16


def scene_masks(n_time: int = 3) -> np.ndarray:
    masks = np.zeros((n_time, *SHAPE), dtype=np.uint8)
    for t in range(n_time):
        masks[t, 3 + 4 * t : 5 + 4 * t, 4:7] = 1  # boats on the water half (x < 26)
        masks[t, 20:23, 10 + t : 12 + t] = 1
        masks[t, 30:32, 40:42] = 1  # small object on land
    masks[1, 36:46, 30:50] = 2  # a cloud
    masks[1, 38:40, 34:38] = 0  # with a hole (RLE segmentation)
    masks[2, 14:18, 14:18] = 1  # cut by the chip borders at 16
    return masks


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, xr.DataArray]:
    folder = tmp_path_factory.mktemp("export")  # read-only inputs, written once
    masks = scene_masks()
    # Chunks that do not divide the image nor match the chips.
    write_annotations(folder / "out.zarr", masks, chunks={"time": 1, "y": 20, "x": 24})
    stack = write_stack(folder / "stack.zarr", masks.shape[0], SHAPE)
    return folder / "stack.zarr", folder / "out.zarr", stack


def chips(dest: Path) -> list[dict[str, str]]:
    with (dest / "chips.csv").open() as handle:
        return list(csv.DictReader(handle))


def test_coco_opens_and_segmentations_equal_the_masks(scene, tmp_path: Path) -> None:
    stack, annotations, _ = scene
    dest = tmp_path / "chips"
    export_chips(stack, annotations, dest, size=SIZE, split=(0.5, 0.25, 0.25), block=1)
    n_annotations = 0
    for name in SPLITS:
        coco = COCO(str(dest / "annotations" / f"{name}.json"))
        for image_id, image in coco.imgs.items():
            with rasterio.open(dest / image["mask_file"]) as src:
                instance = src.read(1)
            anns = coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))
            assert instance.max() == len(anns)
            for number, ann in enumerate(anns, 1):
                decoded = coco.annToMask(ann).astype(bool)
                np.testing.assert_array_equal(decoded, instance == number)
                rows, cols = np.nonzero(decoded)
                x, y = cols.min(), rows.min()
                assert ann["bbox"] == [x, y, cols.max() + 1 - x, rows.max() + 1 - y]
                assert ann["area"] == decoded.sum()
                n_annotations += 1
    assert n_annotations > 0
    categories = {c["name"]: c["id"] for c in coco.dataset["categories"]}
    assert categories == {"boat": 1, "small_object": 2, "large_object": 3}


def test_every_object_pixel_is_annotated_once(scene, tmp_path: Path) -> None:
    stack, annotations, _ = scene
    dest = tmp_path / "chips"
    export_chips(stack, annotations, dest, size=SIZE, negatives=0.0, split=(1, 0, 0))
    masks = scene_masks()
    total = 0
    for name in SPLITS:
        data = json.loads((dest / "annotations" / f"{name}.json").read_text())
        total += sum(a["area"] for a in data["annotations"])
        assert all(a["iscrowd"] == 0 for a in data["annotations"])
    assert total == np.count_nonzero(masks)


def test_chips_keep_their_georeferencing_and_pixels(scene, tmp_path: Path) -> None:
    stack_path, annotations, stack = scene
    dest = tmp_path / "chips"
    export_chips(stack_path, annotations, dest, size=SIZE, format="masks", negatives=1.0)
    transform = store_transform(xr.open_zarr(annotations, consolidated=False))
    rows = chips(dest)
    assert rows
    dates = [str(t)[:19] for t in stack.time.values]
    for row in rows:
        r0, c0 = int(row["row_off"]), int(row["col_off"])
        for key in ("image", "mask"):
            with rasterio.open(dest / row[key]) as src:
                assert src.transform == transform @ Affine.translation(c0, r0)
                assert src.crs.to_epsg() == 32631
                data = src.read()
        with rasterio.open(dest / row["image"]) as src:
            image = src.read()
            assert image.dtype == np.uint16
            assert src.descriptions == ("B02", "B03", "B04", "B08")
        expected = stack.values[dates.index(row["date"]), :, r0 : r0 + SIZE, c0 : c0 + SIZE]
        np.testing.assert_array_equal(image[:, : expected.shape[1], : expected.shape[2]], expected)
        assert (image[:, expected.shape[1] :, :] == 0).all()
        assert (image[:, :, expected.shape[2] :] == 0).all()
        assert set(np.unique(data)) <= {0, 1, 2, 3}
    assert not (dest / "annotations").exists()


def test_split_blocks_do_not_overlap(scene, tmp_path: Path) -> None:
    stack, annotations, _ = scene
    dest = tmp_path / "chips"
    block = 2
    export_chips(
        stack, annotations, dest, size=SIZE // 2, block=block, negatives=1.0, split="0.4,0.3,0.3"
    )
    side = SIZE // 2 * block
    owner: dict[tuple[int, int], str] = {}
    for row in chips(dest):
        r0, c0 = int(row["row_off"]), int(row["col_off"])
        # A chip footprint [r0, r0 + size) lies in exactly one block.
        key = (r0 // side, c0 // side)
        assert (r0 + SIZE // 2 - 1) // side == key[0]
        assert owner.setdefault(key, row["split"]) == row["split"]
    assert set(owner.values()) == set(SPLITS)


def test_splits_are_deterministic_and_follow_the_ratios() -> None:
    first = assign_splits(12, 12, (0.5, 0.25, 0.25), block=3, seed=4)
    np.testing.assert_array_equal(first, assign_splits(12, 12, (0.5, 0.25, 0.25), block=3, seed=4))
    blocks = first[::3, ::3]
    assert np.bincount(blocks.ravel(), minlength=3).tolist() == [8, 4, 4]
    for i in range(4):
        for j in range(4):
            assert (first[3 * i : 3 * i + 3, 3 * j : 3 * j + 3] == blocks[i, j]).all()


def test_negatives_follow_the_ratio(scene, tmp_path: Path) -> None:
    stack, annotations, _ = scene
    summary = export_chips(
        stack, annotations, tmp_path / "a", size=SIZE, negatives=0.25, split=(1, 0, 0)
    )
    counts = summary.chips["train"]
    assert counts["negative"] == round(counts["positive"] / 3)
    none = export_chips(stack, annotations, tmp_path / "b", size=SIZE, negatives=0.0)
    assert all(c["negative"] == 0 for c in none.chips.values())


def test_augmentation_masks_are_exact_and_boats_land_on_water(scene, tmp_path: Path) -> None:
    stack, annotations, _ = scene
    dest = tmp_path / "chips"
    summary = export_chips(
        stack, annotations, dest, size=SIZE, split=(1, 0, 0), augment=3, seed=2, negatives=0.0
    )
    assert summary.augmented > 0
    # Every paste is either in an augmented chip or counted in a note (dropped silently before).
    pasted = sum(int(row["n_objects"]) for row in chips(dest) if row["augmented"] == "True")
    notes = [n for n in summary.notes if "pastes found no place" in n]
    if notes:
        dropped, wanted = (int(w) for w in notes[0].split()[:3:2])
        assert wanted - dropped == pasted and wanted % 3 == 0
    else:
        assert pasted % 3 == 0
    ann = xr.open_zarr(annotations, consolidated=False)
    reference = ann["reference"].values
    water = ann["water"].values.astype(bool)
    train = json.loads((dest / "annotations" / "train.json").read_text())
    by_image = {im["id"]: im for im in train["images"]}
    augmented = [im for im in train["images"] if im["augmented"]]
    assert len(augmented) == summary.augmented
    boats = 0
    for image in augmented:
        r0, c0 = image["row_off"], image["col_off"]
        with rasterio.open(dest / image["file_name"]) as src:
            pasted = src.read().astype(np.float64)
        with rasterio.open(dest / image["mask_file"]) as src:
            instance = src.read(1)
        background = np.rint(reference[:, r0 : r0 + SIZE, c0 : c0 + SIZE])
        changed = (pasted != background).any(axis=0)
        np.testing.assert_array_equal(changed, instance > 0)
        for a in train["annotations"]:
            if by_image[a["image_id"]] is not image:
                continue
            x, y, w, h = (int(v) for v in a["bbox"])
            assert instance[y : y + h, x : x + w].any()
        for number, a in enumerate(
            (a for a in train["annotations"] if a["image_id"] == image["id"]), 1
        ):
            if a["category_id"] == 1:
                boats += 1
                assert water[r0 : r0 + SIZE, c0 : c0 + SIZE][instance == number].all()
            else:
                assert not water[r0 : r0 + SIZE, c0 : c0 + SIZE][instance == number].any()
    assert boats > 0
    assert not any(
        im["augmented"]
        for name in ("val", "test")
        for im in json.loads((dest / "annotations" / f"{name}.json").read_text())["images"]
    )


def test_segmentation_polygons_follow_pixel_edges() -> None:
    with warnings.catch_warnings():
        # A chip at (0, 0) is traced without rasterio's NotGeoreferencedWarning.
        warnings.simplefilter("error")
        assert segmentation(np.ones((2, 1), bool), 0, 0, (4, 4)) == [[0, 0, 0, 2, 1, 2, 1, 0]]
    assert segmentation(np.ones((2, 1), bool), 1, 2, (4, 4)) == [[2, 1, 2, 3, 3, 3, 3, 1]]
    ring = np.ones((3, 3), bool)
    ring[1, 1] = False
    rle = segmentation(ring, 0, 0, (3, 3))
    assert rle == {"counts": [0, 4, 1, 4], "size": [3, 3]}


@pytest.mark.parametrize(
    "kwargs",
    [
        {"size": 0},
        {"size": 49},
        {"split": "0.5,0.5,0.5"},
        {"split": "1,0"},
        {"negatives": 1.5},
        {"format": "yolo"},
        {"augment": -1},
    ],
)
def test_bad_parameters_are_refused_before_output(scene, tmp_path: Path, kwargs) -> None:
    stack, annotations, _ = scene
    with pytest.raises(ParameterError):
        export_chips(stack, annotations, tmp_path / "chips", **kwargs)
    assert not (tmp_path / "chips").exists()


def test_parse_split() -> None:
    assert parse_split("0.6, 0.2, 0.2") == (0.6, 0.2, 0.2)
    with pytest.raises(ParameterError):
        parse_split("a,b,c")


def test_existing_dest_needs_overwrite(scene, tmp_path: Path) -> None:
    stack, annotations, _ = scene
    dest = tmp_path / "chips"
    export_chips(stack, annotations, dest, size=SIZE)
    with pytest.raises(OutputError):
        export_chips(stack, annotations, dest, size=SIZE)
    export_chips(stack, annotations, dest, size=SIZE, overwrite=True, format="masks")
    assert not (dest / "annotations").exists()
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    with pytest.raises(OutputError):
        export_chips(stack, annotations, other, size=SIZE, overwrite=True)
    assert (other / "notes.txt").exists()


@pytest.fixture
def no_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "_client", lambda args, quiet=False: contextlib.nullcontext())


def test_cli_export_chips(scene, tmp_path: Path, no_cluster, capsys) -> None:
    stack, annotations, _ = scene
    dest = tmp_path / "chips"
    args = ["export-chips", str(stack), str(annotations), str(dest), "--size", str(SIZE)]
    assert cli.main([*args, "--augment", "1"]) == 0
    assert (dest / "annotations" / "train.json").is_file()
    assert cli.main(args) == 2
    assert cli.main([*args, "--overwrite", "--split", "0.5,0.6,0"]) == 2
    # A negative share reaches the share's own check (argparse took it for an option).
    assert cli.main([*args, "--overwrite", "--split", "-1,1,1"]) == 2
    assert "split" in capsys.readouterr().err.splitlines()[-1]
    assert (
        cli.main(["export-chips", str(stack), str(tmp_path / "x.zarr"), str(tmp_path / "d")]) == 2
    )
    assert not (tmp_path / "d").exists()


def test_splits_left_without_chips_are_named_in_the_summary(scene, tmp_path: Path) -> None:
    stack, annotations, _ = scene
    # One block covers the whole image: only one split can get chips, and the summary says so.
    summary = export_chips(stack, annotations, tmp_path / "one", size=SIZE, block=8)
    empty = [name for name, count in summary.chips.items() if not sum(count.values())]
    assert len(empty) == 2
    assert len(summary.notes) == 2 and all("smaller --size or --block" in n for n in summary.notes)
    assert all(f"the {name} split got no chip" in str(summary) for name in empty)
    # Small blocks: every split gets chips and nothing is noted.
    summary = export_chips(
        stack, annotations, tmp_path / "all", size=SIZE // 2, block=1, negatives=1.0
    )
    assert all(sum(count.values()) for count in summary.chips.values()) and not summary.notes


@pytest.mark.parametrize("dtype", [np.uint16, np.float32])
def test_padding_of_a_stack_without_nodata_is_marked(scene, tmp_path: Path, dtype) -> None:
    # Without a nodata value the padding was 0 and undeclared: real zero reflectance to a loader.
    _, annotations, stack = scene
    plain = stack.astype(dtype)
    plain.attrs = {k: v for k, v in stack.attrs.items() if k != "nodata"}
    plain = plain.rio.write_nodata(None)
    ds = plain.to_dataset()
    ds.attrs["spoc_xr"] = {"kind": "stack"}
    write_dataset(ds.chunk({"time": 1}), tmp_path / "plain.zarr", overwrite=False)
    dest = tmp_path / "chips"
    export_chips(tmp_path / "plain.zarr", annotations, dest, size=SIZE, format="masks")
    padded = [row for row in chips(dest) if int(row["image_width"]) < SIZE]
    assert padded and all(int(row["image_height"]) == SIZE for row in padded)
    with rasterio.open(dest / padded[0]["image"]) as src:
        width = int(padded[0]["image_width"])
        if dtype == np.float32:
            assert np.isnan(src.nodata)
            assert np.isnan(src.read()[:, :, width:]).all()
        else:
            assert src.nodata is None
            valid = src.read_masks(1)
            assert (valid[:, :width] == 255).all() and (valid[:, width:] == 0).all()
        assert np.isfinite(src.read()[:, :, :width]).all()
