"""Sparse upcycling keeps the dense function: with identical experts and renormalised top-k gates the upcycled
model's outputs and gradients equal the dense model's (fp32, 1e-6) for a timm ViT, torchaudio's Conformer and
every moezoo dense twin; the options (granularity, shared expert, zero router, noise, Drop-Upcycling) do what they
say; FFN detection and the report. "Equal" is fp32 agreement within 1e-6 of each tensor's largest magnitude."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torchaudio
from timm.layers import GluMlp, Mlp, SwiGLU
from torch import nn

from moezoo.layers import FeedForward, MoE, total_aux_loss
from moezoo.layers.segment import SegmentFeedForward
from moezoo.models import create_model
from moezoo.surgery import UpcycledMoE, find_ffns, read_ffn, upcycle, upcycled_aux

# Agreement relative to each tensor's largest magnitude (a gradient summed over a batch is not O(1)): outputs to
# 1e-6 in fp32; gradients of parameters far upstream of an FFN collect the rounding of the gates (computed in fp32
# by every router, so they sum to 1 only to fp32 precision, even for fp64 models) through several layers, measured
# up to 4e-6 here, so 1e-5.
OUT_TOL, GRAD_TOL = 1e-6, 1e-5


def assert_close_scaled(got, want, name, tol):
    scale = max(float(want.abs().max()), 1e-3)
    torch.testing.assert_close(got, want, atol=tol * scale, rtol=0, msg=lambda m: f"{name}: {m}")


def assert_same_function(dense, moe_model, inputs):
    """Outputs and the gradients of the float inputs and of every parameter the two models share by name agree."""
    out_tol, grad_tol = OUT_TOL, GRAD_TOL
    out_d = dense(*inputs)
    out_m = moe_model(*inputs)
    out_d, out_m = (o[0] if isinstance(o, tuple) else o for o in (out_d, out_m))
    assert_close_scaled(out_m, out_d, "output", out_tol)
    weight = torch.randn_like(out_d)
    floats = [i for i in inputs if i.is_floating_point() and i.requires_grad]
    shared = [n for n, _ in dense.named_parameters() if n in dict(moe_model.named_parameters())]
    assert shared, "the models share no parameters"
    grads_d = torch.autograd.grad((out_d * weight).sum(), floats + [dense.get_parameter(n) for n in shared])
    grads_m = torch.autograd.grad((out_m * weight).sum(), floats + [moe_model.get_parameter(n) for n in shared])
    for name, g, w in zip(["inputs"] * len(floats) + shared, grads_m, grads_d):
        assert_close_scaled(g, w, f"grad {name}", grad_tol)


def _dense_and_upcycled(dense, **kwargs):
    dense.eval()
    model = copy.deepcopy(dense)
    report = upcycle(model, **kwargs)
    return model.eval(), report


def test_timm_vit_is_preserved():
    dense = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2, num_classes=5
    )
    model, report = _dense_and_upcycled(dense, num_experts=4, top_k=2)
    assert [layer.path for layer in report.layers] == ["blocks.0.mlp", "blocks.1.mlp"]
    assert all(isinstance(model.get_submodule(layer.path), UpcycledMoE) for layer in report.layers)
    assert all(layer.bias and layer.activation == "gelu" for layer in report.layers)
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    assert_same_function(dense, model, (x,))
    assert len(upcycled_aux(model)) == 2 and total_aux_loss(upcycled_aux(model)) is not None


def test_timm_vit_expert_gradients_sum_to_the_dense_gradient():
    """Identical experts and gates summing to 1: the experts' gradients add up to the dense layer's."""
    torch.manual_seed(0)  # weights and input independent of the tests run before
    dense = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=1)
    model, _ = _dense_and_upcycled(dense, num_experts=3, top_k=2)
    x = torch.randn(2, 3, 32, 32)
    dense(x).square().sum().backward()
    model(x).square().sum().backward()
    experts = model.blocks[0].mlp.moe.experts
    mlp = dense.blocks[0].mlp

    def close(got, want):
        # fp32 sums over tokens in another order: the rounding scales with the gradient's size, not with each entry
        # (measured: at one thread one entry of w_in's sum is 1.1e-5 off, at two threads none is over 1e-5)
        torch.testing.assert_close(got, want, atol=1e-5 * float(want.abs().max()), rtol=1e-5)

    close(experts.w_in.grad.sum(0), mlp.fc1.weight.grad.t())
    close(experts.w_out.grad.sum(0), mlp.fc2.weight.grad.t())
    close(experts.b_in.grad.sum(0), mlp.fc1.bias.grad)
    close(experts.b_out.grad.sum(0), mlp.fc2.bias.grad)


def test_torchaudio_conformer_is_preserved():
    dense = torchaudio.models.Conformer(
        input_dim=16, num_heads=2, ffn_dim=32, num_layers=2, depthwise_conv_kernel_size=3
    )
    model, report = _dense_and_upcycled(dense, num_experts=4, top_k=2)
    assert len(report.layers) == 4  # two feed-forward modules per layer
    assert all(layer.activation == "silu" and layer.kind.startswith("nn.Sequential[1:") for layer in report.layers)
    x = torch.randn(2, 7, 16, requires_grad=True)
    lengths = torch.tensor([7, 5])
    assert_same_function(dense, model, (x, lengths))


DENSE_TWINS = {
    "moe_vit_debug": lambda: (torch.randn(2, 1, 28, 28, requires_grad=True),),
    "moe_conformer_debug": lambda: (torch.randn(2, 20, 80, requires_grad=True), torch.tensor([20, 13])),
    "moe_patchtst_debug": lambda: (torch.randn(2, 32, 3, requires_grad=True),),
    "moe_dit_debug": lambda: (torch.randn(2, 1, 8, 8, requires_grad=True), torch.tensor([3, 70]), torch.tensor([1, 4])),
}


@pytest.mark.parametrize("name", sorted(DENSE_TWINS))
def test_moezoo_dense_twin_is_preserved(name):
    dense = create_model(name, moe={"dense": True})
    model, report = _dense_and_upcycled(dense, num_experts=4, top_k=2)
    modules = dict(dense.named_modules())
    ffn_paths = [
        path
        for path, m in modules.items()
        if isinstance(m, FeedForward) and not isinstance(modules[path.rpartition(".")[0]], SegmentFeedForward)
    ]
    assert ffn_paths and set(ffn_paths) <= {layer.path for layer in report.layers}
    assert all(isinstance(model.get_submodule(path), MoE) for path in ffn_paths)  # native MoE: masks, aux losses
    if name == "moe_dit_debug":
        torch.nn.init.normal_(dense.blocks[0].ada[-1].weight)  # adaLN-Zero starts with the FFN switched off
        model.load_state_dict(dense.state_dict(), strict=False)
    assert_same_function(dense, model, DENSE_TWINS[name]())


def _mlp_model(block: nn.Module) -> nn.Module:
    return nn.Sequential(nn.LayerNorm(12), block)


@pytest.mark.parametrize(
    "block,activation",
    [
        (Mlp(12, 20, act_layer=nn.GELU), "gelu"),
        (Mlp(12, 20, act_layer=lambda: nn.GELU(approximate="tanh")), "gelu_tanh"),
        (Mlp(12, 20, act_layer=nn.ReLU, bias=False), "relu"),
        (GluMlp(12, 40, act_layer=nn.SiLU), "swiglu"),
        (GluMlp(12, 40, act_layer=nn.GELU, gate_last=False), "geglu"),
        (SwiGLU(12, 20), "swiglu"),
        (SwiGLU(12, 20, act_layer=nn.ReLU, bias=False), "reglu"),
        (nn.Sequential(nn.Linear(12, 20), nn.SiLU(), nn.Dropout(0.1), nn.Linear(20, 12)), "silu"),
    ],
)
def test_ffn_kinds_and_activations_are_preserved(block, activation):
    dense = _mlp_model(block)
    assert read_ffn(block).activation == activation
    model, _ = _dense_and_upcycled(dense, num_experts=3, top_k=2)
    assert_same_function(dense, model, (torch.randn(5, 4, 12, requires_grad=True),))


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_granularity_with_zero_router_is_preserved(backend):
    dense = _mlp_model(Mlp(12, 24))
    model, report = _dense_and_upcycled(
        dense, num_experts=2, top_k=1, granularity=4, router_init="zero", backend=backend
    )
    moe = model[1].moe
    assert (moe.num_experts, moe.top_k, moe.expert_dim) == (8, 4, 6)
    assert_same_function(dense, model, (torch.randn(6, 12, requires_grad=True),))


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("block,top_k", [(Mlp(12, 24), 1), (SwiGLU(12, 24), 2)])
def test_virtual_groups_preserve_the_function_under_a_random_router(block, top_k, backend):
    """Virtual-group initialisation: the router is random (tokens prefer different copies) yet every token selects
    whole copies (all m slices of a group), so the fine-grained MoE computes the dense FFN, forward and backward."""
    dense = _mlp_model(block)
    model, report = _dense_and_upcycled(
        dense, num_experts=3, top_k=top_k, granularity=4, router_init="virtual_group", backend=backend, seed=2
    )
    moe = model[1].moe
    assert report.options["router_init"] == "virtual_group" and (moe.num_experts, moe.top_k) == (12, 4 * top_k)
    gate = moe.router.gate.weight.detach()
    assert torch.equal(gate, gate[::4].repeat_interleave(4, dim=0)) and gate.abs().sum() > 0
    x = torch.randn(40, 12, requires_grad=True)
    assert_same_function(dense, model, (x,))
    routing = upcycled_aux(model)[0].routing
    chosen = routing.expert_idx_N.reshape(40, 4 * top_k).sort(dim=1).values
    groups = chosen.reshape(40, top_k, 4) // 4  # every selected slice's copy, per group of 4 choices
    assert (groups == groups[..., :1]).all() and (chosen.reshape(40, top_k, 4) % 4 == torch.arange(4)).all()
    assert len(set(groups[:, :, 0].flatten().tolist())) > 1  # the random router routes tokens to different copies


def test_without_virtual_groups_a_random_router_breaks_the_fine_grained_function():
    """The property above is the virtual groups' doing: the same upcycling with the router's own random rows
    selects slices of different copies and computes another function."""
    dense = _mlp_model(Mlp(12, 24)).eval()
    model, _ = _dense_and_upcycled(dense, num_experts=3, top_k=1, granularity=4, router_init="random", seed=2)
    x = torch.randn(40, 12)
    assert (model(x) - dense(x)).abs().max() > 1e-3


def test_virtual_groups_refuse_a_router_they_cannot_tie():
    with pytest.raises(ValueError, match="cannot tie the routing of HyperRouter|linear gate over the experts"):
        upcycle(_mlp_model(Mlp(12, 24)), num_experts=2, top_k=1, granularity=2, router="hyper",
                router_init="virtual_group")  # fmt: skip


def test_shared_expert_is_the_dense_ffn_and_preserved():
    dense = _mlp_model(SwiGLU(12, 20))
    model, _ = _dense_and_upcycled(dense, num_experts=4, top_k=2, shared_expert=True)
    moe = model[1].moe
    assert moe.shared is not None and moe.shared.hidden_dim == 20
    assert_same_function(dense, model, (torch.randn(6, 12, requires_grad=True),))


@pytest.mark.parametrize("option", [dict(noise=0.1), dict(reinit_ratio=0.5)])
def test_noise_and_drop_upcycling_make_experts_differ(option):
    dense = _mlp_model(Mlp(12, 20))
    model, _ = _dense_and_upcycled(dense, num_experts=3, top_k=2, seed=1, **option)
    w_in = model[1].moe.experts.w_in.detach()
    assert not torch.equal(w_in[0], w_in[1]) and not torch.equal(w_in[1], w_in[2])
    again, _ = _dense_and_upcycled(dense, num_experts=3, top_k=2, seed=1, **option)
    assert torch.equal(again[1].moe.experts.w_in, model[1].moe.experts.w_in)  # seeded
    if "reinit_ratio" in option:
        same_units = (w_in[0] == dense[1].fc1.weight.detach().t()).all(0)
        assert int(same_units.sum()) == 10  # half of the 20 hidden units re-drawn


def test_report_counts_parameters():
    dense = _mlp_model(Mlp(12, 20))
    before = sum(p.numel() for p in dense.parameters())
    model, report = _dense_and_upcycled(dense, num_experts=4, top_k=2)
    layer = report.layers[0]
    assert report.params_before == before and report.params_after == sum(p.numel() for p in model.parameters())
    assert layer.params_before == (12 * 20 + 20) + (20 * 12 + 12)
    assert layer.params_after == 4 * layer.params_before + 12 * 4  # experts + the router's gate
    assert report.params_after - report.params_before == layer.params_after - layer.params_before
    assert "blocks" not in str(report) and "1" in str(report)


def test_selection_by_names_and_predicate():
    dense = nn.Sequential(Mlp(12, 20), nn.ReLU(), Mlp(12, 20))
    assert [p for p, _ in find_ffns(dense)] == ["0", "2"]
    assert [p for p, _ in find_ffns(dense, ["2"])] == ["2"]
    assert [p for p, _ in find_ffns(dense, lambda path, m: path == "0")] == ["0"]
    model = copy.deepcopy(dense)
    upcycle(model, num_experts=2, top_k=1, select=["2"])
    assert isinstance(model[0], Mlp) and isinstance(model[2], UpcycledMoE)


def test_moe_internals_are_not_ffns():
    model = nn.Sequential(MoE(8, 16, num_experts=2, top_k=1, num_shared_experts=1))
    assert find_ffns(model) == []
    with pytest.raises(ValueError, match="found no FFN"):
        upcycle(model)


def test_bad_options_and_unconvertible_blocks_are_named():
    with pytest.raises(ValueError, match="top_k=3 must be at most num_experts=2"):
        upcycle(_mlp_model(Mlp(12, 20)), num_experts=2, top_k=3)
    with pytest.raises(ValueError, match="router_init='ones'"):
        upcycle(_mlp_model(Mlp(12, 20)), router_init="ones")
    with pytest.raises(ValueError, match="Sigmoid has no moezoo equivalent"):
        upcycle(_mlp_model(GluMlp(12, 40)))  # timm's default GLU gate is a sigmoid
    with pytest.raises(ValueError, match="granularity=3 must divide"):
        upcycle(_mlp_model(Mlp(12, 20)), granularity=3)
    with pytest.raises(ValueError, match="not a recognised"):
        upcycle(_mlp_model(Mlp(12, 20)), select=["0"])
