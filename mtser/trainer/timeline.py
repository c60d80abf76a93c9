"""Emotion over time in long recordings: each file streamed → VAD segments (featurestore.vad) → the extraction's
per-utterance encoding (featurestore.pipeline) → the same ensemble as `predict` (predict.EnsembleScorer) → one row
per segment, a summary per file, and a timeline figure per file (trainer.timeline_plot).

Each file's rows are committed to `OUT/files/` when the file is done (table first, then its status record), so a
killed run resumed with the same command skips finished files. Audio is decoded in blocks of `block_s` and encoded
in groups of `batch_seconds`: memory is bounded by those, not by the length of a recording. With `store`, each
file's segment features also go to a feature store, one part per file (ids `<file>#<start_ms>-<end_ms>`), under
the encoder provenance the ensemble's checkpoints recorded. With `workers`, the per-file work runs in Ray actors
(trainer.timeline_workers); without, in this process.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ContextManager, Iterator

import numpy as np
import pandas as pd

from mtser.configio import to_dict
from mtser.featurestore.config import ExtractConfig, TimelineConfig
from mtser.featurestore.corpus import Utterance
from mtser.errors import UsageError
from mtser.featurestore.labels import ATTRIBUTE_COLUMNS, CLASSES
from mtser.featurestore.vad import VAD_RATE, Span
from mtser.trainer.infer import prediction_table
from mtser.trainer.predict import EnsembleScorer
from mtser.trainer.runs import RunFolder

if TYPE_CHECKING:
    from mtser.featurestore.store import StoreWriter

PROBS = [f"prob_{c}" for c in CLASSES]
ATTRS = list(ATTRIBUTE_COLUMNS.values())                  # EmoAct, EmoVal, EmoDom
SEGMENT_COLUMNS = ["file", "segment", "start_s", "end_s", "EmoClass", *PROBS, *ATTRS, "transcript"]
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3                # glibc's mallopt parameters (malloc.h)
ALLOCATOR_THRESHOLD = 256 * 1024
RECORD = "timeline.json"                                  # what the run folder's tables were made with


class TimelineError(UsageError, RuntimeError):
    """The timeline cannot run as asked (usage), e.g. an output folder made with another ensemble or settings."""


@dataclass
class FileResult:
    file: str
    status: str                                           # "ok", "no speech" or "failed"
    reason: str = ""
    duration_s: float = 0.0
    segments: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=SEGMENT_COLUMNS))


@dataclass
class TimelineRun:
    segments: pd.DataFrame                                # SEGMENT_COLUMNS, files in input order, segments by time
    summary: pd.DataFrame                                 # one row per file (status, speech seconds, shares, ...)
    failures: dict[str, str]                              # file -> reason
    resumed: list[str]                                    # files finished by an earlier run of the same command


def file_key(path: str) -> str:
    """A file name for a recording's committed rows: its stem (made safe) and a hash of the full path."""
    stem = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in Path(path).stem)[:80]
    return f"{stem}-{hashlib.sha256(path.encode()).hexdigest()[:12]}"


def segment_part(path: str, cfg: TimelineConfig) -> str:
    """The feature-store part of a file's segments: named from the file and the settings that cut them."""
    settings = hashlib.sha256(json.dumps(to_dict(cfg), sort_keys=True).encode()).hexdigest()[:8]
    return f"timeline-{file_key(path)}-{settings}"


def register_store(url: str, scorer: EnsembleScorer, storage_options: dict | None = None) -> None:
    """Create the feature store at `url` (if needed) and register the ensemble's encoders with the provenance its
    checkpoints recorded; TimelineError if the store has an encoder of that name with other provenance."""
    from mtser.featurestore.store import EncoderInfo, StoreError, create_store, register_encoder

    try:
        create_store(url, storage_options)
        for name, info in scorer.provenance.items():
            register_encoder(url, EncoderInfo.from_dict(info, f"encoder {name!r}"), storage_options)
    except StoreError as exc:
        raise TimelineError(f"--store: {exc}") from None


def bound_allocator_caches() -> None:
    """Keep memory flat over hours of segments of ever new lengths (each a new tensor shape, so new block sizes):
    glibc returns freed blocks over 256 KiB to the system at once, with a fixed mmap and trim threshold instead of the
    dynamic one, which rises with every large block freed and then keeps such blocks (the growth over an hour's file,
    with and without this: docs/benchmarks.md, Timeline). Process-wide; not where the user set glibc's
    MALLOC_*_THRESHOLD_ variables, nor on another C library."""
    import ctypes

    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    for option in (M_MMAP_THRESHOLD, M_TRIM_THRESHOLD):
        libc.mallopt(option, ALLOCATOR_THRESHOLD)


