"""suprem_evaluate and the metrics library: analytic shapes, MONAI agreement, CLI end to end."""
from __future__ import annotations

import csv
import json
import math
import warnings

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from suprem_net.cli.evaluate import main
from suprem_net.evaluation.evaluate import evaluate_folders, parse_labels
from suprem_net.evaluation.metrics import dice, normalized_surface_dice, surface_voxels
from tests.helpers import user_error


# ----------------------------------------------------------------------------- helpers
def cube(shape, lo, side):
    m = np.zeros(shape, bool)
    m[tuple(slice(a, a + side) for a in lo)] = True
    return m


def sphere(shape, centre, radius):
    grid = np.indices(shape, dtype=float)
    return sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius ** 2


def blobs(rng, shape, thr=0.1, sigma=2.0):
    return ndimage.gaussian_filter(rng.standard_normal(shape), sigma) > thr


def nsd_uncropped(p, r, spacing, tol):
    """Straight transcription of the definition on the full array (no cropping)."""
    sp, sr = surface_voxels(p), surface_voxels(r)
    d_r = ndimage.distance_transform_edt(~sr, sampling=spacing)
    d_p = ndimage.distance_transform_edt(~sp, sampling=spacing)
    return (np.sum(d_r[sp] <= tol) + np.sum(d_p[sr] <= tol)) / (sp.sum() + sr.sum())


def cube_shift_nsd(n):
    """NSD of an n-cube against itself shifted one voxel, when only distance 0 counts:
    the shared surface voxels are the side faces of the n-1 overlapping slabs."""
    return (n - 1) * (4 * n - 4) / (n ** 3 - (n - 2) ** 3)


# ----------------------------------------------------------------------------- Dice
def test_dice_two_cubes_exact():
    a = cube((20, 20, 20), (2, 2, 2), 10)
    b = cube((20, 20, 20), (2, 2, 7), 10)  # overlap 10*10*5
    assert dice(a, b) == pytest.approx(2 * 500 / 2000, abs=0)
    c = cube((20, 20, 20), (5, 5, 5), 4)  # inside a: 2*64/(1000+64)
    assert dice(c, a) == pytest.approx(128 / 1064, rel=1e-15)
    assert dice(a, a) == 1.0


def test_dice_empty_conventions():
    z = np.zeros((5, 5, 5), bool)
    a = cube((5, 5, 5), (1, 1, 1), 2)
    assert math.isnan(dice(z, z))
    assert dice(a, z) == 0.0 and dice(z, a) == 0.0


# ----------------------------------------------------------------------------- NSD, analytic
def test_nsd_identical_and_shifted_sphere():
    s = sphere((32, 32, 32), (16, 16, 16), 9)
    t = np.roll(s, 1, axis=2)
    assert normalized_surface_dice(s, s, (1, 1, 1), 0.0) == 1.0
    assert normalized_surface_dice(t, s, (1, 1, 1), 1.0) == 1.0
    assert normalized_surface_dice(t, s, (1, 1, 1), 3.0) == 1.0
    # tolerance 0.5 mm: only voxels on both surfaces count -> |S ∩ shift(S)| / |S|
    ss = surface_voxels(s)
    expected = np.sum(ss & np.roll(ss, 1, axis=2)) / ss.sum()
    got = normalized_surface_dice(t, s, (1, 1, 1), 0.5)
    assert got == pytest.approx(expected, abs=1e-12)
    assert 0.2 < got < 0.9


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_nsd_shifted_cube_closed_form(axis):
    n = 10
    a = cube((16, 16, 16), (3, 3, 3), n)
    b = np.roll(a, 1, axis=axis)
    assert normalized_surface_dice(b, a, (1, 1, 1), 0.5) == pytest.approx(cube_shift_nsd(n), abs=1e-12)
    assert normalized_surface_dice(b, a, (1, 1, 1), 1.0) == 1.0


