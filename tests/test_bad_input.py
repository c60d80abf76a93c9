"""Bad input gets one line naming the item and the reason, with the documented exit code (1 data, 2 usage/config,
130 interrupted), before any work, and nothing of the user's is lost (docs/reliability.md, "Exit codes and bad
input"). Each case runs the real command in-process (typer's CliRunner) unless it needs a signal or a memory cap."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from mtser.cli.main import app
from mtser.configio import to_dict
from mtser.trainer.config import load_config
from trainer_store import DIMS, write_synthetic_store

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parent.parent
SMALL = {"extract.encoders": [{"name": n, "kind": "speech", "model": f"synthetic/{n}"} for n in DIMS],
         "model.encoders": list(DIMS), "model.attention_dim": 8, "model.proj_dim": 16, "model.lstm_hidden": 16,
         "train.epochs": 1, "train.samples_per_epoch": 64, "train.batch_size": 32}


def small_config() -> dict:
    return to_dict(load_config(REPO / "configs" / "demo.yaml", SMALL))


def run(*args: str):
    """The command in-process; stderr is part of `output`."""
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_one_line(result, code: int, *words: str) -> None:
    assert result.exit_code == code, result.output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    for word in words:
        assert word in result.output, result.output


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return write_synthetic_store(tmp_path_factory.mktemp("store") / "s.zarr", n_train=40, n_dev=20)


@pytest.fixture(scope="module")
def checkpoint(store, tmp_path_factory) -> Path:
    """An untrained checkpoint of the small model on `store` (enough to load, match and evaluate)."""
    from mtser.configio import from_dict
    from mtser.featurestore.store import open_store
    from mtser.trainer.checkpoint import save_checkpoint
    from mtser.trainer.config import Config
    from mtser.trainer.model import FusionNetwork

    cfg = from_dict(Config, small_config())
    encoders = open_store(store).encoders
    path = tmp_path_factory.mktemp("ckpt") / "best"
    save_checkpoint(path, FusionNetwork(dict(DIMS), cfg.model), cfg,
                    {"metrics": {}, "store": {"url": store, "encoders": {n: dataclasses.asdict(encoders[n])
                                                                         for n in DIMS}}})
    return path


# ------------------------------------------------------------------------------------------------------------ configs
def _set(config: dict, dotted: str, value) -> dict:
    node = config
    *parents, last = dotted.split(".")
    for key in parents:
        node = node[key]
    node[last] = value
    return config


CONFIG_CASES = {   # id: (config text or a change to the small config, extra args, key words)
    "not UTF-8": (b"extract:\n  encoders: []\n  seed: \xff\xfe\n", [], ["not UTF-8", "offset"]),
    "--set not YAML": (None, ["--set", "train.epochs=["], ["--set train.epochs", "not valid YAML"]),
    "shard_seconds 0": (("extract.shard_seconds", 0), [], ["extract: shard_seconds: must be positive"]),
    "augment -1": (("extract.augment", -1), [], ["extract: augment: must be >= 0"]),
    "sigma nan": (("loss.sigma", float("nan")), [], ["loss.sigma", "finite"]),
    "lr inf": (("train.lr", float("inf")), [], ["train.lr", "finite"]),
    "warmup nan": (("train.warmup_epochs", float("nan")), [], ["train.warmup_epochs", "finite"]),
    "deep nesting": (b"extract: " + b"[" * 20000, [], ["nested too deeply"]),
    "long value": (("train.task", "x" * 100_000), [], ["train.task", "(100002 chars)"]),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_config_problems_are_one_line_with_exit_code_2(case, tmp_path):
    text, extra, words = CONFIG_CASES[case]
    config = tmp_path / "c.yaml"
    if isinstance(text, bytes):
        config.write_bytes(text)
    else:
        config.write_text(yaml.safe_dump(_set(small_config(), *text) if text else small_config()))
    out = tmp_path / "out"
    result = run("train", "--config", config, "--store", tmp_path / "no-store.zarr", "--out", out, *extra)
    assert_one_line(result, 2, *words)
    assert len(result.output) < 600 and result.output.count("\n") == 1      # one line, no echo of a long value
    assert not out.exists()


def test_a_yaml_alias_bomb_is_refused_quickly_under_a_memory_cap(tmp_path):
    """Nine levels of nine aliases expand to 9^9 values: refused by count (never expanded), in bounded memory."""
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{k}: &a{k} [{', '.join([f'*a{k - 1}'] * 9)}]" for k in range(1, 9)]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines + ["extract: *a8", ""]))
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30));"
            "from mtser.configio import ConfigError\nfrom mtser.trainer.config import load_config\n"
            "try:\n    load_config(sys.argv[1])\nexcept ConfigError as exc:\n    print(exc); sys.exit(2)")
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", code, str(bomb)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 2, done.stderr[-2000:]
    assert "expands to more than 100000 values" in done.stdout and len(done.stdout) < 300
    assert time.monotonic() - started < 30


# -------------------------------------------------------------------------------------------------- train --out, Ctrl-C
def test_train_refuses_a_non_empty_out_unless_overwrite(store, checkpoint, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(small_config()))
    out = tmp_path / "out"
    first = run("train", "--config", config, "--store", store, "--out", out, "--no-progress")
    assert first.exit_code == 0, first.output
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    again = run("train", "--config", config, "--store", store, "--out", out, "--no-progress")
    assert_one_line(again, 2, f"--out {out}", "not empty", "best, history.csv", "--overwrite")
    finetune = run("finetune", "--from", checkpoint, "--task", "cat", "--store", store, "--out", out)
    assert_one_line(finetune, 2, "not empty", "--overwrite")
    into_parent = run("finetune", "--from", out / "best", "--task", "cat", "--store", store, "--out", out,
                      "--overwrite")
    assert_one_line(into_parent, 2, "holds the parent checkpoint")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before           # nothing lost
    replaced = run("train", "--config", config, "--store", store, "--out", out, "--no-progress", "--overwrite",
                   "--set", "train.seed=1")
    assert replaced.exit_code == 0, replaced.output
    assert json.loads((out / "best" / "checkpoint.json").read_text())["config"]["train"]["seed"] == 1


def test_train_interrupted_says_so_and_exits_130(store, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(_set(small_config(), "train.epochs", 10_000)))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "mtser", "train", "--config", str(config), "--store", store,
                             "--out", str(tmp_path / "out"), "--no-progress"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().startswith("epoch   1"), proc.stderr.read()   # training is under way
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130 and err.strip().splitlines()[-1] == "train: interrupted", err


# -------------------------------------------------------------------------------------------------------- checkpoints
def _sidecar_case(meta: dict, case: str):
    dims = meta["input_dims"]
    first = next(iter(dims))
    return {
        "a list": [meta],
        "no input_dims": {k: v for k, v in meta.items() if k != "input_dims"},
        "no store": {k: v for k, v in meta.items() if k != "store"},
        "negative dim": {**meta, "input_dims": {**dims, first: -3}},
        "float dim": {**meta, "input_dims": {**dims, first: 12.0}},
        "string dim": {**meta, "input_dims": {**dims, first: "12"}},
        "huge dim": {**meta, "input_dims": {**dims, first: 1 << 40}},
        "huge model": _set(json.loads(json.dumps(meta)), "config.model.lstm_hidden", 1 << 20),
    }[case]


SIDECAR_CASES = {
    "a list": ["expected a JSON object, got list"],
    "no input_dims": ["input_dims: expected an object, got nothing"],
    "no store": ["store: expected an object, got nothing"],
    "negative dim": ["input_dims.a", "expected an integer in [1, 65536], got -3"],
    "float dim": ["input_dims.a", "got 12.0"],
    "string dim": ["input_dims.a", "got '12'"],
    "huge dim": ["input_dims.a", f"got {1 << 40}"],
    "huge model": ["parameters (at most 1,073,741,824)"],
}


@pytest.mark.parametrize("case", list(SIDECAR_CASES))
def test_a_damaged_checkpoint_sidecar_is_refused_before_building(checkpoint, store, tmp_path, case):
    damaged = tmp_path / "best"
    shutil.copytree(checkpoint, damaged)
    meta = json.loads((checkpoint / "checkpoint.json").read_text())
    (damaged / "checkpoint.json").write_text(json.dumps(_sidecar_case(meta, case)))
    assert_one_line(run("evaluate", damaged, "--store", store), 1, f"{damaged}", *SIDECAR_CASES[case])


@pytest.mark.parametrize("damage, words", [
    (lambda b: b[: len(b) // 2], ["model.safetensors: not a readable safetensors file", "incomplete metadata"]),
    (lambda b: b[:8] + b"\xff" * 64 + b[72:], ["model.safetensors: not a readable safetensors file"]),
], ids=["truncated", "garbled header"])
@pytest.mark.parametrize("recorded", [True, False], ids=["sha256 recorded", "older sidecar"])
def test_unreadable_weights_are_named(checkpoint, store, tmp_path, damage, words, recorded):
    intact = run("evaluate", checkpoint, "--store", store, "--device", "cpu")
    assert intact.exit_code == 0, intact.output                                   # the control: the copy is the damage
    damaged = tmp_path / "best"
    shutil.copytree(checkpoint, damaged)
    weights = damaged / "model.safetensors"
    weights.write_bytes(damage(weights.read_bytes()))
    if recorded:                  # the sidecar's SHA-256 catches any damage before the file is parsed
        words = ["model.safetensors: SHA-256", "the weights are damaged or were replaced"]
    else:                         # a checkpoint written before the SHA-256 record: the parser names the damage
        sidecar = damaged / "checkpoint.json"
        sidecar.write_text(json.dumps({k: v for k, v in json.loads(sidecar.read_text()).items() if k != "sha256"}))
    assert_one_line(run("evaluate", damaged, "--store", store), 1, *words)


# ---------------------------------------------------------------------------------------------------------- ensembles
def _manifest(checkpoint: Path) -> dict:
    member = {"trial": "t", "checkpoint": str(checkpoint)}
    return {"members": {task: [member] for task in ("class", "arousal", "valence", "dominance")}}


@pytest.mark.parametrize("change, words", [
    (lambda m: [m], ["expected a JSON object, got list"]),
    (lambda m: {k: v for k, v in m.items() if k != "members"}, ["members: expected an object with the tasks"]),
    (lambda m: {"members": {**m["members"], "valence": [{"trial": "t"}]}},
     ["members.valence[0]: names no checkpoint"]),
    (lambda m: {"members": {**m["members"], "class": []}}, ["members.class: expected a non-empty list"]),
], ids=["a list", "no members", "member without checkpoint", "no class member"])
def test_a_damaged_ensemble_manifest_is_refused(checkpoint, tmp_path, change, words):
    manifest = tmp_path / "ensemble.json"
    manifest.write_text(json.dumps(change(_manifest(checkpoint))))
    result = run("predict", tmp_path / "a.wav", "--ensemble", manifest)
    assert_one_line(result, 1, "not a valid ensemble manifest", *words)


def test_a_corrupt_manifest_in_the_ensemble_out_folder_is_named_before_work(tmp_path, store):
    out = tmp_path / "ens"
    out.mkdir()
    (out / "ensemble.json").write_text('{"members": ')
    result = run("ensemble", "--run", tmp_path / "run", "--store", store, "--out", out)
    assert_one_line(result, 1, f"{out}/ensemble.json", "not a valid ensemble manifest")
    assert (out / "ensemble.json").read_text() == '{"members": '                   # not replaced unseen


@pytest.mark.parametrize("args, words", [
    (["predict", "{tmp}/a.wav", "--ensemble", "{tmp}/e.json", "--out", "{tmp}/missing/p.csv"],
     ["--out {tmp}/missing/p.csv", "does not exist"]),
    (["predict", "{tmp}/a.wav", "--ensemble", "{tmp}/e.json", "--out", "{tmp}"], ["is a folder"]),
    (["evaluate", "{tmp}/ckpt", "--store", "{tmp}/s.zarr", "--predictions", "{tmp}/missing/p.csv"],
     ["--predictions", "does not exist"]),
], ids=["predict into a missing folder", "predict into a folder", "evaluate into a missing folder"])
def test_output_files_are_checked_before_any_work(tmp_path, args, words):
    result = run(*[a.format(tmp=tmp_path) for a in args])
    assert_one_line(result, 2, *[w.format(tmp=tmp_path) for w in words])


# ------------------------------------------------------------------------------------------------------------- stores
def _damaged_store(store: str, tmp_path: Path, damage: str) -> Path:
    copy = tmp_path / "s.zarr"
    shutil.copytree(store, copy)
    part = sorted((copy / "parts").iterdir())[0]
    if damage == "table array deleted":
        shutil.rmtree(part / "utterances" / "speaker" / "utf8")
    else:                                                # the offsets of an encoder emptied (shape 0)
        meta_path = part / "features" / "a" / "offsets" / "zarr.json"
        meta = json.loads(meta_path.read_text())
        meta["shape"] = [0]
        meta_path.write_text(json.dumps(meta))
    return copy


@pytest.mark.parametrize("damage, words", [
    ("table array deleted", ["the utterances table is unreadable", "speaker/utf8", "does not exist"]),
    ("offsets emptied", ["is unreadable", "encoder 'a': offsets are not", "0 offsets for 22 ids"]),
])
@pytest.mark.parametrize("command", ["ls", "show"])
def test_features_ls_and_show_name_a_damaged_store(store, tmp_path, damage, words, command):
    damaged = _damaged_store(store, tmp_path, damage)
    args = ["features", command, damaged] + (["Train_0001.wav"] if command == "show" else [])
    assert_one_line(run(*args), 1, *words)


@pytest.mark.parametrize("args, words", [
    (["features", "ls", "s3://bucket/store.zarr"], ["s3://bucket/store.zarr: cannot read the store root"]),
    (["evaluate", "s3://bucket/run/best", "--store", "{store}"], ["s3://bucket/run/best: cannot read checkpoint.json"]),
    (["predict", "a.wav", "--ensemble", "s3://bucket/ensemble.json"],
     ["s3://bucket/ensemble.json: cannot read ensemble manifest"]),
], ids=["store", "checkpoint", "manifest"])
def test_an_unreachable_endpoint_is_one_line(store, args, words):
    with socket.socket() as s:                           # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    options = json.dumps({"endpoint_url": f"http://127.0.0.1:{port}", "key": "k", "secret": "s",
                          "config_kwargs": {"retries": {"max_attempts": 1}}})
    result = run(*[a.format(store=store) for a in args], "--storage-options", options)
    assert_one_line(result, 1, *words, "Could not connect")


# ------------------------------------------------------------------------------------------------------------- search
def test_a_huge_search_prints_its_plan_and_needs_yes(store, tmp_path):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(small_config()))
    weights = [round(0.01 * k, 2) for k in range(1, 101)]
    search = tmp_path / "search.yaml"
    search.write_text(yaml.safe_dump({"base": "base.yaml", "alpha": weights, "beta": weights, "pooling": ["asp"],
                                      "stages": [1]}))
    out = tmp_path / "run"
    result = run("tune", "--search", search, "--store", store, "--out", out)
    assert_one_line(result, 2, "search plan: stage 1 10000 grid points in", "GiB", " h",
                    "10000 grid points (more than 200)", "pass --yes")
    assert not out.exists()                                                      # nothing written, no Ray started


def test_cohorts_are_capped_by_the_memory_available(store, tmp_path):
    """cohort_memory_gb asks for 1 PB; each member (~1.3 GB) gets MEMORY_SHARE of the available memory shared among
    the cohorts that run at once, so a cohort holds fewer than the search's 100 points."""
    from mtser.configio import from_dict
    from mtser.featurestore.store import open_store
    from mtser.trainer.runs import RunFolder
    from mtser.trainer.search_config import SearchConfig
    from mtser.trainer.search_plan import MEMORY_SHARE, available_memory, concurrent_trials, plan_search

    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump(_set(_set(small_config(), "model.proj_dim", 4096), "model.lstm_hidden", 2048)))
    search = from_dict(SearchConfig, {"base": "base.yaml", "alpha": [0.01 * k for k in range(1, 101)], "beta": [1.0],
                                      "pooling": ["asp"], "stages": [1], "cohort_memory_gb": 1e6})
    plan = plan_search(search, base, open_store(store), RunFolder(tmp_path / "run"), 1)
    member = plan.cohort_bytes / plan.largest_cohort
    expected = max(1, int(MEMORY_SHARE * available_memory() / concurrent_trials(search) // member))
    assert plan.points == 100 and plan.largest_cohort < 100, plan
    assert abs(plan.largest_cohort - expected) <= 1 and plan.cohorts == -(-100 // plan.largest_cohort), plan


# ------------------------------------------------------------------------------------------------------------- guard
GUARDED_RUN = """
import sys
import mtser.featurestore.store as store
if sys.argv[1] == "bug":
    store.open_store = lambda *args, **kwargs: 1 / 0      # a programming error inside a real command
from mtser.cli.main import main
sys.argv = ["mtser", "features", "ls", sys.argv[2]]
main()
"""


@pytest.mark.parametrize("case", ["bug", "data"])
def test_only_the_errors_that_carry_an_exit_code_are_one_line(case, tmp_path):
    """The guard in cli/main prints an MtserError as one line with its exit code; anything else propagates with
    its traceback (the console script then exits 1 after printing it)."""
    done = subprocess.run([sys.executable, "-c", GUARDED_RUN, case, str(tmp_path / "absent.zarr")],
                          capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)})
    if case == "bug":
        assert done.returncode == 1 and "Traceback" in done.stderr and "ZeroDivisionError" in done.stderr
        assert "error:" not in done.stderr, done.stderr
    else:
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
        assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1 and "absent.zarr" in done.stderr


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="demo-corpus checks for espeak-ng first")
def test_a_refused_file_operation_is_one_line_with_exit_code_1(tmp_path):
    """An OSError (here: a folder to create under a file) is the system refusing, not a bug: one line, exit 1."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = run("demo-corpus", blocker / "corpus", "--size", "10")
    assert_one_line(result, 1, "error: ", "Not a directory", str(blocker))


def test_library_errors_carry_their_exit_codes():
    from mtser.configio import ConfigError
    from mtser.errors import DATA, MtserError, USAGE
    from mtser.featurestore.corpus import CorpusError
    from mtser.featurestore.store import StoreError
    from mtser.trainer.checkpoint import CheckpointError
    from mtser.trainer.ensemble import EnsembleError
    from mtser.trainer.runs import RunError
    from mtser.trainer.tune import SearchError

    cases = [(ConfigError("c"), USAGE), (CorpusError("c"), USAGE), (StoreError("s"), DATA),
             (CheckpointError("c"), DATA), (RunError("r"), DATA), (EnsembleError("e"), DATA),
             (EnsembleError("e", usage=True), USAGE), (SearchError("s"), DATA), (SearchError("s", usage=True), USAGE)]
    assert all(isinstance(error, MtserError) for error, _ in cases)
    assert [error.exit_code for error, _ in cases] == [code for _, code in cases]
