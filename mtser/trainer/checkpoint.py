"""Checkpoints: a directory with `model.safetensors` (weights) and `checkpoint.json` (full config, model input dims,
the stored layers each encoder was read with (`layers`), label map, store provenance, metrics, and `sha256`: the
SHA-256 of each weights file). Loading never unpickles and
needs no store; it reads a local directory or any fsspec URL (s3://bucket/run/stage1/<trial>/best) straight into
memory, checks the weights' SHA-256 against the sidecar (a checkpoint written before it was recorded loads with one
warning) and refuses non-finite weights. Saving writes a local directory (a search on an object store uploads it
through `runs.RunFolder`). `check_store_matches`: does a store hold the features a checkpoint was trained on."""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import shutil
from pathlib import Path

import fsspec
import torch
from safetensors import SafetensorError
from safetensors.torch import load, save_file

from mtser.configio import ConfigError, MAX_SHOWN, from_dict, shown, to_dict
from mtser.errors import MtserError
from mtser.featurestore.files import remote_errors
from mtser.featurestore.store import StoreError
from mtser.featurestore.labels import ATTRIBUTES, CLASSES
from mtser.trainer.config import Config, ModelConfig
from mtser.trainer.model import FusionNetwork
from mtser.trainer.runs import write_atomic

FORMAT = "mtser-checkpoint"
VERSION = 1
WEIGHTS = "model.safetensors"
SIDECAR = "checkpoint.json"
log = logging.getLogger(__name__)


class CheckpointError(MtserError):
    """A checkpoint directory is missing, incomplete or does not match its config; the message names the path."""


def save_checkpoint(path: Path, model: FusionNetwork, cfg: Config, meta: dict, member: int = 0) -> None:
    """Write member `member` of `model` as a checkpoint directory, atomically (a temporary sibling renamed over
    `path`). The weights are the member's ordinary state dict (`FusionNetwork.member_state`).

    `meta` carries at least `metrics`; the sidecar adds config, input dims and label map.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {k: v.contiguous() for k, v in model.member_state(member).items()}
    save_file(state, str(tmp / WEIGHTS))
    sidecar = {
        **meta,
        "sha256": {WEIGHTS: hashlib.sha256((tmp / WEIGHTS).read_bytes()).hexdigest()},
        "format": FORMAT,
        "version": VERSION,
        "config": to_dict(cfg),
        "input_dims": dict(model.encoder_dims),
        "layers": model.read_layers,
        "label_map": {"classes": list(CLASSES), "attributes": list(ATTRIBUTES)},
    }
    (tmp / SIDECAR).write_bytes(_sidecar_json(sidecar))
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)


def _sidecar_json(meta: dict) -> bytes:
    return json.dumps(_finite(meta), indent=2, allow_nan=False).encode()


def _finite(value):
    """JSON has no NaN/inf: non-finite numbers (a diverged metric) are written as null."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def update_sidecar(path: Path, **fields) -> None:
    """Add `fields` to a local checkpoint's sidecar (written atomically)."""
    path = Path(path)
    meta = {**read_sidecar(path), **fields}
    write_atomic(path / SIDECAR, _sidecar_json(meta))


def _read(path: str | Path, name: str, storage_options: dict | None) -> bytes:
    """The bytes of file `name` in checkpoint `path` (a local directory or a URL); FileNotFoundError if missing."""
    fs, root = fsspec.core.url_to_fs(str(path), **(storage_options or {}))
    try:
        return fs.cat_file(f"{root.rstrip('/')}/{name}")
    except FileNotFoundError:
        raise
    except (OSError, *remote_errors()) as exc:             # unreachable, forbidden, a folder where a file should be
        raise CheckpointError(f"{path}: cannot read {name}: {exc}") from None


def read_sidecar(path: str | Path, storage_options: dict | None = None) -> dict:
    try:
        meta = json.loads(_read(path, SIDECAR, storage_options))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not a checkpoint directory (no {SIDECAR})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}/{SIDECAR}: not valid JSON: {exc}") from None
    validate_sidecar(meta, path)
    meta["config"] = _upgraded(meta["config"])
    return meta


