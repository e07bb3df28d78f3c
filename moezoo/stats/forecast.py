"""Point-forecast errors, each computed once: MSE, MAE and MASE over ``(B, H, C)`` forecasts (the forecasting task
logs them; the pretrained forecaster's evaluation reads them from the task's test metrics).

Legend: B windows, L look-back, H horizon, C channels.
"""

from __future__ import annotations

from torch import Tensor

#: the in-sample error below which a window's MASE scale is clamped (a constant look-back)
MASE_EPS = 1e-8


def forecast_errors(pred_BHC: Tensor, target_BHC: Tensor, lookback_BLC: Tensor, period: int = 1) -> dict[str, Tensor]:
    """``{"mse", "mae", "mase"}``, each the mean over windows (and steps and channels).

    MASE (Hyndman & Koehler 2006), per window and channel: the forecast's MAE over the horizon divided by the MAE
    of the seasonal naive forecast inside the look-back, ``mean_{t >= period} |x_t - x_{t - period}|`` (the scale
    GluonTS and the Monash archive compute from each window's past), then averaged over windows and channels. It
    does not change under a per-channel affine rescaling, so it is the same on the normalised and on the data's
    scale. A scale below :data:`MASE_EPS` (a constant look-back) is clamped to it.
    """
    if pred_BHC.shape != target_BHC.shape or pred_BHC.dim() != 3:
        raise ValueError(f"pred and target must have one shape (B, H, C), got {tuple(pred_BHC.shape)} and "
                         f"{tuple(target_BHC.shape)}")  # fmt: skip
    B, _, C = pred_BHC.shape
    if lookback_BLC.dim() != 3 or lookback_BLC.shape[0] != B or lookback_BLC.shape[2] != C:
        raise ValueError(f"lookback must have shape (B, L, C) matching pred {tuple(pred_BHC.shape)}, got "
                         f"{tuple(lookback_BLC.shape)}")  # fmt: skip
    if not isinstance(period, int) or isinstance(period, bool) or not 1 <= period < lookback_BLC.shape[1]:
        raise ValueError(f"period must be an integer in [1, L={lookback_BLC.shape[1]}), got {period!r}")
    error = pred_BHC - target_BHC
    abs_BC = error.abs().mean(1)
    scale_BC = (lookback_BLC[:, period:] - lookback_BLC[:, :-period]).abs().mean(1).clamp_min(MASE_EPS)
    return {"mse": error.square().mean(), "mae": abs_BC.mean(), "mase": (abs_BC / scale_BC).mean()}
