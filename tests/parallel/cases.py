"""MoE layers and per-rank inputs shared by the 2-rank workers and the single-process oracle in the tests.

Every case is rebuilt from seeds, so the workers and the parent process hold the same weights and inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from moezoo.layers import MoE

DIM = 12
WORLD = 2


@dataclass
class Case:
    name: str
    moe_kwargs: dict[str, Any]
    shapes: tuple[tuple[int, ...], ...]  # leading shape of x on each rank
    steer: str | None = None  # "no_expert0_on_rank1" or "rank0_experts_only"
    mask: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


CASES = [
    Case("topk_gelu_empty_expert", dict(num_experts=4, top_k=2), ((13,), (7,)), steer="no_expert0_on_rank1"),
    Case(
        "topk_swiglu_shared_granular_mask",
        dict(num_experts=4, top_k=2, activation="swiglu", num_shared_experts=1, shared_expert_gate=True, granularity=2),
        ((3, 5), (2, 4)),
        mask=True,
    ),
    Case("topk_one_token", dict(num_experts=4, top_k=1), ((9,), (1,))),
    Case("all_on_rank0_experts", dict(num_experts=4, top_k=1), ((10,), (6,)), steer="rank0_experts_only"),
    Case("topk_capacity", dict(num_experts=4, top_k=2, router_kwargs={"capacity_factor": 0.75}), ((16,), (10,))),
    Case("sigmoid_lossfree", dict(num_experts=4, top_k=2, router="sigmoid_lossfree"), ((11,), (8,))),
    Case("relu", dict(num_experts=4, top_k=2, router="relu"), ((10,), (12,))),
    Case("expert_choice", dict(num_experts=4, top_k=2, router="expert_choice"), ((12,), (9,))),
    Case("sinkhorn", dict(num_experts=4, top_k=1, router="sinkhorn"), ((12,), (8,))),
    Case("soft", dict(num_experts=4, top_k=1, router="soft", router_kwargs={"slots_per_expert": 2}), ((2, 6), (3, 5))),
]


def build(case: Case) -> MoE:
    torch.manual_seed(100 + CASES.index(case))
    moe = MoE(DIM, 8, **case.moe_kwargs)
    with torch.no_grad():
        gate = moe.router.gate.weight
        if case.steer == "no_expert0_on_rank1":
            gate[0] = 3.0 * gate[0] / gate[0].norm()
        elif case.steer == "rank0_experts_only":
            direction = torch.zeros(DIM)
            direction[0] = 1.0
            gate[2:].copy_(-4.0 * direction)  # experts 2 and 3 (owned by rank 1) lose for inputs with x[0] > 0
            gate[:2, 0] = 0.0
    return moe.train()


def inputs(case: Case, rank: int) -> tuple[Tensor, Tensor | None, Tensor]:
    """``(x, mask, cotangent)`` of rank ``rank``: x ``(*shape, D)``, the cotangent of the output."""
    generator = torch.Generator().manual_seed(1000 * CASES.index(case) + rank)
    shape = case.shapes[rank]
    x = torch.randn(*shape, DIM, generator=generator)
    moe = build(case)
    if case.steer == "no_expert0_on_rank1" and rank == 1:
        w0 = moe.router.gate.weight[0].detach()
        x = x - ((x @ w0 + 6.0) / (w0 @ w0)).unsqueeze(-1) * w0  # logit of expert 0 is -6 for every token
    elif case.steer == "rank0_experts_only":
        x[..., 0] = x[..., 0].abs() + 3.0
    mask = torch.rand(shape, generator=generator) > 0.3 if case.mask else None
    cotangent = torch.randn(*shape, DIM, generator=generator)
    return x, mask, cotangent


def loss_of(moe: MoE, x: Tensor, mask: Tensor | None, cotangent: Tensor) -> tuple[Tensor, Tensor]:
    """Output and a scalar loss that reaches the output, the router losses and so every parameter."""
    y, aux = moe(x, mask=mask)
    return y, (y * cotangent).sum() + aux.aux_loss
