"""Evaluation counts on hand-made masks whose right answer is known."""

from __future__ import annotations

import json

import numpy as np
import pytest
import xarray as xr

from spoc_xr.detect import LARGE, SMALL
from spoc_xr.errors import InputError
from spoc_xr.evaluate import boat_components, evaluate, json_safe, score_date, write_scores

SHAPE = (20, 30)


def test_counts_found_missed_and_false_boats() -> None:
    boats = np.zeros(SHAPE, dtype=np.int32)
    boats[2:4, 2:5] = 1  # found: a prediction overlaps it
    boats[10:12, 10:12] = 2  # found: a prediction one pixel away touches it
    boats[15:17, 20:23] = 3  # missed
    mask = np.zeros(SHAPE, dtype=np.uint8)
    mask[3, 3] = SMALL
    mask[12, 12] = SMALL
    mask[6:8, 25:27] = SMALL  # a false boat
    row = score_date("d", mask, np.ones(SHAPE, bool), boats, np.zeros(SHAPE, np.uint8), None)
    assert (row.true_boats, row.found_boats) == (3, 2)
    assert (row.predicted_boats, row.correct_predictions) == (3, 2)


def test_boats_and_predictions_under_clouds_are_not_scored() -> None:
    boats = np.zeros(SHAPE, dtype=np.int32)
    boats[2:4, 2:4] = 1
    clouds = np.zeros(SHAPE, dtype=np.uint8)
    clouds[0:6, 0:6] = 1
    mask = np.zeros(SHAPE, dtype=np.uint8)
    mask[5, 5] = SMALL  # touches the cloud: ignored, neither right nor wrong
    row = score_date("d", mask, np.ones(SHAPE, bool), boats, clouds, None)
    assert (row.true_boats, row.predicted_boats) == (0, 0)


def test_small_objects_on_land_are_not_boats() -> None:
    water = np.zeros(SHAPE, dtype=bool)
    water[:, :15] = True
    mask = np.zeros(SHAPE, dtype=np.uint8)
    mask[5:7, 5:7] = SMALL  # on water
    mask[5:7, 20:22] = SMALL  # on land
    empty = np.zeros(SHAPE, dtype=np.int32)
    row = score_date("d", mask, np.ones(SHAPE, bool), empty, np.zeros(SHAPE, np.uint8), water)
    assert row.predicted_boats == 1


def test_a_boat_lies_on_water_by_more_than_half_of_its_pixels() -> None:
    water = np.zeros(SHAPE, dtype=bool)
    water[:, :15] = True
    mask = np.zeros(SHAPE, dtype=np.uint8)
    mask[5, 14:16] = SMALL  # half on a pier's edge: no boat
    mask[10, 13:16] = SMALL  # two of three pixels on water: a boat
    labels, count, is_boat = boat_components(mask == SMALL, water)
    assert count == 2
    assert not is_boat[labels[5, 14]]
    assert is_boat[labels[10, 13]]


def test_cloud_iou_over_valid_pixels() -> None:
    clouds = np.zeros(SHAPE, dtype=np.uint8)
    clouds[0:10, 0:10] = 1  # 100 px
    mask = np.zeros(SHAPE, dtype=np.uint8)
    mask[0:10, 5:15] = LARGE  # 100 px, 50 shared
    valid = np.ones(SHAPE, dtype=bool)
    row = score_date("d", mask, valid, np.zeros(SHAPE, np.int32), clouds, None)
    assert row.cloud_intersection / row.cloud_union == pytest.approx(50 / 150)
    valid[:, 10:] = False  # the mask's unmatched half has no data: not scored
    row = score_date("d", mask, valid, np.zeros(SHAPE, np.int32), clouds, None)
    assert row.cloud_intersection / row.cloud_union == pytest.approx(50 / 100)


def _annotations(masks: np.ndarray, times: np.ndarray) -> xr.Dataset:
    heat = (masks == SMALL).sum(0).astype(np.uint16)
    return xr.Dataset(
        {
            "mask": (("time", "y", "x"), masks),
            "valid": (("time", "y", "x"), np.ones_like(masks)),
            "heatmap": (("y", "x"), heat),
        },
        coords={"time": times},
    )


def _truth(boats: np.ndarray, times: np.ndarray) -> xr.Dataset:
    clouds = np.zeros(boats.shape, dtype=np.uint8)
    return xr.Dataset(
        {"boats": (("time", "y", "x"), boats), "clouds": (("time", "y", "x"), clouds)},
        coords={"time": times},
    )


def test_evaluate_matches_dates_and_totals() -> None:
    times = np.array(["2023-01-01T10:00", "2023-01-06T10:00"], dtype="datetime64[ns]")
    boats = np.zeros((2, *SHAPE), dtype=np.int32)
    boats[0, 2:4, 2:4] = 1
    boats[1, 2:4, 2:4] = 2
    boats[1, 10:12, 10:12] = 3
    masks = np.zeros((2, *SHAPE), dtype=np.uint8)
    masks[0, 2:4, 2:4] = SMALL
    masks[1, 2:4, 2:4] = SMALL
    masks[1, 15:17, 25:27] = SMALL
    truth = _truth(boats, times)
    scores = evaluate(_annotations(masks, times), truth)
    assert scores.recall == pytest.approx(2 / 3)
    assert scores.precision == pytest.approx(2 / 3)
    assert scores.f1 == pytest.approx(2 / 3)
    assert np.isnan(scores.cloud_iou)


