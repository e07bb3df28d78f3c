"""Sparse upcycling: replace the dense FFNs of any model by :class:`moezoo.MoE` layers whose experts start as
copies of the dense weights (Komatsuzaki et al., "Sparse Upcycling"; Drop-Upcycling's partial re-initialisation;
fine-grained splitting; a DeepSeekMoE-style shared expert).

Function preservation: with ``granularity=1``, no noise or re-initialisation and renormalised top-k gates (the
default ``router_kwargs`` of the ``"topk"`` router here), every token's gates sum to 1 over identical experts, so
the upcycled model computes the dense function (to rounding), forward and backward. With ``granularity=m`` each
dense FFN is cut into m hidden slices (``w_out`` scaled by m), and the function is preserved when the router
starts at zero (``router_init="zero"``): uniform probabilities pick, by ties to the lower index, whole copies.
With ``shared_expert=True`` the shared expert is the dense FFN and shared and routed outputs are halved.

Virtual groups (He et al., "Upcycling Large Language Models into Mixture of Experts", NVIDIA 2024): with
``granularity=m`` and ``router_init="virtual_group"`` the m slices of one copy form a group whose router rows are one
random draw repeated m times, so every slice of a group gets the same logit. Top-(K*m) then selects K whole groups
(ties inside a group only), each slice of a group gets the same renormalised gate, and the layer computes the dense
FFN at initialisation while the router is random (not uniform) and starts to prefer some copies over others.

Replacement: moezoo's own blocks call their feed-forward through ``moezoo.models.run_ffn``, so a moezoo
``FeedForward`` is replaced by the bare ``MoE`` (masks, side inputs and aux losses flow as for a native MoE).
Elsewhere the ``MoE`` is wrapped in :class:`UpcycledMoE`, which returns a tensor like the dense block did and
keeps the last :class:`~moezoo.layers.MoEAux` (collect them with :func:`upcycled_aux`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from moezoo.layers import MoE, MoEAux
from moezoo.layers.experts import FeedForward
from moezoo.ops import hidden_width
from moezoo.surgery.dense import DenseFFN, is_ffn, read_ffn, sequential_run

ROUTER_INITS = ("random", "zero", "virtual_group")
Select = None | Callable[[str, nn.Module], bool] | Sequence[str]


class UpcycledMoE(nn.Module):
    """A ``MoE`` standing in for a dense block of a foreign model: ``forward(x) -> y`` (plus the dense block's
    output dropout); the aux result of the last call is kept in ``last_aux``."""

    def __init__(self, moe: MoE, out_dropout: float = 0.0) -> None:
        super().__init__()
        self.moe = moe
        self.drop = nn.Dropout(out_dropout) if out_dropout > 0 else nn.Identity()
        self.last_aux: MoEAux | None = None

    def forward(self, x: Tensor) -> Tensor:
        y, self.last_aux = self.moe(x)
        return self.drop(y)


def upcycled_aux(model: nn.Module) -> list[MoEAux]:
    """The aux results of the last forward of every :class:`UpcycledMoE` in ``model`` (add
    ``moezoo.layers.total_aux_loss`` of them to the training loss)."""
    return [m.last_aux for m in model.modules() if isinstance(m, UpcycledMoE) and m.last_aux is not None]


@dataclass
class UpcycledLayer:
    path: str
    kind: str
    activation: str
    dim: int
    hidden_dim: int
    bias: bool
    params_before: int
    params_after: int
    notes: list[str] = field(default_factory=list)


@dataclass
class UpcycleReport:
    """What :func:`upcycle` replaced: one entry per FFN, and the model's parameter counts before and after."""

    layers: list[UpcycledLayer]
    params_before: int
    params_after: int
    options: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        lines = [f"upcycled {len(self.layers)} FFN(s): {self.params_before:,} -> {self.params_after:,} parameters"]
        for layer in self.layers:
            lines.append(
                f"  {layer.path} [{layer.kind}, {layer.activation}, D={layer.dim}, F={layer.hidden_dim}, "
                f"bias={layer.bias}]: {layer.params_before:,} -> {layer.params_after:,}"
                + (f" ({'; '.join(layer.notes)})" if layer.notes else "")
            )
        return "\n".join(lines)


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _is_internal(path: str, module: nn.Module, parents: Mapping[str, nn.Module]) -> bool:
    """A FeedForward that is part of an MoE (shared expert) or a Seg-MoE block is not a model FFN."""
    parent = parents.get(path.rpartition(".")[0])
    if not isinstance(module, FeedForward) or parent is None:
        return False
    return isinstance(parent, MoE) or type(parent).__module__ == "moezoo.layers.segment"


