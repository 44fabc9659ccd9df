"""Dated GeoTIFFs of one place -> a lazy ``(time, band, y, x)`` DataArray and a Zarr stack.

Every file is checked before anything is written: its date (from the file name), that it opens and
that its first and last block of every band can be read, its CRS and transform, and that all dates
share one grid, one band set, one dtype and one nodata value.

Scaling to thousands of files
-----------------------------
* Files are never held open. The metadata scan opens each file once, in a small thread pool
  (GDAL releases the GIL, so this overlaps I/O latency on network disks), and closes it again.
* Pixels are read by a hand-built Dask graph with exactly one task per (date, y tile, x tile); each
  task opens its file, reads one window and closes it. Peak memory is therefore a few chunks per
  worker thread, and the graph holds only paths and window offsets, never data.
* GDAL is told not to list the source folder on every open (``GDAL_DISABLE_READDIR_ON_OPEN``),
  which would otherwise cost O(number of files) per open.
"""

from __future__ import annotations

import itertools
import os
import re
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import rasterio
import rasterio.errors
import rioxarray  # noqa: F401  (registers the .rio accessor used below)
import xarray as xr
import zarr
from affine import Affine
from dask.base import tokenize
from dask.highlevelgraph import HighLevelGraph
from dask.typing import Key
from rasterio.enums import ColorInterp, MaskFlags
from rasterio.windows import Window

import spoc_xr
from spoc_xr.errors import (
    BandMismatchError,
    CorruptFileError,
    DateParseError,
    DuplicateDateError,
    GeoreferenceError,
    NoInputFilesError,
    OutputError,
    ParameterError,
    SpocError,
    StoreError,
)
from spoc_xr.reference import OVERVIEW_NAME, overview_of, to_float
from spoc_xr.store import (
    ZARR_WRITE_OPTIONS,
    check_output_path,
    open_store,
    remove_store,
    write_dataset,
)

__all__ = [
    "DEFAULT_CHUNKS",
    "STACK_DIMS",
    "SUPPORTED_DTYPES",
    "find_geotiffs",
    "ingest",
    "open_geotiffs",
    "open_stack",
    "parse_date",
]

PathLike = str | os.PathLike[str]

#: Spatial tile edge in pixels: 1024 x 1024 x a few bands of uint16 is a few MiB per chunk, large
#: enough to amortise one file open per task and small enough for many threads at once.
DEFAULT_CHUNKS = 1024
STACK_DIMS = ("time", "band", "y", "x")
STACK_NAME = "stack"
GEOTIFF_SUFFIXES = frozenset({".tif", ".tiff"})
SUPPORTED_DTYPES = frozenset({"uint8", "uint16", "int16", "uint32", "int32", "float32", "float64"})
#: Years outside this range are taken for other digit runs (tile ids, orbit numbers), not dates.
YEAR_MIN, YEAR_MAX = 1950, 2100
#: Grids that differ by less than this fraction of a pixel are the same grid (float round-off in
#: the writers' transforms), anything more is a real shift that would blur a time stack.
TRANSFORM_TOLERANCE_PX = 1e-6
#: Threads for the metadata scan: enough to hide network-disk latency, few enough to be polite.
SCAN_THREADS = 8
#: Forms accepted in file names, quoted in DateParseError.
DATE_FORMS = "YYYY-MM-DD, YYYY-MM-DDTHH:MM:SS, YYYYMMDD or YYYYMMDDTHHMMSS"

# A date only counts when it is not part of a longer digit run (tile ids, orbit numbers).
_DATE_RE = re.compile(
    r"(?<![0-9])(?:"
    r"(?P<iy>[0-9]{4})-(?P<im>[0-9]{2})-(?P<id>[0-9]{2})"
    r"(?:T(?P<iH>[0-9]{2}):?(?P<iM>[0-9]{2}):?(?P<iS>[0-9]{2}))?"
    r"|(?P<cy>[0-9]{4})(?P<cm>[0-9]{2})(?P<cd>[0-9]{2})"
    r"(?:T(?P<cH>[0-9]{2})(?P<cM>[0-9]{2})(?P<cS>[0-9]{2}))?"
    r")(?![0-9])"
)
# Sidecars (.aux.xml, .ovr) are still probed by name, but the folder is not listed on each open.
_GDAL_OPTIONS = {"GDAL_DISABLE_READDIR_ON_OPEN": "TRUE"}


@dataclass(frozen=True)
class _FileInfo:
    """Metadata of one GeoTIFF, read once during validation."""

    path: Path
    time: np.datetime64
    crs: rasterio.crs.CRS
    transform: Affine
    height: int
    width: int
    dtype: str
    band_names: tuple[str, ...]
    nodata: float | None
    stamp: tuple[int, int]  # (size, mtime_ns): part of the Dask token so edits change the graph


def parse_date(name: str | os.PathLike[str]) -> np.datetime64:
    """Read the acquisition date (and time, if present) from a file name.

    The first plausible date in the name wins: ISO ``2023-05-01`` or ``2023-05-01T10:04:09``,
    compact ``20230501`` or ``20230501T100409``, with month 1-12, a day valid for the month and a
    year 1950-2100. Digits that are part of a longer digit run are not a date.

    Parameters
    ----------
    name : str or os.PathLike
        File name or path; only the final component is read.

    Returns
    -------
    numpy.datetime64
        The date as ``datetime64[s]``.

    Raises
    ------
    DateParseError
        If the name holds no plausible date.

    Examples
    --------
    >>> parse_date("S2A_MSIL2A_20230501T100409_N0509_R122_T33TUM.tif")
    np.datetime64('2023-05-01T10:04:09')
    >>> parse_date("honolulu_2023-05-01.tif")
    np.datetime64('2023-05-01T00:00:00')
    """
    base = Path(name).name
    for match in _DATE_RE.finditer(base):
        prefix = "i" if match.group("iy") is not None else "c"
        parts = [match.group(prefix + key) for key in ("y", "m", "d", "H", "M", "S")]
        year, month, day, hour, minute, second = (
            int(part) if part is not None else 0 for part in parts
        )
        if not YEAR_MIN <= year <= YEAR_MAX:
            continue
        try:
            when = datetime(year, month, day, hour, minute, second)
        except ValueError:  # month 13, 31 April, hour 25, ...: not a date, keep looking
            continue
        return np.datetime64(when, "s")
    raise DateParseError(
        f"cannot read a date from file name {base!r}: name each file with its acquisition date "
        f"as {DATE_FORMS} (e.g. S2_20230501.tif), year {YEAR_MIN}-{YEAR_MAX}"
    )


