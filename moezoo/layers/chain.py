"""Chain-of-Experts (Wang et al. 2025, *Chain-of-Experts: Unlocking the Communication Power of Mixture-of-Experts
Models*): the experts of one layer applied C times in sequence, each iteration re-routed by its own router.

Legend: T tokens, D model dim, F expert hidden, E experts, K experts per token and iteration, C iterations.

With ``x^(0) = x`` (the layer's input) and ``MoE_t`` the layer's experts (and shared expert) routed by the router of
iteration t::

    x^(t) = MoE_t(x^(t-1)) + x^(t-1)        (inner residual, the paper's default)
    x^(t) = MoE_t(x^(t-1))                  (inner_residual=False)

The layer returns what it adds to the residual stream, like :class:`~moezoo.layers.MoE`: ``x^(C) - x`` with the
inner residual (accumulated as ``sum_t MoE_t(x^(t-1))``, not by subtraction), ``x^(C)`` without; the block adds
its own residual. A chain of one iteration is therefore exactly the MoE layer. Each iteration routes K experts per
token (the paper keeps compute by routing K/C per iteration: a chain of 2 at ``top_k: 1`` costs what top-2 does),
so the active FFN width is ``C * K * F`` (plus C times the shared experts).

It is a :class:`~moezoo.layers.MoE` (one per block: the models, the statistics and the tasks see one MoE layer) that
owns ``C - 1`` more routers, built by name with the same options. The first pass is ``MoE.forward`` itself (input
checks, side inputs, evaluation warnings); each later one is the layer's own pairs path (``MoE._forward_sparse``)
with that pass's router, so every sparse router and backend works unchanged; Soft MoE
and SMEAR have no pairs to chain and are refused. The iterations' losses are summed by name; the statistics are
the layer's over all iterations (pairs per expert summed, dropped fraction and entropy averaged); ``aux.routing`` is
the first iteration's routing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from moezoo.layers.losses import load_cv
from moezoo.layers.moe import MoE, MoEAux
from moezoo.layers.routers import Router, check_bool, check_int, get_router


class ChainOfExperts(MoE):
    """An MoE layer whose experts run ``num_iterations`` times in sequence, each iteration with its own router.

    Args:
        num_iterations: C, the iterations (1 is the plain MoE layer).
        inner_residual: ``x^(t) = MoE_t(x^(t-1)) + x^(t-1)`` (True) or ``MoE_t(x^(t-1))``.
        router: a registered *sparse* router name; each iteration gets its own instance with ``router_kwargs``.
        Every other argument is :class:`~moezoo.layers.MoE`'s; ``top_k`` is per iteration.
    """

    def __init__(
        self,
        dim: int,
        ffn_dim: int,
        num_experts: int = 8,
        top_k: int = 2,
        num_iterations: int = 2,
        inner_residual: bool = True,
        router: str = "topk",
        router_kwargs: Mapping[str, Any] | None = None,
        **moe_kwargs: Any,
    ) -> None:
        check_int("num_iterations", num_iterations, 1)
        check_bool("inner_residual", inner_residual)
        if not isinstance(router, str):
            raise TypeError(
                "ChainOfExperts builds one router per iteration: router must be a registered router name, got "
                f"{type(router).__name__}"
            )
        super().__init__(dim, ffn_dim, num_experts, top_k, router, router_kwargs, **moe_kwargs)
        if self.router.kind != "sparse":
            raise ValueError(
                f"ChainOfExperts chains the pairs path: router must be a sparse router, got {router!r} "
                f"(kind {self.router.kind!r}, which has no pairs)"
            )
        self.num_iterations = num_iterations
        self.inner_residual = inner_residual
        kwargs = dict(router_kwargs or {})
        self.chain_routers = nn.ModuleList(
            get_router(router, dim, self.num_experts, top_k=self.top_k, **kwargs) for _ in range(num_iterations - 1)
        )

    @property
    def routers(self) -> list[Router]:
        """The routers of iterations 1..C (the first is the layer's own ``router``)."""
        return [self.router, *self.chain_routers]  # type: ignore[list-item]

    @property
    def active_ffn_dim(self) -> int:
        """C times the MoE layer's: each iteration runs K experts (and the shared experts) on every token."""
        return self.num_iterations * super().active_ffn_dim

    def forward(
        self, x: Tensor, mask: Tensor | None = None, side: Mapping[str, Tensor] | None = None
    ) -> tuple[Tensor, MoEAux]:
        """``x (..., D)`` -> ``(y (..., D), aux)``: ``y = x^(C) - x`` with the inner residual, ``x^(C)`` without.
        The first pass is :meth:`MoE.forward` itself (its input checks, side inputs and evaluation warnings); the
        others are its pairs path with their own routers."""
        out, aux = super().forward(x, mask, side)
        auxes = [aux]
        total = out
        h = x + out if self.inner_residual else out
        for router in self.chain_routers:
            assert isinstance(router, Router)
            out, aux = self._forward_sparse(h, mask, side, router)
            auxes.append(aux)
            if self.inner_residual:
                total = total + out
                h = h + out
            else:
                h = out
        return (total if self.inner_residual else h), merge_aux(auxes)


def merge_aux(auxes: list[MoEAux], experts: str = "shared") -> MoEAux:
    """One aux for several routed passes of one layer: losses summed by name, the dropped fraction and entropy averaged
    over passes, ``routing`` (and a carried router state) the first pass's. ``experts="shared"``: the passes route over
    the same experts (Chain-of-Experts, S2MoE's two inputs), pairs per expert summed; ``"separate"``: each pass has
    its own experts (CartesianMoE's sub-layers), the per-expert counts concatenated in pass order."""
    assert experts in ("shared", "separate")
    losses: dict[str, Tensor] = {}
    for aux in auxes:
        for name, value in aux.losses.items():
            losses[name] = losses[name] + value if name in losses else value
    with torch.no_grad():
        counts = [a.tokens_per_expert_E for a in auxes]
        tokens_per_expert = torch.stack(counts).sum(0) if experts == "shared" else torch.cat(counts)
        dropped = torch.stack([a.dropped_frac for a in auxes]).mean()
        entropy = torch.stack([a.router_entropy for a in auxes]).mean()
    return MoEAux(
        losses=losses,
        tokens_per_expert_E=tokens_per_expert,
        dropped_frac=dropped,
        router_entropy=entropy,
        expert_load_cv=load_cv(tokens_per_expert),
        num_tokens=auxes[0].num_tokens,
        routing=auxes[0].routing,
        router_state=auxes[0].router_state,
    )