MAX_INPUT_DIM = 1 << 16           # features per frame of one encoder (the largest encoders have 1280-4096)
MAX_PARAMETERS = 1 << 30          # 4 GiB of float32 weights; the paper's model has 66 million


def validate_sidecar(meta: object, path: str | Path) -> None:
    """The sidecar's schema, checked before anything is built from it: a JSON object of this format and version,
    this mtser's label map, a config object, `input_dims` mapping encoder names to integers in
    [1, MAX_INPUT_DIM], `store` provenance naming each of those encoders, and `layers` (absent before layers
    existed: each encoder read as stored) mapping some of them to lists of distinct hidden-state indices >= 0.
    CheckpointError names the field."""
    where = f"{path}/{SIDECAR}"
    if not isinstance(meta, dict):
        raise CheckpointError(f"{where}: expected a JSON object, got {type(meta).__name__}")
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise CheckpointError(f"{path}: unsupported checkpoint format {shown(meta.get('format'))} "
                              f"v{shown(meta.get('version'))}")
    label_map = meta.get("label_map")
    if not isinstance(label_map, dict) or label_map.get("classes") != list(CLASSES):
        raise CheckpointError(f"{path}: label map {shown(label_map)} differs from this mtser's {list(CLASSES)}")
    for key in ("config", "input_dims", "store"):
        if not isinstance(meta.get(key), dict):
            got = shown(meta[key]) if key in meta else "nothing"
            raise CheckpointError(f"{where}: {key}: expected an object, got {got}")
    dims = meta["input_dims"]
    if not dims:
        raise CheckpointError(f"{where}: input_dims: names no encoder")
    for name, dim in dims.items():
        if type(dim) is not int or not 1 <= dim <= MAX_INPUT_DIM:
            raise CheckpointError(f"{where}: input_dims.{name[:MAX_SHOWN]}: expected an integer in "
                                  f"[1, {MAX_INPUT_DIM}], got {shown(dim)}")
    encoders = meta["store"].get("encoders")
    if not isinstance(encoders, dict) or not all(isinstance(encoders.get(n), dict) for n in dims):
        raise CheckpointError(f"{where}: store.encoders: expected the provenance of each of {sorted(dims)}, "
                              f"got {shown(encoders)}")
    layers = meta.get("layers", {})
    if not isinstance(layers, dict) or not all(
            name in dims and isinstance(v, list) and v and len(set(v)) == len(v)
            and all(type(k) is int and 0 <= k <= MAX_INPUT_DIM for k in v) for name, v in layers.items()):
        raise CheckpointError(f"{where}: layers: expected lists of distinct hidden-state indices of encoders among "
                              f"{sorted(dims)}, got {shown(layers)}")


def _model_within_bounds(dims: dict[str, int], cfg: ModelConfig, layers: dict[str, list[int]], path: str | Path
                         ) -> None:
    """Refuse to build a model of more than MAX_PARAMETERS parameters (counted without allocating)."""
    with torch.device("meta"):
        parameters = sum(p.numel() for p in FusionNetwork(dims, cfg, read_layers=layers).parameters())
    if parameters > MAX_PARAMETERS:
        raise CheckpointError(f"{path}/{SIDECAR}: its model would have {parameters:,} parameters (at most "
                              f"{MAX_PARAMETERS:,}); not a checkpoint this mtser wrote")


