"""Router cost: forward+backward time of a MoE layer with each sparse router, against the same layer with top-k.

``moezoo bench routers [--shape T,D,F,E,K] [--sequences S] [--repeats 20] [--threads 1] [--routers a,b]`` (or
``python -m moezoo.bench.routers ...``)

For every registered router that routes tokens one by one (the sparse ones and SMEAR; not Soft MoE): one training
step (forward, backward of the output and the router's losses, ``update_state``) of a ``MoE`` layer using it (fused
CPU backend): the median over repeats as a ratio to the top-k layer's median, the two timed alternately in the same
process, so that the numbers compare on a shared, noisy CPU. (The router alone takes about a millisecond at the
default shape, too short to time reliably on a loaded machine; its cost shows in the layer's.) ``pairs/token`` is the
mean number of pairs the router made in the last step (the layer's expert compute is proportional to it; SMEAR: 1,
its one merged expert). Routers are built with their defaults and the layer's ``top_k``. The input is
``--sequences`` S sequences of T/S tokens (default one; SMEAR merges the experts once per sequence, so
``--sequences 41`` with T = 2050 is the vision study's batch of 41 images of 50 tokens).

Routers with side inputs (``needs_side``: ``language``, ``global_embedding``, ``attention_graph``, ``promoe``) get
synthetic ones (:func:`moezoo.layers.side_inputs.synthetic_side`), drawn once per router from a generator seeded
0 and passed as ``side=`` in every timed step: language posteriors per token (a softmax over the router's
``num_experts`` languages), attention rows per sequence (a row-stochastic (S, T/S, T/S) softmax, heads averaged, as
the router takes it), a standard normal global embedding of the router's ``embed_dim`` per token, and a
classifier-free-guidance drop flag per token (True for about half the tokens, so one sequence still mixes dropped and
kept labels). Only their consumption is timed: the model parts that would compute them (an LID head, the attention)
are not. The top-k layer gets no side input.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence

import torch

from moezoo.layers import ROUTERS, MoE
from moezoo.layers.side_inputs import synthetic_side


def _layer_step(
    name: str, shape: tuple[int, int, int, int, int], sequences: int = 1
) -> tuple[Callable[[], None], list[float]]:
    """One training step of a MoE layer using router ``name`` on ``sequences`` sequences of T / sequences tokens,
    with the router's synthetic side inputs (none for a router without); ``pairs[0]``: pairs per token of the last
    step."""
    tokens, dim, ffn, experts, k = shape
    torch.manual_seed(0)
    moe = MoE(dim, ffn, num_experts=experts, top_k=k, router=name, backend="torch").train()
    x = torch.randn(sequences, tokens // sequences, dim, requires_grad=True)
    side = bench_side(moe, x)
    pairs = [0.0]

    def step() -> None:
        y, aux = moe(x, side=side)
        (y.square().mean() + aux.aux_loss).backward()
        moe.router.update_state()
        pairs[0] = float(aux.tokens_per_expert_E.sum()) / tokens

    return step, pairs


def bench_side(moe: MoE, x: torch.Tensor) -> dict[str, torch.Tensor] | None:
    """The synthetic side inputs of ``moe``'s router for the tokens ``x`` (S, L, D), drawn once from a generator
    seeded 0 (module docstring); ``None`` for a router without side inputs."""
    if not moe.router.needs_side:
        return None
    return synthetic_side(moe.router, tuple(x.shape[:-1]), torch.Generator().manual_seed(0), per_token=True)


def _ratio(step: Callable[[], None], base: Callable[[], None], repeats: int) -> tuple[float, float]:
    """Median time of ``step`` over the median time of ``base``, the two timed alternately (drift cancels)."""
    step()  # warm-up
    base()
    times: dict[int, list[float]] = {0: [], 1: []}
    for _ in range(repeats):
        for i, fn in enumerate((step, base)):
            start = time.perf_counter()
            fn()
            times[i].append(time.perf_counter() - start)
    ms, base_ms = (1e3 * statistics.median(times[i]) for i in (0, 1))
    return ms / base_ms, base_ms


def sparse_routers() -> list[str]:
    """Every router that routes tokens one by one: the sparse ones (those with side inputs too) and SMEAR
    (``"merge"``); not Soft MoE."""
    return sorted(n for n, c in ROUTERS.items() if c.kind != "soft")


def table(shape: tuple[int, int, int, int, int], names: Sequence[str], repeats: int, sequences: int = 1) -> str:
    base, _ = _layer_step("topk", shape, sequences)
    rows, base_ms = [], []
    for name in names:
        step, pairs = _layer_step(name, shape, sequences)
        ratio, ms = _ratio(step, base, repeats)
        base_ms.append(ms)
        rows.append(f"| {name} | {ratio:.2f}x | {pairs[0]:.2f} |")
    head = [
        f"(T, D, F, E, K) = {shape}, {sequences} sequence(s); top-k layer step {statistics.median(base_ms):.2f} ms "
        "(median)",
        "",
        "| router | layer step / top-k | pairs/token |",
        "|---|---|---|",
    ]
    return "\n".join(head + rows)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="moezoo bench routers", description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--shape", default="2048,64,128,8,2", help="T,D,F,E,K (default: the study's MoE layer)")
    p.add_argument("--sequences", type=int, default=1, help="S: the T tokens as S sequences of T/S (default 1)")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--routers",
        default=None,
        help="comma separated (default: every sparse router and SMEAR, not Soft MoE; routers with side inputs get "
        "synthetic ones: softmax language posteriors, softmax attention rows per sequence, a random global "
        "embedding, label-drop flags)",
    )
    args = p.parse_args(argv)
    try:
        shape = tuple(int(v) for v in args.shape.split(","))
    except ValueError:
        p.error(f"--shape must be five integers T,D,F,E,K, got {args.shape!r}")
    if len(shape) != 5:
        p.error(f"--shape must be five integers T,D,F,E,K, got {args.shape!r}")
    available = sparse_routers()
    names = args.routers.split(",") if args.routers else available
    bad = [n for n in names if n not in available]
    if bad:
        p.error(
            f"--routers: {bad} are not token routers (Soft MoE is not timed; routers with side inputs are, on "
            f"synthetic side inputs); choose from {available}"
        )
    if args.repeats < 1:
        p.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.sequences < 1 or shape[0] % args.sequences:
        p.error(f"--sequences must be a positive divisor of T={shape[0]}, got {args.sequences}")
    torch.set_num_threads(args.threads)
    print(table(shape, names, args.repeats, args.sequences))  # type: ignore[arg-type]
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
