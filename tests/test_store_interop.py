"""Other readers of the store: tensorstore alone reads every array (schema 2 uses Zarr v3 core types only), and a
store written in schema 1 by mtser 0.1 keeps reading and takes new parts."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tensorstore as ts

from mtser.featurestore.layout import FLOAT_COLUMNS, TABLE_COLUMNS
from mtser.featurestore.store import StoreWriter, create_store, open_store, quantize_int8, register_encoder
from mtser.featurestore.verify import verify_store
from store_helpers import encoder_info, frames_for, utterance, write_part

SCHEMA1 = Path(__file__).parent / "fixtures" / "store_schema1.zarr"     # written by mtser 0.1 (schema 1)
CORE_TYPES = {"bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "float16",
              "float32", "float64"}


def _ts_array(root: Path, path: str) -> np.ndarray:
    return ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(root / path)}},
                   read=True).result().read().result()


def _ts_strings(root: Path, path: str) -> list[str]:
    data, offsets = _ts_array(root, f"{path}/utf8").tobytes(), _ts_array(root, f"{path}/offsets")
    return [data[a:b].decode() for a, b in zip(offsets[:-1], offsets[1:])]


def test_tensorstore_alone_reads_every_array_with_mtsers_values(tmp_path: Path) -> None:
    url = str(tmp_path / "store.zarr")
    create_store(url)
    register_encoder(url, encoder_info("wavlm", dim=16))
    register_encoder(url, encoder_info("small", dim=16, dtype="int8", compression="zstd"))
    writer = StoreWriter(url, "p0")
    ids = ["a.wav", "ç-ü.wav", "c.wav"]
    writer.add(utterance(ids[0], "Train", emo_class="H", arousal=4.5, transcript="héllo wörld", speaker="7"),
               {"wavlm": frames_for(ids[0]), "small": frames_for(ids[0])})
    writer.add(utterance(ids[1], "Development"), {"wavlm": frames_for(ids[1]), "small": frames_for(ids[1])})
    writer.add(utterance(ids[2], None), {"wavlm": frames_for(ids[2])})
    writer.add_failure("d.wav", "/audio/d.wav", "audio", "cannot decode: not a RIFF file")
    writer.commit()
    root = Path(url)
    arrays = sorted(str(p.parent.relative_to(root)) for p in root.rglob("zarr.json")
                    if json.loads(p.read_text())["node_type"] == "array")
    dtypes = {a: json.loads((root / a / "zarr.json").read_text())["data_type"] for a in arrays}
    assert set(dtypes.values()) <= CORE_TYPES, dtypes
    opened = {a: _ts_array(root, a) for a in arrays}                      # every array opens, none refused
    assert len(opened) == len(arrays) > 30

    store = open_store(url)
    table_ids = _ts_strings(root, "parts/p0/utterances/id")
    assert table_ids == ids
    for col in TABLE_COLUMNS:
        expected = store.utterances[col].reindex(table_ids).tolist()
        if col in FLOAT_COLUMNS:
            np.testing.assert_array_equal(_ts_array(root, f"parts/p0/utterances/{col}"), np.array(expected, float))
        else:
            got = [v or None for v in _ts_strings(root, f"parts/p0/utterances/{col}")]
            assert got == [None if pd.isna(v) else v for v in expected], col
    assert store.utterances.loc["a.wav", "transcript"] == "héllo wörld"
    assert _ts_strings(root, "parts/p0/failures/reason") == ["cannot decode: not a RIFF file"]
    for enc, expected_ids in (("wavlm", ids), ("small", ids[:2])):
        base = f"parts/p0/features/{enc}"
        assert _ts_strings(root, f"{base}/ids") == expected_ids
        offsets, frames = _ts_array(root, f"{base}/offsets"), _ts_array(root, f"{base}/frames")
        for i, utt_id in enumerate(expected_ids):
            got = frames[offsets[i]:offsets[i + 1]]
            if enc == "small":
                got = got * _ts_array(root, f"{base}/scale")[offsets[i]:offsets[i + 1], None]
                q, scale = quantize_int8(frames_for(utt_id))
                np.testing.assert_array_equal(got, q * scale[:, None])
            np.testing.assert_array_equal(got, store.get(utt_id, enc))


def test_a_schema_1_store_keeps_reading_and_takes_schema_2_parts(tmp_path: Path) -> None:
    url = str(tmp_path / "old.zarr")
    shutil.copytree(SCHEMA1, url)
    store = open_store(url)
    assert store.attrs["schema_version"] == 1
    assert store.ids() == ["a.wav", "b.wav", "ç.wav"] and store.ids(encoder="small") == ["a.wav", "ç.wav"]
    row = store.utterances.loc["a.wav"]
    assert (row.split, row.emo_class, row.arousal, row.speaker, row.transcript) == (
        "Train", "H", 4.5, "Unknown", "héllo wörld")
    assert store.utterances.loc["b.wav", "split"] == "Test1"                     # p1 committed after p0
    np.testing.assert_array_equal(store.get("b.wav", "wavlm"), frames_for("b.wav", 8, version=1).astype(np.float16))
    np.testing.assert_array_equal(store.get("ç.wav", "wavlm"), frames_for("ç.wav", 8).astype(np.float16))
    q, scale = quantize_int8(frames_for("a.wav", 8))
    np.testing.assert_array_equal(store.get("a.wav", "small"), q * scale[:, None])
    assert store.failures["id"].tolist() == ["d.wav"]
    assert verify_store(url).ok

    write_part(url, "p2", ["e.wav", "a.wav"], ["wavlm"], dim=8, version=2)      # appending writes schema 2
    assert json.loads((Path(url) / "zarr.json").read_text())["attributes"]["mtser"]["schema_version"] == 2
    assert (Path(url) / "parts/p2/features/wavlm/ids/utf8/zarr.json").is_file()
    store = open_store(url)
    assert store.ids() == ["a.wav", "b.wav", "e.wav", "ç.wav"]
    np.testing.assert_array_equal(store.get("a.wav", "wavlm"), frames_for("a.wav", 8, version=2).astype(np.float16))
    np.testing.assert_array_equal(store.get("ç.wav", "wavlm"), frames_for("ç.wav", 8).astype(np.float16))
    report = verify_store(url)
    assert report.ok and report.utterances == 3 + 2 + 1 + 2


@pytest.mark.parametrize("values", [[], [""], ["", "x", ""], ["ünï", "", "日本語", "a b"]])
def test_string_columns_round_trip_through_utf8_and_offsets(tmp_path: Path, values: list[str]) -> None:
    from mtser.featurestore.arrays import decode_strings, encode_strings

    data, offsets = encode_strings(values)
    assert data.dtype == np.uint8 and offsets.dtype == np.int64 and len(offsets) == len(values) + 1
    assert decode_strings("col", data, offsets).tolist() == values
