"""Recognising dense feed-forward blocks of any ``nn.Module`` and reading them as one canonical FFN.

Legend: D model dim, F hidden width, H = F (plain activations) or 2F (gated: ``[gate | up]`` columns).

A :class:`DenseFFN` is ``y = act(x @ w_in + b_in) @ w_out + b_out`` in ``moezoo.ops`` conventions (``w_in (D, H)``,
``w_out (F, D)``), the form the expert weights of :class:`moezoo.MoE` take. Recognised blocks:

- moezoo's own :class:`~moezoo.layers.FeedForward` (the dense twins, shared experts excluded);
- timm ``Mlp``, ``GluMlp`` (either gate half) and ``SwiGLU`` (linear layers, no hidden norm);
- torchaudio's wav2vec2 ``FeedForward`` (exact GELU);
- a run ``Linear, activation, Dropout*, Linear, Dropout*`` inside an ``nn.Sequential`` (torchaudio's Conformer
  feed-forward module, hand-written models).

Activation modules map to moezoo names by class: ``GELU`` (``approximate="tanh"`` -> ``gelu_tanh``), timm's
``GELUTanh``, ``SiLU``/``Swish``, ``ReLU``; anything else (a sigmoid GLU, QuickGELU ...) is not convertible and
:func:`read_ffn` says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from moezoo.layers.experts import FeedForward

GATED_OF = {"silu": "swiglu", "gelu": "geglu", "relu": "reglu"}


@dataclass
class DenseFFN:
    """One dense FFN read from a model: weights in ``moezoo.ops`` layout (detached views), its activation, the
    output dropout it applied, and notes on what the conversion leaves out (hidden dropout)."""

    activation: str
    w_in_DH: Tensor
    w_out_FD: Tensor
    b_in_H: Tensor | None
    b_out_D: Tensor | None
    out_dropout: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def dim(self) -> int:
        return self.w_in_DH.shape[0]

    @property
    def hidden_dim(self) -> int:
        return self.w_out_FD.shape[0]

    @property
    def has_bias(self) -> bool:
        return self.b_in_H is not None or self.b_out_D is not None


def activation_name(act: nn.Module) -> str | None:
    """The moezoo name of an activation module, or None when it has none."""
    name = type(act).__name__
    if name == "GELU":
        return "gelu_tanh" if getattr(act, "approximate", "none") == "tanh" else "gelu"
    return {"GELUTanh": "gelu_tanh", "SiLU": "silu", "Swish": "silu", "ReLU": "relu"}.get(name)


def _linear(module: nn.Module, what: str) -> nn.Linear:
    if type(module) is not nn.Linear:
        raise ValueError(f"{what} must be an nn.Linear to convert, got {type(module).__name__}")
    return module


def _need_act(act: nn.Module, what: str) -> str:
    name = activation_name(act)
    if name is None:
        raise ValueError(
            f"{what}: activation {type(act).__name__} has no moezoo equivalent; supported: GELU (exact or tanh), "
            "SiLU, ReLU and their gated forms"
        )
    return name


def _dropout_p(module: nn.Module) -> float:
    return float(module.p) if isinstance(module, nn.Dropout) else 0.0


def _hidden_dropout_note(p: float) -> list[str]:
    return [f"hidden dropout p={p} is dropped (MoE experts have none)"] if p > 0 else []


def _from_linears(activation: str, fc_in: nn.Linear, fc_out: nn.Linear, out_dropout: float = 0.0) -> DenseFFN:
    return DenseFFN(
        activation,
        fc_in.weight.detach().t(),
        fc_out.weight.detach().t(),
        None if fc_in.bias is None else fc_in.bias.detach(),
        None if fc_out.bias is None else fc_out.bias.detach(),
        out_dropout,
    )


def _check_identity_norm(module: nn.Module, what: str) -> None:
    norm = getattr(module, "norm", None)
    if norm is not None and not isinstance(norm, nn.Identity):
        raise ValueError(f"{what} has a hidden-layer norm ({type(norm).__name__}), which an MoE expert cannot hold")


def _timm_kind(module: nn.Module) -> str | None:
    cls = type(module)
    if not cls.__module__.startswith("timm."):
        return None
    return cls.__name__ if cls.__name__ in ("Mlp", "GluMlp", "SwiGLU") else None


def sequential_run(seq: nn.Sequential) -> tuple[int, int] | None:
    """``(start, stop)`` of the first ``Linear(D, F), act, Dropout*, Linear(F, D), Dropout*`` run of ``seq``, else
    None (an MoE maps D to D, so a run that changes the width is not a candidate)."""
    mods = list(seq)
    for i in range(len(mods) - 2):
        if type(mods[i]) is not nn.Linear or activation_name(mods[i + 1]) is None:
            continue
        j = i + 2
        while j < len(mods) and isinstance(mods[j], nn.Dropout):
            j += 1
        fc_in = mods[i]
        if (
            j < len(mods)
            and type(mods[j]) is nn.Linear
            and (mods[j].in_features, mods[j].out_features)
            == (
                fc_in.out_features,
                fc_in.in_features,
            )
        ):
            stop = j + 1
            while stop < len(mods) and isinstance(mods[stop], nn.Dropout):
                stop += 1
            return i, stop
    return None


def is_ffn(module: nn.Module) -> bool:
    """Whether :func:`read_ffn` recognises the module's type (it may still refuse its settings)."""
    if isinstance(module, FeedForward) or _timm_kind(module) is not None:
        return True
    if type(module).__name__ == "FeedForward" and type(module).__module__.startswith("torchaudio."):
        return True
    return isinstance(module, nn.Sequential) and sequential_run(module) is not None


