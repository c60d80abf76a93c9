"""Part claims: one live writer per part id, locally and on S3 (moto); dead, released and expired claims are taken
over; a writer whose heartbeat stopped never commits over a successor."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mtser.featurestore.claims import LEASE_SECONDS, Holder, holder_of
from mtser.featurestore.store import PartClaimed, PartCommitted, StoreError, StoreWriter, create_store, open_store, \
    register_encoder
from mtser.featurestore.verify import verify_store
from store_helpers import encoder_info, frames_for, utterance, write_part

TESTS = Path(__file__).parent


BOTH = pytest.mark.parametrize("where", ["local", "s3"], indirect=True)   # commits on moto take seconds: S3 where
                                                                          # the exclusive create itself is tested


@pytest.fixture
def where(request, tmp_path) -> tuple[str, dict | None]:
    """A fresh store with encoder "enc": (url, storage options); local unless parametrized with "s3"."""
    if getattr(request, "param", "local") == "local":
        url, options = str(tmp_path / "store.zarr"), None
    else:
        moto_s3 = request.getfixturevalue("moto_s3")
        url, options = f"s3://{request.getfixturevalue('s3_bucket')}/store.zarr", moto_s3
    create_store(url, options)
    register_encoder(url, encoder_info("enc"), options)
    return url, options


def _claim_files(url: str, options: dict | None, part: str) -> dict[str, dict]:
    import fsspec

    fs, root = fsspec.core.url_to_fs(url, **(options or {}))
    fs.invalidate_cache()
    return {p.rsplit("/", 1)[-1]: json.loads(fs.cat_file(p)) for p in sorted(fs.find(f"{root}/claims/{part}"))}


def _plant_claim(url: str, options: dict | None, part: str, **fields) -> None:
    """A claim file as a writer elsewhere would have left it."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(url, **(options or {}))
    record = {"host": "other-node", "boot": "b", "pid": 1, "start": None, "token": "t", "heartbeat": time.time(),
              "released": False, **fields}
    fs.makedirs(f"{root}/claims/{part}", exist_ok=True)
    fs.pipe_file(f"{root}/claims/{part}/00000001.json", json.dumps(record).encode())


@BOTH
def test_a_held_part_is_refused_by_name_then_committed_once(where) -> None:
    url, options = where
    first = StoreWriter(url, "p0", options)
    first.add(utterance("a.wav"), {"enc": frames_for("a.wav")})
    with pytest.raises(PartClaimed, match=rf"part 'p0' is being written by another writer \({socket.gethostname()} "
                                          rf"pid {os.getpid()}, heartbeat \d+ s ago\)"):
        StoreWriter(url, "p0", options)
    assert holder_of(url, options, "p0").pid == os.getpid()
    first.commit()
    assert holder_of(url, options, "p0") is None                       # released at commit
    with pytest.raises(PartCommitted, match="part 'p0' is already committed"):
        StoreWriter(url, "p0", options)
    store = open_store(url, storage_options=options)
    assert store.ids() == ["a.wav"] and verify_store(url, options).ok
    claims = _claim_files(url, options, "p0")
    assert list(claims) == ["00000001.json"] and claims["00000001.json"]["released"] is True


def test_an_aborted_writer_releases_its_part(where) -> None:
    url, options = where
    with StoreWriter(url, "p0", options) as writer:
        writer.add(utterance("a.wav"), {"enc": frames_for("a.wav")})
    write_part(url, "p0", ["b.wav"], ["enc"], storage_options=options)  # the next writer claims generation 2
    assert open_store(url, storage_options=options).ids() == ["b.wav"]
    assert list(_claim_files(url, options, "p0")) == ["00000001.json", "00000002.json"]


DIES = """
import os, sys
sys.path.insert(0, {tests!r})
from mtser.featurestore.store import StoreWriter
from store_helpers import frames_for, utterance
writer = StoreWriter(sys.argv[1], "p0")
writer.add(utterance("lost.wav"), {{"enc": frames_for("lost.wav")}})
os._exit(3)                                             # dies holding the claim, frames half written
""".format(tests=str(TESTS))


def test_a_dead_writers_claim_on_this_machine_is_taken_over_at_once(tmp_path) -> None:
    url = str(tmp_path / "store.zarr")
    create_store(url)
    register_encoder(url, encoder_info("enc"))
    died = subprocess.run([sys.executable, "-c", DIES, url], capture_output=True, text=True)
    assert died.returncode == 3, died.stderr
    dead = _claim_files(url, None, "p0")["00000001.json"]
    assert dead["released"] is False and dead["host"] == socket.gethostname()
    assert holder_of(url, None, "p0") is None                            # its process is gone: stale
    write_part(url, "p0", ["kept.wav"], ["enc"])
    store = open_store(url)
    assert store.ids() == ["kept.wav"] and verify_store(url).ok


