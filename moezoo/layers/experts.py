"""Expert weights and the dense feed-forward blocks they are compared with.

Legend: D model dim, F expert hidden, H = F (GELU) or 2F (SwiGLU), E experts, M rows per expert.
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


class GroupedExperts(nn.Module):
    """E feed-forward experts with stacked weights ``w_in (E, D, H)`` and ``w_out (E, F, D)``, no biases."""

    def __init__(self, num_experts: int, dim: int, ffn_dim: int, activation: str = "gelu") -> None:
        super().__init__()
        self.num_experts = num_experts
        self.dim = dim
        self.ffn_dim = ffn_dim
        self.activation = check_activation(activation)
        self.w_in = nn.Parameter(torch.empty(num_experts, dim, hidden_width(activation, ffn_dim)))
        self.w_out = nn.Parameter(torch.empty(num_experts, ffn_dim, dim))
        _init_uniform(self.w_in, dim)
        _init_uniform(self.w_out, ffn_dim)

    def forward(
        self, x_TD: Tensor, token_idx_N: Tensor, expert_idx_N: Tensor, gate_N: Tensor, backend: str | None = None
    ) -> Tensor:
        """Routed computation: ``out[t] = sum over pairs of gate * expert(x[t])``."""
        return expert_ffn(
            x_TD, token_idx_N, expert_idx_N, gate_N, self.w_in, self.w_out, self.activation, backend=backend
        )

    def forward_dense(self, x_EMD: Tensor) -> Tensor:
        """Every expert on its own batch of rows (Soft MoE slots): ``(E, M, D) -> (E, M, D)``."""
        return torch.bmm(act_forward(torch.bmm(x_EMD, self.w_in), self.activation), self.w_out)


class FeedForward(nn.Module):
    """A dense FFN ``act(x W_in) W_out`` without biases: the dense twin of an MoE and the shared expert."""

    def __init__(self, dim: int, hidden_dim: int, activation: str = "gelu") -> None:
        super().__init__()
        self.activation = check_activation(activation)
        self.hidden_dim = hidden_dim
        self.fc_in = nn.Linear(dim, hidden_width(activation, hidden_dim), bias=False)
        self.fc_out = nn.Linear(hidden_dim, dim, bias=False)
        _init_uniform(self.fc_in.weight, dim)
        _init_uniform(self.fc_out.weight, hidden_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc_out(act_forward(self.fc_in(x), self.activation))
