"""The ``spoc-xr`` command line: thin wrappers over the library's functions."""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from spoc_xr import __version__
from spoc_xr.errors import SpocError

DEFAULT_DEMO_DIR = "demo_output"


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


def _store_arg(value: str) -> Path | str:
    """A store argument: fsspec URLs (``s3://...``) stay strings, anything else is a path."""
    from spoc_xr.store import is_url

    return value if is_url(value) else Path(value)


def _storage_option(value: str) -> tuple[str, Any]:
    """``KEY=VALUE`` of ``--storage-option``; VALUE is read as JSON when it parses (true, 3)."""
    import json

    key, sep, raw = value.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{value!r} is not KEY=VALUE (e.g. anon=true)")
    try:
        parsed: Any = json.loads(raw)
    except ValueError:
        parsed = raw
    return key, parsed


def _add_storage_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--storage-option",
        dest="storage_options",
        metavar="KEY=VALUE",
        type=_storage_option,
        action="append",
        default=[],
        help="fsspec option for URL stores (s3://...), repeatable; a dotted KEY nests "
        "(client_kwargs.endpoint_url=http://...). S3 credentials come from the AWS_* variables",
    )


def _storage(args: argparse.Namespace) -> dict[str, Any] | None:
    options: dict[str, Any] = {}
    for key, value in getattr(args, "storage_options", []):
        *parents, leaf = key.split(".")
        level = options
        for parent in parents:
            level = level.setdefault(parent, {})
        level[leaf] = value
    return options or None


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


