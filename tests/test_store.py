"""Feature store: round trips, table, visibility rules, errors, zarr-python compatibility, threads."""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr

from mtser.featurestore.store import (
    StoreError, StoreWriter, create_store, open_store, quantize_int8, register_encoder,
)
from mtser.featurestore.frames import StoredFrames, as_stored, store_frames
from mtser.featurestore.shards import ShardSpool
from isolation import loaded_by
from store_helpers import encoder_info, frames_for, utterance, write_part

IDS = [f"MSP-PODCAST_0001_{i:04d}.wav" for i in range(12)]


@pytest.fixture
def url(tmp_path: Path) -> str:
    path = str(tmp_path / "store.zarr")
    create_store(path)
    return path


@pytest.mark.parametrize("compression", ["none", "zstd"])
@pytest.mark.parametrize("dtype", ["float16", "float32", "int8"])
def test_round_trip_is_exact_for_each_dtype(url: str, dtype: str, compression: str) -> None:
    register_encoder(url, encoder_info("enc", dim=24, dtype=dtype, compression=compression))
    write_part(url, "p0", IDS, ["enc"], dim=24)
    store = open_store(url)
    for utt_id in IDS:
        x = frames_for(utt_id, 24)
        got = store.get(utt_id, "enc")
        if dtype == "int8":
            q, scale = quantize_int8(x)
            assert got.dtype == np.float32
            np.testing.assert_array_equal(got, q.astype(np.float32) * scale[:, None])
            assert np.all(np.abs(got - x) <= scale[:, None] / 2 + 1e-6)
        else:
            assert got.dtype == np.dtype(dtype)
            np.testing.assert_array_equal(got, x.astype(dtype))
        assert store.length(utt_id, "enc") == len(x)
        assert store.get(utt_id, "enc", dtype=np.float64).dtype == np.float64
        np.testing.assert_array_equal(store.get(utt_id, "enc", np.float32), as_stored(x, dtype))  # the one definition
    for out_dtype in (np.float16, np.float32):            # rows of a padded batch: the same values, zero after
        out = np.full((len(IDS), 300, 24), np.nan, dtype=out_dtype)
        lengths = store.read_into(IDS, "enc", out)
        assert lengths.tolist() == [store.length(i, "enc") for i in IDS]
        for row, utt_id in enumerate(IDS):
            np.testing.assert_array_equal(out[row, :lengths[row]], store.get(utt_id, "enc").astype(out_dtype))
            assert (out[row, lengths[row]:] == 0).all()
        packed = np.empty((int(lengths.sum()), 24), dtype=out_dtype)     # or back to back
        store.read_into(IDS, "enc", packed)
        np.testing.assert_array_equal(packed, np.concatenate([store.get(i, "enc") for i in IDS]).astype(out_dtype))


