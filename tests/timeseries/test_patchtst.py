"""``moe_patchtst``: shapes, RevIN, patching, the dense twin's active size, gradients, the forecasting task."""

from __future__ import annotations

import pytest
import torch

from moezoo.layers import FeedForward
from moezoo.layers.segment import SegmentFeedForward, SegmentMoE
from moezoo.models import create_model, list_models
from moezoo.tasks.timeseries import ForecastingTask, plot_forecasts


def test_family_is_registered_with_every_size():
    assert {"moe_patchtst_debug", "moe_patchtst_tiny", "moe_patchtst_small"} <= set(list_models("moe_patchtst_*"))


def test_forward_shapes_aux_and_gradients():
    model = create_model("moe_patchtst_debug", moe={"segment_sizes": [2, 3]})
    x = torch.randn(4, 32, 3, requires_grad=True)
    y, auxes = model.forward_with_aux(x)
    assert y.shape == (4, 8, 3) and len(auxes) == 2
    assert [aux.num_tokens for aux in auxes] == [4 * 3 * 4, 4 * 3 * 3]  # 8 patches -> 4 segments of 2, 3 of 3
    (y.square().mean() + sum(aux.aux_loss for aux in auxes)).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"


def test_patching_matches_patchtst():
    model = create_model("moe_patchtst_debug", seq_len=336, pred_len=96, patch_len=16, stride=8)
    assert model.num_patches == 42  # PatchTST/42
    series = torch.arange(336.0).unsqueeze(0)
    patches = model.patchify(series)
    assert patches.shape == (1, 42, 16)
    assert torch.equal(patches[0, 0], torch.arange(16.0)) and torch.equal(patches[0, 40], torch.arange(320.0, 336.0))
    assert torch.equal(patches[0, 41], torch.cat([torch.arange(328.0, 336.0), torch.full((8,), 335.0)]))


def test_revin_makes_forecasts_equivariant_to_shift_and_scale():
    model = create_model("moe_patchtst_debug").eval()
    x = torch.randn(2, 32, 3)
    y = model(x)
    torch.testing.assert_close(model(3.0 * x + 5.0), 3.0 * y + 5.0, rtol=1e-4, atol=1e-4)


def test_channels_are_independent():
    model = create_model("moe_patchtst_debug", revin_affine=False).eval()
    x = torch.randn(2, 32, 3)
    x2 = x.clone()
    x2[:, :, 0] = torch.randn(2, 32)
    # Token-wise routing is per series, so changing channel 0 leaves channels 1 and 2 untouched.
    torch.testing.assert_close(model(x)[:, :, 1:], model(x2)[:, :, 1:])


def test_dense_twin_has_the_same_active_width_and_segment_views():
    moe = create_model("moe_patchtst_tiny", moe={"segment_sizes": [3, 5, 5]})
    twin = create_model("moe_patchtst_tiny", moe={"segment_sizes": [3, 5, 5], "dense": True})
    plain = create_model("moe_patchtst_tiny", moe={"segment_sizes": 1, "dense": True})
    for block, twin_block, plain_block in zip(moe.blocks, twin.blocks, plain.blocks):
        assert isinstance(block.ffn, SegmentMoE)
        assert isinstance(twin_block.ffn, SegmentFeedForward) and isinstance(plain_block.ffn, FeedForward)
        assert twin_block.ffn.ffn.hidden_dim == block.ffn.active_ffn_dim == 128 == plain_block.ffn.hidden_dim
        assert twin_block.ffn.segment_size == block.ffn.segment_size
    # Active parameters per segment: one routed expert + the shared expert = the dense twin's FFN.
    expert = moe.blocks[0].ffn
    per_expert = expert.experts.w_in[0].numel() + expert.experts.w_out[0].numel()
    assert per_expert + sum(p.numel() for p in expert.shared.parameters()) == sum(
        p.numel() for p in twin.blocks[0].ffn.parameters()
    )


def test_bad_model_arguments_and_input():
    with pytest.raises(ValueError, match="segment_sizes"):
        create_model("moe_patchtst_debug", moe={"segment_sizes": [1, 2, 3]})
    with pytest.raises(ValueError, match="patch_len"):
        create_model("moe_patchtst_debug", patch_len=64)
    model = create_model("moe_patchtst_debug")
    with pytest.raises(ValueError, match=r"x must have shape \(B, seq_len=32, num_channels=3\)"):
        model(torch.randn(2, 32, 4))


@pytest.mark.parametrize("loss", ["mse", "huber"])
def test_task_loss_metrics_and_plot(loss, tmp_path):
    task = ForecastingTask("moe_patchtst_debug", {"moe": {"dense": False}}, loss=loss)
    x, y = torch.randn(4, 32, 3), torch.randn(4, 8, 3)
    value, auxes, metrics, batch_size = task.compute_loss((x, y), "test")
    assert batch_size == 4 and len(auxes) == 2 and set(metrics) == {"mse", "mae", "mase"}
    pred = task.model(x)
    torch.testing.assert_close(metrics["mae"], torch.nn.functional.l1_loss(pred, y))
    naive_mae = (x[:, 1:] - x[:, :-1]).abs().mean(1)  # the task's default MASE season is 1
    torch.testing.assert_close(metrics["mase"], ((pred - y).abs().mean(1) / naive_mae).mean())
    if loss == "mse":
        torch.testing.assert_close(value, metrics["mse"])
    else:
        torch.testing.assert_close(value, torch.nn.functional.huber_loss(pred, y))
    path = plot_forecasts(task._plot_windows, tmp_path / "forecasts.png", title="t")
    assert path.stat().st_size > 1000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_task_bad_arguments_and_shape_mismatch():
    with pytest.raises(ValueError, match="loss='mae'"):
        ForecastingTask("moe_patchtst_debug", loss="mae")
    task = ForecastingTask("moe_patchtst_debug")
    with pytest.raises(ValueError, match="pred_len and num_channels"):
        task.compute_loss((torch.randn(2, 32, 3), torch.randn(2, 12, 3)), "train")
