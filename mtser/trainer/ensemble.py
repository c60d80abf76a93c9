"""Ensembles of a search's best checkpoints, as the paper built them.

Task 1 averages the class probabilities of the `ensemble.class_top_k` best Task-1 fine-tunings by development
macro-F1 (the paper: one model). Per attribute, the mean of the `ensemble.attribute_top_k` best Task-2 fine-tunings
by that attribute's development CCC (the paper: 3), plus forced members: `ensemble.extra_members` selectors (the
paper added the ASP Task-2 parent, "the pre-trained model that incorporated attention pooling", to valence) and
external prediction files in the challenge format (the paper added the challenge baseline's predictions to arousal
and dominance; `ensemble.external` declares them), aligned by `FileName`.

`build_ensemble` scores members and the ensemble on a split, on the utterances every member can read (members may
use different encoders; members of one architecture in one fused forward, `infer.fused_groups`), writes the
challenge CSVs and a manifest (`ensemble.json`) that `mtser predict` loads.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mtser.configio import shown
from mtser.errors import DATA, MtserError, USAGE
from mtser.featurestore.files import absolute, remote_errors
from mtser.featurestore.labels import ATTRIBUTE_COLUMNS, ATTRIBUTES
from mtser.trainer.config import EnsembleConfig, MemberSelector
from mtser.trainer.data import label_arrays
from mtser.trainer.metrics import summarize
from mtser.trainer.runs import FINISHED, RunFolder, as_run, load_results, load_search_record

MANIFEST = "ensemble.json"
TASKS: tuple[str, ...] = ("class", *ATTRIBUTES)          # "class" uses f1; each attribute its own ccc_<attribute>
STAGE2_TASK = {"class": "cat", **{name: "dim" for name in ATTRIBUTES}}


class EnsembleError(MtserError, RuntimeError):
    """An ensemble cannot be built or loaded (the message says why); `usage` marks a wrong invocation (exit code 2)."""

    def __init__(self, message: str, usage: bool = False):
        super().__init__(message, USAGE if usage else DATA)


def task_metric(task: str) -> str:
    return "f1" if task == "class" else f"ccc_{task}"


def member_key(member: dict[str, Any]) -> str:
    """Where a member's predictions come from: its checkpoint, or `external:<file>`."""
    return member["checkpoint"] if "checkpoint" in member else f"external:{member['external']}"


def _member(row: pd.Series, metric: str, forced: bool = False) -> dict[str, Any]:
    return {"trial": row["trial"], "stage": int(row["stage"]), "checkpoint": str(row["checkpoint"]),
            "dev_metric": float(row[metric]), "metric": metric, **({"forced": True} if forced else {})}


def _ranked(rows: pd.DataFrame, metric: str) -> pd.DataFrame:
    return rows[rows[metric].notna()].sort_values([metric, "trial"], ascending=[False, True])


def _matches(rows: pd.DataFrame, selector: MemberSelector, results: pd.DataFrame) -> pd.DataFrame:
    """`rows` that match `selector`; `parent_for` looks up the `parent` column of the whole results table."""
    keep = rows["stage"] == selector.stage
    if selector.pooling is not None:
        keep &= rows["pooling"] == selector.pooling
    if selector.task is not None:
        keep &= rows["task"] == selector.task
    if selector.parent_for is not None:
        parents = results.loc[results["task"] == selector.parent_for, "parent"] if "parent" in results else []
        keep &= rows["trial"].isin(set(parents))
    return rows[keep]


