"""The Triton backend of ``expert_ffn``: the kernels of ``moezoo.kernels`` as ``torch.library`` custom ops.

Legend: T tokens, D model dim, F expert hidden, H = F (GELU) or 2F (SwiGLU), E experts, K experts per token,
N routed pairs, B row blocks, P = B * block_m padded slots.

Every op has a fake (meta) implementation whose output shapes depend on input shapes only (the block-padded
layout is sized by an upper bound), and the differentiable ops register their autograd formula, so a MoE layer
on this backend traces under ``torch.compile(fullgraph=True)`` with no ``.item()`` or ``.tolist()``.

- ``moezoo::permute``: expert-contiguous, block-padded layout of the pairs (integer outputs);
- ``moezoo::expert_ffn_fwd`` / ``moezoo::expert_ffn_bwd``: gather -> GEMM + activation -> GEMM + gate -> combine,
  and the four gradients (x, gate, w_in, w_out);
- ``moezoo::route_topk`` / ``moezoo::route_topk_bwd``: fused softmax|sigmoid + bias + top-k + renormalisation;
- ``moezoo::combine`` / ``moezoo::combine_bwd``: gate-weighted scatter-add of pair rows to token order.

Importing this module registers the ``"triton"`` backend with :func:`moezoo.ops.register_backend`; it raises
``ImportError`` when triton is unavailable (``moezoo.ops`` imports it lazily and tolerates that).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor

from moezoo.kernels import HAS_TRITON, TRITON_ERROR
from moezoo.ops.activations import check_activation

if not HAS_TRITON:
    raise ImportError(f"the Triton backend needs triton, which failed to import ({TRITON_ERROR})")

from moezoo.kernels import (  # noqa: E402 - only after the availability check
    INTERPRET,
    ExpertLayout,
    combine_bwd,
    combine_fwd,
    expert_in_bwd,
    expert_in_fwd,
    expert_out_bwd,
    expert_out_fwd,
    permute_fwd,
    routing_bwd,
    routing_fwd,
)

BACKEND = "triton"
SCORES = ("softmax", "sigmoid")


def _empty(like: Tensor) -> Tensor:
    return like.new_empty(0)


def check_runnable(*tensors: Tensor) -> None:
    """Raise a clear error unless the kernels can run on these tensors (CUDA, or CPU under the interpreter)."""
    for t in tensors:
        if t.device.type == "cuda" or (t.device.type == "cpu" and INTERPRET):
            continue
        if t.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
            why = "TRITON_INTERPRET=1 was set after moezoo.kernels was imported; set it before importing moezoo"
        else:
            why = (
                "Triton kernels need CUDA tensors (on the CPU they run only in Triton's interpreter, with "
                "TRITON_INTERPRET=1 set before import); use backend='torch' here"
            )
        raise RuntimeError(f"backend={BACKEND!r} cannot run on {t.device} tensors: {why}")


def choose_block_m(num_pairs: int, num_experts: int) -> int:
    """Rows per GEMM block: large blocks when experts are well filled, small ones to limit padding otherwise."""
    if INTERPRET:
        return 32
    rows_per_expert = num_pairs // max(num_experts, 1)
    if rows_per_expert >= 512:
        return 128
    return 64 if rows_per_expert >= 64 else 32


def _row_blocks(num_pairs: int | torch.SymInt, num_experts: int, block_m: int) -> int | torch.SymInt:
    """Same bound as ``moezoo.kernels.max_row_blocks``, written to stay symbolic under tracing."""
    return (num_pairs + block_m - 1) // block_m + torch.sym_min(num_experts, num_pairs)


# ---------------------------------------------------------------------------------------------------- permute


@torch.library.custom_op("moezoo::permute", mutates_args=())
def permute_op(expert_idx_N: Tensor, num_experts: int, block_m: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(tokens_per_expert_E, block_offsets_E1, block_expert_B, sorted_pair_P, slot_of_pair_N)``, all int32."""
    check_runnable(expert_idx_N)
    return tuple(permute_fwd(expert_idx_N, num_experts, block_m)[:5])  # type: ignore[return-value]


