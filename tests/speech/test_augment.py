"""Acoustic conditions: deterministic plans, length rules, and each op measured doing what it says on test signals."""

from __future__ import annotations

import math

import pytest
import torch

from moezoo.tasks.speech.augment import (
    AUGMENTATIONS,
    NOISE_KINDS,
    add_noise_at_snr,
    apply_step,
    apply_steps,
    band_limit,
    change_speed,
    check_ops,
    draw_step,
    make_noise,
    plan_steps,
    quantise,
    shift_pitch,
    synthetic_rir,
)

SR = 16000


def _tone(freq: float = 440.0, seconds: float = 1.5) -> torch.Tensor:
    t = torch.arange(int(seconds * SR)) / SR
    return 0.3 * torch.sin(2 * math.pi * freq * t)


def _peak_hz(wave: torch.Tensor) -> float:
    return float(torch.fft.rfft(wave).abs().argmax()) * SR / wave.numel()


def _band_energy(wave: torch.Tensor, low: float, high: float) -> float:
    spec = torch.fft.rfft(wave).abs().pow(2)
    freqs = torch.fft.rfftfreq(wave.numel(), 1 / SR)
    return float(spec[(freqs >= low) & (freqs < high)].sum())


def test_plans_are_deterministic_and_each_op_has_its_own_stream():
    all_ops = plan_steps(AUGMENTATIONS, 1.0, "0-train-7")
    assert [s["op"] for s in all_ops] == list(AUGMENTATIONS)  # prob 1: every op, in application order
    assert plan_steps(AUGMENTATIONS, 1.0, "0-train-7") == all_ops
    assert plan_steps(AUGMENTATIONS, 1.0, "0-train-8") != all_ops
    # switching ops off leaves the others' draws as they were
    assert plan_steps(("codec", "noise"), 1.0, "0-train-7") == [s for s in all_ops if s["op"] in ("noise", "codec")]
    counts = {op: 0 for op in AUGMENTATIONS}
    for i in range(400):
        for step in plan_steps(AUGMENTATIONS, 0.3, f"1-train-{i}"):
            counts[step["op"]] += 1
    assert all(80 < c < 160 for c in counts.values()), counts  # about 0.3 x 400 each
    with pytest.raises(ValueError, match="augment must be distinct ops"):
        check_ops(("noise", "echo"))
    with pytest.raises(ValueError, match="augment must be distinct ops"):
        check_ops(("noise", "noise"))


@pytest.mark.parametrize("op", AUGMENTATIONS)
def test_every_op_changes_the_audio_and_keeps_its_length_rule(op):
    wave = _tone() + 0.05 * _tone(1900.0)
    for i in range(4):  # several draws of the parameters
        step = draw_step(op, __import__("random").Random(f"{op}-{i}"))
        out = apply_step(wave, step, SR, torch.Generator().manual_seed(i))
        expected = math.ceil(wave.numel() / step["factor"]) if op == "speed" else wave.numel()
        assert out.shape == (expected,) and out.dtype == wave.dtype and bool(out.isfinite().all())
        n = min(out.numel(), wave.numel())
        assert float((out[:n] - wave[:n]).abs().max()) > 1e-3, step


def test_steps_are_reproducible_from_the_seed():
    wave = _tone()
    steps = plan_steps(AUGMENTATIONS, 1.0, "x")
    a, b = apply_steps(wave, steps, SR, seed=5), apply_steps(wave, steps, SR, seed=5)
    assert torch.equal(a, b)
    assert not torch.equal(a, apply_steps(wave, steps, SR, seed=6))  # noise and room responses follow the seed


def test_speed_scales_time_and_frequency():
    out = change_speed(_tone(400.0, 2.0), SR, 1.1)
    assert out.numel() == math.ceil(2 * SR / 1.1)
    assert abs(_peak_hz(out) - 440.0) < 1.5


@pytest.mark.parametrize("semitones", [-3.0, -1.0, 2.0])
def test_pitch_moves_the_frequency_and_keeps_the_duration(semitones):
    wave = _tone(440.0, 2.0)
    out = shift_pitch(wave, SR, semitones)
    assert out.numel() == wave.numel()
    expected = 440.0 * 2 ** (semitones / 12)
    assert abs(_peak_hz(out) - expected) / expected < 0.005  # the source rate is rounded to 100 Hz
    # the tone still fills the whole clip (a stretch, not a cut): both halves carry energy
    half = wave.numel() // 2
    assert float(out[:half].pow(2).mean()) > 0.5 * float(out[half:].pow(2).mean()) > 0


