"""The layerwise recurrent router (RMoE: Qiu et al. 2025, *Layerwise Recurrent Router for Mixture-of-Experts*).

Legend: T tokens, D model dim, R routing dim (the GRU's width), E experts, K experts per token.

Layer i's router projects its tokens to R with its own projector, ``x'_i = W_proj,i x`` (no bias), and one GRU cell
*shared by every MoE layer of the model* combines that with the previous MoE layer's GRU output,
``h_i = GRU(x'_i, h_{i-1})`` with ``h_0 = 0``; layer i's own linear gate reads ``h_i`` alone (``logits = W_g,i h_i``)
and the rest is top-k routing (softmax, the K largest, renormalised for K > 1, Switch balance loss). The GRU runs
once per layer and token, never along the sequence, so it adds a small per-token cost. ``h_i`` is not detached:
the paper lets gradients flow through the recurrence, so layer i's losses train every earlier layer's projector and
the shared cell too.

How the state travels (no special case in the layer or the models):

- the router returns ``h_i`` with its pairs as :attr:`RoutingResult.next_state`; the MoE layer puts it, in the
  input's leading shape, on its aux result (:attr:`moezoo.layers.MoEAux.router_state`);
- :func:`moezoo.models.run_ffn` (through which every model family calls its feed-forwards, in layer order, with the
  list of earlier layers' aux results) passes the previous MoE layer's state to the next MoE layer whose router
  ``carries_state``, as the side input :data:`ROUTER_STATE`; the first MoE layer gets none and starts from zeros;
- the class names its shared submodule (``shared_modules = ("cell",)``) and
  :func:`moezoo.models.share_router_modules` gives every layer's router the first layer's cell; the families that
  thread the state declare :data:`ROUTER_STATE` among the side inputs they provide (the others, whose MoE layers
  see different tokens, refuse the router through :meth:`moezoo.models.spec.MoESpec.check_side_inputs`).

Sizes: the paper's GRU is 256 wide on models of width 2048-4096; ``routing_dim`` defaults to 32 here, this
library's choice for its small models. The GRU follows the standard equations (reset, update and candidate gates,
``h = (1 - z) n + z h_prev``, biases on both input and hidden projections) and is computed in fp32 as every router
is. Every :class:`~moezoo.layers.TopKRouter` option is kept; its noise acts on ``h_i`` (the gate's input).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moezoo.layers.routers import ROUTER_STATE, RoutingResult, Side, TopKRouter, check_int, register_router


def gru_cell(x_TR: Tensor, h_TR: Tensor, cell: nn.GRUCell) -> Tensor:
    """One GRU step in fp32 with ``cell``'s weights (gate order reset, update, candidate, as ``nn.GRUCell``)."""
    with torch.autocast(device_type=x_TR.device.type, enabled=False):
        b_ih = cell.bias_ih.float() if cell.bias_ih is not None else None
        b_hh = cell.bias_hh.float() if cell.bias_hh is not None else None
        gi_r, gi_z, gi_n = F.linear(x_TR.float(), cell.weight_ih.float(), b_ih).chunk(3, dim=-1)
        gh_r, gh_z, gh_n = F.linear(h_TR.float(), cell.weight_hh.float(), b_hh).chunk(3, dim=-1)
        reset = torch.sigmoid(gi_r + gh_r)
        update = torch.sigmoid(gi_z + gh_z)
        candidate = torch.tanh(gi_n + reset * gh_n)
        return (1.0 - update) * candidate + update * h_TR.float()


class RecurrentRouter(TopKRouter):
    """RMoE: top-k over ``W_g h_i`` with ``h_i = GRU(W_proj x, h_{i-1})`` (see the module docstring).

    Args:
        dim: model width D.
        num_experts: E.
        routing_dim: R, the projector's output and the GRU's width.
        top_k, balance_coef, ...: as in :class:`TopKRouter`.

    ``side[ROUTER_STATE]`` (per token, ``(..., R)``) is the previous MoE layer's ``h``; without it ``h_0 = 0``.
    """

    batch_dependent: ClassVar[bool] = False  # unless a capacity_factor is set, as for top-k
    side_feature_dims: ClassVar[Mapping[str, int]] = {ROUTER_STATE: 1}
    carries_state: ClassVar[bool] = True
    shared_modules: ClassVar[tuple[str, ...]] = ("cell",)

    def __init__(self, dim: int, num_experts: int, routing_dim: int = 32, **kwargs: Any) -> None:
        check_int("routing_dim", routing_dim, 1)
        check_int("dim", dim, 1)
        super().__init__(routing_dim, num_experts, **kwargs)  # the gate (and a noise gate) read h: (E, R)
        self.dim = dim
        self.routing_dim = routing_dim
        self.proj = nn.Linear(dim, routing_dim, bias=False)
        nn.init.normal_(self.proj.weight, std=dim**-0.5)
        self.cell = nn.GRUCell(routing_dim, routing_dim)

    @classmethod
    def check_options(cls, num_experts: int | None, options: Mapping[str, Any]) -> None:
        super().check_options(num_experts, options)
        check_int("routing_dim", options["routing_dim"], 1)

    def recurrence(self, x_TD: Tensor, side: Side | None = None) -> Tensor:
        """``h_i (T, R)`` from the tokens and the previous layer's state ``side[ROUTER_STATE]`` (zeros without)."""
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            x_TR = F.linear(x_TD.float(), self.proj.weight.float())
        h_prev = None if side is None else side.get(ROUTER_STATE)
        if h_prev is None:
            h_prev = x_TR.new_zeros(x_TR.shape)
        elif h_prev.shape != x_TR.shape:
            raise ValueError(
                f"side input {ROUTER_STATE!r} (the previous MoE layer's router state) must have shape "
                f"(tokens={x_TR.shape[0]}, routing_dim={self.routing_dim}) after expansion, got {tuple(h_prev.shape)}: "
                "every MoE layer of a recurrent-router model must route the same tokens with the same routing_dim"
            )
        return gru_cell(x_TR, h_prev, self.cell)

    def forward(self, x_TD: Tensor, side: Side | None = None) -> RoutingResult:
        if x_TD.shape[-1] != self.dim:
            raise ValueError(f"x must have shape (tokens, dim={self.dim}), got {tuple(x_TD.shape)}")
        h_TR = self.recurrence(x_TD, side)
        routing = super().forward(h_TR)
        routing.next_state = h_TR
        return routing


register_router("recurrent", RecurrentRouter)
