"""Fused top-k routing: scores (softmax or sigmoid), biased selection, top-k, renormalisation, expert counts.

Legend: T tokens, E experts, K experts per token, EP = E padded to a power of two, KP = K padded likewise.

Forward, one program per ``BLOCK_T`` tokens, a whole row of E logits in registers::

    score = softmax(logits) | sigmoid(logits)           (fp32)
    select = score + bias                                (bias only changes *which* experts are chosen)
    idx[t, :K] = top-k of select (ties to the lower expert index, as torch.topk on CPU)
    w[t, k] = scale * score[t, idx[t, k]] / (sum_k score[t, idx[t, k]] if normalize else 1)
    counts[e] += number of tokens that chose e           (integer atomics: deterministic)

Backward recomputes the scores from the logits: ``dscore`` is the gradient of the weights w.r.t. the selected
scores, then it is chained through softmax (``p * (ds - <p, ds>)``) or sigmoid (``ds * s * (1 - s)``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from moezoo.kernels.config import check_device

SCORES = ("softmax", "sigmoid")


@triton.jit
def _scores(logits_ptr, rows, cols, row_ok, col_ok, num_experts, SCORE: tl.constexpr):
    """Rows of fp32 scores; padded columns get score 0 (and are never selected)."""
    ptrs = logits_ptr + rows.to(tl.int64)[:, None] * num_experts + cols[None, :]
    logits = tl.load(ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
    if SCORE == 0:
        logits = tl.where(col_ok[None, :], logits, float("-inf"))
        shifted = logits - tl.max(logits, axis=1)[:, None]
        num = tl.exp(shifted)
        score = num / tl.sum(num, axis=1)[:, None]
    else:
        score = tl.where(col_ok[None, :], tl.sigmoid(logits), 0.0)
    return score


@triton.jit
def _routing_fwd_kernel(
    logits_ptr,  # (T, E) contiguous
    bias_ptr,  # (E,) fp32, read only when HAS_BIAS
    idx_ptr,  # (T, K) int64 out
    weight_ptr,  # (T, K) fp32 out
    counts_ptr,  # (E,) int32, zeroed, accumulated with atomics
    num_tokens,
    num_experts,
    scale,
    K: tl.constexpr,
    KP: tl.constexpr,
    SCORE: tl.constexpr,  # 0 softmax, 1 sigmoid
    HAS_BIAS: tl.constexpr,
    NORMALIZE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    kcols = tl.arange(0, KP)
    row_ok = rows < num_tokens
    col_ok = cols < num_experts
    score = _scores(logits_ptr, rows, cols, row_ok, col_ok, num_experts, SCORE)
    select = score
    if HAS_BIAS:
        select = select + tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    select = tl.where(col_ok[None, :], select, float("-inf"))
    idx_TK = tl.zeros((BLOCK_T, KP), dtype=tl.int32)
    w_TK = tl.zeros((BLOCK_T, KP), dtype=tl.float32)
    counts = tl.zeros((BLOCK_E,), dtype=tl.int32)
    for k in tl.static_range(K):
        best = tl.argmax(select, axis=1, tie_break_left=True)
        chosen = cols[None, :] == best[:, None]
        w_k = tl.sum(tl.where(chosen, score, 0.0), axis=1)
        idx_TK = tl.where(kcols[None, :] == k, best[:, None], idx_TK)
        w_TK = tl.where(kcols[None, :] == k, w_k[:, None], w_TK)
        counts += tl.sum((chosen & row_ok[:, None]).to(tl.int32), axis=0)
        select = tl.where(chosen, float("-inf"), select)
    if NORMALIZE:
        w_TK = w_TK / tl.maximum(tl.sum(w_TK, axis=1), 1e-20)[:, None]
    w_TK = w_TK * scale
    out_off = rows.to(tl.int64)[:, None] * K + kcols[None, :]
    out_ok = row_ok[:, None] & (kcols[None, :] < K)
    tl.store(idx_ptr + out_off, idx_TK.to(idx_ptr.dtype.element_ty), mask=out_ok)
    tl.store(weight_ptr + out_off, w_TK, mask=out_ok)
    tl.atomic_add(counts_ptr + cols, counts, mask=col_ok)


@triton.jit
def _routing_bwd_kernel(
    logits_ptr,  # (T, E) contiguous
    idx_ptr,  # (T, K) int64
    dweight_ptr,  # (T, K) fp32 contiguous
    dlogits_ptr,  # (T, E) fp32 out, every element written
    num_tokens,
    num_experts,
    scale,
    K: tl.constexpr,
    SCORE: tl.constexpr,
    NORMALIZE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    row_ok = rows < num_tokens
    col_ok = cols < num_experts
    score = _scores(logits_ptr, rows, cols, row_ok, col_ok, num_experts, SCORE)
    selected = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.int1)
    dw_TE = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
    for k in tl.static_range(K):
        idx_k = tl.load(idx_ptr + rows.to(tl.int64) * K + k, mask=row_ok, other=-1).to(tl.int32)
        dw_k = tl.load(dweight_ptr + rows.to(tl.int64) * K + k, mask=row_ok, other=0.0)
        hit = cols[None, :] == idx_k[:, None]
        selected = selected | hit
        dw_TE = tl.where(hit, dw_k[:, None], dw_TE)
    if NORMALIZE:
        total = tl.maximum(tl.sum(tl.where(selected, score, 0.0), axis=1), 1e-20)
        u = tl.where(selected, score / total[:, None], 0.0)
        inner = tl.sum(u * dw_TE, axis=1)
        dscore = tl.where(selected, scale / total[:, None] * (dw_TE - inner[:, None]), 0.0)
    else:
        dscore = tl.where(selected, scale * dw_TE, 0.0)
    if SCORE == 0:
        dlogits = score * (dscore - tl.sum(score * dscore, axis=1)[:, None])
    else:
        dlogits = dscore * score * (1.0 - score)
    out_off = rows.to(tl.int64)[:, None] * num_experts + cols[None, :]
    tl.store(dlogits_ptr + out_off, dlogits, mask=row_ok[:, None] & col_ok[None, :])


def _block_sizes(num_experts: int) -> tuple[int, int]:
    block_e = triton.next_power_of_2(max(num_experts, 2))
    block_t = max(1, min(64, 4096 // block_e))
    return block_t, block_e


def _check_score(score: str) -> int:
    if score not in SCORES:
        raise ValueError(f"score={score!r} is not supported; choose one of {SCORES}")
    return SCORES.index(score)


def routing_fwd(
    logits_TE: Tensor,
    top_k: int,
    score: str = "softmax",
    bias_E: Tensor | None = None,
    normalize: bool = True,
    scale: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """``logits (T, E)`` -> ``expert_idx (T, K) int64, weights (T, K) fp32, tokens_per_expert (E,) int32``."""
    check_device(logits_TE)
    num_tokens, num_experts = logits_TE.shape
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
    score_id = _check_score(score)
    logits_TE = logits_TE.contiguous()
    idx_TK = torch.empty(num_tokens, top_k, dtype=torch.int64, device=logits_TE.device)
    weight_TK = torch.empty(num_tokens, top_k, dtype=torch.float32, device=logits_TE.device)
    counts_E = torch.zeros(num_experts, dtype=torch.int32, device=logits_TE.device)
    if num_tokens == 0:
        return idx_TK, weight_TK, counts_E
    bias = bias_E.float().contiguous() if bias_E is not None else weight_TK
    block_t, block_e = _block_sizes(num_experts)
    _routing_fwd_kernel[(triton.cdiv(num_tokens, block_t),)](
        logits_TE,
        bias,
        idx_TK,
        weight_TK,
        counts_E,
        num_tokens,
        num_experts,
        float(scale),
        K=top_k,
        KP=triton.next_power_of_2(top_k),
        SCORE=score_id,
        HAS_BIAS=bias_E is not None,
        NORMALIZE=normalize,
        BLOCK_T=block_t,
        BLOCK_E=block_e,
    )
    return idx_TK, weight_TK, counts_E


def routing_bwd(
    dweight_TK: Tensor,
    logits_TE: Tensor,
    idx_TK: Tensor,
    score: str = "softmax",
    normalize: bool = True,
    scale: float = 1.0,
) -> Tensor:
    """Gradient of the routing weights w.r.t. the logits: ``dlogits (T, E) fp32`` (the bias gets none)."""
    check_device(dweight_TK, logits_TE, idx_TK)
    num_tokens, num_experts = logits_TE.shape
    dlogits_TE = torch.empty(num_tokens, num_experts, dtype=torch.float32, device=logits_TE.device)
    if num_tokens == 0:
        return dlogits_TE
    block_t, block_e = _block_sizes(num_experts)
    _routing_bwd_kernel[(triton.cdiv(num_tokens, block_t),)](
        logits_TE.contiguous(),
        idx_TK.contiguous(),
        dweight_TK.float().contiguous(),
        dlogits_TE,
        num_tokens,
        num_experts,
        float(scale),
        K=idx_TK.shape[1],
        SCORE=_check_score(score),
        NORMALIZE=normalize,
        BLOCK_T=block_t,
        BLOCK_E=block_e,
    )
    return dlogits_TE
