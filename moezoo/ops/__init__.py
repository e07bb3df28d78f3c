"""The seam between the MoE layers and the compute backends.

Every backend implements one contract, ``expert_ffn`` (see ``reference.py``), with optional expert biases:

- ``"reference"``: a readable autograd composition (the spec);
- ``"torch"``: the fused PyTorch path with a hand-written backward (CPU default); its expert GEMMs run as one
  ``mm`` per expert or on ``torch._grouped_mm``, chosen per call by a measured rule (``moezoo.ops.fused.choose_gemm``);
  ``"torch_loop"`` and ``"torch_grouped_mm"`` are the same path with that choice fixed; what its forward keeps for
  backward (the pre-activations only, or also the gathered inputs and activations) is chosen by another measured
  rule (``moezoo.ops.fused.choose_save``), fixed by ``"torch_save_h"`` and ``"torch_save_all"``;
- ``"triton"``: the Triton kernels in ``moezoo.kernels`` (CUDA default, when available).

The backend is chosen per call: an explicit argument wins, then the ``MOEZOO_BACKEND`` environment variable,
then the device (``"triton"`` on CUDA tensors when it registered itself, ``"torch"`` elsewhere).

Under ``torch.autocast`` the expert GEMMs run in the autocast dtype (inputs and weights are cast here, once, for
every backend); otherwise in ``x``'s dtype, which must be the weights' dtype (the MoE layer checks it).

``indexing.py`` holds the pair filter and the per-expert counts every router and backend uses, written so that
the layer traces under ``torch.compile``; the fused path and the Triton backend are ``torch.library`` custom ops
for the same reason.

The Triton backend (``triton_backend.py``) is imported with this module where CUDA is available or
``TRITON_INTERPRET=1`` is set, otherwise on the first explicit request; it registers itself when triton imports,
and its absence never breaks this module.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor

from moezoo.ops.activations import ACTIVATIONS, check_activation, hidden_width
from moezoo.ops.fused import expert_ffn_fused
from moezoo.ops.indexing import count_per_expert, size_max, size_min, true_indices
from moezoo.ops.permute import Permutation, sort_by_expert
from moezoo.ops.reference import expert_ffn_reference

# (x, token_idx, expert_idx, gate, w_in, w_out, activation, b_in=None, b_out=None) -> out
ExpertFFN = Callable[..., Tensor]

BACKENDS: dict[str, ExpertFFN] = {
    "reference": expert_ffn_reference,
    "torch": expert_ffn_fused,
    "torch_loop": partial(expert_ffn_fused, gemm="loop"),
    "torch_grouped_mm": partial(expert_ffn_fused, gemm="grouped_mm"),
    "torch_save_h": partial(expert_ffn_fused, save="h"),
    "torch_save_all": partial(expert_ffn_fused, save="all"),
}
BACKEND_ENV = "MOEZOO_BACKEND"


def register_backend(name: str, fn: ExpertFFN) -> None:
    BACKENDS[name] = fn


def _load_triton_backend() -> None:
    """Import the Triton backend, which registers ``"triton"`` when triton imports; a failure leaves it absent."""
    if "triton" not in BACKENDS:
        try:
            import moezoo.ops.triton_backend  # noqa: F401
        except ImportError:
            pass


def default_backend(x: Tensor) -> str:
    """The backend used when none is named: Triton on CUDA tensors when registered, else the PyTorch path."""
    if x.is_cuda and "triton" in BACKENDS:
        return "triton"
    return "torch"


def resolve_backend(backend: str | None, x: Tensor) -> str:
    name = backend or os.environ.get(BACKEND_ENV) or default_backend(x)
    if name == "triton":
        _load_triton_backend()
    if name not in BACKENDS and name != "triton":
        raise ValueError(f"backend={name!r} is unknown; choose one of {sorted(set(BACKENDS) | {'triton'})}")
    if name not in BACKENDS:
        raise RuntimeError(
            "backend='triton' was requested but the Triton backend is not available in this installation"
        )
    return name


def expert_ffn(
    x_TD: Tensor,
    token_idx_N: Tensor,
    expert_idx_N: Tensor,
    gate_N: Tensor,
    w_in_EDH: Tensor,
    w_out_EFD: Tensor,
    activation: str = "gelu",
    backend: str | None = None,
    b_in_EH: Tensor | None = None,
    b_out_ED: Tensor | None = None,
) -> Tensor:
    """``out[t] = sum_{n: token[n]=t} gate[n] * (act(x[t] @ w_in[e_n] + b_in[e_n]) @ w_out[e_n] + b_out[e_n])``
    on the chosen backend; the biases are optional (``None``: none).

    The output has the compute dtype: the autocast dtype under ``torch.autocast``, else ``x``'s dtype.
    """
    fn = BACKENDS[resolve_backend(backend, x_TD)]
    activation = check_activation(activation)
    _check_biases(w_in_EDH, w_out_EFD, b_in_EH, b_out_ED)
    device = x_TD.device.type
    if not torch.is_autocast_enabled(device):
        return fn(x_TD, token_idx_N, expert_idx_N, gate_N, w_in_EDH, w_out_EFD, activation, b_in_EH, b_out_ED)
    dtype = torch.get_autocast_dtype(device)
    cast = lambda t: None if t is None else t.to(dtype)
    with torch.autocast(device, enabled=False):
        return fn(
            x_TD.to(dtype),
            token_idx_N,
            expert_idx_N,
            gate_N,
            w_in_EDH.to(dtype),
            w_out_EFD.to(dtype),
            activation,
            cast(b_in_EH),
            cast(b_out_ED),
        )


def _check_biases(w_in_EDH: Tensor, w_out_EFD: Tensor, b_in_EH: Tensor | None, b_out_ED: Tensor | None) -> None:
    num_experts, _, hidden = w_in_EDH.shape
    dim = w_out_EFD.shape[2]
    for name, bias, shape in (("b_in_EH", b_in_EH, (num_experts, hidden)), ("b_out_ED", b_out_ED, (num_experts, dim))):
        if bias is not None and tuple(bias.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(bias.shape)}")


if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
    _load_triton_backend()  # at import, so that torch.compile never traces the import

__all__ = [
    "ACTIVATIONS",
    "BACKENDS",
    "BACKEND_ENV",
    "Permutation",
    "count_per_expert",
    "expert_ffn",
    "hidden_width",
    "register_backend",
    "resolve_backend",
    "size_max",
    "size_min",
    "sort_by_expert",
    "true_indices",
]
