"""Model cards: a release's card is rendered from its registered record alone, so cards and registry cannot
drift (``moezoo zoo card --check`` and the tests compare them)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from moezoo.io import write_text_atomic
from moezoo.models.pretrained_cfg import PretrainedCfg
from moezoo.models.registry import split_name

LIBRARY_NAME = "moezoo"

CARDS_DIR = Path("model_cards")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return f"`{json.dumps(value, sort_keys=True)}`" if isinstance(value, (dict, list)) else f"`{value}`"


# Per model family: the Hub pipeline tag, the task's words, the metrics that are results (the rest are routing and
# loss diagnostics, reported in their own section), and the metric ids the Hub knows them by.
FAMILIES: dict[str, dict[str, Any]] = {
    "moe_vit": {"pipeline": "image-classification", "task": "Image Classification", "results": ("acc",)},
    "moe_conformer": {
        "pipeline": "automatic-speech-recognition", "task": "Automatic Speech Recognition",
        "results": ("cer", "wer", "cer_mono", "cer_cs", "wer_mono", "wer_cs", "cer_unseen_engine", "wer_unseen_engine",
                    "cer_seen_engine", "wer_seen_engine"),
    },
    "moe_patchtst": {
        "pipeline": "time-series-forecasting", "task": "Time Series Forecasting", "results": ("mse", "mae"),
    },
    "moe_tsfm": {
        "pipeline": "time-series-forecasting", "task": "Time Series Forecasting", "results": ("mse", "mae", "mase"),
    },
    "moe_dit": {"pipeline": "unconditional-image-generation", "task": "Class-conditional Image Generation",
                "results": ("fd_fmnist", "sample_acc")},
    "moe_yolo": {"pipeline": "object-detection", "task": "Object Detection",
                 "results": ("mAP", "mAP50", "AR100", "mAP_clean", "mAP_degraded", "mAP50_clean", "mAP50_degraded")},
}  # fmt: skip
METRIC_IDS = {
    "acc": "accuracy", "cer": "cer", "wer": "wer", "mse": "mse", "mae": "mae", "mAP": "map", "mAP50": "map50",
    "AR100": "mar100", "fd_fmnist": "frechet_distance", "sample_acc": "accuracy", "mase": "mase",
}  # fmt: skip
# Data module -> the dataset id written in the front matter (a Hub id where the data is on the Hub).
DATASET_IDS = {
    "DigitsDataModule": "uci-optical-recognition-of-handwritten-digits",
    "DigitsGenerationDataModule": "uci-optical-recognition-of-handwritten-digits",
    "FashionMNISTDataModule": "zalando-datasets/fashion_mnist",
    "FashionMNISTGenerationDataModule": "zalando-datasets/fashion_mnist",
    "SpeechCorpusDataModule": "moezoo-generated-spoken-numbers",
    "CanvasDataModule": "moezoo-generated-digit-canvases",
}
FINETUNE_CONFIGS = {
    "moe_vit": "configs/finetune/vision_imagefolder.yaml", "moe_conformer": "configs/finetune/speech_numbers.yaml",
    "moe_patchtst": "configs/finetune/timeseries_etth1.yaml", "moe_dit": "configs/finetune/generation_fmnist.yaml",
    "moe_yolo": "configs/finetune/detection_canvas.yaml", "moe_tsfm": "configs/timeseries/tsfm_etth1_finetune.yaml",
}  # fmt: skip
INTENDED_USE = {
    "moe_vit": "classifying small images like its training data, and as a starting point for fine-tuning a sparse "
    "ViT-MoE on a user's own classes (`num_classes=N` re-initialises the head)",
    "moe_conformer": "transcribing short utterances of spoken numbers in its training languages, studying how a "
    "speech MoE routes languages, and as a starting point for fine-tuning on new speech (`vocab_size=N` "
    "re-initialises the CTC head)",
    "moe_patchtst": "forecasting the series it was trained on at its look-back and horizon, and as a starting point "
    "for fine-tuning on related series (`pred_len=H` re-initialises the forecast head)",
    "moe_tsfm": "zero-shot forecasting of univariate or multivariate series (each channel on its own) at any "
    "look-back of at least 16 steps and any horizon, and as a starting point for fine-tuning on a user's series (no "
    "weight depends on the horizon, look-back or channel count)",
    "moe_dit": "sampling class-conditional images of its training classes and studying expert specialisation in a "
    "diffusion transformer",
    "moe_yolo": "detecting objects in images like its training canvases and studying how a mixture of detectors "
    "routes clean and degraded images",
}


def family_of(base: str) -> str:
    """``moe_vit_tiny`` -> ``moe_vit``."""
    return base.rpartition("_")[0] or base


def _yaml_scalar(value: Any) -> str:
    """A YAML scalar: JSON's string and number forms are valid YAML."""
    return json.dumps(value)


