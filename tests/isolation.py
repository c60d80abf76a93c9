"""What a module pulls in: a fresh interpreter imports it and reports which watched modules got loaded."""
from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def loaded_by(modules: Iterable[str], watched: Iterable[str]) -> list[str]:
    """The names of `watched` that are in `sys.modules` of a new Python process after it imports `modules` (this
    repository first on its path), sorted."""
    code = (f"import sys; import {', '.join(modules)}; "
            f"print('\\n'.join(sorted(m for m in {tuple(watched)!r} if m in sys.modules)))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.split()
