"""`mtser extract` end to end: Ray workers, stored features equal a direct transformers forward, a killed worker's
shard is redone, an interrupted run resumes, per-utterance failures are reported, augmentation is recorded."""
from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import soundfile
import yaml
from typer.testing import CliRunner

from mtser.cli.main import app
from mtser.featurestore.audio import load_audio
from mtser.featurestore.corpus import read_corpus
from mtser.featurestore.extract import extract
from mtser.featurestore.store import StoreError, open_store, part_state
from mtser.trainer.config import load_config
from test_encoders import F16, DirectReference

MTSER = str(Path(sys.executable).with_name("mtser"))


@pytest.fixture(scope="module", autouse=True)
def ray_session():
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=150 * 1024**2,
             logging_level="ERROR")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("extract")


@pytest.fixture(scope="module")
def config_path(workdir, test_encoders_dir) -> Path:
    """configs/demo.yaml with the test encoders, small shards (about one utterance each) and short ASR."""
    raw = yaml.safe_load(Path("configs/demo.yaml").read_text())
    for enc in raw["extract"]["encoders"]:
        enc["model"] = str(test_encoders_dir / enc["name"])
    raw["extract"].update(shard_seconds=6.0, asr_max_new_tokens=6)
    path = workdir / "extract.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def manifest(workdir, demo_corpus_dir) -> Path:
    """Ten demo utterances (two without transcript) as a CSV manifest."""
    utts = sorted(read_corpus(demo_corpus_dir).utterances, key=lambda u: u.id)
    chosen = [u for u in utts if u.transcript and u.split == "Train"][:4] + \
             [u for u in utts if u.transcript and u.split == "Development"][:4] + [u for u in utts if not u.transcript][:2]
    path = workdir / "manifest.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "path", "split", "emo_class", "transcript"])
        writer.writerows([u.id, u.path, u.split or "", u.emo_class or "", u.transcript or ""] for u in chosen)
    return path


@pytest.fixture(scope="module")
def clean_store(workdir, manifest, config_path):
    """A clean two-worker run of the manifest."""
    url = str(workdir / "clean")
    summary = extract(read_corpus(manifest).utterances, load_config(config_path).extract, url, workers=2,
                      progress=False)
    return url, summary


def _assert_same_store(url_a: str, url_b: str) -> None:
    a, b = open_store(url_a), open_store(url_b)
    assert a.ids() == b.ids() and a.ids()
    cols = ["split", "emo_class", "transcript", "transcript_source", "augmentation", "source_id"]
    assert a.utterances[cols].fillna("").equals(b.utterances[cols].fillna(""))
    np.testing.assert_allclose(a.utterances["duration"], b.utterances["duration"])
    for name in a.encoders:
        for utt_id in a.ids():
            np.testing.assert_allclose(a.get(utt_id, name, np.float32), b.get(utt_id, name, np.float32), **F16)


def test_two_workers_store_equals_direct_forward(clean_store, manifest, test_encoders_dir):
    url, summary = clean_store
    utts = read_corpus(manifest).utterances
    assert summary.ok and summary.written == len(utts) == 10 and summary.failed == 0
    assert summary.workers == 2 and len(summary.pids) == 2           # both actors took shards
    assert summary.shards >= 4 and summary.shards_skipped == 0
    store = open_store(url)
    assert sorted(store.encoders) == ["roberta", "wavlm", "whisper"]
    assert store.encoders["wavlm"].dtype == "float16" and store.encoders["wavlm"].content_hash
    table = store.utterances
    assert (table["transcript_source"] == "asr").sum() == 2 and (table["transcript_source"] == "human").sum() == 8
    reference = DirectReference(test_encoders_dir)
    for utt in utts:
        assert store.get(utt.id, "wavlm").dtype == np.float16
        expected = reference.features(load_audio(utt.path), table.loc[utt.id, "transcript"])
        for name, frames in expected.items():
            np.testing.assert_allclose(store.get(utt.id, name, np.float32), frames, **F16, err_msg=f"{utt.id} {name}")


