"""Store verification: index consistency and per-utterance checksums of every committed part.

Every stored byte is covered: frames by the per-utterance crc32 written at commit (a mismatch names the utterance),
the shard index by its crc32c, the padding after the last frame by a zero check, and the small index/table arrays
by their zarr crc32c codec (a mismatch makes the part unreadable, reported with its name). What the reader checks
when it opens a part (ids, offsets, frames metadata and the commit record agree; a part with a commit record but no
commit marker is damaged) makes such a part unreadable here too; verify adds what needs more reads: the tables' row
counts and ids against the commit record and the frames. (`stored_bytes` in the record is informational: frames
rewritten by zarr-python legitimately change it.)
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mtser.featurestore.layout import StoreError
from mtser.featurestore.reader import FeatureStore, Part
from mtser.featurestore.segment import FramesChecksumError, Segment
from mtser.featurestore.shards import ShardFormatError


@dataclass(frozen=True)
class Problem:
    part: str
    encoder: str | None
    utterance: str | None
    message: str

    def __str__(self) -> str:
        where = [f"part {self.part!r}"]
        if self.encoder:
            where.append(f"encoder {self.encoder!r}")
        if self.utterance:
            where.append(f"utterance {self.utterance!r}")
        return f"{', '.join(where)}: {self.message}"


@dataclass
class VerifyReport:
    parts: int = 0
    utterances: int = 0          # (utterance, encoder) frame blocks checked
    bytes: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_store(url: str, storage_options: dict | None = None) -> VerifyReport:
    """Check every committed part of the store at `url`; StoreError only when the store itself cannot be opened."""
    store = FeatureStore(url, storage_options, strict=False)
    try:
        report = VerifyReport(parts=len(store.committed_parts()) + len(store.broken_parts))
        report.problems += [Problem(name, None, None, f"unreadable part: {reason}")
                            for name, reason in sorted(store.broken_parts.items())]
        for part in store.parts():
            _check_part(store, part, report)
        return report
    finally:
        store.close()


def damaged_parts(store: FeatureStore, names: set[str]) -> dict[str, str]:
    """Those of the committed parts `names` that are unreadable or structurally broken: name -> the first problem.

    Everything but the frames' bytes is checked (tables, index arrays and their row counts against the commit
    record, the shard files' indexes): a few small reads per part, cheap enough for every rerun of an extraction."""
    found = {name: f"unreadable part: {reason}" for name, reason in store.broken_parts.items() if name in names}
    for part in store.parts():
        if part.name in names:
            report = VerifyReport()
            _check_part(store, part, report, frames=False)
            if report.problems:
                found[part.name] = str(report.problems[0])
    return found


def _check_part(store: FeatureStore, part: Part, report: VerifyReport, frames: bool = True) -> None:
    for name, recorded in (("failures", part.n_failures), ("warnings", part.n_warnings)):
        if name == "warnings" and "n_warnings" not in part.attrs:          # schema 1: no warnings table
            continue
        try:
            rows = len(store.part_table(part.name, name))
            if rows != recorded:
                report.problems.append(Problem(part.name, None, None, f"{name} table has {rows} rows, "
                                               f"commit recorded {recorded}"))
        except (KeyError, ValueError, OSError, StoreError) as exc:
            report.problems.append(Problem(part.name, None, None, f"{name} table unreadable: {exc}"))
    try:
        table = store.part_table(part.name, "utterances")
    except (KeyError, ValueError, OSError, StoreError) as exc:
        report.problems.append(Problem(part.name, None, None, f"utterance table unreadable: {exc}"))
        return
    table_ids = set(table["id"])
    if len(table_ids) != len(table) or len(table) != part.n_utterances:
        report.problems.append(Problem(part.name, None, None, f"utterance table has {len(table)} rows, "
                                       f"{len(table_ids)} distinct ids, commit recorded {part.n_utterances}"))
    for name, seg in part.segments.items():
        report.problems += [Problem(part.name, name, None, m) for m in _index_problems(seg, table_ids)]
        _check_frames(seg, report, frames)


def _index_problems(seg: Segment, table_ids: set[str]) -> list[str]:
    missing = sorted(set(map(str, seg.ids)) - table_ids)
    return [f"{len(missing)} ids have frames but no table row, e.g. {missing[:3]}"] if missing else []


def _check_frames(seg: Segment, report: VerifyReport, frames: bool) -> None:
    """The checksum array and the shard index; then, if `frames`, every utterance's bytes against its checksum."""
    try:
        seg.checksums()                                 # loaded (and checked) once for the part
        seg.check_shard_index()
        if seg.reader is None:                        # not mtser's shard layout, or its frames array is gone
            seg.zarr_rows(0, 1)
    except (StoreError, ShardFormatError, OSError, ValueError) as exc:
        report.problems.append(Problem(seg.part, seg.info.name, None,
                                       f"{exc}; all {len(seg.ids)} utterances of this part are affected"))
        return
    if not frames:
        return
    for i, utt_id in enumerate(map(str, seg.ids)):
        report.utterances += 1
        try:
            report.bytes += seg.read(i).nbytes              # every read checks the utterance's crc32
        except FramesChecksumError:
            report.problems.append(Problem(seg.part, seg.info.name, utt_id,
                                           "checksum mismatch: stored frames differ from what was written"))
        except (StoreError, OSError, ValueError, RuntimeError) as exc:      # RuntimeError: numcodecs' zstd
            report.problems.append(Problem(seg.part, seg.info.name, utt_id, f"frames unreadable: {exc}"))
    padding = seg.padding()
    if padding is not None and np.any(padding):
        report.problems.append(Problem(seg.part, seg.info.name, None,
                                       "padding after the last frame is not zero (corrupt bytes hit no utterance)"))
