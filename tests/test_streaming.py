"""Prediction in bounded memory: the sliding window streams finished slabs, the revert consumes them,
tiles that hold only air are left out (the body mask), the stage timer."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn as nn

from suprem_net.inference.export import AxisResampler, revert_logits
from suprem_net.inference.predictor import Predictor
from suprem_net.inference.sliding_window import SlidingWindow
from suprem_net.io.image import Geometry
from suprem_net.preprocessing.body import BodyMask
from suprem_net.preprocessing.case import preprocess_case
from suprem_net.preprocessing.resampling import resize_axis
from suprem_net.synthetic import SyntheticSpec, label_map, make_case
from suprem_net.timing import StageTimes


class _Smooth(nn.Module):
    """A network with context (a 3x3x3 mean) whose classes are intensity bands: background below 0.5,
    then 1 and 2 (a 'perfect' model for intensities 0, 1, 2); translation-equivariant inside the tile."""

    def __init__(self):
        super().__init__()
        self.mean = nn.Conv3d(1, 1, 3, padding=1, bias=False)
        nn.init.constant_(self.mean.weight, 1 / 27)
        self.register_buffer("c", torch.arange(3, dtype=torch.float32).view(1, -1, 1, 1, 1))

    def forward(self, x):
        return -4.0 * (self.mean(x[:, :1]) - self.c) ** 2


def _chunks(t: torch.Tensor, sizes) -> list[tuple[int, torch.Tensor]]:
    out, first = [], 0
    for n in sizes:
        if first >= t.shape[1]:
            break
        out.append((first, t[:, first:first + n]))
        first += n
    if first < t.shape[1]:
        out.append((first, t[:, first:]))
    return out


@pytest.mark.parametrize("n_in,n_out,mode", [(13, 29, "linear"), (29, 13, "linear"), (13, 29, "nearest"),
                                             (31, 9, "nearest"), (10, 10, "linear")])
def test_axis_resampler_matches_interpolate_on_any_stream(n_in, n_out, mode):
    x = torch.randn(3, n_in, 5, 4)
    ref = resize_axis(x, 0, n_out, mode)
    for sizes, most in (([n_in], None), ([1] * n_in, None), ([4, 1, 7, 2, 30], None), ([4, 1, 7, 2, 30], 2)):
        r, got = AxisResampler(n_in, n_out, mode), []
        for first, part in _chunks(x, sizes):
            for start, planes in r.push(first, part, most):
                assert start == sum(g.shape[1] for g in got)  # in order, each target once
                assert most is None or planes.shape[1] <= most
                got.append(planes)
        torch.testing.assert_close(torch.cat(got, 1), ref, atol=1e-5, rtol=1e-5)


def test_sliding_window_streams_each_plane_once_in_a_bounded_buffer():
    data = torch.randn(1, 70, 40, 30)
    sw = SlidingWindow([16, 24, 32], 3, step_size=0.5, tile_batch_size=3, mirror_axes=None)
    net = _Smooth()
    whole = sw(net, data)
    slabs = list(sw.slabs(net, data))
    assert [f for f, _ in slabs] == list(np.cumsum([0] + [p.shape[1] for _, p in slabs[:-1]]))
    assert sum(p.shape[1] for _, p in slabs) == 70
    torch.testing.assert_close(torch.cat([p for _, p in slabs], 1), whole)
    # the sums never hold more than one patch plus the spread of a tile batch along the first axis
    assert sw.buffer_planes <= 16 + 8 and sw.buffer_planes < 70


def test_revert_of_a_stream_equals_revert_of_the_whole():
    ct, masks, geo = make_case(SyntheticSpec(num_classes=3, seed=5), 0)
    plan = {"orientation": "RAS", "normalization": [{"scheme": "ct", "clip": [-100, 200], "mean": 50, "std": 60}],
            "target_spacing": [4.0, 4.5, 4.5], "resampling": {"anisotropy_threshold": 3.0}, "num_classes": 4,
            "labels": {"background": 0, "a": 1, "b": 2, "c": 3}}
    _, s, props = preprocess_case([ct], geo, plan, seg=label_map(masks))
    logits = torch.nn.functional.one_hot(torch.from_numpy(s.astype(np.int64)), 4).permute(3, 0, 1, 2).float() * 10
    logits += torch.randn_like(logits)
    labels, probs = revert_logits(logits, props, probabilities=True)
    labels2, probs2 = revert_logits(_chunks(logits, [3, 1, 5, 2, 9]), props, probabilities=True)
    assert (labels == labels2).mean() > 0.9999
    assert np.abs(probs.astype(np.float32) - probs2.astype(np.float32)).max() < 2e-3


def test_body_mask_fills_enclosed_air():
    hu = np.full((80, 80, 80), -1000, dtype=np.int16)
    hu[20:60, 20:60, 20:60] = 40        # a body ...
    hu[24:56, 24:56, 24:56] = -850      # ... with lungs inside, larger than the margin around a tile
    mask = BodyMask.of(hu, None, [[0, 80]] * 3, block=4)
    assert mask.blocks[10, 10, 10] and not mask.blocks[0, 0, 0]
    grid = (40, 40, 40)  # a preprocessed grid at half the resolution
    assert mask.tile_has_body([20, 20, 20], [1, 1, 1], grid)  # within the lungs only: kept
    assert not mask.tile_has_body([0, 0, 0], [2, 2, 2], grid)  # a corner of air: left out
    assert 0 < mask.fraction < 1


def test_body_mask_follows_orientation_and_crop():
    """The blocks, pooled on the image as read, answer for the oriented and cropped grid."""
    from suprem_net.preprocessing.orientation import reorient

    rng = np.random.default_rng(0)
    hu = np.full((23, 30, 37), -1000, dtype=np.int16)
    hu[17:20, 3:6, 29:33] = 100  # a small body off-centre
    t = {"perm": [2, 0, 1], "flip": [True, False, True]}
    oriented = reorient(hu, t)
    bbox = [[2, 35], [1, 22], [0, 29]]
    cropped = oriented[tuple(slice(lo, hi) for lo, hi in bbox)]
    mask = BodyMask.of(hu, t, bbox, block=4)
    grid = cropped.shape  # no resampling: every tile answer can be checked against the voxels
    for _ in range(300):
        size = rng.integers(1, 6, 3)
        start = [int(rng.integers(0, n - s + 1)) for n, s in zip(grid, size)]
        voxels = cropped[tuple(slice(a, a + s) for a, s in zip(start, size))]
        if (voxels > -500).any():  # a tile with body is never left out
            assert mask.tile_has_body(start, size, grid)
    far = [0, 0, 0] if (cropped[:12, :12, :12] <= -500).all() else None
    assert far is not None and not mask.tile_has_body(far, [2, 2, 2], grid)


def test_skipping_air_tiles_keeps_every_label_on_a_phantom():
    """A CT phantom with air around the body: the tiles that hold only air are left out, the logits
    of the body are the same bit for bit and the label map is the same everywhere."""
    spec = SyntheticSpec(num_classes=2, seed=7, fov_mm=(60.0, 420.0, 420.0), inplane_spacing=(3.0, 3.0),
                         z_spacing=(3.0, 3.0))
    ct, masks, geo = make_case(spec, 0)
    plan = {"orientation": "RAS", "axes": "xyz", "target_spacing": [4.0, 4.0, 4.0],
            "normalization": [{"scheme": "ct", "clip": [-1000.0, 1000.0], "mean": 0.0, "std": 100.0}],
            "resampling": {"anisotropy_threshold": 3.0}, "num_classes": 3, "patch_size": [16, 16, 16],
            "batch_size": 2, "labels": {"background": 0, "fat": 1, "tissue": 2},
            "network": {"family": "nnunet", "kwargs": {}}}
    results = {}
    for skip in (False, True):
        times = StageTimes()
        pred = Predictor(plan, [_Smooth()], device="cpu", tta=True, skip_air=skip, channels_last=False, times=times)
        labels, _ = pred.predict_case([ct], geo)
        data, props = pred.preprocessed([ct], geo)
        logits = torch.cat([p for _, p in pred.logit_slabs(data, props)], 1)
        results[skip] = labels, logits, pred.window.tiles_run, pred.window.tiles_total, data, times
    labels0, logits0, run0, total, data, _ = results[False]
    labels1, logits1, run1, _, _, times = results[True]
    assert run0 == total and run1 < total  # tiles were left out ...
    assert np.array_equal(labels0, labels1)  # ... and no label changed
    body = torch.from_numpy(data[0] > -5.0)  # HU > -500
    assert body.any() and torch.equal(logits0[:, body], logits1[:, body])
    assert {"reorient", "crop", "normalise", "resample", "tiles", "network", "accumulation",
            "revert"} <= set(times.seconds)


def test_voxels_no_tile_covers_are_background():
    data = torch.zeros(1, 40, 16, 16)
    sw = SlidingWindow([8, 16, 16], 3, step_size=1.0, mirror_axes=None)
    out = sw(_Smooth(), data, keep_tile=lambda start, size: start[0] < 8)  # only the first tile row
    assert sw.tiles_run == 1 and sw.tiles_total == 5
    assert (out[:, 8:].argmax(0) == 0).all() and (out[0, 8:] == 0).all() and (out[1:, 8:] < -1e3).all()


def _small_ct_and_plan():
    """A generated CT at 5 mm and a plan for it (3 classes, 16^3 patches) for :class:`_Smooth`."""
    ct, _, geo = make_case(SyntheticSpec(num_classes=2, seed=3, inplane_spacing=(5.0, 5.0), z_spacing=(5.0, 5.0)), 0)
    plan = {"orientation": "RAS", "axes": "xyz", "target_spacing": [5.0, 5.0, 5.0],
            "normalization": [{"scheme": "ct", "clip": [-1000.0, 1000.0], "mean": 0.0, "std": 100.0}],
            "resampling": {"anisotropy_threshold": 3.0}, "num_classes": 3, "patch_size": [16, 16, 16],
            "batch_size": 2, "labels": {"background": 0, "fat": 1, "tissue": 2},
            "network": {"family": "nnunet", "kwargs": {}}}
    return ct, geo, plan


def test_predict_case_never_holds_the_whole_logits(monkeypatch):
    """The predictor's path streams: SlidingWindow.__call__ (the whole volume) is not used."""
    ct, geo, plan = _small_ct_and_plan()
    monkeypatch.setattr(SlidingWindow, "__call__", lambda *a, **k: pytest.fail("whole-volume logits"))
    labels, _ = Predictor(plan, [_Smooth()], device="cpu", tta=False, channels_last=False).predict_case(
        [ct], Geometry(geo.shape, geo.spacing, geo.origin, geo.direction))
    assert labels.shape == geo.shape and (labels == 2).any()


