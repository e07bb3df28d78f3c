"""``MoESpec``: the one MoE configuration object that every model family takes as ``moe=``.

A model's MoE settings (which blocks hold an MoE, how many experts, the router and its options, shared experts,
Seg-MoE segments, the dense twin) travel as one typed, validated object instead of ten arguments repeated in every
signature, as torchtitan passes ``MoEArgs``. A model takes ``moe: MoESpec | Mapping | None``:

- a :class:`MoESpec` is used as given;
- a mapping (``moe: {router: soft, router_kwargs: {slots_per_expert: 12}}`` in a config) overrides the family's
  and the size's defaults key by key, so ``create_model("moe_vit_tiny", moe={"router": "soft"})`` keeps the
  tiny size's 8 experts in every other block;
- ``None`` is those defaults.

The spec is validated when it is built: the types and ranges of its own fields, and the router's options against
what the router accepts (:func:`check_spec_router`). The option *values* are checked by the router's constructor
when the model builds its layers. ``dense=True`` is the dense twin: every MoE slot gets a dense FFN whose hidden
width is the MoE's active width per token (``top_k * expert width + shared experts``).

Old flat arguments (``create_model("moe_vit_tiny", num_experts=8, router="topk", dense=True)``, the ``model_kwargs``
of the released records) still build, through :func:`upgrade_model_kwargs`: each family registers which of its
arguments moved into which spec argument, and the builder folds them in with one :class:`LegacyConfigWarning`
naming the new keys.
"""

from __future__ import annotations

import dataclasses
import inspect
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from moezoo.layers import MOE_LAYERS, ROUTERS, MoE
from moezoo.layers.routers import ATTENTION_PROBS, ROUTER_STATE, router_options
from moezoo.layers.routers import check_router_kwargs as check_router_kwargs_of_router
from moezoo.ops import BACKENDS

#: the model families whose MoE blocks pass their attention probabilities (side input ``attention_probs``)
ATTENTION_MODELS = ("moe_vit", "moe_patchtst")


class LegacyConfigWarning(FutureWarning):
    """An old (flat) configuration was upgraded to the current form; the message names the new keys."""


# The layer builds the router with these itself (from the spec, the model width and the segment view).
RESERVED_ROUTER_KWARGS = {
    "dim": "the model's width",
    "num_experts": "moe.num_experts",
    "top_k": "moe.top_k",
    "segment_size": "moe.segment_sizes",
}


def check_spec_router(
    name: str, kwargs: Mapping[str, Any], num_experts: int | None = None, top_k: int | None = None
) -> None:
    """Raise unless router ``name`` is registered and accepts ``kwargs`` (``moe.router_kwargs``) with these values.

    The router validates its own options (:func:`moezoo.layers.routers.check_router_kwargs`); the spec only refuses
    the options the layer sets itself from the spec, and names the config keys in its messages.
    """
    if not isinstance(name, str) or name not in ROUTERS:
        raise ValueError(f"moe.router={name!r} is unknown; registered routers are {sorted(ROUTERS)}")
    if not isinstance(kwargs, Mapping) or not all(isinstance(k, str) for k in kwargs):
        raise TypeError(f"moe.router_kwargs must be a mapping of option names to values, got {kwargs!r}")
    reserved = sorted(set(kwargs) & set(RESERVED_ROUTER_KWARGS))
    if reserved:
        where = ", ".join(f"{k}: {RESERVED_ROUTER_KWARGS[k]}" for k in reserved)
        raise ValueError(f"moe.router_kwargs must not set {reserved}: the layer sets them from the spec ({where})")
    layer_set = {"top_k": top_k} if top_k is not None and "top_k" in router_options(name) else {}
    try:
        check_router_kwargs_of_router(name, {**layer_set, **kwargs}, num_experts=num_experts)
    except (TypeError, ValueError) as err:
        raise type(err)(f"moe.router_kwargs: {err}") from None


def _check_int(name: str, value: Any, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"moe.{name} must be an integer >= {low}, got {value!r}")


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"moe.{name} must be true or false, got {value!r}")


