"""suprem_merge_datasets: two generated datasets with overlapping and disjoint classes (one naming a class by a
synonym) merged into a multi-label dataset, conflicts refused, an interrupted merge resumed; then planned,
trained briefly with the masked loss and predicted with every merged class."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from suprem_net import api
from suprem_net.cli.merge_datasets import main as merge_main
from suprem_net.io.image import read_image
from suprem_net import labels as bitmask
from suprem_net.synthetic import SyntheticSpec, write_raw_dataset
from tests.helpers import shrink_plan, tiny_net

MERGED = ["liver", "spleen", "kidney_left", "kidney_right", "aorta"]


def _spec(classes, seed) -> SyntheticSpec:
    return SyntheticSpec(num_cases=3, classes=classes, fov_mm=(60, 96, 96), inplane_spacing=(3.0, 3.0),
                         z_spacing=(4.0, 4.0), seed=seed)


def _rename_class(folder: Path, old: str, new: str) -> None:
    spec = json.loads((folder / "dataset.json").read_text())
    spec["labels"] = {(new if k == old else k): v for k, v in spec["labels"].items()}
    (folder / "dataset.json").write_text(json.dumps(spec))


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("merge") / "raw"
    write_raw_dataset(root, 911, _spec(("liver", "spleen", "kidney_left"), 1), num_test=1, name="A")
    b = write_raw_dataset(root, 912, _spec(("liver", "kidney_right", "aorta"), 2), num_test=0, name="B")
    _rename_class(b, "kidney_right", "kidney_r")  # B names the right kidney by a synonym
    (root.parent / "aliases.json").write_text(json.dumps({"kidney_r": "kidney_right", "kidney_l": "kidney_left"}))
    return root


def _merge(raw: Path, *extra: str) -> int:
    return merge_main(["-d", "911", "912", *extra, "--raw", str(raw), "-np", "1"])


def test_conflicts_are_listed_one_per_line_and_nothing_is_written(raw, capsys):
    c = write_raw_dataset(raw, 914, _spec(("kidney_left", "kidney_right"), 3), num_test=0, name="C")
    _rename_class(c, "kidney_right", "kidney_l")  # with the aliases, two classes of C mean kidney_left
    spec = json.loads((c / "dataset.json").read_text())
    spec["channel_names"] = {"0": "MR"}
    (c / "dataset.json").write_text(json.dumps(spec))
    with pytest.raises(SystemExit) as e:
        merge_main(["-d", "911", "912", "914", "-o", "920", "--raw", str(raw), "--aliases",
                    str(raw.parent / "aliases.json")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and not list(raw.glob("Dataset920_*"))
    assert "error: Dataset914_C: channels {'0': 'MR'} differ from Dataset911_A's {'0': 'CT'}" in lines
    assert "error: Dataset914_C: classes 'kidney_left' and 'kidney_l' both map to 'kidney_left'" in lines
    dup = [ln for ln in lines if "case id" in ln]
    assert len(dup) == 6 and dup[0].startswith("error: case id 'case_000' is in Dataset911_A and Dataset912_B")
    assert dup[-1] == "error: case id 'case_002' is in Dataset911_A and Dataset914_C"
    assert len(lines) == 8  # one line per conflict, nothing else


def test_merge_resume_train_and_predict_all_classes(raw, tmp_path, monkeypatch, capsys):
    import suprem_net.io.merge as merge

    args = ["-o", "913", "--aliases", str(raw.parent / "aliases.json"), "--prefix-case-ids"]
    calls = []
    real = merge._merge_case

    def interrupted(job):
        if len(calls) == 4:
            raise KeyboardInterrupt
        calls.append(job[0].new_id)
        return real(job)

    monkeypatch.setattr(merge, "_merge_case", interrupted)
    with pytest.raises(SystemExit):
        _merge(raw, *args)
    out = raw / "Dataset913_Merged"
    assert (out / merge.PLAN_FILE).is_file() and not (out / "dataset.json").exists()
    done_before = {p.name: p.stat().st_mtime_ns for p in (out / "labelsTr").iterdir()}
    assert len(done_before) == 4
    monkeypatch.setattr(merge, "_merge_case", real)
    with pytest.raises(SystemExit) as e:  # another merge into the unfinished folder is refused
        _merge(raw, "-o", "913", "--prefix-case-ids")
    assert e.value.code == 2 and "unfinished merge of other inputs" in capsys.readouterr().err
    assert _merge(raw, *args) == 0  # the same command resumes
    assert {p.name: p.stat().st_mtime_ns for p in (out / "labelsTr").iterdir() if p.name in done_before} == done_before
    assert not (out / merge.PLAN_FILE).exists()

    spec = json.loads((out / "dataset.json").read_text())
    assert spec["labels"] == {"background": 0, **{n: i for i, n in enumerate(MERGED, 1)}}
    assert spec["label_encoding"] == "bitmask" and spec["numTraining"] == 6
    assert spec["partial_labels"]["Dataset911_A_case_001"] == ["kidney_right", "aorta"]
    assert spec["partial_labels"]["Dataset912_B_case_002"] == ["spleen", "kidney_left"]
    src = raw / "Dataset912_B"
    assert (out / "imagesTr" / "Dataset912_B_case_001_0000.nii.gz").read_bytes() == \
        (src / "imagesTr" / "case_001_0000.nii.gz").read_bytes()
    seg, geo = read_image(out / "labelsTr" / "Dataset912_B_case_001.nii.gz", dtype=None)
    orig, ogeo = read_image(src / "labelsTr" / "case_001.nii.gz", dtype=np.uint8)
    assert seg.dtype == np.uint8 and not geo.mismatch(ogeo)
    for value, merged in ((1, 1), (2, 4), (3, 5)):  # liver, kidney_r -> kidney_right, aorta
        assert np.array_equal(bitmask.channel(seg, merged), orig == value)
    assert not bitmask.channel(seg, 2).any() and not bitmask.channel(seg, 3).any()
    assert _merge(raw, *args) == 0  # a finished merge is left as it is

    # plan, preprocess, train briefly with the masked Dice + BCE, predict every merged class
    from suprem_net.cli.predict import main as predict_main
    from suprem_net.cli.train import main as train_main

    pp, results = tmp_path / "pp", tmp_path / "results"
    api.plan_and_preprocess("913", raw=raw, preprocessed=pp, device="cpu", num_processes=1)
    plan = shrink_plan(pp / "Dataset913_Merged" / "suprem_plans.json", network=tiny_net(), epochs=2,
                       iterations_per_epoch=2, num_val_iterations=1)
    assert plan["num_classes"] == 5 and plan["training"]["loss"] == "dice_bce"
    props = json.loads((pp / "Dataset913_Merged" / "suprem_plans" / "Dataset912_B_case_000.json").read_text())
    assert props["annotated_classes"] == [1, 4, 5]
    assert train_main(["913", "0", "--raw", str(raw), "--preprocessed", str(pp), "--results", str(results),
                       "--num-workers", "0", "--no-progress-bar"]) == 0
    fold = results / "Dataset913_Merged" / "suprem_plans" / "fold_0"
    summary = json.loads((fold / "validation" / "summary.json").read_text())
    for row in summary["cases"]:  # a validation case is scored only on the classes its dataset annotates
        unannotated = spec["partial_labels"][row["case_id"]]
        assert all(row["dice"][c] is None for c in unannotated)
    test_image = raw / "Dataset911_A" / "imagesTs" / "case_003_0000.nii.gz"
    assert predict_main(["-i", str(test_image), "-o", str(tmp_path / "pred"), "-m", str(fold.parent),
                         "--output-layout", "abdomenatlas", "--statistics", "--no-tta", "--device", "cpu"]) == 0
    case = tmp_path / "pred" / "case_003"
    assert sorted(p.name for p in (case / "segmentations").iterdir()) == sorted(f"{n}.nii.gz" for n in MERGED)
    stats = json.loads((case / "statistics.json").read_text())["classes"]
    assert [r["class"] for r in stats] == MERGED  # every class's own (sigmoid) mask
    for row in stats:
        mask, _ = read_image(case / "segmentations" / f"{row['class']}.nii.gz", dtype=np.uint8)
        assert row["voxels"] == int(mask.sum())


def _tiny_dataset(root: Path, name: str, labels: dict, segs: dict, **extra) -> Path:
    from suprem_net.io.atomic import write_json
    from suprem_net.io.image import Geometry, write_image

    folder = root / name
    geo = Geometry((3, 4, 5), (2.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    for case, seg in segs.items():
        write_image(folder / "imagesTr" / f"{case}_0000.nii.gz", np.zeros(geo.shape, np.int16), geo)
        write_image(folder / "labelsTr" / f"{case}.nii.gz", seg, geo)
    write_json(folder / "dataset.json", {"channel_names": {"0": "CT"}, "labels": {"background": 0, **labels},
                                         "numTraining": len(segs), "file_ending": ".nii.gz", **extra})
    return folder


def test_bitmask_sources_keep_overlaps_and_their_own_partial_labels(tmp_path):
    from suprem_net.errors import InputError
    from suprem_net.io.dataset import load_raw_dataset
    from suprem_net.io.merge import plan_merge, run_merge

    both = np.zeros((3, 4, 5), np.uint8)
    both[0, :2], both[0, 1:3] = 1, 3  # voxels of row 1 carry classes a and b
    x = _tiny_dataset(tmp_path, "Dataset001_X", {"a": 1, "b": 2}, {"x1": both, "x2": both & 1},
                      label_encoding="bitmask", partial_labels={"x2": ["b"]})
    y_seg = np.zeros((3, 4, 5), np.uint8)
    y_seg[2] = 2
    y = _tiny_dataset(tmp_path, "Dataset002_Y", {"c": 1, "b": 2}, {"y1": y_seg})
    plan = plan_merge([load_raw_dataset(x), load_raw_dataset(y)], tmp_path / "Dataset003_M", "M")
    assert plan.spec["labels"] == {"background": 0, "a": 1, "b": 2, "c": 3}
    assert plan.spec["partial_labels"] == {"x1": ["c"], "x2": ["b", "c"], "y1": ["a"]}
    out = run_merge(plan)
    x1, _ = read_image(out / "labelsTr" / "x1.nii.gz", dtype=None)
    assert np.array_equal(x1, both)  # bits a=1, b=2 keep their numbers and the overlap
    y1, _ = read_image(out / "labelsTr" / "y1.nii.gz", dtype=None)
    assert set(np.unique(y1)) == {0, 2} and np.array_equal(y1 == 2, y_seg == 2)  # Y's b (value 2) is bit 2

    y_seg[0, 0, 0] = 7  # a value dataset.json does not know: the label is refused, not silently dropped
    bad = _tiny_dataset(tmp_path, "Dataset004_Z", {"c": 1, "b": 2}, {"z1": y_seg})
    with pytest.raises(InputError, match=r"label values \[7\] are not in dataset.json"):
        run_merge(plan_merge([load_raw_dataset(x), load_raw_dataset(bad)], tmp_path / "Dataset005_N", "N"))
