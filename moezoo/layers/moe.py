"""The MoE layer: route -> dispatch -> grouped experts -> combine, plus shared experts.

Legend: T tokens, D model dim, F expert hidden, E experts, K experts per token, N routed pairs,
G groups and L tokens per group (Soft MoE), S slots per expert.

The layer returns the FFN output (no residual: a token routed to no expert gets 0 and passes through the
block's residual unchanged) and an :class:`MoEAux` with the router's weighted losses and routing statistics.
It takes the sparse path (pairs -> :func:`moezoo.ops.expert_ffn`), the Soft MoE path or the SMEAR path (one
merged expert per group) by ``router.kind``.

The forward traces under ``torch.compile(fullgraph=True)`` for every router and backend: no host syncs, no
Python branches on data-dependent sizes (a mask's token count is one, see ``moezoo.ops.indexing``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from moezoo.layers.expert_routers import MergeRoutingResult
from moezoo.layers.experts import FeedForward, GroupedExperts
from moezoo.layers.losses import load_cv, routing_entropy
from moezoo.layers.routers import (
    SAMPLE_IDX,
    SAMPLE_SIZES,
    SAMPLE_SLOTS,
    Router,
    RoutingResult,
    SoftRoutingResult,
    check_int,
    check_router_kwargs,
    get_router,
)
from moezoo.ops import count_per_expert, size_max, true_indices


@dataclass
class MoEAux:
    """What one MoE layer reports for one forward: weighted losses and detached routing statistics."""

    losses: dict[str, Tensor]
    tokens_per_expert_E: Tensor  # float, routed pairs (or slots) per expert
    dropped_frac: Tensor  # fraction of tokens routed to no expert
    router_entropy: Tensor  # mean per-token entropy of the routing distribution (nats)
    expert_load_cv: Tensor  # std / mean of tokens_per_expert_E
    num_tokens: int
    routing: RoutingResult | None = field(default=None, repr=False)
    # (..., S) in the input's leading shape (zeros at masked tokens): the state a router that ``carries_state`` hands
    # to the next MoE layer (``moezoo.models.run_ffn``); None for every other router
    router_state: Tensor | None = field(default=None, repr=False)

    @property
    def aux_loss(self) -> Tensor:
        if not self.losses:
            return self.tokens_per_expert_E.new_zeros(())
        return torch.stack(list(self.losses.values())).sum()


def total_aux_loss(auxes: Sequence[MoEAux]) -> Tensor | None:
    """Sum of every layer's weighted losses, or ``None`` when there are no MoE layers."""
    losses = [aux.aux_loss for aux in auxes]
    return torch.stack(losses).sum() if losses else None


def summarize_aux(auxes: Sequence[MoEAux]) -> dict[str, float]:
    """Scalars to log: each loss summed over layers, statistics averaged over layers."""
    if not auxes:
        return {}
    out: dict[str, float] = {}
    for aux in auxes:
        for name, value in aux.losses.items():
            out[name] = out.get(name, 0.0) + float(value.detach())
    out["aux_loss"] = float(sum(float(aux.aux_loss.detach()) for aux in auxes))
    for name in ("dropped_frac", "router_entropy", "expert_load_cv"):
        out[name] = sum(float(getattr(aux, name)) for aux in auxes) / len(auxes)
    return out


def check_side(router: Router, side: Mapping[str, Tensor] | None) -> None:
    """The side inputs a router needs are present (by exact name) and every side input is a finite tensor."""
    given = dict(side or {})
    missing = [name for name in router.needs_side if name not in given]
    if missing:
        raise ValueError(
            f"{type(router).__name__} needs the side inputs {list(router.needs_side)}; missing {missing}, "
            f"got {sorted(given)}"
        )
    for name, value in given.items():
        if not isinstance(value, Tensor):
            raise TypeError(f"side input {name!r} must be a tensor, got {type(value).__name__}")
        if value.is_floating_point() and not torch.compiler.is_compiling() and not all_finite(value):
            raise ValueError(f"side input {name!r} contains NaN or inf values")


