"""A timm-style model registry: ``create_model("moe_vit_tiny", num_classes=10)`` and ``list_models("moe_*")``.

Model functions register under their own name (``<family>_<size>``). A name may carry a weights tag after a dot
(``moe_vit_tiny.fashion_mnist``); the tag selects a pretrained configuration registered with
:func:`register_pretrained`.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from typing import Any

from torch import nn

from moezoo.models.hub import load_pretrained
from moezoo.models.pretrained_cfg import PretrainedCfg

_MODELS: dict[str, Callable[..., nn.Module]] = {}
_PRETRAINED: dict[str, dict[str, PretrainedCfg]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator: register a model function under its ``__name__``."""
    name = fn.__name__
    if name in _MODELS:
        raise ValueError(f"model {name!r} is already registered")
    _MODELS[name] = fn
    return fn


def register_pretrained(model_name: str, tag: str, cfg: PretrainedCfg) -> None:
    """Register released weights ``cfg`` as ``model_name.tag`` (a later registration of the same name wins)."""
    _PRETRAINED.setdefault(model_name, {})[tag] = cfg


def unregister_pretrained(name: str) -> PretrainedCfg:
    """Remove the release ``<model>.<tag>`` from the registry and return its config."""
    base, tag = split_name(name)
    if tag is None:
        raise ValueError(f"name must be '<model>.<tag>', got {name!r}")
    cfg = get_pretrained_cfg(name)  # a clear error for an unknown name
    del _PRETRAINED[base][tag]
    if not _PRETRAINED[base]:
        del _PRETRAINED[base]
    return cfg


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
    model = _MODELS[base](**pretrained_model_kwargs(cfg, kwargs))
    load_pretrained(model, cfg)
    return model


def pretrained_model_kwargs(cfg: PretrainedCfg, overrides: dict[str, Any]) -> dict[str, Any]:
    """The constructor arguments of a release: its recorded ``model_kwargs`` with ``overrides`` on top.

    The one place where a release record's arguments become a model's (``create_model(..., pretrained=True)``);
    a translation of older record formats belongs here.
    """
    return {**cfg.model_kwargs, **overrides}
