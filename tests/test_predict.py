"""`mtser predict`: encoders run on the fly give the ensemble's stored-feature prediction; bad files are skipped."""
from __future__ import annotations

import pandas as pd
import pytest
from typer.testing import CliRunner

from mtser.cli.main import app
from mtser.featurestore.labels import CLASSES
from search_support import ray_module, search_run  # noqa: F401 (fixtures)

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
    assert encoder_configs([recorded])[0][0].compute_dtype == "bfloat16"
    assert encoder_configs([older])[0][0].compute_dtype == "float32"


def test_predict_refuses_an_encoder_with_pickled_weights_only(dev_ensemble, demo_corpus_dir, test_encoders_dir,
                                                              tmp_path):
    import json
    import shutil

    import torch
    from transformers import AutoModel

    pickled = tmp_path / "roberta"
    shutil.copytree(test_encoders_dir / "roberta", pickled)
    torch.save(AutoModel.from_pretrained(pickled).state_dict(), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
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
