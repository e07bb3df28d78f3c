"""``moe_vit``: a Vision Transformer whose feed-forward in every n-th block is an MoE (V-MoE layout).

Built from timm's ``PatchEmbed`` and ``Attention``. The MoE settings are one :class:`~moezoo.models.spec.MoESpec`
(``moe=``); every size has a dense twin (``moe={"dense": True}``) with the same active parameters per token.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from timm.layers import PatchEmbed, trunc_normal_
from torch import Tensor, nn

from moezoo.layers import MoEAux
from moezoo.layers.routers import ATTENTION_PROBS, ROUTER_STATE
from moezoo.models.blocks import TransformerBlock, build_ffn, build_shared_router, share_router_modules
from moezoo.models.registry import register_model
from moezoo.models.spec import MoESpec, build_kwargs, register_spec_argument

register_spec_argument("moe_vit")


class MoEViT(nn.Module):
    """ViT classifier with a class token; ``forward_with_aux`` also returns each MoE layer's aux result.

    ``moe``: the MoE settings (:class:`~moezoo.models.spec.MoESpec` or a mapping of its fields over its defaults:
    4 experts, top-2, in every other block); ``mlp_ratio * dim`` is the expert width.
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
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size={img_size} must be divisible by patch_size={patch_size}")
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.img_size = img_size
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.spec = MoESpec.resolve(moe)
        self.spec.check_side_inputs((ROUTER_STATE, ATTENTION_PROBS), "moe_vit")
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, dim))
        self.drop = nn.Dropout(dropout)
        ffn_dim = int(dim * mlp_ratio)
        # One router instance for every MoE layer when the router class says so (Omni-router), as in the Conformer
        # and moe_patchtst.
        self.shared_router = build_shared_router(dim, self.spec)
        self.blocks = nn.ModuleList(
            TransformerBlock(dim, num_heads, build_ffn(dim, ffn_dim, activation, self.spec, i, self.shared_router))
            for i in range(depth)
        )
        share_router_modules(self.blocks)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)

    def _check_input(self, x: Tensor) -> None:
        expected = (self.in_chans, self.img_size, self.img_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"x must have shape (B, {', '.join(map(str, expected))}), got {tuple(x.shape)}")

    def forward_features(self, x: Tensor, auxes: list[MoEAux]) -> Tensor:
        self._check_input(x)
        tokens = self.patch_embed(x)
        tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1) + self.pos_embed
        tokens = self.drop(tokens)
        for block in self.blocks:
            tokens = block(tokens, auxes)
        return self.norm(tokens)

    def forward_with_aux(self, x: Tensor) -> tuple[Tensor, list[MoEAux]]:
        auxes: list[MoEAux] = []
        features = self.forward_features(x, auxes)
        return self.head(features[:, 0]), auxes

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_with_aux(x)[0]


def _moe_vit(defaults: dict[str, Any], kwargs: dict[str, Any]) -> MoEViT:
    return MoEViT(**build_kwargs("moe_vit", defaults, kwargs))


@register_model
def moe_vit_debug(**kwargs: Any) -> MoEViT:
    """2 blocks of width 32, 4 experts top-2 in every block: for tests."""
    return _moe_vit(
        dict(dim=32, depth=2, num_heads=2, mlp_ratio=2.0, moe=dict(num_experts=4, moe_every=1, moe_offset=0)), kwargs
    )


@register_model
def moe_vit_tiny(**kwargs: Any) -> MoEViT:
    """6 blocks of width 96, 8 experts top-2 in every other block (the last of each pair)."""
    return _moe_vit(dict(dim=96, depth=6, num_heads=3, mlp_ratio=2.0, moe=dict(num_experts=8, moe_every=2)), kwargs)
