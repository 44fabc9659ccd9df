"""The notebooks run top to bottom in the project's own Python, and are kept without outputs."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).parents[1] / "notebooks").glob("*.ipynb"))
# Each notebook should take well under a minute on the small synthetic stack; 120 s per cell
# leaves room for a busy CI machine without hiding a notebook that hangs.
CELL_TIMEOUT_S = 120
NOTEBOOK_BUDGET_S = 120


def execute(notebook: nbformat.NotebookNode, cwd: Path) -> None:
    # "python3" resolves to ipykernel's spec, whose argv[0] "python" jupyter_client replaces
    # with sys.executable: the kernel runs in this virtual environment, with spoc_xr installed.
    client = NotebookClient(
        notebook,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(cwd)}},
    )
    client.execute()


def test_there_are_three_notebooks() -> None:
    assert [p.name for p in NOTEBOOKS] == [
        "01_explore_time_stack.ipynb",
        "02_boat_routes.ipynb",
        "03_training_data.ipynb",
    ]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stored_without_outputs(path: Path) -> None:
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    assert notebook.metadata.kernelspec.name == "python3"
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, cell.source[:60]


def test_kernel_is_this_python(tmp_path: Path) -> None:
    notebook = nbformat.v4.new_notebook(
        cells=[nbformat.v4.new_code_cell("import sys, spoc_xr; print(sys.executable)")]
    )
    execute(notebook, tmp_path)
    printed = notebook.cells[0].outputs[0]["text"].strip()
    assert Path(printed).resolve() == Path(sys.executable).resolve()


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom(path: Path, tmp_path: Path) -> None:
    notebook = nbformat.read(path, as_version=4)
    started = time.perf_counter()
    execute(notebook, tmp_path)
    assert time.perf_counter() - started < NOTEBOOK_BUDGET_S
    images = [
        output
        for cell in notebook.cells
        for output in cell.get("outputs", [])
        if "image/png" in output.get("data", {})
    ]
    # Every notebook is about pictures: a figure that silently fails to display is a failure.
    assert images
