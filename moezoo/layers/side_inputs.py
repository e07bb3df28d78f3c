"""Synthetic side inputs: a valid value for every side input a registered router declares (``needs_side``).

Benchmarks and tests run routers such as LR-MoE's ``language``, SpeechMoE2's ``global_embedding``, the
attention-aware ``attention_graph`` and ProMoE without the model that computes their side inputs (an LID head,
an utterance encoder, the block's attention, classifier-free-guidance label dropping). One maker per side input
name, shaped as :class:`~moezoo.layers.MoE` takes it for tokens of leading shape ``lead`` (``x`` is
``(*lead, D)``, the first axis the samples):

- ``lid_probs``: language posteriors per token, a softmax over the router's ``num_experts`` languages,
  ``(*lead, E)``;
- ``attention_probs``: attention rows per token over the tokens of its sample, a softmax (row-stochastic, already
  averaged over heads as the router expects), ``(B, L, L)`` for ``lead = (B, L)``, ``(T, T)`` for ``lead = (T,)``;
- ``global_embedding``: a standard normal vector of the router's ``embed_dim`` per sample ``(B, G)``, or per token
  ``(*lead, G)`` with ``per_token``;
- ``cfg_dropped``: a bool per sample ``(B,)``, or per token ``(*lead,)`` with ``per_token``, True with probability
  one half (the class label dropped for classifier-free guidance).

Router options the shapes depend on are read from the router (``num_experts``, ``embed_dim``), never repeated
here. Every draw comes from the given generator, so a fixed seed gives fixed inputs.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from moezoo.layers.routers import ATTENTION_PROBS, Router

CFG_DROP_PROB = 0.5  # synthetic: half of the samples (or tokens) have their class label dropped


def synthetic_side(
    router: Router, lead: tuple[int, ...], generator: torch.Generator, per_token: bool = False
) -> dict[str, Tensor]:
    """A valid value of each side input in ``router.needs_side`` for tokens of leading shape ``lead``.

    ``per_token``: the inputs that may be per sample or per token (``global_embedding``, ``cfg_dropped``) are
    drawn per token, so that a batch of one sample still gets a mix of dropped and kept labels. A router with a
    side input that has no maker here is a ``ValueError`` naming it (add a maker with the router)."""
    if not lead or any(not isinstance(n, int) or n < 0 for n in lead):
        raise ValueError(f"lead must be a non-empty tuple of ints >= 0 (the tokens' leading shape), got {lead!r}")
    batch = lead[0]
    sample = lead if per_token else (batch,)
    out = {}
    for name in router.needs_side:
        if name == "cfg_dropped":
            out[name] = torch.rand(*sample, generator=generator) < CFG_DROP_PROB
        elif name == "lid_probs":
            out[name] = torch.softmax(torch.randn(*lead, router.num_experts, generator=generator), -1)
        elif name == ATTENTION_PROBS:  # one attention row per token over the tokens of its sample
            width = math.prod(lead[1:]) if len(lead) > 1 else lead[0]
            out[name] = torch.softmax(3 * torch.randn(*lead, width, generator=generator), -1)
        elif name == "global_embedding":
            out[name] = torch.randn(*sample, router.embed_dim, generator=generator)  # type: ignore[call-overload]
        else:
            raise ValueError(
                f"no synthetic maker for side input {name!r} of {type(router).__name__}: add one to "
                "moezoo/layers/side_inputs.py"
            )
    return out
