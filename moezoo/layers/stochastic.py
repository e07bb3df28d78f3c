"""S2MoE (Do, Le & Tran 2025, *Robust Sparse Mixture of Experts via Stochastic Learning*): the MoE layer learns from
the token and from a Gaussian-noise-perturbed copy of it, a learned per-token gate mixes the two outputs, and an
InfoNCE "uncertainty" loss ties each token's clean output to its own noisy output against the other tokens'.

Legend: T tokens, D model dim, E experts, K experts per token, G groups (samples) and L tokens per group.

What was available: the paper's abstract and a summary of its method ("a Gaussian Noise Module and a gating
mechanism to learn from both deterministic and noise-augmented inputs, trained with a task loss plus balancing and
uncertainty losses (InfoNCE)"); the method section itself could not be read here, so the equations below are this
library's reading of that description, and the choices not fixed by it are named as such. In training::

    x'   = x * (1 + s_mul * eps_1) + s_add * rms(x) * eps_2      eps_1, eps_2 ~ N(0, I), rms(x) detached
    g    = sigmoid(w_g . x + b_g)                                  one scalar per token, fp32 (zero-initialised: 1/2)
    y    = g * MoE(x) + (1 - g) * MoE(x')                          the same router and experts on both inputs
    L_u  = uncertainty_coef * mean_t -log softmax_s(cos(y_t, y'_s) / temperature)[s = t]

with ``y_t = MoE(x)_t`` and ``y'_s = MoE(x')_s``, the negatives ``s`` being the other tokens *of the same sample*
(the groups of :meth:`MoE._groups`: the last-but-one axis is the token axis), so neither the output nor the loss of
a sample depends on its batchmates (and the ``L x L`` similarity stays small). ``s_add`` is relative to each token's
RMS so that the noise has the token's scale at every depth; ``s_mul = 0`` (the default) leaves out the
multiplicative part. At evaluation there is no noise: ``x' = x``, so ``y = MoE(x)`` for any gate, and the layer runs
one pass (K experts per token, top-k's cost); training runs two (2K expert passes per token).

The layer is a :class:`~moezoo.layers.MoE` whose first pass is ``MoE.forward`` (input checks, side inputs, warnings)
and whose noisy pass is the pairs path with the same router, so every sparse router and backend works unchanged.
Losses of both passes are summed by name (each routing decision gets its own balance loss) and ``"uncertainty"``
is added; statistics are over both passes (:func:`moezoo.layers.chain.merge_aux`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moezoo.layers.chain import merge_aux
from moezoo.layers.moe import MoE, MoEAux, register_moe_layer
from moezoo.layers.routers import check_non_negative, check_positive


def group_info_nce(y_GLD: Tensor, y_noisy_GLD: Tensor, mask_GL: Tensor | None, temperature: float) -> Tensor:
    """Mean over real tokens of ``-log softmax_s(cos(y_t, y'_s) / temperature)[t]``, ``s`` over the real tokens of
    ``t``'s own group; fp32. 0 when there is no real token."""
    with torch.autocast(device_type=y_GLD.device.type, enabled=False):
        z_GLD = F.normalize(y_GLD.float(), dim=-1, eps=1e-12)
        z_noisy_GLD = F.normalize(y_noisy_GLD.float(), dim=-1, eps=1e-12)
        logits_GLL = torch.einsum("gld,gmd->glm", z_GLD, z_noisy_GLD) / temperature
        if mask_GL is not None:
            logits_GLL = logits_GLL.masked_fill(~mask_GL.unsqueeze(1), float("-inf"))
        log_p_GL = torch.diagonal(torch.log_softmax(logits_GLL, dim=-1), dim1=-2, dim2=-1)
        if mask_GL is None:
            return -log_p_GL.mean()
        keep = mask_GL.float()
        return -(log_p_GL.masked_fill(~mask_GL, 0.0) * keep).sum() / keep.sum().clamp_min(1.0)


class StochasticMoE(MoE):
    """S2MoE: ``y = g(x) MoE(x) + (1 - g(x)) MoE(x')`` in training with ``x'`` the noise-perturbed token and an InfoNCE
    loss between the two outputs; the plain MoE layer at evaluation (see the module docstring).

    Args:
        noise_std: ``s_add``, the std of the additive Gaussian noise relative to each token's RMS.
        noise_scale_std: ``s_mul``, the std of the multiplicative noise ``x * (1 + s_mul * eps)`` (0: none).
        uncertainty_coef: weight of the InfoNCE loss (``aux.losses["uncertainty"]``; 0 leaves it out).
        temperature: the InfoNCE temperature.
        router: a registered *sparse* router name (both inputs are routed by it); ``router_kwargs`` its options.
        Every other argument is :class:`~moezoo.layers.MoE`'s.
    """

    def __init__(
        self,
        dim: int,
        ffn_dim: int,
        num_experts: int = 8,
        top_k: int = 2,
        noise_std: float = 1.0,
        noise_scale_std: float = 0.0,
        uncertainty_coef: float = 0.01,
        temperature: float = 0.1,
        router: str = "topk",
        router_kwargs: Mapping[str, Any] | None = None,
        **moe_kwargs: Any,
    ) -> None:
        check_positive("noise_std", noise_std)
        check_non_negative("noise_scale_std", noise_scale_std)
        check_non_negative("uncertainty_coef", uncertainty_coef)
        check_positive("temperature", temperature)
        if not isinstance(router, str):
            raise TypeError(f"StochasticMoE: router must be a registered router name, got {type(router).__name__}")
        super().__init__(dim, ffn_dim, num_experts, top_k, router, router_kwargs, **moe_kwargs)
        if self.router.kind != "sparse" or self.router.carries_state:
            raise ValueError(
                f"StochasticMoE routes the clean and the noisy token through the pairs path: router must be a sparse "
                f"router that carries no state from layer to layer, got {router!r}"
            )
        self.noise_std = noise_std
        self.noise_scale_std = noise_scale_std
        self.uncertainty_coef = uncertainty_coef
        self.temperature = temperature
        self.path_gate = nn.Linear(dim, 1)
        nn.init.zeros_(self.path_gate.weight)
        nn.init.zeros_(self.path_gate.bias)

    def perturb(self, x: Tensor) -> Tensor:
        """``x' = x (1 + s_mul eps_1) + s_add rms(x) eps_2``: draws ``eps_2`` first, then ``eps_1`` if ``s_mul > 0``."""
        rms = x.detach().float().square().mean(-1, keepdim=True).sqrt().to(x.dtype)
        noisy = x + self.noise_std * rms * torch.randn_like(x)
        if self.noise_scale_std > 0:
            noisy = noisy + self.noise_scale_std * x * torch.randn_like(x)
        return noisy

    def path_weight(self, x: Tensor) -> Tensor:
        """``g (..., 1)``: the clean path's weight per token, fp32."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            return torch.sigmoid(F.linear(x.float(), self.path_gate.weight.float(), self.path_gate.bias.float()))

    def forward(
        self, x: Tensor, mask: Tensor | None = None, side: Mapping[str, Tensor] | None = None
    ) -> tuple[Tensor, MoEAux]:
        """``x (..., D)`` -> ``(y (..., D), aux)``; in training two passes (clean and noisy), at evaluation one."""
        out, aux = super().forward(x, mask, side)
        if not self.training:
            return out, aux
        out_noisy, aux_noisy = self._forward_sparse(self.perturb(x), mask, side, self.router)
        g = self.path_weight(x)
        y = (g * out.float() + (1.0 - g) * out_noisy.float()).to(out.dtype)
        merged = merge_aux([aux, aux_noisy])
        if self.uncertainty_coef > 0:
            y_GLD, mask_GL = self._groups(out, mask)
            y_noisy_GLD, _ = self._groups(out_noisy, mask)
            nce = group_info_nce(y_GLD, y_noisy_GLD, mask_GL, self.temperature)
            merged.losses["uncertainty"] = self.uncertainty_coef * nce
        return y, merged


register_moe_layer("s2moe", StochasticMoE)
