"""The posterior-inspection notebook runs top to bottom (its default trains a tiny demo model)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "posterior_inspection.ipynb"


@pytest.mark.slow
def test_posterior_inspection_notebook_runs(tmp_path, monkeypatch):
    monkeypatch.delenv("PYRO_BLORA_NOTEBOOK_RUN", raising=False)
    monkeypatch.delenv("PYRO_BLORA_NOTEBOOK_LORA_RUN", raising=False)
    monkeypatch.setenv("PYRO_BLORA_NOTEBOOK_OUT", str(tmp_path / "figures"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(NOTEBOOK.parents[1]), os.environ.get("PYTHONPATH", "")]))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(notebook, timeout=120, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    for name in ("magnitudes.png", "energy.png", "layers.png"):
        assert (tmp_path / "figures" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs)
    assert "disagreement" in text and "reference:" in text
    markdown = [o["data"]["text/markdown"] for o in outputs if "text/markdown" in o.get("data", {})]
    assert any("hoyer_index" in m and "| lora |" in m for m in markdown)
    assert any("mean_std_A" in m and "kl" in m for m in markdown)
