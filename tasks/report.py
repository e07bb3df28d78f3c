"""Print the test metrics of finished runs side by side: ``python -m moezoo.tasks.report RUN_DIR ...``.

Each ``fit`` writes ``test_metrics.json`` into its log folder (see :mod:`moezoo.tasks.cli`); this reads the
newest one under each run directory.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

COLUMNS = ("test/acc", "test/loss", "test/expert_load_cv", "test/dropped_frac", "test/router_entropy")


def newest_metrics(run_dir: Path) -> dict[str, float] | None:
    files = sorted(run_dir.rglob("test_metrics.json"), key=lambda p: p.stat().st_mtime)
    return json.loads(files[-1].read_text()) if files else None


def main(argv: list[str] | None = None) -> int:
    runs = [Path(a) for a in (sys.argv[1:] if argv is None else argv)]
    if not runs:
        print("usage: python -m moezoo.tasks.report RUN_DIR [RUN_DIR ...]", file=sys.stderr)
        return 2
    print("| run | " + " | ".join(COLUMNS) + " | params |")
    print("|---" * (len(COLUMNS) + 2) + "|")
    for run in runs:
        metrics = newest_metrics(run)
        if metrics is None:
            print(f"| {run} | no test_metrics.json found |")
            continue
        cells = [f"{metrics[c]:.4f}" if c in metrics else "-" for c in COLUMNS]
        params = metrics.get("params/total")
        print(f"| {run.name} | " + " | ".join(cells) + f" | {int(params) if params else '-'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
