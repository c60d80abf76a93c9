"""Emotion over time in long recordings: how well does `mtser predict --timeline` segment, how fast is it against the
loop a user would write, is its memory flat in file length, and does segmentation cost accuracy?

    .venv/bin/python bench/timeline.py [--quick] [--ensemble DIR] [--corpus DIR] [--workdir DIR] [--threads N]

Long recordings are built from demo-corpus utterances (`mtser.demo.make_long_recording`: sorted utterances cycled,
pauses of 0.2-2 s, white background noise at 20 dB SNR, known boundaries). Measured:
  segmentation   Silero VAD over a `--segment-minutes` recording (default 30, quick 3) and the timeline's segment
                 plan (featurestore.vad, default TimelineConfig; no encoders): `segment_recall` = share of true
                 utterances that one segment overlaps by >= 50 % of the utterance; `segment_boundary_error_s` =
                 median |start - true start| and |end - true end| over segments matched one to one (a segment that
                 overlaps one utterance only, which overlaps no other segment; `segments_one_to_one` = their share
                 of the utterances: segments that join utterances across pauses < max_pause_s are not matched).
  speed          on a `--encode-minutes` recording (default 5, quick 0.75): `Timeline.run_file` (what
                 `mtser predict --timeline` runs per file: streamed decoding twice, VAD, plan, the extraction
                 pipeline's encoders in batches, the ensemble) against a naive loop a user writes: the whole file
                 decoded with soundfile, Silero's `get_speech_timestamps`, then each speech segment through the
                 transformers encoders one at a time as their docs show (bench/extract.py's NaiveEncoders, loaded
                 from the ensemble's recorded encoder paths; Whisper's generate() runs the encoder again) and the
                 ensemble's member models one by one. Models loaded once for both, same torch threads,
                 alternated, median of `--rounds` (default 3, quick 2): `timeline_vs_naive` = audio s/s of the
                 timeline / audio s/s of the naive loop (wall clock; `timeline_vs_naive_cpu`: the same from the
                 process's CPU seconds, steadier when other jobs share the machine).
                 `predict_timeline_audio_s_per_s`: one whole `predict_timeline` call on the same file (models
                 loaded, tables, HTML page and PNG included).
  accuracy       on the same recording: `class_agreement` = share of the timeline's segments whose class equals
                 the class of the utterance they overlap most (labelled A..N utterances only); `class_agreement_
                 alone` = the same share when each of those utterances is predicted alone (`predict_files` on its
                 file, no noise); `class_same_as_alone` = share of segments with the class their utterance gets
                 alone; `class_agreement_naive` = `class_agreement` of the naive loop's segments (Silero's own,
                 not merged or split). With random-init demo encoders the absolute accuracy is low: the comparison is the point.
  memory         (full run only) peak RSS of `Timeline.run_file` on `--rss-minutes` files (default 10 and 60),
                 each in a fresh process: VmHWM after the file (`peak_rss_mb`), its increase over the RSS with the
                 models loaded (VmHWM reset through /proc/self/clear_refs just before the file), and both per
                 audio hour of the file (flat memory: the same peak for every length, so the per-hour values
                 fall with length).
Without --ensemble the bench builds one cheaply and caches it under the work folder (default
/tmp/mtser-bench-timeline): demo encoders, a 60-utterance demo corpus (the recordings' source), in-process
extraction of 24 of its utterances with transcripts, one 3-epoch stage-1 training, and a manifest with that
checkpoint as the only member of every task (its time is `prepare_seconds` in the report).
`--quick` finishes within 60 s with the build on an idle machine. Recordings are cached there too.
The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH.parent), str(BENCH)]

from extract import NaiveEncoders  # noqa: E402  (bench/extract.py: the encoders as the transformers docs show)
from timing import alternated  # noqa: E402

from mtser.featurestore.config import TimelineConfig  # noqa: E402
from mtser.featurestore.labels import ATTRIBUTES, CLASSES  # noqa: E402
from mtser.featurestore.vad import VAD_RATE  # noqa: E402

DEMO = BENCH.parent / "configs" / "demo.yaml"
CORPUS_SIZE = 60
ENSEMBLE_TRAIN = 16                  # Train utterances the bench's own ensemble learns from (and 8 Development)
TRAIN = {"train.epochs": 3, "train.samples_per_epoch": 128, "train.batch_size": 16}
ASR_TOKENS = 128                     # what `mtser predict` gives Whisper (Timeline's and encode_utterances' default)

CHILD = r"""
import json, sys, time
import torch
from mtser.featurestore.config import TimelineConfig
from mtser.trainer.predict import EnsembleScorer
from mtser.trainer.timeline import Timeline