def _expand_side(
    side: Mapping[str, Tensor] | None,
    lead_shape: torch.Size,
    keep: Tensor | None,
    feature_dims: Mapping[str, int] | None = None,
) -> dict[str, Tensor]:
    """Per-sample or per-token side inputs -> one row per (kept) flattened token.

    A side input's leading dims are matched against the tokens' leading shape; ``feature_dims[name]`` (the
    router's ``side_feature_dims``) says how many trailing dims are features, so that a per-sample embedding
    ``(B, G)`` is not read as per-token when G equals the sequence length.
    """
    if not side:
        return {}
    out = {}
    for name, value in side.items():
        k = 0
        limit = len(lead_shape)
        if feature_dims and name in feature_dims:
            limit = min(limit, value.dim() - feature_dims[name])
        while k < limit and k < value.dim() and value.shape[k] == lead_shape[k]:
            k += 1
        if feature_dims and name in feature_dims and k != value.dim() - feature_dims[name]:
            raise ValueError(
                f"side input {name!r} has shape {tuple(value.shape)}; it must be per sample or per token with "
                f"{feature_dims[name]} feature dims, its leading dims matching the tokens' {tuple(lead_shape)}"
            )
        if k == 0:
            raise ValueError(
                f"side input {name!r} has shape {tuple(value.shape)}; its leading dims must match the tokens' "
                f"leading shape {tuple(lead_shape)} (per sample or per token)"
            )
        extra = value.shape[k:]
        view = value.reshape(*value.shape[:k], *([1] * (len(lead_shape) - k)), *extra)
        flat = view.expand(*lead_shape, *extra).reshape(math.prod(lead_shape), *extra)  # -1: ambiguous at 0 wide
        out[name] = flat if keep is None else flat[keep]
    return out


def _sample_side(lead_shape: torch.Size, keep: Tensor | None, device: torch.device) -> dict[str, Tensor]:
    """:data:`SAMPLE_IDX`, :data:`SAMPLE_SIZES` and :data:`SAMPLE_SLOTS` for the (kept) flattened tokens: the first
    axis is the sample axis of inputs ``(B, ..., D)`` with two or more leading dims; ``(L, D)`` or ``(D,)`` is one
    sample."""
    num_samples = lead_shape[0] if len(lead_shape) >= 2 else 1
    per_sample = math.prod(lead_shape) // max(num_samples, 1)
    sample_T = torch.arange(num_samples, device=device).repeat_interleave(per_sample)
    slots = torch.arange(num_samples * per_sample, device=device)
    if keep is not None:
        sample_T = sample_T.index_select(0, keep)
        kept = torch.arange(keep.shape[0], device=device)
        slots = torch.full_like(slots, -1).index_copy(0, keep, kept)
    return {
        SAMPLE_IDX: sample_T,
        SAMPLE_SIZES: count_per_expert(sample_T, num_samples),
        SAMPLE_SLOTS: slots.reshape(num_samples, per_sample),
    }


def all_finite(x: Tensor) -> bool:
    """True when ``x`` has no NaN or inf, without the bool tensor ``torch.isfinite(x).all()`` writes.

    A finite sum proves it (a NaN or inf anywhere makes the sum NaN or inf: one vectorised pass, about 3x cheaper on
    the CPU than ``aminmax``); a sum that is not finite may also be an overflow of large finite values, so then
    the minimum and maximum decide (NaN propagates through both)."""
    if x.numel() == 0:
        return True
    if math.isfinite(float(x.detach().sum())):
        return True
    low, high = torch.aminmax(x)
    return bool(torch.isfinite(low) & torch.isfinite(high))