@pytest.mark.parametrize("compressed", [False, True])
@pytest.mark.parametrize("lengths", [[5, 9, 1], [14], [3, 4]])
def test_streamed_shard_bytes_equal_what_zarr_python_writes(tmp_path: Path, lengths: list[int], compressed: bool) -> None:
    from zarr.codecs import ZstdCodec

    rng = np.random.default_rng(1)
    items = [rng.standard_normal((n, 24)).astype(np.float16) for n in lengths]
    rows, chunk_rows = sum(lengths), 7
    arr = zarr.create_array(str(tmp_path / "z"), shape=(rows, 24), dtype="float16", chunks=(chunk_rows, 24),
                            shards=(-(-rows // chunk_rows) * chunk_rows, 24), fill_value=0,
                            compressors=ZstdCodec(level=3) if compressed else None, config={"write_empty_chunks": True})
    arr[...] = np.concatenate(items)
    spool = ShardSpool(str(tmp_path / "spool" / "0"), 24, np.dtype("float16"), chunk_rows, compressed, level=3)
    for item in items:
        spool.append(item)
    size = spool.finish()
    expected = (tmp_path / "z" / "c" / "0" / "0").read_bytes()
    assert (tmp_path / "spool" / "0").read_bytes() == expected and size == len(expected)


def test_fast_path_is_one_contiguous_range_for_raw_frames(url: str) -> None:
    register_encoder(url, encoder_info("raw"))
    register_encoder(url, encoder_info("packed", compression="zstd"))
    write_part(url, "p0", IDS, ["raw", "packed"])
    store = open_store(url)
    raw_seg, i = store.locate(IDS[3], "raw")
    packed_seg, _ = store.locate(IDS[3], "packed")
    assert len(raw_seg.reader.ranges(int(raw_seg.offsets[i]), int(raw_seg.offsets[i + 1]))) == 1
    assert packed_seg.reader is not None and packed_seg.layout.compressed


def test_utterance_table_keeps_labels_and_unknowns(url: str) -> None:
    register_encoder(url, encoder_info("enc"))
    writer = StoreWriter(url, "p0")
    writer.add(utterance("a.wav", "Development", emo_class="H", arousal=4.5, valence=2.0, dominance=3.25,
                         speaker="Unknown", gender="Female", duration=3.5, transcript="hello there",
                         transcript_source="human"), {"enc": frames_for("a.wav")})
    writer.add(utterance("a.wav.aug1", "Train", augmentation="aug1", source_id="a.wav", transcript_source="asr",
                         transcript="hallo"), {"enc": frames_for("a.wav.aug1")})
    writer.add(utterance("b.wav", None), {})
    writer.add_failure("c.wav", "/audio/c.wav", "audio", "cannot decode: not a RIFF file")
    writer.commit()
    store = open_store(url)
    table = store.utterances
    assert list(table.index) == ["a.wav", "a.wav.aug1", "b.wav"]
    row = table.loc["a.wav"]
    assert (row.split, row.emo_class, row.arousal, row.valence, row.dominance) == ("Development", "H", 4.5, 2.0, 3.25)
    assert (row.speaker, row.gender, row.duration, row.transcript, row.transcript_source) == (
        "Unknown", "Female", 3.5, "hello there", "human")
    aug = table.loc["a.wav.aug1"]
    assert (aug.augmentation, aug.source_id, aug.transcript_source) == ("aug1", "a.wav", "asr")
    assert pd.isna(aug.arousal) and pd.isna(aug.emo_class) and pd.isna(table.loc["b.wav", "split"])
    assert store.ids(encoder="enc") == ["a.wav", "a.wav.aug1"]
    assert store.ids(split="Train") == ["a.wav.aug1"]
    assert not store.has("b.wav", "enc")
    assert store.failures.to_dict("records") == [
        {"id": "c.wav", "path": "/audio/c.wav", "stage": "audio", "reason": "cannot decode: not a RIFF file",
         "part": "p0"}]
    with pytest.raises(StoreError, match=r"'b.wav' has no features for encoder 'enc'"):
        store.get("b.wav", "enc")


def test_batched_get_and_iteration_by_split(url: str) -> None:
    register_encoder(url, encoder_info("a"))
    register_encoder(url, encoder_info("b", dim=8))
    write_part(url, "p0", IDS[:6], ["a"], split="Train")
    write_part(url, "p1", IDS[6:], ["a"], split="Development")
    write_part(url, "p2", IDS[:4], ["b"], dim=8, split="Train")
    store = open_store(url)
    got = store.get_many(IDS[::-1], "a")
    for utt_id, frames in zip(IDS[::-1], got):
        np.testing.assert_array_equal(frames, frames_for(utt_id).astype(np.float16))
    items = list(store.iter_split("Train", ["a", "b"], batch=3))
    assert [u for u, _ in items] == sorted(IDS[:4])
    for utt_id, feats in items:
        np.testing.assert_array_equal(feats["b"], frames_for(utt_id, 8).astype(np.float16))
    assert [u for u, _ in store.iter_split("Development", ["a"])] == sorted(IDS[6:])


def test_latest_commit_wins_and_new_encoders_and_utterances_extend_a_store(url: str) -> None:
    register_encoder(url, encoder_info("a"))
    write_part(url, "p0", IDS[:4], ["a"])
    store = open_store(url)
    register_encoder(url, encoder_info("b"))
    write_part(url, "p1", IDS[:4], ["b"], split="Development")      # a new encoder for the same utterances
    write_part(url, "p2", IDS[2:6], ["a"], version=1)               # re-extracted rows and new utterances
    assert store.committed_parts() == {"p0"} and "b" not in store.encoders
    store.refresh()
    assert store.committed_parts() == {"p0", "p1", "p2"}
    assert store.ids(encoder="a") == IDS[:6] and store.ids(encoder="b") == IDS[:4]
    np.testing.assert_array_equal(store.get(IDS[0], "a"), frames_for(IDS[0], version=0).astype(np.float16))
    np.testing.assert_array_equal(store.get(IDS[2], "a"), frames_for(IDS[2], version=1).astype(np.float16))
    np.testing.assert_array_equal(store.get(IDS[2], "b"), frames_for(IDS[2], version=0).astype(np.float16))
    assert store.utterances.loc[IDS[0], "split"] == "Development"   # p1 committed after p0
    assert store.utterances.loc[IDS[2], "split"] == "Train"         # p2 committed last


def test_add_rejects_bad_features_and_keeps_nothing_of_them(url: str) -> None:
    register_encoder(url, encoder_info("enc"))
    writer = StoreWriter(url, "p0")
    writer.add(utterance("ok.wav"), {"enc": frames_for("ok.wav")})
    bad = {
        "wrong dim": ({"enc": np.ones((5, 3), np.float32)}, r"'x.wav', encoder 'enc': expected a non-empty float \(T, 16\)"),
        "empty": ({"enc": np.ones((0, 16), np.float32)}, "non-empty"),
        "nan": ({"enc": np.full((5, 16), np.nan, np.float32)}, "NaN or inf"),
        "float16 overflow": ({"enc": np.full((5, 16), 1e6, np.float32)}, r"NaN or inf \(as float16\)"),
        "unregistered": ({"other": np.ones((5, 16), np.float32)}, r"encoder 'other' is not registered"),
    }
    for features, message in bad.values():
        with pytest.raises(StoreError, match=message):
            writer.add(utterance("x.wav"), {"enc": frames_for("x.wav"), **features})
    converted = {                                          # frames already converted (the extraction pipeline's)
        "other dtype": (store_frames(frames_for("x.wav"), "float32"), r"expected a non-empty float16 \(T, 16\) array, "
                                                                        "got float32"),
        "scale on floats": (StoredFrames(frames_for("x.wav").astype(np.float16), np.ones(len(frames_for("x.wav")))),
                            "int8 frames need one scale per frame, float frames none"),
        "overflow": (store_frames(np.full((5, 16), 1e6), "float16"), r"NaN or inf \(as float16\)"),
    }
    for frames, message in converted.values():
        with pytest.raises(StoreError, match=message):
            writer.add(utterance("x.wav"), {"enc": frames})
    writer.add(utterance("pre.wav"), {"enc": store_frames(frames_for("pre.wav"), "float16")})
    with pytest.raises(StoreError, match=r"'y.wav': arousal must be a number or None, got 'high'"):
        writer.add(utterance("y.wav", arousal="high"), {"enc": frames_for("y.wav")})
    with pytest.raises(StoreError, match=r"'y.wav': speaker must be a string or None, got 7"):
        writer.add(utterance("y.wav", speaker=7), {})
    with pytest.raises(StoreError, match="'ok.wav': added twice"):
        writer.add(utterance("ok.wav"), {})
    writer.commit()
    store = open_store(url)
    assert store.ids() == ["ok.wav", "pre.wav"]
    np.testing.assert_array_equal(store.get("pre.wav", "enc"), frames_for("pre.wav").astype(np.float16))
    with pytest.raises(StoreError, match="already committed or aborted"):
        writer.add(utterance("y.wav"), {})


def test_unknown_utterance_or_encoder_is_a_clear_error(url: str) -> None:
    register_encoder(url, encoder_info("enc"))
    write_part(url, "p0", IDS[:2], ["enc"])
    store = open_store(url)
    with pytest.raises(StoreError, match=r"no utterance 'nope.wav' in the store"):
        store.get("nope.wav", "enc")
    with pytest.raises(StoreError, match=r"no encoder 'whisper' in the store \(encoders: \['enc'\]\)"):
        store.get(IDS[0], "whisper")
    with pytest.raises(StoreError, match="nope.wav"):
        store.get_many([IDS[0], "nope.wav"], "enc")


def test_opening_something_that_is_not_a_store_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no such store"):
        open_store(str(tmp_path / "missing"))
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "notes.txt").write_text("hello")
    with pytest.raises(StoreError, match="not an mtser feature store"):
        open_store(str(tmp_path / "plain"))
    with pytest.raises(StoreError, match="exists and is not empty"):
        create_store(str(tmp_path / "plain"))
    zarr.create_group(str(tmp_path / "other.zarr"), attributes={"title": "someone else's"})
    with pytest.raises(StoreError, match="not an mtser feature store"):
        open_store(str(tmp_path / "other.zarr"))


def test_a_newer_schema_version_is_refused(url: str) -> None:
    meta_path = Path(url) / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["attributes"]["mtser"]["schema_version"] = 3
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="schema version 3 is newer than this mtser"):
        open_store(url)
    with pytest.raises(StoreError, match="schema version 3"):
        StoreWriter(url, "p0")


