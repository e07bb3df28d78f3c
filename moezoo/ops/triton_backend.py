"""The Triton backend of ``expert_ffn``: the kernels of ``moezoo.kernels`` as ``torch.library`` custom ops.

Legend: T tokens, D model dim, F expert hidden, H = F (plain activations) or 2F (gated), E experts, K experts per
token, N routed pairs, B row blocks, P = B * block_m padded slots.

Every op has a fake (meta) implementation whose output shapes depend on input shapes only (the block-padded
layout is sized by an upper bound), and the differentiable ops register their autograd formula, so a MoE layer
on this backend traces under ``torch.compile(fullgraph=True)`` with no ``.item()`` or ``.tolist()``.

- ``moezoo::permute``: expert-contiguous, block-padded layout of the pairs (integer outputs);
- ``moezoo::expert_ffn_fwd`` / ``moezoo::expert_ffn_bwd``: gather -> GEMM + activation -> GEMM + gate -> combine,
  and the gradients (x, gate, w_in, w_out, and the optional biases: the bias gradients are per-expert row sums
  in PyTorch, ``index_add`` over the pairs, next to the kernels).

Routing stays in the routers (PyTorch ops on every device); see ``moezoo.kernels`` for why there is no fused
routing or standalone combine op.

Importing this module registers the ``"triton"`` backend with :func:`moezoo.ops.register_backend`; it raises
``ImportError`` when triton is unavailable (``moezoo.ops`` imports it lazily and tolerates that).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from moezoo.kernels import HAS_TRITON, TRITON_ERROR
from moezoo.ops.activations import check_activation, hidden_width, split_activation

if not HAS_TRITON:
    raise ImportError(f"the Triton backend needs triton, which failed to import ({TRITON_ERROR})")

from moezoo.kernels import (  # noqa: E402 - only after the availability check
    INTERPRET,
    ExpertLayout,
    check_device,
    expert_in_bwd,
    expert_in_fwd,
    expert_out_bwd,
    expert_out_fwd,
    permute_fwd,
)

BACKEND = "triton"


def _empty(like: Tensor) -> Tensor:
    return like.new_empty(0)


def choose_block_m(num_pairs: int | torch.SymInt, num_experts: int, num_tokens: int | torch.SymInt = 0) -> int:
    """Rows per GEMM block: large blocks when experts are well filled, small ones to limit padding otherwise.

    Under ``torch.compile`` a filtered pair list (capacity, null experts, ReLU routing) has a data-dependent length
    that cannot be compared with a constant; the token count ``num_tokens`` then stands in for it.
    """
    if INTERPRET:
        return 32
    rows = num_pairs if isinstance(num_pairs, int) else num_tokens
    rows_per_expert = rows // max(num_experts, 1)
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
    expert_idx_N: Tensor,
    gate_N: Tensor,
    w_in_EDH: Tensor,
    w_out_EFD: Tensor,
    b_in_EH: Tensor | None,
    b_out_ED: Tensor | None,
    tokens_per_expert_E: Tensor,
    block_offsets_E1: Tensor,
    block_expert_B: Tensor,
    sorted_pair_P: Tensor,
    activation: str,
    block_m: int,
    save_h: bool,
) -> tuple[Tensor, Tensor]:
    """``(out (T, D) in x's dtype, h (N, H) pre-activations when save_h, else empty)``."""
    layout = _layout(tokens_per_expert_E, block_offsets_E1, block_expert_B, sorted_pair_P, block_m)
    x_TD = x_TD.contiguous()
    act, gated = split_activation(activation)
    h_NH, a_NF = expert_in_fwd(x_TD, token_idx_N, layout, w_in_EDH, act, gated, store_h=save_h, b_in_EH=b_in_EH)
    out_TD = expert_out_fwd(a_NF, token_idx_N, gate_N, layout, w_out_EFD, x_TD.shape[0], b_out_ED=b_out_ED)
    return out_TD.to(x_TD.dtype), (h_NH if h_NH is not None else _empty(x_TD))


@expert_ffn_fwd_op.register_fake
def _(
    x_TD: Tensor,
    token_idx_N: Tensor,
    expert_idx_N: Tensor,
    gate_N: Tensor,
    w_in_EDH: Tensor,
    w_out_EFD: Tensor,
    b_in_EH: Tensor | None,
    b_out_ED: Tensor | None,
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
    expert_idx_N: Tensor,
    b_out_ED: Tensor | None,
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
    need_db_in: bool,
    need_db_out: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(dx, dgate, dw_in, dw_out, db_in, db_out)`` in the dtypes of their inputs; a gradient not asked for is
    empty."""
    layout = _layout(tokens_per_expert_E, block_offsets_E1, block_expert_B, sorted_pair_P, block_m)
    dout_TD = dout_TD.to(h_NH.dtype).contiguous()
    act, gated = split_activation(activation)
    dh_NH, dgate_N, dw_out = expert_out_bwd(
        dout_TD, token_idx_N, gate_N, layout, w_out_EFD, h_NH, act, gated, need_dgate, need_dw_out, b_out_ED
    )
    dx_TD, dw_in = expert_in_bwd(dh_NH, x_TD.contiguous(), token_idx_N, layout, w_in_EDH, need_dx, need_dw_in)
    num_experts, dim, hidden = w_in_EDH.shape
    db_in = _empty(w_in_EDH)
    if need_db_in:
        db_in = w_in_EDH.new_zeros(num_experts, hidden).index_add_(0, expert_idx_N, dh_NH.to(w_in_EDH.dtype))
    db_out = _empty(w_out_EFD)
    if need_db_out and b_out_ED is not None:
        rows_ND = dout_TD.index_select(0, token_idx_N) * gate_N.to(dout_TD.dtype).unsqueeze(-1)
        db_out = w_out_EFD.new_zeros(num_experts, dim).index_add_(0, expert_idx_N, rows_ND.to(w_out_EFD.dtype))
    return (
        dx_TD.to(x_TD.dtype) if dx_TD is not None else _empty(x_TD),
        dgate_N.to(gate_N.dtype) if dgate_N is not None else _empty(gate_N),
        dw_in if dw_in is not None else _empty(w_in_EDH),
        dw_out if dw_out is not None else _empty(w_out_EFD),
        db_in,
        db_out,
    )


@expert_ffn_bwd_op.register_fake
def _(
    dout_TD: Tensor,
    x_TD: Tensor,
    token_idx_N: Tensor,
    gate_N: Tensor,
    w_in_EDH: Tensor,
    w_out_EFD: Tensor,
    expert_idx_N: Tensor,
    b_out_ED: Tensor | None,
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
    need_db_in: bool,
    need_db_out: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    pick = lambda need, t: t.new_empty(t.shape) if need else _empty(t)
    num_experts, dim, hidden = w_in_EDH.shape
    db_in = w_in_EDH.new_empty(num_experts, hidden) if need_db_in else _empty(w_in_EDH)
    db_out = w_out_EFD.new_empty(num_experts, dim) if need_db_out and b_out_ED is not None else _empty(w_out_EFD)
    grads = pick(need_dx, x_TD), pick(need_dgate, gate_N), pick(need_dw_in, w_in_EDH), pick(need_dw_out, w_out_EFD)
    return (*grads, db_in, db_out)


def _expert_ffn_setup(ctx: Any, inputs: tuple, output: tuple) -> None:
    x_TD, token_idx_N, expert_idx_N, gate_N, w_in_EDH, w_out_EFD, b_in_EH, b_out_ED = inputs[:8]
    tokens, offsets, block_expert, sorted_pair = inputs[8:12]
    ctx.activation, ctx.block_m, ctx.save_h = inputs[12], inputs[13], inputs[14]
    ctx.has_b_in, ctx.has_b_out = b_in_EH is not None, b_out_ED is not None
    ctx.save_for_backward(
        x_TD,
        token_idx_N,
        expert_idx_N,
        gate_N,
        w_in_EDH,
        w_out_EFD,
        b_out_ED,
        output[1],
        tokens,
        offsets,
        block_expert,
        sorted_pair,
    )
    ctx.mark_non_differentiable(output[1])


def _expert_ffn_backward(ctx: Any, dout_TD: Tensor, _dh: Tensor | None) -> tuple[Tensor | None, ...]:
    x_TD, token_idx_N, expert_idx_N, gate_N, w_in_EDH, w_out_EFD, b_out_ED, h_NH = ctx.saved_tensors[:8]
    tokens, offsets, block_expert, sorted_pair = ctx.saved_tensors[8:]
    if not ctx.save_h:  # a flag, not h's size: the pair count may be data-dependent under torch.compile
        raise RuntimeError("moezoo::expert_ffn_fwd ran with save_h=False; it cannot be differentiated")
    need_x, need_gate, need_w_in, need_w_out = (ctx.needs_input_grad[i] for i in (0, 3, 4, 5))
    need_b_in = ctx.has_b_in and ctx.needs_input_grad[6]
    need_b_out = ctx.has_b_out and ctx.needs_input_grad[7]
    dx, dgate, dw_in, dw_out, db_in, db_out = expert_ffn_bwd_op(
        dout_TD,
        x_TD,
        token_idx_N,
        gate_N,
        w_in_EDH,
        w_out_EFD,
        expert_idx_N,
        b_out_ED,
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
        need_b_in,
        need_b_out,
    )
    grads = (
        dx if need_x else None,
        None,
        None,
        dgate if need_gate else None,
        dw_in if need_w_in else None,
        dw_out if need_w_out else None,
        db_in if need_b_in else None,
        db_out if need_b_out else None,
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
    want_hidden = hidden_width(act, ffn_dim)
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
    b_in_EH: Tensor | None = None,
    b_out_ED: Tensor | None = None,
) -> Tensor:
    """The ``expert_ffn`` contract on the Triton kernels (see ``moezoo.ops.reference``), in ``x``'s dtype."""
    activation = check_activation(activation)
    _check_shapes(x_TD, token_idx_N, expert_idx_N, gate_N, w_in_EDH, w_out_EFD, activation)
    biases = [b for b in (b_in_EH, b_out_ED) if b is not None]
    check_device(x_TD, token_idx_N, expert_idx_N, gate_N, w_in_EDH, w_out_EFD, *biases)
    num_experts = w_in_EDH.shape[0]
    block_m = choose_block_m(token_idx_N.shape[0], num_experts, x_TD.shape[0])
    tokens, offsets, block_expert, sorted_pair, _ = permute_op(expert_idx_N, num_experts, block_m)
    params = (x_TD, gate_N, w_in_EDH, w_out_EFD, *biases)
    save_h = torch.is_grad_enabled() and any(t.requires_grad for t in params)
    out_TD, _ = expert_ffn_fwd_op(
        x_TD,
        token_idx_N,
        expert_idx_N,
        gate_N,
        w_in_EDH,
        w_out_EFD,
        b_in_EH,
        b_out_ED,
        tokens,
        offsets,
        block_expert,
        sorted_pair,
        activation,
        block_m,
        save_h,
    )
    return out_TD


def _register() -> None:
    from moezoo.ops import register_backend

    register_backend(BACKEND, expert_ffn_triton)


_register()
