"""The demo corpus (layout, labels, determinism, learnable cues) and the small local encoders (real load paths)."""
from __future__ import annotations

import csv
import dataclasses
import re
import wave
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mtser.cli.main import app
from mtser.demo import CLASS_WORDS, LABEL_COLUMNS, make_demo_corpus
from mtser.featurestore.labels import CLASSES

from conftest import DEMO_CORPUS_SIZE


def _rows(corpus: Path) -> list[dict[str, str]]:
    with open(corpus / "Labels" / "labels_consensus.csv", newline="") as f:
        return list(csv.DictReader(f))


def _words(text: str) -> str:
    return " " + " ".join(re.findall(r"[a-z]+", text.lower())) + " "


def _classes_named_in(text: str) -> set[str]:
    words = _words(text)
    return {c for c, ws in CLASS_WORDS.items() if any(f" {w} " in words for w in ws)}


# ------------------------------------------------------------------------------------------------------ demo corpus
def test_demo_corpus_layout_columns_and_audio_format(demo_corpus_dir: Path) -> None:
    audios = sorted(p.name for p in (demo_corpus_dir / "Audios").iterdir())
    assert len(audios) == DEMO_CORPUS_SIZE
    with open(demo_corpus_dir / "Labels" / "labels_consensus.csv", newline="") as f:
        assert next(csv.reader(f)) == list(LABEL_COLUMNS)
    rows = _rows(demo_corpus_dir)
    assert {r["Split_Set"] for r in rows} == {"Train", "Development"}
    assert all(re.fullmatch(r"MSP-PODCAST_\d{4}_\d{4}\.wav", r["FileName"]) for r in rows)
    test3 = [a for a in audios if a.startswith("MSP-PODCAST_test3_")]
    assert test3 and len(test3) + len(rows) == DEMO_CORPUS_SIZE          # every Test3 file is absent from the labels
    assert not (demo_corpus_dir.parent / "corpus.partial").exists()
    for name in audios:
        with wave.open(str(demo_corpus_dir / "Audios" / name)) as w:
            assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (16000, 1, 2)
            assert 1.0 < w.getnframes() / 16000 < 10.0


def test_demo_corpus_labels_are_valid_and_carry_the_class_in_the_wording(demo_corpus_dir: Path) -> None:
    rows = _rows(demo_corpus_dir)
    codes = [r["EmoClass"] for r in rows]
    assert set(codes) >= set(CLASSES) | {"O", "X"}
    assert "Unknown" in {r["SpkrID"] for r in rows}
    checked = 0
    for r in rows:
        assert all(1.0 <= float(r[c]) <= 7.0 for c in ("EmoAct", "EmoVal", "EmoDom"))
        transcript = demo_corpus_dir / "Transcripts" / (Path(r["FileName"]).stem + ".txt")
        if transcript.exists() and r["EmoClass"] != "X":
            lines = transcript.read_text().splitlines()
            assert len(lines) == 1
            assert _classes_named_in(lines[0]) == {r["EmoClass"]}, (r["FileName"], lines[0])
            checked += 1
    missing = [r for r in rows if not (demo_corpus_dir / "Transcripts" / (Path(r["FileName"]).stem + ".txt")).exists()]
    assert 0 < len(missing) < len(rows) // 4
    assert checked > len(rows) // 2
    assert not list((demo_corpus_dir / "Transcripts").glob("*test3*"))


def test_demo_corpus_attributes_and_prosody_follow_the_class(demo_corpus_dir: Path) -> None:
    rows = _rows(demo_corpus_dir)

    def mean(code: str, column: str) -> float:
        return float(np.mean([float(r[column]) for r in rows if r["EmoClass"] == code]))

    assert mean("A", "EmoAct") - mean("S", "EmoAct") > 2.0
    assert mean("H", "EmoVal") - mean("A", "EmoVal") > 2.5
    assert mean("C", "EmoDom") - mean("F", "EmoDom") > 2.0

    def seconds_per_word(code: str) -> float:  # the audio alone separates classes: sad speech is slower
        values = []
        for r in rows:
            transcript = demo_corpus_dir / "Transcripts" / (Path(r["FileName"]).stem + ".txt")
            if r["EmoClass"] == code and transcript.exists():
                with wave.open(str(demo_corpus_dir / "Audios" / r["FileName"])) as w:
                    values.append(w.getnframes() / 16000 / len(transcript.read_text().split()))
        return float(np.mean(values))

    assert seconds_per_word("S") > 1.4 * seconds_per_word("A")


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_demo_corpus_is_byte_identical_for_a_seed_and_differs_across_seeds(tmp_path: Path) -> None:
    a = _tree_bytes(make_demo_corpus(tmp_path / "a", size=12, seed=3))
    b = _tree_bytes(make_demo_corpus(tmp_path / "b", size=12, seed=3))
    c = _tree_bytes(make_demo_corpus(tmp_path / "c", size=12, seed=4))
    assert a == b
    assert a["Labels/labels_consensus.csv"] != c["Labels/labels_consensus.csv"]
    audio = [k for k in a if k.startswith("Audios/")]
    assert any(a[k] != c.get(k) for k in audio)


