"""``moezoo zoo``: the pretrained model zoo's command.

- ``moezoo zoo list [PATTERN]``: released ``name.tag`` checkpoints, their headline metric and where they are;
- ``moezoo zoo info NAME``: everything registered about one release (its model card, or ``--json``);
- ``moezoo zoo download NAME|--all``: fetch and verify (see :mod:`moezoo.models.hub`), print the local path;
- ``moezoo zoo eval NAME|--all``: rerun the release's evaluation (:mod:`moezoo.tasks.zoo.evaluation`) and compare
  with the registered metrics within the registered tolerance (exit status 1 on a mismatch);
- ``moezoo zoo release --config YAML --ckpt CKPT --name NAME.TAG ...``: :mod:`moezoo.tasks.zoo.release`;
- ``moezoo zoo card NAME|--all [--check]``: (re)write model cards from the registry, or check they agree.

``eval`` and ``release`` run Lightning tasks: their modules are imported when those commands run, so the other
commands work without Lightning installed.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from moezoo.io import write_json_atomic
from moezoo.models import get_pretrained_cfg, hub, list_models
from moezoo.models.pretrained_cfg import DEFAULT_TOLERANCE, STORAGE_DTYPES, PretrainedCfg
from moezoo.tasks.bench.render import HEADLINE_METRICS
from moezoo.zoo.cards import CARDS_DIR, card_path, render_card, write_card

# Never a headline: losses and routing statistics say nothing about a release's quality.
NOT_HEADLINE = ("loss", "aux", "balance", "z_loss", "contrastive", "dropped", "entropy", "load_cv", "params/", "time")


def _names(args: argparse.Namespace) -> list[str]:
    if getattr(args, "all", False):
        return list_models(pretrained=True)
    if not args.name:
        raise ValueError("give a release NAME (moezoo zoo list) or --all")
    get_pretrained_cfg(args.name)  # raises a clear error for an unknown name
    return [args.name]


def _headline(cfg: PretrainedCfg) -> str:
    """The release's quality metric: the first of the benchmark tables' headline metrics it has, else its first
    test metric that is not a loss or a routing statistic, else "-"."""
    for key in HEADLINE_METRICS:
        if key in cfg.metrics:
            return f"{key}={cfg.metrics[key]:.4f}"
    quality = (k for k in sorted(cfg.metrics) if k.startswith("test/") and not any(w in k for w in NOT_HEADLINE))
    return next((f"{k}={cfg.metrics[k]:.4f}" for k in quality), "-")


def cmd_list(args: argparse.Namespace) -> int:
    names = list_models(args.pattern, pretrained=True)
    print(f"{'name':36s} {'domain':10s} {'metric':22s} {'active/total params':>22s} {'bytes':>10s}  available")
    for name in names:
        cfg = get_pretrained_cfg(name)
        local = [u for u in cfg.urls if (p := hub.local_path(u)) is not None and p.is_file()]
        where = ["shipped" if u.startswith(f"{hub.PACKAGE_SCHEME}://") else "file" for u in local]
        if (hub.checkpoint_dir() / cfg.file).is_file():
            where.append("cache")
        params = f"{cfg.params.get('active', 0):,}/{cfg.params.get('total', 0):,}"
        print(
            f"{name:36s} {cfg.domain:10s} {_headline(cfg):22s} {params:>22s} {cfg.num_bytes or 0:>10,}  "
            f"{','.join(where) or 'download'}"
        )
    if not names:
        print(f"(no releases match {args.pattern!r})")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    cfg = get_pretrained_cfg(args.name)
    if args.json:
        print(json.dumps(asdict(cfg), indent=2, sort_keys=True))
    else:
        print(render_card(args.name, cfg), end="")
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    for name in _names(args):
        path = hub.fetch(get_pretrained_cfg(name), offline=args.offline or None, force=args.force)
        print(f"{name}: {path}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from moezoo.tasks.zoo.evaluation import compare, run_evaluation  # Lightning: only for this command

    failed = []
    results = {}
    for name in _names(args):
        cfg = get_pretrained_cfg(name)
        metrics, _ = run_evaluation(cfg, offline=args.offline or None)
        results[name] = metrics
        lines = compare(cfg.metrics, metrics, cfg.tolerance)
        print(f"\n{name}  (moezoo zoo eval {name})")
        print(f"{'metric':28s} {'card':>12s} {'eval':>12s} {'|diff|':>10s} {'tol':>8s}")
        print("\n".join(lines))
        if any(line.endswith("FAIL") for line in lines):
            failed.append(name)
    if args.json:
        write_json_atomic(args.json, results)
    if failed:
        print(f"\nmetrics outside tolerance: {failed}", file=sys.stderr)
        return 1
    print(f"\nall {len(results)} release(s) reproduce their card metrics within tolerance")
    return 0


def cmd_card(args: argparse.Namespace) -> int:
    cards_dir = Path(args.cards_dir)
    stale = []
    for name in _names(args):
        cfg = get_pretrained_cfg(name)
        path = card_path(name, cards_dir)
        if args.check:
            if not path.is_file() or path.read_text() != render_card(name, cfg):
                stale.append(str(path))
        else:
            print(f"wrote {write_card(name, cfg, cards_dir)}")
    if stale:
        print(f"cards that disagree with the registry: {stale}; run `moezoo zoo card --all`", file=sys.stderr)
        return 1
    return 0


def _tolerances(items: Sequence[str]) -> dict[str, float]:
    """``--tolerance METRIC=ABS`` options as a mapping."""
    tolerance = {}
    for item in items:
        metric, _, value = item.partition("=")
        try:
            tolerance[metric] = float(value)
        except ValueError:
            metric = ""
        if not metric:
            raise ValueError(f"--tolerance must be METRIC=ABS (e.g. test/acc=0.001), got {item!r}")
    return tolerance


def cmd_release(args: argparse.Namespace) -> int:
    from moezoo.tasks.zoo.release import ReleaseRequest, release  # Lightning: only for this command

    request = ReleaseRequest(
        config=Path(args.config),
        ckpt=Path(args.ckpt),
        name=args.name,
        domain=args.domain,
        dataset=args.dataset,
        license=args.license,
        description=args.description,
        dense_twin=args.dense_twin,
        urls=list(args.url),
        limitations=list(args.limitation),
        citations=list(args.cite),
        tolerance=_tolerances(args.tolerance),
        storage_dtype=args.storage_dtype,
        notes=Path(args.notes).read_text().splitlines() if args.notes else [],
        weights_dir=Path(args.weights_dir) if args.weights_dir else None,
        cards_dir=Path(args.cards_dir),
    )
    cfg, weights, card = release(request)
    print(f"released {args.name}: {weights} ({cfg.num_bytes:,} bytes), card {card}")
    for metric, value in sorted(cfg.metrics.items()):
        print(f"  {metric} = {value:.6f}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moezoo zoo", description="the pretrained model zoo")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("list", help="released checkpoints")
    p.add_argument("pattern", nargs="?", default="*", help="glob over name.tag")
    p.set_defaults(func=cmd_list)
    p = sub.add_parser("info", help="everything registered about a release (its model card)")
    p.add_argument("name")
    p.add_argument("--json", action="store_true", help="the raw registered config")
    p.set_defaults(func=cmd_info)
    for command, func, text in (
        ("download", cmd_download, "fetch and verify weights"),
        ("eval", cmd_eval, "rerun the card's evaluation"),
    ):
        p = sub.add_parser(command, help=text)
        p.add_argument("name", nargs="?")
        p.add_argument("--all", action="store_true", help="every release")
        p.add_argument("--offline", action="store_true", help="never use the network (also MOEZOO_OFFLINE=1)")
        if command == "download":
            p.add_argument("--force", action="store_true", help="ignore local copies and download again")
        else:
            p.add_argument("--json", help="also write the metrics to this JSON file")
        p.set_defaults(func=func)
    p = sub.add_parser("card", help="write model cards from the registry (or --check them)")
    p.add_argument("name", nargs="?")
    p.add_argument("--all", action="store_true")
    p.add_argument("--check", action="store_true", help="exit 1 when a card differs from the registry")
    p.add_argument("--cards-dir", default=str(CARDS_DIR))
    p.set_defaults(func=cmd_card)
    p = sub.add_parser("release", help="turn a trained Lightning checkpoint into a release")
    p.add_argument("--config", required=True, help="the training YAML (configs/...)")
    p.add_argument(
        "--ckpt", required=True, help="the Lightning checkpoint to release (its model.* weights; the EMA copy for DiT)"
    )
    p.add_argument("--name", required=True, help="<model>.<tag>")
    p.add_argument("--domain", required=True)
    p.add_argument("--dataset", required=True, help="what the data is, its source and license")
    p.add_argument("--license", default="Apache-2.0")
    p.add_argument("--description", default="")
    p.add_argument("--dense-twin", default="", help="name.tag of the dense twin's release")
    p.add_argument("--url", action="append", default=[], help="extra source: https://..., hf://owner/repo/file")
    p.add_argument("--limitation", action="append", default=[])
    p.add_argument("--cite", action="append", default=[], help="extra citation (family/router ones are added)")
    p.add_argument("--tolerance", action="append", default=[], help=f"METRIC=ABS (default {DEFAULT_TOLERANCE})")
    p.add_argument(
        "--storage-dtype",
        default="float32",
        choices=STORAGE_DTYPES,
        help="store floating weights in this dtype (half the size; the card is evaluated with the rounded weights)",
    )
    p.add_argument("--notes", default=None, help="a markdown file shown in the card (further evaluation, data)")
    p.add_argument("--weights-dir", default=None, help="default: the package's moezoo/weights")
    p.add_argument("--cards-dir", default=str(CARDS_DIR))
    p.set_defaults(func=cmd_release)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        return int(args.func(args) or 0)
    except (hub.HubError, ValueError) as err:
        print(f"moezoo zoo {args.command}: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
