"""Batch independence at evaluation, shared by the layer-option tests; the side inputs are
:func:`moezoo.layers.side_inputs.synthetic_side` (shared with ``moezoo bench routers``)."""

from __future__ import annotations

import pytest
import torch

from moezoo.layers import Router
from moezoo.layers.side_inputs import synthetic_side


def assert_eval_batch_independent(layer: torch.nn.Module, dim: int, atol: float = 1e-5) -> None:
    """At evaluation each item of a batch of 5 gets the output it gets alone (skips routers that keep a
    batch-dependent or random rule at evaluation)."""
    router: Router = layer.router  # type: ignore[assignment]
    if router.depends_on_batch(training=False) or getattr(router, "random_at_eval", False):
        pytest.skip(f"{type(router).__name__} keeps a batch-dependent (or random) rule at evaluation")
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(5, 6, dim, generator=generator)
    side = synthetic_side(router, (5, 6), generator)
    with torch.no_grad():
        batch = layer(x, side=side)[0]
        for i in range(5):
            alone = layer(x[i : i + 1], side={k: v[i : i + 1] for k, v in side.items()})[0]
            torch.testing.assert_close(batch[i : i + 1], alone, atol=atol, rtol=atol)
