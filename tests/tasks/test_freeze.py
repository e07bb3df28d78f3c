"""``trainable``: fine-tune only the parameters that match (routers and heads), the rest frozen."""

from __future__ import annotations

import pytest
import torch

from moezoo.tasks.optim import param_groups
from moezoo.tasks.vision import ImageClassificationTask

KWARGS = {"img_size": 8, "patch_size": 2, "in_chans": 1, "num_classes": 10}


def test_trainable_freezes_all_but_the_matching_parameters():
    task = ImageClassificationTask("moe_vit_debug", KWARGS, trainable=["*router*", "head.*"])
    trained = {n for n, p in task.model.named_parameters() if p.requires_grad}
    assert trained and all("router" in n or n.startswith("head.") for n in trained)
    assert any(n.startswith("head.") for n in trained) and any("router" in n for n in trained)
    optimizer = torch.optim.AdamW(param_groups(task.model), lr=0.1)  # the task's optimiser groups
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for p in task.model.parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in task.model.named_parameters() if not p.requires_grad}
    loss = task.model(torch.randn(4, 1, 8, 8)).logsumexp(-1).mean()
    loss.backward()
    optimizer.step()
    assert all(torch.equal(p, frozen[n]) for n, p in task.model.named_parameters() if n in frozen)


def test_a_pattern_that_matches_nothing_is_an_error():
    with pytest.raises(ValueError, match=r"trainable: \['\*routr\*'\] match no parameter"):
        ImageClassificationTask("moe_vit_debug", KWARGS, trainable=["*routr*"])
    with pytest.raises(TypeError, match="trainable must be a list of name patterns"):
        ImageClassificationTask("moe_vit_debug", KWARGS, trainable="head.*")  # type: ignore[arg-type]
