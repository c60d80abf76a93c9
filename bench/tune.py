"""What does cohort training buy? Whole `mtser tune` searches with cohorts versus one trial per grid point, the fused
model's step versus the same models stepped one after another, and the store bytes read per member-sample.

    .venv/bin/python bench/tune.py [--quick | --tiny] [--cold] [--store URL] [--points K] [--epochs E] [--samples N]
                                   [--model demo|paper] [--device cpu|cuda|auto]

Without --store it writes a synthetic store of realistic shapes (bench/loader.py's writer: WavLM-large 1024-d,
Whisper-large 1280-d, RoBERTa-large 1024-d, float16, 2-8 s utterances). Measured in one run, side by side:
  search   `run_search` stage 1 over K grid points shaped like the paper's (α × β × pooling asp/mean, demo-size
           model), E epochs of N samples each: `cohort_size: 1` with as many concurrent 1-CPU trials as CPUs
           (1 torch thread each: the fastest way to run many tiny trials here), then the default cohorts
           (`cohort_size: null`: one per pooling here), each trial given all CPUs (torch threads = CPUs).
           cohort_speedup = (grid points × epochs per hour) with cohorts / without.
  step     K demo-size ASP models (α values) on the same in-memory batches, 1 torch thread: each model's forward,
           backward, clipping and AdamW step one after another (a `FusionNetwork` of one, torch's AdamW), versus
           one step of a `FusionNetwork` of the K members;
           alternated, median of rounds. fused_step_speedup = member-steps/s fused / one after another.
           Also K cohorts of one stepped one after another (what `cohort_size: 1` trains, with the cohort's
           faster pooling and optimiser): fused_step_speedup_vs_cohorts_of_one.
  grid     the search's training work without its fixed costs (worker start, imports, evaluation, checkpoints)
           and serially on 1 thread: the same in-memory steps for the grid's K/2 ASP and K/2 mean-pooling
           points, as one cohort per pooling against K cohorts of one, plus the loader reading the batches from
           the store (page cache) once per cohort against once per point. cohort_speedup_in_memory =
           (K cohorts of one + K loader passes) / (2 cohorts + 2 loader passes): what the search's ratio would
           be were its trials' fixed costs and thread effects nil; grid_ms_per_step_* give the parts.
  reads    bytes the process read (/proc/self/io rchar) while `train_cohort` trained K members for one epoch, over
           the bytes of the samples the members consumed (training draws and development passes):
           store_reads_per_member_sample ≈ 1/K for a cohort (and ≈ 1 for a cohort of one, also reported).
The page cache is warm (the store was just written) unless --cold: then the store's files are evicted from the
page cache (posix_fadvise DONTNEED, bench/store_read.py) before each search, so each starts reading from disk.
--model paper: the members are configs/paper.yaml's (its fusion model: proj 1028, LSTM 2 x 2048) instead of the
demo's. --device cuda (auto: cuda where there is one): the step and grid measurements run there under the trainer's
mixed precision (bfloat16 autocast), each timed piece ending in a device synchronisation; the searches' trials get
the GPU (a 1/K share each for one trial per point, the whole GPU per cohort). --tiny (bench/gpu.sh --dry-run): the
same steps on a tiny store and tiny members (the chosen model's config with 16-wide layers): checks, not measures.
The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH.parent), str(BENCH)]

from loader import ENCODERS, TINY_MODEL, write_store  # noqa: E402  (bench/loader.py: the synthetic store)
from store_read import evict  # noqa: E402  (drops a folder's files from the page cache)
from timing import alternated  # noqa: E402

from mtser.featurestore.store import open_store  # noqa: E402
from mtser.trainer import data  # noqa: E402
from mtser.trainer.config import load_config  # noqa: E402

CONFIGS = {"demo": BENCH.parent / "configs" / "demo.yaml", "paper": BENCH.parent / "configs" / "paper.yaml"}
ENCODER_RECIPE = {"extract.encoders": [{"name": n, "kind": "speech", "model": f"bench/{n}"} for n in ENCODERS],
                  "model.encoders": list(ENCODERS)}


@dataclass(frozen=True)
class Setup:
    """The members benchmarked: their base config (demo or paper model), recipe overrides and device."""

    base: Path
    recipe: dict
    device: str                                # "cpu" or "cuda"

    def sync(self) -> None:
        """Wait for the device's queued work (so a timed piece's clock stops when its work is done)."""
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()

    def synced(self, run):
        return lambda: (run(), self.sync())


def make_setup(model: str, device: str, tiny: bool) -> Setup:
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    recipe = {**ENCODER_RECIPE, "train.device": device, **(TINY_MODEL if tiny else {})}
    return Setup(CONFIGS[model], recipe, device)


def alphas(k: int) -> list[float]:
    return [round(0.125 * (i + 1), 3) for i in range(k)]


def grid(k: int) -> dict[str, list]:
    """k grid points shaped like the paper's stage 1: α × β × pooling (asp, mean), k/2 points per pooling."""
    per_pooling = k // 2
    betas = [0.5, 1.0] if per_pooling % 2 == 0 else [1.0]
    return {"alpha": alphas(per_pooling // len(betas)), "beta": betas, "pooling": ["asp", "mean"]}


def search_file(path: Path, setup: Setup, k: int, cohort_size: int | None, cpus: int, epochs: int,
                samples: int) -> Path:
    """The search: one trial per point (cohort_size 1, a 1/k GPU share each on CUDA) or cohorts (a GPU each)."""
    recipe = {**setup.recipe, "train.epochs": epochs, "train.samples_per_epoch": samples}
    gpu = (1.0 / k if cohort_size == 1 else 1.0) if setup.device == "cuda" else 0.0
    path.write_text(yaml.safe_dump({
        "base": str(setup.base), **grid(k), "sigma": [None], "resources": {"cpu": float(cpus), "gpu": gpu},
        "max_concurrent": 0, "cohort_size": cohort_size, "overrides": recipe}))
    return path


def time_search(store: str, work: Path, setup: Setup, k: int, cohort_size: int | None, cpus: int, epochs: int,
                samples: int, cold: bool) -> tuple[float, float, int]:
    """(wall seconds, mean data-wait fraction, cohorts) of a stage-1 search over k grid points, `cpus` per trial."""
    from mtser.trainer.tune import run_search

    name = f"cohorts-of-{cohort_size or 'auto'}"
    if cold:
        evict(Path(store))
    start = time.perf_counter()
    summary = run_search(search_file(work / f"{name}.yaml", setup, k, cohort_size, cpus, epochs, samples), store,
                         work / name, stages=(1,), verbose=0)
    wall = time.perf_counter() - start
    if summary.failed or len(summary.table) != k or not (summary.table["status"] == "complete").all():
        raise SystemExit(f"bench: search {name} failed: {summary.failed}")
    waits = [pd.read_csv(work / name / "stage1" / t / "history.csv")["data_wait_fraction"].mean()
             for t in summary.table["trial"]]
    return wall, float(np.mean(waits)), len(summary.cohorts)


def member_configs(setup: Setup, k: int, pooling: str = "asp"):
    return [load_config(setup.base, {**setup.recipe, "loss.alpha": a, "model.pooling": pooling}) for a in alphas(k)]


class StepBench:
    """k models (α values) of one pooling on the same in-memory batches on the setup's device (1 torch thread on
    the CPU; bfloat16 autocast on CUDA, as the trainer runs there). `layers`: per encoder, the stored hidden states
    read into (B, T, L, D) batches, the models built for them (issue 24; the setup's recipe sets
    model.layer_weights)."""

    def __init__(self, store_url: str, setup: Setup, k: int, steps: int, pooling: str = "asp",
                 layers: dict[str, list[int]] | None = None, batch_size: int = 32):
        import torch

        from mtser.trainer.device import Precision
        from mtser.trainer.losses import build_loss
        from mtser.trainer.model import FusionNetwork

        torch.set_num_threads(1)
        self.setup, self.device = setup, torch.device(setup.device)
        store = open_store(store_url)
        encoders = list(ENCODERS)
        pool = data.training_ids(store, encoders, "multi")
        counts = data.class_counts(data.label_arrays(store.utterances, pool))
        self.reader = data.BatchReader(store, encoders, np.float32, layers=layers)
        self.ids = list(data.chunks(data.epoch_sample(pool, steps * batch_size, 0, 1), batch_size))
        self.batches = [self.reader(ids).to(self.device) for ids in self.ids]
        cfgs = member_configs(setup, k, pooling)
        self.losses = [build_loss("multi", c.loss, counts) for c in cfgs]
        self.precision = Precision(self.device, cfgs[0].train.mixed_precision)
        torch.manual_seed(0)
        dims = {n: store.encoders[n].dim for n in encoders}
        self.models = [FusionNetwork(dims, c.model, read_layers=layers).to(self.device) for c in cfgs]
        self.clip = torch.ones(k, device=self.device)

    def cohort(self, members: list) -> tuple:
        import torch

        from mtser.trainer.cohort import CohortAdamW
        from mtser.trainer.model import FusionNetwork

        model = FusionNetwork.stack(members).to(self.device)
        n = len(members)
        return model, CohortAdamW(model, torch.full((n,), 1e-3, device=self.device),
                                  torch.full((n,), 0.01, device=self.device))

    def cohort_steps(self, cohorts: list[tuple]) -> None:
        """Each batch: a step of every (model, optimizer, losses) cohort, one after another."""
        import torch

        from mtser.trainer.cohort import clip_member_grads

        for batch in self.batches:
            for model, optimizer, member_losses in cohorts:
                with self.precision.autocast():
                    logits, attrs = model(batch.features)
                loss = torch.stack([f(logits[g], attrs[g], batch.classes, batch.attributes)
                                    for g, f in enumerate(member_losses)])
                optimizer.zero_grad()
                loss.sum().backward()
                clip_member_grads(model, self.clip[:model.size])
                optimizer.step()

    def read_batches(self) -> None:
        for ids in self.ids:
            self.reader(ids)


def time_steps(store_url: str, setup: Setup, k: int, steps: int, rounds: int) -> tuple[float, float, float]:
    """Median seconds of `steps` steps of k ASP models one after another (torch's AdamW), of one fused cohort and
    of k cohorts of one one after another, on the same batches."""
    import torch

    bench = StepBench(store_url, setup, k, steps)
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in bench.models]
    fused = [(*bench.cohort(bench.models), bench.losses)]
    singles = [(*bench.cohort([m]), [f]) for m, f in zip(bench.models, bench.losses)]

    def one_after_another() -> None:
        for batch in bench.batches:
            for model, optimizer, loss_fn in zip(bench.models, optimizers, bench.losses):
                with bench.precision.autocast():
                    logits, attrs = model(batch.features)
                loss = loss_fn(logits[0], attrs[0], batch.classes, batch.attributes)
                optimizer.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()

    separate, together, alone = alternated([setup.synced(run) for run in (
        one_after_another, lambda: bench.cohort_steps(fused), lambda: bench.cohort_steps(singles))], rounds, warmup=True)
    return separate, together, alone


def time_grid_steps(store_url: str, setup: Setup, k: int, steps: int, rounds: int) -> dict[str, float]:
    """The search's training work without its fixed costs, serially on 1 thread: for the grid's k/2 ASP and k/2
    mean-pooling points, `steps` batches read by the loader and stepped as one cohort per pooling, against each
    point reading its own batches as a cohort of one. Median seconds of each part."""
    out: dict[str, float] = {}
    loader = []
    for pooling in ("asp", "mean"):
        bench = StepBench(store_url, setup, k // 2, steps, pooling)
        fused = [(*bench.cohort(bench.models), bench.losses)]
        singles = [(*bench.cohort([m]), [f]) for m, f in zip(bench.models, bench.losses)]
        out[f"{pooling}_fused"], out[f"{pooling}_singles"], read = alternated([setup.synced(run) for run in (
            lambda: bench.cohort_steps(fused), lambda: bench.cohort_steps(singles), bench.read_batches)], rounds,
            warmup=True)
        loader.append(read)
    return {**out, "loader": statistics.mean(loader)}


def read_bytes() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


def reads_per_member_sample(store_url: str, setup: Setup, k: int, samples: int, out: Path) -> float:
    """Bytes read while a cohort of k trains one epoch, over the bytes of the samples its members consumed."""
    import torch

    from mtser.trainer.loop import Member, train_cohort

    torch.set_num_threads(1)
    cfgs = member_configs(setup, k)
    for c in cfgs:
        c.train.epochs, c.train.samples_per_epoch, c.train.prefetch_batches = 1, samples, 4
    store = open_store(store_url)
    encoders = list(ENCODERS)
    pool = data.training_ids(store, encoders, "multi")
    lengths = data.total_lengths(store, pool, encoders)
    drawn = [i for b in data.epoch_batches(pool, lengths, samples, cfgs[0].train.batch_size, cfgs[0].train.seed, 1)
             for i in b]
    dev = data.evaluation_ids(store, encoders, "Development")
    row_bytes = {n: store.encoders[n].dim * 2 for n in encoders}             # float16
    sample_bytes = sum(store.length(i, n) * row_bytes[n] for i in drawn + dev for n in encoders)
    before = read_bytes()
    train_cohort([Member(f"m{g}", c, out / f"m{g}") for g, c in enumerate(cfgs)], store)
    return (read_bytes() - before) / (k * sample_bytes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small store and searches (finishes within 60 s)")
    parser.add_argument("--tiny", action="store_true", help="tiny store and members: the dry run's check of every "
                                                            "step (measures nothing)")
    parser.add_argument("--model", choices=sorted(CONFIGS), default="demo", help="the members' model (default demo)")
    parser.add_argument("--device", choices=["cpu", "cuda", "auto"], default="cpu",
                        help="where members train (auto: cuda where there is one)")
    parser.add_argument("--cold", action="store_true", help="evict the store from the page cache before each search")
    parser.add_argument("--store", help="existing store with bench/loader.py's encoders (default: a synthetic one)")
    parser.add_argument("--points", type=int, help="grid points (default 4 quick, 8 full)")
    parser.add_argument("--epochs", type=int, help="epochs per grid point (default 1 quick, 4 full)")
    parser.add_argument("--samples", type=int, help="samples per epoch (default 64 quick, 1024 full)")
    args = parser.parse_args()
    if args.cold and args.store and "://" in args.store:
        parser.error("--cold evicts a local store's files from the page cache; --store is a URL")
    small = args.quick or args.tiny
    k = args.points or (2 if args.tiny else 4 if args.quick else 8)
    epochs = args.epochs or (1 if small else 4)
    samples = args.samples or (16 if args.tiny else 64 if args.quick else 1024)
    n, steps, rounds = (24, 1, 1) if args.tiny else (64, 2, 2) if args.quick else (800, 8, 5)
    setup = make_setup(args.model, args.device, args.tiny)
    cpus = os.cpu_count() or 1
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    with tempfile.TemporaryDirectory(prefix="mtser-bench-tune-") as tmp:
        work = Path(tmp)
        store = args.store or str(work / "store")
        if not args.store:
            write_store(store, n)
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
        single, single_wait, single_trials = time_search(store, work, setup, k, 1, 1, epochs, samples, args.cold)
        fused, fused_wait, cohorts = time_search(store, work, setup, k, None, cpus, epochs, samples, args.cold)
        ray.shutdown()
        separate_s, fused_s, singles_s = time_steps(store, setup, k, steps, rounds)
        grid_steps = time_grid_steps(store, setup, k, steps, rounds)
        reads = reads_per_member_sample(store, setup, k, samples, work / "reads")
        reads_single = reads_per_member_sample(store, setup, 1, samples, work / "reads-single")
    loader = grid_steps["loader"]
    grid_single = grid_steps["asp_singles"] + grid_steps["mean_singles"] + k * loader
    grid_fused = grid_steps["asp_fused"] + grid_steps["mean_fused"] + 2 * loader
    per_hour = {name: round(3600 * k * epochs / wall, 1) for name, wall in (("single", single), ("cohorts", fused))}
    result = {
        "cohort_speedup": round(single / fused, 3),
        "fused_step_speedup": round(separate_s / fused_s, 3),
        "fused_step_speedup_vs_cohorts_of_one": round(singles_s / fused_s, 3),
        "cohort_speedup_in_memory": round(grid_single / grid_fused, 3),
        "store_reads_per_member_sample": round(reads, 4),
        "store_reads_per_member_sample_single": round(reads_single, 4),
        "cold": args.cold, "grid_points": k, "epochs": epochs, "samples_per_epoch": samples, "cpus": cpus,
        "model": args.model, "device": setup.device, "tiny": args.tiny,
        "trials_single": single_trials, "trials_cohorts": cohorts,
        "point_epochs_per_hour_single": per_hour["single"], "point_epochs_per_hour_cohorts": per_hour["cohorts"],
        "search_s_single": round(single, 1), "search_s_cohorts": round(fused, 1),
        "data_wait_fraction_single": round(single_wait, 3), "data_wait_fraction_cohorts": round(fused_wait, 3),
        "member_steps_per_s_one_after_another": round(k * steps / separate_s, 2),
        "member_steps_per_s_fused": round(k * steps / fused_s, 2),
        "member_steps_per_s_cohorts_of_one": round(k * steps / singles_s, 2),
        **{f"grid_ms_per_step_{part}": round(1000 * t / steps, 1) for part, t in grid_steps.items()},
    }
    print(f"search over {k} grid points x {epochs} epochs x {samples}: {single:.1f} s with one trial per point, "
          f"{fused:.1f} s in {cohorts} cohorts; {k} models x {steps} steps: {separate_s:.2f} s one after another, "
          f"{fused_s:.2f} s fused, {singles_s:.2f} s as cohorts of one; store reads per member-sample "
          f"{reads:.3f} (cohort of {k}), {reads_single:.3f} (alone)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