def test_nsd_anisotropic_spacing_matters():
    n = 10
    a = cube((16, 16, 16), (3, 3, 3), n)
    b = np.roll(a, 1, axis=0)  # shift along z
    # 2 mm z and 1.5 mm in-plane voxels: every nonzero distance exceeds 1 mm, only shared voxels count
    assert normalized_surface_dice(b, a, (2.0, 1.5, 1.5), 1.0) == pytest.approx(cube_shift_nsd(n), abs=1e-12)
    assert normalized_surface_dice(b, a, (2.0, 1.5, 1.5), 2.0) == 1.0
    # 1 mm in-plane: voxels one in-plane step from the other surface count as well
    between = normalized_surface_dice(b, a, (2.0, 1.0, 1.0), 1.0)
    assert cube_shift_nsd(n) < between < 1.0
    # the same shift with 0.8 mm z voxels is inside 1 mm
    assert normalized_surface_dice(b, a, (0.8, 3.0, 3.0), 1.0) == 1.0


def test_nsd_empty_conventions():
    z = np.zeros((6, 6, 6), bool)
    a = cube((6, 6, 6), (1, 1, 1), 3)
    assert math.isnan(normalized_surface_dice(z, z, (1, 1, 1)))
    assert normalized_surface_dice(a, z, (1, 1, 1)) == 0.0
    assert normalized_surface_dice(z, a, (1, 1, 1)) == 0.0


def test_nsd_cropping_is_exact():
    rng = np.random.default_rng(1)
    for _ in range(4):
        p, r = np.zeros((40, 48, 44), bool), np.zeros((40, 48, 44), bool)
        p[2:20, 5:30, 0:25] = blobs(rng, (18, 25, 25))  # touches the array border
        r[15:38, 20:48, 10:40] = blobs(rng, (23, 28, 30))
        r[0:3, 0:3, 40:44] = True  # far-away speck in a corner
        for sp, tol in [((1, 1, 1), 1.0), ((3.0, 0.7, 0.9), 2.2)]:
            assert normalized_surface_dice(p, r, sp, tol) == pytest.approx(nsd_uncropped(p, r, sp, tol), abs=1e-15)


# ----------------------------------------------------------------------------- MONAI agreement
def _onehot(*masks):
    import torch

    return torch.stack([torch.as_tensor(m, dtype=torch.float32) for m in masks])[:, None]


def test_dice_matches_monai():
    from monai.metrics import DiceMetric, compute_dice

    rng = np.random.default_rng(2)
    preds = [blobs(rng, (24, 28, 20)) for _ in range(6)]
    refs = [blobs(rng, (24, 28, 20)) for _ in range(6)]
    refs[5][:] = False  # empty reference, non-empty prediction
    monai_vals = compute_dice(_onehot(*preds), _onehot(*refs), include_background=True).numpy()[:, 0]
    metric = DiceMetric(include_background=True, reduction="none")
    metric(_onehot(*preds), _onehot(*refs))
    monai_agg = metric.aggregate().numpy()[:, 0]
    ours = np.array([dice(p, r) for p, r in zip(preds, refs)])
    np.testing.assert_allclose(ours[:5], monai_vals[:5], atol=1e-6, rtol=0)
    np.testing.assert_allclose(ours[:5], monai_agg[:5], atol=1e-6, rtol=0)
    # documented difference: MONAI (ignore_empty=True) gives NaN for an empty reference, we give 0
    assert math.isnan(monai_vals[5]) and ours[5] == 0.0


@pytest.mark.parametrize("spacing,tol", [((1.0, 1.0, 1.0), 1.0), ((2.5, 0.8, 0.7), 1.0),
                                         ((1.5, 1.2, 0.6), 2.0), ((0.9, 0.9, 3.0), 0.5)])
