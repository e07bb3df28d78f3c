"""``moezoo bench parallel``: per-step time and bytes moved of one MoE layer with EP=2 vs EP=1, on CPU (gloo).

Every rank holds ``--tokens`` tokens and runs one training step of the layer: forward, backward and the gradient
communication a data-parallel run needs. Rows:

- ``1 process``: the layer alone, no communication (the floor);
- ``EP=1 (DP)``: ``--world`` processes, each with every expert; all gradients are all-reduced (what DDP does);
- ``EP=<world>``: the experts sharded over the processes: tokens go to their experts and back with
  ``all_to_all_single`` (forward and backward); only the router's (replicated) gradient is all-reduced.

Bytes are per rank and per step: ``all_to_all`` counts rows sent to other ranks (a rank's rows for its own
experts do not move) plus the pair-count exchange; ``all_reduce`` is the payload of the gradient all-reduce
(a ring all-reduce puts about ``2 (P-1)/P`` times that on the wire). Times are medians over ``--steps`` steps
after ``--warmup``, each step started together (a barrier); one thread per process.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

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


def _measure(args: argparse.Namespace, ep_size: int | None) -> dict[str, float]:
    """One rank's medians; ``ep_size`` None: single process without communication."""
    distributed = ep_size is not None
    rank = dist.get_rank() if distributed else 0
    moe = _layer(args)
    groups = init_expert_parallel(ep_size, timeout_s=300) if ep_size is not None else None
    if groups is not None:
        shard_experts(moe, groups)
    sharded = set(expert_parameter_names(moe))
    reduced = [p for name, p in moe.named_parameters() if name not in sharded]
    x = torch.randn(args.tokens, args.dim, generator=torch.Generator().manual_seed(rank))
    times, a2a_bytes, allreduce_bytes = [], [], []
    for step in range(args.warmup + args.steps):
        moe.zero_grad(set_to_none=True)
        if groups is not None:
            groups.stats.reset()
        if distributed:
            dist.barrier()
        start = time.perf_counter()
        y, aux = moe(x)
        (y.square().mean() + aux.aux_loss).backward()
        payload = 0
        if distributed:
            flat = torch.cat([p.grad.reshape(-1) for p in reduced if p.grad is not None])
            dist.all_reduce(flat)
            payload = flat.numel() * flat.element_size()
        elapsed = time.perf_counter() - start
        if step >= args.warmup:
            times.append(elapsed * 1e3)
            a2a_bytes.append(groups.stats.bytes_sent if groups is not None else 0)
            allreduce_bytes.append(payload)
    return dict(
        ms=statistics.median(times), all_to_all=statistics.mean(a2a_bytes), all_reduce=statistics.mean(allreduce_bytes)
    )


def _rank(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300))
    rows = {"EP=1 (DP)": _measure(args, 1), f"EP={world}": _measure(args, world)}
    if rank == 0:
        rows["1 process"] = _measure(args, None)
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, rows)
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
    order = ["1 process", "EP=1 (DP)", f"EP={args.world}"]
    print(
        f"MoE layer T={args.tokens}/rank D={args.dim} F={args.ffn_dim} E={args.experts} K={args.top_k} "
        f"router={args.router}, {args.world} gloo processes on 127.0.0.1, 1 thread each"
    )
    print("| setting | ms/step (rank 0) | ms/step (slowest rank) | all_to_all bytes/step | all_reduce bytes/step |")
    print("| --- | ---: | ---: | ---: | ---: |")
    table = []
    for name in order:
        ranks = [rows[name] for rows in per_rank if name in rows]
        row = dict(
            setting=name,
            ms_rank0=ranks[0]["ms"],
            ms_slowest=max(r["ms"] for r in ranks),
            all_to_all_bytes=int(max(r["all_to_all"] for r in ranks)),
            all_reduce_bytes=int(max(r["all_reduce"] for r in ranks)),
        )
        table.append(row)
        print(
            f"| {name} | {row['ms_rank0']:.1f} | {row['ms_slowest']:.1f} | {row['all_to_all_bytes']:,} "
            f"| {row['all_reduce_bytes']:,} |"
        )
    if args.json is not None:
        args.json.write_text(json.dumps(dict(args={k: str(v) for k, v in vars(args).items()}, rows=table), indent=2))
    return 0
