"""The checks that need a CUDA GPU, in one run (CI has none; see docs/benchmarks.md, "On a GPU").

    python -m benchmarks.cuda_check --out DIR [--work DIR] [--stages memory,train] [--device cuda]

* ``memory``: for each family, the plan ``suprem_plan_and_preprocess --device cuda`` makes for a
  typical abdominal CT dataset (8 GB budget), and one real training step of it as the trainer runs
  it (bf16 autocast, the plan's optimiser and loss, deep supervision): peak GPU memory measured
  (``torch.cuda.max_memory_allocated``) against the planner's prediction and budget, and the
  step's time and TFLOP/s (contiguous and channels-last inputs, cuDNN autotuned).
* ``train``: the command-line flow on the GPU: plan and preprocess a synthetic dataset for CUDA;
  ``suprem_train`` with the defaults (compiled, ``--precision auto``: bf16); ``--continue``; a run in
  fp16 with gradient scaling; the final validation (sliding-window prediction on the GPU); and
  ``suprem_predict`` on the GPU against the same on the CPU.

Writes ``DIR/cuda_check.json`` (every figure) after each stage and ``DIR/commands.log``; the
datasets and models go to ``--work`` (default: a temporary folder, removed). ``--device cpu`` runs
the same code on the CPU with tiny settings (to check the script itself, not the GPU).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from suprem_net.io.image import read_image
from suprem_net.networks import build_network
from suprem_net.planning.planner import make_plan
from suprem_net.synthetic import SyntheticSpec, ct_fingerprint, write_raw_dataset
from suprem_net.losses import make_loss
from suprem_net.training.schedules import make_optimizer
from suprem_net.training.trainer import parameter_groups
from benchmarks._harness import run_measured

# a typical abdominal CT collection: 2.5 mm slices, 0.8 mm in-plane, 13 organs
CT_SPEC = {"channel_names": {"0": "CT"}, "labels": {"background": 0, **{f"organ{i}": i for i in range(1, 14)}},
           "file_ending": ".nii.gz", "numTraining": 40}
FAMILIES = {"nnunet": {"network": "nnunet"}, "resenc": {"network": "resenc"},
            "suprem_unet": {"preset": "suprem_unet"}, "suprem_swinunetr": {"preset": "suprem_swinunetr"},
            "suprem_segresnet": {"preset": "suprem_segresnet"}}
DATASET_ID = 970  # apart from the other benchmarks' datasets


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measured_step(plan: dict, device: torch.device, memory_format, steps: int) -> dict:
    """Peak memory and time of the plan's training step, as the trainer runs it (eager)."""
    torch.manual_seed(0)
    family = plan["network"]["family"]
    model = build_network(plan["network"], 1, plan["num_classes"]).to(device).to(memory_format=memory_format)
    optimizer = make_optimizer(parameter_groups(model, family, 1.0)[0], plan["training"])
    loss_fn = make_loss(plan)
    b, patch = plan["batch_size"], plan["patch_size"]
    x = torch.randn(b, 1, *patch, device=device).contiguous(memory_format=memory_format)
    y = torch.randint(0, plan["num_classes"], (b, 1, *patch), device=device)
    dtype = torch.bfloat16 if device.type == "cuda" else None
    times = []
    for i in range(steps):
        if i == 1 and device.type == "cuda":  # the first step autotunes cuDNN
            torch.cuda.reset_peak_memory_stats()
        _sync(device)
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = loss_fn(model(x), y, None)
        loss.backward()
        optimizer.step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
    del model, optimizer, x, y, loss
    if device.type == "cuda":
        torch.cuda.empty_cache()
    step_s = float(np.median(times[1:])) if len(times) > 1 else times[0]
    return {"peak_bytes": int(peak), "step_s": step_s,
            "tflops": plan["memory"]["flops_per_iteration"] / step_s / 1e12}


