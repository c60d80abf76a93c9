"""The per-utterance encoding pipeline: audio → (augmented copies) → speech / Whisper encoders (+ASR) → text encoders.

Used by extraction (`extract_worker.write_shard`, inside Ray actors) and by `mtser predict` (`encode_utterances`, in
process, no store). Knows nothing about shards, Ray or the store. Imports torch and transformers (via `audio` and
`encoders`). `load` (decode, resample, augment) and `encode` (the encoders) are separate steps so the extraction
can decode the next group of utterances while the current one runs through the encoders.

Memory is bounded by the batch, not by an utterance's length: every audio encoder runs on pieces of at most
`window_seconds` (speech) or 30 s (Whisper), batched by `batch_seconds`, and an utterance's frames are stitched from
its pieces (see `encoders.SpeechEncoder.pieces`). An utterance an encoder cannot encode (too short, out of memory,
any error) fails with that error as its reason; the others go on.
"""
from __future__ import annotations

import warnings
from collections import defaultdict
from dataclasses import dataclass, replace
from typing import NamedTuple, Sequence

import numpy as np

from mtser.featurestore.audio import AudioError, augment as augment_wave, augmentation_rng, load_audio
from mtser.featurestore.config import EncoderConfig, ExtractConfig
from mtser.featurestore.corpus import Utterance
from mtser.featurestore.encoders import (
    Piece, SpeechEncoder, TextEncoder, WhisperEncoder, load_encoder, run_batched,
)
from mtser.featurestore.files import CorpusFiles
from mtser.featurestore.frames import StoredFrames, store_frames


class Failure(NamedTuple):
    utt: Utterance
    stage: str                  # "read", "audio", "transcript", "encode:<encoder>", "store"
    reason: str


@dataclass
class Loaded:
    """Decoded audio of a list of utterances, ready for the encoders."""

    items: list[Utterance]      # originals (duration filled) each followed by its augmented copies
    waves: list[np.ndarray]
    source: list[int]           # source[i]: index of item i's original
    failed: dict[str, Failure]  # utterances (and their planned copies) whose audio could not be used


@dataclass
class PipelineResult:
    written: list[tuple[Utterance, dict[str, StoredFrames]]]   # StoreWriter.add takes these as they are
    failures: list[Failure]


def has_transcript(utt: Utterance) -> bool:
    return bool(utt.transcript and utt.transcript.strip())


