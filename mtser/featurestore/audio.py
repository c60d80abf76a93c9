"""Audio in: decode, downmix, resample to the encoders' rate, validate; and the training augmentation.

`load_audio` changes nothing but channel count and sample rate. Anything that makes an utterance unusable raises
`AudioError` whose message is the reason (missing file, unreadable, empty, non-finite samples, all-silent), so the
extraction records it and moves on. Paths may be fsspec URLs (read through `files.CorpusFiles`: one request per
file for its samples, small ranged reads for a header); messages name the path or URL.
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
import numpy as np
import soundfile
import torch
import torchaudio.functional as AF

from mtser.errors import DataError
from mtser.featurestore.files import CorpusFiles, is_url

SILENCE_PEAK = 1e-5  # below -100 dBFS everywhere counts as all-silent
HEADER_READERS = 16  # concurrent header reads of audio at URLs (durations for shard planning)


class AudioError(DataError):
    """An utterance's audio cannot be used; the message is the reason."""


def audio_duration(path: str, files: CorpusFiles | None = None) -> float:
    """Seconds of audio from the file header (0.0 when the header cannot be read; loading reports why)."""
    files = files or CorpusFiles()
    try:
        source = files.open_header(path)
        try:
            info = soundfile.info(source)
        finally:
            if hasattr(source, "close"):
                source.close()
    except (OSError, RuntimeError, soundfile.LibsndfileError):
        return 0.0
    return info.frames / info.samplerate if info.samplerate else 0.0


def audio_durations(paths: Sequence[str], files: CorpusFiles | None = None) -> list[float]:
    """`audio_duration` of each path; URLs' headers are fetched concurrently (one small ranged read each)."""
    files = files or CorpusFiles()
    if not any(is_url(p) for p in paths):
        return [audio_duration(p, files) for p in paths]
    with ThreadPoolExecutor(max_workers=HEADER_READERS) as pool:
        return list(pool.map(lambda p: audio_duration(p, files), paths))


def load_audio(path: str, sample_rate: int = 16000, files: CorpusFiles | None = None) -> np.ndarray:
    """Mono float32 samples at `sample_rate`: channels averaged, resampled with torchaudio, nothing else changed.
    A mono file at `sample_rate` is held once (4 bytes per sample; the checks make no full-length temporaries)."""
    files = files or CorpusFiles()
    try:
        if not is_url(path) and not files.fs(path).isfile(path):   # a URL's absence shows when it is read
            raise FileNotFoundError(path)
        source = files.open_whole(path)
    except FileNotFoundError:
        raise AudioError(f"audio file not found: {path}") from None
    except OSError as exc:
        raise AudioError(f"cannot read {path}: {type(exc).__name__}: {exc}") from None
    try:
        samples, rate = soundfile.read(source, dtype="float32", always_2d=True)
    except (OSError, RuntimeError, soundfile.LibsndfileError) as exc:
        detail = f"{path}: {getattr(exc, 'error_string', exc)}" if is_url(path) else exc   # not the buffer's repr
        raise AudioError(f"unreadable or corrupt audio: {detail}") from None
    if samples.size == 0:
        raise AudioError("empty audio (0 samples)")
    if not (np.isfinite(samples.min()) and np.isfinite(samples.max())):     # min/max propagate NaN
        raise AudioError("audio has NaN/Inf samples")
    mono = samples[:, 0] if samples.shape[1] == 1 else samples.mean(axis=1)
    if max(float(mono.max()), -float(mono.min())) < SILENCE_PEAK:
        raise AudioError("all-silent audio (peak below -100 dBFS)")
    if rate != sample_rate:
        mono = AF.resample(torch.from_numpy(mono), rate, sample_rate).numpy()
    return np.ascontiguousarray(mono, dtype=np.float32)