def _worker_pids() -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "cmdline").read_bytes().startswith(b"ray::ShardWorker.run"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def test_killed_worker_has_its_shard_redone_and_store_equals_clean_run(clean_store, workdir, manifest, config_path):
    url = str(workdir / "killed")
    outcome = {}
    run = threading.Thread(target=lambda: outcome.update(summary=extract(
        read_corpus(manifest).utterances, load_config(config_path).extract, url, workers=2, progress=False)))
    run.start()
    killed = None
    deadline = time.time() + 120
    while killed is None and run.is_alive() and time.time() < deadline:
        pids = _worker_pids()
        if pids:
            time.sleep(0.3)                                          # let it get into a shard
            killed = pids[0]
            # Ray renices workers to 15 by default, which starves them beside any busy process
            assert os.getpriority(os.PRIO_PROCESS, killed) == os.getpriority(os.PRIO_PROCESS, 0)
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.05)
    run.join(timeout=180)
    assert killed is not None, "no ShardWorker process to kill was seen"
    summary = outcome["summary"]
    # the killed worker may have committed a shard before it died; the one it held was redone by another worker
    assert summary.retries >= 1 and summary.ok and summary.pids - {killed}
    assert summary.written == 10
    # mtser's own lines: which worker died holding which shard, attempt k of n, and where the shard then committed
    died = [e for e in summary.events if f"(pid {killed}, node " in e and "died while encoding shard shard-" in e]
    assert len(died) == 1 and "attempt 1 of 3" in died[0] and "goes back to the queue" in died[0], summary.events
    shard = died[0].split("encoding shard ")[1].split(" ")[0]
    redone = [e for e in summary.events if e.startswith(f"shard {shard} committed on attempt 2 of 3 by worker ")]
    assert len(redone) == 1 and f"pid {killed}," not in redone[0], summary.events
    _assert_same_store(clean_store[0], url)


def test_interrupted_driver_resumes_without_recomputing_committed_shards(clean_store, workdir, manifest, config_path):
    import ray

    url = str(workdir / "resumed")
    cmd = [MTSER, "extract", str(manifest), "--config", str(config_path), "--store", url, "--workers", "1",
           "--no-progress", "--address", ray.get_runtime_context().gcs_address]      # joins this module's cluster
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    committed: set[str] = set()
    deadline = time.time() + 120
    while not committed and first.poll() is None and time.time() < deadline:
        time.sleep(0.1)
        if (Path(url) / "zarr.json").exists():
            committed = open_store(url).committed_parts()
    first.send_signal(signal.SIGINT)
    out, _ = first.communicate(timeout=60)
    assert first.returncode == 130, out
    assert "rerun the same command" in out
    store = open_store(url)
    done = store.committed_parts()
    assert done and len(done) < clean_store[1].shards                # interrupted part-way
    stamps = {p: part_state(store._store, p)["committed_ns"] for p in done}
    second = CliRunner().invoke(app, cmd[1:])                          # the same command, in this process
    assert second.exit_code == 0, second.output
    rows = sum(1 for _ in csv.reader(open(manifest))) - 1
    skipped = int(second.output.split(" planned (")[1].split()[0])
    assert 0 < skipped < rows and f"written {rows}, failed 0 of {rows} planned ({skipped} from earlier runs)" in second.output
    store = open_store(url)
    assert {p: part_state(store._store, p)["committed_ns"] for p in done} == stamps   # not recomputed
    _assert_same_store(clean_store[0], url)


