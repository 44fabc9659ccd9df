"""Semi-real port time stacks built from real Sentinel-2 scenes with labelled ships.

The shared ``sen2ships`` data set holds one real acquisition per port, five single-band GeoTIFFs
(``B02 B03 B04 B08 B11``) and COCO ship labels. :func:`make_port_stack` turns one port into a time
stack with exact truth, written exactly as ``spoc-xr ingest`` reads it:

1. **Clean background**: every labelled ship, dilated by :data:`REMOVAL_DILATION_PX`, is filled
   with the median of the nearest water (within :data:`WATER_RING_PX`, doubled up to three
   times), or where no water is that near from the surrounding pixels (OpenCV Telea inpainting
   per band), plus noise of the scene's own level, giving a ship-free scene.
2. **The real date**: the real scene itself, unchanged, with its real labels as truth, at a random
   position (never the first) of the series; :attr:`PortScene.real_index` says which.
3. **Other dates**: the clean background with a per-band illumination gain and offset, sensor
   noise, a sub-pixel shift, the real moored ships (those touching non-water) kept at their quays
   for a few consecutive dates, real ship cut-outs from *other* ports pasted onto open water at
   random positions and angles (rescaled to this scene's radiometry), and soft clouds with
   shadows on some dates.

The same pieces (:func:`ship_cutouts`, :func:`clean_background`, :func:`water_from_mndwi`) serve
cut-and-paste augmentation of training data.

Output
------
``out_dir/images/PORT_YYYYMMDDTHHMMSS.tif``: 5 bands described ``B02 B03 B04 B08 B11``, uint16
in the source's units (reflectance x 65535), real pixels >= 1, nodata 0, the source's CRS and
transform (of the crop window, when cropped). ``out_dir/truth.zarr``: truth in the format of
:mod:`spoc_xr.synthetic` (``boats``, ``clouds``, ``water``). ``out_dir/scene.json``: what
:class:`PortScene` holds, read back by :func:`load_port_scene`.

Data folder
-----------
``../shared/data`` next to the project folder, or the folder named by ``$SPOC_XR_SHARED_DATA``;
ports live in its ``sen2ships`` sub-folder, one folder per port.
"""

from __future__ import annotations

import functools
import json
import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from spoc_xr.errors import (
    BandMismatchError,
    CorruptFileError,
    GeoreferenceError,
    InputError,
    OutputError,
    ParameterError,
)
from spoc_xr.synthetic import (
    CLOUD_ALPHA_TRUTH,
    SHADOW_DARKENING_TRUTH,
    cloud_layer,
    paste_objects,
    write_truth,
)

__all__ = [
    "PORT_BANDS",
    "PortScene",
    "RealScene",
    "clean_background",
    "decode_rle",
    "find_port",
    "list_ports",
    "load_port",
    "load_port_scene",
    "make_port_stack",
    "port_dirs",
    "shared_data_dir",
    "ship_cutouts",
    "water_from_mndwi",
]

PathLike = str | os.PathLike[str]

PORT_BANDS: tuple[str, ...] = ("B02", "B03", "B04", "B08", "B11")
GREEN, NIR, SWIR = (PORT_BANDS.index(b) for b in ("B03", "B08", "B11"))
SHARED_DATA_ENV = "SPOC_XR_SHARED_DATA"
PORTS_SUBDIR = "sen2ships"
COCO_FILE = "coco.json"
SCENE_FILE = "scene.json"
# Used when no image file name in coco.json carries the acquisition date.
FALLBACK_DATE = np.datetime64("2023-01-01")
# Sentinel-2 passes over these ports at about 10:30 local solar time.
ACQUISITION_TIME = np.timedelta64(10 * 3600 + 30 * 60, "s")
REVISIT_DAYS = 5
UINT16_MAX = 65535

# Ship halos (adjacency blur, wakes at rest) reach about two pixels beyond the labelled outline.
REMOVAL_DILATION_PX = 2
# Telea inpainting looks this far around each hole; a larger radius blurs quays into the water.
INPAINT_RADIUS_PX = 3
# A ship cut-out keeps one pixel of water around the mask so pasted edges blend.
CUTOUT_MARGIN_PX = 1
# Water: MNDWI > 0 and NDWI > 0, then an opening this wide drops one-pixel speckle on land and
# on bright hulls.
WATER_OPENING_PX = 3
# Pixels vote on water over this square window (noise near NDWI = 0 on turbid water).
WATER_MAJORITY_PX = 5
# Non-water patches smaller than this (px, 0.5 ha at 10 m) inside water count as water.
MIN_LAND_PX = 50
# Pasted ships keep this far (px) from any non-water pixel: "open water", not a quay.
OPEN_WATER_MARGIN_PX = 2.0
# Pasted ships keep this far (px) from each other and from moored ships.
SHIP_CLEARANCE_PX = 2.0
# Random positions tried per ship before it is left out (crowded or narrow water).
PLACEMENT_ATTEMPTS = 30
# Ships pasted per date for each 512 x 512 px of water (the 10-40), at least
# MIN_BOATS_PER_DATE; moored ships come on top.
BOATS_PER_WATER_512 = (10.0, 40.0)
WATER_AREA_UNIT_PX = 512 * 512
MIN_BOATS_PER_DATE = 2
# Holes left by removed ships are filled from the water within this many pixels, when at
# least MIN_WATER_RING such pixels exist; else from the water within twice, four and eight
# times that reach (ships packed side by side in a dock see their water only beyond the ships
# beside them: Algiers). Only with no water that near is the hole inpainted from its border.
WATER_RING_PX = 6
WATER_RING_STEPS = 4
MIN_WATER_RING = 10
# A ship is moored when land lies this many pixels beyond its halo.
MOORED_REACH_PX = 2
# A moored ship stays at its quay for this many consecutive dates (inclusive range).
MOORED_RUN_DATES = (2, 6)
# Illumination: one gain for the date, a little per-band colour, clipped to 0.8-1.2 as the
# spread of Sentinel-2 L2A over a season; offsets of +-0.4 % reflectance (x 65535).
DATE_GAIN = (0.85, 1.15)
BAND_GAIN_JITTER = (0.97, 1.03)
GAIN_LIMITS = (0.8, 1.2)
OFFSET_MAX_DN = 0.004 * UINT16_MAX
# Sensor noise: ~1 % of the signal plus a floor near the real scenes' water noise (20-60 DN).
NOISE_RELATIVE = 0.01
NOISE_FLOOR_DN = 20.0
MAX_SHIFT_PX = 0.5
# Clouds: 30-70 % reflectance; cirrus-free water clouds are a little darker in SWIR.
CLOUD_LEVEL = (0.3 * UINT16_MAX, 0.7 * UINT16_MAX)
CLOUD_SPECTRUM = np.array([1.05, 1.02, 1.0, 0.97, 0.75], dtype=np.float32)


