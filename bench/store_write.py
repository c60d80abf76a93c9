"""Does a store writer's memory stay bounded by a batch, not by its part? Peak RSS of writing one part.
Do concurrent writers keep their commit rate? Parts committed per second by 1 and by 3 writer processes.

    .venv/bin/python bench/store_write.py [--quick] [--minutes 60] [--before REV] [--workdir /tmp] [--writers-only]

One part of paper-size features is written through StoreWriter: `--minutes` of audio (default one hour) as 5 s
utterances at 50 frames/s, each with a 1024-d (WavLM-large) and a 1280-d (Whisper-large) float16 encoder, raw.
Each writer runs in a fresh process that holds one batch of features (`--batch-seconds`, the paper config's 120 s)
and adds utterances from it; reported is its peak RSS (VmHWM, reset through /proc/self/clear_refs just before the
first add) minus its RSS then, in MB and
as a multiple of one batch's bytes (goal: <= 2). The same measurement runs on the mtser of `--before` (a git
revision, extracted with `git archive`; default: the writer before streaming) and on this checkout, alternating over
the rounds (median). Then `concurrent_writers` (keys `cw_*`): 1 and 3 writer processes, started together, each
claim and commit their own parts into one store (rounds alternated, median), then 3 writers race over one plan of
part ids; every store is verified and must hold each part exactly once. The last line is one JSON object.

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


WRITERS_CHILD = r"""
import json, os, sys, time
import numpy as np
from mtser.featurestore.corpus import Utterance
from mtser.featurestore.store import PartClaimed, PartCommitted, StoreWriter

url, name, parts, utts, go = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
frames = np.random.default_rng(0).standard_normal((100, 256), dtype=np.float32).astype(np.float16)
open(f"{go}.{name}", "w").close()                         # ready: imports done
while not os.path.exists(go):
    time.sleep(0.001)
start, cpu, committed, claiming = time.perf_counter(), time.process_time(), 0, 0.0
for part in parts:
    tick = time.perf_counter()
    try:
        writer = StoreWriter(url, part)                      # claims the part
    except (PartClaimed, PartCommitted):                     # the same plan as another writer: its part
        continue
    finally:
        claiming += time.perf_counter() - tick
    for i in range(utts):
        writer.add(Utterance(id=f"{part}-u{i:03d}.wav", path=None, split="Train"), {"enc": frames})
    writer.commit()
    committed += 1
print(json.dumps({"seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu,
                  "claim_seconds": claiming, "committed": committed}))
