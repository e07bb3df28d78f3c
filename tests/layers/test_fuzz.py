"""Fuzz suite (issue 18): random shapes, masks, side inputs, router options and degenerate inputs for every
registered router x CPU backend, a bounded number of cases (``FUZZ_EXAMPLES``) in the default tier.

Properties: a valid input never raises; outputs and input/parameter gradients are finite for finite inputs; the
output has the input's shape and is 0 at masked tokens; the per-expert counts equal the routed pairs, every pair
names a real token and expert, and the dropped fraction is in [0, 1]. Bad input raises ValueError/TypeError
naming the argument (checked on generated bad inputs below).
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st

from moezoo.layers import ROUTERS, MoE, get_router, router_options
from moezoo.layers.routers import check_router_kwargs
from moezoo.layers.side_inputs import synthetic_side

FUZZ_EXAMPLES = int(os.environ.get("MOEZOO_FUZZ_EXAMPLES", "200"))
BACKENDS = ("torch", "reference")
DIM = 8
FUZZ = settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


def _router_kwargs(name: str, draw) -> dict:
    options = router_options(name)
    kwargs: dict = {}
    if "capacity_factor" in options:
        kwargs["capacity_factor"] = draw(st.sampled_from([None, 0.25, 1.0, 2.0]))
    if "balanced_eval" in options:
        kwargs["balanced_eval"] = draw(st.booleans())
    if "eval_rule" in options:
        kwargs["eval_rule"] = draw(st.sampled_from(["item", "batch"]))
    if "train_rule" in options:
        kwargs["train_rule"] = draw(st.sampled_from(["batch", "item"]))
    if "drop_policy" in options:
        kwargs["drop_policy"] = draw(st.sampled_from(["position", "batch_priority"]))
    if "noise" in options:
        kwargs["noise"] = draw(st.sampled_from([None, "gaussian", "jitter"]))
    if "num_null_experts" in options and name == "topk":
        kwargs["num_null_experts"] = draw(st.integers(0, 2))
    if "z_loss_coef" in options:
        kwargs["z_loss_coef"] = draw(st.sampled_from([0.0, 1e-3]))
    return kwargs


@st.composite
def cases(draw):
    name = draw(st.sampled_from(sorted(ROUTERS)))
    num_experts = draw(st.integers(2, 5))
    kwargs = _router_kwargs(name, draw)
    max_k = num_experts - 1 if name == "promoe" else num_experts + kwargs.get("num_null_experts", 0)
    top_k = draw(st.integers(1, min(max_k, 3)))
    try:  # only valid settings here (e.g. num_experts a multiple of a router's num_groups); bad ones: the test below
        check_router_kwargs(
            name, {**kwargs, "top_k": top_k} if "top_k" in router_options(name) else kwargs, num_experts
        )
    except (TypeError, ValueError):  # e.g. rectify's capacity_factor=None (it needs a number): a wrong type
        reject()
    lead = draw(st.sampled_from([(0, 4), (1, 1), (2, 5), (3, 4), (1, 0), (4,), (2, 2, 3)]))
    if name == "soft" and len(lead) == 1:
        lead = (1, lead[0])
    kind = draw(st.sampled_from(["normal", "identical", "huge", "zeros", "tiny"]))
    mask_kind = draw(st.sampled_from(["none", "random", "all_masked", "all_real"]))
    return {
        "name": name,
        "num_experts": num_experts,
        "top_k": top_k,
        "kwargs": kwargs,
        "lead": lead,
        "kind": kind,
        "mask_kind": mask_kind,
        "backend": draw(st.sampled_from(BACKENDS)),
        "training": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**16)),
    }


def _input(case: dict, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
    lead = case["lead"]
    x = torch.randn(*lead, DIM, generator=generator)
    if case["kind"] == "identical":
        x = x.reshape(-1, DIM)[:1].expand(*lead, DIM).clone() if x.numel() else x
    elif case["kind"] == "huge":
        x = x * 1e4
    elif case["kind"] == "zeros":
        x = torch.zeros_like(x)
    elif case["kind"] == "tiny":
        x = x * 1e-30
    mask = None
    if case["mask_kind"] == "random":
        mask = torch.rand(lead, generator=generator) < 0.6
    elif case["mask_kind"] in ("all_masked", "all_real"):
        mask = torch.full(lead, case["mask_kind"] == "all_real", dtype=torch.bool)
    return x.requires_grad_(True), mask


@FUZZ
@given(cases())
def test_fuzz_every_router_and_backend(case):
    generator = torch.Generator().manual_seed(case["seed"])
    torch.manual_seed(case["seed"])
    moe = MoE(DIM, 16, case["num_experts"], case["top_k"], router=case["name"], router_kwargs=case["kwargs"],
              backend=case["backend"], num_shared_experts=case["seed"] % 2)  # fmt: skip
    moe.train(case["training"])
    x, mask = _input(case, generator)
    side = synthetic_side(moe.router, case["lead"], generator)
    y, aux = moe(x, mask=mask, side=side)
    assert y.shape == x.shape
    assert torch.isfinite(y).all(), case
    if mask is not None:
        assert (y[~mask] == 0).all()
    loss = y.square().mean() + aux.aux_loss if y.numel() else aux.aux_loss
    if loss.requires_grad:
        loss.backward()
        assert x.grad is None or torch.isfinite(x.grad).all(), case
        for pname, p in moe.named_parameters():
            assert p.grad is None or torch.isfinite(p.grad).all(), (pname, case)
    assert torch.isfinite(aux.aux_loss) and 0.0 <= float(aux.dropped_frac) <= 1.0
    if aux.routing is not None:
        r = aux.routing
        assert int(aux.tokens_per_expert_E.sum()) == r.expert_idx_N.numel() == r.token_idx_N.numel()
        assert r.token_idx_N.numel() == 0 or (0 <= int(r.token_idx_N.min()) and int(r.token_idx_N.max()) < r.num_tokens)
        assert r.expert_idx_N.numel() == 0 or int(r.expert_idx_N.max()) < case["num_experts"]
        assert torch.isfinite(r.gate_N).all()


BAD_VALUES = [-1, 0, 1.5, float("nan"), float("inf"), "2", None, True]


@FUZZ
@given(name=st.sampled_from(sorted(ROUTERS)), data=st.data())
def test_fuzz_bad_router_options_raise_naming_the_argument(name, data):
    options = [o for o, default in router_options(name).items() if default is not inspect_empty()]
    option = data.draw(st.sampled_from(options or ["top_k"]))
    value = data.draw(st.sampled_from(BAD_VALUES))
    try:
        get_router(name, DIM, 4, **{option: value})
    except (ValueError, TypeError) as err:
        assert option in str(err) or "num_experts" in str(err), (option, value, str(err))


def inspect_empty():
    import inspect

    return inspect.Parameter.empty


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.int64])
def test_a_wrong_input_dtype_names_the_dtype(dtype):
    moe = MoE(DIM, 16, 4, 2)
    with pytest.raises(TypeError, match=r"x (has dtype|must be a floating-point tensor)"):
        moe(torch.ones(2, 3, DIM).to(dtype))
