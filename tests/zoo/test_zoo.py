"""The released checkpoints, their model cards and the ``moezoo zoo`` commands."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from moezoo.layers import MoE
from moezoo.models import create_model, get_pretrained_cfg, hub, list_models, parameter_counts
from moezoo.models.pretrained import register_record
from moezoo.models.registry import split_name, unregister_pretrained
from moezoo.tasks.zoo.cli import main
from moezoo.tasks.zoo.evaluation import compare, run_evaluation
from moezoo.tasks.zoo.release import MAX_FILE_BYTES, MAX_TOTAL_BYTES
from moezoo.zoo.cards import render_card

ROOT = Path(__file__).resolve().parents[2]
CARDS = ROOT / "model_cards"
RELEASES = list_models(pretrained=True)
# Model kwargs that only concern routing, or how the active width splits into routed and shared experts: a dense
# twin may set them differently (it has no router); the active-parameter check still has to hold.
ROUTING_KWARGS = {"router", "router_kwargs", "dense", "segment_sizes", "lid_layer", "top_k", "num_shared_experts"}
# Domains whose evaluation data must be generated first (minutes): their eval runs in the slow tier.
SLOW_EVAL_DOMAINS = {"speech"}


def _compute_matched_active(model: torch.nn.Module) -> float:
    """Active parameters outside the routers at the model's configured compute: ``top_k / num_experts`` of every
    MoE layer's experts.

    For routed MoE this is ``parameter_counts(model)["active"]`` less the (small) router weights; for Soft MoE, whose
    every expert touches every token (all parameters active), it is the top-k compute its slots are sized to, which
    the dense twin matches; for Seg-MoE, segment experts count 1/w (their FLOPs per token). Routers are left out:
    the dense twin has none, and Soft MoE's slot embeddings and Seg-MoE's segment gates are large.
    """
    total = sum(p.numel() for p in model.parameters())
    inactive = 0.0
    routers = {}  # a router may be shared by several layers (Omni-router): count it once
    for moe in (m for m in model.modules() if isinstance(m, MoE)):
        experts = sum(p.numel() for p in moe.experts.parameters())
        inactive += experts * (1.0 - moe.top_k / moe.num_experts)
        # Seg-MoE experts (and its shared expert) see w concatenated tokens: per token they cost 1/w of their weights.
        shared = sum(p.numel() for p in moe.shared.parameters()) if moe.shared is not None else 0
        segment = getattr(moe, "segment_size", 1)
        inactive += (experts * moe.top_k / moe.num_experts + shared) * (1.0 - 1.0 / segment)
        routers[id(moe.router)] = sum(p.numel() for p in moe.router.parameters())
    return total - inactive - sum(routers.values())


def _flat_kwargs(model_kwargs: dict) -> dict:
    """A record's model kwargs with the spec form's ``moe: {...}`` settings lifted to the top level (the flat form)."""
    flat = {k: v for k, v in model_kwargs.items() if k != "moe"}
    return {**flat, **(model_kwargs.get("moe") or {})}


def _is_dense(model_kwargs: dict) -> bool:
    """A record's dense flag, in the flat form (``dense: true``) or the spec form (``moe: {dense: true}``)."""
    return bool(model_kwargs.get("dense", False) or (model_kwargs.get("moe") or {}).get("dense", False))


def _slow_eval(name: str) -> bool:
    """Speech data is generated first; moe_tsfm scores ETTh1 by autoregressive rollout over every test window
    (about two CPU-minutes per release)."""
    return get_pretrained_cfg(name).domain in SLOW_EVAL_DOMAINS or name.split("_")[:2] == ["moe", "tsfm"]


@pytest.fixture
def registered() -> Iterator[list[str]]:
    """Register test releases (append their record paths' names); they are unregistered after the test."""
    names: list[str] = []
    yield names
    for name in names:
        unregister_pretrained(name)


