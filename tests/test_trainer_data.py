"""The trainer's loader over a real Zarr store: label filtering per task, sampling, padding, prefetching."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from mtser.featurestore.prefetch import prefetch
from mtser.trainer import data
from trainer_store import write_synthetic_store

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from mtser.featurestore.store import open_store

    return open_store(write_synthetic_store(tmp_path_factory.mktemp("store") / "s.zarr", n_train=60, n_dev=30))


def test_training_ids_follow_the_task(store):
    table = store.utterances
    multi = data.training_ids(store, ["a", "b"], "multi")
    cat = data.training_ids(store, ["a", "b"], "cat")
    dim = data.training_ids(store, ["a", "b"], "dim")
    codes = lambda ids: set(table.loc[ids, "emo_class"])  # noqa: E731
    assert "X" not in codes(multi) | codes(cat) | codes(dim)
    assert "O" in codes(multi) and "O" in codes(dim) and "O" not in codes(cat)
    assert table.loc[dim, ["arousal", "valence", "dominance"]].notna().all().all()
    assert table.loc[cat, ["arousal"]].isna().any().item()  # rows without attributes still train classes
    assert set(table.loc[multi, "split"]) == {"Train"}
    assert table.loc[multi, "augmentation"].notna().any()      # augmented copies are training material
    expected_multi = table[(table.split == "Train") & (table.emo_class != "X")].index
    assert sorted(multi) == sorted(expected_multi)


def test_evaluation_uses_originals_only(store):
    table = store.utterances
    ids = data.evaluation_ids(store, ["a", "b"], "Development")
    assert table.loc[ids, "augmentation"].isna().all() and "X" in set(table.loc[ids, "emo_class"])
    dev = table[table.split == "Development"]
    assert dev.augmentation.notna().any()  # the store has augmented Development copies; they are left out
    assert len(ids) == dev.augmentation.isna().sum()    # X rows stay: the challenge's CCC counts them


def test_epoch_sampling_is_seeded_and_replaces_only_when_needed():
    pool = [f"u{i}" for i in range(50)]
    first = data.epoch_sample(pool, 30, seed=1, epoch=1)
    assert first == data.epoch_sample(pool, 30, seed=1, epoch=1)
    assert first != data.epoch_sample(pool, 30, seed=1, epoch=2) != data.epoch_sample(pool, 30, seed=2, epoch=1)
    assert len(set(first)) == 30                                   # without replacement
    many = data.epoch_sample(pool, 120, seed=1, epoch=1)
    assert len(many) == 120 and set(many) <= set(pool)             # pool smaller: with replacement


def test_batches_pad_and_mask_every_encoder(store):
    ids = data.training_ids(store, ["a", "b"], "multi")[:5]
    batch = data.BatchReader(store, ["a", "b"], np.float32)(ids)
    as_stored = data.BatchReader(store, ["a", "b"])(ids)  # the GPU path: float16 on the host, float32 on device
    assert as_stored.features["a"][0].dtype == torch.float16
    assert torch.equal(as_stored.to("cpu").features["a"][0], batch.features["a"][0])
    for name in ("a", "b"):
        x, mask = batch.features[name]
        lengths = [store.length(i, name) for i in ids]
        assert x.dtype == torch.float32 and x.shape == (5, max(lengths), store.encoders[name].dim)
        assert mask.sum(dim=1).tolist() == lengths
        for row, i in enumerate(ids):
            np.testing.assert_array_equal(x[row, : lengths[row]].numpy(), store.get(i, name).astype(np.float32))
            assert torch.all(x[row, lengths[row]:] == 0)
    labels = data.label_arrays(store.utterances, ids)
    assert torch.equal(batch.classes, torch.from_numpy(labels.classes))


def test_prefetch_reads_ahead_in_order_and_raises_at_the_bad_item():
    started: list[int] = []

    def load(i: int) -> int:
        started.append(i)
        time.sleep(0.01)
        if i == 6:
            raise ValueError("bad item 6")
        return i * i

    stream = prefetch(load, range(10), depth=3, workers=2)
    assert next(stream) == 0
    time.sleep(0.1)
    assert len(started) >= 4  # items 1..3 were loaded in the background while the consumer waited
    assert [next(stream) for _ in range(5)] == [1, 4, 9, 16, 25]
    with pytest.raises(ValueError, match="bad item 6"):
        next(stream)


def test_prefetch_one_ahead_loads_only_the_next_item_while_the_caller_works():
    """depth=1, one worker: extraction's shape (decode the next group of audio while the current one is encoded)."""
    started: list[int] = []
    stream = prefetch(lambda i: started.append(i) or i, range(5), depth=1, workers=1)
    assert next(stream) == 0
    time.sleep(0.05)
    assert started == [0, 1]
    assert list(stream) == [1, 2, 3, 4] and started == [0, 1, 2, 3, 4]


def test_prefetch_stops_when_the_consumer_does():
    loaded: list[int] = []
    stream = prefetch(lambda i: loaded.append(i) or i, range(1000), depth=2)
    assert next(stream) == 0
    stream.close()
    time.sleep(0.05)
    assert len(loaded) <= 5 and not [t for t in threading.enumerate() if t.name.startswith("mtser-prefetch")]


