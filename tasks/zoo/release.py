"""``moezoo zoo release``: turn a trained Lightning checkpoint into a release.

A release is safetensors weights and a JSON record in ``moezoo/weights/`` (registered by
:mod:`moezoo.models.pretrained`), evaluated by the same code as ``moezoo zoo eval``, and its model card.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import OmegaConf

from moezoo.layers import MoE
from moezoo.models import hub, parameter_counts
from moezoo.models.pretrained import write_record
from moezoo.models.pretrained_cfg import DEFAULT_TOLERANCE, STORAGE_DTYPES, PretrainedCfg
from moezoo.models.registry import split_name
from moezoo.tasks.specs import complete_task_spec, instantiate_task, with_data_settings
from moezoo.tasks.zoo.citations import citations_for
from moezoo.tasks.zoo.contracts import input_contract
from moezoo.tasks.zoo.evaluation import load_release_weights, run_evaluation
from moezoo.tasks.zoo.specs import complete_spec, instantiate
from moezoo.zoo.cards import CARDS_DIR, write_card
from moezoo.zoo.summary import router_summary

MAX_FILE_BYTES = 10 * 1024 * 1024
MAX_TOTAL_BYTES = 60 * 1024 * 1024


@dataclass
class ReleaseRequest:
    """What ``moezoo zoo release`` is asked to release (its command-line options, typed)."""

    config: Path  # the training YAML
    ckpt: Path  # the Lightning checkpoint
    name: str  # "<model>.<tag>"
    domain: str
    dataset: str  # what the data is, its source and license
    license: str = "Apache-2.0"
    description: str = ""
    dense_twin: str = ""  # "name.tag" of the dense twin's release
    urls: list[str] = field(default_factory=list)  # extra sources after the shipped copy
    limitations: list[str] = field(default_factory=list)
    citations: list[str] = field(default_factory=list)  # extra ones; the family's and router's are added
    tolerance: dict[str, float] = field(default_factory=dict)  # absolute, per metric
    storage_dtype: str = "float32"
    notes: list[str] = field(default_factory=list)  # markdown lines for the card
    weights_dir: Path | None = None  # default: the package's moezoo/weights
    cards_dir: Path = CARDS_DIR


def _load_lightning_state(ckpt: Path, prefix: str = "model.") -> dict[str, torch.Tensor]:
    """The weights under ``prefix`` (the task's ``release_prefix``) in a Lightning checkpoint, prefix removed."""
    try:
        checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises several types for a bad file
        raise ValueError(f"--ckpt {ckpt}: cannot read it as a checkpoint: {err}") from err
    state = checkpoint.get("state_dict", checkpoint)
    model_state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if not model_state:
        raise ValueError(f"--ckpt {ckpt}: no '{prefix}*' weights in its state_dict (keys: {list(state)[:5]} ...)")
    return model_state


def _config_path(config: Path) -> str:
    """The training config as the record names it: relative to the working directory when it is below it."""
    relative = Path(os.path.relpath(config.resolve(), Path.cwd().resolve())).as_posix()
    return config.as_posix() if relative.startswith("..") else relative


def release(request: ReleaseRequest) -> tuple[PretrainedCfg, Path, Path]:
    """Write the weights, the record and the card of ``request``; returns the config and the paths of the weights
    and the card. The card's metrics come from :func:`run_evaluation` on the weights as stored."""
    if "." not in request.name:
        raise ValueError(f"--name must be '<model>.<tag>', got {request.name!r}")
    if request.storage_dtype not in STORAGE_DTYPES:
        raise ValueError(f"--storage-dtype must be one of {STORAGE_DTYPES}, got {request.storage_dtype!r}")
    config = OmegaConf.to_container(OmegaConf.load(request.config), resolve=True)
    assert isinstance(config, dict)
    data_spec = complete_spec(config["data"])
    datamodule = instantiate(data_spec)
    # The settings the config leaves to the data (image size, classes, vocabulary ...) are recorded in the task's
    # spec as `moezoo fit` links them, so the record rebuilds the trained architecture without the data module.
    task_spec = with_data_settings(complete_task_spec(config["model"]), datamodule)
    model_name = task_spec["init_args"]["model"]
    base, _ = split_name(request.name)
    if base != split_name(model_name)[0]:
        raise ValueError(f"--name {request.name!r} must start with the config's model name {model_name!r}")
    # The task builds the model: some tasks complete its kwargs (e.g. the speech task adds the vocabulary size).
    task = instantiate_task(task_spec)
    model_kwargs = dict(getattr(task, "model_kwargs", None) or task_spec["init_args"].get("model_kwargs") or {})
    model = task.model
    load_release_weights(task, _load_lightning_state(request.ckpt, getattr(task, "release_prefix", "model.")))
    state = model.state_dict()
    if request.storage_dtype != "float32":
        # Floating tensors are stored rounded; the model takes the rounded values too, so that the card's metrics
        # are those of the shipped file.
        dtype = getattr(torch, request.storage_dtype)
        state = {k: v.to(dtype) if v.dtype == torch.float32 else v for k, v in state.items()}
        load_release_weights(task, {k: v.to(torch.float32) if v.dtype == dtype else v for k, v in state.items()})

    weights_dir = request.weights_dir or hub.package_weights_dir()
    file = f"{request.name}.safetensors"
    config_path = _config_path(request.config)
    metadata = {"name": request.name, "config": config_path, "format": "pt", "storage_dtype": request.storage_dtype}
    weights = weights_dir / file
    hub.save_state_dict(state, weights, metadata)
    size = weights.stat().st_size
    others = sum(p.stat().st_size for p in weights_dir.glob("*.safetensors") if p.name != file)
    if size > MAX_FILE_BYTES or size + others > MAX_TOTAL_BYTES:
        weights.unlink()
        raise ValueError(
            f"{file} is {size:,} bytes (limit {MAX_FILE_BYTES:,}); with the other releases {size + others:,} "
            f"(limit {MAX_TOTAL_BYTES:,}): too large to ship in the repository"
        )
    has_moe_layers = any(isinstance(m, MoE) for m in model.modules())  # the core layers (not YOLO-MoE's blending)
    cfg = PretrainedCfg(
        file=file,
        sha256=hub.sha256_file(weights),
        urls=[hub.package_url(file), *request.urls],
        num_bytes=size,
        license=request.license,
        dataset=request.dataset,
        config=config_path,
        checkpoint=request.ckpt.name,
        storage_dtype=request.storage_dtype,
        model_kwargs=model_kwargs,
        domain=request.domain,
        description=request.description,
        task=task_spec,
        data=data_spec,
        params=parameter_counts(model),
        dense_twin=request.dense_twin,
        limitations=list(request.limitations),
        citations=citations_for(base, _router_name(model), has_moe_layers, request.citations),
        input=input_contract(datamodule),
        notes=list(request.notes),
    )
    routers = router_summary(model)
    metrics, routing = run_evaluation(cfg, model=model)
    cfg.metrics = metrics
    cfg.tolerance = {k: float(request.tolerance.get(k, DEFAULT_TOLERANCE)) for k in metrics}
    cfg.routing = {"router": routers, **routing}
    write_record(request.name, cfg, weights_dir)
    card = write_card(request.name, cfg, request.cards_dir)
    return cfg, weights, card


def _router_name(model: torch.nn.Module) -> str:
    """The router named by the model's MoE spec (``"topk"`` for models built without one)."""
    spec = getattr(model, "spec", None)
    return str(getattr(spec, "router", "topk"))
