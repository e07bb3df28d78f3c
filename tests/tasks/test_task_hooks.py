"""Every task keeps the base task's work in the hooks where :class:`~moezoo.tasks.base.MoETask` does some: a task
that overrides one of them calls ``super()``'s (the soak found the forecasting task's ``on_fit_start`` skipping the
clean-up of a killed run's temporary files)."""

from __future__ import annotations

import ast
import importlib
import inspect
import textwrap

import pytest

from moezoo.tasks.base import MoETask
from moezoo.tasks.cli import import_domains

# the hooks whose base implementation does work a subclass must not drop
HOOKS = ("on_fit_start", "on_train_end", "on_test_epoch_start")


def _task_classes() -> list[type[MoETask]]:
    import_domains()
    found: set[type[MoETask]] = set()
    todo = list(MoETask.__subclasses__())
    while todo:
        cls = todo.pop()
        if cls.__module__.startswith("moezoo.tasks.") and cls not in found:
            found.add(cls)
            todo += cls.__subclasses__()
    return sorted(found, key=lambda c: c.__qualname__)


def _calls_super(function: ast.FunctionDef, hook: str) -> bool:
    for node in ast.walk(function):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == hook
            and isinstance(node.func.value, ast.Call)
            and isinstance(node.func.value.func, ast.Name)
            and node.func.value.func.id == "super"
        ):
            return True
    return False


def test_the_domains_define_tasks() -> None:
    names = {cls.__name__ for cls in _task_classes()}
    assert {"ImageClassificationTask", "SpeechRecognitionTask"} <= names and len(names) >= 5


@pytest.mark.parametrize("cls", _task_classes(), ids=lambda c: c.__name__)
def test_overridden_base_hooks_call_super(cls: type[MoETask]) -> None:
    module = importlib.import_module(cls.__module__)
    for hook in HOOKS:
        if hook not in vars(cls):
            continue
        source = textwrap.dedent(inspect.getsource(vars(cls)[hook]))
        function = ast.parse(source).body[0]
        assert isinstance(function, ast.FunctionDef)
        assert _calls_super(function, hook), f"{module.__name__}.{cls.__name__}.{hook} does not call super().{hook}()"
