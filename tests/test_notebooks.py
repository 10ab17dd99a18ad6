"""The notebooks in notebooks/ run top to bottom (with a tiny random model)."""

from __future__ import annotations

from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def _execute(name: str, workdir: Path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(workdir)}})
    client.execute()  # raises CellExecutionError on the first failing cell
    return notebook


def _text(notebook) -> str:
    parts = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            parts.append(output.get("text", ""))
            parts.append(str(output.get("data", {}).get("text/plain", "")))
    return "\n".join(parts)


@pytest.fixture()
def kernel_env(tiny_model_dir, monkeypatch):
    # the kernel is a subprocess: it inherits these
    monkeypatch.setenv("UNISEGTEXT_MODEL", str(tiny_model_dir))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")


@pytest.mark.slow
def test_quickstart_notebook(kernel_env, tmp_path):
    notebook = _execute("quickstart.ipynb", tmp_path)
    text = _text(notebook)
    assert "-> kidney_right" in text  # 'rt kidney' was read as the right kidney
    assert (tmp_path / "quickstart_preview.png").stat().st_size > 10_000
    assert (tmp_path / "quickstart_output" / "liver.nii.gz").is_file()
    assert (tmp_path / "quickstart_output" / "statistics.json").is_file()
    assert any(o.get("data", {}).get("image/png") for c in notebook.cells for o in c.get("outputs", []))


@pytest.mark.slow
def test_agent_notebook(kernel_env, tmp_path):
    notebook = _execute("agent.ipynb", tmp_path)
    text = _text(notebook)
    assert "kidney_right" in text
    assert "outside the data folder" in text
    assert list((tmp_path / "agent_output").glob("*/liver.nii.gz"))
