"""Routers: from token representations to (token, expert, gate) pairs, or to Soft MoE's slot weights.

Legend: T tokens, D model dim, E experts, K experts per token, N routed pairs, C capacity per expert,
G groups (sequences) and L tokens per group for Soft MoE, S = E * slots per expert.

Every router is a :class:`Router` and says which of the two routing families it belongs to with one class
attribute, ``kind``; the MoE layer, expert parallelism and the reports decide by ``kind`` and nothing else:

- ``kind == "sparse"`` (:class:`SparseRouter`): ``forward(x_TD, side) -> RoutingResult``, a flat list of pairs.
  Top-k gives N = T*K, expert choice gives each expert's C tokens, capacity dropping and null experts are filters
  on the pairs, ReLU routing gives the nonzeros. The dispatcher in :mod:`moezoo.ops` consumes any such list.
- ``kind == "soft"`` (:class:`SoftMoERouter`): ``forward(x_GLD, mask_GL) -> SoftRoutingResult``, dense dispatch
  and combine weights over the tokens of each group. Soft MoE has no pairs, and its weights mix the tokens of a
  whole sequence, so it cannot take the sparse signature (flattened tokens); it is its own kind, not a sparse
  router with a different signature.
- ``kind == "merge"`` (SMEAR, :class:`moezoo.layers.expert_routers.SMEARRouter`): ``forward(x_GLD, mask_GL) ->
  MergeRoutingResult``, one weight per expert and group; the layer runs one expert whose parameters are the
  weighted mean of all experts' (no pairs either).

Routers compute in fp32. Every router validates its options in :meth:`Router.check_options`, which its
constructor calls and which :func:`check_router_kwargs` calls without building anything (a config object can
check its router settings up front). Data-dependent filters use :func:`moezoo.ops.true_indices` and counts use
:func:`moezoo.ops.count_per_expert`, so every router traces under ``torch.compile(fullgraph=True)``.

Batch independence: a router whose rule can make one token's routing depend on the other tokens of the batch
(capacity dropping, expert choice, a balanced assignment) sets ``batch_dependent = True``. Such routers take
``eval_rule``: ``"item"`` (the default) runs a batch-independent rule at evaluation (dropless top-k for capacity
routing; expert choice and Sinkhorn within each sample's own tokens, which the MoE layer passes as the side inputs
:data:`SAMPLE_IDX` and :data:`SAMPLE_SIZES`), ``"batch"`` keeps the training rule, and the MoE layer warns once.
Expert choice also takes ``train_rule="item"``: the per-sample rule in training as well (the layer then passes the
sample side inputs in training too). :meth:`Router.depends_on_batch` says which applies to an instance.

State that is not trained by gradients (the loss-free bias, ReLU routing's L1 coefficient) lives in buffers;
training forwards accumulate observations and :meth:`Router.update_state` applies them once per optimiser step.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moezoo.layers.losses import logsumexp_TE, router_z_loss, switch_balance_loss
from moezoo.ops import count_per_expert, size_max, size_min, true_indices

Side = Mapping[str, Tensor]

# Side inputs the MoE layer adds at evaluation for batch-dependent routers: each (kept) token's sample index (T,),
# int64, non-decreasing, and each sample's number of (kept) tokens (B,). Routers called without them treat all
# their tokens as one sample.
SAMPLE_IDX = "sample_idx"
SAMPLE_SIZES = "sample_sizes"
# and each sample's tokens laid out as a (B, L) grid (L the unmasked tokens per sample): the index of the kept token at
# each place, -1 where the token is masked; its static width L lets a router that mixes the tokens of a sample
# (the similarity-aware router, ``moezoo.layers.token_graph_routers``) work per sample without a host sync.
SAMPLE_SLOTS = "sample_slots"
EVAL_RULES = ("item", "batch")
# Side input through which a router that ``carries_state`` receives the previous MoE layer's state (per token);
# ``moezoo.models.run_ffn`` passes it (the layerwise recurrent router's GRU output, ``moezoo.layers.recurrent``).
ROUTER_STATE = "router_state"
# Side input through which a model hands a router the attention probabilities of the block's own attention layer,
# averaged over heads: ``(B, L, L)`` per sample, one row per query token over the L places of its sample's grid
# (:data:`SAMPLE_SLOTS`); the attention-aware router (``moezoo.layers.token_graph_routers``) mixes with it.
ATTENTION_PROBS = "attention_probs"


@dataclass
class RoutingResult:
    """The routing decision of a sparse router as pairs, plus its (already weighted) losses."""

    token_idx_N: Tensor  # int64
    expert_idx_N: Tensor  # int64, in [0, E)
    gate_N: Tensor  # fp32, differentiable w.r.t. the router
    num_tokens: int
    num_experts: int
    probs_TE: Tensor | None = None  # routing distribution, for statistics only
    losses: dict[str, Tensor] = field(default_factory=dict)
    # (T, S) per-token state for the next MoE layer, from a router that ``carries_state``; None for every other
    next_state: Tensor | None = None


@dataclass
class SoftRoutingResult:
    """Soft MoE: dispatch (softmax over tokens) and combine (softmax over slots) weights, shape (G, L, E*S)."""

    dispatch_GLS: Tensor
    combine_GLS: Tensor
    num_experts: int
    slots_per_expert: int
    losses: dict[str, Tensor] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------ option checks


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_number(name: str, value: object, *, low: float, strict: bool, none_means: str | None = None) -> None:
    """``value`` must be a finite real number ``> low`` (``strict``) or ``>= low``; ``None`` is allowed when
    ``none_means`` says what it means. TypeError for a wrong type, ValueError for a wrong value."""
    if value is None and none_means is not None:
        return
    allowed = f"a finite number {'>' if strict else '>='} {low}" + (f" or None ({none_means})" if none_means else "")
    if not _is_number(value):
        raise TypeError(f"{name} must be {allowed}, got {value!r} of type {type(value).__name__}")
    assert isinstance(value, (int, float))
    if not math.isfinite(value) or value < low or (strict and value == low):
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def check_positive(name: str, value: object, none_means: str | None = None) -> None:
    check_number(name, value, low=0, strict=True, none_means=none_means)


def check_non_negative(name: str, value: object) -> None:
    check_number(name, value, low=0, strict=False)


def check_int(name: str, value: object, low: int) -> None:
    """``value`` must be an ``int`` (not a bool) ``>= low``."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an integer >= {low}, got {value!r} of type {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def check_top_k(top_k: object, num_experts: int | None, what: str = "num_experts") -> None:
    """``1 <= top_k <= num_experts`` (the upper bound is skipped when ``num_experts`` is None)."""
    if num_experts is None:
        check_int("top_k", top_k, 1)
        return
    allowed = f"an integer in [1, {what}={num_experts}]"
    if not isinstance(top_k, int) or isinstance(top_k, bool):
        raise TypeError(f"top_k must be {allowed}, got {top_k!r} of type {type(top_k).__name__}")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be {allowed}, got {top_k!r}")