@pytest.mark.parametrize("kind", NOISE_KINDS)
def test_noise_is_added_at_the_requested_snr(kind):
    wave = _tone()
    noise = make_noise(kind, wave, torch.Generator().manual_seed(0))
    assert noise.shape == wave.shape
    out = add_noise_at_snr(wave, noise, 12.0)
    snr = 10 * math.log10(float(wave.pow(2).sum()) / float((out - wave).pow(2).sum()))
    assert abs(snr - 12.0) < 0.01


def test_noise_colours_tilt_the_spectrum():
    wave = torch.zeros(SR * 2)
    tilts = {}
    for kind in ("white", "pink", "brown"):
        noise = make_noise(kind, wave, torch.Generator().manual_seed(1))
        tilts[kind] = _band_energy(noise, 100, 500) / _band_energy(noise, 4000, 4400)  # equal 400 Hz bands
    assert 0.7 < tilts["white"] < 1.4
    assert tilts["pink"] > 3 * tilts["white"] and tilts["brown"] > 5 * tilts["pink"]
    with pytest.raises(ValueError, match="noise kind must be one of"):
        make_noise("blue", wave, torch.Generator())


def test_room_response_decays_60_db_per_rt60_at_the_given_drr():
    rt60, drr = 0.5, 4.0
    rir = synthetic_rir(SR, rt60, drr, 10, torch.Generator().manual_seed(0))
    assert rir[0] == 1.0 and float(rir[1:160].abs().max()) == 0.0  # direct path, then 10 ms of pre-delay
    tail = rir[1:].pow(2)
    assert abs(10 * math.log10(1.0 / float(tail.sum())) - drr) < 1e-3
    # Schroeder backward integration: the energy left after t falls 60 dB per RT60 (30 dB at RT60 / 2)
    left = torch.flip(torch.cumsum(torch.flip(tail, [0]), 0), [0])
    at = int(0.25 * SR)
    drop_db = 10 * math.log10(float(left[0]) / float(left[at]))
    assert 27.0 < drop_db < 33.0
    click = torch.zeros(SR)
    click[100] = 1.0
    out = apply_step(click, {"op": "reverb", "rt60": rt60, "drr_db": drr, "predelay_ms": 10}, SR,
                     torch.Generator().manual_seed(0))  # fmt: skip
    assert out.numel() == SR and float(out[100]) == pytest.approx(1.0) and float(out[:100].abs().max()) < 1e-6


def test_band_limits_remove_the_band_they_should():
    noise = make_noise("white", torch.zeros(SR * 2), torch.Generator().manual_seed(2))
    low = band_limit(noise, SR, "lowpass", 3000.0)
    assert low.numel() == noise.numel()
    assert _band_energy(low, 6000, 8000) < 1e-3 * _band_energy(noise, 6000, 8000)
    assert _band_energy(low, 300, 1500) > 0.8 * _band_energy(noise, 300, 1500)
    phone = band_limit(noise, SR, "telephone")
    assert phone.numel() == noise.numel()
    for lo, hi in ((20, 120), (4200, 8000)):
        assert _band_energy(phone, lo, hi) < 0.05 * _band_energy(noise, lo, hi), (lo, hi)
    assert _band_energy(phone, 800, 3000) > 0.5 * _band_energy(noise, 800, 3000)
    with pytest.raises(ValueError, match="cutoff_hz must be in"):
        band_limit(noise, SR, "lowpass", 9000.0)
    with pytest.raises(ValueError, match="mode must be 'lowpass' or 'telephone'"):
        band_limit(noise, SR, "radio")


