"""Trainer test helpers: a small synthetic feature store written through the real StoreWriter.

Features carry the labels: each class has a centre per encoder, arousal/valence follow the class and dominance
follows a feature direction, so a short training run must clearly beat chance. Rows cover every case the loader
filters: X and O classes, missing attributes, augmented copies (in Train and, as a trap, in Development).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mtser.featurestore.corpus import Utterance
from mtser.featurestore.labels import CLASSES
from mtser.featurestore.store import EncoderInfo, StoreWriter, create_store, register_encoder

DIMS = {"a": 12, "b": 8}
AROUSAL = np.linspace(1.8, 6.2, len(CLASSES))
VALENCE = AROUSAL[::-1].copy()


def encoder_info(name: str, dim: int, layers: list[int] | None = None) -> EncoderInfo:
    return EncoderInfo(name=name, kind="speech", model=f"synthetic/{name}", revision=None, content_hash="0" * 16,
                       layer=-1, mean_last_k=1, dim=dim, frame_rate=50.0, dtype="float16", compression="none",
                       sample_rate=16000, mtser_version="test", config={}, layers=layers)


def write_synthetic_store(url: str | Path, n_train: int = 240, n_dev: int = 120, seed: int = 0,
                          dims: dict[str, int] = DIMS, layers: dict[str, list[int]] | None = None) -> str:
    """`layers`: encoders stored with these hidden-state indices, frames (T, L, D): layer k of an utterance is
    its features scaled by k / max index plus noise (the deepest layer carries the labels best)."""
    url = str(url)
    rng = np.random.default_rng(seed)
    layers = layers or {}
    create_store(url)
    for name, dim in dims.items():
        register_encoder(url, encoder_info(name, dim, layers.get(name)))
    centres = {name: rng.normal(size=(len(CLASSES), dim)) for name, dim in dims.items()}
    dominance_axis = {name: rng.normal(size=dim) / np.sqrt(dim) for name, dim in dims.items()}
    for split, n in (("Train", n_train), ("Development", n_dev)):
        writer = StoreWriter(url, f"part-{split.lower()}")
        for i in range(n):
            r = rng.random()
            code = "X" if r < 0.06 else "O" if r < 0.12 else CLASSES[i % len(CLASSES)]
            k = CLASSES.index(code) if code in CLASSES else int(rng.integers(len(CLASSES)))
            dominance = float(rng.uniform(1.5, 6.5))
            attrs = np.clip([AROUSAL[k] + rng.normal(0, 0.4), VALENCE[k] + rng.normal(0, 0.4), dominance], 1, 7)
            if code in CLASSES and rng.random() < 0.1:
                attrs = [None, None, None]
            features = {name: (0.8 * centres[name][k] + (dominance - 4) * dominance_axis[name]
                               + rng.normal(size=(int(rng.integers(3, 25)), dim)))
                        for name, dim in dims.items()}
            utt = Utterance(id=f"{split}_{i:04d}.wav", path=None, split=split, emo_class=code,
                            arousal=attrs[0], valence=attrs[1], dominance=attrs[2], speaker=str(i % 7))
            for name, indices in layers.items():
                depth = np.asarray(indices, dtype=np.float64)[None, :, None] / max(indices)
                features[name] = features[name][:, None] * depth + rng.normal(0, 0.5, (len(features[name]),
                                                                                    len(indices), dims[name]))
            writer.add(utt, features)
            if i % 10 == 0:  # an augmented copy: same labels, perturbed features
                copy = Utterance(**{**utt.__dict__, "id": f"{split}_{i:04d}_aug1.wav", "augmentation": "aug1",
                                    "source_id": utt.id})
                writer.add(copy, {name: f + rng.normal(0, 0.3, f.shape) for name, f in features.items()})
        writer.commit()
    return url


def random_checkpoint(path: Path, store_url: str, encoders: list[str], seed: int = 0,
                      overrides: dict | None = None) -> str:
    """An untrained model (configs/demo.yaml's model with `overrides`) on `encoders` of the store, reading the
    stored layers a trained one would, saved as a checkpoint whose sidecar records the store's provenance as a
    trained one does; its path."""
    import dataclasses

    from mtser.featurestore.store import open_store
    from mtser.trainer.checkpoint import save_checkpoint
    from mtser.trainer.config import load_config
    from mtser.trainer.layer_mix import read_layers
    from mtser.trainer.model import FusionNetwork

    store = open_store(store_url)
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml", {
        "extract.encoders": [{"name": n, "kind": "speech", "model": store.encoders[n].model} for n in encoders],
        "model.encoders": encoders, **(overrides or {})})
    torch.manual_seed(seed)
    read = read_layers(cfg.model, {n: store.encoders[n] for n in encoders}, store_url)
    model = FusionNetwork({n: store.encoders[n].dim for n in encoders}, cfg.model, read_layers=read).eval()
    provenance = {"url": store_url, "encoders": {n: dataclasses.asdict(store.encoders[n]) for n in encoders}}
    save_checkpoint(Path(path), model, cfg, {"metrics": {}, "store": provenance})
    return str(path)
