"""``moe_tsfm``: a small pretrained forecasting MoE: a decoder-only, channel-independent, patch-based Transformer
with MoE feed-forwards (what Time-MoE and Moirai-MoE do at billion scale, at a size a laptop trains and runs).

Legend: B batch, L look-back, H horizon, C channels, N series (B x C), p patch length, P patches, D model dim,
O output length (steps forecast by one position).

- Channel independence: every channel of a ``(B, L, C)`` input is a separate univariate series; no weight depends
  on C, L or H, so one set of weights serves any channel count, look-back and horizon.
- Patches: the look-back is cut into non-overlapping patches of ``patch_len`` steps (the oldest ``L mod p`` steps
  are dropped; at most ``max_patches`` of the newest patches are kept). Each patch is one token.
- Causal instance normalisation (RevIN-style, Kim et al. 2022, made causal): the token of patch ``j`` is normalised
  by the mean and std of the series up to the end of patch ``j`` (prefix statistics), and the forecast made at
  position ``j`` is de-normalised by the same statistics. The last position's statistics are those of the whole
  look-back, i.e. plain RevIN at inference; no position sees a statistic of later patches.
- Decoder-only: pre-norm blocks with causal self-attention (rotary position embeddings, so no table caps the
  context) and an MoE feed-forward (:class:`moezoo.layers.MoE`, top-k, dropless: with no capacity limit a token's
  routing never depends on other tokens, which keeps the model causal). ``moe={"dense": True}`` is the dense twin.
- Next-patch objective: position ``j`` forecasts the ``out_len`` steps after patch ``j`` (``out_len`` a multiple of
  ``patch_len``; TimesFM's longer output patch), so one forward pass trains every position.
- Any horizon: autoregressive rollout; forecast ``out_len`` steps from the last position, append them to the
  context, repeat until ``H`` steps exist.

Seg-MoE (contiguous segments routed together) is not offered: a segment mixes patches ``j..j+w-1`` in one expert
input, so the output at ``j`` would see later patches; the token-wise router is the causal choice.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moezoo.layers import MoEAux
from moezoo.layers.routers import ROUTER_STATE
from moezoo.models.blocks import build_ffn, run_ffn, share_router_modules
from moezoo.models.patchtst import check_forecast_sizes
from moezoo.models.registry import register_model
from moezoo.models.spec import MoESpec, build_kwargs, register_spec_argument

register_spec_argument("moe_tsfm")
#: this family's MoE: token-wise top-2 of 8 experts in every block plus a gated shared expert, dropless
MOE_DEFAULTS: dict[str, Any] = dict(
    router="topk", num_experts=8, top_k=2, moe_every=1, moe_offset=0, num_shared_experts=1, shared_expert_gate=True,
)  # fmt: skip


def rotary(x_NHTd: Tensor, base: float = 10000.0) -> Tensor:
    """Rotary position embedding (Su et al. 2021) over the token axis of ``(N, heads, T, d)``, ``d`` even."""
    T, d = x_NHTd.shape[-2], x_NHTd.shape[-1]
    inv = base ** (-torch.arange(0, d, 2, device=x_NHTd.device, dtype=torch.float32) / d)
    angle_Td2 = torch.arange(T, device=x_NHTd.device, dtype=torch.float32)[:, None] * inv[None]
    cos, sin = angle_Td2.cos().to(x_NHTd.dtype), angle_Td2.sin().to(x_NHTd.dtype)
    x1, x2 = x_NHTd[..., 0::2], x_NHTd[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention with a causal mask and rotary embeddings on queries and keys."""

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads or (dim // num_heads) % 2:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads} into an even head width")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.dropout = dropout

    def forward(self, x_NTD: Tensor) -> Tensor:
        N, T, D = x_NTD.shape
        q, k, v = self.qkv(x_NTD).reshape(N, T, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k = rotary(q), rotary(k)
        drop = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=drop, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(N, T, D))


class DecoderBlock(nn.Module):
    """Pre-norm decoder block: ``x + drop(attn(norm(x)))``, then ``x + drop(ffn(norm(x)))`` (MoE or dense)."""

    def __init__(self, dim: int, num_heads: int, ffn: nn.Module, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, num_heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = ffn
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, auxes: list[MoEAux]) -> Tensor:
        x = x + self.drop(self.attn(self.norm1(x)))
        return x + self.drop(run_ffn(self.ffn, self.norm2(x), auxes))


def prefix_stats(patches_NPp: Tensor, eps: float = 1e-5) -> tuple[Tensor, Tensor]:
    """Mean and std ``(N, P, 1)`` of each series up to the end of each patch (causal instance statistics).

    The series is shifted by its first patch's mean first (known to every position), so that the running sums
    do not lose precision on series far from zero."""
    shift_N11 = patches_NPp[:, :1].mean(-1, keepdim=True)
    z = patches_NPp - shift_N11
    count_P1 = torch.arange(1, z.shape[1] + 1, device=z.device, dtype=z.dtype)[:, None] * z.shape[2]
    mean = z.sum(-1, keepdim=True).cumsum(1) / count_P1
    var = (z.square().sum(-1, keepdim=True).cumsum(1) / count_P1 - mean.square()).clamp_min(0.0)
    return mean + shift_N11, torch.sqrt(var + eps)


class MoETSFM(nn.Module):
    """Decoder-only MoE forecaster: ``forward(x (B, L, C)) -> (B, pred_len, C)``.

    Args:
        seq_len: the look-back the task feeds (any ``L >= patch_len`` works; the oldest ``L mod patch_len`` steps
            and all but the newest ``max_patches`` patches are ignored).
        pred_len: the horizon ``forward`` returns (:meth:`forecast` takes any).
        num_channels: the channels of ``forward``'s input (no weight depends on it).
        patch_len: steps per patch token p.
        out_len: steps forecast by one position O (a multiple of ``patch_len``).
        max_patches: the longest context in patches (pretraining windows hold this many).
        dim, depth, num_heads, ffn_dim: Transformer width, blocks, heads and one expert's hidden width.
        moe: a :class:`~moezoo.models.spec.MoESpec` or a mapping of its fields over :data:`MOE_DEFAULTS`; the router
            must be per-token and dropless (no ``capacity_factor``), or causality breaks. ``{"dense": True}`` is
            the dense twin (one FFN of the active width).
        dropout: attention and residual-branch dropout.
        eps: added to the variance of the causal normalisation, on the scale of the series the model reads
            (standardised ones). 1e-5 (the default, the first release's) only guards against division by zero: a
            flat prefix then turns the next steps into targets of up to +-1000 (on that release's mixture, targets
            beyond +-10 carried 47% of a zero forecast's Huber loss); ``moe_tsfm_small.rdatasets_synth`` uses 0.01,
            a std floor of 0.1 (issue 20).
    """

    def __init__(
        self,
        seq_len: int = 336,
        pred_len: int = 96,
        num_channels: int = 7,
        patch_len: int = 16,
        out_len: int = 96,
        max_patches: int = 24,
        dim: int = 64,
        depth: int = 4,
        num_heads: int = 4,
        ffn_dim: int = 128,
        activation: str = "gelu",
        moe: MoESpec | Mapping[str, Any] | None = None,
        dropout: float = 0.1,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        check_forecast_sizes(seq_len, pred_len, num_channels)
        for name, value in (("patch_len", patch_len), ("out_len", out_len), ("max_patches", max_patches)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if out_len % patch_len:
            raise ValueError(f"out_len={out_len} must be a multiple of patch_len={patch_len}")
        if seq_len < patch_len:
            raise ValueError(f"seq_len={seq_len} must be at least patch_len={patch_len}")
        spec = MoESpec.resolve(moe, MOE_DEFAULTS)
        spec.check_depth(depth)
        spec.check_side_inputs((ROUTER_STATE,), "moe_tsfm")
        if not spec.dense and (spec.router == "segment" or spec.router_kwargs.get("capacity_factor") is not None):
            raise ValueError(
                f"moe: router {spec.router!r} with router_kwargs {spec.router_kwargs} breaks causality; use a "
                f"per-token router without capacity_factor (e.g. 'topk')"
            )
        self.seq_len, self.pred_len, self.num_channels = seq_len, pred_len, num_channels
        self.patch_len, self.out_len, self.max_patches, self.eps = patch_len, out_len, max_patches, eps
        self.spec = spec
        self.patch_embed = nn.Linear(patch_len, dim)
        ffns = [build_ffn(dim, ffn_dim, activation, spec, i) for i in range(depth)]
        self.blocks = nn.ModuleList(DecoderBlock(dim, num_heads, ffn, dropout) for ffn in ffns)
        share_router_modules(self.blocks)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, out_len)

    @property
    def window_len(self) -> int:
        """Steps of one pretraining window: ``max_patches`` patches of context plus ``out_len`` beyond the last."""
        return self.max_patches * self.patch_len + self.out_len

    def positions(self, series_NT: Tensor) -> tuple[Tensor, Tensor, Tensor, list[MoEAux]]:
        """Every position's normalised forecast ``(N, P, O)``, the prefix mean and std ``(N, P, 1)`` that
        de-normalise it, and the MoE aux results. ``T`` must be a multiple of ``patch_len`` (P = T / p)."""
        N, T = series_NT.shape
        if T % self.patch_len or T == 0:
            raise ValueError(f"series length {T} must be a positive multiple of patch_len={self.patch_len}")
        patches = series_NT.reshape(N, T // self.patch_len, self.patch_len)
        mean, std = prefix_stats(patches, self.eps)
        tokens = self.patch_embed((patches - mean) / std)
        auxes: list[MoEAux] = []
        for block in self.blocks:
            tokens = block(tokens, auxes)
        return self.head(self.norm(tokens)), mean, std, auxes

    def next_patch_targets(self, window_NW: Tensor) -> tuple[Tensor, Tensor, list[MoEAux]]:
        """The pretraining objective's pair for windows of ``P * patch_len + out_len`` steps: every position's
        forecast and its target ``(N, P, O)``, both on that position's normalised scale, and the aux results."""
        N, W = window_NW.shape
        context = W - self.out_len
        if context < self.patch_len or context % self.patch_len:
            raise ValueError(
                f"window length {W} must be P * patch_len + out_len (patch_len={self.patch_len}, "
                f"out_len={self.out_len}, P >= 1)"
            )
        pred, mean, std, auxes = self.positions(window_NW[:, :context])
        target = window_NW[:, self.patch_len :].unfold(1, self.out_len, self.patch_len)
        return pred, (target - mean) / std, auxes

    def crop(self, series_NL: Tensor) -> Tensor:
        """The context the model reads: the newest whole patches, at most ``max_patches`` of them."""
        L = series_NL.shape[1]
        keep = min(L - L % self.patch_len, self.max_patches * self.patch_len)
        if keep < self.patch_len:
            raise ValueError(f"the look-back has {L} steps; at least patch_len={self.patch_len} are needed")
        return series_NL[:, L - keep :]

    def forecast(self, series_NL: Tensor, horizon: int) -> tuple[Tensor, list[MoEAux]]:
        """``horizon`` steps ``(N, horizon)`` after each series by autoregressive rollout; the aux results are the
        first pass's (the routing of the observed look-back)."""
        if not isinstance(horizon, int) or isinstance(horizon, bool) or horizon < 1:
            raise ValueError(f"horizon must be a positive integer, got {horizon!r}")
        context = self.crop(series_NL)
        outputs: list[Tensor] = []
        first: list[MoEAux] | None = None
        done = 0
        while done < horizon:
            pred, mean, std, auxes = self.positions(context)
            first = auxes if first is None else first
            step = pred[:, -1] * std[:, -1] + mean[:, -1]
            outputs.append(step)
            done += self.out_len
            if done < horizon:
                context = self.crop(torch.cat([context, step], dim=1))
        assert first is not None
        return torch.cat(outputs, dim=1)[:, :horizon], first

    def forward_with_aux(self, x: Tensor) -> tuple[Tensor, list[MoEAux]]:
        if x.dim() != 3 or x.shape[2] != self.num_channels:
            raise ValueError(f"x must have shape (B, L, num_channels={self.num_channels}), got {tuple(x.shape)}")
        B, L, C = x.shape
        y_NH, auxes = self.forecast(x.permute(0, 2, 1).reshape(B * C, L), self.pred_len)
        return y_NH.reshape(B, C, self.pred_len).permute(0, 2, 1), auxes

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_with_aux(x)[0]


def _moe_tsfm(defaults: dict[str, Any], kwargs: dict[str, Any]) -> MoETSFM:
    return MoETSFM(**build_kwargs("moe_tsfm", defaults, kwargs))


@register_model
def moe_tsfm_debug(**kwargs: Any) -> MoETSFM:
    """2 blocks of width 16, patches of 4, 8 patches of context, output 8 steps, 4 experts top-2: for tests."""
    defaults = dict(
        seq_len=32, pred_len=8, num_channels=3, patch_len=4, out_len=8, max_patches=8, dim=16, depth=2,
        num_heads=2, ffn_dim=16, moe=dict(num_experts=4, top_k=2), dropout=0.0,
    )  # fmt: skip
    return _moe_tsfm(defaults, kwargs)


@register_model
def moe_tsfm_small(**kwargs: Any) -> MoETSFM:
    """The released size: 4 blocks of width 64 (4 heads), 8 experts of 128 top-2 + a gated shared expert of 128
    in every block, patches of 16, 24 patches (384 steps) of context, 96 steps per position."""
    defaults = dict(
        seq_len=336, pred_len=96, num_channels=7, patch_len=16, out_len=96, max_patches=24, dim=64, depth=4,
        num_heads=4, ffn_dim=128, moe=dict(num_experts=8, top_k=2), dropout=0.1,
    )  # fmt: skip
    return _moe_tsfm(defaults, kwargs)
