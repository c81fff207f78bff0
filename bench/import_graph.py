"""The import graph of the ``gsgd_jax`` package, read from the source (AST), as markdown.

    python bench/import_graph.py            # mermaid drawing + module table (docs/architecture.md)
    python bench/import_graph.py --edges    # one edge per line: importer -> imported [lazy]
    python bench/import_graph.py --root DIR # the package in another checkout

Every ``import`` / ``from ... import`` statement of every module under ``gsgd_jax/`` counts,
wherever it stands: at module level (run by ``import``) or inside a function (run when the
function is called; drawn dashed and marked ``lazy``). ``from gsgd_jax import structure`` is an
edge to ``gsgd_jax.structure``; ``from gsgd_jax import gsgd`` (not a module) an edge to the
package ``gsgd_jax``. The modules of ``gsgd_jax.lab`` are the lab, all others the library.
Nothing is imported or executed, so this runs without jax installed.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "gsgd_jax"
LAB = "gsgd_jax.lab"
# Third-party packages only the lab may import at module level.
LAB_DEPENDENCIES = ("flax", "mnist1d", "sklearn", "matplotlib", "tqdm")


@dataclasses.dataclass(frozen=True)
class Import:
  """One imported module: ``target`` (a dotted name), ``lazy`` when inside a function."""

  target: str
  lazy: bool
  line: int


def module_files(root: Path = ROOT) -> dict[str, Path]:
  """``{dotted module name: file}`` for every ``.py`` file under ``root/gsgd_jax``."""
  out = {}
  for path in sorted((root / PACKAGE).rglob("*.py")):
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
      parts = parts[:-1]
    out[".".join(parts)] = path
  return out


def is_lab(module: str) -> bool:
  return module == LAB or module.startswith(LAB + ".")


def _imports(tree: ast.AST, module: str, is_package: bool, modules: set[str]) -> list[Import]:
  """The imports of one module's AST, relative ones resolved, lazy ones marked."""
  base = module if is_package else module.rpartition(".")[0]
  found: list[Import] = []

  def visit(node: ast.AST, lazy: bool) -> None:
    if isinstance(node, ast.Import):
      found.extend(Import(alias.name, lazy, node.lineno) for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      if node.level:
        anchor = base.split(".")
        anchor = anchor[:len(anchor) - (node.level - 1)]
        source = ".".join(anchor + ([node.module] if node.module else []))
      else:
        source = node.module or ""
      for alias in node.names:
        sub = f"{source}.{alias.name}"
        found.append(Import(sub if sub in modules else source, lazy, node.lineno))
    inner = lazy or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
    for child in ast.iter_child_nodes(node):
      visit(child, inner)

  visit(tree, False)
  return found


def import_graph(root: Path = ROOT) -> dict[str, list[Import]]:
  """``{module: [Import, ...]}`` for every module of the package (all imports, in source order)."""
  files = module_files(root)
  names = set(files)
  return {m: _imports(ast.parse(p.read_text(), str(p)), m, p.name == "__init__.py", names)
          for m, p in files.items()}


def internal_edges(graph: dict[str, list[Import]]) -> dict[tuple[str, str], bool]:
  """``{(importer, imported module of the package): lazy}``; lazy only if no import is eager."""
  edges: dict[tuple[str, str], bool] = {}
  for src, imports in graph.items():
    for imp in imports:
      if imp.target in graph and imp.target != src:
        key = (src, imp.target)
        edges[key] = edges.get(key, True) and imp.lazy
  return edges


def external_imports(graph: dict[str, list[Import]], module: str, *, lazy: bool) -> list[str]:
  """Top-level names of the third-party packages ``module`` imports (eager or lazy; no stdlib)."""
  names = {imp.target.split(".")[0] for imp in graph[module] if imp.lazy == lazy}
  return sorted(n for n in names if n != PACKAGE and n not in sys.stdlib_module_names)


def cycles(edges, nodes) -> list[list[str]]:
  """The strongly connected components with more than one module (Tarjan), each sorted."""
  succ: dict[str, list[str]] = {n: [] for n in nodes}
  for a, b in edges:
    if a in succ and b in succ:
      succ[a].append(b)
  index: dict[str, int] = {}
  low: dict[str, int] = {}
  stack: list[str] = []
  on_stack: set[str] = set()
  out: list[list[str]] = []

  def connect(v: str) -> None:
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in succ[v]:
      if w not in index:
        connect(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        out.append(sorted(comp))

  for n in sorted(succ):
    if n not in index:
      connect(n)
  return sorted(out)


def _node(module: str) -> str:
  return module.replace(".", "_")


def _label(module: str) -> str:
  return module if module == PACKAGE else module.removeprefix(PACKAGE + ".")


def _summary(path: Path) -> str:
  doc = ast.get_docstring(ast.parse(path.read_text())) or ""
  return " ".join(doc.split("\n\n")[0].split())


def mermaid(graph: dict[str, list[Import]]) -> str:
  """A mermaid flowchart: one subgraph per part, solid arrows eager, dashed arrows lazy."""
  edges = internal_edges(graph)
  lines = ["```mermaid", "flowchart LR"]
  for title, part in (("lab (gsgd_jax.lab, extra [lab])", True), ("library (gsgd_jax)", False)):
    lines.append(f'  subgraph {"lab" if part else "library"}["{title}"]')
    lines.extend(f'    {_node(m)}["{_label(m)}"]' for m in sorted(graph) if is_lab(m) == part)
    lines.append("  end")
  for (a, b), lazy in sorted(edges.items()):
    lines.append(f"  {_node(a)} {'-.->' if lazy else '-->'} {_node(b)}")
  lines.append("```")
  return "\n".join(lines)


def table(graph: dict[str, list[Import]], root: Path = ROOT) -> str:
  """One row per module: what it is (first docstring paragraph) and what it imports."""
  files = module_files(root)
  edges = internal_edges(graph)
  rows = ["| module | part | imports from the package (lazy in italics) | third-party at import "
          "(lazy) |", "|---|---|---|---|"]
  for m in sorted(graph, key=lambda m: (is_lab(m), m)):
    inner = ", ".join(f"*{_label(b)}*" if lazy else _label(b)
                      for (a, b), lazy in sorted(edges.items()) if a == m) or "-"
    eager_names = external_imports(graph, m, lazy=False)
    eager = ", ".join(eager_names) or "-"
    lazy = ", ".join(n for n in external_imports(graph, m, lazy=True) if n not in eager_names)
    rows.append(f"| `{m}` | {'lab' if is_lab(m) else 'library'} | {inner} | {eager}"
                f"{f' ({lazy})' if lazy else ''} |")
  rows.append("")
  rows.extend(f"- `{m}`: {_summary(files[m])}" for m in sorted(graph, key=lambda m: (is_lab(m), m)))
  return "\n".join(rows)


def violations(graph: dict[str, list[Import]]) -> list[str]:
  """Library modules importing the lab (anywhere) or a lab dependency at module level."""
  out = []
  for m, imports in graph.items():
    if is_lab(m):
      continue
    for imp in imports:
      if is_lab(imp.target):
        out.append(f"{m}:{imp.line} imports {imp.target}")
      elif not imp.lazy and imp.target.split(".")[0] in LAB_DEPENDENCIES:
        out.append(f"{m}:{imp.line} imports {imp.target} at module level")
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--edges", action="store_true", help="print the edge list instead")
  p.add_argument("--root", type=Path, default=ROOT, help="repository root (default: this one)")
  a = p.parse_args(argv)
  graph = import_graph(a.root)
  if a.edges:
    for (src, dst), lazy in sorted(internal_edges(graph).items()):
      print(f"{src} -> {dst}{' [lazy]' if lazy else ''}")
  else:
    print(mermaid(graph))
    print()
    print(table(graph, a.root))
  library = [m for m in graph if not is_lab(m)]
  problems = violations(graph) + [
      "library import cycle: " + " <-> ".join(c)
      for c in cycles(internal_edges(graph), library)]
  for line in problems:
    print(f"warning: {line}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
