"""The feature store's settings as typed dataclasses: the encoders, extraction and the segmentation of long recordings.

They load through the generic loader (`mtser.configio`) as the `extract` section of a recipe (`mtser.trainer.config`)
or on their own; each checks its own values. Imports no torch, no Ray and no trainer code.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from mtser.configio import ConfigError


@dataclass
class EncoderConfig:
    """One frozen encoder whose per-frame (or per-token) states are stored."""

    name: str                                   # key in the store, e.g. "wavlm"
    kind: Literal["speech", "whisper", "text"]  # speech SSL model, Whisper encoder (+ASR), text model on transcripts
    model: str                                  # hub id or local directory, loaded with from_pretrained
    revision: str | None = None                 # hub revision; local directories are content-hashed instead
    layer: int = -1                             # hidden-state index (-1 = last layer)
    mean_last_k: int = 1                        # >1: mean of the last K layers (then `layer` must stay -1)
    layers: list[int] | Literal["all"] | None = None   # several hidden states side by side, (T, L, D) per utterance
                                                # (0 = embeddings, negative from the end); not with the two above
    dtype: Literal["float16", "float32", "int8"] = "float16"   # as stored
    compute_dtype: Literal["float32", "bfloat16", "float16"] | None = None  # forward pass; None: bfloat16 on CUDA,
                                                                            # float32 on CPU (see resolve_compute_dtype)
    compression: Literal["none", "zstd"] = "none"
    asr: bool = False                           # whisper only: transcribe utterances that have no transcript
    pad_to_30s: bool = True                     # whisper only: pad to the 30 s the model was trained on
    max_tokens: int = 512                       # text only: truncate transcripts to this many tokens

    def __post_init__(self) -> None:
        if self.kind == "whisper" and not self.pad_to_30s:
            raise ConfigError(f"{self.name}.pad_to_30s: false is not supported (the transformers Whisper encoder "
                              "requires 3000 mel frames, i.e. 30 s)")
        if self.mean_last_k > 1 and self.layer != -1:
            raise ConfigError(f"cannot be combined with layer={self.layer}", "mean_last_k")
        if self.mean_last_k < 1:
            raise ConfigError(f"must be >= 1, got {self.mean_last_k}", "mean_last_k")
        if self.layers is not None and (self.layer != -1 or self.mean_last_k != 1):
            raise ConfigError(f"cannot be combined with layer={self.layer} or mean_last_k={self.mean_last_k} (one "
                              "stored state); list the hidden states in layers instead", "layers")
        if self.layers == []:
            raise ConfigError("empty; give 'all' or a list of hidden-state indices", "layers")
        if self.asr and self.kind != "whisper":
            raise ConfigError("only a whisper encoder can transcribe", "asr")


def resolve_compute_dtype(enc: EncoderConfig, device: str) -> str:
    """The dtype `enc`'s forward pass runs in on `device`: as configured, else bfloat16 on CUDA, float32 on CPU."""
    if enc.compute_dtype is not None:
        return enc.compute_dtype
    return "bfloat16" if device.startswith("cuda") else "float32"


def model_candidates(model: str, config_dir: Path) -> list[Path]:
    """The folders a config's encoder `model` may name, in the order they are tried: an absolute path itself; a
    relative one beside the config file, then in the current directory."""
    path = Path(model).expanduser()
    return [path] if path.is_absolute() else [config_dir.absolute() / path, Path.cwd() / path]


@dataclass
class ExtractConfig:
    encoders: list[EncoderConfig]
    sample_rate: int = 16000
    batch_seconds: float = 120.0                # total audio seconds per length-sorted batch
    shard_seconds: float = 3600.0               # audio seconds per shard (the unit of work and of writing)
    augment: int = 0                            # extra augmented copies per training utterance
    augment_snr_db: tuple[float, float] = (5.0, 20.0)
    augment_gain_db: tuple[float, float] = (-5.0, 5.0)
    augment_rt60_s: tuple[float, float] = (0.2, 0.8)
    asr_language: str = "en"
    asr_max_new_tokens: int = 128
    # speech encoders: an utterance longer than window_seconds is encoded in windows of that length overlapping by
    # 2 × window_context_seconds, each keeping its central frames (self-attention over a whole recording is quadratic)
    window_seconds: float = 30.0
    window_context_seconds: float = 5.0
    seed: int = 0

    def __post_init__(self) -> None:
        names = [e.name for e in self.encoders]
        if len(set(names)) != len(names):
            raise ConfigError(f"duplicate encoder names {names}", "encoders")
        for name in ("sample_rate", "batch_seconds", "shard_seconds", "asr_max_new_tokens"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: must be positive, got {getattr(self, name)}")
        if self.augment < 0:
            raise ConfigError(f"augment: must be >= 0, got {self.augment}")
        for name in ("augment_snr_db", "augment_gain_db", "augment_rt60_s"):
            low, high = getattr(self, name)
            if low > high:
                raise ConfigError(f"{name}: need low <= high, got [{low}, {high}]")
        window, context = self.window_seconds, self.window_context_seconds
        if not (math.isfinite(context) and context >= 0):
            raise ConfigError(f"must be a finite number >= 0, got {context}", "window_context_seconds")
        if not (math.isfinite(window) and window > 2 * context):
            raise ConfigError(f"must be finite and longer than 2 × window_context_seconds ({2 * context:g} s), "
                              f"got {window}", "window_seconds")


@dataclass
class TimelineConfig:
    """`mtser predict --timeline`: how long recordings are cut into segments (defaults from MSP-Podcast, whose
    utterances are mostly 2-12 s)."""

    segment: Literal["vad", "fixed"] = "vad"    # vad: Silero VAD speech regions; fixed: a regular grid of windows
    min_segment_s: float = 2.0                  # vad: shorter pieces are widened into the surrounding non-speech
    max_segment_s: float = 12.0                 # vad: longer speech is cut at the quietest point in range
    max_pause_s: float = 0.5                    # vad: speech regions closer than this are one segment (if it fits)
    min_speech_s: float = 0.25                  # vad: shorter speech islands are ignored
    vad_threshold: float = 0.5                  # vad: Silero's speech probability threshold
    window_s: float = 4.0                       # fixed: window length
    hop_s: float = 2.0                          # fixed: window start every hop_s
    block_s: float = 60.0                       # audio decoded at a time (memory is bounded by this, not the file)
    batch_seconds: float = 60.0                 # audio seconds per encoder batch

    def __post_init__(self) -> None:
        for name in ("min_segment_s", "max_segment_s", "window_s", "hop_s", "block_s", "batch_seconds"):
            value = getattr(self, name)
            if not (value > 0 and value < float("inf")):
                raise ConfigError(f"must be a positive number of seconds, got {value}", name)
        for name in ("max_pause_s", "min_speech_s"):
            if not 0 <= getattr(self, name) < float("inf"):
                raise ConfigError(f"must be >= 0 seconds, got {getattr(self, name)}", name)
        if not self.max_segment_s >= 2 * self.min_segment_s:
            raise ConfigError(f"must be at least twice min_segment_s (so that any speech run can be cut into allowed "
                              f"pieces), got {self.max_segment_s} < 2 × {self.min_segment_s}", "max_segment_s")
        if not 0 < self.vad_threshold < 1:
            raise ConfigError(f"must be in (0, 1), got {self.vad_threshold}", "vad_threshold")
        if self.hop_s > self.window_s:
            raise ConfigError(f"must not exceed window_s ({self.window_s}), got {self.hop_s}", "hop_s")
