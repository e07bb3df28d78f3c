"""``moezoo bench parallel``: per-step time and bytes moved of one MoE layer with EP=2 vs EP=1, on CPU (gloo).

Every rank holds ``--tokens`` tokens and runs one training step of the layer: forward, backward and the gradient
communication a data-parallel run needs. Rows:

- ``1 process``: the layer alone, no communication (the floor);
- ``EP=1 (DP)``: ``--world`` processes, each with every expert; all gradients are all-reduced (what DDP does);
- ``EP=<world>``: the experts sharded over the processes: tokens go to their experts and back with
  ``all_to_all_single`` (forward and backward); only the router's (replicated) gradient is all-reduced.

Bytes are per rank and per step: ``all_to_all`` counts rows sent to other ranks (a rank's rows for its own
experts do not move) plus the pair-count exchange; ``all_reduce`` is the payload of the gradient all-reduce
(a ring all-reduce puts about ``2 (P-1)/P`` times that on the wire). The settings are timed interleaved
(:mod:`moezoo.bench.timing`): ``--warmup`` untimed rounds, then ``--steps`` rounds of one step of each setting in
turn, every step started together on all ranks (an untimed barrier); one thread per process. Times are medians
over the rounds; a ratio is rank 0's step over its ``1 process`` step of the same round (median, IQR, min-max).
Every rank runs the ``1 process`` step too (each its own layer, no communication), so the floor is measured
under the same load as the other rows.
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moezoo.bench.timing import Interleaved, format_load, interleave
from moezoo.io import write_json_atomic
from moezoo.layers import MoE
from moezoo.parallel import init_expert_parallel, shard_experts
from moezoo.parallel.experts import expert_parameter_names


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moezoo bench parallel", description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per rank")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--ffn-dim", type=int, default=512)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--router", default="topk")
    parser.add_argument("--world", type=int, default=2, help="processes for the EP=1 and EP=world rows")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    return parser


def _layer(args: argparse.Namespace) -> MoE:
    torch.manual_seed(0)
    return MoE(args.dim, args.ffn_dim, num_experts=args.experts, top_k=args.top_k, router=args.router)


def _setting(args: argparse.Namespace, ep_size: int | None) -> tuple[Callable[[], None], Callable[[], int], Any]:
    """One setting on this rank: ``(step, all-reduce payload of the last step, its expert-parallel groups)``;
    ``ep_size`` None: the layer alone, no communication."""
    rank = dist.get_rank()
    moe = _layer(args)
    groups = init_expert_parallel(ep_size, timeout_s=300) if ep_size is not None else None
    if groups is not None:
        shard_experts(moe, groups)
    sharded = set(expert_parameter_names(moe))
    reduced = [p for name, p in moe.named_parameters() if name not in sharded]
    x = torch.randn(args.tokens, args.dim, generator=torch.Generator().manual_seed(rank))
    payload = [0]

    def step() -> None:
        moe.zero_grad(set_to_none=True)
        y, aux = moe(x)
        (y.square().mean() + aux.aux_loss).backward()
        if ep_size is not None:
            flat = torch.cat([p.grad.reshape(-1) for p in reduced if p.grad is not None])
            dist.all_reduce(flat)
            payload[0] = flat.numel() * flat.element_size()

    return step, lambda: payload[0], groups


def _rank(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300))
    settings = {"1 process": _setting(args, None), "EP=1 (DP)": _setting(args, 1), f"EP={world}": _setting(args, world)}
    bytes_moved: dict[str, list[tuple[int, int]]] = {name: [] for name in settings}

    def before(name: str) -> None:
        groups = settings[name][2]
        if groups is not None:
            groups.stats.reset()
        dist.barrier()  # every rank starts the step together (untimed)

    def measured(name: str) -> Callable[[], None]:
        step, payload, groups = settings[name]

        def run() -> None:
            step()
            bytes_moved[name].append((groups.stats.bytes_sent if groups is not None else 0, payload()))

        return run

    result = interleave(
        {name: measured(name) for name in settings}, "1 process", args.steps, warmup=args.warmup, before=before
    )
    result.extra = {
        name: {"all_to_all": statistics.mean(a for a, _ in moved), "all_reduce": statistics.mean(r for _, r in moved)}
        for name, moved in bytes_moved.items()
    }
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, result.as_dict())
    if rank == 0:
        torch.save(gathered, out)
    dist.destroy_process_group()


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.world < 2 or args.experts % args.world:
        raise ValueError(f"--world must be >= 2 and divide --experts={args.experts}, got {args.world}")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "rows.pt")
        mp.start_processes(_rank, args=(args.world, port, args, out), nprocs=args.world, join=True)
        per_rank = torch.load(out, weights_only=False)
    ranks = [Interleaved.from_dict(data) for data in per_rank]
    order = ["1 process", "EP=1 (DP)", f"EP={args.world}"]
    print(
        f"MoE layer T={args.tokens}/rank D={args.dim} F={args.ffn_dim} E={args.experts} K={args.top_k} "
        f"router={args.router}, {args.world} gloo processes on 127.0.0.1, 1 thread each; {args.steps} interleaved "
        f"steps per setting after {args.warmup} warm-up; rank 0 {format_load(ranks[0])}"
    )
    print("| setting | ms/step (rank 0) | ms/step (slowest rank) | all_to_all bytes/step | all_reduce bytes/step |")
    print("| --- | ---: | ---: | ---: | ---: |")
    table = []
    for name in order:
        row = dict(
            setting=name,
            ms_rank0=ranks[0].summary(name).median_ms,
            ms_slowest=max(r.summary(name).median_ms for r in ranks),
            all_to_all_bytes=int(max(r.extra[name]["all_to_all"] for r in ranks)),
            all_reduce_bytes=int(max(r.extra[name]["all_reduce"] for r in ranks)),
            vs_1_process=vars(ranks[0].summary(name)),
        )
        table.append(row)
        print(
            f"| {name} | {row['ms_rank0']:.1f} | {row['ms_slowest']:.1f} | {row['all_to_all_bytes']:,} "
            f"| {row['all_reduce_bytes']:,} |"
        )
    for name in order[1:]:
        print(f"{name} / 1 process (rank 0, paired per step): {ranks[0].summary(name).ratio_cell()}")
    if args.json is not None:
        data = dict(args={k: str(v) for k, v in vars(args).items()}, rows=table, ranks=[r.as_dict() for r in ranks])
        write_json_atomic(args.json, data, sort_keys=False)
    return 0
