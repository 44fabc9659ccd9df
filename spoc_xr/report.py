"""A one-page HTML report of an annotation run: its parameters, figures and per-date numbers.

The page links the PNGs written next to it by :func:`spoc_xr.plots.save_figures` and nothing
else (no script, no stylesheet, no web font), so the folder can be zipped, mailed or opened from
a file share offline.
"""

from __future__ import annotations

import contextlib
import html
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from spoc_xr.errors import OutputError
from spoc_xr.pipeline import shift_notes
from spoc_xr.plots import (
    FIGURE_NAMES,
    check_annotations,
    date_label,
    object_counts,
    save_figures,
)
from spoc_xr.reference import MISREGISTRATION

REPORT_NAME = "report.html"
REPORT_SUFFIX = "_report"

_STYLE = """
body { font-family: sans-serif; max-width: 70em; margin: 1em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1em 0 2em; }
figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { color: #555; font-size: 0.9em; }
"""


def report_dir_for(output: str | os.PathLike[str]) -> Path:
    """The report folder that goes next to an annotation store: ``out.zarr`` -> ``out_report``.

    Examples
    --------
    >>> report_dir_for("runs/out.zarr")
    PosixPath('runs/out_report')
    """
    path = Path(output).expanduser()
    return path.with_name(path.with_suffix("").name + REPORT_SUFFIX)


def remove_stale_report(report_dir: str | os.PathLike[str]) -> list[Path]:
    """Remove the files a report writes (``report.html`` and its PNGs) from ``report_dir``, and
    the folder if nothing else is left in it; returns the files removed.

    For a store replaced with ``--overwrite --no-report``: the old report beside it would
    describe results and parameters that no longer exist. Nothing else in the folder is touched.
    """
    out = Path(report_dir).expanduser()
    names = [REPORT_NAME, *(f"{name}.png" for name in FIGURE_NAMES)]
    removed = [out / name for name in names if (out / name).is_file()]
    for path in removed:
        path.unlink()
    with contextlib.suppress(OSError):  # not empty, or absent: left as it is
        if removed:
            out.rmdir()
    return removed


def check_report_dir(
    report_dir: str | os.PathLike[str],
    *,
    inputs: Sequence[str | os.PathLike[str]] = (),
    overwrite: bool,
) -> Path:
    """Check, before any work, that the report folder may be written; deletes nothing.

    An existing folder is refused unless ``overwrite``; with it, the report's files are replaced
    in place and nothing else in the folder is touched (so a mistyped path cannot erase data).

    Parameters
    ----------
    report_dir : str or os.PathLike
        Folder the report will be written to.
    inputs : sequence of str or os.PathLike
        Paths the run reads or writes otherwise (stack, annotation store).
    overwrite : bool
        Whether an existing folder may receive new report files.

    Returns
    -------
    pathlib.Path

    Raises
    ------
    OutputError
        If the folder exists without ``overwrite``, is a file, or is (or holds) one of ``inputs``.

    Examples
    --------
    >>> check_report_dir("out_report", overwrite=False)  # doctest: +SKIP
    PosixPath('out_report')
    """
    out = Path(report_dir).expanduser()
    resolved = out.resolve()
    for item in inputs:
        source = Path(item).expanduser().resolve()
        if resolved == source or source.is_relative_to(resolved):
            raise OutputError(
                f"report folder {str(out)!r} is or contains {str(item)!r}; rename the output "
                "store or pass --no-report"
            )
    if os.path.lexists(out):
        if not overwrite:
            raise OutputError(
                f"report folder {str(out)!r} exists; pass --overwrite to replace its report "
                "or --no-report to skip it"
            )
        if not out.is_dir():
            raise OutputError(
                f"{str(out)!r} exists and is not a folder; remove it or pass --no-report"
            )
    return out


def write_report(
    annotations: xr.Dataset,
    stack: xr.DataArray,
    out_dir: str | os.PathLike[str],
    *,
    scores: Any = None,
    dates: Any = None,
) -> Path:
    """Write the figures and ``report.html`` of an annotation into ``out_dir``.

    Parameters
    ----------
    annotations : xarray.Dataset
        Annotations of ``stack``: pass the store read back (``xr.open_zarr``) so that nothing
        is recomputed.
    stack : xarray.DataArray
        The annotated ``(time, band, y, x)`` stack (for the quicklook).
    out_dir : str or os.PathLike
        Folder for ``report.html`` and the PNGs (created if missing; see
        :func:`check_report_dir` for the overwrite rule, which callers apply first).
    scores : spoc_xr.evaluate.Scores or dict, optional
        Scores against truth, shown in a table.
    dates : optional
        Dates of the quicklook (default: reference, busiest, cloudiest, evenly spaced).

    Returns
    -------
    pathlib.Path
        Path of ``report.html``.

    Examples
    --------
    >>> annotations = xr.open_zarr("out.zarr")  # doctest: +SKIP
    >>> write_report(annotations, open_stack("stack.zarr"), "out_report")  # doctest: +SKIP
    PosixPath('out_report/report.html')
    """
    check_annotations(annotations, ("mask", "heatmap", "reference", "valid_fraction"))
    out = Path(out_dir)
    counts = object_counts(annotations["mask"])
    figures = save_figures(annotations, stack, out, dates=dates, counts=counts)
    page = render_html(annotations, figures, counts, scores=scores)
    path = out / REPORT_NAME
    path.write_text(page, encoding="utf-8")
    return path