def select_members(results: pd.DataFrame, cfg: EnsembleConfig) -> dict[str, list[dict[str, Any]]]:
    """Members per task from the results table (ties broken by trial name): the top k of the allowed pool, then the
    attribute's forced `extra_members` (the best match of each selector not already in; `parent_for` selectors
    match the stage-1 points the results table names as `parent` of that task's fine-tunings)."""
    done = results[results["status"].isin(FINISHED) & results["checkpoint"].notna()]
    if done.empty:
        raise EnsembleError("no finished trial with a checkpoint in the results table")
    chosen = {}
    for task in TASKS:
        metric = task_metric(task)
        only = cfg.class_from if task == "class" else cfg.attribute_from
        key = "class_from" if task == "class" else "attribute_from"
        pool = done if only == "all" else done[(done["stage"] == 2) & (done["task"] == STAGE2_TASK[task])]
        k = cfg.class_top_k if task == "class" else cfg.attribute_top_k
        ranked = _ranked(pool, metric).head(k)
        if ranked.empty:
            raise EnsembleError(f"ensemble.{key}: {only}, but no such finished trial has a development {metric} "
                                f"(run stage 2, or set ensemble.{key}: all)")
        chosen[task] = [_member(r, metric) for _, r in ranked.iterrows()]
        for selector in cfg.extra_members.get(task, []):
            taken = {m["trial"] for m in chosen[task]}
            candidates = _ranked(_matches(done, selector, results), metric)
            candidates = candidates[~candidates["trial"].isin(taken)]
            if candidates.empty:
                hint = (f" (parent_for: {selector.parent_for} needs the search's stage-2 {selector.parent_for} "
                        "fine-tunings in results.csv)" if selector.parent_for else "")
                raise EnsembleError(f"ensemble.extra_members.{task}: no finished trial matches {selector} "
                                    f"beyond the {len(taken)} already chosen{hint}")
            chosen[task].append(_member(candidates.iloc[0], metric, forced=True))
    return chosen


def add_external(members: dict[str, list[dict[str, Any]]], external: dict[str, str | Path],
                 storage_options: dict | None = None) -> None:
    """Add an external predictions file (challenge attribute CSV; a path or an fsspec URL) as a member of the given
    attributes; the manifest records where it is and its SHA-256."""
    for name, location in external.items():
        if name not in ATTRIBUTES:
            raise EnsembleError(f"--extra-member: {name!r} is not an attribute ({', '.join(ATTRIBUTES)}); external "
                                "files in the challenge format have no class probabilities", usage=True)
        location = absolute(location)
        digest = hashlib.sha256(_read_external(location, storage_options, usage=True)).hexdigest()
        members[name].append({"trial": f"external:{location.rstrip('/').rsplit('/', 1)[-1]}", "external": location,
                              "sha256": digest, "metric": task_metric(name), "forced": True})


def _read_external(location: str, storage_options: dict | None, usage: bool = False) -> bytes:
    import fsspec

    try:
        with fsspec.open(location, "rb", **(storage_options or {})) as f:
            return f.read()
    except (OSError, ValueError) as exc:
        raise EnsembleError(f"external member {location}: cannot read: {exc}", usage=usage) from None


def parse_extra_members(items: list[str]) -> dict[str, str]:
    """`arousal,dominance=baseline.csv` items → {attribute: file}."""
    out: dict[str, str] = {}
    for item in items:
        names, sep, path = item.partition("=")
        if not sep or not names.strip() or not path.strip():
            raise EnsembleError(f"--extra-member {item!r}: expected ATTRIBUTE[,ATTRIBUTE...]=FILE, e.g. "
                                "arousal,dominance=baseline.csv", usage=True)
        for name in names.split(","):
            out[name.strip()] = path.strip()
    return out


def external_predictions(location: str, ids: list[str], storage_options: dict | None = None) -> Predictions:
    """An external attribute CSV (FileName plus any of EmoAct, EmoVal, EmoDom) aligned to `ids` by FileName."""
    import io

    try:
        table = pd.read_csv(io.BytesIO(_read_external(location, storage_options)))
    except (ValueError, pd.errors.ParserError) as exc:
        raise EnsembleError(f"external member {location}: cannot read as CSV: {exc}") from None
    columns = [c for c in ATTRIBUTE_COLUMNS.values() if c in table]
    if "FileName" not in table or not columns:
        raise EnsembleError(f"external member {location}: needs a FileName column and at least one of "
                            f"{list(ATTRIBUTE_COLUMNS.values())}, has {list(table.columns)}")
    table = table.drop_duplicates("FileName", keep="last").set_index("FileName")
    missing = [i for i in ids if i not in table.index]
    if missing:
        raise EnsembleError(f"external member {location}: lacks {len(missing)} of the {len(ids)} utterances to predict "
                            f"(first: {', '.join(missing[:5])})")
    rows = table.loc[ids]
    attrs = np.stack([pd.to_numeric(rows[c], errors="coerce").to_numpy(np.float64) if c in rows
                      else np.full(len(ids), np.nan) for c in ATTRIBUTE_COLUMNS.values()], axis=1)
    return Predictions(list(ids), np.full((len(ids), 8), np.nan), attrs)


