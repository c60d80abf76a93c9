"""Session-wide test data: small local encoders and a small demo corpus, each built once per test session."""
from __future__ import annotations

from pathlib import Path

import pytest

DEMO_CORPUS_SIZE = 80


@pytest.fixture(scope="session")
def test_encoders_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with wavlm/, whisper/ and roberta/ random-init models (as `mtser make-test-encoders` writes)."""
    from mtser.demo_encoders import make_test_encoders

    out = tmp_path_factory.mktemp("encoders")
    make_test_encoders(out, seed=0)
    return out


@pytest.fixture(scope="session")
def demo_corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An 80-utterance demo corpus (seed 0) in the MSP-Podcast layout; treat it as read-only."""
    from mtser.demo import make_demo_corpus

    return make_demo_corpus(tmp_path_factory.mktemp("demo") / "corpus", size=DEMO_CORPUS_SIZE, seed=0)


@pytest.fixture(scope="session")
def demo_store(tmp_path_factory: pytest.TempPathFactory, demo_corpus_dir: Path, test_encoders_dir: Path) -> str:
    """The demo corpus extracted in-process with the test encoders (configs/demo.yaml); a store path, read-only."""
    from dataclasses import replace

    from mtser.featurestore.corpus import read_corpus
    from mtser.featurestore.extract import extract
    from mtser.trainer.config import load_config

    cfg = load_config(Path(__file__).parents[1] / "configs" / "demo.yaml").extract
    cfg.encoders = [replace(e, model=str(test_encoders_dir / e.name)) for e in cfg.encoders]
    url = str(tmp_path_factory.mktemp("demo_store") / "store.zarr")
    summary = extract(read_corpus(demo_corpus_dir).utterances, cfg, url, workers=0, progress=False)
    assert summary.ok, summary.line()
    return url


@pytest.fixture(scope="session")
def moto_s3() -> dict:
    """One moto S3 server on 127.0.0.1 for the session (moto keeps one backend per process); s3fs options."""
    import moto.server

    server = moto.server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield {"key": "testing", "secret": "testing", "endpoint_url": f"http://{host}:{port}"}
    server.stop()


@pytest.fixture
def s3_bucket(moto_s3: dict) -> str:
    """A fresh, empty bucket on the session's moto server; its name."""
    import uuid

    import s3fs

    name = f"features-{uuid.uuid4().hex[:8]}"
    s3fs.S3FileSystem(**moto_s3, skip_instance_cache=True).mkdir(name)
    return name


@pytest.fixture
def pickled_roberta(test_encoders_dir: Path, tmp_path: Path) -> Path:
    """A copy of the test RoBERTa whose weights are only a pickled `pytorch_model.bin` (no safetensors)."""
    import shutil

    import torch
    from transformers import AutoModel

    pickled = tmp_path / "roberta"
    shutil.copytree(test_encoders_dir / "roberta", pickled)
    torch.save(AutoModel.from_pretrained(pickled).state_dict(), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    return pickled


@pytest.fixture(scope="module")
def one_torch_thread():
    """1 intra-op torch thread for a module (`pytestmark = pytest.mark.usefixtures("one_torch_thread")`). On 2 shared
    cores, intra-op threads next to the prefetch threads and other jobs slowed the tiny test models 10-20x."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def ray_module():
    """One Ray instance per test module."""
    import ray

    from search_support import ray_init

    ray_init()
    yield
    ray.shutdown()


@pytest.fixture
def search_run(demo_store: str, tmp_path_factory: pytest.TempPathFactory, ray_module) -> tuple:
    """(run directory, SearchSummary) of the session's shared two-stage search on the demo store."""
    from search_support import finished_run

    return finished_run(str(demo_store), str(tmp_path_factory.getbasetemp() / "shared-search"))
