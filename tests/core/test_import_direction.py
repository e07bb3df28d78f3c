"""Imports flow one way: ``moezoo.tasks -> moezoo -> moezoo.ops -> moezoo.kernels``.

The core (``moezoo/`` except ``moezoo/cli.py``, which dispatches to the tasks lazily) never imports Lightning,
omegaconf, jsonargparse or ``moezoo.tasks``: not at module level (checked by importing every core module with those
blocked, in a fresh interpreter that also builds and runs every registered model) and not inside a function
(checked on the source).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

from moezoo.models import list_models

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tests" / "core" / "isolated_core.py"
TASKS_SIDE = ("lightning", "omegaconf", "jsonargparse", "moezoo.tasks")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def installed_name(path: Path) -> str:
    """The module's import name (``tasks/`` and ``kernels/`` install as ``moezoo.tasks`` and ``moezoo.kernels``)."""
    name = module_name(path)
    return f"moezoo.{name}" if name.split(".")[0] in ("tasks", "kernels") else name


def core_files() -> list[Path]:
    return [p for p in sorted((ROOT / "moezoo").rglob("*.py")) if p != ROOT / "moezoo" / "cli.py"]


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """``(line, module)`` for every import statement in a file, at any depth (``from a import b`` gives a.b too)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return found


def _is_under(module: str, packages: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def test_core_source_never_imports_the_tasks_side() -> None:
    offenders = [
        f"{path.relative_to(ROOT)}:{line} imports {module}"
        for path in core_files()
        for line, module in imported_modules(path)
        if _is_under(module, TASKS_SIDE)
    ]
    assert not offenders, "the core must not import the tasks side (move the code to moezoo.tasks):\n" + "\n".join(
        offenders
    )


def test_lower_layers_never_import_upper_ones() -> None:
    """``moezoo.ops`` imports no layer or model; ``moezoo.kernels`` imports nothing of moezoo but itself."""
    allowed = {ROOT / "moezoo" / "ops": ("moezoo.ops", "moezoo.kernels"), ROOT / "kernels": ("moezoo.kernels",)}
    offenders = [
        f"{path.relative_to(ROOT)}:{line} imports {module}"
        for folder, ok in allowed.items()
        for path in sorted(folder.rglob("*.py"))
        for line, module in imported_modules(path)
        if _is_under(module, ("moezoo",)) and not _is_under(module, ok)
    ]
    assert not offenders, offenders


def test_hub_and_registry_do_not_import_each_other() -> None:
    """``PretrainedCfg`` lives in a leaf module: the hub needs nothing of the registry."""
    hub = [m for _, m in imported_modules(ROOT / "moezoo" / "models" / "hub.py")]
    leaf = [m for _, m in imported_modules(ROOT / "moezoo" / "models" / "pretrained_cfg.py")]
    assert not [m for m in hub if _is_under(m, ("moezoo.models.registry", "moezoo.models.pretrained"))]
    assert not [m for m in leaf if _is_under(m, ("moezoo",))]


def test_no_module_imports_another_modules_private_names() -> None:
    """``from moezoo.x import _name`` outside ``moezoo.x`` is a private name crossing a module boundary."""
    offenders = []
    for path in sorted([*ROOT.glob("moezoo/**/*.py"), *ROOT.glob("kernels/**/*.py"), *ROOT.glob("tasks/**/*.py")]):
        for line, module in imported_modules(path):
            owner, _, name = module.rpartition(".")
            if not module.startswith("moezoo.") or not name.startswith("_") or name.startswith("__"):
                continue
            if owner == installed_name(path):
                continue
            offenders.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert not offenders, "make the name public (and documented) or move the code:\n" + "\n".join(offenders)


def test_every_family_module_is_imported_explicitly() -> None:
    """``moezoo/models/__init__.py`` imports each family by name: every ``@register_model`` function is registered."""
    defined = {
        node.name
        for path in sorted((ROOT / "moezoo" / "models").glob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.FunctionDef)
        and any(isinstance(d, ast.Name) and d.id == "register_model" for d in node.decorator_list)
    }
    assert defined and defined <= set(list_models()), f"not registered: {sorted(defined - set(list_models()))}"


def test_core_imports_and_runs_without_the_tasks_side() -> None:
    args = [sys.executable, str(SCRIPT), "--block", *TASKS_SIDE]
    result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    expected = {module_name(p) for p in core_files()}
    assert expected <= set(report["imported"]) | set(report["refused_without_triton"])
    assert report["models"] == list_models()
