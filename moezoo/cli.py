"""The ``moezoo`` console script.

- ``moezoo fit|validate|test|predict --config FILE``: training and evaluation (LightningCLI, in moezoo.tasks);
- ``moezoo bench <what>``: benchmarks (``layer`` ...).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")


def _bench_commands() -> dict[str, Callable[[list[str]], int]]:
    from moezoo.bench import layer

    commands: dict[str, Callable[[list[str]], int]] = {"layer": layer.main}
    return commands


def bench_main(argv: list[str]) -> int:
    commands = _bench_commands()
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print(f"usage: moezoo bench {{{','.join(commands)}}} [options]", file=sys.stderr)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"moezoo bench: unknown benchmark {argv[0]!r}; choose one of {sorted(commands)}", file=sys.stderr)
            return 2
        return 0
    return commands[argv[0]](argv[1:])


def main(argv: list[str] | None = None) -> int:
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        return bench_main(argv[1:])
    if not argv or argv[0] in LIGHTNING_COMMANDS or argv[0].startswith("-"):
        from moezoo.tasks.cli import cli_main

        cli_main(None if from_command_line else argv)
        return 0
    print(
        f"moezoo: unknown command {argv[0]!r}; choose one of {list(LIGHTNING_COMMANDS) + ['bench']}", file=sys.stderr
    )
    return 2


if __name__ == "__main__":
    sys.exit(main())