def stream_audio(path: str, sample_rate: int = 16000, block_seconds: float = 60.0,
                 files: CorpusFiles | None = None) -> Iterator[np.ndarray]:
    """`load_audio`'s samples in consecutive blocks of about `block_seconds`, decoded and resampled block by block,
    so a recording of any length is never held whole. Blocks are resampled with a margin of real neighbouring
    samples on each side (cut off afterwards) and start at multiples of the rate ratio's period, so the
    concatenated blocks equal one resampling of the whole file up to float rounding. Raises `AudioError` like
    `load_audio` (an all-silent file is not an error here: a timeline reports it as having no speech)."""
    files = files or CorpusFiles()
    try:
        if not is_url(path) and not files.fs(path).isfile(path):
            raise FileNotFoundError(path)
        sound = soundfile.SoundFile(files.open_stream(path))
    except FileNotFoundError:
        raise AudioError(f"audio file not found: {path}") from None
    except (OSError, RuntimeError, soundfile.LibsndfileError) as exc:
        raise AudioError(f"unreadable or corrupt audio: {path}: {getattr(exc, 'error_string', exc)}") from None
    with sound:
        rate = sound.samplerate
        if sound.frames == 0:
            raise AudioError("empty audio (0 samples)")
        period = rate // math.gcd(rate, sample_rate)          # input samples per whole number of output samples
        block = max(1, round(block_seconds * rate / period)) * period
        margin = 0 if rate == sample_rate else period * max(1, math.ceil(0.05 * rate / period))  # >= 50 ms
        out_per_period = sample_rate * period // rate
        previous = np.zeros(0, np.float32)                    # the margin before the current block
        current = _read_mono(sound, block, path)
        while current.size:
            following = _read_mono(sound, block, path)
            if rate == sample_rate:
                yield current
            else:
                ahead = following[:margin]
                window = np.concatenate([previous, current, ahead])
                resampled = AF.resample(torch.from_numpy(window), rate, sample_rate).numpy()
                start = len(previous) // period * out_per_period
                count = math.ceil(len(current) * sample_rate / rate)
                yield np.ascontiguousarray(resampled[start:start + count], dtype=np.float32)
            previous = current[-margin:] if margin else previous
            current = following


def _read_mono(sound: soundfile.SoundFile, frames: int, path: str) -> np.ndarray:
    try:
        samples = sound.read(frames, dtype="float32", always_2d=True)
    except (OSError, RuntimeError, soundfile.LibsndfileError) as exc:
        raise AudioError(f"unreadable or corrupt audio: {path}: {getattr(exc, 'error_string', exc)}") from None
    if not np.isfinite(samples).all():
        raise AudioError("audio has NaN/Inf samples")
    return samples.mean(axis=1) if samples.size else np.zeros(0, np.float32)


# ------------------------------------------------------------------------------------------------------- augmentation
@dataclass(frozen=True)
class Augmentation:
    """The random draw of one augmented copy (recorded in the utterance table)."""

    copy: int           # 1..K
    snr_db: float
    rt60_s: float
    gain_db: float

    @property
    def label(self) -> str:
        return f"aug{self.copy};snr_db={self.snr_db:.2f};rt60_s={self.rt60_s:.3f};gain_db={self.gain_db:.2f}"


def augmentation_rng(seed: int, utt_id: str, copy: int) -> np.random.Generator:
    """A generator that depends only on (seed, utterance id, copy), never on shard or worker."""
    digest = hashlib.sha256(f"{seed}\0{utt_id}\0{copy}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def augment(
    wave: np.ndarray, sample_rate: int, rng: np.random.Generator, copy: int,
    snr_db: tuple[float, float], rt60_s: tuple[float, float], gain_db: tuple[float, float],
) -> tuple[np.ndarray, Augmentation]:
    """Reverberate with a synthetic room impulse response, add white noise at a random SNR, apply a random gain."""
    draw = Augmentation(copy, float(rng.uniform(*snr_db)), float(rng.uniform(*rt60_s)), float(rng.uniform(*gain_db)))
    rir = synthetic_rir(sample_rate, draw.rt60_s, rng)
    x = torch.from_numpy(wave.astype(np.float32))
    wet = AF.fftconvolve(x, torch.from_numpy(rir))[: x.numel()]
    wet = wet * (x.norm() / wet.norm().clamp_min(1e-12))            # keep the dry signal's energy
    signal_power = float(wet.pow(2).mean())
    noise = torch.from_numpy(rng.standard_normal(x.numel()).astype(np.float32))
    noise = noise * np.sqrt(signal_power / 10 ** (draw.snr_db / 10))
    out = (wet + noise) * 10 ** (draw.gain_db / 20)
    return out.numpy().astype(np.float32), draw


def synthetic_rir(sample_rate: int, rt60_s: float, rng: np.random.Generator) -> np.ndarray:
    """Exponentially decaying noise tail (60 dB down after rt60) behind a unit direct path."""
    n = max(2, int(rt60_s * sample_rate))
    t = np.arange(n) / sample_rate
    tail = rng.standard_normal(n) * np.exp(-6.908 * t / rt60_s) * 0.3
    tail[0] = 1.0
    return tail.astype(np.float32)
