"""Does a store writer's memory stay bounded by a batch, not by its part? Peak RSS of writing one part.

    .venv/bin/python bench/store_write.py [--quick] [--minutes 60] [--before REV] [--workdir /tmp]

One part of paper-size features is written through StoreWriter: `--minutes` of audio (default one hour) as 5 s
utterances at 50 frames/s, each with a 1024-d (WavLM-large) and a 1280-d (Whisper-large) float16 encoder, raw.
Each writer runs in a fresh process that holds one batch of features (`--batch-seconds`, the paper config's 120 s)
and adds utterances from it; reported is its peak RSS (VmHWM, reset through /proc/self/clear_refs just before the
first add) minus its RSS then, in MB and
as a multiple of one batch's bytes (goal: <= 2). The same measurement runs on the mtser of `--before` (a git
revision, extracted with `git archive`; default: the writer before streaming) and on this checkout, alternating over
the rounds (median). The last line is one JSON object.

Long recordings (`long_audio_memory`, keys under "long_audio"): peak RSS (VmHWM) of a fresh process running
`extract(..., workers=0)` with configs/demo.yaml and the demo encoders (`make_test_encoders`) on a folder holding one
synthetic 16 kHz mono file (a modulated tone in noise, so Whisper transcribes and RoBERTa encodes what it hears) of
10 s, 10 min and 60 min (`--quick`: 10 s and 2 min), each long file's peak as a multiple of the 10 s file's (goal:
<= 1.5). The 60 min file alone is 230 MB of float32 samples once decoded.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BEFORE = "792e9f1"                      # the last commit whose StoreWriter buffered its whole part until commit

CHILD = r"""
import json, sys
import numpy as np
from mtser.featurestore.corpus import Utterance
from mtser.featurestore.store import EncoderInfo, StoreWriter, create_store, register_encoder

url, minutes, batch_seconds = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
dims = {"wavlm": 1024, "whisper": 1280}
create_store(url)
for name, dim in dims.items():
    register_encoder(url, EncoderInfo(name=name, kind="speech", model=name, revision=None, content_hash=None, layer=-1,
                                      mean_last_k=1, dim=dim, frame_rate=50.0, dtype="float16", compression="none",
                                      sample_rate=16000, mtser_version="bench", config={}))
frames_per_utt, n_utts = 250, int(minutes * 60 / 5)
per_batch = max(1, int(batch_seconds / 5))
rng = np.random.default_rng(0)
batch = {n: np.stack([rng.standard_normal((frames_per_utt, d), dtype=np.float32).astype(np.float16)
                      for _ in range(per_batch)]) for n, d in dims.items()}
batch_bytes = sum(b.nbytes for b in batch.values())

def status_mb(field):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith(field + ":")) / 1024

writer = StoreWriter(url, "p0")
with open("/proc/self/clear_refs", "w") as f:          # resets VmHWM (peak RSS) to the current RSS
    f.write("5")
start = status_mb("VmRSS")
for i in range(n_utts):
    writer.add(Utterance(id=f"u{i:06d}.wav", path=None, split="Train"),
               {n: b[i % per_batch] for n, b in batch.items()})
writer.commit()
peak = status_mb("VmHWM")
print(json.dumps({"increase_MB": peak - start, "batch_MB": batch_bytes / 2**20,
                  "part_MB": n_utts * frames_per_utt * sum(dims.values()) * 2 / 2**20}))
"""


def measure(code_root: Path, workdir: Path, minutes: float, batch_seconds: float) -> dict:
    url = workdir / "store.zarr"
    shutil.rmtree(url, ignore_errors=True)
    out = subprocess.run([sys.executable, "-c", CHILD, str(url), str(minutes), str(batch_seconds)], check=True, cwd=workdir,
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(code_root)})
    shutil.rmtree(url, ignore_errors=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


LONG_CHILD = r"""
import json, sys, time
from mtser.config import load_config
from mtser.featurestore.corpus import read_corpus
from mtser.featurestore.extract import extract

config, corpus, store = sys.argv[1:4]

def status_mb(field):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith(field + ":")) / 1024

cfg, utts = load_config(config).extract, read_corpus(corpus).utterances
start, tick = status_mb("VmRSS"), time.perf_counter()
summary = extract(utts, cfg, store, workers=0, progress=False)
print(json.dumps({"peak_MB": status_mb("VmHWM"), "start_MB": start, "seconds": time.perf_counter() - tick,
                  "ok": summary.ok, "summary": summary.line()}))
