"""`mtser predict --timeline`: VAD segmentation, the one prediction path, resumable per-file commits, bad input."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile
from typer.testing import CliRunner

from mtser.cli.main import app
from mtser.configio import ConfigError, from_dict
from mtser.featurestore.config import TimelineConfig
from mtser.featurestore.vad import VAD_RATE, VAD_WINDOW, Span, SpeechActivity, cut_segments, plan_segments
from search_support import finished_run

MTSER = str(Path(sys.executable).with_name("mtser"))
PROBS = [f"prob_{c}" for c in "ASHUFDCN"]
ATTRS = ["EmoAct", "EmoVal", "EmoDom"]


def activity(speech: list[tuple[float, float]], seconds: float, dips: list[float] = ()) -> SpeechActivity:
    """Synthetic VAD output: probability 0.95 inside the speech spans (seconds), 0.02 outside; RMS 0.1 in speech
    with a quiet dip (0.001) at each of `dips`."""
    n = int(seconds * VAD_RATE / VAD_WINDOW)
    t = (np.arange(n) + 0.5) * VAD_WINDOW / VAD_RATE
    inside = np.zeros(n, bool)
    for start, end in speech:
        inside |= (t >= start) & (t < end)
    rms = np.where(inside, 0.1, 0.001).astype(np.float32)
    for dip in dips:
        rms[np.abs(t - dip) < 0.1] = 0.001
    return SpeechActivity(np.where(inside, 0.95, 0.02).astype(np.float32), rms, n * VAD_WINDOW)


def seconds(spans: list[Span]) -> list[tuple[float, float]]:
    return [(round(s.start / VAD_RATE, 2), round(s.end / VAD_RATE, 2)) for s in spans]


# ------------------------------------------------------------------------------------------------ segmentation rules
def test_short_pauses_merge_and_long_ones_separate():
    spans = plan_segments(activity([(1, 3), (3.3, 5), (8, 11)], 14), TimelineConfig())
    assert len(spans) == 2                                # the 0.3 s pause merges, the 3 s pause separates
    (a, b), (c, d) = seconds(spans)
    assert a == pytest.approx(1, abs=0.1) and b == pytest.approx(5, abs=0.1)
    assert c == pytest.approx(8, abs=0.1) and d == pytest.approx(11, abs=0.1)


def test_long_speech_is_cut_at_the_quietest_point_within_the_limits():
    cfg = TimelineConfig(min_segment_s=2, max_segment_s=12)
    spans = plan_segments(activity([(0.5, 30.5)], 32, dips=[9.0, 19.5]), cfg)
    lengths = [(s.end - s.start) / VAD_RATE for s in spans]
    assert all(2 <= length <= 12 for length in lengths), lengths
    cuts = [s.start / VAD_RATE for s in spans[1:]]
    assert cuts[:2] == pytest.approx([9.0, 19.5], abs=0.1)         # at the dips, not at the 12 s limit
    assert spans[0].start / VAD_RATE == pytest.approx(0.5, abs=0.1)
    assert all(a.end == b.start for a, b in zip(spans, spans[1:]))  # no sample lost or repeated


def test_a_short_island_is_widened_into_the_silence_around_it_but_not_into_a_neighbour():
    spans = plan_segments(activity([(5, 5.6), (6.7, 16)], 20), TimelineConfig(min_segment_s=2, max_segment_s=12))
    first, second = spans[0], spans[1]
    assert (first.end - first.start) / VAD_RATE == pytest.approx(2.0, abs=0.05)
    assert first.end <= second.start


def test_fixed_windows_cover_the_file_on_a_grid():
    cfg = TimelineConfig(segment="fixed", window_s=4, hop_s=2)
    assert seconds(plan_segments(activity([], 11), cfg)) == [(0, 4), (2, 6), (4, 8), (6, 10), (6.98, 10.98)]
    assert seconds(plan_segments(activity([], 3), cfg)) == [(0, 2.98)]   # 3 s of 32 ms VAD windows


@pytest.mark.parametrize("settings, key", [({"min_segment_s": 0}, "timeline.min_segment_s"),
                                           ({"min_segment_s": 5, "max_segment_s": 8}, "timeline.max_segment_s"),
                                           ({"hop_s": 5, "window_s": 4}, "timeline.hop_s"),
                                           ({"max_pause_s": float("nan")}, "timeline.max_pause_s"),
                                           ({"segment": "words"}, "timeline.segment"),
                                           ({"vad_threshold": 1.5}, "timeline.vad_threshold")])
def test_bad_settings_name_the_key(settings, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        from_dict(TimelineConfig, settings, "timeline")


def test_cutting_streams_blocks_and_returns_exact_samples():
    wave = np.arange(100_000, dtype=np.float32)
    blocks = (wave[i:i + 7_000] for i in range(0, len(wave), 7_000))
    spans = [Span(10, 20_000), Span(15_000, 40_000), Span(90_000, 100_000)]
    got = dict(cut_segments(blocks, spans))
    for span in spans:
        np.testing.assert_array_equal(got[span], wave[span.start:span.end])


# ---------------------------------------------------------------------------------------------- the real VAD on speech
@pytest.fixture(scope="module")
def recording(demo_corpus_dir, tmp_path_factory):
    from mtser.demo import make_long_recording

    path = tmp_path_factory.mktemp("recording") / "episode.wav"
    truth = make_long_recording(demo_corpus_dir, path, utterances=8, seed=1)
    return path, truth


def test_vad_segments_find_every_utterance_of_a_recording(recording):
    from mtser.featurestore.audio import stream_audio
    from mtser.featurestore.vad import load_vad, speech_activity

    path, truth = recording
    spans = plan_segments(speech_activity(stream_audio(str(path), VAD_RATE, 5.0), load_vad()), TimelineConfig())
    for _, row in truth.iterrows():
        overlap = max(min(s.end / VAD_RATE, row.end_s) - max(s.start / VAD_RATE, row.start_s) for s in spans)
        assert overlap >= 0.5 * (row.end_s - row.start_s), row.utterance
    assert all(2.0 <= (s.end - s.start) / VAD_RATE <= 12.0 for s in spans)


# -------------------------------------------------------------------------------------------- one prediction path
@pytest.fixture(scope="module")
def ensemble_dir(demo_store, tmp_path_factory, ray_module):
    """The ensemble of the session's shared search (built once; this module's own copy of its manifest)."""
    run, _ = finished_run(str(demo_store), str(tmp_path_factory.getbasetemp() / "shared-search"))
    out = tmp_path_factory.mktemp("timeline-ensemble")
    result = CliRunner().invoke(app, ["ensemble", "--run", str(run), "--store", str(demo_store), "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def timeline(ensemble_dir):
    from mtser.trainer.predict import EnsembleScorer
    from mtser.trainer.timeline import Timeline

    return Timeline(EnsembleScorer(ensemble_dir), TimelineConfig())


def test_a_segment_equal_to_an_utterance_gets_that_utterances_prediction(timeline, ensemble_dir, demo_corpus_dir,
                                                                           tmp_path):
    from mtser.trainer.predict import predict_files

    names = sorted(p.name for p in (demo_corpus_dir / "Audios").glob("*test3*"))[:2]
    waves = [soundfile.read(demo_corpus_dir / "Audios" / n, dtype="float32")[0] for n in names]
    gap = np.zeros(VAD_RATE, np.float32)
    path = tmp_path / "joined.wav"
    soundfile.write(path, np.concatenate([gap, waves[0], gap, waves[1], gap]), VAD_RATE, subtype="FLOAT")
    spans = [Span(VAD_RATE, VAD_RATE + len(waves[0])),
             Span(2 * VAD_RATE + len(waves[0]), 2 * VAD_RATE + len(waves[0]) + len(waves[1]))]
    rows = timeline.score(str(path), list(timeline.cut(str(path), spans)))
    alone = predict_files([demo_corpus_dir / "Audios" / n for n in names], ensemble_dir).table
    assert rows["EmoClass"].tolist() == alone["EmoClass"].tolist()
    np.testing.assert_allclose(rows[PROBS + ATTRS].to_numpy(float), alone[PROBS + ATTRS].to_numpy(float),
                               atol=1e-5)
    assert rows["transcript"].notna().all()               # the demo's Whisper transcribes (asr: true)


def test_batching_of_segments_never_changes_a_result(timeline, recording):
    from dataclasses import replace

    path, _ = recording
    spans, _ = timeline.plan(str(path))
    whole = timeline.score(str(path), list(timeline.cut(str(path), spans)))
    timeline.cfg = replace(timeline.cfg, batch_seconds=3.0)
    try:
        small = pd.concat([timeline.score(str(path), g) for g in timeline._groups(timeline.cut(str(path), spans))])
    finally:
        timeline.cfg = TimelineConfig()
    assert small["segment"].tolist() == whole["segment"].tolist()
    np.testing.assert_allclose(small[PROBS + ATTRS].to_numpy(float), whole[PROBS + ATTRS].to_numpy(float), atol=1e-5)


# -------------------------------------------------------------------------------------------------- the command
def bad_inputs(folder: Path, demo_corpus_dir: Path) -> dict[str, str]:
    """Files a user might pass, each with the word its row must carry."""
    speech, rate = soundfile.read(sorted((demo_corpus_dir / "Audios").glob("*.wav"))[0], dtype="float32")
    files = {"broken.wav": "unreadable", "empty.wav": "empty", "dir.wav": "folder named like an audio file",
             "quiet.wav": "no speech"}
    (folder / "broken.wav").write_bytes(b"RIFF not really a wav")
    soundfile.write(folder / "empty.wav", np.zeros(0, np.float32), rate)
    (folder / "dir.wav").mkdir()
    soundfile.write(folder / "quiet.wav", 1e-4 * np.random.default_rng(0).standard_normal(3 * rate), rate)
    from scipy.signal import resample_poly

    soundfile.write(folder / "stereo48k.wav", np.stack([resample_poly(speech, 3, 1)] * 2, axis=1), 48000)
    soundfile.write(folder / "phone8k.wav", resample_poly(speech, 1, 2), 8000)
    return files


def render_in_chromium(page: Path) -> tuple[str, list[str]]:
    """The page's DOM after its scripts ran in headless Chromium, and every console message it logged."""
    import tempfile

    with tempfile.TemporaryDirectory() as profile:
        run = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                              "--no-first-run", "--disable-background-networking", "--disable-component-update",
                              "--disable-sync", f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
                              "--virtual-time-budget=10000", "--dump-dom", page.as_uri()],
                             capture_output=True, text=True, timeout=120)
    return run.stdout, [line for line in run.stderr.splitlines() if ":CONSOLE" in line]


