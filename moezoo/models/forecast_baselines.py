"""Forecasting baselines that every time-series table shows beside the MoE models: seasonal naive (last value),
NLinear and DLinear (Zeng et al. 2023, "Are Transformers Effective for Time Series Forecasting?").

Legend: B batch, L look-back, H horizon, C channels.

Each model maps ``x (B, L, C) -> (B, H, C)`` and offers ``forward_with_aux`` (no MoE layers: the aux list is
empty), so the forecasting task trains and tests them exactly like ``moe_patchtst``.

- ``SeasonalNaive``: ``y[t] = x[L - period + (t mod period)]``, the last observed season repeated; ``period=1``
  is the last-value forecast. No parameters: ``moezoo fit`` evaluates it without an optimisation step.
- ``NLinear``: subtract the last look-back value, one linear map ``L -> H`` per series (shared by the channels
  unless ``individual``), add the last value back.
- ``DLinear``: split the look-back into a trend (moving average of ``kernel_size`` steps, the series' first and last
  values repeated ``(kernel_size - 1) // 2`` times at either end) and the remainder, map each with its own linear
  ``L -> H`` and add the two forecasts. As in the public LTSF-Linear code the two weight matrices start at ``1/L``
  (the look-back mean) and the biases at PyTorch's ``nn.Linear`` default.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moezoo.layers import MoEAux
from moezoo.models.patchtst import check_forecast_input, check_forecast_sizes
from moezoo.models.registry import register_model


class Forecaster(nn.Module):
    """A dense forecaster ``(B, L, C) -> (B, H, C)``: the input check and the ``forward`` / ``forward_with_aux``
    pair the forecasting task calls; subclasses implement :meth:`forecast`."""

    def __init__(self, seq_len: int, pred_len: int, num_channels: int) -> None:
        super().__init__()
        check_forecast_sizes(seq_len, pred_len, num_channels)
        self.seq_len = seq_len
        self.pred_len = pred_len
        self.num_channels = num_channels

    def forecast(self, x_BLC: Tensor) -> Tensor:
        raise TypeError(f"{type(self).__name__} must override forecast")

    def forward_with_aux(self, x: Tensor) -> tuple[Tensor, list[MoEAux]]:
        check_forecast_input(x, self.seq_len, self.num_channels)
        return self.forecast(x), []

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_with_aux(x)[0]


class SeasonalNaive(Forecaster):
    """Repeat the last ``period`` look-back steps over the horizon (``period=1``: the last value). No parameters."""

    def __init__(self, seq_len: int = 336, pred_len: int = 96, num_channels: int = 7, period: int = 1) -> None:
        super().__init__(seq_len, pred_len, num_channels)
        if not isinstance(period, int) or isinstance(period, bool) or not 1 <= period <= seq_len:
            raise ValueError(f"period must be an integer in [1, seq_len={seq_len}], got {period!r}")
        self.period = period

    def forecast(self, x_BLC: Tensor) -> Tensor:
        source_H = self.seq_len - self.period + torch.arange(self.pred_len, device=x_BLC.device) % self.period
        return x_BLC[:, source_H, :]


class ChannelLinear(nn.Module):
    """A linear map over the time axis, ``(B, C, L) -> (B, C, H)``: one ``(H, L)`` matrix shared by the channels,
    or one per channel (``individual``). Initialised like ``nn.Linear`` (uniform in ``+-1/sqrt(L)``)."""

    def __init__(self, seq_len: int, pred_len: int, num_channels: int, individual: bool = False) -> None:
        super().__init__()
        groups = num_channels if individual else 1
        bound = 1.0 / math.sqrt(seq_len)
        self.individual = individual
        self.weight = nn.Parameter(torch.empty(groups, pred_len, seq_len).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(groups, pred_len).uniform_(-bound, bound))

    def forward(self, x_BCL: Tensor) -> Tensor:
        if not self.individual:
            return F.linear(x_BCL, self.weight[0], self.bias[0])
        return torch.einsum("bcl,chl->bch", x_BCL, self.weight) + self.bias


class NLinear(Forecaster):
    """Subtract the last value, a linear map ``L -> H`` per series, add the last value back."""

    def __init__(self, seq_len: int = 336, pred_len: int = 96, num_channels: int = 7, individual: bool = False) -> None:
        super().__init__(seq_len, pred_len, num_channels)
        self.linear = ChannelLinear(seq_len, pred_len, num_channels, individual)

    def forecast(self, x_BLC: Tensor) -> Tensor:
        last_B1C = x_BLC[:, -1:, :].detach()
        y_BCH = self.linear((x_BLC - last_B1C).transpose(1, 2))
        return y_BCH.transpose(1, 2) + last_B1C


def moving_average(x_BLC: Tensor, kernel_size: int) -> Tensor:
    """DLinear's trend: a centred moving average over time, the first and last values repeated at the ends."""
    pad = (kernel_size - 1) // 2
    padded = torch.cat([x_BLC[:, :1].expand(-1, pad, -1), x_BLC, x_BLC[:, -1:].expand(-1, pad, -1)], dim=1)
    return F.avg_pool1d(padded.transpose(1, 2), kernel_size, stride=1).transpose(1, 2)


