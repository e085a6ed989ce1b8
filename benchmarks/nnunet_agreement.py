"""Same weights, side by side: nnUNetv2_predict vs suprem_predict --nnunet-model.

    python -m benchmarks.nnunet_agreement [--work DIR] [--cases 6] [--test 2] [--epochs 4]

1. writes a small synthetic CT dataset (anisotropic: nnU-Net's separate-z rule applies),
2. plans it with ``nnUNetv2_plan_and_preprocess -c 3d_fullres --no_pp``, shrinks the
   3d_fullres patch and topology to a CPU-sized network, preprocesses with ``nnUNetv2_preprocess``,
3. trains it with nnU-Net itself for a few short epochs (a trainer variant written into the
   benchmark venv only: ``nnUNetTrainer_supremBench``, no final validation),
4. predicts the test cases with ``nnUNetv2_predict`` and with ``suprem_predict --nnunet-model``,
   with and without mirroring TTA, step 0.5, and reports per-class Dice between the outputs.

Every stage is skipped when its output already exists in ``--work`` (rerun cheaply).
nnU-Net runs in its own venv (benchmarks/_harness.py); it is never imported here.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

from suprem_net.synthetic import SyntheticSpec, write_raw_dataset
from benchmarks._harness import REPO, ensure_nnunet_env, run_measured

DATASET_ID = 951
DATASET = f"Dataset{DATASET_ID:03d}_SynthAbdomen"
TRAINER = "nnUNetTrainer_supremBench"
SHIMS = Path("/work/shared/tools/nnunet-cpu-shims")
if not SHIMS.is_dir():
    SHIMS = REPO.parent / "shared" / "tools" / "nnunet-cpu-shims"

TRAINER_SRC = '''\
"""Benchmark-only trainer written by suprem_net's benchmarks/nnunet_agreement.py:
a few short epochs on CPU, no final validation."""
import os

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


class nnUNetTrainer_supremBench(nnUNetTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = int(os.environ.get("SUPREM_BENCH_EPOCHS", "3"))
        self.num_iterations_per_epoch = int(os.environ.get("SUPREM_BENCH_ITERS", "20"))
        self.num_val_iterations_per_epoch = 2
        self.initial_lr = 1e-2

    def perform_actual_validation(self, save_probabilities: bool = False):
        pass
'''

# a CPU-sized 3d_fullres: 4 stages, 8..64 features, patch 16 x 64 x 64
TINY = {
    "patch_size": [16, 64, 64],
    "batch_size": 2,
    "n_stages": 4,
    "features_per_stage": [8, 16, 32, 64],
    "kernel_sizes": [[1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]],
    "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]],
    "n_conv_per_stage": [2, 2, 2, 2],
    "n_conv_per_stage_decoder": [2, 2, 2],
}


def nn_env(work: Path) -> dict:
    return {"nnUNet_raw": str(work / "raw"), "nnUNet_preprocessed": str(work / "preprocessed"),
            "nnUNet_results": str(work / "results"), "nnUNet_n_proc_DA": "2", "nnUNet_compile": "f",
            "PYTHONPATH": str(SHIMS), "OMP_NUM_THREADS": str(os.cpu_count() or 1)}


def shrink_plans(plans_file: Path) -> None:
    plans = json.loads(plans_file.read_text())
    cfg = plans["configurations"]["3d_fullres"]
    cfg["patch_size"] = TINY["patch_size"]
    cfg["batch_size"] = TINY["batch_size"]
    kw = cfg["architecture"]["arch_kwargs"]
    for k in ("n_stages", "features_per_stage", "kernel_sizes", "strides", "n_conv_per_stage",
              "n_conv_per_stage_decoder"):
        kw[k] = TINY[k]
    plans_file.write_text(json.dumps(plans, indent=2))


def setup(work: Path, cases: int, test: int, epochs: int, iters: int) -> Path:
    """Dataset, plans, preprocessing and a trained fold 0; returns the results folder."""
    nn_bin = ensure_nnunet_env()
    env = nn_env(work)
    raw = work / "raw"
    if not (raw / DATASET / "dataset.json").exists():
        spec = SyntheticSpec(num_cases=cases, num_classes=3, inplane_spacing=(2.2, 2.8), z_spacing=(8.0, 10.0),
                             seed=11)
        write_raw_dataset(raw, DATASET_ID, spec, num_test=test)
    plans_file = work / "preprocessed" / DATASET / "nnUNetPlans.json"
    if not plans_file.exists():
        run_measured([str(nn_bin / "nnUNetv2_plan_and_preprocess"), "-d", str(DATASET_ID), "-c", "3d_fullres",
                      "--no_pp", "-npfp", "2"], env=env)
        shrink_plans(plans_file)
    if not (work / "preprocessed" / DATASET / "nnUNetPlans_3d_fullres").is_dir():
        run_measured([str(nn_bin / "nnUNetv2_preprocess"), "-d", str(DATASET_ID), "-c", "3d_fullres", "-np", "2"],
                     env=env)
    # nnunetv2 lives only in the benchmark venv: the variant goes into its package folder
    site = next((nn_bin.parent / "lib").glob("python3*/site-packages"))
    variant = site / "nnunetv2" / "training" / "nnUNetTrainer" / "variants" / "benchmarking" / f"{TRAINER}.py"
    if not variant.exists() or variant.read_text() != TRAINER_SRC:
        variant.write_text(TRAINER_SRC)
    model = work / "results" / DATASET / f"{TRAINER}__nnUNetPlans__3d_fullres"
    if not (model / "fold_0" / "checkpoint_final.pth").exists():
        r = run_measured([str(nn_bin / "nnUNetv2_train"), str(DATASET_ID), "3d_fullres", "0", "-tr", TRAINER,
                          "-device", "cpu"],
                         env={**env, "SUPREM_BENCH_EPOCHS": str(epochs), "SUPREM_BENCH_ITERS": str(iters)})
        (work / "train_log.txt").write_text(r["output"])
        print(f"nnU-Net training: {r['wall_s']:.0f} s", file=sys.stderr)
    return model


def predict_nnunet(work: Path, out: Path, tta: bool, step: float = 0.5) -> dict:
    nn_bin = ensure_nnunet_env()
    cmd = [str(nn_bin / "nnUNetv2_predict"), "-i", str(work / "raw" / DATASET / "imagesTs"), "-o", str(out),
           "-d", str(DATASET_ID), "-c", "3d_fullres", "-tr", TRAINER, "-f", "0", "-step_size", str(step),
           "-npp", "1", "-nps", "1", "-device", "cpu", "--disable_progress_bar"]
    if not tta:
        cmd.append("--disable_tta")
    return run_measured(cmd, env=nn_env(work))


def predict_ours(work: Path, model: Path, out: Path, tta: bool, step: float = 0.5, extra: list[str] = ()) -> dict:
    exe = shutil.which("suprem_predict") or "suprem_predict"
    cmd = [exe, "-i", str(work / "raw" / DATASET / "imagesTs"), "-o", str(out), "--nnunet-model", str(model),
           "-f", "0", "--step-size", str(step), "--device", "cpu", "--overwrite", "--tta" if tta else "--no-tta",
           *extra]
    return run_measured(cmd)


def dice_per_class(a: np.ndarray, b: np.ndarray, num_classes: int) -> dict[int, float]:
    out = {}
    for c in range(1, num_classes):
        x, y = a == c, b == c
        s = int(x.sum()) + int(y.sum())
        out[c] = 1.0 if s == 0 else 2.0 * int((x & y).sum()) / s
    return out


def compare(ours: Path, theirs: Path, num_classes: int) -> dict:
    from suprem_net.io.image import read_image

    per_case = {}
    for f in sorted(theirs.glob("*.nii.gz")):
        a, ga = read_image(ours / f.name)
        b, gb = read_image(f)
        mism = ga.mismatch(gb)
        if mism:
            raise RuntimeError(f"{f.name}: geometry differs: {mism}")
        d = dice_per_class(a, b, num_classes)
        d["voxels_differing"] = int((a != b).sum())
        d["voxels_per_class_nnunet"] = np.bincount(b.ravel().astype(np.int64), minlength=num_classes)[1:].tolist()
        per_case[f.name] = d
    classes = {c: float(np.mean([v[c] for v in per_case.values()])) for c in range(1, num_classes)}
    return {"per_case": per_case, "mean_per_class": classes, "min": min(min(v[c] for c in range(1, num_classes))
                                                                         for v in per_case.values())}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=str(REPO / ".bench" / "agreement"))
    p.add_argument("--cases", type=int, default=6)
    p.add_argument("--test", type=int, default=2)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--setup-only", action="store_true")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more suprem_predict flags")
    args = p.parse_args(argv)
    work = Path(args.work)
    model = setup(work, args.cases, args.test, args.epochs, args.iters)
    if args.setup_only:
        return {"model": str(model)}
    labels = json.loads((model / "dataset.json").read_text())["labels"]
    names = {int(v): k for k, v in labels.items()}
    result = {"model": str(model)}
    for tta in (False, True):
        tag = "tta" if tta else "notta"
        theirs, ours = work / f"pred_nnunet_{tag}", work / f"pred_ours_{tag}"
        if not any(theirs.glob("*.nii.gz")):
            t = predict_nnunet(work, theirs, tta)
            (theirs / "wall_s.txt").write_text(f"{t['wall_s']:.2f}\n")
        o = predict_ours(work, model, ours, tta, extra=args.extra)
        cmp_ = compare(ours, theirs, len(labels))
        result[tag] = {"dice_per_class": {names[c]: round(d, 5) for c, d in cmp_["mean_per_class"].items()},
                       "min_dice": round(cmp_["min"], 5),
                       "voxels_differing": {k: v["voxels_differing"] for k, v in cmp_["per_case"].items()},
                       "foreground_voxels_nnunet": {k: v["voxels_per_class_nnunet"]
                                                    for k, v in cmp_["per_case"].items()},
                       "wall_s_ours": round(o["wall_s"], 2),
                       "wall_s_nnunet": float((theirs / "wall_s.txt").read_text())}
        print(f"{tag}: {json.dumps(result[tag])}", file=sys.stderr)
    return result


if __name__ == "__main__":
    json.dump(main(), sys.stdout, indent=1)
