"""Objectives and samplers: rectified flow (velocity, Euler/Heun) and DDPM (epsilon, DDPM/DDIM), with CFG.

A *model function* maps ``(x (B, C, H, W), t (B,) float, y (B,) int) -> (B, C, H, W)``. Flows integrate
``dx/dt = v`` from noise at ``t = 1`` to data at ``t = 0`` (``x_t = (1 - t) x0 + t noise``, ``v = noise - x0``);
the network sees ``1000 t``. DDPM uses ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise`` with integer
``t in [0, T)`` and predicts the noise. Classifier-free guidance: ``u + s (c - u)`` with ``u`` the prediction
for the null label; ``s = 1`` is plain conditional sampling, ``s = 0`` unconditional.

Every sampler takes a ``torch.Generator``: the same seed gives the same images.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

ModelFn = Callable[[Tensor, Tensor, Tensor], Tensor]

OBJECTIVES = ("rectified_flow", "ddpm")
SAMPLERS = {"rectified_flow": ("euler", "heun"), "ddpm": ("ddpm", "ddim")}


def check_guidance_scale(guidance_scale: float) -> None:
    if not isinstance(guidance_scale, (int, float)) or not math.isfinite(guidance_scale) or guidance_scale < 0:
        raise ValueError(f"guidance_scale must be a finite number >= 0 (1 = no guidance), got {guidance_scale!r}")


def guided(model_fn: ModelFn, guidance_scale: float, null_class: int) -> ModelFn:
    """Wrap a model function with classifier-free guidance (one batched call for both branches)."""
    check_guidance_scale(guidance_scale)
    if guidance_scale == 1.0:
        return model_fn

    def fn(x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        null = torch.full_like(y, null_class)
        if guidance_scale == 0.0:
            return model_fn(x, t, null)
        cond, uncond = model_fn(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null])).chunk(2)
        return uncond + guidance_scale * (cond - uncond)

    return fn


def _check_steps(num_steps: int, limit: int | None = None) -> None:
    if not isinstance(num_steps, int) or num_steps < 1 or (limit is not None and num_steps > limit):
        bound = f" and <= {limit}" if limit is not None else ""
        raise ValueError(f"num_steps must be an integer >= 1{bound}, got {num_steps!r}")


class RectifiedFlow:
    """Rectified flow / flow matching with velocity prediction; logit-normal or uniform training times."""

    name = "rectified_flow"
    time_scale = 1000.0

    def __init__(self, time_sampling: str = "logit_normal") -> None:
        if time_sampling not in ("logit_normal", "uniform"):
            raise ValueError(f"time_sampling must be 'logit_normal' or 'uniform', got {time_sampling!r}")
        self.time_sampling = time_sampling

    def training_example(self, x0: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """``(x_t, network time, target velocity)`` for a batch of clean images."""
        batch = x0.shape[0]
        if self.time_sampling == "uniform":
            t = torch.rand(batch, generator=generator, device=x0.device)
        else:
            t = torch.sigmoid(torch.randn(batch, generator=generator, device=x0.device))
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        tb = t.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
        return (1 - tb) * x0 + tb * noise, t * self.time_scale, noise - x0

    @torch.no_grad()
    def sample(
        self,
        model_fn: ModelFn,
        noise: Tensor,
        y: Tensor,
        num_steps: int = 20,
        sampler: str = "euler",
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Integrate from ``noise`` (t = 1) to t = 0 with Euler (1 call a step) or Heun (2 calls a step, the last
        step Euler)."""
        _check_steps(num_steps)
        if sampler not in SAMPLERS[self.name]:
            raise ValueError(f"sampler must be one of {SAMPLERS[self.name]} for rectified_flow, got {sampler!r}")
        x = noise
        times = torch.linspace(1.0, 0.0, num_steps + 1, device=noise.device)
        ones = torch.ones(x.shape[0], device=noise.device)
        for i in range(num_steps):
            t, t_next = float(times[i]), float(times[i + 1])
            v = model_fn(x, ones * t * self.time_scale, y)
            x_next = x + (t_next - t) * v
            if sampler == "heun" and t_next > 0:  # the last step is Euler (as in EDM's Heun sampler)
                v_next = model_fn(x_next, ones * t_next * self.time_scale, y)
                x_next = x + (t_next - t) * 0.5 * (v + v_next)
            x = x_next
        return x


