"""Transformer blocks shared by every domain: pre-norm attention + (MoE or dense) feed-forward.

A :class:`~moezoo.models.spec.MoESpec` says what goes in a block's feed-forward slot; :func:`build_ffn` builds it,
so that a model and its dense twin differ only in the spec.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from timm.models.vision_transformer import Attention
from torch import Tensor, nn

from moezoo.layers import MOE_LAYERS, ChainOfExperts, FeedForward, MoE, MoEAux, Router, get_router
from moezoo.layers.routers import ATTENTION_PROBS, ROUTER_STATE
from moezoo.layers.segment import SegmentFeedForward, SegmentMoE
from moezoo.models.spec import MoESpec

__all__ = [
    "MoESpec",
    "TransformerBlock",
    "attend",
    "attention_and_probs",
    "build_ffn",
    "build_shared_router",
    "moe_layers",
    "parameter_counts",
    "reads_attention",
    "run_ffn",
    "share_router_modules",
]


def build_shared_router(dim: int, spec: MoESpec | None) -> Router | None:
    """The one router every MoE layer of a model shares when the router class says so (``shared_across_layers``:
    the Omni-router), to pass as ``build_ffn(..., router=...)`` to every block; ``None`` for routers built per layer
    and for dense twins. A family stores it as ``shared_router`` so that it is registered once."""
    if spec is None or spec.dense or not spec.shares_router:
        return None
    return get_router(
        spec.router, dim, spec.num_experts * spec.granularity, top_k=spec.top_k * spec.granularity, **spec.router_kwargs
    )


def build_ffn(
    dim: int, ffn_dim: int, activation: str, spec: MoESpec | None, block_index: int, router: Router | None = None
) -> nn.Module:
    """The feed-forward module of block ``block_index``: dense FFN, MoE, Chain-of-Experts, Seg-MoE, or the MoE's
    dense twin.

    ``router``: a router instance shared by every MoE layer (Omni-router) instead of one built per layer.
    """
    if spec is None or not spec.is_moe_block(block_index):
        return FeedForward(dim, ffn_dim, activation)
    segment = spec.segment_size(block_index)
    if spec.dense:
        active = spec.active_ffn_dim(ffn_dim)
        return (
            FeedForward(dim, active, activation, spec.bias)
            if segment == 1
            else SegmentFeedForward(dim, active, segment, activation)
        )
    if spec.router == "segment":
        return SegmentMoE(
            dim,
            ffn_dim,
            num_experts=spec.num_experts,
            top_k=spec.top_k,
            segment_size=segment,
            router_kwargs=spec.router_kwargs,
            activation=activation,
            num_shared_experts=spec.num_shared_experts,
            shared_expert_gate=spec.shared_expert_gate,
            backend=spec.backend,
        )
    common: dict[str, Any] = dict(
        activation=activation,
        num_shared_experts=spec.num_shared_experts,
        shared_expert_gate=spec.shared_expert_gate,
        granularity=spec.granularity,
        backend=spec.backend,
        bias=spec.bias,
    )
    if spec.num_iterations > 1:  # Chain-of-Experts: one router per pass, built here (the spec refuses shared ones)
        return ChainOfExperts(
            dim,
            ffn_dim,
            num_experts=spec.num_experts,
            top_k=spec.top_k,
            num_iterations=spec.num_iterations,
            inner_residual=spec.inner_residual,
            router=spec.router,
            router_kwargs=spec.router_kwargs,
            **common,
        )
    if spec.layer != "moe":  # an MoE layer option (S2MoE, CartesianMoE): a router built per layer (the spec says so)
        return MOE_LAYERS[spec.layer](
            dim,
            ffn_dim,
            num_experts=spec.num_experts,
            top_k=spec.top_k,
            router=spec.router,
            router_kwargs=spec.router_kwargs,
            **spec.layer_kwargs,
            **common,
        )
    return MoE(
        dim,
        ffn_dim,
        num_experts=spec.num_experts,
        top_k=spec.top_k,
        router=router if router is not None else spec.router,
        router_kwargs=None if router is not None else spec.router_kwargs,
        **common,
    )


def run_ffn(
    ffn: nn.Module, x: Tensor, auxes: list[MoEAux], mask: Tensor | None = None, side: Mapping[str, Tensor] | None = None
) -> Tensor:
    """Apply a feed-forward slot; an MoE's aux result is appended to ``auxes``.

    ``auxes`` holds the aux results of the MoE layers called before this one (every family calls its feed-forwards
    in layer order): an MoE whose router ``carries_state`` (the layerwise recurrent router) receives the previous
    MoE layer's ``router_state`` as the side input ``ROUTER_STATE``; the first such layer receives none.
    """
    if isinstance(ffn, MoE):
        if ffn.router.carries_state and auxes and auxes[-1].router_state is not None:
            side = {**(side or {}), ROUTER_STATE: auxes[-1].router_state}
        y, aux = ffn(x, mask=mask, side=side)
        auxes.append(aux)
        return y
    return ffn(x)


def reads_attention(ffn: nn.Module) -> bool:
    """True when ``ffn`` is an MoE whose router mixes with its block's attention probabilities (side input
    :data:`~moezoo.layers.routers.ATTENTION_PROBS`): the block then computes its attention explicitly."""
    return isinstance(ffn, MoE) and ATTENTION_PROBS in ffn.router.needs_side


def attention_and_probs(attn: Attention, x_BLD: Tensor) -> tuple[Tensor, Tensor]:
    """timm's ``attn(x)`` computed explicitly, and its attention probabilities averaged over heads ``(B, L, L)``.

    timm's fused path (``F.scaled_dot_product_attention``) does not return its weights; this is timm's own non-fused
    path with the module's projections (q/k norms, scale norm, output gate where present), so the output equals the
    fused one to rounding (``tests/models/test_attention_routing.py``). The probabilities are taken before the
    attention dropout; in training with ``attn_drop > 0`` the dropout draws differ from the fused kernel's (same law).
    """
    batch, length, _ = x_BLD.shape
    gate = getattr(attn, "gate", None)
    gate_BLD = gate(x_BLD).sigmoid() if gate is not None else None
    qkv = attn.qkv(x_BLD).reshape(batch, length, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    q_BHLd, k_BHLd, v_BHLd = qkv.unbind(0)
    q_BHLd, k_BHLd = attn.q_norm(q_BHLd), attn.k_norm(k_BHLd)
    probs_BHLL = torch.softmax((q_BHLd * attn.scale) @ k_BHLd.transpose(-2, -1), dim=-1)
    out = (attn.attn_drop(probs_BHLL) @ v_BHLd).transpose(1, 2).reshape(batch, length, -1)
    norm = getattr(attn, "norm", None)
    if norm is not None:
        out = norm(out)
    if gate_BLD is not None:
        out = out * gate_BLD
    return attn.proj_drop(attn.proj(out)), probs_BHLL.mean(1)


def attend(
    attn: Attention, x_BLD: Tensor, ffn: nn.Module, side: Mapping[str, Tensor] | None
) -> tuple[Tensor, Mapping[str, Tensor] | None]:
    """A block's attention output and the side inputs of its feed-forward: the fused attention, or (when the FFN's
    router :func:`reads_attention`) the explicit one, whose probabilities join ``side`` as ``ATTENTION_PROBS``."""
    if not reads_attention(ffn):
        return attn(x_BLD), side
    out, probs_BLL = attention_and_probs(attn, x_BLD)
    return out, {**(side or {}), ATTENTION_PROBS: probs_BLL}


class TransformerBlock(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))`` then ``x + ffn(norm(x))`` with an MoE or dense FFN."""

    def __init__(self, dim: int, num_heads: int, ffn: nn.Module, qkv_bias: bool = True) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = ffn

    @property
    def is_moe(self) -> bool:
        return isinstance(self.ffn, MoE)

    def forward(
        self, x: Tensor, auxes: list[MoEAux], mask: Tensor | None = None, side: Mapping[str, Tensor] | None = None
    ) -> Tensor:
        h, side = attend(self.attn, self.norm1(x), self.ffn, side)
        x = x + h
        return x + run_ffn(self.ffn, self.norm2(x), auxes, mask, side)