def read_ffn(module: nn.Module, path: str = "") -> DenseFFN:
    """The canonical dense FFN of a recognised block; ``ValueError`` naming the module when it cannot convert."""
    what = f"module {path or type(module).__name__!r}"
    ffn = _read(module, what)
    if ffn.w_out_FD.shape[1] != ffn.dim:
        raise ValueError(f"{what} maps width {ffn.dim} to {ffn.w_out_FD.shape[1]}; an MoE layer keeps the width")
    return ffn


def _read(module: nn.Module, what: str) -> DenseFFN:
    if isinstance(module, FeedForward):
        return _from_linears(module.activation, module.fc_in, module.fc_out)
    kind = _timm_kind(module)
    if kind == "Mlp":
        _check_identity_norm(module, what)
        act = _need_act(module.get_submodule("act"), what)
        ffn = _from_linears(
            act,
            _linear(module.get_submodule("fc1"), what),
            _linear(module.get_submodule("fc2"), what),
            _dropout_p(module.get_submodule("drop2")),
        )
        ffn.notes += _hidden_dropout_note(_dropout_p(module.get_submodule("drop1")))
        return ffn
    if kind in ("GluMlp", "SwiGLU"):
        _check_identity_norm(module, what)
        act = _need_act(module.get_submodule("act"), what)
        if act not in GATED_OF:
            raise ValueError(f"{what}: gated {act} has no moezoo equivalent; choose SiLU, GELU or ReLU")
        fc_out = _linear(module.get_submodule("fc2"), what)
        if kind == "GluMlp":
            fc1 = _linear(module.get_submodule("fc1"), what)
            if getattr(module, "chunk_dim", -1) not in (-1, 1) or fc1.weight.dim() != 2:
                raise ValueError(f"{what}: only linear GluMlp (use_conv=False) converts")
            first, second = fc1.weight.detach().chunk(2, dim=0)
            gate_w, up_w = (second, first) if module.gate_last else (first, second)
            b1 = fc1.bias.detach().chunk(2) if fc1.bias is not None else None
            b_in = None if b1 is None else (torch.cat([b1[1], b1[0]]) if module.gate_last else torch.cat(b1))
        else:
            fc_g, fc_x = _linear(module.get_submodule("fc1_g"), what), _linear(module.get_submodule("fc1_x"), what)
            gate_w, up_w = fc_g.weight.detach(), fc_x.weight.detach()
            b_in = None
            if fc_g.bias is not None or fc_x.bias is not None:
                zero = fc_g.weight.new_zeros(fc_g.out_features)
                bg = fc_g.bias.detach() if fc_g.bias is not None else zero
                bx = fc_x.bias.detach() if fc_x.bias is not None else zero
                b_in = torch.cat([bg, bx])
        ffn = DenseFFN(
            GATED_OF[act],
            torch.cat([gate_w, up_w]).t(),
            fc_out.weight.detach().t(),
            b_in,
            None if fc_out.bias is None else fc_out.bias.detach(),
            _dropout_p(module.get_submodule("drop2")),
        )
        ffn.notes += _hidden_dropout_note(_dropout_p(module.get_submodule("drop1")))
        return ffn
    if type(module).__name__ == "FeedForward" and type(module).__module__.startswith("torchaudio."):
        fc_in, fc_out = (
            _linear(module.get_submodule("intermediate_dense"), what),
            _linear(module.get_submodule("output_dense"), what),
        )
        ffn = _from_linears("gelu", fc_in, fc_out, _dropout_p(module.get_submodule("output_dropout")))
        ffn.notes += _hidden_dropout_note(_dropout_p(module.get_submodule("intermediate_dropout")))
        return ffn
    if isinstance(module, nn.Sequential) and (run := sequential_run(module)) is not None:
        start, stop = run
        mods = list(module)[start:stop]
        act = _need_act(mods[1], what)
        fc_out_at = next(i for i in range(2, len(mods)) if isinstance(mods[i], nn.Linear))
        hidden_p = sum(_dropout_p(m) for m in mods[2:fc_out_at])
        out_p = sum(_dropout_p(m) for m in mods[fc_out_at + 1 :])
        ffn = _from_linears(act, _linear(mods[0], what), _linear(mods[fc_out_at], what), out_p)
        ffn.notes += _hidden_dropout_note(hidden_p)
        return ffn
    raise ValueError(
        f"{what} ({type(module).__name__}) is not a recognised feed-forward block (moezoo FeedForward, timm "
        "Mlp/GluMlp/SwiGLU, torchaudio FeedForward, or an nn.Sequential Linear-act-Linear run)"
    )
