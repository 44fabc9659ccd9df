"""Accuracy against the project's targets, with default parameters, through the same functions as
``benchmarks/quality.py`` (whose full-size figures the README reports).

- the demo harbour (16 dates, 512², seed 0): issue 2's targets (boat F1 ≥ 0.90, cloud IoU ≥ 0.80)
  are met and tested; issue 3's boat F1 ≥ 0.95 is not met yet and stays visible as a strict
  xfail, which turns into a failure the day it is met;
- two semi-real ports on 512 px crops (12 dates, the window with the most ships): boat F1 ≥ 0.85,
  cloud IoU ≥ 0.80, real-date recall ≥ 0.80;
- the real Landsat stack against Fmask: IoU ≥ 0.50, no date without valid data reported clear.

The ports and Landsat need the shared data and are skipped with a reason without it.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from types import ModuleType
from typing import Any

import dask
import pytest

from spoc_xr.ports import port_dirs, shared_data_dir
from tests.helpers import load_benchmark

TARGET_PORTS = ("busan", "klang")
PORT_CROP = 512
PORT_DATES = 12
# Today's demo figures (session 13): F1 0.937, cloud IoU 0.802 (issue 2's targets: 0.90, 0.80).
DEMO_F1_TARGET = 0.90
DEMO_IOU_TARGET = 0.80


@pytest.fixture(scope="module")
def quality() -> ModuleType:
    return load_benchmark("quality")


def _args(workdir: Path) -> argparse.Namespace:
    return argparse.Namespace(
        workdir=workdir, dates=PORT_DATES, seed=0, max_side=PORT_CROP, workers=2
    )


@pytest.fixture(scope="module")
def demo_row(quality: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    with dask.config.set(scheduler="threads"):
        row: dict[str, Any] = quality.run_demo(_args(tmp_path_factory.mktemp("demo")))
    return row


def test_demo_harbour_meets_the_boat_f1_target(demo_row: dict[str, Any]) -> None:
    assert demo_row["f1"] >= DEMO_F1_TARGET, demo_row
    assert demo_row["precision"] > 0.8 and demo_row["recall"] > 0.75, demo_row


def test_demo_harbour_meets_the_cloud_iou_target(demo_row: dict[str, Any]) -> None:
    assert demo_row["cloud_iou"] >= DEMO_IOU_TARGET, demo_row


@pytest.mark.xfail(
    strict=True,
    reason="issue 3's demo boat F1 target (0.95) is not met yet (session 13: boat F1 0.937)",
)
def test_demo_harbour_meets_issue_3s_boat_f1_target(demo_row: dict[str, Any]) -> None:
    assert demo_row["f1"] >= 0.95, demo_row


@pytest.mark.skipif(
    not set(TARGET_PORTS) <= set(port_dirs()),
    reason=f"shared data ../shared/data/sen2ships ({', '.join(TARGET_PORTS)}) is absent; set "
    "SPOC_XR_SHARED_DATA to a folder holding it",
)
@pytest.mark.parametrize("port", TARGET_PORTS)
def test_semi_real_port_meets_the_targets(quality: ModuleType, port: str, tmp_path: Path) -> None:
    with dask.config.set(scheduler="threads"):
        row = quality.run_port(port, port_dirs()[port], _args(tmp_path))
    assert row["f1"] >= 0.85, row
    assert row["cloud_iou"] >= 0.80, row
    assert row["real_recall"] >= 0.80, row


@pytest.mark.skipif(
    not (shared_data_dir() / "landsat_fmask").is_dir(),
    reason="shared data ../shared/data/landsat_fmask is absent; set SPOC_XR_SHARED_DATA to a "
    "folder holding it",
)
def test_real_landsat_large_class_meets_the_fmask_target(
    quality: ModuleType, tmp_path: Path
) -> None:
    with dask.config.set(scheduler="threads"):
        row = quality.run_landsat(shared_data_dir() / "landsat_fmask", _args(tmp_path))
    assert row["cloud_iou"] >= 0.50, row
    assert row["no_data_dates_reported_clear"] == 0, row
    assert row["overcast_dates"] > 0  # the stack has overcast dates to get wrong...
    assert row["overcast_dates_reported_mostly_clear"] == 0, row  # ...and none is called clear
