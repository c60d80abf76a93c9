"""The one utterance record, and readers for MSP-Podcast folders, CSV/JSONL manifests and plain audio folders.

Every reader returns a `CorpusReadResult`: the valid utterances plus one `CorpusProblem` per skipped row or
degraded item, printed as `Labels/labels_consensus.csv:17: MSP-PODCAST_0003_0002.wav: unknown class code 'Q'`.
Rows are checked for: a missing audio file, an unknown class code, an attribute that is not a number or lies
outside 1..7, a duplicate id (the first row wins), an unknown split name, a wrong number of CSV fields. A missing
required column is reported once and no rows of that file are read. Content never raises; only a path that is not
a corpus at all (or cannot be reached) raises `CorpusError`. Readers do not open audio (durations stay None).

Inside a corpus folder (MSP-Podcast's `Audios/` and `Transcripts/`, a plain audio folder) a symlink that leads out
of the corpus is not followed unless `allow_outside_links` (reported, naming the file and its target); a folder
named like an audio file is reported, not skipped silently. `read_corpus` also reports look-alike ids (equal after
Unicode NFC normalisation and stripping spaces around each path part): both are kept, as the distinct ids they are.

Corpus roots, manifests and manifest rows may be fsspec URLs (`s3://bucket/MSP-Podcast`, read with the store's
`storage_options`): they are listed and read through `files.CorpusFiles`, utterance paths stay URLs, and the
extraction actors read each utterance's audio from its URL.
"""
from __future__ import annotations

import csv
import io
import json
import math
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from mtser.errors import UsageError
from mtser.featurestore.files import CorpusFiles, remote_errors
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


class CorpusError(UsageError, ValueError):
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


def read_corpus(path: str | Path, storage_options: dict | None = None, *,
                allow_outside_links: bool = False) -> CorpusReadResult:
    """Read any supported corpus: an MSP-Podcast folder (has Labels/labels_consensus.csv), a .csv/.jsonl manifest,
    or a plain folder of audio files; local, or at an fsspec URL read with `storage_options`. Look-alike ids are
    reported (`lookalike_problems`); `allow_outside_links` follows symlinks that lead out of a corpus folder."""
    path = str(path)
    files = CorpusFiles(storage_options)
    try:
        if not files.exists(path):
            raise CorpusError(f"{path}: no such file or folder")
        if files.is_dir(path):
            if files.is_file(files.join(path, MSP_LABELS)):
                result = read_msp_podcast(path, files=files, allow_outside_links=allow_outside_links)
            else:
                result = read_folder(path, files=files, allow_outside_links=allow_outside_links)
        elif files.name(path).lower().endswith((".csv", ".jsonl")):
            result = read_manifest(path, files=files)
        else:
            raise CorpusError(f"{path}: not a corpus (expected a folder, or a .csv / .jsonl manifest)")
    except (OSError, *remote_errors()) as exc:   # an unreachable bucket or endpoint, missing credentials, permission
        raise CorpusError(f"{path}: cannot read: {type(exc).__name__}: {exc}") from None
    result.problems += lookalike_problems(result.utterances)
    return result


def lookalike_problems(utts: list[Utterance]) -> list[CorpusProblem]:
    """One problem per id that looks like an earlier one (in id order): equal after NFC normalisation and stripping
    the spaces around each `/`-separated part, as macOS (NFD file names) or a stray space in a label file produce.
    Both stay separate utterances; the problem names the id and its look-alike."""
    first: dict[str, str] = {}
    problems = []
    for utt in sorted(utts, key=lambda u: u.id):
        key = "/".join(unicodedata.normalize("NFC", part).strip() for part in utt.id.split("/"))
        if key in first:
            problems.append(CorpusProblem(utt.path or utt.id, None, utt.id,
                                          f"looks like id {first[key]!r} (differs only in Unicode normalisation or "
                                          "surrounding spaces); both kept as separate ids"))
        else:
            first[key] = utt.id
    return problems


OUTSIDE_HINT = "not followed (pass --allow-outside-links to read it)"


def _outside(target: str) -> str:
    return f"symlink to {target}, outside the corpus; {OUTSIDE_HINT}"


