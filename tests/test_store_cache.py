"""The node cache of a remote store: one download per node and committed state, under a file lock."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from mtser.featurestore import cache
from mtser.featurestore.cache import cached_store
from mtser.featurestore.store import open_store
from store_helpers import write_part


@pytest.fixture
def s3_demo(demo_store, moto_s3, s3_bucket):
    """The demo store uploaded to moto's S3 server; (url, storage options)."""
    import s3fs

    s3fs.S3FileSystem(**moto_s3, skip_instance_cache=True).put(str(demo_store), f"{s3_bucket}/demo.zarr", recursive=True)
    return f"s3://{s3_bucket}/demo.zarr", moto_s3


def test_concurrent_callers_on_a_node_download_once_and_read_the_same_features(s3_demo, demo_store, tmp_path,
                                                                               monkeypatch):
    url, options = s3_demo
    monkeypatch.setenv("MTSER_CACHE_DIR", str(tmp_path / "node"))
    downloads, real = [], cache._download
    monkeypatch.setattr(cache, "_download", lambda *a: downloads.append(a[0]) or real(*a))
    paths: list[str] = []
    threads = [threading.Thread(target=lambda: paths.append(cached_store(url, options))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert downloads == [url] and len(set(paths)) == 1
    assert paths[0].startswith(str(tmp_path / "node" / "stores" / "demo.zarr-"))
    copy, original = open_store(paths[0]), open_store(str(demo_store))
    assert copy.ids() == original.ids() and copy.committed_parts() == original.committed_parts()
    some = original.ids(split="Development")[0]
    for name in original.encoders:
        np.testing.assert_array_equal(copy.get(some, name), original.get(some, name))
    assert not [p for p in (tmp_path / "node" / "stores").iterdir() if ".tmp-" in p.name]   # no half copy left


def test_a_newly_committed_part_makes_a_new_copy_and_local_stores_pass_through(s3_demo, demo_store, tmp_path,
                                                                              monkeypatch):
    url, options = s3_demo
    monkeypatch.setenv("MTSER_CACHE_DIR", str(tmp_path / "node"))
    first = cached_store(url, options)
    assert cached_store(url, options) == first
    name, info = sorted(open_store(str(demo_store)).encoders.items())[0]
    write_part(url, "late", ["late-0001.wav"], [name], dim=info.dim, storage_options=options)
    second = cached_store(url, options)
    assert second != first and "late" in open_store(second).committed_parts()
    assert "late" not in open_store(first).committed_parts()                  # the earlier copy is left whole
    assert cached_store(str(demo_store)) == str(demo_store)
