"""spoc-xr on a real Dask cluster: scheduler and two workers in their own processes, plain and TLS.

Each cluster is started with the ``dask scheduler`` / ``dask worker`` programs of this venv on
127.0.0.1 and killed (whole process group) when the module's tests are done.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import dask
import dask.array as da
import numpy as np
import pytest
import xarray as xr
from distributed import Client, Security, get_task_stream

from spoc_xr import cluster as spoc_cluster
from spoc_xr.cli import main
from spoc_xr.cluster import OPENCV_THREADS, dask_client
from spoc_xr.errors import ParameterError, SpocError
from spoc_xr.ingest import ingest, open_stack
from spoc_xr.pipeline import annotate
from spoc_xr.store import GIL_SWITCH_INTERVAL, open_store, write_dataset
from spoc_xr.synthetic import make_harbour
from tests.helpers import worker_addresses

pytestmark = pytest.mark.slow

#: Seconds a scheduler or two workers may take to come up on a busy two-core machine.
START_TIMEOUT = 60
#: Four spatial chunks per 128 x 128 date: several tasks for each of the two workers.
CHUNKS = 64
N_WORKERS = 2


@dataclass
class ProcessCluster:
    address: str
    security: Security | None
    files: dict[str, Path]


def _stop(processes: list[subprocess.Popen[bytes]]) -> None:
    # SIGKILL: a gracefully closing worker waits seconds for its scheduler, and these clusters
    # hold nothing worth saving. Each process leads its own group, so children die too.
    for proc in processes:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    for proc in processes:
        proc.wait(timeout=30)


def _logs(folder: Path) -> str:
    return "\n".join(f"--- {log.name}\n{log.read_text()}" for log in sorted(folder.glob("*.log")))


@contextlib.contextmanager
def process_cluster(folder: Path, *, tls: bool) -> Iterator[ProcessCluster]:
    """A ``dask scheduler`` and two ``dask worker`` processes on 127.0.0.1 (TLS-only if ``tls``)."""
    folder.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    tls_args: list[str] = []
    security = None
    files: dict[str, Path] = {}
    if tls:
        # One self-signed certificate for every role (distributed's own recipe), written to
        # files the way a mounted Kubernetes secret provides them.
        temporary = Security.temporary()
        files = {"ca": folder / "ca.pem", "cert": folder / "tls.crt", "key": folder / "tls.key"}
        files["ca"].write_text(temporary.tls_ca_file)
        files["cert"].write_text(temporary.tls_scheduler_cert)
        files["key"].write_text(temporary.tls_scheduler_key)
        tls_args = [
            "--tls-ca-file",
            str(files["ca"]),
            "--tls-cert",
            str(files["cert"]),
            "--tls-key",
            str(files["key"]),
        ]
        env["DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION"] = "True"
        security = Security(
            tls_ca_file=str(files["ca"]),
            tls_client_cert=str(files["cert"]),
            tls_client_key=str(files["key"]),
            require_encryption=True,
        )
    scheduler_file = folder / "scheduler.json"
    protocol = "tls" if tls else "tcp"
    commands = [
        [
            "distributed.cli.dask_scheduler",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--protocol",
            protocol,
            "--no-dashboard",
            "--scheduler-file",
            str(scheduler_file),
            *tls_args,
        ]
    ]
    commands.extend(
        [
            [
                "distributed.cli.dask_worker",
                "--scheduler-file",
                str(scheduler_file),
                "--host",
                "127.0.0.1",
                "--protocol",
                protocol,
                "--nthreads",
                "1",
                "--no-nanny",
                "--no-dashboard",
                "--memory-limit",
                "1GB",
                "--name",
                f"worker-{index}",
                "--local-directory",
                str(folder / f"worker-{index}"),
                *tls_args,
            ]
            for index in range(N_WORKERS)
        ]
    )
    processes: list[subprocess.Popen[bytes]] = []
    try:
        for index, command in enumerate(commands):
            with (folder / f"process-{index}.log").open("wb") as log:
                # A session of its own, so the finaliser can kill the whole process group.
                processes.append(
                    subprocess.Popen(
                        [sys.executable, "-m", *command],
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        env=env,
                        cwd=folder,
                        start_new_session=True,
                    )
                )
            if index == 0:  # workers read the address from the scheduler file
                deadline = time.monotonic() + START_TIMEOUT
                while not (scheduler_file.exists() and scheduler_file.stat().st_size):
                    if processes[0].poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"the scheduler did not start:\n{_logs(folder)}")
                    time.sleep(0.1)
        address = json.loads(scheduler_file.read_text())["address"]
        with Client(address, security=security, timeout="30s") as client:
            try:
                client.wait_for_workers(N_WORKERS, timeout=START_TIMEOUT)
            except TimeoutError as err:
                raise RuntimeError(f"the workers did not start:\n{_logs(folder)}") from err
        yield ProcessCluster(address=address, security=security, files=files)
    finally:
        _stop(processes)


@pytest.fixture(scope="module")
def harbour(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("harbour")
    make_harbour(root, n_dates=4, shape=(128, 128))
    return root / "images"


@pytest.fixture(scope="module")
def local_run(harbour: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Stack and annotation stores of an in-process run on Dask's threads (no distributed).

    Cheaper than the CLI's local cluster (worker processes take seconds to start) and the same
    graphs; the CLI additionally stores its noise model, so comparisons use common variables.
    """
    root = tmp_path_factory.mktemp("local")
    with dask.config.set(scheduler="threads"):
        stack = ingest(harbour, root / "stack.zarr", chunks=CHUNKS)
        write_dataset(annotate(stack), root / "out.zarr", overwrite=False)
    return root / "stack.zarr", root / "out.zarr"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProcessCluster]:
    with process_cluster(tmp_path_factory.mktemp("cluster"), tls=False) as running:
        yield running


