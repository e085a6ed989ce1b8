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

from suprem_net.inference.predictor import Predictor
from suprem_net.networks import build_network
from suprem_net.networks.universal import UniversalModel
from suprem_net.preprocessing.case import preprocess_case
from suprem_net.synthetic import SyntheticSpec, make_case
from tests.conftest import tiny_net

REPO = Path(__file__).resolve().parents[1]
PERTURBED = {"GLIBC_TUNABLES": "glibc.malloc.perturb=165:glibc.malloc.mmap_threshold=33554432"}


def _plan(family: str, mirror: bool) -> dict:
    network = tiny_net((4, 8, 16)) if family == "nnunet" else {"family": "suprem_unet", "kwargs": {}}
    return {"orientation": "RAS", "axes": "xyz", "target_spacing": [3.0, 3.0, 3.0],
            "normalization": [{"scheme": "window", "window": [-175, 250], "range": [0.0, 1.0]}],
            "resampling": {"anisotropy_threshold": 3.0}, "patch_size": [32, 32, 32], "batch_size": 2,
            "num_classes": 33 if family == "universal" else 3, "network": network,
            "mirror_axes": [0, 1, 2] if mirror else []}


def predict_all() -> dict[str, np.ndarray]:
    """Logits of a tiny nnU-Net (tiles batched, mirroring) and of a Universal Model on the SuPreM U-Net
    (batch statistics: one tile at a time) for one synthetic case, seeded weights, on 2 threads (the
    summation order, and so the last bits, depend on the thread count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        return _predict_all()
    finally:
        torch.set_num_threads(threads)


def _predict_all() -> dict[str, np.ndarray]:
    spec = SyntheticSpec(num_cases=1, seed=5, fov_mm=(90.0, 120.0, 120.0), inplane_spacing=(2.5, 2.5),
                         z_spacing=(3.0, 3.0))
    ct, _, geo = make_case(spec, 0)  # about 30 x 40 x 40 voxels at 3 mm: 4 tiles of 32^3
    out = {}
    for family in ("nnunet", "universal"):
        torch.manual_seed(0)
        if family == "universal":
            model = UniversalModel("suprem_unet", 32)
            torch.nn.init.normal_(model.organ_embedding)
        else:
            model = build_network(_plan(family, True)["network"], 1, 3)
        plan = _plan(family, family == "nnunet")
        data, _, _ = preprocess_case([ct.astype(np.float32)], geo, plan)
        predictor = Predictor(plan, [model.eval()], device="cpu", tta=family == "nnunet", step_size=0.5)
        out[family] = predictor.predict_logits(data).numpy()
    return out


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
    code = ("import numpy as np, tests.test_determinism as t; "
            f"np.savez({str(out)!r}, **t.predict_all())")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**os.environ, **env},
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    with np.load(out) as f:
        return {k: f[k] for k in f.files}


def test_prediction_is_bit_identical_whatever_the_memory_held_before(tmp_path):
    first = predict_all()
    prime_allocator()
    again = predict_all()
    fresh = _in_subprocess(tmp_path, {})
    perturbed = _in_subprocess(tmp_path, PERTURBED)
    for name, ref in first.items():
        assert np.isfinite(ref).all() and ref.std() > 0
        for other in (again, fresh, perturbed):
            np.testing.assert_array_equal(other[name], ref)
