"""The shape of the package: cheap start-up (no torch until a verb needs it) and imports that point down the flow."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lmforge"

# Rank of each wing: a module may import its own wing and any wing of a lower rank, never a higher one.
# cli -> train/inference/evaluation/interop -> runs -> models -> config/data -> errors/io (README: "Finding your way")
RANKS = {
    "lmforge": 0,  # the package root: only __version__ and lazy exports
    "errors": 0,
    "io": 0,
    "machine": 0,  # what this CPU can do, and the per-machine cache of measurements
    "config": 1,
    "data": 1,
    "models": 2,
    "runs": 3,
    "train": 4,
    "inference": 4,
    "evaluation": 4,
    "interop": 4,
    "cli": 5,
    "__main__": 6,
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every lmforge module `path` imports, at any depth of its code (function-level imports count too)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.split(".")[0] != "lmforge":
                continue
            for alias in node.names:  # `from . import x` may name a submodule
                sub = f"{module}.{alias.name}"
                found.add(sub if _exists(sub) else module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "lmforge"}
    return found


def _exists(module: str) -> bool:
    rel = Path(*module.split(".")[1:])
    return (PACKAGE / rel).with_suffix(".py").exists() or (PACKAGE / rel / "__init__.py").exists()


def _wing(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "lmforge"


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_module_belongs_to_a_ranked_wing():
    assert {_wing(m) for m in _graph()} <= set(RANKS)


def test_imports_point_down_the_flow():
    upward = [
        f"{m} imports {d}"
        for m, deps in _graph().items()
        for d in deps
        if _wing(d) != _wing(m) and RANKS[_wing(d)] > RANKS[_wing(m)]
    ]
    assert not upward, upward


def test_no_import_cycle():
    """Between modules, and between the wings of one rank (train -> evaluation -> inference, never back)."""
    graph = _graph()
    wings: dict[str, set[str]] = {}
    for m, deps in graph.items():
        wings.setdefault(_wing(m), set()).update(_wing(d) for d in deps if _wing(d) != _wing(m))
    for g in (graph, wings):
        state: dict[str, int] = {}  # 1 = on the current path, 2 = done

        def visit(node, path, g=g, state=state):
            state[node] = 1
            for nxt in sorted(g.get(node, ())):
                if state.get(nxt) == 1:
                    pytest.fail("import cycle: " + " -> ".join([*path, node, nxt]))
                if nxt not in state:
                    visit(nxt, [*path, node])
            state[node] = 2

        for node in sorted(g):
            if node not in state:
                visit(node, [])


def _run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_import_lmforge_does_not_import_torch():
    code = "import sys, lmforge; print(lmforge.__version__, 'torch' in sys.modules, 'lmforge.runs' in sys.modules)"
    version, torch_loaded, runs_loaded = _run(code).split()
    assert (torch_loaded, runs_loaded) == ("False", "False")
    assert version == __import__("lmforge").__version__


def test_optional_dependencies_load_only_when_used():
    """datasets (hf: DATA) and wandb (--wandb) are optional extras: no module imports them at import time."""
    modules = ["lmforge", "lmforge.cli", "lmforge.data.corpus", "lmforge.data.prepare", "lmforge.train.loop"]
    code = f"import importlib, sys\nfor m in {modules!r}:\n    importlib.import_module(m)\n"
    code += "print('datasets' in sys.modules, 'wandb' in sys.modules)"
    assert _run(code).split() == ["False", "False"]


@pytest.mark.parametrize("argv", [[], ["--help"], ["train", "--help"], ["eval", "--help"], ["serve", "--help"]])
def test_cli_help_does_not_import_torch(argv):
    code = (
        "import contextlib, io, sys\n"
        "from lmforge.cli import main\n"
        "out = io.StringIO()\n"
        "with contextlib.redirect_stdout(out):\n"
        "    try:\n"
        f"        main({argv!r})\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print('usage: lmforge' in out.getvalue(), 'torch' in sys.modules)"
    )
    assert _run(code).split() == ["True", "False"]


def test_every_module_imports():
    """One fresh interpreter imports each module: catches a stale path left by a move."""
    modules = sorted(m for m in _graph() if m != "lmforge.__main__")  # __main__ would run the CLI
    code = f"import importlib\nfor m in {modules!r}:\n    importlib.import_module(m)\nprint(len({modules!r}))"
    assert _run(code) == str(len(modules))


def test_lazy_exports_resolve():
    import lmforge

    for name in lmforge.__all__:
        assert getattr(lmforge, name) is not None, name
