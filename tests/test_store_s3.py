"""The store on S3: moto's real S3 server on 127.0.0.1, reached through s3fs like any bucket."""
from __future__ import annotations

import numpy as np
import pytest
import zarr

from mtser.featurestore.store import StoreError, StoreWriter, create_store, open_store, register_encoder
from mtser.featurestore.verify import verify_store
from store_helpers import encoder_info, frames_for, utterance, write_part

IDS = [f"MSP-PODCAST_0002_{i:04d}.wav" for i in range(10)]


def test_write_read_refresh_and_verify_on_s3(moto_s3: dict, s3_bucket: str) -> None:
    s3_options = moto_s3
    url = f"s3://{s3_bucket}/msp.zarr"
    create_store(url, s3_options)
    register_encoder(url, encoder_info("raw"), s3_options)
    register_encoder(url, encoder_info("packed", compression="zstd"), s3_options)
    register_encoder(url, encoder_info("small", dtype="int8"), s3_options)
    writer = StoreWriter(url, "p0", s3_options)
    for utt_id in IDS[:6]:
        x = frames_for(utt_id)
        writer.add(utterance(utt_id), {"raw": x, "packed": x, "small": x})
    writer.commit()
    store = open_store(url, storage_options=s3_options)
    assert store.ids() == IDS[:6]
    for utt_id in IDS[:6]:
        expected = frames_for(utt_id).astype(np.float16)
        np.testing.assert_array_equal(store.get(utt_id, "raw"), expected)
        np.testing.assert_array_equal(store.get(utt_id, "packed"), expected)
        assert np.abs(store.get(utt_id, "small") - frames_for(utt_id)).max() < 0.05
    batch = store.get_many(IDS[:6][::-1], "raw")                      # one concurrent ranged GET per utterance
    for utt_id, frames in zip(IDS[:6][::-1], batch):
        np.testing.assert_array_equal(frames, frames_for(utt_id).astype(np.float16))

    root = zarr.open_group(zarr.storage.FsspecStore.from_url(url, storage_options=s3_options, read_only=True), mode="r")
    feats = root["parts/p0/features/raw"]
    offsets = feats["offsets"][:]
    np.testing.assert_array_equal(feats["frames"][offsets[2]:offsets[3]], store.get(IDS[2], "raw"))

    write_part(url, "p1", IDS[6:], ["raw"], storage_options=s3_options)
    assert store.ids() == IDS[:6]
    store.refresh()
    assert store.ids(encoder="raw") == IDS
    report = verify_store(url, s3_options)
    assert report.ok and report.utterances == 6 * 3 + 4
    with pytest.raises(StoreError, match="no utterance 'missing.wav'"):
        store.get("missing.wav", "raw")


def test_opening_an_s3_prefix_that_is_not_a_store_fails_clearly(moto_s3: dict, s3_bucket: str) -> None:
    s3_options = moto_s3
    with pytest.raises(StoreError, match="not an mtser feature store"):
        open_store(f"s3://{s3_bucket}/nothing-here.zarr", storage_options=s3_options)



def test_parts_committed_by_another_process_show_up_on_refresh(moto_s3: dict, s3_bucket: str) -> None:
    """s3fs caches listings per process: a store opened before an extraction actor commits must still see the part."""
    import subprocess
    import sys
    from pathlib import Path

    url = f"s3://{s3_bucket}/shared.zarr"
    create_store(url, moto_s3)
    register_encoder(url, encoder_info("raw"), moto_s3)
    store = open_store(url, storage_options=moto_s3)
    assert store.ids() == []
    tests = str(Path(__file__).parent)
    code = (f"import sys; sys.path.insert(0, {tests!r}); from store_helpers import write_part; "
            f"write_part({url!r}, 'p0', {IDS[:2]!r}, ['raw'], storage_options={moto_s3!r})")
    subprocess.run([sys.executable, "-c", code], check=True)
    store.refresh()
    assert store.ids() == IDS[:2]
    assert open_store(url, storage_options=moto_s3).ids() == IDS[:2]