@permute_op.register_fake
def _(expert_idx_N: Tensor, num_experts: int, block_m: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    num_pairs = expert_idx_N.shape[0]
    blocks = _row_blocks(num_pairs, num_experts, block_m)
    new = lambda *shape: expert_idx_N.new_empty(shape, dtype=torch.int32)
    return new(num_experts), new(num_experts + 1), new(blocks), new(blocks * block_m), new(num_pairs)


def _layout(tokens: Tensor, offsets: Tensor, block_expert: Tensor, sorted_pair: Tensor, block_m: int) -> ExpertLayout:
    return ExpertLayout(tokens, offsets, block_expert, sorted_pair, sorted_pair.new_empty(0), block_m)


# ------------------------------------------------------------------------------------------------- expert FFN


@torch.library.custom_op("moezoo::expert_ffn_fwd", mutates_args=())
def expert_ffn_fwd_op(
    x_TD: Tensor,
    token_idx_N: Tensor,
    gate_N: Tensor,
    w_in_EDH: Tensor,
    w_out_EFD: Tensor,
    tokens_per_expert_E: Tensor,
    block_offsets_E1: Tensor,
    block_expert_B: Tensor,
    sorted_pair_P: Tensor,
    activation: str,
    block_m: int,
    save_h: bool,
) -> tuple[Tensor, Tensor]:
    """``(out (T, D) in x's dtype, h (N, H) pre-activations when save_h, else empty)``."""
    check_runnable(x_TD, token_idx_N, gate_N, w_in_EDH, w_out_EFD)
    layout = _layout(tokens_per_expert_E, block_offsets_E1, block_expert_B, sorted_pair_P, block_m)
    x_TD = x_TD.contiguous()
    h_NH, a_NF = expert_in_fwd(x_TD, token_idx_N, layout, w_in_EDH, activation, store_h=save_h)
    out_TD = expert_out_fwd(a_NF, token_idx_N, gate_N, layout, w_out_EFD, x_TD.shape[0])
    return out_TD.to(x_TD.dtype), (h_NH if h_NH is not None else _empty(x_TD))


@expert_ffn_fwd_op.register_fake
def _(
    x_TD: Tensor,
    token_idx_N: Tensor,
    gate_N: Tensor,
    w_in_EDH: Tensor,
    w_out_EFD: Tensor,
    tokens_per_expert_E: Tensor,
    block_offsets_E1: Tensor,
    block_expert_B: Tensor,
    sorted_pair_P: Tensor,
    activation: str,
    block_m: int,
    save_h: bool,
) -> tuple[Tensor, Tensor]:
    h_NH = x_TD.new_empty(token_idx_N.shape[0], w_in_EDH.shape[2]) if save_h else _empty(x_TD)
    return x_TD.new_empty(x_TD.shape), h_NH


@torch.library.custom_op("moezoo::expert_ffn_bwd", mutates_args=())
def expert_ffn_bwd_op(
    dout_TD: Tensor,
    x_TD: Tensor,
    token_idx_N: Tensor,
    gate_N: Tensor,
    w_in_EDH: Tensor,
    w_out_EFD: Tensor,
    h_NH: Tensor,
    tokens_per_expert_E: Tensor,
    block_offsets_E1: Tensor,
    block_expert_B: Tensor,
    sorted_pair_P: Tensor,
    activation: str,
    block_m: int,
    need_dx: bool,
    need_dgate: bool,
    need_dw_in: bool,
    need_dw_out: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(dx, dgate, dw_in, dw_out)`` in the dtypes of their inputs; a gradient not asked for is empty."""
    check_runnable(dout_TD, x_TD, token_idx_N, gate_N, w_in_EDH, w_out_EFD, h_NH)
    layout = _layout(tokens_per_expert_E, block_offsets_E1, block_expert_B, sorted_pair_P, block_m)
    dout_TD = dout_TD.to(h_NH.dtype).contiguous()
    dh_NH, dgate_N, dw_out = expert_out_bwd(
        dout_TD, token_idx_N, gate_N, layout, w_out_EFD, h_NH, activation, need_dgate, need_dw_out
    )
    dx_TD, dw_in = expert_in_bwd(dh_NH, x_TD.contiguous(), token_idx_N, layout, w_in_EDH, need_dx, need_dw_in)
    return (
        dx_TD.to(x_TD.dtype) if dx_TD is not None else _empty(x_TD),
        dgate_N.to(gate_N.dtype) if dgate_N is not None else _empty(gate_N),
        dw_in if dw_in is not None else _empty(w_in_EDH),
        dw_out if dw_out is not None else _empty(w_out_EFD),
    )


@expert_ffn_bwd_op.register_fake
def _(
    dout_TD: Tensor,
    x_TD: Tensor,
    token_idx_N: Tensor,
    gate_N: Tensor,
    w_in_EDH: Tensor,
    w_out_EFD: Tensor,
    h_NH: Tensor,
    tokens_per_expert_E: Tensor,
    block_offsets_E1: Tensor,
    block_expert_B: Tensor,
    sorted_pair_P: Tensor,
    activation: str,
    block_m: int,
    need_dx: bool,
    need_dgate: bool,
    need_dw_in: bool,
    need_dw_out: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    pick = lambda need, t: t.new_empty(t.shape) if need else _empty(t)
    return pick(need_dx, x_TD), pick(need_dgate, gate_N), pick(need_dw_in, w_in_EDH), pick(need_dw_out, w_out_EFD)


def _expert_ffn_setup(ctx: Any, inputs: tuple, output: tuple) -> None:
    x_TD, token_idx_N, gate_N, w_in_EDH, w_out_EFD, tokens, offsets, block_expert, sorted_pair = inputs[:9]
    ctx.activation, ctx.block_m = inputs[9], inputs[10]
    ctx.save_for_backward(
        x_TD, token_idx_N, gate_N, w_in_EDH, w_out_EFD, output[1], tokens, offsets, block_expert, sorted_pair
    )
    ctx.mark_non_differentiable(output[1])


def _expert_ffn_backward(ctx: Any, dout_TD: Tensor, _dh: Tensor | None) -> tuple[Tensor | None, ...]:
    x_TD, token_idx_N, gate_N, w_in_EDH, w_out_EFD, h_NH, tokens, offsets, block_expert, sorted_pair = ctx.saved_tensors
    if h_NH.numel() == 0 and token_idx_N.numel() and w_in_EDH.shape[2]:
        raise RuntimeError("moezoo::expert_ffn_fwd ran with save_h=False; it cannot be differentiated")
    need_x, need_gate, need_w_in, need_w_out = (ctx.needs_input_grad[i] for i in (0, 2, 3, 4))
    dx, dgate, dw_in, dw_out = expert_ffn_bwd_op(
        dout_TD,
        x_TD,
        token_idx_N,
        gate_N,
        w_in_EDH,
        w_out_EFD,
        h_NH,
        tokens,
        offsets,
        block_expert,
        sorted_pair,
        ctx.activation,
        ctx.block_m,
        need_x,
        need_gate,
        need_w_in,
        need_w_out,
    )
    grads = (
        dx if need_x else None,
        None,
        dgate if need_gate else None,
        dw_in if need_w_in else None,
        dw_out if need_w_out else None,
    )
    return grads + (None,) * 7


expert_ffn_fwd_op.register_autograd(_expert_ffn_backward, setup_context=_expert_ffn_setup)


def _check_shapes(
    x_TD: Tensor, token_idx_N: Tensor, expert_idx_N: Tensor, gate_N: Tensor, w_in: Tensor, w_out: Tensor, act: str
) -> None:
    if x_TD.dim() != 2 or w_in.dim() != 3 or w_out.dim() != 3:
        raise ValueError(
            f"expected x (T, D), w_in (E, D, H), w_out (E, F, D); got {tuple(x_TD.shape)}, {tuple(w_in.shape)}, "
            f"{tuple(w_out.shape)}"
        )
    num_experts, dim, hidden = w_in.shape
    ffn_dim = w_out.shape[1]
    want_hidden = 2 * ffn_dim if act == "swiglu" else ffn_dim
    if x_TD.shape[1] != dim or tuple(w_out.shape) != (num_experts, ffn_dim, dim) or hidden != want_hidden:
        raise ValueError(
            f"inconsistent shapes for activation={act!r}: x {tuple(x_TD.shape)}, w_in {tuple(w_in.shape)}, "
            f"w_out {tuple(w_out.shape)} (w_in must be (E, D, {want_hidden}) and w_out (E, F, D))"
        )
    if not (token_idx_N.shape == expert_idx_N.shape == gate_N.shape) or token_idx_N.dim() != 1:
        raise ValueError(
            f"token_idx_N, expert_idx_N and gate_N must be 1-D of equal length; got {tuple(token_idx_N.shape)}, "
            f"{tuple(expert_idx_N.shape)}, {tuple(gate_N.shape)}"
        )


def expert_ffn_triton(
    x_TD: Tensor,
    token_idx_N: Tensor,
    expert_idx_N: Tensor,
    gate_N: Tensor,
    w_in_EDH: Tensor,
    w_out_EFD: Tensor,
    activation: str,
) -> Tensor:
    """The ``expert_ffn`` contract on the Triton kernels (see ``moezoo.ops.reference``).

    Under autocast the GEMMs run in the autocast dtype; otherwise in ``x``'s dtype (weights are cast to it).
    """
    activation = check_activation(activation)
    _check_shapes(x_TD, token_idx_N, expert_idx_N, gate_N, w_in_EDH, w_out_EFD, activation)
    check_runnable(x_TD, token_idx_N, expert_idx_N, gate_N, w_in_EDH, w_out_EFD)
    dtype = x_TD.dtype
    if torch.is_autocast_enabled(x_TD.device.type):
        dtype = torch.get_autocast_dtype(x_TD.device.type)
    x_TD, w_in_EDH, w_out_EFD = x_TD.to(dtype), w_in_EDH.to(dtype), w_out_EFD.to(dtype)
    num_experts = w_in_EDH.shape[0]
    block_m = choose_block_m(token_idx_N.shape[0], num_experts)
    tokens, offsets, block_expert, sorted_pair, _ = permute_op(expert_idx_N, num_experts, block_m)
    save_h = torch.is_grad_enabled() and any(t.requires_grad for t in (x_TD, gate_N, w_in_EDH, w_out_EFD))
    out_TD, _ = expert_ffn_fwd_op(
        x_TD,
        token_idx_N,
        gate_N,
        w_in_EDH,
        w_out_EFD,
        tokens,
        offsets,
        block_expert,
        sorted_pair,
        activation,
        block_m,
        save_h,
    )
    return out_TD


# ---------------------------------------------------------------------------------------------------- routing


@torch.library.custom_op("moezoo::route_topk", mutates_args=())
def route_topk_op(
    logits_TE: Tensor, bias_E: Tensor | None, top_k: int, score: str, normalize: bool, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    """``(weight_TK fp32, expert_idx_TK int64, tokens_per_expert_E int32)`` (the float output first)."""
    check_runnable(logits_TE)
    idx_TK, weight_TK, counts_E = routing_fwd(logits_TE, top_k, score, bias_E, normalize, scale)
    return weight_TK, idx_TK, counts_E


@route_topk_op.register_fake
def _(
    logits_TE: Tensor, bias_E: Tensor | None, top_k: int, score: str, normalize: bool, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    num_tokens, num_experts = logits_TE.shape
    return (
        logits_TE.new_empty(num_tokens, top_k, dtype=torch.float32),
        logits_TE.new_empty(num_tokens, top_k, dtype=torch.int64),
        logits_TE.new_empty(num_experts, dtype=torch.int32),
    )


@torch.library.custom_op("moezoo::route_topk_bwd", mutates_args=())
def route_topk_bwd_op(
    dweight_TK: Tensor, logits_TE: Tensor, expert_idx_TK: Tensor, score: str, normalize: bool, scale: float
) -> Tensor:
    check_runnable(dweight_TK, logits_TE, expert_idx_TK)
    return routing_bwd(dweight_TK, logits_TE, expert_idx_TK, score, normalize, scale).to(logits_TE.dtype)


@route_topk_bwd_op.register_fake
def _(
    dweight_TK: Tensor, logits_TE: Tensor, expert_idx_TK: Tensor, score: str, normalize: bool, scale: float
) -> Tensor:
    return logits_TE.new_empty(logits_TE.shape)


def _route_setup(ctx: Any, inputs: tuple, output: tuple) -> None:
    logits_TE, _, _, ctx.score, ctx.normalize, ctx.scale = inputs
    ctx.save_for_backward(logits_TE, output[1])
    ctx.mark_non_differentiable(output[1], output[2])


def _route_backward(ctx: Any, dweight_TK: Tensor, _didx: Tensor | None, _dcounts: Tensor | None) -> tuple:
    logits_TE, expert_idx_TK = ctx.saved_tensors
    dlogits = route_topk_bwd_op(dweight_TK.contiguous(), logits_TE, expert_idx_TK, ctx.score, ctx.normalize, ctx.scale)
    return dlogits, None, None, None, None, None


route_topk_op.register_autograd(_route_backward, setup_context=_route_setup)


def route_topk(
    logits_TE: Tensor,
    top_k: int,
    score: str = "softmax",
    bias_E: Tensor | None = None,
    normalize: bool = True,
    scale: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Fused routing: ``(expert_idx_TK, weight_TK, tokens_per_expert_E)``; ``weight_TK`` is differentiable.

    ``score="softmax"`` with ``normalize`` is TopKRouter's gate; ``score="sigmoid"`` with a selection bias,
    ``normalize`` and ``scale=route_scale`` is SigmoidLossFreeRouter's. The bias gets no gradient.
    """
    if score not in SCORES:
        raise ValueError(f"score={score!r} is not supported; choose one of {SCORES}")
    if logits_TE.dim() != 2 or not 1 <= top_k <= logits_TE.shape[1]:
        raise ValueError(f"expected logits (T, E) and 1 <= top_k <= E; got {tuple(logits_TE.shape)}, top_k={top_k}")
    bias = bias_E.detach() if bias_E is not None else None
    weight_TK, idx_TK, counts_E = route_topk_op(logits_TE, bias, top_k, score, normalize, float(scale))
    return idx_TK, weight_TK, counts_E


# ---------------------------------------------------------------------------------------------------- combine


@torch.library.custom_op("moezoo::combine", mutates_args=())
def combine_op(y_ND: Tensor, gate_N: Tensor, token_idx_N: Tensor, num_tokens: int) -> Tensor:
    """``out (T, D)[token_idx[n]] += gate[n] * y[n]``."""
    check_runnable(y_ND, gate_N, token_idx_N)
    return combine_fwd(y_ND, gate_N, token_idx_N, num_tokens)


@combine_op.register_fake
def _(y_ND: Tensor, gate_N: Tensor, token_idx_N: Tensor, num_tokens: int) -> Tensor:
    return y_ND.new_empty(num_tokens, y_ND.shape[1])


@torch.library.custom_op("moezoo::combine_bwd", mutates_args=())
def combine_bwd_op(
    dout_TD: Tensor, y_ND: Tensor, gate_N: Tensor, token_idx_N: Tensor, need_dy: bool, need_dgate: bool
) -> tuple[Tensor, Tensor]:
    """``(dy (N, D), dgate (N,))`` in the dtypes of ``y`` and ``gate``; a gradient not asked for is empty."""
    check_runnable(dout_TD, y_ND, gate_N, token_idx_N)
    dy_ND, dgate_N = combine_bwd(dout_TD.to(y_ND.dtype), y_ND, gate_N, token_idx_N, need_dy, need_dgate)
    return (
        dy_ND if dy_ND is not None else _empty(y_ND),
        dgate_N.to(gate_N.dtype) if dgate_N is not None else _empty(gate_N),
    )


@combine_bwd_op.register_fake
def _(
    dout_TD: Tensor, y_ND: Tensor, gate_N: Tensor, token_idx_N: Tensor, need_dy: bool, need_dgate: bool
) -> tuple[Tensor, Tensor]:
    return (y_ND.new_empty(y_ND.shape) if need_dy else _empty(y_ND)), (
        gate_N.new_empty(gate_N.shape) if need_dgate else _empty(gate_N)
    )


def _combine_setup(ctx: Any, inputs: tuple, output: Tensor) -> None:
    y_ND, gate_N, token_idx_N, _ = inputs
    ctx.save_for_backward(y_ND, gate_N, token_idx_N)


def _combine_backward(ctx: Any, dout_TD: Tensor) -> tuple:
    y_ND, gate_N, token_idx_N = ctx.saved_tensors
    need_dy, need_dgate = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    dy, dgate = combine_bwd_op(dout_TD, y_ND, gate_N, token_idx_N, need_dy, need_dgate)
    return (dy if need_dy else None), (dgate if need_dgate else None), None, None


combine_op.register_autograd(_combine_backward, setup_context=_combine_setup)


def combine(y_ND: Tensor, gate_N: Tensor, token_idx_N: Tensor, num_tokens: int) -> Tensor:
    """Differentiable gate-weighted scatter-add of pair rows back to token order (``(T, D)``, ``y``'s dtype)."""
    if y_ND.dim() != 2 or not (gate_N.shape == token_idx_N.shape == (y_ND.shape[0],)):
        raise ValueError(
            f"expected y (N, D), gate (N,), token_idx (N,); got {tuple(y_ND.shape)}, {tuple(gate_N.shape)}, "
            f"{tuple(token_idx_N.shape)}"
        )
    return combine_op(y_ND, gate_N, token_idx_N, num_tokens)


def _register() -> None:
    from moezoo.ops import register_backend

    register_backend(BACKEND, expert_ffn_triton)


_register()
