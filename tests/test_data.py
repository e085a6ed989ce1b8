"""Patch loading from blosc2: region reads, foreground oversampling, seeded batches."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from suprem_net import api
from suprem_net.data.augmentation import ELASTIC_ALPHA, ELASTIC_SIGMA, AugmentationConfig, SpatialAugmentation
from suprem_net.data.dataset import CaseStore
from suprem_net.data.loader import close_loader, make_loader
from suprem_net.data.sampler import forced_foreground
from suprem_net.preprocessing.storage import open_array
from suprem_net.synthetic import SyntheticSpec, write_raw_dataset

DS = "Dataset902_SynthAbdomen"


@pytest.fixture(scope="module")
def store_and_plan(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    spec = SyntheticSpec(num_cases=3, num_classes=2, fov_mm=(60, 80, 80), inplane_spacing=(2, 2), z_spacing=(3, 3))
    write_raw_dataset(root / "raw", 902, spec, num_test=0)
    api.plan_and_preprocess("902", raw=root / "raw", preprocessed=root / "pp", device="cpu", num_processes=1,
                            preprocess=False)
    plan_path = root / "pp" / DS / "suprem_plans.json"
    plan = json.loads(plan_path.read_text())
    plan["patch_size"] = [16, 24, 24]
    plan_path.write_text(json.dumps(plan))
    api.plan_and_preprocess("902", raw=root / "raw", preprocessed=root / "pp", num_processes=1)
    return CaseStore(root / "pp" / DS / plan["data_identifier"]), plan


def test_read_region_pads_outside(store_and_plan):
    store, _ = store_and_plan
    cid = store.case_ids[0]
    shape = store.shape(cid)
    img, seg = store.read(cid, [-4, -4, -4], [8, 8, 8])
    full = open_array(store.folder / f"{cid}.b2nd")[:, :4, :4, :4]
    assert img.shape == (1, 8, 8, 8) and img.dtype == np.float32
    assert np.all(img[:, :4] == 0) and np.array_equal(img[:, 4:, 4:, 4:], full.astype(np.float32))
    img, seg = store.read(cid, [s - 2 for s in shape], [4, 4, 4])
    assert np.all(seg[:, 2:] == 0)


@pytest.mark.parametrize("elastic", [False, True])
def test_spatial_augmentation_is_batchgenerators_on_the_region_it_needs(elastic):
    """Per sample, the same draws, coordinates and interpolation as batchgenerators' augment_spatial
    given a generous region around the patch, while reading only the drawn coordinates' bounding box
    (and just the patch when nothing spatial was drawn)."""
    from batchgenerators.augmentations.spatial_transformations import augment_spatial

    gen = np.random.default_rng(0)
    volume = gen.normal(size=(1, 40, 80, 80)).astype(np.float32)
    labels = gen.integers(0, 5, size=(1, 40, 80, 80)).astype(np.uint8)
    reads = []

    def read(lo, size):  # zeros outside the volume, as CaseStore.read
        reads.append([int(s) for s in size])
        img, seg = np.zeros((1, *size), np.float32), np.zeros((1, *size), np.uint8)
        src = tuple(slice(max(0, a), min(n, a + s)) for a, s, n in zip(lo, size, volume.shape[1:]))
        dst = tuple(slice(r.start - a, r.stop - a) for r, a in zip(src, lo))
        img[(slice(None),) + dst], seg[(slice(None),) + dst] = volume[(slice(None),) + src], labels[(slice(None),) + src]
        return img, seg

    patch, lo, margin = [16, 24, 24], [12, 28, 20], 24
    cfg = AugmentationConfig(elastic=elastic, p_rotation=0.5, p_scale=0.5, p_elastic=0.5)
    rz, ry, rx = np.radians(cfg.rotation_deg)
    spatial, identity = SpatialAugmentation(patch, cfg), 0
    for seed in range(8):
        np.random.seed(seed)
        img, seg = spatial(read, lo)
        size = reads[-1]
        big_img, big_seg = read([a - margin for a in lo], [p + 2 * margin for p in patch])
        np.random.seed(seed)
        ref_img, ref_seg = augment_spatial(
            big_img[None], big_seg[None], patch, None, do_elastic_deform=elastic, alpha=ELASTIC_ALPHA,
            sigma=ELASTIC_SIGMA, angle_x=(-rz, rz), angle_y=(-ry, ry), angle_z=(-rx, rx), scale=cfg.scale,
            border_mode_data="constant", border_cval_data=0, order_data=1, border_mode_seg="constant",
            border_cval_seg=0, order_seg=0, random_crop=False, p_el_per_sample=cfg.p_elastic,
            p_scale_per_sample=cfg.p_scale, p_rot_per_sample=cfg.p_rotation)
        np.testing.assert_allclose(img, ref_img[0], atol=1e-4)
        assert np.mean(seg != ref_seg[0]) < 1e-3
        if size == patch:
            identity += 1
            assert np.array_equal(img, volume[:, 12:28, 28:52, 20:44])
        else:  # the sampling coordinates' bounding box: inside the library's generous region (zoom-in: smaller)
            assert all(s < p + 2 * margin for p, s in zip(patch, size))
    assert 0 < identity < 8


def test_forced_foreground_share():
    assert forced_foreground(2, 0.33) == [False, True]
    assert sum(forced_foreground(12, 1 / 3)) == 4
    assert not any(forced_foreground(4, 0.0))


def test_oversampled_patches_contain_foreground(store_and_plan):
    store, plan = store_and_plan
    plan = {**plan, "training": {**plan["training"], "oversample_foreground": 1.0}}
    with_fg = [c for c in store.case_ids if any(store.properties(c)["class_locations"].values())]
    assert with_fg
    loader = make_loader(store, with_fg, plan, batch_size=4, seed=3, rank=0, train=False,
                         iterations_per_epoch=5, start_epoch=0, num_workers=0)
    for _ in range(3):
        batch = next(loader)
        assert batch["data"].shape == (4, 1, 16, 24, 24)
        assert all((s > 0).any() for s in batch["seg"])


def test_batches_are_seeded_by_epoch_and_iteration(store_and_plan):
    store, plan = store_and_plan
    common = dict(batch_size=2, seed=7, rank=0, train=True, iterations_per_epoch=3)
    single = make_loader(store, store.case_ids, plan, start_epoch=0, num_workers=0, **common)
    stream = [next(single) for _ in range(6)]
    multi = make_loader(store, store.case_ids, plan, start_epoch=0, num_workers=2, **common)
    try:
        for ref in stream:
            b = next(multi)
            assert (b["epoch"], b["iteration"]) == (ref["epoch"], ref["iteration"])
            assert np.array_equal(b["data"], ref["data"]) and np.array_equal(b["seg"], ref["seg"])
            # workers hand over torch tensors (shared memory, not a pipe); labels as int16
            assert b["data"].dtype == torch.float32 and b["seg"].dtype == torch.int16
    finally:
        close_loader(multi)
    resumed = make_loader(store, store.case_ids, plan, start_epoch=1, num_workers=0, **common)
    for ref in stream[3:]:
        b = next(resumed)
        assert b["epoch"] == 1 and np.array_equal(b["data"], ref["data"])
    other_rank = make_loader(store, store.case_ids, plan, start_epoch=0, num_workers=0,
                             **{**common, "rank": 1})
    assert not np.array_equal(next(other_rank)["data"], stream[0]["data"])
    assert stream[0]["data"].shape == (2, 1, 16, 24, 24)
