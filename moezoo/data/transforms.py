"""A release's input contract and the transform it implies (timm's ``pretrained_cfg`` + ``create_transform``).

Every release records what its model expects as ``PretrainedCfg.input`` (a plain mapping, so records stay JSON);
:func:`transform_for` turns that record into a callable from *raw* input to the model's input:

- ``kind: image``: ``size`` [H, W], ``channels``, ``value_range`` (the raw pixel maximum, 255 for 8-bit images, 16
  for scikit-learn's digits), ``mean``/``std`` per channel applied after scaling to [0, 1]. Raw input: one image
  (H x W, C x H x W, H x W x C array or tensor, or a PIL image) -> (C, H, W) float tensor; a list of images or an
  (N, C, H, W) / (N, H, W, C) batch -> (N, C, H, W). Images of another size are resized (bilinear), grey and RGB are
  converted into each other. ``transform.inverse`` maps model-space images back to [0, 1].
- ``kind: audio``: ``sample_rate``, ``features: log_mel`` with ``n_mels``, ``n_fft``, ``win_length``,
  ``hop_length`` and ``normalize: utterance``. Raw input: a mono (or (S, channels)) waveform and its sample rate
  -> (T, n_mels) features (needs torchaudio, the ``speech`` extra).
- ``kind: series``: ``seq_len`` (the look-back), ``num_channels``, ``columns`` and, when the training data was
  standardised, ``scaler: {mean, std}`` per column. Raw input: a (T, C) array of raw values with T >= seq_len -> the
  last ``seq_len`` rows, standardised, (seq_len, C); ``transform.inverse`` maps forecasts back to raw units.

This module imports only torch and numpy (torchaudio lazily); it is part of the core.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

INPUT_KINDS = ("image", "audio", "series")

# Normalisations the training data modules apply (moezoo.tasks.*.data import these), so a release's record, its
# transform and its training data use one set of numbers.
DIGITS_VALUE_RANGE = 16.0  # scikit-learn's load_digits pixels are 0..16
DIGITS_MEAN, DIGITS_STD = 0.3, 0.4
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.286, 0.353
CIFAR_MEAN, CIFAR_STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
# Speech features: 80 log-mel bins, 25 ms windows, 10 ms hop at 16 kHz, normalised per utterance.
SPEECH_SAMPLE_RATE = 16000
SPEECH_N_MELS, SPEECH_N_FFT, SPEECH_HOP = 80, 400, 160


def image_input(
    size: int | Sequence[int], channels: int, value_range: float, mean: float | Sequence[float] = 0.0,
    std: float | Sequence[float] = 1.0,
) -> dict[str, Any]:  # fmt: skip
    """The input record of an image model (see the module docstring)."""
    hw = [int(size), int(size)] if isinstance(size, int) else [int(s) for s in size]
    per_channel = lambda v: [float(v)] * channels if isinstance(v, (int, float)) else [float(x) for x in v]  # noqa: E731
    return {
        "kind": "image", "size": hw, "channels": int(channels), "value_range": float(value_range),
        "mean": per_channel(mean), "std": per_channel(std),
    }  # fmt: skip


def audio_input(sample_rate: int = SPEECH_SAMPLE_RATE, n_mels: int = SPEECH_N_MELS) -> dict[str, Any]:
    """The input record of a speech model fed :class:`LogMel` features."""
    return {
        "kind": "audio", "sample_rate": int(sample_rate), "features": "log_mel", "n_mels": int(n_mels),
        "n_fft": SPEECH_N_FFT, "win_length": SPEECH_N_FFT, "hop_length": SPEECH_HOP, "normalize": "utterance",
    }  # fmt: skip


def series_input(
    seq_len: int, columns: Sequence[str], mean: Sequence[float] | None = None, std: Sequence[float] | None = None
) -> dict[str, Any]:
    """The input record of a forecaster reading ``seq_len`` rows of ``columns`` (standardised when mean/std given)."""
    record: dict[str, Any] = {
        "kind": "series", "seq_len": int(seq_len), "num_channels": len(columns), "columns": list(columns),
    }  # fmt: skip
    if (mean is None) != (std is None):
        raise ValueError("series_input: give both mean and std (the scaler) or neither")
    if mean is not None and std is not None:
        if len(mean) != len(columns) or len(std) != len(columns):
            raise ValueError(f"series_input: scaler needs {len(columns)} means and stds, got {len(mean)}, {len(std)}")
        record["scaler"] = {"mean": [float(v) for v in mean], "std": [float(v) for v in std]}
    return record


def _as_tensor(x: Any) -> Tensor:
    if isinstance(x, Tensor):
        return x.detach().to("cpu", torch.float32)
    if type(x).__module__.startswith("PIL."):
        x = np.asarray(x)
    array = np.asarray(x)
    if array.dtype == object or not np.issubdtype(array.dtype, np.number):
        raise TypeError(f"input must be a numeric array, tensor or PIL image, got {type(x).__name__} of {array.dtype}")
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


@dataclass(frozen=True)
class ImageTransform:
    """Raw images -> normalised (C, H, W) or (N, C, H, W) tensors for an image model (see the module docstring)."""

    size: tuple[int, int]
    channels: int
    value_range: float
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def _stats(self) -> tuple[Tensor, Tensor]:
        shape = (1, self.channels, 1, 1)
        return torch.tensor(self.mean).view(shape), torch.tensor(self.std).view(shape)

    def _to_nchw(self, x: Tensor, batched: bool) -> Tensor:
        """One image (2-D or 3-D) or a 4-D batch, channels first or last, as (N, C, H, W)."""
        if x.dim() == 2:
            return x[None, None]
        if x.dim() == 3:
            x = x[None]
        if x.dim() != 4:
            what = "a batch" if batched else "an image"
            raise ValueError(f"{what} must be H x W, C x H x W, H x W x C or N x C x H x W, got shape {tuple(x.shape)}")
        if x.shape[1] not in (1, 3) and x.shape[-1] in (1, 3):  # channels last (numpy / PIL layout)
            x = x.permute(0, 3, 1, 2)
        if x.shape[1] not in (1, 3):
            raise ValueError(f"images must have 1 or 3 channels, got shape {tuple(x.shape)}")
        return x

    def __call__(self, images: Any) -> Tensor:
        batched = isinstance(images, (list, tuple))
        if batched:
            x = torch.cat([self._to_nchw(_as_tensor(im), False) for im in images])
        else:
            x = _as_tensor(images)
            batched = x.dim() == 4
            x = self._to_nchw(x, batched)
        x = x / self.value_range
        if x.shape[1] != self.channels:  # grey <-> RGB (ITU-R 601 luma for RGB -> grey)
            if self.channels == 1:
                x = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
            else:
                x = x.expand(-1, self.channels, -1, -1)
        if tuple(x.shape[-2:]) != self.size:
            x = nn.functional.interpolate(x, size=self.size, mode="bilinear", align_corners=False, antialias=True)
        mean, std = self._stats()
        x = (x - mean) / std
        return x if batched else x[0]

    def inverse(self, x: Tensor) -> Tensor:
        """Model-space images (C, H, W) or (N, C, H, W) -> [0, 1] (clamped)."""
        mean, std = self._stats()
        out = x.detach().float().cpu() * (std if x.dim() == 4 else std[0]) + (mean if x.dim() == 4 else mean[0])
        return out.clamp(0.0, 1.0)


class LogMel(nn.Module):
    """Waveform (S,) at ``sample_rate`` -> per-utterance normalised log-mel (T, n_mels), 25 ms window, 10 ms hop.

    The speech tasks' featuriser (moezoo.tasks.speech.data) and the speech releases' transform; needs torchaudio.
    """

    def __init__(
        self, n_mels: int = SPEECH_N_MELS, sample_rate: int = SPEECH_SAMPLE_RATE, n_fft: int = SPEECH_N_FFT,
        win_length: int = SPEECH_N_FFT, hop_length: int = SPEECH_HOP,
    ) -> None:  # fmt: skip
        super().__init__()
        import torchaudio  # the speech extra; imported here so the core imports without it

        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=sample_rate, n_fft=n_fft, win_length=win_length, hop_length=hop_length, n_mels=n_mels
        )

    @torch.no_grad()
    def forward(self, wave_S: Tensor) -> Tensor:
        feats_TM = (self.mel(wave_S) + 1e-6).log().t()
        return (feats_TM - feats_TM.mean(0)) / feats_TM.std(0).clamp_min(1e-3)


class AudioTransform:
    """A waveform (S,) or (S, channels) and its sample rate -> the log-mel features (T, n_mels) a speech model reads."""

    def __init__(self, record: Mapping[str, Any]) -> None:
        if record.get("features") != "log_mel" or record.get("normalize") != "utterance":
            raise ValueError(f"audio input record: only log_mel features normalised per utterance exist, got {record}")
        self.sample_rate = int(record["sample_rate"])
        self.featurizer = LogMel(
            int(record["n_mels"]), self.sample_rate, int(record["n_fft"]), int(record["win_length"]),
            int(record["hop_length"]),
        )  # fmt: skip

    def __call__(self, waveform: Any, sample_rate: int | None = None) -> Tensor:
        wave = _as_tensor(waveform)
        if wave.dim() == 2:  # (S, channels), soundfile's layout -> mono
            wave = wave.mean(1)
        if wave.dim() != 1 or wave.numel() == 0:
            raise ValueError(f"waveform must be a non-empty (S,) or (S, channels) array, got shape {tuple(wave.shape)}")
        rate = self.sample_rate if sample_rate is None else int(sample_rate)
        if rate != self.sample_rate:
            import torchaudio.functional as AF

            wave = AF.resample(wave, rate, self.sample_rate)
        return self.featurizer(wave)


@dataclass(frozen=True)
class SeriesTransform:
    """Raw (T, C) values -> the last ``seq_len`` rows, standardised with the training scaler, (seq_len, C)."""

    seq_len: int
    columns: tuple[str, ...]
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None

    def __call__(self, values: Any) -> Tensor:
        x = _as_tensor(values)
        if x.dim() == 1 and len(self.columns) == 1:
            x = x[:, None]
        if x.dim() != 2 or x.shape[1] != len(self.columns):
            raise ValueError(
                f"series must be (T, {len(self.columns)}) with columns {list(self.columns)}, got shape {tuple(x.shape)}"
            )
        if x.shape[0] < self.seq_len:
            raise ValueError(f"series needs at least seq_len={self.seq_len} rows (the look-back), got {x.shape[0]}")
        x = x[-self.seq_len :]
        if self.mean is not None and self.std is not None:
            x = (x - torch.tensor(self.mean)) / torch.tensor(self.std)
        return x

    def inverse(self, y: Tensor) -> Tensor:
        """Standardised values (..., C) -> raw units."""
        y = y.detach().float().cpu()
        if self.mean is None or self.std is None:
            return y
        return y * torch.tensor(self.std) + torch.tensor(self.mean)


def transform_from_record(record: Mapping[str, Any]) -> ImageTransform | AudioTransform | SeriesTransform:
    """The transform of one input record (``PretrainedCfg.input``)."""
    kind = record.get("kind")
    if kind == "image":
        h, w = record["size"]
        return ImageTransform(
            (int(h), int(w)), int(record["channels"]), float(record["value_range"]),
            tuple(float(v) for v in record["mean"]), tuple(float(v) for v in record["std"]),
        )  # fmt: skip
    if kind == "audio":
        return AudioTransform(record)
    if kind == "series":
        scaler = record.get("scaler")
        return SeriesTransform(
            int(record["seq_len"]), tuple(record["columns"]),
            None if scaler is None else tuple(scaler["mean"]), None if scaler is None else tuple(scaler["std"]),
        )  # fmt: skip
    raise ValueError(f"input record kind must be one of {INPUT_KINDS}, got {kind!r} in {dict(record)}")


def transform_for(model_or_name: str | nn.Module) -> ImageTransform | AudioTransform | SeriesTransform:
    """The callable that turns raw input into what a release's model expects.

    ``model_or_name``: a release name (``"moe_vit_tiny.digits"``), a folder saved by
    :func:`moezoo.models.hub_layout.save_pretrained`, or a model built by ``create_model`` from either (it carries its
    ``pretrained_cfg``). Raises ``ValueError`` when the release records no input contract.
    """
    from moezoo.models.registry import resolve_pretrained_cfg

    if isinstance(model_or_name, nn.Module):
        cfg = getattr(model_or_name, "pretrained_cfg", None)
        if cfg is None:
            raise ValueError(
                f"model_or_name: this {type(model_or_name).__name__} was not built from a release "
                "(create_model('<model>.<tag>') or a saved folder), so it has no recorded input contract"
            )
        name = getattr(model_or_name, "pretrained_name", type(model_or_name).__name__)
    elif isinstance(model_or_name, str):
        name, cfg = model_or_name, resolve_pretrained_cfg(model_or_name)
    else:
        raise TypeError(f"model_or_name must be a release name, a folder or a model, got {type(model_or_name)!r}")
    if not cfg.input:
        raise ValueError(f"release {name!r} records no input contract (PretrainedCfg.input is empty)")
    return transform_from_record(cfg.input)
