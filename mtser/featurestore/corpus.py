"""The one utterance record, and readers for MSP-Podcast folders, CSV/JSONL manifests and plain audio folders."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Utterance:
    """One utterance as every part of mtser sees it (corpus readers, extraction, store table, trainer)."""

    id: str                               # MSP-Podcast: the FileName as in the label file, e.g. "MSP-PODCAST_0001_0008.wav"
    path: str | None                      # audio file; None only for rows read back from a store
    split: str | None = None              # Train, Development, Test1, Test2, Test3 (None: unknown)
    emo_class: str | None = None          # A,S,H,U,F,D,C,N,O,X or None (unlabelled)
    arousal: float | None = None          # 1..7
    valence: float | None = None
    dominance: float | None = None
    speaker: str | None = None            # "Unknown" is kept as given
    gender: str | None = None
    transcript: str | None = None
    transcript_source: str | None = None  # "human", "asr", or None (no transcript yet)
    duration: float | None = None         # seconds, when known
    augmentation: str | None = None       # augmentation id for augmented copies ("aug1"), None for originals
    source_id: str | None = None          # the original utterance of an augmented copy
