"""The axis order the network sees: a SuPreM preset feeds its backbone what the upstream pipeline
(MONAI ``LoadImaged`` -> ``Orientationd("RAS")`` -> ``ScaleIntensityRanged``) feeds it, the volume in
NIfTI voxel order (x, y, z) with axis 0 toward Right, 1 toward Anterior, 2 toward Superior.

``nibabel.as_closest_canonical(img).get_fdata()`` is that RAS+ (x, y, z) array (MONAI's
``Orientation`` decides with the same ``io_orientation``), so the tests pin the convention without
upstream code: a CT volume with a bright block near one corner, written with several affines and
in several formats, preprocessed at native spacing, must equal the windowed canonical array."""
from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from suprem_net.io.image import Geometry, read_image
from suprem_net.planning.planner import make_plan
from suprem_net.preprocessing import orientation as ori
from suprem_net.preprocessing.case import preprocess_case, revert_labels
from suprem_net.synthetic import ct_fingerprint
from tests.helpers import write_dicom_series

SPACING = 1.5  # the presets' spacing: no resampling, so the comparison is exact
SHAPE = (20, 24, 28)  # nibabel / NIfTI voxel order (i, j, k)
CT_SPEC = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1}, "file_ending": ".nii.gz",
           "numTraining": 4}


