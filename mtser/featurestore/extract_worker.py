"""The extraction worker: `ShardWorker` (a Ray actor, or a plain object for an in-process run) loads the encoders
once, then encodes and commits whatever shards it is handed; and the store writes the driver makes besides shards
(the encoders' provenance, the corpus reader's problems).

- A shard is encoded in groups of about GROUP_BATCHES batches of audio through `pipeline.Pipeline` (the path
  `mtser predict` runs too) while a prefetch thread decodes and resamples the next group; a worker holds at most two
  groups, not its shard. Audio paths may be fsspec URLs, read with the store's storage options.
- The features stream into one store part (`StoreWriter`, which claims it: a shard another writer holds or
  committed meanwhile is left to that writer). Per-utterance problems (unreadable or silent audio, a failing
  encoder, a row the store refuses) become failure rows of the part; everything else is written.
- Each encoder's compute dtype is resolved once on the driver (`with_compute_dtypes`: bfloat16 where the workers
  have GPUs, float32 on CPUs, unless the config names one), recorded in its provenance, and run exactly so here.
Imports torch and transformers (through the pipeline); Ray only for the worker's node id.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, replace
from typing import Any, Sequence

from mtser import __version__
from mtser.configio import to_dict
from mtser.featurestore.actors import node_id, worker_label
from mtser.featurestore.audio import audio_durations
from mtser.featurestore.config import ExtractConfig, resolve_compute_dtype
from mtser.featurestore.corpus import Utterance
from mtser.featurestore.extract_plan import CLAIM_POLL_SECONDS, Shard, ShardResult, shard_groups
from mtser.featurestore.files import CorpusFiles
from mtser.featurestore.models import content_hash, encoder_dim_and_rate, stored_layers
from mtser.featurestore.prefetch import prefetch
from mtser.featurestore.pipeline import Failure, Pipeline
from mtser.featurestore.store import (
    EncoderInfo, PartClaimed, PartCommitted, StoreError, StoreWriter, create_store, register_encoder,
)

GROUP_BATCHES = 4               # a shard is decoded and encoded this many batches (batch_seconds) at a time


@dataclass(frozen=True)
class ExtractJob:
    """What every worker needs besides its shards."""

    cfg: ExtractConfig                       # compute dtypes resolved (`with_compute_dtypes`)
    url: str
    storage_options: dict | None
    augment: int                             # augmented copies per Train utterance


class ShardWorker:
    """Loads the encoders once (on the GPU when this process has one), then encodes and commits whatever shards
    it is handed. As a Ray actor it is restarted by Ray when its process dies (the driver's `max_restarts`)."""

    def __init__(self, job: ExtractJob, threads: int | None = None):
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.job = job
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.pipeline = Pipeline(job.cfg, self.device, job.storage_options)

    def run(self, shard: Shard) -> ShardResult:
        return write_shard(self.pipeline, shard, self.job)

    def where(self) -> str:
        """"pid P, node N" of this worker, for the driver's messages."""
        return worker_label(os.getpid(), node_id())


def write_shard(pipeline: Pipeline, shard: Shard, job: ExtractJob) -> ShardResult:
    """Encode one shard and commit it as one store part, group by group (each group's features streamed to the
    part before the next is encoded). A shard another writer holds or committed meanwhile is not encoded."""
    try:
        writer = StoreWriter(job.url, shard.id, job.storage_options, replaces=shard.replaces)
    except (PartClaimed, PartCommitted) as exc:
        return ShardResult(shard.id, elsewhere=str(exc))
    with writer:
        return _encode_into(writer, pipeline, shard, job.augment)


def _encode_into(writer: StoreWriter, pipeline: Pipeline, shard: Shard, augment: int) -> ShardResult:
    failures: list[Failure] = []
    written, seconds, encode_s, wait_s = 0, 0.0, 0.0, 0.0
    groups = shard_groups(shard.utterances, pipeline.cfg.batch_seconds * GROUP_BATCHES)
    loads = prefetch(lambda group: pipeline.load(group, augment), groups, depth=1, workers=1)  # decode ahead
    while True:
        tick = time.perf_counter()
        loaded = next(loads, None)
        tock = time.perf_counter()
        wait_s += tock - tick
        if loaded is None:
            break
        result = pipeline.encode(loaded)
        encode_s += time.perf_counter() - tock
        failures += result.failures
        for utt, feats in result.written:
            try:
                writer.add(utt, feats)
            except StoreError as exc:
                failures.append(Failure(utt, "store", str(exc)))
                continue
            written += 1
            seconds += utt.duration or 0.0
    for f in failures:
        writer.add_failure(f.utt.id, f.utt.path, f.stage, f.reason)
    writer.commit()
    return ShardResult(shard.id, written=written, failed=len(failures), seconds=seconds, encode_seconds=encode_s,
                       audio_wait_seconds=wait_s, pid=os.getpid(), node=node_id())


def with_durations(utts: Sequence[Utterance], storage_options: dict | None) -> list[Utterance]:
    """`utts` with the duration of those the corpus gave none read from their audio headers (URLs' concurrently);
    an unreadable header leaves it unknown (loading the audio reports why)."""
    unknown = [u.path for u in utts if not u.duration and u.path]
    found = dict(zip(unknown, audio_durations(unknown, CorpusFiles(storage_options))))
    return [replace(u, duration=found[u.path]) if not u.duration and found.get(u.path) else u for u in utts]


def with_compute_dtypes(cfg: ExtractConfig, device: str) -> ExtractConfig:
    """`cfg` with every encoder's compute_dtype resolved for `device` (what the workers run and provenance says)."""
    return replace(cfg, encoders=[replace(e, compute_dtype=resolve_compute_dtype(e, device)) for e in cfg.encoders])


def register_encoders(url: str, cfg: ExtractConfig, storage_options: dict | None = None) -> None:
    """Create the store (if needed) and record each encoder's provenance (reads model configs, not weights).
    `cfg`'s compute dtypes must be resolved (`with_compute_dtypes`)."""
    create_store(url, storage_options)
    for enc in cfg.encoders:
        if enc.compute_dtype is None:
            raise ValueError(f"encoder {enc.name}: compute_dtype not resolved for a device")
        dim, rate = encoder_dim_and_rate(enc, cfg.sample_rate)
        register_encoder(url, EncoderInfo(
            name=enc.name, kind=enc.kind, model=enc.model, revision=enc.revision, content_hash=content_hash(enc.model),
            layer=enc.layer, mean_last_k=enc.mean_last_k, dim=dim, frame_rate=rate, dtype=enc.dtype,
            compression=enc.compression, sample_rate=cfg.sample_rate, mtser_version=__version__, config=to_dict(enc),
            compute_dtype=enc.compute_dtype, layers=stored_layers(enc),
        ), storage_options)


def reader_problems(problems: Sequence[Any], kept: Sequence[Utterance]) -> tuple[list[Failure], list[Failure]]:
    """Corpus-reader problems (`CorpusProblem`) as (failures, warnings) rows of stage "read": a problem about an
    utterance the reader kept (a duplicate row whose first occurrence was read, a transcript it could not use) is a
    warning; one about a row it skipped is a failure (nothing of it is written)."""
    kept_ids = {u.id for u in kept}
    rows = [(p, Failure(Utterance(id=p.item or p.source, path=p.source), "read", str(p))) for p in problems]
    return ([f for p, f in rows if p.item not in kept_ids], [f for p, f in rows if p.item in kept_ids])


def write_reader_problems(url: str, failures: Sequence[Failure], warnings: Sequence[Failure],
                          storage_options: dict | None = None) -> str | None:
    """Reader problems as one part whose id hashes its content (a rerun does not add it twice); its part id."""
    if not failures and not warnings:
        return None
    content = [[(p.utt.id, p.stage, p.reason) for p in rows] for rows in (failures, warnings)]
    part = f"reader-{hashlib.sha256(json.dumps(content).encode()).hexdigest()[:12]}"
    while True:                                         # a concurrent run writes the same part: let it finish
        try:
            writer = StoreWriter(url, part, storage_options)
        except PartCommitted:
            return part
        except PartClaimed:
            time.sleep(CLAIM_POLL_SECONDS)
            continue
        with writer:
            for p in failures:
                writer.add_failure(p.utt.id, p.utt.path, p.stage, p.reason)
            for p in warnings:
                writer.add_warning(p.utt.id, p.utt.path, p.stage, p.reason)
            writer.commit()
        return part
