"""The supervisor side imports only the paddle-free protocol and checkpoint store from ``trainer/``.

``launcher/`` and ``cluster/`` may import ``paddlerun.trainer.rundir`` (the run directory's
files, the config, the worker environment) and ``paddlerun.trainer.checkpoint`` (the
store), nothing else of ``trainer/``; those two import nothing else of ``trainer/`` either
(docs/architecture.md#layering-rules). Checked twice: every import statement, read with
:mod:`ast` (also those inside functions, which a plain import would not run), and a fresh
interpreter that imports every one of these modules and must not have loaded paddle.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from typing import Iterator, List, Tuple

ROOT = Path(__file__).resolve().parent.parent
#: Source folder -> the package name it is installed as (setup.cfg package_dir).
SUPERVISOR_SIDE = {"launcher": "paddlerun.launcher", "cluster": "paddlerun.cluster"}
PROTOCOL_SIDE = {"trainer/rundir": "paddlerun.trainer.rundir",
                 "trainer/checkpoint": "paddlerun.trainer.checkpoint"}
ALLOWED = ("paddlerun.trainer.rundir", "paddlerun.trainer.checkpoint")


def modules(folders) -> Iterator[Tuple[Path, str]]:
    """(file, dotted module name) of every module in ``folders``."""
    for folder, package in folders.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            yield path, ".".join((package, *parts))


def imported_names(source: str, module: str, is_package: bool = False) -> Iterator[Tuple[int, str]]:
    """(line, dotted name) of everything ``source`` imports; ``from a import b`` gives ``a.b``
    (b may be a submodule), relative imports resolved against ``module``."""
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                yield node.lineno, f"{base}.{alias.name}"


def trainer_imports_outside_protocol(source: str, module: str, is_package: bool = False) -> List[str]:
    return [f"line {line}: {name}" for line, name in sorted(imported_names(source, module, is_package))
            if (name == "paddlerun.trainer" or name.startswith("paddlerun.trainer."))
            and not any(name == a or name.startswith(a + ".") for a in ALLOWED)]


def test_the_check_catches_an_import_of_the_training_loop():
    # The check itself, on the imports it exists to refuse (and the ones it must allow).
    bad = ("from paddlerun.trainer.loop import Position\n"
           "def f():\n    from paddlerun.trainer import session\n"
           "import paddlerun.trainer.hapi\n"
           "from ..trainer import state\n")
    assert trainer_imports_outside_protocol(bad, "paddlerun.launcher.cli") == [
        "line 1: paddlerun.trainer.loop.Position", "line 3: paddlerun.trainer.session",
        "line 4: paddlerun.trainer.hapi", "line 5: paddlerun.trainer.state"]
    good = ("from paddlerun.trainer.rundir.config import Config\n"
            "from paddlerun.trainer.rundir import env\n"
            "from paddlerun.trainer.checkpoint import CheckpointStore\n"
            "from ..trainer.rundir import events\n"
            "from . import layout\n")
    assert trainer_imports_outside_protocol(good, "paddlerun.launcher.cli") == []
    assert trainer_imports_outside_protocol("from .. import loop\n", "paddlerun.trainer.rundir.x") == [
        "line 1: paddlerun.trainer.loop"]


def test_supervisor_and_protocol_import_only_the_protocol_and_the_store_from_trainer():
    found = list(modules({**SUPERVISOR_SIDE, **PROTOCOL_SIDE}))
    assert len(found) > 40, found  # the folders were found
    offences = {}
    for path, module in found:
        bad = trainer_imports_outside_protocol(path.read_text(), module, path.name == "__init__.py")
        if bad:
            offences[str(path.relative_to(ROOT))] = bad
    assert not offences, (
        f"these supervisor-side modules import trainer/ modules outside {ALLOWED}: {offences}. "
        f"Move what both sides need into trainer/rundir/ (paddle-free), or keep it in the worker")


def test_importing_every_supervisor_module_leaves_paddle_unloaded():
    names = [module for _, module in modules({**SUPERVISOR_SIDE, **PROTOCOL_SIDE})]
    code = ("import importlib, sys\n"
            f"for name in {names!r}:\n"
            "    importlib.import_module(name)\n"
            "print(sorted(m for m in sys.modules if m == 'paddle' or m.startswith('paddle.')))\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]", (
        f"importing the supervisor's modules loaded paddle: {result.stdout[-2000:]}")
