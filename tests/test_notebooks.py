"""Every notebook under notebooks/ runs top to bottom in a fresh kernel (nbclient), in a temp working directory.

The kernel is the Python running the tests (a kernelspec written for the test), so the notebooks see this checkout's
packages. Skipped, with the reason, when nbclient/ipykernel are missing or no kernel can be started.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).parents[1] / "notebooks").glob("*.ipynb"))
KERNEL = "cycles-tests"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nbformat = pytest.importorskip("nbformat", reason="nbformat is not installed (pip install -e '.[dev]')")
    nbclient = pytest.importorskip("nbclient", reason="nbclient is not installed (pip install -e '.[dev]')")
    pytest.importorskip("ipykernel", reason="ipykernel is not installed (pip install -e '.[dev]')")

    spec = tmp_path / "jupyter" / "kernels" / KERNEL
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": KERNEL, "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    for name in [n for n in os.environ if n.startswith("CYCLES_")]:  # the notebook picks its own store
        monkeypatch.delenv(name)
    workdir = tmp_path / "work"
    workdir.mkdir()

    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=300, kernel_name=KERNEL, resources={"metadata": {"path": str(workdir)}}
    )
    try:
        client.km = client.create_kernel_manager()
        client.start_new_kernel()
        client.start_new_kernel_client()
    except Exception as exc:  # no kernel here (sandbox without sockets, missing ipykernel deps): not a notebook bug
        if client.km is not None and client.km.has_kernel:
            client.km.shutdown_kernel(now=True)
        pytest.skip(f"cannot start a Jupyter kernel: {type(exc).__name__}: {exc}")
    client.execute()  # raises CellExecutionError with the failing cell and its traceback
