"""``patchtst``: PatchTST as published (Nie et al. 2023, "A Time Series is Worth 64 Words"), the supervised model
of the public PatchTST code, as a dense baseline beside ``moe_patchtst``.

Legend: B batch, L look-back, H horizon, C channels, N = B * C channel series, P patches, D model dim, h heads.

Channel independent: every channel is its own series. RevIN (instance normalisation over the look-back,
without affine parameters in the published scripts) -> patches of ``patch_len`` with step ``stride``, the last value
repeated ``stride`` times at the end (P = (L - patch_len) // stride + 2, 42 for L=336) -> a linear patch embedding
plus a learned positional table (uniform in +-0.02) -> dropout -> ``depth`` *post-norm* encoder layers -> flatten
the (P, D) features of each series -> one linear head to H steps -> RevIN undone.

How this differs from ``moe_patchtst(moe={"dense": True, "segment_sizes": 1})`` (moezoo's dense twin); each
choice here is the public PatchTST code's:

- Layer: post-norm, ``x = norm(x + drop(attn(x)))`` then ``x = norm(x + drop(ffn(x)))``, no final norm; the twin
  is pre-norm with a final LayerNorm before the head.
- Norm: BatchNorm1d over D with statistics over every series and patch (``norm="batch"``); the twin: LayerNorm.
- Attention: residual attention (each layer adds the previous layer's pre-softmax scores), no dropout on the
  attention weights, dropout on the output projection and again on the residual branch; the twin: timm
  ``Attention`` with attention dropout = ``dropout``, no residual scores.
- FFN: Linear-GELU-Dropout-Linear; the twin's FFN has no inner dropout.
- RevIN without affine parameters (the scripts' ``affine=0``); the twin learns an affine per channel.
- Positions: a learned table initialised uniform in +-0.02; the twin: truncated normal, std 0.02.
- Head: flatten the (P, D) tokens -> Linear, ``head_dropout`` 0; the twin: LayerNorm, flatten -> Linear.

The published recipe (optimiser, schedule, epochs) lives in ``configs/timeseries/*patchtst*.yaml``: Adam without
weight decay, lr 1e-4 for the ETTh scripts, a step decay per epoch (constant for 4 epochs, then x0.9:
``moezoo.tasks.optim.StepDecayLR``), 100 epochs, batch 128, no effective early stopping (patience 100).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from moezoo.models.forecast_baselines import Forecaster
from moezoo.models.patchtst import RevIN, check_patching, patchify
from moezoo.models.registry import register_model

NORMS = ("batch", "layer")


class TokenBatchNorm(nn.BatchNorm1d):
    """BatchNorm over the feature axis of tokens ``(N, P, D)``: statistics over every series and patch."""

    def forward(self, x_NPD: Tensor) -> Tensor:
        return super().forward(x_NPD.transpose(1, 2)).transpose(1, 2)


def _norm(kind: str, dim: int) -> nn.Module:
    return TokenBatchNorm(dim) if kind == "batch" else nn.LayerNorm(dim)


class ResidualAttention(nn.Module):
    """Multi-head self-attention whose pre-softmax scores add those of the previous layer (RealFormer-style
    residual attention, as PatchTST): ``forward(x, prev) -> (out, scores)``, ``scores`` passed to the next layer."""

    def __init__(self, dim: int, num_heads: int, attn_dropout: float = 0.0, proj_dropout: float = 0.0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.attn_drop = nn.Dropout(attn_dropout)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_dropout)

    def forward(self, x_NPD: Tensor, prev_NhPP: Tensor | None = None) -> tuple[Tensor, Tensor]:
        n, p, d = x_NPD.shape
        q, k, v = self.qkv(x_NPD).reshape(n, p, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        scores_NhPP = (q @ k.transpose(-2, -1)) * self.scale
        if prev_NhPP is not None:
            scores_NhPP = scores_NhPP + prev_NhPP
        attn = self.attn_drop(scores_NhPP.softmax(dim=-1))
        out_NPD = (attn @ v).transpose(1, 2).reshape(n, p, d)
        return self.proj_drop(self.proj(out_NPD)), scores_NhPP


class PostNormEncoderLayer(nn.Module):
    """``x = norm(x + drop(attn(x)))``, then ``x = norm(x + drop(ffn(x)))``; the FFN has dropout after GELU."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, dropout: float, attn_dropout: float, norm: str) -> None:
        super().__init__()
        self.attn = ResidualAttention(dim, num_heads, attn_dropout, proj_dropout=dropout)
        self.drop_attn = nn.Dropout(dropout)
        self.norm_attn = _norm(norm, dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(ffn_dim, dim))
        self.drop_ffn = nn.Dropout(dropout)
        self.norm_ffn = _norm(norm, dim)

    def forward(self, x_NPD: Tensor, prev: Tensor | None) -> tuple[Tensor, Tensor]:
        out, scores = self.attn(x_NPD, prev)
        x_NPD = self.norm_attn(x_NPD + self.drop_attn(out))
        x_NPD = self.norm_ffn(x_NPD + self.drop_ffn(self.ffn(x_NPD)))
        return x_NPD, scores


