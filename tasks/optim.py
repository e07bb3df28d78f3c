"""The optimiser and learning-rate schedule of every task, as LightningCLI callables.

A task takes ``optimizer`` (a callable ``params -> Optimizer``, LightningCLI's ``OptimizerCallable``) and
``lr_scheduler`` (``optimizer -> LRScheduler``, ``LRSchedulerCallable``; ``None`` keeps the learning rate
constant). In a config both are ``{class_path, init_args}``, and LightningCLI turns them into those callables;
in Python a callable or the same mapping works. The default is the recipe every task trained with before:

- AdamW over :func:`param_groups`: no weight decay on biases, norms, embeddings and tokens; the optimiser's own
  ``weight_decay`` on the matrices;
- :class:`WarmupCosineLR`: linear warmup over ``warmup_frac`` of the run, then cosine decay to
  ``min_lr_ratio * lr``, stepped once per optimiser step; the run's length comes from the trainer
  (``estimated_stepping_batches``), so the schedule fits ``max_epochs`` or ``max_steps`` by itself.

Another class gets its own defaults: ``optimizer: {class_path: torch.optim.Adam, init_args: {lr: 1e-4}}`` trains with
Adam's ``weight_decay=0``, not the recipe's 0.05; only the default's own class (AdamW) takes the recipe's values for
the arguments a config leaves out. (LightningCLI's parser, jsonargparse, would otherwise keep every init_arg of the
default that the new class accepts; :func:`own_class_defaults` writes the new class's defaults into a loaded config,
see :func:`config_own_defaults`.)

A schedule is stepped once per optimiser step unless its class sets ``interval = "epoch"`` (:func:`interval`):
:class:`StepDecayLR`, the per-epoch decay of the public PatchTST / LTSF-Linear code, is stepped once per epoch.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

DEFAULT_OPTIMIZER: dict[str, Any] = {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-3, "weight_decay": 0.05}}
DEFAULT_LR_SCHEDULER: dict[str, Any] = {
    "class_path": "moezoo.tasks.optim.WarmupCosineLR",
    "init_args": {"warmup_frac": 0.05, "min_lr_ratio": 0.01},
}


def param_groups(model: nn.Module, weight_decay: float | None = None) -> list[dict[str, Any]]:
    """Two optimiser groups: matrices, and biases, norms, embeddings and tokens (1-D or named ``*_token``,
    ``pos_embed``, ``*norm*``) with no weight decay. ``weight_decay=None`` leaves the matrices' decay to the
    optimiser's own ``weight_decay``."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.dim() < 2 or name.endswith(("_token", "pos_embed")) or "norm" in name:
            no_decay.append(param)
        else:
            decay.append(param)
    decay_group: dict[str, Any] = {"params": decay}
    if weight_decay is not None:
        decay_group["weight_decay"] = weight_decay
    return [decay_group, {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Learning-rate factor at ``step``: linear warmup over ``warmup`` steps, cosine decay to ``min_ratio`` at
    ``total``, then flat."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupCosineLR(LRScheduler):
    """Linear warmup over ``warmup_frac`` of ``total_steps`` (at least one step), then cosine decay to
    ``min_lr_ratio`` times each group's initial learning rate; stepped once per optimiser step.

    ``total_steps=None`` (the default in configs): the task sets the run's length from the trainer with
    :meth:`set_total_steps` before training. It is not part of the saved state, so a resumed run that trains
    longer stretches the schedule to its new length.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        warmup_frac: float = 0.05,
        min_lr_ratio: float = 0.01,
        total_steps: int | None = None,
        last_epoch: int = -1,
    ) -> None:
        if not 0 <= warmup_frac < 1:
            raise ValueError(f"warmup_frac must be in [0, 1), got {warmup_frac!r}")
        if not 0 <= min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio!r}")
        _check_total_steps(total_steps, allow_none=True)
        self.warmup_frac = warmup_frac
        self.min_lr_ratio = min_lr_ratio
        self.total_steps = total_steps
        super().__init__(optimizer, last_epoch)

    def factor(self, step: int) -> float:
        total = self.total_steps or 1
        return warmup_cosine(step, total, max(1, int(self.warmup_frac * total)), self.min_lr_ratio)

    def get_lr(self) -> list[float | Tensor]:
        return [base * self.factor(self.last_epoch) for base in self.base_lrs]

    def set_total_steps(self, total_steps: int) -> None:
        """Fix the run's length and move the current learning rates onto the schedule it gives."""
        _check_total_steps(total_steps, allow_none=False)
        self.total_steps = total_steps
        self._last_lr = self.get_lr()
        for group, lr in zip(self.optimizer.param_groups, self._last_lr):
            group["lr"] = lr

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.pop("total_steps", None)
        return state


class StepDecayLR(LRScheduler):
    """The per-epoch step decay of the public PatchTST / LTSF-Linear training code: the initial learning rate for
    ``constant_epochs`` epochs, then ``gamma`` times the previous epoch's; epoch ``e`` (from 0) trains at
    ``lr * gamma ** max(0, e - constant_epochs + 1)``. Stepped once per epoch (``interval = "epoch"``).

    Their ``lradj="type3"`` (PatchTST on ETT, the default of its ``run_longExp.py``) is ``constant_epochs=4,
    gamma=0.9``; ``lradj="type1"`` (LTSF-Linear's default) is ``constant_epochs=2, gamma=0.5``: both adjust the
    rate after epoch ``e`` with ``adjust_learning_rate(epoch=e + 1)``, so the first decayed epoch is the 5th / 3rd.
    """

    interval: ClassVar[str] = "epoch"

    def __init__(
        self, optimizer: Optimizer, constant_epochs: int = 4, gamma: float = 0.9, last_epoch: int = -1
    ) -> None:
        if not isinstance(constant_epochs, int) or isinstance(constant_epochs, bool) or constant_epochs < 1:
            raise ValueError(f"constant_epochs must be an integer >= 1, got {constant_epochs!r}")
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0 < gamma <= 1:
            raise ValueError(f"gamma must be a number in (0, 1], got {gamma!r}")
        self.constant_epochs = constant_epochs
        self.gamma = float(gamma)
        super().__init__(optimizer, last_epoch)

    def factor(self, epoch: int) -> float:
        return self.gamma ** max(0, epoch - self.constant_epochs + 1)

    def get_lr(self) -> list[float | Tensor]:
        return [base * self.factor(self.last_epoch) for base in self.base_lrs]


def interval(scheduler: LRScheduler) -> str:
    """When Lightning steps ``scheduler``: ``"epoch"`` for a class that says so (:class:`StepDecayLR`), else
    ``"step"`` (once per optimiser step, as :class:`WarmupCosineLR` and the task's ``total_steps`` expect)."""
    value = getattr(type(scheduler), "interval", "step")
    if value not in ("step", "epoch"):
        raise ValueError(f"{type(scheduler).__name__}.interval must be 'step' or 'epoch', got {value!r}")
    return value


def _check_total_steps(total_steps: Any, allow_none: bool) -> None:
    if total_steps is None and allow_none:
        return
    if not isinstance(total_steps, int) or isinstance(total_steps, bool) or total_steps < 1:
        raise ValueError(
            f"total_steps must be a positive integer{' or None' if allow_none else ''}, got {total_steps!r}"
        )


def import_class(class_path: Any, argument: str) -> type:
    module, _, name = class_path.rpartition(".") if isinstance(class_path, str) else ("", "", "")
    try:
        cls = getattr(importlib.import_module(module), name) if module else None
    except (ImportError, AttributeError):
        cls = None
    if not inspect.isclass(cls):
        raise ValueError(
            f"{argument}.class_path must name an importable class ('package.module.Class'), got {class_path!r}"
        )
    return cls


#: argument name -> (the base class a spec of it must name, the task's default spec)
TASK_CALLABLES: dict[str, tuple[type, dict[str, Any]]] = {
    "optimizer": (Optimizer, DEFAULT_OPTIMIZER),
    "lr_scheduler": (LRScheduler, DEFAULT_LR_SCHEDULER),
}
#: where a class_path without a module (``Adam``, ``StepLR``) is looked up, as LightningCLI resolves short names
SHORT_NAME_MODULES = ("torch.optim", "torch.optim.lr_scheduler", "moezoo.tasks.optim")
_PLAIN = (type(None), bool, int, float, str)
_CLASS_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


def _spec_class(class_path: Any) -> type | None:
    """The class a spec's ``class_path`` names (a short name looked up in :data:`SHORT_NAME_MODULES`), else None."""
    if not isinstance(class_path, str) or not _CLASS_PATH.fullmatch(class_path):
        return None
    paths = [class_path]
    if "." not in class_path:
        paths += [f"{module}.{class_path}" for module in SHORT_NAME_MODULES]
    for path in paths:
        try:
            return import_class(path, "class_path")
        except ValueError:
            continue
    return None


def _is_plain(value: Any) -> bool:
    if isinstance(value, (tuple, list)):
        return all(_is_plain(v) for v in value)
    return isinstance(value, _PLAIN)


def own_class_defaults(spec: Any, kind: type, default: Mapping[str, Any]) -> Any:
    """``spec`` (an ``optimizer`` or ``lr_scheduler`` ``{class_path, init_args}``) with, when it names a class other
    than ``default``'s, that class's own default written out for every argument it leaves out that the default's
    class also takes (plain values only); anything else is returned as it is.

    Why: jsonargparse parses a config's spec over the default's, and keeps each of the default's init_args that the
    new class accepts, so ``torch.optim.Adam`` without ``weight_decay`` would train with AdamW's 0.05 (and
    ``torch.optim.SGD`` too). Written out, the class's own defaults win; what the spec says is kept.
    """
    if not isinstance(spec, Mapping) or "class_path" not in spec:
        return spec
    cls, default_cls = _spec_class(spec["class_path"]), _spec_class(default["class_path"])
    if cls is None or default_cls is None or cls is default_cls or not issubclass(cls, kind):
        return spec
    init_args = spec.get("init_args") or {}
    if not isinstance(init_args, Mapping):
        return spec
    carried = set(inspect.signature(default_cls).parameters)
    own = {
        p.name: p.default
        for i, p in enumerate(inspect.signature(cls).parameters.values())
        if i > 0  # the parameters or the optimiser, given when the task builds it
        and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        and p.default is not p.empty
        and p.name in carried
        and _is_plain(p.default)
    }
    return {**spec, "init_args": {**own, **init_args}}


def task_spec_own_defaults(spec: Any) -> Any:
    """A task spec ``{class_path, init_args}`` with :func:`own_class_defaults` applied to its ``optimizer`` and
    ``lr_scheduler`` (a spec of another class than a :class:`~moezoo.tasks.base.MoETask` is returned as it is)."""
    from moezoo.tasks.base import MoETask

    if not isinstance(spec, Mapping) or not isinstance(spec.get("init_args"), Mapping):
        return spec
    cls = _spec_class(spec.get("class_path"))
    if cls is None or not issubclass(cls, MoETask):
        return spec
    init_args = dict(spec["init_args"])
    for name, (kind, default) in TASK_CALLABLES.items():
        if name in init_args:
            init_args[name] = own_class_defaults(init_args[name], kind, default)
    return {**spec, "init_args": init_args}


def config_own_defaults(config: Any) -> Any:
    """A loaded config (or value) with the optimiser and scheduler classes' own defaults written out
    (:func:`own_class_defaults`): the task spec under ``model``, a task spec itself, or a bare ``optimizer`` /
    ``lr_scheduler`` spec (a ``--model.init_args.optimizer '{class_path: ..., init_args: ...}'`` value). Used by the
    config loader of ``moezoo fit`` (:func:`moezoo.tasks.legacy.register_config_loader`)."""
    if not isinstance(config, Mapping):
        return config
    if isinstance(config.get("model"), Mapping) and "class_path" in config["model"]:
        return {**config, "model": task_spec_own_defaults(config["model"])}
    cls = _spec_class(config["class_path"]) if "class_path" in config else None
    for kind, default in TASK_CALLABLES.values():
        if cls is not None and issubclass(cls, kind):
            return own_class_defaults(config, kind, default)
    return task_spec_own_defaults(config) if cls is not None else config


def class_options_as_specs(argv: Sequence[str], prefix: str = "--model.init_args.") -> list[str]:
    """Command-line arguments with each ``{prefix}optimizer CLASS`` or ``{prefix}optimizer.class_path CLASS`` (also
    with ``=``, and the same for ``lr_scheduler``) written as ``{prefix}optimizer '{"class_path": "CLASS"}'``: a
    mapping, which the config loader passes through :func:`config_own_defaults`, so that a class named on the
    command line also gets its own defaults. Values that name no such class (``null``, a mapping) are left alone."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        key, eq, inline = token.partition("=")
        name = key.removeprefix(prefix).removesuffix(".class_path") if key.startswith(prefix) else ""
        if name not in TASK_CALLABLES or (not eq and i + 1 >= len(argv)):
            out.append(token)
            i += 1
            continue
        value, step = (inline, 1) if eq else (argv[i + 1], 2)
        cls = _spec_class(value)
        if cls is not None and issubclass(cls, TASK_CALLABLES[name][0]):
            out += [f"{prefix}{name}", json.dumps({"class_path": value})]
        else:
            out += argv[i : i + step]
        i += step
    return out


def as_factory(
    value: Callable[..., Any] | Mapping[str, Any], argument: str, kind: type, default: Mapping[str, Any]
) -> Callable[..., Any]:
    """A task's ``optimizer``/``lr_scheduler`` argument as a callable.

    A callable (LightningCLI's) is used as given. A ``{class_path, init_args}`` mapping becomes
    ``partial(class, **init_args)``; as in LightningCLI, init_args of the default's class are merged over the
    default's, and unknown ones are an error here rather than at the first training step.
    """
    if callable(value):
        return value
    if not isinstance(value, Mapping) or "class_path" not in value:
        raise TypeError(f"{argument} must be a callable or a {{class_path, init_args}} mapping, got {value!r}")
    cls = import_class(value["class_path"], argument)
    if not issubclass(cls, kind):
        raise TypeError(f"{argument}.class_path={value['class_path']!r} is not a {kind.__module__}.{kind.__name__}")
    init_args = dict(value.get("init_args") or {})
    if cls is import_class(default["class_path"], argument):
        init_args = {**default["init_args"], **init_args}
    try:
        inspect.signature(cls).bind_partial(None, **init_args)
    except TypeError as err:
        raise TypeError(f"{argument}.init_args {sorted(init_args)} do not fit {value['class_path']}: {err}") from err
    return functools.partial(cls, **init_args)


def build_optimizer(
    model: nn.Module,
    optimizer: Callable[..., Optimizer],
    lr_scheduler: Callable[..., LRScheduler] | None,
    total_steps: int,
) -> tuple[Optimizer, LRScheduler | None]:
    """The optimiser over :func:`param_groups` of ``model`` and its scheduler for a run of ``total_steps`` steps
    (given to a schedule whose ``total_steps`` is unset, such as :class:`WarmupCosineLR`)."""
    opt = optimizer(param_groups(model))
    if lr_scheduler is None:
        return opt, None
    scheduler = lr_scheduler(opt)
    if getattr(scheduler, "total_steps", 0) is None and hasattr(scheduler, "set_total_steps"):
        scheduler.set_total_steps(max(1, int(total_steps)))
    return opt, scheduler
