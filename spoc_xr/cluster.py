"""Where the graphs run: a LocalCluster sized to the machine, or an existing Dask scheduler.

The library never needs this module: :func:`spoc_xr.pipeline.annotate`, :func:`spoc_xr.ingest`
and :func:`spoc_xr.store.write_dataset` build ordinary Dask graphs and compute them with whatever
scheduler is current, so a ``distributed.Client`` you created (``Client("tls://...")`` or
``with Client(cluster):``) runs them, as Dask users expect; without one, Dask's threaded scheduler
does. :func:`dask_client` is what the command line uses to get such a client.

Stores may be fsspec URLs (``s3://bucket/stack.zarr``): the workers then read and write the chunks
themselves and the client only handles metadata. GeoTIFF input folders must be visible to every
worker at the same path (a shared or network file system) because each read task opens its file.

OpenCV runs its own thread pool inside every call, which fights the worker's threads;
:func:`dask_client` therefore registers :class:`OpenCVSingleThread`, a worker plugin that calls
``cv2.setNumThreads(1)`` on every current and future worker, and :class:`LargeArrayMalloc`, which
keeps glibc from mapping and unmapping every tile-sized temporary (2x faster workers), and
:class:`QuickGilHandoff`, which keeps Zarr's I/O thread from waiting behind tile tasks. With your
own client, do the same with ``register_worker_plugins(client)``. A local cluster's workers also
get :class:`QuietFailedTasks`: they share the terminal, where a failed task's traceback log would
come before the command's one-line error.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from collections.abc import Iterator
from typing import Any

import psutil
from distributed.diagnostics.plugin import WorkerPlugin

from spoc_xr.errors import ParameterError, SpocError

SCHEDULER_ENV = "SPOC_XR_SCHEDULER"
#: One OpenCV thread per call: the Dask worker already runs one task per core.
OPENCV_THREADS = 1


class OpenCVSingleThread(WorkerPlugin):
    """Worker plugin: ``cv2.setNumThreads(1)`` on every worker, so OpenCV does not oversubscribe.

    Examples
    --------
    >>> client.register_plugin(OpenCVSingleThread())  # doctest: +SKIP
    """

    name = "spoc-xr-opencv-threads"
    idempotent = True

    def setup(self, worker: Any) -> None:
        import cv2

        cv2.setNumThreads(OPENCV_THREADS)


class LargeArrayMalloc(WorkerPlugin):
    """Worker plugin: let glibc keep the per-tile temporaries (1-30 MB arrays) on its heap.

    Dask's nanny starts workers with ``MALLOC_TRIM_THRESHOLD_=65536`` so that freed memory goes
    back to the system. Setting it also freezes glibc's mmap threshold at 128 kB, so every numpy
    temporary of a tile is a fresh ``mmap``, page-faulted in and unmapped again: measured here,
    annotate ran 2.2x slower in a worker process than in a thread of the client (49 s against
    22 s for 40 dates of 2048²). This plugin raises both thresholds with ``mallopt`` (mmap above
    MMAP_THRESHOLD, trim beyond TRIM_THRESHOLD of free heap), so a task reuses the memory it
    frees. When a task ends and the worker's resident memory is above TRIM_SHARE of its memory
    limit, ``malloc_trim`` gives the free heap back to the system, so unmanaged memory does not
    grow towards Dask's spill and pause thresholds (without any trim: 10 GB of spill writes for a
    4 GB stack on 2 x 2 GB workers, 0.8 GB with it). Below that share nothing is trimmed: a trim
    after every task made the next task fault all of its temporaries in again (16 dates of 2048²
    on one worker: 614k page faults against 62k, 4.4 s of system time against 1.4, 17.3 s
    against 12.7 s). A no-op where the C library is not glibc.

    Examples
    --------
    >>> client.register_plugin(LargeArrayMalloc())  # doctest: +SKIP
    """

    name = "spoc-xr-large-array-malloc"
    idempotent = True

    def setup(self, worker: Any) -> None:
        self._trim = malloc_trim_function() if set_malloc_thresholds() else None
        limit = getattr(getattr(worker, "memory_manager", None), "memory_limit", None)
        self._trim_above = int(limit * TRIM_SHARE) if limit else None
        self._process = psutil.Process()

    def transition(self, key: Any, start: str, finish: str, **kwargs: Any) -> None:
        if start != "executing" or self._trim is None or self._trim_above is None:
            return
        if self._process.memory_info().rss > self._trim_above:
            self._trim(0)


#: Share of a worker's memory limit above which :class:`LargeArrayMalloc` gives free heap back to
#: the system after a task (Dask starts spilling at 0.7 of the limit in resident memory).
TRIM_SHARE = 0.5


class QuickGilHandoff(WorkerPlugin):
    """Worker plugin: a short GIL switch interval, so Zarr's I/O thread is not starved.

    See :data:`spoc_xr.store.GIL_SWITCH_INTERVAL`: the worker's threads run CPU-bound tile tasks
    while Zarr's asyncio loop (and the worker's own event loop) need the GIL for many short steps.

    Examples
    --------
    >>> client.register_plugin(QuickGilHandoff())  # doctest: +SKIP
    """

    name = "spoc-xr-quick-gil-handoff"
    idempotent = True

    def setup(self, worker: Any) -> None:
        from spoc_xr.store import GIL_SWITCH_INTERVAL

        sys.setswitchinterval(min(sys.getswitchinterval(), GIL_SWITCH_INTERVAL))


class QuietFailedTasks(WorkerPlugin):
    """Worker plugin for local clusters: no "Compute Failed" log with a traceback per failed task.

    The failure comes back to the client, which re-raises it, and the command line then prints
    one line naming the cause and the fix (a full disk, say); the workers of a LocalCluster share
    that terminal, where their multi-kB log came first. Other worker warnings (memory) stay.

    Examples
    --------
    >>> client.register_plugin(QuietFailedTasks())  # doctest: +SKIP
    """

    name = "spoc-xr-quiet-failed-tasks"
    idempotent = True

    def setup(self, worker: Any) -> None:
        logger = logging.getLogger("distributed.worker")
        if not any(isinstance(f, _DropFailedTaskRecords) for f in logger.filters):
            logger.addFilter(_DropFailedTaskRecords())


class _DropFailedTaskRecords(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Compute Failed")


# glibc's mallopt parameters (malloc.h) and the values spoc-xr workers use.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 64 * 2**20
TRIM_THRESHOLD = 128 * 2**20


def _glibc() -> Any | None:
    """The C library when it offers glibc's malloc tuning (``mallopt``, ``malloc_trim``)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt, libc.malloc_trim  # noqa: B018  (absent outside glibc)
    except (OSError, AttributeError):  # not glibc (macOS, musl)
        return None
    return libc


