"""The notebooks in ``notebooks/`` (jupytext percent scripts, the diffable source) run: each is
converted to a notebook and executed cell by cell in a ``python3`` kernel (nbclient) that
imports this checkout; any cell error fails, and each notebook's closing check is read back
from its outputs."""
import os
import re

import pytest

jupytext = pytest.importorskip("jupytext")
nbclient = pytest.importorskip("nbclient")

from conftest import ROOT  # noqa: E402

NOTEBOOKS = os.path.join(ROOT, "notebooks")
# a line each notebook must print (its inline check), as a regex over the cells' stdout
EXPECTED = {
    "losses_tour.py": r"called (\d+) of \1 registered losses; all finite: True"
                      r"[\s\S]*oracle check: loss at the exact map",
    "flow_maps_on_a_toy.py": r"1 NFE: student [0-9.]+ vs teacher [0-9.]+",
    "bring_your_own_network.py": r"both students beat one Euler step of the teacher",
}


def _stdout(nb) -> str:
  out = []
  for cell in nb.cells:
    for o in cell.get("outputs", []):
      if o.get("output_type") == "stream" and o.get("name") == "stdout":
        out.append(o["text"])
  return "".join(out)


def test_every_notebook_is_tested():
  assert sorted(f for f in os.listdir(NOTEBOOKS) if f.endswith(".py")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_notebook_runs(name, tmp_path, monkeypatch):
  nb = jupytext.read(os.path.join(NOTEBOOKS, name))
  # the kernel inherits this environment: import this checkout, CPU, the suite's XLA flags
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
      [ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("MPLBACKEND", "Agg")
  client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=300,
                                   resources={"metadata": {"path": str(tmp_path)}})
  client.execute()  # raises CellExecutionError naming the cell on any error
  text = _stdout(nb)
  assert re.search(EXPECTED[name], text), text[-2000:]
