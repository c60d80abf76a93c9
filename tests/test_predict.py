"""`mtser predict`: encoders run on the fly give the ensemble's stored-feature prediction; bad files are skipped."""
from __future__ import annotations

import pandas as pd
import pytest
from typer.testing import CliRunner

from mtser.cli.main import app
from mtser.featurestore.labels import CLASSES

PROBS = [f"prob_{c}" for c in CLASSES]
ATTRS = ["EmoAct", "EmoVal", "EmoDom"]
TOLERANCE = 1e-5


@pytest.fixture
def dev_ensemble(search_run, demo_store):
    run, _ = search_run
    result = CliRunner().invoke(app, ["ensemble", "--run", str(run), "--store", str(demo_store)])
    assert result.exit_code == 0, result.output
    return run / "ensemble"


def test_predict_on_wav_matches_ensemble_on_stored_features(dev_ensemble, demo_corpus_dir, tmp_path):
    stored = pd.read_csv(dev_ensemble / "Development" / "predictions.csv").set_index("FileName")
    names = sorted(stored.index)[:2]
    wavs = [demo_corpus_dir / "Audios" / name for name in names]
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF not really a wav")
    out = tmp_path / "table.csv"
    result = CliRunner().invoke(app, ["predict", *map(str, wavs), str(broken), str(tmp_path / "missing.wav"),
                                      "--transcripts", str(demo_corpus_dir / "Transcripts"),
                                      "--ensemble", str(dev_ensemble), "--out", str(out)])
    assert result.exit_code == 1, result.output                 # some files failed, the rest are written
    assert "broken.wav" in result.output and "missing.wav" in result.output
    table = pd.read_csv(out)
    assert list(table.columns) == ["FileName", "EmoClass", *PROBS, *ATTRS]
    assert table["FileName"].tolist() == sorted(map(str, wavs))
    for wav, name in zip(wavs, names):
        row = table.set_index("FileName").loc[str(wav)]
        assert row["EmoClass"] == stored.loc[name, "EmoClass"]
        # float16 storage: a float32 difference of 1e-7 between batch shapes can flip the last float16 bit
        assert row[PROBS + ATTRS].to_numpy(float) == pytest.approx(stored.loc[name, PROBS + ATTRS].to_numpy(float),
                                                                   abs=TOLERANCE)
        assert row[PROBS].sum() == pytest.approx(1.0, abs=1e-4)


def test_predict_prints_a_folder_and_rejects_a_bad_manifest(dev_ensemble, demo_corpus_dir, tmp_path):
    folder = tmp_path / "audio"
    folder.mkdir()
    for wav in sorted((demo_corpus_dir / "Audios").glob("*test3*"))[:2]:
        (folder / wav.name).write_bytes(wav.read_bytes())
    result = CliRunner().invoke(app, ["predict", str(folder), "--ensemble", str(dev_ensemble / "ensemble.json")])
    assert result.exit_code == 0, result.output
    assert result.output.count(".wav") == 2 and "EmoClass" in result.output

    bad = CliRunner().invoke(app, ["predict", str(folder), "--ensemble", str(tmp_path / "nothing.json")])
    assert bad.exit_code == 2 and "nothing.json" in bad.output


