"""``upcycle_from:`` of a task config: the task builds the dense model, loads the dense weights (a state dict
file or a Lightning checkpoint), upcycles it, and trains the MoE with its aux losses."""

from __future__ import annotations

import pytest
import torch

from moezoo.layers import MoE
from moezoo.models import create_model
from moezoo.surgery import load_dense_weights
from moezoo.tasks.vision.classification import ImageClassificationTask


@pytest.mark.parametrize("kind", ["state_dict", "lightning"])
def test_task_starts_from_the_upcycled_dense_model(tmp_path, kind):
    torch.manual_seed(3)
    dense = create_model("moe_vit_debug", moe={"dense": True}).eval()
    path = tmp_path / "dense.pt"
    state = dense.state_dict()
    torch.save(state if kind == "state_dict" else {"state_dict": {f"model.{k}": v for k, v in state.items()}}, path)
    task = ImageClassificationTask(
        "moe_vit_debug",
        {"moe": {"dense": True}},
        upcycle_from={"weights": str(path), "num_experts": 4, "top_k": 2},
    )
    model = task.model.eval()
    assert task.upcycle_report.layers and any(isinstance(m, MoE) for m in model.modules())
    x, y = torch.randn(3, 1, 28, 28), torch.tensor([0, 1, 2])
    torch.testing.assert_close(model(x), dense(x), atol=1e-5, rtol=1e-5)
    loss, auxes, _, _ = task.train().compute_loss((x, y), "train")
    assert auxes and torch.isfinite(loss)
    loss.backward()
    assert all(m.experts.w_in.grad is not None for m in model.modules() if isinstance(m, MoE))


def test_bad_weights_are_named(tmp_path):
    model = create_model("moe_vit_debug", moe={"dense": True})
    with pytest.raises(ValueError, match="no such file"):
        load_dense_weights(model, str(tmp_path / "missing.pt"))
