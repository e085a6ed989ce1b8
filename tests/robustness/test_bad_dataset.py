"""suprem_plan_and_preprocess on broken raw datasets: one ``error:`` line naming the file and the
problem, exit code 2, the raw folder byte-identical afterwards and nothing written to the output."""
from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import SimpleITK as sitk

from suprem_net.cli.plan_and_preprocess import main
from suprem_net.io.image import Geometry, read_image, write_image
from tests.helpers import assert_user_error, files_under, run_cli, tree_digest

IMG = "imagesTr/case_001_0000.nii.gz"
LAB = "labelsTr/case_001.nii.gz"


def _spec(ds: Path) -> dict:
    return json.loads((ds / "dataset.json").read_text())


def _set_spec(ds: Path, spec) -> None:
    (ds / "dataset.json").write_text(json.dumps(spec))


def _with_geometry(ds: Path, rel: str, **change) -> None:
    arr, geo = read_image(ds / rel, dtype=None)
    fields = {"shape": geo.shape, "spacing": geo.spacing, "origin": geo.origin, "direction": geo.direction, **change}
    if "shape" in change:
        arr = arr[: change["shape"][0]]
    write_image(ds / rel, arr, Geometry(**fields))


def _edit_voxels(ds: Path, rel: str, fn: Callable[[np.ndarray], np.ndarray], dtype=None) -> None:
    arr, geo = read_image(ds / rel, dtype=dtype)
    write_image(ds / rel, fn(np.array(arr)), geo)


def _corrupt_gzip(ds):
    (ds / IMG).write_bytes(b"\x1f\x8b\x08\x00" + bytes(range(256)) * 4)
    return IMG, "cannot read image"


