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


def shrink_plan(plan_path, patch=(16, 16, 16), network=None, **training) -> dict:
    """Rewrite a real plan for test speed: a tiny network, ``patch``, batch 2 and the ``training``
    overrides (epochs, iterations_per_epoch, num_val_iterations). Returns the plan."""
    import json

    plan = json.loads(plan_path.read_text(encoding="utf-8"))
    plan.update(network=network or tiny_net(), patch_size=list(patch), batch_size=2)
    plan["training"].update(training)
    plan_path.write_text(json.dumps(plan), encoding="utf-8")
    return plan


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


def write_dicom_series(folder, arr, series_uid: str, geo=None) -> None:
    """One CT file per slice with the usual tags (SimpleITK's 'DICOM series from array' example),
    a Frame of Reference and a slice thickness included, as a scanner writes them.
    GDCM's writer leaves the process in the "C" locale; the locale is put back."""
    import locale

    import numpy as np
    import SimpleITK as sitk

    from suprem_net.io.image import Geometry

    geo = geo or Geometry(shape=arr.shape, spacing=(2.5, 1.0, 1.0), origin=(0.0, 0.0, 0.0),
                          direction=(1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    folder.mkdir(parents=True, exist_ok=True)
    img = geo.apply_to(sitk.GetImageFromArray(arr.astype(np.int16)))
    d = img.GetDirection()
    common = [("0008|0060", "CT"), ("0020|000d", "1.2.826.0.1.3680043.2.1125.1"), ("0020|000e", series_uid),
              ("0020|0037", "\\".join(map(str, (d[0], d[3], d[6], d[1], d[4], d[7])))),
              ("0008|103e", "synthetic"), ("0028|1053", "1"), ("0028|1052", "0"),
              ("0020|0052", "1.2.826.0.1.3680043.2.1125.4"), ("0018|0050", str(geo.spacing[0])),
              ("0010|0020", "SYNTH"), ("0020|0011", "1")]
    saved = locale.setlocale(locale.LC_ALL)
    try:
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        for i in range(img.GetDepth()):
            s = img[:, :, i]
            for k, v in common:
                s.SetMetaData(k, v)
            s.SetMetaData("0020|0032", "\\".join(map(str, img.TransformIndexToPhysicalPoint((0, 0, i)))))
            s.SetMetaData("0020|0013", str(i))
            s.SetMetaData("0008|0018", f"{series_uid}.{i}")
            writer.SetFileName(str(folder / f"{series_uid.rsplit('.', 1)[-1]}_{i:04d}.dcm"))
            writer.Execute(s)
    finally:
        locale.setlocale(locale.LC_ALL, saved)


@pytest.fixture(autouse=True)
def _locale_left_alone():
    """No code path may leave the process in another locale (e.g. "C", where Python's default text
    encoding becomes ASCII and later file reads fail in unrelated places)."""
    import locale

    before = locale.setlocale(locale.LC_ALL)
    yield
    after = locale.setlocale(locale.LC_ALL)
    assert after == before, f"the locale changed from {before!r} to {after!r}"