def _parse_levels(value: str | None) -> tuple[float, ...]:
    if value is None:
        return ()
    try:
        return tuple(float(part) for part in value.split(","))
    except ValueError as err:
        from spoc_xr.errors import ParameterError

        raise ParameterError(
            f"--zero-level {value!r} is not a number or a comma-separated list of numbers (one "
            "per band); pass e.g. 1000 or 1000,1000,1000,1000"
        ) from err


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
    ingest.add_argument(
        "stack",
        type=_store_arg,
        help="output Zarr store, e.g. stack.zarr or s3://bucket/stack.zarr",
    )
    ingest.add_argument(
        "--chunks",
        type=_parse_size,
        default=None,
        help="spatial tile size in px (1024; an append keeps the store's)",
    )
    ingest.add_argument("--overwrite", action="store_true", help="replace an existing store")
    ingest.add_argument(
        "--append",
        action="store_true",
        help="add the GeoTIFFs not yet in STACK (later dates only) to an existing store",
    )
    ingest.add_argument(
        "--band-names",
        metavar="NAME,NAME,...",
        help="name the bands, in file order, in place of the files' band descriptions, e.g. "
        "blue,green,red,nir,swir1,swir2 for Landsat SR_B2..SR_B7 (detection finds the green, NIR "
        "and SWIR bands by name)",
    )
    _add_storage_options(ingest)
    _add_cluster_options(ingest)

    annotate = commands.add_parser(
        "annotate",
        help="time stack -> mask cube, heatmap, reference",
        description="Compare every date with a clean reference and write the mask cube "
        "(0 clear, 1 small object, 2 large object), the heatmap of small objects on water and the "
        "reference to a Zarr store.",
    )
    annotate.add_argument(
        "stack", type=_store_arg, help="input Zarr store (path or URL) from 'spoc-xr ingest'"
    )
    annotate.add_argument(
        "output", type=_store_arg, help="output Zarr store, e.g. out.zarr or s3://bucket/out.zarr"
    )
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
    annotate.add_argument(
        "--open-size",
        type=_parse_size,
        metavar="PX",
        help="odd side of the opening (and closing) that tells small objects from large ones "
        "(15: 150 m at 10 m pixels; a note suggests sizes for finer pixels)",
    )
    annotate.add_argument(
        "--background-size",
        type=_parse_size,
        metavar="PX",
        help="odd side of the local background window of small objects (31: a ship covers "
        "less than half of it)",
    )
    annotate.add_argument(
        "--zero-level",
        metavar="VALUE",
        help="stored value of zero reflectance, one for all bands or one per band (0): 1000 for "
        "Sentinel-2 L2A from processing baseline 04.00 (January 2022) on unless harmonised, 7273 "
        "for Landsat Collection 2 Level-2; detection's gains and colour tests are ratios",
    )
    annotate.add_argument("--overwrite", action="store_true", help="replace an existing store")
    annotate.add_argument(
        "--no-report",
        action="store_true",
        help="skip the PNGs and report.html written to OUTPUT_report/ next to the store (for a "
        "URL output: in the current folder)",
    )
    _add_storage_options(annotate)
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

    objects = commands.add_parser(
        "objects",
        help="mask cube -> table of objects (GeoParquet)",
        description="Label the objects of every date of an annotation store and write one row "
        "per object (class, boxes, centroid, size, band means, on_water, outline) as GeoParquet.",
    )
    objects.add_argument("annotations", type=Path, help="annotation store from 'annotate'")
    objects.add_argument("objects", type=Path, help="output GeoParquet, e.g. objects.parquet")
    objects.add_argument(
        "--stack", type=Path, help="stack store the annotation was made from (adds band means)"
    )
    objects.add_argument(
        "--geojson", action="store_true", help="also write OBJECTS.geojson (WGS 84)"
    )
    objects.add_argument("--overwrite", action="store_true", help="replace existing files")
    _add_cluster_options(objects)

    chips = commands.add_parser(
        "export-chips",
        help="stack + mask cube -> training chips, masks and COCO JSON",
        description="Cut georeferenced image chips with their masks, split train/val/test by "
        "spatial blocks, add negatives and cut-and-paste augmentation (see spoc_xr.export).",
    )
    chips.add_argument("stack", type=Path, help="stack store from 'ingest'")
    chips.add_argument("annotations", type=Path, help="annotation store from 'annotate'")
    chips.add_argument("dest", type=Path, help="output folder")
    chips.add_argument("--size", type=_parse_size, default=256, help="chip side in px (256)")
    chips.add_argument("--format", choices=["coco", "masks"], default="coco", help="(coco)")
    chips.add_argument(
        "--split", default="0.7,0.15,0.15", help="train,val,test shares (0.7,0.15,0.15)"
    )
    chips.add_argument(
        "--negatives", type=float, default=0.2, help="share of chips without objects (0.2)"
    )
    chips.add_argument(
        "--augment",
        type=_parse_size,
        default=0,
        help="pasted copies of every small train object, up to 8 per augmented chip (0)",
    )
    chips.add_argument("--block", type=_parse_size, default=4, help="split block side in chips (4)")
    chips.add_argument("--seed", type=int, default=0, help="random seed (0)")
    chips.add_argument("--overwrite", action="store_true", help="replace an existing export")
    _add_cluster_options(chips)

    demo = commands.add_parser(
        "demo",
        help="synthetic harbour -> ingest -> annotate -> evaluate",
        description="Generate a synthetic harbour time stack with exact truth, run the whole "
        "pipeline on a local Dask cluster and print a summary.",
    )
    demo.add_argument(
        "out_dir",
        nargs="?",
        type=Path,
        default=Path(DEFAULT_DEMO_DIR),
        help=f"folder for the images, stores, report and scores ({DEFAULT_DEMO_DIR})",
    )
    demo.add_argument("--dates", type=_parse_size, default=16, help="number of dates (16)")
    demo.add_argument("--size", type=_parse_size, default=512, help="image side in px (512)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (0)")
    demo.add_argument("--overwrite", action="store_true", help="replace an existing demo folder")
    _add_cluster_options(demo)

    synth = commands.add_parser(
        "synth",
        help="write a test stack with truth: semi-real port or synthetic harbour",
        description="Write dated GeoTIFFs (the input of 'ingest') and a truth store (the input of "
        "'evaluate'): 'ports' builds a semi-real stack from a real Sentinel-2 port scene with "
        "labelled ships (see spoc_xr.ports), 'harbour' a fully synthetic harbour.",
    )
    kinds = synth.add_subparsers(dest="kind", metavar="KIND", required=True)
    synth_ports = kinds.add_parser(
        "ports",
        help="semi-real stack from a real port scene",
        description="Real scene as one date, ships removed for the others, real ships from other "
        "ports pasted on open water, moored ships kept, illumination, noise, shifts, clouds.",
    )
    synth_ports.add_argument(
        "port", help="port name of the shared data (e.g. busan) or a port folder"
    )
    synth_ports.add_argument("out_dir", type=Path, help="output folder")
    synth_ports.add_argument("--dates", type=_parse_size, default=12, help="number of dates (12)")
    synth_ports.add_argument(
        "--crop", type=_parse_size, help="use only the N x N window holding the most ships"
    )
    synth_ports.add_argument("--seed", type=int, default=0, help="random seed (0)")
    synth_ports.add_argument("--overwrite", action="store_true", help="replace an earlier stack")
    synth_harbour = kinds.add_parser(
        "harbour",
        help="fully synthetic harbour stack",
        description="A synthetic harbour with exact truth (spoc_xr.synthetic.make_harbour).",
    )
    synth_harbour.add_argument("out_dir", type=Path, help="output folder")
    synth_harbour.add_argument("--dates", type=_parse_size, default=16, help="number of dates (16)")
    synth_harbour.add_argument("--size", type=_parse_size, default=512, help="image side (512)")
    synth_harbour.add_argument("--seed", type=int, default=0, help="random seed (0)")
    synth_harbour.add_argument("--overwrite", action="store_true", help="replace an earlier stack")
    return parser


