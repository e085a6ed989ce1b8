"""Stage-level tests: image I/O, orientation, resampling, case preprocessing, storage."""
import numpy as np
import pytest
import SimpleITK as sitk

from suprem_net.errors import InputError
from suprem_net.io.image import Geometry, read_header, read_image, write_image
from suprem_net.preprocessing import orientation as ori
from suprem_net.preprocessing.case import preprocess_case, revert_labels, sample_class_locations
from suprem_net.preprocessing.resampling import resample_image, resample_labels, separate_z_axis
from suprem_net.preprocessing.storage import chunks_and_blocks, open_array, save_array

GEO = Geometry(shape=(6, 7, 8), spacing=(3.5, 0.7, 0.8), origin=(-10.5, 3.25, 7.0),
               direction=(0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0))


@pytest.mark.parametrize("ending", [".nii.gz", ".nrrd", ".mha"])
@pytest.mark.parametrize("dtype", [np.int16, np.int32, np.float32])
def test_image_roundtrip_keeps_geometry_and_values(tmp_path, ending, dtype):
    arr = (np.arange(np.prod(GEO.shape)).reshape(GEO.shape) - 100).astype(dtype)
    path = tmp_path / f"img{ending}"
    write_image(path, arr, GEO)
    back, geo = read_image(path, dtype=None)
    assert back.dtype == dtype
    np.testing.assert_array_equal(back, arr)
    assert geo.shape == GEO.shape
    np.testing.assert_allclose(geo.spacing, GEO.spacing, rtol=1e-6)
    np.testing.assert_allclose(geo.origin, GEO.origin, rtol=1e-6)
    np.testing.assert_allclose(geo.direction, GEO.direction, atol=1e-7)
    assert read_header(path)[0].mismatch(geo) is None
    assert not list(tmp_path.glob(".tmp-*"))  # atomic write left no temporary


def test_reading_bad_files_names_the_file(tmp_path):
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"not a nifti at all")
    with pytest.raises(InputError, match="bad.nii.gz"):
        read_image(bad)
    flat = tmp_path / "flat.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((5, 5), np.int16)), str(flat))
    with pytest.raises(InputError, match="3D"):
        read_header(flat)


@pytest.mark.parametrize("direction", [
    (1, 0, 0, 0, 1, 0, 0, 0, 1), (-1, 0, 0, 0, -1, 0, 0, 0, 1), (0, 1, 0, 0, 0, -1, 1, 0, 0),
    (0, 0, -1, -1, 0, 0, 0, 1, 0), (0.9, 0.1, 0, -0.1, 0.9, 0, 0, 0, 1)])
def test_orientation_is_exactly_invertible_and_reaches_ras(direction):
    a = np.random.default_rng(0).random((2, 3, 4, 5))
    t = ori.orientation_transform(direction, "RAS")
    r = ori.reorient(a, t)
    np.testing.assert_array_equal(ori.restore(r, t), a)
    # after reorienting, the direction of the new axes is diag(-1, -1, 1) in LPS (x->R, y->A, z->S)
    d = np.round(np.asarray(direction, float).reshape(3, 3))
    cols = [2 - p for p in t["perm"]][::-1]  # sitk index order x, y, z of the output
    new = d[:, cols] * np.array([(-1 if f else 1) for f in t["flip"]][::-1])
    np.testing.assert_array_equal(np.sign(np.round(new)), np.diag([-1, -1, 1]))


def test_separate_z_rule():
    assert separate_z_axis([5.0, 0.8, 0.8], [5.0, 0.8, 0.8]) == 0
    assert separate_z_axis([1.0, 1.0, 1.0], [1.5, 1.5, 1.5]) is None
    assert separate_z_axis([2.0, 0.8, 0.8], [3.0, 0.8, 0.8]) == 0  # the target is anisotropic
    assert separate_z_axis([3.0, 3.0, 0.5], [3.0, 3.0, 0.5]) is None  # two coarse axes: no single z


def test_resample_image_preserves_linear_ramps_and_shape():
    ramp = np.linspace(-1, 1, 40, dtype=np.float32)
    data = np.broadcast_to(ramp[None, :, None, None], (1, 40, 12, 10)).copy()
    out = resample_image(data, (80, 12, 10), None)
    assert out.shape == (1, 80, 12, 10)
    inner = out[0, 4:-4, 5, 5]
    assert np.all(np.diff(inner) > 0)  # monotone, no ringing on a ramp
    np.testing.assert_allclose(out[0].mean(), 0.0, atol=1e-3)


def test_resample_labels_never_invents_values_and_keeps_small_classes():
    seg = np.zeros((10, 30, 30), np.uint8)
    seg[2:8, 5:20, 5:20] = 1
    seg[4:6, 10:14, 10:14] = 3  # class 2 absent on purpose
    out = resample_labels(seg, (25, 20, 20), 0, num_classes=4)
    assert set(np.unique(out)) <= {0, 1, 3}
    assert (out == 3).sum() > 0 and out.dtype == np.uint8


def _plan(**kw):
    plan = {"orientation": None, "target_spacing": [3.0, 1.5, 1.5], "num_classes": 3,
            "labels": {"background": 0, "a": 1, "b": 2},
            "normalization": [{"scheme": "ct", "clip": [-200.0, 300.0], "mean": 50.0, "std": 100.0}],
            "resampling": {"anisotropy_threshold": 3.0}}
    plan.update(kw)
    return plan


