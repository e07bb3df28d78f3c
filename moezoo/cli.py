"""The ``moezoo`` console script.

- ``moezoo fit|validate|test|predict --config FILE``: training and evaluation (LightningCLI, in moezoo.tasks);
- ``moezoo bench <name> [options]``: a micro benchmark of ``moezoo/bench/<name>.py`` (layer, kernels, parallel) or a
  domain benchmark (and ``tables``) of ``moezoo.tasks.bench`` (``tasks/bench/<name>.py``): its ``main(argv)``;
- ``moezoo zoo <command> [options]``: the pretrained model zoo (``moezoo.zoo.main``).
"""

from __future__ import annotations

import importlib
import pkgutil
import sys

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")
OTHER_COMMANDS = ("bench", "zoo")


def bench_modules() -> dict[str, str]:
    """``{name: module}`` of every ``moezoo bench`` command."""
    import moezoo.bench
    from moezoo.tasks.bench import command_names

    micro = [info.name for info in pkgutil.iter_modules(moezoo.bench.__path__) if not info.name.startswith("_")]
    names = {name: f"moezoo.bench.{name}" for name in micro}
    names.update({name: f"moezoo.tasks.bench.{name}" for name in command_names()})
    return dict(sorted(names.items()))


def bench_names() -> list[str]:
    return list(bench_modules())


def bench_main(argv: list[str]) -> int:
    modules = bench_modules()
    names = list(modules)
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: moezoo bench {{{','.join(names)}}} [options]")
        return 0
    if argv[0] not in names:
        print(f"moezoo bench: unknown benchmark {argv[0]!r}; choose one of {names}", file=sys.stderr)
        return 2
    module = importlib.import_module(modules[argv[0]])
    return int(module.main(argv[1:]) or 0)


def main(argv: list[str] | None = None) -> int:
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        return bench_main(argv[1:])
    if argv and argv[0] == "zoo":
        from moezoo.zoo import main as zoo_main

        return int(zoo_main(argv[1:]) or 0)
    if not argv or argv[0] in LIGHTNING_COMMANDS or argv[0].startswith("-"):
        from moezoo.tasks.cli import cli_main

        cli_main(None if from_command_line else argv)
        return 0
    print(
        f"moezoo: unknown command {argv[0]!r}; choose one of {list(LIGHTNING_COMMANDS + OTHER_COMMANDS)}",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    sys.exit(main())