def test_register_encoder_is_idempotent_and_refuses_other_provenance(url: str) -> None:
    register_encoder(url, encoder_info("enc"))
    register_encoder(url, encoder_info("enc"))
    with pytest.raises(StoreError, match=r"'enc' is already registered with different provenance \(fields \['dim'\]"):
        register_encoder(url, encoder_info("enc", dim=32))
    with pytest.raises(StoreError, match="dtype must be one of"):
        register_encoder(url, encoder_info("e2", dtype="bfloat16"))
    store = open_store(url)
    assert store.encoders["enc"] == encoder_info("enc")
    assert store.ids(encoder="enc") == [] and not store.has("x.wav", "enc")     # registered, nothing written yet


def test_uncommitted_parts_are_invisible_and_a_rerun_replaces_them(url: str) -> None:
    register_encoder(url, encoder_info("enc"))
    write_part(url, "p0", IDS[:2], ["enc"])
    zarr.create_group(url, path="parts/p1", attributes={"mtser_part": {"committed": False}})
    zarr.create_array(url, name="parts/p1/features/enc/frames", shape=(3, 16), dtype="f2")  # half-written leftovers
    store = open_store(url)
    assert store.committed_parts() == {"p0"} and store.ids() == IDS[:2]
    aborted = StoreWriter(url, "p2")
    aborted.add(utterance(IDS[5]), {"enc": frames_for(IDS[5])})
    aborted.abort()
    assert not (Path(url) / "parts" / "p2").exists()
    write_part(url, "p1", IDS[2:4], ["enc"])
    store.refresh()
    assert store.committed_parts() == {"p0", "p1"} and store.ids() == IDS[:4]
    np.testing.assert_array_equal(store.get(IDS[3], "enc"), frames_for(IDS[3]).astype(np.float16))
    with pytest.raises(StoreError, match="part 'p1' is already committed"):
        StoreWriter(url, "p1")


