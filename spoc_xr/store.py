"""Zarr v3 stores: safe output paths, writing with a completion marker, and reading back.

A store counts as complete only once its root carries the attribute ``spoc_complete``. The marker
is written after every chunk has been stored, so a run that was interrupted leaves a store that
:func:`open_store` refuses instead of silently returning half-written data. (An attribute rather
than a marker file: Zarr warns about every foreign file it finds inside a store.)

Only local paths are supported.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Hashable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dask
import xarray as xr
import zarr
from dask.delayed import Delayed

import spoc_xr
from spoc_xr.errors import OutputError, ParameterError, StoreError

__all__ = [
    "COMPLETE_ATTR",
    "check_output_path",
    "is_complete",
    "mark_complete",
    "open_store",
    "remove_store",
    "write_dataset",
]

PathLike = str | os.PathLike[str]

COMPLETE_ATTR = "spoc_complete"
# Files that make a folder a Zarr store (v3 and v2): only such folders may be deleted for the
# user, so that a mistyped ``--overwrite`` output cannot remove an unrelated folder.
_ZARR_METADATA = ("zarr.json", ".zgroup", ".zarray")


def check_output_path(
    output: PathLike, *, inputs: Sequence[PathLike] = (), overwrite: bool
) -> Path:
    """Check that ``output`` may be written, before any work is done; deletes nothing.

    Parameters
    ----------
    output : str or os.PathLike
        The store (or file) about to be written.
    inputs : sequence of str or os.PathLike, optional
        Files, folders or stores the command reads.
    overwrite : bool
        Whether an existing ``output`` may be replaced.

    Returns
    -------
    pathlib.Path
        ``output`` as a path (``~`` expanded).

    Raises
    ------
    OutputError
        If ``output`` is one of the inputs, lies inside an input store, contains an input, exists
        while ``overwrite`` is False, or is a non-empty folder that is not a Zarr store.

    Examples
    --------
    >>> check_output_path("stack.zarr", inputs=["scenes/"], overwrite=False)  # doctest: +SKIP
    PosixPath('stack.zarr')
    """
    out = Path(output).expanduser()
    resolved = out.resolve()
    for item in inputs:
        source = Path(item).expanduser().resolve()
        if resolved == source:
            raise OutputError(
                f"output {str(out)!r} is also an input; choose a different output path"
            )
        if source.is_relative_to(resolved):
            raise OutputError(
                f"output {str(out)!r} contains the input {str(item)!r}; replacing it would "
                "delete the input: choose an output path outside it"
            )
        if resolved.is_relative_to(source) and _is_zarr_store(source):
            raise OutputError(
                f"output {str(out)!r} lies inside the input store {str(item)!r}; "
                "choose an output path outside it"
            )
    if os.path.lexists(out):
        if not overwrite:
            raise OutputError(f"{str(out)!r} exists; pass --overwrite to replace it")
        _check_replaceable(out)
    return out


def remove_store(path: PathLike) -> None:
    """Delete a store (or file) that :func:`check_output_path` allowed to be replaced.

    Parameters
    ----------
    path : str or os.PathLike
        Store folder or file to delete; a missing path is ignored.

    Raises
    ------
    OutputError
        If ``path`` is a non-empty folder that is not a Zarr store.

    Examples
    --------
    >>> remove_store("old_stack.zarr")  # doctest: +SKIP
    """
    target = Path(path).expanduser()
    if not os.path.lexists(target):
        return
    _check_replaceable(target)
    if target.is_dir() and not target.is_symlink():
        shutil.rmtree(target)
    else:
        target.unlink()


def write_dataset(
    ds: xr.Dataset,
    store: PathLike,
    *,
    overwrite: bool,
    compute: bool = True,
    progress: bool = False,
) -> Delayed | None:
    """Write a Dataset to a Zarr v3 store, chunk by chunk, and mark it complete last.

    Dask-backed variables keep their chunks on disk. Grid-mapping coordinates (rioxarray's
    ``spatial_ref``) are listed in each variable's ``coordinates`` so a plain ``xr.open_zarr``
    returns them with the variable.

    Parameters
    ----------
    ds : xarray.Dataset
        What to write.
    store : str or os.PathLike
        Path of the store.
    overwrite : bool
        Replace an existing store; otherwise an existing path is an error.
    compute : bool, default True
        Write now. With False only the metadata is written and a Dask ``Delayed`` is returned;
        compute it, then call :func:`mark_complete`.
    progress : bool, default False
        Show a progress bar while computing (Dask's, or distributed's when a Client is active).

    Returns
    -------
    dask.delayed.Delayed or None
        The pending write when ``compute`` is False.

    Raises
    ------
    OutputError
        If ``store`` exists and ``overwrite`` is False.

    Examples
    --------
    >>> write_dataset(ds, "cube.zarr", overwrite=True)  # doctest: +SKIP
    >>> pending = write_dataset(ds, "cube.zarr", overwrite=True, compute=False)  # doctest: +SKIP
    >>> pending.compute(); mark_complete("cube.zarr")  # doctest: +SKIP
    """
    path = Path(store).expanduser()
    if os.path.lexists(path):
        if not overwrite:
            raise OutputError(f"{str(path)!r} exists; pass --overwrite to replace it")
        _check_replaceable(path)
        if not path.is_dir():
            # Zarr replaces folders itself (mode "w", which also drops the old marker), not files.
            path.unlink()
    prepared = _prepare_for_zarr(ds)
    options: dict[str, Any] = {
        "mode": "w" if overwrite else "w-",
        "zarr_format": 3,
        # Consolidated metadata is not part of the Zarr v3 spec; a stack has few variables.
        "consolidated": False,
    }
    if not compute:
        pending: Delayed = prepared.to_zarr(path, compute=False, **options)
        return pending
    if progress:
        _compute_with_progress(prepared.to_zarr(path, compute=False, **options))
    else:
        prepared.to_zarr(path, **options)
    mark_complete(path)
    return None


def mark_complete(store: PathLike) -> None:
    """Write the completion marker into a store; call it after all chunks are written.

    Parameters
    ----------
    store : str or os.PathLike
        Path of the store.

    Raises
    ------
    StoreError
        If ``store`` is not a Zarr store folder.

    Examples
    --------
    >>> mark_complete("cube.zarr")  # doctest: +SKIP
    """
    path = Path(store).expanduser()
    if not _is_zarr_store(path):
        raise StoreError(f"{str(path)!r} is not a Zarr store; cannot mark it complete")
    group = zarr.open_group(path, mode="r+")
    group.attrs.update(
        {
            COMPLETE_ATTR: {
                "version": spoc_xr.__version__,
                "completed": datetime.now(UTC).isoformat(),
            }
        }
    )


def is_complete(store: PathLike) -> bool:
    """Tell whether a store was written to the end.

    Parameters
    ----------
    store : str or os.PathLike
        Path of the store.

    Returns
    -------
    bool
        True when the completion marker exists.

    Examples
    --------
    >>> is_complete("stack.zarr")  # doctest: +SKIP
    True
    """
    path = Path(store).expanduser()
    if not _is_zarr_store(path):
        return False
    try:
        group = zarr.open_group(path, mode="r")
    except (ValueError, KeyError, OSError, TypeError):
        return False
    return COMPLETE_ATTR in group.attrs


def open_store(
    store: PathLike, *, chunks: dict[str, Any] | None = None, kind: str | None = None
) -> xr.Dataset:
    """Open a complete spoc_xr Zarr store lazily, with its grid mapping as a coordinate.

    Parameters
    ----------
    store : str or os.PathLike
        Path of the store.
    chunks : dict, optional
        Dask chunks per dimension; by default the chunks on disk.
    kind : str, optional
        Required value of the dataset attribute ``spoc_xr["kind"]`` (e.g. ``"stack"``).

    Returns
    -------
    xarray.Dataset

    Raises
    ------
    StoreError
        If the store is missing, incomplete, unreadable or of another kind.
    ParameterError
        If ``chunks`` is not a dict.

    Examples
    --------
    >>> ds = open_store("stack.zarr", kind="stack")  # doctest: +SKIP
    """
    if chunks is not None and not isinstance(chunks, dict):
        raise ParameterError(
            f"chunks must be a dict of dimension name to size (e.g. {{'time': 1}}), got {chunks!r}"
        )
    path = Path(store).expanduser()
    if not path.exists():
        raise StoreError(f"no store at {str(path)!r}; check the path or create it first")
    if not _is_zarr_store(path):
        raise StoreError(f"{str(path)!r} is not a Zarr store; pass a store written by spoc-xr")
    if not is_complete(path):
        raise StoreError(
            f"{str(path)!r} is incomplete (its write was interrupted or is still running); "
            "write it again with --overwrite"
        )
    try:
        ds = xr.open_zarr(
            path,
            chunks={} if chunks is None else chunks,
            consolidated=False,
            zarr_format=3,
            decode_coords="all",
        )
    except (ValueError, KeyError, OSError, TypeError) as exc:
        raise StoreError(
            f"cannot open {str(path)!r} as a Zarr v3 store ({exc}); write it again with --overwrite"
        ) from exc
    if kind is not None:
        meta = ds.attrs.get("spoc_xr")
        found = meta.get("kind") if isinstance(meta, dict) else None
        if found != kind:
            raise StoreError(
                f"{str(path)!r} holds a {found or 'foreign'!s} store, not a {kind} store; "
                "pass the right store"
            )
    return ds


# --------------------------------------------------------------------------------------------
# internals


def _is_zarr_store(path: Path) -> bool:
    return path.is_dir() and any((path / name).is_file() for name in _ZARR_METADATA)


def _check_replaceable(path: Path) -> None:
    replaceable = not path.is_dir() or path.is_symlink() or _is_zarr_store(path)
    if not replaceable and any(path.iterdir()):
        raise OutputError(
            f"{str(path)!r} is a folder that is not a Zarr store; refusing to replace it: "
            "choose another output path or remove it yourself"
        )


def _prepare_for_zarr(ds: xr.Dataset) -> xr.Dataset:
    prepared = ds.copy(deep=False)
    # A dataset read from a complete store must not mark its new store complete before it is.
    prepared.attrs.pop(COMPLETE_ATTR, None)
    # numpy fixed-width unicode has no Zarr v3 data type; object strings map to v3 "string".
    fixed_strings = {
        name: prepared[name].astype(object)
        for name in prepared.coords
        if prepared[name].dtype.kind == "U"
    }
    prepared = prepared.assign_coords(fixed_strings)
    for name in list(prepared.data_vars):
        if prepared[name].dtype.kind == "U":
            prepared[name] = prepared[name].astype(object)
    for var in prepared.data_vars.values():
        grid_mapping = var.encoding.get("grid_mapping") or var.attrs.get("grid_mapping")
        if grid_mapping not in prepared.coords:
            continue
        linked: list[Hashable] = [
            name
            for name, coord in prepared.coords.items()
            if name not in prepared.indexes and set(coord.dims) <= set(var.dims)
        ]
        # xarray leaves grid-mapping variables out of `coordinates`; plain open_zarr then drops
        # them from the variable and rioxarray loses the CRS.
        var.encoding["coordinates"] = " ".join(str(name) for name in linked)
    return prepared


def _active_client() -> Any:
    # distributed is only imported when the caller already did: no client can exist otherwise.
    if "distributed" not in sys.modules:
        return None
    from distributed import default_client

    try:
        return default_client()
    except ValueError:
        return None


def _compute_with_progress(pending: Delayed) -> None:
    client = _active_client()
    if client is None:
        from dask.diagnostics import ProgressBar

        with ProgressBar():
            dask.compute(pending)
        return
    from distributed import progress

    future = client.compute(pending)
    progress(future)
    future.result()