@dataclasses.dataclass
class Predictions:
    """Class probabilities (N, 8) and attributes (N, 3) for `ids`."""

    ids: list[str]
    probs: np.ndarray
    attrs: np.ndarray


def combine(members: dict[str, list[dict[str, Any]]], outputs: dict[str, Predictions]) -> Predictions:
    """Mean class probabilities over the class members; per attribute, the mean over that attribute's members
    (`outputs` keyed by `member_key`)."""
    first = outputs[member_key(members["class"][0])]
    probs = np.mean([outputs[member_key(m)].probs for m in members["class"]], axis=0)
    attrs = np.stack([np.mean([outputs[member_key(m)].attrs[:, i] for m in members[name]], axis=0)
                      for i, name in enumerate(ATTRIBUTES)], axis=1)
    return Predictions(first.ids, probs, attrs)


def load_members(checkpoints: list[str], store, storage_options: dict | None = None) -> dict[str, tuple[Any, dict]]:
    """(model, sidecar meta) of each distinct checkpoint, each checked against the store's encoders."""
    from mtser.trainer.checkpoint import check_store_matches, load_checkpoint

    loaded = {}
    for path in dict.fromkeys(checkpoints):
        model, _, meta = load_checkpoint(path, storage_options=storage_options)
        check_store_matches(meta, store)
        loaded[path] = (model, meta)
    return loaded


def common_ids(store, split: str, encoders: dict[str, list[str]]) -> tuple[list[str], dict[str, Any]]:
    """The `split` utterances every member can read (features of all its encoders; `encoders`: member -> its
    encoders), in the first member's order, and what the others lack: {"scored": n, "dropped": n, "first": [a few
    dropped ids], "lacking": {encoder: n dropped without its features}, "needed_by": {encoder: [members]}}."""
    from mtser.trainer.data import evaluation_ids

    readable = {key: evaluation_ids(store, list(key), split) for key in map(tuple, encoders.values())}
    common = set.intersection(*map(set, readable.values()))
    ids = [i for i in next(iter(readable.values())) if i in common]
    dropped = set().union(*readable.values()) - common
    lacking = {name: len(dropped - set(store.ids(split=split, encoder=name)))
               for name in dict.fromkeys(n for names in encoders.values() for n in names)}
    lacking = {name: n for name, n in lacking.items() if n}
    return ids, {"scored": len(ids), "dropped": len(dropped), "first": sorted(dropped)[:3], "lacking": lacking,
                 "needed_by": {name: [m for m, names in encoders.items() if name in names] for name in lacking}}


def coverage_line(split: str, coverage: dict[str, Any]) -> str | None:
    """One line on the utterances that members trained on different encoders cannot all read (None: none)."""
    if not coverage.get("dropped"):
        return None
    why = "; ".join(f"{n} lack {name} features (needed by {', '.join(coverage['needed_by'][name])})"
                    for name, n in coverage["lacking"].items())
    return (f"{split}: scored on the {coverage['scored']} utterances every member can read; dropped "
            f"{coverage['dropped']} (first: {', '.join(coverage['first'])}): {why}")


def missing_external_lines(missing: dict[str, str]) -> list[str]:
    """One line per expected external member (`ensemble.external`) that was not given."""
    by_name: dict[str, list[str]] = {}
    for attribute, name in missing.items():
        by_name.setdefault(name, []).append(attribute)
    return [f"ensemble.external: {name!r} for {', '.join(attrs)} not given: built without it (add it with "
            f"--extra-member {','.join(attrs)}=FILE)" for name, attrs in by_name.items()]


def prediction_table(pred: Predictions, labels=None) -> pd.DataFrame:
    """The challenge's form of `infer.prediction_table`: by FileName, attributes clipped to 1..7, sorted."""
    from mtser.trainer.infer import prediction_table as per_utterance

    table = per_utterance(pred.ids, pred.probs, pred.attrs, labels, id_column="FileName", clip=True)
    return table.sort_values("FileName", kind="stable").reset_index(drop=True)


