"""``moezoo bench layer``: forward+backward time and activation memory of one MoE layer on the CPU.

Every table row is one (T, D, F, E, K); its candidates run on the same input with the same router and expert
weights:

- ``dense``: a dense FFN whose hidden width is the active expert width per token (K*F): equal FLOPs; the baseline;
- ``moezoo``: the MoE layer (top-k router + the fused PyTorch path);
- ``reference``: the same layer on the readable autograd reference backend (``--no-reference`` skips it);
- ``naive``: the per-expert masked loop most MoE code starts from (``--no-naive`` skips it);
- with ``--peers``: ``hf-mixtral``, transformers' Mixtral sparse block with its ``grouped_mm`` experts backend
  (eager; needs ``transformers``, SwiGLU and K > 1 or ``normalize``), and ``grouped_mm``, the experts on
  ``torch._grouped_mm`` directly (:class:`~moezoo.bench.peers.GroupedMMMoE`); their outputs are checked against
  ``moezoo``'s once before timing;
- with ``--gemms``: ``moezoo[loop]`` and ``moezoo[grouped_mm]``, the MoE layer with the fused path's expert GEMMs
  fixed to one ``mm`` per expert or to ``torch._grouped_mm`` (``moezoo`` chooses per call, see
  :func:`moezoo.ops.fused.choose_gemm`; this is how its rule was measured);
- with ``--saves``: ``moezoo[save=h]`` and ``moezoo[save=all]``, the MoE layer with what the fused path's forward
  keeps for backward fixed to the pre-activations only or to the gathered inputs and activations too (``moezoo``
  chooses per call, see :func:`moezoo.ops.fused.choose_save`; this is how its rule was measured);
- with ``--compile``: ``dense+compile`` and ``moezoo+compile`` under ``torch.compile(fullgraph=True)``;
  ``moezoo+compile`` is reported against ``dense+compile``, ``dense+compile`` against ``dense``;
- with ``--breakdown``: the parts of the MoE layer's time (:func:`breakdown_parts`; with ``--gemms`` also the expert
  FFN alone with either way of running its GEMMs), timed in the same rounds, and
  ``moezoo/floor``: the fused layer over what every gather-based implementation with per-expert GEMMs pays.

Timing is interleaved (:mod:`moezoo.bench.timing`): warm-up, then rounds in which every candidate runs once, in turn
(wall time, or the process's CPU time with ``--clock cpu``); each candidate's time is divided by the dense FFN's of
the same round, and a cell is the median of those ratios, ``[interquartile range]`` and ``(min-max)``. The load
average at the start and the end of each row is printed with it. ``--threads 1,2`` gives one table per thread count.
Memory is what autograd saves for backward (MiB), counted with ``saved_tensors_hooks`` over unique storages in one
untimed call. ``--json PATH`` writes every round's raw times (atomically); ``--render PATH`` prints the tables of
such a file again.

Why one long file: the candidates, the per-round breakdown and the table rendering of one benchmark; the timing
harness is :mod:`moezoo.bench.timing` and the peers :mod:`moezoo.bench.peers`.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from moezoo.bench.peers import GroupedMMMoE, NaiveLoopMoE, hf_mixtral_block
from moezoo.bench.timing import CLOCKS, Interleaved, Summary, Timer, format_load, interleave, quartiles, wall_ms
from moezoo.io import write_json_atomic
from moezoo.layers import FeedForward, MoE
from moezoo.ops.activations import ACTIVATIONS
from moezoo.ops.fused import expert_ffn_fused
from moezoo.ops.permute import sort_by_expert

Shape = tuple[int, int, int, int, int]
DEFAULT_SHAPES: tuple[Shape, ...] = ((4096, 512, 1024, 8, 2), (4096, 512, 256, 64, 8), (2048, 256, 128, 64, 4))
COMPILED = "+compile"  # suffix of the compiled candidates
PEERS = ("hf-mixtral", "grouped_mm")
GEMM_BACKENDS = {"moezoo[loop]": "torch_loop", "moezoo[grouped_mm]": "torch_grouped_mm"}  # --gemms
SAVE_BACKENDS = {"moezoo[save=h]": "torch_save_h", "moezoo[save=all]": "torch_save_all"}  # --saves
# environment variables that change how idle OpenMP threads wait; recorded with every run
OPENMP_ENV = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
# --breakdown: parts timed in the same rounds (see breakdown_parts); FLOOR_PARTS make up the floor
BREAKDOWN_PARTS = ("router", "expert FFN", "expert GEMMs", "dense GEMMs", "balanced bmm", "gather/scatter")
FLOOR = "moezoo/floor"


def _saved_bytes(fn: Callable[[], Tensor]) -> tuple[Tensor, int]:
    storages: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(storages.values())


def _first(out: Tensor | tuple[Tensor, ...]) -> Tensor:
    return out[0] if isinstance(out, tuple) else out


def baseline(name: str) -> str:
    """What a candidate's time is divided by: ``dense+compile`` for a compiled MoE, ``dense`` for the rest."""
    return "dense" + COMPILED if name.endswith(COMPILED) and name != "dense" + COMPILED else "dense"


