"""Runs test_shared_prefill.py in a fresh process (its docstring says why) and fails with its output
when any of its tests fails, so the equality tests of the shared prefill stay part of the suite."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.model.test_shared_prefill import ISOLATED_ENV

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def test_shared_prefill_equalities_in_their_own_process():
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfs",
                        str(HERE / "test_shared_prefill.py")],
                       cwd=ROOT, env={**os.environ, ISOLATED_ENV: "1"}, capture_output=True, text=True, timeout=1800)
    tail = r.stdout[-6000:] + r.stderr[-2000:]
    assert r.returncode == 0, tail
    assert " passed" in r.stdout and "skipped" not in r.stdout.splitlines()[-1], tail
