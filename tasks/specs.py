"""Task specs (``{class_path, init_args}``) outside the command line: complete them and build tasks from them
exactly as ``moezoo fit`` does (LightningCLI's jsonargparse: ``**kwargs`` resolved to the base task's arguments,
``optimizer``/``lr_scheduler`` turned into callables, another class than the default's with its own defaults:
:func:`moezoo.tasks.optim.task_spec_own_defaults`), old specs upgraded first (:mod:`moezoo.tasks.legacy`), and
the model settings the data decides filled in from the data module as ``moezoo fit``'s link does
(:func:`with_data_settings`). The zoo records and rebuilds the task of a release with these.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from moezoo.tasks.base import MoETask, data_settings_of
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


def with_data_settings(spec: Mapping[str, Any], datamodule: Any) -> dict[str, Any]:
    """``spec`` with ``init_args.data_settings`` filled from ``datamodule`` (a data module, or its
    ``{class_path, init_args}`` spec), what ``moezoo fit``'s ``link_arguments("data",
    "model.init_args.data_settings")`` does: a config that leaves image size, classes, vocabulary, look-back ... to
    the data builds the same model here as in ``fit``, and a conflicting explicit setting is the same error naming
    both keys. Settings already in the spec (a record's) are kept where the data module does not decide them."""
    if isinstance(datamodule, Mapping):
        from moezoo.tasks.zoo.specs import instantiate

        datamodule = instantiate(datamodule)
    init_args = dict(spec.get("init_args") or {})
    settings = data_settings_of(datamodule, init_args.get("data_settings"))
    if settings:
        init_args["data_settings"] = json.loads(json.dumps(settings))  # JSON-safe: a release records the spec
    return {**spec, "init_args": init_args}


def instantiate_task(spec: Mapping[str, Any], datamodule: Any = None) -> MoETask:
    """The task a spec describes, built as ``moezoo fit`` builds it: with ``datamodule`` (a data module or its
    spec), the settings the data decides follow it (:func:`with_data_settings`)."""
    if datamodule is not None:
        spec = with_data_settings(spec, datamodule)
    parser, config = _parse(spec)
    return parser.instantiate(config).task