def _note_skipped_subfolders(src_dir: Path) -> None:
    from spoc_xr.ingest import find_geotiffs, geotiffs_in_subfolders

    try:
        find_geotiffs(src_dir)
    except SpocError:
        return  # the folder is refused below, and the refusal names them
    nested = geotiffs_in_subfolders(src_dir)
    if nested:
        print(
            f"note: {len(nested)} GeoTIFF(s) in sub-folders of {src_dir} (e.g. {nested[0]}) are "
            "not read: sub-folders are not searched"
        )


def run_ingest(args: argparse.Namespace) -> None:
    from spoc_xr.ingest import DEFAULT_CHUNKS, ingest, open_geotiffs, scale_offset_note
    from spoc_xr.store import check_output_path

    _note_skipped_subfolders(args.src_dir)
    declared = scale_offset_note(args.src_dir)
    if declared:
        print(f"note: {declared}")
    storage_options = _storage(args)
    args.chunks_given = args.chunks is not None
    if args.chunks is None:
        args.chunks = DEFAULT_CHUNKS
    if isinstance(args.stack, Path):
        run_ingest_resumable(args)
        return
    if args.append:
        raise SpocError("--append works on local stores only; pass a local STACK path")
    check_output_path(
        args.stack,
        inputs=[args.src_dir],
        overwrite=args.overwrite,
        storage_options=storage_options,
        kind="stack",
    )
    # Validates every file before any output.
    open_geotiffs(args.src_dir, chunks=args.chunks, band_names=args.band_names)
    with _client(args):
        started = time.perf_counter()
        stack = ingest(
            args.src_dir,
            args.stack,
            chunks=args.chunks,
            overwrite=args.overwrite,
            progress=True,
            storage_options=storage_options,
            band_names=args.band_names,
        )
    print(
        f"ingested {stack.sizes['time']} dates x {stack.sizes['band']} bands "
        f"({', '.join(map(str, stack.band.values))}) of {stack.sizes['y']} x {stack.sizes['x']} px "
        f"into {args.stack} in {time.perf_counter() - started:.1f} s"
    )