def test_shift_errors_remove_the_references_own_offset_and_skip_unmeasured_dates() -> None:
    times = np.array(
        ["2023-01-01T10:00", "2023-01-06T10:00", "2023-01-11T10:00", "2023-01-16T10:00"],
        dtype="datetime64[ns]",
    )
    true = np.array([[0.0, 0.0], [0.4, -0.2], [-0.3, 0.5], [0.1, 0.1]])
    # A reference sitting 0.1 px down and 0.2 px left of the scene's grid: every measurement is
    # off by that; the third date is off by 0.03 / 0.04 more (a distance of 0.05); the last
    # could not be measured.
    measured = true - np.array([0.1, -0.2])
    measured[2] += [0.03, 0.04]
    measured[3] = np.nan
    masks = np.zeros((4, *SHAPE), dtype=np.uint8)
    annotations = _annotations(masks, times)
    annotations["misregistration"] = (("time", "axis"), measured.astype(np.float32))
    truth = _truth(np.zeros((4, *SHAPE), dtype=np.int32), times)
    assert np.isnan(evaluate(annotations, truth).shift_error)  # the truth has no shifts
    assert "shift error" not in evaluate(annotations, truth).table()
    truth["misregistration"] = (("time", "axis"), true)
    scores = evaluate(annotations, truth)
    errors = [row.shift_error for row in scores.dates]
    # The median offset over the 3 measured dates is the reference's own (0.1, -0.2).
    np.testing.assert_allclose(errors[:3], [0.0, 0.0, 0.05], atol=1e-6)
    assert np.isnan(errors[3])
    assert (scores.shifts_measured, scores.shifts_known) == (3, 4)
    assert scores.shift_error == pytest.approx(0.05 / 3, abs=1e-6)
    assert "shift error 0.017 px (3 of 4 dates measured)" in scores.table()


def test_truth_of_another_stack_is_refused() -> None:
    times = np.array(["2023-01-01"], dtype="datetime64[ns]")
    other = np.array(["2024-01-01"], dtype="datetime64[ns]")
    masks = np.zeros((1, *SHAPE), dtype=np.uint8)
    truth = _truth(masks.astype(np.int32), other)
    with pytest.raises(InputError, match="no date of the truth"):
        evaluate(_annotations(masks, times), truth)


def test_scores_json_has_no_nan(tmp_path) -> None:
    assert json_safe({"a": [np.float32(1.5), float("nan")], "b": np.int64(2)}) == {
        "a": [1.5, None],
        "b": 2,
    }
    times = np.array(["2023-01-01"], dtype="datetime64[ns]")
    masks = np.zeros((1, *SHAPE), dtype=np.uint8)
    truth = _truth(masks.astype(np.int32), times)
    path = write_scores(evaluate(_annotations(masks, times), truth), tmp_path / "s.json")
    assert json.loads(path.read_text())["f1"] is None


def _boat_pair() -> tuple[xr.Dataset, xr.Dataset]:
    """Annotations and truth of two dates on a map grid, one boat found on each."""
    times = np.array(["2023-01-01", "2023-01-06"], dtype="datetime64[ns]")
    boats = np.zeros((2, *SHAPE), dtype=np.int32)
    boats[:, 2:4, 2:5] = [[[1]], [[2]]]
    masks = np.where(boats > 0, SMALL, 0).astype(np.uint8)
    grid = {"y": 4e6 - 10.0 * np.arange(SHAPE[0]), "x": 5e5 + 10.0 * np.arange(SHAPE[1])}
    return _annotations(masks, times).assign_coords(grid), _truth(boats, times).assign_coords(grid)


def test_truth_is_lined_up_on_its_coordinates_or_refused() -> None:
    annotations, truth = _boat_pair()
    assert evaluate(annotations, truth).recall == 1.0
    # Stored south-up: the same truth, turned round (by position alone it scored F1 0.08).
    assert evaluate(annotations, truth.sortby("y")).recall == 1.0
    elsewhere = truth.assign_coords(x=truth.x + 50_000)  # the same size, 50 km east
    with pytest.raises(InputError, match=r"x coordinates .* are not the annotation's"):
        evaluate(annotations, elsewhere)
    # Without coordinates the truth is matched by position, as before.
    assert evaluate(annotations, truth.drop_vars(["y", "x"])).recall == 1.0


def test_each_truth_date_without_an_exact_match_takes_its_day() -> None:
    annotations, truth = _boat_pair()
    # One truth date at the acquisition's time, one at another time of that day: the second
    # was dropped because the first matched exactly.
    truth = truth.assign_coords(
        time=np.array(["2023-01-01", "2023-01-06T10:30"], dtype="datetime64[ns]")
    )
    scores = evaluate(annotations, truth)
    assert len(scores.dates) == 2 and scores.recall == 1.0
