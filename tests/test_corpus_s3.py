"""Corpora on object storage: moto's real S3 server on 127.0.0.1, reached through s3fs like any bucket. Readers list
and read the bucket, `mtser extract --storage-options` streams the audio into the Ray actors, errors name the URL."""
from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import s3fs
from typer.testing import CliRunner

from mtser.cli.main import app
from mtser.featurestore.audio import AudioError, audio_duration, load_audio
from mtser.featurestore.corpus import CorpusError, read_corpus
from mtser.featurestore.extract import extract
from mtser.featurestore.store import open_store
from mtser.trainer.config import load_config
from test_encoders import F16


@pytest.fixture
def s3(moto_s3: dict) -> s3fs.S3FileSystem:
    return s3fs.S3FileSystem(**moto_s3, skip_instance_cache=True)


def test_msp_podcast_folder_on_s3_reads_like_the_local_folder(demo_corpus_dir: Path, moto_s3: dict, s3_bucket: str,
                                                              s3: s3fs.S3FileSystem) -> None:
    s3.put(str(demo_corpus_dir), f"{s3_bucket}/MSP-Podcast", recursive=True)
    url = f"s3://{s3_bucket}/MSP-Podcast"
    local, remote = read_corpus(demo_corpus_dir), read_corpus(url, moto_s3)
    assert remote.layout == "msp-podcast" and remote.problems == local.problems == []
    assert len(remote.utterances) == len(local.utterances) > 0
    for a, b in zip(local.utterances, remote.utterances):
        assert b.path == f"{url}/Audios/{a.id}"
        assert replace(b, path=a.path) == a                          # labels, splits, transcripts all the same
    utt = remote.utterances[0]
    np.testing.assert_array_equal(load_audio(utt.path, files=_files(moto_s3)), load_audio(local.utterances[0].path))
    assert audio_duration(utt.path, _files(moto_s3)) == pytest.approx(audio_duration(local.utterances[0].path))


def test_unreachable_or_missing_corpus_urls_name_the_url(moto_s3: dict, s3_bucket: str, s3: s3fs.S3FileSystem) -> None:
    with pytest.raises(CorpusError, match=f"s3://{s3_bucket}/absent: no such file or folder"):
        read_corpus(f"s3://{s3_bucket}/absent", moto_s3)
    with pytest.raises(CorpusError, match=r"s3://no-such-bucket-x/corpus: (no such file|cannot read)"):
        read_corpus("s3://no-such-bucket-x/corpus", moto_s3)
    s3.pipe(f"{s3_bucket}/bad.wav", b"RIFF but not audio")
    with pytest.raises(AudioError, match=f"unreadable or corrupt audio: s3://{s3_bucket}/bad.wav"):
        load_audio(f"s3://{s3_bucket}/bad.wav", files=_files(moto_s3))
    with pytest.raises(AudioError, match=f"audio file not found: s3://{s3_bucket}/gone.wav"):
        load_audio(f"s3://{s3_bucket}/gone.wav", files=_files(moto_s3))


