"""The one utterance record, and readers for MSP-Podcast folders, CSV/JSONL manifests and plain audio folders.

Every reader returns a `CorpusReadResult`: the valid utterances plus one `CorpusProblem` per skipped row or
degraded item, printed as `Labels/labels_consensus.csv:17: MSP-PODCAST_0003_0002.wav: unknown class code 'Q'`.
Rows are checked for: a missing audio file, an unknown class code, an attribute that is not a number or lies
outside 1..7, a duplicate id (the first row wins), an unknown split name, a wrong number of CSV fields. A missing
required column is reported once and no rows of that file are read. Content never raises; only a path that is not
a corpus at all raises `CorpusError`. Readers do not open audio (durations stay None).
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from mtser.featurestore.labels import ALL_CLASS_CODES, ATTRIBUTE_RANGE, ATTRIBUTES, SPLITS


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


AUDIO_SUFFIXES: tuple[str, ...] = (".wav", ".flac", ".mp3", ".ogg")
MSP_LABELS = "Labels/labels_consensus.csv"
MSP_REQUIRED = ("FileName", "EmoClass", "EmoAct", "EmoVal", "EmoDom", "Split_Set")  # SpkrID, Gender optional
MANIFEST_REQUIRED = ("id", "path")


class CorpusError(ValueError):
    """The corpus path itself cannot be read (missing, or not a corpus of any known layout)."""


@dataclass(frozen=True)
class CorpusProblem:
    """One skipped row or degraded item: where it is, which item, why."""

    source: str                 # file, relative to the corpus root for MSP-Podcast
    line: int | None            # 1-based line in `source`, None for whole-file or per-file problems
    item: str | None            # utterance id (or file) concerned
    reason: str

    def __str__(self) -> str:
        where = f"{self.source}:{self.line}" if self.line is not None else self.source
        return ": ".join(part for part in (where, self.item, self.reason) if part)


@dataclass
class CorpusReadResult:
    layout: str                 # "msp-podcast", "manifest" or "folder"
    utterances: list[Utterance] = field(default_factory=list)
    problems: list[CorpusProblem] = field(default_factory=list)


Row = tuple[int, dict[str, Any], str | None]  # line number, raw row, row-level format error


class _RowError(ValueError):
    """A row is invalid; the message is the reason reported for it."""


def read_corpus(path: str | Path) -> CorpusReadResult:
    """Read any supported corpus: an MSP-Podcast folder (has Labels/labels_consensus.csv), a .csv/.jsonl manifest,
    or a plain folder of audio files."""
    path = Path(path)
    if not path.exists():
        raise CorpusError(f"{path}: no such file or folder")
    if path.is_dir():
        return read_msp_podcast(path) if (path / MSP_LABELS).is_file() else read_folder(path)
    if path.suffix.lower() in (".csv", ".jsonl"):
        return read_manifest(path)
    raise CorpusError(f"{path}: not a corpus (expected a folder, or a .csv / .jsonl manifest)")


# ------------------------------------------------------------------------------------------------------ MSP-Podcast
def read_msp_podcast(root: str | Path) -> CorpusReadResult:
    """Read an MSP-Podcast release: `Labels/labels_consensus.csv`, `Audios/*.wav`, `Transcripts/<name>.txt`.

    Utterances come sorted by id. Rows get their transcript (source "human") when the .txt exists. Empty label
    cells mean unlabelled, so Test3 rows with empty labels are read as they are. Audio files without a row in the
    label file (the 2025 release ships Test3 that way) are kept unlabelled: split "Test3" when the name contains
    "test3", otherwise no split plus a problem saying so. A transcript that is empty or not UTF-8 keeps the
    utterance without transcript (Whisper can transcribe it) and is reported. Invalid rows are reported and
    skipped; the read never raises on content, only when `root` has no label file (`CorpusError`).
    """
    root = Path(root)
    labels = root / MSP_LABELS
    if not labels.is_file():
        raise CorpusError(f"{root}: not an MSP-Podcast folder (no {MSP_LABELS})")
    result = CorpusReadResult("msp-podcast")
    audio_names = _file_names(root / "Audios")
    transcript_names = _file_names(root / "Transcripts")
    columns = {"split": "Split_Set", "emo_class": "EmoClass", "arousal": "EmoAct", "valence": "EmoVal",
               "dominance": "EmoDom", "speaker": "SpkrID", "gender": "Gender"}

    def build(item: str, row: dict[str, Any]) -> Utterance:
        if item not in audio_names:
            raise _RowError(f"audio file Audios/{item} not found")
        return _make_utterance(item, str(root / "Audios" / item), {k: row.get(c) for k, c in columns.items()}, columns)

    rows = _csv_rows(labels, MSP_LABELS, MSP_REQUIRED, result.problems)
    if rows is None:  # nothing can be trusted without the label file, Test3 audio included
        return result
    listed = _collect(result, MSP_LABELS, rows, "FileName", build)
    for name in sorted(audio_names - listed):
        if Path(name).suffix.lower() not in AUDIO_SUFFIXES:
            continue
        split = "Test3" if "test3" in name.lower() else None
        if split is None:
            result.problems.append(CorpusProblem(
                "Audios", None, name, f"not in {MSP_LABELS}; kept unlabelled with no split"))
        result.utterances.append(Utterance(id=name, path=str(root / "Audios" / name), split=split))
    result.utterances = [_with_transcript(u, root, transcript_names, result.problems) for u in result.utterances]
    result.utterances.sort(key=lambda u: u.id)
    return result


def _with_transcript(utt: Utterance, root: Path, transcript_names: set[str],
                     problems: list[CorpusProblem]) -> Utterance:
    name = Path(utt.id).stem + ".txt"
    if name not in transcript_names:
        return utt
    source = f"Transcripts/{name}"
    try:
        text = " ".join((root / "Transcripts" / name).read_bytes().decode("utf-8").split())
    except UnicodeDecodeError as exc:
        problems.append(CorpusProblem(source, None, utt.id, f"not UTF-8 (byte {exc.start}); kept without transcript"))
        return utt
    if not text:
        problems.append(CorpusProblem(source, None, utt.id, "empty transcript; kept without transcript"))
        return utt
    return replace(utt, transcript=text, transcript_source="human")


def _file_names(folder: Path) -> set[str]:
    if not folder.is_dir():
        return set()
    with os.scandir(folder) as entries:
        return {e.name for e in entries if e.is_file()}


# --------------------------------------------------------------------------------------------------------- manifest
MANIFEST_LABEL_KEYS = ("split", "emo_class", "arousal", "valence", "dominance", "speaker", "gender")


def read_manifest(path: str | Path) -> CorpusReadResult:
    """Read a CSV (header row) or JSONL (one object per line) manifest.

    Keys: `id`, `path` (relative to the manifest's folder, or absolute) are required; `split`, `emo_class`,
    `arousal`, `valence`, `dominance`, `speaker`, `gender`, `transcript` are optional (empty or null = unknown);
    other keys are ignored. A non-empty transcript gets source "human". Invalid rows are reported and skipped.
    """
    path = Path(path)
    result = CorpusReadResult("manifest")
    source = str(path)
    if path.suffix.lower() == ".jsonl":
        rows = _jsonl_rows(path, source, result.problems)
    else:
        rows = _csv_rows(path, source, MANIFEST_REQUIRED, result.problems)
    if rows is None:
        return result
    columns = {key: key for key in MANIFEST_LABEL_KEYS}

    def build(item: str, row: dict[str, Any]) -> Utterance:
        audio = _text(row.get("path"))
        if audio is None:
            raise _RowError("empty path")
        audio_path = Path(audio) if Path(audio).is_absolute() else path.parent / audio
        if not audio_path.is_file():
            raise _RowError(f"audio file {audio_path} not found")
        utt = _make_utterance(item, str(audio_path), {k: row.get(k) for k in columns}, columns)
        text = " ".join(str(row.get("transcript") or "").split())
        return replace(utt, transcript=text, transcript_source="human") if text else utt

    _collect(result, source, rows, "id", build)
    return result


def _jsonl_rows(path: Path, source: str, problems: list[CorpusProblem]) -> list[Row] | None:
    """(line, object, None) per valid JSONL line; other lines are reported. None (reported) when unreadable."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        problems.append(CorpusProblem(source, None, None, f"cannot read: {exc}"))
        return None
    rows: list[Row] = []
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as exc:
            problems.append(CorpusProblem(source, number, None, f"not valid JSON: {exc.msg}"))
            continue
        if not isinstance(row, dict):
            problems.append(CorpusProblem(source, number, None, "expected a JSON object"))
            continue
        missing = [key for key in MANIFEST_REQUIRED if key not in row]
        if missing:
            problems.append(CorpusProblem(source, number, str(row.get("id") or "") or None,
                                          f"missing required key(s) {', '.join(missing)}"))
            continue
        rows.append((number, row, None))
    return rows


# ----------------------------------------------------------------------------------------------------------- folder
def read_folder(root: str | Path) -> CorpusReadResult:
    """Every audio file (.wav, .flac, .mp3, .ogg, any depth) under `root`, unlabelled; id = path relative to root."""
    root = Path(root)
    result = CorpusReadResult("folder")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file())
    result.utterances = [Utterance(id=p.relative_to(root).as_posix(), path=str(p)) for p in files]
    if not files:
        result.problems.append(CorpusProblem(str(root), None, None, f"no audio files ({', '.join(AUDIO_SUFFIXES)})"))
    return result


