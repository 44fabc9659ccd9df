"""Annotation quality on semi-real port stacks, the demo harbour and real Landsat, with defaults.

For each port of the shared ``sen2ships`` data a semi-real stack is built
(:func:`spoc_xr.ports.make_port_stack`, cached in ``--workdir`` by port, seed, dates and crop),
ingested, annotated with DEFAULT parameters and scored with :func:`spoc_xr.evaluate.evaluate`,
over all dates and over the real scene's date alone. The demo harbour (16 dates, 512 x 512,
seed 0) and the real Landsat stack ``landsat_fmask`` (Fmask cloud and shadow as truth) follow.
Prints one Markdown table; ``--json`` writes every number.

With ``--max-side N``, ports larger than N px are cropped to the N x N window that holds the most
ships (the table says so); by default nothing is cropped.

Run::

    python benchmarks/quality.py                       # everything
    python benchmarks/quality.py --ports busan,klang --no-demo --no-landsat --json q.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import dask
import numpy as np
import xarray as xr

from spoc_xr.evaluate import Scores, evaluate, json_safe
from spoc_xr.ingest import ingest, parse_date
from spoc_xr.pipeline import annotate
from spoc_xr.ports import (
    PortScene,
    load_port_scene,
    make_port_stack,
    port_dirs,
    shared_data_dir,
)
from spoc_xr.store import open_store, write_dataset
from spoc_xr.synthetic import make_harbour, read_truth

DEFAULT_WORKDIR = Path("/tmp/spoc_quality")
DEFAULT_DATES = 12
# No crop by default: all 8 full ports + demo + Landsat take about 6 minutes on 2 cores.
DEFAULT_MAX_SIDE = 0
DEMO_DATES, DEMO_SIDE, DEMO_SEED = 16, 512, 0
LANDSAT = "landsat_fmask"
# A date whose truth holds (almost) no clear valid pixel must not come out mostly clear.
OVERCAST_USABLE_SHARE = 0.01
MOSTLY_CLEAR_SHARE = 0.5


# Reference passed to annotate; set from --reference.
REFERENCE = "auto"


def _annotate(image_dir: Path, work: Path) -> tuple[xr.Dataset, float]:
    """Ingest, annotate with defaults, write; the written store and the seconds it took."""
    started = time.perf_counter()
    stack = ingest(image_dir, work / "stack.zarr", overwrite=True)
    result = annotate(stack, reference=REFERENCE)
    write_dataset(result, work / "out.zarr", overwrite=True)
    seconds = time.perf_counter() - started
    return open_store(work / "out.zarr", kind="annotations"), seconds


def _row(name: str, scores: Scores | None, seconds: float, **extra: Any) -> dict[str, Any]:
    row: dict[str, Any] = {"data set": name, "seconds": round(seconds, 1)}
    if scores is not None:
        row.update(
            precision=scores.precision,
            recall=scores.recall,
            f1=scores.f1,
            cloud_iou=scores.cloud_iou,
            heatmap_r=scores.heatmap_correlation,
            shift_error=scores.shift_error,
            shifts_measured=scores.shifts_measured,
            shifts_known=scores.shifts_known,
            per_date=[vars(d) for d in scores.dates],
        )
    row.update(extra)
    return row


def _port_stack(name: str, folder: Path, args: argparse.Namespace) -> tuple[PortScene, float]:
    cache = args.workdir / f"{name}_seed{args.seed}_n{args.dates}_side{args.max_side}"
    try:
        return load_port_scene(cache), 0.0
    except Exception:  # no complete stack cached yet: build it
        pass
    import rasterio

    with rasterio.open(folder / "B02.tif") as src:
        big = 0 < args.max_side < max(src.height, src.width)
    started = time.perf_counter()
    scene = make_port_stack(
        folder,
        cache,
        n_dates=args.dates,
        seed=args.seed,
        crop=args.max_side if big else None,
        overwrite=True,
    )
    return scene, time.perf_counter() - started


def run_port(name: str, folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    scene, built = _port_stack(name, folder, args)
    annotations, seconds = _annotate(scene.image_dir, scene.image_dir.parent)
    started = time.perf_counter()
    truth = read_truth(scene.truth_path)
    scores = evaluate(annotations, truth)
    real = evaluate(annotations, truth.isel(time=[scene.real_index]))
    seconds += time.perf_counter() - started
    import rasterio

    _, _, rows, cols = scene.window
    with rasterio.open(folder / "B02.tif") as src:
        whole = (rows, cols) == (src.height, src.width)
    return _row(
        name if whole else f"{name} (crop {rows}x{cols})",
        scores,
        seconds,
        real_recall=real.recall,
        real_date=str(scene.dates[scene.real_index]),
        real_ships=scene.n_real_ships,
        window=list(scene.window),
        build_seconds=round(built, 1),
        n_boats=scene.n_boats,
    )


def run_demo(args: argparse.Namespace) -> dict[str, Any]:
    folder = args.workdir / f"harbour_seed{DEMO_SEED}_n{DEMO_DATES}_{DEMO_SIDE}"
    marker = folder / "complete.json"
    if not marker.exists():
        make_harbour(
            folder,
            n_dates=DEMO_DATES,
            shape=(DEMO_SIDE, DEMO_SIDE),
            seed=DEMO_SEED,
            overwrite=True,
        )
        marker.write_text(json.dumps({"dates": DEMO_DATES, "side": DEMO_SIDE, "seed": DEMO_SEED}))
    annotations, seconds = _annotate(folder / "images", folder)
    started = time.perf_counter()
    scores = evaluate(annotations, read_truth(folder / "truth.zarr"))
    return _row("demo harbour", scores, seconds + time.perf_counter() - started)


def landsat_truth(folder: Path) -> tuple[xr.Dataset, dict[str, np.ndarray]]:
    """Fmask truth of the Landsat stack: clouds = cloud | shadow, no boats."""
    files = sorted(folder.glob("LS_*.tif"))
    with np.load(folder / "truth.npz") as npz:
        arrays = {k: npz[k].astype(bool) for k in npz.files}
    if arrays["clouds"].shape[0] != len(files):
        raise SystemExit(
            f"{folder}/truth.npz has {arrays['clouds'].shape[0]} dates but {len(files)} LS_*.tif"
        )
    times = np.array([parse_date(f.name) for f in files], dtype="datetime64[ns]")
    clouds = (arrays["clouds"] | arrays["shadow"]).astype(np.uint8)
    truth = xr.Dataset(
        {
            "boats": (("time", "y", "x"), np.zeros(clouds.shape, dtype=np.int32)),
            "clouds": (("time", "y", "x"), clouds),
        },
        coords={"time": times},
    )
    return truth, arrays


def run_landsat(folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    work = args.workdir / LANDSAT
    work.mkdir(parents=True, exist_ok=True)
    truth, arrays = landsat_truth(folder)
    files = sorted(folder.glob("LS_*.tif"))
    annotations, seconds = _annotate_files(files, work)
    started = time.perf_counter()
    scores = evaluate(annotations, truth)
    valid_fraction = np.asarray(annotations["valid_fraction"].values)
    large_fraction = np.nan_to_num(np.asarray(annotations["large_fraction"].values))
    n = valid_fraction.size
    fill = arrays["fill"].reshape(n, -1)
    unusable = (arrays["fill"] | arrays["clouds"] | arrays["shadow"]).reshape(n, -1)
    no_data = fill.all(axis=1)
    overcast = (1.0 - unusable.mean(axis=1)) < OVERCAST_USABLE_SHARE
    # A date with no valid data must not be reported as holding clear valid pixels.
    no_data_clear = int((no_data & (valid_fraction > 0) & (large_fraction < 1.0)).sum())
    overcast_clear = int(
        (overcast & (valid_fraction > 0) & (large_fraction < MOSTLY_CLEAR_SHARE)).sum()
    )
    return _row(
        "landsat_fmask (Fmask cloud + shadow)",
        scores,
        seconds + time.perf_counter() - started,
        no_data_dates=int(no_data.sum()),
        no_data_dates_reported_clear=no_data_clear,
        annotation_empty_dates=int((valid_fraction == 0).sum()),
        overcast_dates=int(overcast.sum()),
        overcast_dates_reported_mostly_clear=overcast_clear,
        water_index=str(annotations.attrs.get("spoc_xr", {}).get("water_index_description", "?")),
    )


def _annotate_files(files: Sequence[Path], work: Path) -> tuple[xr.Dataset, float]:
    started = time.perf_counter()
    stack = ingest(list(files), work / "stack.zarr", overwrite=True)
    result = annotate(stack, reference=REFERENCE)
    write_dataset(result, work / "out.zarr", overwrite=True)
    return open_store(work / "out.zarr", kind="annotations"), time.perf_counter() - started


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def _shift_cell(row: dict[str, Any]) -> str:
    known = row.get("shifts_known") or 0
    if not known:
        return "–"
    return f"{_fmt(row.get('shift_error'))} ({row.get('shifts_measured')}/{known})"


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The results as one Markdown table, Landsat's extra counts as a note below it."""
    head = (
        "| data set | boat P | R | F1 | real-date recall | cloud IoU | heatmap r "
        "| shift error px (measured) | seconds |"
    )
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        boats = r.get("data set", "").startswith("landsat")
        cells = [
            r["data set"],
            _fmt(None if boats else r.get("precision")),
            _fmt(None if boats else r.get("recall")),
            _fmt(None if boats else r.get("f1")),
            _fmt(r.get("real_recall")),
            _fmt(r.get("cloud_iou")),
            _fmt(None if boats else r.get("heatmap_r")),
            _shift_cell(r),
            f"{r['seconds']:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.extend(
        f"\nLandsat: {r['no_data_dates']} date(s) without valid data in the truth, "
        f"{r['no_data_dates_reported_clear']} of them reported clear; "
        f"{r['annotation_empty_dates']} date(s) with valid_fraction 0 in the annotation; "
        f"{r['overcast_dates']} overcast date(s) (< {OVERCAST_USABLE_SHARE:.0%} clear "
        f"valid pixels in the truth), {r['overcast_dates_reported_mostly_clear']} of them "
        "reported mostly clear."
        for r in rows
        if "no_data_dates" in r
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ports", help="comma-separated port names (default: all)")
    parser.add_argument("--dates", type=int, default=DEFAULT_DATES, help="dates per port (12)")
    parser.add_argument("--seed", type=int, default=0, help="stack seed (0)")
    parser.add_argument(
        "--max-side",
        type=int,
        default=DEFAULT_MAX_SIDE,
        help="crop ports larger than this to the max-side x max-side window with the most ships "
        "(default 0: no crop)",
    )
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="cache folder")
    parser.add_argument("--workers", type=int, default=2, help="Dask threads (2)")
    parser.add_argument(
        "--reference", default="auto", help="reference passed to annotate (default: auto)"
    )
    parser.add_argument("--no-demo", action="store_true", help="skip the demo harbour")
    parser.add_argument("--no-landsat", action="store_true", help="skip the Landsat stack")
    parser.add_argument("--json", type=Path, help="write all scores here")
    args = parser.parse_args(argv)

    data = shared_data_dir()
    ports = port_dirs(data)
    names = list(ports) if args.ports is None else [p.strip() for p in args.ports.split(",")]
    unknown = [n for n in names if n not in ports]
    if unknown:
        print(f"unknown port(s) {unknown}; available: {list(ports)} in {data}", file=sys.stderr)
        return 2
    args.workdir.mkdir(parents=True, exist_ok=True)
    global REFERENCE
    REFERENCE = args.reference
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    # Threads, no cluster: the numbers are the library's, not a scheduler's.
    with dask.config.set(scheduler="threads", num_workers=args.workers):
        for name in names:
            rows.append(run_port(name, ports[name], args))
            print(f"{rows[-1]['data set']}: F1 {_fmt(rows[-1]['f1'])}", file=sys.stderr)
        if not args.no_demo:
            rows.append(run_demo(args))
        landsat = data / LANDSAT
        if not args.no_landsat and landsat.is_dir():
            rows.append(run_landsat(landsat, args))
    print(markdown(rows))
    print(f"\ntotal {time.perf_counter() - started:.0f} s (stacks cached in {args.workdir})")
    if args.json is not None:
        args.json.write_text(json.dumps(json_safe(rows), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
