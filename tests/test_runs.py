"""The run folder at a local path and on moto's S3 server: one interface, atomic writes, node-local work folders."""
from __future__ import annotations

import pandas as pd
import pytest

from mtser.trainer.runs import RunError, RunFolder, is_finished, load_results, mark_state, read_state


@pytest.fixture(params=["local", "s3"])
def run(request, tmp_path) -> RunFolder:
    if request.param == "local":
        return RunFolder(tmp_path / "run")
    moto_s3, bucket = request.getfixturevalue("moto_s3"), request.getfixturevalue("s3_bucket")
    return RunFolder(f"s3://{bucket}/run", moto_s3)


def test_state_results_and_listing_round_trip(run):
    assert read_state(run, 1, "a") == {"status": "pending"} and not is_finished(run, 1, "a")
    mark_state(run, 1, "a", status="running", cohort="c0")
    mark_state(run, 1, "a", status="complete", best_epoch=3)
    assert read_state(run, 1, "a") == {"status": "complete", "cohort": "c0", "best_epoch": 3}
    assert is_finished(run, 1, "a")
    with pytest.raises(RunError, match=f"{run.url}: no results.csv"):
        load_results(run)
    run.write_csv("results.csv", pd.DataFrame({"trial": ["a"], "f1": [0.5]}))
    assert load_results(run.url if run.local else run).to_dict("list") == {"trial": ["a"], "f1": [0.5]}
    mark_state(run, 1, "b", status="failed")
    assert run.glob("stage1/*/state.json") == ["stage1/a/state.json", "stage1/b/state.json"]
    run.remove("stage1/a")
    assert run.glob("stage1/*/state.json") == ["stage1/b/state.json"] and not run.exists("stage1/a/state.json")
    run.remove("stage1/never")                                   # nothing there: nothing happens


def test_work_dirs_upload_into_the_run_folder(run, tmp_path, monkeypatch):
    monkeypatch.setenv("MTSER_CACHE_DIR", str(tmp_path / "node"))
    work = run.work_dir("stage1/a")
    if run.local:
        assert work == tmp_path / "run" / "stage1" / "a"
    else:
        assert work.is_relative_to(tmp_path / "node" / "runs")
    (work / "best").mkdir(parents=True)
    (work / "best" / "model.safetensors").write_bytes(b"weights")
    (work / "history.csv").write_text("epoch\n1\n")
    run.upload(work / "best", "stage1/a/best")
    run.upload(work / "history.csv", "stage1/a/history.csv")
    assert run.read_bytes("stage1/a/best/model.safetensors") == b"weights"
    assert run.read_csv("stage1/a/history.csv")["epoch"].tolist() == [1]
    run.discard_work_dir("stage1/a")
    assert work.exists() == run.local                            # a local run folder keeps its files
    if run.local:
        assert list((tmp_path / "run").rglob(".*.tmp-*")) == []       # atomic writes leave no temporary file