def _metric_name(key: str) -> str:
    return key.split("/", 1)[-1]


def result_metrics(name: str, cfg: PretrainedCfg, architecture: str | None = None) -> dict[str, float]:
    """The evaluated results of a release that its card's ``model-index`` lists (task metrics, not diagnostics);
    ``architecture``: the registered model of a saved folder (a release's name says it)."""
    results = FAMILIES.get(family_of(architecture or split_name(name)[0]), {}).get("results", ())
    return {k: v for k, v in sorted(cfg.metrics.items()) if _metric_name(k) in results}


def dataset_id(cfg: PretrainedCfg) -> str:
    cls = str(cfg.data.get("class_path", "")).rpartition(".")[2]
    if cls in DATASET_IDS:
        return DATASET_IDS[cls]
    path = (cfg.data.get("init_args") or {}).get("path")
    return Path(path).stem if path else (cls or "unknown")


def front_matter(name: str, cfg: PretrainedCfg, architecture: str | None = None) -> list[str]:
    """The Hugging Face model card metadata (YAML between ``---`` lines)."""
    base = architecture or split_name(name)[0]
    family = family_of(base)
    info = FAMILIES.get(family, {"pipeline": "other", "task": cfg.domain or "other"})
    dataset = dataset_id(cfg)
    results = result_metrics(name, cfg, base)
    has_moe = bool(cfg.routing.get("router", {}).get("num_moe_layers"))
    tags = ["moezoo", "mixture-of-experts" if has_moe else "dense-baseline", family, cfg.domain or "other"]
    lines = [
        "---",
        f"license: {(cfg.license or 'other').lower()}",
        f"library_name: {LIBRARY_NAME}",
        f"pipeline_tag: {info['pipeline']}",
        "tags:",
        *(f"- {_yaml_scalar(t)}" for t in dict.fromkeys(tags)),
        "datasets:",
        f"- {_yaml_scalar(dataset)}",
        "metrics:",
        *(
            f"- {_yaml_scalar(m)}"
            for m in dict.fromkeys(METRIC_IDS.get(_metric_name(k), _metric_name(k)) for k in results)
        ),
        "model-index:",
        f"- name: {_yaml_scalar(name)}",
        "  results:",
        "  - task:",
        f"      type: {info['pipeline']}",
        f"      name: {_yaml_scalar(info['task'])}",
        "    dataset:",
        f"      name: {_yaml_scalar(dataset)}",
        f"      type: {_yaml_scalar(dataset)}",
        f"      split: {cfg.routing.get('split', 'test')}",
        "    metrics:",
    ]
    for key, value in results.items():
        metric = _metric_name(key)
        lines += [
            f"    - type: {_yaml_scalar(METRIC_IDS.get(metric, metric))}",
            f"      name: {_yaml_scalar(key)}",
            f"      value: {_yaml_scalar(float(value))}",
            "      verified: false",
        ]
    if not results:
        lines[-1] = "    metrics: []"
    return [*lines, "---"]