def run_ingest_resumable(args: argparse.Namespace) -> None:
    """``ingest`` into a local store: resumable after a kill, idempotent, appendable."""
    from spoc_xr.ingest import ingest_store, open_geotiffs, open_stack

    if not args.append:
        # Validates every file before any output.
        open_geotiffs(args.src_dir, chunks=args.chunks, band_names=args.band_names)
    before = 0
    if args.append:
        with contextlib.suppress(SpocError):  # ingest_store says what is wrong with the store
            stored = open_stack(args.stack)
            before = stored.sizes["time"]
            side = int(stored.data.chunksize[-1])
            if args.chunks_given and args.chunks != side:
                print(
                    f"note: --chunks {args.chunks} is not used: appended dates keep the store's "
                    f"{side} px tiles (re-create the store with --overwrite to change them)"
                )
    with _client(args):
        started = time.perf_counter()
        status = ingest_store(
            args.src_dir,
            args.stack,
            chunks=args.chunks,
            overwrite=args.overwrite,
            append=args.append,
            progress=True,
            band_names=args.band_names,
        )
    if status == "complete":
        print(f"{args.stack} is already complete: nothing to do (pass --overwrite to redo it)")
        return
    stack = open_stack(args.stack)
    count = f"{stack.sizes['time']} dates"
    if status == "appended":
        count = f"{stack.sizes['time'] - before} dates (now {stack.sizes['time']})"
    print(
        f"{status} {count} x {stack.sizes['band']} bands "
        f"({', '.join(map(str, stack.band.values))}) of {stack.sizes['y']} x {stack.sizes['x']} px "
        f"into {args.stack} in {time.perf_counter() - started:.1f} s"
    )


def run_annotate(args: argparse.Namespace) -> None:
    from spoc_xr.detect import DetectParams, parse_threshold
    from spoc_xr.ingest import open_stack, read_overview
    from spoc_xr.pipeline import annotate
    from spoc_xr.store import check_output_path

    sizes: dict[str, int] = {}
    if args.open_size is not None:
        sizes.update(open_size=args.open_size, close_size=args.open_size)
    if args.background_size is not None:
        sizes["background_size"] = args.background_size
    params = DetectParams(
        kernel=args.kernel,
        threshold=parse_threshold(args.threshold),
        zero_level=_parse_levels(args.zero_level),
        **sizes,
    )
    storage_options = _storage(args)
    if isinstance(args.output, Path) and isinstance(args.stack, Path):
        run_annotate_resumable(args, params)
        return
    check_output_path(
        args.output,
        inputs=[args.stack],
        overwrite=args.overwrite,
        storage_options=storage_options,
        kind="annotations",
    )
    report_dir = None
    if args.no_report:
        _remove_stale_report(args)
    else:
        from spoc_xr.report import check_report_dir, report_dir_for

        local = [item for item in (args.stack, args.output) if isinstance(item, Path)]
        # A URL store gets its report in the current folder: figures are local files.
        next_to = args.output if isinstance(args.output, Path) else args.output.rsplit("/", 1)[-1]
        report_dir = check_report_dir(
            report_dir_for(next_to), inputs=local, overwrite=args.overwrite
        )
    stack = open_stack(args.stack, storage_options=storage_options)
    with _client(args):
        started = time.perf_counter()
        overview = read_overview(args.stack, stack, storage_options=storage_options)
        result = annotate(stack, reference=args.reference, params=params, overview=overview)
        write_annotations(
            result, args.output, overwrite=args.overwrite, storage_options=storage_options
        )
        summary = describe_annotations(result, args.output, time.perf_counter() - started)
        if report_dir is not None:
            from spoc_xr.report import write_report
            from spoc_xr.store import open_store

            # Figures read the written store back: the lazy result would recompute detection.
            written = open_store(args.output, kind="annotations", storage_options=storage_options)
            summary += f"\nreport: {write_report(written, stack, report_dir)}"
    print(summary)


def _remove_stale_report(args: argparse.Namespace) -> None:
    """With ``--overwrite --no-report``, the report of the store being replaced goes too."""
    if not args.overwrite or not isinstance(args.output, Path):
        return
    from spoc_xr.report import remove_stale_report, report_dir_for

    if remove_stale_report(report_dir_for(args.output)):
        print(f"removed the replaced store's report from {report_dir_for(args.output)}")