def find_geotiffs(src_dir: PathLike) -> list[Path]:
    """List the GeoTIFFs (``.tif``/``.tiff``, any case) directly inside a folder.

    Other files, sub-folders and hidden files (``._x.tif`` resource forks) are ignored.

    Parameters
    ----------
    src_dir : str or os.PathLike
        Folder holding one GeoTIFF per date.

    Returns
    -------
    list of pathlib.Path
        The files, sorted by name.

    Raises
    ------
    NoInputFilesError
        If the folder is missing, is not a folder, or holds no GeoTIFF.

    Examples
    --------
    >>> find_geotiffs("scenes/")  # doctest: +SKIP
    [PosixPath('scenes/S2_20230501.tif'), PosixPath('scenes/S2_20230511.tif')]
    """
    folder = Path(src_dir).expanduser()
    if not folder.exists():
        raise NoInputFilesError(f"input folder {str(folder)!r} does not exist; check the path")
    if not folder.is_dir():
        raise NoInputFilesError(
            f"input {str(folder)!r} is not a folder; pass the folder that holds the GeoTIFFs"
        )
    files = sorted(entry for entry in folder.iterdir() if _is_geotiff(entry))
    if not files:
        nested = geotiffs_in_subfolders(folder)
        where = (
            f" (its sub-folders hold {len(nested)}, e.g. {str(nested[0])!r}, but sub-folders are "
            "not searched: pass the sub-folder, or move the files up)"
            if nested
            else ""
        )
        raise NoInputFilesError(
            f"no GeoTIFF (.tif/.tiff) in {str(folder)!r}{where}; put one GeoTIFF per date there"
        )
    return files


def geotiffs_in_subfolders(src_dir: PathLike) -> list[Path]:
    """GeoTIFFs one level down, in the sub-folders of ``src_dir``, which ingest does not read.

    Examples
    --------
    >>> geotiffs_in_subfolders("scenes/")  # doctest: +SKIP
    [PosixPath('scenes/2023/S2_20230501.tif')]
    """
    folder = Path(src_dir).expanduser()
    if not folder.is_dir():
        return []
    return sorted(
        entry
        for sub in folder.iterdir()
        if sub.is_dir() and not sub.name.startswith(".")
        for entry in sub.iterdir()
        if _is_geotiff(entry)
    )


def _is_geotiff(entry: Path) -> bool:
    # Hidden files are left out: macOS's ``._x.tif`` resource forks are no images.
    return (
        entry.suffix.lower() in GEOTIFF_SUFFIXES
        and not entry.name.startswith(".")
        and entry.is_file()
    )


def open_geotiffs(
    src: PathLike | Sequence[PathLike],
    *,
    chunks: int = DEFAULT_CHUNKS,
    band_names: Sequence[str] | None = None,
) -> xr.DataArray:
    """Open dated GeoTIFFs of one place as a lazy, validated time stack.

    Only metadata and the first and last block of each band are read here (so that truncated
    files fail now, not halfway through a write); pixels are read later, one chunk per task.

    Parameters
    ----------
    src : str, os.PathLike or sequence of them
        A folder of GeoTIFFs, one GeoTIFF, or a list of GeoTIFFs.
    chunks : int, default 1024
        Edge of the spatial tiles in pixels; each chunk holds one date and all bands.
    band_names : sequence of str or str, optional
        Names for the bands, in file order (a string is split at commas, as ``--band-names``
        gives it), in place of the files' band descriptions (for files
        without descriptions, or named in a way detection does not know, e.g. Landsat's
        ``SR_B3``: name it ``green``).

    Returns
    -------
    xarray.DataArray
        Dask-backed DataArray named ``"stack"`` with dims ``(time, band, y, x)``, sorted by time,
        in the files' dtype, with the CRS and transform written via rioxarray and the files'
        nodata value (if any) as attribute ``nodata``.

    Raises
    ------
    NoInputFilesError, CorruptFileError, GeoreferenceError, BandMismatchError, DateParseError,
    DuplicateDateError, ParameterError
        See the messages; each names the file(s) involved.

    Examples
    --------
    >>> stack = open_geotiffs("scenes/", chunks=512)  # doctest: +SKIP
    >>> stack.sel(band="B04").isel(time=0).compute()  # doctest: +SKIP
    """
    return _open_geotiffs(src, chunks=chunks, band_names=band_names)[0]


def ingest(
    src_dir: PathLike | Sequence[PathLike],
    store: PathLike,
    *,
    chunks: int = DEFAULT_CHUNKS,
    overwrite: bool = False,
    progress: bool = False,
    storage_options: dict[str, Any] | None = None,
    band_names: Sequence[str] | None = None,
) -> xr.DataArray:
    """Validate dated GeoTIFFs and write them to a Zarr v3 time-stack store.

    All checks run before anything is written; the store is written chunk by chunk with Dask and
    marked complete last.

    Parameters
    ----------
    src_dir : str, os.PathLike or sequence of them
        Folder of GeoTIFFs (or a list of GeoTIFFs), one per date.
    store : str or os.PathLike
        Path or fsspec URL (``s3://bucket/stack.zarr``) of the Zarr store to create. The GeoTIFFs
        stay a local folder, which every Dask worker must see at the same path.
    chunks : int, default 1024
        Edge of the spatial tiles in pixels.
    overwrite : bool, default False
        Replace an existing store at ``store``.
    progress : bool, default False
        Show a progress bar while writing.
    storage_options : dict, optional
        fsspec options when ``store`` is a URL (see :mod:`spoc_xr.store`).
    band_names : sequence of str, optional
        Names for the bands in place of the files' descriptions (see :func:`open_geotiffs`).

    Returns
    -------
    xarray.DataArray
        The stack as read back by :func:`open_stack`.

    Raises
    ------
    OutputError
        If ``store`` exists and ``overwrite`` is False, or it would overwrite an input.
    SpocError
        Any validation error of :func:`open_geotiffs`.

    Examples
    --------
    >>> stack = ingest("scenes/", "stack.zarr", chunks=512)  # doctest: +SKIP
    >>> stack.sizes  # doctest: +SKIP
    Frozen({'time': 12, 'band': 4, 'y': 1100, 'x': 1300})
    """
    _check_chunks(chunks)
    inputs = [src_dir] if isinstance(src_dir, str | os.PathLike) else list(src_dir)
    out = check_output_path(
        store, inputs=inputs, overwrite=overwrite, storage_options=storage_options, kind="stack"
    )
    stack, files = _open_geotiffs(src_dir, chunks=chunks, band_names=band_names)
    dataset = _stack_dataset(stack, files)
    if os.path.lexists(out):
        remove_store(out)
    write_dataset(
        dataset, out, overwrite=overwrite, progress=progress, storage_options=storage_options
    )
    return open_stack(out, storage_options=storage_options)