def find_ffns(model: nn.Module, select: Select = None) -> list[tuple[str, nn.Module]]:
    """The FFN blocks :func:`upcycle` would replace: every recognised one (``select=None``), those a predicate
    ``select(path, module)`` accepts, or the modules named in a list of paths."""
    modules = dict(model.named_modules())
    if select is not None and not callable(select):
        if isinstance(select, str) or not all(isinstance(s, str) for s in select):
            raise TypeError(
                f"select must be None, a predicate (path, module) -> bool or a list of paths, got {select!r}"
            )
        missing = [s for s in select if s not in modules]
        if missing:
            raise ValueError(f"select names modules the model does not have: {missing}")
        return [(s, modules[s]) for s in select]
    found: list[tuple[str, nn.Module]] = []
    taken: list[str] = []
    for path, module in modules.items():
        if any(path.startswith(t + ".") for t in taken):
            continue
        if isinstance(module, (MoE, UpcycledMoE)):
            taken.append(path)  # never look inside an MoE
            continue
        wanted = (
            select(path, module) if callable(select) else is_ffn(module) and not _is_internal(path, module, modules)
        )
        if wanted:
            found.append((path, module))
            taken.append(path)
    return found


def _split_columns(w_in_DH: Tensor, gated: bool, granularity: int) -> list[Tensor]:
    """The hidden slices of ``w_in`` (or a bias, last dim H): slice s of the plain or of both gated halves."""
    if not gated:
        return list(w_in_DH.chunk(granularity, dim=-1))
    gate, up = w_in_DH.chunk(2, dim=-1)
    return [torch.cat([g, u], dim=-1) for g, u in zip(gate.chunk(granularity, dim=-1), up.chunk(granularity, dim=-1))]


def _drop_reinit(
    w_in: Tensor, w_out: Tensor, b_in: Tensor | None, ffn: DenseFFN, ratio: float, gated: bool, gen: torch.Generator
) -> None:
    """Drop-Upcycling: re-draw ``ratio`` of one expert's hidden units from a normal with the dense weights'
    mean and standard deviation (columns of ``w_in`` and ``b_in``, rows of ``w_out``)."""
    ffn_dim = w_out.shape[0]
    count = round(ratio * ffn_dim)
    if count == 0:
        return
    units = torch.randperm(ffn_dim, generator=gen)[:count]
    cols = torch.cat([units, units + ffn_dim]) if gated else units

    def redraw(t: Tensor, ref: Tensor, shape: tuple[int, ...]) -> Tensor:
        ref = ref.float()
        return (torch.randn(shape, generator=gen) * ref.std() + ref.mean()).to(t.dtype)

    w_in[:, cols] = redraw(w_in, ffn.w_in_DH, (w_in.shape[0], cols.numel()))
    w_out[units] = redraw(w_out, ffn.w_out_FD, (units.numel(), w_out.shape[1]))
    if b_in is not None and ffn.b_in_H is not None:
        b_in[cols] = redraw(b_in, ffn.b_in_H, (cols.numel(),))


