"""Runs every notebook here and stores it with its outputs and figures (what a reader browsing
the repository sees). ``make notebooks`` calls it; the test suite runs the notebooks too and
checks that the stored copies were executed.

Usage: ``python notebooks/execute.py [NAME.ipynb ...]``
"""

from __future__ import annotations

import pathlib
import sys

import nbclient
import nbformat

HERE = pathlib.Path(__file__).resolve().parent


def execute(path: pathlib.Path) -> None:
  nb = nbformat.read(path, as_version=4)
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                   resources={"metadata": {"path": str(path.parent)}})
  client.execute()
  nb.metadata.pop("widgets", None)
  nbformat.write(nb, path)
  print(f"executed {path.name}")


def main(argv: list[str]) -> int:
  paths = [HERE / name for name in argv] or sorted(HERE.glob("*.ipynb"))
  for path in paths:
    execute(path)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
