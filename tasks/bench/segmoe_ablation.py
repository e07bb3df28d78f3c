"""``moezoo bench segmoe-ablation``: the Seg-MoE ablation's table (issue 20) from ``moezoo bench timeseries`` runs.

``moezoo bench segmoe-ablation RUNS.json [RUNS.json ...] [--horizons 96,192] [--out FILE.md] [--readme README.md]``

The runs are ``--json`` files of ``moezoo bench timeseries --variants ablation``, pooled as the router study pools
them (:func:`moezoo.tasks.bench.router_study.load`: a run twice, or a variant run with two budgets, is refused);
nothing is trained here, and the runs of variants outside the ablation are ignored. One table per horizon (all the
runs have, or ``--horizons``), one row per variant of :data:`moezoo.tasks.bench.timeseries.ABLATION` with runs at
that horizon, in that order: the reference ``segmoe``, segment size 1 (the ``moe`` row), the other segment sizes,
the expert counts, the shared expert.

- **changes from segmoe**: the variant's one change (its ``description``).
- **mse**, **Δ vs segmoe**, **vs segmoe seed spread**, **train ×segmoe**: the router study's numbers
  (:func:`moezoo.tasks.bench.router_study.study_rows` with ``segmoe`` as the reference): test MSE mean ± sample std
  over seeds; Δ = mean - segmoe's mean; ``outside (better|worse)`` when both have >= 2 seeds and |Δ| is above the
  larger of the two stds, ``within`` when not, ``-`` without a spread; the mean training throughput over segmoe's.
- **active / total params**: as the runs recorded them (:func:`moezoo.stats.count_parameters`; active counts a
  segment expert's w-times-wider weights, although its FLOPs per token are a token expert's).
- **load CV**: the mean over runs of the test split's expert-load coefficient of variation.

Under each table: the change that moves the test MSE the most beyond the seed spread, or that none does.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from moezoo.tasks.bench.render import publish, table_parser
from moezoo.tasks.bench.router_study import StudyRow, load, study_rows
from moezoo.tasks.bench.timeseries import ABLATION, SPEC

NAME = "segmoe-ablation"
REFERENCE = "segmoe"


def ablation_rows(runs: Sequence[dict[str, Any]], horizon: str) -> list[StudyRow]:
    """The ablation's rows at one horizon, in :data:`ABLATION`'s order; ``ValueError`` when ``segmoe`` has no run
    there."""
    at = [r for r in runs if r["cell"] == horizon and r["variant"] in ABLATION]
    if not any(r["variant"] == REFERENCE for r in at):
        raise ValueError(f"no runs of {REFERENCE} (the reference) at horizon {horizon}; pass --horizons without it")
    rows = {row.variant: row for row in study_rows(SPEC, at, REFERENCE)}
    return [rows[name] for name in ABLATION if name in rows]


def _params(runs: Sequence[dict[str, Any]], variant: str, horizon: str) -> str:
    own = [r for r in runs if r["variant"] == variant and r["cell"] == horizon and r.get("params")]
    if not own:
        return "-"
    params = min(own, key=lambda r: r["seed"])["params"]
    return f"{params['active'] / 1e6:.3f}M / {params['total'] / 1e6:.3f}M"


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def largest_move(rows: Sequence[StudyRow]) -> str:
    """The sentence under a table: the change with the largest |Δ| outside the seed spread, or that there is none."""
    outside = [r for r in rows if r.verdict.startswith("outside") and r.delta is not None]
    judged = [r for r in rows if r.verdict in ("within", "outside (better)", "outside (worse)")]
    if not judged:
        return "No verdict: it needs >= 2 seeds of segmoe and of a variant."
    if not outside:
        return f"No change moves the test MSE beyond the seed spread ({len(judged)} judged)."
    top = max(outside, key=lambda r: abs(r.delta or 0.0))
    where = top.verdict.removeprefix("outside (").removesuffix(")")
    what = SPEC.variant(top.variant).description
    return (
        f"Largest move beyond the seed spread: {top.variant} ({what}), Δ {top.delta:+.4f} ({where}); "
        f"{len(outside)} of {len(judged)} judged changes are outside it."
    )


def markdown(runs: Sequence[dict[str, Any]], horizon: str) -> str:
    """One horizon's table and its closing sentence."""
    rows = ablation_rows(runs, horizon)
    head = ["variant", f"changes from {REFERENCE}", "seeds", "mse ↓ (mean ± std)", f"Δ vs {REFERENCE}",
            f"vs {REFERENCE} seed spread", "active / total params", f"train ×{REFERENCE}", "load CV"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        metric = _num(row.mean, ".4f") + (f" ± {row.std:.4f}" if row.std is not None else "")
        cells = [row.variant, SPEC.variant(row.variant).description or "-", ",".join(map(str, row.seeds)) or "-",
                 metric, _num(row.delta, "+.4f"), row.verdict, _params(runs, row.variant, horizon),
                 _num(row.train_ratio, ".2f"), _num(row.load_cv, ".3f")]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join([*lines, "", largest_move(rows)])


def report(paths: Sequence[str], horizons: Sequence[str] = ()) -> str:
    """The ablation's Markdown: one section per horizon of the files' time-series runs (or of ``horizons``)."""
    runs = [r for r in load(paths).get(SPEC.domain, []) if r["variant"] in ABLATION]
    present = sorted({r["cell"] for r in runs}, key=lambda c: (len(c), c))
    missing = [h for h in horizons if h not in present]
    if not runs or missing:
        what = f"horizon(s) {missing}" if runs else "variant"
        raise ValueError(f"{', '.join(paths)}: no runs of the ablation at {what} (variants {list(ABLATION)})")
    sections = []
    for horizon in horizons or present:
        at = [r for r in runs if r["cell"] == horizon]
        seeds = sorted({r["seed"] for r in at})
        sections.append(
            f"**H={horizon}** ({len(at)} runs through `moezoo fit`, seeds {', '.join(map(str, seeds))}; test MSE on "
            f"ETTh1's normalised scale, reference {REFERENCE}):\n\n" + markdown(at, horizon)
        )
    return "\n\n".join(sections)


def main(argv: Sequence[str] | None = None) -> int:
    p = table_parser(NAME, __doc__ or "", "--json files of moezoo bench timeseries --variants ablation")
    p.add_argument("--horizons", default=None, help="comma separated (default: every horizon of the runs)")
    args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    horizons = [h for h in (args.horizons or "").split(",") if h]
    return publish(NAME, lambda: report(args.runs, horizons), args.out, args.readme)


if __name__ == "__main__":
    sys.exit(main())
