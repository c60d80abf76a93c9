"""Encoders: batched/masked features equal a direct transformers forward of each utterance alone; hidden-state
selection; Whisper windows and frame counts; ASR from the features' own encoder pass; group-norm batching."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import AutoFeatureExtractor, AutoModel, AutoTokenizer, WhisperForConditionalGeneration

from mtser.featurestore.audio import load_audio
from mtser.featurestore.config import EncoderConfig, ExtractConfig
from mtser.featurestore.corpus import Utterance, read_corpus
from mtser.featurestore.encoders import SpeechEncoder, WhisperEncoder, length_batches, load_encoder
from mtser.featurestore.pipeline import Pipeline, encode_utterances

F16 = dict(rtol=2e-3, atol=2e-3)      # float16 storage tolerance
ASR_TOKENS = 6


def _configs(encoders_dir, **speech) -> list[EncoderConfig]:
    return [EncoderConfig("wavlm", "speech", str(encoders_dir / "wavlm"), **speech),
            EncoderConfig("whisper", "whisper", str(encoders_dir / "whisper"), asr=True),
            EncoderConfig("roberta", "text", str(encoders_dir / "roberta"))]


@pytest.fixture(scope="module")
def utterances(demo_corpus_dir) -> list[Utterance]:
    """Six utterances of different lengths; the last has no transcript (Whisper must transcribe it)."""
    utts = sorted(read_corpus(demo_corpus_dir).utterances, key=lambda u: u.id)
    with_text = [u for u in utts if u.transcript][:5]
    without = [u for u in utts if not u.transcript][:1]
    assert len(with_text) == 5 and len(without) == 1
    return with_text + without


@pytest.fixture(scope="module")
def pipeline(test_encoders_dir) -> Pipeline:
    cfg = ExtractConfig(encoders=_configs(test_encoders_dir), batch_seconds=600.0, asr_max_new_tokens=ASR_TOKENS)
    return Pipeline(cfg)


def _whisper_reference(model, extractor, wave: np.ndarray, layer: int = -1) -> np.ndarray:
    features = extractor(wave, sampling_rate=16000, return_tensors="pt").input_features
    with torch.no_grad():
        out = model.model.encoder(features, output_hidden_states=True)
    return out.hidden_states[layer][0, : math.ceil(len(wave) / 320)].numpy()


class DirectReference:
    """The features a user gets from transformers directly, one utterance at a time, as its docs show."""

    def __init__(self, encoders_dir):
        self.wavlm = AutoModel.from_pretrained(encoders_dir / "wavlm").eval()
        self.wavlm_fe = AutoFeatureExtractor.from_pretrained(encoders_dir / "wavlm")
        self.whisper = WhisperForConditionalGeneration.from_pretrained(encoders_dir / "whisper").eval()
        self.whisper_fe = AutoFeatureExtractor.from_pretrained(encoders_dir / "whisper")
        self.roberta = AutoModel.from_pretrained(encoders_dir / "roberta").eval()
        self.tokenizer = AutoTokenizer.from_pretrained(encoders_dir / "roberta")

    @torch.no_grad()
    def features(self, wave: np.ndarray, transcript: str) -> dict[str, np.ndarray]:
        inputs = self.wavlm_fe(wave, sampling_rate=16000, return_tensors="pt")
        return {"wavlm": self.wavlm(**inputs).last_hidden_state[0].numpy(),
                "whisper": _whisper_reference(self.whisper, self.whisper_fe, wave),
                "roberta": self.roberta(**self.tokenizer(transcript, return_tensors="pt")).last_hidden_state[0].numpy()}


def test_each_encoder_matches_a_direct_forward_of_the_utterance_alone(pipeline, utterances, test_encoders_dir):
    result = pipeline.run(utterances)
    assert not result.failures
    written = {u.id: (u, f) for u, f in result.written}
    lengths = {len(load_audio(u.path)) for u in utterances}
    assert len(lengths) == len(utterances)                       # really different lengths, so batches are padded
    reference = DirectReference(test_encoders_dir)
    for utt in utterances:
        stored, converted = written[utt.id]
        feats = {name: frames.decode() for name, frames in converted.items()}     # as the store will return them
        wave = load_audio(utt.path)
        for name, expected in reference.features(wave, stored.transcript).items():
            np.testing.assert_allclose(feats[name], expected, **F16, err_msg=f"{utt.id} {name}")
        assert feats["whisper"].shape[0] == math.ceil(len(wave) / 320)
        assert feats["wavlm"].shape[0] == int(reference.wavlm._get_feat_extract_output_lengths(len(wave)))
        assert stored.duration == pytest.approx(len(wave) / 16000)


def test_transcripts_human_or_asr_from_the_same_encoder_pass(pipeline, utterances, test_encoders_dir):
    encoder = pipeline.encoders["whisper"]
    rows_seen: list[int] = []
    hook = encoder.model.model.encoder.register_forward_hook(lambda m, i, o: rows_seen.append(i[0].shape[0]))
    try:
        result = pipeline.run(utterances)
    finally:
        hook.remove()
    assert sum(rows_seen) == len(utterances)                    # one encoder pass per utterance, ASR included
    stored = {u.id: u for u, _ in result.written}
    for utt in utterances[:-1]:
        assert stored[utt.id].transcript == utt.transcript and stored[utt.id].transcript_source == "human"
    asr = stored[utterances[-1].id]
    assert asr.transcript_source == "asr" and asr.transcript
    # The transcript equals what transformers' own generate gives from the audio (which runs the encoder again).
    features = encoder.extractor(load_audio(asr.path), sampling_rate=16000, return_tensors="pt").input_features
    ids = encoder.model.generate(input_features=features, max_new_tokens=ASR_TOKENS, language="en", task="transcribe")
    assert asr.transcript == encoder.tokenizer.batch_decode(ids, skip_special_tokens=True)[0].strip()


def test_layer_index_and_mean_of_last_k(test_encoders_dir, utterances):
    utts = utterances[:3]
    cfgs = [EncoderConfig("w_layer1", "speech", str(test_encoders_dir / "wavlm"), layer=1),
            EncoderConfig("w_mean2", "speech", str(test_encoders_dir / "wavlm"), mean_last_k=2),
            EncoderConfig("wh_layer0", "whisper", str(test_encoders_dir / "whisper"), layer=0),
            EncoderConfig("r_mean3", "text", str(test_encoders_dir / "roberta"), mean_last_k=3)]
    features, stored, failures = encode_utterances(cfgs, utts)
    assert not failures
    model = AutoModel.from_pretrained(test_encoders_dir / "wavlm").eval()
    fe = AutoFeatureExtractor.from_pretrained(test_encoders_dir / "wavlm")
    whisper = WhisperForConditionalGeneration.from_pretrained(test_encoders_dir / "whisper").eval()
    whisper_fe = AutoFeatureExtractor.from_pretrained(test_encoders_dir / "whisper")
    roberta = AutoModel.from_pretrained(test_encoders_dir / "roberta").eval()
    tokenizer = AutoTokenizer.from_pretrained(test_encoders_dir / "roberta")
    for utt in utts:
        wave = load_audio(utt.path)
        with torch.no_grad():
            out = model(**fe(wave, sampling_rate=16000, return_tensors="pt"), output_hidden_states=True)
            hs = (*out.hidden_states[:-1], out.last_hidden_state)
            ths = roberta(**tokenizer(utt.transcript, return_tensors="pt"), output_hidden_states=True).hidden_states
        np.testing.assert_allclose(features[utt.id]["w_layer1"], hs[1][0].numpy(), **F16)
        np.testing.assert_allclose(features[utt.id]["w_mean2"], ((hs[-1] + hs[-2]) / 2)[0].numpy(), **F16)
        assert not np.allclose(features[utt.id]["w_layer1"], hs[-1][0].numpy(), **F16)
        np.testing.assert_allclose(features[utt.id]["wh_layer0"], _whisper_reference(whisper, whisper_fe, wave, 0), **F16)
        np.testing.assert_allclose(features[utt.id]["r_mean3"], torch.stack(ths[-3:]).mean(0)[0].numpy(), **F16)
        assert stored[utt.id].transcript_source == "human"


def test_whisper_long_audio_in_30s_windows(test_encoders_dir):
    rng = np.random.default_rng(0)
    wave = (0.1 * rng.standard_normal(16000 * 35 + 123)).astype(np.float32)
    encoder = WhisperEncoder(EncoderConfig("whisper", "whisper", str(test_encoders_dir / "whisper")))
    (frames, text), = encoder.forward([(wave, False)], 16000)
    assert text is None and frames.shape == (math.ceil(len(wave) / 320), 64)
    first = _whisper_reference(encoder.model, encoder.extractor, wave[: 16000 * 30])
    rest = _whisper_reference(encoder.model, encoder.extractor, wave[16000 * 30:])
    np.testing.assert_allclose(frames, np.concatenate([first, rest]), **F16)


def test_group_norm_speech_model_batches_equal_lengths_only(tmp_path):
    from transformers import Wav2Vec2FeatureExtractor, WavLMConfig, WavLMModel

    torch.manual_seed(0)
    config = WavLMConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                         conv_dim=(16,) * 7, feat_extract_norm="group", do_stable_layer_norm=False,
                         num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4)
    WavLMModel(config).eval().save_pretrained(tmp_path / "wavlm_base_like")
    Wav2Vec2FeatureExtractor(return_attention_mask=False, do_normalize=False).save_pretrained(tmp_path / "wavlm_base_like")
    encoder = SpeechEncoder(EncoderConfig("w", "speech", str(tmp_path / "wavlm_base_like")))
    assert not encoder.pads_safely
    rng = np.random.default_rng(1)
    waves = [(0.1 * rng.standard_normal(n)).astype(np.float32) for n in (8000, 12000, 8000, 16000)]
    batches = encoder.batches(waves, 600.0, 16000)
    assert sorted(map(sorted, batches)) == [[0, 2], [1], [3]]
    for batch in batches:
        for i, frames in zip(batch, encoder.forward([waves[i] for i in batch], 16000)):
            np.testing.assert_allclose(frames, encoder.forward([waves[i]], 16000)[0], **F16)
    # Why: with group norm, zero padding changes the features of the shorter utterance.
    padded = np.stack([np.pad(waves[0], (0, 8000)), waves[3]])
    frames = int(encoder.model._get_feat_extract_output_lengths(8000))
    with torch.no_grad():
        out = encoder.model(torch.from_numpy(padded)).last_hidden_state[0, :frames].numpy()
    assert not np.allclose(out, encoder.forward([waves[0]], 16000)[0], **F16)


def test_length_batches_respect_budget_and_sort():
    batches = length_batches([50, 10, 30, 90, 11, 11], budget=60)
    assert batches == [[1, 4, 5], [2], [0], [3]]                # 3*11 <= 60; 30 > 1.15*10; 50 and 90 alone
    assert length_batches([4, 4, 5], budget=100, equal_only=True) == [[0, 1], [2]]


def test_whisper_log_mel_on_the_device_equals_the_feature_extractor(test_encoders_dir):
    """The torch log-mel (what the encoder is fed) equals WhisperFeatureExtractor's output, per piece, whatever
    the other pieces of the batch are (each piece's own 8 dB floor)."""
    encoder = WhisperEncoder(EncoderConfig("whisper", "whisper", str(test_encoders_dir / "whisper")))
    rng = np.random.default_rng(3)
    pieces = [(0.3 * rng.standard_normal(n)).astype(np.float32) for n in (16000 * 30, 12345, 800)]
    pieces[1] *= 0.01                                                   # a quiet piece beside loud ones
    got = encoder.log_mel(pieces)
    assert got.device.type == "cpu" and got.dtype == torch.float32 and got.shape == (3, encoder.extractor.feature_size, 3000)
    for j, piece in enumerate(pieces):
        expected = encoder.extractor(piece, sampling_rate=16000, return_tensors="np").input_features[0]
        np.testing.assert_allclose(got[j].numpy(), expected, rtol=1e-5, atol=2e-5, err_msg=f"piece {j}")


def _forward_kwargs(module: torch.nn.Module, run) -> list[dict]:
    seen: list[dict] = []
    hook = module.register_forward_pre_hook(lambda m, args, kwargs: seen.append(dict(kwargs)), with_kwargs=True)
    try:
        run()
    finally:
        hook.remove()
    return seen


def test_only_an_inner_layer_asks_the_model_for_every_hidden_state(test_encoders_dir):
    rng = np.random.default_rng(0)
    waves = [(0.1 * rng.standard_normal(n)).astype(np.float32) for n in (16000, 20000)]
    for kind, name, run in (("speech", "wavlm", lambda e: e.forward(waves, 16000)),
                            ("whisper", "whisper", lambda e: e.forward([(w, False) for w in waves], 16000)),
                            ("text", "roberta", lambda e: e.forward(["hello there", "a longer sentence"], 16000))):
        asked = {}
        for layer in (-1, 1):
            enc = load_encoder(EncoderConfig(name, kind, str(test_encoders_dir / name), layer=layer))
            module = enc.model.model.encoder if kind == "whisper" else enc.model
            calls = _forward_kwargs(module, lambda: run(enc))
            asked[layer] = [c.get("output_hidden_states") for c in calls]
        assert asked == {-1: [False], 1: [True]}, (kind, asked)


def test_compute_dtype_default_explicit_bfloat16_on_cpu_and_validation(test_encoders_dir, utterances, tmp_path):
    from mtser.configio import ConfigError
    from mtser.featurestore.config import resolve_compute_dtype
    from mtser.trainer.config import load_config

    base = EncoderConfig("wavlm", "speech", str(test_encoders_dir / "wavlm"))
    assert resolve_compute_dtype(base, "cpu") == "float32" and resolve_compute_dtype(base, "cuda:0") == "bfloat16"
    assert resolve_compute_dtype(EncoderConfig("w", "speech", "x", compute_dtype="float16"), "cpu") == "float16"
    f32, _, _ = encode_utterances([base], utterances[:2])
    bf16_cfg = EncoderConfig("wavlm", "speech", str(test_encoders_dir / "wavlm"), compute_dtype="bfloat16")
    assert next(load_encoder(bf16_cfg).model.parameters()).dtype == torch.bfloat16
    bf16, _, failures = encode_utterances([bf16_cfg], utterances[:2])
    assert not failures
    for utt_id, feats in f32.items():
        a, b = feats["wavlm"], bf16[utt_id]["wavlm"]
        assert a.shape == b.shape and a.dtype == b.dtype == np.float32
        cosine = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        assert cosine.mean() > 0.99                                     # close to float32 ...
        assert np.abs(a - b).max() > 1e-4                               # ... but really computed in bfloat16
    bad = tmp_path / "bad.yaml"
    bad.write_text("extract:\n  encoders:\n    - {name: w, kind: speech, model: x, compute_dtype: float64}\n")
    with pytest.raises(ConfigError, match=r"extract.encoders\[0\].compute_dtype: expected one of \['float32', "
                                          r"'bfloat16', 'float16'\]"):
        load_config(bad)


@pytest.mark.parametrize("kind, model", [("text", "roberta"), ("speech", "wavlm")])
def test_pickled_encoder_weights_load_only_when_the_user_opts_in(test_encoders_dir, tmp_path, monkeypatch, kind,
                                                                 model):
    import shutil

    from mtser.configio import ConfigError
    from mtser.featurestore.models import ALLOW_PICKLE_ENV

    pickled = tmp_path / model
    shutil.copytree(test_encoders_dir / model, pickled)
    torch.save(AutoModel.from_pretrained(pickled).state_dict(), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    cfg = EncoderConfig("enc", kind, str(pickled))
    monkeypatch.delenv(ALLOW_PICKLE_ENV, raising=False)
    with pytest.raises(ConfigError, match=f"'enc': {pickled} has no safetensors weights .* {ALLOW_PICKLE_ENV}=1"):
        load_encoder(cfg)
    monkeypatch.setenv(ALLOW_PICKLE_ENV, "1")
    loaded = load_encoder(cfg)
    reference = AutoModel.from_pretrained(test_encoders_dir / model)
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(loaded.model.state_dict()[name], value)