class DLinear(Forecaster):
    """Trend (moving average) and remainder, each mapped ``L -> H`` by its own linear layer, forecasts summed."""

    def __init__(
        self,
        seq_len: int = 336,
        pred_len: int = 96,
        num_channels: int = 7,
        kernel_size: int = 25,
        individual: bool = False,
    ) -> None:
        super().__init__(seq_len, pred_len, num_channels)
        if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be an odd positive integer (a centred average), got {kernel_size!r}")
        self.kernel_size = kernel_size
        self.seasonal = ChannelLinear(seq_len, pred_len, num_channels, individual)
        self.trend = ChannelLinear(seq_len, pred_len, num_channels, individual)
        with torch.no_grad():
            self.seasonal.weight.fill_(1.0 / seq_len)
            self.trend.weight.fill_(1.0 / seq_len)

    def forecast(self, x_BLC: Tensor) -> Tensor:
        trend_BLC = moving_average(x_BLC, self.kernel_size)
        seasonal_BLC = x_BLC - trend_BLC
        y_BCH = self.seasonal(seasonal_BLC.transpose(1, 2)) + self.trend(trend_BLC.transpose(1, 2))
        return y_BCH.transpose(1, 2)


# Sizes: `_debug` is the tests' (L=32, H=8, 3 channels); `_base` is the published long-term setting (L=336, H=96,
# the 7 ETT channels). Horizon, look-back and channels are constructor arguments, set per dataset in the configs.
_DEBUG = dict(seq_len=32, pred_len=8, num_channels=3)
_BASE = dict(seq_len=336, pred_len=96, num_channels=7)


@register_model
def last_value_debug(**kwargs: Any) -> SeasonalNaive:
    """The last look-back value repeated over the horizon (L=32, H=8, 3 channels): for tests."""
    return SeasonalNaive(**{**_DEBUG, "period": 1, **kwargs})


@register_model
def last_value_base(**kwargs: Any) -> SeasonalNaive:
    """The last look-back value repeated over the horizon (L=336, H=96, 7 channels)."""
    return SeasonalNaive(**{**_BASE, "period": 1, **kwargs})


@register_model
def seasonal_naive_debug(**kwargs: Any) -> SeasonalNaive:
    """The last season of 4 steps repeated (L=32, H=8, 3 channels): for tests."""
    return SeasonalNaive(**{**_DEBUG, "period": 4, **kwargs})


@register_model
def seasonal_naive_base(**kwargs: Any) -> SeasonalNaive:
    """The last day repeated (period 24 hourly steps; pass ``period`` for other sampling rates)."""
    return SeasonalNaive(**{**_BASE, "period": 24, **kwargs})


@register_model
def nlinear_debug(**kwargs: Any) -> NLinear:
    """NLinear on L=32, H=8, 3 channels: for tests."""
    return NLinear(**{**_DEBUG, **kwargs})


@register_model
def nlinear_base(**kwargs: Any) -> NLinear:
    """NLinear, one linear map shared by the channels (L=336, H=96, 7 channels)."""
    return NLinear(**{**_BASE, **kwargs})


@register_model
def dlinear_debug(**kwargs: Any) -> DLinear:
    """DLinear on L=32, H=8, 3 channels, moving average of 5 steps: for tests."""
    return DLinear(**{**_DEBUG, "kernel_size": 5, **kwargs})


@register_model
def dlinear_base(**kwargs: Any) -> DLinear:
    """DLinear, moving average of 25 steps, linear maps shared by the channels (L=336, H=96, 7 channels)."""
    return DLinear(**{**_BASE, "kernel_size": 25, **kwargs})
