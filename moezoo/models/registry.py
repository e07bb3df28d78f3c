"""A timm-style model registry: ``create_model("moe_vit_tiny", num_classes=10)`` and ``list_models("moe_*")``.

Model functions register under their own name (``<family>_<size>``). A name may carry a weights tag after a dot
(``moe_vit_tiny.fashion_mnist``); the tag selects a pretrained configuration registered with
:func:`register_pretrained`.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor, nn

from moezoo.models.hub import fetch, load_state_dict, verify_file
from moezoo.models.pretrained_cfg import PretrainedCfg
from moezoo.models.spec import spec_argument, upgrade_model_kwargs

log = logging.getLogger(__name__)

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


# Model arguments that size only the output head (timm's ``classifier``; DiT's class table, YOLO's class outputs,
# PatchTST's horizon): with ``pretrained=True`` a changed one loads every other tensor and re-initialises the head.
HEAD_ARGUMENTS = ("num_classes", "vocab_size", "pred_len")


def is_release_folder(name: str) -> bool:
    """Whether ``name`` is a folder in the Hugging Face Hub layout (``config.json`` + ``model.safetensors``)."""
    from moezoo.models.hub_layout import is_release_folder as _is_folder

    return _is_folder(name)


def resolve_pretrained_cfg(name: str) -> PretrainedCfg:
    """The record of a registered release ``<model>.<tag>``, of a saved folder or of an ``hf-hub:<owner>/<repo>``
    snapshot (:mod:`moezoo.models.hub_layout`)."""
    from moezoo.models.hub_layout import hub_snapshot

    name = hub_snapshot(name)
    if is_release_folder(name):
        from moezoo.models.hub_layout import read_folder

        return read_folder(name)[1]
    return get_pretrained_cfg(name)


def create_model(name: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Build a registered model by name.

    - ``"moe_vit_tiny"``: the registered size with ``kwargs`` on top.
    - ``"moe_vit_tiny.digits"``: the release's architecture (its recorded ``model_kwargs``, ``kwargs`` on top), with
      random weights unless ``pretrained=True`` loads the released ones.
    - a folder written by :func:`moezoo.models.hub_layout.save_pretrained` (``config.json`` + ``model.safetensors``):
      its architecture, with its weights when ``pretrained=True``.

    With ``pretrained=True`` a changed head argument (:data:`HEAD_ARGUMENTS`: ``num_classes=3``, ``vocab_size``,
    ``pred_len``) loads every tensor but the head's and re-initialises the head, with a logged warning. A model
    built from a release carries its record as ``model.pretrained_cfg`` (``moezoo.data.transform_for(model)``).
    ``"hf-hub:<owner>/<repo>[@<revision>]"`` loads such a folder from the Hugging Face Hub (needs huggingface_hub and
    the network unless cached).
    """
    from moezoo.models.hub_layout import hub_snapshot

    name = hub_snapshot(name)
    folder = is_release_folder(name)
    cfg: PretrainedCfg | None
    if folder:
        from moezoo.models.hub_layout import read_folder

        base, cfg = read_folder(name)
    else:
        base, tag = split_name(name)
        cfg = get_pretrained_cfg(name) if tag is not None or pretrained else None
    if base not in _MODELS:
        close = fnmatch.filter(_MODELS, f"{base.split('_')[0]}*")
        raise ValueError(f"model {base!r} is not registered; similar: {close or list_models()}")
    model_kwargs = kwargs if cfg is None else pretrained_model_kwargs(base, cfg, kwargs)
    model = _MODELS[base](**model_kwargs)
    model.moezoo_architecture = base  # type: ignore[assignment]  # what save_pretrained records
    model.moezoo_kwargs = model_kwargs  # type: ignore[assignment]
    if cfg is None:
        return model
    if pretrained:
        changed = {
            k: (cfg.model_kwargs.get(k), kwargs[k])
            for k in HEAD_ARGUMENTS
            if k in kwargs and kwargs[k] != cfg.model_kwargs.get(k)
        }
        if folder:
            from moezoo.models.hub_layout import weights_path

            path = weights_path(name)
            if cfg.sha256:
                verify_file(path, cfg.sha256, cfg.num_bytes)
            state = load_state_dict(path)
        else:
            state = load_state_dict(fetch(cfg))
        load_release_state(model, state, name, changed)
    model.pretrained_cfg = cfg  # type: ignore[assignment]
    model.pretrained_name = name  # type: ignore[assignment]
    return model


