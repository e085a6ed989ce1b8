import os

import pytest

from suprem_net.synthetic import SyntheticSpec, write_raw_dataset

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("SUPREM_compile", "0")  # tests that compile say so; compiling every tiny run costs minutes


def tiny_spec(**kw) -> SyntheticSpec:
    base = dict(num_cases=3, num_classes=3, fov_mm=(60.0, 96.0, 96.0), inplane_spacing=(2.0, 3.0),
                z_spacing=(3.0, 5.0), seed=1)
    base.update(kw)
    return SyntheticSpec(**base)


@pytest.fixture
def tiny_raw(tmp_path):
    """A 3-case synthetic raw dataset Dataset901_SynthAbdomen under tmp_path/raw."""
    folder = write_raw_dataset(tmp_path / "raw", 901, tiny_spec(), num_test=1)
    return folder


def tiny_net(features: tuple[int, ...] = (4, 8)) -> dict:
    """A plan ``network`` entry for a tiny nnunet (one stride-2 stage per extra feature level)."""
    n = len(features)
    return {"family": "nnunet", "deep_supervision": True, "kwargs": {
        "n_stages": n, "features_per_stage": list(features), "kernel_sizes": [[3, 3, 3]] * n,
        "strides": [[1, 1, 1]] + [[2, 2, 2]] * (n - 1), "n_conv_per_stage": [1] * n,
        "n_conv_per_stage_decoder": [1] * (n - 1)}}


def write_model_dir(raw_root, pp_root, results_root, network: dict, patch, dataset="Dataset901_SynthAbdomen"):
    """Plan ``dataset`` for real, swap in ``network`` and ``patch``, and write a model folder
    (plans.json, dataset.json, fold_0/checkpoint_final.pth with seeded random weights)."""
    import json
    import shutil

    import torch

    from suprem_net.cli.plan_and_preprocess import main as plan_main
    from suprem_net.networks import build_network

    assert plan_main(["-d", dataset, "--raw", str(raw_root), "--preprocessed", str(pp_root), "--no-preprocess",
                      "--device", "cpu", "-np", "1"]) == 0
    plan = json.loads((pp_root / dataset / "suprem_plans.json").read_text())
    plan["network"], plan["patch_size"] = network, list(patch)
    torch.manual_seed(0)
    net = build_network(plan["network"], 1, plan["num_classes"])
    md = results_root / dataset / "suprem_plans"
    (md / "fold_0").mkdir(parents=True)
    (md / "plans.json").write_text(json.dumps(plan))
    shutil.copy(raw_root / dataset / "dataset.json", md / "dataset.json")
    torch.save({"network_weights": net.state_dict()}, md / "fold_0" / "checkpoint_final.pth")
    return md
