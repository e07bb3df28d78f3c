"""``moe_patchtst``: a patch-based, channel-independent Transformer forecaster (PatchTST, Nie et al. 2023) whose
feed-forwards are Seg-MoE layers (Ortigossa & Segal 2026).

Legend: B batch, L look-back, H horizon, C channels, P patches per series, D model dim, w segment size.

Each channel is a separate series (channel independence): it is normalised by RevIN (its own mean and std over
the look-back, with an optional learned affine per channel), cut into P overlapping patches of ``patch_len``
steps (stride ``stride``, the last value repeated ``stride`` times at the end as in PatchTST), embedded, run
through pre-norm Transformer blocks and decoded by a flatten-linear head into the H future steps; RevIN is
then undone. The MoE settings are one :class:`~moezoo.models.spec.MoESpec` (``moe=``) whose default router is
``"segment"``: block ``i``'s feed-forward is a :class:`~moezoo.layers.segment.SegmentMoE` with segment size
``moe.segment_sizes[i]`` (1 = token-wise MoE), optionally with a sigmoid-gated shared expert.

``moe={"dense": True}`` is the dense twin: every MoE becomes a dense FFN on the same segment view with hidden
width ``top_k * ffn_dim + num_shared_experts * ffn_dim``, i.e. the same active parameters and FLOPs; with segment
size 1 this is the plain PatchTST FFN.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Attention
from torch import Tensor, nn

from moezoo.layers import MoEAux
from moezoo.layers.routers import ATTENTION_PROBS, ROUTER_STATE
from moezoo.models.blocks import attend, build_ffn, build_shared_router, run_ffn, share_router_modules
from moezoo.models.registry import register_model
from moezoo.models.spec import MoESpec, build_kwargs, register_spec_argument

register_spec_argument("moe_patchtst")
#: this family's MoE: Seg-MoE, 4 experts top-1 plus a sigmoid-gated shared expert, in every block
MOE_DEFAULTS: dict[str, Any] = dict(
    router="segment", num_experts=4, top_k=1, moe_every=1, moe_offset=0, num_shared_experts=1,
    shared_expert_gate=True, segment_sizes=1,
)  # fmt: skip


class RevIN(nn.Module):
    """Reversible instance normalisation (Kim et al. 2022) over the time axis of ``(B, L, C)``."""

    def __init__(self, num_channels: int, affine: bool = True, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_channels = num_channels
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels)) if affine else None
        self.bias = nn.Parameter(torch.zeros(num_channels)) if affine else None

    def normalize(self, x_BLC: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        mean_B1C = x_BLC.mean(1, keepdim=True).detach()
        std_B1C = torch.sqrt(x_BLC.var(1, keepdim=True, unbiased=False) + self.eps).detach()
        z = (x_BLC - mean_B1C) / std_B1C
        if self.weight is not None and self.bias is not None:
            z = z * self.weight + self.bias
        return z, mean_B1C, std_B1C

    def denormalize(self, z_BHC: Tensor, mean_B1C: Tensor, std_B1C: Tensor) -> Tensor:
        if self.weight is not None and self.bias is not None:
            z_BHC = (z_BHC - self.bias) / (self.weight + self.eps * self.eps)
        return z_BHC * std_B1C + mean_B1C


class ForecastBlock(nn.Module):
    """Pre-norm block with dropout on both residual branches: ``x + drop(attn(norm(x)))``, then the FFN slot."""

    def __init__(self, dim: int, num_heads: int, ffn: nn.Module, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=True, attn_drop=dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = ffn
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, auxes: list[MoEAux]) -> Tensor:
        h, side = attend(self.attn, self.norm1(x), self.ffn, None)  # attention probabilities for a router needing them
        x = x + self.drop(h)
        return x + self.drop(run_ffn(self.ffn, self.norm2(x), auxes, side=side))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_forecast_sizes(seq_len: Any, pred_len: Any, num_channels: Any) -> None:
    """Every forecaster's sizes: look-back L, horizon H and channels C, positive integers."""
    for name, value in (("seq_len", seq_len), ("pred_len", pred_len), ("num_channels", num_channels)):
        if not _is_int(value) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def check_patching(patch_len: Any, stride: Any, seq_len: int) -> None:
    """PatchTST's patching: ``1 <= patch_len <= seq_len`` and a positive ``stride``."""
    if not _is_int(patch_len) or not 1 <= patch_len <= seq_len:
        raise ValueError(f"patch_len must be an integer in [1, seq_len={seq_len}], got {patch_len!r}")
    if not _is_int(stride) or stride < 1:
        raise ValueError(f"stride must be a positive integer, got {stride!r}")


