"""SIGKILL in the middle of suprem_plan_and_preprocess, suprem_predict and suprem_train, then rerun:
the result is complete, readable and equal to an uninterrupted run; temporary files a killed run
left behind (``.tmp-PID-*``) are never mistaken for results."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

from suprem_net.data.dataset import CaseStore
from suprem_net.io.image import read_image
from suprem_net.preprocessing.storage import finished_cases, open_array
from suprem_net.synthetic import SyntheticSpec, write_raw_dataset
from tests.helpers import DS

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
REPO = Path(__file__).parents[2]


def _start(module: str, argv: list[str]) -> subprocess.Popen:
    # own session: the kill reaches the worker processes it started too (and nothing else)
    return subprocess.Popen([sys.executable, "-m", module, *argv], env=ENV, cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _run(module: str, argv: list[str]) -> None:
    """The uninterrupted runs and the reruns go in-process (no interpreter start-up)."""
    import importlib

    assert importlib.import_module(module).main(argv) in (0, None)


def _kill_when(proc: subprocess.Popen, ready: Callable[[], bool], timeout: float = 60.0) -> None:
    """SIGKILL ``proc``'s process group as soon as ``ready()``; fail if it finished first."""
    t0 = time.monotonic()
    while not ready():
        if proc.poll() is not None:
            pytest.fail("the run finished before it could be killed: make the data bigger")
        if time.monotonic() - t0 > timeout:
            break
        time.sleep(0.002)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


def _tmp_files(folder: Path) -> list[Path]:
    return sorted(folder.rglob(".tmp-*")) if folder.exists() else []


# ------------------------------------------------------------------ preprocessing
@pytest.mark.slow
def test_sigkill_during_preprocessing_then_rerun(tmp_path):
    workers, n = "2", 6
    spec = SyntheticSpec(num_cases=n, num_classes=2, fov_mm=(80.0, 120.0, 120.0), inplane_spacing=(2.0, 2.5),
                         z_spacing=(3.0, 4.0), seed=11)
    write_raw_dataset(tmp_path / "raw", 901, spec, num_test=0)

    def argv(pp: Path) -> list[str]:
        return ["-d", "901", "--raw", str(tmp_path / "raw"), "--preprocessed", str(pp), "-np", workers,
                "--device", "cpu"]

    module = "suprem_net.cli.plan_and_preprocess"
    _run(module, argv(tmp_path / "clean"))
    killed = tmp_path / "killed"
    data = killed / DS / "suprem_plans"
    proc = _start(module, argv(killed))
    # kill while an array is being written if we catch one, else once a few cases are finished
    _kill_when(proc, lambda: bool(_tmp_files(data)) or len(finished_cases(data)) >= 2)
    assert len(finished_cases(data)) < n, "all cases were finished before the kill"
    stale = _tmp_files(killed)
    _run(module, argv(killed))

    ref = tmp_path / "clean" / DS / "suprem_plans"
    ids = finished_cases(ref)
    assert len(ids) == n and finished_cases(data) == ids  # stale .tmp-* files are not taken for cases
    assert CaseStore(data).case_ids == ids
    assert all(not p.exists() for p in _tmp_files(killed) if p not in stale)  # the rerun leaves none of its own
    for name in ("fingerprint.json", "suprem_plans.json", "dataset.json"):
        assert json.loads((killed / DS / name).read_text()) == json.loads((tmp_path / "clean" / DS / name).read_text())
    for cid in ids:
        a, b = json.loads((ref / f"{cid}.json").read_text()), json.loads((data / f"{cid}.json").read_text())
        a.pop("raw_images"), b.pop("raw_images"), a.pop("raw_label"), b.pop("raw_label")
        assert a == b, cid
        for suffix in (".b2nd", "_seg.b2nd"):
            x, y = open_array(ref / f"{cid}{suffix}"), open_array(data / f"{cid}{suffix}")
            assert x.dtype == y.dtype and np.array_equal(x[:], y[:]), cid + suffix


# ------------------------------------------------------------------ prediction
@pytest.mark.slow
def test_sigkill_during_prediction_then_rerun(model_dir, unlabelled_images, tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    for i in range(8):
        shutil.copy(unlabelled_images / "case_003_0000.nii.gz", inp / f"case{i:02d}_0000.nii.gz")
    module = "suprem_net.cli.predict"

    def argv(out: Path) -> list[str]:
        return ["-i", str(inp), "-o", str(out), "-m", str(model_dir), "--tta", "--step-size", "0.5"]

    _run(module, argv(tmp_path / "clean"))
    out = tmp_path / "killed"
    proc = _start(module, argv(out))
    _kill_when(proc, lambda: bool(_tmp_files(out)) or len(list(out.glob("case*.nii.gz"))) >= 2)
    assert len(list(out.glob("case*.nii.gz"))) < 8
    stale = _tmp_files(out)
    _run(module, argv(out))
    names = sorted(p.name for p in (tmp_path / "clean").glob("case*.nii.gz"))
    assert len(names) == 8 and sorted(p.name for p in out.glob("case*.nii.gz")) == names
    # a killed run may leave its .tmp-PID-* file; the rerun adds none, and inputs/outputs ignore it
    assert _tmp_files(out) == stale and all(p.name.startswith(f".tmp-{proc.pid}-") for p in stale)
    for name in names:
        a, ga = read_image(tmp_path / "clean" / name, dtype=None)
        b, gb = read_image(out / name, dtype=None)
        assert ga == gb and np.array_equal(a, b), name


# ------------------------------------------------------------------ training
@pytest.mark.slow
def test_sigkill_during_training_then_continue(train_root, tmp_path):
    results = tmp_path / "results"
    fold = results / DS / "suprem_plans" / "fold_0"
    argv = ["901", "0", "--raw", str(train_root / "raw"), "--preprocessed", str(train_root / "pp"), "--results",
            str(results), "--num-workers", "0", "--no-progress-bar", "--skip-final-validation", "--epochs", "2"]
    module = "suprem_net.cli.train"
    proc = _start(module, argv)
    # preferably while a checkpoint is being written (.tmp-PID-checkpoint_*.pth), else right after one exists
    _kill_when(proc, lambda: bool(_tmp_files(fold)) or (fold / "checkpoint_latest.pth").exists(), timeout=120)
    assert not (fold / "checkpoint_final.pth").exists()
    if (fold / "checkpoint_latest.pth").exists():  # whatever was left is a complete checkpoint
        torch.load(fold / "checkpoint_latest.pth", weights_only=True)
    _run(module, argv + ["--continue"])
    final = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=True)
    assert final["epoch"] == 2 and len(final["logging"]["train_loss"]) == 2
    latest = torch.load(fold / "checkpoint_latest.pth", map_location="cpu", weights_only=True)
    assert latest["epoch"] == 2
    assert {p.name for p in fold.glob("checkpoint_*.pth")} == {"checkpoint_latest.pth", "checkpoint_best.pth",
                                                               "checkpoint_final.pth"}