def test_nsd_matches_monai(spacing, tol):
    from monai.metrics import compute_surface_dice

    rng = np.random.default_rng(int(tol * 10 + spacing[0] * 100))
    preds = [blobs(rng, (26, 30, 22)) for _ in range(4)]
    refs = [blobs(rng, (26, 30, 22)) for _ in range(4)]
    refs[3] = np.roll(preds[3], 1, axis=1)  # near-perfect case too
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = compute_surface_dice(_onehot(*preds), _onehot(*refs), [tol], include_background=True,
                                      spacing=list(spacing), use_subvoxels=False).numpy()[:, 0]
    ours = np.array([normalized_surface_dice(p, r, spacing, tol) for p, r in zip(preds, refs)])
    np.testing.assert_allclose(ours, theirs, atol=1e-6, rtol=0)


def test_nsd_empty_matches_monai():
    from monai.metrics import compute_surface_dice

    z = np.zeros((8, 8, 8), bool)
    a = cube((8, 8, 8), (2, 2, 2), 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = compute_surface_dice(_onehot(z, a, z), _onehot(z, z, a), [1.0], include_background=True).numpy()
    ours = [normalized_surface_dice(z, z, (1, 1, 1)), normalized_surface_dice(a, z, (1, 1, 1)),
            normalized_surface_dice(z, a, (1, 1, 1))]
    assert math.isnan(theirs[0, 0]) and math.isnan(ours[0])
    assert theirs[1, 0] == ours[1] == 0.0 and theirs[2, 0] == ours[2] == 0.0


# ----------------------------------------------------------------------------- folders and CLI
SPACING_XYZ = (0.8, 0.8, 2.0)


def write_nii(path, arr, spacing_xyz=SPACING_XYZ, origin=(0.0, 0.0, 0.0)):
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing_xyz)
    img.SetOrigin(origin)
    sitk.WriteImage(img, str(path))


@pytest.fixture()
def folders(tmp_path):
    """Three cases, labels 1 and 2; case c has no label 2 anywhere, case b a false-positive 2."""
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    ref.mkdir(), pred.mkdir()
    shape = (12, 20, 20)
    maps = {}
    for name, shift, with2_ref, with2_pred in [("a", 0, True, True), ("b", 1, False, True), ("c", 2, False, False)]:
        r = np.zeros(shape, np.uint8)
        r[3:9, 4:14, 4:14] = 1
        if with2_ref:
            r[2:6, 15:19, 15:19] = 2
        p = np.roll(r == 1, shift, axis=2).astype(np.uint8)
        if with2_pred:
            p[2:6, 15:19, 15:19] = 2
        write_nii(ref / f"{name}.nii.gz", r)
        write_nii(pred / f"{name}.nii.gz", p)
        maps[name] = (r, p)
    return ref, pred, maps


def test_evaluate_folders_values(folders):
    ref, pred, maps = folders
    s = evaluate_folders(ref, pred, None, tolerance_mm=1.0, num_workers=1)
    assert s["labels"] == {"1": 1, "2": 2}
    spacing_zyx = SPACING_XYZ[::-1]
    by_case = {c["case"]: c["metrics"] for c in s["cases"]}
    for name, (r, p) in maps.items():
        assert by_case[name]["1"]["dsc"] == pytest.approx(dice(p == 1, r == 1), abs=1e-15)
        assert by_case[name]["1"]["nsd"] == pytest.approx(
            normalized_surface_dice(p == 1, r == 1, spacing_zyx, 1.0), abs=1e-15)
    assert by_case["a"]["2"]["dsc"] == 1.0
    assert by_case["b"]["2"]["dsc"] == 0.0 and by_case["b"]["2"]["nsd"] == 0.0
    assert math.isnan(by_case["c"]["2"]["dsc"]) and by_case["c"]["2"]["n_ref"] == 0
    assert s["mean"]["2"]["dsc"] == 0.5 and s["mean"]["2"]["n_cases"] == 2
    assert s["mean"]["1"]["n_cases"] == 3
    fg = (s["mean"]["1"]["dsc"] + s["mean"]["2"]["dsc"]) / 2
    assert s["foreground_mean"]["dsc"] == pytest.approx(fg)