class DDPM:
    """Denoising diffusion with epsilon prediction; ancestral DDPM and deterministic DDIM sampling.

    ``beta_schedule``: ``"linear"`` (Ho et al.: 1e-4 to 0.02 over 1000 steps, scaled for other T) or
    ``"cosine"`` (Nichol & Dhariwal). Both samplers use the DDIM update on ``num_steps`` evenly spaced steps,
    with ``eta = 1`` for ``"ddpm"`` (the ancestral posterior; exactly DDPM when ``num_steps = T``) and
    ``eta = 0`` for ``"ddim"``. The predicted ``x0`` is clipped to ``[-1, 1]``.
    """

    name = "ddpm"

    def __init__(self, num_train_timesteps: int = 1000, beta_schedule: str = "linear") -> None:
        if not isinstance(num_train_timesteps, int) or num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be an integer >= 2, got {num_train_timesteps!r}")
        if beta_schedule not in ("linear", "cosine"):
            raise ValueError(f"beta_schedule must be 'linear' or 'cosine', got {beta_schedule!r}")
        self.num_train_timesteps = num_train_timesteps
        self.beta_schedule = beta_schedule
        steps = num_train_timesteps
        if beta_schedule == "linear":
            scale = 1000.0 / steps
            betas = torch.linspace(scale * 1e-4, scale * 0.02, steps, dtype=torch.float64)
        else:
            s = torch.arange(steps + 1, dtype=torch.float64) / steps
            f = torch.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
            betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
        self.alpha_bar = torch.cumprod(1 - betas, 0)  # float64, (T,)

    def _abar(self, t: Tensor, like: Tensor) -> Tensor:
        ab = self.alpha_bar.to(like.device)[t].to(like.dtype)
        return ab.view(-1, *([1] * (like.dim() - 1)))

    def training_example(self, x0: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """``(x_t, network time (the integer step as float), target noise)``."""
        t = torch.randint(0, self.num_train_timesteps, (x0.shape[0],), generator=generator, device=x0.device)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        ab = self._abar(t, x0)
        return ab.sqrt() * x0 + (1 - ab).sqrt() * noise, t.float(), noise

    @torch.no_grad()
    def sample(
        self,
        model_fn: ModelFn,
        noise: Tensor,
        y: Tensor,
        num_steps: int = 50,
        sampler: str = "ddim",
        generator: torch.Generator | None = None,
    ) -> Tensor:
        _check_steps(num_steps, self.num_train_timesteps)
        if sampler not in SAMPLERS[self.name]:
            raise ValueError(f"sampler must be one of {SAMPLERS[self.name]} for ddpm, got {sampler!r}")
        eta = 1.0 if sampler == "ddpm" else 0.0
        steps = torch.linspace(self.num_train_timesteps - 1, 0, num_steps).round().long().tolist()
        x = noise
        alpha_bar = self.alpha_bar.tolist()
        for i, t in enumerate(steps):
            ab_t = alpha_bar[t]
            ab_prev = alpha_bar[steps[i + 1]] if i + 1 < len(steps) else 1.0
            eps = model_fn(x, torch.full((x.shape[0],), float(t), device=x.device), y)
            x0 = ((x - math.sqrt(1 - ab_t) * eps) / math.sqrt(ab_t)).clamp(-1, 1)
            eps = (x - math.sqrt(ab_t) * x0) / math.sqrt(1 - ab_t)
            sigma = eta * math.sqrt((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev))
            x = math.sqrt(ab_prev) * x0 + math.sqrt(max(0.0, 1 - ab_prev - sigma**2)) * eps
            if sigma > 0:
                x = x + sigma * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return x


def build_objective(
    objective: str, num_train_timesteps: int = 1000, beta_schedule: str = "linear"
) -> RectifiedFlow | DDPM:
    if objective == "rectified_flow":
        return RectifiedFlow()
    if objective == "ddpm":
        return DDPM(num_train_timesteps, beta_schedule)
    raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