def open_stack(
    store: PathLike,
    *,
    chunks: dict[str, Any] | None = None,
    storage_options: dict[str, Any] | None = None,
) -> xr.DataArray:
    """Open a stack store written by :func:`ingest`, lazily and georeferenced.

    Parameters
    ----------
    store : str or os.PathLike
        Path or fsspec URL of the Zarr store.
    chunks : dict, optional
        Dask chunks per dimension; by default the store's own chunks (one date per chunk).
    storage_options : dict, optional
        fsspec options when ``store`` is a URL.

    Returns
    -------
    xarray.DataArray
        ``(time, band, y, x)`` DataArray named ``"stack"``; ``.rio.crs`` and ``.rio.transform()``
        give back the source grid.

    Raises
    ------
    StoreError
        If the store is missing, incomplete, or not a spoc_xr stack.

    Examples
    --------
    >>> stack = open_stack("stack.zarr")  # doctest: +SKIP
    >>> stack.rio.crs  # doctest: +SKIP
    CRS.from_epsg(32631)
    """
    dataset = open_store(store, chunks=chunks, kind="stack", storage_options=storage_options)
    if STACK_NAME not in dataset.data_vars:
        raise StoreError(
            f"{str(store)!r} holds no variable {STACK_NAME!r}; it was not written by "
            "spoc-xr ingest: re-create it with `spoc-xr ingest SRC_DIR STACK.zarr --overwrite`"
        )
    stack = dataset[STACK_NAME]
    # Zarr hands strings back as numpy's variable-width StringDType; plain str is what users
    # compare against and what ingest returned.
    return stack.assign_coords(band=np.asarray(stack["band"].values.tolist(), dtype=str))


def read_overview(
    store: PathLike,
    stack: xr.DataArray,
    *,
    storage_options: dict[str, Any] | None = None,
) -> np.ndarray | None:
    """The overview stored by ingest for ``stack``'s dates, or ``None`` when there is none.

    ``stack`` must be the store's stack or a selection of its dates (any order); a spatial
    selection, another band set, values changed after opening (a stack scaled to reflectance:
    checked on the first date's first chunk), or a store written before overviews were stored
    gives ``None``, and annotate then reads the overview itself.

    Parameters
    ----------
    store : str or os.PathLike
        Path or URL of the stack store.
    stack : xarray.DataArray
        The stack about to be annotated (e.g. ``open_stack(store).isel(time=...)``).
    storage_options : dict, optional
        fsspec options when ``store`` is a URL.

    Returns
    -------
    numpy.ndarray or None
        ``(time, band, h, w)`` float32, as :func:`spoc_xr.reference.compute_overview` returns.

    Examples
    --------
    >>> stack = open_stack("stack.zarr")  # doctest: +SKIP
    >>> annotate(stack, overview=read_overview("stack.zarr", stack))  # doctest: +SKIP
    """
    dataset = open_store(store, kind="stack", storage_options=storage_options)
    if OVERVIEW_NAME not in dataset.data_vars or STACK_NAME not in dataset.data_vars:
        return None
    full = dataset[STACK_NAME]
    same_grid = all(
        stack.sizes[dim] == full.sizes[dim] and np.array_equal(stack[dim].values, full[dim].values)
        for dim in ("y", "x")
    ) and [str(b) for b in stack.band.values] == [str(b) for b in full.band.values]
    if not same_grid:
        return None
    position = {np.datetime64(t, "ns"): i for i, t in enumerate(full.time.values)}
    try:
        rows = [position[np.datetime64(t, "ns")] for t in stack.time.values]
    except KeyError:
        return None
    stored = dataset[OVERVIEW_NAME]
    expected = overview_of(stack.isel(time=slice(0, 1)))
    if stored.shape[1:] != expected.shape[1:] or stored.attrs.get("stride") != expected.attrs.get(
        "stride"
    ):
        return None
    overview = np.asarray(stored.isel(time=rows).values, dtype=np.float32)
    stride = int(expected.attrs["stride"])
    return overview if _holds_overview_values(stack, overview, stride) else None


def _holds_overview_values(stack: xr.DataArray, overview: np.ndarray, stride: int) -> bool:
    """Whether ``stack``'s first date holds the values its stored overview says, on the
    overview's pixels inside the first chunk (one chunk read). A stack scaled after it was
    opened keeps the store's dates, bands and grid: fitted on the raw overview, its radiometry
    was off by the scale (a probe: no object found on any date)."""
    sides = {
        dim: stack.chunksizes[dim][0] if stack.chunks is not None else stack.sizes[dim]
        for dim in ("y", "x")
    }
    ys, xs = (np.arange(0, sides[dim], stride)[:OVERVIEW_CHECK_SIDE] for dim in ("y", "x"))
    sample = to_float(stack.isel(time=[0], y=ys, x=xs)).values[0]
    return bool(np.array_equal(sample, overview[0, :, : ys.size, : xs.size], equal_nan=True))


#: Overview pixels per axis compared with the stack by :func:`read_overview`.
OVERVIEW_CHECK_SIDE = 8


def add_overview(store: PathLike) -> None:
    """Write the overview into a local stack store that lacks it (one pass over the stack).

    Stores written by ``spoc-xr ingest`` have it already; this serves stores written otherwise
    or by older versions.
    """
    path = Path(store).expanduser()
    dataset = open_store(path, kind="stack")
    overview = overview_of(dataset[STACK_NAME]).drop_vars(["time", "band"]).to_dataset()
    attrs = dict(zarr.open_group(path, mode="r").attrs)
    overview.to_zarr(path, mode="a", **ZARR_WRITE_OPTIONS)
    # xarray rewrites the group's attributes on append; the completion marker must survive.
    zarr.open_group(path, mode="r+").attrs.update(attrs)


# --------------------------------------------------------------------------------------------
# internals


def _check_chunks(chunks: object) -> int:
    if isinstance(chunks, bool) or not isinstance(chunks, int | np.integer) or chunks <= 0:
        raise ParameterError(
            f"chunks must be a positive whole number of pixels (e.g. {DEFAULT_CHUNKS}), "
            f"got {chunks!r}"
        )
    return int(chunks)


def _as_file_list(src: PathLike | Sequence[PathLike]) -> list[Path]:
    if isinstance(src, str | os.PathLike):
        path = Path(src).expanduser()
        if path.is_file():
            return [path]
        return find_geotiffs(path)
    files = [Path(item).expanduser() for item in src]
    if not files:
        raise NoInputFilesError("no input files given; pass a folder or a list of GeoTIFFs")
    for path in files:
        if not path.is_file():
            raise NoInputFilesError(f"input file {str(path)!r} does not exist; check the path")
    return files


