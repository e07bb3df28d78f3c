"""Valid side inputs for any registered router, shared by the batch-independence and fuzz tests."""

from __future__ import annotations

import math

import pytest
import torch

from moezoo.layers import Router


def side_inputs(router: Router, lead: tuple[int, ...], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The side inputs the router needs for tokens of leading shape ``lead``: per sample (the first axis), LID
    posteriors and attention rows (over the tokens of the sample) per token. A router with a new side input fails
    here until a maker is added."""
    batch = lead[0]
    out = {}
    for name in router.needs_side:
        if name == "cfg_dropped":
            out[name] = torch.rand(batch, generator=generator) < 0.5
        elif name == "lid_probs":
            out[name] = torch.softmax(torch.randn(*lead, router.num_experts, generator=generator), -1)
        elif name == "attention_probs":  # one attention row per token over the tokens of its sample
            width = math.prod(lead[1:]) if len(lead) > 1 else lead[0]
            out[name] = torch.softmax(3 * torch.randn(*lead, width, generator=generator), -1)
        elif name == "global_embedding":
            out[name] = torch.randn(batch, router.embed_dim, generator=generator)  # type: ignore[arg-type]
        else:
            pytest.fail(
                f"no maker for side input {name!r} of {type(router).__name__}: add one to tests/layers/sides.py"
            )
    return out


def assert_eval_batch_independent(layer: torch.nn.Module, dim: int, atol: float = 1e-5) -> None:
    """At evaluation each item of a batch of 5 gets the output it gets alone (skips routers that keep a
    batch-dependent or random rule at evaluation)."""
    router: Router = layer.router  # type: ignore[assignment]
    if router.depends_on_batch(training=False) or getattr(router, "random_at_eval", False):
        pytest.skip(f"{type(router).__name__} keeps a batch-dependent (or random) rule at evaluation")
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(5, 6, dim, generator=generator)
    side = side_inputs(router, (5, 6), generator)
    with torch.no_grad():
        batch = layer(x, side=side)[0]
        for i in range(5):
            alone = layer(x[i : i + 1], side={k: v[i : i + 1] for k, v in side.items()})[0]
            torch.testing.assert_close(batch[i : i + 1], alone, atol=atol, rtol=atol)