def check_forecast_input(x: Tensor, seq_len: int, num_channels: int) -> None:
    """A forecaster's input is ``(B, seq_len, num_channels)``."""
    if x.dim() != 3 or x.shape[1] != seq_len or x.shape[2] != num_channels:
        raise ValueError(f"x must have shape (B, seq_len={seq_len}, num_channels={num_channels}), got {tuple(x.shape)}")


def patchify(series_NL: Tensor, patch_len: int, stride: int) -> Tensor:
    """PatchTST's patching ``(N, L) -> (N, (L - patch_len) // stride + 2, patch_len)``: repeat the last value
    ``stride`` times at the end (``padding_patch="end"``), then unfold with step ``stride``."""
    padded = torch.cat([series_NL, series_NL[:, -1:].expand(-1, stride)], dim=1)
    return padded.unfold(1, patch_len, stride)


class MoEPatchTST(nn.Module):
    """PatchTST with Seg-MoE feed-forwards: ``forward(x (B, L, C)) -> (B, H, C)``.

    Args:
        seq_len: look-back L.
        pred_len: horizon H.
        num_channels: C (needed for RevIN's per-channel affine; the backbone is shared by all channels).
        patch_len, stride: patching of each channel's look-back.
        dim, depth, num_heads: Transformer width, blocks and heads.
        ffn_dim: hidden width F of one expert (and of the shared expert).
        moe: the MoE settings, a :class:`~moezoo.models.spec.MoESpec` or a mapping of its fields over
            :data:`MOE_DEFAULTS`: ``segment_sizes`` (segment size w per block, or one for all blocks; 1 is
            token-wise routing), ``num_experts``, ``top_k`` (experts per segment), ``num_shared_experts`` and
            ``shared_expert_gate`` (an always-on, sigmoid-gated shared expert of width F), ``router_kwargs``
            (:class:`~moezoo.layers.segment.SegmentRouter` options: ``balance_coef`` ...), ``dense`` (the dense
            twin: same active parameters and FLOPs).
        dropout: attention, residual-branch and embedding dropout; ``head_dropout`` before the head.
        revin, revin_affine: reversible instance normalisation and its learned affine.
    """

    def __init__(
        self,
        seq_len: int = 336,
        pred_len: int = 96,
        num_channels: int = 7,
        patch_len: int = 16,
        stride: int = 8,
        dim: int = 16,
        depth: int = 3,
        num_heads: int = 4,
        ffn_dim: int = 64,
        activation: str = "gelu",
        moe: MoESpec | Mapping[str, Any] | None = None,
        dropout: float = 0.2,
        head_dropout: float = 0.0,
        revin: bool = True,
        revin_affine: bool = True,
    ) -> None:
        super().__init__()
        check_forecast_sizes(seq_len, pred_len, num_channels)
        check_patching(patch_len, stride, seq_len)
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        spec = MoESpec.resolve(moe, MOE_DEFAULTS)
        spec.check_depth(depth)
        spec.check_side_inputs((ROUTER_STATE, ATTENTION_PROBS), "moe_patchtst")
        self.seq_len = seq_len
        self.pred_len = pred_len
        self.num_channels = num_channels
        self.patch_len = patch_len
        self.stride = stride
        self.num_patches = (seq_len - patch_len) // stride + 2  # +1 for the end padding of `stride` steps
        self.spec = spec
        self.revin = RevIN(num_channels, revin_affine) if revin else None
        self.patch_embed = nn.Linear(patch_len, dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, dim))
        trunc_normal_(self.pos_embed, std=0.02)
        self.drop = nn.Dropout(dropout)
        # One router instance for every MoE layer when the router class says so (Omni-router), as the Conformer does.
        shared = build_shared_router(dim, spec)
        self.shared_router = shared
        ffns = [build_ffn(dim, ffn_dim, activation, spec, i, router=shared) for i in range(depth)]
        self.blocks = nn.ModuleList(ForecastBlock(dim, num_heads, ffn, dropout) for ffn in ffns)
        share_router_modules(self.blocks)
        self.norm = nn.LayerNorm(dim)
        self.head_drop = nn.Dropout(head_dropout)
        self.head = nn.Linear(self.num_patches * dim, pred_len)

    def patchify(self, series_NL: Tensor) -> Tensor:
        """``(N, L) -> (N, P, patch_len)``: repeat the last value ``stride`` times, then unfold."""
        return patchify(series_NL, self.patch_len, self.stride)

    def forward_with_aux(self, x: Tensor) -> tuple[Tensor, list[MoEAux]]:
        check_forecast_input(x, self.seq_len, self.num_channels)
        batch = x.shape[0]
        stats = None
        if self.revin is not None:
            x, mean_B1C, std_B1C = self.revin.normalize(x)
            stats = (mean_B1C, std_B1C)
        series_NL = x.permute(0, 2, 1).reshape(batch * self.num_channels, self.seq_len)
        tokens = self.drop(self.patch_embed(self.patchify(series_NL)) + self.pos_embed)
        auxes: list[MoEAux] = []
        for block in self.blocks:
            tokens = block(tokens, auxes)
        flat = self.head_drop(self.norm(tokens).flatten(1))
        y_BHC = self.head(flat).reshape(batch, self.num_channels, self.pred_len).permute(0, 2, 1)
        if stats is not None and self.revin is not None:
            y_BHC = self.revin.denormalize(y_BHC, *stats)
        return y_BHC, auxes

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_with_aux(x)[0]


