"""A search on a two-node Ray cluster without a shared filesystem: run folder and store on moto's S3 server, each
node with its own scratch directory; a trial process killed mid-run, `--resume`; ensemble, report, evaluate and
predict read the run from its URL."""
from __future__ import annotations

import json
import os
import signal
import threading
import time

import pandas as pd
import pytest
from typer.testing import CliRunner

from mtser.cli.main import app
from mtser.featurestore.labels import CLASSES
from mtser.trainer.checkpoint import read_sidecar
from mtser.trainer.tune import run_search
from search_support import TINY, write_grid

PROBS = [f"prob_{c}" for c in CLASSES]


def _kill_first_running_trial(fs, run: str, killed: list, stop: threading.Event) -> None:
    """SIGKILL the process of the first stage-1 grid point whose state.json says running; `killed` gets its name
    and then the pid."""
    while not stop.is_set():
        fs.invalidate_cache()
        for path in fs.glob(f"{run}/stage1/*/state.json"):
            try:
                state = json.loads(fs.cat_file(path))
            except FileNotFoundError:
                continue
            if state.get("status") == "running" and state.get("pid"):
                os.kill(state["pid"], signal.SIGKILL)
                killed += [path.split("/")[-2], state["pid"]]
                return
        time.sleep(0.05)


