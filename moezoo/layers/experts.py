"""Expert weights and the dense feed-forward blocks they are compared with.

Legend: D model dim, F expert hidden, H = F (plain activations) or 2F (gated: SwiGLU, GEGLU, ReGLU), E experts,
M rows per expert.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from moezoo.ops import expert_ffn, hidden_width
from moezoo.ops.activations import act_forward, check_activation


def _init_uniform(weight: Tensor, fan_in: int) -> None:
    bound = 1.0 / math.sqrt(fan_in)
    nn.init.uniform_(weight, -bound, bound)


def _check_bias(bias: bool) -> bool:
    if not isinstance(bias, bool):
        raise TypeError(f"bias must be a bool, got {bias!r}")
    return bias


class GroupedExperts(nn.Module):
    """E feed-forward experts with stacked weights ``w_in (E, D, H)`` and ``w_out (E, F, D)``, and with
    ``bias=True`` biases ``b_in (E, H)`` and ``b_out (E, D)`` (initialised like ``nn.Linear``'s)."""

    def __init__(self, num_experts: int, dim: int, ffn_dim: int, activation: str = "gelu", bias: bool = False) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.dim = dim
        self.ffn_dim = ffn_dim
        self.activation = check_activation(activation)
        hidden = hidden_width(activation, ffn_dim)
        self.w_in = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.w_out = nn.Parameter(torch.empty(num_experts, ffn_dim, dim))
        _init_uniform(self.w_in, dim)
        _init_uniform(self.w_out, ffn_dim)
        self.b_in: nn.Parameter | None = None
        self.b_out: nn.Parameter | None = None
        if _check_bias(bias):
            self.b_in = nn.Parameter(torch.empty(num_experts, hidden))
            self.b_out = nn.Parameter(torch.empty(num_experts, dim))
            _init_uniform(self.b_in, dim)
            _init_uniform(self.b_out, ffn_dim)

    @property
    def bias(self) -> bool:
        return self.b_in is not None

    def gate_projection(self) -> tuple[Tensor, Tensor | None]:
        """The projection whose output feeds the activation: ``(W_g (E, D, F), b_g (E, F) or None)``, the gate half
        of ``w_in`` (and ``b_in``) for the gated forms (SwiGLU, GEGLU, ReGLU), all of it otherwise. Views, with
        gradients: routers that read the experts (``Router.reads_experts``) rank experts by its output's norm."""
        if self.w_in.shape[-1] == self.ffn_dim:
            return self.w_in, self.b_in
        return self.w_in[..., : self.ffn_dim], None if self.b_in is None else self.b_in[..., : self.ffn_dim]

    def forward(
        self, x_TD: Tensor, token_idx_N: Tensor, expert_idx_N: Tensor, gate_N: Tensor, backend: str | None = None
    ) -> Tensor:
        """Routed computation: ``out[t] = sum over pairs of gate * expert(x[t])``."""
        return expert_ffn(
            x_TD,
            token_idx_N,
            expert_idx_N,
            gate_N,
            self.w_in,
            self.w_out,
            self.activation,
            backend=backend,
            b_in_EH=self.b_in,
            b_out_ED=self.b_out,
        )

    def forward_dense(self, x_EMD: Tensor) -> Tensor:
        """Every expert on its own batch of rows (Soft MoE slots): ``(E, M, D) -> (E, M, D)``."""
        h_EMH = torch.bmm(x_EMD, self.w_in)
        if self.b_in is not None:
            h_EMH = h_EMH + self.b_in.unsqueeze(1)
        y_EMD = torch.bmm(act_forward(h_EMH, self.activation), self.w_out)
        return y_EMD + self.b_out.unsqueeze(1) if self.b_out is not None else y_EMD

    def forward_merged(self, x_GLD: Tensor, weights_GE: Tensor) -> Tensor:
        """SMEAR: each group's rows through one expert whose every weight and bias is the ``weights_GE``-weighted
        sum of the experts' (``(G, L, D), (G, E) -> (G, L, D)``)."""
        w = weights_GE.to(x_GLD.dtype)
        h_GLH = torch.bmm(x_GLD, torch.einsum("ge,edh->gdh", w, self.w_in))
        if self.b_in is not None:
            h_GLH = h_GLH + (w @ self.b_in).unsqueeze(1)
        y_GLD = torch.bmm(act_forward(h_GLH, self.activation), torch.einsum("ge,efd->gfd", w, self.w_out))
        return y_GLD + (w @ self.b_out).unsqueeze(1) if self.b_out is not None else y_GLD


class FeedForward(nn.Module):
    """A dense FFN ``act(x W_in + b_in) W_out + b_out`` (biases with ``bias=True``): the dense twin of an MoE and
    the shared expert."""

    def __init__(self, dim: int, hidden_dim: int, activation: str = "gelu", bias: bool = False) -> None:
        super().__init__()
        self.activation = check_activation(activation)
        self.hidden_dim = hidden_dim
        bias = _check_bias(bias)
        self.fc_in = nn.Linear(dim, hidden_width(activation, hidden_dim), bias=bias)
        self.fc_out = nn.Linear(hidden_dim, dim, bias=bias)
        _init_uniform(self.fc_in.weight, dim)
        _init_uniform(self.fc_out.weight, hidden_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc_out(act_forward(self.fc_in(x), self.activation))