def test_timeline_command_tables_figures_bad_input_and_resume(ensemble_dir, demo_corpus_dir, recording, tmp_path):
    path, truth = recording
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    bad = bad_inputs(inputs, demo_corpus_dir)
    out = tmp_path / "out"
    args = ["predict", str(path), str(inputs), "--timeline", "--ensemble", str(ensemble_dir), "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, result.output             # some files failed; the others have their rows
    summary = pd.read_csv(out / "summary.csv").set_index("file")
    for name, word in bad.items():
        row = summary.loc[[f for f in summary.index if f.endswith(name)][0]]
        assert word in f"{row['status']} {row['reason']}", (name, row.to_dict())
    segments = pd.read_parquet(out / "segments.parquet")
    assert list(segments.columns) == ["file", "segment", "start_s", "end_s", "EmoClass", *PROBS, *ATTRS, "transcript"]
    for name in ("stereo48k.wav", "phone8k.wav", path.name):
        assert (segments["file"].str.endswith(name)).any(), name
    episode = segments[segments["file"] == str(path)]
    assert len(episode) >= len(truth) - 2 and episode["start_s"].is_monotonic_increasing
    assert episode["segment"].iloc[0] == f"{path}#{round(episode['start_s'].iloc[0] * 1000)}-" \
                                         f"{round(episode['end_s'].iloc[0] * 1000)}"
    np.testing.assert_allclose(episode[PROBS].sum(axis=1), 1.0, atol=1e-4)
    ep = summary.loc[str(path)]
    assert ep["status"] == "ok" and 0 < ep["speech_s"] <= ep["duration_s"]
    assert sum(ep[f"share_{c}"] for c in "ASHUFDCN") == pytest.approx(1.0)
    assert len(list((out / "png").glob("*.png"))) == 3   # one per file with segments
    dom, console = render_in_chromium(out / "timeline.html")
    assert console == [] and dom.count('class="main-svg"') >= 3 * 2, console   # plotly drew every figure

    again = CliRunner().invoke(app, args)                      # everything committed: nothing is recomputed
    assert "finished earlier" in again.output
    pd.testing.assert_frame_equal(pd.read_parquet(out / "segments.parquet"), segments)

    other = CliRunner().invoke(app, [*args, "--max-segment", "10"])
    assert other.exit_code == 2 and "timeline" in other.output and "another --out" in other.output


@pytest.fixture(scope="module")
def parts(recording, tmp_path_factory) -> list[Path]:
    """Three short files cut from the recording (two utterances each)."""
    path, truth = recording
    wave, rate = soundfile.read(path, dtype="float32")
    folder = tmp_path_factory.mktemp("parts")
    files = []
    for k in range(3):
        files.append(folder / f"part{k}.wav")
        start, end = truth.start_s.iloc[k] - 0.3, truth.end_s.iloc[k + 1] + 0.3
        soundfile.write(files[-1], wave[int(start * rate):int(end * rate)], rate)
    return files


@pytest.fixture(scope="module")
def parts_table(ensemble_dir, parts, tmp_path_factory) -> pd.DataFrame:
    """The segments of `parts` from an uninterrupted run in this process."""
    out = tmp_path_factory.mktemp("parts-fresh")
    fresh = CliRunner().invoke(app, ["predict", *map(str, parts), "--timeline", "--ensemble", str(ensemble_dir),
                                     "--out", str(out)])
    assert fresh.exit_code == 0, fresh.output
    return pd.read_parquet(out / "segments.parquet")


def test_a_killed_timeline_resumes_and_equals_an_uninterrupted_run(ensemble_dir, parts, parts_table, tmp_path):
    files = parts                                            # three files: the kill lands after the first commit
    out = tmp_path / "killed"
    cmd = [MTSER, "predict", *map(str, files), "--timeline", "--ensemble", str(ensemble_dir), "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not list((out / "files").glob("*.json")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    committed = len(list((out / "files").glob("*.json")))
    assert 1 <= committed < 3
    resumed = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"({committed} finished earlier)" in resumed.stdout
    pd.testing.assert_frame_equal(pd.read_parquet(out / "segments.parquet"), parts_table)


def test_whole_file_predict_on_a_long_file_mentions_the_timeline(ensemble_dir, recording):
    path, _ = recording
    result = CliRunner().invoke(app, ["predict", str(path), "--ensemble", str(ensemble_dir)])
    assert result.exit_code == 0, result.output
    assert "--timeline" in result.output and path.name in result.output


def test_streaming_a_two_hour_file_holds_a_block_not_the_file(tmp_path):
    """A 2-hour 8 kHz file: decoding, resampling and cutting segments out of it in a fresh process keeps the peak
    RSS within 150 MB of the process's baseline (the whole file at 16 kHz would be 460 MB of float32)."""
    path = tmp_path / "two_hours.wav"
    rng = np.random.default_rng(0)
    with soundfile.SoundFile(path, "w", 8000, 1, "PCM_16") as f:
        for _ in range(120):
            f.write((0.1 * rng.standard_normal(8000 * 60)).astype(np.float32))
    code = f"""
import resource, numpy as np
from mtser.featurestore.audio import stream_audio
from mtser.featurestore.vad import Span, cut_segments
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
spans = [Span(s, s + 16000 * 10) for s in range(0, 16000 * 7190, 16000 * 600)]
total = sum(len(w) for _, w in cut_segments(stream_audio({str(path)!r}, 16000, 30.0), spans))
assert total == len(spans) * 160000, total
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert float(out.stdout.strip()) < 150, out.stdout


# ------------------------------------------------------------------------------------- workers, URLs, feature store
def same_predictions(table: pd.DataFrame, expected: pd.DataFrame) -> None:
    """Equal rows, predictions within float tolerance (actors run other thread counts than this process)."""
    assert table[["file", "segment", "start_s", "end_s", "EmoClass"]].equals(
        expected[["file", "segment", "start_s", "end_s", "EmoClass"]])
    np.testing.assert_allclose(table[PROBS + ATTRS].to_numpy(float), expected[PROBS + ATTRS].to_numpy(float),
                               atol=1e-4)


def test_workers_commit_files_to_s3_and_write_segment_features_to_a_store(ensemble_dir, parts, parts_table, timeline,
                                                                          moto_s3, s3_bucket):
    import json

    import s3fs

    from mtser.featurestore.corpus import Utterance
    from mtser.featurestore.pipeline import Loaded
    from mtser.featurestore.store import open_store

    out, store = f"s3://{s3_bucket}/timeline", f"s3://{s3_bucket}/segments.zarr"
    fs = s3fs.S3FileSystem(**moto_s3, skip_instance_cache=True)
    inputs = f"s3://{s3_bucket}/in"                                  # the audio on S3 too (a folder URL)
    for path in parts:
        fs.put(str(path), f"{inputs}/{path.name}")
    result = CliRunner().invoke(app, ["predict", inputs, "--timeline", "--ensemble", str(ensemble_dir),
                                      "--out", out, "--store", store, "--storage-options", json.dumps(moto_s3),
                                      "--workers", "2"])            # two actors share the three files
    assert result.exit_code == 0, result.output
    assert len(fs.glob(f"{out}/files/*.json")) == 3                  # each file committed by its actor
    with fs.open(f"{out}/segments.parquet") as f:
        table = pd.read_parquet(f)
    expected = parts_table.copy()
    for path in parts:                                               # the same audio, named by its URL
        expected["file"] = expected["file"].replace(str(path), f"{inputs}/{path.name}")
        expected["segment"] = expected["segment"].str.replace(str(path), f"{inputs}/{path.name}", regex=False)
    same_predictions(table, expected)

    features = open_store(store, storage_options=moto_s3)
    assert sorted(features.utterances.index) == sorted(table["segment"])
    row = table.iloc[-1]
    span = Span(round(row.start_s * VAD_RATE), round(row.end_s * VAD_RATE))
    (_, wave), = timeline.cut(str(parts[-1]), [span])                # the local copy of the last file
    utt = Utterance(id=row.segment, path=row.file, duration=len(wave) / VAD_RATE)
    (_, expected), = timeline.pipeline.encode(Loaded([utt], [wave], [0], {})).written
    assert set(features.encoders) == set(expected)
    for name, frames in expected.items():                          # float16 in both: one rounding step apart at most
        np.testing.assert_allclose(features.get(row.segment, name, dtype=np.float32), frames.decode(np.float32),
                                   rtol=2e-3, atol=2e-3)
    listed = CliRunner().invoke(app, ["features", "ls", store, "--storage-options", json.dumps(moto_s3)])
    assert listed.exit_code == 0 and f"3 committed parts, {len(table)} utterances" in listed.output, listed.output

    # a run killed after a file's store part was committed, before the file was, redoes the file: its part stays
    from mtser.featurestore.files import CorpusFiles

    second = f"{inputs}/{parts[1].name}"
    timeline.store, timeline.storage_options, timeline.files = store, moto_s3, CorpusFiles(moto_s3)
    try:
        again = timeline.run_file(second)
    finally:
        timeline.store, timeline.storage_options, timeline.files = None, None, CorpusFiles()
    assert again.status == "ok"
    assert again.segments["segment"].tolist() == table[table["file"] == second]["segment"].tolist()
    assert len(open_store(store, storage_options=moto_s3).utterances) == len(table)


def descendants() -> list[tuple[int, str]]:
    """(pid, command line) of this process's descendants (Ray's workers run under its raylet), from /proc."""
    parent, title = {}, {}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            parent[int(proc.name)] = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            title[int(proc.name)] = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError, ValueError):
            continue

    def under_me(pid: int) -> bool:
        while pid > 1:
            pid = parent.get(pid, 0)
            if pid == os.getpid():
                return True
        return False

    return [(pid, title[pid]) for pid in parent if under_me(pid)]


def test_a_killed_worker_s_file_is_run_again(ensemble_dir, parts, parts_table, tmp_path):
    """SIGKILL the actor while it runs a file: Ray restarts it and the file is run again; nothing is lost."""
    import threading

    from mtser.trainer.timeline import predict_timeline

    finished: dict = {}
    run = threading.Thread(target=lambda: finished.update(run=predict_timeline(
        list(map(str, parts)), ensemble_dir, tmp_path / "out", workers=1, progress=False, figures=False)))
    run.start()
    killed, deadline = None, time.time() + 300
    while killed is None and run.is_alive() and time.time() < deadline:
        killed = next((pid for pid, title in descendants() if "TimelineWorker.run" in title), None)
        if killed is not None:
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.1)
    run.join()
    assert killed is not None
    assert finished["run"].summary["status"].tolist() == ["ok"] * 3 and not finished["run"].failures
    same_predictions(finished["run"].segments, parts_table)


def test_timeline_options_need_the_timeline_and_address_needs_workers(ensemble_dir, parts, tmp_path):
    result = CliRunner().invoke(app, ["predict", str(parts[0]), "--ensemble", str(ensemble_dir), "--workers", "2"])
    assert result.exit_code == 2 and "--timeline" in result.output
    result = CliRunner().invoke(app, ["predict", str(parts[0]), "--timeline", "--ensemble", str(ensemble_dir),
                                      "--out", str(tmp_path), "--address", "auto"])
    assert result.exit_code == 2 and "--address" in result.output and "--workers" in result.output


def test_a_store_whose_encoders_differ_is_refused(ensemble_dir, parts, tmp_path):
    from dataclasses import replace

    from mtser.featurestore.store import EncoderInfo, create_store, register_encoder
    from mtser.trainer.predict import EnsembleScorer

    store = str(tmp_path / "other.zarr")
    create_store(store)
    name, info = next(iter(EnsembleScorer(ensemble_dir).provenance.items()))
    register_encoder(store, replace(EncoderInfo.from_dict(info), dim=info["dim"] * 2))
    result = CliRunner().invoke(app, ["predict", str(parts[0]), "--timeline", "--ensemble", str(ensemble_dir),
                                      "--out", str(tmp_path / "out"), "--store", store])
    assert result.exit_code == 2, result.output
    assert "--store" in result.output and name in result.output and "different provenance" in result.output
