"""The import structure of ``fmdistill`` has no cycle, and no function imports a module of
the package to dodge one (every internal import is at module level)."""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "fmdistill")
# imports deferred on purpose for cost, not cycles: optional heavy dependencies
LAZY_OK = {("fmdistill.data", "fmdistill.data.tfds_source"),
           ("fmdistill.data.tfds_source", "fmdistill.data.tfds_builder")}


def _modules() -> dict[str, str]:
  out = {}
  for d, _, files in os.walk(PKG):
    for f in files:
      if f.endswith(".py"):
        rel = os.path.relpath(os.path.join(d, f), ROOT)[:-3].replace(os.sep, ".")
        out[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(d, f)
  return out


def _edges(name: str, path: str, known: set) -> tuple[set, set]:
  """``(module-level targets, function-local targets)`` among ``known`` modules; imports of a
  module's own parent packages are Python's package machinery, not dependencies."""
  tree = ast.parse(open(path).read())
  top, local = set(), set()

  def targets(node):
    if isinstance(node, ast.Import):
      return [a.name for a in node.names]
    base = node.module or ""
    if node.level:
      pkg = name.split(".")[:-node.level + (1 if path.endswith("__init__.py") else 0) or None]
      base = ".".join(pkg + ([base] if base else []))
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]

  def visit(node, in_function):
    for child in ast.iter_child_nodes(node):
      fn = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
      if isinstance(child, (ast.Import, ast.ImportFrom)):
        for t in targets(child):
          if t in known and not name.startswith(t + ".") and t != name:
            (local if in_function else top).add(t)
      visit(child, fn)
  visit(tree, False)
  return top, local


def _graph():
  mods = _modules()
  known = set(mods)
  return {m: _edges(m, p, known) for m, p in mods.items()}


def test_no_function_local_imports_of_the_package():
  bad = sorted((m, t) for m, (_, local) in _graph().items() for t in local
               if (m, t) not in LAZY_OK)
  assert not bad, f"function-local imports (move them to module level): {bad}"


def test_import_graph_has_no_cycle():
  graph = {m: top | local for m, (top, local) in _graph().items()}
  state, stack = {}, []

  def dfs(m):
    state[m] = "open"
    stack.append(m)
    for t in sorted(graph.get(m, ())):
      if state.get(t) == "open":
        pytest.fail("import cycle: " + " -> ".join(stack[stack.index(t):] + [t]))
      if t not in state:
        dfs(t)
    stack.pop()
    state[m] = "done"
  for m in sorted(graph):
    if m not in state:
      dfs(m)


def test_the_graph_sees_the_known_edges():
  """The walker is not vacuous: it finds edges we know exist."""
  graph = {m: top for m, (top, _) in _graph().items()}
  assert "fmdistill.state" in graph["fmdistill.train"]
  assert "fmdistill.runs" in graph["fmdistill.teacher"]
  assert "fmdistill.checkpoint" in graph["fmdistill.runs"]