def build_ensemble(run_dir: str | Path, store_url: str, split: str = "Development", k: int | None = None,
                   out_dir: str | Path | None = None, external: dict[str, str | Path] | None = None,
                   storage_options: dict | None = None) -> dict[str, Any]:
    """Score the members and the ensemble on `split`, write CSVs and the manifest; returns the manifest. `k`
    overrides both of the recipe's ks; `external` maps attributes to challenge-format prediction files.
    `run_dir`, `store_url` and `out_dir` may be URLs; `storage_options` apply to all of them."""
    from mtser.featurestore.store import open_store
    from mtser.trainer.infer import fused_groups, predict

    run_dir = as_run(run_dir, storage_options)
    out_dir = RunFolder(out_dir, storage_options) if out_dir else run_dir.sub("ensemble")
    previous = load_manifest(out_dir.url_of(MANIFEST), storage_options) if out_dir.exists(MANIFEST) else None
    results = load_results(run_dir)
    cfg = configured_ensemble(run_dir)
    if k is not None:
        if k < 1:
            raise EnsembleError(f"top-k must be >= 1, got {k}", usage=True)
        cfg = dataclasses.replace(cfg, class_top_k=k, attribute_top_k=k)
    members = select_members(results, cfg)
    add_external(members, external or {}, storage_options)
    missing_external = {name: label for name, label in cfg.external.items() if name not in (external or {})}
    store = open_store(store_url, storage_options=storage_options)
    checkpoints = [m["checkpoint"] for ms in members.values() for m in ms if "checkpoint" in m]
    loaded = load_members(checkpoints, store, storage_options)
    names = {**dict(zip(results["checkpoint"].astype(str), results["trial"])),
             **{member_key(m): m["trial"] for ms in members.values() for m in ms}}
    ids, coverage = common_ids(store, split, {names[path]: list(model.encoder_dims)
                                              for path, (model, _) in loaded.items()})
    if not ids:
        raise EnsembleError(f"{store.url}: no {split} utterance has the features every member needs "
                            f"({sorted({n for m, _ in loaded.values() for n in m.encoder_dims})})")
    outputs = {}
    for paths, network in fused_groups({path: model for path, (model, _) in loaded.items()}):
        probs, attrs = predict(network, store, ids)
        outputs.update({path: Predictions(ids, probs[g], attrs[g]) for g, path in enumerate(paths)})
    for m in (m for ms in members.values() for m in ms if "external" in m):
        outputs.setdefault(member_key(m), external_predictions(m["external"], ids, storage_options))
    ensemble = combine(members, outputs)
    labels = label_arrays(store.utterances, ensemble.ids)
    member_metrics = {key: summarize(None if key.startswith("external:") else p.probs, p.attrs, labels)
                      for key, p in outputs.items()}

    table = prediction_table(ensemble, labels)
    out_dir.write_csv(f"{split}/categorical.csv", table[["FileName", "EmoClass"]], "%.6f")
    out_dir.write_csv(f"{split}/attributes.csv", table[["FileName", *ATTRIBUTE_COLUMNS.values()]], "%.6f")
    out_dir.write_csv(f"{split}/predictions.csv", table, "%.6f")

    metas = [meta for _, meta in loaded.values()]
    manifest = _merge_previous(previous, {
        "class_top_k": cfg.class_top_k, "attribute_top_k": cfg.attribute_top_k, "store": store_url,
        "run": run_dir.url,
        "store_provenance": {**metas[0]["store"],          # every member's encoders (members may differ in them)
                             "encoders": {n: e for meta in metas for n, e in meta["store"]["encoders"].items()}},
        "members": members,
        "missing_external": missing_external,
        "coverage": {split: coverage},
        "member_metrics": {split: {names.get(key, key): m for key, m in member_metrics.items()}},
        "metrics": {split: summarize(ensemble.probs, ensemble.attrs, labels)},
        "files": {split: {name: out_dir.url_of(f"{split}/{name}.csv")
                          for name in ("categorical", "attributes", "predictions")}},
    })
    out_dir.write_json(MANIFEST, manifest)
    return manifest


def _merge_previous(previous: dict[str, Any] | None, manifest: dict[str, Any]) -> dict[str, Any]:
    """Keep other splits' metrics and files from an earlier call with the same members (`previous`: the manifest
    already in the output folder, read and validated before any work, so that a damaged one is named, not replaced
    unseen)."""
    if previous is not None:
        if previous.get("members") == manifest["members"] and previous.get("store") == manifest["store"]:
            for key in ("coverage", "member_metrics", "metrics", "files"):
                manifest[key] = {**previous.get(key, {}), **manifest[key]}
    return manifest


