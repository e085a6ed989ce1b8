"""suprem_plan_and_preprocess end to end on tiny synthetic data, and every integrity error."""
import hashlib
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from suprem_net.cli.plan_and_preprocess import main
from suprem_net.io.image import read_image, write_image
from suprem_net.preprocessing.storage import open_array
from suprem_net.synthetic import write_abdomenatlas
from tests.helpers import tiny_spec


def run(tmp_path, *extra):
    return main(["-d", "901", "--raw", str(tmp_path / "raw"), "--preprocessed", str(tmp_path / "pp"),
                 "-np", "1", "--device", "cpu", *extra])


def tree_digest(folder):
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def test_end_to_end_resumable(tiny_raw, tmp_path, capsys):
    before = tree_digest(tiny_raw)
    assert run(tmp_path) == 0
    out = tmp_path / "pp" / tiny_raw.name
    plan = json.loads((out / "suprem_plans.json").read_text())
    fp = json.loads((out / "fingerprint.json").read_text())
    assert plan["memory"]["predicted_peak_bytes"] <= plan["memory"]["budget_bytes"]
    assert plan["memory"]["flops_per_iteration"] <= plan["memory"]["flops_budget"]
    assert plan["network"]["family"] == "nnunet" and plan["batch_size"] >= 2
    div = [2 ** sum(1 for s in plan["network"]["kwargs"]["strides"] if s[a] == 2) for a in range(3)]
    assert all(p % d == 0 for p, d in zip(plan["patch_size"], div))
    assert [c["case_id"] for c in fp["cases"]] == ["case_000", "case_001", "case_002"]
    assert set(fp["cases"][0]["class_volume_ml"]) == {"liver", "spleen", "kidney_left"}
    data_dir = out / "suprem_plans"
    props = json.loads((data_dir / "case_000.json").read_text())
    img = open_array(data_dir / "case_000.b2nd")
    seg = open_array(data_dir / "case_000_seg.b2nd")
    assert img.shape[1:] == seg.shape[1:] == tuple(props["shape_after_resample"])
    assert set(np.unique(seg[:])) <= {0, 1, 2, 3}
    assert props["class_locations"]["1"]
    assert tree_digest(tiny_raw) == before  # raw data untouched

    # the plan says how long its schedule takes and what that rests on ($SUPREM_cpu_gflops in the tests)
    printed = capsys.readouterr().out
    assert plan["speed"]["source"] == "assumed" and plan["speed"]["gflops"] == 60
    assert "expected training time" in printed and "100 epochs x 50 iterations" in printed
    assert plan["speed"]["expected_training_seconds"] == pytest.approx(
        100 * (50 * plan["speed"]["step_seconds"] + 20 * plan["speed"]["val_step_seconds"]), rel=1e-3)

    # rerun: nothing to do; a case whose JSON is missing (killed mid-way) is redone, others skipped
    (data_dir / "case_001.json").unlink()
    capsys.readouterr()
    assert run(tmp_path) == 0
    assert "preprocessed 1 cases, skipped 2" in capsys.readouterr().out
    # the fingerprint is deterministic
    fp2 = json.loads((out / "fingerprint.json").read_text())
    assert fp2 == fp


def test_shards_split_the_work(tiny_raw, tmp_path, capsys):
    assert run(tmp_path, "--shard", "0/2") == 0
    assert "preprocessed 2 cases" in capsys.readouterr().out
    assert run(tmp_path, "--shard", "1/2") == 0
    assert "preprocessed 1 cases" in capsys.readouterr().out
    assert run(tmp_path) == 0  # the merge/verify step: everything done
    assert "preprocessed 0 cases, skipped 3" in capsys.readouterr().out


def test_hand_edited_plan_is_kept(tiny_raw, tmp_path):
    assert run(tmp_path, "--no-preprocess") == 0
    path = tmp_path / "pp" / tiny_raw.name / "suprem_plans.json"
    plan = json.loads(path.read_text())
    plan["patch_size"] = [16, 32, 32]
    path.write_text(json.dumps(plan))
    assert run(tmp_path) == 0
    assert json.loads(path.read_text())["patch_size"] == [16, 32, 32]
    arr = open_array(tmp_path / "pp" / tiny_raw.name / "suprem_plans" / "case_000.b2nd")
    assert arr.chunks[1:] == tuple(min(s, p) for s, p in zip(arr.shape[1:], (16, 32, 32)))


def test_int32_and_float_ct_are_accepted(tiny_raw, tmp_path):
    img = tiny_raw / "imagesTr" / "case_000_0000.nii.gz"
    arr, geo = read_image(img, dtype=None)
    write_image(img, arr.astype(np.int32), geo)
    img2 = tiny_raw / "imagesTr" / "case_001_0000.nii.gz"
    arr, geo = read_image(img2, dtype=None)
    write_image(img2, arr.astype(np.float32), geo)
    assert run(tmp_path) == 0


def test_empty_class_is_reported_not_fatal(tiny_raw, tmp_path):
    spec = json.loads((tiny_raw / "dataset.json").read_text())
    spec["labels"]["pancreas"] = 4
    (tiny_raw / "dataset.json").write_text(json.dumps(spec))
    assert run(tmp_path, "--no-preprocess") == 0
    fp = json.loads((tmp_path / "pp" / tiny_raw.name / "fingerprint.json").read_text())
    assert fp["empty_classes"] == ["pancreas"]


