"""The ``moezoo`` console script: ``--help`` lists every subcommand with one line, ``--version`` prints the
version, and ``moezoo bench`` dispatches through its explicit table."""

from __future__ import annotations

import ast
import importlib.util
from importlib.metadata import version
from pathlib import Path

import pytest

import moezoo
from moezoo import cli

ROOT = Path(__file__).resolve().parents[2]


def test_help_lists_every_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    for flag in ("--help", "-h"):
        assert cli.main([flag]) == 0
        out = capsys.readouterr().out
        for name, text in {**cli.LIGHTNING_COMMANDS, **cli.OTHER_COMMANDS}.items():
            assert f"  {name} " in out and text in out
        assert "--version" in out
    assert set(cli.LIGHTNING_COMMANDS) == {"fit", "validate", "test", "predict"}
    assert set(cli.OTHER_COMMANDS) == {"bench", "zoo"}


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"moezoo {moezoo.__version__}"
    assert version("moezoo") == moezoo.__version__, "pyproject.toml takes its version from moezoo.__version__"


def test_no_command_or_an_unknown_one_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 2
    assert "commands:" in capsys.readouterr().err
    assert cli.main(["fitt"]) == 2
    assert "unknown command 'fitt'" in capsys.readouterr().err


def test_bench_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["bench", "--help"]) == 0
    out = capsys.readouterr().out
    assert all(f"  {name} " in out and text in out for name, (_, text) in cli.BENCHMARKS.items())
    assert cli.main(["bench", "nope"]) == 2
    assert "unknown benchmark 'nope'" in capsys.readouterr().err
    for name, (module, _) in cli.BENCHMARKS.items():
        spec = importlib.util.find_spec(module)
        assert spec is not None and spec.origin is not None, f"moezoo bench {name}: no module {module}"
        tree = ast.parse(Path(spec.origin).read_text())
        assert any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body), f"{module} has no main()"


def test_zoo_dispatch(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["zoo", "list", "moe_vit_tiny.*"]) == 0
    assert "moe_vit_tiny.digits" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["zoo", "--help"])
    assert exit_info.value.code == 0
    assert "release" in capsys.readouterr().out