"""


def concurrent_writers(workdir: str | None, quick: bool, rounds: int) -> dict:
    """Commit throughput of 1 and of 3 concurrent writer processes into one local store (parts of `utts`
    utterances x 100 frames x 256-d float16, claimed and committed one by one), rounds alternated, median; then 3
    writers racing over one plan of part ids (each part must be committed exactly once). Every store is verified."""
    from mtser.featurestore.store import EncoderInfo, create_store, open_store, register_encoder
    from mtser.featurestore.verify import verify_store

    n_parts, utts = (8, 20) if quick else (60, 20)
    work = Path(tempfile.mkdtemp(prefix="mtser-writers-", dir=workdir))

    def run(writers: int, same_plan: bool) -> list[dict]:
        url = str(work / "concurrent.zarr")
        shutil.rmtree(url, ignore_errors=True)
        create_store(url)
        register_encoder(url, EncoderInfo(name="enc", kind="speech", model="enc", revision=None, content_hash=None,
                                          layer=-1, mean_last_k=1, dim=256, frame_rate=50.0, dtype="float16",
                                          compression="none", sample_rate=16000, mtser_version="bench", config={}))
        go = str(work / f"go-{writers}-{same_plan}")
        plans = [[f"p{j:04d}" if same_plan else f"w{w}-p{j:04d}" for j in range(n_parts)] for w in range(writers)]
        procs = [subprocess.Popen([sys.executable, "-c", WRITERS_CHILD, url, str(w), json.dumps(plan), str(utts), go],
                                  stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
                 for w, plan in enumerate(plans)]
        while not all(os.path.exists(f"{go}.{w}") for w in range(writers)):
            if any(p.poll() not in (None, 0) for p in procs):
                raise RuntimeError("a writer process failed")
        Path(go).touch()
        results = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
        report = verify_store(url)
        committed = len(open_store(url).committed_parts())
        expected = n_parts if same_plan else n_parts * writers
        if not report.ok or committed != expected or sum(r["committed"] for r in results) != expected:
            raise RuntimeError(f"store corrupt after {writers} writers: {committed} parts of {expected}, "
                               f"{report.problems[:3]}")
        shutil.rmtree(url, ignore_errors=True)
        for w in range(writers):
            os.remove(f"{go}.{w}")
        os.remove(go)
        return results

    solo, trio = [], []
    try:
        for _ in range(rounds):
            solo += run(1, False)
            trio.append(run(3, False))
        race = run(3, True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    solo_rate = statistics.median(n_parts / r["seconds"] for r in solo)
    per_writer = statistics.median(statistics.mean(n_parts / r["seconds"] for r in t) for t in trio)
    aggregate = statistics.median(sum(n_parts / r["seconds"] for r in t) for t in trio)
    cpu_ms = [1e3 * statistics.median(r["cpu_seconds"] / n_parts for r in runs) for runs in (solo, sum(trio, []))]
    claim_ms = [1e3 * statistics.median(r["claim_seconds"] / n_parts for r in runs) for runs in (solo, sum(trio, []))]
    print(f"commits: 1 writer {solo_rate:.1f} parts/s; 3 writers {per_writer:.1f} parts/s each "
          f"({per_writer / solo_rate:.2f} x, aggregate {aggregate:.1f} parts/s); "
          f"CPU per part {cpu_ms[0]:.0f} ms alone, {cpu_ms[1]:.0f} ms with 3 writers, of which claiming {claim_ms[0]:.1f} / {claim_ms[1]:.1f} ms (wall); "
          f"3 writers racing over one plan of {n_parts} parts committed {sum(r['committed'] for r in race)}; "
          f"every store verified")
    return {"cw_parts_per_writer": n_parts, "cw_utterances_per_part": utts, "cw_rounds": rounds,
            "cw_solo_parts_per_s": round(solo_rate, 2), "cw_trio_parts_per_s_per_writer": round(per_writer, 2),
            "cw_trio_vs_solo": round(per_writer / solo_rate, 2), "cw_trio_aggregate_parts_per_s": round(aggregate, 2),
            "cw_solo_cpu_ms_per_part": round(cpu_ms[0], 1), "cw_trio_cpu_ms_per_part": round(cpu_ms[1], 1),
            "cw_solo_claim_ms_per_part": round(claim_ms[0], 2), "cw_trio_claim_ms_per_part": round(claim_ms[1], 2),
            "cw_race_committed": sum(r["committed"] for r in race), "cw_verified": True, "cw_cpus": os.cpu_count(),
            "cw_load_1min": round(os.getloadavg()[0], 1)}


def measure(code_root: Path, workdir: Path, minutes: float, batch_seconds: float) -> dict:
    url = workdir / "store.zarr"
    shutil.rmtree(url, ignore_errors=True)
    out = subprocess.run([sys.executable, "-c", CHILD, str(url), str(minutes), str(batch_seconds)], check=True, cwd=workdir,
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(code_root)})
    shutil.rmtree(url, ignore_errors=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


LONG_CHILD = r"""
import json, sys, time
from mtser.featurestore.corpus import read_corpus
from mtser.featurestore.extract import extract
from mtser.trainer.config import load_config

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

    from mtser.demo_encoders import make_test_encoders

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
    parser.add_argument("--writers-only", action="store_true", help="only the concurrent-writers measurement")
    args = parser.parse_args()
    minutes, rounds = (6.0, 1) if args.quick else (args.minutes, args.rounds)
    if args.writers_only:
        print(json.dumps(concurrent_writers(args.workdir, args.quick, rounds)))
        return
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
    result.update(concurrent_writers(args.workdir, args.quick, rounds))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