def check_same_outputs(modules: dict[str, nn.Module], x: Tensor, reference: str = "moezoo") -> None:
    """Every MoE candidate (not the dense ones) computes ``reference``'s output, to fp32 rounding."""
    with torch.no_grad():
        want = _first(modules[reference](x))
        scale = float(want.abs().max()) or 1.0
        for name, module in modules.items():
            if name == reference or name.startswith("dense"):
                continue
            got = _first(module(x))
            err = float((got - want).abs().max())
            if not err <= 1e-4 * scale:
                raise AssertionError(f"{name} differs from {reference}: max abs error {err:.3g} (scale {scale:.3g})")


def _gemm_operands(rows: int, dim: int, hidden: int, ffn_dim: int) -> tuple[list[Tensor], list[Tensor]]:
    """Random inputs ``x (rows, D), a (rows, F), dy (rows, D), dh (rows, H)`` and outputs ``h, y, da, dx``."""
    ins = [torch.randn(rows, dim), torch.randn(rows, ffn_dim), torch.randn(rows, dim), torch.randn(rows, hidden)]
    outs = [torch.empty(rows, hidden), torch.empty(rows, dim), torch.empty(rows, ffn_dim), torch.empty(rows, dim)]
    return ins, outs


def _six_gemms(
    ins: list[Tensor], outs: list[Tensor], w_in: Tensor, w_out: Tensor, dw_in: Tensor, dw_out: Tensor
) -> None:
    """The FFN's GEMMs: two forward, two input-gradient, two weight-gradient (``mm``, or ``bmm`` on batches);
    ``ins``/``outs`` as made by :func:`_gemm_operands`."""
    (x, a, dy, dh), (h, y, da, dx) = ins, outs
    mm = torch.bmm if x.dim() == 3 else torch.mm
    mm(x, w_in, out=h)
    mm(a, w_out, out=y)
    mm(dy, w_out.transpose(-1, -2), out=da)
    mm(dh, w_in.transpose(-1, -2), out=dx)
    mm(a.transpose(-1, -2), dy, out=dw_out)
    mm(x.transpose(-1, -2), dh, out=dw_in)


