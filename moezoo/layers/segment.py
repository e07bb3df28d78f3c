"""Seg-MoE (Ortigossa & Segal, 2026): contiguous segments of w tokens are routed, and processed, as one unit.

Legend: L tokens per sequence, D token dim, w segment size, S = ceil(L / w) segments per sequence,
W = w * D segment width, E experts, K experts per segment, F expert hidden.

The layer views a sequence ``(..., L, D)`` as segments ``(..., S, W)``: it zero-pads the end of the sequence to
a multiple of w and concatenates each run of w tokens into one row. The :class:`SegmentRouter` scores the whole
segment (top-1 of E by default) and each expert is an FFN ``W -> F -> W`` that sees the concatenated segment, so
its gate scales every token of the segment. After the view this is an ordinary sparse MoE whose "tokens" are
segments, so the core router, dispatcher (:func:`moezoo.ops.expert_ffn`) and grouped experts run unchanged.
``w = 1`` is ordinary token-wise MoE.

Why the concatenated segment and not a per-token expert applied to each token of the segment: the point of
Seg-MoE is that an expert models the interactions inside its segment; a per-token expert would share only the
routing decision. Per token, a segment expert costs the FLOPs of a token expert of the same hidden width F
(``2 * W * F`` per segment over w tokens); it holds w times the parameters. Padding tokens are zeros: the
bias-free gate and experts see them as absent features, and their outputs are cut off.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moezoo.layers.experts import FeedForward
from moezoo.layers.moe import MoE, MoEAux
from moezoo.layers.routers import TopKRouter, register_router


def _check_segment_size(segment_size: int) -> None:
    if not isinstance(segment_size, int) or isinstance(segment_size, bool) or segment_size < 1:
        raise ValueError(f"segment_size must be a positive integer, got {segment_size!r}")


def to_segments(x_LD: Tensor, segment_size: int) -> Tensor:
    """``(..., L, D) -> (..., S, w*D)``: zero-pad the token axis to a multiple of w and concatenate each run of w."""
    if x_LD.dim() < 2:
        raise ValueError(f"x must have shape (..., L, D) with a token axis, got shape {tuple(x_LD.shape)}")
    num_tokens, dim = x_LD.shape[-2], x_LD.shape[-1]
    pad = -num_tokens % segment_size
    if pad:
        x_LD = F.pad(x_LD, (0, 0, 0, pad))
    return x_LD.reshape(*x_LD.shape[:-2], (num_tokens + pad) // segment_size, segment_size * dim)


def from_segments(y_SW: Tensor, segment_size: int, num_tokens: int) -> Tensor:
    """``(..., S, w*D) -> (..., L, D)``: split each segment back into its w tokens and drop the padding."""
    num_segments, width = y_SW.shape[-2], y_SW.shape[-1]
    y_LD = y_SW.reshape(*y_SW.shape[:-2], num_segments * segment_size, width // segment_size)
    return y_LD[..., :num_tokens, :]


class SegmentRouter(TopKRouter):
    """Top-k (default top-1) softmax routing of whole segments: ``dim`` is the segment width W = w * D.

    One gate vector per expert scores the concatenated segment; the selected expert's probability is the gate of
    the segment (every token in it). All options of :class:`TopKRouter` (noise, capacity, balance loss) apply to
    segments. Used by :class:`SegmentMoE`, which builds the segment view.
    """

    def __init__(self, dim: int, num_experts: int, top_k: int = 1, segment_size: int = 1, **kwargs: Any) -> None:
        _check_segment_size(segment_size)
        if not isinstance(dim, int) or dim < 1 or dim % segment_size:
            raise ValueError(
                f"dim (the segment width w*D) must be a positive multiple of segment_size={segment_size}, got {dim!r}"
            )
        super().__init__(dim, num_experts, top_k=top_k, **kwargs)
        self.segment_size = segment_size
        self.token_dim = dim // segment_size

    @classmethod
    def check_options(cls, num_experts: int | None, options: Mapping[str, Any]) -> None:
        super().check_options(num_experts, options)
        _check_segment_size(options["segment_size"])


register_router("segment", SegmentRouter)


class SegmentMoE(MoE):
    """Seg-MoE layer: ``x (..., L, D) -> (y (..., L, D), aux)`` with segments of ``segment_size`` tokens.

    Args:
        dim: token width D.
        ffn_dim: hidden width F of one segment expert (input and output width w * D).
        num_experts: routed experts E.
        top_k: experts per segment (the paper uses 1).
        segment_size: tokens per segment w; 1 is token-wise MoE.
        router_kwargs: extra :class:`SegmentRouter` arguments (``balance_coef``, ``z_loss_coef``, ``noise`` ...).
        activation: ``"gelu"`` or ``"swiglu"``.
        num_shared_experts: always-on segment experts of width F (fused into one FFN on the segment).
        shared_expert_gate: scale the shared expert's output by a sigmoid gate computed from the segment.
        backend: expert FFN backend (see :mod:`moezoo.ops`).

    ``mask (..., L)`` marks real tokens: masked tokens are zeroed before the segment view, a segment with no real
    token is routed nowhere, and masked outputs are 0. ``side`` inputs must be per sample (leading dims only).
    The aux result counts segments, not tokens.
    """

    def __init__(
        self,
        dim: int,
        ffn_dim: int,
        num_experts: int = 4,
        top_k: int = 1,
        segment_size: int = 1,
        router_kwargs: Mapping[str, Any] | None = None,
        activation: str = "gelu",
        num_shared_experts: int = 0,
        shared_expert_gate: bool = False,
        backend: str | None = None,
        check_finite: bool = True,
    ) -> None:
        _check_segment_size(segment_size)
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        if not isinstance(num_experts, int) or num_experts < 1:
            raise ValueError(f"num_experts must be a positive integer, got {num_experts!r}")
        router = SegmentRouter(
            segment_size * dim, num_experts, top_k=top_k, segment_size=segment_size, **dict(router_kwargs or {})
        )
        super().__init__(
            segment_size * dim,
            ffn_dim,
            num_experts=num_experts,
            top_k=top_k,
            router=router,
            activation=activation,
            num_shared_experts=num_shared_experts,
            shared_expert_gate=shared_expert_gate,
            backend=backend,
            check_finite=check_finite,
        )
        self.token_dim = dim
        self.segment_size = segment_size

    def forward(
        self, x: Tensor, mask: Tensor | None = None, side: Mapping[str, Tensor] | None = None
    ) -> tuple[Tensor, MoEAux]:
        if x.dim() < 2 or x.shape[-1] != self.token_dim:
            raise ValueError(f"x must have shape (..., L, D={self.token_dim}), got shape {tuple(x.shape)}")
        num_tokens = x.shape[-2]
        seg_mask = None
        if mask is not None:
            if mask.shape != x.shape[:-1] or mask.dtype != torch.bool:
                raise ValueError(
                    f"mask must be a bool tensor of shape {tuple(x.shape[:-1])}, got {mask.dtype} {tuple(mask.shape)}"
                )
            x = x * mask.unsqueeze(-1).to(x.dtype)
            seg_mask = to_segments(mask.unsqueeze(-1), self.segment_size).any(-1)
        y_SW, aux = super().forward(to_segments(x, self.segment_size), seg_mask, side)
        y = from_segments(y_SW, self.segment_size, num_tokens)
        if mask is not None:
            y = y * mask.unsqueeze(-1).to(y.dtype)
        return y, aux


class SegmentFeedForward(nn.Module):
    """A dense FFN on the segment view (``W -> hidden -> W``): the dense twin of a :class:`SegmentMoE`.

    Same active parameters per segment and FLOPs per token as the MoE whose active width is ``hidden_dim``.
    """

    def __init__(self, dim: int, hidden_dim: int, segment_size: int = 1, activation: str = "gelu") -> None:
        super().__init__()
        _check_segment_size(segment_size)
        self.token_dim = dim
        self.segment_size = segment_size
        self.ffn = FeedForward(segment_size * dim, hidden_dim, activation)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() < 2 or x.shape[-1] != self.token_dim:
            raise ValueError(f"x must have shape (..., L, D={self.token_dim}), got shape {tuple(x.shape)}")
        return from_segments(self.ffn(to_segments(x, self.segment_size)), self.segment_size, x.shape[-2])
