"""Task specs (``{class_path, init_args}``) outside the command line: complete them and build tasks from them
exactly as ``moezoo fit`` does (LightningCLI's jsonargparse: ``**kwargs`` resolved to the base task's arguments,
``optimizer``/``lr_scheduler`` turned into callables, another class than the default's with its own defaults:
:func:`moezoo.tasks.optim.task_spec_own_defaults`), old specs upgraded first (:mod:`moezoo.tasks.legacy`).
The zoo records and rebuilds the task of a release with these.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from moezoo.tasks.base import MoETask
from moezoo.tasks.legacy import upgrade_task_spec_warn
from moezoo.tasks.optim import task_spec_own_defaults


def _parse(spec: Mapping[str, Any]) -> tuple[Any, Any]:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(MoETask, "task", required=True)
    upgraded = upgrade_task_spec_warn(spec, f"task {spec.get('class_path')}")
    return parser, parser.parse_object({"task": task_spec_own_defaults(upgraded)})


def complete_task_spec(spec: Mapping[str, Any]) -> dict[str, Any]:
    """``spec`` in the current form with every default written out (the optimiser's and scheduler's included),
    JSON-safe, so that a later change of a default cannot alter what a record builds."""
    parser, config = _parse(spec)
    return json.loads(parser.dump(config, format="json", skip_none=False))["task"]


def instantiate_task(spec: Mapping[str, Any]) -> MoETask:
    """The task a spec describes, built as ``moezoo fit`` builds it."""
    parser, config = _parse(spec)
    return parser.instantiate(config).task
