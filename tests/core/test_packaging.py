"""Packaging: the core runs on its own dependencies, every extra is declared once and named in its errors, and the
reproducible environment (constraints.txt) pins what pyproject.toml only bounds."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
import tomllib

from moezoo.extras import EXTRAS, MissingExtraError, extra_modules, require
from moezoo.tasks.cli import DOMAINS

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tests" / "core" / "isolated_core.py"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# torchvision, a core dependency, needs numpy and pillow: they are always there.
CORE_TRANSITIVE = {"numpy", "PIL"}
NON_CORE = sorted({m for extra in EXTRAS for m in extra_modules(extra)} - CORE_TRANSITIVE | {"triton", "moezoo.tasks"})
# Folders of moezoo.tasks that are not training domains (the zoo and the benchmarks; no extra of their own).
NOT_DOMAINS = {"zoo", "bench"}


def _requirement_name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0]


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _all_requirements() -> list[str]:
    project = PYPROJECT["project"]
    return [*project["dependencies"], *(r for extra in project["optional-dependencies"].values() for r in extra)]


def _python(code: str) -> subprocess.CompletedProcess[str]:
    prelude = f"import sys; sys.path.insert(0, {str(SCRIPT.parent)!r}); from isolated_core import Blocker\n"
    return subprocess.run([sys.executable, "-c", prelude + code], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_core_imports_and_runs_with_only_its_dependencies() -> None:
    """`pip install moezoo` then `import moezoo; moezoo.MoE(...)`: nothing beyond the core's dependencies."""
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--block", *NON_CORE],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert "moezoo" in report["imported"] and "moezoo.ops.triton_backend" in report["refused_without_triton"]
    assert report["models"]


def test_extras_agree_with_pyproject() -> None:
    """moezoo.extras.EXTRAS (import names) lists what pyproject.toml's extras install (distribution names)."""
    declared = PYPROJECT["project"]["optional-dependencies"]
    dists = packages_distributions()
    for extra, (includes, modules) in EXTRAS.items():
        requirements = [_requirement_name(r) for r in declared[extra]]
        assert sorted(r[len("moezoo[") : -1] for r in declared[extra] if r.startswith("moezoo[")) == sorted(includes)
        wanted = {_normal(r) for r in requirements if r != "moezoo"}
        installed = {_normal(d) for m in modules for d in dists.get(m, [m])}
        assert installed == wanted, f"extra {extra!r}: pyproject.toml installs {wanted}, moezoo.extras {installed}"
    assert set(declared) - set(EXTRAS) == {"all", "dev"}
    assert {_requirement_name(r) for r in declared["all"]} == {"moezoo"}
    all_extras = set(declared["all"][0][len("moezoo[") : -1].split(","))
    assert all_extras == set(EXTRAS) - {"train", "peers"} and all_extras >= {d.rsplit(".", 1)[1] for d in DOMAINS}


def test_dependencies_are_ranges_with_checked_lower_bounds() -> None:
    project = PYPROJECT["project"]
    requirements = _all_requirements()
    assert not [r for r in requirements if "==" in r], "pyproject.toml declares ranges; pins go to constraints.txt"
    core = {_requirement_name(r): r for r in project["dependencies"]}
    assert set(core) == {"torch", "torchvision", "timm", "safetensors", "tqdm"}
    assert ">=" in core["torch"] and ">=" in core["timm"]
    assert any(r.startswith("lightning>=") for r in project["optional-dependencies"]["train"])


def test_constraints_pin_every_declared_dependency() -> None:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin"
            pins[_normal(name)] = version
    # What `make setup` installs: '.[all,dev]' (the peers extra is not part of the reproducible environment).
    peers = {_normal(_requirement_name(r)) for r in PYPROJECT["project"]["optional-dependencies"]["peers"]}
    names = {_normal(_requirement_name(r)) for r in _all_requirements()} - {"moezoo"} - peers
    assert names <= set(pins), f"not pinned in constraints.txt: {sorted(names - set(pins))}"
    assert (pins["torch"], pins["torchvision"], pins["torchaudio"]) == ("2.11.0", "0.26.0", "2.11.0")
    assert tuple(map(int, pins["numpy"].split(".")[:2])) < (2, 4), "Triton 3.6's interpreter needs numpy < 2.4"
    assert "constraints.txt" in (ROOT / "Makefile").read_text()


def test_every_domain_checks_its_extra() -> None:
    folders = {p.parent.name for p in (ROOT / "tasks").glob("*/__init__.py")}
    assert {d.rsplit(".", 1)[1] for d in DOMAINS} == folders - NOT_DOMAINS, "moezoo.tasks.cli.DOMAINS is out of date"
    for domain in folders - NOT_DOMAINS:
        tree = ast.parse((ROOT / "tasks" / domain / "__init__.py").read_text())
        first = next(n for n in tree.body if isinstance(n, ast.Expr) and isinstance(n.value, ast.Call))
        assert isinstance(first.value.func, ast.Name) and first.value.func.id == "require"
        assert isinstance(first.value.args[0], ast.Constant) and first.value.args[0].value == domain
        imports_before = [n for n in tree.body[: tree.body.index(first)] if isinstance(n, ast.ImportFrom)]
        assert [n.module for n in imports_before] == ["moezoo.extras"], f"{domain}: require() must come first"


def test_a_missing_extra_names_the_extra() -> None:
    result = _python(
        "Blocker(['soundfile']).install()\n"
        "from moezoo.tasks.cli import import_domains\n"
        "print(import_domains())\n"
        "import moezoo.tasks.speech\n"
    )
    assert result.returncode == 1
    assert "moezoo.tasks.speech" not in result.stdout and "moezoo.tasks.vision" in result.stdout
    assert "MissingExtraError: moezoo.tasks.speech needs soundfile" in result.stderr
    assert "pip install 'moezoo[speech]'" in result.stderr


def test_zoo_commands_without_lightning_need_no_extra() -> None:
    result = _python(
        "Blocker(['lightning', 'omegaconf', 'jsonargparse']).install()\n"
        "from moezoo.tasks.zoo.cli import main\n"
        "sys.exit(main(['list']))\n"
    )
    assert result.returncode == 0, result.stderr
    assert "moe_vit_tiny.digits" in result.stdout


def test_require() -> None:
    require("train", "a test")  # installed here
    assert extra_modules("generation") == [*extra_modules("vision")]
    with pytest.raises(ValueError, match="extra must be one of"):
        require("nope", "a test")
    assert issubclass(MissingExtraError, ImportError)
