"""Layer-wise features in the store: an encoder's `layers` come from one forward pass and equal a direct
transformers forward (`output_hidden_states=True`) for each encoder kind and for negative indices; an utterance's
layers are one byte range (one read however many layers); any subset reads through get / get_many / read_into /
the loader; int8 scales are per frame and layer; stores written before layers existed read unchanged (L = 1);
a config mixing `layer`/`mean_last_k` with `layers` is refused naming the key."""
from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from transformers import AutoFeatureExtractor, AutoModel, AutoTokenizer, WhisperForConditionalGeneration
from typer.testing import CliRunner

from mtser.cli.main import app
from mtser.configio import ConfigError
from mtser.featurestore.config import EncoderConfig, ExtractConfig
from mtser.featurestore.audio import load_audio
from mtser.featurestore.corpus import read_corpus
from mtser.featurestore.encoders import SpeechEncoder
from mtser.featurestore.extract import extract
from mtser.featurestore.models import resolve_layers
from mtser.featurestore.shards import FsspecByteSource, LocalByteSource
from mtser.featurestore.store import StoreError, StoreWriter, create_store, open_store, register_encoder
from mtser.featurestore.verify import verify_store
from mtser.trainer import data
from store_helpers import encoder_info, utterance

V1 = Path(__file__).parent / "fixtures" / "store-v1"
SR = 16000


def _states(out) -> tuple[torch.Tensor, ...]:
    """Hidden states as mtser numbers them: transformers' `hidden_states`, the last one being `last_hidden_state`
    (after the final layer norm of models that have one, as `layer: -1` always was)."""
    return (*out.hidden_states[:-1], out.last_hidden_state)


# --------------------------------------------------------------------------------------------- stores before layers
def test_a_store_written_before_layers_reads_unchanged():
    store = open_store(str(V1 / "store.zarr"))
    expected = sorted((V1 / "expected").glob("*.npy"))
    assert len(expected) == 6
    for path in expected:
        utt_id, name = path.stem.rsplit(".", 1)
        want, got = np.load(path), store.get(utt_id, name)
        assert got.dtype == want.dtype and got.shape == want.shape and np.array_equal(got, want), path.name
        assert store.encoders[name].layers is None and store.encoders[name].n_layers == 1
        one = store.get(utt_id, name, layers=[-1])              # its one stored state, asked for by index
        assert one.shape == (len(want), 1, want.shape[1]) and np.array_equal(one[:, 0], want)
    with pytest.raises(StoreError, match=r"encoder 'wavlm': layers \[3\] not stored \(stored: \[-1\]\)"):
        store.get("utt_a", "wavlm", layers=[3])
    assert store.summary()["encoders"]["wavlm"]["layers"] is None
    assert verify_store(str(V1 / "store.zarr")).ok


# ------------------------------------------------------------------------------------------------------ extraction
CONFIGS = {"wavlm": ("speech", [0, 2, -2], "float32"), "whisper": ("whisper", "all", "float32"),
           "roberta": ("text", [-1, 0], "int8")}


@pytest.fixture(scope="module")
def layered(tmp_path_factory, demo_corpus_dir, test_encoders_dir) -> tuple[str, list]:
    """Three demo utterances extracted with `layers` for each encoder kind (float32 speech/whisper, int8 text)."""
    utts = sorted((u for u in read_corpus(demo_corpus_dir).utterances if u.transcript), key=lambda u: u.id)[:3]
    encoders = [EncoderConfig(name, kind, str(test_encoders_dir / name), layers=layers, dtype=dtype)
                for name, (kind, layers, dtype) in CONFIGS.items()]
    url = str(tmp_path_factory.mktemp("layers") / "store.zarr")
    summary = extract(utts, ExtractConfig(encoders=encoders), url, workers=0, progress=False)
    assert summary.ok, summary.line()
    return url, utts


@torch.no_grad()
def _direct(test_encoders_dir: Path, name: str, wave: np.ndarray, transcript: str) -> tuple[torch.Tensor, ...]:
    """Every hidden state of one utterance alone, from transformers as its docs show, (T, D) each."""
    folder = test_encoders_dir / name
    if name == "wavlm":
        inputs = AutoFeatureExtractor.from_pretrained(folder)(wave, sampling_rate=SR, return_tensors="pt")
        model = AutoModel.from_pretrained(folder).eval()
        return tuple(s[0] for s in _states(model(**inputs, output_hidden_states=True)))
    if name == "whisper":
        features = AutoFeatureExtractor.from_pretrained(folder)(wave, sampling_rate=SR, return_tensors="pt")
        model = WhisperForConditionalGeneration.from_pretrained(folder).eval()
        out = model.model.encoder(features.input_features, output_hidden_states=True)
        return tuple(s[0, : math.ceil(len(wave) / 320)] for s in _states(out))
    tokens = AutoTokenizer.from_pretrained(folder)(transcript, return_tensors="pt")
    return tuple(s[0] for s in _states(AutoModel.from_pretrained(folder).eval()(**tokens, output_hidden_states=True)))


