"""Building a task or data module from a ``{"class_path": ..., "init_args": {...}}`` spec, as LightningCLI would.

A release records the complete specs of its task and data, so ``moezoo zoo eval`` rebuilds exactly what was
evaluated. Task specs go through :mod:`moezoo.tasks.specs` (built as ``moezoo fit`` builds them, old records
upgraded); these helpers serve the data module's spec.
"""

from __future__ import annotations

import importlib
import inspect
import json
from collections.abc import Mapping
from typing import Any


def import_object(class_path: str) -> Any:
    module, _, attr = class_path.rpartition(".")
    if not module:
        raise ValueError(f"class_path must be a dotted path like 'package.module.Class', got {class_path!r}")
    return getattr(importlib.import_module(module), attr)


def instantiate(spec: Mapping[str, Any]) -> Any:
    """Build ``{"class_path": ..., "init_args": {...}}`` (nested specs included), as LightningCLI would."""
    if "class_path" not in spec:
        raise ValueError(f"expected a mapping with 'class_path', got keys {sorted(spec)}")
    args = {
        k: instantiate(v) if isinstance(v, Mapping) and "class_path" in v else v
        for k, v in dict(spec.get("init_args") or {}).items()
    }
    return import_object(spec["class_path"])(**args)


def complete_spec(spec: Mapping[str, Any]) -> dict[str, Any]:
    """``spec`` with every constructor default written out, so later changes of a default cannot alter an eval."""
    cls = import_object(spec["class_path"])
    args = dict(spec.get("init_args") or {})
    for name, param in inspect.signature(cls).parameters.items():
        if name in args or param.default is inspect.Parameter.empty:
            continue
        if param.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            continue
        try:
            json.dumps(param.default)
        except TypeError:
            continue
        args[name] = param.default
    return {"class_path": spec["class_path"], "init_args": json.loads(json.dumps(args))}