# ------------------------------------------------------------------------------------------------- shared row checks
def _csv_rows(path: Path, source: str, required: tuple[str, ...], problems: list[CorpusProblem]) -> list[Row] | None:
    """(line, row, format error or None) per CSV row; None (reported) when the file is unreadable or a required
    column is missing. A row with bytes that are not UTF-8, or the wrong number of fields, carries its error."""
    try:
        text = path.read_bytes().decode("utf-8-sig", errors="surrogateescape")
        reader = csv.DictReader(io.StringIO(text, newline=""))
        header = reader.fieldnames or []
        missing = [c for c in required if c not in header]
        if missing:
            problems.append(CorpusProblem(source, 1, None, f"missing required column(s) {', '.join(missing)}; "
                                                           f"no rows read (header: {','.join(header)})"))
            return None
        rows: list[Row] = []
        for row in reader:
            extra, short = row.pop(None, None) or [], [k for k, v in row.items() if v is None]
            error = None
            if extra or short:
                error = f"expected {len(header)} fields, got {len(header) - len(short) + len(extra)}"
            elif any(_NOT_UTF8.search(v) for v in row.values()):
                error = "not UTF-8"
                row = {k: _NOT_UTF8.sub("\ufffd", v) for k, v in row.items()}  # printable in the report
            rows.append((reader.line_num, row, error))
    except (OSError, csv.Error) as exc:
        problems.append(CorpusProblem(source, None, None, f"cannot read: {exc}"))
        return None
    return rows