def _rotation(degrees: float, axis: int) -> np.ndarray:
    a = np.deg2rad(degrees)
    c, s = np.cos(a), np.sin(a)
    i, j = [k for k in range(3) if k != axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


AFFINES = {  # 3x3 RAS direction matrices (columns: world direction of voxel axes i, j, k)
    "RAS": np.eye(3),
    "LPS": np.diag([-1.0, -1.0, 1.0]),
    "LAS": np.diag([-1.0, 1.0, 1.0]),
    "sagittal (axes permuted)": np.array([[0.0, 0, -1], [1, 0, 0], [0, -1, 0]]),
    "oblique": _rotation(20.0, 2) @ _rotation(-12.0, 0) @ np.diag([-1.0, 1.0, 1.0]),
}


def marker_volume(shape=SHAPE, seed=0) -> np.ndarray:
    """HU values never 0 (no crop): air, a body, and a bright block near voxel (0, 0, 0)."""
    rng = np.random.default_rng(seed)
    vol = rng.uniform(-1000, -950, shape).astype(np.float32)
    vol[3:-3, 3:-3, 2:-2] = rng.uniform(20, 80, (shape[0] - 6, shape[1] - 6, shape[2] - 4))
    vol[1:5, 2:7, 3:6] = 600.0
    vol[vol == 0] = 1.0
    return vol


def nifti(vol_ijk: np.ndarray, direction_ras: np.ndarray, path) -> nib.Nifti1Image:
    affine = np.eye(4)
    affine[:3, :3] = direction_ras * SPACING
    affine[:3, 3] = [10.0, -20.0, 30.0]
    img = nib.Nifti1Image(vol_ijk, affine)
    nib.save(img, str(path))
    return img


def upstream_input(img: nib.Nifti1Image) -> np.ndarray:
    """What SuPreM's pipeline feeds the network: RAS+ (x, y, z), HU -175..250 -> 0..1, clipped."""
    canonical = nib.as_closest_canonical(img).get_fdata(dtype=np.float32)
    return np.clip((canonical + 175.0) / 425.0, 0.0, 1.0).astype(np.float32)


@pytest.fixture(scope="module")
def preset_plan():
    plan = make_plan(CT_SPEC, ct_fingerprint(), plans_name="p", preset="suprem_unet", device="cpu")
    assert plan["axes"] == "xyz" and plan["orientation"] == "RAS"
    return plan


def ours(path, plan) -> tuple[np.ndarray, dict]:
    image, geo = read_image(path)
    data, _, props = preprocess_case([image], geo, plan)
    return data[0], props


@pytest.mark.parametrize("name", list(AFFINES))
def test_nifti_affines_reach_the_network_as_upstream(name, preset_plan, tmp_path):
    img = nifti(marker_volume(), AFFINES[name], tmp_path / "ct.nii.gz")
    expected = upstream_input(img)
    got, _ = ours(tmp_path / "ct.nii.gz", preset_plan)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    # the marker sits where the canonical array puts it (a transposed volume would fail this already)
    assert np.unravel_index(np.argmax(got), got.shape) == np.unravel_index(np.argmax(expected), expected.shape)


def _sitk_image(vol_zyx: np.ndarray, direction_lps: np.ndarray) -> sitk.Image:
    img = sitk.GetImageFromArray(vol_zyx)
    img.SetSpacing((SPACING,) * 3)
    img.SetOrigin((-5.0, 12.0, 40.0))
    img.SetDirection(tuple(direction_lps.reshape(-1)))
    return img


@pytest.mark.parametrize("fmt", ["nrrd", "dicom"])
def test_nrrd_and_dicom_reach_the_network_as_upstream(fmt, preset_plan, tmp_path):
    """The same voxels and geometry as NRRD or a DICOM series; the reference is nibabel's canonical
    array of that image written as NIfTI."""
    direction_lps = np.diag([1.0, -1.0, -1.0]) @ _rotation(15.0, 1)  # oblique, not a NIfTI default
    vol = np.round(marker_volume()).astype(np.int16)
    img = _sitk_image(np.transpose(vol, (2, 1, 0)), direction_lps)  # nibabel (i, j, k) -> SimpleITK (k, j, i)
    sitk.WriteImage(img, str(tmp_path / "ref.nii.gz"))
    expected = upstream_input(nib.load(str(tmp_path / "ref.nii.gz")))
    if fmt == "nrrd":
        sitk.WriteImage(img, str(tmp_path / "ct.nrrd"))
        got, _ = ours(tmp_path / "ct.nrrd", preset_plan)
    else:
        geo = Geometry.from_sitk(img)
        write_dicom_series(tmp_path / "series", sitk.GetArrayFromImage(img), "1.2.826.0.1.3680043.2.1125.7", geo)
        from suprem_net.inference.inputs import discover_cases, read_case

        (case,) = discover_cases(tmp_path / "series", num_channels=1)
        images, geo_read = read_case(case)
        data, _, _ = preprocess_case(images, geo_read, preset_plan)
        got = data[0]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("axes", ["xyz", "zyx"])
@pytest.mark.parametrize("name", ["LPS", "oblique", "sagittal (axes permuted)"])
def test_labels_written_back_land_on_the_input_voxels(axes, name, preset_plan, tmp_path):
    vol = marker_volume()
    nifti(vol, AFFINES[name], tmp_path / "ct.nii.gz")
    image, geo = read_image(tmp_path / "ct.nii.gz")
    labels = (image > 300).astype(np.uint8)  # the marker, in the input's own (z, y, x) voxels
    plan = {**preset_plan, "axes": axes}
    _, seg, props = preprocess_case([image], geo, plan, labels)
    assert props["axes"] == axes
    np.testing.assert_array_equal(revert_labels(seg, props), labels)


def test_old_plans_keep_their_axis_order():
    """A plan written before plans recorded their axis order is read as SimpleITK's (z, y, x)."""
    assert ori.network_axes({}) == "zyx" == ori.LEGACY_AXES
    t_old = ori.orientation_transform((-1, 0, 0, 0, -1, 0, 0, 0, 1), "RAS", "zyx")
    t_new = ori.orientation_transform((-1, 0, 0, 0, -1, 0, 0, 0, 1), "RAS", "xyz")
    a = np.arange(24).reshape(2, 3, 4)
    np.testing.assert_array_equal(ori.reorient(a, t_new), ori.reorient(a, t_old).transpose(2, 1, 0))
    assert ori.orientation_transform((1, 0, 0, 0, 1, 0, 0, 0, 1), None, "zyx") is None


def test_zero_shot_predictor_feeds_the_network_the_upstream_tensor(tmp_path, monkeypatch):
    """End to end through the Predictor with a network that records its input: one tile, so the
    logits are the network's own output on exactly the tensor the upstream pipeline builds."""
    from suprem_net.inference.predictor import Predictor
    from suprem_net.presets import load_preset

    img = nifti(marker_volume(shape=(32, 32, 32)), AFFINES["oblique"], tmp_path / "ct.nii.gz")
    expected = torch.from_numpy(upstream_input(img))[None, None]
    seen = []

    class Recorder(torch.nn.Module):
        def forward(self, x):
            seen.append(x.clone())
            return torch.cat([x, 1 - x], 1)

    pre = load_preset("suprem_unet")
    plan = {"orientation": pre["orientation"], "axes": "xyz", "target_spacing": pre["target_spacing"],
            "normalization": [pre["normalization"]], "resampling": {"anisotropy_threshold": 3.0},
            "patch_size": [32, 32, 32], "num_classes": 2, "labels": {"background": 0, "marker": 1},
            "channel_names": {"0": "CT"}, "network": {"family": "suprem_unet", "kwargs": {}}}
    image, geo = read_image(tmp_path / "ct.nii.gz")
    predictor = Predictor(plan, [Recorder()], device="cpu", tta=False)
    data, _, _ = preprocess_case([image], geo, plan)
    logits = predictor.predict_logits(data)
    assert len(seen) == 1
    torch.testing.assert_close(seen[0], expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(logits[:1], expected[0], rtol=0, atol=1e-6)
