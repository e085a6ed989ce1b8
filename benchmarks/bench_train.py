"""Side by side: seconds per training iteration of suprem_train vs nnU-Net v2's trainer, on the
same network (PlainConvUNet, same topology), patch and batch size, same data, same machine, in
one run; plus the share of each step spent waiting for data.

    python -m benchmarks.bench_train [--cases 8] [--iterations 20] [--workers 1] [--repeats 5]
                                           [--device cpu|cuda] [--inplane-spacing 2.4 3.2] [--z-spacing 2.5 5]

Both tools plan and preprocess the same generated dataset; nnU-Net's 3d_fullres plan is then
edited to our plan's patch, batch and topology, so both train the identical architecture.
nnU-Net runs with its own trainer class (timing hooks only), `nnUNet_n_proc_DA` = our
`--num-workers`, no torch.compile on the CPU (its default there; on CUDA it compiles and uses fp16
autocast, its defaults); ours runs as `suprem_train` does by default (see
suprem_net/training/acceleration.py; on CUDA: compiled, bf16 autocast). With ``--device cuda`` both
tools train on the GPU from a plan made for it (``suprem_plan_and_preprocess --device cuda``); finer
``--inplane-spacing``/``--z-spacing`` make larger cases, so that the GPU plan's patch is a realistic one.
Each tool trains two epochs and is timed on the second, after its warm-up; our one-off compilation
time is printed separately. The tools alternate, starting and ending with nnU-Net, and each of our
runs is also divided by the mean of the two nnU-Net runs around it (the machine's speed drifts).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np

from suprem_net.synthetic import SyntheticSpec, write_raw_dataset
from benchmarks._harness import REPO, ensure_nnunet_env, ratio, run_measured

DATASET_ID = 952
SHIMS = REPO.parent / "shared" / "tools" / "nnunet-cpu-shims"

NNUNET_SNIPPET = textwrap.dedent('''
    import json, sys, time
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    pp, name, iters, device = sys.argv[1], sys.argv[2], int(sys.argv[3]), torch.device(sys.argv[4])
    plans = json.load(open(f"{pp}/{name}/nnUNetPlans.json"))
    dataset_json = json.load(open(f"{pp}/{name}/dataset.json"))
    plans["continue_training"] = False  # what nnunetv2.run.run_training adds before building a trainer
    steps, epoch = [], {}

    class Timed(nnUNetTrainer):
        def __init__(self, plans, configuration, fold, dataset_json, device=device):
            super().__init__(plans, configuration, fold, dataset_json, device)
            self.num_iterations_per_epoch, self.num_val_iterations_per_epoch, self.num_epochs = iters, 1, 2

        def on_train_epoch_start(self):
            super().on_train_epoch_start()
            epoch["t0"] = time.perf_counter()

        def train_step(self, batch):
            t = time.perf_counter()
            out = super().train_step(batch)
            steps.append(time.perf_counter() - t)
            return out

        def on_train_epoch_end(self, outputs):
            epoch["t1"] = time.perf_counter()
            super().on_train_epoch_end(outputs)

    trainer = Timed(plans, "3d_fullres", 0, dataset_json, device=device)
    trainer.run_training()
    total = epoch["t1"] - epoch["t0"]
    last = steps[-iters:]  # the second epoch: both tools are timed after their first-step warm-up
    print("RESULT", json.dumps({"s_per_it": total / iters, "step_s": sum(last) / len(last),
                                "data_wait": 1 - sum(last) / total}))
''')


def _our_result(fold_dir: Path, iterations: int) -> dict:
    """The second epoch's time per iteration and data wait; the first epoch's extra time is the
    one-off warm-up (torch.compile)."""
    text = (fold_dir / "training_log.txt").read_text()
    m = re.findall(r"\(([\d.]+) s/it, (\d+)% waiting for data\)", text)
    (first, _), (s_it, wait) = m[-2], m[-1]
    return {"s_per_it": float(s_it), "data_wait": float(wait) / 100,
            "warmup_s": (float(first) - float(s_it)) * iterations}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--cases", type=int, default=8)
    p.add_argument("--iterations", type=int, default=20)
    p.add_argument("--workers", type=int, default=1, help="augmentation worker processes for both tools")
    p.add_argument("--repeats", type=int, default=5,
                   help="runs of suprem_net, each between two of nnU-Net's (medians reported)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where both tools train")
    p.add_argument("--inplane-spacing", type=float, nargs=2, default=SyntheticSpec.inplane_spacing,
                   help="range of the generated cases' in-plane spacing, mm")
    p.add_argument("--z-spacing", type=float, nargs=2, default=SyntheticSpec.z_spacing,
                   help="range of the generated cases' slice spacing, mm")
    p.add_argument("--out", help="work folder (default: temporary)")
    args = p.parse_args(argv)
    nn_bin = ensure_nnunet_env()
    work = Path(args.out or tempfile.mkdtemp(prefix="bench_train_"))
    raw = work / "raw"
    spec = SyntheticSpec(num_cases=args.cases, seed=3, inplane_spacing=tuple(args.inplane_spacing),
                         z_spacing=tuple(args.z_spacing))
    ds = write_raw_dataset(raw, DATASET_ID, spec, num_test=0)
    ours_pp, nn_pp = work / "ours_pp", work / "nn_pp"
    nproc = str(min(8, os.cpu_count() or 2))  # preprocessing processes, both tools
    run_measured(["suprem_plan_and_preprocess", "-d", str(DATASET_ID), "--raw", str(raw), "--preprocessed",
                  str(ours_pp), "-np", nproc, "--device", args.device])
    plan = json.loads((ours_pp / ds.name / "suprem_plans.json").read_text())
    env = {"nnUNet_raw": str(raw), "nnUNet_preprocessed": str(nn_pp), "nnUNet_results": str(work / "nn_results"),
           "nnUNet_n_proc_DA": str(args.workers),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(SHIMS), os.environ.get("PYTHONPATH")]))}
    if args.device == "cpu":
        env["nnUNet_compile"] = "f"  # its CPU default anyway; said, so that its log does not differ
    run_measured([str(nn_bin / "nnUNetv2_plan_and_preprocess"), "-d", str(DATASET_ID), "-c", "3d_fullres",
                  "-np", nproc, "-npfp", nproc, "--no_pbar"], env=env)
    # same architecture, patch and batch as ours
    nn_plans_path = nn_pp / ds.name / "nnUNetPlans.json"
    nn_plans = json.loads(nn_plans_path.read_text())
    cfg = nn_plans["configurations"]["3d_fullres"]
    cfg["patch_size"], cfg["batch_size"] = plan["patch_size"], plan["batch_size"]
    cfg["architecture"]["arch_kwargs"].update(plan["network"]["kwargs"])
    nn_plans_path.write_text(json.dumps(nn_plans, indent=1))
    snippet = work / "nnunet_timed.py"
    snippet.write_text(NNUNET_SNIPPET)
    runs: dict[str, list[dict]] = {"suprem_net": [], "nnunet": []}

    def nnunet_run() -> None:
        nn = run_measured([str(nn_bin / "python"), str(snippet), str(nn_pp), ds.name, str(args.iterations),
                           args.device], env=env)
        res = json.loads(nn["output"].split("RESULT", 1)[1].strip().splitlines()[0])
        runs["nnunet"].append({**res, "peak_rss_bytes": nn["peak_rss_bytes"]})

    # alternate the tools, starting and ending with nnU-Net, so that each of our runs sits between two of
    # its runs and drifting machine load hits both alike
    nnunet_run()
    for r in range(args.repeats):
        results_dir = work / f"ours_results_{r}"
        ours = run_measured(["suprem_train", str(DATASET_ID), "0", "--raw", str(raw), "--preprocessed",
                             str(ours_pp), "--results", str(results_dir), "--epochs", "2", "--iterations-per-epoch",
                             str(args.iterations), "--val-iterations", "1", "--skip-final-validation",
                             "--num-workers", str(args.workers), "--device", args.device, "--no-progress-bar"])
        runs["suprem_net"].append({**_our_result(results_dir / ds.name / "suprem_plans" / "fold_0", args.iterations),
                                   "peak_rss_bytes": ours["peak_rss_bytes"]})
        nnunet_run()
    med = {tool: {k: float(np.median([r[k] for r in rs])) for k in ("s_per_it", "data_wait", "peak_rss_bytes")}
           for tool, rs in runs.items()}
    our_res, nn_res = med["suprem_net"], med["nnunet"]
    print(f"network: nnunet PlainConvUNet {plan['network']['kwargs']['features_per_stage']}, patch "
          f"{plan['patch_size']}, batch {plan['batch_size']}, {args.iterations} iterations, {args.workers} worker(s), "
          f"on {args.device}")
    print(f"{'tool':<12}{'s/it':>8}{'waiting for data':>18}{'peak RSS MiB':>14}")
    for label, res in (("suprem_net", our_res), ("nnU-Net v2", nn_res)):
        print(f"{label:<12}{res['s_per_it']:>8.2f}{res['data_wait']:>17.1%}{res['peak_rss_bytes'] / 2**20:>14.0f}")
    warmup = float(np.median([r["warmup_s"] for r in runs["suprem_net"]]))
    print(f"suprem_net one-off warm-up (torch.compile) in its first epoch: {warmup:.0f} s")
    print(f"ours / nnU-Net (medians of our {args.repeats} and its {args.repeats + 1} alternating runs): "
          f"time per iteration "
          f"{ratio(our_res['s_per_it'], nn_res['s_per_it'])}, peak memory "
          f"{ratio(our_res['peak_rss_bytes'], nn_res['peak_rss_bytes'])}")
    # the machine's speed drifts over minutes; each of our runs against the mean of the two nnU-Net runs around it
    nn_s = [n["s_per_it"] for n in runs["nnunet"]]
    paired = [o["s_per_it"] / ((a + b) / 2) for o, a, b in zip(runs["suprem_net"], nn_s, nn_s[1:])]
    print("time per iteration, each of our runs / the mean of the nnU-Net runs just before and after it: "
          + ", ".join(f"{r:.2f}x" for r in paired) + f" (median {np.median(paired):.2f}x)")
    if not args.out:
        shutil.rmtree(work, ignore_errors=True)
    return {"median": med, "runs": runs, "paired_ratios": paired}


if __name__ == "__main__":
    json.dump(main(), sys.stdout, indent=1)
