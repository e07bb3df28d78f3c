"""Routers that use their layer's expert weights: Autonomy-of-Experts, the ERC loss, CompeteSMoE, SMEAR.

Legend: T tokens, D model dim, F expert hidden (the width entering the activation), E experts, K experts per token.

AoE and ERC rank experts by the L2 norm of an expert's *internal activation*: the output of the projection that
feeds the expert's activation, ``x W_g^e (+ b_g^e)`` (:meth:`GroupedExperts.gate_projection`: the gate half of
``w_in`` for SwiGLU/GEGLU/ReGLU, all of ``w_in`` otherwise); CompeteSMoE scores each expert's whole output. They
set ``reads_experts = True``, so the MoE layer calls them as
``forward(x_TD, side, experts=layer.experts)`` (:meth:`moezoo.layers.MoE.route`); the pairs they return go to every
backend like any other router's. Called without the experts they raise. Under expert parallelism a rank holds
only some experts' weights, so :func:`moezoo.parallel.shard_experts` refuses them.

- ``"aoe"`` (:class:`AutonomyRouter`, Lv et al. 2025, *Autonomy-of-Experts Models*): no router; every expert
  computes its activation norm for every token, the K largest norms choose the experts, gates are the softmax of
  the norms at the chosen experts. Without the paper's low-rank factorisation of ``W_g`` (which would change the
  experts): the norms cost one ``(D, F)`` projection per expert per token.
- ``"erc"`` (:class:`ERCRouter`, Lv et al. 2025, *Coupling Experts and Routers in MoE via an Auxiliary Loss*):
  top-k routing plus :func:`erc_loss`, computed from the router's rows as proxy tokens (E x E activations, a
  fixed cost per step whatever the batch).
- ``"compete"`` (:class:`CompeteRouter`, CompeteSMoE, Pham et al. 2024 / Nguyen et al. 2025): on a random fraction
  of training steps every expert processes every token and the K with the largest response
  (``mean softplus(output)``) win; a router learns that outcome by distillation and routes every other step and at
  inference.

And one router of its own kind, ``"merge"``:

- ``"smear"`` (:class:`SMEARRouter`, Muqeeth et al. 2023, *Soft Merging of Experts with Adaptive Routing*): per
  example, one expert whose parameters are the routing-weighted mean of all experts' parameters
  (:meth:`GroupedExperts.forward_merged`); no pairs, so no dispatch backend.

The method cards are in ``docs/routers.md``.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moezoo.layers.experts import GroupedExperts
from moezoo.layers.losses import router_z_loss
from moezoo.layers.routers import (
    Router,
    RoutingResult,
    Side,
    SparseRouter,
    TopKRouter,
    check_bool,
    check_int,
    check_non_negative,
    check_number,
    check_positive,
    check_top_k,
    flat_pairs,
    register_router,
)


def _checked_experts(router: Router, experts: GroupedExperts | None) -> GroupedExperts:
    if experts is None:
        raise ValueError(
            f"{type(router).__name__} reads its layer's expert weights: call it through MoE (MoE.route) or pass "
            "experts=<the layer's GroupedExperts>"
        )
    if not isinstance(experts, GroupedExperts):
        raise TypeError(f"experts must be a GroupedExperts, got {type(experts).__name__}")
    if experts.num_experts != router.num_experts or experts.dim != router.dim:
        raise ValueError(
            f"experts has num_experts={experts.num_experts}, dim={experts.dim}; {type(router).__name__} was built "
            f"for num_experts={router.num_experts}, dim={router.dim}"
        )
    return experts


def activation_norms(x_TD: Tensor, experts: GroupedExperts) -> Tensor:
    """``||x_t W_g^e + b_g^e||_2`` for every token t and expert e, ``(T, E)`` in fp32 (with gradients to ``x`` and
    the expert weights)."""
    w_EDF, b_EF = experts.gate_projection()
    with torch.autocast(device_type=x_TD.device.type, enabled=False):
        h_TEF = torch.einsum("td,edf->tef", x_TD.float(), w_EDF.float())
        if b_EF is not None:
            h_TEF = h_TEF + b_EF.float()
        return torch.linalg.vector_norm(h_TEF, dim=-1)


class AutonomyRouter(SparseRouter):
    """Autonomy-of-Experts (AoE): experts select themselves by the norms of their own internal activations.

    ``n_te = ||x_t W_g^e + b_g^e||``, ``p_t = softmax(n_t)``; the K experts of largest norm are chosen (ties to the
    lower index) and their gates are ``p_te`` (renormalised over the K with ``normalize``, by default for K > 1).
    There are no router parameters: the gradients of the gates reach the experts' ``W_g`` (and the input). Losses:
    the Switch balance loss on ``p`` (``balance_coef``) and the z-loss of the norms (``z_loss_coef``).
    """

    batch_dependent: ClassVar[bool] = False
    reads_experts: ClassVar[bool] = True

    def __init__(
        self,
        dim: int,
        num_experts: int,
        top_k: int = 2,
        normalize: bool | None = None,
        balance_coef: float = 0.01,
        z_loss_coef: float = 0.0,
    ) -> None:
        AutonomyRouter.check_options(
            num_experts, dict(top_k=top_k, normalize=normalize, balance_coef=balance_coef, z_loss_coef=z_loss_coef)
        )
        super().__init__(dim, num_experts, balance_coef, z_loss_coef)
        del self.gate  # the experts are the router
        self.top_k = top_k
        self.normalize = top_k > 1 if normalize is None else normalize

    @classmethod
    def check_options(cls, num_experts: int | None, options: Mapping[str, Any]) -> None:
        super().check_options(num_experts, options)
        check_top_k(options["top_k"], num_experts)
        check_bool("normalize", options["normalize"], allow_none=True)

    def forward(self, x_TD: Tensor, side: Side | None = None, experts: GroupedExperts | None = None) -> RoutingResult:
        norms_TE = activation_norms(x_TD, _checked_experts(self, experts))
        probs_TE = torch.softmax(norms_TE, dim=-1)
        top_p_TK, top_idx_TK = probs_TE.topk(self.top_k, dim=-1)
        if self.normalize:
            top_p_TK = top_p_TK / top_p_TK.sum(-1, keepdim=True)
        losses = self.common_losses(norms_TE, probs_TE, top_idx_TK.reshape(-1), self.top_k)
        token_idx_N, expert_idx_N, gate_N = flat_pairs(top_idx_TK, top_p_TK)
        return RoutingResult(
            token_idx_N, expert_idx_N, gate_N, x_TD.shape[0], self.num_experts, probs_TE.detach(), losses
        )


def erc_noise_bound(router_ED: Tensor) -> Tensor:
    """``eps_i = min_{j != i} ||R_i - R_j|| / (2 ||R_i||)``, at most 1 (and 0 with one expert), detached: the
    largest multiplicative noise that keeps proxy token i nearer its own router row than the nearest other row."""
    r = router_ED.detach().float()
    num = r.shape[0]
    dist_EE = torch.cdist(r, r).masked_fill(torch.eye(num, dtype=torch.bool, device=r.device), float("inf"))
    nearest_E = dist_EE.min(-1).values if num > 1 else r.new_zeros(num)
    return (nearest_E / (2 * torch.linalg.vector_norm(r, dim=-1)).clamp_min(1e-12)).clamp(0.0, 1.0)


def erc_loss(router_ED: Tensor, experts: GroupedExperts, alpha: float, noise_ED: Tensor | None = None) -> Tensor:
    """The expert-router coupling loss.

    Proxy tokens ``P_i = R_i * noise_i`` (router row i, elementwise noise; ``None``: no noise); ``M_ij`` the
    activation norm of proxy i in expert j (:func:`activation_norms`). Penalise, for every ``j != i``, expert j
    reacting to proxy i more than ``alpha`` times expert i does, and expert i reacting to proxy j more than
    ``alpha`` times it reacts to its own: ``sum_{i != j} relu(M_ij - alpha M_ii) + relu(M_ji - alpha M_ii)``,
    divided by E^2.
    """
    proxy_ED = router_ED.float() if noise_ED is None else router_ED.float() * noise_ED
    m_EE = activation_norms(proxy_ED, experts)
    num = m_EE.shape[0]
    own_E1 = alpha * m_EE.diagonal().unsqueeze(-1)
    off_EE = ~torch.eye(num, dtype=torch.bool, device=m_EE.device)
    excess = F.relu(m_EE - own_E1) + F.relu(m_EE.t() - own_E1)
    return (excess * off_EE).sum() / (num * num)


class ERCRouter(TopKRouter):
    """Top-k routing with the expert-router coupling (ERC) loss: each router row ``R_e`` (``gate.weight``) is a
    proxy token for the tokens routed to expert e; in training it is perturbed by multiplicative uniform noise
    ``U(1 - eps_e, 1 + eps_e)`` per entry (:func:`erc_noise_bound`) and :func:`erc_loss` (weight ``erc_coef``, margin
    ``alpha``) pushes each expert to react most to its own proxy and each proxy to excite its own expert most. At
    evaluation the loss uses the clean rows. Routing itself is :class:`TopKRouter` with all its options (null
    experts have no weights and no proxy)."""

    batch_dependent: ClassVar[bool] = False
    reads_experts: ClassVar[bool] = True

    def __init__(self, dim: int, num_experts: int, erc_coef: float = 1.0, alpha: float = 1.0, **kwargs: Any) -> None:
        ERCRouter._check_own(erc_coef, alpha)
        super().__init__(dim, num_experts, **kwargs)
        self.erc_coef = erc_coef
        self.alpha = alpha

    @staticmethod
    def _check_own(erc_coef: object, alpha: object) -> None:
        check_positive("erc_coef", erc_coef)
        check_number("alpha", alpha, low=0.0, strict=True)
        assert isinstance(alpha, (int, float))
        if alpha > 1:
            raise ValueError(f"alpha must be a finite number in (0, 1], got {alpha!r}")

    @classmethod
    def check_options(cls, num_experts: int | None, options: Mapping[str, Any]) -> None:
        super().check_options(num_experts, options)
        cls._check_own(options["erc_coef"], options["alpha"])

    def forward(self, x_TD: Tensor, side: Side | None = None, experts: GroupedExperts | None = None) -> RoutingResult:
        experts = _checked_experts(self, experts)
        result = super().forward(x_TD, side)
        router_ED = self.gate.weight[: self.num_experts]
        noise_ED = None
        if self.training:
            eps_E1 = erc_noise_bound(router_ED).unsqueeze(-1)
            noise_ED = 1.0 + eps_E1 * (2.0 * torch.rand(router_ED.shape, device=router_ED.device) - 1.0)
        result.losses["erc"] = self.erc_coef * erc_loss(router_ED, experts, self.alpha, noise_ED)
        return result


@dataclass
class MergeRoutingResult:
    """SMEAR's routing: per group (sample), each expert's weight in the merged expert, ``(G, E)``, rows summing to 1."""

    weights_GE: Tensor
    num_experts: int
    losses: dict[str, Tensor] = field(default_factory=dict)


class SMEARRouter(Router):
    """SMEAR (Muqeeth et al. 2023, *Soft Merging of Experts with Adaptive Routing*): per example, routing weights
    ``p = softmax(W mean_l x_l)`` from the mean of the example's (unmasked) tokens, and one *merged* expert whose
    parameters are ``sum_e p_e theta_e`` (every weight and bias of :class:`GroupedExperts`) processes all of its
    tokens. Fully differentiable, no discrete choice, no balance loss needed (every expert gets gradients).

    ``kind == "merge"``: ``forward(x_GLD, mask_GL) -> MergeRoutingResult``; the MoE layer groups tokens as for
    Soft MoE (the last-but-one axis is the example's tokens) and runs :meth:`GroupedExperts.forward_merged`, a
    dense batched matmul with no pairs, so the layer's ``backend`` (which dispatches pairs) does not apply. The
    merged expert has one expert's width: the layer's ``active_ffn_dim`` is ``ffn_dim`` whatever ``top_k``
    (accepted, in ``[1, num_experts]``, so that every router takes the layer's ``top_k``; it changes nothing).
    """

    kind: ClassVar[Literal["merge"]] = "merge"
    batch_dependent: ClassVar[bool] = False  # per example

    def __init__(self, dim: int, num_experts: int, top_k: int = 1, z_loss_coef: float = 0.0) -> None:
        SMEARRouter.check_options(num_experts, dict(top_k=top_k, z_loss_coef=z_loss_coef))
        super().__init__(dim, num_experts, balance_coef=0.0, z_loss_coef=z_loss_coef)
        self.top_k = top_k

    @classmethod
    def check_options(cls, num_experts: int | None, options: Mapping[str, Any]) -> None:
        super().check_options(num_experts, options)
        check_top_k(options["top_k"], num_experts)

    def forward(self, x_GLD: Tensor, mask_GL: Tensor | None = None) -> MergeRoutingResult:
        x = x_GLD.float()
        if mask_GL is None:
            mean_GD = x.mean(1)
        else:
            keep_GL1 = mask_GL.unsqueeze(-1).to(x.dtype)
            mean_GD = (x * keep_GL1).sum(1) / keep_GL1.sum(1).clamp_min(1.0)
        logits_GE = self.logits(mean_GD)
        losses: dict[str, Tensor] = {}
        if self.z_loss_coef > 0:
            losses["z_loss"] = self.z_loss_coef * router_z_loss(logits_GE)
        return MergeRoutingResult(torch.softmax(logits_GE, dim=-1), self.num_experts, losses)


def competition_scores(x_TD: Tensor, experts: GroupedExperts) -> Tensor:
    """CompeteSMoE's neural response: ``s_te = mean_d softplus(y_e(x_t)_d)`` over the output of every expert e (its
    full forward, biases included) for every token t, ``(T, E)`` in fp32, with gradients to ``x`` and every expert
    parameter. Costs one dense pass of all E experts over all T tokens."""
    num_tokens = x_TD.shape[0]
    y_ETD = experts.forward_dense(x_TD.unsqueeze(0).expand(experts.num_experts, num_tokens, x_TD.shape[-1]))
    with torch.autocast(device_type=x_TD.device.type, enabled=False):
        return F.softplus(y_ETD.float()).mean(-1).t()


def competition_step(step: int, warmup_steps: int, compete_prob: float, seed: int) -> bool:
    """Whether optimiser step ``step`` is a competition step: after ``warmup_steps``, a draw of probability
    ``compete_prob`` that depends only on ``(seed, step)`` (so a restored checkpoint draws the same steps again)."""
    if step < warmup_steps or compete_prob <= 0.0:
        return False
    return random.Random((seed << 32) + step).random() < compete_prob


def _refresh_after_load(module: nn.Module, incompatible_keys: Any) -> None:
    """After ``load_state_dict``: the restored ``step`` decides whether the next step competes."""
    assert isinstance(module, CompeteRouter)
    module._refresh_schedule()


class CompeteRouter(SparseRouter):
    """CompeteSMoE (Pham et al. 2024; Nguyen et al. 2025, *CompeteSMoE: Statistically Guaranteed Mixture of Experts
    Training via Competition*): the experts' own responses decide, and a router learns to predict them.

    - *Competition* (a training step drawn with probability ``compete_prob`` after ``warmup_steps``): every expert
      processes every token, its neural response is ``s_te = mean_d softplus(y_e(x_t))``
      (:func:`competition_scores`); the K experts of largest response win, with gates ``s_te / sum_chosen s``.
      The gates' gradients reach every winning expert's parameters through its response. Losses: the Switch
      balance loss on ``softmax(s)`` (so the balance pressure acts on the experts) and ``distill``:
      ``distill_coef * mean_te (softmax(x W)_te - softmax(s)_te)^2``, the router learning the competition's outcome
      (``softmax(s)`` detached).
    - *Router policy* (every other training step, and evaluation): softmax top-k of the router's logits ``x W``,
      gates renormalised over the K chosen; the Switch balance loss on ``softmax(x W)``; ``distill`` is 0.

    The z-loss (``z_loss_coef``) is the router logits' in both. The step is the buffer ``step`` (advanced by
    :meth:`update_state`); which steps compete depends only on ``(seed, step)`` (:func:`competition_step`), so all
    layers built with the same ``seed`` compete on the same steps and a checkpoint resumes the same draws.
    A competition step's experts cost ``E + K`` passes per token instead of K (the dense competition, then the
    chosen pairs through the layer's backend like any other router's); the paper's diversity loss between the
    chosen experts' outputs and its spreading of competition steps across layers are not implemented.
    """

    batch_dependent: ClassVar[bool] = False
    reads_experts: ClassVar[bool] = True
    step: Tensor

    def __init__(
        self,
        dim: int,
        num_experts: int,
        top_k: int = 2,
        compete_prob: float = 0.1,
        warmup_steps: int = 0,
        distill_coef: float = 1.0,
        seed: int = 0,
        balance_coef: float = 0.01,
        z_loss_coef: float = 0.0,
    ) -> None:
        CompeteRouter.check_options(
            num_experts,
            dict(
                top_k=top_k,
                compete_prob=compete_prob,
                warmup_steps=warmup_steps,
                distill_coef=distill_coef,
                seed=seed,
                balance_coef=balance_coef,
                z_loss_coef=z_loss_coef,
            ),
        )
        super().__init__(dim, num_experts, balance_coef, z_loss_coef)
        self.top_k = top_k
        self.compete_prob = float(compete_prob)
        self.warmup_steps = warmup_steps
        self.distill_coef = distill_coef
        self.seed = seed
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))
        # A host-side mirror of "this step competes", refreshed with the step (update_state, load_state_dict), so
        # that the forward branches on a Python bool: no host sync, and torch.compile guards on it.
        self._competes = competition_step(0, warmup_steps, self.compete_prob, seed)
        self.register_load_state_dict_post_hook(_refresh_after_load)

    @classmethod
    def check_options(cls, num_experts: int | None, options: Mapping[str, Any]) -> None:
        super().check_options(num_experts, options)
        check_top_k(options["top_k"], num_experts)
        check_number("compete_prob", options["compete_prob"], low=0.0, strict=False)
        if options["compete_prob"] > 1:
            raise ValueError(f"compete_prob must be a finite number in [0, 1], got {options['compete_prob']!r}")
        check_int("warmup_steps", options["warmup_steps"], 0)
        check_non_negative("distill_coef", options["distill_coef"])
        check_int("seed", options["seed"], 0)

    def _refresh_schedule(self) -> None:
        self._competes = competition_step(int(self.step), self.warmup_steps, self.compete_prob, self.seed)

    @property
    def competes(self) -> bool:
        """Whether the next training forward is a competition step (evaluation always uses the router)."""
        return self._competes

    def forward(self, x_TD: Tensor, side: Side | None = None, experts: GroupedExperts | None = None) -> RoutingResult:
        experts = _checked_experts(self, experts)
        logits_TE = self.logits(x_TD)
        router_probs_TE = torch.softmax(logits_TE, dim=-1)
        losses: dict[str, Tensor] = {}
        if self.training and self._competes:
            scores_TE = competition_scores(x_TD, experts)
            probs_TE = torch.softmax(scores_TE, dim=-1)
            top_s_TK, top_idx_TK = scores_TE.topk(self.top_k, dim=-1)
            gates_TK = top_s_TK / top_s_TK.sum(-1, keepdim=True)
            distill = (router_probs_TE - probs_TE.detach()).square().mean()
        else:
            probs_TE = router_probs_TE
            top_p_TK, top_idx_TK = router_probs_TE.topk(self.top_k, dim=-1)
            gates_TK = top_p_TK / top_p_TK.sum(-1, keepdim=True)
            distill = logits_TE.new_zeros(())
        if self.training:
            losses["distill"] = self.distill_coef * distill
        losses.update(self.common_losses(logits_TE, probs_TE, top_idx_TK.reshape(-1), self.top_k))
        token_idx_N, expert_idx_N, gate_N = flat_pairs(top_idx_TK, gates_TK)
        return RoutingResult(
            token_idx_N, expert_idx_N, gate_N, x_TD.shape[0], self.num_experts, probs_TE.detach(), losses
        )

    @torch.no_grad()
    def update_state(self) -> None:
        """One optimiser step: advance ``step`` and draw whether the next one competes."""
        if self.training:
            self.step += 1
            self._refresh_schedule()


EXPERT_ROUTERS: dict[str, type[Router]] = {
    "aoe": AutonomyRouter,
    "erc": ERCRouter,
    "compete": CompeteRouter,
    "smear": SMEARRouter,
}

for _name, _cls in EXPERT_ROUTERS.items():
    register_router(_name, _cls)
