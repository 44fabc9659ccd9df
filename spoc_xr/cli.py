"""The ``spoc-xr`` command line: thin wrappers over the library's functions."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from spoc_xr import __version__
from spoc_xr.errors import SpocError

DEFAULT_DEMO_DIR = "spoc_xr_demo"


def _add_cluster_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("where it runs")
    group.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help="address of an existing Dask scheduler (default: $SPOC_XR_SCHEDULER, else a local "
        "cluster)",
    )
    group.add_argument("--workers", type=int, help="workers of the local cluster")
    group.add_argument("--memory-limit", help="memory limit per local worker, e.g. 2GB")


def _client(args: argparse.Namespace, *, quiet: bool = False) -> Any:
    from spoc_xr.cluster import dask_client

    return dask_client(
        scheduler=args.scheduler,
        workers=args.workers,
        memory_limit=args.memory_limit,
        quiet=quiet,
    )


def _parse_size(value: str) -> int:
    try:
        number = int(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from err
    return number


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``spoc-xr`` (exposed for documentation and tests)."""
    parser = argparse.ArgumentParser(
        prog="spoc-xr",
        description="Annotate satellite image time stacks without hand labelling.",
    )
    parser.add_argument("--version", action="version", version=f"spoc-xr {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    ingest = commands.add_parser(
        "ingest",
        help="dated GeoTIFFs -> Zarr time stack",
        description="Read one GeoTIFF per date (the date comes from the file name) into a Zarr v3 "
        "time stack (time, band, y, x), georeferenced and chunked one date at a time.",
    )
    ingest.add_argument("src_dir", type=Path, help="folder with one GeoTIFF per date")
    ingest.add_argument("stack", type=Path, help="output Zarr store, e.g. stack.zarr")
    ingest.add_argument(
        "--chunks", type=_parse_size, default=1024, help="spatial tile size in px (1024)"
    )
    ingest.add_argument("--overwrite", action="store_true", help="replace an existing store")
    _add_cluster_options(ingest)

    annotate = commands.add_parser(
        "annotate",
        help="time stack -> mask cube, heatmap, reference",
        description="Compare every date with a clean reference and write the mask cube "
        "(0 clear, 1 small object, 2 large object), the heatmap of small objects on water and the "
        "reference to a Zarr store.",
    )
    annotate.add_argument("stack", type=Path, help="input Zarr store from 'spoc-xr ingest'")
    annotate.add_argument("output", type=Path, help="output Zarr store, e.g. out.zarr")
    annotate.add_argument(
        "--reference",
        default="auto",
        help="auto (cleanest date), median (per-pixel temporal median) or a date (auto)",
    )
    annotate.add_argument(
        "--kernel", type=_parse_size, default=5, help="k of the k x k median filter (5)"
    )
    annotate.add_argument(
        "--threshold", default="auto", help="change threshold in noise scales, or auto"
    )
    annotate.add_argument("--overwrite", action="store_true", help="replace an existing store")
    _add_cluster_options(annotate)

    evaluate = commands.add_parser(
        "evaluate",
        help="score an annotation against truth masks",
        description="Object-level boat precision/recall/F1, cloud IoU and heatmap correlation of "
        "an annotation store against truth masks (see spoc_xr.evaluate for the truth format).",
    )
    evaluate.add_argument("annotations", type=Path, help="annotation store from 'annotate'")
    evaluate.add_argument("truth", type=Path, help="truth Zarr store or .npz")
    evaluate.add_argument("--json", type=Path, help="write the scores here (default: print only)")
    evaluate.add_argument("--overwrite", action="store_true", help="replace an existing JSON")

    demo = commands.add_parser(
        "demo",
        help="synthetic harbour -> ingest -> annotate -> evaluate",
        description="Generate a synthetic harbour time stack with exact truth, run the whole "
        "pipeline on a local Dask cluster and print a summary.",
    )
    demo.add_argument("out_dir", nargs="?", type=Path, default=Path(DEFAULT_DEMO_DIR))
    demo.add_argument("--dates", type=_parse_size, default=16, help="number of dates (16)")
    demo.add_argument("--size", type=_parse_size, default=512, help="image side in px (512)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (0)")
    demo.add_argument("--overwrite", action="store_true", help="replace an existing demo folder")
    _add_cluster_options(demo)
    return parser