class MoE(nn.Module):
    """A sparse (or soft) Mixture-of-Experts feed-forward layer for inputs of any leading shape ``(..., D)``.

    Args:
        dim: model width D.
        ffn_dim: hidden width F of one expert.
        num_experts: number of routed experts E.
        top_k: experts per token K (or the compute-equivalent for expert choice / Soft MoE); its upper bound is
            the router's (``num_experts``, or ``num_experts + num_null_experts`` for top-k with null experts).
        router: a registered router name or a :class:`Router` instance (which may be shared across layers).
        router_kwargs: extra arguments for the router when it is built by name (``top_k`` is the layer's).
        activation: ``"gelu"``, ``"gelu_tanh"``, ``"silu"``, ``"relu"`` or a gated form ``"swiglu"``, ``"geglu"``,
            ``"reglu"`` (``moezoo.ops.ACTIVATIONS``).
        bias: experts (and the shared expert) with biases ``b_in``, ``b_out`` (for upcycling dense FFNs with biases).
        num_shared_experts: always-on experts of width F each (DeepSeekMoE), fused into one dense FFN.
        shared_expert_gate: scale the shared expert's output by a per-token sigmoid gate.
        granularity: fine-grained experts: E*m experts of width F/m with K*m active (same compute).
        backend: ``"torch"``, ``"triton"`` or ``"reference"``; ``None`` chooses by device.
        check_finite: raise on NaN/inf inputs (one reduction per forward; skipped under ``torch.compile``).

    ``x`` must have the dtype of the layer's parameters, or any floating dtype under ``torch.autocast``.
    """

    def __init__(
        self,
        dim: int,
        ffn_dim: int,
        num_experts: int = 8,
        top_k: int = 2,
        router: str | Router = "topk",
        router_kwargs: Mapping[str, Any] | None = None,
        activation: str = "gelu",
        num_shared_experts: int = 0,
        shared_expert_gate: bool = False,
        granularity: int = 1,
        backend: str | None = None,
        check_finite: bool = True,
        bias: bool = False,
    ) -> None:
        super().__init__()
        for name, value in (("dim", dim), ("ffn_dim", ffn_dim), ("num_experts", num_experts)):
            check_int(name, value, 1)
        check_int("top_k", top_k, 1)
        check_int("granularity", granularity, 1)
        if ffn_dim % granularity:
            raise ValueError(f"granularity must be a positive integer dividing ffn_dim={ffn_dim}, got {granularity!r}")
        check_int("num_shared_experts", num_shared_experts, 0)
        self.dim = dim
        self.num_experts = num_experts * granularity
        self.top_k = top_k * granularity
        self.expert_dim = ffn_dim // granularity
        self.backend = backend
        self.check_finite = check_finite
        self._warned_batch_rule = False
        self.router: Router
        if isinstance(router, str):
            kwargs = dict(router_kwargs or {})
            if "top_k" in kwargs:
                raise TypeError("router_kwargs must not hold top_k: it is the layer's own argument top_k")
            check_router_kwargs(router, {"top_k": top_k, **kwargs}, num_experts)  # in the user's terms
            self.router = get_router(router, dim, self.num_experts, top_k=self.top_k, **kwargs)
        elif isinstance(router, Router):
            if router_kwargs:
                raise ValueError("router_kwargs cannot be combined with a router instance")
            if router.num_experts != self.num_experts or router.dim != dim:
                raise ValueError(
                    f"the router instance has num_experts={router.num_experts}, dim={router.dim}; this layer needs "
                    f"num_experts={self.num_experts}, dim={dim}"
                )
            self.router = router
        else:
            raise TypeError(f"router must be a registered router name or a Router instance, got {router!r}")
        self.experts = GroupedExperts(self.num_experts, dim, self.expert_dim, activation, bias)
        shared_dim = num_shared_experts * ffn_dim
        self.shared = FeedForward(dim, shared_dim, activation, bias) if num_shared_experts else None
        self.shared_gate = nn.Linear(dim, 1, bias=False) if (shared_expert_gate and self.shared is not None) else None

    @property
    def active_ffn_dim(self) -> int:
        """Hidden width of the dense FFN with the same active compute per token (the dense twin)."""
        shared = self.shared.hidden_dim if self.shared is not None else 0
        routed = self.expert_dim if self.router.kind == "merge" else self.top_k * self.expert_dim  # SMEAR: one
        return routed + shared

    def _check_input(self, x: Tensor, mask: Tensor | None) -> None:
        if x.dim() < 1 or x.shape[-1] != self.dim:
            raise ValueError(f"x must have last dimension dim={self.dim}, got shape {tuple(x.shape)}")
        param_dtype = self.experts.w_in.dtype
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor (the layer's dtype is {param_dtype}), got {x.dtype}")
        if x.dtype != param_dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(
                f"x has dtype {x.dtype} but the layer's parameters are {param_dtype}: cast the input "
                f"(x.to({param_dtype})) or the layer (.to({x.dtype})), or run under torch.autocast"
            )
        if mask is not None and (mask.shape != x.shape[:-1] or mask.dtype != torch.bool):
            raise ValueError(
                f"mask must be a bool tensor of shape {tuple(x.shape[:-1])}, got {mask.dtype} {tuple(mask.shape)}"
            )
        if self.check_finite and not torch.compiler.is_compiling() and not all_finite(x):
            raise ValueError("x contains NaN or inf values")

    def forward(
        self, x: Tensor, mask: Tensor | None = None, side: Mapping[str, Tensor] | None = None
    ) -> tuple[Tensor, MoEAux]:
        """``x (..., D)`` -> ``(y (..., D), aux)``; ``mask (...)`` True for real tokens; ``side``: router inputs.

        At evaluation a router that keeps a batch-dependent rule (``eval_rule="batch"``, or a router declared
        ``batch_dependent`` without a per-item rule) makes an item's output depend on its batchmates: the layer
        warns once."""
        self._check_input(x, mask)
        check_side(self.router, side)
        if not self.training and not self._warned_batch_rule and not torch.compiler.is_compiling():
            if self.router.depends_on_batch(training=False):
                self._warned_batch_rule = True
                warnings.warn(
                    f"{type(self.router).__name__} keeps its batch-dependent routing rule at evaluation: an item's "
                    "output depends on the other items of its batch (and can leak between requests batched "
                    "together); use eval_rule='item' for batch-independent inference",
                    stacklevel=2,
                )
        if self.router.kind == "soft":
            return self._forward_soft(x, mask)
        if self.router.kind == "merge":
            return self._forward_merged(x, mask)
        return self._forward_sparse(x, mask, side, self.router)

    def _forward_sparse(
        self, x: Tensor, mask: Tensor | None, side: Mapping[str, Tensor] | None, router: Router
    ) -> tuple[Tensor, MoEAux]:
        """The pairs path with ``router``: the layer's own, or (:class:`moezoo.layers.chain.ChainOfExperts`) the
        router of one iteration over the same experts."""
        lead = x.shape[:-1]
        x_TD = x.reshape(-1, self.dim)
        keep_T = true_indices(mask.reshape(-1)) if mask is not None else None
        x_in = x_TD if keep_T is None else x_TD.index_select(0, keep_T)
        side_T = _expand_side(side, lead, keep_T, router.side_feature_dims)
        if router.batch_dependent and (not self.training or router.train_rule == "item"):
            side_T.update(_sample_side(lead, keep_T, x.device))  # a per-item rule: each sample's own tokens
        routing = self.route(x_in, side_T, router)
        y_in = self.experts(x_in, routing.token_idx_N, routing.expert_idx_N, routing.gate_N, backend=self.backend)
        y_in = self._add_shared(x_in, y_in)
        y_TD = y_in if keep_T is None else x_TD.new_zeros(x_TD.shape).index_copy(0, keep_T, y_in)
        aux = self._sparse_aux(routing)
        if routing.next_state is not None:  # a router that carries state to the next layer (recurrent router)
            state = routing.next_state
            if keep_T is not None:
                state = state.new_zeros(x_TD.shape[0], *state.shape[1:]).index_copy(0, keep_T, state)
            aux.router_state = state.reshape(*lead, *state.shape[1:])
        return y_TD.reshape(x.shape), aux

    def route(
        self, x_TD: Tensor, side: Mapping[str, Tensor] | None = None, router: Router | None = None
    ) -> RoutingResult:
        """The sparse router's pairs for flattened tokens ``(T, D)`` (``router``: another sparse router over this
        layer's experts, by default the layer's own); a router that reads the experts (``reads_experts``:
        Autonomy-of-Experts, the ERC loss, CompeteSMoE) is given this layer's :class:`GroupedExperts`."""
        router = self.router if router is None else router
        if router.reads_experts:
            return router(x_TD, side, experts=self.experts)
        return router(x_TD, side)

    def _sparse_aux(self, routing: RoutingResult) -> MoEAux:
        with torch.no_grad():
            tokens_per_expert = count_per_expert(routing.expert_idx_N, self.num_experts).float()
            num_tokens = routing.num_tokens
            routed = torch.zeros(num_tokens, dtype=torch.bool, device=tokens_per_expert.device)
            routed.scatter_(0, routing.token_idx_N, True)
            dropped = (num_tokens - routed.sum()).float() / size_max(num_tokens, 1)
            probs = routing.probs_TE
            entropy = routing_entropy(probs) if probs is not None else tokens_per_expert.new_zeros(())
        return MoEAux(
            losses=routing.losses,
            tokens_per_expert_E=tokens_per_expert,
            dropped_frac=dropped,
            router_entropy=entropy,
            expert_load_cv=load_cv(tokens_per_expert),
            num_tokens=num_tokens,
            routing=routing,
        )

    def _add_shared(self, x: Tensor, y: Tensor) -> Tensor:
        """``y`` plus the (optionally gated) shared expert's output on ``x``."""
        if self.shared is None:
            return y
        shared = self.shared(x)
        if self.shared_gate is not None:
            shared = shared * torch.sigmoid(self.shared_gate(x))
        return y + shared

    def _groups(self, x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """``x (..., L, D)`` as groups ``(G, L, D)`` (the last-but-one axis is the token axis, the rest are groups)
        and the mask as ``(G, L)``; ``(D,)`` is one group of one token."""
        if x.dim() >= 2:
            x_GLD = x.reshape(math.prod(x.shape[:-2]), x.shape[-2], self.dim)
        else:
            x_GLD = x.reshape(1, 1, self.dim)
        return x_GLD, mask.reshape(x_GLD.shape[:2]) if mask is not None else None

    def _forward_merged(self, x: Tensor, mask: Tensor | None) -> tuple[Tensor, MoEAux]:
        """SMEAR over groups (as Soft MoE's): each group's tokens through its own merged expert."""
        x_GLD, mask_GL = self._groups(x, mask)
        merge: MergeRoutingResult = self.router(x_GLD, mask_GL)
        y_GLD = self._add_shared(x_GLD, self.experts.forward_merged(x_GLD, merge.weights_GE))
        if mask_GL is not None:
            y_GLD = y_GLD * mask_GL.unsqueeze(-1)
        with torch.no_grad():
            # an expert's load: the tokens it is merged into, weighted by its share of the merge
            weights_GE = merge.weights_GE.float()
            if mask_GL is None:
                tokens_per_expert = weights_GE.sum(0) * x_GLD.shape[1]
                num_tokens = x_GLD.shape[0] * x_GLD.shape[1]
            else:
                tokens_per_expert = (weights_GE * mask_GL.sum(1, keepdim=True).float()).sum(0)
                num_tokens = true_indices(mask_GL.reshape(-1)).shape[0]
                weights_GE = weights_GE.index_select(0, true_indices(mask_GL.any(1)))  # groups with real tokens
            entropy = routing_entropy(weights_GE)
        return y_GLD.reshape(x.shape), _dropless_aux(merge.losses, tokens_per_expert, entropy, num_tokens)

    def _forward_soft(self, x: Tensor, mask: Tensor | None) -> tuple[Tensor, MoEAux]:
        """Soft MoE over groups: the last-but-one axis is the token axis L, the rest are groups G."""
        x_GLD, mask_GL = self._groups(x, mask)
        soft: SoftRoutingResult = self.router(x_GLD, mask_GL)
        num_slots_total = self.num_experts * soft.slots_per_expert
        dispatch = soft.dispatch_GLS.to(x.dtype)
        slots_GSD = torch.einsum("gls,gld->gsd", dispatch, x_GLD)
        groups = x_GLD.shape[0]
        s = soft.slots_per_expert
        slots_EMD = (
            slots_GSD.reshape(groups, self.num_experts, s, self.dim)
            .transpose(0, 1)
            .reshape(self.num_experts, groups * s, self.dim)
        )
        out_EMD = self.experts.forward_dense(slots_EMD)
        out_GSD = (
            out_EMD.reshape(self.num_experts, groups, s, self.dim)
            .transpose(0, 1)
            .reshape(groups, num_slots_total, self.dim)
        )
        y_GLD = self._add_shared(x_GLD, torch.einsum("gls,gsd->gld", soft.combine_GLS.to(out_GSD.dtype), out_GSD))
        if mask_GL is not None:
            y_GLD = y_GLD * mask_GL.unsqueeze(-1)
        with torch.no_grad():
            # Each slot holds one row per group: the load is uniform by construction.
            tokens_per_expert = x.new_full((self.num_experts,), float(groups * s), dtype=torch.float32)
            combine_TS = soft.combine_GLS.reshape(-1, num_slots_total)
            if mask_GL is not None:
                combine_TS = combine_TS.index_select(0, true_indices(mask_GL.reshape(-1)))
            entropy = routing_entropy(combine_TS)
        return y_GLD.reshape(x.shape), _dropless_aux(soft.losses, tokens_per_expert, entropy, combine_TS.shape[0])


def _dropless_aux(losses: dict[str, Tensor], tokens_per_expert_E: Tensor, entropy: Tensor, num_tokens: int) -> MoEAux:
    """The aux of a path that drops no token (Soft MoE, SMEAR)."""
    return MoEAux(
        losses=losses,
        tokens_per_expert_E=tokens_per_expert_E,
        dropped_frac=tokens_per_expert_E.new_zeros(()),
        router_entropy=entropy,
        expert_load_cv=load_cv(tokens_per_expert_E),
        num_tokens=num_tokens,
    )


def update_router_states(module: nn.Module) -> None:
    """Apply every router's pending non-gradient update once (a router shared by many layers too)."""
    seen: set[int] = set()
    for sub in module.modules():
        if isinstance(sub, Router) and id(sub) not in seen:
            seen.add(id(sub))
            sub.update_state()


# MoE layer options that are not routers (``MoESpec.layer``): subclasses of :class:`MoE` whose constructor takes
# MoE's arguments plus their own (``MoESpec.layer_kwargs``); they register themselves when their module is imported.
MOE_LAYERS: dict[str, type[MoE]] = {}


def register_moe_layer(name: str, layer_class: type[MoE]) -> None:
    """Add an MoE layer option by name (``moezoo.layers.stochastic``, ``moezoo.layers.cartesian``)."""
    if not (isinstance(layer_class, type) and issubclass(layer_class, MoE)):
        raise TypeError(f"register_moe_layer({name!r}, ...) takes a MoE subclass, got {layer_class!r}")
    if name == "moe" or (name in MOE_LAYERS and MOE_LAYERS[name] is not layer_class):
        raise ValueError(f"an MoE layer option named {name!r} is already registered")
    MOE_LAYERS[name] = layer_class
