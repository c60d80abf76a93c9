"""Optional C kernels for the CPU, built at install time and loaded with ctypes where present.

`make native` compiles each C file here, `<name>.c`, into `_<name>.so` next to it (flags in the Makefile:
`-O3 -fopenmp -fPIC -shared -std=c11`, no `-march`, so the library runs on any CPU of its architecture; on x86-64 a
kernel carries an AVX2 + FMA clone of its loops, GCC's `target_clones`, which the dynamic loader picks by the CPU's
features). Nothing is compiled at run time. Where the library is absent (not built, no compiler at install) or
`MTSER_NATIVE=0` is set, `library` returns None and callers use their PyTorch path. Kernels parallelise with
OpenMP: a library needs `libgomp.so.1`, which the dynamic loader resolves to the libgomp PyTorch already loaded, so
kernels run on PyTorch's intra-op threads (`torch.set_num_threads`) rather than on a second pool.
"""
from __future__ import annotations

import ctypes
import functools
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


def path(name: str) -> Path:
    """Where `make native` puts the built kernel `name`."""
    return Path(__file__).with_name(f"_{name}.so")


@functools.cache
def library(name: str) -> ctypes.CDLL | None:
    """The built kernel `name` (from `name`.c here), or None where it is not built or is disabled (see the module)."""
    if os.environ.get("MTSER_NATIVE", "1") == "0":
        return None
    built = path(name)
    if not built.exists():
        return None
    try:
        return ctypes.CDLL(str(built))
    except OSError as e:                      # e.g. built for another architecture: the PyTorch path still works
        log.warning("mtser: %s cannot be loaded (%s); %s runs on its PyTorch path", built, e, name)
        return None


def call(name: str, function: str, tensors: Sequence[torch.Tensor], sizes: Sequence[int]) -> None:
    """function(tensor data pointers..., int64 sizes...) of the built kernel `name` (tensors contiguous, on the CPU)."""
    getattr(library(name), function)(*(ctypes.c_void_p(t.data_ptr()) for t in tensors),
                                     *(ctypes.c_int64(s) for s in sizes))