class Timeline:
    """The models and the VAD, loaded once, and the per-file work."""

    def __init__(self, scorer: EnsembleScorer, cfg: TimelineConfig, device: str = "cpu",
                 storage_options: dict | None = None, asr_max_new_tokens: int = 128, store: str | None = None):
        """`store`: a feature store (registered: `register_store`) that also gets each file's segment features."""
        from mtser.featurestore.files import CorpusFiles
        from mtser.featurestore.pipeline import Pipeline
        from mtser.featurestore.vad import load_vad

        bound_allocator_caches()
        self.scorer, self.cfg, self.files = scorer, cfg, CorpusFiles(storage_options)
        self.store, self.storage_options = store, storage_options
        self.pipeline = Pipeline(ExtractConfig(encoders=scorer.encoders, batch_seconds=cfg.batch_seconds,
                                               asr_max_new_tokens=asr_max_new_tokens), device, storage_options)
        self.vad = load_vad()

    def blocks(self, path: str) -> Iterator[np.ndarray]:
        from mtser.featurestore.audio import stream_audio

        return stream_audio(path, VAD_RATE, self.cfg.block_s, self.files)

    def plan(self, path: str) -> tuple[list[Span], int]:
        """The segments of one file and its length in samples (one streamed pass)."""
        from mtser.featurestore.vad import plan_segments, speech_activity

        activity = speech_activity(self.blocks(path), self.vad)
        return plan_segments(activity, self.cfg), activity.samples

    def run_file(self, path: str) -> FileResult:
        """Plan, then encode and score the segments of one file in groups of `batch_seconds` of audio (and commit
        their features as one store part, with a store)."""
        from mtser.featurestore.audio import AudioError

        with self._part(path) as part:                    # left uncommitted (aborted) unless the file is scored
            try:
                spans, samples = self.plan(path)
                if not spans:
                    return FileResult(path, "no speech", "the VAD found no speech", samples / VAD_RATE)
                tables = [self.score(path, group, part) for group in self._groups(self.cut(path, spans))]
            except AudioError as exc:
                return FileResult(path, "failed", str(exc))
            if part is not None:
                part.commit()
        table = pd.concat(tables, ignore_index=True).sort_values("start_s", kind="stable").reset_index(drop=True)
        return FileResult(path, "ok", "", samples / VAD_RATE, table)

    def commit_file(self, path: str, folder: TimelineFolder) -> FileResult:
        """`run_file`, then the result committed to the output folder."""
        result = self.run_file(path)
        folder.commit(result)
        return result

    def _part(self, path: str) -> ContextManager[StoreWriter | None]:
        """The writer of the file's store part; none without a store or when an earlier run committed the part
        (killed after the part's commit, before the file's)."""
        from mtser.featurestore.layout import zarr_store
        from mtser.featurestore.store import StoreWriter, part_state

        if self.store is None:
            return nullcontext()
        part = segment_part(path, self.cfg)
        if (part_state(zarr_store(self.store, self.storage_options, read_only=True), part) or {}).get("committed"):
            return nullcontext()
        return StoreWriter(self.store, part, self.storage_options)

    def cut(self, path: str, spans: list[Span]) -> Iterator[tuple[Span, np.ndarray]]:
        from mtser.featurestore.vad import cut_segments

        return cut_segments(self.blocks(path), spans)

    def _groups(self, segments: Iterator[tuple[Span, np.ndarray]]) -> Iterator[list[tuple[Span, np.ndarray]]]:
        group, seconds = [], 0.0
        for span, wave in segments:
            group.append((span, wave))
            seconds += len(wave) / VAD_RATE
            if seconds >= self.cfg.batch_seconds:
                yield group
                group, seconds = [], 0.0
        if group:
            yield group

    def score(self, path: str, group: list[tuple[Span, np.ndarray]], part: StoreWriter | None = None
              ) -> pd.DataFrame:
        """One row per segment of `group`: the pipeline's features of its samples → the ensemble (and into `part`).
        A segment the encoders fail on keeps its row with empty predictions (the others go on)."""
        from mtser.featurestore.pipeline import Loaded

        items = [Utterance(id=span.segment_id(path, VAD_RATE), path=path, duration=len(w) / VAD_RATE)
                 for span, w in group]
        result = self.pipeline.encode(Loaded(items, [w for _, w in group], list(range(len(items))), {}))
        if part is not None:
            for utt, stored in result.written:
                part.add(utt, stored)
            for f in result.failures:
                part.add_failure(f.utt.id, f.utt.path, f.stage, f.reason)
        written = {u.id: (u, {name: frames.decode(np.float32) for name, frames in stored.items()})
                   for u, stored in result.written}               # as a reader of the store gets them
        ids = [u.id for u in items if u.id in written]
        pred = self.scorer.score(ids, [written[i][1] for i in ids])
        rows = prediction_table(ids, pred.probs, pred.attrs, id_column="segment", clip=True)
        rows["transcript"] = [written[i][0].transcript if written[i][0].transcript_source == "asr" else None
                              for i in ids]
        failed = pd.DataFrame({"segment": [f.utt.id for f in result.failures],
                               "EmoClass": None, "transcript": None})
        table = pd.concat([rows, failed], ignore_index=True) if len(failed) else rows
        spans = {span.segment_id(path, VAD_RATE): span for span, _ in group}
        table.insert(0, "file", path)
        table.insert(2, "start_s", [spans[s].start / VAD_RATE for s in table["segment"]])
        table.insert(3, "end_s", [spans[s].end / VAD_RATE for s in table["segment"]])
        return table[SEGMENT_COLUMNS]


