"""Audio loading (downmix, resample, validation) and the training augmentation."""
from __future__ import annotations

import numpy as np
import pytest
import soundfile
import torch
import torchaudio.functional as AF

from mtser.featurestore.audio import AudioError, audio_duration, augment, augmentation_rng, load_audio


def _tone(seconds: float, rate: int, freq: float = 220.0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def test_stereo_44k_is_downmixed_and_resampled_only(tmp_path):
    left, right = _tone(1.5, 44100, 220.0), _tone(1.5, 44100, 330.0)
    path = tmp_path / "stereo.wav"
    soundfile.write(path, np.stack([left, right], axis=1), 44100, subtype="FLOAT")
    wave = load_audio(str(path), 16000)
    expected = AF.resample(torch.from_numpy((left + right) / 2), 44100, 16000).numpy()
    assert wave.dtype == np.float32 and wave.shape == (24000,)
    np.testing.assert_allclose(wave, expected, atol=1e-6)
    assert audio_duration(str(path)) == pytest.approx(1.5)


def test_16k_mono_is_returned_unchanged(tmp_path):
    tone = _tone(0.5, 16000)
    soundfile.write(tmp_path / "a.wav", tone, 16000, subtype="FLOAT")
    np.testing.assert_array_equal(load_audio(str(tmp_path / "a.wav")), tone)


@pytest.mark.parametrize("case, reason", [
    ("missing", "not found"), ("corrupt", "unreadable or corrupt"), ("empty", "empty audio"),
    ("silent", "all-silent"), ("nan", "NaN/Inf"),
])
def test_unusable_audio_raises_with_reason(tmp_path, case, reason):
    path = tmp_path / f"{case}.wav"
    if case == "corrupt":
        path.write_bytes(b"RIFF\x00\x01\x00\x00WAVEjunkjunkjunk" * 4)
    elif case == "empty":
        soundfile.write(path, np.zeros(0, dtype=np.float32), 16000)
    elif case == "silent":
        soundfile.write(path, np.zeros(16000, dtype=np.float32), 16000)
    elif case == "nan":
        wave = _tone(0.5, 16000)
        wave[100] = np.nan
        soundfile.write(path, wave, 16000, subtype="FLOAT")
    with pytest.raises(AudioError, match=reason):
        load_audio(str(path))


def test_augmentation_is_seeded_and_within_ranges():
    wave = _tone(2.0, 16000)
    ranges = dict(snr_db=(5.0, 20.0), rt60_s=(0.2, 0.8), gain_db=(-5.0, 5.0))
    a, draw_a = augment(wave, 16000, augmentation_rng(0, "utt1", 1), 1, **ranges)
    b, draw_b = augment(wave, 16000, augmentation_rng(0, "utt1", 1), 1, **ranges)
    c, draw_c = augment(wave, 16000, augmentation_rng(0, "utt1", 2), 2, **ranges)
    np.testing.assert_array_equal(a, b)
    assert draw_a == draw_b and draw_a != draw_c and not np.allclose(a, c)
    assert a.shape == wave.shape and a.dtype == np.float32
    for draw in (draw_a, draw_c):
        assert 5 <= draw.snr_db <= 20 and 0.2 <= draw.rt60_s <= 0.8 and -5 <= draw.gain_db <= 5
    assert draw_a.label.startswith("aug1;snr_db=")
    # Gain: the output's energy is the reverberant signal's plus the noise's, scaled by the drawn gain.
    expected_power = float(np.mean(wave ** 2)) * (1 + 10 ** (-draw_a.snr_db / 10)) * 10 ** (draw_a.gain_db / 10)
    assert float(np.mean(a ** 2)) == pytest.approx(expected_power, rel=0.05)


def test_augmentation_adds_noise_at_the_drawn_snr():
    wave = _tone(3.0, 16000)
    rng = augmentation_rng(3, "x", 1)
    out, draw = augment(wave, 16000, rng, 1, snr_db=(10.0, 10.0), rt60_s=(0.3, 0.3), gain_db=(0.0, 0.0))
    # Re-run the same draw without noise (SNR 200 dB) to separate the reverberant signal from the noise.
    clean, _ = augment(wave, 16000, augmentation_rng(3, "x", 1), 1, snr_db=(200.0, 200.0), rt60_s=(0.3, 0.3),
                       gain_db=(0.0, 0.0))
    noise = out - clean
    snr = 10 * np.log10(np.mean(clean ** 2) / np.mean(noise ** 2))
    assert snr == pytest.approx(10.0, abs=0.3)
    assert not np.allclose(clean, wave, atol=1e-3)        # reverberation changed the signal