def test_read_only_open_never_writes(url: str) -> None:
    register_encoder(url, encoder_info("enc"))
    write_part(url, "p0", IDS, ["enc"])
    before = {p: p.stat().st_mtime_ns for p in Path(url).rglob("*")}
    store = open_store(url)
    store.get(IDS[0], "enc")
    _ = store.utterances, store.failures
    store.refresh()
    assert {p: p.stat().st_mtime_ns for p in Path(url).rglob("*")} == before


def test_reads_from_many_threads_agree(url: str) -> None:
    register_encoder(url, encoder_info("enc"))
    register_encoder(url, encoder_info("z", compression="zstd"))
    write_part(url, "p0", IDS, ["enc", "z"])
    store = open_store(url)
    jobs = [(IDS[i % len(IDS)], "enc" if i % 3 else "z") for i in range(600)]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda job: store.get(*job), jobs))
    for (utt_id, _), frames in zip(jobs, results):
        np.testing.assert_array_equal(frames, frames_for(utt_id).astype(np.float16))


def test_store_api_imports_without_torch_or_ray() -> None:
    assert loaded_by(["mtser.featurestore"], ("torch", "ray", "transformers")) == []


def test_the_per_utterance_pipeline_imports_apart_from_the_ray_driver_and_the_store_apart_from_demo_tooling() -> None:
    assert loaded_by(["mtser.featurestore.pipeline", "mtser.featurestore.store"],
                     ("ray", "mtser.featurestore.extract", "mtser.demo", "mtser.trainer", "mtser.cli")) == []


