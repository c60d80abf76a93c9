"""Feature store under real concurrency: writer processes, a SIGKILLed writer, a reader during commits."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from mtser.featurestore.store import create_store, open_store, register_encoder
from mtser.featurestore.verify import verify_store
from store_helpers import encoder_info, frames_for, write_part

TESTS = Path(__file__).parent
WRITER = """
import sys
sys.path[:0] = [{tests!r}]
from mtser.featurestore.store import create_store, register_encoder
from store_helpers import encoder_info, write_part
url, worker, n_parts, per_part, dim = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
create_store(url)                                  # every writer races to create and register: must be harmless
register_encoder(url, encoder_info("enc", dim=dim))
for j in range(n_parts):
    ids = [f"w{{worker}}-p{{j}}-u{{k:03d}}" for k in range(per_part)]
    write_part(url, f"w{{worker}}-p{{j}}", ids, ["enc"], dim=dim)
""".format(tests=str(TESTS))


def start_writer(url: str, worker: int, n_parts: int, per_part: int, dim: int = 16) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WRITER, url, str(worker), str(n_parts), str(per_part), str(dim)],
                            stderr=subprocess.PIPE, text=True)


def check_whole(store, ids: list[str], dim: int = 16) -> None:
    for utt_id in ids:
        np.testing.assert_array_equal(store.get(utt_id, "enc"), frames_for(utt_id, dim).astype(np.float16))


def test_concurrent_writer_processes_and_a_reader_that_sees_only_whole_utterances(tmp_path: Path) -> None:
    url = str(tmp_path / "store.zarr")
    writers = [start_writer(url, w, n_parts=3, per_part=20) for w in range(4)]
    while not (Path(url) / "zarr.json").exists():
        time.sleep(0.01)
    while True:                                   # wait until the store's groups and encoder exist
        try:
            store = open_store(url)
            if "enc" in store.encoders:
                break
        except Exception:
            time.sleep(0.02)
    seen_counts = set()
    while any(w.poll() is None for w in writers):
        store.refresh()
        ids = store.ids(encoder="enc")
        assert len(ids) % 20 == 0                 # whole parts only
        check_whole(store, ids)
        seen_counts.add(len(ids))
    for w in writers:
        assert w.wait() == 0, w.stderr.read()
    store.refresh()
    expected = sorted(f"w{w}-p{j}-u{k:03d}" for w in range(4) for j in range(3) for k in range(20))
    assert store.ids(encoder="enc") == expected
    assert len(store.committed_parts()) == 12
    check_whole(store, expected)
    assert len(seen_counts) >= 2                  # the reader really ran while parts were being committed


def test_writer_killed_mid_commit_leaves_no_partial_utterance_and_a_rerun_commits(tmp_path: Path) -> None:
    url = str(tmp_path / "store.zarr")
    create_store(url)
    dim = 1024
    register_encoder(url, encoder_info("enc", dim=dim))
    write_part(url, "w0-p0", ["first.wav"], ["enc"], dim=dim)
    victim = start_writer(url, 1, n_parts=1, per_part=400, dim=dim)   # ~60 MB part: commit takes a while
    part = Path(url) / "parts" / "w1-p0"
    deadline = time.monotonic() + 60
    while not (part / "features" / "enc" / "frames" / "zarr.json").exists():   # frames are being written
        assert victim.poll() is None and time.monotonic() < deadline, "writer ended before writing frames"
        time.sleep(0.001)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    assert part.exists()                                              # killed in the middle of writing
    assert '"committed": false' in (part / "zarr.json").read_text()
    store = open_store(url)
    assert store.committed_parts() == {"w0-p0"}
    assert store.ids() == ["first.wav"]
    check_whole(store, ["first.wav"], dim)
    rerun = start_writer(url, 1, n_parts=1, per_part=400, dim=dim)
    assert rerun.wait() == 0, rerun.stderr.read()
    store.refresh()
    assert store.committed_parts() == {"w0-p0", "w1-p0"}
    ids = [f"w1-p0-u{k:03d}" for k in range(400)]
    check_whole(store, ids[:20] + ids[-20:], dim)
    assert not list(part.rglob("*.partial"))


KILLED_WRITER = """
import os, signal, sys
sys.path.insert(0, sys.argv[2])
from mtser.featurestore.store import StoreWriter
from store_helpers import frames_for, utterance
writer = StoreWriter(sys.argv[1], "p0")
for i in range(8):
    writer.add(utterance(f"u{i}.wav"), {"enc": frames_for(f"u{i}.wav"), "z": frames_for(f"u{i}.wav")})
sys.stdout.write("streamed\\n")
sys.stdout.flush()
os.kill(os.getpid(), signal.SIGKILL)                 # mid-part: frames streamed, nothing committed
"""


def test_a_streaming_writer_killed_mid_part_leaves_nothing_visible_and_a_rerun_completes(tmp_path: Path) -> None:
    url = str(tmp_path / "store.zarr")
    create_store(url)
    register_encoder(url, encoder_info("enc"))
    register_encoder(url, encoder_info("z", compression="zstd"))
    out = subprocess.run([sys.executable, "-c", KILLED_WRITER, url, str(Path(__file__).parent)],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert out.returncode == -signal.SIGKILL and out.stdout == "streamed\n", out.stderr
    shard = Path(url) / "parts/p0/features/enc/frames/c/0/0"
    assert shard.stat().st_size > 0                                    # the frames really were streamed
    store = open_store(url)
    assert store.committed_parts() == set() and store.ids() == [] and store.ids(encoder="enc") == []
    assert verify_store(url).ok
    ids = [f"u{i}.wav" for i in range(10)]
    write_part(url, "p0", ids, ["enc", "z"])                           # the rerun of the same part
    store.refresh()
    assert store.ids(encoder="enc") == sorted(ids) and store.ids(encoder="z") == sorted(ids)
    for utt_id in ids:
        np.testing.assert_array_equal(store.get(utt_id, "enc"), frames_for(utt_id).astype(np.float16))
        np.testing.assert_array_equal(store.get(utt_id, "z"), frames_for(utt_id).astype(np.float16))
    report = verify_store(url)
    assert report.ok and report.utterances == 20