@dataclass(frozen=True)
class MoESpec:
    """The MoE settings of a model: which blocks hold an MoE and how it is built.

    Args:
        num_experts: routed experts E per MoE layer.
        top_k: experts per token K (for expert choice and Soft MoE, the compute-equivalent K).
        router: a registered router name (``moezoo.layers.ROUTERS``).
        router_kwargs: the router's own options (``capacity_factor``, ``slots_per_expert`` ...).
        moe_every, moe_offset: block ``i`` holds an MoE when ``i % moe_every == moe_offset % moe_every``.
        num_shared_experts: always-on experts of the expert width (DeepSeekMoE).
        shared_expert_gate: scale the shared expert's output by a sigmoid gate.
        granularity: fine-grained experts, E*m experts of width F/m with K*m active (same compute).
        segment_sizes: Seg-MoE (``router: segment``): tokens routed together as one segment, for all blocks or
            one entry per block; 1 is token-wise routing.
        backend: expert FFN backend (``"torch"``, ``"reference"``, ``"triton"``); ``None`` chooses by device.
        dense: build the dense twin (same active parameters and FLOPs per token, no router).
        bias: experts, shared experts and the dense twin's FFN with biases ``b_in``, ``b_out`` (the form of an
            upcycled dense FFN that had biases); not with Seg-MoE (router ``segment``), whose padding relies on
            bias-free experts.
        num_iterations: Chain-of-Experts (:class:`~moezoo.layers.ChainOfExperts`) when > 1: the experts run this
            many times in sequence, each pass re-routed by its own router (``top_k`` per pass, so the active
            compute is ``num_iterations * top_k`` experts); a sparse router built per layer, not Seg-MoE.
        inner_residual: Chain-of-Experts only: ``x^(t) = MoE_t(x^(t-1)) + x^(t-1)`` (true) or ``MoE_t(x^(t-1))``.
        layer: ``"moe"`` (the MoE layer) or a registered MoE layer option (``moezoo.layers.MOE_LAYERS``: ``s2moe``,
            ``cartesian``), built with the spec's MoE arguments and ``layer_kwargs``; a sparse router built per layer.
        layer_kwargs: the layer option's own arguments (``noise_std``, ``inner_norm`` ...).
    """

    num_experts: int = 4
    top_k: int = 2
    router: str = "topk"
    router_kwargs: dict[str, Any] = field(default_factory=dict)
    moe_every: int = 2
    moe_offset: int = 1
    num_shared_experts: int = 0
    shared_expert_gate: bool = False
    granularity: int = 1
    segment_sizes: int | list[int] = 1
    backend: str | None = None
    dense: bool = False
    bias: bool = False
    num_iterations: int = 1
    inner_residual: bool = True
    layer: str = "moe"
    layer_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_int("num_experts", self.num_experts, 1)
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"moe.top_k must be an integer in [1, num_experts={self.num_experts}], got {self.top_k!r}")
        _check_int("moe_every", self.moe_every, 1)
        _check_int("moe_offset", self.moe_offset, 0)
        _check_int("num_shared_experts", self.num_shared_experts, 0)
        _check_int("granularity", self.granularity, 1)
        _check_bool("shared_expert_gate", self.shared_expert_gate)
        _check_bool("dense", self.dense)
        _check_bool("bias", self.bias)
        _check_int("num_iterations", self.num_iterations, 1)
        _check_bool("inner_residual", self.inner_residual)
        backends = sorted(set(BACKENDS) | {"triton"})
        if self.backend is not None and self.backend not in backends:
            raise ValueError(f"moe.backend must be null or one of {backends}, got {self.backend!r}")
        check_spec_router(
            self.router, self.router_kwargs, self.num_experts * self.granularity, self.top_k * self.granularity
        )
        object.__setattr__(self, "router_kwargs", dict(self.router_kwargs))
        sizes = self.segment_sizes
        if isinstance(sizes, Sequence) and not isinstance(sizes, str):
            object.__setattr__(self, "segment_sizes", sizes := list(sizes))
        values = sizes if isinstance(sizes, list) else [sizes]
        if not values or any(not isinstance(w, int) or isinstance(w, bool) or w < 1 for w in values):
            raise ValueError(
                f"moe.segment_sizes must be a positive integer or a list of positive integers (one per block), "
                f"got {self.segment_sizes!r}"
            )
        if self.router == "segment" and self.bias:
            raise ValueError(
                "moe.bias must be false with router 'segment' (Seg-MoE): its zero-padded segments need bias-free "
                "experts"
            )
        if self.router == "segment" and self.granularity != 1:
            raise ValueError(f"moe.granularity must be 1 with router 'segment' (Seg-MoE), got {self.granularity}")
        factory = ROUTERS[self.router]
        if self.num_iterations > 1 and (
            self.router == "segment"
            or factory.kind != "sparse"
            or getattr(factory, "shared_across_layers", False)
            or getattr(factory, "carries_state", False)
        ):
            raise ValueError(
                f"moe.num_iterations={self.num_iterations} (Chain-of-Experts) needs a sparse router built per layer, "
                f"one per pass; router {self.router!r} is not one (Soft MoE, SMEAR, Seg-MoE, the Omni-router and the "
                "layerwise recurrent router, whose state runs from layer to layer, are refused)"
            )
        self._check_layer(factory)
        if self.router != "segment" and any(w != 1 for w in values):
            raise ValueError(
                f"moe.segment_sizes={self.segment_sizes!r} needs router 'segment' (Seg-MoE); router "
                f"{self.router!r} routes single tokens (segment size 1)"
            )

    def _check_layer(self, factory: Any) -> None:
        """``layer`` is ``"moe"`` or a registered option that accepts ``layer_kwargs``, with a per-layer sparse router
        and no Chain-of-Experts (the option's own constructor checks the values)."""
        if self.layer == "moe":
            if self.layer_kwargs:
                raise ValueError(f"moe.layer_kwargs={self.layer_kwargs!r} needs a layer option (moe.layer), got 'moe'")
            return
        if self.layer not in MOE_LAYERS:
            raise ValueError(f"moe.layer must be 'moe' or one of {sorted(MOE_LAYERS)}, got {self.layer!r}")
        if not isinstance(self.layer_kwargs, Mapping):
            raise TypeError(
                f"moe.layer_kwargs must be a mapping of argument names to values, got {self.layer_kwargs!r}"
            )
        object.__setattr__(self, "layer_kwargs", dict(self.layer_kwargs))
        accepted = [n for n in inspect.signature(MOE_LAYERS[self.layer].__init__).parameters if n not in _MOE_ARGS]
        unknown = sorted(set(self.layer_kwargs) - set(accepted))
        if unknown:
            raise TypeError(f"moe.layer_kwargs: layer {self.layer!r} does not accept {unknown}; it accepts {accepted}")
        if self.num_iterations > 1 or self.router == "segment" or factory.kind != "sparse" or self.shares_router:
            raise ValueError(
                f"moe.layer={self.layer!r} needs a sparse router built per layer and moe.num_iterations=1; got router "
                f"{self.router!r}, num_iterations={self.num_iterations}"
            )
        if getattr(factory, "carries_state", False):
            raise ValueError(
                f"moe.layer={self.layer!r} refuses router {self.router!r}, whose state runs between layers"
            )

    @classmethod
    def resolve(cls, moe: MoESpec | Mapping[str, Any] | None, defaults: Mapping[str, Any] | None = None) -> MoESpec:
        """The spec a model builds from its ``moe`` argument: a spec as given, a mapping over ``defaults``."""
        if isinstance(moe, MoESpec):
            return moe
        if moe is not None and not isinstance(moe, Mapping):
            raise TypeError(f"moe must be a MoESpec, a mapping of its fields or None, got {type(moe).__name__}")
        values = {**(defaults or {}), **(moe or {})}
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise TypeError(
                f"moe has no field(s) {unknown}; its fields are {[f.name for f in dataclasses.fields(cls)]}"
            )
        return cls(**values)

    def replace(self, **changes: Any) -> MoESpec:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The fields as plain values: what ``moe:`` holds in a config."""
        return dataclasses.asdict(self)

    @property
    def router_factory(self) -> Callable[..., Any]:
        return ROUTERS[self.router]

    @property
    def needs_side(self) -> tuple[str, ...]:
        """Side inputs the router reads (``Router.needs_side``): the model must provide them. A router that
        ``carries_state`` also needs :data:`~moezoo.layers.routers.ROUTER_STATE`: the model must call its MoE
        layers through ``run_ffn`` in layer order, on the same tokens, and share their routers' ``shared_modules``
        (:func:`moezoo.models.share_router_modules`)."""
        state = (ROUTER_STATE,) if getattr(self.router_factory, "carries_state", False) else ()
        return tuple(getattr(self.router_factory, "needs_side", ())) + state

    @property
    def shares_router(self) -> bool:
        """One router instance for every MoE layer of the model (the router class's ``shared_across_layers``)."""
        return bool(getattr(self.router_factory, "shared_across_layers", False))

    def check_side_inputs(self, provided: Sequence[str], model: str) -> None:
        """Raise when the router needs side inputs that ``model`` does not compute."""
        missing = sorted(set(self.needs_side) - set(provided))
        if ROUTER_STATE in missing and not self.dense:
            raise ValueError(
                f"moe.router={self.router!r} passes its routing state from each MoE layer to the next (side input "
                f"{ROUTER_STATE!r}), which {model} does not thread (its MoE layers do not all route the same tokens "
                "in one chain of layers); choose a router that routes each layer on its own tokens"
            )
        if ATTENTION_PROBS in missing and not self.dense:
            raise ValueError(
                f"moe.router={self.router!r} routes with the attention probabilities of each MoE block's own attention "
                f"layer (side input {ATTENTION_PROBS!r}), which {model} does not compute; the models that do are "
                f"{', '.join(ATTENTION_MODELS)}"
            )
        if missing and not self.dense:
            raise ValueError(
                f"moe.router={self.router!r} needs the side input(s) {missing}, which {model} does not provide "
                f"(it provides {sorted(provided) or 'none'}); choose a router that routes on the tokens alone"
            )

    def check_depth(self, depth: int) -> None:
        """Raise unless per-block ``segment_sizes`` has one entry per block."""
        if isinstance(self.segment_sizes, list) and len(self.segment_sizes) != depth:
            raise ValueError(
                f"moe.segment_sizes must be one positive integer or a list of {depth} (one per block), "
                f"got {self.segment_sizes!r}"
            )

    def segment_size(self, index: int) -> int:
        sizes = self.segment_sizes
        return sizes[index] if isinstance(sizes, list) else sizes

    def is_moe_block(self, index: int) -> bool:
        return index % self.moe_every == self.moe_offset % self.moe_every

    def active_ffn_dim(self, expert_dim: int) -> int:
        """Hidden width of the dense twin's FFN: ``top_k`` routed experts plus the shared experts, times
        ``num_iterations`` (Chain-of-Experts runs them once per pass)."""
        return self.num_iterations * (self.top_k * expert_dim + self.num_shared_experts * expert_dim)


# -- old flat arguments ------------------------------------------------------------------------------------------------
#: fields added after the flat arguments were retired: never read from a flat argument (``bias=True`` beside
#: ``moe`` is an unknown model argument, not an old spelling of ``moe.bias``)
SPEC_ONLY_FIELDS = frozenset({"bias", "num_iterations", "inner_residual", "layer", "layer_kwargs"})
# MoE's own constructor arguments, set from the spec: not a layer option's ``layer_kwargs``
_MOE_ARGS = frozenset(inspect.signature(MoE.__init__).parameters) | {"self", "moe_kwargs"}
Folder = Callable[[Mapping[str, Any]], tuple[dict[str, Any], list[str]]]
_SPEC_ARGUMENTS: dict[str, tuple[str, Folder]] = {}  # family -> (its spec argument, the folder of its old arguments)


def fold_flat_kwargs(kwargs: Mapping[str, Any], renames: Mapping[str, str], into: str) -> tuple[dict, list[str]]:
    """Move the old flat arguments ``renames`` (old name -> spec field) into the mapping ``kwargs[into]``.

    Returns the new kwargs and the old names that moved. Keys already inside ``kwargs[into]`` win over flat ones;
    a ``MoESpec`` instance cannot be combined with flat arguments.
    """
    old = sorted(k for k in renames if k in kwargs)
    if not old:
        return dict(kwargs), []
    new = {k: v for k, v in kwargs.items() if k not in renames}
    nested = new.get(into)
    if isinstance(nested, MoESpec):
        raise ValueError(f"{into}=MoESpec(...) cannot be combined with the flat arguments {old}")
    if nested is not None and not isinstance(nested, Mapping):
        raise TypeError(f"{into} must be a MoESpec, a mapping of its fields or None, got {type(nested).__name__}")
    new[into] = {**{renames[k]: kwargs[k] for k in old}, **(nested or {})}
    return new, old


def register_spec_argument(family: str, into: str = "moe", fold: Folder | None = None) -> None:
    """Declare that ``family`` takes a :class:`MoESpec` as ``into`` and how its old flat arguments fold into it
    (default: every MoESpec field, under its own name, moves into ``into``)."""
    identity = {f.name: f.name for f in dataclasses.fields(MoESpec) if f.name not in SPEC_ONLY_FIELDS}
    _SPEC_ARGUMENTS[family] = (into, fold or (lambda kwargs: fold_flat_kwargs(kwargs, identity, into)))


def _family(model: str) -> str | None:
    base = model.partition(".")[0]
    for name in (base, base.rsplit("_", 1)[0]):
        if name in _SPEC_ARGUMENTS:
            return name
    return None


def upgrade_model_kwargs(model: str, kwargs: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The current form of ``kwargs`` for a model (``moe_vit_tiny``, ``moe_vit_tiny.digits``) or family (``moe_vit``):
    old flat MoE arguments folded into the spec argument. Returns the new kwargs and the old keys that moved (none
    when ``kwargs`` was current, or the family takes no spec). Warns nothing: callers warn once per config."""
    family = _family(model)
    if family is None:
        return dict(kwargs), []
    return _SPEC_ARGUMENTS[family][1](kwargs)


def spec_argument(model: str) -> str | None:
    """The argument under which a model (or family) takes its :class:`MoESpec` (``"moe"``), or None."""
    family = _family(model)
    return None if family is None else _SPEC_ARGUMENTS[family][0]


def warn_legacy(where: str, old_keys: Sequence[str], new_form: str, stacklevel: int = 3) -> None:
    """The one deprecation warning of an upgraded configuration: which keys moved and where they go now."""
    warnings.warn(
        f"{where}: the old-style arguments {sorted(old_keys)} are deprecated; they were read as {new_form} "
        "(write that instead: the shim that reads old configs will go)",
        LegacyConfigWarning,
        stacklevel=stacklevel,
    )


def build_kwargs(family: str, defaults: Mapping[str, Any], kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """A registered size's constructor arguments: ``kwargs`` over the size's ``defaults``, the spec argument merged
    key by key (a ``MoESpec`` instance replaces it), old flat arguments folded in with one warning."""
    into = _SPEC_ARGUMENTS[family][0]
    new, old_keys = upgrade_model_kwargs(family, kwargs)
    if old_keys:
        warn_legacy(family, old_keys, f"{into}: {new[into]!r}", stacklevel=4)
    out = {**defaults, **new}
    given, default = new.get(into), defaults.get(into)
    if isinstance(default, Mapping) and (given is None or isinstance(given, Mapping)):
        out[into] = {**default, **(given or {})}
    return out
