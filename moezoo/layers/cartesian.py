"""CartesianMoE (Su et al. 2025, *CartesianMoE: Boosting Knowledge Sharing among Experts via Cartesian Product
Routing in Mixture-of-Experts*): two sub-layers of experts, A and B, each routing the token top-k on its own; the
effective expert of a token is the composition ``B_j(A_i(x))``, one of the E x E "Cartesian product" experts, so
every B expert is shared by all A experts and the other way round ("multiplication", where shared experts add).

Legend: T tokens, D model dim, F expert hidden, E experts per sub-layer, K experts per token and sub-layer.

With the layer's input ``x`` (the block's normalised token)::

    h   = x + MoE_A(x)                  (inner_residual; h = MoE_A(x) without)
    y   = MoE_A(x) + MoE_B(LN(h))       (inner_residual; y = MoE_B(LN(h)) without; LN only with inner_norm)

The layer returns what it adds to the residual stream, like :class:`~moezoo.layers.MoE`, so ``y = h' - x`` with
``h' = h + MoE_B(LN(h))``. This is the paper's pair of sub-layers (each with a residual and a layer norm) written for a
pre-norm block; without the residual and the norm, a token routed top-1 in each gets exactly
``g_B B_j(g_A A_i(x))``. Each sub-layer may have shared experts (``num_shared_experts``), as in the paper.

Compute: the layer's expert width F is split between the sub-layers, A's and B's experts being F/2 wide, so K experts
in each is top-k's active width (``K * F``) *and* top-k's total expert parameters (2 x E experts of F/2); routing
costs two gates. Why a layer option, not a router: B reads A's output, which no single list of (token, expert, gate)
pairs can express; each sub-layer is an ordinary :class:`~moezoo.layers.MoE` on the pairs path, so every sparse
router and backend works unchanged (A is this layer's own pass through ``MoE.forward``, B a second MoE, ``sub_b``).
B being a nested MoE, whatever walks a model's MoE layers (expert parallelism, pruning, calibration, parameter
counts) treats it as the MoE layer it is: a CartesianMoE block holds two MoE modules.

Statistics: the per-expert counts are A's E then B's E (2E entries), the dropped fraction and entropy averaged over
the two sub-layers, the losses summed by name (:func:`moezoo.layers.chain.merge_aux`); ``aux.routing`` is A's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from moezoo.layers.chain import merge_aux
from moezoo.layers.moe import MoE, MoEAux, register_moe_layer
from moezoo.layers.routers import check_bool, check_int


class CartesianMoE(MoE):
    """Two routed sub-layers A then B with experts of width ``ffn_dim / 2`` each (see the module docstring).

    Args:
        ffn_dim: F, split between the sub-layers: must be even (and divisible by ``2 * granularity``).
        inner_residual: ``h = x + MoE_A(x)`` (True, the paper's) or ``MoE_A(x)``.
        inner_norm: a LayerNorm on ``h`` before B (True, the paper's).
        router: a registered *sparse* router name; A and B each get an instance with ``router_kwargs``.
        Every other argument is :class:`~moezoo.layers.MoE`'s, for both sub-layers; ``top_k`` is per sub-layer.
    """

    def __init__(
        self,
        dim: int,
        ffn_dim: int,
        num_experts: int = 8,
        top_k: int = 2,
        inner_residual: bool = True,
        inner_norm: bool = True,
        router: str = "topk",
        router_kwargs: Mapping[str, Any] | None = None,
        **moe_kwargs: Any,
    ) -> None:
        check_int("ffn_dim", ffn_dim, 2)
        if ffn_dim % 2:
            raise ValueError(f"CartesianMoE splits ffn_dim between its two sub-layers: it must be even, got {ffn_dim}")
        check_bool("inner_residual", inner_residual)
        check_bool("inner_norm", inner_norm)
        if not isinstance(router, str):
            raise TypeError(f"CartesianMoE: router must be a registered router name, got {type(router).__name__}")
        super().__init__(dim, ffn_dim // 2, num_experts, top_k, router, router_kwargs, **moe_kwargs)
        if self.router.kind != "sparse" or self.router.carries_state:
            raise ValueError(
                "CartesianMoE composes two pairs-path sub-layers: router must be a sparse router that carries no "
                f"state from layer to layer, got {router!r}"
            )
        self.inner_residual = inner_residual
        self.sub_b = MoE(dim, ffn_dim // 2, num_experts, top_k, router, router_kwargs, **moe_kwargs)
        self.norm = nn.LayerNorm(dim) if inner_norm else None

    @property
    def active_ffn_dim(self) -> int:
        """A's and B's: K experts of F/2 (and the shared experts of F/2) in each, i.e. the MoE layer's of width F."""
        return super().active_ffn_dim + self.sub_b.active_ffn_dim

    def forward(
        self, x: Tensor, mask: Tensor | None = None, side: Mapping[str, Tensor] | None = None
    ) -> tuple[Tensor, MoEAux]:
        """``x (..., D)`` -> ``(y (..., D), aux)``: A through :meth:`MoE.forward` (its checks), then B on ``LN(h)``."""
        out_a, aux_a = super().forward(x, mask, side)
        h = x + out_a if self.inner_residual else out_a
        out_b, aux_b = self.sub_b(self.norm(h) if self.norm is not None else h, mask, side)
        y = out_a + out_b if self.inner_residual else out_b
        return y, merge_aux([aux_a, aux_b], experts="separate")


register_moe_layer("cartesian", CartesianMoE)