@pytest.mark.parametrize("where, age, taken", [("local", 10.0, False), ("s3", 10.0, False),
                                               ("local", LEASE_SECONDS + 5, True)], indirect=["where"])
def test_a_claim_from_another_machine_is_stale_only_after_the_lease(where, age: float, taken: bool) -> None:
    url, options = where
    _plant_claim(url, options, "p0", heartbeat=time.time() - age)
    if not taken:
        with pytest.raises(PartClaimed, match=r"part 'p0' is being written by another writer \(other-node pid 1, "
                                              r"heartbeat 1\d s ago\)"):
            StoreWriter(url, "p0", options)
        assert open_store(url, storage_options=options).committed_parts() == set()
        return
    write_part(url, "p0", ["a.wav"], ["enc"], storage_options=options)
    assert open_store(url, storage_options=options).ids() == ["a.wav"]
    assert list(_claim_files(url, options, "p0")) == ["00000001.json", "00000002.json"]


def test_a_released_claim_is_taken_over_whatever_its_age(where) -> None:
    url, options = where
    _plant_claim(url, options, "p0", released=True)
    write_part(url, "p0", ["a.wav"], ["enc"], storage_options=options)
    assert open_store(url, storage_options=options).ids() == ["a.wav"]


def test_a_writer_whose_heartbeat_stopped_does_not_commit(tmp_path) -> None:
    url = str(tmp_path / "store.zarr")
    create_store(url)
    register_encoder(url, encoder_info("enc"))
    writer = StoreWriter(url, "p0", lease_s=0.5)
    writer.add(utterance("a.wav"), {"enc": frames_for("a.wav")})
    writer._claim._stop.set()                                          # its heartbeats stop (a stalled node)
    time.sleep(0.5)
    with pytest.raises(StoreError, match=r"part 'p0': this writer's claim expired \(no heartbeat for 0 s\); "
                                         r"nothing committed"):
        writer.commit()
    assert open_store(url).committed_parts() == set()
    assert (Path(url) / "parts/p0").exists()                           # not deleted: may be a successor's now


RACER = """
import json, sys
sys.path.insert(0, {tests!r})
from mtser.featurestore.store import PartClaimed, PartCommitted, StoreWriter
from store_helpers import frames_for, utterance
url, options, plan = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3].split(",")
committed = []
for part in plan:                                       # like a run of extract: skip parts others hold or committed
    try:
        writer = StoreWriter(url, part, options)
    except (PartClaimed, PartCommitted):
        continue
    for k in range(3):
        writer.add(utterance(f"{{part}}-{{k}}.wav"), {{"enc": frames_for(f"{{part}}-{{k}}.wav")}})
    writer.commit()
    committed.append(part)
print(json.dumps(committed))
""".format(tests=str(TESTS))


@pytest.mark.parametrize("where, plans", [("local", ["p0,p1", "p0,p1", "p1,p2"]),     # two identical jobs and an
                                          ("s3", ["p0,p1,p2", "p0,p2,p1"])], indirect=["where"])  # overlapping one
def test_writer_processes_racing_over_the_same_and_overlapping_plans_commit_each_part_once(where, plans) -> None:
    url, options = where
    racers = [subprocess.Popen([sys.executable, "-c", RACER, url, json.dumps(options), plan], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True) for plan in plans]
    done = []
    for racer in racers:
        out, err = racer.communicate()
        assert racer.returncode == 0, err
        done += json.loads(out)
    assert sorted(done) == ["p0", "p1", "p2"]                          # every part committed, none twice
    store = open_store(url, storage_options=options)
    assert store.ids() == sorted(f"p{j}-{k}.wav" for j in range(3) for k in range(3))
    report = verify_store(url, options)
    assert report.ok and report.utterances == 9, report.problems


def test_holder_records_this_process() -> None:
    me = Holder.me("tok")
    assert me.live(LEASE_SECONDS) and me.host == socket.gethostname() and me.pid == os.getpid()
    assert not Holder(**{**me.__dict__, "pid": 2**22 + 1}).live(LEASE_SECONDS)          # no such process
    assert not Holder(**{**me.__dict__, "start": (me.start or 0) + 1}).live(LEASE_SECONDS)  # a reused pid
