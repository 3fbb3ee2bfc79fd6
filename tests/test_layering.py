"""fleet's layering, checked from the source (every import statement, function-local and
``TYPE_CHECKING`` ones included), so that a change that breaks it fails the build:

- no import cycle between modules, nor between fleet's packages;
- the layers: core (errors, types, config, the GPU catalogue and fleet-wide helpers) ← foundation (registry,
  store, data, base, lora, handles) ← subsystems (scheduler, train, serve, divergence, deploy:
  none imports another) ← ops ← demo ← cli;
- no module imports an underscore name (a ``_module`` or a ``_name``) of another package;
  fleet's own top-level helpers (``fleet._ray``, ``fleet._lazy``, ``fleet._metrics``) are for
  all of fleet.

``make lint`` runs this file too.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pytest

LAYERS: tuple[tuple[str, ...], ...] = (
    (
        "fleet",
        "fleet.errors",
        "fleet.types",
        "fleet.config",
        "fleet.gpus",
        "fleet._lazy",
        "fleet._metrics",
        "fleet._ray",
        "fleet._threads",
    ),
    (
        "fleet.registry",
        "fleet.store",
        "fleet.data",
        "fleet.base",
        "fleet.lora",
        "fleet.handles",
        "fleet.status",
    ),
    ("fleet.scheduler", "fleet.train", "fleet.serve", "fleet.divergence", "fleet.deploy"),
    ("fleet.ops",),
    ("fleet.demo",),
    ("fleet.cli",),
)
INDEPENDENT = {2}  # layers whose packages must not import one another


@dataclass
class Report:
    module_cycles: list[list[str]] = field(default_factory=list)
    package_cycles: list[list[str]] = field(default_factory=list)
    layer_violations: list[str] = field(default_factory=list)
    private_imports: list[str] = field(default_factory=list)
    unknown_packages: list[str] = field(default_factory=list)

    def problems(self) -> list[str]:
        return (
            [f"module cycle: {' -> '.join(c)}" for c in self.module_cycles]
            + [f"package cycle: {' -> '.join(c)}" for c in self.package_cycles]
            + self.layer_violations
            + self.private_imports
            + [f"{p} is in no layer: add it to LAYERS" for p in self.unknown_packages]
        )


def _modules(root: Path, top: str) -> dict[str, Path]:
    out = {}
    for path in (root / top).rglob("*.py"):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if any(p.startswith(".") for p in parts):  # a virtual environment there (bench/.vllm-venv)
            continue
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(module: str, path: Path) -> list[tuple[str, str | None, int]]:
    """``(imported module, imported name or None, line)`` for every import of the file."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, None, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out += [(target, a.name, node.lineno) for a in node.names]
    return out


def _package(module: str) -> str:
    return ".".join(module.split(".")[:2])


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan), each as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
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
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def check(root: Path, top: str = "fleet", layers=LAYERS, independent=INDEPENDENT) -> Report:
    mods = _modules(root, top)

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    layer_of = {pkg: i for i, layer in enumerate(layers) for pkg in layer}
    report = Report()
    module_graph: dict[str, set[str]] = defaultdict(set)
    package_graph: dict[str, set[str]] = defaultdict(set)
    for module, path in sorted(mods.items()):
        src_pkg = _package(module)
        if src_pkg not in layer_of and src_pkg not in report.unknown_packages:
            report.unknown_packages.append(src_pkg)
        for target, name, line in _imports(module, path):
            if not (target == top or target.startswith(top + ".")):
                continue
            # `from fleet.x import y` imports the module fleet.x.y when there is one
            sub = resolve(f"{target}.{name}") if name else None
            is_module = sub is not None and sub != resolve(target)
            dest = sub if is_module else resolve(target)
            if dest is None or dest == module:
                continue
            module_graph[module].add(dest)
            dst_pkg = _package(dest)
            where = f"{path.relative_to(root)}:{line}"
            if dst_pkg != src_pkg and dst_pkg != top:
                package_graph[src_pkg].add(dst_pkg)
            lo, hi = layer_of.get(dst_pkg), layer_of.get(src_pkg)
            if lo is not None and hi is not None and dst_pkg != src_pkg:
                if lo > hi:
                    report.layer_violations.append(
                        f"{where}: {module} (layer {hi}) imports {dest} from a higher layer ({lo})"
                    )
                elif lo == hi and hi in independent:
                    report.layer_violations.append(
                        f"{where}: {module} imports {dest}: subsystems do not import one another"
                    )
            if dst_pkg != src_pkg and dst_pkg != top:
                private = [p for p in dest.split(".")[2:] if p.startswith("_") and p != "__init__"]
                if name and name.startswith("_") and not name.startswith("__") and not is_module:
                    private.append(name)
                if private:
                    report.private_imports.append(
                        f"{where}: {module} imports {private[0]!r} from {dst_pkg}, private to that package"
                    )
    report.module_cycles = _cycles(module_graph)
    report.package_cycles = _cycles(package_graph)
    return report


ROOT = Path(__file__).resolve().parents[1]
PACKAGES = sorted(
    f"fleet.{p.name}" for p in (ROOT / "fleet").iterdir() if (p / "__init__.py").is_file() and p.name != "cli"
)