ensemble, path, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.set_num_threads(threads)
timeline = Timeline(EnsembleScorer(ensemble), TimelineConfig())

def status_mb(field):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith(field + ":")) / 1024

with open("/proc/self/clear_refs", "w") as f:          # resets VmHWM (peak RSS) to the current RSS
    f.write("5")
before = status_mb("VmRSS")
start = time.perf_counter()
result = timeline.run_file(path)
print(json.dumps({"rss_with_models_mb": before, "peak_rss_mb": status_mb("VmHWM"), "status": result.status,
                  "segments": len(result.segments), "seconds": time.perf_counter() - start}))
"""


# ------------------------------------------------------------------------------------------------- inputs (cached)
def demo_corpus(work: Path) -> Path:
    from mtser.demo import make_demo_corpus

    corpus = work / f"corpus{CORPUS_SIZE}"
    if not (corpus / "Labels" / "labels_consensus.csv").is_file():   # written last, renamed into place
        make_demo_corpus(corpus, size=CORPUS_SIZE, seed=0, overwrite=True, workers=2)
    return corpus


def build_ensemble(work: Path, corpus: Path) -> tuple[Path, bool]:
    """(ensemble folder, whether it was built now): demo encoders, in-process extraction of a few of `corpus`'s
    utterances with a transcript, one short stage-1 training, and a manifest with that checkpoint as the only
    member of every task. The store's Whisper keeps `asr: true`, so predictions transcribe as in the demo."""
    from mtser.trainer.ensemble import MANIFEST, TASKS, task_metric

    out = work / "ensemble"
    if (out / MANIFEST).is_file():
        return out, False
    from mtser.demo_encoders import make_test_encoders
    from mtser.featurestore.corpus import read_corpus
    from mtser.featurestore.extract import extract
    from mtser.trainer.config import load_config
    from mtser.trainer.loop import train

    for stale in ("encoders", "store", "train"):
        shutil.rmtree(work / stale, ignore_errors=True)
    encoders = make_test_encoders(work / "encoders")
    cfg = load_config(DEMO, TRAIN)
    cfg = replace(cfg, extract=replace(cfg.extract, encoders=[replace(e, model=str(encoders[e.name]))
                                                              for e in cfg.extract.encoders]))
    utts = [u for u in read_corpus(corpus).utterances if u.transcript]        # no ASR: the build stays short
    utts = [u for u in utts if u.split == "Train"][:ENSEMBLE_TRAIN] + [u for u in utts if u.split == "Development"][:8]
    summary = extract(utts, cfg.extract, str(work / "store"), workers=0, progress=False)
    assert summary.ok, summary.line()
    result = train(cfg, str(work / "store"), work / "train")
    member = {"trial": "bench", "stage": 1, "checkpoint": str(result.best_checkpoint)}
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).write_text(json.dumps({"members": {t: [{**member, "metric": task_metric(t)}] for t in TASKS}}))
    return out, True


def recording(work: Path, corpus: Path, minutes: float, seed: int = 0) -> tuple[Path, pd.DataFrame]:
    """A cached long recording of `corpus`'s utterances (pauses 0.2-2 s, 20 dB SNR) and its truth table."""
    from mtser.demo import make_long_recording

    key = f"{corpus.name}-{hashlib.sha256(str(corpus.resolve()).encode()).hexdigest()[:8]}"
    path = work / f"recording-{key}-{minutes:g}min-seed{seed}.wav"
    truth = path.with_suffix(".csv")
    if not truth.is_file():                                     # written after the audio is complete
        make_long_recording(corpus, path, utterances=1, pause_s=(0.2, 2.0), snr_db=20.0, repeat_to_s=minutes * 60,
                            seed=seed).to_csv(truth, index=False)
    return path, pd.read_csv(truth)