def test_argmax_labels_is_argmax_with_ties_to_the_first_class():
    from suprem_net.inference.export import argmax_labels

    x = torch.randn(5, 6, 7, 8)
    x[3, 0] = x[1, 0] = x[:, 0].max(0).values + 1  # a tie between classes 1 and 3
    assert torch.equal(argmax_labels(x), x.argmax(0).to(torch.uint8))
    assert (argmax_labels(x)[0] == 1).all()


@pytest.mark.parametrize("mode", ["cubic", "linear", "nearest"])
def test_resize_axis_in_chunks_is_the_same_as_at_once(mode):
    from suprem_net.preprocessing.resampling import _resize_rows

    x = torch.randn(2, 17, 23, 19)
    for axis, size in ((0, 31), (1, 9), (2, 40)):
        whole = _resize_rows(x, axis, size, mode)
        for chunk_bytes in (1, 5000, 1 << 30):  # one row per chunk, a few, one chunk
            got = resize_axis(x, axis, size, mode, chunk_bytes=chunk_bytes)
            assert got.is_contiguous() and torch.equal(got, whole)


def test_sliding_window_slabs_equal_a_plain_gaussian_average(monkeypatch):
    """Against the sums written out directly: every tile's logits times the Gaussian, divided by the
    summed Gaussians, for handing on in slabs smaller than the advance of the tiles."""
    import suprem_net.inference.sliding_window as sw_mod

    monkeypatch.setattr(sw_mod, "RELEASE_PLANES", 3)
    torch.manual_seed(1)
    data = torch.randn(1, 45, 20, 26)
    net = _Smooth()
    sw = SlidingWindow([16, 16, 16], 3, step_size=0.4, tile_batch_size=2, mirror_axes=None)
    got = torch.cat([p for _, p in sw.slabs(net, data)], 1)
    gauss = sw_mod.gaussian_weights([16, 16, 16])
    num, den = torch.zeros(3, 45, 20, 26), torch.zeros(45, 20, 26)
    for z, y, x in itertools.product(*sw_mod.compute_steps(data.shape[1:], [16, 16, 16], 0.4)):
        sl = (slice(z, z + 16), slice(y, y + 16), slice(x, x + 16))
        with torch.no_grad():
            num[(slice(None),) + sl] += net(data[None][(slice(None), slice(None)) + sl])[0] * gauss
        den[sl] += gauss
    torch.testing.assert_close(got, num / den, atol=1e-5, rtol=1e-5)