def test_epoch_batches_sort_by_length_within_windows(store):
    pool = data.training_ids(store, ["a", "b"], "multi")
    lengths = data.total_lengths(store, pool, ["a", "b"])
    batches = data.epoch_batches(pool, lengths, 48, 4, seed=0, epoch=3, buckets=6)
    plain = data.epoch_batches(pool, lengths, 48, 4, seed=0, epoch=3, buckets=1)
    # the same utterances as the epoch's sample, only grouped differently
    assert sorted(sum(batches, [])) == sorted(sum(plain, [])) == sorted(data.epoch_sample(pool, 48, 0, 3))
    assert batches == data.epoch_batches(pool, lengths, 48, 4, seed=0, epoch=3, buckets=6)
    padded = lambda bs: sum(len(b) * max(lengths[i] for i in b) for b in bs)  # noqa: E731
    assert padded(batches) < 0.85 * padded(plain)
    longest = [max(lengths[i] for i in b) for b in batches]
    assert longest != sorted(longest)  # the batches come in shuffled order, not short to long


def reference_batch(store, ids, encoders, dtype=None):
    """The loader before it read into padded buffers: one array per utterance (get_many), then `pad`."""
    return {name: data.pad(store.get_many(list(ids), name), dtype) for name in encoders}


def assert_same_batches(reader, reference_store, batches, dtype):
    for ids in batches:
        batch = reader(ids)
        expected = reference_batch(reference_store, ids, ["a", "b"], dtype)
        for name, (x, mask) in expected.items():
            assert batch.features[name][0].dtype == x.dtype
            assert torch.equal(batch.features[name][0], x) and torch.equal(batch.features[name][1], mask)
        labels = data.label_arrays(reference_store.utterances, ids)
        assert torch.equal(batch.classes, torch.from_numpy(labels.classes))
        assert torch.equal(batch.attributes.isnan(), torch.from_numpy(np.isnan(labels.attributes)))
        assert torch.equal(batch.attributes.nan_to_num(), torch.from_numpy(np.nan_to_num(labels.attributes)))


def test_loader_batches_equal_per_utterance_reads_and_padding(store):
    pool = data.training_ids(store, ["a", "b"], "multi")
    batches = data.epoch_batches(pool, data.total_lengths(store, pool, ["a", "b"]), 64, 16, seed=3, epoch=1)
    for dtype in (np.float32, None):
        assert_same_batches(data.BatchReader(store, ["a", "b"], dtype), store, batches, dtype)
    packed = data.BatchReader(store, ["a", "b"], packed=True)             # the GPU path: padded on the device
    for ids in batches:
        batch = packed(ids)
        for name, (x, mask) in reference_batch(store, ids, ["a", "b"], np.float32).items():
            assert batch.features[name][0].shape == (int(mask.sum()), x.shape[-1])
            on_device = batch.to("cpu").features[name]
            assert torch.equal(on_device[0], x) and torch.equal(on_device[1], mask)


def test_loader_on_object_storage_equals_local(store, moto_s3, s3_bucket):
    import s3fs

    from mtser.featurestore.store import open_store

    s3fs.S3FileSystem(**moto_s3, skip_instance_cache=True).put(store.url, f"{s3_bucket}/s.zarr", recursive=True)
    remote = open_store(f"s3://{s3_bucket}/s.zarr", storage_options=moto_s3)
    ids = data.evaluation_ids(store, ["a", "b"], "Development")[:12]
    assert_same_batches(data.BatchReader(remote, ["a", "b"], np.float32), store, [ids[:5], ids[5:]], np.float32)


@pytest.mark.parametrize("read", ["get_many", "padded batch", "packed batch"])
def test_a_damaged_batch_names_only_its_damaged_utterances(tmp_path, read):
    """A batch read that fails names the utterances that fail alone (with their part), not their batch mates."""
    from mtser.featurestore.corpus import Utterance
    from mtser.featurestore.store import StoreError, StoreWriter, open_store

    url = write_synthetic_store(tmp_path / "s.zarr", n_train=12, n_dev=0)
    writer = StoreWriter(url, "part-bad")
    writer.add(Utterance("bad.wav", None, "Train", "A", 2.0, 3.0, 4.0), {"a": np.ones((5, 12)), "b": np.ones((4, 8))})
    writer.commit()
    (tmp_path / "s.zarr/parts/part-bad/features/a/frames/c/0/0").write_bytes(b"")      # its frames are lost
    store = open_store(url)
    good = [i for i in store.ids() if i != "bad.wav"][:5]
    batch = good[:3] + ["bad.wav"] + good[3:]
    with pytest.raises(StoreError) as caught:
        if read == "get_many":
            store.get_many(batch, "a")
        else:
            data.BatchReader(store, ["a", "b"], np.float32, packed=read == "packed batch")(batch)
    message = str(caught.value)
    assert "cannot read frames of 'bad.wav' (" in message and "part-bad" in message
    assert "(1 of 6 read together)" in message
    assert not [i for i in good if i in message], message
