"""Helpers shared by the tests: tiny synthetic datasets and networks, model folders, DICOM series,
running a CLI in-process and checking its one-line error, hashing file trees."""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

from suprem_net import api
from suprem_net.synthetic import SyntheticSpec

DS = "Dataset901_SynthAbdomen"


def tiny_spec(**kw) -> SyntheticSpec:
    base = dict(num_cases=3, num_classes=3, fov_mm=(60.0, 96.0, 96.0), inplane_spacing=(2.0, 3.0),
                z_spacing=(3.0, 5.0), seed=1)
    base.update(kw)
    return SyntheticSpec(**base)


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

    from suprem_net.networks import build_network

    api.plan_and_preprocess(dataset, raw=raw_root, preprocessed=pp_root, preprocess=False, device="cpu",
                            num_processes=1)
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


def training_extras() -> dict:
    return {"optimizer": {"state": {0: {"step": torch.tensor(5.0), "exp_avg": torch.zeros(3)}},
                          "param_groups": [{"lr": 1e-3, "weight_decay": 1e-5, "params": [0]}]},
            "scheduler": {"last_epoch": 5, "base_lrs": [1e-3], "warmup_epochs": 20}, "epoch": 5}


def universal_checkpoint(backbone: OrderedDict, dec_ch: int, bottleneck_ch: int) -> dict:
    """The SuPreM / Universal-Model layout: DDP prefix, CLIP wrapper around ``backbone.``."""
    net = OrderedDict()
    net["module.organ_embedding"] = torch.randn(32, 512)
    for k, v in backbone.items():
        net[f"module.backbone.{k}"] = v
    net["module.precls_conv.0.weight"] = torch.randn(dec_ch)
    net["module.precls_conv.0.bias"] = torch.randn(dec_ch)
    net["module.precls_conv.2.weight"] = torch.randn(8, dec_ch, 1, 1, 1)
    net["module.precls_conv.2.bias"] = torch.randn(8)
    net["module.GAP.0.weight"] = torch.randn(bottleneck_ch)
    net["module.GAP.0.bias"] = torch.randn(bottleneck_ch)
    net["module.GAP.3.weight"] = torch.randn(256, bottleneck_ch, 1, 1, 1)
    net["module.GAP.3.bias"] = torch.randn(256)
    net["module.controller.weight"] = torch.randn(153, 512, 1, 1, 1)
    net["module.controller.bias"] = torch.randn(153)
    net["module.text_to_vision.weight"] = torch.randn(256, 512)
    net["module.text_to_vision.bias"] = torch.randn(256)
    return {"net": net, **training_extras()}


def _determinism_plan(family: str, mirror: bool) -> dict:
    network = tiny_net((4, 8, 16)) if family == "nnunet" else {"family": "suprem_unet", "kwargs": {}}
    return {"orientation": "RAS", "axes": "xyz", "target_spacing": [3.0, 3.0, 3.0],
            "normalization": [{"scheme": "window", "window": [-175, 250], "range": [0.0, 1.0]}],
            "resampling": {"anisotropy_threshold": 3.0}, "patch_size": [32, 32, 32], "batch_size": 2,
            "num_classes": 33 if family == "universal" else 3, "network": network,
            "mirror_axes": [0, 1, 2] if mirror else []}


def tiny_predictions() -> dict[str, np.ndarray]:
    """Logits of a tiny nnU-Net (tiles batched, mirroring) and of a Universal Model on the SuPreM U-Net
    (batch statistics: one tile at a time) for one synthetic case, seeded weights, on 2 threads (the
    summation order, and so the last bits, depend on the thread count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        return _tiny_predictions()
    finally:
        torch.set_num_threads(threads)


def _tiny_predictions() -> dict[str, np.ndarray]:
    from suprem_net.inference.predictor import Predictor
    from suprem_net.networks import build_network
    from suprem_net.networks.universal import UniversalModel
    from suprem_net.preprocessing.case import preprocess_case
    from suprem_net.synthetic import make_case

    spec = SyntheticSpec(num_cases=1, seed=5, fov_mm=(90.0, 120.0, 120.0), inplane_spacing=(2.5, 2.5),
                         z_spacing=(3.0, 3.0))
    ct, _, geo = make_case(spec, 0)  # about 30 x 40 x 40 voxels at 3 mm: 4 tiles of 32^3
    out = {}
    for family in ("nnunet", "universal"):
        torch.manual_seed(0)
        if family == "universal":
            model = UniversalModel("suprem_unet", 32)
            torch.nn.init.normal_(model.organ_embedding)
        else:
            model = build_network(_determinism_plan(family, True)["network"], 1, 3)
        plan = _determinism_plan(family, family == "nnunet")
        data, _, _ = preprocess_case([ct.astype(np.float32)], geo, plan)
        predictor = Predictor(plan, [model.eval()], device="cpu", tta=family == "nnunet", step_size=0.5)
        out[family] = predictor.predict_logits(data).numpy()
    return out


def tree_digest(folder: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``folder`` (empty dict when it does not exist)."""
    folder = Path(folder)
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def files_under(folder: Path) -> list[str]:
    """Every file (not folder) under ``folder``, relative; [] when it does not exist."""
    folder = Path(folder)
    if not folder.exists():
        return []
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() or p.is_symlink())


def run_cli(main: Callable, argv: list[str], capsys) -> tuple[int, str, str]:
    """Run a CLI ``main`` in-process; return ``(exit code, stdout, stderr)``."""
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return int(code or 0), out, err


def assert_user_error(code: int, err: str, *needles: str) -> str:
    """Exit code 2 and exactly one ``error: ...`` line on stderr that contains every needle."""
    # progress bars (tqdm, "...%|...") may precede the error on stderr; everything else may not
    lines = [ln for ln in err.replace("\r", "\n").strip().splitlines() if ln.strip() and "%|" not in ln]
    assert code == 2, f"exit code {code}, stderr:\n{err}"
    assert len(lines) == 1 and lines[0].startswith("error: "), f"expected one 'error:' line, got:\n{err}"
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


def no_partial_files(folder: Path) -> None:
    """No temporary ``.tmp-*`` file is left anywhere under ``folder``."""
    left = [p for p in Path(folder).rglob(".tmp-*")] if Path(folder).exists() else []
    if left:
        pytest.fail(f"temporary files left behind: {left}")


def user_error(main: Callable, argv: list[str], capsys, *needles: str) -> str:
    """Run a CLI ``main`` in-process and check :func:`assert_user_error`; returns the error line."""
    code, _, err = run_cli(main, argv, capsys)
    return assert_user_error(code, err, *needles)


TINY_NET = tiny_net((2, 4))  # the robustness tests' network: every CLI run takes well under a second
