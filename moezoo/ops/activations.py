"""Expert activations and their hand-written derivatives (used by the fused backward passes).

GELU experts have ``H = F`` pre-activation columns; SwiGLU experts have ``H = 2F``: ``[gate | up]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

ACTIVATIONS = ("gelu", "swiglu")


def check_activation(activation: str) -> str:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation={activation!r} is not supported; choose one of {ACTIVATIONS}")
    return activation


def hidden_width(activation: str, ffn_dim: int) -> int:
    """Width H of the first projection for an expert of hidden size F."""
    return 2 * ffn_dim if check_activation(activation) == "swiglu" else ffn_dim


def act_forward_parts(h_NH: Tensor, activation: str) -> tuple[Tensor | None, Tensor]:
    """``(silu(gate) for SwiGLU else None, activation output)``: the output and the factor its backward reuses."""
    if activation == "gelu":
        return None, F.gelu(h_NH)
    gate, up = h_NH.chunk(2, dim=-1)
    silu_NF = F.silu(gate)
    return silu_NF, silu_NF * up


def act_forward(h_NH: Tensor, activation: str) -> Tensor:
    return act_forward_parts(h_NH, activation)[1]


def act_backward(da_NF: Tensor, h_NH: Tensor, activation: str, silu_NF: Tensor | None = None) -> Tensor:
    """Gradient w.r.t. the pre-activation ``h`` given the gradient ``da`` w.r.t. the activation output.

    ``silu_NF``: ``silu(gate)`` for SwiGLU when the caller has it already (saves one pass).
    """
    if activation == "gelu":
        return torch.ops.aten.gelu_backward(da_NF, h_NH)
    gate, up = h_NH.chunk(2, dim=-1)
    dh_NH = torch.empty_like(h_NH)
    d_gate, d_up = dh_NH.chunk(2, dim=-1)
    torch.mul(da_NF, F.silu(gate) if silu_NF is None else silu_NF, out=d_up)
    torch.mul(da_NF, up, out=d_gate)
    torch.ops.aten.silu_backward.grad_input(d_gate, gate, grad_input=d_gate)
    return dh_NH
