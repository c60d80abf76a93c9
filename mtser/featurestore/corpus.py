"""The one utterance record, and readers for MSP-Podcast folders, CSV/JSONL manifests and plain audio folders.

Every reader returns a `CorpusReadResult`: the valid utterances plus one `CorpusProblem` per skipped row or
degraded item, printed as `Labels/labels_consensus.csv:17: MSP-PODCAST_0003_0002.wav: unknown class code 'Q'`.
Rows are checked for: a missing audio file, an unknown class code, an attribute that is not a number or lies
outside 1..7, a duplicate id (the first row wins), an unknown split name, a wrong number of CSV fields. A missing
required column is reported once and no rows of that file are read. Content never raises; only a path that is not
a corpus at all (or cannot be reached) raises `CorpusError`. Readers do not open audio (durations stay None).
The row checks shared by the label-file and manifest readers live in `corpus_rows`.

Inside a corpus folder (MSP-Podcast's `Audios/` and `Transcripts/`, a plain audio folder) a symlink that leads out
of the corpus is not followed unless `allow_outside_links` (reported, naming the file and its target); a folder
named like an audio file is reported, not skipped silently. `read_corpus` also reports look-alike ids (equal after
Unicode NFC normalisation and stripping spaces around each path part): both are kept, as the distinct ids they are.

Corpus roots, manifests and manifest rows may be fsspec URLs (`s3://bucket/MSP-Podcast`, read with the store's
`storage_options`): they are listed and read through `files.CorpusFiles`, utterance paths stay URLs, and the
extraction actors read each utterance's audio from its URL.
"""
from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from mtser.errors import UsageError
from mtser.featurestore.corpus_rows import (
    CorpusProblem, RowError, cell, collect, csv_rows, jsonl_rows, label_fields,
)
from mtser.featurestore.files import CorpusFiles, remote_errors


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


@dataclass
class CorpusReadResult:
    layout: str                 # "msp-podcast", "manifest" or "folder"
    utterances: list[Utterance] = field(default_factory=list)
    problems: list[CorpusProblem] = field(default_factory=list)


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
            raise RowError(f"Audios/{item} is a folder, not an audio file")
        if item in outside:
            raise RowError(f"Audios/{item} is a {_outside(outside[item])}")
        if item not in audio_names:
            raise RowError(f"audio file Audios/{item} not found")
        return _make_utterance(item, files.join(audios, item), {k: row.get(c) for k, c in columns.items()}, columns)

    rows = csv_rows(files, labels, MSP_LABELS, MSP_REQUIRED, result.problems)
    if rows is None:  # nothing can be trusted without the label file, Test3 audio included
        return result
    result.utterances, listed = collect(MSP_LABELS, rows, "FileName", build, result.problems)
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
        rows = jsonl_rows(files, path, source, MANIFEST_REQUIRED, result.problems)
    else:
        rows = csv_rows(files, path, source, MANIFEST_REQUIRED, result.problems)
    if rows is None:
        return result
    columns = {key: key for key in MANIFEST_LABEL_KEYS}
    folder = files.parent(path)

    def build(item: str, row: dict[str, Any]) -> Utterance:
        audio = cell(row.get("path"))
        if audio is None:
            raise RowError("empty path")
        audio_path = audio if files.is_absolute(audio) else files.join(folder, audio)
        try:
            found = files.is_file(audio_path)
        except OSError as exc:
            raise RowError(f"cannot reach audio file {audio_path}: {exc}") from None
        if not found:
            is_folder = files.kind(audio_path) == "directory"
            raise RowError(f"audio path {audio_path} is a folder, not a file" if is_folder
                           else f"audio file {audio_path} not found")
        utt = _make_utterance(item, audio_path, {k: row.get(k) for k in columns}, columns)
        text = " ".join(str(row.get("transcript") or "").split())
        return replace(utt, transcript=text, transcript_source="human") if text else utt

    result.utterances, _ = collect(source, rows, "id", build, result.problems)
    return result


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


def _make_utterance(item: str, audio: str, fields: dict[str, Any], names: dict[str, str]) -> Utterance:
    """An utterance from one row's validated label fields (`names` maps each to its column name for messages)."""
    return Utterance(id=item, path=audio, **label_fields(fields, names))