def test_cli_end_to_end(folders, tmp_path, capsys):
    ref, pred, _ = folders
    dataset = tmp_path / "dataset.json"
    dataset.write_text(json.dumps({"labels": {"background": 0, "organ": 1, "tumor": 2}}))
    out = tmp_path / "out" / "res.json"
    rc = main(["-ref", str(ref), "-pred", str(pred), "-l", str(dataset), "-o", str(out), "-np", "2"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "organ" in printed and "tumor" in printed and "foreground" in printed
    s = json.loads(out.read_text())  # strict JSON: NaN written as null
    assert set(s["mean"]) == {"organ", "tumor"} and len(s["cases"]) == 3
    assert s["cases"][2]["metrics"]["tumor"]["dsc"] is None
    rows = list(csv.DictReader(open(out.with_suffix(".csv"))))
    assert len(rows) == 3 * 2 + 2 + 1
    assert rows[-1]["case"] == "mean" and rows[-1]["class"] == "foreground"
    assert rows[5]["dsc"] == "nan"
    assert float(rows[6]["dsc"]) == pytest.approx(s["mean"]["organ"]["dsc"])


def test_cli_default_output_and_int_labels(folders):
    ref, pred, _ = folders
    assert main(["-ref", str(ref), "-pred", str(pred), "-l", "1", "-np", "1", "--tolerance", "2"]) == 0
    s = json.loads((pred / "summary.json").read_text())
    assert s["labels"] == {"1": 1} and s["tolerance_mm"] == 2.0
    assert (pred / "summary.csv").is_file()


def _no_outputs(tmp_path):
    return not list(tmp_path.rglob("*.json")) and not list(tmp_path.rglob("*.csv"))


def test_missing_prediction(folders, tmp_path, capsys):
    ref, pred, _ = folders
    (pred / "b.nii.gz").unlink()
    user_error(main, ["-ref", str(ref), "-pred", str(pred)], capsys, str(pred / "b.nii.gz"), "missing")
    assert _no_outputs(tmp_path)


def test_2d_prediction(folders, tmp_path, capsys):
    ref, pred, _ = folders
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((20, 20), np.uint8)), str(pred / "a.nii.gz"))
    user_error(main, ["-ref", str(ref), "-pred", str(pred)], capsys, str(pred / "a.nii.gz"), "2D")
    assert _no_outputs(tmp_path)


def test_unreadable_reference(folders, tmp_path, capsys):
    ref, pred, _ = folders
    (ref / "c.nii.gz").write_bytes(b"not an image")
    user_error(main, ["-ref", str(ref), "-pred", str(pred)], capsys, str(ref / "c.nii.gz"))
    assert _no_outputs(tmp_path)


@pytest.mark.parametrize("kind", ["spacing", "size"])
def test_geometry_mismatch(folders, tmp_path, capsys, kind):
    ref, pred, maps = folders
    if kind == "spacing":
        write_nii(pred / "b.nii.gz", maps["b"][1], spacing_xyz=(0.8, 0.8, 3.0))
    else:
        write_nii(pred / "b.nii.gz", maps["b"][1][:, :, :-1])
    user_error(main, ["-ref", str(ref), "-pred", str(pred)], capsys, str(pred / "b.nii.gz"), kind)
    assert _no_outputs(tmp_path)


def test_non_integer_labels_via_pool(folders, tmp_path, capsys):
    ref, pred, maps = folders
    write_nii(pred / "a.nii.gz", maps["a"][1].astype(np.float32) * 0.5)
    user_error(main, ["-ref", str(ref), "-pred", str(pred), "-np", "2"], capsys, str(pred / "a.nii.gz"), "non-integer")
    assert _no_outputs(tmp_path)


def test_bad_label_arguments(tmp_path):
    from suprem_net.errors import SupremError

    assert parse_labels(["3", "1"]) == {"3": 3, "1": 1}
    with pytest.raises(SupremError):
        parse_labels(["liver"])
    with pytest.raises(SupremError):
        parse_labels(["0"])
    regions = tmp_path / "dataset.json"
    regions.write_text(json.dumps({"labels": {"background": 0, "whole": [1, 2]}}))
    with pytest.raises(SupremError, match="region"):
        parse_labels([str(regions)])