def _moe_patchtst(defaults: dict[str, Any], kwargs: dict[str, Any]) -> MoEPatchTST:
    return MoEPatchTST(**build_kwargs("moe_patchtst", defaults, kwargs))


@register_model
def moe_patchtst_debug(**kwargs: Any) -> MoEPatchTST:
    """2 blocks of width 16 on a look-back of 32 (8 patches of 8, stride 4), segment sizes 1 and 3: for tests."""
    defaults = dict(
        seq_len=32, pred_len=8, num_channels=3, patch_len=8, stride=4, dim=16, depth=2, num_heads=2, ffn_dim=16,
        moe=dict(num_experts=4, top_k=1, segment_sizes=[1, 3], num_shared_experts=1), dropout=0.0,
    )  # fmt: skip
    return _moe_patchtst(defaults, kwargs)


@register_model
def moe_patchtst_tiny(**kwargs: Any) -> MoEPatchTST:
    """PatchTST/42's ETTh1 size (3 blocks of width 16, 4 heads), 4 experts of 64 top-1 + a gated shared expert of
    64 (active width 128 = PatchTST's d_ff), multi-resolution segments [3, 5, 5] over 42 patches of L=336."""
    defaults = dict(
        seq_len=336, pred_len=96, num_channels=7, patch_len=16, stride=8, dim=16, depth=3, num_heads=4, ffn_dim=64,
        moe=dict(num_experts=4, top_k=1, segment_sizes=[3, 5, 5], num_shared_experts=1), dropout=0.3,
    )  # fmt: skip
    return _moe_patchtst(defaults, kwargs)


@register_model
def moe_patchtst_small(**kwargs: Any) -> MoEPatchTST:
    """PatchTST/42's large-dataset size (3 blocks of width 128, 16 heads), 4 experts of 128 top-1 + a gated shared
    expert of 128 (active width 256), segments [3, 5, 5]."""
    defaults = dict(
        seq_len=336, pred_len=96, num_channels=7, patch_len=16, stride=8, dim=128, depth=3, num_heads=16,
        ffn_dim=128, moe=dict(num_experts=4, top_k=1, segment_sizes=[3, 5, 5], num_shared_experts=1), dropout=0.2,
    )  # fmt: skip
    return _moe_patchtst(defaults, kwargs)
