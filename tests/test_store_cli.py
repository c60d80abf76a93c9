"""`mtser features` commands and `verify` against corrupted bytes."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from mtser.cli.main import app
from mtser.featurestore import writer as writer_module
from mtser.featurestore.store import StoreError, create_store, open_store, register_encoder
from mtser.featurestore.verify import verify_store
from store_helpers import encoder_info, frames_for, write_part

IDS = [f"MSP-PODCAST_0003_{i:04d}.wav" for i in range(8)]
runner = CliRunner()


@pytest.fixture
def url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setattr(writer_module, "CHUNK_TARGET_BYTES", 1000)   # many inner chunks even in tiny parts
    path = str(tmp_path / "store.zarr")
    create_store(path)
    register_encoder(path, encoder_info("wavlm", dim=32))
    register_encoder(path, encoder_info("text", dim=8, compression="zstd"))
    register_encoder(path, encoder_info("q", dim=8, dtype="int8"))
    write_part(path, "p0", IDS[:5], ["wavlm"], dim=32)
    write_part(path, "p1", IDS[5:], ["wavlm"], dim=32, split="Development")
    write_part(path, "p2", IDS[:5], ["text", "q"], dim=8)
    write_part(path, "p3", IDS[5:], ["text", "q"], dim=8, split="Development")
    return path


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


def test_ls_reports_encoders_splits_and_bytes(url: str) -> None:
    result = runner.invoke(app, ["features", "ls", url, "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["utterances"] == 8 and summary["parts"] == 4
    assert summary["encoders"]["wavlm"]["per_split"] == {"Train": 5, "Development": 3}
    assert summary["encoders"]["wavlm"]["frames"] == sum(len(frames_for(i, 32)) for i in IDS)
    assert summary["encoders"]["wavlm"]["stored_bytes"] >= summary["encoders"]["wavlm"]["frames"] * 32 * 2
    text = runner.invoke(app, ["features", "ls", url])
    assert text.exit_code == 0 and "wavlm: speech tests/tiny-wavlm, 32-d float16 (none), 8 utterances" in text.output


def test_show_prints_labels_shape_and_stats(url: str) -> None:
    result = runner.invoke(app, ["features", "show", url, IDS[6], "--encoder", "wavlm"])
    assert result.exit_code == 0, result.output
    x = frames_for(IDS[6], 32).astype(np.float16).astype(np.float32)
    assert "split: Development" in result.output
    assert f"[wavlm] shape ({len(x)}, 32) float16: mean {x.mean():.4f}" in result.output
    missing = runner.invoke(app, ["features", "show", url, "nope.wav"])
    assert missing.exit_code == 1 and "no utterance 'nope.wav'" in missing.output


def test_export_npz_and_npy_files(url: str, tmp_path: Path) -> None:
    result = runner.invoke(app, ["features", "export", url, "--encoder", "wavlm", "--ids", IDS[0], "--ids", IDS[7],
                                 "--out", str(tmp_path / "x.npz")])
    assert result.exit_code == 0, result.output
    with np.load(tmp_path / "x.npz") as npz:
        assert sorted(npz.files) == sorted([IDS[0], IDS[7], "index.json"])
        np.testing.assert_array_equal(npz[IDS[7]], frames_for(IDS[7], 32).astype(np.float16))
    result = runner.invoke(app, ["features", "export", url, "-e", "text", "--split", "Train", "--out", str(tmp_path / "d")])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == sorted([f"{i}.npy" for i in IDS[:5]] + ["index.json"])
    np.testing.assert_array_equal(np.load(tmp_path / "d" / f"{IDS[2]}.npy"), frames_for(IDS[2], 8).astype(np.float16))
    bad = runner.invoke(app, ["features", "export", url, "-e", "whisper", "--out", str(tmp_path / "w.npz")])
    assert bad.exit_code == 1 and "no encoder 'whisper'" in bad.output


def test_bad_store_or_options_give_clear_errors_and_exit_codes(url: str, tmp_path: Path) -> None:
    not_store = runner.invoke(app, ["features", "ls", str(tmp_path / "nowhere")])
    assert not_store.exit_code == 1 and "no such store" in not_store.output
    bad_json = runner.invoke(app, ["features", "verify", url, "--storage-options", "{endpoint"])
    assert bad_json.exit_code == 2 and "--storage-options is not valid JSON" in bad_json.output


def test_verify_passes_on_an_intact_store(url: str) -> None:
    result = runner.invoke(app, ["features", "verify", url])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("ok: 4 parts, 24 utterance frame blocks")


@pytest.mark.parametrize("encoder", ["wavlm", "text", "q"])
def test_verify_names_the_utterance_a_flipped_frame_byte_hits(url: str, encoder: str) -> None:
    store = open_store(url)
    seg, i = store.locate(IDS[6], encoder)
    shard = Path(url) / seg.layout.shard_key
    pieces = seg.reader.ranges(int(seg.offsets[i]), int(seg.offsets[i + 1]))
    flip_byte(shard, pieces[-1][1] + 5)         # zstd: the frame header of an inner chunk the utterance spans
    result = runner.invoke(app, ["features", "verify", url])
    assert result.exit_code == 1
    part = "p1" if encoder == "wavlm" else "p3"
    assert f"CORRUPT part '{part}', encoder '{encoder}', utterance '{IDS[6]}'" in result.output
    assert result.output.count("CORRUPT") == (1 if encoder != "text" else result.output.count(f"part '{part}'"))


def test_verify_reports_corrupt_index_arrays_padding_and_shard_index(url: str) -> None:
    store = open_store(url)
    seg, _ = store.locate(IDS[0], "wavlm")
    shard = Path(url) / seg.layout.shard_key
    size = shard.stat().st_size
    flip_byte(shard, size - 10)                                             # the shard index
    offsets = next((Path(url) / "parts/p1/features/wavlm/offsets/c").rglob("*"))
    flip_byte(offsets, offsets.stat().st_size // 2)                          # a small index array
    column = Path(url) / "parts/p2/utterances/split/utf8/c/0"
    flip_byte(column, column.stat().st_size // 2)                          # a table column
    report = verify_store(url)
    messages = [str(p) for p in report.problems]
    assert any(m.startswith("part 'p2': utterance table unreadable") and "checksum mismatch" in m
               for m in messages), messages
    assert any(m.startswith("part 'p0', encoder 'wavlm':") and "shard index checksum mismatch" in m
               and "all 5 utterances" in m for m in messages), messages
    assert any(m.startswith("part 'p1': unreadable part") for m in messages), messages
    with pytest.raises(Exception, match="part 'p1' is unreadable"):
        open_store(url)


def test_verify_and_get_report_a_corrupt_int8_scale_array(url: str) -> None:
    scale_chunk = Path(url) / "parts/p3/features/q/scale/c/0"
    flip_byte(scale_chunk, scale_chunk.stat().st_size // 2)
    problems = [str(p) for p in verify_store(url).problems]
    assert problems and all(p.startswith("part 'p3', encoder 'q', utterance ") for p in problems), problems
    assert "chunk checksum mismatch" in problems[0]
    with pytest.raises(StoreError, match=r"cannot read parts/p3/features/q/scale"):
        open_store(url).get(IDS[6], "q")


def test_verify_reports_a_flipped_padding_byte(url: str) -> None:
    store = open_store(url)
    seg, _ = store.locate(IDS[1], "wavlm")
    lay = seg.layout
    padding = lay.n_chunks * lay.chunk_bytes - lay.rows * lay.row_bytes
    assert padding > 0
    flip_byte(Path(url) / lay.shard_key, lay.rows * lay.row_bytes + padding // 2)
    problems = [str(p) for p in verify_store(url).problems]
    assert problems == ["part 'p0', encoder 'wavlm': padding after the last frame is not zero "
                        "(corrupt bytes hit no utterance)"]


HOSTILE_IDS = ["../../../somewhere/escape.wav", "/tmp/absolute-escape.wav", "file", "allow_pickle", "..", ".hidden",
               "nul\0byte.wav", "é/ü\\back~tilde%41.wav", "x" * 300, "y" * 299 + "é"]


@pytest.mark.parametrize("target", ["dir", "x.npz"])
def test_export_maps_any_id_to_a_safe_name_inside_out(tmp_path: Path, target: str) -> None:
    from mtser.featurestore.export import INDEX, id_of

    store = str(tmp_path / "store.zarr")
    create_store(store)
    register_encoder(store, encoder_info("wavlm", dim=4))
    write_part(store, "p0", HOSTILE_IDS, ["wavlm"], dim=4)
    work = tmp_path / "work"
    (work / "a" / "b" / "c").mkdir(parents=True)
    out = work / "a" / "b" / "c" / target
    before = {p for p in tmp_path.rglob("*")}
    result = runner.invoke(app, ["features", "export", store, "-e", "wavlm", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert f"exported {len(HOSTILE_IDS)} utterances" in result.output
    written = {p for p in tmp_path.rglob("*")} - before
    assert written and all(p == out or out in p.parents for p in written), sorted(map(str, written))
    assert not Path("/tmp/absolute-escape.wav.npy").exists()
    if target == "dir":
        index = json.loads((out / INDEX).read_text())
        arrays = {index["files"][p.name[:-4]]: np.load(p) for p in out.glob("*.npy")}
        assert all(len(p.name.encode()) <= 255 and not p.name.startswith(".") for p in out.iterdir())
    else:
        with np.load(out) as npz:
            index = json.loads(npz[INDEX])
            arrays = {index["files"][k]: npz[k] for k in npz.files if k != INDEX}
    assert sorted(arrays) == sorted(HOSTILE_IDS) and index["encoder"] == "wavlm"
    for utt_id, frames in arrays.items():
        np.testing.assert_array_equal(frames, frames_for(utt_id, 4).astype(np.float16))
    short = {name: utt_id for name, utt_id in index["files"].items() if "~" not in name}
    assert len(short) == len(HOSTILE_IDS) - 2 and all(id_of(n) == i for n, i in short.items())
    assert index["files"]["file"] == "file"
    assert index["files"]["%2E.%2F..%2F..%2Fsomewhere%2Fescape.wav"] == HOSTILE_IDS[0]


def _edit_json(path: Path, edit) -> None:
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))


def _part_record(url: str) -> Path:
    return Path(url) / "parts/p1/zarr.json"


def _drop_offsets_chunk(url: str) -> None:
    next(p for p in (Path(url) / "parts/p1/features/wavlm/offsets/c").rglob("*") if p.is_file()).unlink()


def _remove_commit_marker(url: str) -> None:
    _edit_json(_part_record(url), lambda m: m["attributes"]["mtser_part"].pop("committed"))


def _huge_frames_shape(url: str) -> None:
    _edit_json(Path(url) / "parts/p1/features/wavlm/frames/zarr.json", lambda m: m.update(shape=[10**15, 32]))


def _record_frames(url: str) -> None:
    _edit_json(_part_record(url), lambda m: m["attributes"]["mtser_part"]["encoders"]["wavlm"].update(frames=7))


def _record_count(url: str) -> None:
    _edit_json(_part_record(url), lambda m: m["attributes"]["mtser_part"]["encoders"]["wavlm"].update(n=2))


def _record_utterances(url: str) -> None:
    _edit_json(_part_record(url), lambda m: m["attributes"]["mtser_part"].update(n_utterances=4))


def _store_bytes(url: str) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in Path(url).rglob("*") if p.is_file()}


@pytest.mark.parametrize("damage, message", [
    (_drop_offsets_chunk, "offsets are not 0 < ... strictly increasing"),
    (_remove_commit_marker, "no commit marker"),
    (_huge_frames_shape, "frames shape is [1000000000000000, 32], offsets and the encoder's provenance say"),
    (_record_frames, "the commit record disagrees with the arrays: frames 7"),
    (_record_count, "the commit record disagrees with the arrays: n 2 (arrays: 3)"),
    (_record_utterances, "utterances table has [3] rows per column, its commit record says 4"),
])
def test_structural_damage_is_refused_by_readers_and_reported_by_verify(url: str, damage, message) -> None:
    damage(url)
    before = _store_bytes(url)
    ls = runner.invoke(app, ["features", "ls", url])
    assert ls.exit_code == 1 and "part 'p1'" in ls.output and message in ls.output, ls.output
    assert "Traceback" not in ls.output
    show = runner.invoke(app, ["features", "show", url, IDS[6]])
    assert show.exit_code == 1 and message in show.output, show.output
    result = runner.invoke(app, ["features", "verify", url])
    assert result.exit_code == 1 and "FAILED" in result.output, result.output
    corrupt = [line for line in result.output.splitlines() if line.startswith("CORRUPT")]
    assert corrupt and all(line.startswith("CORRUPT part 'p1'") for line in corrupt) and message in corrupt[0], corrupt
    assert _store_bytes(url) == before                                   # readers never write


def test_flipped_frame_bytes_are_never_read_as_values(url: str) -> None:
    store = open_store(url)
    seg, i = store.locate(IDS[6], "wavlm")
    start, _ = seg.rows(i)
    flip_byte(Path(url) / seg.layout.shard_key, seg.reader.ranges(start, start + 1)[0][1] + 3)
    show = runner.invoke(app, ["features", "show", url, IDS[6], "-e", "wavlm"])
    assert show.exit_code == 1 and f"utterance {IDS[6]!r}" in show.output and "checksum mismatch" in show.output
    assert "mean" not in show.output
    fresh = open_store(url)
    with pytest.raises(StoreError, match="checksum mismatch"):
        fresh.get_many([IDS[5], IDS[6]], "wavlm")
    np.testing.assert_array_equal(fresh.get(IDS[5], "wavlm"), frames_for(IDS[5], 32).astype(np.float16))
    export = runner.invoke(app, ["features", "export", url, "-e", "wavlm", "--out", str(Path(url).parent / "x")])
    assert export.exit_code == 1 and "checksum mismatch" in export.output and not (Path(url).parent / "x").exists()