def run_annotate_resumable(args: argparse.Namespace, params: Any) -> None:
    """``annotate`` into a local store: resumable after a kill, idempotent, appendable."""
    from spoc_xr.ingest import open_stack, read_overview
    from spoc_xr.pipeline import annotate_store, check_annotation_parameters
    from spoc_xr.store import check_output_path, open_store

    # Input collisions only: an existing output is resumed, extended or refused by annotate_store.
    check_output_path(args.output, inputs=[args.stack], overwrite=True, kind="annotations")
    report_dir = None
    if args.no_report:
        _remove_stale_report(args)
    else:
        from spoc_xr.report import check_report_dir, report_dir_for

        report_dir = check_report_dir(
            report_dir_for(args.output),
            inputs=[args.stack, args.output],
            # A resumed or extended store gets its report redone.
            overwrite=args.overwrite or args.output.exists(),
        )
    stack = open_stack(args.stack)
    check_annotation_parameters(stack, reference=args.reference, params=params)
    with _client(args):
        started = time.perf_counter()
        status = annotate_store(
            stack,
            args.output,
            reference=args.reference,
            params=params,
            overwrite=args.overwrite,
            source=args.stack,
            progress=True,
            overview=read_overview(args.stack, stack),
        )
        if status == "complete":
            print(f"{args.output} is already complete: nothing to do (pass --overwrite to redo it)")
            return
        written = open_store(args.output, kind="annotations")
        summary = describe_annotations(written, args.output, time.perf_counter() - started)
        if status != "written":
            summary = f"{status}: " + summary
        if report_dir is not None:
            from spoc_xr.report import write_report

            summary += f"\nreport: {write_report(written, stack, report_dir)}"
    print(summary)


def write_annotations(
    result: Any,
    output: Path | str,
    *,
    overwrite: bool,
    storage_options: dict[str, Any] | None = None,
) -> None:
    """Write an annotation Dataset (to a path or URL) with progress and a completion marker."""
    from spoc_xr.store import write_dataset

    write_dataset(
        result, output, overwrite=overwrite, progress=True, storage_options=storage_options
    )


def describe_annotations(result: Any, output: Path | str, seconds: float) -> str:
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
        )
        + (f"; {info['reference_choice']}" if info.get("reference_choice") else ""),
        f"water index: {info['water_index_description']}",
        f"threshold: {info['parameters']['threshold']} "
        f"({info['parameters']['effective_threshold']:g} noise scales), "
        f"kernel {info['parameters']['kernel']}, open {info['parameters']['open_size']} px, "
        f"background {info['parameters']['background_size']} px"
        + (
            f", zero level {info['parameters']['zero_level']}"
            if info["parameters"].get("zero_level")
            else ""
        ),
        f"mean share of small-object pixels {np.nanmean(fractions.small_fraction.values):.3%}, "
        f"large {np.nanmean(fractions.large_fraction.values):.2%}",
    ]
    if empty:
        lines.append(f"{empty} date(s) hold no valid data and were not annotated (valid = 0)")
    from spoc_xr.pipeline import shift_notes

    lines += [f"note: {note}" for note in [*info.get("notes", []), *shift_notes(result)]]
    return "\n".join(lines)


def run_evaluate(args: argparse.Namespace) -> None:
    from spoc_xr.evaluate import evaluate, write_scores
    from spoc_xr.store import check_output_path
    from spoc_xr.synthetic import read_truth

    if args.json is not None:
        check_output_path(
            args.json, inputs=[args.annotations, args.truth], overwrite=args.overwrite, kind="file"
        )
    from spoc_xr.objects import open_annotation_store

    annotations = open_annotation_store(args.annotations)
    scores = evaluate(annotations, read_truth(args.truth))
    print(scores.table())
    if args.json is not None:
        write_scores(scores, args.json)
        print(f"scores written to {args.json}")


def run_objects(args: argparse.Namespace) -> None:
    from spoc_xr.objects import check_object_inputs, object_table, objects_outputs, write_objects
    from spoc_xr.store import check_output_path

    inputs = [args.annotations] + ([args.stack] if args.stack is not None else [])
    for output in objects_outputs(args.objects, geojson=args.geojson):
        check_output_path(output, inputs=inputs, overwrite=args.overwrite, kind="file")
    check_object_inputs(args.annotations, stack=args.stack)
    with _client(args):
        table = object_table(args.annotations, stack=args.stack)
    written = write_objects(table, args.objects, geojson=args.geojson, overwrite=args.overwrite)
    boats = int(table["is_boat"].sum()) if len(table) else 0
    print(
        f"{len(table)} objects ({boats} boats) on {table['date'].nunique()} dates -> "
        + ", ".join(map(str, written))
    )
    if args.stack is None:
        print("no --stack given: band means (mean_<band>) left out")