# ---------------------------------------------------------------------------------------------------- segmentation
def overlaps(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Seconds of overlap between every (start, end) row of `a` and every row of `b`: (len(a), len(b))."""
    return np.clip(np.minimum(a[:, None, 1], b[None, :, 1]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)


def plan_spans(path: Path, cfg: TimelineConfig) -> np.ndarray:
    """The timeline's segments of a recording, (K, 2) seconds: what `Timeline.plan` does, without the encoders."""
    from mtser.featurestore.audio import stream_audio
    from mtser.featurestore.vad import load_vad, plan_segments, speech_activity

    activity = speech_activity(stream_audio(str(path), VAD_RATE, cfg.block_s), load_vad())
    return np.array([(s.start, s.end) for s in plan_segments(activity, cfg)], float).reshape(-1, 2) / VAD_RATE


def segmentation_metrics(spans: np.ndarray, truth: pd.DataFrame) -> dict[str, float]:
    true = truth[["start_s", "end_s"]].to_numpy(float)
    ov = overlaps(true, spans)
    touching = ov > 0
    one_to_one = touching & (touching.sum(axis=0) == 1)[None, :] & (touching.sum(axis=1) == 1)[:, None]
    i, j = np.nonzero(one_to_one)
    errors = np.abs(spans[j] - true[i])                         # (pairs, 2): start and end errors
    return {
        "segment_boundary_error_s": round(float(np.median(errors)), 4) if len(i) else None,
        "segment_boundary_error_p90_s": round(float(np.percentile(errors, 90)), 4) if len(i) else None,
        "segment_start_error_median_s": round(float(np.median(errors[:, 0])), 4) if len(i) else None,
        "segment_end_error_median_s": round(float(np.median(errors[:, 1])), 4) if len(i) else None,
        "segment_recall": round(float(np.mean(ov.max(axis=1, initial=0) >= 0.5 * (true[:, 1] - true[:, 0]))), 4),
        "segments_one_to_one": round(len(i) / len(true), 4),
        "segments": len(spans), "utterances": len(true),
    }


# ----------------------------------------------------------------------------------------------- the naive loop
class NaiveTimeline:
    """The loop a user writes from Silero's and transformers' docs: the whole file decoded, Silero's speech
    timestamps, each segment through the encoders and then through the ensemble's member models one by one."""

    def __init__(self, ensemble: Path, device: str = "cpu"):
        from silero_vad import load_silero_vad

        from mtser.trainer.checkpoint import load_checkpoint
        from mtser.trainer.ensemble import load_manifest, member_key, without_external
        from mtser.trainer.predict import encoder_configs

        self.members = without_external(load_manifest(ensemble))
        self.models, metas = {}, []
        for path in dict.fromkeys(member_key(m) for ms in self.members.values() for m in ms):
            self.models[path], _, meta = load_checkpoint(path, device=device)
            metas.append(meta)
        self.device = device
        configs = encoder_configs(metas)
        self.names = {c.kind: c.name for c in configs}             # the encoders' names in the models' inputs
        if sorted(self.names) != ["speech", "text", "whisper"] or len(configs) != 3:
            raise SystemExit(f"{ensemble}: the naive loop knows one speech, one whisper and one text encoder; "
                             f"the ensemble has {[(c.name, c.kind) for c in configs]}")
        paths = {c.kind: Path(c.model) for c in configs}
        self.encoders = NaiveEncoders(paths["speech"], paths["whisper"], paths["text"], ASR_TOKENS, device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)            # torch.jit.load's deprecation notice
            self.vad = load_silero_vad()

    def run(self, path: Path) -> pd.DataFrame:
        import soundfile
        import torch
        from silero_vad import get_speech_timestamps

        from mtser.trainer.ensemble import member_key
        from mtser.trainer.infer import predict_features

        wave, rate = soundfile.read(path, dtype="float32")       # the bench's recordings are 16 kHz mono
        rows = []
        for stamp in get_speech_timestamps(torch.from_numpy(wave), self.vad, sampling_rate=rate):
            out = self.encoders.features(wave[stamp["start"]:stamp["end"]])
            features = {self.names[kind]: out[key].astype(np.float16).astype(np.float32)   # stored as float16
                        for kind, key in (("speech", "wavlm"), ("whisper", "whisper"), ("text", "roberta"))}
            preds = {p: [np.asarray(x)[0, 0] for x in predict_features(m, [features], device=self.device)]
                     for p, m in self.models.items()}
            probs = np.mean([preds[member_key(m)][0] for m in self.members["class"]], axis=0)
            row = {"start_s": stamp["start"] / rate, "end_s": stamp["end"] / rate,
                   "EmoClass": CLASSES[int(np.argmax(probs))]}
            for k, name in enumerate(ATTRIBUTES):
                row[name] = float(np.mean([preds[member_key(m)][1][k] for m in self.members[name]]))
            rows.append(row)
        return pd.DataFrame(rows, columns=["start_s", "end_s", "EmoClass", *ATTRIBUTES])


# ---------------------------------------------------------------------------------------------------- accuracy
def class_metrics(segments: pd.DataFrame, truth: pd.DataFrame, alone: dict[str, str]) -> dict[str, float]:
    """Segments matched to the labelled (A..N) utterance they overlap most: the share whose class is the
    utterance's, the same share for the utterances predicted alone, and the share equal to the alone class."""
    ov = overlaps(segments[["start_s", "end_s"]].to_numpy(float), truth[["start_s", "end_s"]].to_numpy(float))
    best = ov.argmax(axis=1)
    label = truth["EmoClass"].to_numpy(object)[best]
    keep = (ov.max(axis=1) > 0) & np.isin(label, CLASSES)
    predicted = segments["EmoClass"].to_numpy(object)[keep]
    alone_class = np.array([alone.get(u) for u in truth["utterance"].to_numpy(object)[best]], object)[keep]
    label = label[keep]
    return {"class_agreement": round(float(np.mean(predicted == label)), 4),
            "class_agreement_alone": round(float(np.mean(alone_class == label)), 4),
            "class_same_as_alone": round(float(np.mean(predicted == alone_class)), 4),
            "agreement_segments": int(keep.sum())}


def predict_alone(ensemble: Path, corpus: Path, names: list[str], device: str = "cpu") -> dict[str, str]:
    """Each utterance's class when its own file is predicted (`predict_files`)."""
    from mtser.trainer.predict import predict_files

    table = predict_files([corpus / "Audios" / n for n in names], ensemble, device=device).table
    return {Path(f).name: c for f, c in zip(table["FileName"], table["EmoClass"])}


# ------------------------------------------------------------------------------------------------------ memory
def peak_rss(ensemble: Path, path: Path, threads: int) -> dict:
    """Peak RSS of `Timeline.run_file` on `path` in a fresh process (models loaded before VmHWM is reset)."""
    env = {**os.environ, "PYTHONPATH": str(BENCH.parent), "OMP_NUM_THREADS": str(threads)}
    out = subprocess.run([sys.executable, "-c", CHILD, str(ensemble), str(path), str(threads)], check=True,
                         capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short recordings, 2 rounds, no memory runs (< 60 s)")
    parser.add_argument("--ensemble", type=Path, help="ensemble folder (default: build a tiny one, cached)")
    parser.add_argument("--corpus", type=Path, help="demo corpus the recordings are made of (default: built, cached)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/mtser-bench-timeline"))
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto (the memory runs stay on the CPU)")
    parser.add_argument("--segment-minutes", type=float, help="segmentation recording (default 30, quick 3)")
    parser.add_argument("--encode-minutes", type=float, help="speed/accuracy recording (default 5, quick 0.75)")
    parser.add_argument("--rounds", type=int, help="alternated rounds (default 3, quick 2)")
    parser.add_argument("--rss-minutes", type=float, nargs="*", help="memory runs' file lengths (default 10 60, "
                                                                      "quick none)")
    args = parser.parse_args()
    segment_minutes = args.segment_minutes or (3.0 if args.quick else 30.0)
    encode_minutes = args.encode_minutes or (0.75 if args.quick else 5.0)
    rounds = args.rounds or (2 if args.quick else 3)
    rss_minutes = args.rss_minutes if args.rss_minutes is not None else ([] if args.quick else [10.0, 60.0])

    import soundfile
    import torch
    from transformers.utils import logging as hf_logging

    from mtser.trainer.predict import EnsembleScorer
    from mtser.trainer.timeline import Timeline, predict_timeline

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    load_before = os.getloadavg()
    started = time.perf_counter()
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    corpus = args.corpus or demo_corpus(work)
    built = False
    ensemble = args.ensemble
    if ensemble is None:
        ensemble, built = build_ensemble(work, corpus)
    prepared = time.perf_counter()
    report: dict = {}

    cfg = TimelineConfig()
    path, truth = recording(work, corpus, segment_minutes)
    start = time.perf_counter()
    spans = plan_spans(path, cfg)
    report.update(segmentation_metrics(spans, truth), segment_audio_s=round(soundfile.info(path).duration, 1),
                  vad_plan_seconds=round(time.perf_counter() - start, 2))
    print(f"segmentation of {segment_minutes:g} min: {json.dumps(report)}", flush=True)

    timeline = Timeline(EnsembleScorer(ensemble, device), cfg, device)
    naive = NaiveTimeline(ensemble, device)
    warm, _ = recording(work, corpus, 0.25, seed=1)
    timeline.run_file(str(warm))                                 # first calls (allocators, oneDNN) out of the timing
    naive.run(warm)
    path, truth = recording(work, corpus, encode_minutes, seed=2)
    audio_s = soundfile.info(path).duration
    outputs: dict = {}
    cpu: dict[str, list[float]] = {"timeline": [], "naive": []}

    def timed(name: str, call) -> Callable[[], None]:
        def run() -> None:
            start = time.process_time()
            outputs[name] = call()
            cpu[name].append(time.process_time() - start)
        return run

    t_timeline, t_naive = alternated([timed("timeline", lambda: timeline.run_file(str(path))),
                                      timed("naive", lambda: naive.run(path))], rounds)
    segments = outputs["timeline"].segments
    report.update(timeline_vs_naive=round(t_naive / t_timeline, 3),
                  timeline_vs_naive_cpu=round(statistics.median(cpu["naive"]) / statistics.median(cpu["timeline"]), 3),
                  timeline_audio_s_per_s=round(audio_s / t_timeline, 2),
                  naive_audio_s_per_s=round(audio_s / t_naive, 2), encode_audio_s=round(audio_s, 1),
                  timeline_segments=len(segments), naive_segments=len(outputs["naive"]))
    print(f"speed on {encode_minutes:g} min: timeline {t_timeline:.1f} s, naive {t_naive:.1f} s", flush=True)

    alone = predict_alone(ensemble, corpus, sorted(set(truth["utterance"])), device)
    report.update(class_metrics(segments, truth, alone))
    report["class_agreement_naive"] = class_metrics(outputs["naive"], truth, alone)["class_agreement"]

    out = work / "predict-timeline"
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    predict_timeline([path], ensemble, out, cfg, device=device, progress=False)
    report["predict_timeline_audio_s_per_s"] = round(audio_s / (time.perf_counter() - start), 2)

    memory = {}
    for minutes in rss_minutes:
        rss_path, _ = recording(work, corpus, minutes, seed=3)
        m = peak_rss(ensemble, rss_path, args.threads)
        hours = soundfile.info(rss_path).duration / 3600
        memory[f"{minutes:g}min"] = {"peak_rss_mb": round(m["peak_rss_mb"], 1),
                                     "increase_mb": round(m["peak_rss_mb"] - m["rss_with_models_mb"], 1),
                                     "peak_rss_mb_per_audio_hour": round(m["peak_rss_mb"] / hours, 1),
                                     "increase_mb_per_audio_hour": round(
                                         (m["peak_rss_mb"] - m["rss_with_models_mb"]) / hours, 1),
                                     "segments": m["segments"], "seconds": round(m["seconds"], 1)}
        print(f"memory, {minutes:g} min: {json.dumps(memory[f'{minutes:g}min'])}", flush=True)
    report.update(memory=memory, device=device, threads=args.threads, rounds=rounds, quick=args.quick,
                  ensemble=str(ensemble), ensemble_built_now=built, prepare_seconds=round(prepared - started, 1),
                  total_seconds=round(time.perf_counter() - started, 1),
                  load_average_before=round(load_before[0], 2), load_average_after=round(os.getloadavg()[0], 2))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
