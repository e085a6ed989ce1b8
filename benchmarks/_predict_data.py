"""Data, models and one-case runners for ``benchmarks.predict_limits``.

* CT-sized generated cases: ``ct300`` (512 x 512 x 300, 0.8 mm in-plane, 1.5 mm slices) and ``ct500``
  (512 x 512 x 500, 1.0 mm slices), int16 HU, six organs, a body in air;
* the nnU-Net model: trained by nnU-Net v2 itself (``benchmarks.nnunet_agreement``), with its two
  small test cases;
* a SuPreM U-Net model folder: the ``suprem_unet`` preset's plan (RAS, 1.5 mm, HU window, 96^3 tiles)
  for 7 classes, seeded random weights (speed and memory do not depend on the weights);
* :class:`Sampled`: runs the real network for the first ``real`` forwards and replays the last output
  for the rest, timing the real ones, so that a case that would take half an hour of network time on
  two cores is profiled in minutes (the network time is then the mean real forward x forwards);
* ``python -m benchmarks._predict_data CASE_DIR OUT MODEL [--nnunet] [--sample K] [...]``: one
  prediction in its own process (for peak RSS), with this checkout's code or any other on PYTHONPATH.
"""
from __future__ import annotations

import argparse
import inspect
import json
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

from benchmarks._harness import REPO

WORK = REPO / ".bench" / "predict_limits"
AGREEMENT = REPO / ".bench" / "agreement"
CASES = {"ct300": (300, 1.5), "ct500": (500, 1.0)}


def ct_case(name: str) -> Path:
    """The folder holding generated case ``name`` (``<name>_0000.nii.gz``), written once."""
    from suprem_net.io.image import write_image
    from suprem_net.synthetic import SyntheticSpec, make_case

    folder = WORK / "cases" / name
    path = folder / f"{name}_0000.nii.gz"
    if not path.is_file():
        n, sz = CASES[name]
        spec = SyntheticSpec(num_classes=6, inplane_spacing=(0.8, 0.8), z_spacing=(sz, sz),
                             fov_mm=(n * sz, 409.6, 409.6), seed=23)
        ct, _, geo = make_case(spec, 0)
        folder.mkdir(parents=True, exist_ok=True)
        write_image(path, ct, geo)
    return folder


def nnunet_model() -> Path:
    from benchmarks import nnunet_agreement as agree

    return agree.setup(AGREEMENT, 6, 2, 40, 25)


def nnunet_test_cases() -> Path:
    from benchmarks import nnunet_agreement as agree

    return AGREEMENT / "raw" / agree.DATASET / "imagesTs"


def suprem_model(num_organs: int = 6) -> Path:
    """A model folder with the suprem_unet preset's plan for ``num_organs`` + 1 classes, seeded weights."""
    from suprem_net import api
    from suprem_net.networks import build_network
    from suprem_net.synthetic import SyntheticSpec, write_raw_dataset

    model = WORK / "suprem_unet_model"
    if (model / "fold_0" / "checkpoint_final.pth").is_file():
        return model
    raw, pp = WORK / "suprem_raw", WORK / "suprem_pp"
    spec = SyntheticSpec(num_cases=2, num_classes=num_organs, fov_mm=(60.0, 120.0, 120.0), seed=1)
    write_raw_dataset(raw, 960, spec, num_test=0)
    planned = api.plan_and_preprocess(960, raw=raw, preprocessed=pp, preset="suprem_unet", device="cpu",
                                      preprocess=False, num_processes=1)
    plan = planned["plan"]
    plan["patch_size"] = [96, 96, 96]  # the published patch (the planner shrinks it for a CPU's budget)
    torch.manual_seed(0)
    net = build_network(plan["network"], len(plan["channel_names"]), plan["num_classes"])
    (model / "fold_0").mkdir(parents=True, exist_ok=True)
    (model / "plans.json").write_text(json.dumps(plan, indent=1))
    shutil.copy(raw / "Dataset960_SynthAbdomen" / "dataset.json", model / "dataset.json")
    torch.save({"network_weights": net.state_dict()}, model / "fold_0" / "checkpoint_final.pth")
    return model


class Sampled(nn.Module):
    """``net`` for the first ``real`` forwards, then the last output again (see the module docstring)."""

    def __init__(self, net: nn.Module, real: int) -> None:
        super().__init__()
        self.net, self.real, self.calls, self.seconds, self.last = net, real, 0, [], None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls <= self.real or self.last is None or self.last.shape[0] != x.shape[0]:
            t = time.perf_counter()
            out = self.net(x)
            self.seconds.append(time.perf_counter() - t)
            self.last = out
            return out
        return self.last.clone()

    def estimated_seconds(self) -> float:
        """Network seconds of all forwards: the mean real forward (the first, a warm-up, left out
        when there are more) times the forwards."""
        real = self.seconds[1:] if len(self.seconds) > 1 else self.seconds
        return sum(real) / len(real) * self.calls


def predictor(model: Path, *, nnunet: bool = False, **options):
    """A Predictor for a model folder, nnU-Net results folder or bundle, with this checkout's code."""
    from suprem_net.inference import bundle
    from suprem_net.inference.nnunet_compat import load_nnunet_model, preprocess_nnunet
    from suprem_net.inference.predictor import Predictor

    if bundle.is_bundle(model):
        plan, models, manifest = bundle.load_bundle(model)
        pre = preprocess_nnunet if manifest.get("source") == "nnunetv2" else None
        return Predictor(plan, models, preprocess=pre, **options)
    if nnunet:
        plan, models, _ = load_nnunet_model(model)
        return Predictor(plan, models, preprocess=preprocess_nnunet, **options)
    return Predictor.from_model_dir(model, lcc=False, **options)


def _main() -> None:
    """One case in this process: read, predict (network sampled if asked), write; prints a JSON line."""
    p = argparse.ArgumentParser()
    p.add_argument("case_dir")
    p.add_argument("out")
    p.add_argument("model")
    p.add_argument("--nnunet", action="store_true")
    p.add_argument("--sample", type=int, default=0, help="real forwards before replaying (0: all real)")
    p.add_argument("--tta", action="store_true")
    args = p.parse_args()
    from suprem_net.inference.inputs import discover_cases, read_case
    from suprem_net.inference.export import write_labels
    from suprem_net.inference.nnunet_compat import load_nnunet_model, preprocess_nnunet
    from suprem_net.inference.predictor import Predictor

    t0 = time.perf_counter()
    if args.nnunet:  # works with the code of other checkouts too (no keyword they lack)
        plan, models, _ = load_nnunet_model(args.model)
        pred = Predictor(plan, models, preprocess=preprocess_nnunet, device="cpu", tta=args.tta)
    else:
        pred = Predictor.from_model_dir(args.model, device="cpu", tta=args.tta, lcc=False)
    if args.sample:
        pred.models = [Sampled(m, args.sample) for m in pred.models]
    (case,) = discover_cases(args.case_dir)
    images, geometry = read_case(case)
    # as suprem_predict does (the code before this issue has no such keyword)
    release = {"release_images": True} if "release_images" in inspect.signature(pred.predict_case).parameters else {}
    labels, _ = pred.predict_case(images, geometry, **release)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_labels(Path(args.out), labels, geometry)
    forwards = sum(m.calls for m in pred.models) if args.sample else None
    print(json.dumps({"seconds": time.perf_counter() - t0, "forwards": forwards}))


if __name__ == "__main__":
    sys.exit(_main())
