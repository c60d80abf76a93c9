"""Audio files → the store's encoders (run on the fly, same config the store records) → an ensemble → one row per file.

The encoders' frames go through what storing does to them (`featurestore.frames`: float16 rounding, int8
quantisation) before the models see them, so a file gets exactly the prediction the ensemble gives the same utterance
read from the store.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from mtser.configio import from_dict
from mtser.featurestore.config import EncoderConfig
from mtser.featurestore.corpus import Utterance
from mtser.featurestore.store import EncoderInfo, StoreError
from mtser.trainer.ensemble import (EnsembleError, Predictions, combine, external_members, load_manifest, member_key,
                                    prediction_table, without_external)

@dataclass
class PredictionRun:
    table: pd.DataFrame                                   # prediction_table columns, one row per file that worked
    failures: dict[str, str] = field(default_factory=dict)  # file -> reason


def collect_inputs(inputs: list[str | Path], transcripts: Path | None = None, storage_options: dict | None = None
                   ) -> tuple[list[Utterance], dict[str, str]]:
    """Audio files named directly or found in folders (corpus.read_folder), local or at fsspec URLs read with
    `storage_options`; id = the file's path or URL as given. With `transcripts`, `<transcripts>/<audio stem>.txt`
    is used where it exists; otherwise Whisper transcribes (when the store's Whisper encoder has `asr`)."""
    from mtser.featurestore.corpus import read_folder
    from mtser.featurestore.files import CorpusFiles

    files = CorpusFiles(storage_options)
    paths, problems = [], {}
    for item in map(str, inputs):
        if files.is_dir(item):
            read = read_folder(item, files=files)
            problems.update({p.item or p.source: p.reason for p in read.problems})
            paths += [u.path for u in read.utterances]
        elif files.is_file(item):
            paths.append(item)
        else:
            problems[item] = "no such file or directory"
    return [_utterance(path, transcripts) for path in paths], problems


def _utterance(path: str, transcripts: Path | None) -> Utterance:
    """As the MSP-Podcast reader does: whitespace-normalised text; empty or undecodable files mean no transcript."""
    file = transcripts / f"{Path(path).stem}.txt" if transcripts else None
    try:
        text = " ".join(file.read_bytes().decode("utf-8").split()) if file is not None and file.is_file() else ""
    except UnicodeDecodeError:
        text = ""
    return Utterance(id=path, path=path, transcript=text or None, transcript_source="human" if text else None)


def encoder_provenance(metas: list[dict]) -> dict[str, dict]:
    """Each encoder's provenance (the store's EncoderInfo record) as the members' checkpoints recorded it."""
    infos: dict[str, dict] = {}
    for meta in metas:
        for name, info in meta["store"]["encoders"].items():
            if infos.setdefault(name, info) != info:
                raise EnsembleError(f"ensemble members disagree on encoder {name!r}: {infos[name]} vs {info}")
    return infos


def encoder_configs(metas: list[dict]) -> list[EncoderConfig]:
    """The encoders exactly as the store recorded them in the members' checkpoints: run in the compute dtype the
    store's features were computed in (float32 for stores that predate the record), their frames converted as the
    store keeps them (its dtype; `featurestore.frames`)."""
    return [from_dict(EncoderConfig, {**info["config"], "dtype": info["dtype"],
                                      "compute_dtype": info.get("compute_dtype", "float32")})
            for info in encoder_provenance(metas).values()]


class EnsembleScorer:
    """An ensemble's member models, loaded once and fused by architecture (`infer.fused_groups`: one forward per
    group), and the encoders that feed them (as the store recorded them): per-utterance features in, the ensemble's
    `Predictions` out. Used by `predict_files` and the timeline.

    External members (prediction files of a fixed split) cannot predict new audio: an ensemble with them is refused
    (EnsembleError, usage) unless `skip_external` drops them. A member that reads stored layers the encoders do not
    give is refused naming it, the encoder and the layers."""

    def __init__(self, ensemble: str | Path, device: str = "cpu", skip_external: bool = False,
                 storage_options: dict | None = None):
        from mtser.trainer.checkpoint import load_checkpoint
        from mtser.trainer.infer import fused_groups

        manifest = load_manifest(ensemble, storage_options)
        external = external_members(manifest)
        if external and not skip_external:
            listed = "; ".join(f"{Path(f).name} for {', '.join(tasks)}" for f, tasks in external.items())
            raise EnsembleError(f"{ensemble}: the ensemble has external members ({listed}), predictions of a fixed "
                                "split that cannot score new audio; pass --skip-external to predict without them",
                                usage=True)
        self.device, self.members = device, without_external(manifest)
        models, metas = {}, []
        for path in dict.fromkeys(member_key(m) for ms in self.members.values() for m in ms):
            models[path], _, meta = load_checkpoint(path, device=device, storage_options=storage_options)
            metas.append(meta)
        self.groups = fused_groups(models)
        self.encoders = encoder_configs(metas)
        self.provenance = encoder_provenance(metas)
        self.positions = [self._positions(paths, network) for paths, network in self.groups]

    def _positions(self, paths: list[str], network) -> dict[str, list[int]]:  # noqa: ANN001 (a FusionNetwork)
        """Where the layers a group's members read are in the encoders' frames ((T, L, D) of the stored layers)."""
        try:
            return {name: EncoderInfo.from_dict(self.provenance[name]).pick(read)
                    for name, read in network.read_layers.items()}
        except StoreError as exc:
            raise EnsembleError(f"ensemble member(s) {', '.join(paths)}: the encoders do not give the layers it was "
                                f"trained on: {exc}") from None

    def score(self, ids: list[str], features: list[dict[str, np.ndarray]]) -> Predictions:
        """The ensemble's predictions for utterances given their features as a store reader gets them (float32
        values of the stored frames: `featurestore.frames`, as `pipeline.encode_utterances` returns them)."""
        from mtser.trainer.infer import predict_features
        from mtser.trainer.layer_mix import take_layers

        outputs = {}
        for (paths, network), positions in zip(self.groups, self.positions):
            squeeze = network.reader_layers()["squeeze"]
            inputs = [{n: take_layers(f[n], positions.get(n), n in squeeze) for n in network.encoder_dims}
                      for f in features]
            probs, attrs = predict_features(network, inputs, device=self.device)
            outputs.update({path: Predictions(list(ids), probs[g], attrs[g]) for g, path in enumerate(paths)})
        return combine(self.members, outputs)


def predict_files(inputs: list[str | Path], ensemble: str | Path, device: str = "cpu",
                  transcripts: Path | None = None, skip_external: bool = False,
                  storage_options: dict | None = None) -> PredictionRun:
    """Run the ensemble at `ensemble` (manifest file or its directory, local or a URL) on audio files, one
    prediction per whole file; bad files are skipped. `storage_options` apply to the manifest and the member
    checkpoints."""
    from mtser.featurestore.pipeline import encode_utterances

    scorer = EnsembleScorer(ensemble, device, skip_external, storage_options)
    utts, failures = collect_inputs(inputs, transcripts, storage_options)
    features, _, failed = (encode_utterances(scorer.encoders, utts, device=device, storage_options=storage_options)
                           if utts else ({}, {}, {}))
    failures.update(failed)
    ids = [u.id for u in utts if u.id in features and u.id not in failed]
    return PredictionRun(prediction_table(scorer.score(ids, [features[i] for i in ids])), failures)


def long_files(paths: list[str], seconds: float, storage_options: dict | None = None) -> dict[str, float]:
    """The files among `paths` longer than `seconds` (from their headers), with their lengths."""
    from mtser.featurestore.audio import audio_durations
    from mtser.featurestore.files import CorpusFiles

    return {p: d for p, d in zip(paths, audio_durations(paths, CorpusFiles(storage_options))) if d > seconds}
