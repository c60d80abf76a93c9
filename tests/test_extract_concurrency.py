"""Concurrent `mtser extract` runs on one store (a retried cluster job, an overlapping corpus): every run exits 0
with a summary that adds up, no shard is encoded twice, the store verifies, readers meanwhile never fail; a rerun
over a damaged store redoes the damaged parts instead of counting them as done. (On S3: tests/test_store_claims.py
races writer processes over overlapping plans; the extraction driver above the writer is the same.)"""
from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from mtser.cli.main import app
from mtser.featurestore.corpus import read_corpus
from mtser.featurestore.store import open_store
from mtser.featurestore.verify import verify_store

MTSER = str(Path(sys.executable).with_name("mtser"))
LINE = re.compile(r"extract: written (\d+), failed (\d+) of (\d+) planned \((\d+) from earlier runs"
                  r"(?:, (\d+) by concurrent writers)?\); \d+ warnings; shards (\d+)/(\d+) run")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, demo_corpus_dir, test_encoders_dir) -> tuple[Path, Path, Path, list[str], list[str]]:
    """(config, manifests A and B, ids A, ids B): the speech encoder only, about one utterance per shard;
    A and B share two of their four utterances."""
    work = tmp_path_factory.mktemp("concurrent")
    raw = yaml.safe_load(Path("configs/demo.yaml").read_text())
    raw["extract"]["encoders"] = [dict(raw["extract"]["encoders"][0], model=str(test_encoders_dir / "wavlm"))]
    raw["extract"]["shard_seconds"] = 3.0
    raw["model"]["encoders"] = ["wavlm"]
    config = work / "extract.yaml"
    config.write_text(yaml.safe_dump(raw))
    utts = sorted(read_corpus(demo_corpus_dir).utterances, key=lambda u: u.id)[:6]
    manifests = []
    for name, chosen in (("a", utts[:4]), ("b", utts[2:])):
        path = work / f"{name}.csv"
        with path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["id", "path", "split", "emo_class"])
            writer.writerows([u.id, u.path, u.split or "", u.emo_class or ""] for u in chosen)
        manifests.append(path)
    return config, *manifests, [u.id for u in utts[:4]], [u.id for u in utts[2:]]


def _start(manifest: Path, config: Path, url: str, options: dict | None) -> subprocess.Popen:
    extra = ["--storage-options", json.dumps(options)] if options else []
    return subprocess.Popen([MTSER, "extract", str(manifest), "--config", str(config), "--store", url, "--workers",
                             "0", "--no-progress", *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={"OMP_NUM_THREADS": "1", **os.environ})


def _finish(runs: list[subprocess.Popen], url: str, options: dict | None,
            pause: float = 0.2) -> tuple[list[tuple[int, ...]], int]:
    """Wait for the runs, reading the store every `pause` seconds meanwhile as `features ls` does; (parsed summary
    lines, reads)."""
    reads = 0
    while any(r.poll() is None for r in runs):
        time.sleep(pause)                                                # leave the test CPUs to the runs
        try:
            store = open_store(url, storage_options=options)
        except Exception as exc:                                         # noqa: BLE001 - the store may not exist yet
            assert "no such store" in str(exc) or "not an mtser feature store" in str(exc), exc
            continue
        assert store.summary()["utterances"] <= 6                        # raises on any half-visible part
        reads += 1
    lines = []
    for run in runs:
        out, err = run.communicate()
        assert run.returncode == 0, out + err
        match = LINE.search(out)
        assert match, out
        lines.append(tuple(int(g or 0) for g in match.groups()))
    return lines, reads


def _check_adds_up(lines: list[tuple[int, ...]], n: int) -> None:
    """Every run reports the whole plan written (its own + earlier + concurrent), nothing failed."""
    for written, failed, planned, earlier, concurrent, run, shards in lines:
        assert (written, failed, planned) == (n, 0, n) and earlier + concurrent <= n and run <= shards


def test_three_concurrent_runs_of_the_same_and_an_overlapping_corpus(setup, tmp_path) -> None:
    config, a, b, ids_a, ids_b = setup
    url = str(tmp_path / "store.zarr")
    runs = [_start(a, config, url, None), _start(a, config, url, None), _start(b, config, url, None)]
    lines, reads = _finish(runs, url, None)
    _check_adds_up(lines, 4)
    assert lines[0][5] + lines[1][5] == lines[0][6]                     # no shard of A encoded twice
    assert reads > 0
    store = open_store(url)
    assert store.ids() == sorted(set(ids_a) | set(ids_b)) and store.ids(encoder="wavlm") == store.ids()
    report = verify_store(url)
    assert report.ok, report.problems
    assert not list(Path(url).rglob("*.partial"))

    # damage two committed parts of A: a table column deleted, a frames shard file truncated
    only_a = set(ids_a) - set(ids_b)
    parts = sorted(p.name for p in store.parts() if p.n_utterances and set(store.part_table(p.name)["id"]) <= only_a)
    shutil.rmtree(Path(url) / "parts" / parts[0] / "utterances" / "split")
    shard = Path(url) / "parts" / parts[1] / "features" / "wavlm" / "frames" / "c" / "0" / "0"
    shard.write_bytes(shard.read_bytes()[:-100])
    rerun = CliRunner().invoke(app, ["extract", str(a), "--config", str(config), "--store", url, "--workers", "0",
                                     "--no-progress"])
    assert rerun.exit_code == 0, rerun.output
    assert "written 4, failed 0 of 4 planned (2 from earlier runs)" in rerun.output
    assert "2 damaged parts redone" in rerun.output
    assert f"part {parts[0]} was committed but damaged, redone: part {parts[0]!r}: utterance table unreadable" \
        in rerun.output
    assert f"part {parts[1]} was committed but damaged, redone" in rerun.output
    assert verify_store(url).ok and open_store(url).ids() == store.ids()
