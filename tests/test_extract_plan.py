"""Extraction planning without Ray, torch or audio: shard balance and stable ids, the groups a worker encodes, a
shard's attempts (back to the front of the queue, then given up), and the planning module's imports."""
from __future__ import annotations

from mtser.featurestore.config import EncoderConfig, ExtractConfig
from mtser.featurestore.corpus import Utterance
from mtser.featurestore.extract_plan import (
    MAX_SHARD_ATTEMPTS, ExtractSummary, ShardQueue, plan_shards, shard_groups,
)
from isolation import loaded_by

CFG = ExtractConfig(encoders=[EncoderConfig("wavlm", "speech", "synthetic/wavlm")], shard_seconds=10.0)
UTTS = [Utterance(id=f"u{i}", path=f"u{i}.wav", split="Train" if i % 2 else "Development", duration=float(d))
        for i, d in enumerate([7, 1, 5, 3, 2, 2, 0])]


def test_shards_balance_audio_seconds_with_augmented_copies_and_keep_their_ids():
    shards = plan_shards(UTTS, CFG, augment=1)
    # weights (Train twice): 7, 2, 5, 6, 2, 4, 0 -> 26 s -> ceil(26 / 10) = 3 shards, largest first onto the lightest
    assert [[u.id for u in s.utterances] for s in shards] == [["u0", "u4"], ["u1", "u3", "u6"], ["u2", "u5"]]
    assert [s.seconds for s in shards] == [9.0, 8.0, 9.0] and [s.rows for s in shards] == [2, 5, 3]
    assert sum(s.rows for s in shards) == len(UTTS) + sum(u.split == "Train" for u in UTTS)
    assert [s.id for s in plan_shards(list(reversed(UTTS)), CFG, augment=1)] == [s.id for s in shards]
    assert {s.id for s in plan_shards(UTTS, CFG, augment=0)}.isdisjoint(s.id for s in shards)
    assert plan_shards([], CFG, augment=1) == []


def test_a_shard_is_encoded_in_consecutive_groups_of_about_the_given_seconds():
    groups = shard_groups(UTTS, seconds=8.0)
    assert [[u.id for u in g] for g in groups] == [["u0", "u1"], ["u2", "u3"], ["u4", "u5", "u6"]]
    assert shard_groups([], seconds=8.0) == [[]]


def test_a_failed_attempt_requeues_the_shard_at_the_front_until_it_is_given_up():
    summary = ExtractSummary()
    first, second = plan_shards(UTTS, CFG, augment=0)[:2]
    queue = ShardQueue([first, second], summary)
    assert queue.pop() == first and queue.attempt(first) == f"attempt 1 of {MAX_SHARD_ATTEMPTS}"
    queue.put_back(first)                                           # its worker never started: no attempt counted
    assert len(queue) == 2 and queue.pop() == first and not queue.retried(first)
    assert queue.failed(first, "worker died") == "the shard goes back to the queue for the next free worker"
    assert len(queue) == 2 and queue.retried(first) and queue.attempt(first) == f"attempt 2 of {MAX_SHARD_ATTEMPTS}"
    for _ in range(MAX_SHARD_ATTEMPTS - 1):
        assert queue.pop() == first
        step = queue.failed(first, "worker died again")
    assert step == "the shard is given up" and queue.pop() == second and len(queue) == 0
    assert summary.retries == MAX_SHARD_ATTEMPTS - 1 and summary.shards_failed == {first.id: "worker died again"}


def test_planning_imports_without_torch_ray_or_audio():
    assert loaded_by(["mtser.featurestore.extract_plan", "mtser.featurestore.actors"],
                     ("torch", "ray", "transformers", "soundfile")) == []