def _files(folder) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def test_search_on_s3_over_two_nodes_without_a_shared_disk(demo_store, demo_corpus_dir, moto_s3, s3_bucket, tmp_path,
                                                           monkeypatch):
    import ray
    import s3fs
    from ray.cluster_utils import Cluster

    fs = s3fs.S3FileSystem(**moto_s3, skip_instance_cache=True)
    fs.put(str(demo_store), f"{s3_bucket}/demo.zarr", recursive=True)
    store, run = f"s3://{s3_bucket}/demo.zarr", f"s3://{s3_bucket}/run"
    options = json.dumps(moto_s3)
    driver, cwd = tmp_path / "driver-cache", tmp_path / "cwd"
    nodes = {"head": tmp_path / "head-node", "worker": tmp_path / "worker-node"}
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("MTSER_CACHE_DIR", str(driver))
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    grid = write_grid(tmp_path / "grid.yaml", pooling=["asp"], cohort_size=1, max_concurrent=2,
                      overrides={**TINY, "train.epochs": 1, "train.samples_per_epoch": 512, "train.validation": 0.25,
                                 "finetune.cat.epochs": 1, "finetune.dim.epochs": 1})
    memory = 100 * 1024**2
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "object_store_memory": memory, "env_vars": {"MTSER_CACHE_DIR": str(nodes["head"])}})
    cluster.add_node(num_cpus=1, object_store_memory=memory, env_vars={"MTSER_CACHE_DIR": str(nodes["worker"])})
    try:
        ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        killed: list = []
        stop = threading.Event()
        killer = threading.Thread(target=_kill_first_running_trial, args=(fs, run.removeprefix("s3://"), killed, stop))
        killer.start()
        try:
            first = run_search(grid, store, run, stages=(1,), verbose=0, storage_options=moto_s3)
        finally:
            stop.set()
            killer.join()
        killed, pid = killed
        killed = [killed]
        assert first.failed == killed                                      # the other grid point finished
        states = first.table.set_index("trial")["status"]
        assert states[killed[0]] == "failed" and (states.drop(killed[0]) == "complete").all()
        line, = first.events                                         # mtser's own line on the dead trial process
        assert f"grid points {killed[0]}): its trial process died (pid {pid} on " in line, line
        assert "attempt 1 of 1" in line and "--resume" in line, line

        resumed = CliRunner().invoke(app, ["tune", "--search", str(grid), "--store", store, "--out", run,
                                           "--resume", "--storage-options", options])
        assert resumed.exit_code == 0, resumed.output
        assert f"results: {run}/results.csv" in resumed.output
    finally:
        ray.shutdown()
        cluster.shutdown()

    results = pd.read_csv(fs.open(f"{s3_bucket}/run/results.csv"))
    assert len(results) == 4 and (results["status"] == "complete").all()
    assert results["checkpoint"].str.startswith(f"{run}/stage").all()
    for _, row in results[results["stage"] == 2].iterrows():
        parent = results.set_index("trial").loc[row["parent"], "checkpoint"]
        assert read_sidecar(row["checkpoint"], moto_s3)["parent"] == parent      # stage 2 started from the URL
    for _, row in results[results["stage"] == 1].iterrows():       # the trainer's post-training sidecar update
        sidecar = read_sidecar(row["checkpoint"], moto_s3)
        assert sidecar["test_metrics"]["f1"] == pytest.approx(row["test_f1"])
        assert sidecar["store"]["url"] == store                    # the store's URL, not the node's cache copy
    assert len(fs.glob(f"{s3_bucket}/run/ray/stage1-*")) == 2 and fs.glob(f"{s3_bucket}/run/ray/stage2-0")

    # nothing of the run on the driver's disk; each node downloaded the store once into its own cache
    assert _files(driver) == [] and _files(cwd) == []
    for folder in nodes.values():
        copies = [p.name for p in (folder / "stores").iterdir() if p.is_dir()]
        assert len(copies) == 1 and copies[0].startswith("demo.zarr-")
        leftovers = {tuple(f.split("/")[1:3]) for f in _files(folder / "runs")}
        assert leftovers <= {("stage1", killed[0])}             # only the killed trial's unfinished work folder

    runner = CliRunner()
    built = runner.invoke(app, ["ensemble", "--run", run, "--store", store, "--storage-options", options])
    assert built.exit_code == 0, built.output
    manifest = json.loads(fs.cat_file(f"{s3_bucket}/run/ensemble/ensemble.json"))
    assert manifest["run"] == run and manifest["files"]["Development"]["predictions"].startswith(f"{run}/ensemble/")
    stored = pd.read_csv(fs.open(f"{s3_bucket}/run/ensemble/Development/predictions.csv")).set_index("FileName")
    with fs.open(f"{s3_bucket}/baseline.csv", "w") as f:                  # an external member at a URL too
        pd.DataFrame({"FileName": stored.index, "EmoAct": 4.0}).to_csv(f, index=False)
    extra = runner.invoke(app, ["ensemble", "--run", run, "--store", store, "--storage-options", options, "--out",
                                f"{run}/ensemble-baseline", "--extra-member", f"arousal=s3://{s3_bucket}/baseline.csv"])
    assert extra.exit_code == 0, extra.output
    with_baseline = json.loads(fs.cat_file(f"{s3_bucket}/run/ensemble-baseline/ensemble.json"))
    assert with_baseline["members"]["arousal"][-1]["external"] == f"s3://{s3_bucket}/baseline.csv"

    page = runner.invoke(app, ["report", run, "--storage-options", options])
    assert page.exit_code == 0 and f"{run}/report/index.html" in page.output, page.output
    panels = fs.glob(f"{s3_bucket}/run/report/*.png")                 # one PNG per panel, each embedded once
    assert fs.cat_file(f"{s3_bucket}/run/report/index.html").count(b"data:image/png;base64,") == len(panels)
    assert {p.rsplit("/", 1)[1].rsplit("-", 1)[0] for p in panels if "/curves-" in p} == {
        f"curves-{c}" for c in results["cohort"]}                         # learning curves of every cohort

    best = results[results["stage"] == 1].sort_values("trial").iloc[0]   # selected on held-out Train, tested on Dev
    scored = runner.invoke(app, ["evaluate", best["checkpoint"], "--store", store, "--device", "cpu",
                                 "--storage-options", options])
    assert scored.exit_code == 0, scored.output
    assert json.loads(scored.output.strip().splitlines()[-1])["f1"] == pytest.approx(best["test_f1"], abs=1e-4)

    name = sorted(stored.index)[0]
    wav = demo_corpus_dir / "Audios" / name
    predicted = runner.invoke(app, ["predict", str(wav), "--ensemble", f"{run}/ensemble", "--storage-options", options,
                                    "--transcripts", str(demo_corpus_dir / "Transcripts"), "--out",
                                    str(tmp_path / "predicted.csv")])
    assert predicted.exit_code == 0, predicted.output
    row = pd.read_csv(tmp_path / "predicted.csv").iloc[0]
    assert row["EmoClass"] == stored.loc[name, "EmoClass"]
    assert row[PROBS].to_numpy(float) == pytest.approx(stored.loc[name, PROBS].to_numpy(float), abs=1e-5)
    assert _files(driver) == [] and _files(cwd) == []