def _bad_corpus(root: Path, demo_corpus_dir: Path) -> Path:
    """An MSP-Podcast folder with one utterance per failure kind plus good (and stereo 44.1 kHz) ones."""
    good = sorted(read_corpus(demo_corpus_dir).utterances, key=lambda u: u.id)
    good = [u for u in good if u.transcript][:2]
    (root / "Audios").mkdir(parents=True)
    (root / "Transcripts").mkdir()
    (root / "Labels").mkdir()
    names = {"good1": good[0], "good2": good[1]}
    for name, utt in names.items():
        shutil.copy(utt.path, root / "Audios" / f"{name}.wav")
        (root / "Transcripts" / f"{name}.txt").write_text(utt.transcript)
    wave = load_audio(good[0].path)
    stereo = np.stack([wave, wave * 0.5], axis=1)
    import torch
    import torchaudio.functional as AF
    stereo44 = AF.resample(torch.from_numpy(stereo.T.copy()), 16000, 44100).numpy().T
    soundfile.write(root / "Audios" / "stereo44k.wav", stereo44, 44100)
    (root / "Transcripts" / "stereo44k.txt").write_text("a stereo recording")
    (root / "Audios" / "corrupt.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEfmt garbage" * 8)
    soundfile.write(root / "Audios" / "empty.wav", np.zeros(0, dtype=np.float32), 16000)
    soundfile.write(root / "Audios" / "silent.wav", np.zeros(16000, dtype=np.float32), 16000)
    nan = wave.copy()
    nan[500:510] = np.nan
    soundfile.write(root / "Audios" / "nan.wav", nan, 16000, subtype="FLOAT")
    shutil.copy(good[0].path, root / "Audios" / "badtext.wav")
    (root / "Transcripts" / "badtext.txt").write_bytes(b"caf\xe9 au lait \xff")
    (root.parent / "outside.wav").write_bytes(Path(good[0].path).read_bytes())
    (root / "Audios" / "outside.wav").symlink_to(root.parent / "outside.wav")     # a link out of the corpus
    (root / "Audios" / "folder.wav").mkdir()                                      # a folder named like audio
    rows = ["good1", "good2", "stereo44k", "corrupt", "empty", "silent", "nan", "badtext", "missing", "good1",
            "outside", "folder"]
    with (root / "Labels" / "labels_consensus.csv").open("w") as f:
        f.write("FileName,EmoClass,EmoAct,EmoVal,EmoDom,SpkrID,Gender,Split_Set\n")
        f.writelines(f"{r}.wav,N,4.0,4.0,4.0,1,Male,Development\n" for r in rows)
    return root


def test_bad_utterances_are_reported_and_the_rest_written(workdir, demo_corpus_dir, config_path):
    corpus = _bad_corpus(workdir / "bad", demo_corpus_dir)
    url = str(workdir / "bad_store")
    command = ["extract", str(corpus), "--config", str(config_path), "--store", url, "--workers", "0", "--no-progress"]
    result = CliRunner().invoke(app, command)
    assert result.exit_code == 1, result.output
    # 8 rows read (badtext kept without transcript, the duplicate good1 row skipped) + 3 rows unreadable (missing,
    # a symlink out of the corpus, a folder)
    assert "written 4, failed 7 of 11 planned (0 from earlier runs); 2 warnings;" in result.output
    store = open_store(url)
    assert sorted(store.ids()) == ["badtext.wav", "good1.wav", "good2.wav", "stereo44k.wav"]
    reasons = dict(zip(store.failures["id"], store.failures["reason"]))
    assert sorted(reasons) == ["corrupt.wav", "empty.wav", "folder.wav", "missing.wav", "nan.wav", "outside.wav",
                               "silent.wav"]
    assert f"symlink to {workdir / 'outside.wav'}, outside the corpus; not followed (pass --allow-outside-links" \
        in reasons["outside.wav"]
    assert "Audios/folder.wav is a folder, not an audio file" in reasons["folder.wav"]
    assert "extract: failed: outside.wav [read]" in result.output
    assert "unreadable or corrupt" in reasons["corrupt.wav"]
    assert "empty audio" in reasons["empty.wav"]
    assert "all-silent" in reasons["silent.wav"]
    assert "NaN/Inf" in reasons["nan.wav"]
    assert "not found" in reasons["missing.wav"]
    warnings = dict(zip(store.warnings["id"], store.warnings["reason"]))
    assert sorted(warnings) == ["badtext.wav", "good1.wav"]
    assert "not UTF-8" in warnings["badtext.wav"] and "duplicate FileName (first on line 2)" in warnings["good1.wav"]
    assert "extract: warning: badtext.wav [read]" in result.output
    assert "extract: failed: corrupt.wav [audio]" in result.output and "extract: failed: badtext" not in result.output
    table = store.utterances
    assert table.loc["badtext.wav", "transcript_source"] == "asr"        # kept, transcribed by Whisper instead
    assert table.loc["stereo44k.wav", "duration"] == pytest.approx(table.loc["good1.wav", "duration"], abs=1e-3)
    # Rerunning reports the same outcome without recomputing anything.
    again = CliRunner().invoke(app, command)
    assert again.exit_code == 1
    assert "written 4, failed 7 of 11 planned (8 from earlier runs); 2 warnings" in again.output
    assert "shards 0/" in again.output


