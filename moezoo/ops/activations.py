"""Expert activations and their hand-written derivatives (used by the fused backward passes).

Plain activations (``gelu``, ``gelu_tanh``, ``silu``, ``relu``) have ``H = F`` pre-activation columns. The gated
forms (``swiglu`` = silu-gated, ``geglu`` = gelu-gated, ``reglu`` = relu-gated GLU) have ``H = 2F`` columns
``[gate | up]`` and compute ``act(gate) * up``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

BASE_ACTIVATIONS = ("gelu", "gelu_tanh", "silu", "relu")
GATED_ACTIVATIONS = {"swiglu": "silu", "geglu": "gelu", "reglu": "relu"}
ACTIVATIONS = BASE_ACTIVATIONS + tuple(GATED_ACTIVATIONS)


def check_activation(activation: str) -> str:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation={activation!r} is not supported; choose one of {ACTIVATIONS}")
    return activation


def split_activation(activation: str) -> tuple[str, bool]:
    """``(base activation, gated)``: ``"swiglu" -> ("silu", True)``, ``"gelu" -> ("gelu", False)``."""
    check_activation(activation)
    if activation in GATED_ACTIVATIONS:
        return GATED_ACTIVATIONS[activation], True
    return activation, False


def is_gated(activation: str) -> bool:
    return split_activation(activation)[1]


def hidden_width(activation: str, ffn_dim: int) -> int:
    """Width H of the first projection for an expert of hidden size F."""
    return 2 * ffn_dim if is_gated(activation) else ffn_dim


def base_forward(h: Tensor, base: str) -> Tensor:
    if base == "gelu":
        return F.gelu(h)
    if base == "gelu_tanh":
        return F.gelu(h, approximate="tanh")
    if base == "silu":
        return F.silu(h)
    return F.relu(h)


def base_backward(grad: Tensor, h: Tensor, base: str) -> Tensor:
    """Gradient w.r.t. ``h`` of ``base(h)`` given the gradient ``grad`` of its output."""
    if base == "gelu":
        return torch.ops.aten.gelu_backward(grad, h)
    if base == "gelu_tanh":
        return torch.ops.aten.gelu_backward(grad, h, approximate="tanh")
    if base == "silu":
        return torch.ops.aten.silu_backward(grad, h)
    return torch.where(h > 0, grad, torch.zeros((), dtype=grad.dtype, device=grad.device))


def act_forward_parts(h_NH: Tensor, activation: str) -> tuple[Tensor | None, Tensor]:
    """``(act(gate) for gated forms else None, activation output)``: the output and the factor its backward
    reuses."""
    base, gated = split_activation(activation)
    if not gated:
        return None, base_forward(h_NH, base)
    gate, up = h_NH.chunk(2, dim=-1)
    act_gate_NF = base_forward(gate, base)
    return act_gate_NF, act_gate_NF * up


def act_forward(h_NH: Tensor, activation: str) -> Tensor:
    return act_forward_parts(h_NH, activation)[1]


def act_backward(da_NF: Tensor, h_NH: Tensor, activation: str, act_gate_NF: Tensor | None = None) -> Tensor:
    """Gradient w.r.t. the pre-activation ``h`` given the gradient ``da`` w.r.t. the activation output.

    ``act_gate_NF``: ``act(gate)`` for the gated forms when the caller has it already (saves one pass).
    """
    base, gated = split_activation(activation)
    if not gated:
        return base_backward(da_NF, h_NH, base)
    gate, up = h_NH.chunk(2, dim=-1)
    dh_NH = torch.empty_like(h_NH)
    d_gate, d_up = dh_NH.chunk(2, dim=-1)
    torch.mul(da_NF, base_forward(gate, base) if act_gate_NF is None else act_gate_NF, out=d_up)
    torch.mul(da_NF, up, out=d_gate)
    if base == "silu":
        torch.ops.aten.silu_backward.grad_input(d_gate, gate, grad_input=d_gate)
    else:
        d_gate.copy_(base_backward(d_gate, gate, base))
    return dh_NH