# --------------------------------------------------------------------------------------------
# Finding and reading the data
# --------------------------------------------------------------------------------------------


def shared_data_dir() -> Path:
    """The shared data folder: ``$SPOC_XR_SHARED_DATA`` or ``../shared/data`` next to the project.

    Returns
    -------
    Path
        The folder (it may not exist, e.g. in a fresh clone).

    Examples
    --------
    >>> shared_data_dir().name  # doctest: +SKIP
    'data'
    """
    env = os.environ.get(SHARED_DATA_ENV)
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parents[1].parent / "shared" / "data"


def port_dirs(data_dir: PathLike | None = None) -> dict[str, Path]:
    """Port folders (those holding a ``coco.json``) of the shared ``sen2ships`` data, by name.

    Parameters
    ----------
    data_dir : str or os.PathLike, optional
        The shared data folder (default :func:`shared_data_dir`) or its ``sen2ships`` folder.

    Returns
    -------
    dict of str to Path
        Sorted by name; empty when the folder is absent.

    Examples
    --------
    >>> sorted(port_dirs())[:2]  # doctest: +SKIP
    ['algiers', 'athens']
    """
    root = Path(data_dir) if data_dir is not None else shared_data_dir()
    if (root / PORTS_SUBDIR).is_dir():
        root = root / PORTS_SUBDIR
    if not root.is_dir():
        return {}
    return {p.name: p for p in sorted(root.iterdir()) if p.is_dir() and (p / COCO_FILE).is_file()}


def list_ports(data_dir: PathLike | None = None) -> list[str]:
    """Names of the available ports (see :func:`port_dirs`).

    Examples
    --------
    >>> "busan" in list_ports()  # doctest: +SKIP
    True
    """
    return list(port_dirs(data_dir))


def find_port(port: PathLike, data_dir: PathLike | None = None) -> Path:
    """A port folder from a port name of the shared data or a path to a port folder.

    Parameters
    ----------
    port : str or os.PathLike
        ``"busan"`` or ``"/data/sen2ships/busan"``.
    data_dir : str or os.PathLike, optional
        Where to look names up (default :func:`shared_data_dir`).

    Returns
    -------
    Path

    Raises
    ------
    InputError
        If neither a folder with ``coco.json`` nor a known port name.

    Examples
    --------
    >>> find_port("busan").name  # doctest: +SKIP
    'busan'
    """
    path = Path(port).expanduser()
    if path.is_dir():
        if not (path / COCO_FILE).is_file():
            raise InputError(
                f"port folder {str(path)!r} holds no {COCO_FILE}; a port folder needs "
                f"{', '.join(b + '.tif' for b in PORT_BANDS)} and {COCO_FILE}"
            )
        return path
    ports = port_dirs(data_dir)
    if str(port) in ports:
        return ports[str(port)]
    known = ", ".join(ports) if ports else f"none (no data under {shared_data_dir()})"
    raise InputError(
        f"unknown port {str(port)!r}: give a port folder or one of: {known} "
        f"(set ${SHARED_DATA_ENV} to point at another data folder)"
    )


def _counts_from_string(text: str) -> list[int]:
    """Counts of a COCO *compressed* RLE string (pycocotools' ``rleFrString``)."""
    counts: list[int] = []
    pos = 0
    while pos < len(text):
        value, shift, more = 0, 0, True
        while more:
            char = ord(text[pos]) - 48
            value |= (char & 0x1F) << (5 * shift)
            more = bool(char & 0x20)
            pos += 1
            shift += 1
            if not more and char & 0x10:
                value |= -1 << (5 * shift)
        if len(counts) > 2:
            value += counts[-2]
        counts.append(value)
    return counts


def decode_rle(counts: Sequence[int] | str, size: Sequence[int]) -> np.ndarray:
    """Decode a COCO run-length encoding (column-major runs, starting with background).

    Parameters
    ----------
    counts : sequence of int or str
        Uncompressed run lengths, or a compressed COCO RLE string.
    size : sequence of int
        ``[height, width]``.

    Returns
    -------
    numpy.ndarray
        bool (height, width) mask.

    Raises
    ------
    InputError
        If the runs do not add up to ``height * width`` or are negative.

    Examples
    --------
    >>> decode_rle([1, 2, 3], [2, 3]).astype(int).tolist()
    [[0, 1, 0], [1, 0, 0]]
    """
    h, w = (int(s) for s in size)
    runs = np.asarray(
        _counts_from_string(counts) if isinstance(counts, str) else counts, dtype=np.int64
    )
    if runs.ndim != 1 or (runs < 0).any() or int(runs.sum()) != h * w:
        raise InputError(
            f"RLE counts sum to {int(runs.sum()) if runs.ndim == 1 else '?'} but size {h} x {w} "
            f"needs {h * w}; the segmentation does not belong to an image of that size"
        )
    flat = np.repeat(np.arange(runs.size) % 2 == 1, runs)
    return flat.reshape((w, h)).T.copy()


