"""The built-in example: a synthetic harbour through the whole pipeline, scored on its truth."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from spoc_xr.errors import OutputError


def run_demo(
    out_dir: str | os.PathLike[str],
    *,
    n_dates: int = 16,
    size: int = 512,
    seed: int = 0,
    overwrite: bool = False,
) -> str:
    """Generate a harbour, ingest, annotate and evaluate it; return a printable summary.

    Parameters
    ----------
    out_dir : path
        Folder for everything the demo writes (refused if it exists, unless ``overwrite``).
    n_dates, size, seed : int
        Scene size and random seed.
    overwrite : bool
        Replace an existing ``out_dir``.

    Examples
    --------
    >>> print(run_demo("demo_out", n_dates=8, size=256))  # doctest: +SKIP
    """
    from spoc_xr.cli import describe_annotations
    from spoc_xr.evaluate import evaluate, write_scores
    from spoc_xr.ingest import ingest, read_overview
    from spoc_xr.pipeline import annotate
    from spoc_xr.store import open_store, write_dataset
    from spoc_xr.synthetic import make_harbour, read_truth

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise OutputError(
                f"demo folder {str(out)!r} exists and is not empty; pass --overwrite to replace "
                "it or name another folder"
            )
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    scene = make_harbour(out / "scene", n_dates=n_dates, shape=(size, size), seed=seed)
    stack_path, annotations_path = out / "stack.zarr", out / "annotations.zarr"
    stack = ingest(scene.image_dir, stack_path, chunks=256, progress=True)
    result = annotate(stack, overview=read_overview(stack_path, stack))
    write_dataset(result, annotations_path, overwrite=False, progress=True)
    elapsed = time.perf_counter() - started
    scores = evaluate(open_store(annotations_path), read_truth(scene.truth_path))
    write_scores(scores, out / "scores.json")
    n_objects = sum(row.predicted_boats for row in scores.dates)
    n_true = sum(row.true_boats for row in scores.dates)
    lines = [
        f"spoc-xr demo: synthetic harbour, {len(scene.dates)} dates "
        f"({str(scene.dates[0])[:10]} .. {str(scene.dates[-1])[:10]}), {size} x {size} px, "
        f"seed {seed}",
        describe_annotations(result, annotations_path, elapsed),
        f"boats on water: {n_objects} predicted, {n_true} true (outside clouds)",
        # The evaluation's own summary line (boats, clouds, heatmap, shifts).
        scores.table().splitlines()[-1],
        "files:",
        f"  images  {scene.image_dir}",
        f"  truth   {scene.truth_path}",
        f"  stack   {stack_path}",
        f"  output  {annotations_path}  (mask, valid, heatmap, reference, water, misregistration)",
        f"  scores  {out / 'scores.json'}",
    ]
    return "\n".join(lines)
