"""Attention-aware routing in the models (``attention_graph``, Graph of Tokens): a block whose MoE router reads the
attention probabilities computes its attention explicitly, with the output of timm's fused kernel and the
probabilities of a naive computation from the module's own weights; ``moe_vit`` and ``moe_patchtst`` train with the
router; every other family refuses it by name."""

from __future__ import annotations

import math

import pytest
import torch
from timm.models.vision_transformer import Attention
from torch import nn

from moezoo.layers import MoE
from moezoo.layers.routers import ATTENTION_PROBS
from moezoo.models import blocks, create_model
from moezoo.models.blocks import attention_and_probs, reads_attention

MODELS = {
    "moe_vit_debug": (dict(moe={"router": "attention_graph"}), (3, 1, 28, 28)),
    "moe_patchtst_debug": (dict(moe={"router": "attention_graph", "segment_sizes": 1}), (3, 32, 3)),
}


def naive_probs(attn: Attention, x_BLD: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) averaged over heads, from the qkv weights (q, k: the first two D-wide column blocks,
    heads contiguous within each)."""
    dim, heads = x_BLD.shape[-1], attn.num_heads
    head_dim = dim // heads
    qkv = x_BLD @ attn.qkv.weight.t() + (attn.qkv.bias if attn.qkv.bias is not None else 0)
    q = qkv[..., :dim].reshape(*x_BLD.shape[:2], heads, head_dim)
    k = qkv[..., dim : 2 * dim].reshape(*x_BLD.shape[:2], heads, head_dim)
    scores = torch.einsum("blhd,bmhd->bhlm", q, k) / math.sqrt(head_dim)
    return torch.softmax(scores, -1).mean(1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_explicit_attention_is_the_fused_output_and_returns_the_head_mean_probabilities(dtype, qk_norm):
    torch.manual_seed(0)
    attn = Attention(24, num_heads=3, qkv_bias=True, qk_norm=qk_norm, norm_layer=nn.LayerNorm).to(dtype).eval()
    attn.fused_attn = True  # the kernel the blocks run (F.scaled_dot_product_attention)
    x = torch.randn(2, 7, 24, dtype=dtype)
    out, probs = attention_and_probs(attn, x)
    tol = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(out, attn(x), **tol)
    assert probs.shape == (2, 7, 7)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 7, dtype=dtype), **tol)
    if not qk_norm:
        torch.testing.assert_close(probs, naive_probs(attn, x), **tol)


@pytest.mark.parametrize("name", MODELS)
def test_block_output_is_the_fused_attention_then_the_moe_with_the_attention(name):
    """Each block: ``x + attn(norm1 x)`` by the fused kernel, then its MoE given the naive head-mean attention
    probabilities of ``norm1 x`` as the side input; the same to fp32 rounding as the block's own forward."""
    kwargs, shape = MODELS[name]
    torch.manual_seed(1)
    model = create_model(name, **kwargs).eval()
    assert all(reads_attention(block.ffn) for block in model.blocks)
    x = torch.randn(2, 9, model.blocks[0].norm1.normalized_shape[0])
    for block in model.blocks:
        block.attn.fused_attn = True
        with torch.no_grad():
            got = block(x, [])
            h = x + block.attn(block.norm1(x))
            side = {ATTENTION_PROBS: naive_probs(block.attn, block.norm1(x))}
            want = h + block.ffn(block.norm2(h), side=side)[0]
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
        x = got


@pytest.mark.parametrize("name", MODELS)
def test_model_trains_with_the_router_and_routing_reaches_the_attention(name):
    """Forward + backward; the balance loss alone has gradients on every MoE block's qkv projection (A carries
    gradients); an item's output at evaluation does not depend on its batchmates."""
    kwargs, shape = MODELS[name]
    torch.manual_seed(2)
    model = create_model(name, **kwargs).train()
    x = torch.randn(*shape)
    y, auxes = model.forward_with_aux(x)
    assert len(auxes) == len(model.blocks) and all(torch.isfinite(a.aux_loss) for a in auxes)
    qkv = [block.attn.qkv.weight for block in model.blocks]
    balance = torch.stack([a.losses["balance"] for a in auxes]).sum()
    grads = torch.autograd.grad(balance, qkv, retain_graph=True)
    assert all(g.abs().sum() > 0 for g in grads)
    (y.square().mean() + balance).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
    model.eval()
    with torch.no_grad():
        batch = model(x)
        for i in range(shape[0]):
            torch.testing.assert_close(model(x[i : i + 1]), batch[i : i + 1], atol=1e-5, rtol=1e-5)


def test_blocks_whose_router_does_not_read_attention_keep_the_fused_kernel(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("explicit attention computed for a router that does not read it")

    monkeypatch.setattr(blocks, "attention_and_probs", fail)
    for name, (kwargs, shape) in MODELS.items():
        moe = {**kwargs["moe"], "router": "topk"}
        model = create_model(name, moe=moe)
        assert not any(reads_attention(block.ffn) for block in model.blocks)
        model(torch.randn(*shape))
    dense = create_model("moe_vit_debug", moe={"router": "attention_graph", "dense": True})
    assert not any(isinstance(block.ffn, MoE) for block in dense.blocks)
    dense(torch.randn(1, 1, 28, 28))


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("moe_conformer_debug", {"moe": {"router": "attention_graph"}}),
        ("moe_dit_debug", {"moe": {"router": "attention_graph"}}),
        ("moe_tsfm_debug", {"moe": {"router": "attention_graph"}}),
        ("moe_yolo_debug", {"neck_moe": {"router": "attention_graph", "num_experts": 4}}),
    ],
)
def test_models_without_the_attention_refuse_the_router_naming_those_with_it(name, kwargs):
    family = name.removesuffix("_debug")
    with pytest.raises(
        ValueError,
        match=rf"moe.router='attention_graph' routes with the attention probabilities .* which {family} does not "
        r"compute; the models that do are moe_vit, moe_patchtst",
    ):
        create_model(name, **kwargs)
