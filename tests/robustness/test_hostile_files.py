"""Bad inputs to suprem_predict, suprem_weights and suprem_train: unreadable images, DICOM folders
with several series, hostile checkpoints (pickled code, wrong shapes, truncated), unknown names.
Each: one ``error:`` line naming the file and the problem, exit code 2, inputs untouched, no output."""
from __future__ import annotations

import gzip
import shutil
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from suprem_net.cli.predict import main as predict_main
from suprem_net.cli.train import main as train_main
from suprem_net.cli.weights import main as weights_main
from suprem_net.io.image import read_image, write_image
from tests.helpers import write_dicom_series
from tests.helpers import DS, assert_user_error, files_under, run_cli, tree_digest


class Payload:
    """Stands for arbitrary code in a pickle: loading it with weights_only=False would import and run it."""

    def __reduce__(self):
        return (print, ("pwned",))


# ------------------------------------------------------------------ suprem_predict: input images
def _put(inp: Path, src: Path, name: str = "case_0000.nii.gz") -> Path:
    inp.mkdir(exist_ok=True)
    shutil.copy(src, inp / name)
    return inp / name


def _bad_input(kind: str, inp: Path, src: Path) -> tuple[Path, str]:
    f = _put(inp, src)
    if kind == "corrupt_gzip":
        f.write_bytes(b"\x1f\x8b\x08\x00" + b"\x00garbage" * 50)
        return f, "cannot read image"
    if kind == "truncated_gzip":
        f.write_bytes(f.read_bytes()[:-40])
        return f, "truncated"
    if kind == "truncated_nii":
        g = f.with_name("case_0000.nii")
        g.write_bytes(gzip.decompress(f.read_bytes())[:-100])
        f.unlink()
        return g, "truncated file"
    if kind == "zero_byte":
        f.write_bytes(b"")
        return f, "cannot read image"
    if kind == "not_an_image":
        f.write_text("<html>404 Not Found</html>\n")
        return f, "cannot read image"
    if kind == "image_2d":
        sitk.WriteImage(sitk.Image(24, 24, sitk.sitkInt16), str(f))
        return f, "got 2D"
    if kind == "image_4d":
        arr, _ = read_image(f, dtype=None)
        sitk.WriteImage(sitk.JoinSeries([sitk.GetImageFromArray(arr)] * 3), str(f))
        return f, "got 4D"
    if kind == "two_channels_for_one_channel_model":
        shutil.copy(f, inp / "case_0001.nii.gz")
        return f, "has 2 channel(s), the model expects 1"
    if kind == "duplicate_channel_file":
        g = inp / "case_0000.nrrd"
        sitk.WriteImage(sitk.ReadImage(str(f)), str(g))
        return g, "two files for channel 0 of case case"
    if kind == "not_an_image_ending":
        g = f.with_name("case.txt")
        f.rename(g)
        return inp, "no images found"
    raise AssertionError(kind)


PREDICT_INPUTS = ["corrupt_gzip", "truncated_gzip", "truncated_nii", "zero_byte", "not_an_image", "image_2d",
                  "image_4d", "two_channels_for_one_channel_model", "duplicate_channel_file", "not_an_image_ending"]


@pytest.mark.parametrize("kind", PREDICT_INPUTS)
def test_predict_bad_input(kind, model_dir, unlabelled_images, tmp_path, capsys):
    inp, out = tmp_path / "in", tmp_path / "out"
    path, problem = _bad_input(kind, inp, unlabelled_images / "case_003_0000.nii.gz")
    before = tree_digest(inp)
    code, _, err = run_cli(predict_main, ["-i", str(inp), "-o", str(out), "-m", str(model_dir), "--no-tta"], capsys)
    assert_user_error(code, err, str(path), problem)
    assert tree_digest(inp) == before
    assert files_under(out) == []