def set_malloc_thresholds() -> bool:
    """Raise glibc's mmap and trim thresholds in this process; False where that is impossible."""
    libc = _glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )


def malloc_trim_function() -> Any | None:
    """glibc's ``malloc_trim`` (gives free heap pages back to the system), or None."""
    libc = _glibc()
    return None if libc is None else libc.malloc_trim


def register_worker_plugins(client: Any) -> None:
    """Register spoc-xr's worker plugins (OpenCV threads, malloc, GIL handoff) on ``client``."""
    client.register_plugin(OpenCVSingleThread())
    client.register_plugin(LargeArrayMalloc())
    client.register_plugin(QuickGilHandoff())


def parse_memory_limit(value: str | None) -> str | None:
    """Check a ``--memory-limit`` value such as ``"2GB"`` or ``"auto"`` (None: Dask's default)."""
    if value is None:
        return None
    from dask.utils import parse_bytes

    if value == "auto":
        return value
    try:
        parse_bytes(value)
    except (ValueError, TypeError) as err:
        raise ParameterError(
            f"memory limit {value!r} is not a size; pass e.g. --memory-limit 2GB"
        ) from err
    return value


@contextlib.contextmanager
def dask_client(
    *,
    scheduler: str | None = None,
    workers: int | None = None,
    threads_per_worker: int | None = None,
    memory_limit: str | None = None,
    processes: bool = True,
    quiet: bool = False,
) -> Iterator[Any]:
    """Yield a ``distributed.Client``: to ``scheduler`` if given, else to a new LocalCluster.

    The scheduler address may also come from the ``SPOC_XR_SCHEDULER`` environment variable. A
    local cluster listens on 127.0.0.1 only, with its dashboard on a free local port. For a
    ``tls://`` scheduler the certificates come from Dask's configuration (for example the
    ``DASK_DISTRIBUTED__COMM__TLS__CA_FILE``, ``..._CLIENT__CERT`` and ``..._CLIENT__KEY``
    environment variables; see deploy/README.md). Either way the workers get
    :class:`OpenCVSingleThread`, and the client is the current one while the block runs.

    Examples
    --------
    >>> with dask_client(workers=2, memory_limit="2GB") as client:  # doctest: +SKIP
    ...     print(client.dashboard_link)
    """
    from distributed import Client, LocalCluster

    address = scheduler or os.environ.get(SCHEDULER_ENV) or None
    if address:
        if workers is not None or memory_limit is not None:
            raise ParameterError(
                "--workers and --memory-limit size a local cluster; they cannot be used with "
                "--scheduler (size the remote cluster where it runs)"
            )
        client = _connect(check_scheduler_address(address))
        try:
            register_worker_plugins(client)
            yield client
        finally:
            client.close()
        return
    n_cores = os.cpu_count() or 1
    n_workers = workers if workers is not None else min(n_cores, 4)
    if n_workers < 1:
        raise ParameterError(f"--workers {n_workers} must be at least 1")
    threads = threads_per_worker or max(1, n_cores // n_workers)
    cluster_kwargs: dict[str, Any] = {
        "n_workers": n_workers,
        "threads_per_worker": threads,
        "processes": processes,
        "dashboard_address": "127.0.0.1:0",
    }
    if processes:
        # Threads in this process talk in memory (inproc://), which takes no host.
        cluster_kwargs["host"] = "127.0.0.1"
    if memory_limit is not None:
        cluster_kwargs["memory_limit"] = parse_memory_limit(memory_limit)
    with LocalCluster(**cluster_kwargs) as cluster, Client(cluster) as client:
        register_worker_plugins(client)
        client.register_plugin(QuietFailedTasks())
        if not quiet:
            print(
                f"Dask LocalCluster: {n_workers} worker(s) x {threads} thread(s) at "
                f"{cluster.scheduler_address}, dashboard {client.dashboard_link}"
            )
        yield client


#: Schemes of the Dask comms that reach a scheduler over a network.
NETWORK_SCHEMES = ("tcp", "tls", "ws", "wss", "ucx")
#: Seconds to wait for a scheduler to answer.
CONNECT_SECONDS = 20


def check_scheduler_address(address: str) -> str:
    """``address`` if it can name a Dask scheduler (``[tcp://]HOST:PORT``, ``tls://``, ...),
    else a :class:`ParameterError` that says what one looks like.

    Examples
    --------
    >>> check_scheduler_address("tcp://10.0.0.5:8786")
    'tcp://10.0.0.5:8786'
    >>> try:
    ...     check_scheduler_address("10.0.0.5")
    ... except ParameterError as err:
    ...     print(str(err)[:61])
    scheduler address '10.0.0.5' names no Dask scheduler (missing
    """
    from distributed.comm.addressing import parse_address, parse_host_port

    try:
        scheme, location = parse_address(address)
        if scheme in NETWORK_SCHEMES:
            parse_host_port(location)
        elif scheme != "inproc":
            raise ValueError(f"{scheme}:// is no Dask comm")
    except ValueError as err:
        raise ParameterError(
            f"scheduler address {address!r} names no Dask scheduler ({err}): give "
            "tcp://HOST:PORT (port 8786 by default; tls:// with TLS), as the scheduler prints it "
            f"at start, not its dashboard's http:// link (--scheduler or {SCHEDULER_ENV})"
        ) from err
    return address


def _connect(address: str) -> Any:
    """A ``distributed.Client`` of the scheduler at ``address``, or a :class:`SpocError` within
    about ``CONNECT_SECONDS``. The client's own timeout covers the connection, not the
    handshake: a port that accepts the connection but speaks another protocol (the dashboard's
    8787 given for the scheduler's 8786) held it forever, so it is built in a thread of its own
    that is given up on."""
    from distributed import Client

    outcome: dict[str, Any] = {}

    def connect() -> None:
        try:
            outcome["client"] = Client(address, timeout=f"{CONNECT_SECONDS}s")
        except BaseException as err:  # handed to the caller below
            outcome["error"] = err

    thread = threading.Thread(target=connect, name="spoc-xr-connect", daemon=True)
    thread.start()
    thread.join(CONNECT_SECONDS + 5)
    hint = (
        f"check the address: the scheduler's, as it prints it at start (tcp://HOST:8786 by "
        f"default), not its dashboard's (8787); or unset {SCHEDULER_ENV}"
    )
    if thread.is_alive():
        raise SpocError(
            f"the Dask scheduler at {address!r} did not answer within {CONNECT_SECONDS + 5} s; "
            + hint
        )
    error = outcome.get("error")
    if isinstance(error, (OSError, ValueError, TimeoutError)):
        raise SpocError(
            f"cannot reach the Dask scheduler at {address!r}: {error}; " + hint
        ) from error
    if error is not None:
        raise error
    return outcome["client"]


def active_client() -> Any | None:
    """The current ``distributed.Client`` if one is running, else None."""
    try:
        from distributed import get_client

        return get_client()
    except (ImportError, ValueError):
        return None
