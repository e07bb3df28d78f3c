"""Acoustic conditions for the generated corpus: speed, pitch, reverberation, additive noise, band-limiting and
codec-like quantisation, each drawn per utterance into the corpus plan and applied deterministically.

The ops, in the order they are applied (a room, then a channel, then a codec):

- ``speed``: resampling by a factor in [0.88, 0.97] or [1.03, 1.12] on a 0.01 grid (what
  ``torchaudio.functional.speed`` does, with integer rates); the only op that changes the length:
  ``ceil(n / factor)`` samples, language segments scaled with it.
- ``pitch``: 0.5-3 semitones up or down, length kept: a phase-vocoder time stretch
  (``torchaudio.functional.phase_vocoder``) then resampling back. ``torchaudio.functional.pitch_shift`` does the
  same but resamples between ``int(16000 / ratio)`` and 16000 Hz, rates whose greatest common divisor is usually 1:
  15 s for a 3 s clip measured here, so the source rate is rounded to 100 Hz (a pitch error under 0.3%, 0.05
  semitone; hence no shifts under half a semitone).
- ``reverb``: convolution (``fftconvolve``) with a synthetic room impulse response: the direct path, a pre-delay
  of 2-20 ms, then exponentially decaying Gaussian noise with RT60 in [0.15, 0.8] s at a direct-to-reverberant
  ratio of -2..12 dB; the tail past the end is cut (length kept).
- ``noise``: white, pink (1/f), brown (1/f^2) or speech-shaped noise (the utterance's own magnitude spectrum
  with random phases) at an SNR of 5-30 dB over the whole utterance (``add_noise``).
- ``bandlimit``: a 4th-order low-pass at 2-6 kHz, or a telephone channel: 300-3400 Hz band-pass, 8 kHz
  sampling and G.711 8-bit mu-law.
- ``codec``: quantisation to 4-7 bit mu-law or 5-8 bit linear PCM.

Parameters are drawn at planning time (JSON-ready dicts, recorded in the manifest); the noise of ``noise`` and
``reverb`` comes from a ``torch.Generator`` seeded by the caller, so a plan always renders the same audio.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torchaudio.functional as AF
from torch import Tensor

AUGMENTATIONS = ("speed", "pitch", "reverb", "noise", "bandlimit", "codec")  # the order they are applied in
NOISE_KINDS = ("white", "pink", "brown", "speech")


def check_ops(ops: Sequence[str], name: str = "augment") -> tuple[str, ...]:
    """``ops`` as a tuple in application order; ValueError naming unknown or repeated ops."""
    unknown = [op for op in ops if op not in AUGMENTATIONS]
    if unknown or len(set(ops)) != len(ops):
        raise ValueError(f"{name} must be distinct ops out of {list(AUGMENTATIONS)}, got {list(ops)}")
    return tuple(op for op in AUGMENTATIONS if op in ops)


def draw_step(op: str, rng: random.Random) -> dict[str, Any]:
    """The parameters of one op, drawn from ``rng`` (rounded, so that the manifest shows what was applied)."""
    sign = 1 if rng.random() < 0.5 else -1  # speed and pitch: never (nearly) the identity
    if op == "speed":
        return {"op": op, "factor": (100 + sign * rng.randint(3, 12)) / 100}
    if op == "pitch":
        return {"op": op, "semitones": round(sign * rng.uniform(0.5, 3.0), 2)}
    if op == "reverb":
        return {
            "op": op,
            "rt60": round(rng.uniform(0.15, 0.8), 3),
            "drr_db": round(rng.uniform(-2.0, 12.0), 2),
            "predelay_ms": rng.randint(2, 20),
        }
    if op == "noise":
        return {"op": op, "kind": rng.choice(NOISE_KINDS), "snr_db": round(rng.uniform(5.0, 30.0), 2)}
    if op == "bandlimit":
        if rng.random() < 0.5:
            return {"op": op, "mode": "telephone"}
        return {"op": op, "mode": "lowpass", "cutoff_hz": float(rng.randint(20, 60) * 100)}
    if op == "codec":
        if rng.random() < 0.5:
            return {"op": op, "mode": "mulaw", "bits": rng.randint(4, 7)}
        return {"op": op, "mode": "linear", "bits": rng.randint(5, 8)}
    raise ValueError(f"op must be one of {list(AUGMENTATIONS)}, got {op!r}")


def plan_steps(ops: Sequence[str], prob: float, seed: str) -> list[dict[str, Any]]:
    """Each enabled op independently with probability ``prob``; every op has its own random stream (seeded by
    ``seed`` and its name), so switching one op on or off leaves the others' draws unchanged."""
    steps = []
    for op in check_ops(ops):
        rng = random.Random(f"{seed}-{op}")
        if rng.random() < prob:
            steps.append(draw_step(op, rng))
    return steps