def assert_same_store(
    a: Path | str,
    b: Path | str,
    *,
    storage_options: dict[str, Any] | None = None,
    required: Collection[str] = (),
    same_variables: bool = True,
) -> None:
    """Variables and coordinates equal value for value; attributes may differ (timestamps).

    ``a`` may be a URL (opened with ``storage_options``). With ``same_variables`` False only the
    variables both stores hold are compared (the resumable local writer also stores its noise
    model), and ``required`` must be among them.
    """
    left = open_store(a, storage_options=storage_options).load()
    right = open_store(b).load()
    if same_variables:
        assert set(left.variables) == set(right.variables)
    common = set(left.variables) & set(right.variables)
    assert set(required) <= common
    for name in common:
        xr.testing.assert_equal(left[name], right[name])
    assert left.attrs["spoc_xr"]["kind"] == right.attrs["spoc_xr"]["kind"]


def test_cli_on_scheduler_matches_local_run(
    cluster: ProcessCluster,
    harbour: Path,
    local_run: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    stack, out = tmp_path / "stack.zarr", tmp_path / "out.zarr"
    options = ["--scheduler", cluster.address]
    with Client(cluster.address) as monitor, get_task_stream(monitor) as stream:
        assert main(["ingest", str(harbour), str(stack), "--chunks", str(CHUNKS), *options]) == 0
        assert main(["annotate", str(stack), str(out), "--no-report", *options]) == 0
        workers = set(worker_addresses(monitor))
    # Both worker processes read GeoTIFFs and wrote chunks: the client funnelled nothing.
    assert {task["worker"] for task in stream.data} == workers
    assert any(task["key"].startswith("read-geotiffs") for task in _keys(stream.data))
    printed = capsys.readouterr().out
    assert "LocalCluster" not in printed  # the existing scheduler ran it, no local cluster
    assert_same_store(stack, local_run[0], required=("stack",))
    assert_same_store(out, local_run[1], required=("mask", "heatmap"), same_variables=False)
    mask = open_store(out)["mask"]
    assert {0, 1} <= set(mask.values.ravel().tolist())  # boats were found: a real comparison
    with Client(cluster.address) as client:
        # Built-in functions pickle by name: the workers cannot import this test module.
        assert client.run(cv2.getNumThreads) == dict.fromkeys(
            worker_addresses(client), OPENCV_THREADS
        )


def _keys(tasks: list[dict[str, object]]) -> list[dict[str, str]]:
    # Task keys are tuples ("name", i, j, ...) or strings; the name is what identifies a step.
    return [
        {"key": str(task["key"][0] if isinstance(task["key"], tuple) else task["key"])}
        for task in tasks
    ]


def test_python_api_uses_the_current_client(
    cluster: ProcessCluster, harbour: Path, local_run: tuple[Path, Path], tmp_path: Path
) -> None:
    # No spoc_xr helper in between: a plain Client made current is what the library computes on.
    with Client(cluster.address) as client, get_task_stream(client) as stream:
        stack = open_stack(local_run[0])
        write_dataset(annotate(stack), tmp_path / "api.zarr", overwrite=False)
        workers = set(worker_addresses(client))
    assert {task["worker"] for task in stream.data} == workers
    assert_same_store(tmp_path / "api.zarr", local_run[1], required=("mask", "heatmap"))


def test_scheduler_refuses_local_sizing() -> None:
    refused = pytest.raises(ParameterError, match="--workers")
    with refused, dask_client(scheduler="tcp://127.0.0.1:1", workers=2):
        pass


@pytest.mark.parametrize(
    ("address", "needle"),
    [
        ("127.0.0.1", "missing port"),
        ("myscheduler", "missing port"),
        ("http://127.0.0.1:8787", "http:// is no Dask comm"),
    ],
)
def test_an_address_that_names_no_scheduler_is_refused_before_connecting(address, needle):
    with pytest.raises(ParameterError, match=needle), dask_client(scheduler=address):
        pass


def test_a_port_that_never_answers_is_given_up_on(monkeypatch: pytest.MonkeyPatch) -> None:
    # A port that accepts connections and never speaks Dask's protocol (the dashboard's, given
    # for the scheduler's) held the client past its own timeout.
    monkeypatch.setattr(spoc_cluster, "CONNECT_SECONDS", 1)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        address = f"tcp://127.0.0.1:{server.getsockname()[1]}"
        started = time.perf_counter()
        with pytest.raises(SpocError, match="not its dashboard"), dask_client(scheduler=address):
            pass
    assert time.perf_counter() - started < 15


# ------------------------------------------------------------------------------------------ TLS


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProcessCluster]:
    with process_cluster(tmp_path_factory.mktemp("tls"), tls=True) as running:
        yield running


