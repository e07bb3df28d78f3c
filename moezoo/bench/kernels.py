"""``moezoo bench kernels``: forward+backward time and TFLOP/s of the MoE layer on the Triton kernels (CUDA).

Legend: T tokens, D model dim, F expert hidden, E experts, K experts per token, N = T*K routed pairs.

Every row is one (T, D, F, E, K) in bf16; the candidates share one top-k router and one set of expert weights:

- ``dense``: a dense FFN of hidden width K*F on the same T tokens: equal FLOPs, the roofline to compare with;
- ``triton``: ``MoE(..., backend="triton")``: the fused gather-to-combine expert kernels of ``moezoo.kernels``
  (routing in PyTorch);
- ``grouped_mm``: the same layer with experts on ``torch._grouped_mm`` (sort, gather, two grouped GEMMs,
  weighted ``index_add``);
- ``naive``: the per-expert masked loop most MoE code starts from (the peers live in :mod:`moezoo.bench.peers`).

``triton`` times the whole layer (routing statistics included); the others time router + experts + combine.

TFLOP/s counts the expert GEMMs only, forward plus backward (3x forward): ``6 * N * D * (H + F)`` with
``H = 2F`` (SwiGLU) or ``F`` (GELU); the router's ``6 * T * D * E`` is added for the MoE candidates. Times are
medians of CUDA-event-timed repeats after warm-up (the first calls also autotune the kernels).
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch
from torch import Tensor

from moezoo.bench.peers import GroupedMMMoE, NaiveLoopMoE
from moezoo.layers import FeedForward, MoE
from moezoo.ops.activations import ACTIVATIONS, hidden_width

DEFAULT_SHAPES = ((16384, 2048, 1408, 64, 6), (16384, 4096, 14336, 8, 2), (4096, 1024, 512, 32, 4))


def expert_flops(shape: tuple[int, int, int, int, int], activation: str) -> float:
    """Forward+backward FLOPs of the routed expert GEMMs plus the router (MoE) = the dense twin's."""
    tokens, dim, ffn_dim, num_experts, top_k = shape
    hidden = hidden_width(activation, ffn_dim)
    return 6.0 * tokens * top_k * dim * (hidden + ffn_dim)


def time_ms(fn: Callable[[], Tensor], params: list[Tensor], grad: Tensor, repeats: int, warmup: int) -> float:
    """Median forward+backward milliseconds on the current CUDA stream."""
    times = []
    for i in range(warmup + repeats):
        for p in params:
            p.grad = None
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn().backward(grad)
        end.record()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(start.elapsed_time(end))
    return statistics.median(times)


def bench_shape(
    shape: tuple[int, int, int, int, int], activation: str, repeats: int, warmup: int, with_naive: bool
) -> dict[str, float]:
    tokens, dim, ffn_dim, num_experts, top_k = shape
    torch.manual_seed(0)
    dtype, device = torch.bfloat16, torch.device("cuda")
    moe = MoE(dim, ffn_dim, num_experts, top_k, activation=activation, backend="triton", check_finite=False)
    moe = moe.to(device, dtype)
    dense = FeedForward(dim, top_k * ffn_dim, activation).to(device, dtype)
    x = torch.randn(tokens, dim, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn_like(x)
    candidates: dict[str, tuple[Callable[[], Tensor], list[Tensor]]] = {
        "dense": (lambda: dense(x), [x, *dense.parameters()]),
        "triton": (lambda: moe(x)[0], [x, *moe.parameters()]),
    }
    grouped = GroupedMMMoE(moe)
    candidates["grouped_mm"] = (lambda: grouped(x), [x, *moe.parameters()])
    if with_naive:
        naive = NaiveLoopMoE(moe)
        candidates["naive"] = (lambda: naive(x), [x, *moe.parameters()])
    results = {}
    for name, (fn, params) in candidates.items():
        try:
            results[name] = time_ms(fn, params, grad, repeats, warmup)
        except (RuntimeError, NotImplementedError) as err:  # e.g. _grouped_mm unsupported on this GPU
            print(f"  {name} skipped: {type(err).__name__}: {str(err).splitlines()[0]}", flush=True)
        torch.cuda.empty_cache()
    return results


def format_table(results: dict[tuple[int, int, int, int, int], dict[str, float]], activation: str) -> str:
    head = ["(T, D, F, E, K)", "candidate", "ms", "TFLOP/s", "vs dense"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for shape, row in results.items():
        flops = expert_flops(shape, activation)
        router = 6.0 * shape[0] * shape[1] * shape[3]
        for name, ms in row.items():
            work = flops if name == "dense" else flops + router
            ratio = f"{ms / row['dense']:.2f}x" if "dense" in row else "-"
            lines.append(f"| {tuple(shape)} | {name} | {ms:.2f} | {work / ms / 1e9:.1f} | {ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moezoo bench kernels", description=__doc__.splitlines()[0])
    parser.add_argument("--shape", action="append", default=None, help="T,D,F,E,K (repeatable)")
    parser.add_argument("--activation", default="swiglu", choices=ACTIVATIONS)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-naive", action="store_true", help="skip the (slow) per-expert loop")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("moezoo bench kernels: needs a CUDA device (none found); nothing measured")
        return 0
    shapes = DEFAULT_SHAPES
    if args.shape:
        try:
            shapes = tuple(tuple(int(v) for v in s.split(",")) for s in args.shape)  # type: ignore[assignment]
        except ValueError as err:
            raise SystemExit(f"--shape must be five integers T,D,F,E,K: {err}") from err
        if any(len(s) != 5 for s in shapes):
            raise SystemExit("--shape must be five integers T,D,F,E,K")
    print(
        f"moezoo bench kernels: {torch.cuda.get_device_name()}, bf16, {args.activation}, forward+backward, "
        f"median of {args.repeats} after {args.warmup} warm-up"
    )
    results = {}
    for shape in shapes:
        results[shape] = bench_shape(shape, args.activation, args.repeats, args.warmup, not args.no_naive)
        print(f"done {shape}", flush=True)
    print(format_table(results, args.activation))
    return 0