@pytest.fixture(autouse=True)
def _offline_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No network and an empty cache: released weights must come from the repository itself."""
    monkeypatch.setenv("MOEZOO_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MOEZOO_OFFLINE", "1")
    monkeypatch.delenv("MOEZOO_MIRRORS", raising=False)


def test_vision_releases_exist() -> None:
    assert "moe_vit_tiny.digits" in RELEASES and "moe_vit_tiny.digits_dense" in RELEASES


def test_registry_and_cards_agree() -> None:
    cards = {p.stem for p in CARDS.glob("*.md") if p.name != "README.md"}
    assert cards == set(RELEASES), f"cards without a release: {cards - set(RELEASES)}; releases without a card: " + str(
        set(RELEASES) - cards
    )
    for name in RELEASES:
        assert (CARDS / f"{name}.md").read_text() == render_card(name, get_pretrained_cfg(name)), (
            f"model_cards/{name}.md disagrees with the registry; run `moezoo zoo card {name}`"
        )
    assert main(["card", "--all", "--check", "--cards-dir", str(CARDS)]) == 0


@pytest.mark.parametrize("name", RELEASES)
def test_release_is_complete_and_shipped(name: str) -> None:
    cfg = get_pretrained_cfg(name)
    assert cfg.urls[0] == hub.package_url(cfg.file), "the shipped copy must be the first source (works offline)"
    path = hub.fetch(cfg)
    assert path == hub.package_weights_dir() / cfg.file
    assert path.stat().st_size == cfg.num_bytes <= MAX_FILE_BYTES
    assert cfg.file.endswith(".safetensors") and cfg.license and cfg.dataset and cfg.config and cfg.citations
    assert cfg.metrics and set(cfg.tolerance) == set(cfg.metrics) and cfg.task and cfg.data and cfg.limitations
    assert (ROOT / cfg.config).is_file(), f"training config {cfg.config} is missing"
    model = create_model(name, pretrained=True)
    assert parameter_counts(model) == cfg.params
    blends = any(getattr(m, "blends_expert_outputs", False) for m in model.modules())
    is_moe = blends or any(isinstance(m, MoE) for m in model.modules())
    assert is_moe == (not _is_dense(cfg.model_kwargs))
    if blends:  # a whole-model mixture (YOLO-MoE): its twin is one detector widened to the mixture's FLOPs
        from moezoo.models.yolo import count_flops

        twin = get_pretrained_cfg(cfg.dense_twin)
        assert twin.model_kwargs["dense"] is True
        twin_model = create_model(split_name(cfg.dense_twin)[0], **twin.model_kwargs)
        size, chans = cfg.data["init_args"]["img_size"], cfg.model_kwargs.get("in_chans", 3)
        assert count_flops(twin_model, size, chans) == pytest.approx(count_flops(model, size, chans), rel=0.05)
    elif is_moe:
        twin = get_pretrained_cfg(cfg.dense_twin)
        assert _is_dense(twin.model_kwargs)
        same = {k: v for k, v in _flat_kwargs(cfg.model_kwargs).items() if k not in ROUTING_KWARGS}
        twin_kwargs = _flat_kwargs(twin.model_kwargs)
        assert {k: twin_kwargs.get(k) for k in same} == same, "the dense twin differs beyond routing"
        assert twin.params["active"] == pytest.approx(_compute_matched_active(model), rel=0.05)


def test_total_shipped_size() -> None:
    total = sum(get_pretrained_cfg(n).num_bytes or 0 for n in RELEASES)
    assert total <= MAX_TOTAL_BYTES


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if _slow_eval(n) else n for n in RELEASES])
def test_eval_reproduces_the_card(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    """The done criterion: offline, from a fresh cache, every release reproduces its card's metrics; and the
    evaluation writes nothing into the working directory (e.g. the forecasting task's plot)."""
    before = set(Path.cwd().iterdir())
    assert main(["eval", name, "--offline"]) == 0, capsys.readouterr().out
    assert set(Path.cwd().iterdir()) == before


def test_count_params_oracle() -> None:
    model = create_model("moe_vit_debug", img_size=8, patch_size=2)
    total = sum(p.numel() for p in model.parameters())
    experts = 0.0
    for block in model.blocks:  # every block of moe_vit_debug is an MoE with 4 experts, top-2
        w_in, w_out = block.ffn.experts.w_in, block.ffn.experts.w_out
        experts += (w_in.numel() + w_out.numel()) * (1 - 2 / 4)
    assert parameter_counts(model) == {"total": total, "active": round(total - experts)}
    dense = create_model("moe_vit_debug", img_size=8, patch_size=2, moe={"dense": True})
    counts = parameter_counts(dense)
    assert counts["active"] == counts["total"] == sum(p.numel() for p in dense.parameters())


def test_compare_flags_out_of_tolerance() -> None:
    lines = compare({"a": 1.0, "b": 2.0, "c": 3.0}, {"a": 1.00005, "b": 2.1}, {"b": 0.05})
    assert [line.split()[-1] for line in lines] == ["ok", "FAIL", "FAIL"]


def test_release_round_trip(tmp_path: Path, registered: list[str], capsys: pytest.CaptureFixture) -> None:
    """release -> record + weights + card; the record registers, loads, evaluates; a wrong metric fails eval."""
    from moezoo.tasks.vision import ImageClassificationTask

    torch.manual_seed(0)
    task = ImageClassificationTask("moe_vit_debug", {"img_size": 8, "patch_size": 2, "in_chans": 1, "num_classes": 10})
    torch.save({"state_dict": task.state_dict()}, tmp_path / "t.ckpt")
    weights, cards = tmp_path / "weights", tmp_path / "cards"
    args = ["release", "--config", str(ROOT / "configs/smoke/vision_digits_moe_vit.yaml"), "--ckpt"]
    args += [str(tmp_path / "t.ckpt"), "--name", "moe_vit_debug.roundtrip", "--domain", "vision"]
    args += [
        "--dataset",
        "digits",
        "--limitation",
        "untrained",
        "--weights-dir",
        str(weights),
        "--cards-dir",
        str(cards),
    ]
    assert main(args) == 0, capsys.readouterr().err
    registered.append(register_record(weights / "moe_vit_debug.roundtrip.json"))
    cfg = get_pretrained_cfg("moe_vit_debug.roundtrip")
    assert (cards / "moe_vit_debug.roundtrip.md").read_text() == render_card("moe_vit_debug.roundtrip", cfg)
    cfg.urls = [(weights / cfg.file).as_uri()]  # the test's weights are not in the package folder
    assert "Shazeer" in " ".join(cfg.citations) and "V-MoE" in " ".join(cfg.citations)
    model = create_model("moe_vit_debug.roundtrip", pretrained=True)
    for key, value in task.model.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0)
    assert main(["eval", "moe_vit_debug.roundtrip", "--offline"]) == 0
    cfg.metrics["test/acc"] += 0.01
    assert main(["eval", "moe_vit_debug.roundtrip", "--offline"]) == 1
    assert "test/acc" in capsys.readouterr().out


