"""Long recordings → speech segments for a timeline: Silero VAD's speech probabilities, streamed block by block, then
speech regions merged across short pauses and cut into pieces of [min_segment_s, max_segment_s] at the quietest
point; or a fixed grid of windows. Positions are sample indices at 16 kHz (the VAD's and the encoders' rate).

Silero VAD (`silero-vad` on PyPI) ships its model inside the package: nothing is downloaded at run time.
"""
from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from mtser.featurestore.config import TimelineConfig

VAD_WINDOW = 512           # samples per Silero VAD decision at 16 kHz (32 ms)
VAD_RATE = 16000
QUIET_SMOOTHING = 5        # windows averaged (160 ms) when looking for the quietest point to cut at


@dataclass(frozen=True)
class Span:
    """A segment of one recording: samples [start, end) at 16 kHz."""

    start: int
    end: int

    def seconds(self, rate: int) -> tuple[float, float]:
        return self.start / rate, self.end / rate

    def segment_id(self, file: str, rate: int) -> str:
        """`<file>#<start_ms>-<end_ms>`: how a segment is named in tables and in a feature store."""
        return f"{file}#{round(self.start * 1000 / rate)}-{round(self.end * 1000 / rate)}"


@dataclass
class SpeechActivity:
    """Per-window speech probability and RMS level of a whole recording (one value per 32 ms: small for hours)."""

    probs: np.ndarray
    rms: np.ndarray
    samples: int


def load_vad():
    """Silero VAD's TorchScript model from the package."""
    from silero_vad import load_silero_vad

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)        # torch.jit.load's deprecation notice
        return load_silero_vad()


def speech_activity(blocks: Iterable[np.ndarray], model) -> SpeechActivity:
    """Run the VAD over consecutive 16 kHz audio blocks as one stream (the model's state carries across blocks)."""
    import torch

    model.reset_states()
    probs, rms, total = [], [], 0
    with torch.inference_mode():
        for block in _windows(blocks):
            total += len(block)
            for i in range(0, len(block), VAD_WINDOW):
                chunk = block[i:i + VAD_WINDOW]
                rms.append(float(np.sqrt(np.mean(np.square(chunk, dtype=np.float64)))))
                if len(chunk) < VAD_WINDOW:
                    chunk = np.pad(chunk, (0, VAD_WINDOW - len(chunk)))
                probs.append(model(torch.from_numpy(chunk), VAD_RATE).item())
    return SpeechActivity(np.asarray(probs, np.float32), np.asarray(rms, np.float32), total)