class Pipeline:
    """Audio → (augmented copies) → speech/Whisper encoders (+ASR) → text encoders, for a list of utterances.
    Audio at URLs is read with `storage_options`."""

    def __init__(self, cfg: ExtractConfig, device: str = "cpu", storage_options: dict | None = None):
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        warnings.filterwarnings("ignore", message="Support for mismatched key_padding_mask")  # torch, on WavLM masks
        self.cfg, self.files = cfg, CorpusFiles(storage_options)
        self.encoders = {e.name: load_encoder(e, device, cfg.asr_language, cfg.asr_max_new_tokens)
                         for e in cfg.encoders}
        self.asr = next((n for n, e in self.encoders.items() if isinstance(e, WhisperEncoder) and e.cfg.asr), None)

    def run(self, utts: Sequence[Utterance], augment: int = 0) -> PipelineResult:
        return self.encode(self.load(utts, augment))

    def encode(self, loaded: Loaded) -> PipelineResult:
        """Run the encoders on decoded audio (the step that uses the device)."""
        items, waves, source, failed = loaded.items, loaded.waves, loaded.source, dict(loaded.failed)
        feats: list[dict[str, StoredFrames]] = [{} for _ in items]
        asr_text: dict[int, str] = {}
        for name, enc in self.encoders.items():
            if not isinstance(enc, TextEncoder):
                transcribe = [name == self.asr and source[i] == i and not has_transcript(u)
                              for i, u in enumerate(items)]
                for i, (frames, text) in self._encode_audio(name, enc, items, waves, transcribe, failed).items():
                    feats[i][name] = frames
                    if text is not None:
                        asr_text[i] = text
        items = [self._with_transcript(u, items[source[i]], asr_text.get(source[i])) for i, u in enumerate(items)]
        self._encode_texts(items, source, feats, failed)
        for i, u in enumerate(items):
            origin = items[source[i]]
            if u.id in failed:
                continue
            if origin.id in failed:
                failed[u.id] = Failure(u, failed[origin.id].stage, f"source utterance {origin.id} failed")
            elif u.transcript is None and any(isinstance(e, TextEncoder) for e in self.encoders.values()):
                failed[u.id] = Failure(u, "transcript", "no transcript and no whisper encoder with asr: true")
        written = [(u, feats[i]) for i, u in enumerate(items) if u.id not in failed]
        return PipelineResult(written, list(failed.values()))

    def _encode_audio(self, name: str, enc: SpeechEncoder | WhisperEncoder, items: list[Utterance],
                      waves: list[np.ndarray], transcribe: list[bool], failed: dict[str, Failure]
                      ) -> dict[int, tuple[StoredFrames, str | None]]:
        """(frames, ASR transcript or None) per item not failed yet: each wave cut into the encoder's pieces, the
        pieces batched by length across items, an item's frames its pieces' kept frames in order. An item that is
        too short for the encoder, or whose piece fails, is added to `failed` with the reason."""
        cfg, sr = self.cfg, self.cfg.sample_rate
        pieces: list[Piece] = []
        owner: list[int] = []
        for i, wave in enumerate(waves):
            if items[i].id in failed:
                continue
            try:
                cut = enc.pieces(wave, sr, cfg.window_seconds, cfg.window_context_seconds)
            except ValueError as exc:
                failed[items[i].id] = Failure(items[i], f"encode:{name}", str(exc))
                continue
            pieces += cut
            owner += [i] * len(cut)
        whisper = isinstance(enc, WhisperEncoder)
        inputs: list = [(p.wave, transcribe[owner[j]]) for j, p in enumerate(pieces)] if whisper else pieces
        batches = enc.batches([p.wave for p in pieces], cfg.batch_seconds, sr)
        results, errors = run_batched(lambda b: enc.forward(b, sr), inputs, batches)
        for j, reason in sorted(errors.items()):
            failed.setdefault(items[owner[j]].id, Failure(items[owner[j]], f"encode:{name}", reason))
        pieces_of: dict[int, list[int]] = defaultdict(list)
        for j, i in enumerate(owner):
            pieces_of[i].append(j)
        out: dict[int, tuple[StoredFrames, str | None]] = {}
        for i, rows in pieces_of.items():
            parts = [results.pop(j, None) for j in rows]
            if items[i].id in failed:
                continue
            text = None
            if whisper:
                text = " ".join(t for _, t in parts if t) if transcribe[i] else None
                parts = [f for f, _ in parts]
            out[i] = (self._as_stored(name, stitch(parts)), text)
        return out

    def _as_stored(self, name: str, frames: np.ndarray) -> StoredFrames:
        """Frames as the store keeps them (`frames.store_frames`), already in memory: a group's features are held
        until written, at the stored size."""
        return store_frames(frames, self.encoders[name].cfg.dtype)

    def load(self, utts: Sequence[Utterance], augment: int = 0) -> Loaded:
        """Decoded audio per utterance, then its augmented copies (CPU only: safe in a prefetch thread)."""
        cfg, sr = self.cfg, self.cfg.sample_rate
        failed: dict[str, Failure] = {}
        items: list[Utterance] = []
        waves: list[np.ndarray] = []
        source: list[int] = []
        for utt in utts:
            copies = range(1, augment + 1 if utt.split == "Train" else 1)
            try:
                if not utt.path:
                    raise AudioError("no audio path")
                wave = load_audio(utt.path, sr, self.files)
            except (AudioError, MemoryError) as exc:       # a recording too long to hold fails alone
                reason = str(exc) if isinstance(exc, AudioError) else f"out of memory decoding the audio: {exc}"
                failed[utt.id] = Failure(utt, "audio", reason)
                for copy in copies:                       # planned rows too: each is written or failed
                    aug = replace(utt, id=f"{utt.id}#aug{copy}", source_id=utt.id)
                    failed[aug.id] = Failure(aug, "audio", f"source utterance {utt.id} failed")
                continue
            origin = len(items)
            items.append(replace(utt, duration=len(wave) / sr))
            waves.append(wave)
            source.append(origin)
            for copy in copies:
                rng = augmentation_rng(cfg.seed, utt.id, copy)
                noisy, draw = augment_wave(wave, sr, rng, copy, cfg.augment_snr_db, cfg.augment_rt60_s, cfg.augment_gain_db)
                items.append(replace(utt, id=f"{utt.id}#aug{copy}", augmentation=draw.label, source_id=utt.id,
                                     duration=len(noisy) / sr))
                waves.append(noisy)
                source.append(origin)
        return Loaded(items, waves, source, failed)

    @staticmethod
    def _with_transcript(utt: Utterance, origin: Utterance, asr: str | None) -> Utterance:
        if has_transcript(origin):
            return replace(utt, transcript=origin.transcript.strip(), transcript_source=origin.transcript_source or "human")
        if asr is not None:
            return replace(utt, transcript=asr, transcript_source="asr")
        return replace(utt, transcript=None, transcript_source=None)

    def _encode_texts(self, items: list[Utterance], source: list[int], feats: list[dict[str, StoredFrames]],
                      failed: dict[str, Failure]) -> None:
        """Text features for originals with a transcript; augmented copies share their original's."""
        rows = [i for i, u in enumerate(items) if source[i] == i and u.transcript is not None and u.id not in failed]
        texts = [items[i].transcript for i in rows]
        if not texts:                                   # tokenizers refuse an empty batch (IndexError)
            return
        for name, enc in self.encoders.items():
            if not isinstance(enc, TextEncoder):
                continue
            results, errors = run_batched(lambda b, e=enc: e.forward(b, self.cfg.sample_rate), texts,
                                          enc.batches(texts, self.cfg.batch_seconds, self.cfg.sample_rate))
            for j, out in results.items():
                feats[rows[j]][name] = self._as_stored(name, out)
            for j, reason in errors.items():
                failed.setdefault(items[rows[j]].id, Failure(items[rows[j]], f"encode:{name}", reason))
            for i in range(len(items)):
                if source[i] != i and name in feats[source[i]]:
                    feats[i][name] = feats[source[i]][name]