def _gzip_stream_cut(ds):
    data = (ds / IMG).read_bytes()
    (ds / IMG).write_bytes(data[: len(data) // 2])  # the download stopped half-way
    return IMG, "truncated"


def _nifti_cut(ds):
    raw = gzip.decompress((ds / IMG).read_bytes())
    (ds / IMG).write_bytes(gzip.compress(raw[: 352 + (len(raw) - 352) // 2]))  # valid gzip, half the voxels
    return IMG, "truncated"


def _label_cut(ds):
    raw = gzip.decompress((ds / LAB).read_bytes())
    (ds / LAB).write_bytes(gzip.compress(raw[:-10]))
    return LAB, "truncated"


def _zero_bytes(ds):
    (ds / IMG).write_bytes(b"")
    return IMG, "cannot read image"


def _text_file(ds):
    (ds / IMG).write_text("patient,age\nA,42\n" * 40)
    return IMG, "cannot read image"


def _image_2d(ds):
    sitk.WriteImage(sitk.Image(16, 16, sitk.sitkInt16), str(ds / IMG))
    return IMG, "expected a 3D image, got 2D"


def _slice_3d(ds):
    arr, geo = read_image(ds / IMG, dtype=None)
    write_image(ds / IMG, arr[:1], Geometry((1, *geo.shape[1:]), geo.spacing, geo.origin, geo.direction))
    return IMG, "2D slice"


def _image_4d(ds):
    arr, _ = read_image(ds / IMG, dtype=None)
    sitk.WriteImage(sitk.JoinSeries([sitk.GetImageFromArray(arr)] * 2), str(ds / IMG))
    return IMG, "expected a 3D image, got 4D"


def _vector_image(ds):
    arr, _ = read_image(ds / IMG, dtype=None)
    sitk.WriteImage(sitk.GetImageFromArray(np.stack([arr, arr], -1), isVector=True), str(ds / IMG))
    return IMG, "vector image"


def _size(ds):
    arr, geo = read_image(ds / LAB, dtype=None)
    _with_geometry(ds, LAB, shape=(arr.shape[0] - 1, *arr.shape[1:]))
    return LAB, "geometry differs from its image: size"


def _spacing(ds):
    _, geo = read_image(ds / LAB, dtype=None)
    _with_geometry(ds, LAB, spacing=(geo.spacing[0] * 1.5, *geo.spacing[1:]))
    return LAB, "geometry differs from its image: spacing"


def _origin(ds):
    _, geo = read_image(ds / LAB, dtype=None)
    _with_geometry(ds, LAB, origin=(geo.origin[0] + 4.0, *geo.origin[1:]))
    return LAB, "geometry differs from its image: origin"


def _direction(ds):
    _with_geometry(ds, LAB, direction=(0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, -1.0))
    return LAB, "geometry differs from its image: direction"


def _label_values(ds):
    def add(a):
        a[0, 0, 0] = 7
        return a
    _edit_voxels(ds, LAB, add)
    return LAB, "label values [7] are not in dataset.json labels"


def _negative_label(ds):
    def add(a):
        a = a.astype(np.int16)
        a[0, 0, 0] = -1
        return a
    _edit_voxels(ds, LAB, add)
    return LAB, "label values [-1] are not in dataset.json labels"


def _float_label(ds):
    _edit_voxels(ds, LAB, lambda a: a.astype(np.float32) * 0.5)
    return LAB, "non-integer values"


def _nan(ds):
    def put(a):
        a[1, 2, 3] = np.nan
        return a
    _edit_voxels(ds, IMG, put, dtype=np.float32)
    return IMG, "NaN or Inf"


def _inf(ds):
    def put(a):
        a[1, 2, 3] = -np.inf
        return a
    _edit_voxels(ds, IMG, put, dtype=np.float32)
    return IMG, "NaN or Inf"


def _constant(ds):
    _edit_voxels(ds, IMG, lambda a: np.full_like(a, -1024))
    return IMG, "constant"


def _no_foreground(ds):
    for p in (ds / "labelsTr").iterdir():
        _edit_voxels(ds, str(p.relative_to(ds)), np.zeros_like)
    return "labelsTr", "no foreground voxels in any label file"


def _missing_label(ds):
    (ds / LAB).unlink()
    return LAB, "label file missing"


def _orphan_label(ds):
    shutil.copy(ds / LAB, ds / "labelsTr" / "case_099.nii.gz")
    return "labelsTr/case_099.nii.gz", "label without an image"


def _second_channel(ds, skip: str = "") -> None:
    """Declare a second CT channel and copy every image (except case ``skip``'s) as its _0001 file."""
    spec = _spec(ds)
    spec["channel_names"] = {"0": "CT", "1": "CT_late"}
    _set_spec(ds, spec)
    for p in sorted((ds / "imagesTr").iterdir()):
        if not (skip and p.name.startswith(skip)):
            shutil.copy(p, p.with_name(p.name.replace("_0000", "_0001")))


def _missing_channel(ds):
    _second_channel(ds, skip="case_001")
    return "imagesTr/case_001_0001.nii.gz", "channel file missing"


def _channel_geometry(ds):
    _second_channel(ds)
    _, geo = read_image(ds / IMG, dtype=None)
    _with_geometry(ds, "imagesTr/case_001_0001.nii.gz", origin=(geo.origin[0] + 9.0, *geo.origin[1:]))
    return "imagesTr/case_001_0001.nii.gz", "geometry differs from case_001_0000.nii.gz"


def _no_images(ds):
    for p in (ds / "imagesTr").iterdir():
        p.unlink()
    return "imagesTr", "no training images"


def _num_training(ds):
    spec = _spec(ds)
    spec["numTraining"] = 5
    _set_spec(ds, spec)
    return "dataset.json", "numTraining is 5 but imagesTr holds 3 cases"


def _renamed_case(bad_id: str, named: str, problem: str):
    """A mutation that renames case_000's image and label to the case id ``bad_id``."""
    def mutate(ds):
        shutil.move(ds / IMG, ds / "imagesTr" / f"{bad_id}_0000.nii.gz")
        shutil.move(ds / LAB, ds / "labelsTr" / f"{bad_id}.nii.gz")
        return named, problem
    return mutate


def _same_case_other_ending(ds):
    shutil.copy(ds / IMG, ds / "imagesTr" / "case_001_0000.nii")
    return "imagesTr/case_001_0000.nii", "duplicate"


def _ids_differ_in_letter_case(ds):
    shutil.copy(ds / IMG, ds / "imagesTr" / "CASE_001_0000.nii.gz")
    shutil.copy(ds / LAB, ds / "labelsTr" / "CASE_001.nii.gz")
    spec = _spec(ds)
    spec["numTraining"] = 4
    _set_spec(ds, spec)
    return "imagesTr/case_001_0000.nii.gz", "differs from 'CASE_001' only in letter case"


def _spec_not_json(ds):
    (ds / "dataset.json").write_text('{"labels": {"background": 0,}')
    return "dataset.json", "not valid JSON"


def _spec_missing(ds):
    (ds / "dataset.json").unlink()
    return "dataset.json", "file not found"


def _spec_list(ds):
    _set_spec(ds, [1, 2, 3])
    return "dataset.json", "top level must be an object"


def _spec_binary(ds):
    (ds / "dataset.json").write_bytes(b"\xff\xfe\x00\x01garbage")
    return "dataset.json", "not valid JSON"


def _spec_change(**change):
    def breaker(ds):
        spec = _spec(ds)
        for k, v in change.items():
            if v is KeyError:
                del spec[k]
            else:
                spec[k] = v
        _set_spec(ds, spec)
        key = next(iter(change))
        return "dataset.json", key
    return breaker


BREAKERS: dict[str, Callable[[Path], tuple[str, str]]] = {
    "corrupt_gzip": _corrupt_gzip, "gzip_stream_cut": _gzip_stream_cut, "nifti_truncated": _nifti_cut,
    "label_truncated": _label_cut, "zero_byte_file": _zero_bytes, "text_file_with_image_ending": _text_file,
    "image_2d": _image_2d, "image_one_slice": _slice_3d, "image_4d": _image_4d, "vector_image": _vector_image,
    "size_mismatch": _size, "spacing_mismatch": _spacing, "origin_mismatch": _origin,
    "direction_mismatch": _direction, "label_value_not_in_dataset_json": _label_values,
    "negative_label": _negative_label, "float_label": _float_label, "nan_intensity": _nan, "inf_intensity": _inf,
    "constant_image": _constant, "no_foreground": _no_foreground, "missing_label": _missing_label,
    "label_without_image": _orphan_label, "missing_channel_file": _missing_channel,
    "channel_geometry_mismatch": _channel_geometry, "no_training_images": _no_images,
    "num_training_mismatch": _num_training,
    "case_id_dotdot": _renamed_case("..", "imagesTr/.._0000.nii.gz", "case id '..' is not a safe file name"),
    "case_id_with_dotdot": _renamed_case("a..b", "a..b_0000.nii.gz", "is not a safe file name"),
    "case_id_backslash": _renamed_case("..\\evil", "evil_0000.nii.gz", "is not a safe file name"),
    "duplicate_case_other_ending": _same_case_other_ending,
    "duplicate_case_letter_case": _ids_differ_in_letter_case,
    "dataset_json_invalid": _spec_not_json, "dataset_json_missing": _spec_missing, "dataset_json_list": _spec_list,
    "dataset_json_binary": _spec_binary,
    "json_missing_labels": _spec_change(labels=KeyError), "json_missing_channel_names": _spec_change(channel_names=KeyError),
    "json_missing_numTraining": _spec_change(numTraining=KeyError),
    "json_missing_file_ending": _spec_change(file_ending=KeyError),
    "json_numTraining_str": _spec_change(numTraining="3"), "json_numTraining_bool": _spec_change(numTraining=True),
    "json_labels_list": _spec_change(labels=["background", "liver"]),
    "json_label_value_str": _spec_change(labels={"background": 0, "liver": "1", "spleen": 2}),
    "json_labels_gap": _spec_change(labels={"background": 0, "liver": 1, "spleen": 3}),
    "json_labels_no_background": _spec_change(labels={"liver": 1, "spleen": 2}),
    "json_channel_names_empty": _spec_change(channel_names={}),
    "json_channel_names_keys": _spec_change(channel_names={"1": "CT"}),
    "json_file_ending_no_dot": _spec_change(file_ending="nii.gz"),
    "json_file_ending_int": _spec_change(file_ending=5),
}

PROBLEM_WORDS = {  # what the message must say for the dataset.json cases (besides the file name)
    "json_missing_labels": "missing key 'labels'", "json_missing_channel_names": "missing key 'channel_names'",
    "json_missing_numTraining": "missing key 'numTraining'", "json_missing_file_ending": "missing key 'file_ending'",
    "json_numTraining_str": "'numTraining' must be int, got str",
    "json_numTraining_bool": "'numTraining' must be int, got bool",
    "json_labels_list": "'labels' must be dict, got list", "json_label_value_str": "labels values must be integers",
    "json_labels_gap": "consecutive", "json_labels_no_background": "'background' to 0",
    "json_channel_names_empty": "channel_names is empty", "json_channel_names_keys": "channel_names keys",
    "json_file_ending_no_dot": "must start with '.'", "json_file_ending_int": "'file_ending' must be str",
}


@pytest.mark.parametrize("kind", list(BREAKERS))
def test_bad_dataset_one_line_exit_2_nothing_written(kind, raw, tmp_path, capsys):
    rel, problem = BREAKERS[kind](raw)
    problem = PROBLEM_WORDS.get(kind, problem)
    before = tree_digest(raw)
    pp = tmp_path / "pp"
    code, _, err = run_cli(main, ["-d", "901", "--raw", str(raw.parent), "--preprocessed", str(pp), "-np", "1",
                                  "--device", "cpu"], capsys)
    assert_user_error(code, err, str(raw / rel) if "/" in rel or rel == "dataset.json" else rel, problem)
    assert tree_digest(raw) == before, "the raw dataset was modified"
    assert files_under(pp) == [], "outputs were written for a broken dataset"


@pytest.mark.parametrize("kind", ["gzip_stream_cut", "nan_intensity", "label_value_not_in_dataset_json"])
def test_worker_processes_report_the_same_line(kind, raw, tmp_path, capsys):
    """Errors raised inside the fingerprint's worker processes arrive as the same single line."""
    rel, problem = BREAKERS[kind](raw)
    pp = tmp_path / "pp"
    code, _, err = run_cli(main, ["-d", "901", "--raw", str(raw.parent), "--preprocessed", str(pp), "-np", "2",
                                  "--device", "cpu"], capsys)
    assert_user_error(code, err, str(raw / rel), problem)
    assert files_under(pp) == []


def test_check_only_reports_and_writes_nothing(raw, tmp_path, capsys):
    rel, problem = _label_values(raw)
    pp = tmp_path / "pp"
    code, _, err = run_cli(main, ["-d", "901", "--raw", str(raw.parent), "--preprocessed", str(pp), "-np", "1",
                                  "--check-only"], capsys)
    assert_user_error(code, err, str(raw / rel), problem)
    assert files_under(pp) == []


def test_several_problems_one_line_each(raw, tmp_path, capsys):
    _missing_label(raw)
    _num_training(raw)
    capsys.readouterr()
    code, _, err = run_cli(main, ["-d", "901", "--raw", str(raw.parent), "--preprocessed", str(tmp_path / "pp"),
                                  "-np", "1"], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 2 and all(ln.startswith("error: ") for ln in lines), err


def test_voxel_read_error_in_a_worker_process_is_one_line(raw, tmp_path, capsys):
    """A file whose header reads but whose voxels do not (cut NRRD): the error is raised inside a
    fingerprint worker process and must arrive in the CLI as the same one line (not BrokenProcessPool)."""
    spec = _spec(raw)
    spec["file_ending"] = ".nrrd"
    _set_spec(raw, spec)
    for p in sorted((raw / "imagesTr").glob("*.nii.gz")) + sorted((raw / "labelsTr").glob("*.nii.gz")):
        sitk.WriteImage(sitk.ReadImage(str(p)), str(p.with_name(p.name[:-7] + ".nrrd")), useCompression=False)
        p.unlink()
    bad = raw / "imagesTr" / "case_001_0000.nrrd"
    bad.write_bytes(bad.read_bytes()[:-200])
    before = tree_digest(raw)
    pp = tmp_path / "pp"
    code, _, err = run_cli(main, ["-d", "901", "--raw", str(raw.parent), "--preprocessed", str(pp), "-np", "2",
                                  "--device", "cpu"], capsys)
    assert_user_error(code, err, str(bad), "cannot read image")
    assert tree_digest(raw) == before and files_under(pp) == []
