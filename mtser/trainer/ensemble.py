"""Ensembles of a search's best checkpoints: task 1 averages the class probabilities of the top-k checkpoints by
development macro-F1; task 2 averages, per attribute, the top-k checkpoints by that attribute's development CCC.

`build_ensemble` scores members and the ensemble on a split, writes the challenge CSVs and a manifest
(`ensemble.json`) that `mtser predict` loads.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mtser.featurestore.labels import ATTRIBUTE_COLUMNS, ATTRIBUTE_RANGE, ATTRIBUTES
from mtser.trainer.data import label_arrays
from mtser.trainer.metrics import summarize
from mtser.trainer.runs import FINISHED, RunFolder, as_run, load_results, load_search_record

MANIFEST = "ensemble.json"
TASKS: tuple[str, ...] = ("class", *ATTRIBUTES)          # "class" uses f1; each attribute its own ccc_<attribute>


class EnsembleError(RuntimeError):
    """An ensemble cannot be built or loaded (the message says why)."""


def task_metric(task: str) -> str:
    return "f1" if task == "class" else f"ccc_{task}"


def select_members(results: pd.DataFrame, k: int) -> dict[str, list[dict[str, Any]]]:
    """Top-k finished trials per task by the task's development metric (ties broken by trial name)."""
    if k < 1:
        raise EnsembleError(f"top-k must be >= 1, got {k}")
    done = results[results["status"].isin(FINISHED) & results["checkpoint"].notna()]
    if done.empty:
        raise EnsembleError("no finished trial with a checkpoint in the results table")
    chosen = {}
    for task in TASKS:
        metric = task_metric(task)
        ranked = done[done[metric].notna()].sort_values([metric, "trial"], ascending=[False, True]).head(k)
        if ranked.empty:
            raise EnsembleError(f"no trial has a development {metric}")
        chosen[task] = [{"trial": r["trial"], "stage": int(r["stage"]), "checkpoint": str(r["checkpoint"]),
                         "dev_metric": float(r[metric]), "metric": metric} for _, r in ranked.iterrows()]
    return chosen


@dataclass
class Predictions:
    """Class probabilities (N, 8) and attributes (N, 3) for `ids`."""

    ids: list[str]
    probs: np.ndarray
    attrs: np.ndarray


def combine(members: dict[str, list[dict[str, Any]]], outputs: dict[str, Predictions]) -> Predictions:
    """Mean class probabilities over the class members; per attribute, the mean over that attribute's members."""
    first = next(iter(outputs.values()))
    probs = np.mean([outputs[m["checkpoint"]].probs for m in members["class"]], axis=0)
    attrs = np.stack([np.mean([outputs[m["checkpoint"]].attrs[:, i] for m in members[name]], axis=0)
                      for i, name in enumerate(ATTRIBUTES)], axis=1)
    return Predictions(first.ids, probs, attrs)


def member_outputs(checkpoints: list[str], store, split: str, storage_options: dict | None = None
                   ) -> tuple[dict[str, Predictions], dict[str, dict]]:
    """Predictions of each distinct checkpoint on `split`, plus each checkpoint's sidecar meta."""
    from mtser.trainer.checkpoint import load_checkpoint
    from mtser.trainer.data import evaluation_ids
    from mtser.trainer.infer import check_store_matches, predict

    outputs, metas = {}, {}
    ids: list[str] | None = None
    for path in dict.fromkeys(checkpoints):
        model, cfg, meta = load_checkpoint(path, storage_options=storage_options)
        check_store_matches(meta, store)
        encoders = list(model.encoder_dims)
        if ids is None:
            ids = evaluation_ids(store, encoders, split)
            if not ids:
                raise EnsembleError(f"{store.url}: no {split} utterances with features of {encoders}")
        probs, attrs = predict(model, store, ids)
        outputs[path] = Predictions(ids, np.asarray(probs), np.asarray(attrs))
        metas[path] = meta
    return outputs, metas


def prediction_table(pred: Predictions, labels=None) -> pd.DataFrame:
    """infer.prediction_table with FileName for id, attributes clipped to 1..7, sorted by FileName."""
    from mtser.trainer.infer import prediction_table as per_utterance

    table = per_utterance(pred.ids, pred.probs, np.clip(pred.attrs, *ATTRIBUTE_RANGE), labels)
    return table.rename(columns={"id": "FileName"}).sort_values("FileName", kind="stable").reset_index(drop=True)