def breakdown_parts(
    moe: MoE, dense: FeedForward, x: Tensor, grad: Tensor, gemms: bool = False
) -> dict[str, Callable[[], None]]:
    """The parts of the MoE layer's forward+backward, each a call to time (clear gradients before each).

    ``router``: the router's forward and backward (gate, softmax, top-k, balance loss); ``expert FFN``: the fused
    expert FFN alone (sort, gathers, GEMMs, activations, scatters; its forward and backward); ``expert GEMMs``: its
    six GEMM roles (two forward, two input-gradient, two weight-gradient) as one ``mm`` per expert with this
    batch's real row counts, the calls the fused path makes; ``dense GEMMs``: the dense FFN's six GEMMs alone;
    ``balanced bmm``: the experts' six GEMMs as one ``bmm`` each over equal row counts, what a grouped GEMM
    without per-expert calls or padding would cost; ``gather/scatter``: the four row moves any gather-based
    dispatch makes (gather inputs and scatter-add outputs forward, gather output gradients and scatter-add input
    gradients backward), one ``index_select``/``index_add_`` each.

    With ``gemms``: also ``expert FFN[loop]`` and ``expert FFN[grouped_mm]``, the expert FFN with its GEMMs fixed
    to one way (see :func:`moezoo.ops.fused.choose_gemm`).

    The floor (:func:`floor_ratios`) is ``router + expert GEMMs + (dense - dense GEMMs) + gather/scatter``: the
    router, the GEMMs as the experts must run them, the activation work the dense FFN also does, and the row moves.
    """
    tokens, dim = x.shape
    experts = moe.experts
    num_experts, ffn_dim = experts.num_experts, experts.ffn_dim
    with torch.no_grad():
        routing = moe.route(x)
    gate = routing.gate_N.detach().requires_grad_()

    def router_step() -> None:
        routing = moe.route(x)
        sum(routing.losses.values(), routing.gate_N.sum()).backward()

    def experts_step(gemm: str = "auto") -> Callable[[], None]:
        def run() -> None:
            gate.grad = None
            y = expert_ffn_fused(
                x,
                routing.token_idx_N,
                routing.expert_idx_N,
                gate,
                experts.w_in,
                experts.w_out,
                experts.activation,
                gemm=gemm,
            )
            y.backward(grad)

        return run

    perm = sort_by_expert(routing.token_idx_N, routing.expert_idx_N, num_experts)  # the fused path's row order
    starts = [0, *itertools.accumulate(perm.counts)]
    bounds = [(e, starts[e], starts[e + 1]) for e in range(num_experts) if perm.counts[e]]
    w_in, w_out = experts.w_in.detach(), experts.w_out.detach()
    dw_in, dw_out = torch.empty_like(w_in), torch.empty_like(w_out)
    # inputs are random and never written (chained outputs would shrink towards denormals, which are slow)
    ins, outs = _gemm_operands(starts[-1], dim, w_in.shape[2], ffn_dim)

    def expert_gemms() -> None:
        for e, s0, s1 in bounds:
            rows_in, rows_out = [t[s0:s1] for t in ins], [t[s0:s1] for t in outs]
            _six_gemms(rows_in, rows_out, w_in[e], w_out[e], dw_in[e], dw_out[e])

    d_in, d_out = dense.fc_in.weight.detach().t().contiguous(), dense.fc_out.weight.detach().t().contiguous()
    dense_ins, dense_outs = _gemm_operands(tokens, dim, d_in.shape[1], d_out.shape[0])
    dd_in, dd_out = torch.empty_like(d_in), torch.empty_like(d_out)

    def dense_gemms() -> None:
        _six_gemms(dense_ins, dense_outs, d_in, d_out, dd_in, dd_out)

    per = max(1, starts[-1] // num_experts)  # balanced rows per expert
    bal_ins, bal_outs = _gemm_operands(num_experts * per, dim, w_in.shape[2], ffn_dim)

    def balanced_bmm() -> None:
        def batched(ts: list[Tensor]) -> list[Tensor]:
            return [t.view(num_experts, per, -1) for t in ts]

        _six_gemms(batched(bal_ins), batched(bal_outs), w_in, w_out, dw_in, dw_out)

    token_N = perm.token_sorted_N
    rows_x, rows_dy = torch.empty(starts[-1], dim), torch.empty(starts[-1], dim)
    out_TD, dx_TD, dout_TD = torch.zeros(tokens, dim), torch.zeros(tokens, dim), torch.randn(tokens, dim)
    x_plain = x.detach()

    def gather_scatter() -> None:
        torch.index_select(x_plain, 0, token_N, out=rows_x)  # forward: gather inputs, scatter outputs
        out_TD.index_add_(0, token_N, rows_x)
        torch.index_select(dout_TD, 0, token_N, out=rows_dy)  # backward: gather output grads, scatter input grads
        dx_TD.index_add_(0, token_N, rows_dy)

    def no_grad(fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad():
                fn()

        return run

    parts = {
        "router": router_step,
        "expert FFN": experts_step(),
        "expert GEMMs": no_grad(expert_gemms),
        "dense GEMMs": no_grad(dense_gemms),
        "balanced bmm": no_grad(balanced_bmm),
        "gather/scatter": no_grad(gather_scatter),
    }
    assert tuple(parts) == BREAKDOWN_PARTS
    if gemms:
        parts.update({f"expert FFN[{gemm}]": experts_step(gemm) for gemm in ("loop", "grouped_mm")})
    return parts


def floor_ratios(result: Interleaved, layer: str = "moezoo") -> list[float]:
    """Per round: ``layer``'s time over the floor ``router + expert GEMMs + (dense - dense GEMMs) + gather/scatter``
    of the same round (see :func:`breakdown_parts`); ``dense - dense GEMMs`` (the activation and the rest) is taken
    as 0 in a round where noise makes it negative (tiny shapes on a busy machine)."""
    t = result.times_ms
    floors = (
        r + g + max(d - dg, 0.0) + s
        for r, g, d, dg, s in zip(
            t["router"], t["expert GEMMs"], t["dense"], t["dense GEMMs"], t["gather/scatter"], strict=True
        )
    )
    return [m / f for m, f in zip(t[layer], floors, strict=True)]


def build_candidates(
    shape: Shape,
    activation: str,
    *,
    with_naive: bool = True,
    with_reference: bool = True,
    peers: bool = False,
    gemms: bool = False,
    saves: bool = False,
    compile_backend: str | None = None,
    seed: int = 0,
) -> tuple[dict[str, nn.Module], Tensor, list[str]]:
    """The modules of one row, the input ``x`` and notes on what was left out (and why)."""
    tokens, dim, ffn_dim, num_experts, top_k = shape
    torch.manual_seed(seed)
    moe = MoE(dim, ffn_dim, num_experts, top_k, router="topk", activation=activation, backend="torch")
    dense = FeedForward(dim, top_k * ffn_dim, activation)
    x = torch.randn(tokens, dim, requires_grad=True)
    modules: dict[str, nn.Module] = {"dense": dense, "moezoo": moe}
    notes: list[str] = []
    if compile_backend is not None:
        torch._dynamo.reset()
        for name, module in (("dense", dense), ("moezoo", moe)):
            compiled = torch.compile(module, fullgraph=True, backend=compile_backend)
            modules[name + COMPILED] = compiled  # type: ignore[assignment]
    copies = {"reference": "reference"} if with_reference else {}
    copies.update(GEMM_BACKENDS if gemms else {})
    copies.update(SAVE_BACKENDS if saves else {})
    for name, backend in copies.items():
        copy = MoE(dim, ffn_dim, num_experts, top_k, router="topk", activation=activation, backend=backend)
        copy.load_state_dict(moe.state_dict())
        modules[name] = copy
    if with_naive:
        modules["naive"] = NaiveLoopMoE(moe)
    if peers:
        hf = hf_mixtral_block(moe)
        if hf is None:
            notes.append(f"hf-mixtral left out at {shape}: needs transformers and SwiGLU experts")
        elif not getattr(moe.router, "normalize", True):
            notes.append(f"hf-mixtral left out at {shape}: Mixtral renormalises the top-{top_k} gates, moezoo not")
        else:
            modules["hf-mixtral"] = hf
        modules["grouped_mm"] = GroupedMMMoE(moe)
    return modules, x, notes


def bench_shape(
    shape: Shape,
    activation: str,
    rounds: int,
    *,
    warmup: int = 1,
    with_naive: bool = True,
    with_reference: bool = True,
    peers: bool = False,
    gemms: bool = False,
    saves: bool = False,
    breakdown: bool = False,
    compile_backend: str | None = None,
    seed: int = 0,
    timer: Timer = wall_ms,
) -> Interleaved:
    """One row: every candidate in the same interleaved rounds, after one untimed call each that counts the bytes
    saved for backward (and compiles the compiled ones). ``extra`` holds ``saved_mib`` and ``notes``."""
    modules, x, notes = build_candidates(
        shape,
        activation,
        with_naive=with_naive,
        with_reference=with_reference,
        peers=peers,
        gemms=gemms,
        saves=saves,
        compile_backend=compile_backend,
        seed=seed,
    )
    check_same_outputs(modules, x)
    grad = torch.randn_like(x)
    params = [x, *{id(p): p for m in modules.values() for p in m.parameters()}.values()]

    def zero_grads(_: str = "") -> None:
        for p in params:
            p.grad = None

    def step(module: nn.Module) -> Callable[[], None]:
        def run() -> None:
            _first(module(x)).backward(grad)

        return run

    calls: dict[str, Callable[[], None]] = {name: step(module) for name, module in modules.items()}
    saved_mib = {}
    for name, module in modules.items():
        zero_grads()
        out, saved = _saved_bytes(lambda module=module: _first(module(x)))  # type: ignore[misc]
        out.backward(grad)
        saved_mib[name] = saved / 2**20
    if breakdown:
        moe, dense = modules["moezoo"], modules["dense"]
        assert isinstance(moe, MoE) and isinstance(dense, FeedForward)
        calls.update(breakdown_parts(moe, dense, x, grad, gemms=gemms))
    result = interleave(
        calls, {name: baseline(name) for name in calls}, rounds, warmup=warmup, timer=timer, before=zero_grads
    )
    result.extra = {"shape": list(shape), "saved_mib": saved_mib, "notes": notes}
    return result


def _cell(s: Summary) -> str:
    return s.ratio_cell()


def format_table(rows: list[Interleaved]) -> str:
    """One line per row (shape): dense ms, every candidate's ratio cell, ``moezoo/floor`` with ``--breakdown``, MiB."""
    names = list(dict.fromkeys(n for row in rows for n in row.names if n != "dense"))
    modules = list(dict.fromkeys(n for row in rows for n in row.extra.get("saved_mib", {})))
    has_floor = any(set(BREAKDOWN_PARTS) <= set(row.names) for row in rows)
    head = ["(T, D, F, E, K)", "dense ms"] + [f"{n}/{baseline(n)}" for n in names]
    head += [FLOOR] if has_floor else []
    head += [f"{n} MiB" for n in modules]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [str(tuple(row.extra["shape"])), f"{row.summary('dense').median_ms:.1f}"]
        cells += [_cell(row.summary(n)) if n in row.times_ms else "-" for n in names]
        if has_floor:
            if set(BREAKDOWN_PARTS) <= set(row.names):
                ratios = floor_ratios(row)
                q1, med, q3 = quartiles(ratios)
                cells.append(f"{med:.2f}x [{q1:.2f}-{q3:.2f}] ({min(ratios):.2f}-{max(ratios):.2f})")
            else:
                cells.append("-")
        saved = row.extra.get("saved_mib", {})
        cells += [f"{saved[n]:.0f}" if n in saved else "-" for n in modules]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render(data: dict[str, Any]) -> str:
    """The tables of a ``--json`` file: one per thread count, with the load averages of each row."""
    out = []
    for threads, runs in itertools.groupby(data["runs"], key=lambda run: run["threads"]):
        rows = [Interleaved.from_dict(run) for run in runs]
        rounds = rows[0].rounds
        compiled = f", torch.compile backend {data['compile_backend']}" if data.get("compile_backend") else ""
        compiled += ", CPU time" if data.get("clock") == "cpu" else ""
        compiled += "".join(f", {name}={value}" for name, value in (data.get("openmp_env") or {}).items())
        out.append(
            f"{threads} thread(s), {data['activation']}, forward+backward{compiled}, {rounds} interleaved rounds after "
            f"{rows[0].warmup} warm-up; cell: median ratio to the same round's baseline [IQR] (min-max)"
        )
        out.append(format_table(rows))
        out += [f"- {tuple(row.extra['shape'])}: {format_load(row)}" for row in rows]
        out += [f"- {note}" for row in rows for note in row.extra.get("notes", [])]
    return "\n".join(out)


def parse_shapes(values: list[str] | None, default: tuple[Shape, ...] = DEFAULT_SHAPES) -> tuple[Shape, ...]:
    """``--shape`` values ``T,D,F,E,K`` (``default`` when none); a bad one exits with a message."""
    if not values:
        return default
    try:
        shapes = tuple(tuple(int(v) for v in s.split(",")) for s in values)
    except ValueError as err:
        raise SystemExit(f"--shape must be five integers T,D,F,E,K: {err}") from err
    if any(len(s) != 5 for s in shapes):
        raise SystemExit(f"--shape must be five integers T,D,F,E,K, got {values}")
    return shapes  # type: ignore[return-value]


def _parse_threads(value: str) -> list[int]:
    try:
        threads = [int(v) for v in value.split(",")]
    except ValueError:
        threads = []
    if not threads or min(threads) < 1:
        raise SystemExit(f"--threads must be positive integers separated by commas (e.g. 1,2), got {value!r}")
    return threads


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moezoo bench layer", description=__doc__.splitlines()[0])
    parser.add_argument("--shape", action="append", default=None, help="T,D,F,E,K (repeatable)")
    parser.add_argument("--activation", default="swiglu", choices=ACTIVATIONS)
    parser.add_argument("--threads", default="2", help="intra-op threads; a comma list gives one table each")
    parser.add_argument("--repeats", type=int, default=5, help="timed interleaved rounds")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds before them")
    parser.add_argument("--no-naive", action="store_true", help="skip the (slow) naive loop")
    parser.add_argument("--no-reference", action="store_true", help="skip the (slow) autograd reference backend")
    parser.add_argument(
        "--peers",
        action="store_true",
        help="add transformers' Mixtral block (grouped_mm experts, eager) and torch._grouped_mm as candidates",
    )
    parser.add_argument(
        "--gemms",
        action="store_true",
        help="add moezoo[loop] and moezoo[grouped_mm]: the MoE layer with its expert GEMMs fixed to one mm per expert "
        "or to torch._grouped_mm (moezoo chooses per call)",
    )
    parser.add_argument(
        "--saves",
        action="store_true",
        help="add moezoo[save=h] and moezoo[save=all]: the MoE layer keeping for backward only the pre-activations "
        "or also the gathered inputs and activations (moezoo chooses per call)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also time the dense FFN and the MoE layer under torch.compile(fullgraph=True); the compiled layer is "
        "reported against the compiled dense FFN",
    )
    parser.add_argument(
        "--compile-backend",
        default="inductor",
        help="torch.compile backend for --compile (default inductor; aot_eager traces without code generation)",
    )
    parser.add_argument(
        "--breakdown",
        action="store_true",
        help="also time the parts of the MoE layer (router, expert FFN, expert GEMMs, dense GEMMs, balanced bmm, "
        "gather/scatter) in the same rounds and report moezoo over their floor",
    )
    parser.add_argument(
        "--clock",
        default="wall",
        choices=sorted(CLOCKS),
        help="wall time (default) or the process's CPU time (at one thread, robust to other processes on the cores)",
    )
    parser.add_argument("--json", default=None, help="write every round's raw times here (atomically)")
    parser.add_argument("--render", default=None, help="print the tables of a --json file and exit")
    args = parser.parse_args(argv)
    if args.render is not None:
        import json

        with open(args.render) as f:
            print(render(json.load(f)))
        return 0
    shapes = parse_shapes(args.shape)
    threads = _parse_threads(args.threads)
    if args.repeats < 1 or args.warmup < 0:
        raise SystemExit(f"--repeats must be >= 1 and --warmup >= 0, got {args.repeats} and {args.warmup}")
    data: dict[str, Any] = {
        "command": "moezoo bench layer " + " ".join(sys.argv[2:] if argv is None else argv),
        "activation": args.activation,
        "torch": torch.__version__,
        "compile_backend": args.compile_backend if args.compile else None,
        "clock": args.clock,
        # OpenMP's wait policy: with the default (idle threads spin between parallel regions) a busy machine slows
        # the fused path's many short regions far more than the peers' few long ones (README, layer benchmark)
        "openmp_env": {name: os.environ[name] for name in OPENMP_ENV if name in os.environ},
        "runs": [],
    }
    print(f"{data['command']}: CPU fp32, interleaved rounds")
    for n in threads:
        torch.set_num_threads(n)
        for shape in shapes:
            result = bench_shape(
                shape,
                args.activation,
                args.repeats,
                warmup=args.warmup,
                with_naive=not args.no_naive,
                with_reference=not args.no_reference,
                peers=args.peers,
                gemms=args.gemms,
                saves=args.saves,
                breakdown=args.breakdown,
                compile_backend=args.compile_backend if args.compile else None,
                timer=CLOCKS[args.clock],
            )
            data["runs"].append({"threads": n, **result.as_dict()})
            print(f"done {shape} at {n} thread(s)", flush=True)
            if args.json is not None:  # after each row: a stopped run keeps what it measured
                write_json_atomic(args.json, data, sort_keys=False)
    print(render(data))
    return 0
