"""``moe_conformer``: a Conformer-CTC speech recogniser whose feed-forward modules are MoE layers.

Legend: B batch, T input frames (10 ms log-mel), L encoder frames (T/4), D model dim, M mel bins, V vocabulary
(CTC blank = 0), E experts, A languages, G global-embedding dim.

Layout: 4x convolutional subsampling -> Conformer blocks (macaron FFN, self-attention, convolution module, FFN)
-> CTC head. Both FFNs of a block are MoE layers (or dense FFNs in the dense twin, ``dense=True``, whose width is
the active expert width per frame). Padding frames are masked everywhere (attention, convolution, MoE ``mask=``).

The MoE settings are one :class:`~moezoo.models.spec.MoESpec` (``moe={"router": "omni", ...}``); any registered
router that routes single frames works (``topk``, ``expert_choice``, ``sigmoid_lossfree``, ``soft`` ...). What the
model adds for a router is decided by the router class itself, never by a list of names here:

- a router class with ``shared_across_layers`` (``"omni"``) is built once and passed to every MoE layer
  (Omni-router);
- a router that reads the side input ``lid_probs`` (``"language"``, LR-MoE): a frame-level language-ID head on the
  output of block ``lid_layer - 1`` gives posteriors over A = E languages, the per-token side input that routes
  every MoE layer of blocks ``>= lid_layer`` (earlier blocks are dense). The task trains the head with a
  frame-level LID loss;
- a router that reads ``global_embedding`` (``"global_embedding"``, SpeechMoE2): each MoE layer routes on
  ``[frame; g]`` with ``g`` a per-utterance embedding (statistics pooling of the subsampled input, projected to G),
  passed as the per-sample side input.
- a router that ``carries_state`` (``"recurrent"``, RMoE) gets the previous MoE layer's GRU state from ``run_ffn``
  (both FFNs of every block, in call order) and one GRU cell shared by every layer (``share_router_modules``).

With the default ``"topk"`` router and ``top_k=1`` every MoE layer has its own Switch router (the baseline).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moezoo.layers import MoE, MoEAux
from moezoo.layers.routers import ROUTER_STATE
from moezoo.models.blocks import build_ffn, build_shared_router, run_ffn, share_router_modules
from moezoo.models.registry import register_model
from moezoo.models.spec import MoESpec, build_kwargs, register_spec_argument

register_spec_argument("moe_conformer")
#: the side inputs this model computes for routers that read them (``Router.needs_side``)
SIDE_INPUTS = ("lid_probs", "global_embedding", ROUTER_STATE)


@dataclass
class CTCOutput:
    """What the encoder returns: CTC log-probabilities, valid lengths and (LR-MoE) language-ID logits."""

    log_probs_BLV: Tensor
    lengths_B: Tensor
    lid_logits_BLA: Tensor | None = None

    @property
    def mask_BL(self) -> Tensor:
        return lengths_to_mask(self.lengths_B, self.log_probs_BLV.shape[1])


def lengths_to_mask(lengths_B: Tensor, max_len: int) -> Tensor:
    """True for the first ``lengths[b]`` positions of each row."""
    return torch.arange(max_len, device=lengths_B.device)[None, :] < lengths_B[:, None]


def subsampled_lengths(lengths_B: Tensor) -> Tensor:
    """Frames after two stride-2 convolutions with padding 1: ``ceil(ceil(T / 2) / 2)``."""
    return (lengths_B + 3) // 4


class ConvSubsampling(nn.Module):
    """Two 3x3 stride-2 convolutions over (time, mel), then a projection to D: (B, T, M) -> (B, ceil(T/4), D)."""

    def __init__(self, n_mels: int, dim: int, channels: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, channels, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.Conv2d(channels, channels, 3, stride=2, padding=1),
            nn.SiLU(),
        )
        self.proj = nn.Linear(channels * ((n_mels + 3) // 4), dim)

    def forward(self, x_BTM: Tensor, lengths_B: Tensor) -> Tensor:
        """Frames past each length are zeroed after every convolution, so padding never leaks into real frames."""
        h = x_BTM.unsqueeze(1)
        for conv, act in ((self.conv[0], self.conv[1]), (self.conv[2], self.conv[3])):
            lengths_B = (lengths_B + 1) // 2
            h = act(conv(h))  # (B, C, T', M')
            h = h * lengths_to_mask(lengths_B, h.shape[2])[:, None, :, None]
        return self.proj(h.permute(0, 2, 1, 3).flatten(2))


class ConvModule(nn.Module):
    """Conformer convolution: pointwise + GLU, depthwise conv (padding frames zeroed), LayerNorm, SiLU, pointwise."""

    def __init__(self, dim: int, kernel_size: int, dropout: float) -> None:
        super().__init__()
        if kernel_size % 2 == 0:
            raise ValueError(f"conv_kernel must be odd, got {kernel_size}")
        self.pointwise_in = nn.Linear(dim, 2 * dim)
        self.depthwise = nn.Conv1d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.pointwise_out = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x_BLD: Tensor, mask_BL: Tensor) -> Tensor:
        h = F.glu(self.pointwise_in(x_BLD), dim=-1) * mask_BL.unsqueeze(-1)
        h = self.depthwise(h.transpose(1, 2)).transpose(1, 2)
        return self.drop(self.pointwise_out(F.silu(self.norm(h))))


class ConformerBlock(nn.Module):
    """``x + ffn1/2``, ``x + MHSA``, ``x + conv``, ``x + ffn2/2``, LayerNorm; each FFN is an MoE or a dense FFN."""

    def __init__(
        self, dim: int, num_heads: int, ffn1: nn.Module, ffn2: nn.Module, conv_kernel: int, dropout: float
    ) -> None:
        super().__init__()
        self.norm_ffn1 = nn.LayerNorm(dim)
        self.ffn1 = ffn1
        self.norm_attn = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.norm_conv = nn.LayerNorm(dim)
        self.conv = ConvModule(dim, conv_kernel, dropout)
        self.norm_ffn2 = nn.LayerNorm(dim)
        self.ffn2 = ffn2
        self.norm_out = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)

    @property
    def is_moe(self) -> bool:
        return isinstance(self.ffn1, MoE) or isinstance(self.ffn2, MoE)

    def forward(
        self, x_BLD: Tensor, mask_BL: Tensor, auxes: list[MoEAux], side: Mapping[str, Tensor] | None = None
    ) -> Tensor:
        x_BLD = x_BLD + 0.5 * self.drop(run_ffn(self.ffn1, self.norm_ffn1(x_BLD), auxes, mask_BL, side))
        h = self.norm_attn(x_BLD)
        h, _ = self.attn(h, h, h, key_padding_mask=~mask_BL, need_weights=False)
        x_BLD = x_BLD + self.drop(h)
        x_BLD = x_BLD + self.conv(self.norm_conv(x_BLD), mask_BL)
        x_BLD = x_BLD + 0.5 * self.drop(run_ffn(self.ffn2, self.norm_ffn2(x_BLD), auxes, mask_BL, side))
        return self.norm_out(x_BLD) * mask_BL.unsqueeze(-1)


class MoEConformer(nn.Module):
    """Conformer-CTC with MoE feed-forwards and a choice of router (see the module docstring).

    ``forward_with_aux(x_BTM, lengths_B)`` returns a :class:`CTCOutput` and every MoE layer's aux result;
    ``forward`` returns the CTC log-probabilities only. ``moe``: the MoE settings (a
    :class:`~moezoo.models.spec.MoESpec` or a mapping of its fields over this family's defaults: 4 experts, top-1,
    in both FFNs of every block); ``num_languages``/``lid_layer`` size and place the language-ID head of a router
    that reads ``lid_probs``, ``global_embed_dim`` the utterance embedding of one that reads ``global_embedding``.
    """

    def __init__(
        self,
        vocab_size: int = 48,
        n_mels: int = 80,
        dim: int = 96,
        depth: int = 4,
        num_heads: int = 4,
        ffn_dim: int = 192,
        conv_kernel: int = 15,
        subsample_channels: int = 32,
        activation: str = "gelu",
        moe: MoESpec | Mapping[str, Any] | None = None,
        num_languages: int = 4,
        lid_layer: int = 1,
        global_embed_dim: int = 32,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2 (blank + one symbol), got {vocab_size}")
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        spec = MoESpec.resolve(moe, dict(top_k=1, moe_every=1, moe_offset=0))
        spec.check_side_inputs(SIDE_INPUTS, "moe_conformer")
        uses_lid = "lid_probs" in spec.needs_side
        uses_global = "global_embedding" in spec.needs_side
        if uses_lid:
            if spec.num_experts != num_languages:
                raise ValueError(
                    f"router {spec.router!r} routes by language posteriors, one expert per language: "
                    f"moe.num_experts={spec.num_experts} must equal num_languages={num_languages}"
                )
            if not 1 <= lid_layer < depth:
                raise ValueError(f"lid_layer must be in [1, depth={depth}) for router {spec.router!r}, got {lid_layer}")
        if uses_global:
            embed_dim = spec.router_kwargs.get("embed_dim", global_embed_dim)
            spec = spec.replace(router_kwargs={**spec.router_kwargs, "embed_dim": embed_dim})
            if embed_dim != global_embed_dim:
                raise ValueError(
                    f"moe.router_kwargs.embed_dim={embed_dim} must equal global_embed_dim={global_embed_dim} "
                    "(the width of the utterance embedding this model computes)"
                )
        self.vocab_size = vocab_size
        self.n_mels = n_mels
        self.spec = spec
        self.lid_layer = lid_layer if uses_lid else 0
        # One router instance for all layers when the router class says so (Omni-router).
        shared = build_shared_router(dim, spec)
        self.shared_router = shared
        self.subsample = ConvSubsampling(n_mels, dim, subsample_channels)
        self.drop = nn.Dropout(dropout)
        blocks = []
        for i in range(depth):
            block_spec = spec if i >= self.lid_layer else None
            ffns = [build_ffn(dim, ffn_dim, activation, block_spec, i, router=shared) for _ in range(2)]
            blocks.append(ConformerBlock(dim, num_heads, ffns[0], ffns[1], conv_kernel, dropout))
        self.blocks = nn.ModuleList(blocks)
        share_router_modules(self.blocks)
        self.lid_head: nn.Module | None = None
        if uses_lid:
            self.lid_head = nn.Sequential(
                nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, num_languages)
            )
        self.global_proj: nn.Module | None = None
        if uses_global and not spec.dense:
            self.global_proj = nn.Sequential(nn.Linear(2 * dim, global_embed_dim), nn.Tanh())
        self.head = nn.Linear(dim, vocab_size)

    def _check_input(self, x_BTM: Tensor, lengths_B: Tensor | None) -> Tensor:
        if x_BTM.dim() != 3 or x_BTM.shape[-1] != self.n_mels:
            raise ValueError(f"x must have shape (B, T, n_mels={self.n_mels}), got {tuple(x_BTM.shape)}")
        batch, frames = x_BTM.shape[:2]
        if lengths_B is None:
            return torch.full((batch,), frames, dtype=torch.long, device=x_BTM.device)
        if lengths_B.shape != (batch,) or bool((lengths_B < 1).any()) or bool((lengths_B > frames).any()):
            raise ValueError(f"lengths must be (B={batch},) with values in [1, T={frames}], got {lengths_B.tolist()}")
        return lengths_B.long()

    def global_embedding(self, x_BLD: Tensor, mask_BL: Tensor) -> Tensor:
        """Statistics pooling (masked mean and std over frames) projected to G: (B, G)."""
        assert self.global_proj is not None
        w_BL1 = mask_BL.unsqueeze(-1).to(x_BLD.dtype)
        count_B1 = w_BL1.sum(1).clamp_min(1.0)
        mean_BD = (x_BLD * w_BL1).sum(1) / count_B1
        var_BD = ((x_BLD - mean_BD.unsqueeze(1)).square() * w_BL1).sum(1) / count_B1
        return self.global_proj(torch.cat([mean_BD, (var_BD + 1e-5).sqrt()], dim=-1))

    def forward_with_aux(self, x_BTM: Tensor, lengths_B: Tensor | None = None) -> tuple[CTCOutput, list[MoEAux]]:
        lengths_B = self._check_input(x_BTM, lengths_B)
        x_BLD = self.drop(self.subsample(x_BTM, lengths_B))
        out_lengths_B = subsampled_lengths(lengths_B)
        mask_BL = lengths_to_mask(out_lengths_B, x_BLD.shape[1])
        x_BLD = x_BLD * mask_BL.unsqueeze(-1)
        side: dict[str, Tensor] = {}
        if self.global_proj is not None:
            side["global_embedding"] = self.global_embedding(x_BLD, mask_BL)
        auxes: list[MoEAux] = []
        lid_logits_BLA = None
        for i, block in enumerate(self.blocks):
            if self.lid_head is not None and i == self.lid_layer:
                lid_logits_BLA = self.lid_head(x_BLD)
                side["lid_probs"] = torch.softmax(lid_logits_BLA.float(), dim=-1)
            x_BLD = block(x_BLD, mask_BL, auxes, side)
        log_probs_BLV = torch.log_softmax(self.head(x_BLD).float(), dim=-1)
        return CTCOutput(log_probs_BLV, out_lengths_B, lid_logits_BLA), auxes

    def forward(self, x_BTM: Tensor, lengths_B: Tensor | None = None) -> Tensor:
        return self.forward_with_aux(x_BTM, lengths_B)[0].log_probs_BLV


def _moe_conformer(defaults: dict[str, Any], kwargs: dict[str, Any]) -> MoEConformer:
    return MoEConformer(**build_kwargs("moe_conformer", defaults, kwargs))


@register_model
def moe_conformer_debug(**kwargs: Any) -> MoEConformer:
    """2 blocks of width 32, 4 experts top-1 in both FFNs of every block: for tests."""
    defaults = dict(
        dim=32, depth=2, num_heads=2, ffn_dim=64, conv_kernel=7, subsample_channels=8, moe=dict(num_experts=4)
    )
    return _moe_conformer(defaults, kwargs)


@register_model
def moe_conformer_tiny(**kwargs: Any) -> MoEConformer:
    """4 blocks of width 96, 4 experts (width 192) top-1 in every FFN: ~1 M active parameters."""
    defaults = dict(
        dim=96, depth=4, num_heads=4, ffn_dim=192, conv_kernel=15, subsample_channels=16, moe=dict(num_experts=4)
    )
    return _moe_conformer(defaults, kwargs)


@register_model
def moe_conformer_small(**kwargs: Any) -> MoEConformer:
    """8 blocks of width 144, 8 experts (width 576) top-1 in every FFN (Conformer-S width)."""
    defaults = dict(
        dim=144, depth=8, num_heads=4, ffn_dim=576, conv_kernel=31, subsample_channels=64, moe=dict(num_experts=8)
    )
    return _moe_conformer(defaults, kwargs)
