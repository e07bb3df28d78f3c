"""Saving and loading a model in the Hugging Face Hub layout: a folder with ``config.json`` (the architecture and its
record), ``model.safetensors`` (the weights) and ``README.md`` (its model card), so a fine-tuned model can be
published with ``huggingface-cli upload`` and loaded back by path::

    save_pretrained(model, "my-digits")                 # a model from create_model(...), fine-tuned or not
    model = create_model("my-digits", pretrained=True)   # the same architecture and weights
    transform = moezoo.data.transform_for(model)          # its input contract travels with it

A folder downloaded from the Hub (``huggingface_hub.snapshot_download``) loads the same way; moezoo itself never
needs the network for it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from torch import nn

from moezoo.io import write_json_atomic, write_text_atomic
from moezoo.models.hub import save_state_dict, sha256_file
from moezoo.models.pretrained_cfg import PretrainedCfg

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "README.md"
LIBRARY_NAME = "moezoo"
# What a saved model inherits from the release it was built from; evaluation results, routing statistics and the
# training provenance describe the release's weights, not the saved ones, so they are not inherited.
INHERITED_FIELDS = ("input", "license", "domain", "citations", "limitations", "dense_twin")


HUB_PREFIX = "hf-hub:"


def hub_snapshot(name: str) -> str:
    """``hf-hub:<owner>/<repo>[@<revision>]`` -> the local folder of its snapshot (``huggingface_hub``'s cache; offline
    with ``MOEZOO_OFFLINE``/``HF_HUB_OFFLINE``); any other name is returned unchanged. The network stays optional:
    nothing else in moezoo's Hub layout needs it."""
    if not name.startswith(HUB_PREFIX):
        return name
    from moezoo.models.hub import DownloadError, is_offline

    repo, _, revision = name[len(HUB_PREFIX) :].partition("@")
    if repo.count("/") != 1:
        raise ValueError(f"name {name!r} must look like hf-hub:<owner>/<repo>[@<revision>]")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as err:
        raise DownloadError(f"{name}: huggingface_hub is not installed (pip install huggingface_hub)") from err
    try:
        return str(
            snapshot_download(
                repo, revision=revision or None, allow_patterns=[CONFIG_FILE, WEIGHTS_FILE, CARD_FILE],
                local_files_only=is_offline(),
            )
        )  # fmt: skip
    except Exception as err:  # noqa: BLE001 - huggingface_hub raises many types
        raise DownloadError(f"{name}: {type(err).__name__}: {err}") from err


def is_release_folder(path: str | Path) -> bool:
    folder = Path(path)
    return folder.is_dir() and (folder / CONFIG_FILE).is_file()


def weights_path(folder: str | Path) -> Path:
    path = Path(folder) / WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no {WEIGHTS_FILE} (a Hub-layout folder holds config.json + {WEIGHTS_FILE})")
    return path


def read_folder(folder: str | Path) -> tuple[str, PretrainedCfg]:
    """The registered architecture name and the record of a saved folder; ``ValueError`` naming what is wrong."""
    path = Path(folder) / CONFIG_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a readable JSON config: {err}") from err
    if not isinstance(data, dict) or data.get("library_name") != LIBRARY_NAME or "architecture" not in data:
        raise ValueError(
            f"{path}: not a moezoo config (needs library_name: {LIBRARY_NAME!r} and architecture); "
            "write such folders with moezoo.models.save_pretrained"
        )
    known = {f.name for f in fields(PretrainedCfg)}
    unknown = set(data.get("cfg", {})) - known
    if unknown:
        raise ValueError(f"{path}: unknown PretrainedCfg fields {sorted(unknown)}; known: {sorted(known)}")
    return str(data["architecture"]), PretrainedCfg(**data.get("cfg", {"file": WEIGHTS_FILE, "sha256": ""}))


def save_pretrained(model: nn.Module, folder: str | Path, card: bool = True, **cfg_fields: Any) -> Path:
    """Write ``model`` into ``folder`` in the Hub layout; returns the folder.

    ``model`` must come from :func:`moezoo.create_model` (which records its architecture and arguments). The record
    inherits the input contract, license, domain, citations and limitations of the release the model was built from
    (:data:`INHERITED_FIELDS`); ``cfg_fields`` set any :class:`PretrainedCfg` field (``description``, ``dataset``,
    ``metrics`` ...). ``card=False`` skips the README.
    """
    architecture = getattr(model, "moezoo_architecture", None)
    model_kwargs = getattr(model, "moezoo_kwargs", None)
    if architecture is None or model_kwargs is None:
        raise ValueError(
            f"model: this {type(model).__name__} was not built by moezoo.create_model, so its architecture is unknown"
        )
    known = {f.name for f in fields(PretrainedCfg)}
    bad = sorted(set(cfg_fields) - known)
    if bad:
        raise TypeError(f"save_pretrained got unknown record fields {bad}; PretrainedCfg fields are {sorted(known)}")
    parent: PretrainedCfg | None = getattr(model, "pretrained_cfg", None)
    inherited = {k: getattr(parent, k) for k in INHERITED_FIELDS} if parent is not None else {}
    source = getattr(model, "pretrained_name", None)
    description = f"`{architecture}` built from `{source}`." if source else f"`{architecture}`."
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    weights = out / WEIGHTS_FILE
    save_state_dict(model.state_dict(), weights, metadata={"format": "pt"})
    cfg = PretrainedCfg(
        file=WEIGHTS_FILE, sha256=sha256_file(weights), num_bytes=weights.stat().st_size,
        model_kwargs=_jsonable(model_kwargs), **{"description": description, **inherited, **cfg_fields},
    )  # fmt: skip
    config = {"library_name": LIBRARY_NAME, "architecture": architecture, "cfg": asdict(cfg)}
    write_json_atomic(out / CONFIG_FILE, config)
    if card:
        from moezoo.zoo.cards import render_card

        write_text_atomic(out / CARD_FILE, render_card(out.name, cfg, folder=str(out), architecture=architecture))
    return out


def _jsonable(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Constructor arguments as JSON (a MoESpec as its fields); ``TypeError`` naming an argument that is not."""
    out: dict[str, Any] = {}
    for key, value in kwargs.items():
        if hasattr(value, "__dataclass_fields__"):
            value = asdict(value)
        try:
            json.dumps(value)
        except TypeError as err:
            raise TypeError(f"save_pretrained: model argument {key}={value!r} cannot be written to JSON") from err
        out[key] = value
    return out