def test_tls_scheduler_refuses_plain_tcp(tls_cluster: ProcessCluster) -> None:
    assert tls_cluster.address.startswith("tls://127.0.0.1:")
    plain = tls_cluster.address.replace("tls://", "tcp://")
    with pytest.raises(OSError):
        Client(plain, timeout="3s")
    # TLS without a client certificate is refused too: the scheduler requires one.
    host, port = tls_cluster.address.removeprefix("tls://").rsplit(":", 1)
    context = ssl.create_default_context(cafile=str(tls_cluster.files["ca"]))
    context.check_hostname = False  # distributed's certificates name roles, not hosts
    with (
        socket.create_connection((host, int(port)), timeout=5) as raw,
        context.wrap_socket(raw) as tls,
        pytest.raises((ssl.SSLError, ConnectionError)),
    ):
        tls.sendall(b"\0" * 8)
        if not tls.recv(1):  # TLS 1.3 reports the missing certificate on the first read
            raise ConnectionResetError("closed by the scheduler")


def test_tls_client_with_certificate_runs_spoc_xr(
    tls_cluster: ProcessCluster, harbour: Path, local_run: tuple[Path, Path], tmp_path: Path
) -> None:
    # The same keys as the DASK_DISTRIBUTED__COMM__TLS__* variables of deploy/README.md.
    config = {
        "distributed.comm.require-encryption": True,
        "distributed.comm.tls.ca-file": str(tls_cluster.files["ca"]),
        "distributed.comm.tls.client.cert": str(tls_cluster.files["cert"]),
        "distributed.comm.tls.client.key": str(tls_cluster.files["key"]),
    }
    stack = tmp_path / "stack.zarr"
    with dask.config.set(config):
        args = [str(harbour), str(stack), "--chunks", str(CHUNKS)]
        assert main(["ingest", *args, "--scheduler", tls_cluster.address]) == 0
    assert_same_store(stack, local_run[0], required=("stack",))