def _upgraded(config: dict) -> dict:
    """A config as written before stage 2 had one section per task and ensembles a k per task (mtser 0.1): the one
    `finetune` section becomes its task's section, `ensemble.top_k` both ks over all grid points."""
    config = dict(config)
    finetune = config.get("finetune")
    if isinstance(finetune, dict) and finetune.get("task") in ("cat", "dim"):
        config["finetune"] = {finetune["task"]: {k: v for k, v in finetune.items() if k != "select_metric"}}
    ensemble = config.get("ensemble")
    if isinstance(ensemble, dict) and "top_k" in ensemble:
        config["ensemble"] = {"class_top_k": ensemble["top_k"], "attribute_top_k": ensemble["top_k"],
                              "class_from": "all", "attribute_from": "all"}
    return config


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu", storage_options: dict | None = None
                    ) -> tuple[FusionNetwork, Config, dict]:
    """Rebuild the model from the sidecar and load its weights (safetensors: no pickle) as the one member of a
    `FusionNetwork` (G = 1; `FusionNetwork.stack` fuses several) reading the sidecar's `layers`, in eval mode."""
    meta = read_sidecar(path, storage_options)
    try:
        cfg = from_dict(Config, meta["config"])
    except ConfigError as exc:
        raise CheckpointError(f"{path}/{SIDECAR}: config: {exc}") from None
    layers = meta.setdefault("layers", {})
    _model_within_bounds(meta["input_dims"], cfg.model, layers, path)
    try:
        raw = _read(path, WEIGHTS, storage_options)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: {WEIGHTS} is missing") from None
    _check_sha256(path, meta, raw)
    try:
        weights = load(raw)
    except SafetensorError as exc:
        raise CheckpointError(f"{path}/{WEIGHTS}: not a readable safetensors file: {exc}") from None
    bad = [k for k, v in weights.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{path}: weights contain NaN or inf ({len(bad)} tensors, e.g. {bad[0]!r}); "
                              f"the checkpoint is unusable")
    for key in [k for k in weights if k.endswith(".pool.attention.2.bias")]:
        del weights[key]        # earlier checkpoints had a score bias, which softmax ignores (model.py): exact to drop
    try:
        model = FusionNetwork.from_states(meta["input_dims"], cfg.model, [weights], read_layers=layers)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not match the model in its config: {exc}") from None
    return model.to(device).eval(), cfg, meta


def _check_sha256(path: str | Path, meta: dict, raw: bytes) -> None:
    """The weights' SHA-256 must equal the sidecar's; a sidecar without one (older mtser) gets one warning."""
    recorded = meta.get("sha256", {}).get(WEIGHTS) if isinstance(meta.get("sha256"), dict) else None
    if recorded is None:
        _warn_unverified(str(path))
        return
    actual = hashlib.sha256(raw).hexdigest()
    if actual != recorded:
        raise CheckpointError(f"{path}/{WEIGHTS}: SHA-256 {actual[:16]}… differs from {recorded[:16]}… recorded in "
                              f"{SIDECAR}: the weights are damaged or were replaced")


@functools.cache
def _warn_unverified(path: str) -> None:
    log.warning("%s: %s records no SHA-256 of its weights (written by an older mtser); loaded unverified",
                path, SIDECAR)


PROVENANCE_FIELDS = ("kind", "model", "revision", "content_hash", "layer", "mean_last_k", "dim")


def check_store_matches(meta: dict, store) -> None:
    """The store's encoders must be the ones the checkpoint was trained on (same model, layer, dim, ...), holding
    the layers it read (`layers`; more are fine); an encoder it read as stored must hold the same stored layers."""
    for name, trained in meta["store"]["encoders"].items():
        info = store.encoders.get(name)
        if info is None:
            raise CheckpointError(f"store {store.url} lacks encoder {name!r} the checkpoint was trained on")
        read = meta.get("layers", {}).get(name)
        try:
            info.pick(read)
        except StoreError as exc:
            raise CheckpointError(f"store {store.url}: {exc}; the checkpoint was trained on layers {read}") from None
        current = {**dataclasses.asdict(info), "layers": None if info.layers is None else list(info.layers)}
        fields = PROVENANCE_FIELDS if read is not None else (*PROVENANCE_FIELDS, "layers")
        differing = [f for f in fields if current.get(f) != trained.get(f)]
        if differing:
            raise CheckpointError(f"store {store.url}: encoder {name!r} differs from the checkpoint's in "
                                  + ", ".join(f"{f} ({current.get(f)!r} vs {trained.get(f)!r})" for f in differing))