def test_predict_constant_image_does_not_crash(model_dir, unlabelled_images, tmp_path, capsys):
    """A blank (constant) scan is predicted (normalisation guards std = 0); the output has its geometry."""
    inp, out = tmp_path / "in", tmp_path / "out"
    f = _put(inp, unlabelled_images / "case_003_0000.nii.gz")
    arr, geo = read_image(f, dtype=None)
    write_image(f, np.full_like(arr, -1000), geo)
    code, _, err = run_cli(predict_main, ["-i", str(inp), "-o", str(out), "-m", str(model_dir), "--no-tta"], capsys)
    assert code == 0, err
    seg, g = read_image(out / "case.nii.gz", dtype=None)
    assert g == geo and seg.shape == arr.shape


def test_predict_dicom_folder_with_several_series(model_dir, tmp_path, capsys):
    series = tmp_path / "dicom"
    arr = np.random.default_rng(0).integers(-200, 200, (6, 20, 20))
    write_dicom_series(series, arr, "1.2.826.0.1.3680043.2.1125.7")
    write_dicom_series(series, arr[:4], "1.2.826.0.1.3680043.2.1125.8")
    before = tree_digest(series)
    out = tmp_path / "out"
    code, _, err = run_cli(predict_main, ["-i", str(series), "-o", str(out), "-m", str(model_dir)], capsys)
    assert_user_error(code, err, str(series), "holds 2 DICOM series", "1.2.826.0.1.3680043.2.1125.7 (6 files)",
                      "1.2.826.0.1.3680043.2.1125.8 (4 files)")
    assert tree_digest(series) == before and files_under(out) == []


# ------------------------------------------------------------------ suprem_predict: hostile model folders
def _copy_model(model_dir: Path, tmp_path: Path) -> Path:
    md = tmp_path / "model"
    shutil.copytree(model_dir, md)
    return md


def _checkpoint_pickled_code(ckpt: Path) -> str:
    sd = torch.load(ckpt, weights_only=True)["network_weights"]
    torch.save({"network_weights": sd, "extra": Payload()}, ckpt)
    return "cannot load checkpoint"


def _checkpoint_wrong_shapes(ckpt: Path) -> str:
    sd = torch.load(ckpt, weights_only=True)["network_weights"]
    torch.save({"network_weights": {k: torch.zeros(*(s + 1 for s in v.shape)) for k, v in sd.items()}}, ckpt)
    return "weights do not fit the plan's network"


def _checkpoint_truncated(ckpt: Path) -> str:
    ckpt.write_bytes(ckpt.read_bytes()[:300])
    return "cannot load checkpoint"


def _checkpoint_not_ours(ckpt: Path) -> str:
    torch.save({"state_dict": {"w": torch.zeros(2)}}, ckpt)
    return "no 'network_weights'"


def _checkpoint_empty(ckpt: Path) -> str:
    ckpt.write_bytes(b"")
    return "cannot load checkpoint"


HOSTILE_CHECKPOINTS = {"pickled_code": _checkpoint_pickled_code, "wrong_shapes": _checkpoint_wrong_shapes,
                       "truncated": _checkpoint_truncated, "foreign_layout": _checkpoint_not_ours,
                       "zero_bytes": _checkpoint_empty}


@pytest.mark.parametrize("kind", list(HOSTILE_CHECKPOINTS))
def test_predict_hostile_checkpoint(kind, model_dir, unlabelled_images, tmp_path, capsys):
    md = _copy_model(model_dir, tmp_path)
    ckpt = md / "fold_0" / "checkpoint_final.pth"
    problem = HOSTILE_CHECKPOINTS[kind](ckpt)
    before = tree_digest(md)
    out = tmp_path / "out"
    code, out_text, err = run_cli(predict_main, ["-i", str(unlabelled_images), "-o", str(out), "-m", str(md)], capsys)
    assert_user_error(code, err, str(ckpt), problem)
    assert "pwned" not in out_text + err  # the pickled payload never ran
    assert tree_digest(md) == before and files_under(out) == []


@pytest.mark.parametrize("kind", ["plans_not_json", "plans_missing"])
def test_predict_broken_plans(kind, model_dir, unlabelled_images, tmp_path, capsys):
    md = _copy_model(model_dir, tmp_path)
    if kind == "plans_not_json":
        (md / "plans.json").write_text("{ nope")
        problem = "not valid JSON"
    else:
        (md / "plans.json").unlink()
        problem = "file not found"
    out = tmp_path / "out"
    code, _, err = run_cli(predict_main, ["-i", str(unlabelled_images), "-o", str(out), "-m", str(md)], capsys)
    assert_user_error(code, err, str(md / "plans.json"), problem)
    assert files_under(out) == []


