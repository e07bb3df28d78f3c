"""The layerwise recurrent router (RMoE, ``moezoo.layers.recurrent``): a stack of L MoE layers called through
``run_ffn`` (as every model family calls them) against a float64 token-by-token oracle of the whole recurrence
(output, balance losses, gradients to the input, every projector, the shared GRU, every gate and the experts), on
the reference and fused CPU backends, with and without a padding mask; the first layer's ``h_0 = 0``; the state in
the models (one cell, gradients across layers, batch independence, state-dict round trip); the refusals."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from moezoo.layers import MoE, MoEAux, get_router
from moezoo.layers.recurrent import RecurrentRouter
from moezoo.layers.routers import ROUTER_STATE
from moezoo.models import MoESpec, create_model, moe_layers, run_ffn, save_pretrained, share_router_modules
from moezoo.models.hub import load_state_dict
from moezoo.parallel import ExpertParallelGroups, shard_experts
from moezoo.stats import count_parameters
from tests import oracles_routers as naive

DIM, F, E, R = 6, 5, 4, 3


class Stack(nn.Module):
    """L residual MoE layers with the recurrent router, called through ``run_ffn`` in order, one shared GRU."""

    def __init__(self, depth: int, k: int, backend: str, activation: str = "gelu") -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            MoE(DIM, F, E, k, router="recurrent", router_kwargs={"routing_dim": R}, activation=activation,
                backend=backend)
            for _ in range(depth)
        )  # fmt: skip
        share_router_modules(self)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, list[MoEAux]]:
        auxes: list[MoEAux] = []
        for layer in self.layers:
            x = x + run_ffn(layer, x, auxes, mask)
        return x, auxes


def _stack(depth=3, k=2, backend="torch", seed=0) -> Stack:
    torch.manual_seed(seed)
    return Stack(depth, k, backend).double().train()


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("masked", [False, True])
def test_the_stack_matches_the_recurrence_oracle_with_gradients(backend, k, masked):
    stack = _stack(3, k, backend)
    x = torch.randn(2, 4, DIM, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True, False, True, True], [True, True, False, True]]) if masked else None
    y, auxes = stack(x, mask)
    cell = stack.layers[0].router.cell
    want_y, want_balance = naive.recurrent_router_stack(
        x.reshape(-1, DIM),
        [True] * 8 if mask is None else mask.reshape(-1).tolist(),
        [
            {
                "proj": layer.router.proj.weight.double(),
                "gate": layer.router.gate.weight.double(),
                "w_in": layer.experts.w_in,
                "w_out": layer.experts.w_out,
            }
            for layer in stack.layers
        ],
        {"w_ih": cell.weight_ih.double(), "w_hh": cell.weight_hh.double(), "b_ih": cell.bias_ih.double(),
         "b_hh": cell.bias_hh.double()},
        "gelu",
        k,
    )  # fmt: skip
    want_y = want_y.reshape(x.shape)
    balance = sum(aux.losses["balance"] for aux in auxes)
    # the routers (projector, GRU, gate) compute in fp32, as every router does; the experts in the layer's float64
    torch.testing.assert_close(y, want_y, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(balance, want_balance.float(), atol=1e-6, rtol=1e-5)
    weight = torch.randn_like(y)
    names, params = zip(*[("x", x), *stack.named_parameters()])
    assert sum("cell" in n for n in names) == 4  # one shared cell: weight_ih, weight_hh, bias_ih, bias_hh
    assert sum(".proj." in n for n in names) == 3 and sum(".gate." in n for n in names) == 3
    got = torch.autograd.grad((y * weight).sum() + balance, params)
    want = torch.autograd.grad((want_y * weight).sum() + want_balance, params)
    for name, g, w in zip(names, got, want):
        torch.testing.assert_close(g, w.to(g.dtype), atol=1e-6, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    for i, aux in enumerate(auxes):
        assert aux.router_state is not None and aux.router_state.shape == (2, 4, R)
        if mask is not None:
            assert not aux.router_state[~mask].any(), f"layer {i}: masked tokens carry no state"
        assert float(aux.tokens_per_expert_E.sum()) == k * (8 if mask is None else int(mask.sum()))


def test_the_first_layer_starts_from_zero_and_a_state_changes_the_routing():
    torch.manual_seed(0)
    router = get_router("recurrent", DIM, E, top_k=2, routing_dim=R)
    x = torch.randn(7, DIM)
    alone = router(x)
    zeros = router(x, {ROUTER_STATE: torch.zeros(7, R)})
    for a, b in zip(
        (alone.token_idx_N, alone.expert_idx_N, alone.gate_N, alone.next_state),
        (zeros.token_idx_N, zeros.expert_idx_N, zeros.gate_N, zeros.next_state),
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    cell = router.cell
    x_R = x @ router.proj.weight.t()
    gi, gh = x_R @ cell.weight_ih.t() + cell.bias_ih, cell.bias_hh.expand(7, -1)  # h_0 = 0: W_hh h_0 = 0
    r, z = torch.sigmoid(gi[:, :R] + gh[:, :R]), torch.sigmoid(gi[:, R : 2 * R] + gh[:, R : 2 * R])
    h_1 = (1 - z) * torch.tanh(gi[:, 2 * R :] + r * gh[:, 2 * R :])
    torch.testing.assert_close(alone.next_state, h_1)
    other = router(x, {ROUTER_STATE: 3 * torch.randn(7, R)})
    assert not torch.equal(other.gate_N, alone.gate_N)
    # the MoE layer hands the state on in the input's leading shape
    torch.manual_seed(0)
    moe = MoE(DIM, F, E, 2, router="recurrent", router_kwargs={"routing_dim": R})
    _, aux = moe(x.reshape(1, 7, DIM))
    torch.testing.assert_close(aux.router_state, moe.router.recurrence(x).reshape(1, 7, R))


def test_gradients_flow_back_through_the_recurrence():
    """The last layer's balance loss alone trains the first layer's projector and the shared cell: h is not
    detached between layers. Every layer reads the same tokens here (no residual stream), so the state is the only
    path from layer 0 to layer 2."""
    stack = _stack(3, 2)
    x = torch.randn(2, 4, DIM, dtype=torch.float64)
    auxes: list[MoEAux] = []
    for layer in stack.layers:
        run_ffn(layer, x, auxes)
    auxes[-1].losses["balance"].backward()
    first = stack.layers[0].router
    assert first.proj.weight.grad is not None and first.proj.weight.grad.abs().sum() > 0
    assert first.cell.weight_hh.grad is not None and first.cell.weight_hh.grad.abs().sum() > 0
    assert first.gate.weight.grad is None  # layer 0's gate does not feed layer 2's routing


@pytest.mark.parametrize("family,kwargs,shape", [
    ("moe_vit_debug", {}, (3, 1, 28, 28)),
    ("moe_dit_debug", {"num_experts": 5, "top_k": 1}, None),
    ("moe_patchtst_debug", {"segment_sizes": 1}, None),
    ("moe_tsfm_debug", {}, None),
    ("moe_conformer_debug", {}, None),
])  # fmt: skip
def test_every_family_that_threads_the_state_shares_one_cell(family, kwargs, shape):
    torch.manual_seed(0)
    model = create_model(family, moe={"router": "recurrent", "router_kwargs": {"routing_dim": R}, **kwargs})
    layers = moe_layers(model)
    assert len(layers) >= 2 and len({id(layer.router.cell) for layer in layers}) == 1
    assert len({id(layer.router.proj) for layer in layers}) == len(layers)  # a projector and a gate per layer
    counts = count_parameters(model)
    assert counts.total == sum(p.numel() for p in model.parameters())  # the shared cell counted once
    cell = sum(p.numel() for p in layers[0].router.cell.parameters())
    per_layer = sum(p.numel() for n, p in layers[0].router.named_parameters() if not n.startswith("cell."))
    assert counts.components["routers"].total == cell + len(layers) * per_layer


def test_a_vit_threads_the_state_and_its_items_are_batch_independent():
    torch.manual_seed(0)
    model = create_model("moe_vit_debug", moe={"router": "recurrent"}).eval()
    x = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        batch, auxes = model.forward_with_aux(x)
        for i in range(5):
            torch.testing.assert_close(model(x[i : i + 1]), batch[i : i + 1], atol=1e-5, rtol=1e-5)
    assert [tuple(a.router_state.shape) for a in auxes] == [(5, 50, 32), (5, 50, 32)]  # routing_dim default 32
    # the second layer routes on the first layer's state: its router, given none, decides otherwise
    captured = {}
    second = moe_layers(model)[1]
    second.register_forward_pre_hook(lambda m, args, kwargs: captured.update(kwargs), with_kwargs=True)
    with torch.no_grad():
        model(x)
    assert captured["side"][ROUTER_STATE] is not None
    tokens = torch.randn(5 * 50, second.router.dim)
    with torch.no_grad():
        with_state = second.router(tokens, {ROUTER_STATE: auxes[0].router_state.reshape(5 * 50, 32)})
        without = second.router(tokens)
    assert not torch.equal(with_state.gate_N, without.gate_N)


def test_state_dict_round_trip_keeps_one_shared_cell(tmp_path):
    """In memory and through the Hub layout (safetensors stores the shared cell once per layer name)."""
    torch.manual_seed(0)
    model = create_model("moe_vit_debug", moe={"router": "recurrent"}).eval()
    torch.manual_seed(1)
    other = create_model("moe_vit_debug", moe={"router": "recurrent"}).eval()
    x = torch.randn(2, 1, 28, 28)
    assert not torch.allclose(model(x), other(x))
    other.load_state_dict(model.state_dict())
    torch.testing.assert_close(other(x), model(x), rtol=0, atol=0)
    layers = moe_layers(other)
    assert layers[0].router.cell is layers[1].router.cell
    torch.manual_seed(2)
    published = create_model("moe_vit_debug", moe={"router": "recurrent"}).eval()
    published.load_state_dict(
        load_state_dict(save_pretrained(model, tmp_path / "pub", card=False) / "model.safetensors")
    )
    torch.testing.assert_close(published(x), model(x), rtol=0, atol=0)
    assert {k for k in model.state_dict() if ".cell." in k} == {
        f"blocks.{i}.ffn.router.cell.{p}" for i in (0, 1) for p in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
    }


def test_clear_errors_and_refusals():
    with pytest.raises(ValueError, match=r"passes its routing state from each MoE layer to the next .* moe_yolo"):
        create_model("moe_yolo_nano", neck_moe={"router": "recurrent"})
    with pytest.raises(ValueError, match=r"Chain-of-Experts.*'recurrent'.*layerwise recurrent router"):
        MoESpec(router="recurrent", num_iterations=2)
    stack = _stack(2, 2)
    groups = ExpertParallelGroups(None, None, ep_size=2, ep_rank=0, num_replicas=1, world_size=2, timeout_s=1.0)
    with pytest.raises(ValueError, match=r"passes state between layers \(RecurrentRouter"):
        shard_experts(stack, groups)
    router = RecurrentRouter(DIM, E, routing_dim=R)
    with pytest.raises(ValueError, match=r"'router_state' .* must have shape \(tokens=5, routing_dim=3\)"):
        router(torch.randn(5, DIM), {ROUTER_STATE: torch.zeros(5, R + 1)})
    with pytest.raises(ValueError, match=r"x must have shape \(tokens, dim=6\)"):
        router(torch.randn(5, DIM + 1))
    with pytest.raises(ValueError, match="routing_dim must be an integer >= 1"):
        MoE(DIM, F, E, 2, router="recurrent", router_kwargs={"routing_dim": 0})
    mixed = nn.ModuleList([MoE(DIM, F, E, 2, router="recurrent", router_kwargs={"routing_dim": r}) for r in (R, R + 1)])
    with pytest.raises(ValueError, match=r"RecurrentRouter.cell is shared by every MoE layer, but .* differ"):
        share_router_modules(mixed)
    # the layer checks the state like any side input
    moe = MoE(DIM, F, E, 2, router="recurrent", router_kwargs={"routing_dim": R})
    with pytest.raises(ValueError, match="side input 'router_state' contains NaN"):
        moe(torch.randn(2, 3, DIM), side={ROUTER_STATE: torch.full((2, 3, R), float("nan"))})
