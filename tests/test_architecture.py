"""The library/lab split holds: imports go from the lab to the library only, the library needs
none of the lab's dependencies at import time, and its modules import each other without cycles.

The import graph is read from the source (``bench/import_graph.py``, the script that draws
``docs/architecture.md``); function-level imports count as edges too.
"""

import importlib.util
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAB_DEPENDENCIES = ("flax", "mnist1d", "sklearn", "matplotlib", "tqdm")


def _import_graph_module():
  path = os.path.join(ROOT, "bench", "import_graph.py")
  spec = importlib.util.spec_from_file_location("import_graph", path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses looks the module up while building Import
  try:
    spec.loader.exec_module(module)
  finally:
    del sys.modules[spec.name]
  return module


ig = _import_graph_module()
GRAPH = ig.import_graph()
LIBRARY = sorted(m for m in GRAPH if not ig.is_lab(m))
EDGES = ig.internal_edges(GRAPH)


def test_graph_sees_both_parts():
  for m in ("gsgd_jax", "gsgd_jax.structure", "gsgd_jax.pathspace", "gsgd_jax.transform"):
    assert m in LIBRARY
  for m in ("gsgd_jax.lab.datasets", "gsgd_jax.lab.models", "gsgd_jax.lab.training",
            "gsgd_jax.lab.config", "gsgd_jax.lab.runner", "gsgd_jax.lab.report",
            "gsgd_jax.lab.cli", "gsgd_jax.lab.demo"):
    assert m in GRAPH and ig.is_lab(m)
  # The lab uses the library, and a lazy import is seen as one.
  assert EDGES[("gsgd_jax.lab.runner", "gsgd_jax.transform")] is False
  assert EDGES[("gsgd_jax.lab.runner", "gsgd_jax.tracing")] is True


def test_library_does_not_import_the_lab():
  bad = [f"{m}:{imp.line} imports {imp.target}" for m in LIBRARY for imp in GRAPH[m]
         if imp.target == "gsgd_jax.lab" or imp.target.startswith("gsgd_jax.lab.")]
  assert bad == []


def test_library_imports_no_lab_dependency_at_module_level():
  bad = [f"{m}:{imp.line} imports {imp.target}" for m in LIBRARY for imp in GRAPH[m]
         if not imp.lazy and imp.target.split(".")[0] in LAB_DEPENDENCIES]
  assert bad == []
  assert ig.violations(GRAPH) == []


def test_no_old_lab_modules_in_the_library():
  for name in ("datasets", "models", "training", "experiments", "demo"):
    assert f"gsgd_jax.{name}" not in GRAPH


def test_no_import_cycle_among_library_modules():
  assert ig.cycles(list(EDGES), LIBRARY) == []


def test_cycle_finder():
  assert ig.cycles([("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")], "abcd") == [["a", "b", "c"]]
  assert ig.cycles([("a", "b"), ("b", "c")], "abc") == []


def test_import_gsgd_jax_loads_no_lab_dependency():
  code = ("import sys, gsgd_jax\n"
          f"print(sorted(m for m in {LAB_DEPENDENCIES!r} if m in sys.modules))\n"
          "print(sorted(m for m in sys.modules if m.startswith('gsgd_jax.lab')))\n")
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       env=env, timeout=300)
  assert out.returncode == 0, out.stderr
  assert out.stdout.split("\n")[:2] == ["[]", "[]"]


def test_import_graph_script_prints_the_drawing(capsys):
  assert ig.main([]) == 0
  text = capsys.readouterr().out
  assert text.startswith("```mermaid\nflowchart LR")
  assert "gsgd_jax_lab_runner --> gsgd_jax_transform" in text
  assert "-.-> gsgd_jax_tracing" in text


def test_architecture_page_is_the_script_output(capsys):
  """docs/architecture.md embeds the script's output verbatim: regenerate it when imports change
  (``head -32 docs/architecture.md`` keeps the introduction; the rest is the script's output)."""
  assert ig.main([]) == 0
  text = capsys.readouterr().out
  with open(os.path.join(ROOT, "docs", "architecture.md")) as f:
    page = f.read()
  assert page.rstrip().endswith(text.rstrip()), (
      "docs/architecture.md is out of date: run `python bench/import_graph.py` and replace the "
      "page from the ```mermaid line on with its output.")


def test_lab_without_its_extra_says_what_to_install(tmp_path):
  """With a lab dependency missing, importing the lab names the extra instead of failing deep
  inside a submodule (simulated by an import hook that hides matplotlib)."""
  code = (
      "import sys, importlib.abc\n"
      "class Hide(importlib.abc.MetaPathFinder):\n"
      "  def find_spec(self, name, path=None, target=None):\n"
      "    if name.split('.')[0] == 'matplotlib': raise ModuleNotFoundError(name)\n"
      "sys.meta_path.insert(0, Hide())\n"
      "import gsgd_jax\n"
      "try:\n"
      "  import gsgd_jax.lab.datasets\n"
      "except ImportError as e:\n"
      "  print('ERR', e)\n")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       check=True).stdout
  assert "ERR gsgd_jax.lab needs the 'lab' extra" in out and "matplotlib" in out


def test_library_tests_do_not_import_the_lab():
  """The library's tests (``tests/*.py``) never import ``gsgd_jax.lab``; the lab's tests live in
  ``tests/lab/``."""
  import ast
  import pathlib

  offenders = []
  for path in sorted(pathlib.Path(ROOT, "tests").glob("*.py")):
    for node in ast.walk(ast.parse(path.read_text())):
      names = ([a.name for a in node.names] if isinstance(node, ast.Import)
               else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
      if isinstance(node, ast.ImportFrom) and node.module == "gsgd_jax":
        names += [f"gsgd_jax.{a.name}" for a in node.names]
      offenders += [f"{path.name}: {n}" for n in names if n.startswith("gsgd_jax.lab")]
  assert offenders == []