# ------------------------------------------------------------------ suprem_weights check
@pytest.fixture
def weights_dir(tmp_path, monkeypatch) -> Path:
    d = tmp_path / "weights"
    d.mkdir()
    monkeypatch.setenv("SUPREM_weights", str(d))
    return d


def test_weights_check_unknown_name(weights_dir, capsys):
    code, _, err = run_cli(weights_main, ["check", "suprem_nonexistent"], capsys)
    assert_user_error(code, err, "unknown pretrained weights 'suprem_nonexistent'", "known: ")


def test_weights_check_pickled_code(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.zeros(3)}, "hook": Payload()}, path)
    before = path.read_bytes()
    code, out, err = run_cli(weights_main, ["check", str(path), "--family", "segresnet"], capsys)
    assert_user_error(code, err, str(path), "contains pickled code; refusing to load")
    assert "pwned" not in out + err and path.read_bytes() == before


def test_weights_check_wrong_shapes(tmp_path, capsys):
    path = tmp_path / "other.pth"
    torch.save({"net": OrderedDict([("convInit.conv.weight", torch.zeros(7, 2, 1, 1, 1))])}, path)
    code, _, err = run_cli(weights_main, ["check", str(path), "--family", "segresnet"], capsys)
    assert_user_error(code, err, str(path), "no tensor matches the segresnet network", "1 shape mismatches")


@pytest.mark.parametrize("content,problem", [(b"", "empty or truncated"), (b"PK\x03\x04broken zip", "not a readable")])
def test_weights_check_unreadable_file(content, problem, tmp_path, capsys):
    path = tmp_path / "broken.pth"
    path.write_bytes(content)
    code, _, err = run_cli(weights_main, ["check", str(path), "--family", "segresnet"], capsys)
    assert_user_error(code, err, str(path), problem)


# ------------------------------------------------------------------ suprem_train --pretrained
def _written_besides_log(results: Path) -> list[str]:
    return [f for f in files_under(results) if not f.endswith("training_log.txt")]


def _train_argv(root: Path, results: Path, *extra: str) -> list[str]:
    return ["901", "0", "--raw", str(root / "raw"), "--preprocessed", str(root / "pp"), "--results", str(results),
            "--num-workers", "0", "--no-progress-bar", "--skip-final-validation", *extra]


@pytest.mark.parametrize("source,problem", [
    ("suprem_nonexistent", "unknown pretrained weights 'suprem_nonexistent'"),
    ("missing/weights.pth", "checkpoint file not found"),
])
def test_train_unknown_pretrained(source, problem, train_root, tmp_path, capsys):
    pp = train_root / "pp" / DS
    before = {k: v for k, v in tree_digest(pp).items() if k != "splits.json"}  # splits.json: shared, made once
    code, _, err = run_cli(train_main, _train_argv(train_root, tmp_path / "results", "--pretrained", source), capsys)
    assert_user_error(code, err, problem)
    assert {k: v for k, v in tree_digest(pp).items() if k != "splits.json"} == before
    assert _written_besides_log(tmp_path / "results") == []


def test_train_pretrained_with_pickled_code(train_root, tmp_path, capsys):
    path = tmp_path / "evil.pth"
    torch.save({"network_weights": {"encoder.w": torch.zeros(1)}, "x": Payload()}, path)
    code, out, err = run_cli(train_main, _train_argv(train_root, tmp_path / "results", "--pretrained", str(path)),
                             capsys)
    assert_user_error(code, err, str(path), "contains pickled code")
    assert "pwned" not in out + err
    assert _written_besides_log(tmp_path / "results") == []


def test_train_refused_pretrained_leaves_no_fold_folder(train_root, tmp_path, capsys):
    code, _, _ = run_cli(train_main, _train_argv(train_root, tmp_path / "results", "--pretrained", "nope.pth"),
                         capsys)
    assert code == 2
    assert files_under(tmp_path / "results") == []
