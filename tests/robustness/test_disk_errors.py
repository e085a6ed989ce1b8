"""Outputs that cannot be written: a path through a regular file, a full disk (real, through
RLIMIT_FSIZE in a subprocess, and simulated in-process), a failed rename. Each is one ``error:``
line naming the path, exit code 2, inputs untouched and no half-written or temporary file left."""
from __future__ import annotations

import errno
import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from suprem_net.cli.evaluate import main as evaluate_main
from suprem_net.cli.plan_and_preprocess import main as plan_main
from suprem_net.cli.predict import main as predict_main
from suprem_net.io.image import read_image
from suprem_net.preprocessing.storage import open_array
from tests.helpers import DS, assert_user_error, files_under, no_partial_files, run_cli, tree_digest


def _plan_argv(raw: Path, pp: Path, *extra: str) -> list[str]:
    return ["-d", "901", "--raw", str(raw.parent), "--preprocessed", str(pp), "-np", "1", "--device", "cpu", *extra]


def _limited(max_bytes: int):
    """preexec_fn: files may not grow beyond ``max_bytes`` (writes fail with EFBIG, like a full disk).
    Works as root, unlike chmod; SIGXFSZ is ignored so the write fails instead of killing the process."""
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))
    return apply


def _run_limited(module: str, argv: list[str], max_bytes: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run([sys.executable, "-m", module, *argv], capture_output=True, text=True, timeout=120,
                          env=env, preexec_fn=_limited(max_bytes), cwd=Path(__file__).parents[2])


def _assert_complete_outputs(folder: Path) -> None:
    """Whatever exists under ``folder`` is complete: JSON parses, images and arrays read."""
    no_partial_files(folder)
    for p in Path(folder).rglob("*"):
        if p.name.endswith(".json"):
            json.loads(p.read_text())
        elif p.name.endswith(".nii.gz"):
            read_image(p)
        elif p.name.endswith(".b2nd"):
            open_array(p)[:]


# ------------------------------------------------------------------ a folder that cannot exist
def test_preprocessed_folder_below_a_file(raw, tmp_path, capsys):
    blocker = tmp_path / "blocker"
    blocker.write_text("a regular file, not a folder")
    before = tree_digest(raw)
    code, _, err = run_cli(plan_main, _plan_argv(raw, blocker / "pp"), capsys)
    assert_user_error(code, err, str(blocker / "pp"), "Not a directory")
    assert tree_digest(raw) == before and blocker.read_text() == "a regular file, not a folder"


def test_predict_output_below_a_file(model_dir, unlabelled_images, tmp_path, capsys):
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    code, _, err = run_cli(predict_main, ["-i", str(unlabelled_images), "-o", str(blocker / "out"), "-m", str(model_dir),
                                          "--no-tta"], capsys)
    assert_user_error(code, err, str(blocker / "out"), "Not a directory")


def test_evaluate_summary_below_a_file(raw, tmp_path, capsys):
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    labels = raw / "labelsTr"
    before = tree_digest(labels)
    code, _, err = run_cli(evaluate_main, ["-ref", str(labels), "-pred", str(labels), "-o",
                                           str(blocker / "summary.json"), "-np", "1"], capsys)
    assert_user_error(code, err, str(blocker))
    assert tree_digest(labels) == before


def test_output_is_an_existing_folder(model_dir, unlabelled_images, tmp_path, capsys):
    """-o seg.nii.gz where seg.nii.gz is a folder: refused, the folder is left alone."""
    out = tmp_path / "seg.nii.gz"
    (out / "keep").mkdir(parents=True)
    code, _, err = run_cli(predict_main, ["-i", str(unlabelled_images / "case_003_0000.nii.gz"), "-o", str(out),
                                          "-m", str(model_dir), "--no-tta"], capsys)
    assert_user_error(code, err, str(out), "is a folder")
    assert (out / "keep").is_dir() and files_under(out) == []


# ------------------------------------------------------------------ a real full disk (RLIMIT_FSIZE)
@pytest.mark.parametrize("max_bytes", [1000, 2500])
def test_preprocessing_on_a_full_disk(raw, tmp_path, max_bytes):
    """1 kB: the fingerprint JSON cannot be written; 2.5 kB: the JSONs fit, the blosc2 arrays do not."""
    before = tree_digest(raw)
    pp = tmp_path / "pp"
    r = _run_limited("suprem_net.cli.plan_and_preprocess", _plan_argv(raw, pp), max_bytes)
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.returncode == 2, r.stderr[-3000:]
    assert len(lines) == 1 and str(pp) in lines[0] and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert tree_digest(raw) == before
    _assert_complete_outputs(pp)


def test_prediction_on_a_full_disk(model_dir, unlabelled_images, tmp_path):
    """ITK's NIfTI writer does not report a short write: the written file is checked instead."""
    out = tmp_path / "out"
    before = tree_digest(unlabelled_images)
    r = _run_limited("suprem_net.cli.predict", ["-i", str(unlabelled_images), "-o", str(out), "-m", str(model_dir),
                                                "--no-tta"], 64)
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.returncode == 2, r.stderr[-3000:]
    assert len(lines) == 1 and str(out) in lines[0] and "disk full" in lines[0], r.stderr[-3000:]
    assert tree_digest(unlabelled_images) == before
    assert files_under(out) == []


# ------------------------------------------------------------------ simulated in-process
def _fail_replace_onto(suffix: str, err: int, monkeypatch) -> None:
    real = os.replace

    def replace(src, dst, *a, **kw):
        if str(dst).endswith(suffix):
            raise OSError(err, os.strerror(err))  # like a failed write(): no file name attached
        return real(src, dst, *a, **kw)
    monkeypatch.setattr(os, "replace", replace)


@pytest.mark.parametrize("suffix,err", [(".b2nd", errno.ENOSPC), ("fingerprint.json", errno.EDQUOT),
                                        ("case_002.json", errno.EIO)])
def test_preprocessing_write_errors_in_process(suffix, err, raw, tmp_path, capsys, monkeypatch):
    _fail_replace_onto(suffix, err, monkeypatch)
    pp = tmp_path / "pp"
    code, _, stderr = run_cli(plan_main, _plan_argv(raw, pp), capsys)
    line = assert_user_error(code, stderr, os.strerror(err))
    assert line.split(": ")[1].endswith(suffix), line  # names the file it could not write
    _assert_complete_outputs(pp)
    monkeypatch.undo()  # the disk has room again: a rerun completes
    code, _, _ = run_cli(plan_main, _plan_argv(raw, pp), capsys)
    assert code == 0
    _assert_complete_outputs(pp)
    assert len(list((pp / DS / "suprem_plans").glob("case_*_seg.b2nd"))) == 3


def test_prediction_write_error_in_process(model_dir, unlabelled_images, tmp_path, capsys, monkeypatch):
    _fail_replace_onto("case_003.nii.gz", errno.ENOSPC, monkeypatch)
    out = tmp_path / "out"
    code, _, err = run_cli(predict_main, ["-i", str(unlabelled_images), "-o", str(out), "-m", str(model_dir),
                                          "--no-tta", "--save-probabilities"], capsys)
    assert_user_error(code, err, str(out / "case_003.nii.gz"), "No space left on device")
    no_partial_files(out)
    assert not (out / "case_003.nii.gz").exists()


def test_unexpected_oserror_is_not_swallowed(raw, tmp_path, monkeypatch):
    """Only environment errors become one line: an OSError that signals a bug keeps its traceback."""
    _fail_replace_onto(".b2nd", errno.EBADF, monkeypatch)
    with pytest.raises(OSError):
        plan_main(_plan_argv(raw, tmp_path / "pp"))


def test_training_on_a_full_disk(train_root, tmp_path):
    results = tmp_path / "results"
    argv = ["901", "0", "--raw", str(train_root / "raw"), "--preprocessed", str(train_root / "pp"), "--results",
            str(results), "--num-workers", "0", "--no-progress-bar", "--skip-final-validation", "--epochs", "1"]
    r = _run_limited("suprem_net.cli.train", argv, 20_000)
    no_partial_files(results)
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.returncode == 2 and len(lines) == 1 and "checkpoint_" in lines[0], r.stderr[-2000:]
