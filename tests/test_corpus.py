"""Corpus readers on hand-written fixtures: surviving utterances and the exact problem reported per bad row."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mtser.featurestore.corpus import (
    CorpusError, CorpusProblem, Utterance, read_corpus, read_folder, read_manifest, read_msp_podcast,
)
from mtser.featurestore.labels import CLASSES

FIXTURES = Path(__file__).parent / "fixtures"
MSP = FIXTURES / "msp_small"
MANIFESTS = FIXTURES / "manifest"
LABELS = "Labels/labels_consensus.csv"


def _by_id(utterances: list[Utterance]) -> dict[str, Utterance]:
    return {u.id: u for u in utterances}


# ------------------------------------------------------------------------------------------------------ MSP-Podcast
def test_msp_reader_reports_every_bad_row_with_file_line_and_reason() -> None:
    result = read_msp_podcast(MSP)
    assert result.layout == "msp-podcast"
    assert [str(p) for p in result.problems] == [
        f"{LABELS}:7: MSP-PODCAST_0002_0002.wav: unknown class code 'Q'",
        f"{LABELS}:8: MSP-PODCAST_0002_0003.wav: EmoAct 8.5 outside 1..7",
        f"{LABELS}:9: MSP-PODCAST_0002_0004.wav: EmoVal is not a number: 'abc'",
        f"{LABELS}:10: MSP-PODCAST_0002_0005.wav: EmoDom 0.5 outside 1..7",
        f"{LABELS}:11: MSP-PODCAST_0003_0001.wav: audio file Audios/MSP-PODCAST_0003_0001.wav not found",
        f"{LABELS}:12: MSP-PODCAST_0001_0001.wav: duplicate FileName (first on line 2)",
        f"{LABELS}:13: MSP-PODCAST_0003_0002.wav: unknown split 'Validation' "
        "(expected one of Train, Development, Test1, Test2, Test3)",
        f"{LABELS}:14: MSP-PODCAST_0003_0003.wav: expected 8 fields, got 7",
        f"{LABELS}:16: empty FileName",
        f"{LABELS}:17: MSP-PODCAST_0003_0004.wav: EmoAct is not a number: 'nan'",
        f"Audios: MSP-PODCAST_9999_0001.wav: not in {LABELS}; kept unlabelled with no split",
        "Transcripts/MSP-PODCAST_0001_0004.txt: MSP-PODCAST_0001_0004.wav: not UTF-8 (byte 3); kept without transcript",
        "Transcripts/MSP-PODCAST_0002_0001.txt: MSP-PODCAST_0002_0001.wav: empty transcript; kept without transcript",
    ]
    assert result.problems[0] == CorpusProblem(LABELS, 7, "MSP-PODCAST_0002_0002.wav", "unknown class code 'Q'")


def test_msp_reader_keeps_valid_rows_unknown_speakers_o_x_and_test3_audio() -> None:
    result = read_msp_podcast(MSP)
    utts = _by_id(result.utterances)
    assert list(utts) == sorted(utts) == [
        "MSP-PODCAST_0001_0001.wav", "MSP-PODCAST_0001_0002.wav", "MSP-PODCAST_0001_0003.wav",
        "MSP-PODCAST_0001_0004.wav", "MSP-PODCAST_0002_0001.wav", "MSP-PODCAST_9999_0001.wav",
        "MSP-PODCAST_test3_0001.wav", "MSP-PODCAST_test3_0002.wav",
    ]
    first = utts["MSP-PODCAST_0001_0001.wav"]                  # the first of two rows with this FileName wins
    assert (first.emo_class, first.arousal, first.valence, first.dominance) == ("A", 6.0, 2.0, 5.5)
    assert (first.speaker, first.gender, first.split) == ("101", "Male", "Train")
    assert (first.transcript, first.transcript_source) == ("I am furious about this.", "human")
    assert first.path == str(MSP / "Audios" / "MSP-PODCAST_0001_0001.wav")
    unknown = utts["MSP-PODCAST_0001_0002.wav"]
    assert (unknown.speaker, unknown.split, unknown.transcript, unknown.transcript_source) == (
        "Unknown", "Development", None, None)
    assert utts["MSP-PODCAST_0001_0003.wav"].emo_class == "O"
    assert utts["MSP-PODCAST_0001_0003.wav"].transcript == "Well, hm."
    assert utts["MSP-PODCAST_0001_0004.wav"].emo_class == "X"
    assert utts["MSP-PODCAST_0001_0004.wav"].transcript is None     # not UTF-8: kept, reported, no transcript
    assert utts["MSP-PODCAST_0002_0001.wav"].split == "Test1"
    for name in ("MSP-PODCAST_test3_0001.wav", "MSP-PODCAST_test3_0002.wav"):  # unlisted file, and empty-label row
        test3 = utts[name]
        assert (test3.split, test3.emo_class, test3.arousal, test3.speaker, test3.transcript) == (
            "Test3", None, None, None, None)
    assert utts["MSP-PODCAST_9999_0001.wav"].split is None


def test_msp_reader_missing_required_column_reads_no_rows(tmp_path: Path) -> None:
    root = shutil.copytree(MSP, tmp_path / "msp")
    lines = (root / LABELS).read_text().splitlines()
    (root / LABELS).write_text("\n".join(",".join(c for i, c in enumerate(line.split(",")) if i != 3)
                                         for line in lines) + "\n")   # drop EmoVal
    result = read_msp_podcast(root)
    assert str(result.problems[0]) == (
        f"{LABELS}:1: missing required column(s) EmoVal; no rows read "
        "(header: FileName,EmoClass,EmoAct,EmoDom,SpkrID,Gender,Split_Set)")
    assert result.utterances == [] and len(result.problems) == 1   # no label file, no trusted utterance


def test_msp_reader_skips_a_label_row_that_is_not_utf8(tmp_path: Path) -> None:
    root = shutil.copytree(MSP, tmp_path / "msp")
    lines = (root / LABELS).read_bytes().split(b"\n")
    lines[2] = lines[2].replace(b"Unknown,Development", b"Unknown,D\xe9velopment")  # line 3
    (root / LABELS).write_bytes(b"\n".join(lines))
    result = read_msp_podcast(root)
    assert str(result.problems[0]) == f"{LABELS}:3: MSP-PODCAST_0001_0002.wav: not UTF-8"
    assert [str(p) for p in result.problems[1:]] == [str(p) for p in read_msp_podcast(MSP).problems]
    assert "MSP-PODCAST_0001_0002.wav" not in _by_id(result.utterances)
    assert len(result.utterances) == len(read_msp_podcast(MSP).utterances) - 1


def test_msp_reader_refuses_a_folder_without_a_label_file(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match="no Labels/labels_consensus.csv"):
        read_msp_podcast(tmp_path)


def test_msp_reader_reads_the_demo_corpus_cleanly(demo_corpus_dir: Path) -> None:
    result = read_corpus(demo_corpus_dir)
    assert result.layout == "msp-podcast" and result.problems == []
    assert len(result.utterances) == len(list((demo_corpus_dir / "Audios").iterdir()))
    test3 = [u for u in result.utterances if u.split == "Test3"]
    assert test3 and all(u.emo_class is None and u.transcript is None for u in test3)
    labelled = [u for u in result.utterances if u.split in ("Train", "Development")]
    assert {u.emo_class for u in labelled} >= set(CLASSES)
    assert any(u.transcript is None for u in labelled) and any(u.transcript_source == "human" for u in labelled)


# --------------------------------------------------------------------------------------------------------- manifest
AUDIO = MANIFESTS / "audio"


@pytest.mark.parametrize("name, problems, first, empty, last", [
    ("manifest.csv", [
        "4: u3: audio file {audio}/missing.wav not found",
        "5: u4: unknown split 'Dev' (expected one of Train, Development, Test1, Test2, Test3)",
        "6: u1: duplicate id (first on line 2)",
        "8: u6: unknown class code 'Z'",
    ], Utterance(id="u1", path=str(AUDIO / "a.wav"), split="Train", emo_class="H", arousal=5.5, valence=6.0,
                 dominance=4.5, speaker="s1", gender="Female", transcript="What a lovely day",
                 transcript_source="human"),
     Utterance(id="u2", path=str(AUDIO / "b.wav")),                                      # empty cells: unknown
     Utterance(id="u5", path=str(AUDIO / "sub" / "c.flac"), split="Test1", emo_class="A", arousal=6.0, valence=2.0,
               dominance=6.0, speaker="s4", gender="Male", transcript="Quoted, with a comma",
               transcript_source="human")),
    ("manifest.jsonl", [
        "3: not valid JSON: Expecting property name enclosed in double quotes",
        "4: expected a JSON object",
        "5: missing required key(s) id",
        "6: j4: arousal is not a number: 'high'",
        "7: j5: valence 0 outside 1..7",
        "10: j1: duplicate id (first on line 1)",
    ], Utterance(id="j1", path=str(AUDIO / "a.wav"), split="Development", emo_class="C", arousal=3.5, valence=3.0,
                 dominance=5.5, speaker="Unknown", transcript="Whatever.", transcript_source="human"),
     Utterance(id="j2", path=str(AUDIO / "sub" / "c.flac")),                            # absent keys: unknown
     Utterance(id="j6", path=str(AUDIO / "b.wav"))),                                    # null and "": unknown
])
def test_manifest_keeps_good_rows_and_reports_each_bad_line(name, problems, first, empty, last) -> None:
    manifest = MANIFESTS / name
    result = read_corpus(manifest)                           # recognised as a manifest by its suffix
    assert result.layout == "manifest" and read_manifest(manifest).utterances == result.utterances
    assert [str(p) for p in result.problems] == [f"{manifest}:{line.format(audio=AUDIO)}" for line in problems]
    assert result.utterances == [first, empty, last]


def test_manifest_accepts_absolute_paths_and_requires_id_and_path(tmp_path: Path) -> None:
    audio = (MANIFESTS / "audio" / "a.wav").resolve()
    good = tmp_path / "m.jsonl"
    good.write_text(json.dumps({"id": "x", "path": str(audio), "emo_class": "N"}) + "\n")
    result = read_manifest(good)
    assert result.problems == [] and result.utterances[0].path == str(audio)
    bad = tmp_path / "m.csv"
    bad.write_text("name,path\nx,a.wav\n")
    result = read_manifest(bad)
    assert result.utterances == []
    assert str(result.problems[0]) == f"{bad}:1: missing required column(s) id; no rows read (header: name,path)"


# ----------------------------------------------------------------------------------------------------------- folder
def test_folder_reader_lists_audio_files_recursively() -> None:
    result = read_folder(MANIFESTS / "audio")
    assert result.layout == "folder" and result.problems == []
    assert [(u.id, u.path) for u in result.utterances] == [
        ("a.wav", str(MANIFESTS / "audio" / "a.wav")), ("b.wav", str(MANIFESTS / "audio" / "b.wav")),
        ("sub/c.flac", str(MANIFESTS / "audio" / "sub" / "c.flac")),
    ]
    assert all(u.split is None and u.emo_class is None for u in result.utterances)


def test_folder_reader_reports_an_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("no audio here")
    result = read_corpus(tmp_path)
    assert result.layout == "folder" and result.utterances == []
    assert str(result.problems[0]) == f"{tmp_path}: no audio files (.wav, .flac, .mp3, .ogg)"


def test_read_corpus_picks_the_reader_and_rejects_non_corpora(tmp_path: Path) -> None:
    assert read_corpus(MSP).layout == "msp-podcast"
    assert read_corpus(MANIFESTS / "manifest.csv").layout == "manifest"
    assert read_corpus(MANIFESTS).layout == "folder"
    with pytest.raises(CorpusError, match="no such file or folder"):
        read_corpus(tmp_path / "absent")
    (tmp_path / "labels.txt").write_text("x")
    with pytest.raises(CorpusError, match="not a corpus"):
        read_corpus(tmp_path / "labels.txt")


def test_symlinked_audio_counts_as_present(tmp_path: Path) -> None:
    """Corpora are often linked into place: a symlink to an audio file is that file; a dangling one is missing."""
    real = tmp_path / "real"
    real.mkdir()
    shutil.copy(MANIFESTS / "audio" / "a.wav", real / "a.wav")
    (tmp_path / "linked").mkdir()
    (tmp_path / "linked" / "x.wav").symlink_to(real / "a.wav")
    manifest = tmp_path / "m.csv"
    manifest.write_text("id,path\nx,linked/x.wav\ny,linked/dangling.wav\n")
    (tmp_path / "linked" / "dangling.wav").symlink_to(real / "gone.wav")
    result = read_manifest(manifest)
    assert [u.id for u in result.utterances] == ["x"]
    dangling = tmp_path / "linked" / "dangling.wav"
    assert [str(p) for p in result.problems] == [f"{manifest}:3: y: audio file {dangling} not found"]


# ------------------------------------------------------------------------- look-alike ids, links out, folders as audio
A1 = "MSP-PODCAST_0001_0001"          # a labelled utterance of the fixture, with a transcript


def _msp_copy(tmp_path: Path) -> Path:
    root = tmp_path / "msp"
    shutil.copytree(MSP, root)
    return root


@pytest.mark.parametrize("layout, first, second", [
    ("folder", "caf\u00e9.wav", "cafe\u0301.wav"),                 # NFC and NFD (macOS) spellings of one name
    ("folder", "x.wav", " x.wav"),                                  # a leading space
    ("folder", "sub/x.wav", " sub/x.wav"),                          # a space around a folder's name
    ("manifest", "caf\u00e9", "cafe\u0301"),
])
def test_lookalike_ids_are_kept_and_warned_about(tmp_path: Path, layout: str, first: str, second: str) -> None:
    from mtser.featurestore.extract_worker import reader_problems

    audio = tmp_path / "audio"
    for i, name in enumerate((first, second)):
        path = audio / (name if layout == "folder" else f"{i}.wav")
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(MANIFESTS / "audio" / "a.wav", path)
    if layout == "manifest":
        (tmp_path / "m.csv").write_text(f"id,path\n{first},audio/0.wav\n{second},audio/1.wav\n")
    result = read_corpus(tmp_path / "m.csv" if layout == "manifest" else audio)
    assert sorted(u.id for u in result.utterances) == sorted([first, second])     # both kept, as given
    later, earlier = max(first, second), min(first, second)
    assert [(p.item, p.reason) for p in result.problems] == [(later, (
        f"looks like id {earlier!r} (differs only in Unicode normalisation or surrounding spaces); both kept as "
        "separate ids"))]
    failures, warnings = reader_problems(result.problems, result.utterances)
    assert failures == [] and [w.utt.id for w in warnings] == [later]             # a warning, not a failure


@pytest.mark.parametrize("where", ["labelled audio", "unlisted test3 audio", "transcript", "folder layout"])
def test_symlinks_out_of_the_corpus_are_refused_unless_allowed(tmp_path: Path, where: str) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    if where == "folder layout":
        root = tmp_path / "audio"
        shutil.copytree(MANIFESTS / "audio", root)
        name, link = "sub/linked.wav", root / "sub" / "linked.wav"
        target = elsewhere / "x.wav"
        shutil.copy(MANIFESTS / "audio" / "a.wav", target)
    else:
        root = _msp_copy(tmp_path)
        name = {"labelled audio": f"{A1}.wav", "unlisted test3 audio": "MSP-PODCAST_test3_0009.wav",
                "transcript": f"{A1}.wav"}[where]
        folder, file = ("Transcripts", f"{A1}.txt") if where == "transcript" else ("Audios", name)
        link = root / folder / file
        target = elsewhere / file
        if link.exists():
            link.rename(target)
        else:
            shutil.copy(MSP / "Audios" / f"{A1}.wav", target)
    link.symlink_to(target)
    (root / "inside.wav").symlink_to(root / ("sub/c.flac" if where == "folder layout" else f"Audios/{A1}.wav"))

    refused = read_corpus(root)
    message = f"symlink to {target}, outside the corpus; not followed (pass --allow-outside-links to read it)"
    problems = [str(p) for p in refused.problems if "symlink" in str(p)]
    assert len(problems) == 1 and message in problems[0] and name in problems[0], problems
    utts = _by_id(refused.utterances)
    allowed = _by_id(read_corpus(root, allow_outside_links=True).utterances)
    if where == "transcript":
        assert utts[name].transcript is None and allowed[name].transcript == "I am furious about this."
    else:
        assert name not in utts and allowed[name].path == str(link)
    assert not [p for p in read_corpus(root, allow_outside_links=True).problems if "symlink" in str(p)]
    if where == "folder layout":                                   # a link that stays inside the corpus is read
        assert "inside.wav" in utts


@pytest.mark.parametrize("layout", ["msp labelled", "msp unlisted", "folder", "manifest"])
def test_a_folder_named_like_audio_is_reported_not_skipped_silently(tmp_path: Path, layout: str) -> None:
    if layout.startswith("msp"):
        root = _msp_copy(tmp_path)
        name = f"{A1}.wav" if layout == "msp labelled" else "MSP-PODCAST_test3_0009.wav"
        folder = root / "Audios" / name
        folder.unlink(missing_ok=True)
        expected = (f"{LABELS}:2: {name}: Audios/{name} is a folder, not an audio file" if layout == "msp labelled"
                    else f"Audios: {name}: a folder named like an audio file; skipped")
    elif layout == "folder":
        root = tmp_path / "audio"
        shutil.copytree(MANIFESTS / "audio", root)
        name, folder = "x.wav", root / "x.wav"
        expected = f"{root}: x.wav: a folder named like an audio file; not read as audio (audio files inside it are)"
    else:
        root = tmp_path / "m.csv"
        name, folder = "x", tmp_path / "x.wav"
        root.write_text("id,path\nx,x.wav\n")
        expected = f"{root}:2: x: audio path {folder} is a folder, not a file"
    folder.mkdir()
    (folder / "inner.wav").write_bytes((MANIFESTS / "audio" / "a.wav").read_bytes())
    result = read_corpus(root)
    assert expected in [str(p) for p in result.problems]
    assert name not in _by_id(result.utterances)
    if layout == "folder":
        assert "x.wav/inner.wav" in _by_id(result.utterances)