_NOT_UTF8 = re.compile("[\udc80-\udcff]")  # bytes that surrogateescape could not decode


def _make_utterance(item: str, audio: str, fields: dict[str, Any], names: dict[str, str]) -> Utterance:
    """Validate one row's label fields (`names` maps each to its column name for messages)."""
    split = _text(fields.get("split"))
    if split is not None and split not in SPLITS:
        raise _RowError(f"unknown split {split!r} (expected one of {', '.join(SPLITS)})")
    emo_class = _text(fields.get("emo_class"))
    if emo_class is not None and emo_class not in ALL_CLASS_CODES:
        raise _RowError(f"unknown class code {emo_class!r}")
    attributes = {a: _attribute(fields.get(a), names[a]) for a in ATTRIBUTES}
    return Utterance(id=item, path=audio, split=split, emo_class=emo_class, speaker=_text(fields.get("speaker")),
                     gender=_text(fields.get("gender")), **attributes)


def _attribute(value: Any, column: str) -> float | None:
    text = _text(value)
    if text is None:
        return None
    try:
        number = float(text)
    except ValueError:
        number = math.nan
    if not math.isfinite(number):
        raise _RowError(f"{column} is not a number: {text!r}")
    low, high = ATTRIBUTE_RANGE
    if not low <= number <= high:
        raise _RowError(f"{column} {text} outside {low:g}..{high:g}")
    return number


def _text(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _collect(result: CorpusReadResult, source: str, rows: list[Row], id_key: str,
             build: Callable[[str, dict[str, Any]], Utterance]) -> set[str]:
    """Build an utterance from each row, reporting and skipping invalid ones; returns every id seen."""
    seen: dict[str, int] = {}
    for line, row, row_error in rows:
        item = _text(row.get(id_key))
        try:
            if item is None:
                raise _RowError(f"empty {id_key}")
            if item in seen:
                raise _RowError(f"duplicate {id_key} (first on line {seen[item]})")
            seen[item] = line
            if row_error:
                raise _RowError(row_error)
            utt = build(item, row)
        except _RowError as exc:
            result.problems.append(CorpusProblem(source, line, item, str(exc)))
            continue
        result.utterances.append(utt)
    return set(seen)
