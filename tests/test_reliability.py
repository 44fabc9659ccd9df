"""Writes that can be trusted: killed runs resume, finished runs write nothing, appends, locks,
lost workers and failing tasks. Real processes throughout: ``python -m spoc_xr.cli`` killed with
SIGKILL, and Dask workers in their own processes killed with ``os._exit``.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import pytest
import xarray as xr

from spoc_xr import store as st
from spoc_xr.errors import SpocError, StoreError
from spoc_xr.ingest import ingest_store, open_stack
from spoc_xr.pipeline import annotate_store
from tests.helpers import make_stack, worker_addresses
from tests.test_errors import write_scene

REPO = Path(__file__).parents[1]
N_DATES = 8
# One date per batch: the progress record moves after every date, so kills land mid-run.
ONE_DATE_PER_BATCH = {"DASK_SPOC_XR__DATES_PER_BATCH": "1"}
KILL_TIMEOUT_S = 60


@pytest.fixture(scope="module")
def scheduler() -> Iterator[str]:
    """One LocalCluster (a worker process) for the CLI runs: a cluster outlives its driver."""
    from distributed import LocalCluster

    with LocalCluster(
        n_workers=1, threads_per_worker=2, processes=True, host="127.0.0.1", dashboard_address=":0"
    ) as cluster:
        yield cluster.scheduler_address


def progress_of(store: Path) -> dict[str, Any]:
    """The store's progress record read straight from its zarr.json (written atomically)."""
    try:
        attrs = json.loads((store / "zarr.json").read_text()).get("attributes", {})
    except (OSError, ValueError):
        return {}
    return dict(attrs.get(st.PROGRESS_ATTR) or {})