def test_release_images_frees_the_input_before_the_network():
    ct, geo, plan = _small_ct_and_plan()
    seen = []

    class Watch(_Smooth):
        def forward(self, x):
            seen.append(len(images))
            return super().forward(x)

    images = [ct.copy()]
    pred = Predictor(plan, [Watch()], device="cpu", tta=False, channels_last=False)
    kept, _ = pred.predict_case([ct.copy()], geo)
    seen.clear()
    released, _ = pred.predict_case(images, geo, release_images=True)
    assert images == [] and seen and set(seen) == {0}  # emptied before the first tile
    assert np.array_equal(kept, released)


def test_tile_progress_bar_counts_the_tiles_run(monkeypatch):
    """``progress``: a bar over the tiles actually run (air tiles left out), shown on a terminal only;
    none without it."""
    import suprem_net.inference.sliding_window as sw_mod

    bars = []

    class Bar:
        def __init__(self, total, disable, **kwargs):
            self.total, self.disable, self.done = total, disable, 0
            bars.append(self)

        def update(self, n):
            self.done += n

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(sw_mod, "tqdm", Bar)
    ct, geo, plan = _small_ct_and_plan()
    for progress in (True, False):
        pred = Predictor(plan, [_Smooth()], device="cpu", tta=False, channels_last=False, progress=progress)
        pred.predict_case([ct], geo)
        bar = bars[-1]
        assert bar.total == pred.window.tiles_run == bar.done > 1
        assert bar.disable is (None if progress else True)


def test_heap_goes_back_after_forwards_only_above_the_bound(monkeypatch):
    """The CPU predictor calls ``return_free_memory(PREDICTION_FREE_HEAP)`` after every tile batch; it
    trims only when more than the bound is free (where glibc says how much is)."""
    import suprem_net.networks.speed as speed

    calls = []
    ct, geo, plan = _small_ct_and_plan()
    pred = Predictor(plan, [_Smooth()], device="cpu", tta=False, channels_last=False, tile_batch_size=1)
    monkeypatch.setattr(pred.window, "after_forward", lambda: calls.append(1))
    pred.predict_case([ct], geo)
    assert len(calls) == pred.window.tiles_run > 1
    assert Predictor(plan, [_Smooth()], device="cpu").window.after_forward.args == (speed.PREDICTION_FREE_HEAP,)

    trims = []
    monkeypatch.setattr(speed, "_glibc", lambda name: (lambda *a: trims.append(a) or 1))
    for free, bound, trimmed in ((10, 100, False), (200, 100, True), (None, 100, True), (10, 0, True)):
        monkeypatch.setattr(speed, "heap_free_bytes", lambda: free)
        trims.clear()
        assert speed.return_free_memory(bound) is trimmed and len(trims) == trimmed