def stitch(parts: list[np.ndarray]) -> np.ndarray:
    """The pieces' frames ((T, D) or (T, L, D)) one after another, each piece released as soon as it is copied
    (`parts` is emptied), so a long utterance's frames are held about once, not twice."""
    if len(parts) == 1:
        return parts.pop()
    out = np.empty((sum(len(p) for p in parts), *parts[0].shape[1:]), dtype=parts[0].dtype)
    row = 0
    while parts:
        piece = parts.pop(0)
        out[row: row + len(piece)] = piece
        row += len(piece)
    return out


def encode_utterances(encoders: list[EncoderConfig], utts: list[Utterance], device: str = "cpu",
                      batch_seconds: float = 60.0, *, asr_language: str = "en", asr_max_new_tokens: int = 128,
                      storage_options: dict | None = None
                      ) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, Utterance], dict[str, str]]:
    """In-process extraction (no Ray, no store): features[id][encoder] as float32 (T, D) values ((T, L, D) for
    an encoder with `layers`) exactly as a reader
    of a store with these encoders gets them (`frames.as_stored`: float16 rounded, int8 quantised), the utterances
    with transcript/transcript_source/duration filled, and failures[id] = "stage: reason"."""
    cfg = ExtractConfig(encoders=encoders, batch_seconds=batch_seconds, asr_language=asr_language,
                        asr_max_new_tokens=asr_max_new_tokens)
    result = Pipeline(cfg, device, storage_options).run(utts)
    features = {u.id: {k: v.decode(np.float32) for k, v in f.items()} for u, f in result.written}
    return features, {u.id: u for u, _ in result.written}, {f.utt.id: f"{f.stage}: {f.reason}" for f in result.failures}
