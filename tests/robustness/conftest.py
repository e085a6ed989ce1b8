"""Fixtures of the robustness matrix: a tiny raw dataset (copied per test) and a tiny model folder."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from suprem_net import api
from suprem_net.synthetic import SyntheticSpec, write_raw_dataset
from tests.helpers import shrink_plan, write_model_dir
from tests.helpers import DS, TINY_NET

# coarse spacing: every volume is about 10 x 16 x 16 voxels, so each CLI run takes well under a second
SMALL = SyntheticSpec(num_cases=3, num_classes=2, fov_mm=(60.0, 80.0, 80.0), inplane_spacing=(5.0, 5.0),
                      z_spacing=(6.0, 6.0), seed=5)


@pytest.fixture(scope="session")
def _raw_template(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("raw_template")
    write_raw_dataset(root / "raw", 901, SMALL, num_test=2)
    return root / "raw"


@pytest.fixture
def raw(tmp_path, _raw_template) -> Path:
    """A private copy of the 3-case raw dataset: ``tmp_path/raw/Dataset901_SynthAbdomen``."""
    shutil.copytree(_raw_template, tmp_path / "raw")
    return tmp_path / "raw" / DS


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, _raw_template) -> Path:
    """A model folder (plans.json, dataset.json, fold_0/checkpoint_final.pth) with a tiny random network."""
    root = tmp_path_factory.mktemp("model")
    return write_model_dir(_raw_template, root / "pp", root / "results", TINY_NET, [16, 16, 16])


@pytest.fixture
def unlabelled_images(_raw_template) -> Path:
    """Two unlabelled images ``case_003_0000.nii.gz``, ``case_004_0000.nii.gz`` (read only: copy before changing)."""
    return _raw_template / DS / "imagesTs"


@pytest.fixture(scope="session")
def train_root(tmp_path_factory, _raw_template) -> Path:
    """``root/raw`` and ``root/pp`` (preprocessed, with a tiny network, 2 epochs of 2 iterations)."""

    root = tmp_path_factory.mktemp("train")
    shutil.copytree(_raw_template, root / "raw")
    api.plan_and_preprocess("901", raw=root / "raw", preprocessed=root / "pp", device="cpu", num_processes=1)
    shrink_plan(root / "pp" / DS / "suprem_plans.json", patch=(8, 16, 16), network=TINY_NET, epochs=2,
                iterations_per_epoch=2, num_val_iterations=1)
    return root
