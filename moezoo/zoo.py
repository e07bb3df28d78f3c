"""``moezoo zoo``: the pretrained model zoo.

- ``moezoo zoo list [PATTERN]``: released ``name.tag`` checkpoints, their headline metric and where they are;
- ``moezoo zoo info NAME``: everything registered about one release;
- ``moezoo zoo download NAME|--all``: fetch and verify (see :mod:`moezoo.models.hub`), print the local path;
- ``moezoo zoo eval NAME|--all``: rerun the release's evaluation (its task on its data's test split) and compare
  with the registered metrics within the registered tolerance (exit status 1 on a mismatch);
- ``moezoo zoo release --config YAML --ckpt CKPT --name NAME.TAG ...``: turn a trained Lightning checkpoint into a
  release: safetensors weights and a JSON record in ``moezoo/weights/`` (registered by
  :mod:`moezoo.models.pretrained`), evaluated by the same code as ``eval``, and its model card;
- ``moezoo zoo card NAME|--all [--check]``: (re)write model cards from the registry, or check they agree.

Lightning and the domain tasks are imported only by ``eval`` and ``release``.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import logging
import math
import os
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moezoo.layers import MoE
from moezoo.models import PretrainedCfg, get_pretrained_cfg, hub, list_models
from moezoo.models.registry import split_name

DEFAULT_TOLERANCE = 1e-4
MAX_FILE_BYTES = 10 * 1024 * 1024
MAX_TOTAL_BYTES = 60 * 1024 * 1024
CARDS_DIR = Path("model_cards")

# Papers the methods come from, added to a release's citations by its family and router.
FAMILY_CITATIONS = {
    "moe_vit": [
        "Riquelme et al., Scaling Vision with Sparse Mixture of Experts (V-MoE), NeurIPS 2021, arXiv:2106.05974",
        "Dosovitskiy et al., An Image is Worth 16x16 Words: Transformers for Image Recognition at Scale, ICLR 2021, "
        "arXiv:2010.11929",
    ],
    "moe_conformer": [
        "Gulati et al., Conformer: Convolution-augmented Transformer for Speech Recognition, Interspeech 2020, "
        "arXiv:2005.08100",
        "Graves et al., Connectionist Temporal Classification: Labelling Unsegmented Sequence Data with Recurrent "
        "Neural Networks, ICML 2006",
    ],
    "moe_patchtst": [
        "Nie et al., A Time Series is Worth 64 Words: Long-term Forecasting with Transformers (PatchTST), ICLR 2023, "
        "arXiv:2211.14730",
        "Kim et al., Reversible Instance Normalization for Accurate Time-Series Forecasting against Distribution "
        "Shift (RevIN), ICLR 2022",
    ],
    "moe_dit": ["Peebles and Xie, Scalable Diffusion Models with Transformers (DiT), ICCV 2023, arXiv:2212.09748"],
    "moe_yolo": [
        "Redmon et al., You Only Look Once: Unified, Real-Time Object Detection, CVPR 2016",
        "Li et al., Generalized Focal Loss (distribution focal loss), NeurIPS 2020, arXiv:2006.04388",
        "Feng et al., TOOD: Task-aligned One-stage Object Detection, ICCV 2021, arXiv:2108.07755",
        "Meiraz, Shalev and Weizman, YOLO Meets Mixture-of-Experts: Adaptive Expert Routing for Robust Object "
        "Detection, 2025, arXiv:2511.13344",
    ],
}
ROUTER_CITATIONS = {
    "topk": [
        "Shazeer et al., Outrageously Large Neural Networks: The Sparsely-Gated Mixture-of-Experts Layer, ICLR 2017, "
        "arXiv:1701.06538",
        "Lepikhin et al., GShard: Scaling Giant Models with Conditional Computation and Automatic Sharding, ICLR 2021, "
        "arXiv:2006.16668",
        "Fedus et al., Switch Transformers: Scaling to Trillion Parameter Models with Simple and Efficient Sparsity, "
        "JMLR 2022, arXiv:2101.03961",
    ],
    "expert_choice": ["Zhou et al., Mixture-of-Experts with Expert Choice Routing, NeurIPS 2022, arXiv:2202.09368"],
    "sinkhorn": [
        "Lewis et al., BASE Layers: Simplifying Training of Large, Sparse Models, ICML 2021, arXiv:2103.16716",
        "Clark et al., Unified Scaling Laws for Routed Language Models, ICML 2022, arXiv:2202.01169",
    ],
    "relu": [
        "Wang et al., ReMoE: Fully Differentiable Mixture-of-Experts with ReLU Routing, ICLR 2025, arXiv:2412.14711"
    ],
    "sigmoid_lossfree": [
        "Wang et al., Auxiliary-Loss-Free Load Balancing Strategy for Mixture-of-Experts, arXiv:2408.15664 (2024)",
        "DeepSeek-AI, DeepSeek-V3 Technical Report, arXiv:2412.19437 (2024)",
    ],
    "soft": ["Puigcerver et al., From Sparse to Soft Mixtures of Experts, ICLR 2024, arXiv:2308.00951"],
    "omni": ["Gu et al., Omni-Router: sharing one router across the MoE layers of a speech recogniser, 2025"],
    "language": [
        "Wang et al., Language-Routing Mixture of Experts for Multilingual and Code-Switching Speech Recognition "
        "(LR-MoE), Interspeech 2023"
    ],
    "global_embedding": ["You et al., SpeechMoE2: Mixture-of-Experts Model with Improved Routing, ICASSP 2022"],
    "segment": ["Ortigossa and Segal, Seg-MoE: segment-wise routing for time-series forecasting, 2026"],
    "promoe": ["Wei et al., ProMoE: prototypical routing for diffusion transformers, 2025"],
}


# -- records ----------------------------------------------------------------------------------------------------
def record_path(name: str, weights_dir: Path | None = None) -> Path:
    return (weights_dir or hub.package_weights_dir()) / f"{name}.json"


def write_record(name: str, cfg: PretrainedCfg, weights_dir: Path | None = None) -> Path:
    """The JSON record that :mod:`moezoo.models.pretrained` registers (written atomically)."""
    path = record_path(name, weights_dir)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"name": name, "cfg": asdict(cfg)}, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


# -- parameters and router settings ------------------------------------------------------------------------------
def count_params(model: nn.Module) -> dict[str, int]:
    """Total parameters and the parameters a token uses: routed experts count ``top_k / num_experts`` of theirs
    (Soft MoE mixes every expert into every token, so all of them count)."""
    total = sum(p.numel() for p in model.parameters())
    inactive = 0.0
    for moe in (m for m in model.modules() if isinstance(m, MoE)):
        if moe.router.kind == "soft":
            continue
        expert = sum(p.numel() for p in moe.experts.parameters())
        inactive += expert * (1.0 - moe.top_k / moe.num_experts)
    return {"total": int(total), "active": int(round(total - inactive))}


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


# -- building the evaluation -----------------------------------------------------------------------------------
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


def _quiet_lightning() -> None:
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _routing_stats(task: Any) -> dict[str, Any]:
    summary = getattr(task, "routing_summary", None)
    if summary is None or not summary.load:
        return {}
    layers = []
    for i, load in sorted(summary.load.items()):
        share = load / load.sum().clamp_min(1.0)
        stats = summary.stats[i]
        layers.append(
            {
                "layer": i,
                "expert_share": [round(float(s), 6) for s in share],
                "load_cv": round(float(load.std(unbiased=False) / load.mean().clamp_min(1e-12)), 6),
                "dropped_frac": round(sum(d for d, _ in stats) / len(stats), 6),
                "router_entropy": round(sum(h for _, h in stats) / len(stats), 6),
            }
        )
    return {"split": "test", "layers": layers}


def run_evaluation(
    cfg: PretrainedCfg, model: nn.Module | None = None, offline: bool | None = None
) -> tuple[dict[str, float], dict[str, Any]]:
    """Test-split metrics and routing statistics of ``cfg``'s task on ``cfg``'s data with its released weights.

    ``model`` (already holding weights) replaces the download; used by ``release`` before the files exist.
    """
    if not cfg.task or not cfg.data:
        raise ValueError(f"{cfg.file}: this release registers no task/data, so it cannot be evaluated")
    _quiet_lightning()
    import lightning as L

    from moezoo.tasks.specs import instantiate_task  # builds the task as `moezoo fit` does; reads old records too

    L.seed_everything(0, verbose=False)
    task = instantiate_task(cfg.task)
    # The task loads them: it may keep another copy (the DiT task's EMA).
    state = (
        model.state_dict()
        if model is not None
        else hub.load_state_dict(hub.fetch(cfg, offline=offline, progress=False))
    )
    _load_release_weights(task, state)
    data = instantiate(cfg.data)
    # Whatever a task writes beside its metrics (forecast plots, sample grids) goes to a scratch folder, not the cwd.
    with tempfile.TemporaryDirectory(prefix="moezoo-eval-") as scratch:
        trainer = L.Trainer(
            accelerator="cpu",
            devices=1,
            logger=False,
            default_root_dir=scratch,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
        )
        results = trainer.test(task, datamodule=data, verbose=False)
    metrics = {k: round(float(v), 6) for k, v in results[0].items()}
    return metrics, _routing_stats(task)


def compare(expected: Mapping[str, float], got: Mapping[str, float], tolerance: Mapping[str, float]) -> list[str]:
    """Lines ``metric expected got |diff| tol ok/FAIL``; a metric missing from ``got`` fails."""
    lines = []
    for metric, value in sorted(expected.items()):
        tol = tolerance.get(metric, DEFAULT_TOLERANCE)
        new = got.get(metric)
        if new is None:
            lines.append(f"{metric:28s} {value:12.6f} {'missing':>12s} {'':>10s} {tol:8.1e} FAIL")
            continue
        diff = abs(new - value)
        ok = diff <= tol and math.isfinite(new)
        lines.append(f"{metric:28s} {value:12.6f} {new:12.6f} {diff:10.2e} {tol:8.1e} {'ok' if ok else 'FAIL'}")
    return lines


# -- model cards -----------------------------------------------------------------------------------------------
def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return f"`{json.dumps(value, sort_keys=True)}`" if isinstance(value, (dict, list)) else f"`{value}`"


def render_card(name: str, cfg: PretrainedCfg) -> str:
    """The model card of a release, entirely from its registered record (so cards and registry cannot drift)."""
    base, _ = split_name(name)
    lines = [
        f"# {name}",
        "",
        f"<!-- Generated by `moezoo zoo card {name}` from moezoo/weights/{name}.json. Do not edit by hand. -->",
        "",
        cfg.description or f"`{base}` weights.",
        "",
        "| | |",
        "| --- | --- |",
        f'| Load | `moezoo.create_model("{name}", pretrained=True)` |',
        f"| Domain | {cfg.domain or '-'} |",
        f"| Parameters | {cfg.params.get('total', 0):,} total, {cfg.params.get('active', 0):,} active per token |",
        f"| Weights | `{cfg.file}` (safetensors, {cfg.storage_dtype}, {cfg.num_bytes or 0:,} bytes) |",
        f"| sha256 | `{cfg.sha256}` |",
        f"| Sources | {', '.join(f'`{u}`' for u in cfg.urls) or '-'} |",
        f"| License | {cfg.license or '-'} |",
        f"| Dense twin | {f'`{cfg.dense_twin}`' if cfg.dense_twin else '-'} |",
        "",
        "## Model and router",
        "",
        "| model argument | value |",
        "| --- | --- |",
        *(f"| {k} | {_fmt(v)} |" for k, v in sorted(cfg.model_kwargs.items())),
        "",
    ]
    router = cfg.routing.get("router", {})
    if router.get("num_moe_layers"):
        lines.append(f"{router['num_moe_layers']} MoE layer(s).")
        for r in router.get("routers", []):
            settings = ", ".join(f"{k}={v}" for k, v in r["settings"].items())
            lines.append(f"{r['count']} x router `{r['class']}` (top_k={r['top_k']}): {settings}.")
    else:
        lines.append("Dense model: no MoE layers (every feed-forward is a dense FFN).")
    data_args = (cfg.data.get("init_args") or {}).items()
    lines += [
        "",
        "## Data",
        "",
        cfg.dataset or "-",
        "",
        f"Data module `{cfg.data.get('class_path', '-')}`: " + ", ".join(f"{k}={v}" for k, v in sorted(data_args)),
        "",
        "## Training",
        "",
        f"`moezoo fit --config {cfg.config}` (task `{cfg.task.get('class_path', '-')}`); released from the "
        f"checkpoint `{cfg.checkpoint or '-'}` by `moezoo zoo release`.",
        "",
        "## Evaluation",
        "",
        f"Produced by `moezoo zoo eval {name}` (test split; exit status 1 when a metric leaves its tolerance).",
        "",
        "| metric | value | tolerance (abs) |",
        "| --- | --- | --- |",
        *(f"| {k} | {v:.6f} | {cfg.tolerance.get(k, DEFAULT_TOLERANCE):.1e} |" for k, v in sorted(cfg.metrics.items())),
        "",
        "## Routing statistics",
        "",
    ]
    layers = cfg.routing.get("layers", [])
    if layers:
        lines += [
            "Share of routed (token, expert) pairs per expert on the test split, load CV (std/mean), fraction of "
            "tokens routed to no expert, mean router entropy (nats); means over test batches.",
            "",
            "| MoE layer | expert share (%) | load CV | dropped | entropy |",
            "| --- | --- | --- | --- | --- |",
        ]
        for layer in layers:
            shares = " ".join(f"{100 * s:.1f}" for s in layer["expert_share"])
            lines.append(
                f"| {layer['layer']} | {shares} | {layer['load_cv']:.3f} | {layer['dropped_frac']:.3f} "
                f"| {layer['router_entropy']:.3f} |"
            )
    else:
        lines.append("None: this model has no MoE layers.")
    lines += ["", "## Limitations", ""]
    lines += [f"- {text}" for text in cfg.limitations] or ["- none stated"]
    lines += ["", "## Citations", ""]
    lines += [f"- {text}" for text in cfg.citations] or ["- none"]
    return "\n".join(lines) + "\n"


def card_path(name: str, cards_dir: Path = CARDS_DIR) -> Path:
    return cards_dir / f"{name}.md"


# -- release ---------------------------------------------------------------------------------------------------
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


def _load_release_weights(task: Any, state: dict[str, torch.Tensor]) -> None:
    loader = getattr(task, "load_release_weights", None)
    if loader is None:
        task.model.load_state_dict(state, strict=True)
    else:
        loader(state)


def release(args: argparse.Namespace) -> int:
    from omegaconf import OmegaConf

    if "." not in args.name:
        raise ValueError(f"--name must be '<model>.<tag>', got {args.name!r}")
    config = OmegaConf.to_container(OmegaConf.load(args.config), resolve=True)
    assert isinstance(config, dict)
    from moezoo.tasks.specs import complete_task_spec, instantiate_task  # as `moezoo fit` does; old configs too

    task_spec = complete_task_spec(config["model"])
    data_spec = complete_spec(config["data"])
    model_name = task_spec["init_args"]["model"]
    base, tag = split_name(args.name)
    if base != model_name:
        raise ValueError(f"--name {args.name!r} must start with the config's model name {model_name!r}")
    # The task builds the model: some tasks complete its kwargs (e.g. the speech task adds the vocabulary size).
    task = instantiate_task(task_spec)
    model_kwargs = dict(getattr(task, "model_kwargs", None) or task_spec["init_args"].get("model_kwargs") or {})
    model = task.model
    _load_release_weights(task, _load_lightning_state(Path(args.ckpt), getattr(task, "release_prefix", "model.")))
    state = model.state_dict()
    if args.storage_dtype != "float32":
        # Floating tensors are stored rounded; the model takes the rounded values too, so that the card's metrics
        # are those of the shipped file.
        dtype = getattr(torch, args.storage_dtype)
        state = {k: v.to(dtype) if v.dtype == torch.float32 else v for k, v in state.items()}
        _load_release_weights(task, {k: v.to(torch.float32) if v.dtype == dtype else v for k, v in state.items()})

    weights_dir = Path(args.weights_dir) if args.weights_dir else hub.package_weights_dir()
    weights_dir.mkdir(parents=True, exist_ok=True)
    file = f"{args.name}.safetensors"
    config_path = Path(os.path.relpath(Path(args.config).resolve(), Path.cwd().resolve())).as_posix()
    if config_path.startswith(".."):
        config_path = Path(args.config).as_posix()
    metadata = {"name": args.name, "config": config_path, "format": "pt", "storage_dtype": args.storage_dtype}
    hub.save_state_dict(state, weights_dir / file, metadata)
    size = (weights_dir / file).stat().st_size
    others = sum(p.stat().st_size for p in weights_dir.glob("*.safetensors") if p.name != file)
    if size > MAX_FILE_BYTES or size + others > MAX_TOTAL_BYTES:
        (weights_dir / file).unlink()
        raise ValueError(
            f"{file} is {size:,} bytes (limit {MAX_FILE_BYTES:,}); with the other releases {size + others:,} "
            f"(limit {MAX_TOTAL_BYTES:,}): too large to ship in the repository"
        )
    routers = router_summary(model)
    citations = list(FAMILY_CITATIONS.get(base.rsplit("_", 1)[0], []))
    if any(isinstance(m, MoE) for m in model.modules()):  # the core layers' router (not YOLO-MoE's blending)
        router_name = getattr(getattr(model, "spec", None), "router", "topk")
        citations += ROUTER_CITATIONS.get(router_name if isinstance(router_name, str) else "", [])
    citations += [c for c in args.cite if c not in citations]
    tolerance = dict(kv.split("=", 1) for kv in args.tolerance)
    cfg = PretrainedCfg(
        file=file,
        sha256=hub.sha256_file(weights_dir / file),
        urls=[hub.package_url(file), *args.url],
        num_bytes=size,
        license=args.license,
        dataset=args.dataset,
        config=config_path,
        checkpoint=Path(args.ckpt).name,
        storage_dtype=args.storage_dtype,
        model_kwargs=model_kwargs,
        domain=args.domain,
        description=args.description,
        task=task_spec,
        data=data_spec,
        params=count_params(model),
        dense_twin=args.dense_twin,
        limitations=list(args.limitation),
        citations=citations,
    )
    metrics, routing = run_evaluation(cfg, model=model)
    cfg.metrics = metrics
    cfg.tolerance = {k: float(tolerance.get(k, DEFAULT_TOLERANCE)) for k in metrics}
    cfg.routing = {"router": routers, **routing}
    write_record(args.name, cfg, weights_dir)
    cards_dir = Path(args.cards_dir)
    cards_dir.mkdir(parents=True, exist_ok=True)
    card_path(args.name, cards_dir).write_text(render_card(args.name, cfg))
    print(f"released {args.name}: {weights_dir / file} ({size:,} bytes), card {card_path(args.name, cards_dir)}")
    for metric, value in sorted(metrics.items()):
        print(f"  {metric} = {value:.6f}")
    return 0


# -- commands --------------------------------------------------------------------------------------------------
def _names(args: argparse.Namespace) -> list[str]:
    if getattr(args, "all", False):
        return list_models(pretrained=True)
    if not args.name:
        raise ValueError("give a release NAME (moezoo zoo list) or --all")
    get_pretrained_cfg(args.name)  # raises a clear error for an unknown name
    return [args.name]


def _headline(cfg: PretrainedCfg) -> str:
    for key in ("test/acc", "test/mAP", "test/wer", "test/mse", "test/fid"):
        if key in cfg.metrics:
            return f"{key}={cfg.metrics[key]:.4f}"
    return next((f"{k}={v:.4f}" for k, v in sorted(cfg.metrics.items())), "-")


def cmd_list(args: argparse.Namespace) -> int:
    names = list_models(args.pattern, pretrained=True)
    print(f"{'name':36s} {'domain':10s} {'metric':22s} {'active/total params':>22s} {'bytes':>10s}  available")
    for name in names:
        cfg = get_pretrained_cfg(name)
        local = [u for u in cfg.urls if (p := hub.local_path(u)) is not None and p.is_file()]
        where = ["shipped" if u.startswith(f"{hub.PACKAGE_SCHEME}://") else "file" for u in local]
        if (hub.checkpoint_dir() / cfg.file).is_file():
            where.append("cache")
        params = f"{cfg.params.get('active', 0):,}/{cfg.params.get('total', 0):,}"
        print(
            f"{name:36s} {cfg.domain:10s} {_headline(cfg):22s} {params:>22s} {cfg.num_bytes or 0:>10,}  "
            f"{','.join(where) or 'download'}"
        )
    if not names:
        print(f"(no releases match {args.pattern!r})")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    cfg = get_pretrained_cfg(args.name)
    if args.json:
        print(json.dumps(asdict(cfg), indent=2, sort_keys=True))
    else:
        print(render_card(args.name, cfg), end="")
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    for name in _names(args):
        path = hub.fetch(get_pretrained_cfg(name), offline=args.offline or None, force=args.force)
        print(f"{name}: {path}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    failed = []
    results = {}
    for name in _names(args):
        cfg = get_pretrained_cfg(name)
        metrics, _ = run_evaluation(cfg, offline=args.offline or None)
        results[name] = metrics
        lines = compare(cfg.metrics, metrics, cfg.tolerance)
        print(f"\n{name}  (moezoo zoo eval {name})")
        print(f"{'metric':28s} {'card':>12s} {'eval':>12s} {'|diff|':>10s} {'tol':>8s}")
        print("\n".join(lines))
        if any(line.endswith("FAIL") for line in lines):
            failed.append(name)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    if failed:
        print(f"\nmetrics outside tolerance: {failed}", file=sys.stderr)
        return 1
    print(f"\nall {len(results)} release(s) reproduce their card metrics within tolerance")
    return 0


def cmd_card(args: argparse.Namespace) -> int:
    cards_dir = Path(args.cards_dir)
    stale = []
    for name in _names(args):
        text = render_card(name, get_pretrained_cfg(name))
        path = card_path(name, cards_dir)
        if args.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(str(path))
        else:
            cards_dir.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path}")
    if stale:
        print(f"cards that disagree with the registry: {stale}; run `moezoo zoo card --all`", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moezoo zoo", description="the pretrained model zoo")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("list", help="released checkpoints")
    p.add_argument("pattern", nargs="?", default="*", help="glob over name.tag")
    p.set_defaults(func=cmd_list)
    p = sub.add_parser("info", help="everything registered about a release (its model card)")
    p.add_argument("name")
    p.add_argument("--json", action="store_true", help="the raw registered config")
    p.set_defaults(func=cmd_info)
    for command, func, text in (
        ("download", cmd_download, "fetch and verify weights"),
        ("eval", cmd_eval, "rerun the card's evaluation"),
    ):
        p = sub.add_parser(command, help=text)
        p.add_argument("name", nargs="?")
        p.add_argument("--all", action="store_true", help="every release")
        p.add_argument("--offline", action="store_true", help="never use the network (also MOEZOO_OFFLINE=1)")
        if command == "download":
            p.add_argument("--force", action="store_true", help="ignore local copies and download again")
        else:
            p.add_argument("--json", help="also write the metrics to this JSON file")
        p.set_defaults(func=func)
    p = sub.add_parser("card", help="write model cards from the registry (or --check them)")
    p.add_argument("name", nargs="?")
    p.add_argument("--all", action="store_true")
    p.add_argument("--check", action="store_true", help="exit 1 when a card differs from the registry")
    p.add_argument("--cards-dir", default=str(CARDS_DIR))
    p.set_defaults(func=cmd_card)
    p = sub.add_parser("release", help="turn a trained Lightning checkpoint into a release")
    p.add_argument("--config", required=True, help="the training YAML (configs/...)")
    p.add_argument(
        "--ckpt", required=True, help="the Lightning checkpoint to release (its model.* weights; the EMA copy for DiT)"
    )
    p.add_argument("--name", required=True, help="<model>.<tag>")
    p.add_argument("--domain", required=True)
    p.add_argument("--dataset", required=True, help="what the data is, its source and license")
    p.add_argument("--license", default="Apache-2.0")
    p.add_argument("--description", default="")
    p.add_argument("--dense-twin", default="", help="name.tag of the dense twin's release")
    p.add_argument("--url", action="append", default=[], help="extra source: https://..., hf://owner/repo/file")
    p.add_argument("--limitation", action="append", default=[])
    p.add_argument("--cite", action="append", default=[], help="extra citation (family/router ones are added)")
    p.add_argument("--tolerance", action="append", default=[], help=f"METRIC=ABS (default {DEFAULT_TOLERANCE})")
    p.add_argument(
        "--storage-dtype",
        default="float32",
        choices=("float32", "float16", "bfloat16"),
        help="store floating weights in this dtype (half the size; the card is evaluated with the rounded weights)",
    )
    p.add_argument("--weights-dir", default=None, help="default: the package's moezoo/weights")
    p.add_argument("--cards-dir", default=str(CARDS_DIR))
    p.set_defaults(func=release)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        return int(args.func(args) or 0)
    except (hub.HubError, ValueError) as err:
        print(f"moezoo zoo {args.command}: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