def test_predict_skip_external_drops_the_external_member(dev_ensemble, search_run, demo_store, demo_corpus_dir,
                                                         tmp_path):
    stored = pd.read_csv(dev_ensemble / "Development" / "predictions.csv").set_index("FileName")
    name = sorted(stored.index)[0]
    pd.DataFrame({"FileName": stored.index, "EmoAct": 1.0}).to_csv(tmp_path / "baseline.csv", index=False)
    run, _ = search_run
    with_external = tmp_path / "ensemble"
    built = CliRunner().invoke(app, ["ensemble", "--run", str(run), "--store", str(demo_store), "--out",
                                     str(with_external), "--extra-member", f"arousal={tmp_path / 'baseline.csv'}"])
    assert built.exit_code == 0, built.output
    wav = str(demo_corpus_dir / "Audios" / name)
    refused = CliRunner().invoke(app, ["predict", wav, "--ensemble", str(with_external)])
    assert refused.exit_code == 2 and "--skip-external" in refused.output
    out = tmp_path / "table.csv"
    result = CliRunner().invoke(app, ["predict", wav, "--ensemble", str(with_external), "--skip-external",
                                      "--transcripts", str(demo_corpus_dir / "Transcripts"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    row = pd.read_csv(out).iloc[0]           # = the ensemble without the external member (dev_ensemble)
    assert row[PROBS + ATTRS].to_numpy(float) == pytest.approx(stored.loc[name, PROBS + ATTRS].to_numpy(float),
                                                               abs=TOLERANCE)


def test_predict_runs_encoders_in_the_compute_dtype_the_store_used():
    from mtser.trainer.predict import encoder_configs

    info = {"config": {"name": "w", "kind": "speech", "model": "m", "compute_dtype": None}, "dtype": "float16"}
    recorded = {"store": {"encoders": {"w": {**info, "compute_dtype": "bfloat16"}}}}
    older = {"store": {"encoders": {"w": info}}}                 # stores written before compute_dtype was recorded
    assert encoder_configs([recorded])[0].compute_dtype == "bfloat16"
    assert encoder_configs([older])[0].compute_dtype == "float32"
    int8 = {"store": {"encoders": {"w": {**info, "dtype": "int8"}}}}    # frames converted as the store keeps them
    assert encoder_configs([int8])[0].dtype == "int8"


STORED_AS = {"f16": ("float16", "none"), "i8": ("int8", "none"), "z16": ("float16", "zstd")}


def test_predict_on_audio_equals_prediction_on_stored_frames_for_each_storage(test_encoders_dir, demo_corpus_dir,
                                                                              tmp_path):
    """float16, int8 (per-frame scales) and zstd-compressed encoders: `mtser predict` on a file gives what the same
    model gives the utterance read from the store, because predict converts frames with the store's one definition
    (`featurestore.frames`); for int8 the unquantised frames give a measurably different prediction."""
    import json

    import numpy as np

    from mtser.featurestore.config import EncoderConfig, ExtractConfig
    from mtser.featurestore.corpus import read_corpus
    from mtser.featurestore.extract import extract
    from mtser.featurestore.pipeline import encode_utterances
    from mtser.featurestore.store import open_store
    from mtser.trainer.checkpoint import load_checkpoint
    from mtser.trainer.ensemble import TASKS
    from mtser.trainer.infer import predict, predict_features
    from mtser.trainer.predict import encoder_configs, predict_files
    from trainer_store import random_checkpoint

    utts = [u for u in read_corpus(demo_corpus_dir).utterances if u.split == "Development"][:3]
    encoders = [EncoderConfig(name, "speech", str(test_encoders_dir / "wavlm"), dtype=dtype, compression=compression)
                for name, (dtype, compression) in STORED_AS.items()]
    url = str(tmp_path / "store.zarr")
    assert extract(utts, ExtractConfig(encoders=encoders), url, workers=0, progress=False).ok
    store = open_store(url)
    assert {n: (e.dtype, e.compression) for n, e in store.encoders.items()} == STORED_AS
    raw, _, _ = encode_utterances([EncoderConfig("raw", "speech", str(test_encoders_dir / "wavlm"), dtype="float32")],
                                  utts)
    ids = [u.id for u in utts]
    for name in STORED_AS:
        checkpoint = random_checkpoint(tmp_path / name, url, [name])
        manifest = tmp_path / f"{name}.json"
        manifest.write_text(json.dumps({"members": {t: [{"trial": name, "checkpoint": checkpoint}] for t in TASKS}}))
        paths = [u.path for u in utts]
        on_audio = predict_files(paths, manifest).table.set_index("FileName").loc[paths]
        model, _, _ = load_checkpoint(checkpoint)
        (probs,), (attrs,) = predict(model, store, ids)
        from_store = np.concatenate([probs, attrs], axis=1)
        np.testing.assert_allclose(on_audio[PROBS + ATTRS].to_numpy(float), from_store, atol=1e-6, rtol=0,
                                   err_msg=name)
        features, _, _ = encode_utterances(encoder_configs([load_checkpoint(checkpoint)[2]]), utts)  # predict's
        for i in ids:
            np.testing.assert_array_equal(features[i][name], store.get(i, name, np.float32), err_msg=name)
        if name == "i8":                           # not vacuous: unquantised frames differ, and so does the prediction
            assert min(np.abs(raw[i]["raw"] - store.get(i, name, np.float32)).max() for i in ids) > 5e-3
            unquantised = np.concatenate(predict_features(model, [{name: raw[i]["raw"]} for i in ids]), axis=-1)[0]
            assert np.abs(unquantised - from_store).max() > 1e-5


def test_predict_refuses_an_encoder_with_pickled_weights_only(dev_ensemble, demo_corpus_dir, pickled_roberta,
                                                              tmp_path):
    import json
    import shutil

    pickled = pickled_roberta
    text = (dev_ensemble / "ensemble.json").read_text()
    checkpoints = sorted({m["checkpoint"] for ms in json.loads(text)["members"].values() for m in ms
                          if "checkpoint" in m})
    for k, path in enumerate(checkpoints):               # each member's sidecar names the pickled encoder
        copy = tmp_path / f"member{k}"
        shutil.copytree(path, copy)
        sidecar = json.loads((copy / "checkpoint.json").read_text())
        sidecar["store"]["encoders"]["roberta"]["config"]["model"] = str(pickled)
        (copy / "checkpoint.json").write_text(json.dumps(sidecar))
        text = text.replace(json.dumps(path), json.dumps(str(copy)))
    (tmp_path / "ensemble.json").write_text(text)
    wav = sorted((demo_corpus_dir / "Audios").glob("*.wav"))[0]
    result = CliRunner().invoke(app, ["predict", str(wav), "--ensemble", str(tmp_path / "ensemble.json"),
                                      "--skip-external"])
    assert result.exit_code == 2, result.output
    assert "'roberta'" in result.output and "MTSER_ALLOW_PICKLE_WEIGHTS=1" in result.output