def stage_memory(device: torch.device, tiny: bool) -> dict:
    torch.backends.cudnn.benchmark = True
    fp = ct_fingerprint()
    out = {}
    for name, kw in FAMILIES.items():
        plan = make_plan(CT_SPEC, fp, plans_name="p", device="cuda", gpu_memory_gb=8.0, **kw)
        if tiny:  # the script's own check on the CPU: same code, a patch a CPU can step through
            plan["patch_size"], plan["batch_size"] = [32, 64, 64] if "swin" not in name else [64, 64, 64], 1
        row = {"patch": plan["patch_size"], "batch": plan["batch_size"],
               "predicted_peak_bytes": plan["memory"]["predicted_peak_bytes"],
               "budget_bytes": plan["memory"]["budget_bytes"], "gflop": plan["memory"]["flops_per_iteration"] / 1e9}
        formats = {"contiguous": torch.contiguous_format}
        if plan["network"]["family"] in ("nnunet", "resenc", "suprem_unet", "segresnet"):
            formats["channels_last"] = torch.channels_last_3d
        for fmt_name, fmt in formats.items():
            try:
                row[fmt_name] = measured_step(plan, device, fmt, steps=2 if tiny else 4)
            except Exception as e:  # noqa: BLE001 - a failing family is a finding, not the end of the run
                row[fmt_name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        m = row["contiguous"]
        if m.get("peak_bytes"):
            row["measured_over_predicted"] = m["peak_bytes"] / row["predicted_peak_bytes"]
            row["within_budget"] = m["peak_bytes"] <= row["budget_bytes"]
        print(f"memory {name}: {json.dumps(row)}", flush=True)
        out[name] = row
    return out


def _run(cmd: list[str], log: Path) -> None:
    """Run one command (a failure raises with the end of its output); its output goes to ``log``."""
    with log.open("a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
    r = run_measured(cmd)
    with log.open("a") as f:
        f.write(f"# {r['wall_s']:.1f} s\n{r['output']}\n")


def _cli(name: str) -> list[str]:
    return [sys.executable, "-m", f"suprem_net.cli.{name}"]


def _epoch_lines(fold: Path) -> list[str]:
    return re.findall(r"epoch \d+: train loss .*", (fold / "training_log.txt").read_text())


def stage_train(work: Path, device: str, tiny: bool, log: Path, res: dict, save, compile_: bool = True) -> None:
    """Fills ``res`` step by step, calling ``save()`` after each (a run cut short keeps its findings)."""
    raw, pp = work / "raw", work / "pp"
    spec = SyntheticSpec(num_cases=6, seed=5) if tiny else SyntheticSpec(
        num_cases=8, seed=5, inplane_spacing=(1.4, 1.8), z_spacing=(2.0, 3.0))
    ds = write_raw_dataset(raw, DATASET_ID, spec, num_test=2)
    _run(_cli("plan_and_preprocess") + ["-d", str(DATASET_ID), "--raw", str(raw), "--preprocessed", str(pp),
                                        "-np", str(min(8, os.cpu_count() or 2)), "--device", device], log)
    plan = json.loads((pp / ds.name / "suprem_plans.json").read_text())
    res["plan"] = {"patch": plan["patch_size"], "batch": plan["batch_size"],
                   "features": plan["network"]["kwargs"].get("features_per_stage")}
    save()
    common = ["--raw", str(raw), "--preprocessed", str(pp), "--device", device, "--num-workers", "4",
              "--val-iterations", "2", "--no-progress-bar"] + ([] if compile_ else ["--no-compile"])
    its = "4" if tiny else "10"
    # 1. the defaults: compiled, --precision auto
    r1 = work / "res_auto"
    _run(_cli("train") + [str(DATASET_ID), "0", "--results", str(r1), "--epochs", "2", "--iterations-per-epoch",
                          its, "--skip-final-validation"] + common, log)
    fold = r1 / ds.name / "suprem_plans" / "fold_0"
    head = re.search(r"fold 0: .*", (fold / "training_log.txt").read_text()).group(0)
    # 2. --continue for one more epoch, then the final validation on the device
    _run(_cli("train") + [str(DATASET_ID), "0", "--results", str(r1), "--epochs", "3", "--iterations-per-epoch",
                          its, "--continue"] + common, log)
    text = (fold / "training_log.txt").read_text()
    summary = json.loads((fold / "validation" / "summary.json").read_text())
    res["auto"] = {"header": head, "epochs": _epoch_lines(fold), "resumed": "resuming" in text,
                   "validation_mean": summary["foreground_mean"]}
    save()
    # 3. fp16 with gradient scaling (CUDA only)
    if device == "cuda":
        r2 = work / "res_fp16"
        _run(_cli("train") + [str(DATASET_ID), "0", "--results", str(r2), "--epochs", "1", "--iterations-per-epoch",
                              its, "--precision", "fp16", "--skip-final-validation"] + common, log)
        fold2 = r2 / ds.name / "suprem_plans" / "fold_0"
        state = torch.load(fold2 / "checkpoint_latest.pth", map_location="cpu", weights_only=False)
        scaler = state["scaler_state"]
        res["fp16"] = {"header": re.search(r"fold 0: .*", (fold2 / "training_log.txt").read_text()).group(0),
                       "epochs": _epoch_lines(fold2), "scaler_state": {k: float(v) for k, v in (scaler or {}).items()
                                                                       if isinstance(v, (int, float))}}
        save()
    # 4. suprem_predict on the device and on the CPU: the same segmentation?
    model_dir = r1 / ds.name / "suprem_plans"
    segs = {}
    for dev in dict.fromkeys([device, "cpu"]):
        t0 = time.perf_counter()
        _run(_cli("predict") + ["-i", str(ds / "imagesTs"), "-o", str(work / f"pred_{dev}"), "-m", str(model_dir),
                                "--device", dev, "--no-tta"], log)
        segs[dev] = {"s": time.perf_counter() - t0,
                     "arrays": {p.name: read_image(p, dtype=np.uint8)[0] for p in sorted((work / f"pred_{dev}").glob("*.nii.gz"))}}
    agree = [float(np.mean(segs[device]["arrays"][k] == segs["cpu"]["arrays"][k])) for k in segs["cpu"]["arrays"]]
    res["predict"] = {"seconds": {d: v["s"] for d, v in segs.items()}, "voxel_agreement_device_vs_cpu": agree}
    print(f"train: {json.dumps(res)}", flush=True)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--work", help="datasets and models (default: a temporary folder, removed at the end)")
    p.add_argument("--stages", default="memory,train")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--no-compile", action="store_true", help="train stage without torch.compile (quicker)")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    tiny = device.type == "cpu"
    work = Path(args.work or tempfile.mkdtemp(prefix="cuda_check_"))
    report = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "bf16_supported": bool(device.type == "cuda" and torch.cuda.is_bf16_supported())}
    def save():
        (out / "cuda_check.json").write_text(json.dumps(report, indent=1))

    for stage in args.stages.split(","):
        t0 = time.perf_counter()
        try:
            if stage == "memory":
                report["memory"] = stage_memory(device, tiny)
            elif stage == "train":
                report["train"] = {}
                stage_train(work, args.device, tiny, out / "commands.log", report["train"], save,
                            compile_=not args.no_compile)
            else:
                raise SystemExit(f"unknown stage {stage}")
        except Exception as e:  # noqa: BLE001 - report and go on to the next stage
            report[stage] = {**report.get(stage, {}), "error": f"{type(e).__name__}: {str(e)[:2000]}"}
        report[f"{stage}_seconds"] = time.perf_counter() - t0
        save()
        print(f"stage {stage} done in {report[f'{stage}_seconds']:.0f} s", flush=True)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return report


if __name__ == "__main__":
    main()
