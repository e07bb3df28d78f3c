"""Objectives and samplers: exact on a point mass, deterministic for a seed, guidance, one-step loss decrease."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moezoo.models import create_model
from moezoo.tasks.generation.diffusion import DDPM, RectifiedFlow, build_objective, guided

POINT = torch.linspace(-0.9, 0.9, 16).view(1, 1, 4, 4)


def test_euler_and_heun_are_exact_for_the_velocity_of_a_point_mass():
    flow = RectifiedFlow()

    def velocity(x, t, y):  # x_t = (1 - t) c + t noise  =>  v = (x_t - c) / t
        return (x - POINT) / (t / flow.time_scale).clamp_min(1e-6).view(-1, 1, 1, 1)

    noise = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    for sampler in ("euler", "heun"):
        out = flow.sample(velocity, noise, torch.zeros(3, dtype=torch.long), num_steps=5, sampler=sampler)
        torch.testing.assert_close(out, POINT.expand(3, -1, -1, -1), atol=1e-5, rtol=0)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_ddpm_samplers_return_the_point_mass_for_its_exact_noise_prediction(sampler):
    ddpm = DDPM(100, "linear")

    def eps(x, t, y):
        ab = ddpm.alpha_bar[t.long()].float().view(-1, 1, 1, 1)
        return (x - ab.sqrt() * POINT) / (1 - ab).sqrt()

    noise = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    out = ddpm.sample(eps, noise, torch.zeros(2, dtype=torch.long), num_steps=10, sampler=sampler,
                      generator=torch.Generator().manual_seed(2))  # fmt: skip
    torch.testing.assert_close(out, POINT.expand(2, -1, -1, -1), atol=1e-4, rtol=0)


def test_ddpm_forward_process_statistics():
    ddpm = DDPM(1000, "cosine")
    assert ddpm.alpha_bar[0] > 0.99 and ddpm.alpha_bar[-1] < 1e-3
    assert bool((ddpm.alpha_bar[1:] < ddpm.alpha_bar[:-1]).all())
    x0 = torch.full((4000, 1, 1, 1), 0.5)
    x_t, t, eps = ddpm.training_example(x0, torch.Generator().manual_seed(0))
    ab = ddpm.alpha_bar[t.long()].float().view(-1, 1, 1, 1)
    torch.testing.assert_close(x_t, ab.sqrt() * x0 + (1 - ab).sqrt() * eps)
    assert abs(float(eps.std()) - 1.0) < 0.05


def _model(**kwargs):
    return create_model("moe_dit_debug", **kwargs)


@pytest.mark.parametrize("objective,sampler", [("rectified_flow", "euler"), ("rectified_flow", "heun"),
                                               ("ddpm", "ddpm"), ("ddpm", "ddim")])  # fmt: skip
def test_sampler_is_deterministic_for_a_seed(objective, sampler):
    torch.manual_seed(0)
    model = _model(moe=dict(router="promoe", num_experts=5, top_k=1, num_shared_experts=1)).eval()
    with torch.no_grad():  # adaLN-Zero starts at a zero output: give the final layer weights so samples move
        model.final.weight.normal_(0, 0.1)
    obj = build_objective(objective, 50)
    fn = guided(model, 2.0, model.null_class)
    y = torch.tensor([0, 3, 9])

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return obj.sample(fn, torch.randn(3, 1, 8, 8, generator=g), y, num_steps=4, sampler=sampler, generator=g)

    a, b, c = run(7), run(7), run(8)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_classifier_free_guidance_combines_the_two_branches():
    def fn(x, t, y):
        return x * (y.float() + 1).view(-1, 1, 1, 1)

    x, t, y = torch.ones(2, 1, 2, 2), torch.zeros(2), torch.tensor([2, 4])
    null = 10
    for scale in (0.0, 1.0, 3.5):
        cond, uncond = fn(x, t, y), fn(x, t, torch.full_like(y, null))
        torch.testing.assert_close(guided(fn, scale, null)(x, t, y), uncond + scale * (cond - uncond))
    with pytest.raises(ValueError, match="guidance_scale"):
        guided(fn, -0.5, null)


@pytest.mark.parametrize("objective", ["rectified_flow", "ddpm"])
@pytest.mark.parametrize("router", ["promoe", "topk", "expert_choice", "dense"])
def test_one_optimiser_step_lowers_the_loss_on_an_overfit_batch(objective, router):
    torch.manual_seed(0)
    kwargs = dict(num_experts=5, top_k=1, num_shared_experts=1) if router == "promoe" else {}
    model = _model(moe=dict(dense=True) if router == "dense" else dict(router=router, **kwargs))
    obj = build_objective(objective, 100)
    x0 = torch.rand(16, 1, 8, 8) * 2 - 1
    y = torch.arange(16) % 11  # includes the null label 10

    def loss():
        x_t, t, target = obj.training_example(x0, torch.Generator().manual_seed(123))
        pred, auxes = model.forward_with_aux(x_t, t, y)
        return F.mse_loss(pred, target)

    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    before = loss()
    before.backward()
    opt.step()
    with torch.no_grad():
        after = loss()
    assert float(after) < float(before)


def test_bad_sampler_arguments_are_clear_errors():
    flow, ddpm = RectifiedFlow(), DDPM(10)
    x, y = torch.zeros(1, 1, 2, 2), torch.zeros(1, dtype=torch.long)
    with pytest.raises(ValueError, match="sampler"):
        flow.sample(lambda *a: a[0], x, y, 2, "ddim")
    with pytest.raises(ValueError, match="num_steps"):
        ddpm.sample(lambda *a: a[0], x, y, 11, "ddim")
    with pytest.raises(ValueError, match="objective"):
        build_objective("score")
    with pytest.raises(ValueError, match="beta_schedule"):
        DDPM(10, "quadratic")
