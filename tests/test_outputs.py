"""suprem_predict's outputs for clinicians and dataset builders: --output-type dicom-seg, --statistics,
--output-layout abdomenatlas (read back by suprem_convert_abdomenatlas)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest

from suprem_net.cli.convert_abdomenatlas import main as convert_main
from suprem_net.cli.predict import main as predict_main
from suprem_net.io.atomic import read_json
from suprem_net.io.image import Geometry, read_image, write_image
from suprem_net.synthetic import SyntheticSpec, write_raw_dataset
from tests.helpers import tiny_net, write_dicom_series, write_model_dir

SPEC = SyntheticSpec(num_cases=3, num_classes=3, seed=3, inplane_spacing=(5.0, 6.0), z_spacing=(5.0, 6.0))
FAST = ["--no-tta", "--step-size", "1", "--device", "cpu"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("outputs")
    write_raw_dataset(root / "raw", 901, SPEC, num_test=2)
    return write_model_dir(root / "raw", root / "pp", root / "results", tiny_net((2, 4, 8)), [32, 32, 32])


@pytest.fixture(scope="module")
def unlabelled_images(model_dir) -> Path:
    return model_dir.parents[2] / "raw" / "Dataset901_SynthAbdomen" / "imagesTs"


def _oblique_series(unlabelled_images: Path, folder: Path) -> np.ndarray:
    from scipy.spatial.transform import Rotation

    arr, geo = read_image(unlabelled_images / "case_003_0000.nii.gz")
    direction = tuple(Rotation.from_euler("xyz", [15, 0, -25], degrees=True).as_matrix().ravel())
    write_dicom_series(folder, arr, "1.2.826.0.1.3680043.2.1125.2.60", Geometry(geo.shape, geo.spacing, geo.origin,
                                                                                   direction))
    return arr


def test_dicom_seg_and_statistics_from_a_dicom_series(model_dir, unlabelled_images, tmp_path):
    series = tmp_path / "CT_SERIES"
    _oblique_series(unlabelled_images, series)
    out = tmp_path / "out"
    assert predict_main(["-i", str(series), "-o", str(out), "-m", str(model_dir), *FAST,
                         "--output-type", "dicom-seg", "--statistics"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["CT_SERIES.dcm", "CT_SERIES_statistics.csv",
                                                     "CT_SERIES_statistics.json"]
    assert predict_main(["-i", str(series), "-o", str(tmp_path / "nifti"), "-m", str(model_dir), *FAST]) == 0
    labels, geo = read_image(tmp_path / "nifti" / "CT_SERIES.nii.gz", dtype=np.uint8)
    assert len(np.unique(labels)) > 1  # something to compare

    from suprem_net.io.dicom import load_source

    source = load_source(series, geo)
    seg = hd.seg.segread(out / "CT_SERIES.dcm")
    decoded = seg.get_pixels_by_source_instance([ds.SOPInstanceUID for ds in source.datasets],
                                                combine_segments=True, relabel=False,
                                                assert_missing_frames_are_empty=True)
    assert np.array_equal(decoded, labels)  # the SEG decodes to the label map, voxel for voxel
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["liver", "spleen", "kidney_left"]
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == "1.2.826.0.1.3680043.2.1125.2.60"

    stats = read_json(out / "CT_SERIES_statistics.json")
    assert stats["case"] == "CT_SERIES" and [r["class"] for r in stats["classes"]] == ["liver", "spleen", "kidney_left"]
    voxel_ml = float(np.prod(geo.spacing)) / 1000
    for row in stats["classes"]:
        assert row["voxels"] == int((labels == row["label"]).sum())
        assert row["volume_ml"] == pytest.approx(row["voxels"] * voxel_ml)
    assert len((out / "CT_SERIES_statistics.csv").read_text().splitlines()) == 4  # header + 3 classes


def test_dicom_seg_refuses_non_dicom_input(model_dir, unlabelled_images, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        predict_main(["-i", str(unlabelled_images), "-o", str(out), "-m", str(model_dir), "--output-type", "dicom-seg"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and not out.exists()
    assert "case_003_0000.nii.gz: not a DICOM series (and 1 more case(s)): --output-type dicom-seg" in err[0]
    with pytest.raises(SystemExit) as e:
        predict_main(["-i", str(unlabelled_images), "-o", str(out), "-m", str(model_dir), "--output-type", "dicom-seg",
                      "--output-layout", "abdomenatlas"])
    assert e.value.code == 2 and not out.exists()


def test_dicom_seg_to_a_file_name(model_dir, unlabelled_images, tmp_path, capsys):
    series = tmp_path / "series"
    _oblique_series(unlabelled_images, series)
    with pytest.raises(SystemExit) as e:
        predict_main(["-i", str(series), "-o", str(tmp_path / "seg.nii.gz"), "-m", str(model_dir), *FAST,
                      "--output-type", "dicom-seg"])
    assert e.value.code == 2 and "give a folder or a .dcm file name" in capsys.readouterr().err
    assert predict_main(["-i", str(series), "-o", str(tmp_path / "o" / "seg.dcm"), "-m", str(model_dir), *FAST,
                         "--output-type", "dicom-seg", "--statistics"]) == 0
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["seg.dcm", "seg_statistics.csv",
                                                                  "seg_statistics.json"]
    assert hd.seg.segread(tmp_path / "o" / "seg.dcm").Modality == "SEG"


def test_abdomenatlas_layout_round_trips_through_the_converter(model_dir, unlabelled_images, tmp_path, capsys):
    atlas_in = tmp_path / "atlas_in"
    for i, name in enumerate(("BDMAP_00000001", "BDMAP_00000002")):
        (atlas_in / name).mkdir(parents=True)
        shutil.copy(unlabelled_images / f"case_00{3 + i}_0000.nii.gz", atlas_in / name / "ct.nii.gz")
    out = tmp_path / "atlas_out"
    assert predict_main(["-i", str(atlas_in), "-o", str(out), "-m", str(model_dir), *FAST,
                         "--output-layout", "abdomenatlas"]) == 0
    capsys.readouterr()
    # asking for statistics afterwards predicts again only because they are missing
    assert predict_main(["-i", str(atlas_in), "-o", str(out), "-m", str(model_dir), *FAST,
                         "--per-organ", "--statistics"]) == 0
    assert "0 already done, wrote 2 to" in capsys.readouterr().out
    assert sorted(p.name for p in (out / "BDMAP_00000001").iterdir()) == [
        "combined_labels.nii.gz", "segmentations", "statistics.csv", "statistics.json"]
    for case in ("BDMAP_00000001", "BDMAP_00000002"):  # the CT beside the predictions: a full AbdomenAtlas case
        shutil.copy(atlas_in / case / "ct.nii.gz", out / case / "ct.nii.gz")
    assert convert_main([str(out), "-d", "950", "--name", "Back", "--raw", str(tmp_path / "raw"), "-np", "1"]) == 0
    back = tmp_path / "raw" / "Dataset950_Back"
    model_labels = {v: k for k, v in json.loads((model_dir / "plans.json").read_text())["labels"].items()}
    back_labels = json.loads((back / "dataset.json").read_text())["labels"]
    assert set(back_labels) == set(model_labels.values())
    for case in ("BDMAP_00000001", "BDMAP_00000002"):
        pred, geo = read_image(out / case / "combined_labels.nii.gz", dtype=np.uint8)
        conv, cgeo = read_image(back / "labelsTr" / f"{case}.nii.gz", dtype=np.uint8)
        assert not geo.mismatch(cgeo) and len(np.unique(pred)) > 1
        for value, name in model_labels.items():  # the same voxels carry the same class names
            assert np.array_equal(pred == value, conv == back_labels[name]), (case, name)
        assert (back / "imagesTr" / f"{case}_0000.nii.gz").read_bytes() == (atlas_in / case / "ct.nii.gz").read_bytes()


def test_statistics_next_to_a_single_output_file(model_dir, unlabelled_images, tmp_path):
    img, geo = read_image(unlabelled_images / "case_004_0000.nii.gz")
    write_image(tmp_path / "ct.nrrd", img.astype(np.int16), geo)
    assert predict_main(["-i", str(tmp_path / "ct.nrrd"), "-o", str(tmp_path / "o" / "seg.nrrd"), "-m", str(model_dir),
                         *FAST, "--statistics"]) == 0
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["seg.nrrd", "seg_statistics.csv",
                                                                  "seg_statistics.json"]
