"""Training data: georeferenced image chips with masks, COCO annotations and augmentation.

Layout of ``DEST``
------------------
``images/<split>/<date>_r<row>_c<col>.tif``
    One chip of the stack on one date: all bands, the stack's raw dtype and nodata, the stack's
    CRS and the store's transform offset by the chip origin. Chips on the right and bottom edge
    that run past the image are padded (mask 0) so no object is left out: with the stack's
    nodata, with NaN (declared as nodata) for a float stack without one, and for an integer
    stack without one with 0 under a GDAL mask (``masked=True`` in rasterio); ``chips.csv``
    gives the image's extent in each chip (``image_width``, ``image_height``).
``masks/<split>/<same name>.tif``
    uint8 mask of the chip on the same grid: with ``format="coco"`` the instance mask (0
    background, 1..n objects of the chip, in the order of the COCO annotations; uint16 in the rare
    chip with more than 255 objects), with ``format="masks"`` the category mask (ids below).
``annotations/{train,val,test}.json`` (``format="coco"`` only)
    COCO detection files: ``bbox`` ``[x, y, w, h]`` of pixel edges in chip pixels, ``area`` in
    pixels, ``segmentation`` as polygons along pixel edges (exact: pycocotools rasterises them
    back to the mask), or as uncompressed RLE for the few objects with holes, which polygons cannot
    describe. ``object_id`` links an annotation to the object table (same id on the same date;
    objects cut by a chip border give one annotation per chip, clipped).
``augmented/images/aug_<n>.tif``, ``augmented/masks/aug_<n>.tif``
    Cut-and-paste chips (train split only, listed in ``annotations/train.json``).
``chips.csv``, ``export.json``
    Every chip with its split, date, origin and object count; the parameters and categories.

Categories: 1 "boat" (small object on water), 2 "small_object" (small object on land), 3
"large_object" (cloud, shadow, other large change) -- see :mod:`spoc_xr.objects`, whose
labelling (per date, 8-connected, small objects first) this module reuses.

Splits
------
Chips sit on a regular grid of ``size`` px. Blocks of ``block x block`` chips go wholly to one
split, drawn with ``seed`` so that the shares of blocks follow the ratios; the split of a block
does not depend on the date, so a place seen on many dates stays in one split and neighbouring
chips do not leak between splits.

Negatives
---------
Chips with valid data and no object are negatives. ``negatives`` is their target share of the
chips written in each split: ``round(n_positive * r / (1 - r))`` negatives drawn at random (all of
them for ``r = 1``; fewer when fewer exist).

Augmentation
------------
Every small object whose first pixel lies in a train block is cut out of its date (pixels and
mask) and pasted ``augment`` times, in groups of up to :data:`PASTES_PER_CHIP`, onto chips of the
reference image at train-block positions, at random positions and angles, with
:func:`spoc_xr.synthetic.paste_objects`. Boats go on open water, small land objects on land: the
water layer (or its complement) is eroded by the object's rotated extent so the whole object fits,
and pasted objects do not overlap. Pasting samples each pixel once (no anti-aliasing), so a pixel
is either wholly the object's or untouched and the written masks are exact.

Dates are written in parallel, one task per date, each reading only its date; workers write the
files themselves, so ``DEST`` must be on storage they share with the caller.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask
import numpy as np
import pandas as pd
import rasterio
import rasterio.features
import xarray as xr
from affine import Affine
from scipy import ndimage

from spoc_xr import kernels
from spoc_xr.errors import OutputError, ParameterError
from spoc_xr.objects import (
    CATEGORY_IDS,
    _raw_store,
    _shapes,
    check_same_grid,
    label_objects,
    open_annotation_store,
    open_stack_store,
    store_crs,
    store_transform,
)
from spoc_xr.store import check_output_path
from spoc_xr.synthetic import paste_objects

__all__ = [
    "SPLITS",
    "ExportSummary",
    "assign_splits",
    "check_export_inputs",
    "export_chips",
    "parse_split",
    "segmentation",
]

PathLike = str | os.PathLike[str]

SPLITS = ("train", "val", "test")
FORMATS = ("coco", "masks")
DEFAULT_SPLIT = (0.7, 0.15, 0.15)
# 4 x 4 chips of 256 px = 10 km at 10 m: wider than a harbour basin, so a split rarely sees the
# other side of the same quay.
DEFAULT_BLOCK = 4
# Pasted objects per augmented chip: enough to be worth a chip, few enough to stay plausible.
PASTES_PER_CHIP = 8
# Background chips tried for one object before it is left out of an augmented chip.
PLACEMENT_TRIES = 10
SPLIT_TOLERANCE = 1e-6
MARKER = "export.json"
CATEGORIES = [
    {"id": CATEGORY_IDS["boat"], "name": "boat", "supercategory": "object"},
    {"id": CATEGORY_IDS["small_object"], "name": "small_object", "supercategory": "object"},
    {"id": CATEGORY_IDS["large_object"], "name": "large_object", "supercategory": "object"},
]


@dataclass
class ExportSummary:
    """What :func:`export_chips` wrote.

    Attributes
    ----------
    dest : Path
        The export folder.
    chips : dict
        Per split, the number of chips with objects (``"positive"``) and without
        (``"negative"``).
    augmented : int
        Augmented chips (train split).
    annotations : int
        Object annotations over all chips.
    notes : list of str
        What the user should know about the result: a split that got no chip, no chip at all.
    """

    dest: Path
    chips: dict[str, dict[str, int]] = field(default_factory=dict)
    augmented: int = 0
    annotations: int = 0
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        parts = [
            f"{name}: {c['positive']} with objects + {c['negative']} negatives"
            for name, c in self.chips.items()
        ]
        text = (
            f"exported to {self.dest}: " + "; ".join(parts) + f"; {self.augmented} augmented "
            f"chips; {self.annotations} annotations"
        )
        return "\n".join([text, *(f"note: {note}" for note in self.notes)])


# --------------------------------------------------------------------------------------------
# Parameters


def parse_split(value: str | Sequence[float]) -> tuple[float, float, float]:
    """Parse and check train/val/test ratios (``"0.7,0.15,0.15"`` or three numbers).

    Examples
    --------
    >>> parse_split("0.8,0.1,0.1")
    (0.8, 0.1, 0.1)
    """
    try:
        parts = value.split(",") if isinstance(value, str) else list(value)
        ratios = tuple(float(p) for p in parts)
    except (TypeError, ValueError):
        raise ParameterError(
            f"split {value!r} must be three numbers train,val,test, e.g. 0.7,0.15,0.15"
        ) from None
    if len(ratios) != len(SPLITS) or any(not math.isfinite(r) or r < 0 for r in ratios):
        raise ParameterError(
            f"split {value!r} must be three non-negative numbers train,val,test, e.g. 0.7,0.15,0.15"
        )
    if abs(sum(ratios) - 1.0) > SPLIT_TOLERANCE:
        raise ParameterError(f"split ratios {value!r} sum to {sum(ratios):g}; they must sum to 1")
    return ratios[0], ratios[1], ratios[2]


def _check_int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ParameterError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def assign_splits(
    n_rows: int,
    n_cols: int,
    split: Sequence[float],
    *,
    block: int = DEFAULT_BLOCK,
    seed: int = 0,
) -> np.ndarray:
    """Split index (0 train, 1 val, 2 test) of every chip of an ``n_rows x n_cols`` chip grid.

    Blocks of ``block x block`` chips are shuffled with ``seed`` and dealt out so that each split
    gets its share of blocks (largest remainder; every split with a positive ratio gets a block
    when there are enough).

    Examples
    --------
    >>> grid = assign_splits(8, 8, (0.5, 0.5, 0.0), block=4, seed=0)
    >>> sorted(np.unique(grid[:4, :4]).tolist()), np.bincount(grid.ravel()).tolist()
    ([0], [32, 32])
    """
    ratios = np.asarray(parse_split(split))
    b_rows, b_cols = -(-n_rows // block), -(-n_cols // block)
    n_blocks = b_rows * b_cols
    exact = ratios * n_blocks
    counts = np.floor(exact).astype(int)
    for index in np.argsort(-(exact - counts), kind="stable")[: n_blocks - counts.sum()]:
        counts[index] += 1
    wanted = np.flatnonzero(ratios > 0)
    if n_blocks >= wanted.size:
        for index in wanted:
            if counts[index] == 0:
                counts[index] = 1
                counts[np.argmax(counts)] -= 1
    order = np.random.default_rng(seed).permutation(n_blocks)
    block_split = np.empty(n_blocks, dtype=np.int8)
    block_split[order] = np.repeat(np.arange(len(SPLITS)), counts)
    grid = block_split.reshape(b_rows, b_cols)
    return np.repeat(np.repeat(grid, block, axis=0), block, axis=1)[:n_rows, :n_cols]


# --------------------------------------------------------------------------------------------
# Annotations


def segmentation(window: np.ndarray, row_off: int, col_off: int, shape: tuple[int, int]) -> Any:
    """COCO segmentation of the True pixels of ``window`` placed at (row_off, col_off) in a chip.

    Polygons along pixel edges (``[[x0, y0, x1, y1, ...], ...]``), or an uncompressed RLE
    ``{"counts": [...], "size": [h, w]}`` of the whole chip when the object has a hole.

    Examples
    --------
    >>> segmentation(np.ones((1, 2), bool), 3, 4, (8, 8))
    [[4.0, 3.0, 4.0, 4.0, 6.0, 4.0, 6.0, 3.0]]
    """
    polygons: list[list[float]] = []
    transform = Affine.translation(col_off, row_off)
    for geom, _ in _shapes(window, connectivity=8, transform=transform):
        rings = geom["coordinates"]
        if len(rings) > 1:
            full = np.zeros(shape, dtype=bool)
            full[row_off : row_off + window.shape[0], col_off : col_off + window.shape[1]] = window
            return _rle(full)
        polygons.append(np.asarray(rings[0], dtype=np.float64)[:-1].ravel().tolist())
    return polygons


def _rle(mask: np.ndarray) -> dict[str, Any]:
    # COCO counts runs in column-major order, starting with a (possibly empty) run of zeros.
    flat = mask.ravel(order="F").astype(np.int8)
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0, *counts]
    return {"counts": counts, "size": [int(mask.shape[0]), int(mask.shape[1])]}


def _chip_annotations(
    labels: np.ndarray, categories: np.ndarray, object_ids: np.ndarray
) -> tuple[list[dict[str, Any]], np.ndarray]:
    """Annotations of a chip's labelled objects, and the chip's instance mask (1..n)."""
    present = np.unique(labels)
    present = present[present > 0]
    instance = np.zeros(labels.shape, dtype=np.uint16)
    found = []
    # Objects renumbered 1..n in the chip; box k - 1 of find_objects is object present[k - 1].
    remapped = np.zeros(labels.shape, dtype=np.int64)
    if present.size:
        remapped[labels > 0] = np.searchsorted(present, labels[labels > 0]) + 1
    for number, box in enumerate(ndimage.find_objects(remapped), 1):
        if box is None:
            continue
        window = remapped[box] == number
        instance[box][window] = number
        r0, c0 = box[0].start, box[1].start
        h, w = box[0].stop - r0, box[1].stop - c0
        found.append(
            {
                "category_id": int(categories[present[number - 1]]),
                "object_id": int(object_ids[present[number - 1]]),
                "bbox": [float(c0), float(r0), float(w), float(h)],
                "area": float(window.sum()),
                "segmentation": segmentation(window, r0, c0, labels.shape),
                "iscrowd": 0,
            }
        )
    return found, instance


# --------------------------------------------------------------------------------------------
# GeoTIFF


def _write_tif(
    path: Path,
    data: np.ndarray,
    transform: Affine,
    crs_wkt: str,
    *,
    nodata: float | None = None,
    descriptions: Sequence[str] = (),
    mask: np.ndarray | None = None,
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        height=data.shape[1],
        width=data.shape[2],
        count=data.shape[0],
        dtype=data.dtype,
        crs=crs_wkt,
        transform=transform,
        nodata=nodata,
        compress="deflate",
    ) as dst:
        dst.write(data)
        if mask is not None:
            dst.write_mask(mask)
        for index, text in enumerate(descriptions, 1):
            dst.set_band_description(index, text)


def _mask_dtype(instance: np.ndarray) -> np.ndarray:
    return instance.astype(
        np.uint8 if instance.max(initial=0) <= np.iinfo(np.uint8).max else np.uint16
    )


def _to_dtype(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return np.clip(np.rint(values), info.min, info.max).astype(dtype)
    return values.astype(dtype)


# --------------------------------------------------------------------------------------------
# Per-date tasks


def _read_date(annotations: PathLike, index: int) -> tuple[np.ndarray, np.ndarray, Any]:
    ann = _raw_store(annotations)
    water = None
    if "water" in ann and str(ann["water"].attrs.get("index", "none")) != "none":
        water = np.asarray(ann["water"].values).astype(bool)
    mask = np.asarray(ann["mask"].isel(time=index).values)
    valid = np.asarray(ann["valid"].isel(time=index).values).astype(bool)
    mask = np.where(valid, mask, 0).astype(np.uint8)
    return mask, valid, label_objects(mask, water)


def _scan_date(annotations: PathLike, index: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Per chip of the grid: whether it has objects, and whether it has valid data."""
    _, valid, found = _read_date(annotations, index)
    n_rows, n_cols = -(-valid.shape[0] // size), -(-valid.shape[1] // size)
    has_obj = np.zeros((n_rows, n_cols), dtype=bool)
    has_valid = np.zeros((n_rows, n_cols), dtype=bool)
    for i in range(n_rows):
        for j in range(n_cols):
            box = np.s_[i * size : (i + 1) * size, j * size : (j + 1) * size]
            has_obj[i, j] = bool(found.labels[box].any())
            has_valid[i, j] = bool(valid[box].any())
    return has_obj, has_valid


@dataclass(frozen=True)
class _Job:
    annotations: str
    stack: str
    dest: str
    size: int
    fmt: str
    transform: Affine
    crs_wkt: str


def _write_date(
    job: _Job,
    index: int,
    chips: list[tuple[int, int, int]],
    split_grid: np.ndarray,
    cut: bool,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Write one date's chips; return chip records and (for augmentation) train cut-outs."""
    mask, _, found = _read_date(job.annotations, index)
    st = _raw_store(job.stack)
    ann_time = _raw_store(job.annotations).time.values[index]
    position = int(np.flatnonzero(st.time.values == ann_time)[0])
    image = st["stack"].variable[position]
    dtype = np.dtype(st["stack"].dtype)
    nodata = st["stack"].attrs.get("nodata")
    bands = [str(b) for b in st["band"].values.tolist()]
    stamp = pd.Timestamp(ann_time).strftime("%Y%m%dT%H%M%S")
    ny, nx = mask.shape
    size = job.size
    categories = found.categories
    object_ids = np.arange(found.count + 1)
    records = []
    strips: dict[int, np.ndarray] = {}
    for row, col, split in sorted(chips):
        r0, c0 = row * size, col * size
        if row not in strips:
            strips = {row: np.asarray(image[:, r0 : r0 + size, :])}
        strip = strips[row]
        chip_nodata = nodata
        if chip_nodata is None and dtype.kind == "f":
            chip_nodata = float("nan")  # padding a float stack without nodata: NaN, declared
        fill = 0 if chip_nodata is None else chip_nodata
        data = np.full((len(bands), size, size), fill, dtype=dtype)
        piece = strip[:, :, c0 : c0 + size]
        data[:, : piece.shape[1], : piece.shape[2]] = piece
        # An integer stack without nodata has no value to pad with: a GDAL mask says which
        # pixels are the image's (read with rasterio's masked=True), and chips.csv how many.
        covered = (piece.shape[1], piece.shape[2])
        padding_mask = None
        if chip_nodata is None and covered != (size, size):
            padding_mask = np.zeros((size, size), dtype=np.uint8)
            padding_mask[: covered[0], : covered[1]] = 255
        labels = np.zeros((size, size), dtype=np.int32)
        labels[: min(size, ny - r0), : min(size, nx - c0)] = found.labels[
            r0 : r0 + size, c0 : c0 + size
        ]
        anns, instance = _chip_annotations(labels, categories, object_ids)
        out_mask = instance if job.fmt == "coco" else categories[labels]
        name = f"{stamp}_r{r0:05d}_c{c0:05d}.tif"
        split_name = SPLITS[split]
        transform = job.transform @ Affine.translation(c0, r0)
        image_path = Path("images") / split_name / name
        mask_path = Path("masks") / split_name / name
        _write_tif(
            Path(job.dest) / image_path,
            data,
            transform,
            job.crs_wkt,
            nodata=chip_nodata,
            descriptions=bands,
            mask=padding_mask,
        )
        _write_tif(Path(job.dest) / mask_path, _mask_dtype(out_mask)[None], transform, job.crs_wkt)
        records.append(
            {
                "split": split_name,
                "image": image_path.as_posix(),
                "mask": mask_path.as_posix(),
                "date": str(ann_time)[:19],
                "row_off": r0,
                "col_off": c0,
                "width": size,
                "height": size,
                "image_width": covered[1],
                "image_height": covered[0],
                "n_objects": len(anns),
                "augmented": False,
                "annotations": anns,
            }
        )
    cutouts = []
    if cut:
        size_grid = split_grid.shape
        for obj, box in enumerate(ndimage.find_objects(found.labels), 1):
            if box is None or found.classes[obj] != 1:
                continue
            first = np.argwhere(found.labels[box] == obj)[0]
            row, col = (box[0].start + first[0]) // size, (box[1].start + first[1]) // size
            if row >= size_grid[0] or col >= size_grid[1] or split_grid[row, col] != 0:
                continue
            cutouts.append(
                {
                    "patch": np.asarray(image[:, box[0], box[1]], dtype=np.float32),
                    "mask": found.labels[box] == obj,
                    "category": int(categories[obj]),
                }
            )
    return records, cutouts


# --------------------------------------------------------------------------------------------
# Augmentation


def _augment(
    job: _Job,
    ann: xr.Dataset,
    cutouts: list[dict[str, Any]],
    backgrounds: list[tuple[int, int]],
    *,
    copies: int,
    rng: np.random.Generator,
    dtype: np.dtype,
    nodata: float | None,
    bands: list[str],
) -> list[dict[str, Any]]:
    size = job.size
    has_water = "water" in ann and str(ann["water"].attrs.get("index", "none")) != "none"
    records: list[dict[str, Any]] = []
    if not cutouts or not backgrounds:
        return records
    boat = CATEGORY_IDS["boat"]
    for _ in range(copies):
        order = rng.permutation(len(cutouts))
        for start in range(0, len(order), PASTES_PER_CHIP):
            group = [cutouts[k] for k in order[start : start + PASTES_PER_CHIP]]
            row, col = backgrounds[rng.integers(len(backgrounds))]
            box = np.s_[row * size : (row + 1) * size, col * size : (col + 1) * size]
            reference = np.asarray(ann["reference"].values[:, box[0], box[1]], dtype=np.float32)
            water = (
                np.asarray(ann["water"].values[box]).astype(bool)
                if has_water
                else np.ones((size, size), dtype=bool)
            )
            occupied = np.zeros((size, size), dtype=bool)
            placed, positions, angles = [], [], []
            for item in group:
                reach = math.ceil(0.5 * math.hypot(*item["mask"].shape))
                if 2 * reach + 1 > size:
                    continue
                region = water if item["category"] == boat or not has_water else ~water
                allowed = kernels.binary_erosion(region & ~occupied, 2 * reach + 1)
                allowed[:reach] = allowed[size - reach :] = False
                allowed[:, :reach] = allowed[:, size - reach :] = False
                spots = np.flatnonzero(allowed)
                if spots.size == 0:
                    continue
                r, c = np.unravel_index(spots[rng.integers(spots.size)], allowed.shape)
                occupied[max(r - reach, 0) : r + reach + 1, max(c - reach, 0) : c + reach + 1] = (
                    True
                )
                placed.append(item)
                positions.append((r + 0.5, c + 0.5))
                angles.append(float(rng.uniform(0.0, 360.0)))
            if not placed:
                continue
            pasted, labels = paste_objects(
                reference,
                [p["mask"] for p in placed],
                [p["patch"] for p in placed],
                positions,
                angles,
                supersample=1,
            )
            categories = np.concatenate([[0], [p["category"] for p in placed]]).astype(np.uint8)
            anns, instance = _chip_annotations(labels, categories, np.zeros(len(placed) + 1, int))
            for a in anns:
                del a["object_id"]
            number = len(records)
            name = f"aug_{number:06d}.tif"
            transform = job.transform @ Affine.translation(col * size, row * size)
            image_path = Path("augmented") / "images" / name
            mask_path = Path("augmented") / "masks" / name
            out_mask = instance if job.fmt == "coco" else categories[labels]
            _write_tif(
                Path(job.dest) / image_path,
                _to_dtype(pasted, dtype),
                transform,
                job.crs_wkt,
                nodata=nodata,
                descriptions=bands,
            )
            _write_tif(
                Path(job.dest) / mask_path, _mask_dtype(out_mask)[None], transform, job.crs_wkt
            )
            records.append(
                {
                    "split": "train",
                    "image": image_path.as_posix(),
                    "mask": mask_path.as_posix(),
                    "date": "",
                    "row_off": row * size,
                    "col_off": col * size,
                    "width": size,
                    "height": size,
                    "image_width": size,
                    "image_height": size,
                    "n_objects": len(anns),
                    "augmented": True,
                    "annotations": anns,
                }
            )
    return records


# --------------------------------------------------------------------------------------------
# Entry point


def _check_dest(dest: PathLike, inputs: Sequence[PathLike], *, overwrite: bool) -> Path:
    out = Path(dest).expanduser()
    if not out.is_dir() or not any(out.iterdir()):
        return check_output_path(out, inputs=inputs, overwrite=overwrite)
    resolved = out.resolve()
    for item in inputs:
        source = Path(item).expanduser().resolve()
        if resolved == source or source.is_relative_to(resolved) or resolved.is_relative_to(source):
            raise OutputError(
                f"export folder {str(out)!r} overlaps the input {str(item)!r}; choose another DEST"
            )
    if not overwrite:
        raise OutputError(f"{str(out)!r} exists; pass --overwrite to replace it")
    if not (out / MARKER).is_file():
        raise OutputError(
            f"{str(out)!r} exists and is not a spoc_xr export (no {MARKER}); refusing to replace "
            "it: choose another DEST or remove it yourself"
        )
    return out


def check_export_inputs(
    stack: PathLike,
    annotations: PathLike,
    dest: PathLike,
    *,
    size: int = 256,
    format: str = "coco",
    split: str | Sequence[float] = DEFAULT_SPLIT,
    negatives: float = 0.2,
    augment: int = 0,
    block: int = DEFAULT_BLOCK,
    seed: int = 0,
    overwrite: bool = False,
) -> tuple[xr.Dataset, xr.Dataset, Path, tuple[float, float, float]]:
    """Check every input of :func:`export_chips` (metadata only, nothing written).

    Returns
    -------
    tuple
        The annotation and stack Datasets (lazy), the export folder and the split ratios.

    Examples
    --------
    >>> check_export_inputs("stack.zarr", "out.zarr", "chips", size=512)  # doctest: +SKIP
    """
    if format not in FORMATS:
        raise ParameterError(f"format {format!r} must be one of {', '.join(FORMATS)}")
    ratios = parse_split(split)
    if isinstance(negatives, bool) or not isinstance(negatives, int | float):
        raise ParameterError(f"negatives must be a number in [0, 1], got {negatives!r}")
    if not 0.0 <= float(negatives) <= 1.0:
        raise ParameterError(f"negatives must lie in [0, 1], got {negatives!r}")
    _check_int(augment, "augment", 0)
    _check_int(block, "block", 1)
    _check_int(seed, "seed", 0)
    size = _check_int(size, "size", 1)
    ann = open_annotation_store(annotations)
    st = open_stack_store(stack)
    check_same_grid(ann, st, [str(annotations), str(stack)])
    ny, nx = ann.sizes["y"], ann.sizes["x"]
    if size > min(ny, nx):
        raise ParameterError(
            f"size {size} is larger than the image ({ny} x {nx} px); use at most {min(ny, nx)}"
        )
    if "valid" not in ann.data_vars:
        raise ParameterError(f"{str(annotations)!r} holds no 'valid'; annotate again")
    out = _check_dest(dest, [stack, annotations], overwrite=overwrite)
    store_crs(ann)
    return ann, st, out, ratios


def export_chips(
    stack: PathLike,
    annotations: PathLike,
    dest: PathLike,
    *,
    size: int = 256,
    format: str = "coco",
    split: str | Sequence[float] = DEFAULT_SPLIT,
    negatives: float = 0.2,
    augment: int = 0,
    block: int = DEFAULT_BLOCK,
    seed: int = 0,
    overwrite: bool = False,
) -> ExportSummary:
    """Write image chips, masks and COCO annotations of an annotated stack (module docstring).

    Parameters
    ----------
    stack : str or os.PathLike
        Stack store of ``spoc-xr ingest``.
    annotations : str or os.PathLike
        Annotation store of ``spoc-xr annotate`` made from ``stack``.
    dest : str or os.PathLike
        Output folder.
    size : int
        Chip side in pixels, at most the image's smaller side.
    format : {"coco", "masks"}
        Instance masks and COCO JSON, or category masks only.
    split : str or sequence of float
        Train, val, test shares of the spatial blocks, summing to 1.
    negatives : float
        Target share of chips without objects in each split, in [0, 1].
    augment : int
        Pasted copies of every small train object (0: no augmentation).
    block : int
        Side of a spatial block in chips.
    seed : int
        Seed of the split, the negatives and the augmentation.
    overwrite : bool
        Replace an existing export folder (one that holds ``export.json``).

    Returns
    -------
    ExportSummary

    Raises
    ------
    ParameterError, InputError, StoreError, OutputError
        Before anything is written.

    Examples
    --------
    >>> export_chips("stack.zarr", "out.zarr", "chips", size=256, augment=2)  # doctest: +SKIP
    """
    ann, st, out, ratios = check_export_inputs(
        stack,
        annotations,
        dest,
        size=size,
        format=format,
        split=split,
        negatives=negatives,
        augment=augment,
        block=block,
        seed=seed,
        overwrite=overwrite,
    )
    ny, nx = ann.sizes["y"], ann.sizes["x"]
    crs = store_crs(ann)
    job = _Job(
        str(Path(annotations).expanduser()),
        str(Path(stack).expanduser()),
        str(out),
        size,
        format,
        store_transform(ann),
        crs.to_wkt(),
    )
    n_rows, n_cols = -(-ny // size), -(-nx // size)
    split_grid = assign_splits(n_rows, n_cols, ratios, block=block, seed=seed)
    scans = dask.compute(
        *[dask.delayed(_scan_date)(job.annotations, t, size) for t in range(ann.sizes["time"])]
    )
    rng = np.random.default_rng(seed)
    chosen: dict[int, list[tuple[int, int, int]]] = {t: [] for t in range(len(scans))}
    summary = ExportSummary(dest=out)
    for s, name in enumerate(SPLITS):
        positives = [
            (t, i, j)
            for t, (obj, val) in enumerate(scans)
            for i, j in np.argwhere(obj & val)
            if split_grid[i, j] == s
        ]
        empty = [
            (t, i, j)
            for t, (obj, val) in enumerate(scans)
            for i, j in np.argwhere(~obj & val)
            if split_grid[i, j] == s
        ]
        if negatives >= 1.0:
            n_neg = len(empty)
        else:
            n_neg = min(len(empty), round(len(positives) * negatives / (1.0 - negatives)))
        picks = sorted(rng.choice(len(empty), size=n_neg, replace=False).tolist()) if n_neg else []
        for t, i, j in positives + [empty[k] for k in picks]:
            chosen[t].append((int(i), int(j), s))
        summary.chips[name] = {"positive": len(positives), "negative": n_neg}
        if ratios[s] > 0 and not positives and not n_neg:
            if (split_grid == s).any():
                why = "its blocks hold no valid chip with objects"
            else:
                in_use = np.unique(split_grid).size
                why = (
                    f"the image holds {n_rows} x {n_cols} chips of {size} px in blocks of "
                    f"{block} x {block} chips ({in_use} split(s) in use); pass a smaller --size "
                    "or --block for every split to get chips"
                )
            summary.notes.append(f"the {name} split got no chip: {why}")
    if not any(c["positive"] for c in summary.chips.values()):
        summary.notes.append(
            "no chip holds an object: the annotation found no object (see its report); "
            "chips without objects are exported only beside ones with objects (--negatives)"
        )
    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    out.mkdir(parents=True)
    results = dask.compute(
        *[
            dask.delayed(_write_date)(job, t, chips, split_grid, augment > 0)
            for t, chips in chosen.items()
        ]
    )
    records = [r for part, _ in results for r in part]
    cutouts = [c for _, part in results for c in part]
    backgrounds = (
        [
            (int(i), int(j))
            for i, j in np.argwhere(split_grid == 0)
            if (i + 1) * size <= ny
            and (j + 1) * size <= nx
            and np.isfinite(
                ann["reference"]
                .isel(y=slice(i * size, (i + 1) * size), x=slice(j * size, (j + 1) * size))
                .values
            ).all()
        ]
        if augment and "reference" in ann
        else []
    )
    bands = [str(b) for b in st["band"].values.tolist()]
    augmented = _augment(
        job,
        ann,
        cutouts,
        backgrounds,
        copies=augment,
        rng=np.random.default_rng([seed, 1]),
        dtype=np.dtype(st["stack"].dtype),
        nodata=st["stack"].attrs.get("nodata"),
        bands=bands,
    )
    summary.augmented = len(augmented)
    wanted = augment * len(cutouts) if backgrounds else 0
    pasted = sum(r["n_objects"] for r in augmented)
    if pasted < wanted:
        summary.notes.append(
            f"{wanted - pasted} of {wanted} pastes found no place (an object must fit, turned "
            "any way, wholly on water or land and inside a chip, beside the others): larger "
            "chips (--size) or fewer copies (--augment) place more"
        )
    records += augmented
    summary.annotations = sum(r["n_objects"] for r in records)
    _write_index(out, records, fmt=format)
    (out / MARKER).write_text(
        json.dumps(
            {
                "stack": str(stack),
                "annotations": str(annotations),
                "size": size,
                "format": format,
                "split": list(ratios),
                "negatives": float(negatives),
                "augment": augment,
                "block": block,
                "seed": seed,
                "categories": CATEGORIES,
                "chips": summary.chips,
                "augmented": summary.augmented,
            },
            indent=2,
        )
    )
    return summary


def _write_index(out: Path, records: list[dict[str, Any]], *, fmt: str) -> None:
    records.sort(key=lambda r: (SPLITS.index(r["split"]), r["augmented"], r["image"]))
    keys = ["split", "image", "mask", "date", "row_off", "col_off", "image_width"]
    keys += ["image_height", "n_objects", "augmented"]
    with (out / "chips.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(records)
    if fmt != "coco":
        return
    (out / "annotations").mkdir(exist_ok=True)
    for name in SPLITS:
        images: list[dict[str, Any]] = []
        annotations: list[dict[str, Any]] = []
        for record in (r for r in records if r["split"] == name):
            image_id = len(images) + 1
            images.append(
                {
                    "id": image_id,
                    "file_name": record["image"],
                    "mask_file": record["mask"],
                    "width": record["width"],
                    "height": record["height"],
                    "date": record["date"],
                    "row_off": record["row_off"],
                    "col_off": record["col_off"],
                    "augmented": record["augmented"],
                }
            )
            for ann in record["annotations"]:
                annotations.append({"id": len(annotations) + 1, "image_id": image_id, **ann})
        coco = {
            "info": {"description": f"spoc_xr chips, {name} split"},
            "images": images,
            "annotations": annotations,
            "categories": CATEGORIES,
        }
        (out / "annotations" / f"{name}.json").write_text(json.dumps(coco))