# ------------------------------------------------------------------------------------------------------ MSP-Podcast
def read_msp_podcast(root: str | Path, storage_options: dict | None = None, *,
                     files: CorpusFiles | None = None, allow_outside_links: bool = False) -> CorpusReadResult:
    """Read an MSP-Podcast release: `Labels/labels_consensus.csv`, `Audios/*.wav`, `Transcripts/<name>.txt`.

    Utterances come sorted by id. Rows get their transcript (source "human") when the .txt exists. Empty label
    cells mean unlabelled, so Test3 rows with empty labels are read as they are. Audio files without a row in the
    label file (the 2025 release ships Test3 that way) are kept unlabelled: split "Test3" when the name contains
    "test3", otherwise no split plus a problem saying so. A transcript that is empty or not UTF-8 keeps the
    utterance without transcript (Whisper can transcribe it) and is reported. Audio or transcripts that are symlinks
    out of the corpus are refused (unless `allow_outside_links`), folders named like audio files reported. Invalid
    rows are reported and skipped; the read never raises on content, only when `root` has no label file.
    """
    root, files = str(root), files or CorpusFiles(storage_options)
    labels = files.join(root, MSP_LABELS)
    if not files.is_file(labels):
        raise CorpusError(f"{root}: not an MSP-Podcast folder (no {MSP_LABELS})")
    result = CorpusReadResult("msp-podcast")
    audios, transcripts = files.join(root, "Audios"), files.join(root, "Transcripts")
    audio_names = files.file_names(audios)
    transcript_names = files.file_names(transcripts)
    audio_folders = {n for n, kind in files.listing(audios).items()
                     if kind == "directory" and Path(n).suffix.lower() in AUDIO_SUFFIXES}
    outside: dict[str, str] = {}
    outside_texts: dict[str, str] = {}
    if not allow_outside_links:
        outside = files.outside_links(audios, audio_names, root)
        outside_texts = files.outside_links(transcripts, transcript_names, root)
    columns = {"split": "Split_Set", "emo_class": "EmoClass", "arousal": "EmoAct", "valence": "EmoVal",
               "dominance": "EmoDom", "speaker": "SpkrID", "gender": "Gender"}

    def build(item: str, row: dict[str, Any]) -> Utterance:
        if item in audio_folders:
            raise _RowError(f"Audios/{item} is a folder, not an audio file")
        if item in outside:
            raise _RowError(f"Audios/{item} is a {_outside(outside[item])}")
        if item not in audio_names:
            raise _RowError(f"audio file Audios/{item} not found")
        return _make_utterance(item, files.join(audios, item), {k: row.get(c) for k, c in columns.items()}, columns)

    rows = _csv_rows(files, labels, MSP_LABELS, MSP_REQUIRED, result.problems)
    if rows is None:  # nothing can be trusted without the label file, Test3 audio included
        return result
    listed = _collect(result, MSP_LABELS, rows, "FileName", build)
    for name in sorted(audio_folders - listed):
        result.problems.append(CorpusProblem("Audios", None, name, "a folder named like an audio file; skipped"))
    for name in sorted(audio_names - listed):
        if Path(name).suffix.lower() not in AUDIO_SUFFIXES:
            continue
        if name in outside:
            result.problems.append(CorpusProblem("Audios", None, name, _outside(outside[name])))
            continue
        split = "Test3" if "test3" in name.lower() else None
        if split is None:
            result.problems.append(CorpusProblem(
                "Audios", None, name, f"not in {MSP_LABELS}; kept unlabelled with no split"))
        result.utterances.append(Utterance(id=name, path=files.join(audios, name), split=split))
    wanted = {u.id: Path(u.id).stem + ".txt" for u in result.utterances}
    for utt_id, name in wanted.items():
        if name in outside_texts:
            result.problems.append(CorpusProblem(f"Transcripts/{name}", None, utt_id,
                                                 f"{_outside(outside_texts[name])}; kept without transcript"))
    transcript_names -= set(outside_texts)
    wanted = {i: name for i, name in wanted.items() if name in transcript_names}
    texts = files.read_many([files.join(transcripts, name) for name in wanted.values()])
    result.utterances = [_with_transcript(u, wanted.get(u.id), texts, files, transcripts, result.problems)
                         for u in result.utterances]
    result.utterances.sort(key=lambda u: u.id)
    return result


def _with_transcript(utt: Utterance, name: str | None, texts: dict[str, bytes | Exception], files: CorpusFiles,
                     folder: str, problems: list[CorpusProblem]) -> Utterance:
    if name is None:
        return utt
    source, data = f"Transcripts/{name}", texts[files.join(folder, name)]
    if isinstance(data, Exception):
        problems.append(CorpusProblem(source, None, utt.id, f"cannot read ({data}); kept without transcript"))
        return utt
    try:
        text = " ".join(data.decode("utf-8").split())
    except UnicodeDecodeError as exc:
        problems.append(CorpusProblem(source, None, utt.id, f"not UTF-8 (byte {exc.start}); kept without transcript"))
        return utt
    if not text:
        problems.append(CorpusProblem(source, None, utt.id, "empty transcript; kept without transcript"))
        return utt
    return replace(utt, transcript=text, transcript_source="human")