def test_stored_layer_k_equals_a_direct_forward_for_each_kind_and_negative_indices(layered, test_encoders_dir):
    url, utts = layered
    store = open_store(url)
    assert {n: store.encoders[n].layers for n in CONFIGS} == {"wavlm": (0, 2, 1), "whisper": (0, 1, 2),
                                                              "roberta": (2, 0)}      # 3 hidden states each
    for utt in utts:
        wave = load_audio(utt.path)
        for name, info in store.encoders.items():
            got = store.get(utt.id, name)
            states = _direct(test_encoders_dir, name, wave, utt.transcript)
            assert got.shape == (len(states[0]), info.n_layers, info.dim), (name, got.shape)
            for position, k in enumerate(info.layers):
                want = states[k].numpy()
                if info.dtype == "int8":                    # symmetric int8: within half a step of its own scale
                    step = np.abs(want).max(axis=1, keepdims=True) / 127
                    assert np.all(np.abs(got[:, position] - want) <= step * 0.51 + 1e-7), (utt.id, name, k)
                else:
                    np.testing.assert_allclose(got[:, position], want, rtol=1e-4, atol=1e-4, err_msg=f"{name} {k}")


def test_one_forward_pass_yields_all_layers(test_encoders_dir, demo_corpus_dir):
    cfg = EncoderConfig("wavlm", "speech", str(test_encoders_dir / "wavlm"), layers="all")
    encoder = SpeechEncoder(cfg)
    calls: list[int] = []
    hook = encoder.model.register_forward_hook(lambda m, i, o: calls.append(1))
    wave = load_audio(sorted(read_corpus(demo_corpus_dir).utterances, key=lambda u: u.id)[0].path)
    (frames,) = encoder.forward([wave], SR)
    hook.remove()
    assert calls == [1] and frames.shape == (encoder.frames(len(wave)), 3, 64)


