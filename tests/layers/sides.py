"""Valid side inputs for any registered router, shared by the batch-independence and fuzz tests."""

from __future__ import annotations

import pytest
import torch

from moezoo.layers import Router


def side_inputs(router: Router, lead: tuple[int, ...], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The side inputs the router needs for tokens of leading shape ``lead``: per sample (the first axis), LID
    posteriors per token. A router with a new side input fails here until a maker is added."""
    batch = lead[0]
    out = {}
    for name in router.needs_side:
        if name == "cfg_dropped":
            out[name] = torch.rand(batch, generator=generator) < 0.5
        elif name == "lid_probs":
            out[name] = torch.softmax(torch.randn(*lead, router.num_experts, generator=generator), -1)
        elif name == "global_embedding":
            out[name] = torch.randn(batch, router.embed_dim, generator=generator)  # type: ignore[arg-type]
        else:
            pytest.fail(
                f"no maker for side input {name!r} of {type(router).__name__}: add one to tests/layers/sides.py"
            )
    return out
