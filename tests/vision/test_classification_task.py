"""ImageClassificationTask's ``consistency_coef``: THOR's two-pass consistency-regularised loss (R-Drop for models
whose randomness is dropout), checked against a loss computed here by hand from two seeded forward passes."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from moezoo.tasks.vision import ImageClassificationTask

KWARGS = {"img_size": 8, "patch_size": 2, "in_chans": 1, "num_classes": 10}
THOR = {**KWARGS, "moe": {"router": "thor", "top_k": 2}}


def _batch(seed: int = 0, size: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(size, 1, 8, 8, generator=g), torch.randint(0, 10, (size,), generator=g)


def _symmetric_kl(logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
    """(KL(p_a || p_b) + KL(p_b || p_a)) / 2 per row, averaged: a loop over rows and classes."""
    total = logits_a.new_zeros(())
    for row_a, row_b in zip(logits_a, logits_b):
        p_a, p_b = torch.softmax(row_a, -1), torch.softmax(row_b, -1)
        kl_ab = sum(p_a[c] * (torch.log(p_a[c]) - torch.log(p_b[c])) for c in range(p_a.numel()))
        kl_ba = sum(p_b[c] * (torch.log(p_b[c]) - torch.log(p_a[c])) for c in range(p_b.numel()))
        total = total + 0.5 * (kl_ab + kl_ba)
    return total / logits_a.shape[0]


def _by_hand(task: ImageClassificationTask, batch, coef: float, smoothing: float, seed: int):
    """The two-pass loss from the model's own forwards: mean CE + coef x symmetric KL + the passes' mean aux loss."""
    x, y = batch
    torch.manual_seed(seed)
    logits_1, auxes_1 = task.model.forward_with_aux(x)
    logits_2, auxes_2 = task.model.forward_with_aux(x)
    ce_1 = F.cross_entropy(logits_1, y, label_smoothing=smoothing)
    ce = 0.5 * (ce_1 + F.cross_entropy(logits_2, y, label_smoothing=smoothing))
    consistency = _symmetric_kl(logits_1, logits_2)
    aux = 0.5 * (sum(a.aux_loss for a in auxes_1) + sum(a.aux_loss for a in auxes_2))
    return ce + coef * consistency + task.aux_loss_coef * aux, consistency, (logits_1, logits_2)


def _grads(task: ImageClassificationTask, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    task.model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in task.model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_thor_training_step_is_mean_cross_entropy_plus_coef_times_symmetric_kl(smoothing):
    torch.manual_seed(0)
    coef = 2.5
    task = ImageClassificationTask("moe_vit_debug", THOR, label_smoothing=smoothing, consistency_coef=coef)
    task.train()
    batch = _batch()
    expected, consistency, (logits_1, logits_2) = _by_hand(task, batch, coef, smoothing, seed=7)
    assert not torch.equal(logits_1, logits_2)  # THOR drew other experts in the second pass
    assert float(consistency.detach()) > 1e-6
    torch.manual_seed(7)
    got = task.training_step(batch, 0)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)

    got_grads = _grads(task, got)
    expected_grads = _grads(task, _by_hand(task, batch, coef, smoothing, seed=7)[0])
    assert set(got_grads) == set(expected_grads)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    # every parameter is trained: the head, attention, and each expert (THOR has no router weights)
    trained = {n for n, g in got_grads.items() if g.abs().sum() > 0}
    assert trained == {n for n, p in task.model.named_parameters() if p.requires_grad}
    # the consistency term itself sends gradients to the parameters
    torch.manual_seed(7)
    x, _ = batch
    kl_only = _symmetric_kl(task.model(x), task.model(x))
    assert any(g.abs().sum() > 0 for g in _grads(task, kl_only).values())


def test_deterministic_model_gets_zero_consistency_and_one_pass_of_aux_loss():
    """Allowed for any model: top-k routing without dropout is deterministic, so both passes agree, the consistency
    term is 0 and the loss is one pass's CE plus its aux loss (the two passes' aux results are averaged, not added)."""
    torch.manual_seed(0)
    task = ImageClassificationTask("moe_vit_debug", KWARGS, consistency_coef=3.0)
    task.train()
    x, y = batch = _batch(1)
    logits, auxes = task.model.forward_with_aux(x)
    aux = sum(a.aux_loss for a in auxes)
    assert float(aux) > 0  # top-k's balance loss
    loss, got_auxes, metrics, size = task.compute_loss(batch, "train")
    assert size == 6 and float(metrics["consistency"]) == pytest.approx(0.0, abs=1e-6)
    torch.testing.assert_close(loss, F.cross_entropy(logits, y), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sum(a.aux_loss for a in got_auxes), aux, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(task.training_step(batch, 0), F.cross_entropy(logits, y) + aux, rtol=1e-5, atol=1e-6)


def _count_forwards(task: ImageClassificationTask, monkeypatch) -> list[int]:
    calls = [0]
    inner = task.model.forward_with_aux

    def counted(x):
        calls[0] += 1
        return inner(x)

    monkeypatch.setattr(task.model, "forward_with_aux", counted)
    return calls


def test_coef_zero_is_the_one_pass_training_step(monkeypatch):
    torch.manual_seed(0)
    task = ImageClassificationTask("moe_vit_debug", THOR, label_smoothing=0.1)
    assert task.consistency_coef == 0.0
    task.train()
    x, y = batch = _batch(2)
    torch.manual_seed(5)
    logits, auxes = task.model.forward_with_aux(x)
    expected = F.cross_entropy(logits, y, label_smoothing=0.1) + sum(a.aux_loss for a in auxes)
    calls = _count_forwards(task, monkeypatch)
    torch.manual_seed(5)
    got = task.training_step(batch, 0)
    assert calls[0] == 1
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)


def test_two_passes_in_training_one_in_evaluation(monkeypatch):
    torch.manual_seed(0)
    task = ImageClassificationTask("moe_vit_debug", THOR, consistency_coef=1.0)
    calls = _count_forwards(task, monkeypatch)
    task.train()
    task.training_step(_batch(), 0)
    assert calls[0] == 2
    task.eval()
    with torch.no_grad():
        task.validation_step(_batch(), 0)
        task.test_step(_batch(), 0)
    assert calls[0] == 4


@pytest.mark.parametrize("bad", [-0.5, -1, math.nan, math.inf])
def test_bad_consistency_coef_is_a_clear_error(bad):
    with pytest.raises(ValueError, match=r"consistency_coef must be a finite number >= 0.*got"):
        ImageClassificationTask("moe_vit_debug", THOR, consistency_coef=bad)


@pytest.mark.parametrize("bad", ["1.0", True, None])
def test_consistency_coef_of_another_type_is_a_clear_error(bad):
    with pytest.raises(TypeError, match="consistency_coef must be a number >= 0"):
        ImageClassificationTask("moe_vit_debug", THOR, consistency_coef=bad)


def test_fit_logs_train_consistency(tmp_path):
    torch.manual_seed(0)
    task = ImageClassificationTask("moe_vit_debug", THOR, consistency_coef=2.5, lr_scheduler=None)
    x, y = _batch(3, size=8)
    trainer = L.Trainer(
        max_steps=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[],
    )
    trainer.fit(task, DataLoader(TensorDataset(x, y), batch_size=4))
    metrics = trainer.callback_metrics
    assert "train/consistency" in metrics and float(metrics["train/consistency"]) > 0
    assert math.isfinite(float(metrics["train/loss"]))
