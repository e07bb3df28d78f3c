"""The legacy shim: configs and released records written before ``MoESpec`` and the optimiser callables keep
loading. Everything that reads the old form is here (and, for model arguments, in
:func:`moezoo.models.spec.upgrade_model_kwargs`), so that the shim can be removed in one piece.

A task spec ``{class_path, init_args}`` of a :class:`~moezoo.tasks.base.MoETask` is upgraded so:

- ``lr``, ``weight_decay`` -> ``optimizer: {class_path: torch.optim.AdamW, init_args: {lr, weight_decay}}``;
- ``warmup_frac``, ``min_lr_ratio`` -> ``lr_scheduler: {class_path: moezoo.tasks.optim.WarmupCosineLR,
  init_args: {warmup_frac, min_lr_ratio}}``; the old values a config left out take that task's old defaults
  (:data:`OLD_DEFAULTS`), so an old config trains exactly as it did;
- flat MoE arguments in ``model_kwargs`` (``num_experts``, ``router``, ``dense`` ...) -> ``model_kwargs.moe``.

One :class:`~moezoo.models.spec.LegacyConfigWarning` per config names the new keys. Hooks: the config loader of
``moezoo fit`` (:func:`register_config_loader`, used by :mod:`moezoo.tasks.cli`) and the zoo's records
(:func:`moezoo.tasks.specs.instantiate_task`); ``create_model`` folds old model arguments by itself.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from moezoo.models.spec import upgrade_model_kwargs, warn_legacy
from moezoo.tasks.optim import DEFAULT_LR_SCHEDULER, DEFAULT_OPTIMIZER, import_class

OLD_OPTIMIZER_KEYS = ("lr", "weight_decay")
OLD_SCHEDULER_KEYS = ("warmup_frac", "min_lr_ratio")
#: the old defaults of those arguments: the base task's, and where a domain task differed (a subclass of a task
#: takes that task's)
OLD_DEFAULTS: dict[str, dict[str, float]] = {
    "moezoo.tasks.base.MoETask": dict(lr=1e-3, weight_decay=0.05, warmup_frac=0.05, min_lr_ratio=0.01),
    "moezoo.tasks.generation.task.ImageGenerationTask": dict(lr=1e-3, weight_decay=0.0, min_lr_ratio=0.1),
    "moezoo.tasks.speech.asr.SpeechRecognitionTask": dict(lr=2e-3, weight_decay=0.01),
    "moezoo.tasks.detection.task.DetectionTask": dict(lr=2e-3, min_lr_ratio=0.05),
}
PARSER_MODE = "moezoo"


def _task_class(class_path: Any) -> type | None:
    """The task class a spec names, or None when it names no :class:`MoETask` (then nothing is upgraded)."""
    from moezoo.tasks.base import MoETask

    try:
        cls = import_class(class_path, "class_path")
    except ValueError:
        return None
    return cls if issubclass(cls, MoETask) else None


def _old_defaults(cls: type) -> dict[str, float]:
    """The old defaults of ``cls``: its nearest listed class's over the base task's."""
    found = [OLD_DEFAULTS.get(f"{c.__module__}.{c.__qualname__}") for c in inspect.getmro(cls)]
    listed = [d for d in found if d is not None]
    assert listed, f"{cls} is not a MoETask"  # _task_class guarantees a MoETask subclass
    return {**listed[-1], **listed[0]}


def upgrade_task_spec(spec: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The current form of a task spec, and the old keys that moved (none when it was current). No warning."""
    cls = _task_class(spec.get("class_path")) if isinstance(spec, Mapping) else None
    if cls is None:
        return dict(spec), []
    init = dict(spec.get("init_args") or {})
    moved = sorted(k for k in (*OLD_OPTIMIZER_KEYS, *OLD_SCHEDULER_KEYS) if k in init)
    if moved:
        both = [k for k in ("optimizer", "lr_scheduler") if k in init]
        if both:
            raise ValueError(
                f"{spec['class_path']}: the old arguments {moved} cannot be combined with {both}; "
                f"write lr and weight_decay under optimizer.init_args, warmup_frac and min_lr_ratio under "
                f"lr_scheduler.init_args"
            )
        old = {**_old_defaults(cls), **{k: init.pop(k) for k in moved}}
        init["optimizer"] = {
            "class_path": DEFAULT_OPTIMIZER["class_path"],
            "init_args": {k: old[k] for k in OLD_OPTIMIZER_KEYS},
        }
        init["lr_scheduler"] = {
            "class_path": DEFAULT_LR_SCHEDULER["class_path"],
            "init_args": {k: old[k] for k in OLD_SCHEDULER_KEYS},
        }
    if isinstance(init.get("model_kwargs"), Mapping):
        model = init.get("model", inspect.signature(cls).parameters["model"].default)
        if isinstance(model, str):
            init["model_kwargs"], model_moved = upgrade_model_kwargs(model, init["model_kwargs"])
            moved += [f"model_kwargs.{k}" for k in model_moved]
    return {**spec, "init_args": init}, moved


def _new_form(init_args: Mapping[str, Any], moved: list[str]) -> str:
    keys = ["optimizer", "lr_scheduler"] if any("." not in k for k in moved) else []
    parts = [f"{k}: {init_args[k]}" for k in keys]
    model_kwargs = init_args.get("model_kwargs") or {}
    parts += [f"model_kwargs.{k}: {v}" for k, v in model_kwargs.items() if isinstance(v, Mapping)]
    return ", ".join(parts)


def upgrade_task_spec_warn(spec: Mapping[str, Any], where: str) -> dict[str, Any]:
    """:func:`upgrade_task_spec` with the one warning for an old spec."""
    new, moved = upgrade_task_spec(spec)
    if moved:
        warn_legacy(where, moved, _new_form(new["init_args"], moved), stacklevel=3)
    return new


def upgrade_config(config: Any) -> Any:
    """A loaded config (or task spec) in the current form: its ``model`` task spec upgraded, with one warning."""
    if not isinstance(config, dict):
        return config
    if "class_path" in config:
        return upgrade_task_spec_warn(config, f"task {config['class_path']}")
    if isinstance(config.get("model"), Mapping) and "class_path" in config["model"]:
        return {**config, "model": upgrade_task_spec_warn(config["model"], "config model.init_args")}
    return config


def register_config_loader(*steps: Callable[[Any], Any]) -> str:
    """Register the parser mode that ``moezoo fit`` parses configs with: omegaconf (``${...}`` interpolation), then
    :func:`upgrade_config`, then each of ``steps`` (functions of the loaded config that are not about the old form,
    e.g. :func:`moezoo.tasks.optim.config_own_defaults`). Returns the mode's name."""
    import yaml
    from jsonargparse import get_loader, set_loader

    try:
        omegaconf_load = get_loader("omegaconf")
    except KeyError:  # jsonargparse registers its omegaconf loader on first use
        from jsonargparse._loaders_dumpers import set_omegaconf_loader

        set_omegaconf_loader()
        omegaconf_load = get_loader("omegaconf")

    def load(value: str) -> Any:
        config = upgrade_config(omegaconf_load(value))
        for step in steps:
            config = step(config)
        return config

    set_loader(PARSER_MODE, load, (yaml.YAMLError,))
    return PARSER_MODE