def _windows(blocks: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
    """Re-cut blocks at multiples of the VAD window (the last one may be shorter)."""
    rest = np.zeros(0, np.float32)
    for block in blocks:
        data = np.concatenate([rest, block]) if rest.size else block
        cut = len(data) // VAD_WINDOW * VAD_WINDOW
        if cut:
            yield data[:cut]
        rest = data[cut:]
    if rest.size:
        yield rest


def plan_segments(activity: SpeechActivity, cfg: TimelineConfig) -> list[Span]:
    """The segments of one recording: `fixed` windows, or speech regions (VAD) merged across pauses shorter than
    `max_pause_s`, cut at the quietest point into pieces no longer than `max_segment_s` and no shorter than
    `min_segment_s` (a piece shorter than that is widened into the surrounding non-speech where there is room)."""
    if cfg.segment == "fixed":
        return fixed_segments(activity.samples, cfg)
    runs = _merge(speech_regions(activity, cfg), round(cfg.max_pause_s * VAD_RATE))
    lo, hi = round(cfg.min_segment_s * VAD_RATE), round(cfg.max_segment_s * VAD_RATE)
    level = _smoothed(activity.rms)
    pieces = [piece for run in runs for piece in _split(run, lo, hi, level)]
    return _widen(pieces, lo, activity.samples)


def speech_regions(activity: SpeechActivity, cfg: TimelineConfig) -> list[Span]:
    """Silero's own speech timestamps from the streamed probabilities (its thresholds and padding)."""
    from silero_vad import get_speech_timestamps_from_probs

    stamps = get_speech_timestamps_from_probs(
        activity.probs.tolist(), sampling_rate=VAD_RATE, threshold=cfg.vad_threshold,
        min_speech_duration_ms=round(cfg.min_speech_s * 1000), min_silence_duration_ms=100, speech_pad_ms=30,
        audio_length_samples=activity.samples)
    return [Span(int(s["start"]), int(s["end"])) for s in stamps]


def fixed_segments(samples: int, cfg: TimelineConfig) -> list[Span]:
    """Windows of `window_s` every `hop_s` from the start; the last one ends at the recording's end."""
    window, hop = round(cfg.window_s * VAD_RATE), round(cfg.hop_s * VAD_RATE)
    if samples <= window:
        return [Span(0, samples)] if samples else []
    spans = [Span(s, s + window) for s in range(0, samples - window + 1, hop)]
    if spans[-1].end < samples:
        spans.append(Span(samples - window, samples))
    return spans


def _merge(regions: list[Span], max_pause: int) -> list[Span]:
    runs: list[Span] = []
    for region in regions:
        if runs and region.start - runs[-1].end <= max_pause:
            runs[-1] = Span(runs[-1].start, region.end)
        else:
            runs.append(region)
    return runs


def _smoothed(rms: np.ndarray) -> np.ndarray:
    if rms.size == 0:
        return rms
    kernel = np.ones(QUIET_SMOOTHING) / QUIET_SMOOTHING
    return np.convolve(rms, kernel, mode="same")


def _split(run: Span, lo: int, hi: int, level: np.ndarray) -> list[Span]:
    """Cut a speech run into pieces of [lo, hi] samples, each cut in the quietest 32 ms window allowed."""
    pieces, start = [], run.start
    while run.end - start > hi:
        first, last = start + lo, min(start + hi, run.end - lo)
        a, b = -(-first // VAD_WINDOW), max(-(-first // VAD_WINDOW) + 1, last // VAD_WINDOW)
        window = a + int(np.argmin(level[a:b])) if a < min(b, len(level)) else a
        cut = min(max(window * VAD_WINDOW + VAD_WINDOW // 2, first), last)
        pieces.append(Span(start, cut))
        start = cut
    pieces.append(Span(start, run.end))
    return pieces


def _widen(pieces: list[Span], lo: int, samples: int) -> list[Span]:
    """Widen pieces shorter than `lo` equally into the non-speech around them, never into a neighbour."""
    out = []
    for i, piece in enumerate(pieces):
        missing = lo - (piece.end - piece.start)
        if missing <= 0:
            out.append(piece)
            continue
        left_room = piece.start - (out[-1].end if out else 0)
        right_room = (pieces[i + 1].start if i + 1 < len(pieces) else samples) - piece.end
        left = min(left_room, max(missing // 2, missing - right_room))
        right = min(right_room, missing - left)
        out.append(Span(piece.start - left, piece.end + right))
    return out


def cut_segments(blocks: Iterable[np.ndarray], spans: list[Span]) -> Iterator[tuple[Span, np.ndarray]]:
    """The samples of each span (sorted by start; spans may overlap) from a stream of blocks, holding no more of
    the recording than the longest span plus one block."""
    pending = sorted(spans, key=lambda s: (s.start, s.end))
    held, offset, i = np.zeros(0, np.float32), 0, 0
    for block in blocks:
        held = np.concatenate([held, block]) if held.size else block
        while i < len(pending) and pending[i].end <= offset + len(held):
            span = pending[i]
            yield span, np.array(held[span.start - offset:span.end - offset], dtype=np.float32)
            i += 1
        keep_from = (pending[i].start if i < len(pending) else offset + len(held)) - offset
        keep_from = min(max(keep_from, 0), len(held))
        held, offset = held[keep_from:], offset + keep_from