class PatchTST(Forecaster):
    """The supervised PatchTST: ``forward(x (B, L, C)) -> (B, H, C)``.

    Args:
        seq_len, pred_len, num_channels: look-back L, horizon H and channels C.
        patch_len, stride: patching of each channel's look-back (16 and 8 in the paper).
        dim, depth, num_heads, ffn_dim: ``d_model``, ``e_layers``, ``n_heads`` and ``d_ff`` of the public scripts.
        dropout: residual, FFN, attention-projection and embedding dropout; ``attn_dropout`` on the attention
            weights (0 in the paper); ``head_dropout`` before the head (0 in the long-term scripts).
        norm: ``"batch"`` (the paper's BatchNorm) or ``"layer"``.
        res_attention: add the previous layer's attention scores (the paper's default).
        revin, revin_affine: reversible instance normalisation and its learned affine (off in the scripts).
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
        ffn_dim: int = 128,
        dropout: float = 0.3,
        attn_dropout: float = 0.0,
        head_dropout: float = 0.0,
        norm: str = "batch",
        res_attention: bool = True,
        revin: bool = True,
        revin_affine: bool = False,
    ) -> None:
        super().__init__(seq_len, pred_len, num_channels)
        check_patching(patch_len, stride, seq_len)
        if not isinstance(num_heads, int) or num_heads < 1 or dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads!r} (a positive integer)")
        if norm not in NORMS:
            raise ValueError(f"norm={norm!r} is unknown; choose one of {list(NORMS)}")
        self.patch_len = patch_len
        self.stride = stride
        self.num_patches = (seq_len - patch_len) // stride + 2
        self.res_attention = res_attention
        self.revin = RevIN(num_channels, revin_affine) if revin else None
        self.patch_embed = nn.Linear(patch_len, dim)
        self.pos_embed = nn.Parameter(torch.empty(self.num_patches, dim).uniform_(-0.02, 0.02))
        self.drop = nn.Dropout(dropout)
        self.layers = nn.ModuleList(
            PostNormEncoderLayer(dim, num_heads, ffn_dim, dropout, attn_dropout, norm) for _ in range(depth)
        )
        self.head_drop = nn.Dropout(head_dropout)
        self.head = nn.Linear(self.num_patches * dim, pred_len)

    def forecast(self, x_BLC: Tensor) -> Tensor:
        batch = x_BLC.shape[0]
        stats = None
        if self.revin is not None:
            x_BLC, mean_B1C, std_B1C = self.revin.normalize(x_BLC)
            stats = (mean_B1C, std_B1C)
        series_NL = x_BLC.transpose(1, 2).reshape(batch * self.num_channels, self.seq_len)
        tokens_NPD = self.drop(self.patch_embed(patchify(series_NL, self.patch_len, self.stride)) + self.pos_embed)
        scores = None
        for layer in self.layers:
            tokens_NPD, scores = layer(tokens_NPD, scores if self.res_attention else None)
        y_NH = self.head(self.head_drop(tokens_NPD.flatten(1)))
        y_BHC = y_NH.reshape(batch, self.num_channels, self.pred_len).transpose(1, 2)
        if stats is not None and self.revin is not None:
            y_BHC = self.revin.denormalize(y_BHC, *stats)
        return y_BHC


@register_model
def patchtst_debug(**kwargs: Any) -> PatchTST:
    """2 layers of width 16 on L=32 (8 patches of 8, stride 4), H=8, 3 channels, no dropout: for tests."""
    defaults = dict(
        seq_len=32, pred_len=8, num_channels=3, patch_len=8, stride=4, dim=16, depth=2, num_heads=2, ffn_dim=32,
        dropout=0.0,
    )  # fmt: skip
    return PatchTST(**{**defaults, **kwargs})


@register_model
def patchtst_tiny(**kwargs: Any) -> PatchTST:
    """The public ETTh1/ETTh2 scripts' PatchTST/42: d_model 16, 3 layers, 4 heads, d_ff 128, dropout 0.3, patches of
    16 with stride 8 over L=336 (the scripts' ``fc_dropout 0.3`` only feeds the pretraining head, unused here)."""
    defaults = dict(
        seq_len=336, pred_len=96, num_channels=7, patch_len=16, stride=8, dim=16, depth=3, num_heads=4, ffn_dim=128,
        dropout=0.3,
    )  # fmt: skip
    return PatchTST(**{**defaults, **kwargs})


@register_model
def patchtst_small(**kwargs: Any) -> PatchTST:
    """The public scripts' size for ETTm1/ETTm2, Weather, Electricity and Traffic: d_model 128, 3 layers, 16 heads,
    d_ff 256, dropout 0.2, patches of 16 with stride 8 over L=336."""
    defaults = dict(
        seq_len=336, pred_len=96, num_channels=7, patch_len=16, stride=8, dim=128, depth=3, num_heads=16,
        ffn_dim=256, dropout=0.2,
    )  # fmt: skip
    return PatchTST(**{**defaults, **kwargs})
