"""Grouped matrix products over expert-contiguous rows, for the PyTorch path.

Legend: N routed rows (sorted by expert), E experts, K/M inner and outer dims.
Rows ``offsets_E1[e]:offsets_E1[e+1]`` of ``a_NK`` belong to expert ``e``.

On the CPU, many small GEMMs lose to per-call overhead and poor threading. When the groups are nearly
balanced we pad them into one ``bmm`` (one call, batched threading); otherwise we loop over the non-empty
groups. Both strategies compute the same result; the choice is a cost estimate, never a semantic switch.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Padding into a single bmm is used when it wastes at most this fraction of extra rows.
MAX_PAD_WASTE = 0.35


def _use_bmm(counts: list[int], device: torch.device) -> bool:
    if device.type != "cpu" or not counts:
        return False
    largest = max(counts)
    total = sum(counts)
    return total > 0 and largest * len(counts) <= (1.0 + MAX_PAD_WASTE) * total


def _pad_rows(a_NK: Tensor, counts: list[int], capacity: int) -> Tensor:
    """Scatter expert-contiguous rows into a zero-padded ``(E, capacity, K)`` batch."""
    num_groups = len(counts)
    padded = a_NK.new_zeros(num_groups, capacity, a_NK.shape[1])
    start = 0
    for e, count in enumerate(counts):
        if count:
            padded[e, :count] = a_NK[start : start + count]
        start += count
    return padded


def _unpad_rows(padded_ECM: Tensor, counts: list[int], out_NM: Tensor) -> Tensor:
    start = 0
    for e, count in enumerate(counts):
        if count:
            out_NM[start : start + count] = padded_ECM[e, :count]
        start += count
    return out_NM


def grouped_mm(a_NK: Tensor, b_EKM: Tensor, counts: list[int], transpose_b: bool = False) -> Tensor:
    """``out[rows of e] = a[rows of e] @ b[e]`` (or ``@ b[e].T`` when ``transpose_b``)."""
    b = b_EKM.transpose(1, 2) if transpose_b else b_EKM
    out_NM = a_NK.new_empty(a_NK.shape[0], b.shape[2])
    if _use_bmm(counts, a_NK.device):
        capacity = max(counts)
        if capacity * len(counts) == a_NK.shape[0]:  # perfectly balanced: a free view
            return torch.bmm(a_NK.view(len(counts), capacity, -1), b).reshape(a_NK.shape[0], -1)
        return _unpad_rows(torch.bmm(_pad_rows(a_NK, counts, capacity), b), counts, out_NM)
    start = 0
    for e, count in enumerate(counts):
        if count:
            torch.mm(a_NK[start : start + count], b[e], out=out_NM[start : start + count])
        start += count
    return out_NM


def grouped_weight_grad(a_NK: Tensor, g_NM: Tensor, counts: list[int]) -> Tensor:
    """``dW[e] = a[rows of e].T @ g[rows of e]``, zero for experts without rows; shape ``(E, K, M)``."""
    num_groups = len(counts)
    if _use_bmm(counts, a_NK.device):
        capacity = max(counts)
        if capacity * num_groups == a_NK.shape[0]:
            a = a_NK.view(num_groups, capacity, -1)
            g = g_NM.view(num_groups, capacity, -1)
        else:
            a = _pad_rows(a_NK, counts, capacity)
            g = _pad_rows(g_NM, counts, capacity)
        return torch.bmm(a.transpose(1, 2), g)
    out_EKM = a_NK.new_zeros(num_groups, a_NK.shape[1], g_NM.shape[1])
    start = 0
    for e, count in enumerate(counts):
        if count:
            torch.mm(a_NK[start : start + count].t(), g_NM[start : start + count], out=out_EKM[e])
        start += count
    return out_EKM
