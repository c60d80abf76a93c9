"""Long and very short recordings: speech encoders run on overlapping windows stitched to a whole forward's frame
count, Whisper on consecutive 30 s windows; memory stays bounded by the batch under an address-space cap; an
utterance an encoder cannot encode fails with its real reason and the others are written."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import soundfile
import yaml
from typer.testing import CliRunner

from mtser.cli.main import app
from mtser.configio import ConfigError
from mtser.featurestore.audio import load_audio
from mtser.featurestore.config import EncoderConfig, ExtractConfig
from mtser.featurestore.corpus import Utterance, read_corpus
from mtser.featurestore.encoders import SpeechEncoder, WhisperEncoder
from mtser.featurestore.extract_plan import plan_shards
from mtser.featurestore.pipeline import encode_utterances
from mtser.featurestore.store import open_store
from mtser.trainer.config import load_config

SR = 16000


@pytest.fixture(scope="module")
def speech(test_encoders_dir) -> SpeechEncoder:
    return SpeechEncoder(EncoderConfig("wavlm", "speech", str(test_encoders_dir / "wavlm")))


@pytest.fixture(scope="module")
def demo_speech(demo_corpus_dir) -> np.ndarray:
    """About 50 s of espeak-ng speech: demo utterances one after another."""
    utts = sorted(read_corpus(demo_corpus_dir).utterances, key=lambda u: u.id)
    return np.concatenate([load_audio(u.path) for u in utts[:16]])


def _noise(n: int, seed: int = 0) -> np.ndarray:
    return (0.1 * np.random.default_rng(seed).standard_normal(n)).astype(np.float32)


# Window of 1 s = 50 frames with 0.2 s = 10 frames of context; lengths whose frame counts sit at and around one
# window, one window + one hop (40 frames), and the last window's shifted start, each with 0 and 319 spare samples.
BOUNDARY_FRAMES = [1, 2, 49, 50, 51, 89, 90, 91, 92, 130, 131]


@pytest.mark.parametrize("spare", [0, 319])
def test_stitched_frames_are_exactly_a_whole_forwards_count_around_window_boundaries(speech, spare):
    assert (speech.hop, speech.receptive) == (320, 400)
    for frames in BOUNDARY_FRAMES:
        n = 320 * (frames - 1) + 400 + spare
        wave = _noise(n, frames)
        assert speech.frames(n) == (n - 400) // 320 + 1 == int(speech.model._get_feat_extract_output_lengths(n))
        pieces = speech.pieces(wave, SR, 1.0, 0.2)
        assert (len(pieces) == 1) == (frames <= 50), frames
        if len(pieces) > 1:
            assert all(len(p.wave) == 320 * 49 + 400 and p.stats is not None for p in pieces)
            kept = [(p.keep.start, p.keep.stop) for p in pieces]
            assert kept[0][0] == 0 and kept[-1][1] == 50 and all(10 <= a and b <= 40 for a, b in kept[1:-1])
        stitched = np.concatenate(speech.forward(pieces, SR))
        assert stitched.shape == (speech.frames(n), 64), (n, stitched.shape)


def test_too_short_for_one_frame_is_a_reason_not_a_crash(speech):
    with pytest.raises(ValueError, match=r"audio too short for encoder wavlm: 399 samples \(24.9 ms\); one frame "
                                         r"needs 400 \(25 ms\)"):
        speech.pieces(_noise(399), SR, 30.0, 5.0)
    assert len(speech.pieces(_noise(400), SR, 30.0, 5.0)) == 1


def test_windowed_features_stay_close_to_a_whole_forward(tmp_path, test_encoders_dir, demo_speech):
    """About 50 s of speech through the pipeline (default windows: 30 s, 5 s context) vs one forward of the whole file:
    the same frames, close; without context the frames at a cut are visibly worse (what the overlap buys)."""
    soundfile.write(tmp_path / "long.wav", demo_speech, SR, subtype="FLOAT")
    cfg = EncoderConfig("wavlm", "speech", str(test_encoders_dir / "wavlm"), dtype="float32")
    features, _, failures = encode_utterances([cfg], [Utterance(id="long.wav", path=str(tmp_path / "long.wav"))])
    assert not failures
    encoder = SpeechEncoder(cfg)
    assert len(encoder.pieces(demo_speech, SR, 30.0, 5.0)) >= 2
    whole = encoder.forward([demo_speech], SR)[0]
    windowed = features["long.wav"]["wavlm"]
    assert windowed.shape == whole.shape == (encoder.frames(len(demo_speech)), 64)

    def errors(x: np.ndarray) -> np.ndarray:
        return np.linalg.norm(x - whole, axis=1) / np.linalg.norm(whole, axis=1)

    cosine = (windowed * whole).sum(1) / (np.linalg.norm(windowed, axis=1) * np.linalg.norm(whole, axis=1))
    assert 0 < errors(windowed).max() < 0.01 and errors(windowed).mean() < 0.002 and cosine.min() > 0.9999
    with_context = np.concatenate(encoder.forward(encoder.pieces(demo_speech, SR, 10.0, 2.0), SR))
    bare = np.concatenate(encoder.forward(encoder.pieces(demo_speech, SR, 10.0, 0.0), SR))
    assert errors(bare).max() > 10 * errors(with_context).max()


@pytest.mark.parametrize("seconds", [30.0, 30.0 + 1 / SR, 60.0, 61.5])
def test_whisper_encodes_consecutive_30s_windows_to_ceil_n_over_320_frames(test_encoders_dir, seconds):
    encoder = WhisperEncoder(EncoderConfig("whisper", "whisper", str(test_encoders_dir / "whisper")))
    wave = _noise(round(seconds * SR))
    pieces = encoder.pieces(wave, SR)
    assert len(pieces) == math.ceil(seconds / 30)
    assert [len(p.wave) for p in pieces[:-1]] == [30 * SR] * (len(pieces) - 1)
    (frames, _), = encoder.forward([(wave, False)], SR)
    assert frames.shape == (math.ceil(len(wave) / 320), 64)


# ------------------------------------------------------------------------------------------------------- extraction
@pytest.fixture(scope="module")
def config_path(tmp_path_factory, test_encoders_dir) -> Path:
    raw = yaml.safe_load(Path("configs/demo.yaml").read_text())
    for enc in raw["extract"]["encoders"]:
        enc["model"] = str(test_encoders_dir / enc["name"])
    raw["extract"].update(asr_max_new_tokens=4)
    path = tmp_path_factory.mktemp("long_config") / "demo.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_a_ten_sample_file_alone_fails_with_its_reason(tmp_path, config_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    soundfile.write(corpus / "tiny.wav", _noise(10), SR)
    url = str(tmp_path / "store.zarr")
    result = CliRunner().invoke(app, ["extract", str(corpus), "--config", str(config_path), "--store", url,
                                      "--workers", "0", "--no-progress"])
    assert result.exit_code == 1, result.output
    assert "IndexError" not in result.output and "FAILED" not in result.output
    assert "extract: failed: tiny.wav [encode:wavlm] audio too short for encoder wavlm: 10 samples" in result.output
    assert "written 0, failed 1 of 1 planned" in result.output
    failures = open_store(url).failures
    assert list(failures["id"]) == ["tiny.wav"] and list(failures["stage"]) == ["encode:wavlm"]
    assert "one frame needs 400" in failures["reason"].iloc[0]


@pytest.mark.parametrize("text, key", [
    ("window_seconds: 0", "extract.window_seconds: must be finite and longer than 2 × window_context_seconds"),
    ("window_seconds: .nan", "extract.window_seconds: expected a finite number, got nan"),
    ("{window_seconds: 10, window_context_seconds: 5}", "extract.window_seconds: must be finite and longer than 2 × "
                                                        "window_context_seconds (10 s), got 10"),
    ("window_context_seconds: -1", "extract.window_context_seconds: must be a finite number >= 0, got -1"),
    ("window_seconds: long", "extract.window_seconds: expected a number"),
])
def test_window_settings_are_validated_naming_the_key(tmp_path, config_path, text, key):
    raw = yaml.safe_load(config_path.read_text())
    raw["extract"].update(yaml.safe_load(text if text.startswith("{") else "{" + text + "}"))
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    assert key in str(err.value)
    if text == "window_seconds: 0":
        result = CliRunner().invoke(app, ["extract", str(tmp_path), "--config", str(bad), "--store",
                                          str(tmp_path / "s"), "--workers", "0"])
        assert result.exit_code == 2 and key in result.output


def test_windowing_enters_shard_ids_only_for_shards_with_a_longer_utterance(test_encoders_dir):
    encoders = [EncoderConfig("wavlm", "speech", str(test_encoders_dir / "wavlm"))]
    short = [Utterance(id=f"s{i}.wav", path=f"s{i}.wav", duration=5.0) for i in range(3)]
    long = [Utterance(id="l.wav", path="l.wav", duration=40.0)]

    def ids(utts, **window):
        return [s.id for s in plan_shards(utts, ExtractConfig(encoders=encoders, **window), 0)]

    assert ids(short) == ids(short, window_seconds=20.0, window_context_seconds=1.0)
    assert ids(long) != ids(long, window_seconds=20.0, window_context_seconds=1.0)
    assert ids(long) == ids(long, window_seconds=30.0, window_context_seconds=5.0)


CAPPED = textwrap.dedent("""
    import json, resource, sys
    from mtser.featurestore.config import EncoderConfig, ExtractConfig
    from mtser.featurestore.corpus import read_corpus
    from mtser.featurestore.extract import extract
    from mtser.featurestore.store import open_store

    encoders_dir, corpus, work, headroom_mb = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    utts = read_corpus(corpus).utterances
    def config(window):
        return ExtractConfig(encoders=[EncoderConfig("wavlm", "speech", encoders_dir + "/wavlm"),
                                       EncoderConfig("whisper", "whisper", encoders_dir + "/whisper")],
                             batch_seconds=60.0, window_seconds=window)
    # the short files once without a cap: every lazy import (transformers, scipy, zarr) is done before it
    extract([u for u in utts if u.id.startswith("short")], config(30.0), f"{work}/warm.zarr", workers=0,
            progress=False)
    with open("/proc/self/status") as f:
        size = next(int(line.split()[1]) for line in f if line.startswith("VmSize:")) * 1024
    cap = size + headroom_mb * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    out = {}
    for name, window in (("windowed", 30.0), ("whole", 1e6)):
        summary = extract(utts, config(window), f"{work}/{name}.zarr", workers=0, progress=False)
        store = open_store(f"{work}/{name}.zarr")
        out[name] = {"written": sorted(store.ids()), "shards_failed": summary.shards_failed,
                     "failures": [list(r) for r in store.failures[["id", "stage", "reason"]].itertuples(index=False)],
                     "frames": {i: len(store.get(i, "wavlm")) for i in store.ids()}}
    print(json.dumps(out))
