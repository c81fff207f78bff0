"""Every notebook in notebooks/ runs top to bottom (in this interpreter's kernel); stored clean."""

import pathlib
import sys

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOKS = sorted((pathlib.Path(__file__).parents[2] / "notebooks").glob("*.ipynb"))


def test_notebooks_found():
  assert [p.name for p in NOTEBOOKS] == [
      "01_basis_paths.ipynb", "02_invariance.ipynb", "03_training_mnist1d.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_stored_with_outputs(path):
  """Committed executed (``make notebooks``), in order, without errors: a reader browsing the
  repository sees the outputs and figures."""
  nb = nbformat.read(path, as_version=4)
  counts = [c.execution_count for c in nb.cells if c.cell_type == "code"]
  assert counts == list(range(1, len(counts) + 1)), f"{path.name}: run `make notebooks`"
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert not [o for o in cell.outputs if o.output_type == "error"], path.name
  assert any(o.output_type == "display_data" and "image/png" in o.get("data", {})
             for c in nb.cells if c.cell_type == "code" for o in c.outputs), \
      f"{path.name}: no figure stored"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path):
  nb = nbformat.read(path, as_version=4)
  # jupyter_client starts the 'python3' kernel as `python -m ipykernel_launcher` with `python`
  # replaced by sys.executable: this interpreter, with this venv's packages. The first cell checks.
  nb.cells.insert(0, nbformat.v4.new_code_cell(
      f"import sys\nassert sys.executable == {sys.executable!r}, sys.executable"))
  client = nbclient.NotebookClient(nb, timeout=180, kernel_name="python3",
                                   resources={"metadata": {"path": str(path.parent)}})
  client.execute()  # raises CellExecutionError, with the traceback, if a cell fails