def build_moe(
    ffn: DenseFFN,
    num_experts: int,
    top_k: int,
    router: str,
    router_kwargs: Mapping[str, Any] | None,
    router_init: str,
    granularity: int,
    shared_expert: bool,
    noise: float,
    reinit_ratio: float,
    generator: torch.Generator,
    backend: str | None,
) -> MoE:
    """One ``MoE`` whose experts are copies (slices, with ``granularity``) of ``ffn``."""
    dim, ffn_dim = ffn.dim, ffn.hidden_dim
    if ffn_dim % granularity:
        raise ValueError(f"granularity={granularity} must divide the FFN's hidden width {ffn_dim}")
    kwargs = dict(router_kwargs or {})
    if router == "topk":
        kwargs.setdefault("normalize", True)
    moe = MoE(
        dim,
        ffn_dim,
        num_experts=num_experts,
        top_k=top_k,
        router=router,
        router_kwargs=kwargs,
        activation=ffn.activation,
        num_shared_experts=1 if shared_expert else 0,
        granularity=granularity,
        backend=backend,
        bias=ffn.has_bias,
    )
    gated = hidden_width(ffn.activation, 1) == 2
    scale = 0.5 if shared_expert else 1.0
    w_in, w_out = ffn.w_in_DH.float(), ffn.w_out_FD.float()
    b_in = ffn.b_in_H.float() if ffn.b_in_H is not None else (w_in.new_zeros(w_in.shape[1]) if ffn.has_bias else None)
    b_out = ffn.b_out_D.float() if ffn.b_out_D is not None else (w_in.new_zeros(dim) if ffn.has_bias else None)
    in_slices = _split_columns(w_in, gated, granularity)
    out_slices = list(w_out.chunk(granularity, dim=0))
    b_in_slices = _split_columns(b_in, gated, granularity) if b_in is not None else None
    experts = moe.experts
    with torch.no_grad():
        for copy in range(num_experts):
            for s in range(granularity):
                e = copy * granularity + s
                e_w_in = in_slices[s].clone()
                e_w_out = out_slices[s] * (granularity * scale)
                e_b_in = b_in_slices[s].clone() if b_in_slices is not None else None
                if reinit_ratio > 0:
                    _drop_reinit(e_w_in, e_w_out, e_b_in, ffn, reinit_ratio, gated, generator)
                if noise > 0:
                    for t in (e_w_in, e_w_out):
                        t += noise * t.std() * torch.randn(t.shape, generator=generator)
                experts.w_in[e].copy_(e_w_in)
                experts.w_out[e].copy_(e_w_out)
                if experts.b_in is not None and experts.b_out is not None and e_b_in is not None and b_out is not None:
                    experts.b_in[e].copy_(e_b_in)
                    experts.b_out[e].copy_(b_out * scale)
        if moe.shared is not None:
            moe.shared.fc_in.weight.copy_(w_in.t())
            moe.shared.fc_out.weight.copy_(w_out.t() * scale)
            if moe.shared.fc_in.bias is not None and b_in is not None and b_out is not None:
                moe.shared.fc_in.bias.copy_(b_in)
                moe.shared.fc_out.bias.copy_(b_out * scale)
        if router_init == "zero":
            for name, p in moe.router.named_parameters():
                if name.endswith("weight"):
                    p.zero_()
        elif router_init == "virtual_group":
            tie_virtual_groups(moe.router, num_experts, granularity)
    return moe.to(device=ffn.w_in_DH.device, dtype=ffn.w_in_DH.dtype)


