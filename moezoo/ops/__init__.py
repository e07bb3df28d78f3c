"""The seam between the MoE layers and the compute backends.

Every backend implements one contract, ``expert_ffn`` (see ``reference.py``):

- ``"reference"``: a readable autograd composition (the spec);
- ``"torch"``: the fused PyTorch path with a hand-written backward (CPU default);
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

import torch
from torch import Tensor

from moezoo.ops.activations import ACTIVATIONS, check_activation, hidden_width
from moezoo.ops.fused import expert_ffn_fused
from moezoo.ops.indexing import count_per_expert, size_max, size_min, true_indices
from moezoo.ops.permute import Permutation, sort_by_expert
from moezoo.ops.reference import expert_ffn_reference

ExpertFFN = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, str], Tensor]

BACKENDS: dict[str, ExpertFFN] = {
    "reference": expert_ffn_reference,
    "torch": expert_ffn_fused,
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
) -> Tensor:
    """``out[t] = sum_{n: token[n]=t} gate[n] * act(x[t] @ w_in[e_n]) @ w_out[e_n]`` on the chosen backend.

    The output has the compute dtype: the autocast dtype under ``torch.autocast``, else ``x``'s dtype.
    """
    fn = BACKENDS[resolve_backend(backend, x_TD)]
    activation = check_activation(activation)
    device = x_TD.device.type
    if not torch.is_autocast_enabled(device):
        return fn(x_TD, token_idx_N, expert_idx_N, gate_N, w_in_EDH, w_out_EFD, activation)
    dtype = torch.get_autocast_dtype(device)
    with torch.autocast(device, enabled=False):
        return fn(
            x_TD.to(dtype), token_idx_N, expert_idx_N, gate_N, w_in_EDH.to(dtype), w_out_EFD.to(dtype), activation
        )


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