def configured_ensemble(run_dir: RunFolder | str | Path) -> EnsembleConfig:
    """The `ensemble` section of the search's recipe, with the search's overrides."""
    from mtser.trainer.config import load_config

    record = load_search_record(run_dir)
    return load_config(record["base"], record["search"].get("overrides") or {}).ensemble


def external_members(manifest: dict[str, Any]) -> dict[str, list[str]]:
    """External files of a manifest and the attributes each one is a member of."""
    out: dict[str, list[str]] = {}
    for task, m in ((task, m) for task, ms in manifest["members"].items() for m in ms if "external" in m):
        out.setdefault(m["external"], []).append(task)
    return out


def without_external(manifest: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """The manifest's members minus external files (each attribute must keep a model)."""
    members = {task: [m for m in ms if "external" not in m] for task, ms in manifest["members"].items()}
    empty = [task for task, ms in members.items() if not ms]
    if empty:
        raise EnsembleError(f"without its external members the ensemble has no model for {empty}", usage=True)
    return members


def load_manifest(path: str | Path, storage_options: dict | None = None) -> dict[str, Any]:
    """The manifest at `path` (ensemble.json or its folder; a local path or a URL)."""
    path = str(path).rstrip("/")
    if not path.endswith(".json"):
        path = f"{path}/{MANIFEST}"
    folder, _, name = path.rpartition("/")
    try:
        manifest = as_run(folder, storage_options).read_json(name)
    except (OSError, *remote_errors()) as exc:
        reason = getattr(exc, "strerror", None) or str(exc) or "no such file"
        raise EnsembleError(f"{path}: cannot read ensemble manifest: {reason}",
                            usage=isinstance(exc, FileNotFoundError)) from None     # a wrong path is a usage error
    except ValueError as exc:
        raise EnsembleError(f"{path}: not a valid ensemble manifest: {exc}") from None
    validate_manifest(manifest, path)
    return manifest


def validate_manifest(manifest: Any, path: str) -> None:
    """A manifest's schema, checked before any member is loaded: a JSON object whose `members` maps each of
    class, arousal, valence and dominance to a non-empty list of members, each a JSON object with a `trial` name and
    a `checkpoint` or an `external` location (strings). EnsembleError names the field."""
    if not isinstance(manifest, dict):
        raise EnsembleError(f"{path}: not a valid ensemble manifest: expected a JSON object, got "
                            f"{type(manifest).__name__}")
    members = manifest.get("members")
    if not isinstance(members, dict) or sorted(members) != sorted(TASKS):
        got = sorted(map(str, members))[:10] if isinstance(members, dict) else shown(members)
        raise EnsembleError(f"{path}: not a valid ensemble manifest: members: expected an object with the tasks "
                            f"{list(TASKS)}, got {got}")
    for key in ("member_metrics", "metrics", "files"):
        if not isinstance(manifest.get(key, {}), dict):
            raise EnsembleError(f"{path}: not a valid ensemble manifest: {key}: expected an object")
    for task in TASKS:
        if not isinstance(members[task], list) or not members[task]:
            raise EnsembleError(f"{path}: not a valid ensemble manifest: members.{task}: expected a non-empty list")
        for i, m in enumerate(members[task]):
            where = f"{path}: not a valid ensemble manifest: members.{task}[{i}]"
            if not isinstance(m, dict) or not isinstance(m.get("trial"), str):
                raise EnsembleError(f"{where}: expected an object with a trial name, got {shown(m)}")
            if not any(isinstance(m.get(k), str) for k in ("checkpoint", "external")):
                raise EnsembleError(f"{where}: names no checkpoint (or external file)")


def metrics_table(manifest: dict[str, Any], split: str) -> pd.DataFrame:
    """Per task: each member's and the ensemble's metric on `split` (empty where the split has no labels), and the
    challenge-comparable value next to it (`challenge`: F1 over the classes present; CCC over all rows, X included)."""
    rows = []
    for task, members in manifest["members"].items():
        metric = task_metric(task)
        scored = [(m["trial"], "forced" if m.get("forced") else "top-k", manifest["member_metrics"][split].get(
            m["trial"], {})) for m in members] + [("ENSEMBLE", "", manifest["metrics"][split])]
        for model, how, values in scored:
            rows.append({"task": task, "model": model, "member": how, "metric": metric,
                         split: values.get(metric, math.nan), "challenge": values.get(f"challenge_{metric}", math.nan)})
    return pd.DataFrame(rows)
