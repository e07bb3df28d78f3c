"""A timm-style model registry: ``create_model("moe_vit_tiny", num_classes=10)`` and ``list_models("moe_*")``.

Model functions register under their own name (``<family>_<size>``). A name may carry a weights tag after a dot
(``moe_vit_tiny.fashion_mnist``); the tag selects a pretrained configuration registered with
:func:`register_pretrained`.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}
_PRETRAINED: dict[str, dict[str, PretrainedCfg]] = {}


@dataclass
class PretrainedCfg:
    """Where a released checkpoint lives and what it was trained and evaluated with."""

    file: str
    sha256: str
    urls: list[str] = field(default_factory=list)
    num_bytes: int | None = None
    license: str = ""
    dataset: str = ""
    config: str = ""
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    # What the zoo needs to rerun the evaluation and write the model card (moezoo.zoo); all optional.
    domain: str = ""
    description: str = ""
    task: dict[str, Any] = field(default_factory=dict)  # {"class_path": ..., "init_args": {...}} of the task
    data: dict[str, Any] = field(default_factory=dict)  # {"class_path": ..., "init_args": {...}} of the data
    tolerance: dict[str, float] = field(default_factory=dict)  # absolute tolerance per metric for `zoo eval`
    params: dict[str, int] = field(default_factory=dict)  # {"total": ..., "active": ...} per token
    routing: dict[str, Any] = field(default_factory=dict)  # routing statistics of the evaluation run
    dense_twin: str = ""  # "name.tag" of the dense twin's release, on an MoE release
    checkpoint: str = ""  # the training checkpoint the weights were taken from (file name)
    storage_dtype: str = "float32"  # how the file stores floating tensors; they load into the model's dtype
    limitations: list[str] = field(default_factory=list)
    citations: list[str] = field(default_factory=list)


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator: register a model function under its ``__name__``."""
    name = fn.__name__
    if name in _MODELS:
        raise ValueError(f"model {name!r} is already registered")
    _MODELS[name] = fn
    return fn


def register_pretrained(model_name: str, tag: str, cfg: PretrainedCfg) -> None:
    _PRETRAINED.setdefault(model_name, {})[tag] = cfg


def split_name(name: str) -> tuple[str, str | None]:
    base, _, tag = name.partition(".")
    return base, tag or None


def list_models(pattern: str = "*", pretrained: bool = False) -> list[str]:
    """Registered model names matching a glob; with ``pretrained`` the ``name.tag`` of released weights."""
    if pretrained:
        names = [f"{m}.{t}" for m, tags in _PRETRAINED.items() for t in tags]
    else:
        names = list(_MODELS)
    return sorted(n for n in names if fnmatch.fnmatch(n, pattern))


def get_pretrained_cfg(name: str) -> PretrainedCfg:
    base, tag = split_name(name)
    tags = _PRETRAINED.get(base, {})
    if not tags:
        raise ValueError(f"model {base!r} has no released weights; models with weights: {list_models(pretrained=True)}")
    if tag is None:
        tag = next(iter(tags))
    if tag not in tags:
        raise ValueError(f"model {base!r} has no weights tagged {tag!r}; available tags: {sorted(tags)}")
    return tags[tag]


def create_model(name: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Build a registered model by name; ``pretrained=True`` loads the tagged released weights."""
    base, _ = split_name(name)
    if base not in _MODELS:
        close = fnmatch.filter(_MODELS, f"{base.split('_')[0]}*")
        raise ValueError(f"model {base!r} is not registered; similar: {close or list_models()}")
    if not pretrained:
        return _MODELS[base](**kwargs)
    cfg = get_pretrained_cfg(name)
    model = _MODELS[base](**{**cfg.model_kwargs, **kwargs})
    from moezoo.models.hub import load_pretrained

    load_pretrained(model, cfg)
    return model