def run_export_chips(args: argparse.Namespace) -> None:
    from spoc_xr.export import check_export_inputs, export_chips

    options = {
        "size": args.size,
        "format": args.format,
        "split": args.split,
        "negatives": args.negatives,
        "augment": args.augment,
        "block": args.block,
        "seed": args.seed,
        "overwrite": args.overwrite,
    }
    check_export_inputs(args.stack, args.annotations, args.dest, **options)
    with _client(args):
        summary = export_chips(args.stack, args.annotations, args.dest, **options)
    print(summary)


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


def run_synth(args: argparse.Namespace) -> None:
    started = time.perf_counter()
    if args.kind == "ports":
        from spoc_xr.ports import make_port_stack

        port = make_port_stack(
            args.port,
            args.out_dir,
            n_dates=args.dates,
            seed=args.seed,
            crop=args.crop,
            overwrite=args.overwrite,
        )
        image_dir, truth, n_dates, n_boats = (
            port.image_dir,
            port.truth_path,
            len(port.dates),
            port.n_boats,
        )
        extra = f"; real scene is date {port.real_index} ({port.n_real_ships} labelled ships)"
    else:
        from spoc_xr.synthetic import make_harbour

        harbour = make_harbour(
            args.out_dir,
            n_dates=args.dates,
            shape=(args.size, args.size),
            seed=args.seed,
            overwrite=args.overwrite,
        )
        image_dir, truth, n_dates, n_boats = (
            harbour.image_dir,
            harbour.truth_path,
            len(harbour.dates),
            harbour.n_boats,
        )
        extra = ""
    print(
        f"wrote {n_dates} dates with {n_boats} boat instances in "
        f"{time.perf_counter() - started:.1f} s{extra}\n"
        f"images: {image_dir}  (spoc-xr ingest {image_dir} stack.zarr)\n"
        f"truth:  {truth}  (spoc-xr evaluate out.zarr {truth})"
    )


COMMANDS = {
    "ingest": run_ingest,
    "annotate": run_annotate,
    "evaluate": run_evaluate,
    "objects": run_objects,
    "export-chips": run_export_chips,
    "demo": run_demo,
    "synth": run_synth,
}


#: Options whose value may start with a minus sign (a wrong share or threshold is then refused
#: by its own check, with its own message).
SIGNED_OPTIONS = ("--split", "--threshold", "--reference")


def _attach_signed_values(argv: Sequence[str]) -> list[str]:
    """``--split -1,1,1`` as ``--split=-1,1,1``: argparse takes a value that starts with a minus
    sign and is no plain number for an option, and says "expected one argument"."""
    tokens = list(argv)
    attached: list[str] = []
    index = 0
    while index < len(tokens):
        token = tokens[index]
        following = tokens[index + 1] if index + 1 < len(tokens) else ""
        if token in SIGNED_OPTIONS and re.match(r"-[\d.]", following):
            attached.append(f"{token}={following}")
            index += 2
        else:
            attached.append(token)
            index += 1
    return attached


def _quiet_unraisable(unraisable: Any) -> None:
    """``sys.unraisablehook`` after an interrupt: exit handlers' errors go unreported."""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``spoc-xr``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(_attach_signed_values(sys.argv[1:] if argv is None else argv))
    try:
        COMMANDS[args.command](args)
    except SpocError as err:
        message = " ".join(str(err).split())
        print(f"spoc-xr {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"spoc-xr {args.command}: interrupted", file=sys.stderr)
        # Interrupted while its local cluster starts, distributed's exit handler still closes
        # the cluster but reports a 30-line AssertionError ("Status.init") as it does: the
        # cleanup runs, its report is not for the user.
        sys.unraisablehook = _quiet_unraisable
        return 130
    except OSError as err:
        # A full disk or a folder that turned read-only mid-run: the system's reason, on one line.
        where = f" ({err.filename})" if getattr(err, "filename", None) else ""
        reason = err.strerror or str(err)
        print(
            f"spoc-xr {args.command}: error: {reason}{where}; check the path, the free space and "
            "the permissions (an unfinished store is resumed by the same command)",
            file=sys.stderr,
        )
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
