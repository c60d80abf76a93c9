"""Bad-row reporting for the label-file and manifest readers: rows read from CSV / JSONL, label fields validated,
duplicate and empty ids caught, and every row that fails a check turned into one `CorpusProblem` (the row is
skipped, the read goes on). Knows nothing of audio files or corpus layouts; `corpus.py` builds utterances from the
rows that pass. Imports the standard library and the label map only.
"""
from __future__ import annotations

import csv
import io
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from mtser.featurestore.files import CorpusFiles
from mtser.featurestore.labels import ALL_CLASS_CODES, ATTRIBUTE_RANGE, ATTRIBUTES, SPLITS

T = TypeVar("T")
Row = tuple[int, dict[str, Any], str | None]  # line number, raw row, row-level format error

_NOT_UTF8 = re.compile("[\udc80-\udcff]")  # bytes that surrogateescape could not decode


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


class RowError(ValueError):
    """A row is invalid; the message is the reason reported for it."""


def csv_rows(files: CorpusFiles, path: str, source: str, required: tuple[str, ...],
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


def jsonl_rows(files: CorpusFiles, path: str, source: str, required: tuple[str, ...],
               problems: list[CorpusProblem]) -> list[Row] | None:
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
        missing = [key for key in required if key not in row]
        if missing:
            problems.append(CorpusProblem(source, number, str(row.get("id") or "") or None,
                                          f"missing required key(s) {', '.join(missing)}"))
            continue
        rows.append((number, row, None))
    return rows


def label_fields(fields: dict[str, Any], names: dict[str, str]) -> dict[str, Any]:
    """One row's label fields validated (split, class code, attributes in range), as `Utterance` keyword arguments;
    `names` maps each field to its column name for messages. Raises `RowError`."""
    split = cell(fields.get("split"))
    if split is not None and split not in SPLITS:
        raise RowError(f"unknown split {split!r} (expected one of {', '.join(SPLITS)})")
    emo_class = cell(fields.get("emo_class"))
    if emo_class is not None and emo_class not in ALL_CLASS_CODES:
        raise RowError(f"unknown class code {emo_class!r}")
    attributes = {a: _attribute(fields.get(a), names[a]) for a in ATTRIBUTES}
    return {"split": split, "emo_class": emo_class, "speaker": cell(fields.get("speaker")),
            "gender": cell(fields.get("gender")), **attributes}


def _attribute(value: Any, column: str) -> float | None:
    raw = cell(value)
    if raw is None:
        return None
    try:
        number = float(raw)
    except ValueError:
        number = math.nan
    if not math.isfinite(number):
        raise RowError(f"{column} is not a number: {raw!r}")
    low, high = ATTRIBUTE_RANGE
    if not low <= number <= high:
        raise RowError(f"{column} {raw} outside {low:g}..{high:g}")
    return number


def cell(value: Any) -> str | None:
    """A cell as stripped text; None when empty or missing."""
    if value is None:
        return None
    stripped = str(value).strip()
    return stripped or None


def collect(source: str, rows: list[Row], id_key: str, build: Callable[[str, dict[str, Any]], T],
            problems: list[CorpusProblem]) -> tuple[list[T], set[str]]:
    """(`build(id, row)` of each valid row in order, every id seen): empty and duplicate ids (the first row wins),
    rows with a format error and rows `build` rejects with `RowError` are reported and skipped."""
    seen: dict[str, int] = {}
    built: list[T] = []
    for line, row, row_error in rows:
        item = cell(row.get(id_key))
        try:
            if item is None:
                raise RowError(f"empty {id_key}")
            if item in seen:
                raise RowError(f"duplicate {id_key} (first on line {seen[item]})")
            seen[item] = line
            if row_error:
                raise RowError(row_error)
            built.append(build(item, row))
        except RowError as exc:
            problems.append(CorpusProblem(source, line, item, str(exc)))
    return built, set(seen)
