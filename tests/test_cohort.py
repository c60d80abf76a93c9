"""Cohort training: G models as one fused model on one batch stream, each member exactly as if trained alone."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from mtser.trainer import data, layer_mix
from mtser.trainer.checkpoint import load_checkpoint
from mtser.trainer.config import load_config
from mtser.trainer.infer import evaluate
from mtser.trainer.loop import Member, lr_factor, train_cohort
from mtser.trainer.losses import build_loss
from mtser.trainer.model import FusionNetwork
from mtser.trainer.setup import seed_everything
from trainer_store import write_synthetic_store

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
SMALL = {"extract.encoders": [{"name": "a", "kind": "speech", "model": "synthetic/a"},
                              {"name": "b", "kind": "speech", "model": "synthetic/b"}],
         "model.encoders": ["a", "b"], "model.attention_dim": 16, "model.proj_dim": 32, "model.lstm_hidden": 32,
         "train.epochs": 1, "train.samples_per_epoch": 704, "train.batch_size": 32, "train.warmup_epochs": 0.3}


def config(**overrides):
    return load_config(CONFIGS / "demo.yaml", {**SMALL, **{k.replace("__", "."): v for k, v in overrides.items()}})


@pytest.fixture(scope="module")
def store_url(tmp_path_factory) -> str:
    return write_synthetic_store(tmp_path_factory.mktemp("store") / "s.zarr")


def train_alone(cfg, store_url: str) -> dict[str, torch.Tensor]:
    """The reference: a model alone (the network of one member), torch's AdamW, clip_grad_norm_ and LambdaLR on the
    same batches; its state as a checkpoint holds it (`member_state(0)`)."""
    from mtser.featurestore.store import open_store

    store, tc = open_store(store_url), cfg.train
    encoders = list(cfg.model.encoders)
    read = layer_mix.read_layers(cfg.model, {n: store.encoders[n] for n in encoders}, store_url)
    pool = data.training_ids(store, encoders, tc.task)
    loss_fn = build_loss(tc.task, cfg.loss, data.class_counts(data.label_arrays(store.utterances, pool)))
    seed_everything(tc.seed)
    model = FusionNetwork({n: store.encoders[n].dim for n in encoders}, cfg.model, read_layers=read)
    optimizer = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    steps = math.ceil(tc.samples_per_epoch / tc.batch_size)
    total, warmup = tc.epochs * steps, round(tc.warmup_epochs * steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, warmup, tc.lr, tc.min_lr))
    reader = data.BatchReader(store, encoders, np.float32, **model.reader_layers())
    lengths = data.total_lengths(store, pool, encoders)
    for epoch in range(1, tc.epochs + 1):
        model.train()
        for ids in data.epoch_batches(pool, lengths, tc.samples_per_epoch, tc.batch_size, tc.seed, epoch):
            batch = reader(ids)
            logits, attrs = model(batch.features)
            loss = loss_fn(logits[0], attrs[0], batch.classes, batch.attributes)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            optimizer.step()
            schedule.step()
    return model.member_state(0)


def assert_states_close(state: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], rtol: float) -> None:
    assert state.keys() == reference.keys()
    for key, ref in reference.items():
        error = float((state[key] - ref).abs().max() / ref.abs().max().clamp(min=1e-12))
        assert error <= rtol, f"{key}: relative difference {error:.2e}"


@pytest.mark.parametrize("pooling, attention_dim", [("asp", 16), ("mean", 16)])
def test_members_equal_models_trained_alone(store_url, tmp_path, pooling, attention_dim):
    shape = {"model__pooling": pooling, "model__attention_dim": attention_dim}
    variants = {"m0": config(loss__alpha=1.0, loss__beta=0.25, **shape),
                "m1": config(loss__alpha=0.25, loss__beta=1.0, train__lr=5e-4, **shape),
                "m2": config(loss__alpha=0.5, loss__beta=0.5, train__grad_clip=0.05, train__weight_decay=0.1,
                             train__min_lr=1e-3, **shape)}
    members = [Member(name, cfg, tmp_path / name) for name, cfg in variants.items()]
    results = train_cohort(members, store_url)
    assert {r.status for r in results.values()} == {"complete"}
    for name, cfg in variants.items():
        exported, _, meta = load_checkpoint(results[name].best_checkpoint)
        assert meta["cohort"] == {"members": 3, "name": name}
        assert_states_close(exported.member_state(0), train_alone(cfg, store_url), rtol=1e-4)


@pytest.mark.parametrize("pooling, norm", [("asp", True), ("mean", False)])
def test_members_with_layer_weights_equal_models_trained_alone(tmp_path, pooling, norm):
    """Per-member layer weights are one more fused parameter: each member still equals its model trained alone."""
    url = write_synthetic_store(tmp_path / "layered.zarr", n_train=80, n_dev=24, layers={"a": [0, 3, 6]})
    shape = {"model__pooling": pooling, "model__layer_weights": True, "model__layer_norm_per_layer": norm,
             "train__samples_per_epoch": 192}
    variants = {"m0": config(loss__alpha=1.0, loss__beta=0.25, train__lr=1e-2, **shape),
                "m1": config(loss__alpha=0.25, loss__beta=1.0, train__lr=5e-3, train__grad_clip=0.05, **shape)}
    results = train_cohort([Member(name, cfg, tmp_path / name) for name, cfg in variants.items()], url)
    for name, cfg in variants.items():
        exported, _, meta = load_checkpoint(results[name].best_checkpoint)
        assert meta["layers"] == {"a": [0, 3, 6]} and exported.layers == {"a": 3}
        state, alone = exported.member_state(0), train_alone(cfg, url)
        assert not torch.equal(state["branches.a.mix.logits"], torch.zeros(3))          # the weights learned
        assert_states_close(state, alone, rtol=1e-4)


def test_a_diverging_member_is_dropped_and_the_others_are_unaffected(store_url, tmp_path):
    good = {"m0": config(loss__alpha=1.0), "m1": config(loss__beta=0.5, train__lr=1e-3)}
    diverging = config(train__lr=1e38, train__nonfinite_patience=3)     # weights overflow within a few steps
    with_it = train_cohort([Member(n, c, tmp_path / "with" / n) for n, c in good.items()]
                           + [Member("bad", diverging, tmp_path / "with" / "bad")], store_url)
    without = train_cohort([Member(n, c, tmp_path / "without" / n) for n, c in good.items()], store_url)
    assert with_it["bad"].status == "failed" and "3 consecutive steps" in with_it["bad"].error
    assert with_it["bad"].best_checkpoint is None and with_it["bad"].history == []
    for name in good:
        assert with_it[name].status == without[name].status == "complete"
        a, _, _ = load_checkpoint(with_it[name].best_checkpoint)
        b, _, _ = load_checkpoint(without[name].best_checkpoint)
        assert_states_close(a.member_state(0), b.member_state(0), rtol=1e-5)


def test_member_checkpoints_evaluate_to_the_recorded_metrics(store_url, tmp_path):
    members = [Member("asp", config(train__epochs=2, train__samples_per_epoch=128), tmp_path / "asp"),
               Member("other", config(train__epochs=2, train__samples_per_epoch=128, loss__beta=0.1), tmp_path / "o")]
    for name, result in train_cohort(members, store_url).items():
        metrics, _ = evaluate(result.best_checkpoint, store_url, device="cpu")
        assert metrics == pytest.approx({k: result.best_metrics[k] for k in metrics}, abs=1e-5)
        history = (tmp_path / ("asp" if name == "asp" else "o") / "history.csv").read_text().splitlines()
        assert history[0].startswith("epoch,lr,train_loss,skipped_steps") and len(history) == 3


def test_members_must_share_architecture_and_batch_stream(store_url, tmp_path):
    from mtser.configio import ConfigError

    with pytest.raises(ConfigError, match="one architecture per cohort"):
        train_cohort([Member("a", config(), tmp_path / "a"),
                      Member("b", config(model__pooling="mean"), tmp_path / "b")], store_url)
    with pytest.raises(ConfigError, match="batch_size"):
        train_cohort([Member("a", config(), tmp_path / "a"),
                      Member("b", config(train__batch_size=16), tmp_path / "b")], store_url)


def test_a_mixed_task_cohort_gives_each_member_only_its_tasks_targets(tmp_path):
    from mtser.featurestore.corpus import Utterance
    from mtser.featurestore.store import StoreWriter, open_store
    from mtser.trainer.setup import setup_data

    url = write_synthetic_store(tmp_path / "s.zarr", n_train=40, n_dev=24)
    writer = StoreWriter(url, "part-partial")          # arousal known, valence unknown: multi trains on it, dim not
    rng = np.random.default_rng(0)
    writer.add(Utterance(id="partial.wav", path=None, split="Train", emo_class="H", arousal=5.0, valence=None,
                         dominance=4.0), {"a": rng.normal(size=(5, 12)), "b": rng.normal(size=(5, 8))})
    writer.commit()
    store = open_store(url)
    multi, dim = (Member("multi", config(), tmp_path / "m"),
                  Member("dim", config(train__task="dim", train__select_metric="ccc_mean"), tmp_path / "d"))
    cohort, reordered = setup_data([multi, dim], store), setup_data([dim, multi], store)
    assert "partial.wav" in cohort.train_pool
    # the batch stream draws from the task pools in the members' order, whatever the interpreter's hash seed
    assert cohort.train_pool == list(dict.fromkeys(cohort.pools["multi"] + cohort.pools["dim"]))
    assert reordered.train_pool == list(dict.fromkeys(cohort.pools["dim"] + cohort.pools["multi"])) != cohort.train_pool
    batch = data.BatchReader(store, ["a", "b"], np.float32)(["partial.wav", "Train_0001.wav"])
    classes, attributes = cohort.targets("multi", batch)
    assert classes[0] == batch.classes[0] >= 0 and attributes[0, 0] == 5.0
    classes, attributes = cohort.targets("dim", batch)
    assert classes[0] == -1 and torch.isnan(attributes[0]).all()
    assert torch.equal(attributes[1], batch.attributes[1])


def test_pooling_work_tensors_are_reused_and_a_stale_graph_fails_loudly():
    cfg = config().model
    torch.manual_seed(0)
    model = FusionNetwork({"a": 24, "b": 16}, cfg, members=2)
    mask = torch.arange(30)[None, :] < torch.tensor([30, 11, 25])[:, None]
    features = {name: (torch.randn(3, 30, dim), mask) for name, dim in (("a", 24), ("b", 16))}
    first, _ = model(features)
    memory = {name: branch.pool._work.data_ptr() for name, branch in model.branches.items()}
    assert len(set(memory.values())) == 2          # gathered real frames, per encoder
    second, _ = model(features)                    # same shapes: the same memory, no fresh block
    assert {name: branch.pool._work.data_ptr() for name, branch in model.branches.items()} == memory
    torch.testing.assert_close(first, second)
    second.sum().backward()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        first.sum().backward()                     # its saved frames were overwritten: refused, never wrong


def test_cohort_adamw_steps_each_active_member_as_adamw_alone_and_leaves_the_others_exactly():
    from mtser.trainer.cohort import CohortAdamW

    cfg = config().model
    torch.manual_seed(0)
    alone = [FusionNetwork({"a": 24, "b": 16}, cfg) for _ in range(2)]
    cohort = FusionNetwork.stack(alone)
    optimizer = CohortAdamW(cohort, torch.tensor([1e-2, 3e-3]), torch.tensor([0.1, 0.0]))
    reference = torch.optim.AdamW(alone[0].parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        grads = {name: torch.randn_like(p) for name, p in cohort.named_parameters()}
        for name, p in cohort.named_parameters():
            p.grad = grads[name].clone()
        for name, p in alone[0].named_parameters():
            p.grad = grads[name][:1].clone()
        before = cohort.member_state(1)
        optimizer.step(active=torch.tensor([True, False]))
        reference.step()
        assert_states_close(cohort.member_state(0), alone[0].member_state(0), rtol=1e-6)
        after = cohort.member_state(1)
        assert all(torch.equal(after[k], before[k]) for k in before)       # inactive: not a bit changed
    assert optimizer.steps.tolist() == [3.0, 0.0]
    assert all(float(optimizer.state[p]["exp_avg"][1].abs().max()) == 0.0 for p in cohort.parameters())


def test_members_may_differ_in_the_penalty_gradient(store_url, tmp_path):
    """`loss.penalty_weight_grad` per member: each member equals its model trained alone, and the flag matters."""
    dim = {"train__task": "dim", "train__select_metric": "ccc_mean", "loss__sigma": 1.0}
    variants = {"through": config(**dim), "detached": config(loss__penalty_weight_grad=False, **dim)}
    results = train_cohort([Member(name, cfg, tmp_path / name) for name, cfg in variants.items()], store_url)
    states = {}
    for name, cfg in variants.items():
        states[name] = load_checkpoint(results[name].best_checkpoint)[0].member_state(0)
        assert_states_close(states[name], train_alone(cfg, store_url), rtol=1e-4)
    with pytest.raises(AssertionError, match="relative difference"):
        assert_states_close(states["detached"], states["through"], rtol=1e-3)


def test_float16_loss_scaling_keeps_members_independent():
    """One member's float16 overflow (its scaled loss is inf) skips only its own step and halves only its own scale:
    the other member steps bit for bit as in a run without the overflow, and the overflowing member follows
    `torch.amp.GradScaler` on a model alone (same scales, same skipped step). Device-independent: runs on the CPU."""
    import copy

    from mtser.trainer.cohort import CohortAdamW, MemberGradScaler, step_members
    from mtser.trainer.config import LossConfig

    cfg = config(model__dropout=0.0).model
    torch.manual_seed(0)
    members = [FusionNetwork({"a": 24, "b": 16}, cfg) for _ in range(2)]
    mask = torch.arange(30)[None, :] < torch.tensor([30, 11, 25, 7])[:, None]
    batches = [({name: (torch.randn(4, 30, dim), mask) for name, dim in (("a", 24), ("b", 16))},
                torch.tensor([0, 3, -1, 7]), 1 + 6 * torch.rand(4, 3)) for _ in range(5)]
    loss_fn = build_loss("multi", LossConfig(), np.ones(8))
    overflow_step, huge = 1, 1e36                     # 1e36·loss·2¹⁵ overflows float32 (max 3.4e38)

    def run(overflow: bool) -> tuple[list[list[dict[str, torch.Tensor]]], list[list[float]], CohortAdamW]:
        cohort = FusionNetwork.stack(members)
        optimizer = CohortAdamW(cohort, torch.tensor([1e-3, 2e-3]), torch.tensor([0.01, 0.0]))
        scaler = MemberGradScaler(2, torch.device("cpu"), enabled=True, growth_interval=2)
        states, scales = [], []
        for step, (features, classes, attributes) in enumerate(batches):
            logits, attrs = cohort(features)
            losses = torch.stack([loss_fn(logits[g], attrs[g], classes, attributes) for g in range(2)])
            if overflow and step == overflow_step:
                losses = losses * torch.tensor([1.0, huge])
            assert step_members(cohort, optimizer, scaler, losses, torch.tensor([1.0, 0.5])).all()
            states.append([cohort.member_state(g) for g in range(2)])
            scales.append(scaler.scale.tolist())
        return states, scales, optimizer

    clean_states, clean_scales, _ = run(overflow=False)
    states, scales, optimizer = run(overflow=True)
    for step in range(len(batches)):                 # member 0: exactly as without member 1's overflow
        assert all(torch.equal(states[step][0][k], clean_states[step][0][k]) for k in clean_states[step][0])
    assert [s[0] for s in scales] == [s[0] for s in clean_scales] == [2.0**16, 2.0**17, 2.0**17, 2.0**18, 2.0**18]
    assert [s[1] for s in scales] == [2.0**16, 2.0**15, 2.0**15, 2.0**16, 2.0**16]   # halved once, then grows
    assert all(torch.equal(states[overflow_step][1][k], states[overflow_step - 1][1][k]) for k in states[0][1])
    assert optimizer.steps.tolist() == [5.0, 4.0]

    alone = copy.deepcopy(members[1])                # member 1 against torch's GradScaler on the model alone
    reference = torch.optim.AdamW(alone.parameters(), lr=2e-3, weight_decay=0.0)
    torch_scaler = torch.amp.GradScaler("cpu", growth_interval=2)
    for step, (features, classes, attributes) in enumerate(batches):
        logits, attrs = alone(features)
        loss = loss_fn(logits[0], attrs[0], classes, attributes) * (huge if step == overflow_step else 1.0)
        reference.zero_grad()
        torch_scaler.scale(loss).backward()
        torch_scaler.unscale_(reference)
        torch.nn.utils.clip_grad_norm_(alone.parameters(), 0.5)
        torch_scaler.step(reference)
        torch_scaler.update()
        assert torch_scaler.get_scale() == scales[step][1]
        assert_states_close(states[step][1], alone.member_state(0), rtol=1e-4)