def summarise(result: FileResult) -> dict[str, Any]:
    """A file's summary row: speech seconds, duration-weighted class shares, mean and range of each attribute."""
    row: dict[str, Any] = {"file": result.file, "status": result.status, "reason": result.reason,
                           "duration_s": result.duration_s}
    table = result.segments.dropna(subset=["EmoClass"])
    spans = sorted(zip(table["start_s"], table["end_s"]))
    row["speech_s"] = _covered(spans)
    row["segments"] = len(table)
    seconds = (table["end_s"] - table["start_s"]).to_numpy(float)
    for c in CLASSES:
        share = seconds[(table["EmoClass"] == c).to_numpy()].sum() / seconds.sum() if seconds.sum() else np.nan
        row[f"share_{c}"] = share
    for a in ATTRS:
        values = table[a].to_numpy(float)
        row[f"{a}_mean"] = float(np.average(values, weights=seconds)) if len(values) else np.nan
        row[f"{a}_min"] = float(values.min()) if len(values) else np.nan
        row[f"{a}_max"] = float(values.max()) if len(values) else np.nan
    return row


def _covered(spans: list[tuple[float, float]]) -> float:
    """Seconds covered by the union of (start, end) spans sorted by start (fixed windows overlap)."""
    total, reach = 0.0, -np.inf
    for start, end in spans:
        total += max(0.0, end - max(start, reach))
        reach = max(reach, end)
    return total


class TimelineFolder:
    """OUT: per-file commits under `files/`, the run's record, and the final tables and page."""

    def __init__(self, out: str | Path, storage_options: dict | None = None):
        self.folder = RunFolder(out, storage_options)

    def check_record(self, record: dict[str, Any]) -> None:
        """Refuse an output folder made with another ensemble or other settings (its rows would mix)."""
        if self.folder.exists(RECORD):
            previous = self.folder.read_json(RECORD)
            if previous != record:
                changed = sorted(k for k in set(previous) | set(record) if previous.get(k) != record.get(k))
                raise TimelineError(f"{self.folder}: holds a timeline made with other {', '.join(changed)}; "
                                    "use another --out (or the same ensemble and settings to resume)")
        else:
            self.folder.write_json(RECORD, record)

    def finished(self, path: str) -> FileResult | None:
        key = f"files/{file_key(path)}"
        if not self.folder.exists(f"{key}.json"):
            return None
        status = self.folder.read_json(f"{key}.json")
        if status["status"] == "failed" or status["file"] != path:
            return None
        table = pd.read_parquet(io.BytesIO(self.folder.read_bytes(f"{key}.parquet")))
        return FileResult(path, status["status"], status["reason"], status["duration_s"], table)

    def commit(self, result: FileResult) -> None:
        """The file's table, then its status record (the commit marker a resumed run looks for)."""
        key = f"files/{file_key(result.file)}"
        buffer = io.BytesIO()
        result.segments.to_parquet(buffer, index=False)
        self.folder.write_bytes(f"{key}.parquet", buffer.getvalue())
        self.folder.write_json(f"{key}.json", {"file": result.file, "status": result.status,
                                               "reason": result.reason, "duration_s": result.duration_s})

    def write_tables(self, segments: pd.DataFrame, summary: pd.DataFrame) -> None:
        for name, table in (("segments", segments), ("summary", summary)):
            self.folder.write_csv(f"{name}.csv", table, float_format="%.6f")
            buffer = io.BytesIO()
            table.to_parquet(buffer, index=False)
            self.folder.write_bytes(f"{name}.parquet", buffer.getvalue())