def how_to(cfg: PretrainedCfg, base: str, load: str) -> list[str]:
    """A runnable Python snippet for model ``base``: load, preprocess raw input with ``transform_for``, predict."""
    family = family_of(base)
    head = [
        "```python",
        "import numpy as np",
        "import torch",
        "",
        "import moezoo",
        "from moezoo.data import transform_for",
        "",
        f"model = moezoo.create_model({load}, pretrained=True).eval()",
        "transform = transform_for(model)  # the release's recorded input contract",
    ]
    contract = cfg.input
    if family == "moe_vit" and contract.get("kind") == "image":
        if contract["value_range"] == 16.0:
            raw = ["from sklearn.datasets import load_digits", "", "images = load_digits().images[:8]  # raw 0..16"]
        else:
            h, w = contract["size"]
            raw = [f"images = [np.zeros(({h}, {w}), dtype=np.uint8)]  # your raw images, 0..255 (arrays or PIL)"]
        body = [
            *raw,
            "with torch.no_grad():",
            "    probs = model(transform(list(images))).softmax(-1)",
            "top5 = probs.topk(min(5, probs.shape[-1]))",
            "print(top5.indices[0].tolist(), top5.values[0].tolist())",
        ]
    elif family == "moe_conformer":
        body = [
            "from moezoo.tasks.speech.text import CharVocab, ctc_greedy_decode  # pip install 'moezoo[speech]'",
            "",
            "wave = np.zeros(16000, dtype=np.float32)  # your audio: wave, rate = soundfile.read('utt.wav')",
            f"features = transform(wave, sample_rate={contract.get('sample_rate', 16000)})  # (T, n_mels) log-mel",
            "with torch.no_grad():",
            "    log_probs = model(features[None])",
            "ids = ctc_greedy_decode(log_probs, torch.tensor([log_probs.shape[1]]))[0]",
            "print(repr(CharVocab().decode(ids)))",
        ]
    elif family in ("moe_patchtst", "moe_tsfm"):
        cols = contract.get("num_channels", 1)
        body = [
            f"series = np.random.default_rng(0).normal(size=({contract.get('seq_len', 96) + 4}, {cols}))"
            "  # your raw (T, C) values, T >= the look-back",
            "with torch.no_grad():",
            "    forecast = model(transform(series)[None])[0]  # (horizon, C), standardised",
            "print(transform.inverse(forecast)[:3])  # in the series' own units",
        ]
    elif family == "moe_dit":
        args = cfg.task.get("init_args") or {}
        body = [
            "from moezoo.tasks.generation.diffusion import build_objective, guided  # pip install 'moezoo[generation]'",
            "",
            f"objective = build_objective({_yaml_scalar(args.get('objective', 'rectified_flow'))})",
            f"model_fn = guided(model, {args.get('guidance_scale', 1.0)}, model.null_class)",
            "labels = torch.arange(4)  # the classes to draw",
            f"noise = torch.randn(4, {contract.get('channels', 1)}, {', '.join(map(str, contract.get('size', [])))}, "
            "generator=torch.Generator().manual_seed(0))",
            f"x = objective.sample(model_fn, noise, labels, num_steps={args.get('num_sampling_steps', 20)}, "
            f"sampler={_yaml_scalar(args.get('sampler', 'euler'))})",
            "images = transform.inverse(x)  # (4, C, H, W) in [0, 1]",
            "print(images.shape)",
        ]
    elif family == "moe_yolo":
        h, w = contract.get("size", [64, 64])
        body = [
            "from moezoo.models.yolo_boxes import postprocess",
            "",
            f"image = np.zeros(({h}, {w}), dtype=np.uint8)  # your raw image, 0..255",
            "with torch.no_grad():",
            "    out = model(transform(image)[None])",
            'boxes, logits = model.decode(out["preds"])',
            "print(postprocess(boxes, logits, conf_thres=0.25)[0])  # boxes (x1, y1, x2, y2), scores, labels",
        ]
    else:
        return ["No snippet for this model family yet."]
    return [*head, *body, "```"]