def run_ingest(args: argparse.Namespace) -> None:
    from spoc_xr.ingest import ingest, open_geotiffs
    from spoc_xr.store import check_output_path

    check_output_path(args.stack, inputs=[args.src_dir], overwrite=args.overwrite)
    open_geotiffs(args.src_dir, chunks=args.chunks)  # validates every file before any output
    with _client(args):
        started = time.perf_counter()
        stack = ingest(
            args.src_dir, args.stack, chunks=args.chunks, overwrite=args.overwrite, progress=True
        )
    print(
        f"ingested {stack.sizes['time']} dates x {stack.sizes['band']} bands "
        f"({', '.join(map(str, stack.band.values))}) of {stack.sizes['y']} x {stack.sizes['x']} px "
        f"into {args.stack} in {time.perf_counter() - started:.1f} s"
    )


def run_annotate(args: argparse.Namespace) -> None:
    from spoc_xr.detect import DetectParams, parse_threshold
    from spoc_xr.ingest import open_stack
    from spoc_xr.pipeline import annotate
    from spoc_xr.store import check_output_path

    params = DetectParams(kernel=args.kernel, threshold=parse_threshold(args.threshold))
    check_output_path(args.output, inputs=[args.stack], overwrite=args.overwrite)
    stack = open_stack(args.stack)
    with _client(args):
        started = time.perf_counter()
        result = annotate(stack, reference=args.reference, params=params)
        write_annotations(result, args.output, overwrite=args.overwrite)
        summary = describe_annotations(result, args.output, time.perf_counter() - started)
    print(summary)


def write_annotations(result: Any, output: Path, *, overwrite: bool) -> None:
    """Write an annotation Dataset with progress and a completion marker."""
    from spoc_xr.store import write_dataset

    write_dataset(result, output, overwrite=overwrite, progress=True)


def describe_annotations(result: Any, output: Path, seconds: float) -> str:
    """A short multi-line summary of a written annotation."""
    import numpy as np

    info = result.attrs["spoc_xr"]
    fractions = result[["valid_fraction", "small_fraction", "large_fraction"]].compute()
    empty = int((fractions.valid_fraction.values == 0).sum())
    lines = [
        f"annotated {result.sizes['time']} dates of {result.sizes['y']} x {result.sizes['x']} px "
        f"in {seconds:.1f} s -> {output}",
        f"reference: {info['reference']}"
        + (
            f" ({result.reference.attrs.get('date', '')})"
            if info["reference_index"] is not None
            else ""
        ),
        f"water index: {info['water_index_description']}",
        f"threshold: {info['parameters']['threshold']} "
        f"({info['parameters']['effective_threshold']:g} noise scales), "
        f"kernel {info['parameters']['kernel']}",
        f"mean share of small-object pixels {np.nanmean(fractions.small_fraction.values):.3%}, "
        f"large {np.nanmean(fractions.large_fraction.values):.2%}",
    ]
    if empty:
        lines.append(f"{empty} date(s) hold no valid data and were not annotated (valid = 0)")
    return "\n".join(lines)


def run_evaluate(args: argparse.Namespace) -> None:
    from spoc_xr.evaluate import evaluate, read_truth, write_scores
    from spoc_xr.store import check_output_path

    if args.json is not None:
        check_output_path(
            args.json, inputs=[args.annotations, args.truth], overwrite=args.overwrite
        )
    annotations = _open_annotations(args.annotations)
    scores = evaluate(annotations, read_truth(args.truth))
    print(scores.table())
    if args.json is not None:
        write_scores(scores, args.json)
        print(f"scores written to {args.json}")


def _open_annotations(path: Path) -> Any:
    import xarray as xr

    from spoc_xr.errors import InputError

    if not path.exists():
        raise InputError(f"annotation store {str(path)!r} does not exist; run spoc-xr annotate")
    dataset = xr.open_zarr(path)
    if "mask" not in dataset:
        raise InputError(f"{str(path)!r} holds no 'mask': pass a store written by spoc-xr annotate")
    return dataset


def run_demo(args: argparse.Namespace) -> None:
    from spoc_xr.demo import run_demo as demo

    with _client(args):
        summary = demo(
            args.out_dir,
            n_dates=args.dates,
            size=args.size,
            seed=args.seed,
            overwrite=args.overwrite,
        )
    print(summary)


COMMANDS = {
    "ingest": run_ingest,
    "annotate": run_annotate,
    "evaluate": run_evaluate,
    "demo": run_demo,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``spoc-xr``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except SpocError as err:
        message = " ".join(str(err).split())
        print(f"spoc-xr {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"spoc-xr {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