def check_choice(name: str, value: object, choices: tuple[object, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


def check_bool(name: str, value: object, allow_none: bool = False) -> None:
    if not (isinstance(value, bool) or (allow_none and value is None)):
        allowed = "True, False or None" if allow_none else "True or False"
        raise TypeError(f"{name} must be {allowed}, got {value!r} of type {type(value).__name__}")


def flat_pairs(top_idx_TK: Tensor, gates_TK: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(T, K)`` choices -> pairs ``(token_idx_N, expert_idx_N, gate_N)``, token-major."""
    num_tokens, k = top_idx_TK.shape
    token_idx_N = torch.arange(num_tokens, device=top_idx_TK.device).repeat_interleave(k)
    return token_idx_N, top_idx_TK.reshape(-1), gates_TK.reshape(-1)


def keep_pairs(keep_N: Tensor, *pairs_N: Tensor) -> tuple[Tensor, ...]:
    """The pairs where ``keep_N`` is True (one data-dependent length, traceable: see ``moezoo.ops.indexing``)."""
    kept = true_indices(keep_N)
    return tuple(t.index_select(0, kept) for t in pairs_N)


# ---------------------------------------------------------------------------------------------------- routers


class Router(nn.Module):
    """Base of every router: a linear gate ``x @ W`` computed in fp32, the common losses, option checks.

    ``kind`` ("sparse", "soft" or "merge") says which forward contract the router follows (see the module
    docstring); a new router subclasses :class:`SparseRouter` or :class:`SoftMoERouter` (or ``SMEARRouter``),
    which set it. ``needs_side`` names the side inputs (class labels, language posteriors ...) a router requires.
    """

    kind: ClassVar[Literal["sparse", "soft", "merge"]]
    needs_side: ClassVar[tuple[str, ...]] = ()
    # Trailing feature dims of each side input (e.g. 1 for an embedding (..., G)): tells a per-sample input from a
    # per-token one whose width equals the sequence length. Inputs not named here have no feature dims.
    side_feature_dims: ClassVar[Mapping[str, int]] = {}
    # True when the router's rule can make a token's routing depend on its batchmates (see the module docstring).
    batch_dependent: ClassVar[bool] = False
    # True for a sparse router that reads its layer's expert weights (Autonomy-of-Experts, the ERC loss): the MoE
    # layer then calls ``forward(x_TD, side, experts=its GroupedExperts)`` (:meth:`moezoo.layers.MoE.route`).
    # Every other router is called as before and never sees the experts.
    reads_experts: ClassVar[bool] = False
    # "item" for a router that routes within each sample in training too (expert choice's ``train_rule``): the MoE
    # layer then passes SAMPLE_IDX and SAMPLE_SIZES in training as well as at evaluation.
    train_rule: str = "batch"
    # True for a router whose RoutingResult carries ``next_state`` for the next MoE layer, which receives it as the
    # side input ROUTER_STATE (``moezoo.models.run_ffn``); without it (the first layer) the router starts from zeros.
    carries_state: ClassVar[bool] = False
    # Submodules that a model shares across all its MoE layers' routers of this class (the recurrent router's GRU
    # cell): ``moezoo.models.share_router_modules`` gives every layer the first layer's.
    shared_modules: ClassVar[tuple[str, ...]] = ()

    def __init__(self, dim: int, num_experts: int, balance_coef: float = 0.01, z_loss_coef: float = 0.0) -> None:
        super().__init__()
        check_int("dim", dim, 1)
        check_int("num_experts", num_experts, 1)
        Router.check_options(num_experts, {"balance_coef": balance_coef, "z_loss_coef": z_loss_coef})
        self.dim = dim
        self.num_experts = num_experts
        self.balance_coef = balance_coef
        self.z_loss_coef = z_loss_coef
        self.gate = nn.Linear(dim, self.num_logits, bias=False)
        nn.init.normal_(self.gate.weight, std=dim**-0.5)

    @classmethod
    def check_options(cls, num_experts: int | None, options: Mapping[str, Any]) -> None:
        """Raise TypeError/ValueError for a bad option value. ``options`` holds every option of the router's
        constructor (defaults filled in, see :func:`check_router_kwargs`); ``num_experts`` None skips the checks
        that need it. Each class checks its own options and calls its parent's ``check_options``; its constructor
        calls its *own* class's method (``TopKRouter.check_options(...)``, not ``self.check_options``), so that a
        subclass's constructor can add options without its parent's constructor seeing them."""
        for name in ("balance_coef", "z_loss_coef"):
            if name in options:  # routers without the loss do not take the option
                check_non_negative(name, options[name])

    @property
    def num_logits(self) -> int:
        return self.num_experts

    def logits(self, x_TD: Tensor) -> Tensor:
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            return F.linear(x_TD.float(), self.gate.weight.float())

    def common_losses(
        self, logits_TE: Tensor, probs_TE: Tensor, expert_idx_N: Tensor, k: int | torch.SymInt
    ) -> dict[str, Tensor]:
        losses: dict[str, Tensor] = {}
        if self.balance_coef > 0:
            losses["balance"] = self.balance_coef * switch_balance_loss(probs_TE, expert_idx_N, k)
        if self.z_loss_coef > 0:
            losses["z_loss"] = self.z_loss_coef * router_z_loss(logits_TE)
        return losses

    def update_state(self) -> None:
        """Apply accumulated non-gradient updates (called once per optimiser step). Default: nothing."""

    def depends_on_batch(self, training: bool) -> bool:
        """Whether this instance's routing of a token depends on its batchmates, in training or at evaluation.
        Default: the class's ``batch_dependent`` in both (a router that declares it and has no per-item rule keeps
        the batch rule on purpose); routers with an ``eval_rule`` override it."""
        return type(self).batch_dependent


def sample_groups(side: Side | None, num_tokens: int | torch.SymInt, device: torch.device) -> tuple[Tensor, Tensor]:
    """``(sample_idx_T, sample_sizes_B)`` from the side inputs, or all tokens as one sample."""
    if side and SAMPLE_IDX in side and SAMPLE_SIZES in side:
        return side[SAMPLE_IDX], side[SAMPLE_SIZES]
    sample_T = torch.zeros(num_tokens, dtype=torch.int64, device=device)
    return sample_T, count_per_expert(sample_T, 1)


class SparseRouter(Router):
    """A router that returns pairs: ``forward(x_TD (T, D), side) -> RoutingResult``.

    ``side`` carries per-token side inputs (one row per token, already expanded by the layer) for routers that
    need them; plain routers ignore it.
    """

    kind: ClassVar[Literal["sparse"]] = "sparse"

    def forward(self, x_TD: Tensor, side: Side | None = None) -> RoutingResult:
        raise TypeError(f"{type(self).__name__} must override forward (a SparseRouter returns a RoutingResult)")


def apply_capacity(
    token_idx_N: Tensor, expert_idx_N: Tensor, priority_N: Tensor, num_experts: int, capacity: int | torch.SymInt
) -> Tensor:
    """Boolean keep-mask over pairs: each expert keeps its ``capacity`` pairs of lowest ``priority_N``."""
    by_priority = torch.argsort(priority_N, stable=True)
    expert_p = expert_idx_N[by_priority]
    by_expert = torch.argsort(expert_p, stable=True)
    counts = count_per_expert(expert_p, num_experts)
    starts = torch.cumsum(counts, 0) - counts
    expert_sorted = expert_p[by_expert]
    pos_in_expert = torch.arange(expert_sorted.numel(), device=expert_sorted.device) - starts[expert_sorted]
    keep_p = torch.empty_like(expert_p, dtype=torch.bool)
    keep_p[by_expert] = pos_in_expert < capacity
    keep = torch.empty_like(keep_p)
    keep[by_priority] = keep_p
    return keep


class TopKRouter(SparseRouter):
    """Softmax top-k token choice (Switch k=1, GShard k=2) with optional noise, capacity and null experts.

    - ``noise``: ``"gaussian"`` (Shazeer noisy top-k, learned noise scale) or ``"jitter"`` (Switch's
      multiplicative input jitter of ``noise_eps``), training only.
    - ``capacity_factor``: each expert keeps at most ``ceil(capacity_factor * T * K / E)`` pairs; the rest are
      dropped (a token with no kept pair passes through the residual). ``None`` is dropless.
    - ``drop_policy``: ``"position"`` (first choices before second choices, then token order) or
      ``"batch_priority"`` (V-MoE BPR: tokens with the highest top gate first).
    - ``num_null_experts`` (AdaMoE): extra experts that compute nothing; pairs routed to them are removed, so a
      token may use fewer than K real experts (``top_k`` may reach ``num_experts + num_null_experts``).
    - ``normalize``: renormalise the K selected probabilities to sum to 1 (default for K > 1).
    - ``eval_rule``: with a capacity, ``"item"`` evaluates dropless (batch-independent), ``"batch"`` keeps the
      capacity at evaluation too.
    """

    batch_dependent: ClassVar[bool] = True  # with a capacity_factor

    def __init__(
        self,
        dim: int,
        num_experts: int,
        top_k: int = 2,
        noise: str | None = None,
        noise_eps: float = 1e-2,
        capacity_factor: float | None = None,
        drop_policy: str = "position",
        num_null_experts: int = 0,
        normalize: bool | None = None,
        balance_coef: float = 0.01,
        z_loss_coef: float = 0.0,
        eval_rule: str = "item",
    ) -> None:
        TopKRouter.check_options(
            num_experts,
            dict(
                top_k=top_k,
                noise=noise,
                noise_eps=noise_eps,
                capacity_factor=capacity_factor,
                drop_policy=drop_policy,
                num_null_experts=num_null_experts,
                normalize=normalize,
                balance_coef=balance_coef,
                z_loss_coef=z_loss_coef,
                eval_rule=eval_rule,
            ),
        )
        self.num_null_experts = num_null_experts
        self.eval_rule = eval_rule
        super().__init__(dim, num_experts, balance_coef, z_loss_coef)
        self.top_k = top_k
        self.noise = noise
        self.noise_eps = noise_eps
        self.capacity_factor = capacity_factor
        self.drop_policy = drop_policy
        self.normalize = top_k > 1 if normalize is None else normalize
        self.noise_gate = nn.Linear(dim, self.num_logits, bias=False) if noise == "gaussian" else None
        if self.noise_gate is not None:
            nn.init.zeros_(self.noise_gate.weight)

    @classmethod
    def check_options(cls, num_experts: int | None, options: Mapping[str, Any]) -> None:
        super().check_options(num_experts, options)
        check_int("num_null_experts", options["num_null_experts"], 0)
        if num_experts is None:
            check_top_k(options["top_k"], None)
        else:
            what = "num_experts + num_null_experts" if options["num_null_experts"] else "num_experts"
            check_top_k(options["top_k"], num_experts + options["num_null_experts"], what)
        check_choice("noise", options["noise"], (None, "gaussian", "jitter"))
        check_non_negative("noise_eps", options["noise_eps"])
        check_positive("capacity_factor", options["capacity_factor"], none_means="dropless")
        check_choice("drop_policy", options["drop_policy"], ("position", "batch_priority"))
        check_bool("normalize", options["normalize"], allow_none=True)
        check_choice("eval_rule", options["eval_rule"], EVAL_RULES)

    @property
    def num_logits(self) -> int:
        return self.num_experts + self.num_null_experts

    def depends_on_batch(self, training: bool) -> bool:
        return self.capacity_factor is not None and (training or self.eval_rule == "batch")

    def capacity(self, num_tokens: int | torch.SymInt) -> int | torch.SymInt:
        assert self.capacity_factor is not None
        return size_max(1, math.ceil(self.capacity_factor * num_tokens * self.top_k / self.num_experts))

    def forward(self, x_TD: Tensor, side: Side | None = None) -> RoutingResult:
        if self.training and self.noise == "jitter":
            x_TD = x_TD * torch.empty_like(x_TD).uniform_(1.0 - self.noise_eps, 1.0 + self.noise_eps)
        logits_TE = self.logits(x_TD)
        select_TE = logits_TE
        if self.training and self.noise_gate is not None:
            noise_std = F.softplus(F.linear(x_TD.float(), self.noise_gate.weight.float())) + self.noise_eps
            select_TE = logits_TE + torch.randn_like(logits_TE) * noise_std
        probs_TE = torch.softmax(select_TE, dim=-1)
        top_p_TK, top_idx_TK = probs_TE.topk(self.top_k, dim=-1)
        max_prob_T = top_p_TK[:, 0].detach()
        if self.normalize:
            top_p_TK = top_p_TK / top_p_TK.sum(-1, keepdim=True)
        losses = self.common_losses(logits_TE, probs_TE, top_idx_TK.reshape(-1), self.top_k)
        token_idx_N, expert_idx_N, gate_N = flat_pairs(top_idx_TK, top_p_TK)
        keep = None
        if self.num_null_experts:
            keep = expert_idx_N < self.num_experts
        if self.capacity_factor is not None and (self.training or self.eval_rule == "batch"):
            num_tokens = x_TD.shape[0]
            rank_T = torch.arange(num_tokens, device=x_TD.device)
            if self.drop_policy == "batch_priority":
                rank_T = torch.empty_like(rank_T)
                rank_T[torch.argsort(max_prob_T, descending=True, stable=True)] = torch.arange(
                    num_tokens, device=x_TD.device
                )
            choice_N = torch.arange(self.top_k, device=x_TD.device).repeat(num_tokens)
            priority_N = choice_N * num_tokens + rank_T.repeat_interleave(self.top_k)
            if keep is not None:  # null-expert pairs take no capacity
                priority_N = torch.where(keep, priority_N, priority_N + self.top_k * num_tokens)
            cap_keep = apply_capacity(token_idx_N, expert_idx_N, priority_N, self.num_logits, self.capacity(num_tokens))
            keep = cap_keep if keep is None else keep & cap_keep
        if keep is not None:
            token_idx_N, expert_idx_N, gate_N = keep_pairs(keep, token_idx_N, expert_idx_N, gate_N)
        return RoutingResult(
            token_idx_N, expert_idx_N, gate_N, x_TD.shape[0], self.num_experts, probs_TE.detach(), losses
        )


class SigmoidLossFreeRouter(SparseRouter):
    """Normalised sigmoid gating with auxiliary-loss-free balancing (DeepSeek-V3).

    Experts are *selected* by ``sigmoid(logits) + bias``; gates are the selected sigmoid scores (without bias)
    normalised to sum to 1 and scaled by ``route_scale``. After each optimiser step the bias of an overloaded
    expert goes down by ``bias_update_rate`` and of an underloaded one up (:meth:`update_state`).
    """

    expert_bias: Tensor
    pending_load: Tensor

    def __init__(
        self,
        dim: int,
        num_experts: int,
        top_k: int = 2,
        bias_update_rate: float = 1e-3,
        route_scale: float = 1.0,
        balance_coef: float = 0.0,
        z_loss_coef: float = 0.0,
    ) -> None:
        SigmoidLossFreeRouter.check_options(
            num_experts,
            dict(
                top_k=top_k,
                bias_update_rate=bias_update_rate,
                route_scale=route_scale,
                balance_coef=balance_coef,
                z_loss_coef=z_loss_coef,
            ),
        )
        super().__init__(dim, num_experts, balance_coef, z_loss_coef)
        self.top_k = top_k
        self.bias_update_rate = bias_update_rate
        self.route_scale = route_scale
        self.register_buffer("expert_bias", torch.zeros(num_experts))
        self.register_buffer("pending_load", torch.zeros(num_experts))

    @classmethod
    def check_options(cls, num_experts: int | None, options: Mapping[str, Any]) -> None:
        super().check_options(num_experts, options)
        check_top_k(options["top_k"], num_experts)
        check_non_negative("bias_update_rate", options["bias_update_rate"])
        check_positive("route_scale", options["route_scale"])

    def forward(self, x_TD: Tensor, side: Side | None = None) -> RoutingResult:
        logits_TE = self.logits(x_TD)
        scores_TE = torch.sigmoid(logits_TE)
        top_idx_TK = (scores_TE.detach() + self.expert_bias).topk(self.top_k, dim=-1).indices
        top_s_TK = scores_TE.gather(-1, top_idx_TK)
        gates_TK = self.route_scale * top_s_TK / top_s_TK.sum(-1, keepdim=True).clamp_min(1e-20)
        probs_TE = scores_TE / scores_TE.sum(-1, keepdim=True).clamp_min(1e-20)
        if self.training:
            with torch.no_grad():
                self.pending_load += count_per_expert(top_idx_TK.reshape(-1), self.num_experts)
        losses = self.common_losses(logits_TE, probs_TE, top_idx_TK.reshape(-1), self.top_k)
        token_idx_N, expert_idx_N, gate_N = flat_pairs(top_idx_TK, gates_TK)
        return RoutingResult(
            token_idx_N, expert_idx_N, gate_N, x_TD.shape[0], self.num_experts, probs_TE.detach(), losses
        )

    @torch.no_grad()
    def update_state(self) -> None:
        load = self.pending_load
        if load.sum() > 0:
            self.expert_bias += self.bias_update_rate * torch.sign(load.mean() - load)
        load.zero_()


class ExpertChoiceRouter(SparseRouter):
    """Expert choice (Zhou et al. 2022): each expert takes its top-C tokens by router probability.

    ``C = ceil(capacity_factor * T / E)``; ``capacity_factor`` is the mean number of experts per token, so
    ``capacity_factor = top_k`` matches the compute of top-k token choice (the default). A token may be chosen
    by 0..E experts. With ``eval_rule="item"`` (default) evaluation applies the rule within each sample: each
    expert takes the top ``ceil(capacity_factor * T_b / E)`` tokens of every sample b of ``T_b`` tokens.
    ``train_rule="item"`` applies that per-sample rule in training too (e.g. within each image of a DiT), so that
    training and batch-independent evaluation route alike; ``"batch"`` (default) chooses over all the batch's
    tokens in training.
    """

    batch_dependent: ClassVar[bool] = True

    def __init__(
        self,
        dim: int,
        num_experts: int,
        top_k: int = 2,
        capacity_factor: float | None = None,
        balance_coef: float = 0.0,
        z_loss_coef: float = 0.0,
        eval_rule: str = "item",
        train_rule: str = "batch",
    ) -> None:
        ExpertChoiceRouter.check_options(
            num_experts,
            dict(
                top_k=top_k,
                capacity_factor=capacity_factor,
                balance_coef=balance_coef,
                z_loss_coef=z_loss_coef,
                eval_rule=eval_rule,
                train_rule=train_rule,
            ),
        )
        super().__init__(dim, num_experts, balance_coef, z_loss_coef)
        self.capacity_factor = float(top_k) if capacity_factor is None else capacity_factor
        self.eval_rule = eval_rule
        self.train_rule = train_rule

    @classmethod
    def check_options(cls, num_experts: int | None, options: Mapping[str, Any]) -> None:
        super().check_options(num_experts, options)
        check_top_k(options["top_k"], num_experts)
        check_positive("capacity_factor", options["capacity_factor"], none_means="top_k")
        check_choice("eval_rule", options["eval_rule"], EVAL_RULES)
        check_choice("train_rule", options["train_rule"], EVAL_RULES)

    def depends_on_batch(self, training: bool) -> bool:
        return (self.train_rule if training else self.eval_rule) == "batch"

    def capacity(self, num_tokens: int | torch.SymInt) -> int | torch.SymInt:
        per_expert = size_max(1, math.ceil(self.capacity_factor * num_tokens / self.num_experts))
        return size_min(num_tokens, per_expert)

    def forward(self, x_TD: Tensor, side: Side | None = None) -> RoutingResult:
        num_tokens = x_TD.shape[0]
        logits_TE = self.logits(x_TD)
        probs_TE = torch.softmax(logits_TE, dim=-1)
        if not self.depends_on_batch(self.training):
            token_N, expert_N = self._choose_per_sample(probs_TE, *sample_groups(side, num_tokens, x_TD.device))
            gate_N = probs_TE[token_N, expert_N]
        else:
            gate_EC, token_EC = probs_TE.t().topk(self.capacity(num_tokens), dim=-1)  # C = 0 when T = 0
            expert_EC = torch.arange(self.num_experts, device=x_TD.device).unsqueeze(-1).expand_as(token_EC)
            token_N, expert_N, gate_N = token_EC.reshape(-1), expert_EC.reshape(-1), gate_EC.reshape(-1)
        mean_experts_per_token = size_max(1, expert_N.shape[0] // size_max(1, num_tokens))
        losses = self.common_losses(logits_TE, probs_TE, expert_N, mean_experts_per_token)
        return RoutingResult(token_N, expert_N, gate_N, num_tokens, self.num_experts, probs_TE.detach(), losses)

    def _choose_per_sample(self, probs_TE: Tensor, sample_T: Tensor, sizes_B: Tensor) -> tuple[Tensor, Tensor]:
        """Expert choice within each sample: per expert, its top ``C_b`` tokens of every sample b."""
        num_tokens = probs_TE.shape[0]
        cap_B = torch.ceil(self.capacity_factor * sizes_B.double() / self.num_experts).long().clamp_min(1)
        cap_B = torch.minimum(cap_B, sizes_B)
        order_ET = torch.argsort(probs_TE.detach().t(), dim=-1, descending=True, stable=True)
        sample_ET = sample_T[order_ET]
        by_sample = torch.argsort(sample_ET, dim=-1, stable=True)  # samples in order, best tokens first in each
        order_ET, sample_ET = order_ET.gather(-1, by_sample), sample_ET.gather(-1, by_sample)
        starts_B = torch.cumsum(sizes_B, 0) - sizes_B
        rank_ET = torch.arange(num_tokens, device=probs_TE.device) - starts_B[sample_ET]
        expert_ET = torch.arange(self.num_experts, device=probs_TE.device).unsqueeze(-1).expand_as(order_ET)
        token_N, expert_N = keep_pairs(
            (rank_ET < cap_B[sample_ET]).reshape(-1), order_ET.reshape(-1), expert_ET.reshape(-1)
        )
        return token_N, expert_N


def sinkhorn_log(logits_TE: Tensor, num_iters: int) -> Tensor:
    """Log of a transport plan with rows summing to 1 (tokens) and equal column sums T/E (experts).

    Each iteration normalises the columns to equal sums, then the rows to 1. The columns' common target T/E is a
    constant added to every entry, which the row step removes again, so it is left out (no dependence on T).
    """
    log_p = logits_TE
    for _ in range(num_iters):
        log_p = log_p - logsumexp_TE(log_p, dim=0)
        log_p = log_p - logsumexp_TE(log_p, dim=1)
    return log_p


def sinkhorn_log_per_sample(logits_TE: Tensor, sample_T: Tensor, num_samples: int, num_iters: int) -> Tensor:
    """:func:`sinkhorn_log` within each sample: the expert columns are balanced over each sample's own tokens."""
    index_TE = sample_T.unsqueeze(-1).expand_as(logits_TE)
    log_p = logits_TE
    for _ in range(num_iters):
        max_BE = logits_TE.new_full((num_samples, logits_TE.shape[1]), float("-inf"))
        max_BE = max_BE.scatter_reduce(0, index_TE, log_p, "amax").detach()
        shifted = log_p - max_BE[sample_T]
        sum_BE = logits_TE.new_zeros(num_samples, logits_TE.shape[1]).index_add(0, sample_T, shifted.exp())
        log_p = shifted - sum_BE.clamp_min(1e-30).log()[sample_T]
        log_p = log_p - logsumexp_TE(log_p, dim=1)
    return log_p


class SinkhornRouter(SparseRouter):
    """Balanced assignment by Sinkhorn iterations (BASE layers / Selective Sinkhorn).

    In training, experts are selected by the top-k of a balanced transport plan computed from the logits
    (no gradient through the selection); gates are the softmax probabilities of the selected experts.
    At evaluation the selection is greedy top-k unless ``balanced_eval``; then ``eval_rule="item"`` (default)
    balances within each sample's own tokens and ``"batch"`` over the whole batch.
    """

    batch_dependent: ClassVar[bool] = True

    def __init__(
        self,
        dim: int,
        num_experts: int,
        top_k: int = 1,
        num_iters: int = 8,
        balanced_eval: bool = False,
        balance_coef: float = 0.0,
        z_loss_coef: float = 0.0,
        eval_rule: str = "item",
    ) -> None:
        SinkhornRouter.check_options(
            num_experts,
            dict(
                top_k=top_k,
                num_iters=num_iters,
                balanced_eval=balanced_eval,
                balance_coef=balance_coef,
                z_loss_coef=z_loss_coef,
                eval_rule=eval_rule,
            ),
        )
        self.eval_rule = eval_rule
        super().__init__(dim, num_experts, balance_coef, z_loss_coef)
        self.top_k = top_k
        self.num_iters = num_iters
        self.balanced_eval = balanced_eval

    @classmethod
    def check_options(cls, num_experts: int | None, options: Mapping[str, Any]) -> None:
        super().check_options(num_experts, options)
        check_top_k(options["top_k"], num_experts)
        check_int("num_iters", options["num_iters"], 1)
        check_bool("balanced_eval", options["balanced_eval"])
        check_choice("eval_rule", options["eval_rule"], EVAL_RULES)

    def depends_on_batch(self, training: bool) -> bool:
        return training or (self.balanced_eval and self.eval_rule == "batch")

    def forward(self, x_TD: Tensor, side: Side | None = None) -> RoutingResult:
        logits_TE = self.logits(x_TD)
        probs_TE = torch.softmax(logits_TE, dim=-1)
        select_TE = logits_TE.detach()
        if not self.training and self.balanced_eval and self.eval_rule == "item":
            sample_T, sizes_B = sample_groups(side, x_TD.shape[0], x_TD.device)
            select_TE = sinkhorn_log_per_sample(select_TE, sample_T, sizes_B.shape[0], self.num_iters)
        elif self.training or self.balanced_eval:
            select_TE = sinkhorn_log(select_TE, self.num_iters)
        top_idx_TK = select_TE.topk(self.top_k, dim=-1).indices
        gates_TK = probs_TE.gather(-1, top_idx_TK)
        if self.top_k > 1:
            gates_TK = gates_TK / gates_TK.sum(-1, keepdim=True)
        losses = self.common_losses(logits_TE, probs_TE, top_idx_TK.reshape(-1), self.top_k)
        token_idx_N, expert_idx_N, gate_N = flat_pairs(top_idx_TK, gates_TK)
        return RoutingResult(
            token_idx_N, expert_idx_N, gate_N, x_TD.shape[0], self.num_experts, probs_TE.detach(), losses
        )


class ReLURouter(SparseRouter):
    """ReLU routing (ReMoE): gates are ``relu(logits)``, every nonzero is a pair.

    Sparsity is controlled by a load-weighted L1 penalty whose coefficient adapts once per step:
    ``l1_coef *= l1_growth ** sign(target_sparsity - observed_sparsity)``, with target ``1 - top_k / E``; the
    observed sparsity is the fraction of zero gates over every token routed since the last step.
    """

    l1_coef: Tensor
    pending_sparsity: Tensor

    def __init__(
        self,
        dim: int,
        num_experts: int,
        top_k: int = 2,
        l1_coef_init: float = 1e-8,
        l1_growth: float = 1.2,
        balance_coef: float = 0.0,
        z_loss_coef: float = 0.0,
    ) -> None:
        ReLURouter.check_options(
            num_experts,
            dict(
                top_k=top_k,
                l1_coef_init=l1_coef_init,
                l1_growth=l1_growth,
                balance_coef=balance_coef,
                z_loss_coef=z_loss_coef,
            ),
        )
        super().__init__(dim, num_experts, balance_coef, z_loss_coef)
        self.top_k = top_k
        self.l1_growth = l1_growth
        self.target_sparsity = 1.0 - top_k / num_experts
        self.register_buffer("l1_coef", torch.tensor(float(l1_coef_init)))
        self.register_buffer("pending_sparsity", torch.zeros(2))  # (zero gates, gates) since the last step

    @classmethod
    def check_options(cls, num_experts: int | None, options: Mapping[str, Any]) -> None:
        super().check_options(num_experts, options)
        check_top_k(options["top_k"], num_experts)
        check_positive("l1_coef_init", options["l1_coef_init"])
        check_number("l1_growth", options["l1_growth"], low=1.0, strict=True)

    def forward(self, x_TD: Tensor, side: Side | None = None) -> RoutingResult:
        num_tokens = x_TD.shape[0]
        logits_TE = self.logits(x_TD)
        gates_TE = F.relu(logits_TE)
        active_TE = gates_TE.detach() > 0
        pair_N = true_indices(active_TE.reshape(-1))
        token_idx_N, expert_idx_N = pair_N // self.num_experts, pair_N % self.num_experts
        gate_N = gates_TE.reshape(-1).index_select(0, pair_N)
        load_E = active_TE.float().sum(0)
        weight_E = load_E * self.num_experts / load_E.sum().clamp_min(1e-12)
        per_token = size_max(1, num_tokens)
        losses: dict[str, Tensor] = {"l1": self.l1_coef * (gates_TE * weight_E).sum() / per_token}
        if self.training:
            with torch.no_grad():
                zeros = (~active_TE).sum().float()
                self.pending_sparsity += torch.stack([zeros, zeros + active_TE.sum().float()])
        probs_TE = gates_TE.detach() / gates_TE.detach().sum(-1, keepdim=True).clamp_min(1e-12)
        losses.update(self.common_losses(logits_TE, torch.softmax(logits_TE, -1), expert_idx_N, self.top_k))
        return RoutingResult(token_idx_N, expert_idx_N, gate_N, num_tokens, self.num_experts, probs_TE, losses)

    @torch.no_grad()
    def update_state(self) -> None:
        zeros, total = self.pending_sparsity.tolist()
        if total > 0:
            observed = zeros / total
            direction = 1.0 if observed < self.target_sparsity else (-1.0 if observed > self.target_sparsity else 0.0)
            self.l1_coef *= self.l1_growth**direction
        self.pending_sparsity.zero_()


class SoftMoERouter(Router):
    """Soft MoE (Puigcerver et al. 2023): every slot is a convex mix of the tokens of its group.

    ``logits = normalize(x) @ (scale * normalize(phi))``, shape (G, L, E*S). Dispatch weights are a softmax
    over the L tokens of the group (per slot); combine weights a softmax over the E*S slots (per token).
    Padding tokens (``mask_GL`` False) get no dispatch weight. ``top_k`` only names the compute-equivalent top-k
    of the layer (its dense twin's width) and must be in ``[1, num_experts]``.
    """

    kind: ClassVar[Literal["soft"]] = "soft"

    def __init__(
        self, dim: int, num_experts: int, top_k: int = 1, slots_per_expert: int = 1, z_loss_coef: float = 0.0
    ) -> None:
        SoftMoERouter.check_options(
            num_experts, dict(top_k=top_k, slots_per_expert=slots_per_expert, z_loss_coef=z_loss_coef)
        )
        self.slots_per_expert = slots_per_expert
        super().__init__(dim, num_experts, balance_coef=0.0, z_loss_coef=z_loss_coef)
        self.scale = nn.Parameter(torch.ones(()))

    @classmethod
    def check_options(cls, num_experts: int | None, options: Mapping[str, Any]) -> None:
        super().check_options(num_experts, options)
        check_top_k(options["top_k"], num_experts)
        check_int("slots_per_expert", options["slots_per_expert"], 1)

    @property
    def num_logits(self) -> int:
        return self.num_experts * self.slots_per_expert

    def forward(self, x_GLD: Tensor, mask_GL: Tensor | None = None) -> SoftRoutingResult:
        with torch.autocast(device_type=x_GLD.device.type, enabled=False):
            phi = F.normalize(self.gate.weight.float(), dim=-1) * self.scale.float()
            logits_GLS = F.linear(F.normalize(x_GLD.float(), dim=-1), phi)
        dispatch_logits = logits_GLS
        if mask_GL is not None:
            dispatch_logits = logits_GLS.masked_fill(~mask_GL.unsqueeze(-1), float("-inf"))
        dispatch_GLS = torch.softmax(dispatch_logits, dim=1).nan_to_num(0.0)
        combine_GLS = torch.softmax(logits_GLS, dim=-1)
        losses: dict[str, Tensor] = {}
        if self.z_loss_coef > 0:
            losses["z_loss"] = self.z_loss_coef * router_z_loss(logits_GLS.reshape(-1, logits_GLS.shape[-1]))
        return SoftRoutingResult(dispatch_GLS, combine_GLS, self.num_experts, self.slots_per_expert, losses)


# --------------------------------------------------------------------------------------------------- registry

ROUTERS: dict[str, type[Router]] = {
    "topk": TopKRouter,
    "sigmoid_lossfree": SigmoidLossFreeRouter,
    "expert_choice": ExpertChoiceRouter,
    "sinkhorn": SinkhornRouter,
    "relu": ReLURouter,
    "soft": SoftMoERouter,
}


def register_router(name: str, router_class: type[Router]) -> None:
    """Add a router class to the registry; domain routers (ProMoE, language, segment ...) register themselves."""
    if not (isinstance(router_class, type) and issubclass(router_class, Router)):
        raise TypeError(f"register_router({name!r}, ...) takes a Router subclass, got {router_class!r}")
    if name in ROUTERS and ROUTERS[name] is not router_class:
        raise ValueError(f"a router named {name!r} is already registered")
    ROUTERS[name] = router_class


def _router_class(name: str) -> type[Router]:
    if name not in ROUTERS:
        raise ValueError(f"router={name!r} is unknown; registered routers are {sorted(ROUTERS)}")
    return ROUTERS[name]


def router_options(name: str) -> dict[str, Any]:
    """The options router ``name`` accepts (every constructor argument after ``dim`` and ``num_experts``) with
    their defaults, following ``**kwargs`` up the class hierarchy."""
    options: dict[str, Any] = {}
    for klass in _router_class(name).__mro__:
        if not (isinstance(klass, type) and issubclass(klass, Router)):
            break
        params = list(inspect.signature(klass.__init__).parameters.values())[3:]  # self, dim, num_experts
        for param in params:
            if param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY):
                options.setdefault(param.name, param.default)
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return options


def check_router_kwargs(name: str, kwargs: Mapping[str, Any], num_experts: int | None = None) -> None:
    """Validate options for router ``name`` without building anything.

    Raises ValueError for an unknown router, TypeError naming the arguments the router does not accept together
    with those it does, and the router's own TypeError/ValueError for a bad value (``num_experts``, when given,
    bounds ``top_k``). ``kwargs`` are the router's options as :func:`get_router` takes them (``top_k`` included).
    """
    accepted = router_options(name)
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise TypeError(f"router={name!r} does not accept {', '.join(unknown)}; it accepts {', '.join(accepted)}")
    if num_experts is not None:
        check_int("num_experts", num_experts, 1)
    _router_class(name).check_options(num_experts, {**accepted, **kwargs})


def get_router(name: str, dim: int, num_experts: int, **kwargs: Any) -> Router:
    """Build a registered router by name: ``get_router("topk", dim=64, num_experts=8, top_k=2)``."""
    check_router_kwargs(name, kwargs, num_experts)
    return _router_class(name)(dim, num_experts, **kwargs)