def test_frames_in_another_zarr_layout_are_read_through_zarr_python(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from mtser.featurestore.shards import FramesLayout

    register_encoder(url, encoder_info("enc"))
    write_part(url, "p0", IDS, ["enc"])
    monkeypatch.setattr(FramesLayout, "parse", staticmethod(lambda key, meta: None))
    store = open_store(url)
    assert store.locate(IDS[0], "enc")[0].reader is None
    for utt_id, frames in zip(IDS, store.get_many(IDS, "enc")):
        np.testing.assert_array_equal(frames, frames_for(utt_id).astype(np.float16))


def test_a_pickled_store_reopens_by_url(url: str) -> None:
    import pickle

    register_encoder(url, encoder_info("enc"))
    write_part(url, "p0", IDS[:3], ["enc"])
    copy = pickle.loads(pickle.dumps(open_store(url)))
    np.testing.assert_array_equal(copy.get(IDS[1], "enc"), frames_for(IDS[1]).astype(np.float16))


def test_warnings_are_apart_from_failures_and_a_later_write_clears_a_failure(url: str) -> None:
    register_encoder(url, encoder_info("enc"))
    writer = StoreWriter(url, "p0")
    writer.add(utterance("a.wav"), {"enc": frames_for("a.wav")})
    writer.add_warning("a.wav", "/t/a.txt", "read", "transcript not UTF-8; kept without transcript")
    writer.add_failure("b.wav", "/audio/b.wav", "audio", "cannot decode")
    writer.add_failure("c.wav", "/audio/c.wav", "audio", "cannot decode")
    writer.commit()
    store = open_store(url)
    assert store.warnings[["id", "stage", "part"]].values.tolist() == [["a.wav", "read", "p0"]]
    assert store.failures["id"].tolist() == ["b.wav", "c.wav"] and store.ids() == ["a.wav"]
    write_part(url, "p1", ["b.wav"], ["enc"])                    # a later run wrote b.wav
    store.refresh()
    assert store.failures["id"].tolist() == ["c.wav"]
    assert store.failure_history["id"].tolist() == ["b.wav", "c.wav"]       # history kept
    assert store.summary()["failures"] == 1 and store.summary()["warnings"] == 1
    writer = StoreWriter(url, "p2")
    writer.add_failure("b.wav", "/audio/b.wav", "audio", "cannot decode")   # failing again after the write
    writer.commit()
    store.refresh()
    assert store.failures[["id", "part"]].values.tolist() == [["c.wav", "p0"], ["b.wav", "p2"]]   # commit order


@pytest.mark.parametrize("compression", ["none", "zstd"])
@pytest.mark.parametrize("where", ["local", "s3"])
def test_frames_rewritten_by_zarr_python_with_unwritten_chunks_read_back(where: str, compression: str, tmp_path: Path,
                                                                        request: pytest.FixtureRequest,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A frames array rewritten by plain zarr-python (which leaves all-fill inner chunks unwritten, offset 2**64-1 in
    the shard index) reads back exactly, batched and one by one, locally and over S3, and verifies; on S3 no byte range
    outside the shard file is ever requested."""
    from mtser.featurestore.shards import EMPTY_CHUNK, FsspecByteSource, parse_shard_index
    from mtser.featurestore.verify import verify_store

    requested: list[tuple[str, int, int]] = []
    real_read_many = FsspecByteSource.read_many

    def recording_read_many(self: FsspecByteSource, key_ranges: list[tuple[str, int, int]]) -> list[bytes]:
        requested.extend(key_ranges)
        return real_read_many(self, key_ranges)
    monkeypatch.setattr(FsspecByteSource, "read_many", recording_read_many)

    options = request.getfixturevalue("moto_s3") if where == "s3" else None
    url = f"s3://{request.getfixturevalue('s3_bucket')}/sparse.zarr" if where == "s3" else str(tmp_path / "sparse.zarr")
    create_store(url, options)
    register_encoder(url, encoder_info("enc", dim=256, compression=compression), options)
    rng = np.random.default_rng(0)
    frames = {"a.wav": rng.standard_normal((100, 256)), "silence.wav": np.zeros((600, 256)),
              "b.wav": rng.standard_normal((50, 256))}
    frames = {k: v.astype(np.float32) for k, v in frames.items()}
    writer = StoreWriter(url, "p0", options)
    for utt_id, x in frames.items():
        writer.add(utterance(utt_id), {"enc": x})
    writer.commit()
    zstore = zarr.storage.FsspecStore.from_url(url, storage_options=options, read_only=False) if options else url
    old = zarr.open_array(zstore, path="parts/p0/features/enc/frames", mode="r")
    values, meta = old[...], old.metadata
    zarr.create_array(zstore, name="parts/p0/features/enc/frames", shape=old.shape, dtype=old.dtype, chunks=old.chunks,
                      shards=old.shards, compressors=old.compressors, fill_value=0,
                      overwrite=True)[...] = values          # zarr's default: empty chunks not written
    import fsspec

    fs, root = fsspec.core.url_to_fs(url, **(options or {}))
    shard = fs.cat_file(f"{root}/parts/p0/features/enc/frames/c/0/0")
    n_chunks = meta.chunk_grid.chunk_shape[0] // old.chunks[0]
    index = parse_shard_index(shard[-(n_chunks * 16 + 4):], n_chunks)
    assert (index[:, 0] == EMPTY_CHUNK).sum() >= 3                       # the silence left chunks unwritten

    store = open_store(url, storage_options=options)
    seg, i = store.locate("silence.wav", "enc")
    assert len(seg.reader.ranges(*seg.rows(i))) > 1                   # no longer one contiguous range
    ids = ["silence.wav", "b.wav", "a.wav", "silence.wav"]
    for utt_id, got in zip(ids, store.get_many(ids, "enc")):            # one batch (concurrent ranged GETs on S3)
        np.testing.assert_array_equal(got, frames[utt_id].astype(np.float16))
    np.testing.assert_array_equal(store.get("silence.wav", "enc"), np.zeros((600, 256), np.float16))
    report = verify_store(url, options)
    assert report.ok and report.utterances == 3, [str(p) for p in report.problems]
    frame_reads = [(a, b) for key, a, b in requested if key.endswith("frames/c/0/0")]
    assert all(0 <= a < b <= len(shard) for a, b in frame_reads), frame_reads
    assert len(frame_reads) >= (4 if where == "s3" else 0)