# -- the ops ------------------------------------------------------------------------------------------------------
def change_speed(wave_S: Tensor, sample_rate: int, factor: float) -> Tensor:
    """Play ``factor`` times faster (pitch moves with it): ``ceil(S / factor)`` samples."""
    return AF.resample(wave_S, round(factor * sample_rate), sample_rate)


def shift_pitch(wave_S: Tensor, sample_rate: int, semitones: float, n_fft: int = 512, hop: int = 128) -> Tensor:
    """Shift the pitch by ``semitones`` at the same duration and length (time stretch, then resample)."""
    source_rate = round(sample_rate * 2 ** (semitones / 12) / 100) * 100
    ratio = source_rate / sample_rate
    window = torch.hann_window(n_fft, dtype=wave_S.dtype)
    spec = torch.stft(wave_S, n_fft, hop, window=window, return_complex=True)
    advance = torch.linspace(0, math.pi * hop, spec.shape[-2], dtype=wave_S.dtype)[:, None]
    stretched = AF.phase_vocoder(spec, 1.0 / ratio, advance)
    long_S = torch.istft(stretched, n_fft, hop, window=window, length=round(wave_S.numel() * ratio))
    return fit_length(AF.resample(long_S, source_rate, sample_rate), wave_S.numel())


def fit_length(wave_S: Tensor, length: int) -> Tensor:
    """Cut or zero-pad to ``length`` samples."""
    if wave_S.numel() >= length:
        return wave_S[:length]
    return torch.cat([wave_S, wave_S.new_zeros(length - wave_S.numel())])


