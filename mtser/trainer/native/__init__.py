"""Small C kernels for the CPU, compiled on first use with the machine's C compiler and loaded with ctypes.

A kernel is one C file next to this module, built with `-O3 -march=native` into a per-user cache
(`native/` in mtser's cache folder, `featurestore.cache.cache_dir`) under a name that hashes the source, the flags and
the CPU's features (the full SHA-256 of them), so nodes of a cluster sharing one home folder each get a build for
their own CPU. The build is written under a temporary name and renamed into place: concurrent processes (Ray
workers) never load a half-written library. Next to it, `<name>-<key>.so.sha256` records the SHA-256 of the built
file; a cached library is loaded only when its bytes match that record, else it is rebuilt (logged): a stale,
truncated or swapped file is never loaded. (Whoever can write the cache folder can also rewrite the record: the
check guards against damage and mix-ups, not against an attacker with the user's rights.) Where no compiler is
found, the build fails or `MTSER_NATIVE=0` is set, `library` returns None (logged once) and callers use their
PyTorch path. Kernels parallelise with OpenMP: built with `-fopenmp`, a library needs
`libgomp.so.1`, which the dynamic loader resolves to the libgomp PyTorch already loaded, so kernels run on PyTorch's
intra-op threads (`torch.set_num_threads`) rather than on a second pool that would compete with them.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=c11"]


def _cpu_signature() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), platform.processor())
    except OSError:
        return platform.processor()


def cache_dir() -> Path:
    from mtser.featurestore.cache import cache_dir as mtser_cache_dir   # the one cache folder setting

    return mtser_cache_dir() / "native"


@functools.cache
def library(name: str) -> ctypes.CDLL | None:
    """The compiled kernel `name` (the C file `name`.c here), or None where it cannot be built (see the module)."""
    if os.environ.get("MTSER_NATIVE", "1") == "0":
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    source = Path(__file__).with_name(f"{name}.c")
    if compiler is None:
        log.warning("mtser: no C compiler found; %s runs on its PyTorch path (slower on the CPU)", name)
        return None
    key = hashlib.sha256("\0".join([source.read_text(), compiler, *FLAGS, platform.machine(), _cpu_signature()])
                         .encode()).hexdigest()
    target = cache_dir() / f"{name}-{key}.so"
    record = target.with_name(target.name + ".sha256")
    verified = target.exists() and _matches_record(target, record)
    if target.exists() and not verified:
        log.warning("mtser: cached %s does not match the SHA-256 recorded in %s; rebuilding it", target, record.name)
    if not verified and not _build(name, compiler, source, target, record):
        return None
    return ctypes.CDLL(str(target))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _matches_record(target: Path, record: Path) -> bool:
    try:
        return record.read_text().strip() == _sha256(target)
    except OSError:
        return False


def _build(name: str, compiler: str, source: Path, target: Path, record: Path) -> bool:
    """Compile `source` to `target` and record its SHA-256 (both renamed into place); False (logged) on failure."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(dir=target.parent, prefix=f".{name}-", suffix=".so")
    os.close(fd)
    done = subprocess.run([compiler, *FLAGS, "-o", partial, str(source)], capture_output=True, text=True)
    if done.returncode != 0:
        os.unlink(partial)
        log.warning("mtser: building %s failed (%s); it runs on its PyTorch path:\n%s", name, compiler,
                    done.stderr.strip()[-2000:])
        return False
    fd, partial_record = tempfile.mkstemp(dir=target.parent, prefix=f".{name}-", suffix=".sha256")
    with os.fdopen(fd, "w") as f:
        f.write(_sha256(Path(partial)) + "\n")
    os.replace(partial_record, record)
    os.replace(partial, target)
    return True


def call(name: str, function: str, tensors: Sequence[torch.Tensor], sizes: Sequence[int]) -> None:
    """function(tensor data pointers..., int64 sizes...) of the built kernel `name` (tensors contiguous, on the CPU)."""
    getattr(library(name), function)(*(ctypes.c_void_p(t.data_ptr()) for t in tensors),
                                     *(ctypes.c_int64(s) for s in sizes))
