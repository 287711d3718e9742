"""The package layout holds: no import cycles between jaxclr's modules, each
layer imports only the layers below it (docs/architecture.md), and
jaxclr/cpu is reached only through its door."""

import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "jaxclr")
# The commands' shims and the job level: nothing below them imports them.
TOP = {"jaxclr.main", "jaxclr.linear_eval", "jaxclr.finetune",
       "jaxclr.distill", "jaxclr.convert", "jaxclr.export", "jaxclr.cli"}
# Package -> the jaxclr packages it must not import (directly or lazily).
FORBIDDEN = {
    "config": ("jobs", "report", "training", "evaluation", "models", "cpu"),
    "training": ("jobs", "report", "methods", "evaluation", "cpu"),
    "methods": ("jobs", "report", "evaluation", "cpu", "data"),
    "losses": ("jobs", "report", "methods", "training", "evaluation", "cpu",
               "models", "data", "config"),
    "models": ("jobs", "report", "methods", "losses", "training",
               "evaluation", "cpu", "data"),
    "data": ("jobs", "report", "methods", "losses", "training", "evaluation",
             "cpu", "models"),
    "parallel": ("jobs", "report", "methods", "losses", "training",
                 "evaluation", "cpu", "models", "data"),
    "evaluation": ("jobs", "report", "methods", "losses", "cpu"),
    "jobs": ("report",),
}

# The one module a package may import from a layer it otherwise must not:
# the mixed-precision policy is declared in one place (docs/simclr.md §8),
# and the losses read its loss dtype and logits precision from there.
EXCEPTIONS = {("losses", "jaxclr.models.precision")}


def _module_name(path):
  rel = os.path.relpath(path, REPO)[:-len(".py")].replace(os.sep, ".")
  return rel[:-len(".__init__")] if rel.endswith(".__init__") else rel


def _modules():
  out = {}
  for root, _, files in os.walk(PACKAGE):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(root, name)
        out[_module_name(path)] = path
  return out


MODULES = _modules()


def _resolve(name):
  """The jaxclr module an import names (a module, or a name in a package)."""
  while name and name not in MODULES:
    name = name.rpartition(".")[0]
  return name or None


def imports_of(module):
  """Every jaxclr module `module` imports, at any depth of its code."""
  with open(MODULES[module]) as f:
    tree = ast.parse(f.read())
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module:
      # `from pkg import mod` imports pkg.mod; `from mod import name`, mod.
      base = node.module
      names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base
               for a in node.names]
    else:
      continue
    for name in names:
      if name.startswith("jaxclr"):
        target = _resolve(name)
        if target and target != module:
          found.add(target)
  return found


GRAPH = {m: imports_of(m) for m in MODULES}


def _package_of(module):
  """'training' for jaxclr.training and jaxclr.training.loop; None for the
  top-level modules (jaxclr.main, ...)."""
  parts = module.split(".")
  if len(parts) == 2 and not MODULES[module].endswith("__init__.py"):
    return None
  return parts[1] if len(parts) >= 2 else None


def test_no_import_cycles():
  """Depth-first search for a back edge; the cycle is reported."""
  state, stack = {}, []

  def visit(m):
    state[m] = "open"
    stack.append(m)
    for n in sorted(GRAPH[m]):
      if state.get(n) == "open":
        cycle = stack[stack.index(n):] + [n]
        pytest.fail("import cycle: " + " -> ".join(cycle))
      if n not in state:
        visit(n)
    stack.pop()
    state[m] = "done"

  for m in sorted(GRAPH):
    if m not in state:
      visit(m)


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_layers_import_only_downwards(package):
  bad = []
  for m, targets in GRAPH.items():
    if _package_of(m) != package:
      continue
    for t in targets:
      if (package, t) in EXCEPTIONS:
        continue
      if t in TOP or _package_of(t) in FORBIDDEN[package]:
        bad.append(f"{m} -> {t}")
  assert not bad, bad


def test_cpu_is_reached_through_its_door_only():
  """Outside jaxclr/cpu, only `jaxclr.cpu` itself is imported: the folder
  can change (or go) behind it."""
  bad = [f"{m} -> {t}" for m, targets in GRAPH.items()
         if _package_of(m) != "cpu"
         for t in targets if t.startswith("jaxclr.cpu.")]
  assert not bad, bad


def test_the_top_level_holds_only_commands_and_the_cli():
  top = {m for m in MODULES
         if os.path.dirname(MODULES[m]) == PACKAGE and m != "jaxclr"}
  assert top == TOP | {"jaxclr.errors"}, sorted(top)
