"""The demo notebook runs top to bottom headless and produces its tables and plots."""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pandas as pd
import pytest
from nbclient import NotebookClient

REPO_ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO_ROOT / "demo.ipynb"
FIGURES = ("data_overview", "features_per_genre", "training_curves", "model_vs_baselines")


def test_committed_notebook_holds_no_stale_outputs() -> None:
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code_cells
    assert all(not cell.outputs and cell.execution_count is None for cell in code_cells)


@pytest.mark.slow
def test_notebook_runs_and_recommends_ten_catalog_songs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DEMO_FAST", "1")
    monkeypatch.setenv("DEMO_OUTPUT", str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [
        str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(REPO_ROOT)}})
    client.execute()
    nbformat.write(notebook, tmp_path / "executed.ipynb")

    errors = [output for cell in notebook.cells if cell.cell_type == "code"
              for output in cell.outputs if output.output_type == "error"]
    assert not errors
    streams = "".join(output.text for cell in notebook.cells if cell.cell_type == "code"
                      for output in cell.outputs if output.output_type == "stream")
    assert "\r" not in streams, "progress bars leaked into the notebook's outputs"
    assert len(streams.splitlines()) < 60
    images = [output for cell in notebook.cells if cell.cell_type == "code"
              for output in cell.outputs if "image/png" in output.get("data", {})]
    assert len(images) >= len(FIGURES)
    for name in FIGURES:
        assert (tmp_path / "figures" / f"{name}.png").stat().st_size > 0

    table = pd.read_csv(tmp_path / "recommendations.csv")
    catalog = pd.read_csv(REPO_ROOT / "demo data" / "songs.csv", usecols=["song_id"])
    sequence = pd.read_csv(REPO_ROOT / "demo data" / "sequence.csv")
    assert len(table) == 10
    assert table["song_id"].isin(catalog["song_id"]).all()
    assert not table["song_id"].isin(sequence["song_id"]).any()
    assert table["song"].str.len().gt(0).all()
    # the new release added to the catalog DataFrame is in the top-10 without retraining
    release = pd.read_csv(tmp_path / "new_release.csv")
    assert len(release) == 10 and (~release["song_id"].isin(catalog["song_id"])).sum() == 1