def tie_virtual_groups(router: nn.Module, num_groups: int, granularity: int) -> None:
    """Give the ``granularity`` experts of each of ``num_groups`` groups (contiguous indices) the same routing
    parameters: the group's first row of the router's ``gate`` (and of every per-expert vector) is repeated over
    the group. Raises ``ValueError`` for a router whose logits are then still not tied within each group (one
    with other per-expert parameters, or no linear gate)."""
    experts = num_groups * granularity
    gate = getattr(router, "gate", None)
    if not isinstance(gate, nn.Linear) or gate.weight.shape[0] < experts:
        raise ValueError(
            f"router_init='virtual_group' needs a router with a linear gate over the experts; "
            f"{type(router).__name__} has none"
        )

    def tie(t: Tensor) -> None:
        t[:experts] = t[:experts:granularity].repeat_interleave(granularity, dim=0)

    with torch.no_grad():
        tie(gate.weight)
        for tensor in (*router.parameters(recurse=False), *router.buffers(recurse=False)):
            if tensor.dim() == 1 and tensor.shape[0] in (experts, gate.weight.shape[0]):
                tie(tensor)
        logits = getattr(router, "logits", None)
        probe = torch.randn(4, int(getattr(router, "dim", gate.weight.shape[1])), dtype=gate.weight.dtype)
        try:
            values = logits(probe) if callable(logits) else None
        except (TypeError, ValueError, RuntimeError):
            values = None
        grouped = None if values is None else values[:, :experts].reshape(-1, num_groups, granularity)
        if grouped is None or not torch.allclose(grouped, grouped[..., :1].expand_as(grouped), rtol=1e-5, atol=1e-6):
            raise ValueError(
                f"router_init='virtual_group' cannot tie the routing of {type(router).__name__}: its logits depend "
                "on per-expert parameters other than the gate rows; use router_init='zero' or a top-k router"
            )


def _set_child(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, new)


def _moezoo_caller(model: nn.Module, path: str) -> bool:
    """Whether the block at ``path`` sits in a moezoo model block (which calls it through ``run_ffn``)."""
    parent_path = path.rpartition(".")[0]
    parent = model.get_submodule(parent_path) if parent_path else model
    return type(parent).__module__.startswith("moezoo.models")