def test_generation_release_ships_the_ema_weights(
    tmp_path: Path, registered: list[str], capsys: pytest.CaptureFixture
) -> None:
    """A DiT samples with its EMA copy: the release holds those weights, and eval loads them into both copies."""
    from moezoo.tasks.generation import ImageGenerationTask

    config = ROOT / "configs/smoke/vision_dit_digits_promoe.yaml"
    kwargs = {
        "img_size": 8,
        "patch_size": 2,
        "num_classes": 10,
        "moe": {
            "num_experts": 5,
            "top_k": 1,
            "num_shared_experts": 1,
            "router": "promoe",
            "router_kwargs": {"temperature": 0.07, "contrastive_coef": 0.01},
        },
    }
    torch.manual_seed(0)
    task = ImageGenerationTask("moe_dit_debug", kwargs, num_sampling_steps=8, samples_per_class=2)
    with torch.no_grad():
        for p in task.ema.module.parameters():
            p.add_(torch.randn_like(p))  # the averaged copy now differs from the trained one
    torch.save({"state_dict": task.state_dict()}, tmp_path / "t.ckpt")
    weights, cards = tmp_path / "weights", tmp_path / "cards"
    args = ["release", "--config", str(config), "--ckpt", str(tmp_path / "t.ckpt"), "--name", "moe_dit_debug.ema"]
    args += ["--domain", "generation", "--dataset", "digits", "--weights-dir", str(weights), "--cards-dir", str(cards)]
    assert main(args) == 0, capsys.readouterr().err
    registered.append(register_record(weights / "moe_dit_debug.ema.json"))
    cfg = get_pretrained_cfg("moe_dit_debug.ema")
    cfg.urls = [(weights / cfg.file).as_uri()]
    model = create_model("moe_dit_debug.ema", pretrained=True)
    for key, value in task.ema.module.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0)
    assert any(not torch.equal(model.state_dict()[k], v) for k, v in task.model.state_dict().items())
    metrics, _ = run_evaluation(cfg, offline=True)
    assert metrics == cfg.metrics  # the card's metrics are those of the EMA weights, reproduced from the file


def test_half_precision_release_is_evaluated_with_the_weights_it_ships(
    tmp_path: Path, registered: list[str], capsys: pytest.CaptureFixture
) -> None:
    from safetensors.torch import load_file

    from moezoo.tasks.vision import ImageClassificationTask

    torch.manual_seed(0)
    task = ImageClassificationTask("moe_vit_debug", {"img_size": 8, "patch_size": 2, "in_chans": 1, "num_classes": 10})
    torch.save({"state_dict": task.state_dict()}, tmp_path / "t.ckpt")
    weights = tmp_path / "weights"
    args = ["release", "--config", str(ROOT / "configs/smoke/vision_digits_moe_vit.yaml"), "--ckpt"]
    args += [str(tmp_path / "t.ckpt"), "--name", "moe_vit_debug.half", "--domain", "vision", "--dataset", "digits"]
    args += ["--weights-dir", str(weights), "--cards-dir", str(tmp_path / "cards"), "--storage-dtype", "float16"]
    assert main(args) == 0, capsys.readouterr().err
    stored = load_file(weights / "moe_vit_debug.half.safetensors")
    full = task.model.state_dict()
    assert all(v.dtype == torch.float16 for k, v in stored.items() if full[k].is_floating_point())
    registered.append(register_record(weights / "moe_vit_debug.half.json"))
    cfg = get_pretrained_cfg("moe_vit_debug.half")
    cfg.urls = [(weights / cfg.file).as_uri()]
    assert cfg.storage_dtype == "float16" and "float16" in (tmp_path / "cards" / "moe_vit_debug.half.md").read_text()
    model = create_model("moe_vit_debug.half", pretrained=True)
    for key, value in model.state_dict().items():
        assert value.dtype == full[key].dtype  # loaded back into the model's own dtype
        torch.testing.assert_close(value, full[key].half().to(full[key].dtype), rtol=0, atol=0)
    metrics, _ = run_evaluation(cfg, offline=True)
    assert metrics == cfg.metrics


def test_bad_names_are_clear_errors(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["info", "moe_vit_tiny.nope"]) == 1
    assert "no weights tagged 'nope'" in capsys.readouterr().err
    assert main(["download", "nonexistent_model.x"]) == 1
    assert "has no released weights" in capsys.readouterr().err
    args = ["release", "--config", str(ROOT / "configs/smoke/vision_digits_moe_vit.yaml"), "--ckpt", "x.ckpt"]
    assert main([*args, "--name", "moe_vit_debug", "--domain", "v", "--dataset", "d"]) == 1
    assert "--name must be '<model>.<tag>'" in capsys.readouterr().err
    assert main([*args, "--name", "moe_vit_tiny.x", "--domain", "v", "--dataset", "d"]) == 1
    assert "must start with the config's model name 'moe_vit_debug'" in capsys.readouterr().err
    assert main([*args, "--name", "moe_vit_debug.x", "--domain", "v", "--dataset", "d", "--tolerance", "acc"]) == 1
    assert "--tolerance must be METRIC=ABS" in capsys.readouterr().err


def test_list_and_info(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in RELEASES) and "shipped" in out
    assert main(["info", RELEASES[0], "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["sha256"] == get_pretrained_cfg(RELEASES[0]).sha256


def test_the_headline_metric_is_never_an_aux_loss():
    """Issue 18 item 8: `zoo list` showed test/aux_loss=0.0000 as the headline of the ProMoE DiT release."""
    from types import SimpleNamespace

    from moezoo.models import get_pretrained_cfg
    from moezoo.tasks.zoo.cli import _headline

    metrics = {"test/aux_loss": 0.0, "test/balance": 0.01, "params/total": 5.0, "test/fd_fmnist": 0.71}
    assert _headline(SimpleNamespace(metrics=metrics)) == "test/fd_fmnist=0.7100"
    assert _headline(SimpleNamespace(metrics={"test/aux_loss": 0.0, "test/bleu": 3.0})) == "test/bleu=3.0000"
    assert _headline(SimpleNamespace(metrics={"test/aux_loss": 0.0, "test/dropped_frac": 0.1})) == "-"
    assert _headline(get_pretrained_cfg("moe_dit_tiny.fmnist_promoe")).startswith("test/fd_fmnist=")


def test_a_config_that_leaves_model_settings_to_the_data_is_released(
    tmp_path: Path, registered: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Fitted with image size, channels and classes linked from the data (no model_kwargs for them), the config
    releases: the record's task spec carries the data's settings, so eval rebuilds the trained architecture."""
    import yaml

    from moezoo.cli import main as moezoo_main

    config = yaml.safe_load((ROOT / "configs/smoke/vision_digits_moe_vit.yaml").read_text())
    config["model"]["init_args"]["model_kwargs"] = {"patch_size": 2}  # img_size, in_chans, num_classes: the data's
    path = tmp_path / "digits_linked.yaml"
    path.write_text(yaml.safe_dump(config))
    monkeypatch.chdir(tmp_path)
    fit = ["fit", "--config", str(path), "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2"]
    assert moezoo_main([*fit, "--trainer.limit_val_batches", "0", "--test_after_fit", "false"]) == 0
    ckpt = sorted((tmp_path / "runs").rglob("*.ckpt"))[-1]
    weights, cards = tmp_path / "weights", tmp_path / "cards"
    args = ["release", "--config", str(path), "--ckpt", str(ckpt), "--name", "moe_vit_debug.linked"]
    args += ["--domain", "vision", "--dataset", "digits", "--weights-dir", str(weights), "--cards-dir", str(cards)]
    assert main(args) == 0, capsys.readouterr().err
    registered.append(register_record(weights / "moe_vit_debug.linked.json"))
    cfg = get_pretrained_cfg("moe_vit_debug.linked")
    assert {k: cfg.model_kwargs[k] for k in ("img_size", "in_chans", "num_classes")} == {
        "img_size": 8,
        "in_chans": 1,
        "num_classes": 10,
    }
    assert cfg.task["init_args"]["data_settings"]["img_size"]["value"] == 8
    cfg.urls = [(weights / cfg.file).as_uri()]
    metrics, _ = run_evaluation(cfg, offline=True)  # rebuilt from the record alone
    assert metrics == cfg.metrics
    # The same data-decided settings conflicting with an explicit one: the fit error, naming both keys.
    config["model"]["init_args"]["model_kwargs"]["num_classes"] = 3
    path.write_text(yaml.safe_dump(config))
    assert main(args) == 1
    assert "model.init_args.model_kwargs.num_classes=3 conflicts with" in capsys.readouterr().err
