"""``moezoo bench layer``: forward+backward time and activation memory of one MoE layer on the CPU.

Every row compares, in the same process and on the same input:

- ``dense``: a dense FFN whose hidden width is the active expert width per token (K*F): equal FLOPs;
- ``moezoo``: the MoE layer (top-k router + the fused PyTorch path);
- ``reference``: the same layer on the readable autograd reference backend;
- ``naive``: the per-expert masked loop most MoE code starts from;
- ``hf-grouped_mm``: transformers' Mixtral block with its ``grouped_mm`` experts backend (when installed);
- with ``--compile``: ``dense+compile`` and ``moezoo+compile``, the dense FFN and the MoE layer under
  ``torch.compile(fullgraph=True)`` (inductor by default); ``moezoo+compile`` is reported against
  ``dense+compile``, ``dense+compile`` against ``dense``.

The peers (naive loop, grouped_mm, Mixtral block) live in :mod:`moezoo.bench.peers`. Times are medians over
repeats; ratios are against the dense FFN measured in the same run, which is what makes them comparable on a
shared, noisy CPU. Memory is what autograd saves for backward (MiB), counted with ``saved_tensors_hooks`` over
unique storages (compiled candidates: what the compiled graph saves, as seen by the same hooks).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from moezoo.bench.peers import NaiveLoopMoE, hf_mixtral_block
from moezoo.layers import FeedForward, MoE
from moezoo.ops.activations import ACTIVATIONS, hidden_width
from moezoo.ops.fused import expert_ffn_fused
from moezoo.ops.permute import sort_by_expert

DEFAULT_SHAPES = ((4096, 512, 1024, 8, 2), (4096, 512, 256, 64, 8), (2048, 256, 128, 64, 4))
COMPILED = "+compile"  # suffix of the compiled candidates


@dataclass
class Measurement:
    ms: float
    saved_mib: float


def _saved_bytes(fn: Callable[[], Tensor]) -> tuple[Tensor, int]:
    storages: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(storages.values())


def measure(module: nn.Module, x: Tensor, repeats: int, warmup: int = 1) -> Measurement:
    """Median forward+backward milliseconds and the bytes saved for backward."""
    grad = torch.randn_like(x)

    def run() -> Tensor:
        out = module(x)
        return out[0] if isinstance(out, tuple) else out

    saved = 0
    times = []
    for i in range(warmup + repeats):
        x.grad = None
        for p in module.parameters():
            p.grad = None
        start = time.perf_counter()
        out, saved = _saved_bytes(run)
        out.backward(grad)
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
    return Measurement(statistics.median(times), saved / 2**20)


def bench_shape(
    shape: tuple[int, int, int, int, int],
    activation: str,
    repeats: int,
    with_naive: bool = True,
    seed: int = 0,
    compile_backend: str | None = None,
) -> dict[str, Measurement]:
    """One row: every candidate on the same input. ``compile_backend``: also time the dense FFN and the MoE layer
    under ``torch.compile(fullgraph=True, backend=compile_backend)`` (the first, untimed call compiles)."""
    tokens, dim, ffn_dim, num_experts, top_k = shape
    torch.manual_seed(seed)
    moe = MoE(dim, ffn_dim, num_experts, top_k, router="topk", activation=activation, backend="torch")
    dense = FeedForward(dim, top_k * ffn_dim, activation)
    x = torch.randn(tokens, dim, requires_grad=True)
    candidates: dict[str, nn.Module] = {"dense": dense, "moezoo": moe}
    if compile_backend is not None:
        torch._dynamo.reset()
        for name, module in (("dense", dense), ("moezoo", moe)):
            compiled = torch.compile(module, fullgraph=True, backend=compile_backend)
            candidates[name + COMPILED] = compiled  # type: ignore[assignment]
    reference = MoE(dim, ffn_dim, num_experts, top_k, router="topk", activation=activation, backend="reference")
    reference.load_state_dict(moe.state_dict())
    candidates["reference"] = reference
    if with_naive:
        candidates["naive"] = NaiveLoopMoE(moe)
    hf = hf_mixtral_block(moe)
    if hf is not None:
        candidates["hf-grouped_mm"] = hf
    return {name: measure(module, x, repeats) for name, module in candidates.items()}


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    """Median milliseconds of ``fn`` over ``4 * max(repeats, 3)`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(max(repeats, 3) * 4):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def gemm_floor(shape: tuple[int, int, int, int, int], activation: str, repeats: int) -> float:
    """Time of the experts' first-projection GEMMs as one ``mm`` per expert (balanced rows) over one ``mm`` of
    the same FLOPs (the dense FFN's first projection): the share of the ratio that no dispatch code can remove
    while experts run as separate GEMMs."""
    tokens, dim, ffn_dim, num_experts, top_k = shape
    hidden = hidden_width(activation, ffn_dim)
    rows = tokens * top_k // num_experts
    x_ND = torch.randn(rows * num_experts, dim)
    w_EDH = torch.randn(num_experts, dim, hidden)
    h_NH = torch.empty(rows * num_experts, hidden)
    x_TD, w_DK = torch.randn(tokens, dim), torch.randn(dim, top_k * hidden)
    h_TK = torch.empty(tokens, top_k * hidden)

    def experts() -> None:
        for e in range(num_experts):
            torch.mm(x_ND[e * rows : (e + 1) * rows], w_EDH[e], out=h_NH[e * rows : (e + 1) * rows])

    def dense() -> None:
        torch.mm(x_TD, w_DK, out=h_TK)

    return _median_ms(experts, repeats) / _median_ms(dense, repeats)


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


BREAKDOWN_PARTS = ("router", "expert GEMMs", "expert other", "layer other")


def breakdown(shape: tuple[int, int, int, int, int], activation: str, repeats: int, seed: int = 0) -> dict[str, float]:
    """Where the MoE layer's forward+backward time goes, in milliseconds, next to the dense FFN's.

    ``router``: the router's forward and backward (gate, softmax, top-k, balance loss); ``expert GEMMs``: the six
    GEMM roles of the expert FFN's forward and backward (two forward, two input-gradient, two weight-gradient) as
    one ``mm`` per expert with this batch's real row counts, the calls the fused path makes; ``expert other``: the
    rest of the expert FFN (sort, gathers, scatters, activations, gate gradient); ``layer other``: what the layer
    adds around both (input checks, statistics). ``dense GEMMs``: the dense FFN's six GEMMs alone. ``balanced bmm``:
    the experts' six GEMMs as one ``bmm`` each over equal row counts, what a grouped GEMM without per-expert calls
    or padding would cost (no PyTorch CPU op does this for unequal counts). ``gather/scatter``: the four row moves
    any gather-based dispatch makes (gather the inputs and scatter-add the outputs forward, gather the output
    gradients and scatter-add the input gradients backward), as one ``index_select``/``index_add_`` each.
    """
    tokens, dim, ffn_dim, num_experts, top_k = shape
    torch.manual_seed(seed)
    moe = MoE(dim, ffn_dim, num_experts, top_k, router="topk", activation=activation, backend="torch")
    dense = FeedForward(dim, top_k * ffn_dim, activation)
    x = torch.randn(tokens, dim, requires_grad=True)
    grad = torch.randn(tokens, dim)
    params = [x, *moe.parameters(), *dense.parameters()]

    def zero_grads() -> None:
        for p in params:
            p.grad = None

    def dense_step() -> None:
        zero_grads()
        dense(x).backward(grad)

    def moe_step() -> None:
        zero_grads()
        moe(x)[0].backward(grad)

    def router_step() -> None:
        zero_grads()
        routing = moe.router(x)
        sum(routing.losses.values(), routing.gate_N.sum()).backward()

    with torch.no_grad():
        routing = moe.router(x)
    gate = routing.gate_N.detach().requires_grad_()
    experts = moe.experts

    def experts_step() -> None:
        zero_grads()
        gate.grad = None
        y = expert_ffn_fused(
            x, routing.token_idx_N, routing.expert_idx_N, gate, experts.w_in, experts.w_out, activation
        )
        y.backward(grad)

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
    dense_ins, dense_outs = _gemm_operands(tokens, dim, d_in.shape[1], top_k * ffn_dim)
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

    with torch.no_grad():
        gather_ms = _median_ms(gather_scatter, repeats)
        gemm_ms = _median_ms(expert_gemms, repeats)
        bmm_ms = _median_ms(balanced_bmm, repeats)
        dense_gemm_ms = _median_ms(dense_gemms, repeats)
    dense_ms, moe_ms = _median_ms(dense_step, repeats), _median_ms(moe_step, repeats)
    router_ms, experts_ms = _median_ms(router_step, repeats), _median_ms(experts_step, repeats)
    return {
        "dense": dense_ms,
        "dense GEMMs": dense_gemm_ms,
        "balanced bmm": bmm_ms,
        "gather/scatter": gather_ms,
        "moezoo": moe_ms,
        "router": router_ms,
        "expert GEMMs": gemm_ms,
        "expert other": experts_ms - gemm_ms,
        "layer other": moe_ms - experts_ms - router_ms,
    }


def format_breakdown(rows: dict[tuple[int, int, int, int, int], dict[str, float]]) -> str:
    head = [
        "(T, D, F, E, K)",
        "dense ms",
        "moezoo/dense",
        *(f"{p}/dense" for p in BREAKDOWN_PARTS),
        "dense GEMMs/dense",
        "balanced bmm/dense",
        "gather/scatter/dense",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for shape, row in rows.items():
        dense = row["dense"]
        parts = [
            row["moezoo"],
            *(row[p] for p in BREAKDOWN_PARTS),
            row["dense GEMMs"],
            row["balanced bmm"],
            row["gather/scatter"],
        ]
        lines.append(
            "| " + " | ".join([str(tuple(shape)), f"{dense:.1f}", *(f"{v / dense:.2f}x" for v in parts)]) + " |"
        )
    return "\n".join(lines)


def baseline(name: str) -> str:
    """What a candidate's time is divided by: ``dense+compile`` for a compiled MoE, ``dense`` for the rest."""
    return "dense" + COMPILED if name.endswith(COMPILED) and name != "dense" + COMPILED else "dense"


def format_table(
    results: dict[tuple[int, int, int, int, int], dict[str, Measurement]],
    floors: dict[tuple[int, int, int, int, int], float] | None = None,
) -> str:
    names = list(dict.fromkeys(name for row in results.values() for name in row))
    head = ["(T, D, F, E, K)", "dense ms"] + [f"{n}/{baseline(n)}" for n in names if n != "dense"]
    head += [f"{n} MiB" for n in names]
    if floors:
        head.append("expert GEMMs / one GEMM")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for shape, row in results.items():
        cells = [str(tuple(shape)), f"{row['dense'].ms:.1f}"]
        cells += [
            f"{row[n].ms / row[baseline(n)].ms:.2f}x" if n in row and baseline(n) in row else "-"
            for n in names
            if n != "dense"
        ]
        cells += [f"{row[n].saved_mib:.0f}" if n in row else "-" for n in names]
        if floors:
            cells.append(f"{floors[shape]:.2f}x" if shape in floors else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moezoo bench layer", description=__doc__.splitlines()[0])
    parser.add_argument("--shape", action="append", default=None, help="T,D,F,E,K (repeatable)")
    parser.add_argument("--activation", default="swiglu", choices=ACTIVATIONS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-naive", action="store_true", help="skip the (slow) naive loop")
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
        help="instead of the comparison, split the MoE layer's time into router, expert GEMMs, other expert work "
        "and other layer work (each over the dense FFN measured in the same run)",
    )
    args = parser.parse_args(argv)
    shapes = DEFAULT_SHAPES
    if args.shape:
        try:
            shapes = tuple(tuple(int(v) for v in s.split(",")) for s in args.shape)  # type: ignore[assignment]
        except ValueError as err:
            raise SystemExit(f"--shape must be five integers T,D,F,E,K: {err}") from err
        if any(len(s) != 5 for s in shapes):
            raise SystemExit("--shape must be five integers T,D,F,E,K")
    torch.set_num_threads(args.threads)
    if args.breakdown:
        print(f"moezoo bench layer --breakdown: CPU fp32, {torch.get_num_threads()} threads, {args.activation}")
        parts = {shape: breakdown(shape, args.activation, args.repeats) for shape in shapes}
        print(format_breakdown(parts))
        print(
            "moezoo = router + expert GEMMs + expert other + layer other (each part timed on its own; the sum need "
            "not equal moezoo exactly). expert GEMMs: one mm per expert with this batch's row counts, 6 GEMM roles; "
            "balanced bmm: the same 6 roles as one bmm each over equal row counts (an ideal grouped GEMM); "
            "gather/scatter: the 4 row gathers and scatter-adds of a gather-based dispatch."
        )
        return 0
    compiled = f", torch.compile backend {args.compile_backend}" if args.compile else ""
    print(
        f"moezoo bench layer: CPU fp32, {torch.get_num_threads()} threads, {args.activation}, "
        f"median of {args.repeats}, forward+backward{compiled}"
    )
    results = {}
    floors = {}
    for shape in shapes:
        compile_backend = args.compile_backend if args.compile else None
        results[shape] = bench_shape(
            shape, args.activation, args.repeats, not args.no_naive, compile_backend=compile_backend
        )
        floors[shape] = gemm_floor(shape, args.activation, args.repeats)
        print(f"done {shape}", flush=True)
    print(format_table(results, floors))
    print(
        "expert GEMMs / one GEMM: the first projection as one mm per expert (T*K/E rows each) over one mm of the same "
        "FLOPs; a floor for moezoo/dense while experts run as separate GEMMs"
    )
    return 0