def test_preprocess_and_revert_roundtrip_anisotropic():
    rng = np.random.default_rng(0)
    geo = Geometry(shape=(12, 40, 40), spacing=(5.0, 0.8, 0.8), origin=(0, 0, 0), direction=(-1, 0, 0, 0, -1, 0, 0, 0, 1))
    img = rng.normal(40, 30, geo.shape).astype(np.float32)
    img[:, :, :3] = 0  # a zero border to crop
    seg = np.zeros(geo.shape, np.uint8)
    seg[3:9, 10:30, 10:28] = 1
    seg[5:7, 15:20, 15:20] = 2
    for orientation in (None, "RAS"):
        data, s, props = preprocess_case([img], geo, _plan(orientation=orientation), seg)
        assert data.dtype == np.float32 and data.shape[0] == 1
        assert props["bbox"][2] == [3, 40] if orientation is None else True
        assert data.max() <= (300 - 50) / 100 + 0.5  # clipped + z-scored (+ cubic overshoot)
        assert s.shape == data.shape[1:]
        back = revert_labels(s, props)
        assert back.shape == geo.shape
        for c, least in ((1, 0.9), (2, 0.7)):  # class 2 is a 2x5x5 block: a few boundary voxels matter
            inter = np.logical_and(back == c, seg == c).sum()
            dice = 2 * inter / ((back == c).sum() + (seg == c).sum())
            assert dice > least, (orientation, c, dice)


def test_preprocess_is_exact_at_native_spacing():
    geo = Geometry(shape=(8, 9, 10), spacing=(3.0, 1.5, 1.5), origin=(0, 0, 0), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))
    seg = np.random.default_rng(1).integers(0, 3, geo.shape).astype(np.uint8)
    img = np.ones(geo.shape, np.float32)
    _, s, props = preprocess_case([img], geo, _plan(orientation="RAS"), seg)
    np.testing.assert_array_equal(revert_labels(s, props), seg)


@pytest.mark.parametrize("spacing,target", [((5.0, 0.8, 0.8), [3.0, 1.5, 1.5]), ((1.0, 0.8, 0.8), [1.5, 1.2, 0.9]),
                                            ((3.0, 1.5, 1.5), [3.0, 1.5, 1.5])])
def test_pointwise_normalisation_inside_resampling_is_bit_identical(monkeypatch, spacing, target):
    """CT and window normalisations run chunk by chunk in the first resampling pass on the raw int16
    view (flipped axes: negative strides): the same numbers as normalising the whole image first, and
    never a full-size float copy; anisotropic (nearest along z), isotropic and unresampled cases."""
    import suprem_net.preprocessing.case as case_mod
    import suprem_net.preprocessing.resampling as res_mod

    monkeypatch.setattr(res_mod, "CHUNK_BYTES", 1024)  # many chunks
    rng = np.random.default_rng(2)
    geo = Geometry(shape=(14, 40, 36), spacing=spacing, origin=(0, 0, 0), direction=(-1, 0, 0, 0, -1, 0, 0, 0, 1))
    img = rng.integers(-1024, 1500, geo.shape).astype(np.int16)
    for scheme in ({"scheme": "ct", "clip": [-200.0, 300.0], "mean": 50.0, "std": 100.0},
                   {"scheme": "window", "window": [-175.0, 250.0], "range": [0.0, 1.0]}):
        plan = _plan(orientation="RAS", target_spacing=target, normalization=[scheme])
        sizes = []
        real = case_mod._normalised
        monkeypatch.setattr(case_mod, "_normalised", lambda d, s: sizes.append(d.size) or real(d, s))
        fused, _, _ = preprocess_case([img], geo, plan)
        monkeypatch.setattr(case_mod, "POINTWISE", ())  # the whole image normalised first
        whole, _, _ = preprocess_case([img], geo, plan)
        monkeypatch.undo()
        monkeypatch.setattr(res_mod, "CHUNK_BYTES", 1024)
        assert np.array_equal(fused, whole) and fused.dtype == np.float32
        resampled = list(spacing) != target
        assert (max(sizes[:-1]) < img.size and len(sizes) > 2) if resampled else sizes == [img.size, img.size]


def test_stage_times_count_nested_stages_once():
    import time

    from suprem_net.timing import StageTimes

    times = StageTimes()
    with times("outer"):
        time.sleep(0.02)
        with times("inner"):
            time.sleep(0.05)
    assert times.seconds["inner"] >= 0.05 and 0.02 <= times.seconds["outer"] < 0.05


def test_class_locations_sampled_per_class_and_capped():
    seg = np.zeros((20, 20, 20), np.uint8)
    seg[:10] = 1
    seg[15, 15, 15] = 2
    locs = sample_class_locations(seg, 4, max_per_class=50)
    assert set(locs) == {"1", "2"}
    assert len(locs["1"]) == 50 and all(seg[tuple(p)] == 1 for p in locs["1"])
    assert locs["2"] == [[15, 15, 15]]


def test_storage_roundtrip_reads_only_a_region(tmp_path):
    arr = np.random.default_rng(0).random((1, 40, 50, 60)).astype(np.float16)
    save_array(tmp_path / "a.b2nd", arr, (16, 32, 32))
    b = open_array(tmp_path / "a.b2nd")
    np.testing.assert_array_equal(b[:, 3:19, 5:37, 7:39], arr[:, 3:19, 5:37, 7:39])
    chunk, block = chunks_and_blocks(arr.shape, (16, 32, 32), 2)
    assert chunk == (1, 16, 32, 32) and np.prod(block) * 2 <= 128 * 1024
