"""Routers: from token representations to (token, expert, gate) pairs.

Legend: T tokens, D model dim, E experts, K experts per token, N routed pairs, C capacity per expert,
G groups (sequences) and L tokens per group for Soft MoE, S slots.

Every sparse router returns a :class:`RoutingResult`, a flat list of pairs: top-k gives N = T*K, expert choice
gives each expert's C tokens, capacity dropping and null experts are filters on the pairs, ReLU routing gives
the nonzeros. The dispatcher in :mod:`moezoo.ops` consumes any such list. Routers compute in fp32.

State that is not trained by gradients (the loss-free bias, ReLU routing's L1 coefficient) lives in buffers;
training forwards accumulate observations and :meth:`Router.update_state` applies them once per optimiser step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moezoo.layers.losses import router_z_loss, switch_balance_loss

Side = Mapping[str, Tensor]


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


@dataclass
class SoftRoutingResult:
    """Soft MoE: dispatch (softmax over tokens) and combine (softmax over slots) weights, shape (G, L, E*S)."""

    dispatch_GLS: Tensor
    combine_GLS: Tensor
    num_experts: int
    slots_per_expert: int
    losses: dict[str, Tensor] = field(default_factory=dict)


def _check_positive(name: str, value: float | int | None, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")


def _check_top_k(top_k: int, num_experts: int) -> None:
    if not isinstance(top_k, int) or top_k < 1 or top_k > num_experts:
        raise ValueError(f"top_k must be an integer in [1, num_experts={num_experts}], got {top_k!r}")


def _flat_pairs(top_idx_TK: Tensor, gates_TK: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    num_tokens, k = top_idx_TK.shape
    token_idx_N = torch.arange(num_tokens, device=top_idx_TK.device).repeat_interleave(k)
    return token_idx_N, top_idx_TK.reshape(-1), gates_TK.reshape(-1)


class Router(nn.Module):
    """Base class: a linear gate ``x @ W`` computed in fp32, with the common losses.

    Subclasses implement :meth:`forward`. ``side`` carries per-token side inputs (class labels, language
    posteriors ...) for routers that need them; plain routers ignore it.
    """

    kind: ClassVar[str] = "sparse"
    needs_side: ClassVar[tuple[str, ...]] = ()

    def __init__(self, dim: int, num_experts: int, balance_coef: float = 0.01, z_loss_coef: float = 0.0) -> None:
        super().__init__()
        _check_positive("dim", dim)
        _check_positive("num_experts", num_experts)
        if balance_coef < 0 or z_loss_coef < 0:
            raise ValueError(f"balance_coef and z_loss_coef must be >= 0, got {balance_coef}, {z_loss_coef}")
        self.dim = dim
        self.num_experts = num_experts
        self.balance_coef = balance_coef
        self.z_loss_coef = z_loss_coef
        self.gate = nn.Linear(dim, self.num_logits, bias=False)
        nn.init.normal_(self.gate.weight, std=dim**-0.5)

    @property
    def num_logits(self) -> int:
        return self.num_experts

    def logits(self, x_TD: Tensor) -> Tensor:
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            return F.linear(x_TD.float(), self.gate.weight.float())

    def common_losses(self, logits_TE: Tensor, probs_TE: Tensor, expert_idx_N: Tensor, k: int) -> dict[str, Tensor]:
        losses: dict[str, Tensor] = {}
        if self.balance_coef > 0:
            losses["balance"] = self.balance_coef * switch_balance_loss(probs_TE, expert_idx_N, k)
        if self.z_loss_coef > 0:
            losses["z_loss"] = self.z_loss_coef * router_z_loss(logits_TE)
        return losses

    def update_state(self) -> None:
        """Apply accumulated non-gradient updates (called once per optimiser step). Default: nothing."""


def apply_capacity(
    token_idx_N: Tensor, expert_idx_N: Tensor, priority_N: Tensor, num_experts: int, capacity: int
) -> Tensor:
    """Boolean keep-mask over pairs: each expert keeps its ``capacity`` pairs of lowest ``priority_N``."""
    by_priority = torch.argsort(priority_N, stable=True)
    expert_p = expert_idx_N[by_priority]
    by_expert = torch.argsort(expert_p, stable=True)
    counts = torch.bincount(expert_p, minlength=num_experts)
    starts = torch.cumsum(counts, 0) - counts
    expert_sorted = expert_p[by_expert]
    pos_in_expert = torch.arange(expert_sorted.numel(), device=expert_sorted.device) - starts[expert_sorted]
    keep_p = torch.empty_like(expert_p, dtype=torch.bool)
    keep_p[by_expert] = pos_in_expert < capacity
    keep = torch.empty_like(keep_p)
    keep[by_priority] = keep_p
    return keep


class TopKRouter(Router):
    """Softmax top-k token choice (Switch k=1, GShard k=2) with optional noise, capacity and null experts.

    - ``noise``: ``"gaussian"`` (Shazeer noisy top-k, learned noise scale) or ``"jitter"`` (Switch's
      multiplicative input jitter of ``noise_eps``), training only.
    - ``capacity_factor``: each expert keeps at most ``ceil(capacity_factor * T * K / E)`` pairs; the rest are
      dropped (a token with no kept pair passes through the residual). ``None`` is dropless.
    - ``drop_policy``: ``"position"`` (first choices before second choices, then token order) or
      ``"batch_priority"`` (V-MoE BPR: tokens with the highest top gate first).
    - ``num_null_experts`` (AdaMoE): extra experts that compute nothing; pairs routed to them are removed, so a
      token may use fewer than K real experts.
    - ``normalize``: renormalise the K selected probabilities to sum to 1 (default for K > 1).
    """

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
    ) -> None:
        if num_null_experts < 0:
            raise ValueError(f"num_null_experts must be >= 0, got {num_null_experts}")
        self.num_null_experts = num_null_experts
        super().__init__(dim, num_experts, balance_coef, z_loss_coef)
        _check_top_k(top_k, num_experts + num_null_experts)
        _check_positive("capacity_factor", capacity_factor, allow_none=True)
        if noise not in (None, "gaussian", "jitter"):
            raise ValueError(f"noise must be None, 'gaussian' or 'jitter', got {noise!r}")
        if drop_policy not in ("position", "batch_priority"):
            raise ValueError(f"drop_policy must be 'position' or 'batch_priority', got {drop_policy!r}")
        self.top_k = top_k
        self.noise = noise
        self.noise_eps = noise_eps
        self.capacity_factor = capacity_factor
        self.drop_policy = drop_policy
        self.normalize = top_k > 1 if normalize is None else normalize
        self.noise_gate = nn.Linear(dim, self.num_logits, bias=False) if noise == "gaussian" else None
        if self.noise_gate is not None:
            nn.init.zeros_(self.noise_gate.weight)

    @property
    def num_logits(self) -> int:
        return self.num_experts + self.num_null_experts

    def capacity(self, num_tokens: int) -> int:
        assert self.capacity_factor is not None
        return max(1, math.ceil(self.capacity_factor * num_tokens * self.top_k / self.num_experts))

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
        token_idx_N, expert_idx_N, gate_N = _flat_pairs(top_idx_TK, top_p_TK)
        keep = None
        if self.num_null_experts:
            keep = expert_idx_N < self.num_experts
        if self.capacity_factor is not None:
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
            token_idx_N, expert_idx_N, gate_N = token_idx_N[keep], expert_idx_N[keep], gate_N[keep]
        return RoutingResult(
            token_idx_N, expert_idx_N, gate_N, x_TD.shape[0], self.num_experts, probs_TE.detach(), losses
        )


class SigmoidLossFreeRouter(Router):
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
        super().__init__(dim, num_experts, balance_coef, z_loss_coef)
        _check_top_k(top_k, num_experts)
        if bias_update_rate < 0:
            raise ValueError(f"bias_update_rate must be >= 0, got {bias_update_rate}")
        self.top_k = top_k
        self.bias_update_rate = bias_update_rate
        self.route_scale = route_scale
        self.register_buffer("expert_bias", torch.zeros(num_experts))
        self.register_buffer("pending_load", torch.zeros(num_experts))

    def forward(self, x_TD: Tensor, side: Side | None = None) -> RoutingResult:
        logits_TE = self.logits(x_TD)
        scores_TE = torch.sigmoid(logits_TE)
        top_idx_TK = (scores_TE.detach() + self.expert_bias).topk(self.top_k, dim=-1).indices
        top_s_TK = scores_TE.gather(-1, top_idx_TK)
        gates_TK = self.route_scale * top_s_TK / top_s_TK.sum(-1, keepdim=True).clamp_min(1e-20)
        probs_TE = scores_TE / scores_TE.sum(-1, keepdim=True).clamp_min(1e-20)
        if self.training:
            with torch.no_grad():
                self.pending_load += torch.bincount(top_idx_TK.reshape(-1), minlength=self.num_experts)
        losses = self.common_losses(logits_TE, probs_TE, top_idx_TK.reshape(-1), self.top_k)
        token_idx_N, expert_idx_N, gate_N = _flat_pairs(top_idx_TK, gates_TK)
        return RoutingResult(
            token_idx_N, expert_idx_N, gate_N, x_TD.shape[0], self.num_experts, probs_TE.detach(), losses
        )

    @torch.no_grad()
    def update_state(self) -> None:
        load = self.pending_load
        if load.sum() > 0:
            self.expert_bias += self.bias_update_rate * torch.sign(load.mean() - load)
        load.zero_()


class ExpertChoiceRouter(Router):
    """Expert choice (Zhou et al. 2022): each expert takes its top-C tokens by router probability.

    ``C = ceil(capacity_factor * T / E)``; ``capacity_factor`` is the mean number of experts per token, so
    ``capacity_factor = top_k`` matches the compute of top-k token choice (the default). A token may be chosen
    by 0..E experts.
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        top_k: int = 2,
        capacity_factor: float | None = None,
        balance_coef: float = 0.0,
        z_loss_coef: float = 0.0,
    ) -> None:
        super().__init__(dim, num_experts, balance_coef, z_loss_coef)
        _check_top_k(top_k, num_experts)
        _check_positive("capacity_factor", capacity_factor, allow_none=True)
        self.capacity_factor = float(top_k) if capacity_factor is None else capacity_factor

    def capacity(self, num_tokens: int) -> int:
        return min(num_tokens, max(1, math.ceil(self.capacity_factor * num_tokens / self.num_experts)))

    def forward(self, x_TD: Tensor, side: Side | None = None) -> RoutingResult:
        num_tokens = x_TD.shape[0]
        logits_TE = self.logits(x_TD)
        probs_TE = torch.softmax(logits_TE, dim=-1)
        if num_tokens == 0:
            empty = torch.zeros(0, dtype=torch.long, device=x_TD.device)
            return RoutingResult(empty, empty, probs_TE.new_zeros(0), 0, self.num_experts, probs_TE.detach(), {})
        gate_EC, token_EC = probs_TE.t().topk(self.capacity(num_tokens), dim=-1)
        expert_EC = torch.arange(self.num_experts, device=x_TD.device).unsqueeze(-1).expand_as(token_EC)
        mean_experts_per_token = max(1, gate_EC.numel() // num_tokens)
        losses = self.common_losses(logits_TE, probs_TE, expert_EC.reshape(-1), mean_experts_per_token)
        return RoutingResult(
            token_EC.reshape(-1),
            expert_EC.reshape(-1),
            gate_EC.reshape(-1),
            num_tokens,
            self.num_experts,
            probs_TE.detach(),
            losses,
        )


def sinkhorn_log(logits_TE: Tensor, num_iters: int) -> Tensor:
    """Log of a transport plan with rows summing to 1 (tokens) and columns to T/E (experts)."""
    num_tokens, num_experts = logits_TE.shape
    log_p = logits_TE
    col_target = math.log(num_tokens / num_experts)
    for _ in range(num_iters):
        log_p = log_p - torch.logsumexp(log_p, dim=0, keepdim=True) + col_target
        log_p = log_p - torch.logsumexp(log_p, dim=1, keepdim=True)
    return log_p


class SinkhornRouter(Router):
    """Balanced assignment by Sinkhorn iterations (BASE layers / Selective Sinkhorn).

    In training, experts are selected by the top-k of a balanced transport plan computed from the logits
    (no gradient through the selection); gates are the softmax probabilities of the selected experts.
    At evaluation the selection is greedy top-k unless ``balanced_eval``.
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        top_k: int = 1,
        num_iters: int = 8,
        balanced_eval: bool = False,
        balance_coef: float = 0.0,
        z_loss_coef: float = 0.0,
    ) -> None:
        super().__init__(dim, num_experts, balance_coef, z_loss_coef)
        _check_top_k(top_k, num_experts)
        _check_positive("num_iters", num_iters)
        self.top_k = top_k
        self.num_iters = num_iters
        self.balanced_eval = balanced_eval

    def forward(self, x_TD: Tensor, side: Side | None = None) -> RoutingResult:
        logits_TE = self.logits(x_TD)
        probs_TE = torch.softmax(logits_TE, dim=-1)
        select_TE = logits_TE.detach()
        if (self.training or self.balanced_eval) and x_TD.shape[0] > 0:
            select_TE = sinkhorn_log(select_TE, self.num_iters)
        top_idx_TK = select_TE.topk(self.top_k, dim=-1).indices
        gates_TK = probs_TE.gather(-1, top_idx_TK)
        if self.top_k > 1:
            gates_TK = gates_TK / gates_TK.sum(-1, keepdim=True)
        losses = self.common_losses(logits_TE, probs_TE, top_idx_TK.reshape(-1), self.top_k)
        token_idx_N, expert_idx_N, gate_N = _flat_pairs(top_idx_TK, gates_TK)
        return RoutingResult(
            token_idx_N, expert_idx_N, gate_N, x_TD.shape[0], self.num_experts, probs_TE.detach(), losses
        )


class ReLURouter(Router):
    """ReLU routing (ReMoE): gates are ``relu(logits)``, every nonzero is a pair.

    Sparsity is controlled by a load-weighted L1 penalty whose coefficient adapts once per step:
    ``l1_coef *= l1_growth ** sign(target_sparsity - observed_sparsity)``, with target ``1 - top_k / E``.
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
        super().__init__(dim, num_experts, balance_coef, z_loss_coef)
        _check_top_k(top_k, num_experts)
        _check_positive("l1_coef_init", l1_coef_init)
        if l1_growth <= 1.0:
            raise ValueError(f"l1_growth must be > 1, got {l1_growth}")
        self.top_k = top_k
        self.l1_growth = l1_growth
        self.target_sparsity = 1.0 - top_k / num_experts
        self.register_buffer("l1_coef", torch.tensor(float(l1_coef_init)))
        self.register_buffer("pending_sparsity", torch.zeros(2))  # (sum of observed sparsity, count)

    def forward(self, x_TD: Tensor, side: Side | None = None) -> RoutingResult:
        logits_TE = self.logits(x_TD)
        gates_TE = F.relu(logits_TE)
        token_idx_N, expert_idx_N = gates_TE.detach().nonzero(as_tuple=True)
        gate_N = gates_TE[token_idx_N, expert_idx_N]
        num_tokens = x_TD.shape[0]
        losses: dict[str, Tensor] = {}
        if num_tokens:
            active_TE = (gates_TE.detach() > 0).float()
            load_E = active_TE.mean(0)
            weight_E = load_E * self.num_experts / load_E.sum().clamp_min(1e-12)
            losses["l1"] = self.l1_coef * (gates_TE * weight_E).sum(-1).mean()
            if self.training:
                with torch.no_grad():
                    self.pending_sparsity += torch.stack([1.0 - active_TE.mean(), active_TE.new_ones(())])
        probs_TE = gates_TE.detach() / gates_TE.detach().sum(-1, keepdim=True).clamp_min(1e-12)
        losses.update(self.common_losses(logits_TE, torch.softmax(logits_TE, -1), expert_idx_N, self.top_k))
        return RoutingResult(token_idx_N, expert_idx_N, gate_N, num_tokens, self.num_experts, probs_TE, losses)

    @torch.no_grad()
    def update_state(self) -> None:
        total, count = self.pending_sparsity.tolist()
        if count > 0:
            observed = total / count
            direction = 1.0 if observed < self.target_sparsity else (-1.0 if observed > self.target_sparsity else 0.0)
            self.l1_coef *= self.l1_growth**direction
        self.pending_sparsity.zero_()


class SoftMoERouter(Router):
    """Soft MoE (Puigcerver et al. 2023): every slot is a convex mix of the tokens of its group.

    ``logits = normalize(x) @ (scale * normalize(phi))``, shape (G, L, E*S). Dispatch weights are a softmax
    over the L tokens of the group (per slot); combine weights a softmax over the E*S slots (per token).
    Padding tokens (``mask_GL`` False) get no dispatch weight.
    """

    kind: ClassVar[str] = "soft"

    def __init__(
        self, dim: int, num_experts: int, top_k: int = 1, slots_per_expert: int = 1, z_loss_coef: float = 0.0
    ) -> None:
        _check_positive("slots_per_expert", slots_per_expert)
        self.slots_per_expert = slots_per_expert
        super().__init__(dim, num_experts, balance_coef=0.0, z_loss_coef=z_loss_coef)
        self.scale = nn.Parameter(torch.ones(()))

    @property
    def num_logits(self) -> int:
        return self.num_experts * self.slots_per_expert

    def forward(self, x_GLD: Tensor, mask_GL: Tensor | None = None) -> SoftRoutingResult:  # type: ignore[override]
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


ROUTERS: dict[str, Callable[..., Router]] = {
    "topk": TopKRouter,
    "sigmoid_lossfree": SigmoidLossFreeRouter,
    "expert_choice": ExpertChoiceRouter,
    "sinkhorn": SinkhornRouter,
    "relu": ReLURouter,
    "soft": SoftMoERouter,
}


def register_router(name: str, factory: Callable[..., Router]) -> None:
    """Add a router to the registry; domain routers (ProMoE, language, segment ...) register themselves."""
    if name in ROUTERS and ROUTERS[name] is not factory:
        raise ValueError(f"a router named {name!r} is already registered")
    ROUTERS[name] = factory


def get_router(name: str, dim: int, num_experts: int, **kwargs: Any) -> Router:
    """Build a registered router by name: ``get_router("topk", dim=64, num_experts=8, top_k=2)``."""
    if name not in ROUTERS:
        raise ValueError(f"router={name!r} is unknown; registered routers are {sorted(ROUTERS)}")
    try:
        return ROUTERS[name](dim, num_experts, **kwargs)
    except TypeError as err:
        raise TypeError(f"router={name!r} does not accept these arguments {sorted(kwargs)}: {err}") from err
