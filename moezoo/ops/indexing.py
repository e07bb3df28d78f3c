"""Pair filters, per-expert counts and size arithmetic written so that a MoE layer traces under ``torch.compile``.

Legend: N pairs (or any 1-D index space), E experts.

What stops a ``torch.compile`` trace in MoE code, and what this module does about it:

- host syncs (``.item()``, ``.tolist()``) whose values then drive Python control flow: none in the layer, the
  routers or the reference backend; the fused path and the Triton backend keep theirs inside custom ops;
- Python comparisons of a data-dependent size (``if num_tokens == 0``, ``max(T, 1)``): sizes derived from such a
  length go through :func:`size_max` / :func:`size_min`, which stay symbolic;
- ``bincount``, whose output shape depends on the data: :func:`count_per_expert` scatter-adds into a fixed
  ``(E,)`` tensor instead;
- filters with a data-dependent length (capacity dropping, null experts, ReLU routing, ProMoE's two token sets,
  a padding mask): :func:`true_indices`, the one filter of the core. Under ``fullgraph=True`` dynamo keeps it in
  the graph with an unbacked symbolic length; a default compile splits the graph at each such filter (dynamo's
  rule for data-dependent output shapes, lifted by ``torch._dynamo.config.capture_dynamic_output_shape_ops``).
  Routers without a filter (top-k without capacity or null experts, sigmoid, expert choice, Sinkhorn, Soft MoE
  and the speech routers) trace into one graph either way.
"""

from __future__ import annotations

import torch
from torch import Tensor


def true_indices(mask_N: Tensor) -> Tensor:
    """Positions of the True entries of a 1-D bool tensor, ascending (``mask.nonzero().squeeze(1)``), int64."""
    if mask_N.dim() != 1 or mask_N.dtype != torch.bool:
        raise ValueError(f"mask must be a 1-D bool tensor, got {mask_N.dtype} of shape {tuple(mask_N.shape)}")
    return torch.nonzero(mask_N).reshape(-1)


def count_per_expert(expert_idx_N: Tensor, num_experts: int) -> Tensor:
    """``bincount(expert_idx, minlength=E)`` with a fixed output shape ``(E,)``, int64 (indices must be < E)."""
    counts_E = torch.zeros(num_experts, dtype=torch.int64, device=expert_idx_N.device)
    return counts_E.scatter_add_(0, expert_idx_N, torch.ones_like(expert_idx_N))


def size_max(a: int | torch.SymInt, b: int | torch.SymInt) -> int | torch.SymInt:
    """``max(a, b)`` of sizes, one of which may be data-dependent (a Python ``max`` would have to compare them)."""
    if isinstance(a, int) and isinstance(b, int):
        return max(a, b)
    return torch.sym_max(a, b)


def size_min(a: int | torch.SymInt, b: int | torch.SymInt) -> int | torch.SymInt:
    """``min(a, b)`` of sizes, one of which may be data-dependent."""
    if isinstance(a, int) and isinstance(b, int):
        return min(a, b)
    return torch.sym_min(a, b)
