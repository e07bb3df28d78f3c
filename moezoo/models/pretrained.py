"""Release records: one JSON file per ``name.tag`` in ``moezoo/weights/`` beside its safetensors file, written by
``moezoo zoo release`` (:func:`write_record`) and registered here on import (imported by :mod:`moezoo.models`).

Every ``*.json`` in the package's weights folder is a record (data discovery, not code discovery): a record whose
name does not match its file, or that carries fields :class:`PretrainedCfg` does not know, is an error at import.
"""

from __future__ import annotations

import json
from dataclasses import asdict, fields
from pathlib import Path

from moezoo.io import write_json_atomic
from moezoo.models.hub import package_weights_dir
from moezoo.models.pretrained_cfg import PretrainedCfg
from moezoo.models.registry import register_pretrained, split_name


def record_path(name: str, weights_dir: Path | None = None) -> Path:
    """Where the record of release ``name`` lives (default: the package's weights folder)."""
    return (weights_dir or package_weights_dir()) / f"{name}.json"


def registered_records(weights_dir: Path | None = None) -> list[Path]:
    """The record files of a weights folder (default: the package's), sorted."""
    folder = weights_dir or package_weights_dir()
    return sorted(folder.glob("*.json")) if folder.is_dir() else []


def write_record(name: str, cfg: PretrainedCfg, weights_dir: Path | None = None) -> Path:
    """Write the record of release ``name`` (atomically); returns its path."""
    return write_json_atomic(record_path(name, weights_dir), {"name": name, "cfg": asdict(cfg)})


def read_record(path: Path) -> tuple[str, PretrainedCfg]:
    """The ``name.tag`` and config of one record file."""
    data = json.loads(path.read_text())
    name = data["name"]
    _, tag = split_name(name)
    if tag is None or path.name != f"{name}.json":
        raise ValueError(f"{path}: record name {name!r} must be '<model>.<tag>' and match the file name")
    known = {f.name for f in fields(PretrainedCfg)}
    unknown = set(data["cfg"]) - known
    if unknown:
        raise ValueError(f"{path}: unknown PretrainedCfg fields {sorted(unknown)}; known: {sorted(known)}")
    return name, PretrainedCfg(**data["cfg"])


def register_record(path: Path) -> str:
    """Register the release described by one record file; returns its ``name.tag``."""
    name, cfg = read_record(path)
    model, tag = split_name(name)
    assert tag is not None  # read_record checked it
    register_pretrained(model, tag, cfg)
    return name


for _record in registered_records():
    register_record(_record)