def _break(tiny_raw, kind):
    """Corrupt the dataset in one way; return the file name the error must mention."""
    lab = tiny_raw / "labelsTr" / "case_001.nii.gz"
    img = tiny_raw / "imagesTr" / "case_001_0000.nii.gz"
    arr, geo = read_image(lab, dtype=None)
    if kind == "missing_label":
        lab.unlink()
    elif kind == "size":
        write_image(lab, arr[:-1], type(geo)(arr[:-1].shape, geo.spacing, geo.origin, geo.direction))
    elif kind == "spacing":
        write_image(lab, arr, type(geo)(geo.shape, (geo.spacing[0] * 2, *geo.spacing[1:]), geo.origin, geo.direction))
    elif kind == "origin":
        write_image(lab, arr, type(geo)(geo.shape, geo.spacing, (5.0, 5.0, 5.0), geo.direction))
    elif kind == "label_values":
        arr = arr.copy()
        arr[0, 0, 0] = 9
        write_image(lab, arr, geo)
    elif kind == "float_label":
        write_image(lab, arr.astype(np.float32) + 0.5, geo)
    elif kind == "nan":
        im, g = read_image(img)
        im[0, 0, 0] = np.nan
        write_image(img, im, g)
        return img.name
    elif kind == "corrupt":
        img.write_bytes(b"\x1f\x8b garbage")
        return img.name
    elif kind == "unsafe_id":
        shutil.move(img, tiny_raw / "imagesTr" / "bad id!_0000.nii.gz")
        shutil.move(lab, tiny_raw / "labelsTr" / "bad id!.nii.gz")
        return "bad id!"
    elif kind == "num_training":
        spec = json.loads((tiny_raw / "dataset.json").read_text())
        spec["numTraining"] = 7
        (tiny_raw / "dataset.json").write_text(json.dumps(spec))
        return "numTraining"
    elif kind == "json_keys":
        spec = json.loads((tiny_raw / "dataset.json").read_text())
        del spec["file_ending"]
        (tiny_raw / "dataset.json").write_text(json.dumps(spec))
        return "file_ending"
    return lab.name


@pytest.mark.parametrize("kind", ["missing_label", "size", "spacing", "origin", "label_values", "float_label",
                                  "nan", "corrupt", "unsafe_id", "num_training", "json_keys"])
def test_integrity_errors_are_one_line_exit_2_and_write_nothing(tiny_raw, tmp_path, capsys, kind):
    needle = _break(tiny_raw, kind)
    with pytest.raises(SystemExit) as e:
        run(tmp_path)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and all(line.startswith("error: ") for line in err)
    assert any(needle in line for line in err), err
    assert len(err) == 1  # exactly one problem was introduced: exactly one line
    assert not (tmp_path / "pp").exists() or not any((tmp_path / "pp").rglob("*.b2nd"))
    assert not (tmp_path / "pp" / tiny_raw.name / "fingerprint.json").exists()


def test_abdomenatlas_conversion_resolves_overlaps_and_records_partial_labels(tmp_path):
    from suprem_net.cli.convert_abdomenatlas import main as convert_main
    from suprem_net.labels import ABDOMENATLAS_25 as ATLAS_CLASSES

    root = write_abdomenatlas(tmp_path / "atlas", tiny_spec(num_cases=2, num_classes=5), missing={1: ["aorta"]})
    # make the aorta overlap the liver in case 0: the smaller aorta must win the overlap
    liver, geo = read_image(root / "BDMAP_00000001/segmentations/liver.nii.gz", dtype=None)
    aorta, _ = read_image(root / "BDMAP_00000001/segmentations/aorta.nii.gz", dtype=None)
    aorta = aorta.copy()
    zz, yy, xx = np.nonzero(liver)
    aorta[zz[0], yy[0], xx[0]] = 1
    write_image(root / "BDMAP_00000001/segmentations/aorta.nii.gz", aorta, geo)
    before = tree_digest(root)
    assert convert_main([str(root), "-d", "902", "--raw", str(tmp_path / "raw"), "-np", "1"]) == 0
    out = tmp_path / "raw" / "Dataset902_AbdomenAtlas"
    spec = json.loads((out / "dataset.json").read_text())
    names = [n for n in spec["labels"] if n != "background"]
    assert names == [n for n in ATLAS_CLASSES if n in names]  # AbdomenAtlas order
    assert spec["partial_labels"] == {"BDMAP_00000002": ["aorta"]}
    seg, _ = read_image(out / "labelsTr" / "BDMAP_00000001.nii.gz", dtype=None)
    assert seg[zz[0], yy[0], xx[0]] == spec["labels"]["aorta"]
    assert (seg == spec["labels"]["liver"]).sum() == liver.sum() - 1
    assert (out / "imagesTr" / "BDMAP_00000001_0000.nii.gz").read_bytes() == \
        (root / "BDMAP_00000001" / "ct.nii.gz").read_bytes()
    assert tree_digest(root) == before
    assert main(["-d", "902", "--raw", str(tmp_path / "raw"), "--preprocessed", str(tmp_path / "pp"),
                 "-np", "1", "--device", "cpu", "--verify"]) == 0


def test_console_script_help_and_unknown_dataset(tmp_path):
    r = subprocess.run([sys.executable, "-m", "suprem_net.cli.plan_and_preprocess", "--help"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "--gpu-memory-gb" in r.stdout
    with pytest.raises(SystemExit) as e:
        main(["-d", "77", "--raw", str(tmp_path)])
    assert e.value.code == 2
