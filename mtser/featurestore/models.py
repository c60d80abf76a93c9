"""The encoders' models as files: finding them (a local folder or a hub id), loading their weights (safetensors
only), and what the store records of them (feature width, frame rate, a local folder's content hash, and the
hidden-state indices an encoder stores: `stored_layers`). Reads model configs only, never runs a model; the
encoders themselves are in `encoders`.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from mtser.configio import ConfigError
from mtser.featurestore.config import EncoderConfig, model_candidates

WHISPER_SAMPLES_PER_FRAME = 320


# ------------------------------------------------------------------------------------------------ finding the models
OFFLINE_HINT = ("give a folder (relative to the config file or the current directory) or a hub id this machine can "
                "reach; offline (HF_HUB_OFFLINE=1) a hub id must already be in the Hugging Face cache, else use a "
                "local path")


def check_models(encoders: Sequence[EncoderConfig], config_dir: Path) -> None:
    """ConfigError naming `extract.encoders[i].model`, the folders tried and what to do, for the first encoder whose
    model is neither a local folder (`model_candidates`) nor a hub id whose config this machine can load."""
    for i, enc in enumerate(encoders):
        tried = model_candidates(enc.model, config_dir)
        if any(path.is_dir() for path in tried):
            continue
        reason = _hub_problem(enc.model, enc.revision)
        if reason is not None:
            raise ConfigError(f"extract.encoders[{i}].model: {enc.model!r} is not a folder (tried "
                              f"{', '.join(str(p) for p in tried)}) and {reason}; {OFFLINE_HINT}")


def _hub_problem(model: str, revision: str | None) -> str | None:
    """None when `model` is a hub id whose config loads (from the cache or the hub), else why not."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id
    from transformers import AutoConfig

    try:
        validate_repo_id(model)
    except HFValidationError:
        return "not a hub id ('name' or 'namespace/name')"
    try:
        AutoConfig.from_pretrained(model, revision=revision)
    except (OSError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return f"the hub id cannot be loaded ({first[:200]})"
    return None


# ------------------------------------------------------------------------------------------------------ weights
ALLOW_PICKLE_ENV = "MTSER_ALLOW_PICKLE_WEIGHTS"


def pretrained_model(cls: Any, cfg: EncoderConfig) -> Any:
    """`cls.from_pretrained` of the encoder's model with safetensors weights only: a pickled `pytorch_model.bin`
    can run code when loaded, and a config or a checkpoint sidecar names the model. `MTSER_ALLOW_PICKLE_WEIGHTS=1`
    (the user's environment, never a file mtser reads) allows pickled weights too."""
    allow = os.environ.get(ALLOW_PICKLE_ENV) == "1"
    try:
        return cls.from_pretrained(cfg.model, revision=cfg.revision, use_safetensors=None if allow else True)
    except OSError as exc:
        if allow or "safetensors" not in str(exc):
            raise
        raise ConfigError(f"encoder {cfg.name!r}: {cfg.model} has no safetensors weights and mtser does not load "
                          f"pickled ones (they can run code); convert the model to safetensors, or set "
                          f"{ALLOW_PICKLE_ENV}=1 if you trust it") from None


# --------------------------------------------------------------------------------------------------- provenance
def encoder_dim_and_rate(cfg: EncoderConfig, sample_rate: int) -> tuple[int, float]:
    """Feature width and frames per second of audio (0.0 for text tokens), read from the model config only."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(cfg.model, revision=cfg.revision)
    if cfg.kind == "whisper":
        return int(config.d_model), sample_rate / WHISPER_SAMPLES_PER_FRAME
    if cfg.kind == "speech":
        return int(config.hidden_size), sample_rate / float(np.prod(config.conv_stride))
    return int(config.hidden_size), 0.0


def content_hash(model: str) -> str | None:
    """sha256 over a local model directory's file names and bytes (None for hub ids: the revision identifies them)."""
    root = Path(model)
    if not root.is_dir():
        return None
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------------------- layers
def hidden_state_count(config: Any, kind: str) -> int:
    """How many hidden states a forward with `output_hidden_states=True` returns: the embedding output (index 0)
    and one per transformer layer."""
    return 1 + int(config.encoder_layers if kind == "whisper" else config.num_hidden_layers)


def resolve_layers(cfg: EncoderConfig, count: int) -> tuple[int, ...] | None:
    """`cfg.layers` as hidden-state indices 0..count-1 in the configured order ("all": every one; negative
    indices count from the end); None when the encoder stores one state (`layer` / `mean_last_k`). ConfigError
    naming the key for an index the model does not have, or one given twice."""
    if cfg.layers is None:
        return None
    given = list(range(count)) if cfg.layers == "all" else list(cfg.layers)
    bad = [k for k in given if not -count <= k < count]
    if bad:
        raise ConfigError(f"encoder {cfg.name!r}: layers: {bad} out of range; {cfg.model} has {count} hidden states "
                          f"(0 = the embedding output .. {count - 1}, or -{count} .. -1)")
    resolved = tuple(k % count for k in given)
    if len(set(resolved)) != len(resolved):
        raise ConfigError(f"encoder {cfg.name!r}: layers: {list(cfg.layers)} names a hidden state twice "
                          f"(as {list(resolved)})")
    return resolved


def stored_layers(cfg: EncoderConfig) -> tuple[int, ...] | None:
    """The hidden-state indices the encoder's store records (`resolve_layers` against the model's config)."""
    from transformers import AutoConfig

    if cfg.layers is None:
        return None
    config = AutoConfig.from_pretrained(cfg.model, revision=cfg.revision)
    return resolve_layers(cfg, hidden_state_count(config, cfg.kind))
