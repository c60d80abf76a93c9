"""Multi-node extraction: a two-node Ray cluster (ray.cluster_utils.Cluster on this machine) writes one store."""
from __future__ import annotations

import os

import numpy as np

from mtser.featurestore.corpus import read_corpus
from mtser.featurestore.extract import extract
from mtser.featurestore.pipeline import encode_utterances
from mtser.featurestore.store import open_store
from mtser.trainer.config import load_config
from test_encoders import F16


def test_two_node_cluster_writes_one_store(tmp_path, demo_corpus_dir, test_encoders_dir):
    import ray
    from ray.cluster_utils import Cluster

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    cfg = load_config("configs/demo.yaml", {"extract.shard_seconds": 6.0, "extract.asr_max_new_tokens": 6}).extract
    for enc in cfg.encoders:
        enc.model = str(test_encoders_dir / enc.name)
    utts = sorted(read_corpus(demo_corpus_dir).utterances, key=lambda u: u.id)[:5]
    memory = 100 * 1024**2
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": memory})
    cluster.add_node(num_cpus=1, object_store_memory=memory)
    try:
        ray.init(address=cluster.address, logging_level="ERROR")
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        summary = extract(utts, cfg, str(tmp_path / "store"), workers=2, progress=False)
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert summary.ok and summary.written == len(utts)
    assert summary.workers == 2 and len(summary.nodes) == 2                 # one actor per node wrote shards
    store = open_store(str(tmp_path / "store"))
    assert sorted(store.ids()) == [u.id for u in utts]
    features, _, failures = encode_utterances(cfg.encoders, utts, asr_max_new_tokens=6)   # in-process reference
    assert not failures
    for utt_id, expected in features.items():
        for name, frames in expected.items():
            np.testing.assert_allclose(store.get(utt_id, name, np.float32), frames, **F16)
