"""Session-wide test data: small local encoders and a small demo corpus, each built once per test session."""
from __future__ import annotations

from pathlib import Path

import pytest

DEMO_CORPUS_SIZE = 80


@pytest.fixture(scope="session")
def test_encoders_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with wavlm/, whisper/ and roberta/ random-init models (as `mtser make-test-encoders` writes)."""
    from mtser.featurestore.demo import make_test_encoders

    out = tmp_path_factory.mktemp("encoders")
    make_test_encoders(out, seed=0)
    return out


@pytest.fixture(scope="session")
def demo_corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An 80-utterance demo corpus (seed 0) in the MSP-Podcast layout; treat it as read-only."""
    from mtser.featurestore.demo import make_demo_corpus

    return make_demo_corpus(tmp_path_factory.mktemp("demo") / "corpus", size=DEMO_CORPUS_SIZE, seed=0)
