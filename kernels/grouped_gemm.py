"""Grouped expert GEMMs over the block-padded expert layout, with gather, activation and combine fused.

Legend: T tokens, D model dim, F expert hidden, H = F (plain activations) or 2F (gated forms, ``w_in`` columns
``[gate | up]``), E experts, N routed pairs, B row blocks of ``BLOCK_M`` slots (``moezoo.kernels.permute``).

Activations (``moezoo.ops.activations``): the base activation is the constexpr ``ACT`` (0 gelu, 1 gelu_tanh,
2 silu, 3 relu) and ``GATED`` selects ``act(h_gate) * h_up``. Optional expert biases (``HAS_BIAS``): ``b_in (E, H)``
is added in the first GEMM's epilogue (before the activation, so the saved ``h`` includes it), ``b_out (E, D)``
in the second's (before the gate), and ``<dz[tok[n]], b_out[e]>`` joins ``dgate``; the bias gradients are row
sums, left to the caller (``moezoo.ops.triton_backend``).

Row block ``b`` holds up to ``BLOCK_M`` pairs of expert ``block_expert[b]``; a program reads the pair of each
slot, then the pair's token, and gathers rows straight from ``x`` or ``dout`` (no permuted copy is made).
Per-pair intermediates (``h``, ``a``, ``dh``) are stored at the pair's own row ``n``, so every kernel addresses
them without the layout's padding. Offsets are int64 wherever a row index multiplies a stride.

Forward::

    expert_in   h[n] = x[tok[n]] @ w_in[e] + b_in[e]  ->  a[n] = act(h[n]) | act(h_gate[n]) * h_up[n]   (epilogue)
    expert_out  out[tok[n]] += gate[n] * (a[n] @ w_out[e] + b_out[e])   (epilogue = the combine's scatter-add)

Backward (``dz`` = the incoming gradient of ``out``)::

    expert_out_bwd  da[n] = dz[tok[n]] @ w_out[e]^T;  dgate[n] = <da[n], a[n]> + <dz[tok[n]], b_out[e]>;
                    dh[n] = act'(h[n], gate[n] * da[n])
    expert_in_bwd   dx[tok[n]] += dh[n] @ w_in[e]^T
    weight grads    dw_out[e] = sum_n (gate[n] a[n])^T dz[tok[n]];   dw_in[e] = sum_n x[tok[n]]^T dh[n]

``a`` is recomputed from the saved ``h`` in backward. Weight gradients are one program per (expert, output tile)
looping over that expert's rows, so empty experts get exact zeros. ``out``, ``dx`` and ``dgate`` accumulate
with fp32 atomics (run-to-run bit differences are possible on the GPU).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import triton
import triton.language as tl
from torch import Tensor

from moezoo.kernels.config import check_device, dot_precision, pick_configs
from moezoo.kernels.permute import ExpertLayout

_SQRT1_2 = tl.constexpr(1.0 / math.sqrt(2.0))
_INV_SQRT_2PI = tl.constexpr(1.0 / math.sqrt(2.0 * math.pi))
_SQRT_2_PI = tl.constexpr(math.sqrt(2.0 / math.pi))
_GELU_TANH_C = tl.constexpr(0.044715)

# The ``ACT`` constexpr of each base activation; a launcher's ``act`` names one, ``gated`` selects its GLU form.
ACT_CODES = {"gelu": 0, "gelu_tanh": 1, "silu": 2, "relu": 3}


def _gemm_configs() -> list[triton.Config]:
    # 8 warps for 128-wide tiles: SwiGLU keeps two fp32 accumulators of BLOCK_M x BLOCK_N.
    gpu = [
        triton.Config({"BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_N": 128, "BLOCK_K": 32}, num_warps=8, num_stages=4),
        triton.Config({"BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=4),
    ]
    return pick_configs(gpu, triton.Config({"BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=1))


def _weight_configs() -> list[triton.Config]:
    gpu = [
        triton.Config({"TILE_M": 128, "TILE_N": 128, "BLOCK_R": 64}, num_warps=8, num_stages=3),
        triton.Config({"TILE_M": 64, "TILE_N": 128, "BLOCK_R": 32}, num_warps=4, num_stages=4),
        triton.Config({"TILE_M": 128, "TILE_N": 64, "BLOCK_R": 64}, num_warps=4, num_stages=3),
    ]
    return pick_configs(gpu, triton.Config({"TILE_M": 64, "TILE_N": 64, "BLOCK_R": 64}, num_warps=4, num_stages=1))


@triton.jit
def _scatter_add_rows(out_ptr, stride_out, tok, cols, tile, mask):
    """``out[tok[i], cols[j]] += tile[i, j]`` (fp32 atomics; rows may repeat): the combine, fused into the epilogue
    of the second expert GEMM."""
    tl.atomic_add(out_ptr + tok[:, None] * stride_out + cols[None, :], tile, mask=mask)


@triton.jit
def _gelu(h):
    return 0.5 * h * (1.0 + tl.math.erf(h * _SQRT1_2))


@triton.jit
def _gelu_grad(h):
    return 0.5 * (1.0 + tl.math.erf(h * _SQRT1_2)) + h * tl.exp(-0.5 * h * h) * _INV_SQRT_2PI


@triton.jit
def _silu(h):
    return h * tl.sigmoid(h)


@triton.jit
def _silu_grad(h):
    s = tl.sigmoid(h)
    return s * (1.0 + h * (1.0 - s))


@triton.jit
def _tanh(u):
    return 2.0 * tl.sigmoid(2.0 * u) - 1.0


@triton.jit
def _gelu_tanh(h):
    return 0.5 * h * (1.0 + _tanh(_SQRT_2_PI * (h + _GELU_TANH_C * h * h * h)))


@triton.jit
def _gelu_tanh_grad(h):
    t = _tanh(_SQRT_2_PI * (h + _GELU_TANH_C * h * h * h))
    return 0.5 * (1.0 + t) + 0.5 * h * (1.0 - t * t) * _SQRT_2_PI * (1.0 + 3.0 * _GELU_TANH_C * h * h)


@triton.jit
def _act(h, ACT: tl.constexpr):
    """The base activation ``ACT`` (0 gelu, 1 gelu_tanh, 2 silu, 3 relu) of fp32 ``h``."""
    if ACT == 0:
        out = _gelu(h)
    elif ACT == 1:
        out = _gelu_tanh(h)
    elif ACT == 2:
        out = _silu(h)
    else:
        out = tl.maximum(h, 0.0)
    return out


@triton.jit
def _act_grad(h, ACT: tl.constexpr):
    if ACT == 0:
        out = _gelu_grad(h)
    elif ACT == 1:
        out = _gelu_tanh_grad(h)
    elif ACT == 2:
        out = _silu_grad(h)
    else:
        out = tl.where(h > 0.0, 1.0, 0.0)
    return out


@triton.jit
def _block_rows(sorted_pair_ptr, token_idx_ptr, pid_b, BLOCK_M: tl.constexpr):
    """Pairs and tokens (int64) of row block ``pid_b``; ``valid`` is False on padding slots."""
    slots = pid_b.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_pair_ptr + slots)
    valid = pair >= 0
    pair = tl.where(valid, pair, 0).to(tl.int64)
    tok = tl.load(token_idx_ptr + pair, mask=valid, other=0).to(tl.int64)
    return pair, tok, valid


@triton.autotune(configs=_gemm_configs(), key=["dim", "ffn_dim", "BLOCK_M"])
@triton.jit
def _expert_in_fwd_kernel(
    x_ptr,  # (T, D)
    token_idx_ptr,  # (N,) int
    sorted_pair_ptr,  # (P,) int32
    block_expert_ptr,  # (B,) int32
    w_in_ptr,  # (E, D, H)
    b_in_ptr,  # (E, H) contiguous, when HAS_BIAS
    h_ptr,  # (N, H) out, when STORE_H
    a_ptr,  # (N, F) out
    dim,
    ffn_dim,
    stride_xt,
    stride_xd,
    stride_we,
    stride_wd,
    stride_wh,
    GATED: tl.constexpr,
    ACT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    STORE_H: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_b = tl.program_id(0)
    expert = tl.load(block_expert_ptr + pid_b)
    if expert < 0:
        return
    pair, tok, valid = _block_rows(sorted_pair_ptr, token_idx_ptr, pid_b, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < ffn_dim
    ks = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + tok[:, None] * stride_xt + ks[None, :] * stride_xd
    w_ptrs = w_in_ptr + expert.to(tl.int64) * stride_we + ks[:, None] * stride_wd + cols[None, :] * stride_wh
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, dim, BLOCK_K):
        k_ok = ks < dim - k0
        x = tl.load(x_ptrs, mask=valid[:, None] & k_ok[None, :], other=0.0)
        w_mask = k_ok[:, None] & col_ok[None, :]
        acc = tl.dot(x, tl.load(w_ptrs, mask=w_mask, other=0.0), acc, input_precision=PRECISION)
        if GATED:
            w_up = tl.load(w_ptrs + ffn_dim * stride_wh, mask=w_mask, other=0.0)
            acc_up = tl.dot(x, w_up, acc_up, input_precision=PRECISION)
        x_ptrs += BLOCK_K * stride_xd
        w_ptrs += BLOCK_K * stride_wd
    mask = valid[:, None] & col_ok[None, :]
    hidden = 2 * ffn_dim if GATED else ffn_dim
    if HAS_BIAS:
        b_ptrs = b_in_ptr + expert.to(tl.int64) * hidden + cols
        acc += tl.load(b_ptrs, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if GATED:
            acc_up += tl.load(b_ptrs + ffn_dim, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if STORE_H:
        h_ptrs = h_ptr + pair[:, None] * hidden + cols[None, :]
        tl.store(h_ptrs, acc.to(h_ptr.dtype.element_ty), mask=mask)
        if GATED:
            tl.store(h_ptrs + ffn_dim, acc_up.to(h_ptr.dtype.element_ty), mask=mask)
    if GATED:
        act = _act(acc, ACT) * acc_up
    else:
        act = _act(acc, ACT)
    tl.store(a_ptr + pair[:, None] * ffn_dim + cols[None, :], act.to(a_ptr.dtype.element_ty), mask=mask)


@triton.autotune(configs=_gemm_configs(), key=["dim", "ffn_dim", "BLOCK_M"], reset_to_zero=["out_ptr"])
@triton.jit
def _expert_out_fwd_kernel(
    a_ptr,  # (N, F)
    token_idx_ptr,  # (N,) int
    sorted_pair_ptr,  # (P,) int32
    block_expert_ptr,  # (B,) int32
    w_out_ptr,  # (E, F, D)
    b_out_ptr,  # (E, D) contiguous, when HAS_BIAS
    gate_ptr,  # (N,)
    out_ptr,  # (T, D) fp32 accumulator
    dim,
    ffn_dim,
    stride_we,
    stride_wf,
    stride_wd,
    stride_out,
    HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_b = tl.program_id(0)
    expert = tl.load(block_expert_ptr + pid_b)
    if expert < 0:
        return
    pair, tok, valid = _block_rows(sorted_pair_ptr, token_idx_ptr, pid_b, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < dim
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + pair[:, None] * ffn_dim + ks[None, :]
    w_ptrs = w_out_ptr + expert.to(tl.int64) * stride_we + ks[:, None] * stride_wf + cols[None, :] * stride_wd
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, ffn_dim, BLOCK_K):
        k_ok = ks < ffn_dim - k0
        a = tl.load(a_ptrs, mask=valid[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * stride_wf
    if HAS_BIAS:
        acc += tl.load(b_out_ptr + expert.to(tl.int64) * dim + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    gate = tl.load(gate_ptr + pair, mask=valid, other=0.0).to(tl.float32)
    _scatter_add_rows(out_ptr, stride_out, tok, cols, acc * gate[:, None], valid[:, None] & col_ok[None, :])


@triton.autotune(configs=_gemm_configs(), key=["dim", "ffn_dim", "BLOCK_M"], reset_to_zero=["dgate_ptr"])
@triton.jit
def _expert_out_bwd_kernel(
    dout_ptr,  # (T, D)
    token_idx_ptr,  # (N,) int
    sorted_pair_ptr,  # (P,) int32
    block_expert_ptr,  # (B,) int32
    w_out_ptr,  # (E, F, D)
    b_out_ptr,  # (E, D) contiguous, when HAS_BIAS
    h_ptr,  # (N, H)
    gate_ptr,  # (N,)
    dh_ptr,  # (N, H) out
    dgate_ptr,  # (N,) fp32 accumulator, when COMPUTE_DGATE
    dim,
    ffn_dim,
    stride_dt,
    stride_dd,
    stride_we,
    stride_wf,
    stride_wd,
    GATED: tl.constexpr,
    ACT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    COMPUTE_DGATE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_b = tl.program_id(0)
    expert = tl.load(block_expert_ptr + pid_b)
    if expert < 0:
        return
    pair, tok, valid = _block_rows(sorted_pair_ptr, token_idx_ptr, pid_b, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < ffn_dim
    ks = tl.arange(0, BLOCK_K)
    dz_ptrs = dout_ptr + tok[:, None] * stride_dt + ks[None, :] * stride_dd
    w_ptrs = w_out_ptr + expert.to(tl.int64) * stride_we + cols[None, :] * stride_wf + ks[:, None] * stride_wd
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # <dz, b_out[e]> for dgate, added once per row: by the programs of the first column tile only.
    bias_dot = tl.zeros((BLOCK_M,), dtype=tl.float32)
    first_tile = tl.program_id(1) == 0
    b_ptrs = b_out_ptr + expert.to(tl.int64) * dim + ks
    for k0 in range(0, dim, BLOCK_K):
        k_ok = ks < dim - k0
        dz = tl.load(dz_ptrs, mask=valid[:, None] & k_ok[None, :], other=0.0)
        w_t = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(dz, w_t, acc, input_precision=PRECISION)
        if HAS_BIAS and COMPUTE_DGATE:
            b = tl.load(b_ptrs, mask=k_ok & first_tile, other=0.0).to(tl.float32)
            bias_dot += tl.sum(dz.to(tl.float32) * b[None, :], axis=1)
            b_ptrs += BLOCK_K
        dz_ptrs += BLOCK_K * stride_dd
        w_ptrs += BLOCK_K * stride_wd
    mask = valid[:, None] & col_ok[None, :]
    hidden = 2 * ffn_dim if GATED else ffn_dim
    h_ptrs = h_ptr + pair[:, None] * hidden + cols[None, :]
    dh_ptrs = dh_ptr + pair[:, None] * hidden + cols[None, :]
    h = tl.load(h_ptrs, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(gate_ptr + pair, mask=valid, other=0.0).to(tl.float32)
    da = acc * gate[:, None]
    if GATED:
        h_up = tl.load(h_ptrs + ffn_dim, mask=mask, other=0.0).to(tl.float32)
        act_gate = _act(h, ACT)
        act = act_gate * h_up
        tl.store(dh_ptrs, (da * h_up * _act_grad(h, ACT)).to(dh_ptr.dtype.element_ty), mask=mask)
        tl.store(dh_ptrs + ffn_dim, (da * act_gate).to(dh_ptr.dtype.element_ty), mask=mask)
    else:
        act = _act(h, ACT)
        tl.store(dh_ptrs, (da * _act_grad(h, ACT)).to(dh_ptr.dtype.element_ty), mask=mask)
    if COMPUTE_DGATE:
        tl.atomic_add(dgate_ptr + pair, tl.sum(acc * act, axis=1) + bias_dot, mask=valid)


@triton.autotune(configs=_gemm_configs(), key=["dim", "hidden", "BLOCK_M"], reset_to_zero=["dx_ptr"])
@triton.jit
def _expert_in_bwd_kernel(
    dh_ptr,  # (N, H)
    token_idx_ptr,  # (N,) int
    sorted_pair_ptr,  # (P,) int32
    block_expert_ptr,  # (B,) int32
    w_in_ptr,  # (E, D, H)
    dx_ptr,  # (T, D) fp32 accumulator
    dim,
    hidden,
    stride_we,
    stride_wd,
    stride_wh,
    stride_dx,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_b = tl.program_id(0)
    expert = tl.load(block_expert_ptr + pid_b)
    if expert < 0:
        return
    pair, tok, valid = _block_rows(sorted_pair_ptr, token_idx_ptr, pid_b, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < dim
    ks = tl.arange(0, BLOCK_K)
    dh_ptrs = dh_ptr + pair[:, None] * hidden + ks[None, :]
    w_ptrs = w_in_ptr + expert.to(tl.int64) * stride_we + cols[None, :] * stride_wd + ks[:, None] * stride_wh
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        k_ok = ks < hidden - k0
        dh = tl.load(dh_ptrs, mask=valid[:, None] & k_ok[None, :], other=0.0)
        w_t = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(dh, w_t, acc, input_precision=PRECISION)
        dh_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * stride_wh
    _scatter_add_rows(dx_ptr, stride_dx, tok, cols, acc, valid[:, None] & col_ok[None, :])


@triton.autotune(configs=_weight_configs(), key=["size_m", "size_n"])
@triton.jit
def _expert_weight_bwd_kernel(
    left_ptr,  # rows of the left operand: x (T, D) by token, or h (N, H) by pair
    right_ptr,  # rows of the right operand: dh (N, H) by pair, or dout (T, D) by token
    gate_ptr,  # (N,), when LEFT_ACT
    token_idx_ptr,  # (N,) int
    sorted_pair_ptr,  # (P,) int32
    tokens_per_expert_ptr,  # (E,) int32
    block_offsets_ptr,  # (E + 1,) int32
    dw_ptr,  # (E, size_m, size_n) out
    size_m,
    size_n,
    ffn_dim,
    stride_left,
    stride_right,
    stride_dwe,
    stride_dwm,
    stride_dwn,
    LEFT_BY_TOKEN: tl.constexpr,
    LEFT_ACT: tl.constexpr,  # False: left as is; True: gate * act(h) (GATED: gate * act(h_gate) * h_up)
    GATED: tl.constexpr,
    ACT: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    TILE_M: tl.constexpr,
    TILE_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """``dw[e] = sum over the rows r of expert e of left[r]^T right[r]`` (contraction over the expert's rows)."""
    expert = tl.program_id(0)
    count = tl.load(tokens_per_expert_ptr + expert)
    start = tl.load(block_offsets_ptr + expert).to(tl.int64) * BLOCK_M
    ms = tl.program_id(1) * TILE_M + tl.arange(0, TILE_M)
    ns = tl.program_id(2) * TILE_N + tl.arange(0, TILE_N)
    m_ok = ms < size_m
    n_ok = ns < size_n
    rs = tl.arange(0, BLOCK_R)
    acc = tl.zeros((TILE_M, TILE_N), dtype=tl.float32)
    for r0 in range(0, count, BLOCK_R):
        r_ok = rs < count - r0
        pair = tl.load(sorted_pair_ptr + start + r0 + rs, mask=r_ok, other=0).to(tl.int64)
        tok = tl.load(token_idx_ptr + pair, mask=r_ok, other=0).to(tl.int64)
        if LEFT_BY_TOKEN:
            left_rows = tok
            right_rows = pair
        else:
            left_rows = pair
            right_rows = tok
        l_mask = m_ok[:, None] & r_ok[None, :]
        left_ptrs = left_ptr + left_rows[None, :] * stride_left + ms[:, None]
        right = tl.load(
            right_ptr + right_rows[:, None] * stride_right + ns[None, :], mask=r_ok[:, None] & n_ok[None, :], other=0.0
        )
        if not LEFT_ACT:
            left = tl.load(left_ptrs, mask=l_mask, other=0.0)
        else:
            h = tl.load(left_ptrs, mask=l_mask, other=0.0).to(tl.float32)
            gate = tl.load(gate_ptr + pair, mask=r_ok, other=0.0).to(tl.float32)
            if GATED:
                h_up = tl.load(left_ptrs + ffn_dim, mask=l_mask, other=0.0).to(tl.float32)
                act = _act(h, ACT) * h_up
            else:
                act = _act(h, ACT)
            left = (act * gate[None, :]).to(right.dtype)
        acc = tl.dot(left, right, acc, input_precision=PRECISION)
    dw_ptrs = dw_ptr + expert.to(tl.int64) * stride_dwe + ms[:, None] * stride_dwm + ns[None, :] * stride_dwn
    tl.store(dw_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def _row_grid(layout: ExpertLayout, width: int) -> Callable[[dict], tuple[int, int]]:
    blocks = layout.block_expert_B.shape[0]
    return lambda meta: (blocks, triton.cdiv(width, meta["BLOCK_N"]))


def _act_code(act: str) -> int:
    if act not in ACT_CODES:
        raise ValueError(f"act={act!r} is not a base activation of the kernels; choose one of {sorted(ACT_CODES)}")
    return ACT_CODES[act]


def expert_in_fwd(
    x_TD: Tensor,
    token_idx_N: Tensor,
    layout: ExpertLayout,
    w_in_EDH: Tensor,
    act: str,
    gated: bool,
    store_h: bool = True,
    b_in_EH: Tensor | None = None,
) -> tuple[Tensor | None, Tensor]:
    """First expert GEMM with the row gather, the optional bias and the activation fused (``act`` of
    ``ACT_CODES``; ``gated``: ``act(h_gate) * h_up``): ``(h (N, H) or None, a (N, F))``."""
    check_device(x_TD, token_idx_N, w_in_EDH)
    num_experts, dim, hidden = w_in_EDH.shape
    ffn_dim = hidden // 2 if gated else hidden
    num_pairs = token_idx_N.shape[0]
    h_NH = x_TD.new_empty(num_pairs, hidden) if store_h else None
    a_NF = x_TD.new_empty(num_pairs, ffn_dim)
    if layout.block_expert_B.shape[0] and ffn_dim:
        _expert_in_fwd_kernel[_row_grid(layout, ffn_dim)](
            x_TD,
            token_idx_N,
            layout.sorted_pair_P,
            layout.block_expert_B,
            w_in_EDH,
            b_in_EH.contiguous() if b_in_EH is not None else w_in_EDH,
            h_NH if h_NH is not None else a_NF,
            a_NF,
            dim,
            ffn_dim,
            x_TD.stride(0),
            x_TD.stride(1),
            *w_in_EDH.stride(),
            GATED=gated,
            ACT=_act_code(act),
            HAS_BIAS=b_in_EH is not None,
            STORE_H=store_h,
            PRECISION=dot_precision(x_TD.dtype),
            BLOCK_M=layout.block_m,
        )
    return h_NH, a_NF


def expert_out_fwd(
    a_NF: Tensor,
    token_idx_N: Tensor,
    gate_N: Tensor,
    layout: ExpertLayout,
    w_out_EFD: Tensor,
    num_tokens: int,
    b_out_ED: Tensor | None = None,
) -> Tensor:
    """Second expert GEMM with the combine fused:
    ``out (T, D) fp32 = sum_n gate[n] * (a[n] @ w_out[e_n] + b_out[e_n])``."""
    check_device(a_NF, token_idx_N, gate_N, w_out_EFD)
    num_experts, ffn_dim, dim = w_out_EFD.shape
    out_TD = torch.zeros(num_tokens, dim, dtype=torch.float32, device=a_NF.device)
    if layout.block_expert_B.shape[0] and dim:
        _expert_out_fwd_kernel[_row_grid(layout, dim)](
            a_NF,
            token_idx_N,
            layout.sorted_pair_P,
            layout.block_expert_B,
            w_out_EFD,
            b_out_ED.contiguous() if b_out_ED is not None else w_out_EFD,
            gate_N,
            out_TD,
            dim,
            ffn_dim,
            *w_out_EFD.stride(),
            out_TD.stride(0),
            HAS_BIAS=b_out_ED is not None,
            PRECISION=dot_precision(a_NF.dtype),
            BLOCK_M=layout.block_m,
        )
    return out_TD


def _weight_grad(
    left: Tensor,
    right: Tensor,
    gate_N: Tensor,
    token_idx_N: Tensor,
    layout: ExpertLayout,
    dw: Tensor,
    ffn_dim: int,
    left_by_token: bool,
    act: str | None,
    gated: bool,
) -> Tensor:
    num_experts, size_m, size_n = dw.shape

    def grid(meta: dict) -> tuple[int, int, int]:
        return num_experts, triton.cdiv(size_m, meta["TILE_M"]), triton.cdiv(size_n, meta["TILE_N"])

    _expert_weight_bwd_kernel[grid](
        left,
        right,
        gate_N,
        token_idx_N,
        layout.sorted_pair_P,
        layout.tokens_per_expert_E,
        layout.block_offsets_E1,
        dw,
        size_m,
        size_n,
        ffn_dim,
        left.stride(0),
        right.stride(0),
        *dw.stride(),
        LEFT_BY_TOKEN=left_by_token,
        LEFT_ACT=act is not None,
        GATED=gated,
        ACT=_act_code(act) if act is not None else 0,
        PRECISION=dot_precision(right.dtype),
        BLOCK_M=layout.block_m,
    )
    return dw


def expert_out_bwd(
    dout_TD: Tensor,
    token_idx_N: Tensor,
    gate_N: Tensor,
    layout: ExpertLayout,
    w_out_EFD: Tensor,
    h_NH: Tensor,
    act: str,
    gated: bool,
    compute_dgate: bool = True,
    compute_dw_out: bool = True,
    b_out_ED: Tensor | None = None,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Backward of the second GEMM and the activation:
    ``(dh (N, H), dgate (N,) fp32, dw_out (E, F, D))``; ``b_out`` enters ``dgate`` only.

    ``dout_TD`` must have ``h``'s dtype and unit column stride.
    """
    check_device(dout_TD, token_idx_N, gate_N, w_out_EFD, h_NH)
    num_experts, ffn_dim, dim = w_out_EFD.shape
    num_pairs, hidden = h_NH.shape
    dh_NH = torch.empty_like(h_NH)
    # Allocated even when not wanted: the autotuner zeroes this argument, so it must never alias an input.
    dgate_N = torch.zeros(num_pairs, dtype=torch.float32, device=h_NH.device)
    dw_out = torch.empty_like(w_out_EFD) if compute_dw_out else None
    if layout.block_expert_B.shape[0] and ffn_dim:
        _expert_out_bwd_kernel[_row_grid(layout, ffn_dim)](
            dout_TD,
            token_idx_N,
            layout.sorted_pair_P,
            layout.block_expert_B,
            w_out_EFD,
            b_out_ED.contiguous() if b_out_ED is not None else w_out_EFD,
            h_NH,
            gate_N,
            dh_NH,
            dgate_N,
            dim,
            ffn_dim,
            dout_TD.stride(0),
            dout_TD.stride(1),
            *w_out_EFD.stride(),
            GATED=gated,
            ACT=_act_code(act),
            HAS_BIAS=b_out_ED is not None,
            COMPUTE_DGATE=compute_dgate,
            PRECISION=dot_precision(h_NH.dtype),
            BLOCK_M=layout.block_m,
        )
    if dw_out is not None:
        _weight_grad(h_NH, dout_TD, gate_N, token_idx_N, layout, dw_out, ffn_dim, False, act, gated)
    return dh_NH, (dgate_N if compute_dgate else None), dw_out


def expert_in_bwd(
    dh_NH: Tensor,
    x_TD: Tensor,
    token_idx_N: Tensor,
    layout: ExpertLayout,
    w_in_EDH: Tensor,
    compute_dx: bool = True,
    compute_dw_in: bool = True,
) -> tuple[Tensor | None, Tensor | None]:
    """Backward of the first GEMM: ``(dx (T, D) fp32, dw_in (E, D, H))`` (``x_TD`` with unit column stride)."""
    check_device(dh_NH, x_TD, token_idx_N, w_in_EDH)
    num_experts, dim, hidden = w_in_EDH.shape
    dx_TD = torch.zeros(x_TD.shape, dtype=torch.float32, device=x_TD.device) if compute_dx else None
    dw_in = torch.empty_like(w_in_EDH) if compute_dw_in else None
    if dx_TD is not None and layout.block_expert_B.shape[0] and dim:
        _expert_in_bwd_kernel[_row_grid(layout, dim)](
            dh_NH,
            token_idx_N,
            layout.sorted_pair_P,
            layout.block_expert_B,
            w_in_EDH,
            dx_TD,
            dim,
            hidden,
            *w_in_EDH.stride(),
            dx_TD.stride(0),
            PRECISION=dot_precision(dh_NH.dtype),
            BLOCK_M=layout.block_m,
        )
    if dw_in is not None:
        _weight_grad(x_TD, dh_NH, dh_NH, token_idx_N, layout, dw_in, 0, True, None, False)
    return dx_TD, dw_in