def scale_offset_note(src: PathLike | Sequence[PathLike]) -> str | None:
    """A note when the GeoTIFFs declare different scales or offsets (GDAL's band metadata), else
    None. Values are stored as the files hold them: a Sentinel-2 L2A stack spanning January
    2022 declares offset -0.1 on its later dates, whose values are 1000 DN higher.

    Examples
    --------
    >>> scale_offset_note("S2_folder")  # doctest: +SKIP
    """
    try:
        files = _as_file_list(src)
    except SpocError:
        return None  # ingest refuses the input itself, and says why
    declared: dict[tuple[tuple[float, ...], tuple[float, ...]], list[str]] = {}
    for path in files:
        try:
            with rasterio.Env(**_GDAL_OPTIONS), rasterio.open(path) as dataset:
                key = (tuple(dataset.scales), tuple(dataset.offsets))
        except (rasterio.errors.RasterioError, OSError):
            return None  # ingest refuses the file itself, and says why
        declared.setdefault(key, []).append(path.name)
    if len(declared) < 2:
        return None
    examples = "; ".join(
        f"{names[0]!r} (and {len(names) - 1} more): scales {list(scales)}, offsets {list(offsets)}"
        for (scales, offsets), names in list(declared.items())[:3]
    )
    return (
        f"the files declare different scales or offsets ({examples}); values are stored as the "
        "files hold them: annotate maps a date that differs by one constant in every band onto "
        "the reference, but band values in object tables and chips keep the difference; "
        "harmonise the files first (Sentinel-2 L2A from processing baseline 04.00 on: subtract "
        "1000 DN, e.g. gdal_calc.py); a stack whose every file holds the offset takes "
        "'annotate --zero-level' instead"
    )


def _open_geotiffs(
    src: PathLike | Sequence[PathLike], *, chunks: int, band_names: Sequence[str] | None = None
) -> tuple[xr.DataArray, list[Path]]:
    chunks = _check_chunks(chunks)
    files = _as_file_list(src)
    # Dates first: the cheapest check, and a duplicate is reported before any file is opened.
    dated = sorted((parse_date(path), path) for path in files)
    for (time_a, path_a), (time_b, path_b) in itertools.pairwise(dated):
        if time_a == time_b:
            raise DuplicateDateError(
                f"{path_a.name!r} and {path_b.name!r} both carry the date {time_a}; "
                "ingest takes one file per date holding every band: stack a date's band files "
                "into one (gdalbuildvrt -separate DATE.vrt B02.tif B03.tif ..., then "
                "gdal_translate DATE.vrt S2_YYYYMMDD.tif), mosaic neighbouring granules of one "
                "date (gdalwarp), or move the other file out of the folder"
            )
    infos = _scan_files(dated)
    _check_same_grid(infos, compare_names=band_names is None)
    if band_names is not None:
        names = _check_band_names(band_names, infos[0])
        _check_described_order(names, infos)
        infos = [replace(info, band_names=names) for info in infos]
    return _build_stack(infos, chunks), [info.path for info in infos]


def _check_described_order(names: tuple[str, ...], infos: Sequence[_FileInfo]) -> None:
    """Refuse files that describe their bands with the given names in another order: the
    names would label the wrong bands (an append of files whose descriptions run nir, red,
    green, blue into a stack named blue, green, red, nir stored NIR as blue)."""
    wanted = tuple(name.lower() for name in names)
    for info in infos:
        described = tuple(name.lower() for name in info.band_names)
        if described != wanted and sorted(described) == sorted(wanted):
            raise BandMismatchError(
                f"{info.path.name!r} describes its bands as {list(info.band_names)}, the names "
                f"{list(names)} in another order; write its bands in the order "
                f"{', '.join(names)} (e.g. gdal_translate -b), or leave it out"
            )


def _check_band_names(band_names: Sequence[str], first: _FileInfo) -> tuple[str, ...]:
    """Band names given by the user, checked against the files' band count."""
    if isinstance(band_names, str):
        band_names = band_names.split(",")
    names = tuple(str(name).strip() for name in band_names)
    if len(names) != len(first.band_names):
        raise BandMismatchError(
            f"{len(names)} band names given ({', '.join(names)}) but {first.path.name!r} has "
            f"{len(first.band_names)} bands ({', '.join(first.band_names)}); give one name per "
            "band, in file order"
        )
    if not all(names) or len(set(names)) != len(names):
        raise ParameterError(
            f"band names {list(names)} must be distinct and not empty; e.g. "
            "--band-names blue,green,red,nir"
        )
    return names


def _scan_files(dated: list[tuple[np.datetime64, Path]]) -> list[_FileInfo]:
    with warnings.catch_warnings():
        # An ungeoreferenced file is reported as GeoreferenceError below, not as a warning. The
        # filter is set once here, around the pool, because catch_warnings is process-wide.
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        if len(dated) == 1:
            return [_scan_file(*dated[0])]
        pool = ThreadPoolExecutor(max_workers=min(SCAN_THREADS, len(dated)))
        try:
            futures = [pool.submit(_scan_file, time, path) for time, path in dated]
            # In time order, so the error reported is that of the earliest bad file.
            return [future.result() for future in futures]
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def _scan_file(time: np.datetime64, path: Path) -> _FileInfo:
    try:
        with rasterio.Env(**_GDAL_OPTIONS), rasterio.open(path) as src:
            dtype = str(src.dtypes[0])
            if dtype not in SUPPORTED_DTYPES or len(set(src.dtypes)) != 1:
                raise BandMismatchError(
                    f"{path.name!r} has unsupported dtype {', '.join(sorted(set(src.dtypes)))}; "
                    f"supported: {', '.join(sorted(SUPPORTED_DTYPES))} (one dtype for all bands); "
                    "convert it, e.g. with gdal_translate -ot"
                )
            if src.crs is None:
                raise GeoreferenceError(
                    f"{path.name!r} has no CRS; assign one, e.g. gdal_edit.py -a_srs EPSG:XXXX"
                )
            transform = src.transform
            if transform == Affine.identity():
                # GDAL's stand-in when a file has no geotransform (GCP-only files included).
                raise GeoreferenceError(
                    f"{path.name!r} has no geotransform; georeference it (gdal_edit.py -a_ullr, "
                    "or gdalwarp for a file with only ground control points)"
                )
            if transform.b != 0 or transform.d != 0:
                raise GeoreferenceError(
                    f"{path.name!r} has a rotated grid ({tuple(transform)[:6]}); "
                    "warp it to a north-up grid with gdalwarp first"
                )
            _check_no_mask_band(src, path)
            _read_first_and_last_blocks(src)
            stat = path.stat()
            return _FileInfo(
                path=path,
                time=time,
                crs=src.crs,
                transform=transform,
                height=src.height,
                width=src.width,
                dtype=dtype,
                band_names=_band_names(src, path),
                nodata=src.nodata,
                stamp=(stat.st_size, stat.st_mtime_ns),
            )
    except (rasterio.errors.RasterioError, OSError) as exc:
        raise CorruptFileError(
            f"cannot read {str(path)!r} ({exc}); the file is truncated or not a valid GeoTIFF: "
            "download or export it again, or remove it from the folder"
        ) from exc