"""


def synthetic_wav(path: Path, seconds: float, sample_rate: int = 16000) -> None:
    """A 220 Hz tone with a slow loudness swing in light noise, written a minute at a time (16-bit PCM)."""
    import numpy as np
    import soundfile

    rng = np.random.default_rng(0)
    with soundfile.SoundFile(path, "w", sample_rate, 1, "PCM_16") as out:
        for start in range(0, int(seconds * sample_rate), 60 * sample_rate):
            t = np.arange(start, min(int(seconds * sample_rate), start + 60 * sample_rate)) / sample_rate
            swing = 0.5 + 0.5 * np.sin(2 * np.pi * 0.2 * t)
            out.write(0.3 * swing * np.sin(2 * np.pi * 220 * t) + 0.01 * rng.standard_normal(len(t)))


def long_audio_memory(work: Path, quick: bool) -> dict:
    """Peak RSS of extracting one file of each length with the demo config and encoders (see the docstring)."""
    import yaml

    from mtser.demo import make_test_encoders

    encoders = work / "encoders"
    make_test_encoders(encoders, seed=0)
    raw = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    for enc in raw["extract"]["encoders"]:
        enc["model"] = str(encoders / enc["name"])
    config = work / "demo.yaml"
    config.write_text(yaml.safe_dump(raw))
    runs = {}
    for seconds in (10, 120) if quick else (10, 600, 3600):
        corpus = work / f"long-{seconds}"
        corpus.mkdir()
        synthetic_wav(corpus / f"rec{seconds}.wav", seconds)
        store = str(work / f"{seconds}.zarr")
        out = subprocess.run([sys.executable, "-c", LONG_CHILD, str(config), str(corpus), store], check=True,
                             cwd=work, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        runs[seconds] = json.loads(out.stdout.strip().splitlines()[-1])
        shutil.rmtree(corpus)
        print(f"long audio {seconds:5d} s: peak RSS {runs[seconds]['peak_MB']:7.1f} MB (RSS before extract "
              f"{runs[seconds]['start_MB']:.1f} MB), {runs[seconds]['seconds']:.1f} s; {runs[seconds]['summary']}")
    short = runs[10]["peak_MB"]
    return {"long_audio": {
        "seconds": list(runs), "peak_rss_MB": {s: round(r["peak_MB"], 1) for s, r in runs.items()},
        "rss_before_extract_MB": {s: round(r["start_MB"], 1) for s, r in runs.items()},
        "vs_10s": {s: round(r["peak_MB"] / short, 3) for s, r in runs.items()},
        "extract_seconds": {s: round(r["seconds"], 1) for s, r in runs.items()},
        "all_written": all(r["ok"] for r in runs.values())}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="6 minutes of audio, 1 round; 10 s / 2 min files (< 60 s)")
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--batch-seconds", type=float, default=120.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--before", default=BEFORE, help="git revision to compare with")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    minutes, rounds = (6.0, 1) if args.quick else (args.minutes, args.rounds)
    work = Path(tempfile.mkdtemp(prefix="mtser-write-", dir=args.workdir))
    try:
        before_root = work / "before"
        before_root.mkdir()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.before, "mtser"], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(before_root)], input=archive, check=True)
        runs: dict[str, list[dict]] = {"before": [], "after": []}
        for _ in range(rounds):
            runs["before"].append(measure(before_root, work, minutes, args.batch_seconds))
            runs["after"].append(measure(ROOT, work, minutes, args.batch_seconds))
        long_audio = long_audio_memory(work, args.quick)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    batch_mb, part_mb = runs["after"][0]["batch_MB"], runs["after"][0]["part_MB"]
    result = {"minutes": minutes, "part_MB": round(part_mb, 1), "batch_MB": round(batch_mb, 1)}
    for name, rows in runs.items():
        increase = statistics.median(r["increase_MB"] for r in rows)
        result[f"{name}_rss_increase_MB"] = round(increase, 1)
        result[f"{name}_vs_batch"] = round(increase / batch_mb, 2)
        print(f"{name:6s} peak RSS increase {increase:8.1f} MB = {increase / batch_mb:5.2f} x one batch "
              f"({batch_mb:.1f} MB); the part holds {part_mb:.1f} MB of frames")
    result.update(rounds=rounds, before=args.before, quick=args.quick, **long_audio)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
