"""``moe_dit``: a class-conditional Diffusion Transformer (DiT) whose FFNs in chosen blocks are MoE layers.

Patchify (timm ``PatchEmbed``) -> learned position embedding -> adaLN-Zero blocks conditioned on
``timestep embedding + class embedding`` -> adaLN final layer -> unpatchify. Class id ``num_classes`` is the
*null* label of classifier-free guidance; each MoE receives ``side={"cfg_dropped": y == num_classes}``
(per sample), which the ProMoE router uses for conditional routing and other routers ignore.

Routers: ``promoe`` (ProMoE: prototypes + unconditional expert + shared expert), ``topk`` (DiT-MoE style
softmax token choice), ``expert_choice`` (EC-DiT style), or any registered router, all set in one
:class:`~moezoo.models.spec.MoESpec` (``moe={"router": "promoe", ...}``). ``moe={"dense": True}`` is the dense
twin with the same active FFN width per token.

Legend: B images, C channels, H/W image size, p patch, L = (H/p)(W/p) tokens, D model dim.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from timm.layers import PatchEmbed, trunc_normal_
from timm.models.vision_transformer import Attention
from torch import Tensor, nn

from moezoo.layers import MoEAux
from moezoo.layers.routers import ROUTER_STATE
from moezoo.models.blocks import build_ffn, run_ffn, share_router_modules
from moezoo.models.registry import register_model
from moezoo.models.spec import MoESpec, build_kwargs, register_spec_argument

register_spec_argument("moe_dit")


def timestep_embedding(t_B: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, shape (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t_B.device, dtype=torch.float32) / half)
    args = t_B.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return torch.cat([emb, emb.new_zeros(emb.shape[0], dim % 2)], dim=-1)


def modulate(x_BLD: Tensor, shift_BD: Tensor, scale_BD: Tensor) -> Tensor:
    return x_BLD * (1 + scale_BD.unsqueeze(1)) + shift_BD.unsqueeze(1)


class DiTBlock(nn.Module):
    """adaLN-Zero block: ``x + g1 * attn(mod(norm(x)))``, ``x + g2 * ffn(mod(norm(x)))``; gates start at 0."""

    def __init__(self, dim: int, num_heads: int, ffn: nn.Module) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ffn = ffn
        ada = nn.Linear(dim, 6 * dim)
        nn.init.zeros_(ada.weight)
        nn.init.zeros_(ada.bias)
        self.ada = nn.Sequential(nn.SiLU(), ada)

    def forward(self, x_BLD: Tensor, c_BD: Tensor, auxes: list[MoEAux], side: Mapping[str, Tensor]) -> Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c_BD).chunk(6, dim=-1)
        x_BLD = x_BLD + gate1.unsqueeze(1) * self.attn(modulate(self.norm1(x_BLD), shift1, scale1))
        h_BLD = run_ffn(self.ffn, modulate(self.norm2(x_BLD), shift2, scale2), auxes, side=side)
        return x_BLD + gate2.unsqueeze(1) * h_BLD


class MoEDiT(nn.Module):
    """Class-conditional DiT predicting a tensor of the input's shape (velocity or noise).

    ``forward(x, t, y)``: ``x (B, C, H, W)``, ``t (B,)`` float timesteps (the objective scales them, e.g.
    ``1000 * t`` for flows and the integer step for DDPM), ``y (B,)`` class ids in ``[0, num_classes]`` where
    ``num_classes`` is the null (dropped) label. ``moe``: the MoE settings (:class:`~moezoo.models.spec.MoESpec`
    or a mapping of its fields over its defaults: 4 experts, top-2, in every other block).
    """

    def __init__(
        self,
        img_size: int = 28,
        patch_size: int = 4,
        in_chans: int = 1,
        num_classes: int = 10,
        dim: int = 64,
        depth: int = 4,
        num_heads: int = 4,
        mlp_ratio: float = 2.0,
        activation: str = "gelu",
        moe: MoESpec | Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("img_size", img_size), ("patch_size", patch_size), ("in_chans", in_chans)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if img_size % patch_size:
            raise ValueError(
                f"img_size={img_size} must be divisible by patch_size={patch_size} "
                f"(allowed patch sizes: {[p for p in range(1, img_size + 1) if img_size % p == 0]})"
            )
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        self.img_size = img_size
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.null_class = num_classes
        self.spec = MoESpec.resolve(moe)
        self.spec.check_side_inputs(("cfg_dropped", ROUTER_STATE), "moe_dit")
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches, dim))
        self.t_embed = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.y_embed = nn.Embedding(num_classes + 1, dim)
        ffn_dim = int(dim * mlp_ratio)
        self.blocks = nn.ModuleList(
            DiTBlock(dim, num_heads, build_ffn(dim, ffn_dim, activation, self.spec, i)) for i in range(depth)
        )
        share_router_modules(self.blocks)
        self.final_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        final_ada = nn.Linear(dim, 2 * dim)
        self.final_ada = nn.Sequential(nn.SiLU(), final_ada)
        self.final = nn.Linear(dim, patch_size * patch_size * in_chans)
        trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.y_embed.weight, std=0.02)
        for layer in (final_ada, self.final):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def _check_inputs(self, x: Tensor, t: Tensor, y: Tensor) -> None:
        expected = (self.in_chans, self.img_size, self.img_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"x must have shape (B, {', '.join(map(str, expected))}), got {tuple(x.shape)}")
        batch = x.shape[0]
        if t.shape != (batch,):
            raise ValueError(f"t must have shape ({batch},), got {tuple(t.shape)}")
        if y.shape != (batch,) or y.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"y must be an integer tensor of shape ({batch},), got {y.dtype} {tuple(y.shape)}")
        if y.numel() and (int(y.min()) < 0 or int(y.max()) > self.num_classes):
            raise ValueError(
                f"class ids y must be in [0, {self.num_classes}) (or {self.null_class} = the null label), got "
                f"range [{int(y.min())}, {int(y.max())}]"
            )

    def unpatchify(self, x_BLP: Tensor) -> Tensor:
        p, c, n = self.patch_size, self.in_chans, self.img_size // self.patch_size
        x = x_BLP.reshape(x_BLP.shape[0], n, n, p, p, c)
        return torch.einsum("bhwpqc->bchpwq", x).reshape(x_BLP.shape[0], c, n * p, n * p)

    def forward_with_aux(self, x: Tensor, t: Tensor, y: Tensor) -> tuple[Tensor, list[MoEAux]]:
        self._check_inputs(x, t, y)
        auxes: list[MoEAux] = []
        tokens_BLD = self.patch_embed(x) + self.pos_embed
        c_BD = self.t_embed(timestep_embedding(t, tokens_BLD.shape[-1])) + self.y_embed(y)
        side = {"cfg_dropped": y == self.null_class}
        for block in self.blocks:
            tokens_BLD = block(tokens_BLD, c_BD, auxes, side)
        shift, scale = self.final_ada(c_BD).chunk(2, dim=-1)
        out = self.final(modulate(self.final_norm(tokens_BLD), shift, scale))
        return self.unpatchify(out), auxes

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        return self.forward_with_aux(x, t, y)[0]


def _moe_dit(defaults: dict[str, Any], kwargs: dict[str, Any]) -> MoEDiT:
    return MoEDiT(**build_kwargs("moe_dit", defaults, kwargs))


@register_model
def moe_dit_debug(**kwargs: Any) -> MoEDiT:
    """2 blocks of width 32, 4 experts top-2 in every block, 8x8 images with 2x2 patches: for tests."""
    defaults = dict(
        img_size=8, patch_size=2, dim=32, depth=2, num_heads=2, moe=dict(num_experts=4, moe_every=1, moe_offset=0)
    )
    return _moe_dit(defaults, kwargs)


@register_model
def moe_dit_tiny(**kwargs: Any) -> MoEDiT:
    """6 blocks of width 96, 8 experts top-2 in every other block, 28x28 with 4x4 patches (49 tokens)."""
    return _moe_dit(dict(dim=96, depth=6, num_heads=4, moe=dict(num_experts=8, moe_every=2)), kwargs)


@register_model
def moe_dit_small(**kwargs: Any) -> MoEDiT:
    """8 blocks of width 192, 8 experts top-2 in every other block, 28x28 with 2x2 patches (196 tokens)."""
    return _moe_dit(dict(patch_size=2, dim=192, depth=8, num_heads=6, moe=dict(num_experts=8, moe_every=2)), kwargs)
