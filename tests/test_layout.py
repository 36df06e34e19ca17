"""The package layout's rules: the CLI sits on top (no library module imports it) and every module imports
on its own, first, in a fresh import state (an import cycle fails there, whatever imported it before)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "galip"
# The command line and `python -m galip` are the entry points; everything else is below them.
CLI_IMPORTERS = {"galip/cli.py", "galip/__main__.py"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(source: str, module: str, is_package: bool = False) -> set[str]:
    """Absolute names of what ``module`` imports: ``from X import y`` counts as X and X.y (y may be a module)."""
    package = module if is_package else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            parts = package.split(".")
            base = parts[: len(parts) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            names.add(target)
            names.update(f"{target}.{alias.name}" for alias in node.names)
    return names


def library_modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_the_checker_sees_every_spelling_of_a_cli_import():
    for code in ("from ..cli import main", "from .. import cli", "import galip.cli", "from galip.cli import app", "from galip import cli"):
        assert "galip.cli" in imported_modules(code, "galip.train.trainer"), code
    assert "galip.cli" in imported_modules("from ..cli import main", "galip.train", is_package=True)
    assert "galip.cli" not in imported_modules("from .cli import main", "galip.train.trainer")


def test_nothing_below_the_cli_imports_it():
    offenders = {
        str(path.relative_to(PACKAGE.parent)): sorted(
            n for n in imported_modules(path.read_text(), module_name(path), path.name == "__init__.py") if n.split(".")[:2] == ["galip", "cli"]
        )
        for path in library_modules()
        if str(path.relative_to(PACKAGE.parent)) not in CLI_IMPORTERS
    }
    offenders = {k: v for k, v in offenders.items() if v}
    assert not offenders, f"library modules import the CLI (move what they need below it): {offenders}"


def test_every_module_imports_on_its_own():
    """Each module imported first, in one interpreter with galip's modules dropped between imports
    (heavy third-party modules stay loaded, so this takes seconds rather than one process each)."""
    names = [module_name(p) for p in library_modules() if p.name != "__main__.py"]
    script = """
import importlib, json, sys, traceback
failures = {}
for name in json.loads(sys.argv[1]):
    for loaded in [m for m in sys.modules if m == "galip" or m.startswith("galip.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception:
        failures[name] = traceback.format_exc(limit=-3)
print(json.dumps(failures))
"""
    # cwd: `python -c` puts it first on sys.path, so this checkout's galip is the one imported
    proc = subprocess.run(
        [sys.executable, "-c", script, json.dumps(names)], cwd=PACKAGE.parent, capture_output=True, text=True, timeout=600, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    failures = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not failures, "\n".join(f"{name}:\n{tb}" for name, tb in failures.items())
    assert len(names) > 30


def test_the_flow_its_preflight_and_the_gate_text_load_no_torch():
    """The flow process runs stages as subprocesses: importing it, checking the demo's prerequisites and
    writing the gate's description load neither torch nor the metrics (each was ~4 s of every flow run;
    the description is also written by the register stage, which otherwise needs no torchmetrics)."""
    script = """
import sys
import flows.galip_train
from galip.config import load_config
from galip.ops.preflight import missing_prerequisites
from galip.ops.registry import GateDecision, describe
cfg = load_config("params.yaml")
assert missing_prerequisites(cfg) == []
text = describe(cfg, GateDecision(True, "v1 is the first", "1", "1", "prompt_fidelity", 40.0, None), {"prompt_fidelity": 40.0})
assert "**How prompt_fidelity is made**: `prompt_fidelity = 0.5 * prompt_fidelity_held_in_attr_mean" in text, text
print(sorted(m for m in ("torch", "open_clip", "torchmetrics") if m in sys.modules))
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=PACKAGE.parent, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout
