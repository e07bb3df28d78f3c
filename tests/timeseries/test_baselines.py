"""Forecasting baselines: seasonal naive / last value, NLinear, DLinear and the published PatchTST, each against a
naive oracle where there is one, and trained and tested through the forecasting task like the MoE models."""

from __future__ import annotations

import json
import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
import yaml

from moezoo.cli import main
from moezoo.models import create_model, list_models
from moezoo.models.forecast_baselines import ChannelLinear, DLinear, NLinear, SeasonalNaive, moving_average
from moezoo.models.patchtst_baseline import PatchTST, ResidualAttention, TokenBatchNorm
from moezoo.tasks.timeseries import ElecDemandDataModule

BASELINES = ["last_value", "seasonal_naive", "nlinear", "dlinear", "patchtst"]


def test_every_baseline_is_registered_with_a_debug_size():
    names = set(list_models())
    for family in BASELINES:
        assert f"{family}_debug" in names, family
    assert {"last_value_base", "seasonal_naive_base", "nlinear_base", "dlinear_base"} <= names
    assert {"patchtst_tiny", "patchtst_small"} <= names


@pytest.mark.parametrize("family", BASELINES)
def test_debug_models_forecast_the_horizon_with_no_aux(family):
    model = create_model(f"{family}_debug")
    x = torch.randn(5, 32, 3, requires_grad=True)
    y, auxes = model.forward_with_aux(x)
    assert y.shape == (5, 8, 3) and auxes == []
    params = [p for p in model.parameters() if p.requires_grad]
    if params:
        y.square().mean().backward()
        for name, p in model.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), f"{family}: {name} got no gradient"
    with pytest.raises(ValueError, match=r"x must have shape \(B, seq_len=32, num_channels=3\)"):
        model(torch.randn(5, 31, 3))


def naive_seasonal(x_BLC: torch.Tensor, pred_len: int, period: int) -> torch.Tensor:
    """Oracle: element by element, forecast step t copies look-back step L - period + (t mod period)."""
    batch, seq_len, channels = x_BLC.shape
    out = torch.empty(batch, pred_len, channels)
    for b in range(batch):
        for t in range(pred_len):
            for c in range(channels):
                out[b, t, c] = x_BLC[b, seq_len - period + t % period, c]
    return out


@pytest.mark.parametrize("period", [1, 4, 7, 32])
def test_seasonal_naive_matches_the_oracle(period):
    model = SeasonalNaive(seq_len=32, pred_len=20, num_channels=3, period=period)
    x = torch.randn(2, 32, 3)
    torch.testing.assert_close(model(x), naive_seasonal(x, 20, period), rtol=0, atol=0)
    assert sum(p.numel() for p in model.parameters()) == 0 and not model.state_dict()


def test_last_value_repeats_the_last_observation():
    x = torch.randn(3, 32, 3)
    y = create_model("last_value_debug")(x)
    assert torch.equal(y, x[:, -1:, :].expand(-1, 8, -1))


def test_seasonal_naive_bad_period_is_a_clear_error():
    with pytest.raises(ValueError, match=r"period must be an integer in \[1, seq_len=32\], got 33"):
        SeasonalNaive(seq_len=32, pred_len=8, num_channels=3, period=33)


def naive_moving_average(x_BLC: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Oracle: the mean of the kernel_size steps centred on each step, indices clamped to the series."""
    batch, seq_len, channels = x_BLC.shape
    half = (kernel_size - 1) // 2
    out = torch.empty_like(x_BLC)
    for t in range(seq_len):
        rows = [min(max(s, 0), seq_len - 1) for s in range(t - half, t + half + 1)]
        out[:, t] = x_BLC[:, rows].mean(dim=1)
    return out


@pytest.mark.parametrize("kernel_size", [1, 3, 5, 25])
def test_moving_average_matches_the_oracle(kernel_size):
    x = torch.randn(2, 32, 3, dtype=torch.float64)
    torch.testing.assert_close(moving_average(x, kernel_size), naive_moving_average(x, kernel_size))


def test_dlinear_starts_at_the_look_back_mean_and_rejects_even_kernels():
    model = DLinear(seq_len=32, pred_len=8, num_channels=3, kernel_size=5)
    with torch.no_grad():
        model.seasonal.bias.zero_()
        model.trend.bias.zero_()
    x = torch.randn(4, 32, 3)
    # trend + remainder = x and both maps start at 1/L: the forecast is the look-back mean at every step
    torch.testing.assert_close(model(x), x.mean(dim=1, keepdim=True).expand(-1, 8, -1), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="kernel_size must be an odd positive integer"):
        DLinear(seq_len=32, pred_len=8, num_channels=3, kernel_size=4)


def test_nlinear_is_shift_equivariant_and_zero_weights_give_the_last_value():
    model = NLinear(seq_len=32, pred_len=8, num_channels=3)
    x = torch.randn(4, 32, 3)
    torch.testing.assert_close(model(x + 7.0), model(x) + 7.0, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        model.linear.weight.zero_()
        model.linear.bias.zero_()
    assert torch.equal(model(x), x[:, -1:, :].expand(-1, 8, -1))


@pytest.mark.parametrize("individual", [False, True])
def test_channel_linear_matches_one_linear_per_channel(individual):
    layer = ChannelLinear(seq_len=12, pred_len=5, num_channels=3, individual=individual)
    x = torch.randn(4, 3, 12)
    expected = torch.stack(
        [F.linear(x[:, c], layer.weight[c if individual else 0], layer.bias[c if individual else 0]) for c in range(3)],
        dim=1,
    )
    torch.testing.assert_close(layer(x), expected)
    assert layer.weight.abs().max() <= 1 / math.sqrt(12)  # nn.Linear's default initialisation range


def naive_residual_attention(attn: ResidualAttention, x_NPD: torch.Tensor, prev: torch.Tensor | None):
    """Oracle: per series and head, softmax(q k^T / sqrt(d_head) + prev) v, then the output projection."""
    n, p, d = x_NPD.shape
    h, dh = attn.num_heads, attn.head_dim
    q_w, k_w, v_w = attn.qkv.weight.split(d)
    q_b, k_b, v_b = attn.qkv.bias.split(d)
    out = torch.empty(n, p, d, dtype=x_NPD.dtype)
    scores = torch.empty(n, h, p, p, dtype=x_NPD.dtype)
    for i in range(n):
        q, k, v = x_NPD[i] @ q_w.T + q_b, x_NPD[i] @ k_w.T + k_b, x_NPD[i] @ v_w.T + v_b
        for j in range(h):
            cols = slice(j * dh, (j + 1) * dh)
            s = q[:, cols] @ k[:, cols].T / math.sqrt(dh)
            if prev is not None:
                s = s + prev[i, j]
            scores[i, j] = s
            out[i, :, cols] = torch.softmax(s, dim=-1) @ v[:, cols]
    return out @ attn.proj.weight.T + attn.proj.bias, scores


@pytest.mark.parametrize("with_prev", [False, True])
def test_residual_attention_matches_the_oracle(with_prev):
    attn = ResidualAttention(dim=8, num_heads=2).double()
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    prev = torch.randn(3, 2, 5, 5, dtype=torch.float64) if with_prev else None
    out, scores = attn(x, prev)
    ref_out, ref_scores = naive_residual_attention(attn, x, prev)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(scores, ref_scores)


def test_token_batch_norm_normalises_each_feature_over_series_and_patches():
    norm = TokenBatchNorm(4).train()
    x = torch.randn(6, 5, 4) * 3 + 2
    flat = x.reshape(-1, 4)
    expected = (flat - flat.mean(0)) / torch.sqrt(flat.var(0, unbiased=False) + norm.eps)
    torch.testing.assert_close(norm(x), expected.reshape(6, 5, 4), rtol=1e-5, atol=1e-5)


def test_patchtst_published_sizes_and_equivariance():
    tiny = create_model("patchtst_tiny")
    assert tiny.num_patches == 42 and tiny.revin is not None and tiny.revin.weight is None  # RevIN without affine
    assert len(tiny.layers) == 3 and isinstance(tiny.layers[0].norm_attn, TokenBatchNorm)
    assert tiny.layers[0].ffn[0].out_features == 128 and tiny.layers[0].attn.num_heads == 4
    model = create_model("patchtst_debug").eval()
    x = torch.randn(3, 32, 3)
    torch.testing.assert_close(model(2.0 * x - 1.0), 2.0 * model(x) - 1.0, rtol=1e-4, atol=1e-4)
    x2 = x.clone()
    x2[:, :, 0] = torch.randn(3, 32)
    torch.testing.assert_close(model(x)[:, :, 1:], model(x2)[:, :, 1:])  # channel independent (eval-mode norm)


def test_patchtst_residual_attention_changes_later_layers_only():
    torch.manual_seed(0)
    with_res = create_model("patchtst_debug", depth=1).eval()
    without = create_model("patchtst_debug", depth=1, res_attention=False).eval()
    without.load_state_dict(with_res.state_dict())
    x = torch.randn(2, 32, 3)
    torch.testing.assert_close(with_res(x), without(x))  # one layer: no previous scores to add
    deep = create_model("patchtst_debug", depth=2).eval()
    deep_plain = create_model("patchtst_debug", depth=2, res_attention=False).eval()
    deep_plain.load_state_dict(deep.state_dict())
    assert not torch.allclose(deep(x), deep_plain(x))


def test_patchtst_bad_inputs():
    with pytest.raises(ValueError, match=r"norm='group' is unknown"):
        PatchTST(seq_len=32, pred_len=8, num_channels=3, patch_len=8, stride=4, norm="group")
    with pytest.raises(ValueError, match="dim=16 must be divisible by num_heads=3"):
        PatchTST(seq_len=32, pred_len=8, num_channels=3, patch_len=8, stride=4, num_heads=3)


# -- through the task ---------------------------------------------------------------------------------------------


def _config(tmp_path, model: str, epochs: int, task_args: dict | None = None) -> str:
    config = {
        "seed_everything": 0,
        "trainer": {
            "max_epochs": epochs, "accelerator": "cpu", "logger": False, "enable_progress_bar": False,
            "enable_model_summary": False, "limit_train_batches": 3, "default_root_dir": str(tmp_path / "run"),
            "callbacks": [{
                "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                "init_args": {"dirpath": str(tmp_path / "ckpt"), "monitor": "val/mse", "mode": "min"},
            }],
        },
        "model": {
            "class_path": "moezoo.tasks.timeseries.ForecastingTask",
            "init_args": {"model": model, "model_kwargs": {"seq_len": 32, "pred_len": 8, "num_channels": 3},
                          "num_plot_windows": 0, **(task_args or {})},
        },
        "data": {
            "class_path": "moezoo.tasks.timeseries.ElecDemandDataModule",
            "init_args": {"seq_len": 32, "pred_len": 8, "batch_size": 64},
        },
    }  # fmt: skip
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def _last_value_mse_mae(data: ElecDemandDataModule) -> tuple[float, float]:
    sq, ab, count = 0.0, 0.0, 0
    for x, y in data.test_dataloader():
        err = (y - x[:, -1:, :]).double()
        sq, ab, count = sq + float(err.square().sum()), ab + float(err.abs().sum()), count + err.numel()
    return sq / count, ab / count


ADAM_STEP_DECAY = {
    "optimizer": {"class_path": "torch.optim.Adam", "init_args": {"lr": 0.01, "weight_decay": 0.0}},
    "lr_scheduler": {"class_path": "moezoo.tasks.optim.StepDecayLR", "init_args": {"constant_epochs": 4, "gamma": 0.9}},
}


@pytest.mark.parametrize("task_args", [None, ADAM_STEP_DECAY], ids=["default-optimizer", "adam-step-decay"])
def test_fit_and_test_a_model_without_parameters(tmp_path, monkeypatch, capsys, task_args):
    monkeypatch.chdir(tmp_path)
    config = _config(tmp_path, "last_value_debug", epochs=1, task_args=task_args)
    main(["fit", "--config", config])
    out = capsys.readouterr().out
    assert "last_value_debug has no trainable parameters: fit runs no optimisation step" in out
    metrics = json.loads(next((tmp_path / "run").rglob("test_metrics.json")).read_text())
    data = ElecDemandDataModule(seq_len=32, pred_len=8, batch_size=64)
    data.setup()
    mse, mae = _last_value_mse_mae(data)
    assert metrics["params/total"] == 0
    assert metrics["test/mse"] == pytest.approx(mse, rel=1e-5) and metrics["test/mae"] == pytest.approx(mae, rel=1e-5)
    main(["test", "--config", config])  # `moezoo test` without a checkpoint scores the model as built
    assert "test/mse" in capsys.readouterr().out


def test_step_decay_lr_is_the_published_epoch_schedule(tmp_path):
    from moezoo.tasks.cli import cli_main

    config = _config(tmp_path, "nlinear_debug", epochs=7, task_args=ADAM_STEP_DECAY)
    cli = cli_main(["--config", config, "--trainer.limit_val_batches", "1"], run=False)

    class LrPerEpoch(L.Callback):
        def __init__(self) -> None:
            self.lrs: list[list[float]] = []

        def on_train_epoch_start(self, trainer, pl_module):
            self.lrs.append([group["lr"] for group in trainer.optimizers[0].param_groups])

    record = LrPerEpoch()
    cli.trainer.callbacks.append(record)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    # PatchTST's lradj="type3": epochs 0-3 at the peak, then x0.9 per epoch (3 optimiser steps an epoch here).
    expected = [[0.01 * 0.9 ** max(0, epoch - 3)] * 2 for epoch in range(7)]
    assert record.lrs == [pytest.approx(lrs, rel=1e-12) for lrs in expected]
    assert cli.trainer.lr_scheduler_configs[0].interval == "epoch"
    optimizer = cli.trainer.optimizers[0]
    assert type(optimizer) is torch.optim.Adam and [g["weight_decay"] for g in optimizer.param_groups] == [0.0, 0.0]