""")
LONG_SECONDS = 150                      # a whole forward's attention needs GBs; 30 s windows need a few MB


@pytest.fixture(scope="module")
def capped_runs(tmp_path_factory, test_encoders_dir) -> dict:
    """One process under RLIMIT_AS = its size after a warm-up + 768 MB extracts a 150 s file, two short ones and an
    8-hour one (a sparse file), with 30 s windows and then without windowing (one forward over 7,500 frames)."""
    work = tmp_path_factory.mktemp("capped")
    corpus = work / "corpus"
    corpus.mkdir()
    t = np.arange(LONG_SECONDS * SR) / SR
    tone = (0.2 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 0.5 * t))).astype(np.float32)
    soundfile.write(corpus / "long.wav", tone + _noise(len(tone)) * 0.1, SR)
    for i in (1, 2):
        soundfile.write(corpus / f"short{i}.wav", _noise(3 * SR, i), SR)
    with soundfile.SoundFile(corpus / "huge.wav", "w", SR, 1, "PCM_16") as f:     # 8 h: 1.8 GB once decoded
        f.write(_noise(SR))
    with open(corpus / "huge.wav", "r+b") as f:                                   # sparse: no disk used
        f.seek(4), f.write((36 + 8 * 3600 * SR * 2).to_bytes(4, "little"))
        f.seek(40), f.write((8 * 3600 * SR * 2).to_bytes(4, "little"))
        f.truncate(44 + 8 * 3600 * SR * 2)
    out = subprocess.run([sys.executable, "-c", CAPPED, str(test_encoders_dir), str(corpus), str(work), "768"],
                         capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_long_file_is_extracted_under_a_memory_cap(capped_runs):
    run = capped_runs["windowed"]
    assert run["written"] == ["long.wav", "short1.wav", "short2.wav"] and not run["shards_failed"]
    (utt_id, stage, reason), = run["failures"]                # 8 hours cannot even be decoded under the cap
    assert (utt_id, stage) == ("huge.wav", "audio") and "out of memory decoding the audio" in reason
    assert run["frames"]["long.wav"] == (LONG_SECONDS * SR - 400) // 320 + 1


def test_an_encoder_failure_is_recorded_with_its_reason_and_the_others_go_on(capped_runs):
    run = capped_runs["whole"]                # the same cap, one forward over the whole 150 s: out of memory
    assert not run["shards_failed"]
    assert run["written"] == ["short1.wav", "short2.wav"]
    (utt_id, stage, reason), = [f for f in run["failures"] if f[0] != "huge.wav"]
    assert (utt_id, stage) == ("long.wav", "encode:wavlm")
    assert "allocate" in reason or "MemoryError" in reason, reason


def test_asr_of_a_long_file_joins_its_30s_windows_transcripts(tmp_path, test_encoders_dir):
    wave = _noise(35 * SR, 7)
    soundfile.write(tmp_path / "long.wav", wave, SR, subtype="FLOAT")
    cfg = EncoderConfig("whisper", "whisper", str(test_encoders_dir / "whisper"), asr=True)
    features, utts, _ = encode_utterances([cfg], [Utterance(id="long.wav", path=str(tmp_path / "long.wav"))],
                                          asr_max_new_tokens=4)
    encoder = WhisperEncoder(cfg)
    texts = []
    for piece in (wave[: 30 * SR], wave[30 * SR:]):
        inputs = encoder.extractor(piece, sampling_rate=SR, return_tensors="pt").input_features
        ids = encoder.model.generate(input_features=inputs, max_new_tokens=4, language="en", task="transcribe")
        texts.append(encoder.tokenizer.batch_decode(ids, skip_special_tokens=True)[0].strip())
    assert all(texts) and utts["long.wav"].transcript == " ".join(texts)
    assert features["long.wav"]["whisper"].shape == (math.ceil(35 * SR / 320), 64)