def load_release_state(
    model: nn.Module, state: dict[str, Tensor], name: str, changed_heads: Mapping[str, tuple[Any, Any]]
) -> None:
    """Load released weights; with ``changed_heads`` (head arguments that differ from the release: ``{key: (release
    value, new value)}``) the tensors whose shape changed keep their fresh initialisation, with a logged warning
    (timm's behaviour). Without, every tensor must match."""
    if not changed_heads:
        model.load_state_dict(state, strict=True)
        return
    own = model.state_dict()
    reinit = sorted(k for k, v in state.items() if k in own and own[k].shape != v.shape)
    if not reinit:  # a head argument no tensor depends on (moe_tsfm's pred_len): every tensor loads
        model.load_state_dict(state, strict=True)
        return
    kept = {k: v for k, v in state.items() if k not in reinit}
    missing, unexpected = model.load_state_dict(kept, strict=False)
    if sorted(missing) != reinit or unexpected:
        raise RuntimeError(
            f"{name}: after changing {sorted(changed_heads)}, keys missing {sorted(set(missing) - set(reinit))}, "
            f"unexpected {unexpected}: the release and this architecture differ beyond the head"
        )
    log.warning(
        "%s: %s differ from the release, so %d tensor(s) were re-initialised (not loaded): %s; every other tensor "
        "was loaded. Fine-tune the model before use.",
        name, ", ".join(f"{k}={new} (release: {old})" for k, (old, new) in changed_heads.items()), len(reinit), reinit,
    )  # fmt: skip


def pretrained_model_kwargs(model: str, cfg: PretrainedCfg, overrides: dict[str, Any]) -> dict[str, Any]:
    """The constructor arguments of a release: its recorded ``model_kwargs`` with ``overrides`` on top.

    The one place where a release record's arguments become a model's (``create_model("<model>.<tag>")``); records
    of the older flat form are translated here silently (they are ours, not the user's config), and a spec argument
    in ``overrides`` (``moe={...}``) overrides the record's key by key.
    """
    recorded, _ = upgrade_model_kwargs(model, cfg.model_kwargs)
    given, _ = upgrade_model_kwargs(model, overrides)
    out = {**recorded, **given}
    into = spec_argument(model)
    if into is not None and isinstance(recorded.get(into), Mapping) and isinstance(given.get(into), Mapping):
        out[into] = {**recorded[into], **given[into]}
    return out


def build_task_model(name: str, model_kwargs: Mapping[str, Any], pretrained: bool) -> nn.Module:
    """The model of a training config (``model:``, ``model_kwargs:``, ``pretrained:`` of a task), never silently
    different from what was asked: a release name (or saved folder) with ``pretrained`` fine-tunes from its weights;
    without, it builds the release's architecture with random weights and logs a warning that says so."""
    from moezoo.models.hub_layout import HUB_PREFIX

    release = name.startswith(HUB_PREFIX) or is_release_folder(name) or split_name(name)[1] is not None
    if pretrained:
        cfg = resolve_pretrained_cfg(name)
        log.warning("model %r: starting from its released weights (%s), pretrained=true", name, cfg.file)
        return create_model(name, pretrained=True, **model_kwargs)
    if release:
        log.warning(
            "model %r is a release, but pretrained is false: building its architecture with random weights "
            "(training from scratch); set pretrained: true to fine-tune from its weights",
            name,
        )
    return create_model(name, **model_kwargs)