@dataclass(frozen=True)
class RealScene:
    """One real port acquisition, as read by :func:`load_port`.

    Attributes
    ----------
    name : str
        Port name (its folder name).
    image : numpy.ndarray
        float32 (band, y, x) in :data:`PORT_BANDS` order, source units.
    labels : numpy.ndarray
        int32 (y, x) ship instance labels 1..n (0 background), in annotation order.
    date : numpy.datetime64
        Acquisition date (from the image file names in coco.json).
    crs : rasterio.crs.CRS
        The source CRS.
    transform : affine.Affine
        Transform of ``image`` (of the crop window, when cropped).
    window : tuple of int
        ``(row0, col0, rows, cols)`` of ``image`` in the full source scene.
    """

    name: str
    image: np.ndarray
    labels: np.ndarray
    date: np.datetime64
    crs: object
    transform: object
    window: tuple[int, int, int, int]

    @property
    def n_ships(self) -> int:
        """Number of labelled ships with at least one pixel in the image."""
        return int(np.count_nonzero(np.unique(self.labels)))


def _read_coco(path: Path) -> dict[str, object]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CorruptFileError(f"cannot read COCO labels {str(path)!r}: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise CorruptFileError(f"{str(path)!r} is not COCO: it has no 'annotations' list")
    return data


def _scene_date(coco: dict[str, object]) -> np.datetime64:
    from spoc_xr.errors import DateParseError
    from spoc_xr.ingest import parse_date

    images = coco.get("images")
    for image in images if isinstance(images, list) else []:
        try:
            return parse_date(str(image.get("file_name", "")))
        except DateParseError:
            continue
    return FALLBACK_DATE.astype("datetime64[s]")


def _labels_from_coco(coco: dict[str, object], shape: tuple[int, int], path: Path) -> np.ndarray:
    labels = np.zeros(shape, dtype=np.int32)
    annotations = coco["annotations"]
    assert isinstance(annotations, list)
    for k, ann in enumerate(annotations, start=1):
        seg = ann.get("segmentation") if isinstance(ann, dict) else None
        if not isinstance(seg, dict) or "counts" not in seg or "size" not in seg:
            raise CorruptFileError(
                f"{str(path)!r}: annotation {k} has no RLE segmentation (counts, size); "
                "polygons are not supported, convert them to RLE"
            )
        if tuple(int(s) for s in seg["size"]) != shape:
            raise BandMismatchError(
                f"{str(path)!r}: annotation {k} is for a {seg['size']} image but the bands are "
                f"{list(shape)}; labels and bands must come from the same scene"
            )
        labels[decode_rle(seg["counts"], seg["size"])] = k
    return labels


def _auto_window(labels: np.ndarray, size: int) -> tuple[int, int, int, int]:
    """The size x size window (clamped to the image) holding the most ship centroids."""
    h, w = labels.shape
    rows, cols = min(size, h), min(size, w)
    ids = np.unique(labels[labels > 0])
    if ids.size == 0:
        return (h - rows) // 2, (w - cols) // 2, rows, cols
    centres = np.array(ndimage.center_of_mass(labels > 0, labels, ids)).reshape(-1, 2)
    best: tuple[int, tuple[int, int]] = (-1, (0, 0))
    for cy, cx in centres:
        r0 = int(np.clip(round(cy - rows / 2), 0, h - rows))
        c0 = int(np.clip(round(cx - cols / 2), 0, w - cols))
        inside = (
            (centres[:, 0] >= r0)
            & (centres[:, 0] < r0 + rows)
            & (centres[:, 1] >= c0)
            & (centres[:, 1] < c0 + cols)
        )
        if int(inside.sum()) > best[0]:
            best = (int(inside.sum()), (r0, c0))
    return best[1][0], best[1][1], rows, cols


def _check_crop(crop: int | Sequence[int] | None, labels: np.ndarray) -> tuple[int, int, int, int]:
    h, w = labels.shape
    if crop is None:
        return 0, 0, h, w
    if isinstance(crop, int | np.integer) and not isinstance(crop, bool):
        if crop < 32:
            raise ParameterError(f"crop={crop} is too small; use at least 32 px, e.g. crop=256")
        return _auto_window(labels, int(crop))
    try:
        r0, c0, rows, cols = (int(v) for v in crop)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise ParameterError(
            f"crop={crop!r} must be a side in px (a window around the ships) or "
            "(row0, col0, rows, cols)"
        ) from None
    if r0 < 0 or c0 < 0 or rows < 32 or cols < 32 or r0 + rows > h or c0 + cols > w:
        raise ParameterError(
            f"crop window {crop!r} must lie inside the {h} x {w} scene and be at least 32 px wide"
        )
    return r0, c0, rows, cols


def load_port(port: PathLike, *, crop: int | Sequence[int] | None = None) -> RealScene:
    """Read one port's five bands and ship labels.

    Parameters
    ----------
    port : str or os.PathLike
        A port name of the shared data or a port folder (see :func:`find_port`).
    crop : int or (row0, col0, rows, cols), optional
        Read only a window: an int ``n`` picks the ``n x n`` window holding the most ships.

    Returns
    -------
    RealScene

    Raises
    ------
    InputError
        Missing band files, bands of different sizes or CRSs, unreadable labels.

    Examples
    --------
    >>> scene = load_port("casablanca")  # doctest: +SKIP
    >>> scene.image.shape, scene.n_ships  # doctest: +SKIP
    ((5, 339, 511), 15)
    """
    import rasterio
    from affine import Affine
    from rasterio.windows import Window

    folder = find_port(port)
    missing = [b for b in PORT_BANDS if not (folder / f"{b}.tif").is_file()]
    if missing:
        raise InputError(
            f"port folder {str(folder)!r} lacks {', '.join(m + '.tif' for m in missing)}; "
            f"a port needs one single-band GeoTIFF per band {', '.join(PORT_BANDS)}"
        )
    coco = _read_coco(folder / COCO_FILE)
    with rasterio.open(folder / f"{PORT_BANDS[0]}.tif") as src:
        shape = (src.height, src.width)
        crs, transform = src.crs, src.transform
    if crs is None:
        raise GeoreferenceError(f"{str(folder / PORT_BANDS[0])!r}.tif has no CRS; georeference it")
    labels = _labels_from_coco(coco, shape, folder / COCO_FILE)
    r0, c0, rows, cols = _check_crop(crop, labels)
    window = Window(c0, r0, cols, rows)
    image = np.empty((len(PORT_BANDS), rows, cols), dtype=np.float32)
    for i, band in enumerate(PORT_BANDS):
        path = folder / f"{band}.tif"
        try:
            with rasterio.open(path) as src:
                if (src.height, src.width) != shape or src.count != 1:
                    raise BandMismatchError(
                        f"{str(path)!r} is {src.count} band(s) of {src.height} x {src.width}; "
                        f"every band file must be one band of {shape[0]} x {shape[1]}"
                    )
                if src.crs != crs or not src.transform.almost_equals(transform):
                    raise GeoreferenceError(
                        f"{str(path)!r} is not on the grid of {PORT_BANDS[0]}.tif; resample "
                        "every band to one grid"
                    )
                image[i] = src.read(1, window=window)
        except rasterio.errors.RasterioIOError as exc:
            raise CorruptFileError(f"cannot read {str(path)!r}: {exc}") from exc
    return RealScene(
        name=folder.name,
        image=image,
        labels=labels[r0 : r0 + rows, c0 : c0 + cols].copy(),
        date=_scene_date(coco),
        crs=crs,
        transform=transform @ Affine.translation(c0, r0),
        window=(r0, c0, rows, cols),
    )


# --------------------------------------------------------------------------------------------
# Pieces: water, clean background, cut-outs
# --------------------------------------------------------------------------------------------


def water_from_mndwi(image: np.ndarray) -> np.ndarray:
    """Open water: MNDWI = (B03 - B11) / (B03 + B11) > 0 and NDWI = (B03 - B08) / (B03 + B08) > 0.

    MNDWI alone also flags bright white concrete (Casablanca's quays: green above SWIR); water
    also absorbs near infrared, which concrete and hulls do not. A 5 x 5 majority vote then keeps
    turbid water (NDWI near 0) whole, an opening drops speckle and non-water specks under
    :data:`MIN_LAND_PX` become water.

    Parameters
    ----------
    image : numpy.ndarray
        (band, y, x) in :data:`PORT_BANDS` order.

    Returns
    -------
    numpy.ndarray
        bool (y, x).

    Examples
    --------
    >>> img = np.full((5, 8, 8), 1000.0); img[1] = 3000.0
    >>> bool(water_from_mndwi(img).all())
    True
    """
    green = image[GREEN].astype(np.float32)
    mndwi = green - image[SWIR].astype(np.float32)
    ndwi = green - image[NIR].astype(np.float32)
    wet = ((mndwi > 0) & (ndwi > 0)).astype(np.float32)
    # Turbid or glinting water sits near NDWI = 0: a majority vote keeps it one water body.
    wet = ndimage.uniform_filter(wet, WATER_MAJORITY_PX, mode="nearest") > 0.5
    square = np.ones((WATER_OPENING_PX, WATER_OPENING_PX), dtype=bool)
    water = ndimage.binary_opening(wet, structure=square, border_value=1)
    # Specks of "land" inside water (glint, foam, buoys) are not quays a ship could moor at.
    specks, n = ndimage.label(~water)
    if n:
        sizes = np.bincount(specks.ravel(), minlength=n + 1)
        small = sizes < MIN_LAND_PX
        small[0] = False
        water |= small[specks]
    return np.asarray(water)


def _noise_sigma(image: np.ndarray, water: np.ndarray) -> np.ndarray:
    """Per-band pixel noise (robust, from 3x3 median residuals on water, or everywhere)."""
    where = water if water.sum() >= 100 else np.ones_like(water)
    sigma = np.empty(image.shape[0], dtype=np.float32)
    for b in range(image.shape[0]):
        resid = image[b] - ndimage.median_filter(image[b], size=3)
        sigma[b] = 1.4826 * np.median(np.abs(resid[where]))
    return sigma


def clean_background(
    image: np.ndarray,
    labels: np.ndarray,
    *,
    dilation: int = REMOVAL_DILATION_PX,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Remove labelled ships: fill each (dilated) ship from its surroundings.

    Each band is filled with OpenCV's Telea inpainting; with ``rng`` given, Gaussian noise of the
    scene's own level (measured on water) is added inside the holes so they are not smoother
    than the rest of the scene.

    Parameters
    ----------
    image : numpy.ndarray
        (band, y, x).
    labels : numpy.ndarray
        (y, x), ships > 0.
    dilation : int
        Pixels added around each ship before filling (halos, blur).
    rng : numpy.random.Generator, optional
        Source of the fill noise; without it the fill is smooth.

    Returns
    -------
    numpy.ndarray
        float32 (band, y, x), ship-free.

    Examples
    --------
    >>> img = np.full((5, 32, 32), 2000.0, np.float32); lab = np.zeros((32, 32), int)
    >>> img[:, 10:13, 10:16] = 9000; lab[10:13, 10:16] = 1
    >>> bool(abs(clean_background(img, lab)[0, 11, 12] - 2000) < 10)
    True
    """
    import cv2

    if dilation < 0:
        raise ParameterError(f"dilation={dilation} must be >= 0")
    out = np.asarray(image, dtype=np.float32).copy()
    hole = labels > 0
    if dilation:
        hole = ndimage.binary_dilation(hole, iterations=int(dilation))
    if not hole.any():
        return out
    hole_u8 = hole.astype(np.uint8)
    water = water_from_mndwi(out) & ~hole
    for b in range(out.shape[0]):
        out[b] = cv2.inpaint(out[b], hole_u8, INPAINT_RADIUS_PX, cv2.INPAINT_TELEA)
    # A ship moored at a quay floats on water: inpainting from the whole border would pave it
    # with quay. Where water surrounds a hole, it is filled with that water's median instead.
    components, _ = ndimage.label(hole)
    for index, box in enumerate(ndimage.find_objects(components), start=1):
        if box is None:
            continue
        for step in range(WATER_RING_STEPS):
            reach = WATER_RING_PX * 2**step
            window = tuple(slice(max(b.start - reach, 0), b.stop + reach) for b in box)
            inside = components[window] == index
            ring = ndimage.binary_dilation(inside, iterations=reach) & water[window]
            if ring.sum() >= MIN_WATER_RING:
                for b in range(out.shape[0]):
                    band = out[b][window]
                    band[inside] = np.median(band[ring])
                break
    if rng is not None:
        sigma = _noise_sigma(out, water_from_mndwi(out) & ~hole)
        n = int(hole.sum())
        out[:, hole] += sigma[:, None] * rng.standard_normal((out.shape[0], n), dtype=np.float32)
    np.clip(out, 1.0, None, out=out)
    return out


def _water_median(image: np.ndarray, water: np.ndarray) -> np.ndarray:
    where = water if water.sum() >= 100 else np.ones_like(water)
    return np.array([np.median(image[b][where]) for b in range(image.shape[0])], np.float32)


def ship_cutouts(
    port: PathLike | RealScene, *, margin: int = CUTOUT_MARGIN_PX
) -> tuple[list[tuple[np.ndarray, np.ndarray]], np.ndarray]:
    """Every labelled ship of a port as a (patch, mask) pair, and the port's water level.

    Parameters
    ----------
    port : str, os.PathLike or RealScene
        A port (see :func:`find_port`) or a scene already loaded.
    margin : int
        Pixels of surroundings kept around each ship's bounding box (outside the mask).

    Returns
    -------
    cutouts : list of (numpy.ndarray, numpy.ndarray)
        float32 (band, h, w) patch in the source's units and its bool (h, w) mask; ready for
        :func:`spoc_xr.synthetic.paste_objects` with ``pixel_size=1``.
    water_median : numpy.ndarray
        Median of each band over the port's water (MNDWI), to rescale patches to another scene:
        ``patch * target_median / water_median``.

    Examples
    --------
    >>> cutouts, level = ship_cutouts("casablanca")  # doctest: +SKIP
    >>> len(cutouts), cutouts[0][0].shape[0]  # doctest: +SKIP
    (15, 5)
    """
    scene = port if isinstance(port, RealScene) else load_port(port)
    if margin < 0:
        raise ParameterError(f"margin={margin} must be >= 0")
    h, w = scene.labels.shape
    cutouts: list[tuple[np.ndarray, np.ndarray]] = []
    for k, box in enumerate(ndimage.find_objects(scene.labels), start=1):
        if box is None:
            continue
        r0, r1 = max(box[0].start - margin, 0), min(box[0].stop + margin, h)
        c0, c1 = max(box[1].start - margin, 0), min(box[1].stop + margin, w)
        mask = scene.labels[r0:r1, c0:c1] == k
        cutouts.append((scene.image[:, r0:r1, c0:c1].copy(), mask))
    water = water_from_mndwi(scene.image) & (scene.labels == 0)
    return cutouts, _water_median(scene.image, water)


# --------------------------------------------------------------------------------------------
# The stack
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PortScene:
    """Where :func:`make_port_stack` wrote a stack, and what it holds.

    Attributes
    ----------
    name : str
        Port name.
    image_dir : Path
        Folder of dated GeoTIFFs (input of ``spoc-xr ingest``).
    truth_path : Path
        Truth Zarr store.
    dates : list of numpy.datetime64
        Acquisition time of each date, in order.
    real_index : int
        Index of the real, unchanged scene in ``dates``.
    window : tuple of int
        ``(row0, col0, rows, cols)`` of the stack in the source scene.
    n_boats : int
        Boat instances over all dates.
    n_real_ships : int
        Labelled ships on the real date.
    seed : int
        The seed the stack was built with.
    """

    name: str
    image_dir: Path
    truth_path: Path
    dates: list[np.datetime64]
    real_index: int
    window: tuple[int, int, int, int]
    n_boats: int
    n_real_ships: int
    seed: int

    def to_json(self) -> dict[str, object]:
        """JSON-ready dictionary (paths relative to the stack folder)."""
        return {
            "name": self.name,
            "image_dir": self.image_dir.name,
            "truth_path": self.truth_path.name,
            "dates": [str(np.datetime_as_string(d, unit="s")) for d in self.dates],
            "real_index": self.real_index,
            "window": list(self.window),
            "n_boats": self.n_boats,
            "n_real_ships": self.n_real_ships,
            "seed": self.seed,
        }


def load_port_scene(out_dir: PathLike) -> PortScene:
    """Read back the :class:`PortScene` that :func:`make_port_stack` wrote to ``out_dir``.

    Raises
    ------
    InputError
        If ``out_dir`` holds no complete port stack.

    Examples
    --------
    >>> load_port_scene("stacks/busan").real_index  # doctest: +SKIP
    7
    """
    folder = Path(out_dir)
    try:
        info = json.loads((folder / SCENE_FILE).read_text())
        return PortScene(
            name=str(info["name"]),
            image_dir=folder / str(info["image_dir"]),
            truth_path=folder / str(info["truth_path"]),
            dates=[np.datetime64(d, "s") for d in info["dates"]],
            real_index=int(info["real_index"]),
            window=tuple(int(v) for v in info["window"]),  # type: ignore[arg-type]
            n_boats=int(info["n_boats"]),
            n_real_ships=int(info["n_real_ships"]),
            seed=int(info["seed"]),
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(
            f"{str(folder)!r} holds no complete port stack ({exc}); build it with "
            "make_port_stack or 'spoc-xr synth ports'"
        ) from exc


def _write_port_geotiff(
    path: Path, data: np.ndarray, date: np.datetime64, crs: object, transform: object
) -> None:
    import rasterio

    _, h, w = data.shape
    block = 256 if min(h, w) >= 256 else 128
    profile = {
        "driver": "GTiff",
        "height": h,
        "width": w,
        "count": data.shape[0],
        "dtype": "uint16",
        "crs": crs,
        "transform": transform,
        "nodata": 0,
        "tiled": True,
        "blockxsize": block,
        "blockysize": block,
        "compress": "deflate",
        "predictor": 2,
    }
    stamp = np.datetime_as_string(date, unit="s").replace("-", ":").replace("T", " ")
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
        for i, name in enumerate(PORT_BANDS, start=1):
            dst.set_band_description(i, name)
        dst.update_tags(TIFFTAG_DATETIME=stamp)


def _quantise(image: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(image), 1, UINT16_MAX).astype(np.uint16)


def _check_stack_parameters(n_dates: int, seed: int, cloud_fraction: float) -> None:
    if isinstance(n_dates, bool) or not isinstance(n_dates, int | np.integer) or n_dates < 2:
        raise ParameterError(
            f"n_dates={n_dates!r} must be an integer >= 2 (the real date plus at least one "
            "synthetic date), e.g. n_dates=12"
        )
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ParameterError(f"seed={seed!r} must be a non-negative integer")
    if not 0.0 <= float(cloud_fraction) <= 1.0:
        raise ParameterError(f"cloud_fraction={cloud_fraction!r} must lie in [0, 1]")


def _prepare_out_dir(out: Path, overwrite: bool) -> tuple[Path, Path]:
    import shutil

    if out.exists() and not out.is_dir():
        raise OutputError(f"out_dir {str(out)!r} is a file; give a folder path")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise OutputError(
                f"out_dir {str(out)!r} is not empty; pass overwrite=True (--overwrite) to "
                "replace its stack or choose an empty folder"
            )
        for name in ("images", "truth.zarr", SCENE_FILE):
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    image_dir = out / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    return image_dir, out / "truth.zarr"


@functools.lru_cache(maxsize=32)
def _cached_cutouts(
    folder: str, stamp: tuple[int, ...]
) -> tuple[list[tuple[np.ndarray, np.ndarray]], np.ndarray]:
    """Cut-outs of a donor port, read once per process (``stamp`` changes when files do)."""
    return ship_cutouts(folder)


def _donor_cutouts(
    donors: Sequence[Path], target_level: np.ndarray
) -> list[tuple[np.ndarray, np.ndarray]]:
    pool: list[tuple[np.ndarray, np.ndarray]] = []
    for donor in donors:
        files = [donor / COCO_FILE] + [donor / f"{b}.tif" for b in PORT_BANDS]
        stamp = tuple(f.stat().st_mtime_ns for f in files if f.exists())
        cutouts, level = _cached_cutouts(str(donor.resolve()), stamp)
        scale = (target_level / np.maximum(level, 1.0)).astype(np.float32)[:, None, None]
        pool.extend((patch * scale, mask) for patch, mask in cutouts)
    return pool


def _free(occupied: list[tuple[float, float, float]], cy: float, cx: float, r: float) -> bool:
    return all(
        np.hypot(cy - oy, cx - ox) > r + orad + SHIP_CLEARANCE_PX for oy, ox, orad in occupied
    )


def _footprint(
    patch: np.ndarray, mask: np.ndarray, frac: tuple[float, float], angle: float
) -> tuple[np.ndarray, np.ndarray]:
    """Row and column offsets of every pixel a pasted cut-out touches, from its centre pixel."""
    reach = int(np.ceil(0.5 * np.hypot(*mask.shape))) + 2
    canvas = np.zeros((1, 2 * reach + 1, 2 * reach + 1), dtype=np.float32)
    ones = np.ones((1, *mask.shape), dtype=np.float32)
    # Coverage of the mask: a pasted patch of ones over a zero canvas.
    cover, _ = paste_objects(
        canvas, [mask], [ones], [(reach + frac[0], reach + frac[1])], [angle], pixel_size=1.0
    )
    rr, cc = np.nonzero(cover[0] > 0)
    return rr - reach, cc - reach


def _place_ships(
    rng: np.random.Generator,
    pool: list[tuple[np.ndarray, np.ndarray]],
    water_dist: np.ndarray,
    n: int,
    occupied: list[tuple[float, float, float]],
) -> tuple[list[np.ndarray], list[np.ndarray], list[tuple[float, float]], list[float]]:
    """Random cut-outs at random angles, each wholly on open water and clear of the others."""
    h, w = water_dist.shape
    masks: list[np.ndarray] = []
    patches: list[np.ndarray] = []
    positions: list[tuple[float, float]] = []
    angles: list[float] = []
    edge = int(np.ceil(MAX_SHIFT_PX)) + 1
    for _ in range(n):
        patch, mask = pool[int(rng.integers(len(pool)))]
        radius = 0.5 * float(np.hypot(*mask.shape))
        # Centres far enough from land for at least the ship's half-width: most candidates fit.
        ok = np.flatnonzero(water_dist.ravel() > OPEN_WATER_MARGIN_PX + 0.5 * min(mask.shape))
        for _attempt in range(PLACEMENT_ATTEMPTS):
            if ok.size == 0:
                break
            r, c = divmod(int(ok[rng.integers(ok.size)]), w)
            frac = (float(rng.uniform(0, 1)), float(rng.uniform(0, 1)))
            angle = float(rng.uniform(0.0, 360.0))
            if not _free(occupied, r + frac[0], c + frac[1], radius):
                continue
            dr, dc = _footprint(patch, mask, frac, angle)
            rows, cols = r + dr, c + dc
            if rows.min() < edge or cols.min() < edge or rows.max() >= h - edge:
                continue
            if cols.max() >= w - edge:
                continue
            # Every pixel the ship touches is open water, OPEN_WATER_MARGIN_PX from any quay.
            if (water_dist[rows, cols] < OPEN_WATER_MARGIN_PX).any():
                continue
            occupied.append((r + frac[0], c + frac[1], radius))
            masks.append(mask)
            patches.append(patch)
            positions.append((r + frac[0], c + frac[1]))
            angles.append(angle)
            break
    return masks, patches, positions, angles


def _moored_runs(
    rng: np.random.Generator, moored: list[int], n_dates: int, real_index: int
) -> dict[int, list[int]]:
    """For each date, the moored ships (label ids) present: one run of dates per ship."""
    present: dict[int, list[int]] = {t: [] for t in range(n_dates)}
    for ship in moored:
        length = int(rng.integers(MOORED_RUN_DATES[0], MOORED_RUN_DATES[1] + 1))
        start = int(rng.integers(0, n_dates))
        for t in range(start, min(start + length, n_dates)):
            if t != real_index:
                present[t].append(ship)
    return present


def make_port_stack(
    port_dir: PathLike,
    out_dir: PathLike,
    *,
    n_dates: int = 12,
    seed: int = 0,
    donor_dirs: Sequence[PathLike] = (),
    cloud_fraction: float = 0.3,
    crop: int | Sequence[int] | None = None,
    overwrite: bool = False,
) -> PortScene:
    """Write a semi-real time stack of one port: dated GeoTIFFs plus truth (module docstring).

    Parameters
    ----------
    port_dir : str or os.PathLike
        The port: a folder with ``B02 B03 B04 B08 B11 .tif`` and ``coco.json``, or a port name of
        the shared data.
    out_dir : str or os.PathLike
        Output folder: gets ``images/``, ``truth.zarr`` and ``scene.json``.
    n_dates : int
        Number of dates (>= 2), 5 days apart; one of them is the real scene.
    seed : int
        Seed; the same seed, port and donors give the same stack.
    donor_dirs : sequence of str or os.PathLike
        Ports whose ship cut-outs are pasted onto open water; default: every other port of the
        shared data (falling back to the port itself when it is alone).
    cloud_fraction : float
        Share of the synthetic dates that get soft clouds and shadows.
    crop : int or (row0, col0, rows, cols), optional
        Use only a window of the scene: an int ``n`` picks the ``n x n`` window holding the most
        ships.
    overwrite : bool
        Replace an earlier stack in ``out_dir`` instead of raising :class:`OutputError`.

    Returns
    -------
    PortScene

    Examples
    --------
    >>> scene = make_port_stack("casablanca", "stacks/casablanca", n_dates=6)  # doctest: +SKIP
    >>> scene.real_index, len(scene.dates)  # doctest: +SKIP
    (3, 6)
    """
    _check_stack_parameters(n_dates, seed, cloud_fraction)
    port_path = find_port(port_dir)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OutputError(f"out_dir {str(out)!r} is a file; give a folder path")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise OutputError(
            f"out_dir {str(out)!r} is not empty; pass overwrite=True (--overwrite) to replace "
            "its stack or choose an empty folder"
        )
    if donor_dirs:
        donors = [find_port(d) for d in donor_dirs]
    else:
        donors = [
            p for p in port_dirs(port_path.parent).values() if p.resolve() != port_path.resolve()
        ]
        donors = donors or [port_path]
    real = load_port(port_path, crop=crop)
    n_dates = int(n_dates)
    rng = np.random.default_rng([int(seed), zlib.crc32(real.name.encode())])

    clean = clean_background(real.image, real.labels, rng=rng)
    water = water_from_mndwi(clean)
    water_dist = ndimage.distance_transform_edt(water).astype(np.float32)
    level = _water_median(clean, water)
    pool = _donor_cutouts(donors, level)
    if not pool:
        raise InputError(
            f"the donor ports {[d.name for d in donors]} hold no labelled ship; pass donor_dirs "
            "with ships"
        )

    ids = [int(i) for i in np.unique(real.labels) if i > 0]
    # A ship's halo, less its neighbours' pixels (ships moored side by side come and go alone).
    halo = {
        k: ndimage.binary_dilation(real.labels == k, iterations=REMOVAL_DILATION_PX)
        & ((real.labels == 0) | (real.labels == k))
        for k in ids
    }
    # Moored: land within a pixel or two beyond the (now water-filled) hole.
    moored = [
        k
        for k in ids
        if (ndimage.binary_dilation(halo[k], iterations=MOORED_REACH_PX) & ~water).any()
    ]
    real_index = int(rng.integers(1, n_dates))
    offsets = (np.arange(n_dates) - real_index) * REVISIT_DAYS
    day = real.date.astype("datetime64[D]")
    dates = [day + np.timedelta64(int(o), "D") + ACQUISITION_TIME for o in offsets]
    present = _moored_runs(rng, moored, n_dates, real_index)
    synthetic = [t for t in range(n_dates) if t != real_index]
    n_cloudy = round(float(cloud_fraction) * len(synthetic))
    if cloud_fraction > 0:
        n_cloudy = max(n_cloudy, 1)
    cloudy = {synthetic[i] for i in rng.permutation(len(synthetic))[:n_cloudy]}
    shadow_dir = float(rng.uniform(0.0, 2.0 * np.pi))
    water_units = float(water.sum()) / WATER_AREA_UNIT_PX

    image_dir, truth_path = _prepare_out_dir(out, overwrite)
    h, w = water.shape
    boats = np.zeros((n_dates, h, w), dtype=np.int32)
    clouds = np.zeros((n_dates, h, w), dtype=np.uint8)
    shifts = np.zeros((n_dates, 2))  # the real date is the scene itself
    next_id = 1
    for t in range(n_dates):
        if t == real_index:
            img = real.image
            lab = real.labels
            boats[t][lab > 0] = lab[lab > 0] + next_id - 1
            next_id += max(ids, default=0)
        else:
            trng = np.random.default_rng([int(seed), zlib.crc32(real.name.encode()), 1, t])
            img, boats[t], clouds[t], shifts[t], next_id = _render_date(
                trng,
                clean,
                real,
                halo,
                present[t],
                pool,
                water_dist,
                water_units,
                cloudy=t in cloudy,
                shadow_dir=shadow_dir,
                next_id=next_id,
            )
        # Compact date and time in the name: ingest reads it, so image and truth times agree.
        stamp = np.datetime_as_string(dates[t], unit="s").replace("-", "").replace(":", "")
        name = f"{real.name}_{stamp}.tif"
        _write_port_geotiff(image_dir / name, _quantise(img), dates[t], real.crs, real.transform)

    cols = np.arange(w) + 0.5
    rows = np.arange(h) + 0.5
    tr = real.transform
    x = tr.c + tr.a * cols  # type: ignore[attr-defined]
    y = tr.f + tr.e * rows  # type: ignore[attr-defined]
    write_truth(
        truth_path,
        boats=boats,
        clouds=clouds,
        water=water.astype(np.uint8),
        dates=dates,
        overwrite=True,
        y=y,
        x=x,
        shifts=shifts,
    )
    scene = PortScene(
        name=real.name,
        image_dir=image_dir,
        truth_path=truth_path,
        dates=dates,
        real_index=real_index,
        window=real.window,
        n_boats=int(sum(np.count_nonzero(np.unique(b)) for b in boats)),
        n_real_ships=real.n_ships,
        seed=int(seed),
    )
    # Written last: its presence marks a complete stack.
    (out / SCENE_FILE).write_text(json.dumps(scene.to_json(), indent=2))
    return scene


def _render_date(
    rng: np.random.Generator,
    clean: np.ndarray,
    real: RealScene,
    halo: dict[int, np.ndarray],
    moored_here: list[int],
    pool: list[tuple[np.ndarray, np.ndarray]],
    water_dist: np.ndarray,
    water_units: float,
    *,
    cloudy: bool,
    shadow_dir: float,
    next_id: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """One synthetic date: image (band, y, x), boat labels, cloud truth, its shift ``(dy, dx)``
    and the next free id."""
    img = clean.copy()
    labels = np.zeros(clean.shape[1:], dtype=np.int32)
    occupied: list[tuple[float, float, float]] = []
    for ship in moored_here:
        # The real pixels of the ship and its halo, so the quay edge looks as on the real date.
        img[:, halo[ship]] = real.image[:, halo[ship]]
        labels[real.labels == ship] = next_id
        next_id += 1
        rr, cc = np.nonzero(halo[ship])
        radius = 0.5 * float(np.hypot(np.ptp(rr) + 1, np.ptp(cc) + 1))
        occupied.append((float(rr.mean()) + 0.5, float(cc.mean()) + 0.5, radius))

    shift = rng.uniform(-MAX_SHIFT_PX, MAX_SHIFT_PX, 2)
    for b in range(img.shape[0]):
        img[b] = ndimage.shift(img[b], shift, order=1, mode="nearest")
    # A pixel keeps a moored ship's label when the ship still covers at least half of it, which
    # for a shift of at most half a pixel is the unshifted label (the rounded shift).
    step = np.rint(shift).astype(int)
    if step.any():
        labels = ndimage.shift(labels, step, order=0, mode="constant", cval=0)

    n_target = max(
        MIN_BOATS_PER_DATE, round(float(rng.uniform(*BOATS_PER_WATER_512)) * water_units)
    )
    masks, patches, positions, angles = _place_ships(rng, pool, water_dist, n_target, occupied)
    if masks:
        # Pasted after the shift at exact positions: their truth needs no rounding.
        img, pasted = paste_objects(
            img, masks, patches, positions, angles, pixel_size=1.0, first_label=next_id
        )
        labels = np.where(pasted > 0, pasted, labels)
        next_id += len(masks)

    truth_clouds = np.zeros(labels.shape, dtype=np.uint8)
    if cloudy:
        shape = (int(clean.shape[1]), int(clean.shape[2]))
        alpha, texture, haze, dark = cloud_layer(shape, rng, shadow_dir=shadow_dir)
        img *= (1.0 - dark)[None]
        total = 1.0 - (1.0 - alpha) * (1.0 - haze)
        cloud = float(rng.uniform(*CLOUD_LEVEL)) * CLOUD_SPECTRUM[:, None, None]
        img *= (1.0 - total)[None]
        img += total[None] * cloud * texture[None]
        truth_clouds = ((total > CLOUD_ALPHA_TRUTH) | (dark > SHADOW_DARKENING_TRUTH)).astype(
            np.uint8
        )

    n_bands = img.shape[0]
    colour = rng.uniform(BAND_GAIN_JITTER[0], BAND_GAIN_JITTER[1], size=n_bands)
    gain = np.asarray(np.clip(rng.uniform(*DATE_GAIN) * colour, *GAIN_LIMITS), np.float32)
    offset = np.asarray(rng.uniform(-OFFSET_MAX_DN, OFFSET_MAX_DN, size=n_bands), np.float32)
    img *= gain[:, None, None]
    img += offset[:, None, None]
    sigma = np.sqrt(NOISE_FLOOR_DN**2 + (NOISE_RELATIVE * img) ** 2)
    img += sigma * rng.standard_normal(img.shape, dtype=np.float32)
    return img, labels, truth_clouds, shift, next_id
