"""Prediction reads no memory it has not written: the same input gives bit-identical logits in a
fresh process, after the allocator has been filled with garbage in the same process, and in a
process whose malloc fills every block it hands out with a non-zero byte pattern (glibc's
``perturb`` tunable, heap used for blocks up to 32 MiB instead of fresh zeroed pages)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from tests.helpers import tiny_predictions

REPO = Path(__file__).resolve().parents[1]
PERTURBED = {"GLIBC_TUNABLES": "glibc.malloc.perturb=165:glibc.malloc.mmap_threshold=33554432"}


def prime_allocator() -> None:
    """Allocate and free blocks of many sizes filled with NaN and huge values."""
    junk = []
    for n in (1 << 10, 1 << 14, 1 << 18, 1 << 20, 1 << 22, 1 << 24):
        junk.append(torch.full((n,), float("nan")))
        junk.append(torch.full((n // 2,), 3.0e38))
        junk.append(np.full(n, -1e30, dtype=np.float32))
    del junk


def _in_subprocess(tmp_path: Path, env: dict) -> dict[str, np.ndarray]:
    out = tmp_path / f"logits_{len(env)}.npz"
    code = f"import numpy as np, tests.helpers as h; np.savez({str(out)!r}, **h.tiny_predictions())"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**os.environ, **env},
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    with np.load(out) as f:
        return {k: f[k] for k in f.files}


def test_prediction_is_bit_identical_whatever_the_memory_held_before(tmp_path):
    first = tiny_predictions()
    prime_allocator()
    again = tiny_predictions()
    fresh = _in_subprocess(tmp_path, {})
    perturbed = _in_subprocess(tmp_path, PERTURBED)
    for name, ref in first.items():
        assert np.isfinite(ref).all() and ref.std() > 0
        for other in (again, fresh, perturbed):
            np.testing.assert_array_equal(other[name], ref)
