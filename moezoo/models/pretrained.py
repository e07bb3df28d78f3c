"""Registers every released checkpoint: one JSON record per ``name.tag`` in ``moezoo/weights/`` (written by
``moezoo zoo release``), next to its safetensors file. Imported automatically with :mod:`moezoo.models`.
"""

from __future__ import annotations

import json
from dataclasses import fields
from importlib import resources
from pathlib import Path

from moezoo.models.registry import PretrainedCfg, register_pretrained, split_name


def registered_records() -> list[Path]:
    folder = Path(str(resources.files("moezoo") / "weights"))
    return sorted(folder.glob("*.json")) if folder.is_dir() else []


def register_record(path: Path) -> str:
    """Register the release described by one JSON record; returns its ``name.tag``."""
    data = json.loads(path.read_text())
    name = data["name"]
    model, tag = split_name(name)
    if tag is None or path.name != f"{name}.json":
        raise ValueError(f"{path}: record name {name!r} must be '<model>.<tag>' and match the file name")
    known = {f.name for f in fields(PretrainedCfg)}
    unknown = set(data["cfg"]) - known
    if unknown:
        raise ValueError(f"{path}: unknown PretrainedCfg fields {sorted(unknown)}; known: {sorted(known)}")
    register_pretrained(model, tag, PretrainedCfg(**data["cfg"]))
    return name


for _record in registered_records():
    register_record(_record)