def _check_no_mask_band(src: rasterio.DatasetReader, path: Path) -> None:
    """Refuse files that mark invalid pixels with an alpha band or a GDAL mask and no nodata
    value: spoc_xr reads nodata values only, so their fill would be data (a probe: swath fill
    became 10 % large objects, and the alpha band a data band)."""
    if ColorInterp.alpha in src.colorinterp:
        raise BandMismatchError(
            f"{path.name!r} has an alpha band (band "
            f"{src.colorinterp.index(ColorInterp.alpha) + 1}); spoc_xr reads a nodata value, "
            "not alpha: write it again without alpha and with a nodata value (gdalwarp "
            "-dstnodata 0 instead of -dstalpha, or gdal_translate -b 1 -b 2 ... -a_nodata 0)"
        )
    if src.nodata is None and any(MaskFlags.per_dataset in flags for flags in src.mask_flag_enums):
        raise BandMismatchError(
            f"{path.name!r} marks its invalid pixels with a GDAL mask and declares no nodata "
            "value; spoc_xr reads a nodata value, not the mask: declare the value its masked "
            "pixels hold (gdal_edit.py -a_nodata 0, if they are 0), or write them with one "
            "(gdal_translate -a_nodata 0)"
        )


def _read_first_and_last_blocks(src: rasterio.DatasetReader) -> None:
    """Read each band's first and last block: a truncated file loses its tail first."""
    for band, (block_h, block_w) in enumerate(src.block_shapes, start=1):
        last_row = (src.height - 1) // block_h * block_h
        last_col = (src.width - 1) // block_w * block_w
        for row, col in {(0, 0), (last_row, last_col)}:
            window = Window(col, row, min(block_w, src.width - col), min(block_h, src.height - row))
            src.read(band, window=window)


def _band_names(src: rasterio.DatasetReader, path: Path) -> tuple[str, ...]:
    names = tuple(
        description if description else str(index)
        for index, description in enumerate(src.descriptions, start=1)
    )
    if len(set(names)) != len(names):
        raise BandMismatchError(
            f"{path.name!r} has repeated band names {list(names)}; give each band its own "
            "description (e.g. with rasterio's set_band_description)"
        )
    return names


#: Metres in a degree of latitude (and of longitude on the equator), on a sphere of the
#: Earth's mean radius: pixel sizes need no more.
METRES_PER_DEGREE = 6_371_008.8 * np.pi / 180


def pixel_metres(stack: xr.DataArray) -> float | None:
    """Side of the stack's pixels in metres (the geometric mean of both sides), or ``None``.

    ``None`` when the stack has no CRS, no regular grid, a CRS that is neither projected nor
    geographic, or coordinates its CRS cannot hold (latitudes beyond the poles). Measured on the
    ground at the stack's middle: a projected grid's map units are divided by the projection's
    scale there (Web Mercator's 10 m at 38 degrees north are 7.9 m), a geographic grid's
    degrees are taken at its middle latitude.

    Examples
    --------
    >>> import rioxarray  # noqa: F401
    >>> grid = xr.DataArray(np.zeros((1, 1, 3, 4)), dims=("time", "band", "y", "x"),
    ...                     coords={"y": [4.65e6 - 5, 4.65e6 - 15, 4.65e6 - 25],
    ...                             "x": [5e5 + 5, 5e5 + 15, 5e5 + 25, 5e5 + 35]})
    >>> round(pixel_metres(grid.rio.write_crs("EPSG:32631")), 3)  # UTM's scale 0.9996
    10.004
    """
    import pyproj

    crs = stack.rio.crs
    if crs is None:
        return None
    try:
        width, height = (abs(float(side)) for side in stack.rio.resolution())
    except Exception:  # rioxarray raises its own errors for grids without a regular step
        return None
    crs = pyproj.CRS.from_user_input(crs)
    metres = None
    if crs.is_projected and crs.axis_info:
        metres = float(np.sqrt(width * height)) * metres_per_unit(crs) / _map_scale(stack, crs)
    elif crs.is_geographic:
        latitude = float(np.mean(stack["y"].values[[0, -1]]))
        across = width * METRES_PER_DEGREE * np.cos(np.radians(latitude))
        # A latitude beyond the poles is a grid in other units labelled as degrees.
        if abs(latitude) < 90:
            metres = float(np.sqrt(across * height * METRES_PER_DEGREE))
    return metres if metres is not None and np.isfinite(metres) and metres > 0 else None


def metres_per_unit(crs: Any) -> float:
    """Length of a projected CRS's map unit in metres (1.0 for a geographic CRS: not used)."""
    if not crs.is_projected or not crs.axis_info:
        return 1.0
    return float(crs.axis_info[0].unit_conversion_factor)


def _map_scale(stack: xr.DataArray, crs: Any) -> float:
    """The projection's linear scale at the stack's middle (map length over ground length): 1.27
    for Web Mercator at 38 degrees north, 0.9996 on a UTM central meridian; 1.0 where unknown."""
    x, y = (np.mean(stack[axis].values[[0, -1]], keepdims=True) for axis in ("x", "y"))
    return float(projection_scales(crs, x, y)[0][0])


