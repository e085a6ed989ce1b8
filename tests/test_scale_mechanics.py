"""Bounded memory whatever the number of cases (issue 9): the fingerprint keeps at most
MAX_TOTAL_SAMPLES intensities, and the training data pipeline opens nothing upfront and keeps
properties and blosc2 handles of a bounded number of cases."""
from __future__ import annotations

import numpy as np
import pytest

import suprem_net.data.dataset as dataset
import suprem_net.planning.fingerprint as fingerprint
from suprem_net.data.loader import make_loader
from suprem_net.io.atomic import write_json
from suprem_net.io.dataset import load_raw_dataset
from suprem_net.preprocessing.case import sample_class_locations
from suprem_net.preprocessing.storage import case_files, save_array
from suprem_net.synthetic import SyntheticSpec, write_raw_dataset

TINY = dict(fov_mm=(80.0, 160.0, 160.0), inplane_spacing=(3.5, 4.0), z_spacing=(4.0, 5.0), num_classes=3, seed=1)


@pytest.fixture(scope="module")
def raw_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale_raw")
    return load_raw_dataset(write_raw_dataset(root, 971, SyntheticSpec(num_cases=8, **TINY), num_test=0))


@pytest.mark.parametrize("n_cases", [2, 5, 8])
def test_fingerprint_keeps_at_most_max_total_samples(raw_dataset, monkeypatch, n_cases):
    kept = []
    real_stats = fingerprint._stats
    monkeypatch.setattr(fingerprint, "MAX_TOTAL_SAMPLES", 40)
    monkeypatch.setattr(fingerprint, "_stats", lambda v: kept.append(len(v)) or real_stats(v))
    fp = fingerprint.compute_fingerprint(raw_dataset, raw_dataset.training_cases()[:n_cases], num_workers=1)
    assert fp["num_cases"] == n_cases
    assert len(kept) == 1 and 0 < kept[0] <= 40  # one channel; the bound holds for 2 and for 8 cases
    assert kept[0] >= 40 - n_cases  # and the budget is used: floor(40 / N) per case


def _write_store(folder, n_cases: int, shape=(12, 16, 16), num_classes: int = 3):
    rng = np.random.default_rng(0)
    data = {}
    for i in range(n_cases):
        cid = f"c{i:03d}"
        img = rng.normal(size=(1, *shape)).astype(np.float16)
        seg = rng.integers(0, num_classes, size=(1, *shape)).astype(np.uint8)
        files = case_files(folder, cid)
        save_array(files["image"], img, [8, 8, 8])
        save_array(files["seg"], seg, [8, 8, 8])
        write_json(files["properties"], {"case_id": cid,
                                         "class_locations": sample_class_locations(seg[0], num_classes)})
        data[cid] = (img.astype(np.float32), seg)
    return data


def test_loader_opens_nothing_upfront_and_caches_a_bounded_number_of_cases(tmp_path, monkeypatch):
    data = _write_store(tmp_path, 10)
    opened = []
    real_open = dataset.open_array
    monkeypatch.setattr(dataset, "open_array", lambda p: opened.append(p) or real_open(p))
    monkeypatch.setattr(dataset, "CACHED_CASES", 3)

    store = dataset.CaseStore(tmp_path)
    assert store.case_ids == sorted(data)
    assert opened == [] and len(store._props) == 0 and len(store._arrays) == 0  # nothing read at construction

    plan = {"patch_size": [8, 8, 8], "num_classes": 3, "labels": {"background": 0, "a": 1, "b": 2},
            "training": {"oversample_foreground": 0.5}}
    loader = make_loader(store, store.case_ids, plan, batch_size=2, seed=0, rank=0, train=True,
                         iterations_per_epoch=50, start_epoch=0, num_workers=0, augment=False)
    drawn = set()
    for _ in range(20):
        batch = next(loader)
        drawn.update(batch["keys"])
        assert len(store._props) <= 3 and len(store._arrays) <= 3
    assert len(drawn) > 3  # more cases were used than the cache holds...
    assert len(opened) <= 2 * 40  # ...each sample opens at most its image and labels, never all cases at once

    # evicted and reopened cases read back exactly what was stored
    for cid in sorted(drawn):
        img, seg = store.read(cid, (0, 0, 0), (12, 16, 16))
        np.testing.assert_array_equal(img, data[cid][0])
        np.testing.assert_array_equal(seg, data[cid][1])
    assert len(store._arrays) <= 3