def render_card(name: str, cfg: PretrainedCfg, folder: str | None = None, architecture: str | None = None) -> str:
    """The model card of a release, entirely from its registered record (so cards and registry cannot drift), in
    the Hugging Face format: YAML front matter, intended use and limits, how to use and fine-tune, training data and
    config, evaluation, routing statistics, citations. ``folder``, ``architecture``: the card of a saved folder
    (loaded by path) and its registered model."""
    base = architecture or split_name(name)[0]
    family = family_of(base)
    load = _yaml_scalar(folder if folder is not None else name)
    source = f"{folder}/config.json" if folder is not None else f"moezoo/weights/{name}.json"
    generator = "moezoo.save_pretrained" if folder is not None else f"`moezoo zoo card {name}`"
    lines = [
        *front_matter(name, cfg, base),
        "",
        f"# {name}",
        "",
        f"<!-- Generated by {generator} from {source}. Do not edit by hand. -->",
        "",
        cfg.description or f"`{base}` weights.",
        "",
        "| | |",
        "| --- | --- |",
        f"| Load | `moezoo.create_model({load}, pretrained=True)` |",
        f"| Domain | {cfg.domain or '-'} |",
        f"| Parameters | {cfg.params.get('total', 0):,} total, {cfg.params.get('active', 0):,} active per token |",
        f"| Weights | `{cfg.file}` (safetensors, {cfg.storage_dtype}, {cfg.num_bytes or 0:,} bytes) |",
        f"| sha256 | `{cfg.sha256}` |",
        f"| Sources | {', '.join(f'`{u}`' for u in cfg.urls) or '-'} |",
        f"| License | {cfg.license or '-'} |",
        f"| Dense twin | {f'`{cfg.dense_twin}`' if cfg.dense_twin else '-'} |",
        "",
        "## Intended use and limits",
        "",
        f"Intended for {INTENDED_USE.get(family, 'research on sparse mixture-of-experts models')}. "
        "It is a research and demonstration model, not a production system.",
        "",
        *([f"- {text}" for text in cfg.limitations] or ["- none stated"]),
        "",
        "## How to use",
        "",
        "Load, turn raw input into the model's input with the recorded transform, predict:",
        "",
        *how_to(cfg, base, load),
        "",
        "Input contract (`moezoo.data.transform_for`): "
        + (f"`{json.dumps(cfg.input, sort_keys=True)}`" if cfg.input else "none recorded"),
        "",
        "### Fine-tune",
        "",
        f"On a changed head: `moezoo.create_model({load}, pretrained=True, num_classes=N)` (or `vocab_size`, "
        "`pred_len`) loads every tensor but the head's, which is re-initialised with a logged warning. From a "
        "config: `model: {class_path: ..., init_args: {model: "
        + f"{base if folder is not None else name}, pretrained: true}}}}` (recipe: "
        + f"`moezoo fit --config {FINETUNE_CONFIGS.get(family, 'configs/finetune/')}`). Save the result with "
        "`moezoo.save_pretrained(model, 'my-model')` (this layout: `config.json`, `model.safetensors`, `README.md`) "
        "and load it back with `moezoo.create_model('my-model', pretrained=True)`.",
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
        "## Training data and config",
        "",
        cfg.dataset or "-",
        "",
        f"Data module `{cfg.data.get('class_path', '-')}`: " + ", ".join(f"{k}={v}" for k, v in sorted(data_args)),
        "",
        f"`moezoo fit --config {cfg.config or '-'}` (task `{cfg.task.get('class_path', '-')}`); released from the "
        f"checkpoint `{cfg.checkpoint or '-'}` by `moezoo zoo release`.",
        "",
        "## Evaluation",
        "",
        f"Produced by `moezoo zoo eval {name}` (test split; exit status 1 when a metric leaves its tolerance)."
        if folder is None
        else "Metrics given to `save_pretrained` (none are measured by saving).",
        "",
        "| metric | value | tolerance (abs) |",
        "| --- | --- | --- |",
        *(f"| {k} | {v:.6f} | {cfg.tolerance_for(k):.1e} |" for k, v in sorted(cfg.metrics.items())),
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
    elif router.get("num_moe_layers") or not cfg.routing:
        lines.append("Not recorded.")
    else:
        lines.append("None: this model has no MoE layers.")
    if cfg.notes:
        lines += ["", "## Further evaluation and notes", "", *cfg.notes]
    lines += ["", "## Citations", ""]
    lines += [f"- {text}" for text in cfg.citations] or ["- none"]
    return "\n".join(lines) + "\n"


def card_path(name: str, cards_dir: Path = CARDS_DIR) -> Path:
    return cards_dir / f"{name}.md"


def write_card(name: str, cfg: PretrainedCfg, cards_dir: Path = CARDS_DIR) -> Path:
    """Render the card of release ``name`` and write it (atomically) into ``cards_dir``; returns its path."""
    return write_text_atomic(card_path(name, cards_dir), render_card(name, cfg))
