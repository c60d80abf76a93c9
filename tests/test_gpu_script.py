"""bench/gpu.sh, the one prepared GPU script, run as its --dry-run (tiny sizes, the same steps, on the CPU), so the
script and the benches it calls cannot rot: every JSON line and the keys the GPU figures are read from."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# the figures docs/benchmarks.md's GPU section reads, per bench
KEYS = {
    "extract": ["audio_hours_per_hour_per_worker", "audio_hours_per_gpu_hour", "encoder_time_share_1_worker",
                "audio_wait_share_1_worker", "gpu_utilisation_mean", "gpu_name", "speedup_vs_naive",
                "naive_utt_per_s", "mtser_1_utt_per_s"],
    "tune": ["member_steps_per_s_fused", "member_steps_per_s_one_after_another", "fused_step_speedup",
             "data_wait_fraction_single", "data_wait_fraction_cohorts", "cohort_speedup", "cohort_speedup_in_memory",
             "store_reads_per_member_sample"],
    "loader": ["loader_vs_raw", "data_wait_fraction", "loader_samples_per_s", "train_samples_per_s"],
    "timeline": ["timeline_vs_naive", "segment_recall", "segment_boundary_error_s", "class_agreement",
                 "class_agreement_alone"],
}
ON_GPU_ONLY = {"audio_hours_per_gpu_hour", "gpu_utilisation_mean", "gpu_name"}


def _gpu_sh(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), *args], capture_output=True, text=True,
                          timeout=900, env={**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
                                            "RAY_AUTH_MODE": "disabled", **(env or {})})


def test_gpu_script_dry_run_writes_every_line_and_key(tmp_path):
    run = _gpu_sh("--dry-run", str(tmp_path))
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [json.loads(line) for line in (tmp_path / "gpu.jsonl").read_text().splitlines()]
    assert [line["bench"] for line in lines] == ["device", "extract", "tune", "loader", "timeline"]
    assert all(line["dry_run"] is True for line in lines)
    device = lines[0]["result"]
    assert device["device"] == "cpu" and device["gpu_name"] is None and device["gpus"] == 0
    by_bench = {line["bench"]: line for line in lines[1:]}
    assert by_bench["extract"]["command"] == "bench/extract.py --tiny --workers 1"
    assert by_bench["tune"]["command"] == "bench/tune.py --model paper --device auto --tiny"
    assert by_bench["loader"]["command"] == "bench/loader.py --model paper --tiny"
    assert by_bench["timeline"]["command"].startswith("bench/timeline.py --device auto --workdir")
    for bench, keys in KEYS.items():
        line = by_bench[bench]
        result = line["result"]
        assert line["seconds"] >= 0 and (tmp_path / f"{bench}.log").is_file()
        assert result["device"] == "cpu"
        for key in keys:
            if key in ON_GPU_ONLY:
                assert result[key] is None, (bench, key)                 # no made-up GPU figures on a CPU
            else:
                assert isinstance(result[key], (int, float)) and math.isfinite(result[key]) and result[key] >= 0, \
                    (bench, key, result[key])
    assert by_bench["extract"]["result"]["size"] == "tiny" and by_bench["extract"]["result"]["workers"] == [1]
    assert by_bench["tune"]["result"]["model"] == "paper" and by_bench["tune"]["result"]["tiny"] is True
    assert by_bench["loader"]["result"]["model"] == "paper" and by_bench["loader"]["result"]["tiny"] is True
    assert 0 <= by_bench["tune"]["result"]["data_wait_fraction_cohorts"] <= 1


def test_gpu_script_without_a_folder_is_a_usage_error(tmp_path):
    run = _gpu_sh("--dry-run", env={"OUT": ""})
    assert run.returncode == 2 and "usage: bash bench/gpu.sh [--dry-run] [DIR]" in run.stderr
    run = _gpu_sh(str(tmp_path / "a"), str(tmp_path / "b"))
    assert run.returncode == 2 and not (tmp_path / "a").exists()
