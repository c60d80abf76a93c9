"""The learned layer weights of a run's members (`model.layer_weights`): read from each best checkpoint, their
entropy (results.csv's `layer_entropy`) and the report's panels of them.

A member's weights are the softmax of its `branches.<enc>.mix.logits` (one logit per stored layer the branch reads);
the sidecar's `layers` {enc: [hidden-state indices]} names those layers. Only the safetensors header and these few
tensors are read (byte ranges of a local file or a URL), never the model's other weights and never the model code,
so the results table of a large search stays cheap to build.
"""
from __future__ import annotations

import json
import math
import struct
from typing import Any

import numpy as np
import pandas as pd

from mtser.trainer.runs import RunFolder

WEIGHTS = "model.safetensors"                   # checkpoint.py's file names (that module imports torch and the model)
SIDECAR = "checkpoint.json"
PREFIX, SUFFIX = "branches.", ".mix.logits"     # a member's state-dict key of one encoder's layer logits
DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2"}
MemberWeights = dict[str, tuple[list[int], np.ndarray]]     # encoder -> (hidden-state indices, softmax weights)


def read_mix_logits(checkpoint: str, storage_options: dict | None = None) -> dict[str, np.ndarray]:
    """{encoder: its layer logits (L,)} of the checkpoint at `checkpoint` (a local folder or URL); {} for a model
    without layer weights. Reads the safetensors header and only the logits' byte ranges."""
    folder = RunFolder(checkpoint, storage_options)
    (size,) = struct.unpack("<Q", folder.read_bytes(WEIGHTS, 0, 8))
    header = json.loads(folder.read_bytes(WEIGHTS, 8, 8 + size))
    logits = {}
    for key, entry in header.items():
        if key.startswith(PREFIX) and key.endswith(SUFFIX):
            start, end = (8 + size + offset for offset in entry["data_offsets"])
            raw = np.frombuffer(folder.read_bytes(WEIGHTS, start, end), dtype=DTYPES[entry["dtype"]])
            values = (raw.astype(np.uint32) << 16).view(np.float32) if entry["dtype"] == "BF16" else raw
            logits[key[len(PREFIX):-len(SUFFIX)]] = values.astype(np.float64).reshape(entry["shape"])
    return logits


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def layer_entropy(logits: dict[str, np.ndarray]) -> float:
    """Mean over encoders of the entropy (nats) of the softmax of their layer logits: ln L for uniform weights, 0
    for one layer carrying all the weight; NaN without layer weights."""
    if not logits:
        return math.nan
    entropies = []
    for values in logits.values():
        weights = softmax(values)
        entropies.append(float(-(weights * np.log(np.where(weights > 0, weights, 1.0))).sum()))
    return float(np.mean(entropies))


def checkpoint_layer_entropy(checkpoint: Any, storage_options: dict | None = None) -> float:
    """`layer_entropy` of the checkpoint at `checkpoint`; NaN without one (a point not finished) or without layer
    weights."""
    if not isinstance(checkpoint, str) or not checkpoint:
        return math.nan
    try:
        return layer_entropy(read_mix_logits(checkpoint, storage_options))
    except FileNotFoundError:
        return math.nan


def member_weights(checkpoint: str, storage_options: dict | None = None) -> MemberWeights:
    """{encoder: (the hidden-state indices its branch read, as the sidecar's `layers` records them, else 0..L-1;
    their softmax weights)}; {} without layer weights."""
    logits = read_mix_logits(checkpoint, storage_options)
    if not logits:
        return {}
    layers = RunFolder(checkpoint, storage_options).read_json(SIDECAR).get("layers") or {}
    return {enc: (list(layers.get(enc) or range(len(values))), softmax(values)) for enc, values in logits.items()}


def run_layer_weights(run_dir: RunFolder, results: pd.DataFrame) -> dict[str, MemberWeights]:
    """{row label: `member_weights`} of every trial of `results` whose checkpoint has layer weights, labelled
    `<trial> · <task>` and, for members of the run's ensemble, `→` the ensemble tasks they serve."""
    roles: dict[str, list[str]] = {}
    try:
        for task, chosen in run_dir.read_json("ensemble/ensemble.json").get("members", {}).items():
            for member in chosen:
                roles.setdefault(member.get("trial", ""), []).append(task)
    except FileNotFoundError:
        pass
    found = {}
    for row in results[results["checkpoint"].notna()].itertuples():
        try:
            weights = member_weights(str(row.checkpoint), run_dir.storage_options)
        except FileNotFoundError:
            continue
        if weights:
            serves = f" → {', '.join(roles[row.trial])}" if row.trial in roles else ""
            found[f"{row.trial} · {row.task}{serves}"] = weights
    return found


def weight_matrix(members: dict[str, MemberWeights], encoder: str) -> tuple[list[str], list[int], np.ndarray]:
    """(row labels, stored layer indices, weights with NaN where a member did not read that layer) of `encoder`."""
    rows = [label for label, weights in members.items() if encoder in weights]
    columns = sorted({k for label in rows for k in members[label][encoder][0]})
    matrix = np.full((len(rows), len(columns)), np.nan)
    for i, label in enumerate(rows):
        layers, weights = members[label][encoder]
        matrix[i, [columns.index(k) for k in layers]] = weights
    return rows, columns, matrix


def draw_layer_weights(members: dict[str, MemberWeights]) -> list[tuple[str, Any]]:
    """One heatmap per encoder: a row per member, a column per stored layer index, each cell its weight (cividis,
    readable with any colour vision; labels in the contrasting text colour); [] without layer weights."""
    from mtser.trainer.report import _annotate, _pyplot

    plt = _pyplot()
    panels = []
    for encoder in sorted({enc for weights in members.values() for enc in weights}):
        rows, columns, matrix = weight_matrix(members, encoder)
        width = max(4.2, 2.6 + 0.55 * len(columns) + 0.065 * max(map(len, rows)))
        fig, ax = plt.subplots(figsize=(width, 1.4 + 0.36 * len(rows)), layout="constrained")
        image = ax.imshow(matrix, cmap="cividis", vmin=0, vmax=max(float(np.nanmax(matrix)), 1e-9), aspect="auto")
        _annotate(ax, image, matrix, np.vectorize(lambda v: f"{v:.2f}")(matrix))
        ax.set(xticks=range(len(columns)), yticks=range(len(rows)), xticklabels=[str(k) for k in columns],
               yticklabels=rows, xlabel="stored hidden state (0 = embeddings)", title=f"{encoder}: layer weights")
        fig.colorbar(image, ax=ax, fraction=0.046, label="softmax weight")
        panels.append((encoder, fig))
    return panels


def layer_caption(members: dict[str, MemberWeights]) -> str:
    """The caption of the layer-weight panels (HTML-safe text)."""
    return (f"{len(members)} member{'s' * (len(members) != 1)} with learned layer weights (their best checkpoints); "
            "each row sums to 1, uniform weights are 1/L; blank: a layer the member did not read; → the ensemble tasks "
            "a member serves.")