def test_demo_corpus_refuses_to_replace_an_existing_folder_unless_asked(tmp_path: Path) -> None:
    out = make_demo_corpus(tmp_path / "corpus", size=10, seed=0)
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="already exists"):
        make_demo_corpus(out, size=10, seed=1)
    assert (out / "keep.txt").exists()
    make_demo_corpus(out, size=10, seed=1, overwrite=True)
    assert not (out / "keep.txt").exists() and len(list((out / "Audios").iterdir())) == 10


def test_demo_corpus_synthesis_failure_names_the_utterance_and_leaves_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mtser import demo

    broken = dataclasses.replace(demo.TRAIN_SPEAKERS[0], voice="nosuchvoice")
    monkeypatch.setattr(demo, "TRAIN_SPEAKERS", (broken,))
    with pytest.raises(RuntimeError, match=r"espeak-ng failed on MSP-PODCAST_\d{4}_\d{4}\.wav \(exit 1\): .*voice"):
        make_demo_corpus(tmp_path / "corpus", size=10, seed=0)
    assert list(tmp_path.iterdir()) == []   # neither the corpus nor its .partial folder is left behind


def test_demo_corpus_without_espeak_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    result = CliRunner().invoke(app, ["demo-corpus", str(tmp_path / "c"), "--size", "10"])
    assert result.exit_code == 1 and "espeak-ng not found" in result.output
    assert not (tmp_path / "c").exists()


def test_demo_corpus_cli_exit_codes(tmp_path: Path) -> None:
    runner = CliRunner()
    ok = runner.invoke(app, ["demo-corpus", str(tmp_path / "c"), "--size", "10", "--seed", "2"])
    assert ok.exit_code == 0, ok.output
    assert len(list((tmp_path / "c" / "Audios").iterdir())) == 10
    again = runner.invoke(app, ["demo-corpus", str(tmp_path / "c"), "--size", "10"])
    assert again.exit_code == 1 and "already exists" in again.output
    usage = runner.invoke(app, ["demo-corpus", str(tmp_path / "d"), "--size", "3"])
    assert usage.exit_code == 2 and not (tmp_path / "d").exists()


# --------------------------------------------------------------------------------------------------------- encoders
def test_test_encoders_load_through_auto_classes_with_their_own_tokenizers(test_encoders_dir: Path) -> None:
    """What make-test-encoders decides (transformers itself is not under test here): each folder loads through the
    Auto classes as the model kind the config names, WavLM gives 50 frames/s and a hidden state per layer, Whisper's
    encoder takes the 30 s log-mel, and the tokenizers it trains cover the model's vocabulary and round-trip text with
    unseen words."""
    from transformers import AutoConfig, AutoFeatureExtractor, AutoModel, AutoTokenizer, WhisperForConditionalGeneration

    wavlm = AutoModel.from_pretrained(test_encoders_dir / "wavlm").eval()
    audio = np.random.default_rng(0).standard_normal(32000).astype(np.float32)
    inputs = AutoFeatureExtractor.from_pretrained(test_encoders_dir / "wavlm")([audio], sampling_rate=16000,
                                                                             return_tensors="pt")
    with torch.no_grad():
        out = wavlm(**inputs, output_hidden_states=True)
    assert type(wavlm).__name__ == "WavLMModel"
    assert out.last_hidden_state.shape == (1, 99, wavlm.config.hidden_size)    # 2 s at 320 samples per frame
    assert len(out.hidden_states) == wavlm.config.num_hidden_layers + 1
    whisper = WhisperForConditionalGeneration.from_pretrained(test_encoders_dir / "whisper").eval()
    features = AutoFeatureExtractor.from_pretrained(test_encoders_dir / "whisper")(
        [audio], sampling_rate=16000, return_tensors="pt").input_features
    assert features.shape == (1, whisper.config.num_mel_bins, 3000)
    with torch.no_grad():
        assert whisper.get_encoder()(features).last_hidden_state.shape == (1, 1500, whisper.config.d_model)
    assert AutoConfig.from_pretrained(test_encoders_dir / "roberta").model_type == "roberta"
    for name in ("whisper", "roberta"):
        tokenizer = AutoTokenizer.from_pretrained(test_encoders_dir / name)
        assert AutoConfig.from_pretrained(test_encoders_dir / name).vocab_size == len(tokenizer), name
        for text in ["You know, I felt outraged after the letter from the bank.", "Unseen wörds: zebra 42!"]:
            assert tokenizer.decode(tokenizer(text).input_ids, skip_special_tokens=True) == text, name


def test_encoders_are_deterministic_for_a_seed(test_encoders_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    runner = CliRunner()
    result = runner.invoke(app, ["make-test-encoders", str(tmp_path), "--seed", "0"])
    assert result.exit_code == 0, result.output
    for name in ("wavlm", "whisper", "roberta"):
        first = load_file(test_encoders_dir / name / "model.safetensors")
        second = load_file(tmp_path / name / "model.safetensors")
        assert first.keys() == second.keys()
        assert all(torch.equal(first[k], second[k]) for k in first)
    assert (test_encoders_dir / "roberta" / "tokenizer.json").read_text() == (
        tmp_path / "roberta" / "tokenizer.json").read_text()
