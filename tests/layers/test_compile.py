"""``torch.compile`` of the MoE layer on the CPU: every registered router, the fused and the reference backends,
masks and side inputs trace with ``fullgraph=True`` and give the eager outputs and gradients.

Graph capture is checked with the cheap ``aot_eager`` backend (dynamo + AOTAutograd, forward and backward graphs,
no code generation); one test runs inductor end to end. The Triton backend's fake tensors are checked the same way
in ``tests/kernels/test_backend.py`` (under the interpreter).
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo.testing

from moezoo.layers import ROUTERS, MoE

# Every registered router, plus the top-k variants that filter pairs (capacity, null experts).
CASES = {
    "topk": ("topk", {}),
    "topk_capacity": ("topk", {"capacity_factor": 0.75, "drop_policy": "batch_priority", "z_loss_coef": 1e-3}),
    "topk_null": ("topk", {"num_null_experts": 2}),
    "sigmoid_lossfree": ("sigmoid_lossfree", {}),
    "expert_choice": ("expert_choice", {}),
    "expert_choice_train_item": ("expert_choice", {"train_rule": "item"}),  # per-sample choice in training
    "sinkhorn": ("sinkhorn", {}),
    "relu": ("relu", {}),
    "soft": ("soft", {"slots_per_expert": 2}),
    "segment": ("segment", {"segment_size": 2}),
    "promoe": ("promoe", {}),
    "omni": ("omni", {}),
    "language": ("language", {}),
    "global_embedding": ("global_embedding", {"embed_dim": 3}),
    # moezoo.layers.routers_extra
    "top_p": ("top_p", {}),
    "xmoe": ("xmoe", {}),
    "prototype": ("prototype", {}),
    "hyper": ("hyper", {}),
    "attention": ("attention", {}),
    "mixture_of_routers": ("mixture_of_routers", {}),
    "gmm": ("gmm", {}),
    "expert_race": ("expert_race", {}),
    "vq": ("vq", {}),
    "stablemoe": ("stablemoe", {}),
    "gw": ("gw", {"uncertainty": 0.5}),
    "bilevel": ("bilevel", {"num_groups": 2}),
    "rectify": ("rectify", {"capacity_factor": 0.75}),
    "thor": ("thor", {}),
    "moec": ("moec", {}),  # training: cluster-level expert dropout (seeded draws), rerouting within the cluster
    # moezoo.layers.expert_routers (the layer hands them its experts)
    "aoe": ("aoe", {}),
    "erc": ("erc", {}),
    "compete": ("compete", {"compete_prob": 1.0}),  # a competition step: every expert's response decides
    "compete_router_step": ("compete", {"compete_prob": 0.0}),  # its router's step
    "smear": ("smear", {}),  # its own kind: one merged expert per example
    # moezoo.layers.recurrent: given the previous layer's state (the side input "router_state")
    "recurrent": ("recurrent", {"routing_dim": 3}),
    # moezoo.layers.token_graph_routers (the similarity router mixes within each sample: the layer's sample grid)
    "similarity": ("similarity", {}),
    "similarity_batch_rule": ("similarity", {"train_rule": "batch", "similarity_dim": 3}),
    "attention_graph": ("attention_graph", {}),  # given the block's attention rows (the side input)
    "maskmoe": ("maskmoe", {"hash_bits": 3}),
}
DIM = 8


def test_every_registered_router_is_covered():
    assert {router for router, _ in CASES.values()} == set(ROUTERS)


def _side(router: str, lead: tuple[int, ...]) -> dict[str, torch.Tensor] | None:
    if router == "promoe":
        return {"cfg_dropped": torch.tensor([True, False])}
    if router == "language":
        return {"lid_probs": torch.softmax(torch.randn(*lead, 4), -1)}
    if router == "global_embedding":
        return {"global_embedding": torch.randn(lead[0], 3)}
    if router == "recurrent":
        return {"router_state": torch.randn(*lead, 3)}
    if router == "attention_graph":
        return {"attention_probs": torch.softmax(torch.randn(*lead, lead[-1]), -1)}
    return None


def _layer(case: str, backend: str = "torch") -> MoE:
    router, kwargs = CASES[case]
    top_k = 1 if router in ("promoe", "language", "omni", "global_embedding", "segment") else 2
    torch.manual_seed(0)
    return MoE(DIM, 6, num_experts=4, top_k=top_k, router=router, router_kwargs=kwargs, backend=backend).train()


def _step(moe: MoE, x: torch.Tensor, mask: torch.Tensor | None, side: dict | None) -> list[torch.Tensor]:
    """Output, aux statistics and every gradient of one forward+backward."""
    y, aux = moe(x, mask=mask, side=side)
    loss = (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum() + aux.aux_loss
    params = [x, *(p for p in moe.parameters() if p.requires_grad)]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    stats = [aux.tokens_per_expert_E, aux.dropped_frac, aux.router_entropy, aux.expert_load_cv]
    stats += [] if aux.router_state is None else [aux.router_state]  # the state a recurrent router hands on
    return [y, *stats, *(g if g is not None else torch.zeros_like(p) for g, p in zip(grads, params))]


def _assert_compiled_matches_eager(
    case: str, mask: torch.Tensor | None, backend: str = "aot_eager", moe_backend: str = "torch"
) -> None:
    moe = _layer(case, moe_backend)
    x = torch.randn(2, 6, DIM, requires_grad=True)
    side = _side(CASES[case][0], x.shape[:-1])
    before = {name: b.clone() for name, b in moe.named_buffers()}
    torch.manual_seed(1)  # the same draws for random routing (THOR) in both steps
    want = _step(moe, x, mask, side)
    after = {name: b.clone() for name, b in moe.named_buffers()}
    for name, b in moe.named_buffers():  # the compiled step starts from the same router state
        b.copy_(before[name])
    torch._dynamo.reset()
    torch.manual_seed(1)
    got = _step(torch.compile(moe, fullgraph=True, backend=backend), x, mask, side)  # type: ignore[arg-type]
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)
    for name, b in moe.named_buffers():  # and updates it as the eager step did (loss-free load, ReLU sparsity)
        torch.testing.assert_close(b, after[name], msg=name)


@pytest.mark.parametrize("case", list(CASES))
def test_every_router_compiles_fullgraph(case):
    _assert_compiled_matches_eager(case, mask=None)


MASKED_CASES = ["topk", "topk_capacity", "expert_choice", "expert_choice_train_item", "sinkhorn", "soft", "language",
                "top_p", "expert_race", "gw", "rectify", "recurrent"]  # fmt: skip
MASKED_CASES += ["moec"]  # moezoo.layers.routers_extra (dropout and rerouting over a data-dependent token count)
# moezoo.layers.token_graph_routers
MASKED_CASES += ["similarity", "similarity_batch_rule", "attention_graph", "maskmoe"]


@pytest.mark.parametrize("case", MASKED_CASES)
def test_masked_layer_compiles_fullgraph(case):
    """A padding mask makes the token count data-dependent: routers and statistics must not branch on it."""
    mask = torch.tensor([[True, True, False, True, False, False], [True] * 6])
    _assert_compiled_matches_eager(case, mask=mask)


@pytest.mark.parametrize("case", ["topk", "soft"])
def test_reference_backend_compiles_fullgraph(case):
    _assert_compiled_matches_eager(case, mask=None, moe_backend="reference")


@pytest.mark.parametrize("moe_backend", ["torch_save_h", "torch_save_all"])
def test_fused_save_modes_compile_fullgraph(moe_backend):
    """The fused path keeping the gathered inputs and activations too: its kept tensors' fake shapes follow the
    input shapes, so the graph holds with them (and with the pre-activations only)."""
    _assert_compiled_matches_eager("topk_capacity", mask=None, moe_backend=moe_backend)


@pytest.mark.parametrize("case", ["topk", "sigmoid_lossfree", "soft"])
def test_default_compile_has_no_graph_break(case):
    """Without ``fullgraph`` too, a layer whose router keeps every pair is one graph (the issue: 13 breaks)."""
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("eager")
    moe = _layer(case)
    torch.compile(moe, backend=counter)(torch.randn(2, 6, DIM))
    assert counter.frame_count == 1


def test_inductor_forward_and_backward():
    """One end-to-end inductor run (code generation and all), fused path, top-k with capacity dropping."""
    _assert_compiled_matches_eager("topk_capacity", mask=None, backend="inductor")
