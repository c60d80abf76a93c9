"""The zarr-python and tensorstore snippets of docs/store-format.md read what mtser wrote, with mtser blocked from
importing."""
from __future__ import annotations

import json
import re
from dataclasses import replace
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mtser.featurestore.store import StoreWriter, create_store, open_store, register_encoder
from store_helpers import encoder_info, frames_for, utterance, write_part

DOC = Path(__file__).resolve().parents[1] / "docs" / "store-format.md"
RUNNER = """
import importlib.abc, json, sys
class NoMtser(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "mtser" or name.startswith("mtser."):
            raise ImportError("mtser is blocked in this test")
sys.meta_path.insert(0, NoMtser())
{snippet}
store, requests = sys.argv[1], json.loads(sys.argv[2])
out = {{f"{{u}}|{{e}}|{{k}}": read_utterance(store, u, e, k).astype("float64").tolist() for u, e, k in requests}}
assert not any(m == "mtser" or m.startswith("mtser.") for m in sys.modules)
print(json.dumps(out))
"""


def doc_snippet(reader: str) -> str:
    section = DOC.read_text().split(f"## Reading one utterance with {reader} alone", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.parametrize("reader", ["zarr-python", "tensorstore"])
def test_documented_snippet_reads_identical_values_without_mtser(tmp_path: Path, reader: str) -> None:
    url = str(tmp_path / "store.zarr")
    create_store(url)
    register_encoder(url, encoder_info("wavlm", dim=16))
    register_encoder(url, encoder_info("small", dim=16, dtype="int8", compression="zstd"))
    register_encoder(url, replace(encoder_info("deep", dim=4), layers=[0, 6, 12]))     # 3 layers of 4 values
    register_encoder(url, replace(encoder_info("qdeep", dim=8, dtype="int8", compression="zstd"), layers=[3, 1]))
    ids = [f"u{i}.wav" for i in range(6)]
    write_part(url, "p0", ids, ["wavlm", "small"])
    writer = StoreWriter(url, "p2")                               # (T, L, D) frames of the layered encoders
    for utt_id in ids:
        writer.add(utterance(utt_id), {"deep": frames_for(utt_id, dim=12).reshape(-1, 3, 4),
                                       "qdeep": frames_for(utt_id, dim=16).reshape(-1, 2, 8)})
    writer.commit()
    write_part(url, "p1", ids[:2], ["wavlm"], version=1)          # re-extracted: the later commit wins
    requests = [(ids[0], "wavlm", None), (ids[4], "wavlm", None), (ids[3], "small", None), (ids[2], "deep", 6),
                (ids[5], "deep", None), (ids[1], "qdeep", 1), (ids[0], "qdeep", 3)]
    out = subprocess.run([sys.executable, "-c", RUNNER.format(snippet=doc_snippet(reader)), url, json.dumps(requests)],
                         capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    store = open_store(url)
    for utt_id, enc, layer in requests:
        want = store.get(utt_id, enc, layers=None if layer is None else [layer])
        want = want if layer is None else want[:, 0]
        np.testing.assert_array_equal(np.array(got[f"{utt_id}|{enc}|{layer}"]), want.astype(np.float64))
    np.testing.assert_array_equal(np.array(got[f"{ids[0]}|wavlm|None"]),
                                  frames_for(ids[0], version=1).astype(np.float16).astype(np.float64))
    deep = frames_for(ids[2], dim=12).reshape(-1, 3, 4)           # what write_part gave: (T, 12) as (T, 3, 4)
    np.testing.assert_array_equal(np.array(got[f"{ids[2]}|deep|6"]), deep[:, 1].astype(np.float16).astype(np.float64))
    if reader == "zarr-python":                              # the attributes the doc names, as zarr-python sees them
        import zarr

        root = zarr.open_group(url, mode="r")
        assert root.attrs["mtser"]["schema_version"] == 2 and root["encoders/small"].attrs["mtser_encoder"]["dim"] == 16
