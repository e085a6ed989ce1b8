"""Property-based (hypothesis) tests of image geometry: write -> read round trips through NIfTI,
NRRD and MHA for random shapes, dtypes, spacings, origins and directions (rotations, flips,
permutations); preprocess_case + revert_labels at native spacing and reorient/restore are exact."""
from __future__ import annotations

import itertools
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from suprem_net.io.image import Geometry, read_header, read_image, write_image
from suprem_net.preprocessing import orientation as ori
from suprem_net.preprocessing.case import preprocess_case, revert_labels

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)
DTYPES = {"int16": np.int16, "int32": np.int32, "uint8": np.uint8, "float32": np.float32}
PERMS = list(itertools.permutations(range(3)))


def _signed_permutation(perm, signs) -> np.ndarray:
    m = np.zeros((3, 3))
    for col, (row, s) in enumerate(zip(perm, signs)):
        m[row, col] = s
    return m


def _rotation(angles) -> np.ndarray:
    a, b, c = angles
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


@st.composite
def geometries(draw, oblique: bool = True) -> Geometry:
    shape = tuple(draw(st.integers(2, 9)) for _ in range(3))
    spacing = tuple(draw(st.floats(0.25, 8.0, allow_nan=False, width=32)) for _ in range(3))
    origin = tuple(draw(st.floats(-500.0, 500.0, allow_nan=False, width=32)) for _ in range(3))
    m = _signed_permutation(draw(st.sampled_from(PERMS)), [draw(st.sampled_from([-1.0, 1.0])) for _ in range(3)])
    if oblique and draw(st.booleans()):
        m = _rotation([draw(st.floats(-np.pi, np.pi)) for _ in range(3)]) @ m
    return Geometry(shape, spacing, origin, tuple(float(v) for v in m.reshape(-1)))


@st.composite
def volumes(draw, oblique: bool = True):
    geo = draw(geometries(oblique))
    name = draw(st.sampled_from(list(DTYPES)))
    dtype = DTYPES[name]
    n = int(np.prod(geo.shape))
    if dtype is np.float32:
        values = st.floats(-3e4, 3e4, allow_nan=False, width=32)
    else:
        info = np.iinfo(dtype)
        values = st.integers(int(info.min), int(info.max))
    data = draw(st.lists(values, min_size=n, max_size=n))
    return np.array(data, dtype=dtype).reshape(geo.shape), geo


@SETTINGS
@given(vol=volumes(), ending=st.sampled_from([".nii.gz", ".nii", ".nrrd", ".mha"]))
def test_write_read_round_trip(vol, ending):
    arr, geo = vol
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"img{ending}"
        write_image(path, arr, geo)
        back, g = read_image(path, dtype=None)
        header, pixel = read_header(path)
    assert back.dtype == arr.dtype and np.array_equal(back, arr)
    assert g.shape == geo.shape == header.shape and g == header
    # NRRD/MHA keep doubles; NIfTI stores spacing, origin and the rotation as float32
    tol = 1e-5 if ending.startswith(".nii") else 1e-9
    assert np.allclose(g.spacing, geo.spacing, rtol=tol, atol=0)
    assert np.allclose(g.origin, geo.origin, rtol=tol, atol=tol * 500)
    assert np.allclose(g.direction, geo.direction, atol=10 * tol)
    if ending in (".nrrd", ".mha"):
        assert g == Geometry(geo.shape, geo.spacing, geo.origin, geo.direction) or g.mismatch(geo, tol=1e-9) is None


@SETTINGS
@given(vol=volumes(oblique=False), ending=st.sampled_from([".nii.gz", ".nrrd", ".mha"]))
def test_axis_aligned_directions_are_exact(vol, ending):
    """Signed permutations (flips, axis swaps) come back exactly (NRRD: to the last bit of a double,
    ITK stores spacing x direction and divides on reading)."""
    arr, geo = vol
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"img{ending}"
        write_image(path, arr, geo)
        _, g = read_image(path, dtype=None)
    if ending == ".nrrd":
        assert np.allclose(g.direction, geo.direction, rtol=0, atol=1e-15)
    else:
        assert g.direction == geo.direction
    assert np.array_equal(np.round(g.direction), np.asarray(geo.direction))


@SETTINGS
@given(perm=st.sampled_from(PERMS), signs=st.tuples(*[st.sampled_from([-1.0, 1.0])] * 3),
       shape=st.tuples(*[st.integers(1, 7)] * 3), target=st.sampled_from(["RAS", "LPS", "RAI", "PIL", "SAR"]),
       lead=st.integers(0, 1))
def test_reorient_restore_exact(perm, signs, shape, target, lead):
    direction = tuple(_signed_permutation(perm, signs).reshape(-1))
    t = ori.orientation_transform(direction, target)
    a = np.arange(int(np.prod(shape)) * (2 if lead else 1)).reshape(((2,) if lead else ()) + shape)
    b = ori.reorient(a, t)
    assert sorted(b.shape) == sorted(a.shape)
    assert np.array_equal(ori.restore(b, t), a)
    # the reoriented array really points where the target says: its direction is the target's
    m = np.asarray(direction).reshape(3, 3)[:, [2 - p for p in t["perm"]][::-1]]
    flips = t["flip"][::-1]
    m = m * np.where(flips, -1, 1)[None, :]
    letters = {"L": (0, 1), "R": (0, -1), "P": (1, 1), "A": (1, -1), "S": (2, 1), "I": (2, -1)}
    for col, letter in enumerate(target):
        w, sign = letters[letter]
        assert m[w, col] == sign




@SETTINGS
@given(geo=geometries(oblique=False), orientation=st.sampled_from([None, "RAS", "LPS"]), axes=st.sampled_from(["xyz", "zyx"]),
       seed=st.integers(0, 2 ** 16))
def test_preprocess_then_revert_at_native_spacing_is_exact(geo, orientation, axes, seed):
    rng = np.random.default_rng(seed)
    image = rng.normal(size=geo.shape).astype(np.float32)
    labels = rng.integers(0, 4, size=geo.shape).astype(np.uint8)
    image[labels == 0] = 0  # a zero border makes the crop do something
    transform = ori.orientation_transform(geo.direction, orientation, axes)
    plan = {"orientation": orientation, "axes": axes, "normalization": [{"scheme": "zscore"}],
            "target_spacing": list(ori.reorient_spacing(geo.spacing, transform) if transform else geo.spacing),
            "resampling": {"anisotropy_threshold": 3.0}, "num_classes": 4,
            "labels": {"background": 0, "a": 1, "b": 2, "c": 3}}
    data, seg, props = preprocess_case([image], geo, plan, labels)
    assert list(data.shape[1:]) == props["shape_after_resample"] == props["shape_after_crop"]
    back = revert_labels(seg, props)
    inside = np.zeros(geo.shape, bool)
    box = tuple(slice(lo, hi) for lo, hi in props["bbox"])
    oriented = ori.reorient(inside, props["orientation"]) if props["orientation"] else inside
    oriented = oriented.copy()
    oriented[box] = True
    inside = ori.restore(oriented, props["orientation"]) if props["orientation"] else oriented
    assert back.shape == labels.shape
    assert np.array_equal(back[inside], labels[inside])  # exact inside the crop box
    assert not back[~inside].any() and not labels[~inside & (image != 0)].any()