def test_usage_errors_exit_2(workdir, manifest, config_path):
    runner = CliRunner()
    bad_split = runner.invoke(app, ["extract", str(manifest), "--config", str(config_path), "--store",
                                    str(workdir / "x"), "--splits", "Train,Dev"])
    assert bad_split.exit_code == 2 and "unknown split" in bad_split.output
    missing = runner.invoke(app, ["extract", str(workdir / "nope"), "--config", str(config_path), "--store",
                                  str(workdir / "x")])
    assert missing.exit_code == 2 and "no such file" in missing.output


@pytest.mark.parametrize("model, reason", [("demo/encoders/wavlm", "not a hub id"),
                                           ("nobody/no-such-model", "the hub id cannot be loaded")])
def test_a_model_neither_a_folder_nor_reachable_exits_2_naming_key_and_paths(tmp_path, monkeypatch, model, reason):
    """From another folder, a relative `model:` is looked for beside the config, then in the current folder; when it
    is neither (and no hub id this offline machine has cached), exit 2 before any work, with key, paths and hint."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    raw = yaml.safe_load(Path("configs/demo.yaml").read_text())
    raw["extract"]["encoders"][1]["model"] = model
    (tmp_path / "configs").mkdir()
    config = tmp_path / "configs" / "c.yaml"
    config.write_text(yaml.safe_dump(raw))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = CliRunner().invoke(app, ["extract", "m.csv", "--config", str(config), "--store", "s"])
    assert result.exit_code == 2, result.output
    assert f"extract.encoders[0].model: 'demo/encoders/wavlm'" in result.output       # the first bad one, by key
    if model != "demo/encoders/wavlm":
        raw["extract"]["encoders"][0]["model"] = "../enc"                            # beside the config: found
        (tmp_path / "enc").mkdir()
        config.write_text(yaml.safe_dump(raw))
        result = CliRunner().invoke(app, ["extract", "m.csv", "--config", str(config), "--store", "s"])
        assert result.exit_code == 2 and f"extract.encoders[1].model: {model!r}" in result.output
        assert load_config(config).extract.encoders[0].model == str(tmp_path / "enc")
    tried = f"tried {tmp_path}/configs/{model}, {elsewhere}/{model}"
    assert tried in result.output and reason in result.output and "HF_HUB_OFFLINE" in result.output
    assert not (elsewhere / "s").exists()


def test_augmented_copies_are_recorded_and_seeded(workdir, manifest, config_path):
    cfg = load_config(config_path).extract
    utts = read_corpus(manifest).utterances
    utts = [u for u in utts if u.split == "Train"][:2] + [u for u in utts if u.split == "Development"][:1]
    runs = []
    for name in ("aug_a", "aug_b"):
        url = str(workdir / name)
        summary = extract(utts, cfg, url, workers=0, augment=2, splits=["Train"], progress=False)
        assert summary.ok and summary.written == 3 * 2 and summary.planned == 6        # Development left out
        runs.append(open_store(url))
    a, b = runs
    table = a.utterances
    copies = table[table["source_id"].notna()]
    assert len(copies) == 4 and set(table.loc[table["source_id"].isna(), "split"]) == {"Train"}
    for copy_id, row in copies.iterrows():
        assert copy_id == f"{row['source_id']}#{row['augmentation'].split(';')[0]}"
        assert row["augmentation"].startswith(("aug1;snr_db=", "aug2;snr_db="))
        assert row["transcript"] == table.loc[row["source_id"], "transcript"]
        assert not np.allclose(a.get(copy_id, "wavlm", np.float32), a.get(row["source_id"], "wavlm", np.float32),
                               atol=1e-2)
        np.testing.assert_array_equal(a.get(copy_id, "roberta"), a.get(row["source_id"], "roberta"))
        np.testing.assert_array_equal(a.get(copy_id, "wavlm"), b.get(copy_id, "wavlm"))   # seeded
    assert table.loc[copies.index, "augmentation"].tolist() == b.utterances.loc[copies.index, "augmentation"].tolist()


def test_an_unreadable_train_utterance_fails_with_its_augmented_copies(workdir, manifest, config_path):
    good = next(u for u in read_corpus(manifest).utterances if u.split == "Train")
    corrupt = workdir / "corrupt_train.wav"
    corrupt.write_bytes(b"RIFF\x10\x00\x00\x00WAVEfmt garbage" * 8)
    bad = replace(good, id="corrupt_train.wav", path=str(corrupt))
    summary = extract([good, bad], load_config(config_path).extract, str(workdir / "aug_fail"), workers=0,
                      augment=2, progress=False)
    assert (summary.planned, summary.written, summary.failed) == (6, 3, 3) and not summary.shards_failed, summary
    assert sorted(f[0] for f in summary.failures) == ["corrupt_train.wav", "corrupt_train.wav#aug1",
                                                      "corrupt_train.wav#aug2"]
    assert {f[1] for f in summary.failures} == {"audio"}


def test_provenance_records_the_compute_dtype_and_refuses_mixing_dtypes(workdir, manifest, config_path):
    cfg = load_config(config_path).extract
    wavlm = next(e for e in cfg.encoders if e.name == "wavlm")
    utts = [u for u in read_corpus(manifest).utterances if u.transcript][:2]
    url = str(workdir / "bf16")
    bf16 = replace(cfg, encoders=[replace(wavlm, compute_dtype="bfloat16")])
    assert extract(utts, bf16, url, workers=0, progress=False).ok
    info = open_store(url).encoders["wavlm"]
    assert info.compute_dtype == "bfloat16" and info.config["compute_dtype"] == "bfloat16"
    with pytest.raises(StoreError, match=r"'wavlm' is already registered with different provenance "
                                         r"\(fields \['compute_dtype', 'config'\] differ\)"):
        extract(utts, replace(cfg, encoders=[wavlm]), url, workers=0, progress=False)     # float32 on this CPU


def test_stores_written_before_compute_dtype_read_as_float32_and_resume(tmp_path):
    """Provenance without compute_dtype (older mtser) reads as float32, and the same encoder registers again."""
    from mtser.featurestore.store import EncoderInfo, create_store, register_encoder
    from store_helpers import encoder_info

    url = str(tmp_path / "old.zarr")
    create_store(url)
    old = encoder_info("wavlm").to_dict()
    del old["compute_dtype"]
    register_encoder(url, EncoderInfo.from_dict(old))
    assert open_store(url).encoders["wavlm"].compute_dtype == "float32"
    now = replace(encoder_info("wavlm"), config={**old["config"], "compute_dtype": "float32"})
    register_encoder(url, now)                                           # a new config key is no conflict
    with pytest.raises(StoreError, match=r"fields \['compute_dtype'\] differ"):
        register_encoder(url, replace(now, compute_dtype="bfloat16", config={**now.config}))


def test_extract_refuses_an_encoder_with_pickled_weights_only(workdir, manifest, config_path, pickled_roberta,
                                                              tmp_path):
    pickled = pickled_roberta
    raw = yaml.safe_load(config_path.read_text())
    next(e for e in raw["extract"]["encoders"] if e["name"] == "roberta")["model"] = str(pickled)
    config = tmp_path / "pickled.yaml"
    config.write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(app, ["extract", str(manifest), "--config", str(config), "--store",
                                      str(tmp_path / "s.zarr"), "--workers", "0", "--no-progress"])
    assert result.exit_code == 2 and "MTSER_ALLOW_PICKLE_WEIGHTS=1" in result.output, result.output
    assert "'roberta'" in result.output and "no safetensors weights" in result.output
    assert open_store(str(tmp_path / "s.zarr")).ids() == []              # no utterance was encoded


def test_workers_that_cannot_start_stop_the_run_exit_1_naming_the_cause(manifest, config_path, pickled_roberta,
                                                                        tmp_path):
    """A worker whose constructor raises is not restarted by Ray: it leaves the pool, and with none left the run
    stops (exit 1) naming what the constructor raised; nothing is encoded."""
    raw = yaml.safe_load(config_path.read_text())
    raw["extract"]["encoders"] = [dict(next(e for e in raw["extract"]["encoders"] if e["name"] == "roberta"),
                                       model=str(pickled_roberta))]
    raw["model"]["encoders"] = ["roberta"]
    config = tmp_path / "pickled.yaml"
    config.write_text(yaml.safe_dump(raw))
    url = str(tmp_path / "s.zarr")
    result = CliRunner().invoke(app, ["extract", str(manifest), "--config", str(config), "--store", url,
                                      "--workers", "1", "--no-progress"])
    assert result.exit_code == 1, result.output
    assert "extract: worker 0 could not be started or brought back; it leaves the pool" in result.output
    assert "error: no worker left to run " in result.output and "could not start or bring them back" in result.output
    assert "'roberta'" in result.output and "no safetensors weights" in result.output
    assert open_store(url).ids() == []
