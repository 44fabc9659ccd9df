"""Scores of an annotation against truth masks.

Truth format (written by :func:`spoc_xr.synthetic.write_truth`, read by
:func:`spoc_xr.synthetic.read_truth` from Zarr or ``.npz``):

- ``boats`` ``(time, y, x)`` int: instance labels, 0 background, one positive id per boat per date;
- ``clouds`` ``(time, y, x)`` uint8/bool: 1 where cloud or cloud shadow;
- ``water`` ``(y, x)`` (optional, not used for scoring);
- ``misregistration`` ``(time, axis)`` float (optional): each date's true shift ``(dy, dx)`` in
  pixels, as :func:`scipy.ndimage.shift` moves the scene;
- ``time`` coordinate: the dates, matched to the annotation's dates (a truth date without an
  exact match takes the acquisitions of its day; dates missing on either side are not scored);
- ``y``/``x`` coordinates (optional): the grid's; a truth stored the other way up is turned round,
  one of another place is refused. Without them the truth is matched by array position.

Scores:

- boats, object level: predicted boats are the connected components (8-connectivity) of the small
  class that lie mostly on water (all small components when the stack had no water index). A true
  boat is found when a predicted boat touches it (overlaps it or a pixel next to it). Precision is
  the share of predicted boats that touch a true boat. Boats and predictions touching truth clouds
  are not scored, nor are pixels without valid data.
- clouds: pixel IoU of the large class with truth clouds, over valid pixels of all scored dates.
- heatmap: Pearson correlation of the annotation's heatmap with the count of true boat pixels per
  pixel over the scored dates.
- shifts (when both the truth and the annotation hold ``misregistration``): the distance (px)
  between each measured shift and the true one, after removing the reference's own offset (the
  median over measured dates of true minus measured, per axis: a reference built from several
  dates sits where they do on average); its mean over measured dates, and how many dates were
  measured (the others are NaN in the annotation and were compared with the whole tolerance
  window).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from spoc_xr import kernels
from spoc_xr.detect import LARGE, SMALL
from spoc_xr.errors import InputError
from spoc_xr.reference import MISREGISTRATION

# A small component is a boat when more than this share of its pixels lies on water (a 2 px
# component half on a pier edge is no boat: demo seeds 0-3 F1 0.859/0.866/0.892/0.805 with "at
# least half", 0.868/0.875/0.894/0.811 with "more than half", ports within 0.001).
ON_WATER_SHARE = 0.5


@dataclass
class DateScore:
    """Counts for one date."""

    date: str
    true_boats: int = 0
    found_boats: int = 0
    predicted_boats: int = 0
    correct_predictions: int = 0
    cloud_intersection: int = 0
    cloud_union: int = 0
    shift_error: float = float("nan")


@dataclass
class Scores:
    """Scores over all matched dates (see the module docstring for definitions)."""

    precision: float
    recall: float
    f1: float
    cloud_iou: float
    heatmap_correlation: float
    dates: list[DateScore] = field(default_factory=list)
    #: Mean distance (px) of measured shifts from the true ones; NaN without shifts on both sides.
    shift_error: float = float("nan")
    #: Dates whose shift was measured, and dates whose true shift is known.
    shifts_measured: int = 0
    shifts_known: int = 0

    def as_dict(self) -> dict[str, object]:
        """JSON-ready dictionary."""
        return asdict(self)

    def table(self) -> str:
        """A plain-text table, one row per date and a total row."""
        lines = [
            f"{'date':<20}{'true':>6}{'found':>7}{'pred':>6}{'correct':>9}{'cloud IoU':>11}",
        ]
        for row in self.dates:
            iou = row.cloud_intersection / row.cloud_union if row.cloud_union else float("nan")
            lines.append(
                f"{row.date:<20}{row.true_boats:>6}{row.found_boats:>7}{row.predicted_boats:>6}"
                f"{row.correct_predictions:>9}{iou:>11.3f}"
            )
        summary = (
            f"boats: precision {self.precision:.3f}  recall {self.recall:.3f}  "
            f"F1 {self.f1:.3f}  |  cloud IoU {self.cloud_iou:.3f}  |  "
            f"heatmap correlation {self.heatmap_correlation:.3f}"
        )
        if self.shifts_known:
            summary += (
                f"  |  shift error {self.shift_error:.3f} px ({self.shifts_measured} of "
                f"{self.shifts_known} dates measured)"
            )
        lines.append(summary)
        return "\n".join(lines)


def boat_components(
    small: np.ndarray, water: np.ndarray | None
) -> tuple[np.ndarray, int, np.ndarray]:
    """Label small-object components and tell which are boats (mostly on water).

    Returns the labels, their count and a boolean array ``is_boat[label]`` (index 0 unused).
    """
    labels, count = kernels.label(small, connectivity=8)
    if water is None or count == 0:
        return labels, count, np.ones(count + 1, dtype=bool)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    wet = np.bincount(labels.ravel(), weights=water.ravel().astype(np.float64), minlength=count + 1)
    share = wet / np.maximum(sizes, 1)
    return labels, count, share > ON_WATER_SHARE


def score_date(
    date: str,
    mask: np.ndarray,
    valid: np.ndarray,
    boats: np.ndarray,
    clouds: np.ndarray,
    water: np.ndarray | None,
) -> DateScore:
    """Object and pixel counts for one date (see the module docstring)."""
    row = DateScore(date=date)
    clouds = clouds.astype(bool)
    labels, count, is_boat = boat_components(mask == SMALL, water)
    predicted = np.isin(labels, np.flatnonzero(is_boat)) & (labels > 0)
    # "Touch" tolerates the one-pixel offsets that rounding of sub-pixel shifts produces.
    near_truth = kernels.binary_dilation(boats > 0, 3)
    near_prediction = kernels.binary_dilation(predicted, 3)
    under_cloud_truth = np.unique(boats[clouds & (boats > 0)])
    for boat_id in np.unique(boats[boats > 0]):
        if boat_id in under_cloud_truth:
            continue
        pixels = boats == boat_id
        if not valid[pixels].any():
            continue
        row.true_boats += 1
        row.found_boats += bool(near_prediction[pixels].any())
    touches_cloud = np.zeros(count + 1, dtype=bool)
    touches_cloud[np.unique(labels[clouds & (labels > 0)])] = True
    correct = np.zeros(count + 1, dtype=bool)
    correct[np.unique(labels[near_truth & (labels > 0)])] = True
    scored = is_boat & ~touches_cloud
    scored[0] = False
    row.predicted_boats = int(scored.sum())
    row.correct_predictions = int((scored & correct).sum())
    large = (mask == LARGE) & valid.astype(bool)
    truth_clouds = clouds & valid.astype(bool)
    row.cloud_intersection = int((large & truth_clouds).sum())
    row.cloud_union = int((large | truth_clouds).sum())
    return row


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else float("nan")


def _on_the_annotation_grid(truth: xr.Dataset, annotations: xr.Dataset) -> xr.Dataset:
    """``truth`` with its rows and columns in the annotation's order, where it carries ``y``/``x``
    coordinates (a truth stored south-up is turned round), or an :class:`InputError` where its
    coordinates are another place's: by array position alone it was scored as this stack's."""
    for axis in ("y", "x"):
        if axis not in truth.coords or axis not in annotations.coords:
            continue
        mine = np.asarray(truth[axis].values, dtype=np.float64)
        theirs = np.asarray(annotations[axis].values, dtype=np.float64)
        step = float(np.abs(np.diff(theirs)).min()) if theirs.size > 1 else 1.0
        if np.allclose(mine, theirs, rtol=0, atol=step / 2):
            continue
        if np.allclose(mine[::-1], theirs, rtol=0, atol=step / 2):
            truth = truth.isel({axis: slice(None, None, -1)})
            continue
        raise InputError(
            f"truth's {axis} coordinates ({mine[0]:.9g} .. {mine[-1]:.9g}) are not the "
            f"annotation's ({theirs[0]:.9g} .. {theirs[-1]:.9g}): pass the truth of this stack "
            "(or one without y/x coordinates, matched by array position)"
        )
    return truth


def evaluate(annotations: xr.Dataset, truth: xr.Dataset) -> Scores:
    """Score an annotation Dataset against a truth Dataset, date by date (bounded memory).

    Parameters
    ----------
    annotations : xarray.Dataset
        With ``mask``, ``valid``, ``heatmap`` and ``water`` (from :func:`spoc_xr.annotate`).
    truth : xarray.Dataset
        See the module docstring.

    Returns
    -------
    Scores

    Examples
    --------
    >>> scores = evaluate(open_store("out.zarr"), read_truth("truth.zarr"))  # doctest: +SKIP
    >>> print(scores.table())  # doctest: +SKIP
    """
    ann_times = pd.DatetimeIndex(annotations.time.values)
    truth_times = pd.DatetimeIndex(truth.time.values)
    if annotations.sizes["y"] != truth.sizes["y"] or annotations.sizes["x"] != truth.sizes["x"]:
        raise InputError(
            f"truth is {truth.sizes['y']} x {truth.sizes['x']} px but the annotation is "
            f"{annotations.sizes['y']} x {annotations.sizes['x']}; pass the truth of this stack"
        )
    truth = _on_the_annotation_grid(truth, annotations)
    matches = []
    for j, stamp in enumerate(truth_times):
        same = np.flatnonzero(ann_times == stamp)
        if not same.size:  # a truth date without its time of day: the acquisitions of that day
            same = np.flatnonzero(ann_times.normalize() == stamp.normalize())
        matches += [(int(i), j) for i in same]
    if not matches:
        raise InputError(
            "no date of the truth matches a date of the annotation; check that the truth belongs "
            "to this stack"
        )
    water = None
    if "water" in annotations and annotations["water"].attrs.get("index", "none") != "none":
        water = annotations["water"].values.astype(bool)
    rows = []
    true_heat = np.zeros((truth.sizes["y"], truth.sizes["x"]), dtype=np.float64)
    for i, j in matches:
        boats = np.asarray(truth["boats"].isel(time=j).values)
        clouds = np.asarray(truth["clouds"].isel(time=j).values)
        mask = np.asarray(annotations["mask"].isel(time=i).values)
        valid = np.asarray(annotations["valid"].isel(time=i).values).astype(bool)
        true_heat += boats > 0
        rows.append(score_date(str(ann_times[i])[:19], mask, valid, boats, clouds, water))
    true_boats = sum(r.true_boats for r in rows)
    precision = _ratio(
        sum(r.correct_predictions for r in rows), sum(r.predicted_boats for r in rows)
    )
    recall = _ratio(sum(r.found_boats for r in rows), true_boats)
    f1 = _ratio(2 * precision * recall, precision + recall)
    cloud_iou = _ratio(sum(r.cloud_intersection for r in rows), sum(r.cloud_union for r in rows))
    predicted_heat = np.asarray(annotations["heatmap"].values, dtype=np.float64)
    correlation = float("nan")
    if predicted_heat.std() > 0 and true_heat.std() > 0:
        correlation = float(np.corrcoef(predicted_heat.ravel(), true_heat.ravel())[0, 1])
    scores = Scores(precision, recall, f1, cloud_iou, correlation, rows)
    if MISREGISTRATION in truth.data_vars and MISREGISTRATION in annotations.data_vars:
        measured = np.asarray(annotations[MISREGISTRATION].values, dtype=np.float64)
        known = np.asarray(truth[MISREGISTRATION].values, dtype=np.float64)
        errors = shift_errors(measured[[i for i, _ in matches]], known[[j for _, j in matches]])
        for row, error in zip(rows, errors, strict=True):
            row.shift_error = float(error)
        scores.shifts_known = len(errors)
        scores.shifts_measured = int(np.isfinite(errors).sum())
        if scores.shifts_measured:
            scores.shift_error = float(np.nanmean(errors))
    return scores


def shift_errors(measured: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Distance (px) of each measured shift ``(date, 2)`` from the true one, NaN if unmeasured.

    The measured shifts are against the reference, which may itself sit off the scene's grid (a
    temporal median sits where its dates do): that offset, the median over measured dates of
    ``true - measured`` per axis, is removed first.

    Examples
    --------
    >>> shift_errors(np.array([[0.1, 0.0], [np.nan, np.nan], [0.5, -0.2]]),
    ...              np.array([[0.2, 0.0], [0.3, 0.3], [0.6, -0.2]]))
    array([ 0., nan,  0.])
    """
    measured = np.asarray(measured, dtype=np.float64).reshape(-1, 2)
    true = np.asarray(true, dtype=np.float64).reshape(-1, 2)
    seen = np.isfinite(measured).all(axis=1) & np.isfinite(true).all(axis=1)
    errors = np.full(len(measured), np.nan)
    if seen.any():
        offset = np.median(true[seen] - measured[seen], axis=0)
        errors[seen] = np.hypot(*(measured[seen] + offset - true[seen]).T)
    return errors


def json_safe(value: object) -> object:
    """Nested dicts/lists ready for JSON: NaN and infinities as null, numpy scalars as Python."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value


def write_scores(scores: Scores, path: str | os.PathLike[str]) -> Path:
    """Write scores as JSON (NaN written as null)."""
    path = Path(path)
    path.write_text(json.dumps(json_safe(scores.as_dict()), indent=2))
    return path