def test_fleet_keeps_its_layers():
    report = check(ROOT)
    assert not report.problems(), "\n".join(report.problems())


def test_every_package_states_its_contract_and_every_name_in_it_resolves():
    import importlib

    for name in PACKAGES:
        pkg = importlib.import_module(name)
        assert pkg.__doc__ and len(pkg.__doc__) > 40, f"{name}: no docstring stating its contract"
        assert getattr(pkg, "__all__", None), f"{name}: no __all__"
        for attr in pkg.__all__:
            assert getattr(pkg, attr) is not None, f"{name}.{attr}"


def test_commands_call_packages_through_their_contracts():
    """``fleet/cli/`` imports another package's names from the package itself, never from one of
    its modules: what a command needs is part of that package's stated contract."""
    problems = []
    for path in sorted((ROOT / "fleet" / "cli").glob("*.py")):
        for target, name, line in _imports(f"fleet.cli.{path.stem}", path):
            if target.startswith("fleet.") and target.count(".") >= 2 and not target.startswith("fleet.cli"):
                problems.append(f"fleet/cli/{path.name}:{line}: from {target} import {name}")
    assert not problems, "\n".join(problems)


def test_every_import_of_fleet_resolves():
    """Function-local imports run only when their function does: each one in fleet/, bench/ and
    tests/ names a module and a name that exist (a move or a rename that missed one fails here,
    not in an operator's command)."""
    import importlib

    problems = []
    for top in ("fleet", "bench", "tests"):
        for module, path in sorted(_modules(ROOT, top).items()):
            for target, name, line in _imports(module, path):
                if not (target == "fleet" or target.startswith("fleet.")):
                    continue
                where = f"{path.relative_to(ROOT)}:{line}"
                try:
                    mod = importlib.import_module(target)
                except ImportError as exc:
                    problems.append(f"{where}: {target}: {exc}")
                    continue
                if name and name != "*" and not hasattr(mod, name):
                    try:
                        importlib.import_module(f"{target}.{name}")
                    except ImportError:
                        problems.append(f"{where}: {target} has no {name}")
    assert not problems, "\n".join(problems)


def test_the_command_line_starts_without_torch_or_ray():
    import subprocess
    import sys

    code = "import sys, fleet.cli; print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'ray', 'transformers', 'sqlalchemy'}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


LAYERS_T = (("app", "app.core"), ("app.lib",), ("app.a", "app.b"), ("app.top",))


def test_the_check_finds_each_kind_of_break(tmp_path):
    root = _tree(
        tmp_path,
        {
            "app/__init__.py": "",
            "app/core.py": "def f():\n    from app.lib import thing\n",  # upward, function-local
            "app/lib/__init__.py": "from app.lib.x import thing\n",
            "app/lib/x.py": "from app.lib import y\nthing = 1\n",
            "app/lib/y.py": "def g():\n    from app.lib.x import thing\n",  # x <-> y cycle
            "app/a/__init__.py": "",
            "app/a/m.py": "from app.b.n import _hidden\n",  # subsystem -> subsystem, private name
            "app/b/__init__.py": "",
            "app/b/n.py": "_hidden = 1\nfrom app.a import m\n",  # a <-> b package cycle
            "app/top/__init__.py": "from app.lib._impl import z\n",  # private module
            "app/lib/_impl.py": "z = 1\n",
            "app/extra.py": "",
        },
    )
    report = check(root, "app", LAYERS_T, {2})
    assert ["app.lib.x", "app.lib.y"] in report.module_cycles
    assert ["app.a", "app.b"] in report.package_cycles
    assert any("app.core (layer 0) imports app.lib" in v for v in report.layer_violations)
    assert any("subsystems do not import one another" in v for v in report.layer_violations)
    assert any("'_hidden' from app.b" in v for v in report.private_imports)
    assert any("'_impl' from app.lib" in v for v in report.private_imports)
    assert report.unknown_packages == ["app.extra"]


def test_a_clean_tree_passes(tmp_path):
    root = _tree(
        tmp_path,
        {
            "app/__init__.py": "",
            "app/core.py": "import os\n",
            "app/lib/__init__.py": "from app.lib.x import thing\nfrom app.core import os\n",
            "app/lib/x.py": "from . import _impl\nthing = _impl.z\n",  # private within its package
            "app/lib/_impl.py": "z = 1\n",
            "app/a/__init__.py": "from app.lib import thing\n",
            "app/top/__init__.py": "from app.a import thing\nfrom app.lib.x import thing as t2\n",
        },
    )
    assert check(root, "app", LAYERS_T, {2}).problems() == []


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(pytest.main([__file__, "-q"]))


def test_a_package_export_named_like_its_module_resolves_to_the_export_whatever_is_read_first():
    """`from fleet.ops import write_facts` imports the module fleet.ops.evaluate, which binds the
    module on the package as `evaluate`; the export `evaluate` (the function) must still win."""
    import subprocess
    import sys

    code = (
        "from fleet.ops import write_facts\n"
        "from fleet.ops import evaluate, read_facts\n"
        "import types\n"
        "assert callable(evaluate) and not isinstance(evaluate, types.ModuleType), evaluate\n"
        "assert callable(write_facts) and callable(read_facts)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