def projection_scales(crs: Any, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A projected CRS's linear and areal scale (map over ground) at map points ``x``, ``y``:
    the linear one the geometric mean of the meridional and parallel scales; 1.0 where pyproj
    knows no factors or gives no positive finite value."""
    import pyproj

    ones = np.ones(np.shape(x))
    try:
        to_geodetic = pyproj.Transformer.from_crs(crs, crs.geodetic_crs, always_xy=True)
        factors = pyproj.Proj(crs).get_factors(*to_geodetic.transform(x, y))
        linear = np.sqrt(np.asarray(factors.meridional_scale) * np.asarray(factors.parallel_scale))
        areal = np.asarray(factors.areal_scale, dtype=np.float64)
    except Exception:  # pyproj raises several kinds for CRSs without factors
        return ones, ones
    usable = np.isfinite(linear) & np.isfinite(areal) & (linear > 0) & (areal > 0)
    return np.where(usable, linear, 1.0), np.where(usable, areal, 1.0)


def _same_crs(crs_a: rasterio.crs.CRS, crs_b: rasterio.crs.CRS) -> bool:
    if crs_a == crs_b:
        return True
    # Fall back to pyproj, which sees through differently spelled WKT of one CRS.
    from pyproj import CRS as ProjCRS

    return bool(ProjCRS.from_wkt(crs_a.to_wkt()).equals(ProjCRS.from_wkt(crs_b.to_wkt())))


def _check_same_grid(infos: list[_FileInfo], *, compare_names: bool = True) -> None:
    ref = infos[0]
    pixel = max(abs(ref.transform.a), abs(ref.transform.e))
    for info in infos[1:]:
        pair = f"{ref.path.name!r} and {info.path.name!r}"
        if not _same_crs(ref.crs, info.crs):
            raise GeoreferenceError(
                f"{pair} have different CRS ({ref.crs} vs {info.crs}); "
                "reproject all dates to one grid (gdalwarp -t_srs ... -tr ... -te ...)"
            )
        if (ref.height, ref.width) != (info.height, info.width):
            raise GeoreferenceError(
                f"{pair} have different shapes ({ref.height}x{ref.width} vs "
                f"{info.height}x{info.width} px); clip all dates to one grid (gdalwarp -te -tr)"
            )
        ta, tb = ref.transform, info.transform
        if abs(ta.a - tb.a) > TRANSFORM_TOLERANCE_PX * abs(ta.a) or abs(
            ta.e - tb.e
        ) > TRANSFORM_TOLERANCE_PX * abs(ta.e):
            raise GeoreferenceError(
                f"{pair} have different resolutions ({ta.a}, {ta.e} vs {tb.a}, {tb.e}); "
                "resample all dates to one grid (gdalwarp -tr)"
            )
        if max(abs(ta.c - tb.c), abs(ta.f - tb.f)) > TRANSFORM_TOLERANCE_PX * pixel:
            raise GeoreferenceError(
                f"{pair} have different origins ({ta.c}, {ta.f} vs {tb.c}, {tb.f}); "
                "align all dates to one grid (gdalwarp -te -tr -tap)"
            )
        if len(ref.band_names) != len(info.band_names):
            raise BandMismatchError(
                f"{pair} have different band counts ({len(ref.band_names)} vs "
                f"{len(info.band_names)}); give every date the same bands"
            )
        # Names given by the user replace the files' own, which may then differ (or be absent).
        if compare_names and ref.band_names != info.band_names:
            raise BandMismatchError(
                f"{pair} have different band names ({list(ref.band_names)} vs "
                f"{list(info.band_names)}); give every date the same bands in the same order"
            )
        if ref.dtype != info.dtype:
            raise BandMismatchError(
                f"{pair} have different dtypes ({ref.dtype} vs {info.dtype}); "
                "convert all dates to one dtype (gdal_translate -ot)"
            )
        if not _same_nodata(ref.nodata, info.nodata):
            raise BandMismatchError(
                f"{pair} have different nodata values ({ref.nodata} vs {info.nodata}); "
                "set one nodata value on all dates (gdal_edit.py -a_nodata)"
            )


def _same_nodata(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is b
    return a == b or (np.isnan(a) and np.isnan(b))


def _nodata_attr(nodata: float | None, dtype: str) -> int | float | None:
    """Nodata as a JSON-friendly number of the data's kind (GDAL reports it as a float)."""
    if nodata is None:
        return None
    if np.dtype(dtype).kind in "iu" and float(nodata).is_integer():
        return int(nodata)
    return float(nodata)


def _tile_edges(size: int, step: int) -> list[tuple[int, int]]:
    return [(start, min(start + step, size)) for start in range(0, size, step)]


def _read_window(
    path: str, row_start: int, row_stop: int, col_start: int, col_stop: int
) -> np.ndarray:
    """One Dask task: one date, all bands, one spatial tile; the file is closed again at once."""
    window = Window(col_start, row_start, col_stop - col_start, row_stop - row_start)
    try:
        with rasterio.Env(**_GDAL_OPTIONS), rasterio.open(path) as src:
            data = src.read(window=window)
    except rasterio.errors.RasterioError as exc:
        raise CorruptFileError(
            f"cannot read window {window} of {path!r} ({exc}); the file changed or is damaged "
            "after validation: replace it and run again"
        ) from exc
    return data[np.newaxis]


def _build_stack(infos: list[_FileInfo], chunks: int) -> xr.DataArray:
    ref = infos[0]
    nbands = len(ref.band_names)
    row_tiles = _tile_edges(ref.height, chunks)
    col_tiles = _tile_edges(ref.width, chunks)
    name = "read-geotiffs-" + tokenize(
        [(str(info.path), info.stamp) for info in infos], chunks, ref.dtype
    )
    graph: dict[Key, Any] = {}
    for t_index, info in enumerate(infos):
        path = str(info.path)
        for y_index, (row_start, row_stop) in enumerate(row_tiles):
            for x_index, (col_start, col_stop) in enumerate(col_tiles):
                graph[(name, t_index, 0, y_index, x_index)] = (
                    _read_window,
                    path,
                    row_start,
                    row_stop,
                    col_start,
                    col_stop,
                )
    dtype = np.dtype(ref.dtype)
    data = da.Array(
        HighLevelGraph.from_collections(name, graph, dependencies=()),
        name,
        chunks=(
            (1,) * len(infos),
            (nbands,),
            tuple(stop - start for start, stop in row_tiles),
            tuple(stop - start for start, stop in col_tiles),
        ),
        dtype=dtype,
        meta=np.empty((0, 0, 0, 0), dtype=dtype),
    )
    transform = ref.transform
    # Pixel centres, computed in the same order of operations as rioxarray.open_rasterio.
    x = (np.arange(ref.width) + 0.5) * transform.a + 0.5 * transform.b + transform.c
    y = (np.arange(ref.height) + 0.5) * transform.e + 0.5 * transform.d + transform.f
    times = np.array([info.time for info in infos]).astype("datetime64[ns]")
    nodata = _nodata_attr(ref.nodata, ref.dtype)
    stack = xr.DataArray(
        data,
        dims=STACK_DIMS,
        coords={
            "time": times,
            "band": np.asarray(ref.band_names, dtype=str),
            "y": y,
            "x": x,
        },
        name=STACK_NAME,
        attrs={} if nodata is None else {"nodata": nodata},
    )
    return stack.rio.write_crs(ref.crs).rio.write_transform(transform)


# --------------------------------------------------------------------------------------------
# Resumable and appendable stack stores


def ingest_store(
    src_dir: PathLike | Sequence[PathLike],
    store: PathLike,
    *,
    chunks: int = DEFAULT_CHUNKS,
    overwrite: bool = False,
    append: bool = False,
    progress: bool = False,
    band_names: Sequence[str] | None = None,
) -> str:
    """Write (or extend) a local stack store so that a killed run can be resumed.

    Like :func:`ingest`, but the dates are written in batches recorded in the store's progress
    record. Running the same command again resumes an unfinished store, and writes nothing when
    the store is complete. With ``append`` the GeoTIFFs not yet in the store are added after its
    last date (files already ingested, by name, are skipped).

    Parameters
    ----------
    src_dir : str, os.PathLike or sequence of them
        Folder of GeoTIFFs (or a list of GeoTIFFs), one per date.
    store : str or os.PathLike
        Local path of the Zarr store.
    chunks : int, default 1024
        Edge of the spatial tiles in pixels (an append keeps the store's).
    overwrite : bool, default False
        Delete an existing store first.
    append : bool, default False
        Add new dates to an existing complete store (which renames their bands as it renamed
        its own: ``band_names`` is then not needed).
    progress : bool, default False
        Show progress bars.
    band_names : sequence of str, optional
        Names for the bands in place of the files' descriptions (see :func:`open_geotiffs`).

    Returns
    -------
    str
        ``"written"``, ``"resumed"``, ``"appended"`` or ``"complete"`` (nothing to do).

    Raises
    ------
    OutputError
        If the store exists, was made otherwise, and ``overwrite`` is False.
    StoreError
        If an unfinished store was started from other files or parameters, or another run holds
        its lock.
    DuplicateDateError, InputError, GeoreferenceError, BandMismatchError
        On append: a new file's date is already in the store or not after its last date, or its
        grid, bands or dtype differ from the store's.

    Examples
    --------
    >>> ingest_store("scenes/", "stack.zarr", chunks=512)  # doctest: +SKIP
    'written'
    >>> ingest_store("new_scenes/", "stack.zarr", append=True)  # doctest: +SKIP
    'appended'
    """
    from spoc_xr import store as st

    _check_chunks(chunks)
    if append and overwrite:
        raise ParameterError("--append and --overwrite exclude each other; pass one of them")
    inputs = [src_dir] if isinstance(src_dir, str | os.PathLike) else list(src_dir)
    out = Path(check_output_path(store, inputs=inputs, overwrite=True, kind="stack"))
    if append:
        return _append_store(src_dir, out, progress, band_names)
    stack, files = _open_geotiffs(src_dir, chunks=chunks, band_names=band_names)
    recipe: dict[str, Any] = {
        "kind": "stack",
        "version": spoc_xr.__version__,
        "chunks": chunks,
        "input": [str(Path(item).expanduser().resolve()) for item in inputs],
    }
    if band_names is not None:
        # Recorded only when given, so stores made without it still resume and compare equal.
        recipe["band_names"] = [str(name) for name in stack.band.values]
    provenance = {
        "recipe": recipe,
        "files": _manifest(files),
        "dates": st.date_labels(stack.time.values),
    }
    with st.store_lock(out):
        if overwrite and os.path.lexists(out):
            remove_store(out)
        if not os.path.lexists(out):
            _write_stack_store(stack, files, out, provenance, progress)
            return "written"
        attrs = st.read_attrs(out) or {}
        stored = attrs.get(st.PROVENANCE_ATTR)
        same = st.same_record(stored, provenance)
        if st.COMPLETE_ATTR in attrs:
            if same:
                return "complete"
            raise OutputError(
                f"{str(out)!r} exists (made from other files or parameters); pass --overwrite to "
                "replace it, or --append to add new dates"
            )
        if not isinstance(stored, dict):
            raise OutputError(
                f"{str(out)!r} exists and was not written by spoc-xr ingest; "
                "pass --overwrite to replace it"
            )
        if not same:
            raise StoreError(
                f"{str(out)!r} is an unfinished stack that was started with other files or "
                "parameters; pass --overwrite to start it again"
            )
        if (attrs.get(st.PROGRESS_ATTR) or {}).get("stage") is None:
            remove_store(out)  # killed while creating its arrays: start again
            _write_stack_store(stack, files, out, provenance, progress)
        else:
            st.write_dates(_stack_dataset(stack, files), out, progress=progress)
            st.mark_complete(out)
        return "resumed"


def _manifest(files: Sequence[Path]) -> list[list[Any]]:
    # Size and modification time: a file replaced between a kill and its resume is not mixed in.
    return [[path.name, path.stat().st_size, path.stat().st_mtime_ns] for path in files]


def _stack_dataset(stack: xr.DataArray, files: Sequence[Path]) -> xr.Dataset:
    dataset = stack.to_dataset()
    # Written in the same pass as the stack (the reads are shared), so annotate need not read
    # every chunk once more to choose the reference and fit the radiometry.
    dataset[OVERVIEW_NAME] = overview_of(stack)
    dataset.attrs["spoc_xr"] = {
        "version": spoc_xr.__version__,
        "kind": "stack",
        "source_files": [path.name for path in files],
    }
    return dataset


def _write_stack_store(
    stack: xr.DataArray,
    files: Sequence[Path],
    out: Path,
    provenance: dict[str, Any],
    progress: bool,
) -> None:
    from spoc_xr import store as st

    dataset = _stack_dataset(stack, files)
    st.create_store(dataset, out, provenance=provenance)
    st.set_stage(out, "created", dates=provenance["dates"])
    st.write_dates(dataset, out, progress=progress)
    st.mark_complete(out)


def _append_store(
    src_dir: PathLike | Sequence[PathLike],
    out: Path,
    progress: bool,
    band_names: Sequence[str] | None = None,
) -> str:
    from spoc_xr import store as st
    from spoc_xr.errors import InputError

    attrs = st.read_attrs(out)
    if attrs is None:
        raise StoreError(
            f"no stack store at {str(out)!r} to append to; create it first with "
            "`spoc-xr ingest SRC_DIR STACK.zarr`"
        )
    provenance = attrs.get(st.PROVENANCE_ATTR)
    if not isinstance(provenance, dict):
        provenance = _provenance_of_plain_stack(out)
    if provenance.get("recipe", {}).get("kind") != "stack":
        raise StoreError(
            f"{str(out)!r} is not a stack store written by spoc-xr ingest; pass a stack store"
        )
    chunks = int(provenance["recipe"]["chunks"])
    # New dates are named as the store's first ones were, unless names are given again.
    if band_names is None:
        band_names = provenance["recipe"].get("band_names")
    recorded = {entry[0]: entry for entry in provenance["files"]}
    stored_dates = list(provenance["dates"])
    given = _as_file_list(src_dir)
    _check_unchanged(
        [path for path in given if path.name in recorded], recorded, stored_dates, out, chunks
    )
    candidates = [path for path in given if path.name not in recorded]
    if not candidates:
        if st.COMPLETE_ATTR in attrs:
            return "complete"
        raise StoreError(f"{str(out)!r} is unfinished; run the command that started it again")
    last = np.datetime64(stored_dates[-1])
    for path in candidates:
        when = parse_date(path)
        if str(when) in stored_dates:
            raise DuplicateDateError(
                f"{path.name!r} carries the date {when}, which {str(out)!r} already holds; "
                "remove the file from the folder or re-create the store with --overwrite"
            )
        if when <= last:
            raise InputError(
                f"{path.name!r} ({when}) is not after the store's last date ({last}); appends "
                "must add later dates: re-create the store with --overwrite to insert it"
            )
    new_stack, files = _open_geotiffs(candidates, chunks=chunks, band_names=band_names)
    with st.store_lock(out):
        existing = xr.open_zarr(
            out, consolidated=False, zarr_format=3, chunks={}, decode_coords="all"
        )
        _check_same_store_grid(existing[STACK_NAME], new_stack, out)
        manifest = _manifest(files)
        dates = stored_dates + st.date_labels(new_stack.time.values)
        state = attrs.get(st.PROGRESS_ATTR) or {}
        if st.COMPLETE_ATTR in attrs:
            st.unmark_complete(
                out,
                progress={
                    "stage": "append",
                    "dates": dates,
                    "done": stored_dates,
                    "files": manifest,
                },
            )
        elif state.get("stage") != "append" or not st.same_record(state.get("files"), manifest):
            raise StoreError(
                f"{str(out)!r} is unfinished and was started with other files; run the command "
                "that started it again, or pass --overwrite to re-create it"
            )
        times = np.concatenate([existing["time"].values, new_stack.time.values])
        st.grow_time(out, times)
        dataset = _stack_dataset(new_stack, files)
        if OVERVIEW_NAME not in existing.data_vars:  # a store from before overviews were kept
            dataset = dataset.drop_vars(OVERVIEW_NAME)
        st.write_dates(dataset, out, start=len(stored_dates), progress=progress)
        info = dict(attrs.get("spoc_xr") or {})
        info["source_files"] = list(info.get("source_files", [])) + [p.name for p in files]
        record = dict(provenance)
        record["files"] = list(provenance["files"]) + manifest
        record["dates"] = dates
        st.update_attrs(out, {st.PROVENANCE_ATTR: record, "spoc_xr": info})
        st.mark_complete(out)
    return "appended"


def _check_unchanged(
    paths: Sequence[Path],
    recorded: dict[str, list[Any]],
    stored_dates: Sequence[str],
    out: Path,
    chunks: int,
) -> None:
    """Refuse a file already ingested (by name) whose pixels changed since: an append skips it.

    Size and modification time pick the suspects (a plain ``ingest`` records neither); a suspect
    whose pixels equal the stored date's (a copied or touched file) passes.
    """
    from spoc_xr.errors import InputError

    stored: xr.DataArray | None = None
    for path in paths:
        _, size, mtime = recorded[path.name]
        stat = path.stat()
        if size is None or [stat.st_size, stat.st_mtime_ns] == [size, mtime]:
            continue
        when = str(parse_date(path))
        if when not in stored_dates:
            continue
        new, _ = _open_geotiffs([path], chunks=chunks)  # pixels only: names do not matter
        if stored is None:
            stored = xr.open_zarr(out, consolidated=False, zarr_format=3, chunks={})[STACK_NAME]
        if not _same_pixels(new.isel(time=0).data, stored.isel(time=stored_dates.index(when)).data):
            raise InputError(
                f"{path.name!r} ({when}) differs from the date {str(out)!r} holds under that "
                "name, and an append only adds new files: restore the ingested file, or re-create "
                "the store with --overwrite to take the new pixels"
            )


def _same_pixels(fresh: da.Array, old: da.Array) -> bool:
    """Whether two lazy images hold the same values (NaN equal to NaN), read chunk by chunk."""
    if fresh.shape != old.shape or fresh.dtype != old.dtype:
        return False
    fresh = fresh.rechunk(old.chunks)
    differ = fresh != old
    if np.issubdtype(old.dtype, np.floating):
        differ &= ~(da.isnan(fresh) & da.isnan(old))
    return not bool(differ.any().compute())


def _provenance_of_plain_stack(out: Path) -> dict[str, Any]:
    """Provenance of a complete stack written by :func:`ingest` (which records none)."""
    from spoc_xr import store as st

    existing = open_store(out, kind="stack")  # refuses incomplete and foreign stores
    array = zarr.open_group(out, mode="r")[STACK_NAME]
    assert isinstance(array, zarr.Array)
    names = existing.attrs["spoc_xr"].get("source_files", [])
    return {
        "recipe": {"kind": "stack", "version": spoc_xr.__version__, "chunks": array.chunks[2]},
        "files": [[name, None, None] for name in names],
        "dates": st.date_labels(existing.time.values),
    }


def _check_same_store_grid(stored: xr.DataArray, new: xr.DataArray, out: Path) -> None:
    where = f"the new files and {str(out)!r}"
    stored_bands = [str(b) for b in stored["band"].values]
    new_bands = [str(b) for b in new["band"].values]
    if stored_bands != new_bands:
        raise BandMismatchError(
            f"{where} have different bands ({stored_bands} vs {new_bands}); give the new dates "
            "the store's bands in the same order"
        )
    if stored.dtype != new.dtype:
        raise BandMismatchError(
            f"{where} have different dtypes ({stored.dtype} vs {new.dtype}); convert the new "
            "files (gdal_translate -ot)"
        )
    if not _same_nodata(stored.attrs.get("nodata"), new.attrs.get("nodata")):
        raise BandMismatchError(
            f"{where} have different nodata values ({stored.attrs.get('nodata')} vs "
            f"{new.attrs.get('nodata')}); set the store's nodata on the new files"
        )
    same_shape = stored.sizes["y"] == new.sizes["y"] and stored.sizes["x"] == new.sizes["x"]
    step = abs(float(stored["x"].values[-1] - stored["x"].values[0])) / max(
        1, stored.sizes["x"] - 1
    )
    tolerance = TRANSFORM_TOLERANCE_PX * (step or 1.0)
    if not same_shape or not all(
        np.allclose(stored[axis].values, new[axis].values, rtol=0, atol=tolerance)
        for axis in ("x", "y")
    ):
        raise GeoreferenceError(
            f"{where} are on different grids (shape, resolution or origin); warp the new files "
            "to the store's grid (gdalwarp -te -tr)"
        )
    stored_crs = stored.rio.crs
    if stored_crs is None or not _same_crs(stored_crs, new.rio.crs):
        raise GeoreferenceError(
            f"{where} have different CRS ({stored_crs} vs {new.rio.crs}); reproject the new "
            "files to the store's CRS"
        )