def _check_options(
    num_experts: int, top_k: int, router_init: str, granularity: int, noise: float, reinit: float
) -> None:
    for name, value, low in (("num_experts", num_experts, 1), ("top_k", top_k, 1), ("granularity", granularity, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if top_k > num_experts:
        raise ValueError(f"top_k={top_k} must be at most num_experts={num_experts}")
    if router_init not in ROUTER_INITS:
        raise ValueError(f"router_init={router_init!r} is unknown; choose one of {ROUTER_INITS}")
    if not isinstance(noise, (int, float)) or noise < 0:
        raise ValueError(f"noise must be a non-negative number, got {noise!r}")
    if not isinstance(reinit, (int, float)) or not 0 <= reinit <= 1:
        raise ValueError(f"reinit_ratio must be a number in [0, 1], got {reinit!r}")


def upcycle(
    model: nn.Module,
    num_experts: int = 8,
    top_k: int = 2,
    router: str = "topk",
    router_kwargs: Mapping[str, Any] | None = None,
    select: Select = None,
    router_init: str = "random",
    granularity: int = 1,
    shared_expert: bool = False,
    noise: float = 0.0,
    reinit_ratio: float = 0.0,
    seed: int = 0,
    backend: str | None = None,
) -> UpcycleReport:
    """Replace the dense FFNs of ``model`` (in place) by MoE layers whose experts copy the dense weights.

    Args:
        num_experts, top_k: routed experts E per layer and experts per token K (per copy with ``granularity``).
        router, router_kwargs: a registered router name and its options (``"topk"`` defaults to
            ``normalize=True``, the renormalised gates that preserve the dense function).
        select: ``None`` (every recognised FFN, see :mod:`moezoo.surgery.dense`), a predicate
            ``(path, module) -> bool``, or a list of module paths.
        router_init: ``"random"`` (the router's own initialisation), ``"zero"`` (uniform routing at the start) or
            ``"virtual_group"`` (the router rows of the ``granularity`` slices of one copy tied, see the module
            docstring: with ``granularity > 1`` the dense function is kept under a random router).
        granularity: cut each dense FFN into m hidden slices: E*m experts of width F/m, K*m active.
        shared_expert: add the dense FFN as an always-on shared expert (shared and routed outputs halved).
        noise: add ``noise * std(w) * N(0, 1)`` to each expert's weights (breaks the symmetry of the copies).
        reinit_ratio: Drop-Upcycling: re-draw this fraction of each expert's hidden units.
        seed: seed of the noise and re-initialisation draws.
        backend: expert backend of the new layers (``None``: by device).
    """
    _check_options(num_experts, top_k, router_init, granularity, noise, reinit_ratio)
    targets = find_ffns(model, select)
    if not targets:
        raise ValueError("upcycle found no FFN to replace: pass select= (a predicate or module paths)")
    generator = torch.Generator().manual_seed(seed)
    params_before = _count(model)
    layers = []
    if any(not path for path, _ in targets):
        raise ValueError("the model itself is an FFN: upcycle a model that contains it, or build an MoE directly")
    for path, module in targets:
        seq_run = sequential_run(module) if isinstance(module, nn.Sequential) else None
        ffn = read_ffn(module, path)
        moe = build_moe(
            ffn,
            num_experts,
            top_k,
            router,
            router_kwargs,
            router_init,
            granularity,
            shared_expert,
            noise,
            reinit_ratio,
            generator,
            backend,
        )
        before = _count(module)
        if isinstance(module, FeedForward) and _moezoo_caller(model, path):
            new: nn.Module = moe
            kind = "moezoo.FeedForward"
        elif seq_run is not None:
            start, stop = seq_run
            mods = list(module.children())
            run = UpcycledMoE(moe, ffn.out_dropout)
            new = nn.Sequential(*mods[:start], run, *mods[stop:])
            kind = f"nn.Sequential[{start}:{stop}]"
        else:
            new = UpcycledMoE(moe, ffn.out_dropout)
            kind = f"{type(module).__module__}.{type(module).__name__}"
        _set_child(model, path, new)
        layers.append(
            UpcycledLayer(
                path, kind, ffn.activation, ffn.dim, ffn.hidden_dim, ffn.has_bias, before, _count(new), ffn.notes
            )
        )
    options = dict(
        num_experts=num_experts,
        top_k=top_k,
        router=router,
        router_kwargs=dict(router_kwargs or {}),
        router_init=router_init,
        granularity=granularity,
        shared_expert=shared_expert,
        noise=noise,
        reinit_ratio=reinit_ratio,
        seed=seed,
    )
    return UpcycleReport(layers, params_before, _count(model), options)


def moe_layers(model: nn.Module) -> Iterable[tuple[str, MoE]]:
    """Every ``MoE`` of a model, with its path."""
    return ((path, m) for path, m in model.named_modules() if isinstance(m, MoE))


def load_dense_weights(model: nn.Module, weights: str) -> None:
    """Load a dense starting point into ``model``: a release name (``"moe_vit_tiny.digits_dense"``), a
    safetensors file, or a ``torch.save`` file holding a state dict or a Lightning checkpoint (whose
    ``state_dict`` keys start with ``model.``)."""
    from pathlib import Path

    from moezoo.models.hub import load_pretrained, load_state_dict
    from moezoo.models.registry import get_pretrained_cfg

    path = Path(weights).expanduser()
    if not path.exists():
        if "/" in weights or path.suffix in (".pt", ".ckpt", ".pth", ".safetensors"):
            raise ValueError(f"upcycle_from weights={weights!r}: no such file")
        load_pretrained(model, get_pretrained_cfg(weights))
        return
    state: Any = load_state_dict(path) if path.suffix == ".safetensors" else torch.load(path, "cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        lightning: dict[str, Tensor] = state["state_dict"]
        state = {k.removeprefix("model."): v for k, v in lightning.items() if k.startswith("model.")}
    if not isinstance(state, dict):
        raise ValueError(f"upcycle_from weights={weights!r} holds no state dict")
    model.load_state_dict(state, strict=True)


def upcycle_from(model: nn.Module, weights: str | None = None, **options: Any) -> UpcycleReport:
    """Load the dense starting point ``weights`` (see :func:`load_dense_weights`; ``None``: keep ``model``'s
    weights) and :func:`upcycle` it with ``options``: the ``upcycle_from:`` block of a task config."""
    if weights is not None:
        if not isinstance(weights, str):
            raise TypeError(f"upcycle_from weights must be a release name or a file path, got {weights!r}")
        load_dense_weights(model, weights)
    return upcycle(model, **options)
