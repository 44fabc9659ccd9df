"""Stores in object storage: ``s3://`` URLs against moto's S3 server started on 127.0.0.1."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import dask
import numpy as np
import pytest
import xarray as xr

from spoc_xr.cli import _storage, build_parser, main
from spoc_xr.errors import OutputError, StoreError
from spoc_xr.ingest import ingest, open_stack
from spoc_xr.pipeline import annotate
from spoc_xr.store import (
    check_output_path,
    is_complete,
    is_url,
    mark_complete,
    open_store,
    remove_store,
    write_dataset,
)
from spoc_xr.synthetic import make_harbour

s3fs = pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

BUCKET = "spoc-test"
CHUNKS = 64


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    """moto's S3 on a free local port, with dummy credentials in the environment.

    The variables are the standard ones botocore reads, so worker processes started later (the
    CLI's local cluster) inherit them exactly as they would on a real deployment.
    """
    # One log line per request would bury a failure's report.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    with pytest.MonkeyPatch.context() as patch:
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
            patch.delenv(name, raising=False)
        patch.setenv("AWS_ACCESS_KEY_ID", "spoc-test-key")
        patch.setenv("AWS_SECRET_ACCESS_KEY", "spoc-test-secret")
        patch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        patch.setenv("AWS_ENDPOINT_URL", url)
        s3fs.S3FileSystem.clear_instance_cache()
        s3fs.S3FileSystem().mkdir(BUCKET)
        try:
            yield url
        finally:
            s3fs.S3FileSystem.clear_instance_cache()
            server.stop()


def small_dataset() -> xr.Dataset:
    cube = xr.DataArray(np.arange(30, dtype=np.int16).reshape(2, 3, 5), dims=("time", "y", "x"))
    return xr.Dataset({"cube": cube.chunk({"time": 1})}, attrs={"spoc_xr": {"kind": "test"}})


def test_is_url() -> None:
    assert is_url("s3://bucket/stack.zarr")
    assert is_url("file:///tmp/stack.zarr")
    assert not is_url("stack.zarr")
    assert not is_url("C:/data/stack.zarr")
    assert not is_url(Path("s3://bucket/stack.zarr"))  # a Path folds "//": a local path


def test_storage_option_flags_nest_dotted_keys() -> None:
    args = build_parser().parse_args(
        [
            "annotate",
            "s3://b/stack.zarr",
            "s3://b/out.zarr",
            "--storage-option",
            "anon=false",
            "--storage-option",
            "client_kwargs.endpoint_url=http://127.0.0.1:9000",
        ]
    )
    assert args.stack == "s3://b/stack.zarr" and isinstance(args.output, str)
    assert _storage(args) == {
        "anon": False,
        "client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"},
    }
    assert isinstance(build_parser().parse_args(["annotate", "a.zarr", "b.zarr"]).output, Path)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["ingest", "src", "s3://b/x.zarr", "--storage-option", "anon"])


def test_store_functions_on_s3(endpoint: str) -> None:
    url = f"s3://{BUCKET}/functions/cube.zarr"
    with pytest.raises(StoreError, match="no store"):
        open_store(url)
    assert not is_complete(url)
    assert check_output_path(url + "/", overwrite=False) == url
    pending = write_dataset(small_dataset(), url, overwrite=False, compute=False)
    assert pending is not None
    assert not is_complete(url)  # metadata only: not complete before the chunks are written
    with pytest.raises(StoreError, match="incomplete"):
        open_store(url)
    dask.compute(pending)
    mark_complete(url)
    assert is_complete(url)
    np.testing.assert_array_equal(
        open_store(url, kind="test")["cube"].values, np.arange(30).reshape(2, 3, 5)
    )
    with pytest.raises(OutputError, match="exists"):
        check_output_path(url, overwrite=False)
    with pytest.raises(OutputError, match="exists"):
        write_dataset(small_dataset(), url, overwrite=False)
    with pytest.raises(OutputError, match="also an input"):
        check_output_path(url, inputs=[url], overwrite=True)
    with pytest.raises(OutputError, match="inside the input"):
        check_output_path(url + "/sub.zarr", inputs=[url], overwrite=True)
    # Replacing leaves nothing of the old store behind (no stale chunks or marker).
    write_dataset(small_dataset().isel(time=[0]), url, overwrite=True)
    assert open_store(url)["cube"].shape == (1, 3, 5)
    remove_store(url)
    assert not s3fs.S3FileSystem().exists(f"{BUCKET}/functions/cube.zarr")
    remove_store(url)  # already gone: no error


def test_foreign_prefix_is_never_replaced(endpoint: str) -> None:
    fs = s3fs.S3FileSystem()
    fs.pipe(f"{BUCKET}/foreign/notes.txt", b"keep me")
    url = f"s3://{BUCKET}/foreign"
    with pytest.raises(OutputError, match="not a Zarr store"):
        check_output_path(url, overwrite=True)
    with pytest.raises(OutputError, match="not a Zarr store"):
        remove_store(url)
    with pytest.raises(OutputError, match="not a Zarr store"):
        write_dataset(small_dataset(), url, overwrite=True)
    assert fs.cat(f"{BUCKET}/foreign/notes.txt") == b"keep me"


def test_explicit_storage_options(endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Without the environment's endpoint and keys, the options alone must reach the server.
    for name in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    options = {
        "key": "spoc-test-key",
        "secret": "spoc-test-secret",
        "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
    }
    url = f"s3://{BUCKET}/options/cube.zarr"
    write_dataset(small_dataset(), url, overwrite=False, storage_options=options)
    assert is_complete(url, storage_options=options)
    reread = open_store(url, storage_options=options)
    np.testing.assert_array_equal(reread["cube"].values, np.arange(30).reshape(2, 3, 5))


@pytest.mark.slow
def test_cli_ingest_and_annotate_on_s3(
    endpoint: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    make_harbour(tmp_path / "harbour", n_dates=4, shape=(128, 128))
    images = tmp_path / "harbour" / "images"
    with dask.config.set(scheduler="threads"):
        local_stack = ingest(images, tmp_path / "stack.zarr", chunks=CHUNKS)
        write_dataset(annotate(local_stack), tmp_path / "out.zarr", overwrite=False)

    stack_url, out_url = f"s3://{BUCKET}/run/stack.zarr", f"s3://{BUCKET}/run/out.zarr"
    monkeypatch.chdir(tmp_path)  # the report of a URL store goes to the current folder
    # One worker process: it writes the chunks itself with the credentials of its environment.
    local = ["--workers", "1"]
    assert main(["ingest", str(images), stack_url, "--chunks", str(CHUNKS), *local]) == 0
    assert main(["annotate", stack_url, out_url, *local]) == 0
    printed = capsys.readouterr().out
    assert out_url in printed
    assert (tmp_path / "out_report" / "report.html").is_file()

    assert is_complete(stack_url) and is_complete(out_url)
    xr.testing.assert_identical(open_stack(stack_url).load(), local_stack.load())
    remote, reference = open_store(out_url).load(), open_store(tmp_path / "out.zarr").load()
    assert set(remote.variables) == set(reference.variables)
    for name in remote.variables:
        xr.testing.assert_equal(remote[name], reference[name])
    assert int((remote["mask"] == 1).sum()) > 0  # boats were found: a real comparison
    # A second run without --overwrite is refused before any work.
    assert main(["annotate", stack_url, out_url, "--no-report", *local]) == 2
    assert "exists" in capsys.readouterr().err
    assert os.environ["AWS_ENDPOINT_URL"] == endpoint