# --------------------------------------------------------------------------------------------------------- manifest
MANIFEST_LABEL_KEYS = ("split", "emo_class", "arousal", "valence", "dominance", "speaker", "gender")


def read_manifest(path: str | Path, storage_options: dict | None = None, *,
                  files: CorpusFiles | None = None) -> CorpusReadResult:
    """Read a CSV (header row) or JSONL (one object per line) manifest, local or at a URL.

    Keys: `id`, `path` (relative to the manifest's folder, or absolute, or a URL) are required; `split`,
    `emo_class`, `arousal`, `valence`, `dominance`, `speaker`, `gender`, `transcript` are optional (empty or null =
    unknown); other keys are ignored. A non-empty transcript gets source "human". Invalid rows are reported and
    skipped.
    """
    path, files = str(path), files or CorpusFiles(storage_options)
    result = CorpusReadResult("manifest")
    source = path
    if path.lower().endswith(".jsonl"):
        rows = _jsonl_rows(files, path, source, result.problems)
    else:
        rows = _csv_rows(files, path, source, MANIFEST_REQUIRED, result.problems)
    if rows is None:
        return result
    columns = {key: key for key in MANIFEST_LABEL_KEYS}
    folder = files.parent(path)

    def build(item: str, row: dict[str, Any]) -> Utterance:
        audio = _text(row.get("path"))
        if audio is None:
            raise _RowError("empty path")
        audio_path = audio if files.is_absolute(audio) else files.join(folder, audio)
        try:
            found = files.is_file(audio_path)
        except OSError as exc:
            raise _RowError(f"cannot reach audio file {audio_path}: {exc}") from None
        if not found:
            is_folder = files.kind(audio_path) == "directory"
            raise _RowError(f"audio path {audio_path} is a folder, not a file" if is_folder
                            else f"audio file {audio_path} not found")
        utt = _make_utterance(item, audio_path, {k: row.get(k) for k in columns}, columns)
        text = " ".join(str(row.get("transcript") or "").split())
        return replace(utt, transcript=text, transcript_source="human") if text else utt

    _collect(result, source, rows, "id", build)
    return result


def _jsonl_rows(files: CorpusFiles, path: str, source: str, problems: list[CorpusProblem]) -> list[Row] | None:
    """(line, object, None) per valid JSONL line; other lines are reported. None (reported) when unreadable."""
    try:
        lines = files.read_bytes(path).decode("utf-8").splitlines()
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
def read_folder(root: str | Path, storage_options: dict | None = None, *,
                files: CorpusFiles | None = None, allow_outside_links: bool = False) -> CorpusReadResult:
    """Every audio file (.wav, .flac, .mp3, .ogg, any depth) under `root`, unlabelled; id = path relative to root.
    A file a symlink leads to outside `root` is reported and left out (unless `allow_outside_links`); so is a folder
    named like an audio file (the files inside it are read)."""
    root, files = str(root), files or CorpusFiles(storage_options)
    result = CorpusReadResult("folder")
    entries = {n: kind for n, kind in files.find(root).items() if Path(n).suffix.lower() in AUDIO_SUFFIXES}
    names = [n for n, kind in sorted(entries.items()) if kind == "file"]
    outside = {} if allow_outside_links else files.outside_links(root, names)
    for name, kind in sorted(entries.items()):
        if kind == "directory":
            result.problems.append(CorpusProblem(root, None, name, "a folder named like an audio file; not read as "
                                                                   "audio (audio files inside it are)"))
        elif name in outside:
            result.problems.append(CorpusProblem(root, None, name, _outside(outside[name])))
    names = [n for n in names if n not in outside]
    result.utterances = [Utterance(id=n, path=files.join(root, *n.split("/"))) for n in names]
    if not names:
        result.problems.append(CorpusProblem(root, None, None, f"no audio files ({', '.join(AUDIO_SUFFIXES)})"))
    return result


# ------------------------------------------------------------------------------------------------- shared row checks
def _csv_rows(files: CorpusFiles, path: str, source: str, required: tuple[str, ...],
              problems: list[CorpusProblem]) -> list[Row] | None:
    """(line, row, format error or None) per CSV row; None (reported) when the file is unreadable or a required
    column is missing. A row with bytes that are not UTF-8, or the wrong number of fields, carries its error."""
    try:
        text = files.read_bytes(path).decode("utf-8-sig", errors="surrogateescape")
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