def test_worker_plugins_set_opencv_threads_and_malloc_thresholds() -> None:
    import cv2

    from spoc_xr.cluster import dask_client, set_malloc_thresholds

    assert set_malloc_thresholds()  # glibc here: mallopt accepts both thresholds
    with dask_client(workers=1, threads_per_worker=1, quiet=True) as client:
        plugins = client.run(lambda dask_worker: sorted(dask_worker.plugins))
        threads = client.run(cv2.getNumThreads)
        intervals = client.run(sys.getswitchinterval)
    (names,) = plugins.values()
    assert "spoc-xr-large-array-malloc" in names
    assert "spoc-xr-opencv-threads" in names
    assert "spoc-xr-quick-gil-handoff" in names
    assert list(threads.values()) == [1]
    assert list(intervals.values()) == [pytest.approx(GIL_SWITCH_INTERVAL)]


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _fail_with_disk_full() -> None:
    raise OSError(28, "No space left on device")


def test_a_local_clusters_failed_task_is_not_logged_with_a_traceback_but_still_raised() -> None:
    from distributed.worker import logger as worker_logger

    records = _Records()
    worker_logger.addHandler(records)
    try:
        # Threads in this process: the worker's log records reach the handler above.
        with dask_client(workers=1, processes=False, quiet=True) as client:
            with pytest.raises(OSError, match="No space left"):
                client.submit(_fail_with_disk_full, pure=False).result()
            # Other worker warnings still get through.
            client.run(lambda: logging.getLogger("distributed.worker").warning("memory is high"))
    finally:
        worker_logger.removeHandler(records)
    assert not any(m.startswith("Compute Failed") for m in records.messages), records.messages
    assert "memory is high" in records.messages


def _blas_threads() -> list[int]:
    from threadpoolctl import threadpool_info

    return [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]


def test_threaded_writes_shorten_the_gil_interval_and_restore_it(tmp_path: Path) -> None:
    from threadpoolctl import threadpool_limits

    seen: list[tuple[float, list[int]]] = []

    def record(block: np.ndarray) -> np.ndarray:
        seen.append((sys.getswitchinterval(), _blas_threads()))
        return block

    data = da.zeros((4, 4), chunks=2).map_blocks(record, meta=np.empty((0, 0)))
    before = sys.getswitchinterval()
    # Two BLAS threads outside, whatever the machine, so that the limit inside is visible.
    with threadpool_limits(limits=2, user_api="blas"):
        blas_before = _blas_threads()
        out = tmp_path / "out.zarr"
        write_dataset(xr.Dataset({"v": (("y", "x"), data)}), out, overwrite=False)
        assert _blas_threads() == blas_before
    assert blas_before and set(blas_before) == {2}  # numpy's OpenBLAS is loaded
    assert seen == [(pytest.approx(GIL_SWITCH_INTERVAL), [1] * len(blas_before))] * len(seen)
    assert seen != []
    assert sys.getswitchinterval() == before


@pytest.mark.parametrize(
    ("limit", "expected"),
    [(None, 0), (2**60, 0), (1, 1)],
    ids=["no limit", "far below the limit", "above the share"],
)
def test_free_heap_is_given_back_only_when_the_worker_nears_its_limit(
    limit: int | None, expected: int
) -> None:
    from types import SimpleNamespace

    from spoc_xr.cluster import LargeArrayMalloc

    plugin = LargeArrayMalloc()
    plugin.setup(SimpleNamespace(memory_manager=SimpleNamespace(memory_limit=limit)))
    if plugin._trim is None:
        pytest.skip("the C library is not glibc: nothing to trim")
    calls: list[int] = []
    plugin._trim = calls.append
    plugin.transition("a", "waiting", "ready")  # not the end of a task
    assert calls == []
    # A trim after every task faulted every temporary of the next task in again.
    plugin.transition("a", "executing", "memory")
    assert len(calls) == expected