def test_long_audio_windows_stitch_every_layer(test_encoders_dir, demo_corpus_dir):
    """A recording longer than the window: each stored layer equals that layer extracted alone (same windows)."""
    from mtser.featurestore.pipeline import stitch

    utts = sorted(read_corpus(demo_corpus_dir).utterances, key=lambda u: u.id)[:4]
    wave = np.concatenate([load_audio(u.path) for u in utts])
    folder = str(test_encoders_dir / "wavlm")
    layered = SpeechEncoder(EncoderConfig("w", "speech", folder, layers=[1, -1]))
    pieces = layered.pieces(wave, SR, 1.0, 0.2)
    assert len(pieces) > 2
    frames = stitch(layered.forward(pieces, SR))
    assert frames.shape == (layered.frames(len(wave)), 2, 64)
    for position, layer in enumerate((1, -1)):
        alone = SpeechEncoder(EncoderConfig("w", "speech", folder, layer=layer))
        np.testing.assert_allclose(frames[:, position], stitch(alone.forward(pieces, SR)), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------- reads
class CountingReads:
    """Counts the byte ranges the real local reader fetches (`LocalByteSource.read` / `read_into`)."""

    def __init__(self, monkeypatch):
        self.ranges: list[tuple[str, int, int]] = []
        read, read_into = LocalByteSource.read, LocalByteSource.read_into

        def counted_read(source, key, start, stop):
            self.ranges.append((key, start, stop))
            return read(source, key, start, stop)

        def counted_into(source, key, start, out):
            self.ranges.append((key, start, start + out.nbytes))
            return read_into(source, key, start, out)
        monkeypatch.setattr(LocalByteSource, "read", counted_read)
        monkeypatch.setattr(LocalByteSource, "read_into", counted_into)


def test_all_or_some_layers_are_one_read_per_utterance(layered, monkeypatch):
    url, utts = layered
    store = open_store(url)
    ids = [u.id for u in utts]
    full = store.get_many(ids, "wavlm")
    reads = CountingReads(monkeypatch)
    for layers in (None, [2], [1, 0]):
        reads.ranges.clear()
        got = store.get_many(ids, "wavlm", layers=layers)
        assert len(reads.ranges) == len(ids), layers          # one range per utterance, all layers in it
        picks = [0, 1, 2] if layers is None else [store.encoders["wavlm"].layers.index(k) for k in layers]
        for g, f in zip(got, full):
            assert np.array_equal(g, f[:, picks])
    reads.ranges.clear()
    lengths = [store.length(i, "wavlm") for i in ids]
    out = np.full((len(ids), max(lengths), 3, 64), np.nan, dtype=np.float32)
    store.read_into(ids, "wavlm", out)                         # all layers: straight into the padded buffer
    assert len(reads.ranges) == len(ids)
    for row, (n, f) in enumerate(zip(lengths, full)):
        assert np.array_equal(out[row, :n], f) and not out[row, n:].any()
    sizes = [b - a for _, a, b in reads.ranges]
    assert sizes == [n * 3 * 64 * 4 for n in lengths]        # exactly the utterance's T·L·D values


def test_remote_reads_of_layers_are_one_ranged_get_per_utterance(moto_s3, s3_bucket, monkeypatch):
    url = f"s3://{s3_bucket}/layers.zarr"
    create_store(url, moto_s3)
    register_encoder(url, replace(encoder_info("deep", dim=8), layers=[0, 3, 6]), moto_s3)
    ids = ["a", "b", "c", "d"]
    rng = np.random.default_rng(1)
    frames = {u: rng.standard_normal((5 + k, 3, 8)).astype(np.float32) for k, u in enumerate(ids)}
    writer = StoreWriter(url, "p0", moto_s3)
    for u in ids:
        writer.add(utterance(u), {"deep": frames[u]})
    writer.commit()
    store = open_store(url, storage_options=moto_s3)
    store.get("a", "deep")                                    # the shard index and checksums, once
    requests: list[list] = []
    read_many = FsspecByteSource.read_many
    monkeypatch.setattr(FsspecByteSource, "read_many", lambda source, ranges: requests.append(ranges) or
                        read_many(source, ranges))
    got = store.get_many(ids, "deep", layers=[6, 0])
    assert [len(r) for r in requests] == [len(ids)]           # one batch, one range per utterance
    for u, g in zip(ids, got):
        np.testing.assert_array_equal(g, frames[u][:, [2, 0]].astype(np.float16))


def test_loader_reads_layered_encoders_padded_with_a_layer_subset(layered):
    url, utts = layered
    store = open_store(url)
    ids = [u.id for u in utts]
    for packed in (False, True):
        reader = data.BatchReader(store, ["wavlm", "roberta"], np.float32, packed=packed, layers={"wavlm": [2]})
        batch = reader(ids)
        x, mask = batch.features["wavlm"]
        assert x.shape == (len(ids), mask.shape[1], 1, 64)
        text, text_mask = batch.features["roberta"]
        assert text.shape == (len(ids), text_mask.shape[1], 2, 64)
        for row, utt_id in enumerate(ids):
            n = int(mask[row].sum())
            assert np.array_equal(x[row, :n].numpy(), store.get(utt_id, "wavlm", layers=[2]))
            m = int(text_mask[row].sum())
            assert np.array_equal(text[row, :m].numpy(), store.get(utt_id, "roberta"))


def test_int8_scales_are_per_frame_and_layer_and_checksums_verify(tmp_path):
    url = str(tmp_path / "store.zarr")
    create_store(url)
    register_encoder(url, replace(encoder_info("q", dim=8, dtype="int8"), layers=[0, 6]))
    rng = np.random.default_rng(0)
    frames = rng.standard_normal((20, 2, 8)).astype(np.float32) * np.array([1e-3, 1e3], np.float32)[None, :, None]
    writer = StoreWriter(url, "p0")
    writer.add(utterance("u"), {"q": frames})
    with pytest.raises(StoreError, match=r"expected a non-empty float \(T, 2, 8\) array, got float32 \(20, 8\)"):
        writer.add(utterance("v"), {"q": frames[:, 0]})
    writer.commit()
    store = open_store(url)
    got = store.get("u", "q")
    for position in range(2):                                # the small layer keeps its own precision
        step = np.abs(frames[:, position]).max(axis=1, keepdims=True) / 127
        assert np.all(np.abs(got[:, position] - frames[:, position]) <= step * 0.51)
    assert np.array_equal(store.get("u", "q", layers=[6])[:, 0], got[:, 1])
    assert verify_store(url).ok
    shard = Path(url) / "parts" / "p0" / "features" / "q" / "frames" / "c" / "0" / "0"
    raw = bytearray(shard.read_bytes())
    raw[16 + 8 + 2] ^= 0x40                                   # frame 1, layer 1, value 2 (int8 rows of 2 × 8)
    shard.write_bytes(bytes(raw))
    with pytest.raises(StoreError, match=r"'u' \(parts/p0/features/q\).*checksum mismatch"):
        open_store(url).get("u", "q", layers=[0])             # any layer subset checks the whole row's crc32
    problems = verify_store(url).problems
    assert [(p.utterance, "checksum" in p.message) for p in problems] == [("u", True)]


# ------------------------------------------------------------------------------------------------------ the config
def test_layers_out_of_range_or_twice_are_refused_naming_them():
    cfg = EncoderConfig("w", "speech", "m", layers=[0, -4])
    with pytest.raises(ConfigError, match=r"encoder 'w': layers: \[-4\] out of range; m has 3 hidden states"):
        resolve_layers(cfg, 3)
    with pytest.raises(ConfigError, match=r"layers: \[2, -1\] names a hidden state twice \(as \[2, 2\]\)"):
        resolve_layers(EncoderConfig("w", "speech", "m", layers=[2, -1]), 3)
    assert resolve_layers(EncoderConfig("w", "speech", "m", layers="all"), 3) == (0, 1, 2)
    assert resolve_layers(EncoderConfig("w", "speech", "m", layer=1), 3) is None


@pytest.mark.parametrize("extra, message", [
    ({"layer": 3, "layers": [1, 2]}, "extract.encoders[0].layers: cannot be combined with layer=3"),
    ({"mean_last_k": 2, "layers": "all"}, "extract.encoders[0].layers: cannot be combined with layer=-1 or mean_last_k=2"),
    ({"layers": []}, "extract.encoders[0].layers: empty; give 'all' or a list of hidden-state indices"),
    ({"layers": "some"}, "extract.encoders[0].layers: expected a list"),
    ({"layers": [0, 7]}, "encoder 'wavlm': layers: [7] out of range;"),           # found against the model's config
])
def test_mixing_layer_and_layers_is_refused_naming_the_key(tmp_path, test_encoders_dir, demo_corpus_dir, extra,
                                                           message):
    raw = yaml.safe_load(Path("configs/demo.yaml").read_text())
    for enc in raw["extract"]["encoders"]:
        enc["model"] = str(test_encoders_dir / enc["name"])
        enc.update(extra if enc["name"] == "wavlm" else {})
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(app, ["extract", str(demo_corpus_dir), "--config", str(bad), "--store",
                                      str(tmp_path / "s"), "--workers", "0", "--no-progress"])
    assert result.exit_code == 2 and message in result.output, result.output


def test_features_ls_show_and_export_with_layers(layered, tmp_path):
    url, utts = layered
    listed = CliRunner().invoke(app, ["features", "ls", url])
    assert listed.exit_code == 0, listed.output
    assert "wavlm: speech " in listed.output
    assert "64-d × layers [0, 2, 1] float32 (none), 3 utterances" in listed.output
    assert "roberta: text " in listed.output and "64-d × layers [2, 0] int8" in listed.output
    as_json = CliRunner().invoke(app, ["features", "ls", url, "--json"])
    assert '"layers": [\n        0,\n        2,\n        1\n      ]' in as_json.output
    out = tmp_path / "export"
    exported = CliRunner().invoke(app, ["features", "export", url, "-e", "whisper", "--out", str(out)])
    assert exported.exit_code == 0, exported.output
    assert np.array_equal(np.load(out / f"{utts[1].id}.npy"), open_store(url).get(utts[1].id, "whisper"))
    shown = CliRunner().invoke(app, ["features", "show", url, utts[0].id, "-e", "wavlm"])
    n = open_store(url).length(utts[0].id, "wavlm")
    assert shown.exit_code == 0 and f"[wavlm] shape ({n}, 3, 64) (T, L, D), layers [0, 2, 1] float32" in shown.output


def test_demo_layers_config_stores_four_hidden_states_of_each_encoder(tmp_path, demo_corpus_dir):
    """configs/demo-layers.yaml on encoders built as its header says (`make-test-encoders --layers 3`): every encoder
    stores its 4 hidden states."""
    made = CliRunner().invoke(app, ["make-test-encoders", str(tmp_path / "deep"), "--layers", "3"])
    assert made.exit_code == 0, made.output
    raw = yaml.safe_load(Path("configs/demo-layers.yaml").read_text())
    for enc in raw["extract"]["encoders"]:
        enc["model"] = enc["model"].replace("demo/encoders-deep", str(tmp_path / "deep"))
    config = tmp_path / "demo-layers.yaml"
    config.write_text(yaml.safe_dump(raw))
    url = str(tmp_path / "s")
    result = CliRunner().invoke(app, ["extract", str(demo_corpus_dir), "--config", str(config), "--store", url,
                                      "--workers", "0", "--splits", "Development", "--no-progress"])
    assert result.exit_code == 0, result.output
    store = open_store(url)
    assert {name: info.layers for name, info in store.encoders.items()} == {
        "wavlm": (0, 1, 2, 3), "whisper": (0, 1, 2, 3), "roberta": (0, 1, 2, 3)}
    some = store.ids()[0]
    assert store.get(some, "wavlm").shape[1:] == (4, 64)
