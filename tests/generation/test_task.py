"""ImageGenerationTask: sampling, EMA, sample grids, routing purity, FD-FMNIST, and clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moezoo.layers import MoEAux, RoutingResult
from moezoo.tasks.generation import ImageGenerationTask
from moezoo.tasks.generation.ema import EMA
from moezoo.tasks.generation.fd import FMNISTClassifier, frechet_distance, gaussian_stats
from moezoo.tasks.generation.metrics import primary_pairs, routing_purity

DEBUG = dict(img_size=8, patch_size=2, moe=dict(num_experts=5, top_k=1, num_shared_experts=1, router="promoe"))


def _task(**kwargs):
    return ImageGenerationTask("moe_dit_debug", DEBUG, num_sampling_steps=3, **kwargs)


def test_generate_is_deterministic_and_in_range():
    task = _task()
    with torch.no_grad():
        task.ema.module.final.weight.normal_(0, 0.2)
    y = torch.tensor([1, 2, 3])
    a, b = task.generate(y, seed=3), task.generate(y, seed=3)
    assert torch.equal(a, b) and a.shape == (3, 1, 8, 8)
    assert float(a.abs().max()) <= 1.0
    assert not torch.equal(a, task.generate(y, seed=4))


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="guidance_scale must be a finite number >= 0"):
        _task(guidance_scale=-1.0)
    with pytest.raises(ValueError, match="sampler must be one of"):
        _task(objective="ddpm", sampler="euler")
    with pytest.raises(ValueError, match="objective"):
        _task(objective="edm")
    with pytest.raises(ValueError, match="eval_num_samples=100 needs 28x28"):
        _task(eval_num_samples=100)
    with pytest.raises(ValueError, match="img_size=8 must be divisible by patch_size=3"):
        ImageGenerationTask("moe_dit_debug", dict(DEBUG, patch_size=3))
    task = _task()
    with pytest.raises(ValueError, match=r"class ids must be in \[0, 10\)"):
        task.compute_loss((torch.zeros(2, 1, 8, 8), torch.tensor([0, 10])), "train")
    with pytest.raises(ValueError, match="class ids"):
        task.generate(torch.tensor([12]))


def test_training_loss_uses_label_dropout_and_logs_purity_outside_training():
    task = _task(cfg_dropout=0.5)
    x, y = torch.rand(8, 1, 8, 8) * 2 - 1, torch.arange(8)
    loss, auxes, metrics, bs = task.compute_loss((x, y), "val")
    assert bs == 8 and "routing_purity" in metrics and 0.0 < float(metrics["routing_purity"]) <= 1.0
    torch.manual_seed(0)
    _, auxes, metrics, _ = task.compute_loss((x, y), "train")
    assert metrics == {}
    assert int((auxes[0].routing.expert_idx_N == 4).sum()) > 0  # some labels dropped -> unconditional expert


def test_ema_tracks_the_model_with_warmup():
    model = torch.nn.Linear(2, 2)
    ema = EMA(model, decay=0.9)
    start = ema.module.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)  # first update: decay min(0.9, 1/10) = 0.1
    torch.testing.assert_close(ema.module.weight, start + 0.9)
    with pytest.raises(ValueError, match="ema_decay"):
        EMA(model, 1.0)


def _aux(token, expert, gate, num_tokens, num_experts):
    routing = RoutingResult(torch.tensor(token), torch.tensor(expert), torch.tensor(gate), num_tokens, num_experts)
    z = torch.zeros(())
    return MoEAux({}, torch.zeros(num_experts), z, z, z, num_tokens, routing)


def test_routing_purity_counts_each_token_on_its_primary_expert():
    # 2 samples x 2 tokens; sample 0 is class 0, sample 1 class 1. Token 1 has two pairs: gate 0.3 on e1, 0.7 on e0.
    aux = _aux([0, 1, 1, 2, 3], [0, 1, 0, 2, 1], [1.0, 0.3, 0.7, 1.0, 1.0], 4, 3)
    tok, exp = primary_pairs(aux.routing.token_idx_N, aux.routing.expert_idx_N, aux.routing.gate_N)
    assert tok.tolist() == [0, 1, 2, 3] and exp.tolist() == [0, 0, 2, 1]
    # class 0: tokens on {0, 0} -> max 2; class 1: {2, 1} -> max 1; purity (2 + 1) / 4
    assert routing_purity([aux], torch.tensor([0, 1]), 2) == pytest.approx(0.75)
    # null-label samples (id = num_classes) do not count
    assert routing_purity([aux], torch.tensor([0, 2]), 2) == pytest.approx(1.0)


def test_frechet_distance_closed_form_for_diagonal_gaussians():
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    expected = float(((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum())
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-9)
    rng = np.random.default_rng(0)
    m = rng.normal(size=(5, 5))
    cov = m @ m.T
    assert frechet_distance(mu1[:1].repeat(5), cov, mu1[:1].repeat(5), cov) == pytest.approx(0.0, abs=1e-8)
    feats = torch.randn(50, 3, dtype=torch.float64)
    mu, c = gaussian_stats(feats)
    np.testing.assert_allclose(c, np.cov(feats.numpy(), rowvar=False))


def test_classifier_shape_check():
    with pytest.raises(ValueError, match=r"\(B, 1, 28, 28\)"):
        FMNISTClassifier().features(torch.zeros(2, 1, 8, 8))