def render_html(
    annotations: xr.Dataset,
    figures: Mapping[str, Path],
    counts: np.ndarray,
    *,
    scores: Any = None,
) -> str:
    """The report page as a string (figures linked by file name, relative to the page)."""
    info: dict[str, Any] = dict(annotations.attrs.get("spoc_xr", {}))
    e = html.escape
    n_time, n_y, n_x = (annotations.sizes[d] for d in ("time", "y", "x"))
    reference = str(info.get("reference", "?"))
    if info.get("reference_index") is not None:
        reference += f" ({date_label(annotations.time.values[int(info['reference_index'])])})"
    if info.get("reference_choice"):
        reference += f"; {info['reference_choice']}"
    summary = {
        "dates": f"{n_time} ({date_label(annotations.time.values[0])} .. "
        f"{date_label(annotations.time.values[-1])})",
        "size": f"{n_y} x {n_x} px",
        "reference": reference,
        "water index": str(info.get("water_index_description", info.get("water_index", "?"))),
        "spoc_xr version": str(info.get("version", "?")),
    }
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        "<title>spoc_xr annotation report</title>",
        f"<style>{_STYLE}</style></head><body>",
        "<h1>spoc_xr annotation report</h1>",
        _table(summary.items()),
        "<h2>Parameters</h2>",
        _table((k, _plain(v)) for k, v in dict(info.get("parameters", {})).items()),
    ]
    notes = [str(n) for n in [*info.get("notes", []), *shift_notes(annotations)]]
    if notes:
        parts.append("<ul>" + "".join(f"<li>{e(n)}</li>" for n in notes) + "</ul>")
    captions = {
        "quicklook": "Chosen dates, same stretch for all; small objects magenta, large objects "
        "(clouds, shadows) cyan.",
        "heatmap": "Heatmap: on how many dates each water pixel held a small object, over the "
        "reference image.",
        "counts": "Small objects per date (bars) and cloud cover (line, % of valid pixels).",
    }
    parts.append("<h2>Figures</h2>")
    for name, path in figures.items():
        src = e(Path(path).name)
        parts.append(
            f'<figure><a href="{src}"><img src="{src}" alt="{e(name)}"></a>'
            f"<figcaption>{e(captions.get(name, name))}</figcaption></figure>"
        )
    parts.append("<h2>Per date</h2>")
    parts.append(_date_table(annotations, counts))
    if scores is not None:
        parts.append("<h2>Scores against truth</h2>")
        values = scores.as_dict() if hasattr(scores, "as_dict") else dict(scores)
        parts.append(_table((k, _plain(v)) for k, v in values.items() if k != "dates"))
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _plain(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict | list | tuple):
        return json.dumps(value, default=str)
    return str(value)


def _table(rows: Any) -> str:
    e = html.escape
    body = "".join(f"<tr><th>{e(str(k))}</th><td>{e(str(v))}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


def _date_table(annotations: xr.Dataset, counts: np.ndarray) -> str:
    fractions = annotations[["valid_fraction", "small_fraction", "large_fraction"]].compute()
    # Stores written before the shifts were kept have none: shown as unknown.
    shifts = (
        np.asarray(annotations[MISREGISTRATION].values, dtype=np.float64)
        if MISREGISTRATION in annotations.data_vars
        else np.full((annotations.sizes["time"], 2), np.nan)
    )
    header = (
        "<tr><th>date</th><th>valid</th><th>small objects</th><th>small-object px</th>"
        "<th>cloud cover</th><th>shift y, x (px)</th></tr>"
    )
    rows = []
    for t, stamp in enumerate(annotations.time.values):
        valid = float(fractions.valid_fraction.values[t])
        small = float(fractions.small_fraction.values[t])
        large = float(fractions.large_fraction.values[t])
        cells = [
            f"{valid:.1%}",
            str(int(counts[t])),
            "-" if np.isnan(small) else f"{small:.3%}",
            "-" if np.isnan(large) else f"{large:.1%}",
            "-" if np.isnan(shifts[t]).any() else f"{shifts[t, 0]:+.2f}, {shifts[t, 1]:+.2f}",
        ]
        rows.append(
            f"<tr><td>{html.escape(date_label(stamp))}</td>"
            + "".join(f'<td class="num">{c}</td>' for c in cells)
            + "</tr>"
        )
    return f"<table>{header}{''.join(rows)}</table>"