def test_extract_cli_reads_an_s3_manifest_into_an_s3_store_with_ray(demo_corpus_dir: Path, test_encoders_dir: Path,
                                                                    moto_s3: dict, s3_bucket: str,
                                                                    s3: s3fs.S3FileSystem, tmp_path: Path) -> None:
    """A manifest on S3 (rows relative to it, one absolute s3:// URL, one missing object, one corrupt object);
    one Ray actor reads the audio from the bucket; the stored features equal a local in-process extraction."""
    utts = sorted(read_corpus(demo_corpus_dir).utterances, key=lambda u: u.id)
    chosen = [u for u in utts if u.transcript][:2] + [u for u in utts if not u.transcript][:1]
    for u in chosen:
        s3.put_file(u.path, f"{s3_bucket}/corpus/audio/{u.id}")
    s3.pipe(f"{s3_bucket}/corpus/audio/corrupt.wav", b"not a wav file at all")
    rows = [[u.id, f"audio/{u.id}", u.split or "", u.transcript or ""] for u in chosen[:2]]
    rows.append([chosen[2].id, f"s3://{s3_bucket}/corpus/audio/{chosen[2].id}", chosen[2].split or "", ""])
    rows += [["missing.wav", "audio/missing.wav", "", ""], ["corrupt.wav", "audio/corrupt.wav", "", ""]]
    text = io.StringIO()
    csv.writer(text).writerows([["id", "path", "split", "transcript"], *rows])
    s3.pipe(f"{s3_bucket}/corpus/manifest.csv", text.getvalue().encode())
    config = tmp_path / "extract.yaml"
    raw = load_config("configs/demo.yaml").extract
    encoders = [{"name": e.name, "kind": e.kind, "model": str(test_encoders_dir / e.name), "asr": e.asr}
                for e in raw.encoders]
    config.write_text(json.dumps({"extract": {"encoders": encoders, "asr_max_new_tokens": 6}}))
    store_url = f"s3://{s3_bucket}/features.zarr"
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    result = CliRunner().invoke(app, ["extract", f"s3://{s3_bucket}/corpus/manifest.csv", "--config", str(config),
                                      "--store", store_url, "--workers", "1", "--no-progress",
                                      "--storage-options", json.dumps(moto_s3)])
    assert result.exit_code == 1, result.output                       # two rows failed, the rest is written
    manifest = f"s3://{s3_bucket}/corpus/manifest.csv"
    assert f"missing.wav [read] {manifest}:5: missing.wav: audio file s3://{s3_bucket}/corpus/audio/missing.wav " \
           "not found" in result.output
    assert f"corrupt.wav [audio] unreadable or corrupt audio: s3://{s3_bucket}/corpus/audio/corrupt.wav" in result.output
    assert "written 3, failed 2 of 5 planned" in result.output
    store = open_store(store_url, storage_options=moto_s3)
    assert store.ids() == sorted(u.id for u in chosen)
    assert {e.compute_dtype for e in store.encoders.values()} == {"float32"}       # CPU default, in provenance
    cfg = load_config(config).extract
    reference = tmp_path / "local.zarr"
    local = [replace(u, duration=None) for u in chosen]
    assert extract(local, cfg, str(reference), workers=0, progress=False).ok
    expected = open_store(str(reference))
    assert (store.utterances["transcript"] == expected.utterances["transcript"]).all()
    for utt_id in store.ids():
        for name in store.encoders:
            np.testing.assert_allclose(store.get(utt_id, name, np.float32), expected.get(utt_id, name, np.float32),
                                       **F16, err_msg=f"{utt_id} {name}")


def _files(options: dict):
    from mtser.featurestore.files import CorpusFiles

    return CorpusFiles(options)


def test_extraction_fetches_only_the_audio_it_encodes(demo_corpus_dir: Path, test_encoders_dir: Path,
                                                     moto_s3: dict, s3_bucket: str, s3: s3fs.S3FileSystem,
                                                     tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing is downloaded up front: of a corpus on S3, a two-utterance extraction reads those two files whole
    (once each) and at most headers of them for planning; the other audio in the bucket is never fetched."""
    from mtser.featurestore.config import EncoderConfig, ExtractConfig
    from mtser.featurestore.files import CorpusFiles

    s3.put(str(demo_corpus_dir / "Audios"), f"{s3_bucket}/c/Audios", recursive=True)
    remote = read_corpus(f"s3://{s3_bucket}/c", moto_s3)                 # a folder of audio: every file listed
    chosen = remote.utterances[:2]
    whole: list[str] = []
    headers: list[str] = []
    read_bytes, open_header = CorpusFiles.read_bytes, CorpusFiles.open_header
    monkeypatch.setattr(CorpusFiles, "read_bytes", lambda self, path: whole.append(path) or read_bytes(self, path))
    monkeypatch.setattr(CorpusFiles, "open_header", lambda self, path: headers.append(path) or open_header(self, path))
    cfg = ExtractConfig(encoders=[EncoderConfig("wavlm", "speech", str(test_encoders_dir / "wavlm"))])
    summary = extract(chosen, cfg, str(tmp_path / "store"), workers=0, storage_options=moto_s3, progress=False)
    assert summary.ok and summary.written == 2
    assert sorted(whole) == sorted(u.path for u in chosen) and len(remote.utterances) > 10
    assert headers and set(headers) <= {u.path for u in chosen}
