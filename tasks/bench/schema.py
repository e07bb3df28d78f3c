"""The tables format: what ``moezoo bench <domain> --json PATH`` writes and ``moezoo bench tables`` reads.

A domain benchmark's ``--json`` file is an object with at least these keys (others, such as the benchmark's raw
``runs``, are kept and ignored by the tables)::

    {"domain": "vision", "settings": "quick", "dataset": "...", "metric": "acc", "higher_is_better": true,
     "throughput_unit": "images/CPU-s",
     "rows": [{"model": "moe_vit_tiny", "router": "topk", "metric": 0.97,
               "active_params": 1, "total_params": 2, "train_throughput": 3.0, "infer_throughput": 4.0,
               "expert_load_cv": 0.1, "dropped_frac": 0.0,
               "expert_load": [[share per expert] per MoE layer],
               "specialisation": {"by": "class", "layer": 3, "groups": ["0", ...], "share": [[G x E]]},
               "extra": {...}}, ...]}

``settings`` is ``"quick"``, ``"full"`` or ``"custom"`` (options of its own). A row whose ``router`` is
``"dense"`` is the dense twin of the MoE rows with the same ``model``; their "dense-twin delta" is
``metric - dense metric``. ``expert_load``, ``specialisation``, ``expert_load_cv`` and ``dropped_frac`` are
``null`` for dense rows. A row whose ``router`` is ``"baseline"`` is a reference model outside the MoE family (e.g.
a forecasting baseline such as seasonal naive or DLinear): no routing fields and no dense-twin delta; a baseline
without parameters (a naive forecast) has ``train_throughput`` ``null``. The routing fields are those of
:meth:`moezoo.stats.RoutingStats.summary` on the test split; parameters are :func:`moezoo.stats.count_parameters`;
``train_throughput`` and ``infer_throughput`` are in ``throughput_unit`` (the domain benchmarks: items per CPU
second of the process). A benchmark may record its own wall time as a top-level ``runtime_s``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from moezoo.io import write_text_atomic

#: the router labels of the rows without routing: the dense twin and a baseline
DENSE, BASELINE = "dense", "baseline"
UNROUTED = (DENSE, BASELINE)
HEADER_KEYS = ("domain", "settings", "dataset", "metric", "higher_is_better", "throughput_unit")
REQUIRED_ROW_KEYS = (
    "model", "router", "metric", "active_params", "total_params", "train_throughput", "infer_throughput",
    "expert_load_cv", "dropped_frac",
)  # fmt: skip


@dataclass
class BenchRow:
    """One (model, router) result of a domain benchmark."""

    model: str
    router: str
    metric: float
    active_params: int
    total_params: int
    train_throughput: float | None
    infer_throughput: float | None
    expert_load_cv: float | None = None
    dropped_frac: float | None = None
    expert_load: list[list[float]] | None = None
    specialisation: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def write_domain_json(
    path: str | Path,
    domain: str,
    settings: str,
    dataset: str,
    metric: str,
    higher_is_better: bool,
    throughput_unit: str,
    rows: Sequence[BenchRow],
    extra: dict[str, Any] | None = None,
) -> None:
    """Write a domain benchmark's result in the tables format (atomically).

    ``extra`` adds top-level keys (a benchmark's raw runs, ``runtime_s`` ...); they may not shadow the format's.
    """
    data: dict[str, Any] = {
        "domain": domain, "settings": settings, "dataset": dataset, "metric": metric,
        "higher_is_better": higher_is_better, "throughput_unit": throughput_unit, "rows": [asdict(r) for r in rows],
    }  # fmt: skip
    clash = sorted(set(extra or {}) & set(data))
    if clash:
        raise ValueError(f"extra keys {clash} would overwrite keys of the tables format")
    data.update(extra or {})
    write_text_atomic(Path(path), json.dumps(data, indent=2) + "\n")


def validate(data: Any, domain: str) -> list[str]:
    """Problems with a domain benchmark's JSON (empty when it follows the format)."""
    if not isinstance(data, dict):
        return [f"top level is {type(data).__name__}, expected an object"]
    problems = [f"missing key {k!r}" for k in ("metric", "higher_is_better", "rows") if k not in data]
    for i, row in enumerate(data.get("rows") or []):
        missing = [k for k in REQUIRED_ROW_KEYS if k not in row]
        if missing:
            problems.append(f"row {i} misses {missing}")
        elif not isinstance(row["metric"], (int, float)) or not math.isfinite(row["metric"]):
            problems.append(f"row {i} metric {row['metric']!r} is not a finite number")
    if not data.get("rows"):
        problems.append("no rows")
    return problems
