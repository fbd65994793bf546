"""The notebooks run top to bottom, in a fresh kernel, on a machine without a GPU.

Each notebook runs from notebooks/ (so "../benchmarks" resolves) with MPLBACKEND=Agg, in a kernel
started by this interpreter (so it sees the same packages), and fails on any cell error.
"""
import os
import pathlib

import pytest

NOTEBOOKS = pathlib.Path(__file__).resolve().parent.parent / "notebooks"
ROOT = NOTEBOOKS.parent
CELL_TIMEOUT_S = 300


def _require(module):
    return pytest.importorskip(module, reason=f"executing the notebooks needs {module} (pip install {module})")


@pytest.mark.parametrize("name", ["what_msa_selects.ipynb", "how_fast.ipynb"])
def test_notebook_runs(name, tmp_path, monkeypatch):
    nbformat = _require("nbformat")
    nbclient = _require("nbclient")
    _require("ipykernel")
    _require("matplotlib")
    from ipykernel.kernelspec import write_kernel_spec

    # a kernelspec for this very interpreter, found through JUPYTER_PATH
    kernel_name = "msa-cupy-test"
    write_kernel_spec(str(tmp_path / "kernels" / kernel_name))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))

    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=CELL_TIMEOUT_S, kernel_name=kernel_name,
        resources={"metadata": {"path": str(NOTEBOOKS)}},
    )
    client.execute()  # raises CellExecutionError, naming the cell, on the first error
    errors = [out for cell in notebook.cells if cell.cell_type == "code"
              for out in cell.get("outputs", []) if out.get("output_type") == "error"]
    assert not errors, errors
