"""What a release records about its routers: each distinct router's class and scalar settings.

(Its parameter counts are :func:`moezoo.models.parameter_counts`, as the benchmarks and the training log count.)
"""

from __future__ import annotations

import json
from typing import Any

from torch import nn

from moezoo.layers import MoE


def _scalar_settings(module: nn.Module) -> dict[str, Any]:
    """A router's public scalar attributes (its settings), sorted by name."""
    return {
        k: v
        for k, v in sorted(vars(module).items())
        if not k.startswith("_") and k != "training" and isinstance(v, (bool, int, float, str, type(None)))
    }


def router_summary(model: nn.Module) -> dict[str, Any]:
    """Router class and its scalar settings for each distinct router (shared routers counted once)."""
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    seen: set[int] = set()
    groups: dict[str, dict[str, Any]] = {}
    for moe in moes:
        router = moe.router
        if id(router) in seen:
            continue
        seen.add(id(router))
        entry = {"class": type(router).__name__, "top_k": moe.top_k, "settings": _scalar_settings(router)}
        key = json.dumps(entry, sort_keys=True)
        groups.setdefault(key, {**entry, "count": 0})["count"] += 1
    # Whole-model mixtures (YOLO-MoE) blend complete experts' outputs with one router per output scale.
    blends = [m for m in model.modules() if getattr(m, "blends_expert_outputs", False)]
    for blend in blends:
        top_k = blend.top_k or blend.num_experts
        entry = {"class": type(blend).__name__, "top_k": top_k, "settings": _scalar_settings(blend), "count": 1}
        groups[f"blend-{id(blend)}"] = entry
    num_layers = len(moes) + sum(getattr(r, "num_scales", 1) for r in blends)
    return {"num_moe_layers": num_layers, "routers": list(groups.values())}