def predict_timeline(inputs: list[str | Path], ensemble: str | Path, out: str | Path,
                     cfg: TimelineConfig | None = None, device: str = "cpu", skip_external: bool = False,
                     storage_options: dict | None = None, progress: bool = True, figures: bool = True,
                     workers: int = 0, address: str | None = None, store: str | None = None) -> TimelineRun:
    """Emotion over time for each audio file (named or found in folders): see the module docstring. Writes
    `segments.{csv,parquet}`, `summary.{csv,parquet}`, `timeline.html` and `png/` under `out` (path or URL).
    `workers` > 0: that many Ray actors (at most one per GPU, or per core) do the files, in the Ray cluster at
    `address` or a local one; `store`: the segments' encoder features also go to this feature store."""
    from mtser.featurestore.audio import audio_durations
    from mtser.featurestore.files import CorpusFiles
    from mtser.trainer.predict import collect_inputs

    cfg = cfg or TimelineConfig()
    folder = TimelineFolder(out, storage_options)
    scorer = EnsembleScorer(ensemble, device, skip_external, storage_options)
    folder.check_record({"ensemble": str(ensemble), "timeline": to_dict(cfg)})
    if store:
        register_store(store, scorer, storage_options)
    utts, failures = collect_inputs(inputs, storage_options=storage_options)
    paths = list(dict.fromkeys(u.path for u in utts))
    by_file: dict[str, FileResult] = {}
    resumed = []
    with AudioHoursBar(audio_durations(paths, CorpusFiles(storage_options)), progress) as bar:
        seconds = dict(zip(paths, bar.durations))

        def done(result: FileResult) -> None:
            by_file[result.file] = result
            bar.update(seconds[result.file])

        for path in paths:
            result = folder.finished(path)
            if result is not None:
                resumed.append(path)
                done(result)
        todo = [p for p in paths if p not in by_file]
        if todo and workers:
            from mtser.trainer.timeline_workers import TimelineJob, run_in_actors

            job = TimelineJob(str(ensemble), cfg, str(out), skip_external, storage_options, store)
            run_in_actors(todo, job, workers, address, done)
        elif todo:
            timeline = Timeline(scorer, cfg, device, storage_options, store=store)
            for path in todo:
                done(timeline.commit_file(path, folder))
    results = [by_file[p] for p in paths]
    failures.update({r.file: r.reason for r in results if r.status == "failed"})
    ok = [r.segments for r in results if len(r.segments)]
    segments = (pd.concat(ok, ignore_index=True) if ok else pd.DataFrame(columns=SEGMENT_COLUMNS))[SEGMENT_COLUMNS]
    summary = pd.DataFrame([summarise(r) for r in results] + [
        {"file": f, "status": "failed", "reason": why} for f, why in failures.items() if f not in paths])
    folder.write_tables(segments, summary)
    if figures:
        from mtser.trainer.timeline_plot import write_figures

        write_figures(folder.folder, segments, summary)
    return TimelineRun(segments, summary, failures, resumed)


class AudioHoursBar:
    """A progress bar in audio hours with rate and ETA (tqdm), advanced per finished file."""

    def __init__(self, durations: list[float], enabled: bool):
        self.durations, self.enabled = durations, enabled

    def __enter__(self) -> "AudioHoursBar":
        from tqdm.auto import tqdm

        self.bar = tqdm(total=sum(self.durations) / 3600, desc="timeline", disable=not self.enabled,
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.3f}/{total:.3f} audio-h "
                                   "[{elapsed}<{remaining}{postfix}]", dynamic_ncols=True)
        return self

    def update(self, seconds: float) -> None:
        self.bar.update(min(seconds / 3600, self.bar.total - self.bar.n))   # float sums never overshoot the total
        elapsed = self.bar.format_dict["elapsed"]
        if elapsed > 0:
            self.bar.set_postfix_str(f"{self.bar.n * 3600 / elapsed:.1f}x real time")

    def __exit__(self, *exc) -> None:
        self.bar.close()


def status_line(run: TimelineRun) -> str:
    counts = run.summary["status"].value_counts().to_dict() if len(run.summary) else {}
    parts = [f"{counts.get(s, 0)} {s}" for s in ("ok", "no speech", "failed") if counts.get(s)]
    resumed = f" ({len(run.resumed)} finished earlier)" if run.resumed else ""
    return f"timeline: {len(run.segments)} segments from {len(run.summary)} files: {', '.join(parts)}{resumed}"