def synthetic_rir(sample_rate: int, rt60: float, drr_db: float, predelay_ms: int, generator: torch.Generator) -> Tensor:
    """Direct path (1 at t=0), silence for the pre-delay, then Gaussian noise whose energy falls 60 dB per RT60,
    scaled to the direct-to-reverberant energy ratio ``drr_db``; lasts 1.2 RT60 (at most 1 s)."""
    length = int(min(1.2 * rt60, 1.0) * sample_rate)
    t_R = torch.arange(length, dtype=torch.float32) / sample_rate
    tail_R = torch.randn(length, generator=generator) * 10 ** (-3.0 * t_R / rt60)
    tail_R[: max(1, predelay_ms * sample_rate // 1000)] = 0.0
    tail_R *= math.sqrt(10 ** (-drr_db / 10) / float(tail_R.pow(2).sum().clamp_min(1e-12)))
    tail_R[0] = 1.0
    return tail_R


def reverberate(wave_S: Tensor, rir_R: Tensor) -> Tensor:
    """Convolve with a room impulse response; the tail past the end is cut (length kept)."""
    return AF.fftconvolve(wave_S, rir_R.to(wave_S.dtype))[: wave_S.numel()]


def make_noise(kind: str, wave_S: Tensor, generator: torch.Generator) -> Tensor:
    """Noise as long as ``wave_S``: white, pink (1/f power), brown (1/f^2) or speech-shaped (``wave_S``'s own
    magnitude spectrum with uniformly random phases)."""
    n = wave_S.numel()
    if kind == "speech":
        magnitude = torch.fft.rfft(wave_S).abs()
        phase = 2 * math.pi * torch.rand(magnitude.shape, generator=generator, dtype=wave_S.dtype)
        return torch.fft.irfft(torch.polar(magnitude, phase), n)
    white_S = torch.randn(n, generator=generator, dtype=wave_S.dtype)
    if kind == "white":
        return white_S
    exponent = {"pink": 0.5, "brown": 1.0}.get(kind)
    if exponent is None:
        raise ValueError(f"noise kind must be one of {list(NOISE_KINDS)}, got {kind!r}")
    freqs = torch.fft.rfftfreq(n, dtype=wave_S.dtype)
    shape = freqs.clamp_min(freqs[1] if n > 1 else 1.0).pow(-exponent)
    shape[0] = 0.0  # no DC offset
    return torch.fft.irfft(torch.fft.rfft(white_S) * shape, n)


def add_noise_at_snr(wave_S: Tensor, noise_S: Tensor, snr_db: float) -> Tensor:
    """``wave_S`` plus ``noise_S`` scaled to the signal-to-noise ratio ``snr_db`` (energies over the utterance)."""
    return AF.add_noise(wave_S[None], noise_S[None], torch.tensor([snr_db], dtype=wave_S.dtype))[0]


def _lowpass(wave_S: Tensor, sample_rate: int, cutoff_hz: float) -> Tensor:
    """4th order: two cascaded biquads."""
    return AF.lowpass_biquad(AF.lowpass_biquad(wave_S, sample_rate, cutoff_hz), sample_rate, cutoff_hz)


def band_limit(wave_S: Tensor, sample_rate: int, mode: str, cutoff_hz: float | None = None) -> Tensor:
    """``lowpass`` at ``cutoff_hz``, or ``telephone``: 300-3400 Hz, 8 kHz sampling, G.711 mu-law (8 bits).

    torchaudio's biquads clamp their output to [-1, 1], so they filter the signal scaled to a peak of 0.5."""
    if mode not in ("lowpass", "telephone"):
        raise ValueError(f"mode must be 'lowpass' or 'telephone', got {mode!r}")
    if mode == "lowpass" and (cutoff_hz is None or not 0 < cutoff_hz < sample_rate / 2):
        raise ValueError(f"cutoff_hz must be in (0, {sample_rate / 2}) for mode='lowpass', got {cutoff_hz}")
    scale = 0.5 / float(wave_S.abs().max().clamp_min(1e-8))
    wave_S = wave_S * scale
    if mode == "lowpass":
        assert cutoff_hz is not None
        return _lowpass(wave_S, sample_rate, cutoff_hz) / scale
    band = AF.highpass_biquad(AF.highpass_biquad(wave_S, sample_rate, 300.0), sample_rate, 300.0)
    band = _lowpass(band, sample_rate, 3400.0)
    narrow = quantise(AF.resample(band, sample_rate, 8000), "mulaw", 8)
    return fit_length(AF.resample(narrow, 8000, sample_rate), wave_S.numel()) / scale


def quantise(wave_S: Tensor, mode: str, bits: int) -> Tensor:
    """Round to ``2**bits`` levels, mu-law companded (``mulaw``) or uniform (``linear``), at the signal's peak."""
    if not 1 <= bits <= 16:
        raise ValueError(f"bits must be in [1, 16], got {bits}")
    peak = float(wave_S.abs().max().clamp_min(1e-8))
    unit_S = (wave_S / peak).clamp(-1.0, 1.0)
    levels = 2**bits
    if mode == "mulaw":
        out_S = AF.mu_law_decoding(AF.mu_law_encoding(unit_S, levels), levels)
    elif mode == "linear":
        step = 2.0 / (levels - 1)
        out_S = torch.round((unit_S + 1.0) / step) * step - 1.0
    else:
        raise ValueError(f"mode must be 'mulaw' or 'linear', got {mode!r}")
    return out_S.to(wave_S.dtype) * peak


def apply_step(wave_S: Tensor, step: Mapping[str, Any], sample_rate: int, generator: torch.Generator) -> Tensor:
    """One planned step (a dict from :func:`draw_step`)."""
    op = step["op"]
    if op == "speed":
        return change_speed(wave_S, sample_rate, step["factor"])
    if op == "pitch":
        return shift_pitch(wave_S, sample_rate, step["semitones"])
    if op == "reverb":
        rir = synthetic_rir(sample_rate, step["rt60"], step["drr_db"], step["predelay_ms"], generator)
        return reverberate(wave_S, rir)
    if op == "noise":
        return add_noise_at_snr(wave_S, make_noise(step["kind"], wave_S, generator), step["snr_db"])
    if op == "bandlimit":
        return band_limit(wave_S, sample_rate, step["mode"], step.get("cutoff_hz"))
    if op == "codec":
        return quantise(wave_S, step["mode"], step["bits"])
    raise ValueError(f"step op must be one of {list(AUGMENTATIONS)}, got {op!r}")


def apply_steps(wave_S: Tensor, steps: Sequence[Mapping[str, Any]], sample_rate: int, seed: int) -> Tensor:
    """Apply planned steps in order; random draws (noise, room responses) come from a generator seeded by
    ``seed``. Only ``speed`` changes the length."""
    generator = torch.Generator().manual_seed(seed)
    for step in steps:
        wave_S = apply_step(wave_S, step, sample_rate, generator)
    return wave_S
