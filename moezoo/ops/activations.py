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


def base_forward(h: Tensor, base: str, out: Tensor | None = None) -> Tensor:
    """``base(h)``, written into ``out`` when given (no autograd through ``out``)."""
    if out is None:
        if base == "gelu":
            return F.gelu(h)
        if base == "gelu_tanh":
            return F.gelu(h, approximate="tanh")
        if base == "silu":
            return F.silu(h)
        return F.relu(h)
    if base in ("gelu", "gelu_tanh"):
        return torch.ops.aten.gelu.out(h, approximate="tanh" if base == "gelu_tanh" else "none", out=out)
    if base == "silu":
        return torch.ops.aten.silu.out(h, out=out)
    return torch.clamp_min(h, 0, out=out)


def base_backward(grad: Tensor, h: Tensor, base: str, out: Tensor | None = None) -> Tensor:
    """Gradient w.r.t. ``h`` of ``base(h)`` given the gradient ``grad`` of its output, written into ``out`` when
    given (``out`` may be ``grad`` itself)."""
    if base in ("gelu", "gelu_tanh"):
        approximate = "tanh" if base == "gelu_tanh" else "none"
        if out is None:
            return torch.ops.aten.gelu_backward(grad, h, approximate=approximate)
        return torch.ops.aten.gelu_backward.grad_input(grad, h, approximate=approximate, grad_input=out)
    if base == "silu":
        if out is None:
            return torch.ops.aten.silu_backward(grad, h)
        return torch.ops.aten.silu_backward.grad_input(grad, h, grad_input=out)
    zero = torch.zeros((), dtype=grad.dtype, device=grad.device)
    return torch.where(h > 0, grad, zero) if out is None else torch.where(h > 0, grad, zero, out=out)


def act_forward_parts(
    h_NH: Tensor, activation: str, out: Tensor | None = None, gate_out: Tensor | None = None
) -> tuple[Tensor | None, Tensor]:
    """``(act(gate) for gated forms else None, activation output)``: the output and the factor its backward
    reuses; written into ``out`` (the output) and ``gate_out`` (``act(gate)``) when given."""
    base, gated = split_activation(activation)
    if not gated:
        return None, base_forward(h_NH, base, out)
    gate, up = h_NH.chunk(2, dim=-1)
    act_gate_NF = base_forward(gate, base, gate_out)
    return act_gate_NF, (act_gate_NF * up if out is None else torch.mul(act_gate_NF, up, out=out))


def act_forward(h_NH: Tensor, activation: str, out: Tensor | None = None) -> Tensor:
    """The activation output; with ``out`` (the fused path, no autograd) written there with no other temporary."""
    if out is None:
        return act_forward_parts(h_NH, activation)[1]
    base, gated = split_activation(activation)
    if not gated:
        return base_forward(h_NH, base, out)
    gate, up = h_NH.chunk(2, dim=-1)
    return base_forward(gate, base, out).mul_(up)


def act_backward(
    da_NF: Tensor,
    h_NH: Tensor,
    activation: str,
    act_gate_NF: Tensor | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """Gradient w.r.t. the pre-activation ``h`` given the gradient ``da`` w.r.t. the activation output, written
    into ``out`` (shaped as ``h``, not aliasing ``da`` or ``h``) when given.

    ``act_gate_NF``: ``act(gate)`` for the gated forms when the caller has it already (saves one pass).
    """
    base, gated = split_activation(activation)
    if not gated:
        return base_backward(da_NF, h_NH, base, out)
    gate, up = h_NH.chunk(2, dim=-1)
    dh_NH = torch.empty_like(h_NH) if out is None else out
    d_gate, d_up = dh_NH.chunk(2, dim=-1)
    torch.mul(da_NF, base_forward(gate, base) if act_gate_NF is None else act_gate_NF, out=d_up)
    torch.mul(da_NF, up, out=d_gate)
    base_backward(d_gate, gate, base, d_gate)
    return dh_NH
