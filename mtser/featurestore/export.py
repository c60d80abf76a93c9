"""Exporting one encoder's frames as files: utterance ids are data, never paths.

Each id becomes a file name by one reversible escaping (`file_name`): bytes of its UTF-8 encoding outside
`[A-Za-z0-9_.-]` are written `%XX` (upper-case hex), a leading `.` too, so a name never contains a path separator,
is never `.`/`..` or hidden, and plain ids such as `MSP-PODCAST_0001_0008.wav` keep their spelling. `id_of` undoes
it. A name that would pass the 255-byte limit of file names keeps its first 200 bytes and appends `~` and 16 hex
digits of the id's SHA-256 (a literal `~` is always escaped, so only such names contain one); those are reversed
through the index. Every export writes the index `index.json` ({"format", "encoder", "files": {name: id}}): a
directory export as `OUT/index.json`, an `.npz` export as the member `index.json` next to the `<name>.npy` arrays
(`np.load(...)["index.json"]` gives its bytes). Arrays are written member by member, so no id can clash with a
keyword of `np.savez`. Nothing is written before every frame has been read, and an `.npz` appears by one rename.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import zipfile
from pathlib import Path

import numpy as np

INDEX = "index.json"
SUFFIX = ".npy"
NAME_MAX = 255                  # bytes in one file name (ext4, xfs, apfs, ntfs)
_SAFE = re.compile(rb"[A-Za-z0-9_.\-]")
_KEEP = 200


def file_name(utt_id: str) -> str:
    """The escaped file name (without `.npy`) of an utterance id; see the module."""
    raw = utt_id.encode("utf-8", "surrogatepass")
    name = "".join(chr(b) if _SAFE.fullmatch(bytes([b])) and not (k == 0 and b == ord(".")) else f"%{b:02X}"
                   for k, b in enumerate(raw))
    if len(name) + len(SUFFIX) <= NAME_MAX:
        return name
    head = name[:_KEEP].rsplit("%", 1)[0] if "%" in name[_KEEP - 2:_KEEP] else name[:_KEEP]   # no cut escape
    return f"{head}~{hashlib.sha256(raw).hexdigest()[:16]}"


def id_of(name: str) -> str:
    """The utterance id of an escaped file name (without `.npy`); ValueError for a hashed (`~`) name."""
    if "~" in name:
        raise ValueError(f"{name!r} is a shortened name: look its id up in {INDEX}")
    return re.sub(rb"%([0-9A-F]{2})", lambda m: bytes([int(m.group(1), 16)]),
                  name.encode("ascii")).decode("utf-8", "surrogatepass")


def names_for(ids: list[str]) -> dict[str, str]:
    """file name -> id for `ids` (distinct ids always get distinct names)."""
    names = {file_name(i): i for i in ids}
    if len(names) != len(set(ids)):            # a SHA-256 prefix collision: not expected in practice
        raise RuntimeError("two utterance ids map to one export file name")
    return names


def _index(encoder: str, names: dict[str, str]) -> bytes:
    return json.dumps({"format": "mtser-export", "encoder": encoder, "files": names}, indent=1).encode()


def export_npz(out: Path, encoder: str, arrays: dict[str, np.ndarray]) -> None:
    """`out` as an .npz: one `<name>.npy` member per id plus the index member; written to a temporary sibling
    and renamed into place."""
    names = names_for(list(arrays))
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    try:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            for name, utt_id in names.items():
                with zf.open(name + SUFFIX, "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, np.asarray(arrays[utt_id]), allow_pickle=False)
            zf.writestr(INDEX, _index(encoder, names))
        os.replace(tmp, out)
    except BaseException:
        os.unlink(tmp)
        raise


def export_dir(out: Path, encoder: str, arrays: dict[str, np.ndarray]) -> None:
    """`out/<name>.npy` per id and `out/index.json`; every file is inside `out`."""
    names = names_for(list(arrays))
    out.mkdir(parents=True, exist_ok=True)
    for name, utt_id in names.items():
        np.save(out / (name + SUFFIX), np.asarray(arrays[utt_id]), allow_pickle=False)
    (out / INDEX).write_bytes(_index(encoder, names))
