"""Field of view on a short CPU budget: does a coarser spacing with a patch that sees the organs beat
the median spacing with a patch of a few centimetres, at the same wall-clock training time?

    python -m benchmarks.fov_budget prepare            # datasets, both plans, preprocessing
    python -m benchmarks.fov_budget run [--max-runs N] # train + predict + evaluate what is not done yet
    python -m benchmarks.fov_budget report             # mean +- sd per dataset and plan (markdown)

Two generated datasets (seeds no test uses) with different spacings and organ sizes:

* ``coarse``: the quick start's kind of data: 2.4-3.2 mm in-plane, 2.5-5 mm slices, six large
  structures (liver, spleen, kidneys, aorta, inferior vena cava);
* ``fine``: 0.8-0.9 mm in-plane, 2 mm slices, small structures (aorta, inferior vena cava, pancreas,
  gall bladder, duodenum, left kidney) among unlabelled large organs.

Two plans of each, from the same measured step budget on this machine (``--seconds`` per training
step, timed by the planner): ``median`` keeps the median spacing and shrinks the patch until a step
fits (the planner before the field-of-view rule; ``min_fov_share=0``); ``fov`` coarsens the spacing
until the patch covers ``MIN_FOV_SHARE`` of the median image. Each plan is trained on all training
cases with ``suprem_train --time-budget`` (the same budget for both, compile off for both, one
augmentation worker), for three training seeds; the test cases are predicted (sliding window, step
0.5, no mirroring) at the input's geometry and scored with ``suprem_evaluate`` (foreground mean DSC).
Every run is one subprocess and its result is stored as soon as it is done, so the benchmark can be run
in parts. Figures: docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks._harness import REPO

ROOT = REPO / ".bench" / "fov"
SEEDS = (0, 1, 2)
PLANS = {"median": 0.0, "fov": None}  # None: the planner's MIN_FOV_SHARE
SMALL = ("aorta", "postcava", "pancreas", "gall_bladder", "duodenum", "kidney_left")


def datasets() -> dict:
    from suprem_net.synthetic import SyntheticSpec

    return {
        "coarse": {"id": 961, "name": "FovCoarse", "test": 3,
                   "spec": SyntheticSpec(num_cases=12, num_classes=6, seed=2001)},
        "fine": {"id": 962, "name": "FovFine", "test": 2,
                 "spec": SyntheticSpec(num_cases=12, classes=SMALL, unlabelled=("liver", "spleen", "kidney_right",
                                                                             "stomach"),
                                       fov_mm=(200.0, 260.0, 260.0), inplane_spacing=(0.8, 0.9), z_spacing=(2.0, 2.0),
                                       seed=2002)},
    }


def _env() -> dict:
    return {**os.environ, "SUPREM_raw": str(ROOT / "raw"), "SUPREM_preprocessed": str(ROOT / "pp"),
            "SUPREM_results": str(ROOT / "results"), "PYTHONPATH": str(REPO)}


def _folder(key: str) -> str:
    d = datasets()[key]
    return f"Dataset{d['id']:03d}_{d['name']}"


def prepare(seconds: float) -> dict:
    """Write the datasets, plan both variants with the measured step budget, preprocess."""
    from suprem_net import api
    from suprem_net.planning.planner import MIN_FOV_SHARE, summary, time_summary
    from suprem_net.synthetic import write_raw_dataset

    info = {}
    for key, d in datasets().items():
        if not (ROOT / "raw" / _folder(key) / "dataset.json").is_file():
            write_raw_dataset(ROOT / "raw", d["id"], d["spec"], num_test=d["test"], name=d["name"])
        for plan_name, share in PLANS.items():
            t = time.perf_counter()
            r = api.plan_and_preprocess(d["id"], raw=ROOT / "raw", preprocessed=ROOT / "pp", device="cpu",
                                        plans_name=plan_name, cpu_seconds_per_iteration=seconds, num_processes=2,
                                        min_fov_share=MIN_FOV_SHARE if share is None else share)
            plan = r["plan"]
            info[f"{key}/{plan_name}"] = {"summary": summary(plan), "time": time_summary(plan),
                                          "spacing": plan["target_spacing"], "patch": plan["patch_size"],
                                          "field_of_view": plan["field_of_view"],
                                          "step_seconds": plan["speed"]["step_seconds"],
                                          "seconds": round(time.perf_counter() - t, 1)}
            print(info[f"{key}/{plan_name}"]["summary"], "|", info[f"{key}/{plan_name}"]["time"], flush=True)
    _write(ROOT / "plans.json", info)
    return info


def _write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)


def _results() -> dict:
    path = ROOT / "results.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def run_one(key: str, plan_name: str, seed: int, budget_s: float) -> dict:
    """Train (time budget), predict the test cases, evaluate; returns the figures."""
    env, folder = _env(), _folder(key)
    results = ROOT / "results" / f"seed{seed}"
    model = results / folder / plan_name
    raw = ROOT / "raw" / folder
    py = [sys.executable, "-m"]
    t = time.perf_counter()
    subprocess.run(py + ["suprem_net.cli.train", folder, "all", "--plans", plan_name, "--time-budget", str(budget_s),
                         "--seed", str(seed), "--no-compile", "--num-workers", "1", "--skip-final-validation",
                         "--no-progress-bar", "--results", str(results)], check=True, env=env, capture_output=True)
    train_s = time.perf_counter() - t
    pred = ROOT / "predictions" / f"{key}_{plan_name}_seed{seed}"
    t = time.perf_counter()
    subprocess.run(py + ["suprem_net.cli.predict", "-i", str(raw / "imagesTs"), "-o", str(pred), "-m", str(model),
                         "-f", "all", "--no-tta", "--overwrite"], check=True, env=env, capture_output=True)
    predict_s = time.perf_counter() - t
    subprocess.run(py + ["suprem_net.cli.evaluate", "-ref", str(raw / "labelsTs"), "-pred", str(pred), "-l",
                         str(raw / "dataset.json")], check=True, env=env, capture_output=True)
    summary = json.loads((pred / "summary.json").read_text())
    import torch

    ckpt = torch.load(model / "fold_all" / "checkpoint_final.pth", map_location="cpu", weights_only=True)
    plan = json.loads((model / "plans.json").read_text())
    return {"dice": summary["foreground_mean"]["dsc"],
            "per_class": {c: m["dsc"] for c, m in summary["mean"].items()},
            "epochs": int(ckpt["epoch"]), "iterations_per_epoch": plan["training"]["iterations_per_epoch"],
            "train_wall_s": round(train_s, 1), "predict_s_per_case": round(predict_s / datasets()[key]["test"], 1)}


def run(budget_s: float, max_runs: int | None) -> None:
    done = _results()
    todo = [(k, p, s) for s in SEEDS for k in datasets() for p in PLANS if f"{k}/{p}/{s}" not in done]
    for key, plan_name, seed in todo[:max_runs]:
        print(f"{key} {plan_name} seed {seed} ...", flush=True)
        r = run_one(key, plan_name, seed, budget_s)
        done = _results()
        done[f"{key}/{plan_name}/{seed}"] = {**r, "budget_s": budget_s}
        _write(ROOT / "results.json", done)
        print(f"  mean DSC {r['dice']:.3f}, {r['epochs']} x {r['iterations_per_epoch']} iterations, "
              f"{r['predict_s_per_case']} s per test case", flush=True)


def report() -> str:
    done, plans = _results(), json.loads((ROOT / "plans.json").read_text())
    lines = ["| dataset | plan | spacing (mm) | patch (vox) | patch covers | s/step | DSC, 3 seeds | mean +- sd | "
             "iterations | predict s/case |", "|---|---|---|---|---:|---:|---|---|---:|---:|"]
    for key in datasets():
        for plan_name in PLANS:
            runs = [done[f"{key}/{plan_name}/{s}"] for s in SEEDS if f"{key}/{plan_name}/{s}" in done]
            if not runs:
                continue
            p = plans[f"{key}/{plan_name}"]
            d = [r["dice"] for r in runs]
            sd = statistics.stdev(d) if len(d) > 1 else float("nan")
            its = statistics.mean(r["epochs"] * r["iterations_per_epoch"] for r in runs)
            lines.append(f"| {key} | {plan_name} | {' x '.join(f'{v:.2f}' for v in p['spacing'])} | "
                         f"{' x '.join(map(str, p['patch']))} | {100 * p['field_of_view']['share']:.1f} % | "
                         f"{p['step_seconds']:.2f} | {', '.join(f'{v:.3f}' for v in d)} | "
                         f"**{statistics.mean(d):.3f} +- {sd:.3f}** | {its:.0f} | "
                         f"{statistics.mean(r['predict_s_per_case'] for r in runs):.0f} |")
    text = "\n".join(lines)
    print(text)
    return text


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["prepare", "run", "report"])
    p.add_argument("--seconds", type=float, default=1.0, help="planned seconds per training step (default 1)")
    p.add_argument("--budget", type=float, default=240.0, help="training budget per run in seconds (default 240)")
    p.add_argument("--max-runs", type=int, help="stop after this many runs (the rest on the next call)")
    args = p.parse_args(argv)
    if args.command == "prepare":
        prepare(args.seconds)
    elif args.command == "run":
        run(args.budget, args.max_runs)
    else:
        report()


if __name__ == "__main__":
    main()