@pytest.mark.parametrize(("mode", "bits"), [("mulaw", 4), ("mulaw", 7), ("linear", 5)])
def test_codec_quantises_to_its_levels(mode, bits):
    wave = _tone() + 0.01 * torch.randn(SR * 3 // 2, generator=torch.Generator().manual_seed(0))
    out = quantise(wave, mode, bits)
    assert out.shape == wave.shape
    assert 2 < out.unique().numel() <= 2**bits
    assert float((out - wave).abs().max()) < 0.5 * float(wave.abs().max())
    with pytest.raises(ValueError, match="bits must be in"):
        quantise(wave, mode, 0)


# -- each op against a naive expectation ------------------------------------------------------------------------
def _naive_mulaw(x: float, levels: int) -> float:
    """G.711-style mu-law by hand, one sample: compand, round to one of ``levels`` codes, expand."""
    mu = levels - 1
    companded = math.copysign(math.log1p(mu * abs(x)) / math.log1p(mu), x)
    code = math.floor((companded + 1) / 2 * mu + 0.5)
    y = code / mu * 2 - 1
    return math.copysign((math.exp(abs(y) * math.log1p(mu)) - 1) / mu, y)


def _naive_linear(x: float, levels: int) -> float:
    step = 2 / (levels - 1)
    return round((x + 1) / step) * step - 1


@pytest.mark.parametrize("factor", [0.88, 0.95, 1.03, 1.12])
def test_speed_changes_length_and_frequency_by_the_factor(factor):
    wave = _tone(500.0, 2.0)
    out = apply_step(wave, {"op": "speed", "factor": factor}, SR, torch.Generator())
    assert out.numel() == math.ceil(wave.numel() / factor)
    assert abs(_peak_hz(out) - 500.0 * factor) <= SR / out.numel()  # within one FFT bin


@pytest.mark.parametrize("cutoff", [2000.0, 3000.0, 4500.0, 6000.0])
def test_lowpass_follows_the_fourth_order_butterworth_response(cutoff):
    # Two cascaded Q=1/sqrt(2) biquads (bilinear transform, pre-warped): |H(f)|^2 = 1 / (1 + (tan(pi f / fs) /
    # tan(pi fc / fs))^4), squared. The power ratio out / in of white noise, per 250 Hz band, is that curve.
    noise = make_noise("white", torch.zeros(SR * 4), torch.Generator().manual_seed(2))
    out = apply_step(noise, {"op": "bandlimit", "mode": "lowpass", "cutoff_hz": cutoff}, SR, torch.Generator())
    assert out.numel() == noise.numel()
    freqs = torch.fft.rfftfreq(noise.numel(), 1 / SR).double()
    power_in, power_out = (torch.fft.rfft(w).abs().pow(2).double() for w in (noise, out))
    response = (1 / (1 + (torch.tan(math.pi * freqs / SR) / math.tan(math.pi * cutoff / SR)) ** 4)) ** 2
    for low in range(100, 7900, 250):
        band = (freqs >= low) & (freqs < low + 250)
        measured = float(power_out[band].sum() / power_in[band].sum())
        expected = float((response[band] * power_in[band]).sum() / power_in[band].sum())
        assert abs(measured - expected) < 5e-3, (low, measured, expected)
    # in words: -6 dB at the cut-off, and above 1.5 x the cut-off less than 1% of the energy is left
    assert _band_energy(out, cutoff - 50, cutoff + 50) == pytest.approx(
        0.25 * _band_energy(noise, cutoff - 50, cutoff + 50), rel=0.05
    )
    if 1.5 * cutoff < SR / 2:
        assert _band_energy(out, 1.5 * cutoff, SR / 2) < 0.01 * _band_energy(noise, 1.5 * cutoff, SR / 2)


@pytest.mark.parametrize("kind", NOISE_KINDS)
@pytest.mark.parametrize("snr_db", [5.0, 17.5, 30.0])
def test_planned_noise_lands_at_its_snr(kind, snr_db):
    wave = _tone() + 0.1 * _tone(1300.0)
    out = apply_step(wave, {"op": "noise", "kind": kind, "snr_db": snr_db}, SR, torch.Generator().manual_seed(3))
    assert out.shape == wave.shape
    signal, noise = float(wave.double().pow(2).sum()), float((out - wave).double().pow(2).sum())
    assert 10 * math.log10(signal / noise) == pytest.approx(snr_db, abs=0.05)


@pytest.mark.parametrize(("mode", "bits"), [("mulaw", 4), ("mulaw", 8), ("linear", 5), ("linear", 8)])
def test_codec_round_trip_keeps_length_and_matches_a_naive_quantiser(mode, bits):
    wave = 0.4 * torch.randn(3001, generator=torch.Generator().manual_seed(4)).clamp(-2.5, 2.5)
    out = apply_step(wave, {"op": "codec", "mode": mode, "bits": bits}, SR, torch.Generator())
    assert out.shape == wave.shape and out.dtype == wave.dtype
    peak = float(wave.abs().max())
    naive = _naive_mulaw if mode == "mulaw" else _naive_linear
    expected = torch.tensor([peak * naive(float(x) / peak, 2**bits) for x in wave])
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5 * peak)
    # quantising what is already quantised changes nothing
    torch.testing.assert_close(quantise(out, mode, bits), out, rtol=0, atol=1e-5 * peak)


def test_unknown_ops_and_modes_are_value_errors():
    rng = __import__("random").Random(0)
    with pytest.raises(ValueError, match="op must be one of"):
        draw_step("echo", rng)
    with pytest.raises(ValueError, match="step op must be one of"):
        apply_step(_tone(), {"op": "echo"}, SR, torch.Generator())
    with pytest.raises(ValueError, match="mode must be 'mulaw' or 'linear'"):
        quantise(_tone(), "alaw", 8)