def build_ensemble(run_dir: str | Path, store_url: str, split: str = "Development", k: int | None = None,
                   out_dir: str | Path | None = None, storage_options: dict | None = None) -> dict[str, Any]:
    """Score the members and the ensemble on `split`, write CSVs and the manifest; returns the manifest.
    `run_dir`, `store_url` and `out_dir` may be URLs; `storage_options` apply to all of them."""
    from mtser.featurestore.store import open_store

    run_dir = as_run(run_dir, storage_options)
    out_dir = RunFolder(out_dir, storage_options) if out_dir else run_dir.sub("ensemble")
    results = load_results(run_dir)
    k = k or _configured_top_k(run_dir)
    members = select_members(results, k)
    store = open_store(store_url, storage_options=storage_options)
    outputs, metas = member_outputs([m["checkpoint"] for ms in members.values() for m in ms], store, split,
                                    storage_options)
    ensemble = combine(members, outputs)
    labels = label_arrays(store.utterances, ensemble.ids)
    member_metrics = {path: summarize(p.probs, p.attrs, labels) for path, p in outputs.items()}

    table = prediction_table(ensemble, labels)
    out_dir.write_csv(f"{split}/categorical.csv", table[["FileName", "EmoClass"]], "%.6f")
    out_dir.write_csv(f"{split}/attributes.csv", table[["FileName", *ATTRIBUTE_COLUMNS.values()]], "%.6f")
    out_dir.write_csv(f"{split}/predictions.csv", table, "%.6f")

    checkpoint_trial = dict(zip(results["checkpoint"].astype(str), results["trial"]))
    manifest = _merge_previous(out_dir, {
        "k": k, "store": store_url, "run": run_dir.url,
        "store_provenance": next(iter(metas.values()))["store"],
        "members": members,
        "member_metrics": {split: {checkpoint_trial.get(path, path): m for path, m in member_metrics.items()}},
        "metrics": {split: summarize(ensemble.probs, ensemble.attrs, labels)},
        "files": {split: {name: out_dir.url_of(f"{split}/{name}.csv")
                          for name in ("categorical", "attributes", "predictions")}},
    })
    out_dir.write_json(MANIFEST, manifest)
    return manifest


def _merge_previous(out_dir: RunFolder, manifest: dict[str, Any]) -> dict[str, Any]:
    """Keep other splits' metrics and files from an earlier call with the same members."""
    if out_dir.exists(MANIFEST):
        previous = out_dir.read_json(MANIFEST)
        if previous.get("members") == manifest["members"] and previous.get("store") == manifest["store"]:
            for key in ("member_metrics", "metrics", "files"):
                manifest[key] = {**previous.get(key, {}), **manifest[key]}
    return manifest


def _configured_top_k(run_dir: RunFolder) -> int:
    from mtser.config import load_config

    record = load_search_record(run_dir)
    return load_config(record["base"]).ensemble.top_k


def load_manifest(path: str | Path, storage_options: dict | None = None) -> dict[str, Any]:
    """The manifest at `path` (ensemble.json or its folder; a local path or a URL)."""
    path = str(path).rstrip("/")
    if not path.endswith(".json"):
        path = f"{path}/{MANIFEST}"
    folder, _, name = path.rpartition("/")
    try:
        return as_run(folder, storage_options).read_json(name)
    except OSError as exc:
        raise EnsembleError(f"{path}: cannot read ensemble manifest: {exc.strerror or 'no such file'}") from None
    except ValueError as exc:
        raise EnsembleError(f"{path}: not a valid ensemble manifest: {exc}") from None


def metrics_table(manifest: dict[str, Any], split: str) -> pd.DataFrame:
    """Per task: each member's and the ensemble's metric on `split` (empty where the split has no labels)."""
    rows = []
    for task, members in manifest["members"].items():
        metric = task_metric(task)
        for m in members:
            value = manifest["member_metrics"][split].get(m["trial"], {}).get(metric, math.nan)
            rows.append({"task": task, "model": m["trial"], "metric": metric, split: value})
        rows.append({"task": task, "model": "ENSEMBLE", "metric": metric,
                     split: manifest["metrics"][split].get(metric, math.nan)})
    return pd.DataFrame(rows)