def moe_layers(module: nn.Module) -> Sequence[MoE]:
    return [m for m in module.modules() if isinstance(m, MoE)]


def share_router_modules(module: nn.Module) -> None:
    """Give every MoE layer's router the first layer's submodules that its class shares (``Router.shared_modules``:
    the layerwise recurrent router's GRU cell), so that one module serves every layer; a family calls it once its
    layers are built. Routers of other classes are left as they are."""
    first: dict[tuple[type, str], nn.Module] = {}
    for layer in moe_layers(module):
        router = layer.router
        for name in router.shared_modules:
            own = getattr(router, name)
            shared = first.setdefault((type(router), name), own)
            if shared is own:
                continue
            shapes = [tuple(p.shape) for p in shared.parameters()], [tuple(p.shape) for p in own.parameters()]
            if shapes[0] != shapes[1]:
                raise ValueError(
                    f"{type(router).__name__}.{name} is shared by every MoE layer, but the layers' modules differ in "
                    f"shape ({shapes[0]} vs {shapes[1]}): build every layer with the same router options"
                )
            setattr(router, name, shared)


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """``{"total", "active"}`` parameters of ``model``: :func:`moezoo.stats.count_parameters` (which says what
    "active per token" means for each kind of layer, Soft MoE included)."""
    from moezoo.stats import count_parameters

    return count_parameters(model).as_dict()