def start(*argv: Any) -> subprocess.Popen[str]:
    env = {**os.environ, **ONE_DATE_PER_BATCH, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-m", "spoc_xr.cli", *map(str, argv)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def kill_when(process: subprocess.Popen[str], ready: Callable[[], bool]) -> bool:
    """SIGKILL ``process`` as soon as ``ready()``; False when it finished first."""
    deadline = time.monotonic() + KILL_TIMEOUT_S
    while time.monotonic() < deadline:
        if ready():
            process.send_signal(signal.SIGKILL)
            process.communicate()
            return True
        if process.poll() is not None:
            process.communicate()
            return False
        time.sleep(0.005)
    process.kill()
    raise AssertionError("the run neither reached the kill point nor finished")


def finish(*argv: Any) -> str:
    process = start(*argv)
    out, err = process.communicate(timeout=KILL_TIMEOUT_S)
    assert process.returncode == 0, err
    return out


def assert_same_store(actual: Path, expected: Path) -> None:
    got = xr.open_zarr(actual, consolidated=False, chunks=None)
    want = xr.open_zarr(expected, consolidated=False, chunks=None)
    assert sorted(got.data_vars) == sorted(want.data_vars)
    for name in want.data_vars:
        np.testing.assert_array_equal(got[name].values, want[name].values, err_msg=name)
    np.testing.assert_array_equal(got.time.values, want.time.values)
    assert got.attrs["spoc_xr"] == want.attrs["spoc_xr"]


def chunk_stamps(store: Path, variable: str) -> dict[str, int]:
    return {
        str(path.relative_to(store)): path.stat().st_mtime_ns
        for path in (store / variable).rglob("*")
        if path.is_file() and path.name != "zarr.json"
    }


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("scene")
    src = write_scene(root / "src", n_time=N_DATES)
    stack = root / "stack.zarr"
    assert ingest_store(src, stack, chunks=32) == "written"
    reference = root / "reference.zarr"
    assert annotate_store(open_stack(stack), reference, source=stack) == "written"
    return {"root": root, "src": src, "stack": stack, "reference": reference}


def test_the_store_writer_stores_the_reference_first_and_equals_the_one_graph_dataset(
    scene: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from spoc_xr.pipeline import annotate

    # The one-graph Dataset computes reference, noise model and water in one go; the store writer
    # in two passes (the second reads the first back): same values, chunks not dividing the shape.
    stack = open_stack(scene["stack"])
    expected = annotate(stack).compute()
    written: list[list[str]] = []
    write_region = st.write_region

    def record(ds: xr.Dataset, store: Path, *, region: dict[str, slice], **kw: Any) -> None:
        written.append(sorted(map(str, ds.data_vars)))
        write_region(ds, store, region=region, **kw)

    monkeypatch.setattr(st, "write_region", record)
    out = tmp_path / "out.zarr"
    annotate_store(stack, out, source=scene["stack"])
    assert written[:3] == [["reference", "spread", "spread_beyond_range"], ["spread"], ["water"]]
    got = xr.open_zarr(out, consolidated=False, chunks=None)
    assert sorted(got.data_vars) == sorted(expected.data_vars)  # the excess was removed
    assert stack.chunks is not None and stack.sizes["y"] % stack.chunks[2][0] != 0
    for name in ("reference", "spread", "water", "mask", "valid", "heatmap", "misregistration"):
        np.testing.assert_array_equal(got[name].values, expected[name].values, err_msg=name)


def test_annotate_killed_at_several_moments_resumes_to_the_uninterrupted_result(
    scene: dict[str, Path], scheduler: str, tmp_path: Path
) -> None:
    out = tmp_path / "out.zarr"
    command = ("annotate", scene["stack"], out, "--scheduler", scheduler, "--no-report")
    moments: list[tuple[str, Callable[[], bool]]] = [
        ("store created", lambda: progress_of(out).get("stage") is not None),
        ("3 dates recorded", lambda: len(progress_of(out).get("done", [])) >= 3),
        ("6 dates recorded", lambda: len(progress_of(out).get("done", [])) >= 6),
    ]
    timings = []
    for label, ready in moments:
        started = time.perf_counter()
        killed = kill_when(start(*command), ready)
        timings.append((label, killed, time.perf_counter() - started))
        if killed:
            assert not st.is_complete(out), label
            with pytest.raises(StoreError, match="incomplete"):
                st.open_store(out)
    done_before = set(progress_of(out).get("done", []))
    stamps = chunk_stamps(out, "mask")
    started = time.perf_counter()
    printed = finish(*command)
    timings.append(("resume to the end", True, time.perf_counter() - started))
    assert printed.startswith("resumed") or "annotated" in printed
    assert_same_store(out, scene["reference"])
    # Dates recorded before the last kill were not computed again.
    positions = [i for i, d in enumerate(st.date_labels(st.open_store(out).time.values))
                 if d in done_before]  # fmt: skip
    after = chunk_stamps(out, "mask")
    for key, stamp in stamps.items():
        if int(key.split("/")[2]) in positions:  # mask/c/<time>/<y>/<x>
            assert after[key] == stamp, key
    # The same command again writes nothing and says so.
    before = {path: path.stat().st_mtime_ns for path in out.rglob("*")}
    printed = finish(*command)
    assert "already complete" in printed
    assert {path: path.stat().st_mtime_ns for path in out.rglob("*")} == before
    print("kill/resume timings (s):", timings)


def test_ingest_killed_mid_write_resumes_to_the_uninterrupted_result(
    scene: dict[str, Path], scheduler: str, tmp_path: Path
) -> None:
    out = tmp_path / "stack.zarr"
    command = ("ingest", scene["src"], out, "--chunks", "32", "--scheduler", scheduler)
    killed = kill_when(start(*command), lambda: len(progress_of(out).get("done", [])) >= 2)
    if killed:
        assert not st.is_complete(out)
    printed = finish(*command)
    assert "dates" in printed
    assert_same_store(out, scene["stack"])
    assert "already complete" in finish(*command)


def test_windows_of_tiles_write_the_same_store_one_compute_per_window(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from spoc_xr.detect import CLASSIFY_TILE_CONFIG_KEY, DetectParams
    from spoc_xr.pipeline import TILE_GROUP_CONFIG_KEY, tile_windows

    # Large enough for several classification tiles at the default halo (216 px).
    assert 2 * DetectParams().depth < 530
    src = write_scene(tmp_path / "src", n_time=4, side=530)
    assert ingest_store(src, tmp_path / "stack.zarr", chunks=130) == "written"
    stack = open_stack(tmp_path / "stack.zarr")
    whole = tmp_path / "whole.zarr"  # one classification tile, one window
    annotate_store(stack, whole, source=tmp_path / "stack.zarr")
    writes: list[dict[str, slice]] = []
    written: list[set[str]] = []  # the variables of each date write
    write_region = st.write_region

    def record(ds: xr.Dataset, store: Path, *, region: dict[str, slice], **kw: Any) -> None:
        writes.append(region)
        if "time" in region and "y" in region:
            written.append(set(map(str, ds.data_vars)))
        write_region(ds, store, region=region, **kw)

    monkeypatch.setattr(st, "write_region", record)
    out = tmp_path / "out.zarr"
    # Tiles of 2 x 2 chunks (the 10 px left over joins the last), one tile per window.
    with dask.config.set({TILE_GROUP_CONFIG_KEY: 1, CLASSIFY_TILE_CONFIG_KEY: 260}):
        windows = tile_windows(stack, DetectParams())
        annotate_store(stack, out, source=tmp_path / "stack.zarr")
    edges = [slice(0, 260), slice(260, 530)]
    assert windows == [{"y": y, "x": x} for y in edges for x in edges]
    # Each date batch wrote every window once; together they cover the image exactly once.
    date_writes = [region for region in writes if "time" in region and "y" in region]
    assert len(date_writes) % len(windows) == 0 and date_writes[: len(windows)] == [
        {"time": date_writes[0]["time"], **window} for window in windows
    ]
    # The per-date shifts go with each batch's first window only.
    assert [("misregistration" in names) for names in written] == [
        number % len(windows) == 0 for number in range(len(written))
    ]
    assert_same_store(out, whole)


def test_tile_windows_follow_rows_of_classification_tiles_and_the_budget() -> None:
    from spoc_xr.detect import CLASSIFY_TILE_CONFIG_KEY, DetectParams
    from spoc_xr.pipeline import TILE_GROUP_CONFIG_KEY, tile_windows

    stack = xr.DataArray(
        da.zeros((2, 3, 760, 1300), chunks=(1, 3, 256, 256), dtype=np.uint16),
        dims=("time", "band", "y", "x"),
    )
    params = DetectParams()
    assert tile_windows(stack, params) == [{}]  # one 760 x 1300 tile fits the default budget
    with dask.config.set({CLASSIFY_TILE_CONFIG_KEY: 512}):
        # Tiles 512 + 248 rows, 512 + 512 + 276 columns (the last 20 px join their neighbour).
        per_tile = 10 * (512 + 2 * params.depth) ** 2 * 4
        with dask.config.set({TILE_GROUP_CONFIG_KEY: 2 * per_tile}):
            windows = tile_windows(stack, params)
    assert windows == [
        {"y": slice(0, 512), "x": slice(0, 1024)},
        {"y": slice(0, 512), "x": slice(1024, 1300)},
        {"y": slice(512, 760), "x": slice(0, 1024)},
        {"y": slice(512, 760), "x": slice(1024, 1300)},
    ]
    with dask.config.set({TILE_GROUP_CONFIG_KEY: 0}), pytest.raises(SpocError, match="bytes"):
        tile_windows(stack, params)
    with dask.config.set({CLASSIFY_TILE_CONFIG_KEY: 0}), pytest.raises(SpocError, match="pixels"):
        tile_windows(stack, params)


def test_resume_with_other_parameters_is_refused(scene: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out.zarr"
    stack = open_stack(scene["stack"])
    annotate_store(stack, out, source=scene["stack"])
    # An unfinished store: as a run killed before its completion marker leaves it.
    st.update_attrs(out, {}, remove=[st.COMPLETE_ATTR])
    from spoc_xr.detect import DetectParams

    with pytest.raises(StoreError, match=r"started with other parameters.*--overwrite"):
        annotate_store(stack, out, params=DetectParams(kernel=7), source=scene["stack"])
    assert annotate_store(stack, out, source=scene["stack"]) == "resumed"
    assert_same_store(out, scene["reference"])
    assert annotate_store(stack, out, source=scene["stack"]) == "complete"


def test_append_adds_later_dates_and_annotates_only_those(
    scene: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    import contextlib

    import spoc_xr.cli as cli

    files = sorted(scene["src"].iterdir())
    first, later = tmp_path / "first", tmp_path / "later"
    first.mkdir()
    later.mkdir()
    for path in files[:5]:
        (first / path.name).write_bytes(path.read_bytes())
    for path in files[5:]:
        (later / path.name).write_bytes(path.read_bytes())
    stack_path, out = tmp_path / "stack.zarr", tmp_path / "out.zarr"
    assert ingest_store(first, stack_path, chunks=32) == "written"
    assert annotate_store(open_stack(stack_path), out, source=stack_path) == "written"
    old = st.open_store(out).load()
    monkeypatch.setattr(cli, "_client", lambda args, quiet=False: contextlib.nullcontext())
    assert cli.main(["ingest", str(later), str(stack_path), "--append"]) == 0
    assert "appended 3 dates (now 8)" in capsys.readouterr().out
    assert_same_store(stack_path, scene["stack"])
    assert cli.main(["ingest", str(later), str(stack_path), "--append"]) == 0
    assert "already complete" in capsys.readouterr().out
    # A store written before the shifts were kept (no misregistration array) appends alike.
    legacy = tmp_path / "legacy.zarr"
    shutil.copytree(out, legacy)
    shutil.rmtree(legacy / "misregistration")
    assert annotate_store(open_stack(stack_path), out, source=stack_path) == "appended"
    new = st.open_store(out).load()
    assert annotate_store(open_stack(stack_path), legacy, source=stack_path) == "appended"
    appended_legacy = st.open_store(legacy).load()
    assert "misregistration" not in appended_legacy.data_vars
    for name in ("mask", "valid", "heatmap"):
        np.testing.assert_array_equal(appended_legacy[name].values, new[name].values, name)
    assert new.sizes["time"] == N_DATES
    dated = ("mask", "valid", "misregistration", "gain", "offset", "valid_fraction")
    for name in (*dated, "small_fraction"):
        np.testing.assert_array_equal(new[name].values[:5], old[name].values, err_msg=name)
    # The new dates' shifts were written (this scene's are unmeasurable: NaN, also the fill).
    chunks = sorted(int(path.parent.name) for path in (out / "misregistration" / "c").glob("*/0"))
    assert chunks == list(range(N_DATES))
    for name in ("reference", "spread", "water"):
        np.testing.assert_array_equal(new[name].values, old[name].values, err_msg=name)
    expected = ((new.mask == 1) & (new.water == 1)).sum("time")
    np.testing.assert_array_equal(new.heatmap.values, expected.values)
    assert (new.heatmap.values >= old.heatmap.values).all()
    assert new.attrs["spoc_xr"]["dates"][-1].startswith(str(new.time.values[-1])[:19])
    # The appended dates got their own brightness levels (the thin haze test), the old kept theirs.
    levels = new.attrs["spoc_xr"]["overview_brightness"]
    assert len(levels) == N_DATES and all(pair is not None for pair in levels)
    assert levels[:5] == old.attrs["spoc_xr"]["overview_brightness"]
    assert annotate_store(open_stack(stack_path), out, source=stack_path) == "complete"


def test_a_second_writer_is_refused_and_a_stale_lock_taken_over(
    scene: dict[str, Path], scheduler: str, tmp_path: Path
) -> None:
    out = tmp_path / "out.zarr"
    stack = open_stack(scene["stack"])
    process = start("annotate", scene["stack"], out, "--scheduler", scheduler, "--no-report")
    try:
        deadline = time.monotonic() + KILL_TIMEOUT_S
        while not st.lock_path(out).exists() and process.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        if process.poll() is None:
            with pytest.raises(StoreError, match="being written by another run"):
                annotate_store(stack, out, source=scene["stack"])
        process.send_signal(signal.SIGKILL)
        process.communicate()
    finally:
        if process.poll() is None:
            process.kill()
    # The killed run's lock is stale (its pid is gone): the next run takes it over.
    assert annotate_store(stack, out, source=scene["stack"]) in ("resumed", "written")
    assert not st.lock_path(out).exists()
    assert_same_store(out, scene["reference"])


def _take_lock_repeatedly(store: Path, marker: Path, rounds: int, results: Any) -> None:
    """Take ``store``'s lock ``rounds`` times; count the times someone else held it too."""
    held = overlaps = 0
    for _ in range(rounds):
        try:
            with st.store_lock(store):
                held += 1
                try:
                    os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
                except FileExistsError:
                    overlaps += 1
                    continue
                time.sleep(0.0005)
                marker.unlink()
        except StoreError:
            pass
    results.put((held, overlaps))


def test_writers_racing_for_the_lock_never_hold_it_together(tmp_path: Path) -> None:
    # Session 17's lock appeared empty before its record was written; a racing reader took the
    # empty lock for a dead writer's and both wrote (hundreds of overlaps in this loop).
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    racers = [
        context.Process(
            target=_take_lock_repeatedly,
            args=(tmp_path / "out.zarr", tmp_path / "held", 400, results),
        )
        for _ in range(3)
    ]
    for racer in racers:
        racer.start()
    counts = [results.get(timeout=KILL_TIMEOUT_S) for _ in racers]
    for racer in racers:
        racer.join(timeout=KILL_TIMEOUT_S)
    assert sum(held for held, _ in counts) > 0
    assert [overlaps for _, overlaps in counts] == [0, 0, 0]
    assert not st.lock_path(tmp_path / "out.zarr").exists()
    assert sorted(path.name for path in tmp_path.iterdir()) == []


def test_a_takeover_never_leaves_a_live_lock_path_empty(tmp_path: Path) -> None:
    # A run that read a dead writer's record after another run had replaced that lock with its
    # own once moved the live lock aside and back; a third run created its lock in that gap
    # and two runs wrote (session 24: taken within a few hundred tries here).
    lock = st.lock_path(tmp_path / "out.zarr")
    live = {"pid": os.getpid(), "host": socket.gethostname()}
    lock.write_text(json.dumps(live))
    stop = threading.Event()
    created = []

    def third_run() -> None:
        while not stop.is_set():
            if st._create_lock(lock, {"pid": 1, "host": "third"}):
                created.append(True)
                stop.set()

    racer = threading.Thread(target=third_run)
    racer.start()
    try:
        for _ in range(3000):
            st._take_stale_lock(lock, {"pid": 999_999_999, "host": socket.gethostname()})
    finally:
        stop.set()
        racer.join()
    assert created == []
    assert json.loads(lock.read_text()) == live


def test_a_takeover_of_a_released_lock_never_removes_a_rivals_new_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Session 27's CI: a writer found the lock gone (released), judged the missing lock stale,
    # and a rival created its lock just before the takeover's unlink; both then wrote. A missing
    # lock must never be unlinked, whatever is checked before.
    lock = st.lock_path(tmp_path / "out.zarr")
    unlinked: list[Path] = []
    unlink = Path.unlink

    def record_unlink(path: Path, missing_ok: bool = False) -> None:
        unlinked.append(path)
        unlink(path, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", record_unlink)
    st._take_stale_lock(lock, None)
    assert lock not in unlinked
    lock.write_text("")  # an unreadable lock is held while young ...
    st._take_stale_lock(lock, None)
    assert unlinked == [] and lock.exists()
    old = time.time() - 2 * st.UNREADABLE_LOCK_GRACE_S
    os.utime(lock, (old, old))
    st._take_stale_lock(lock, None)  # ... and removed when old
    assert unlinked == [lock] and not lock.exists()


def test_an_unreadable_lock_is_held_while_young_and_taken_over_when_old(tmp_path: Path) -> None:
    out = tmp_path / "out.zarr"
    lock = st.lock_path(out)
    lock.write_text("")  # a writer on a filesystem without hard links, between create and write
    with pytest.raises(StoreError, match="being written by another run"), st.store_lock(out):
        pass
    old = time.time() - 2 * st.UNREADABLE_LOCK_GRACE_S
    os.utime(lock, (old, old))
    with st.store_lock(out) as held:
        assert json.loads(held.read_text())["pid"] == os.getpid()
    assert not lock.exists()


def test_a_dead_writers_lock_is_taken_over_but_a_live_one_refused(tmp_path: Path) -> None:
    out = tmp_path / "out.zarr"
    lock = st.lock_path(out)
    host = socket.gethostname()
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    lock.write_text(json.dumps({"pid": int(dead.stdout), "host": host}))
    with st.store_lock(out):
        assert json.loads(lock.read_text()) == {"pid": os.getpid(), "host": host}
        with pytest.raises(StoreError, match=f"pid {os.getpid()} on {host}"), st.store_lock(out):
            pass
    assert sorted(path.name for path in tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------
# Faults on a cluster of worker processes


def _stack_with_switch(flag: Path, delay: float = 0.0) -> xr.DataArray:
    """make_stack's values read through a Dask task that fails while ``flag`` exists."""
    base = make_stack(n_time=N_DATES, shape=(40, 40))

    def read(block: np.ndarray) -> np.ndarray:
        if flag.exists():
            raise OSError(f"injected read failure ({flag.name})")
        time.sleep(delay)
        return block

    data = da.from_array(base.values, chunks=(1, -1, 20, 20)).map_blocks(read, dtype=base.dtype)
    return base.copy(data=data)


def test_a_task_that_always_fails_ends_with_a_spoc_error_and_no_marker(tmp_path: Path) -> None:
    flag = tmp_path / "fail"
    reference, out = tmp_path / "reference.zarr", tmp_path / "out.zarr"
    annotate_store(_stack_with_switch(flag), reference)
    stack = _stack_with_switch(flag, delay=0.02)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            with dask.config.set({st.BATCH_CONFIG_KEY: 1}):
                annotate_store(stack, out)
        except BaseException as exc:  # handed to the test thread
            errors.append(exc)

    worker = threading.Thread(target=run)
    worker.start()
    deadline = time.monotonic() + KILL_TIMEOUT_S
    while len(progress_of(out).get("done", [])) < 2 and worker.is_alive():
        assert time.monotonic() < deadline
        time.sleep(0.002)
    flag.touch()
    worker.join()
    assert len(errors) == 1 and isinstance(errors[0], SpocError), errors
    assert "injected read failure" in str(errors[0]) and "resume" in str(errors[0])
    assert not st.is_complete(out)
    flag.unlink()
    assert annotate_store(stack, out) == "resumed"
    assert_same_store(out, reference)


def test_a_task_failing_from_the_start_writes_no_store(tmp_path: Path) -> None:
    flag = tmp_path / "fail"
    flag.touch()
    out = tmp_path / "out.zarr"
    with pytest.raises(SpocError, match="injected read failure"):
        annotate_store(_stack_with_switch(flag), out)
    assert not st.is_complete(out)


def test_a_worker_killed_mid_annotate_changes_nothing(tmp_path: Path) -> None:
    from distributed import Client, LocalCluster

    flag = tmp_path / "never"
    reference, out = tmp_path / "reference.zarr", tmp_path / "out.zarr"
    annotate_store(_stack_with_switch(flag), reference)
    stack = _stack_with_switch(flag, delay=0.02)
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                     dashboard_address=":0") as cluster,
        Client(cluster) as client,
    ):  # fmt: skip
        errors: list[BaseException] = []

        def run() -> None:
            try:
                with dask.config.set({st.BATCH_CONFIG_KEY: 2}):
                    annotate_store(stack, out)
            except BaseException as exc:
                errors.append(exc)

        worker = threading.Thread(target=run)
        worker.start()
        deadline = time.monotonic() + KILL_TIMEOUT_S
        while len(progress_of(out).get("done", [])) < 2 and worker.is_alive():
            assert time.monotonic() < deadline
            time.sleep(0.002)
        victim = worker_addresses(client)[0]
        pid = client.run(os.getpid, workers=[victim])[victim]
        os.kill(pid, signal.SIGKILL)
        worker.join()
        assert not errors, errors
    assert st.is_complete(out)
    assert_same_store(out, reference)
