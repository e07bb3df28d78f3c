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
CUDA-event times in interleaved rounds (:mod:`moezoo.bench.timing`) after warm-up (the first calls also
autotune the kernels); a ratio is the median over rounds of the candidate's time over the dense FFN's of the same
round, with its interquartile range and min-max.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from torch import Tensor

from moezoo.bench.layer import parse_shapes
from moezoo.bench.peers import GroupedMMMoE, NaiveLoopMoE
from moezoo.bench.timing import Interleaved, format_load, interleave
from moezoo.io import write_json_atomic
from moezoo.layers import FeedForward, MoE
from moezoo.ops.activations import ACTIVATIONS, hidden_width

DEFAULT_SHAPES = ((16384, 2048, 1408, 64, 6), (16384, 4096, 14336, 8, 2), (4096, 1024, 512, 32, 4))


def expert_flops(shape: tuple[int, int, int, int, int], activation: str) -> float:
    """Forward+backward FLOPs of the routed expert GEMMs plus the router (MoE) = the dense twin's."""
    tokens, dim, ffn_dim, num_experts, top_k = shape
    hidden = hidden_width(activation, ffn_dim)
    return 6.0 * tokens * top_k * dim * (hidden + ffn_dim)


def cuda_ms(fn: Callable[[], object]) -> float:
    """Milliseconds of one call of ``fn`` on the current CUDA stream, by CUDA events (a timer for
    :func:`~moezoo.bench.timing.interleave`)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return float(start.elapsed_time(end))


def bench_shape(
    shape: tuple[int, int, int, int, int], activation: str, repeats: int, warmup: int, with_naive: bool
) -> Interleaved:
    """One row: the candidates in ``repeats`` interleaved rounds after ``warmup`` (the first calls also autotune
    the kernels); a candidate whose first call fails (e.g. ``_grouped_mm`` unsupported on this GPU) is left out."""
    tokens, dim, ffn_dim, num_experts, top_k = shape
    torch.manual_seed(0)
    dtype, device = torch.bfloat16, torch.device("cuda")
    moe = MoE(dim, ffn_dim, num_experts, top_k, activation=activation, backend="triton", check_finite=False)
    moe = moe.to(device, dtype)
    dense = FeedForward(dim, top_k * ffn_dim, activation).to(device, dtype)
    x = torch.randn(tokens, dim, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn_like(x)
    layers: dict[str, Callable[[], Tensor]] = {"dense": lambda: dense(x), "triton": lambda: moe(x)[0]}
    grouped = GroupedMMMoE(moe)
    layers["grouped_mm"] = grouped
    if with_naive:
        layers["naive"] = NaiveLoopMoE(moe)
    params = [x, *moe.parameters(), *dense.parameters()]

    def zero_grads(_: str = "") -> None:
        for p in params:
            p.grad = None

    def step(layer: Callable[[], Tensor] | torch.nn.Module) -> Callable[[], None]:
        def run() -> None:
            out = layer(x) if isinstance(layer, torch.nn.Module) else layer()
            out.backward(grad)

        return run

    candidates = {}
    for name, layer in layers.items():
        try:
            zero_grads()
            step(layer)()
            candidates[name] = step(layer)
        except (RuntimeError, NotImplementedError) as err:  # e.g. _grouped_mm unsupported on this GPU
            print(f"  {name} skipped: {type(err).__name__}: {str(err).splitlines()[0]}", flush=True)
        torch.cuda.empty_cache()
    result = interleave(candidates, "dense", repeats, warmup=warmup, timer=cuda_ms, before=zero_grads)
    result.extra = {"shape": list(shape)}
    return result


def format_table(results: list[Interleaved], activation: str) -> str:
    head = ["(T, D, F, E, K)", "candidate", "median ms", "TFLOP/s", "vs dense: median [IQR] (min-max)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in results:
        shape = tuple(row.extra["shape"])
        flops = expert_flops(shape, activation)  # type: ignore[arg-type]
        router = 6.0 * shape[0] * shape[1] * shape[3]
        for name in row.names:
            summary = row.summary(name)
            work = flops if name == "dense" else flops + router
            lines.append(
                f"| {shape} | {name} | {summary.median_ms:.2f} | {work / summary.median_ms / 1e9:.1f} "
                f"| {summary.ratio_cell()} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moezoo bench kernels", description=__doc__.splitlines()[0])
    parser.add_argument("--shape", action="append", default=None, help="T,D,F,E,K (repeatable)")
    parser.add_argument("--activation", default="swiglu", choices=ACTIVATIONS)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-naive", action="store_true", help="skip the (slow) per-expert loop")
    parser.add_argument("--json", default=None, help="write every round's raw times here (atomically)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("moezoo bench kernels: needs a CUDA device (none found); nothing measured")
        return 0
    shapes = parse_shapes(args.shape, DEFAULT_SHAPES)
    print(
        f"moezoo bench kernels: {torch.cuda.get_device_name()}, bf16, {args.activation}, forward+backward, "
        f"{args.repeats} interleaved rounds after {args.warmup} warm-up; ratios to the dense FFN of the same round"
    )
    results = []
    for shape in shapes:
        results.append(bench_shape(shape, args.activation, args.repeats, args.warmup, not args.no_naive))
        print(f"done {shape}: {format_load(results[-1])}", flush=True)
    print(format_table(results, args.activation))
    if args.json is not None:
        data = {"command": "moezoo bench kernels " + " ".join(argv or []), "activation": args.activation,
                "device": torch.cuda.get_device_name(), "runs": [r.as_dict() for r in results]}  # fmt: skip
        write_json_atomic(args.json, data, sort_keys=False)
    return 0
