"""One benchmark report: nnU-Net v2 and suprem_net side by side on generated data, same machine.

    python -m benchmarks.report [--work DIR] [--pp-cases 8] [--skip-preprocess] [--skip-train]

Rows (each tool run as a separate process; wall time and peak summed RSS of its process tree):

* plan + preprocess: ``benchmarks.bench_preprocess`` (nnU-Net ``-c 3d_fullres`` vs
  ``suprem_plan_and_preprocess``, same workers), disk of the preprocessed data;
* prediction without / with mirroring TTA through the *same weights*: a model trained by
  nnU-Net (``benchmarks.nnunet_agreement``), ``nnUNetv2_predict -npp 1 -nps 1 -device cpu``
  vs ``suprem_predict --nnunet-model``, step 0.5, same test cases; per-class Dice of the
  two outputs;
* training: the same network, patch and batch, two epochs of ``--iters`` iterations with
  ``nnUNetv2_train`` and ``suprem_train``, seconds per iteration of the second epoch from each
  tool's log (the first holds one-off warm-up such as torch.compile).

Also the convolution throughput of our prediction (FLOPs of one tile from
``torch.utils.flop_counter`` x forwards / sliding-window time) against a measured fp32
``torch.mm`` peak. Prints the table and writes docs/benchmarks_report.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks import bench_preprocess
from benchmarks import nnunet_agreement as agree
from benchmarks._harness import REPO, ensure_nnunet_env, ratio, run_measured

MIB = 2 ** 20

NOTES = """## Profile of suprem_predict on the nnU-Net model, and what was changed

Measured with `torch.profiler` on one forward of the nnU-Net network (2 tiles of 16x64x64) and
per-stage timers around `Predictor.predict_case` (read, preprocess, sliding window, revert):
the sliding window is >95 % of a case (preprocess and revert < 0.3 s each). Inside the forward:

| op | share before |
|---|---:|
| `mkldnn_convolution` | 48 % |
| `native_batch_norm` (InstanceNorm3d's route) | 33 % |
| `leaky_relu_` | 7 % |
| `cat` / `copy_` (decoder skips) | 5 % |

Changes (in that order):

1. **Tiles per forward on the CPU** (`predictor.cpu_tile_batch`): oneDNN is far slower per tile
   at batch 1-2 than at ~8 (CPU seconds per 16x64x64 tile: 0.51 at batch 1, 0.23 at 2, 0.13 at
   4, 0.10 at 8). Small patches are now grouped until tiles x mirrors reach 8 (at most 2 M input
   voxels per forward; large patches are unchanged). nnU-Net runs 1 tile per forward.
2. **Instance norm through one `group_norm`** (`nnunet_compat.FastInstanceNorm`, swapped in after
   loading the weights): ~2x faster than `instance_norm`'s batch-norm route, same arithmetic.
   Sliding window of one case without TTA: 43 s -> 12 s with 1 and 2 (loaded machine).
3. Tried and rejected: `channels_last_3d` (no gain), bf16 autocast (this CPU has no
   AVX512-BF16/AMX: 1.7x slower, logits up to 0.1 apart).

The machine was shared with other jobs while this ran (load average in the machine table), so
absolute times are noisy; both tools ran back to back under the same conditions.
"""


def machine() -> dict:
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    nn_bin = ensure_nnunet_env()
    nn_version = subprocess.run([str(nn_bin / "python"), "-c", "import importlib.metadata as m; "
                                 "print(m.version('nnunetv2'))"], capture_output=True, text=True).stdout.strip()
    from importlib.metadata import version
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gib": round(os.sysconf("SC_PHYS_PAGES") *
                                                                   os.sysconf("SC_PAGE_SIZE") / 2 ** 30, 1),
            "python": platform.python_version(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "nnunetv2": nn_version, "suprem_net": version("suprem_net"),
            "dynamic_network_architectures": version("dynamic_network_architectures"),
            "load_average_at_start": os.getloadavg()}


def matmul_peak(n: int = 2048, repeats: int = 5) -> float:
    """fp32 GFLOP/s of a large torch.mm (best of ``repeats``)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9


def conv_throughput(model_dir: Path, image: Path, tta: bool) -> dict:
    """FLOPs per tile x forwards / sliding-window seconds for one case, in this process."""
    from torch.utils.flop_counter import FlopCounterMode

    from suprem_net.inference.inputs import Case, read_case
    from suprem_net.inference.nnunet_compat import load_nnunet_model
    from suprem_net.inference.predictor import Predictor
    from suprem_net.inference.sliding_window import compute_steps
    from suprem_net.preprocessing.case import preprocess_case

    plan, models, _ = load_nnunet_model(model_dir)
    pred = Predictor(plan, models, device="cpu", tta=tta)
    net = pred.models[0]
    with torch.inference_mode(), FlopCounterMode(display=False) as fc:
        net(torch.zeros(1, len(plan["channel_names"]), *plan["patch_size"]))
    flops_tile = fc.get_total_flops()
    images, geo = read_case(Case(name="x", files=[image]))
    data, _, _ = preprocess_case(images, geo, plan)
    padded = [max(s, p) for s, p in zip(data.shape[1:], plan["patch_size"])]
    tiles = int(np.prod([len(s) for s in compute_steps(padded, plan["patch_size"], 0.5)]))
    forwards = tiles * len(pred.window.mirrors)
    pred.window(net, data)  # warm-up
    t = time.perf_counter()
    pred.window(net, data)
    secs = time.perf_counter() - t
    return {"gflop_per_tile": flops_tile / 1e9, "tiles": tiles, "forwards": forwards, "window_s": secs,
            "gflops": flops_tile * forwards / secs / 1e9}


def predict_rows(work: Path, model: Path) -> tuple[list[dict], dict]:
    labels = json.loads((model / "dataset.json").read_text())["labels"]
    names = {int(v): k for k, v in labels.items()}
    n_cases = len(list((work / "raw" / agree.DATASET / "imagesTs").glob("*.nii.gz")))
    rows, dice = [], {}
    for tta in (False, True):
        tag = "tta" if tta else "notta"
        theirs, ours = work / f"report_nnunet_{tag}", work / f"report_ours_{tag}"
        shutil.rmtree(theirs, ignore_errors=True)
        shutil.rmtree(ours, ignore_errors=True)
        t = agree.predict_nnunet(work, theirs, tta)
        o = agree.predict_ours(work, model, ours, tta)
        cmp_ = agree.compare(ours, theirs, len(labels))
        dice[tag] = {names[c]: round(d, 4) for c, d in cmp_["mean_per_class"].items()}
        dice[tag]["voxels_differing"] = {k: v["voxels_differing"] for k, v in cmp_["per_case"].items()}
        dice[tag]["foreground_voxels_nnunet"] = {k: v["voxels_per_class_nnunet"] for k, v in cmp_["per_case"].items()}
        rows.append({"row": f"predict, TTA {'on' if tta else 'off'} (s/case)",
                     "nnunet_wall": t["wall_s"] / n_cases, "ours_wall": o["wall_s"] / n_cases,
                     "nnunet_rss": t["peak_rss_bytes"], "ours_rss": o["peak_rss_bytes"],
                     "cmd_nnunet": " ".join(Path(c).name if i == 0 else c for i, c in enumerate(
                         ["nnUNetv2_predict", "-i", "imagesTs", "-o", "OUT", "-d", str(agree.DATASET_ID), "-c",
                          "3d_fullres", "-tr", agree.TRAINER, "-f", "0", "-step_size", "0.5", "-npp", "1", "-nps",
                          "1", "-device", "cpu"] + ([] if tta else ["--disable_tta"]))),
                     "cmd_ours": f"suprem_predict -i imagesTs -o OUT --nnunet-model MODEL -f 0 --step-size 0.5 "
                                 f"--device cpu {'--tta' if tta else '--no-tta'}"})
    return rows, dice


def train_row(work: Path, model: Path, iters: int) -> dict | None:
    """nnUNetv2_train vs suprem_train on the same network/patch/batch: seconds per iteration of the
    second of two epochs."""
    if not shutil.which("suprem_train"):
        return None
    nn_bin = ensure_nnunet_env()
    nn_res = work / "train_bench_nnunet"
    shutil.rmtree(nn_res, ignore_errors=True)
    env = {**agree.nn_env(work), "nnUNet_results": str(nn_res), "SUPREM_BENCH_EPOCHS": "2",
           "SUPREM_BENCH_ITERS": str(iters)}
    t = run_measured([str(nn_bin / "nnUNetv2_train"), str(agree.DATASET_ID), "3d_fullres", "0", "-tr", agree.TRAINER,
                      "-device", "cpu"], env=env)
    m = re.findall(r"Epoch time: ([\d.]+) s", t["output"])
    nn_it = float(m[-1]) / iters if m else float("nan")
    # our plan for the same raw data, with nnU-Net's network, patch and batch
    ours_pp, ours_res = work / "ours_pp", work / "train_bench_ours"
    shutil.rmtree(ours_res, ignore_errors=True)
    plan_file = ours_pp / agree.DATASET / "suprem_plans.json"
    if not plan_file.exists():
        run_measured([shutil.which("suprem_plan_and_preprocess"), "-d", str(agree.DATASET_ID), "--raw",
                      str(work / "raw"), "--preprocessed", str(ours_pp), "-np", "2", "--device", "cpu"])
    plan = json.loads(plan_file.read_text())
    nnp = json.loads((model / "plans.json").read_text())["configurations"]["3d_fullres"]
    kw = nnp["architecture"]["arch_kwargs"]
    plan["network"] = {"family": "nnunet", "deep_supervision": True,
                       "kwargs": {k: kw[k] for k in ("n_stages", "features_per_stage", "kernel_sizes", "strides",
                                                     "n_conv_per_stage", "n_conv_per_stage_decoder")}}
    plan["patch_size"], plan["batch_size"] = nnp["patch_size"], nnp["batch_size"]
    plan_file.write_text(json.dumps(plan, indent=1))
    o = run_measured([shutil.which("suprem_train"), str(agree.DATASET_ID), "0", "--epochs", "2",
                      "--iterations-per-epoch", str(iters), "--val-iterations", "2", "--skip-final-validation",
                      "--device", "cpu", "--num-workers", "2", "--preprocessed", str(ours_pp), "--results",
                      str(ours_res), "--raw", str(work / "raw"), "--no-progress-bar"])
    log = "\n".join(p.read_text() for p in ours_res.rglob("training_log.txt")) + o["output"]
    m2 = re.findall(r"\(([\d.]+) s/it", log)
    our_it = float(m2[-1]) if m2 else float("nan")
    return {"row": f"train, {iters} iterations (s/iteration)", "nnunet_wall": nn_it, "ours_wall": our_it,
            "nnunet_rss": t["peak_rss_bytes"], "ours_rss": o["peak_rss_bytes"],
            "cmd_nnunet": f"nnUNetv2_train {agree.DATASET_ID} 3d_fullres 0 -tr {agree.TRAINER} -device cpu "
                          f"(2 epochs of {iters} iterations, the second timed)",
            "cmd_ours": f"suprem_train {agree.DATASET_ID} 0 --epochs 2 --iterations-per-epoch {iters} "
                        "--skip-final-validation --device cpu --num-workers 2"}


def table(rows: list[dict]) -> list[str]:
    out = ["| step | nnU-Net wall | ours wall | wall ours/nnU-Net | nnU-Net peak RSS MiB | ours peak RSS MiB "
           "| RSS ours/nnU-Net | disk ours/nnU-Net |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        disk = ratio(r["ours_disk"], r["nnunet_disk"]) if "ours_disk" in r else "-"
        out.append(f"| {r['row']} | {r['nnunet_wall']:.2f} | {r['ours_wall']:.2f} | "
                   f"{ratio(r['ours_wall'], r['nnunet_wall'])} | {r['nnunet_rss'] / MIB:.0f} | "
                   f"{r['ours_rss'] / MIB:.0f} | {ratio(r['ours_rss'], r['nnunet_rss'])} | {disk} |")
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=str(REPO / ".bench" / "agreement"))
    p.add_argument("--pp-cases", type=int, default=8)
    p.add_argument("--train-iters", type=int, default=20)
    p.add_argument("--skip-preprocess", action="store_true")
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--doc", default=str(REPO / "docs" / "benchmarks_report.md"))
    args = p.parse_args(argv)
    work = Path(args.work)
    info = machine()
    rows: list[dict] = []
    if not args.skip_preprocess:
        cache = work / f"preprocess_bench_{args.pp_cases}.json"  # rerun after a later failure: reuse it
        if cache.exists():
            pp = json.loads(cache.read_text())
        else:
            pp = bench_preprocess.main(["--cases", str(args.pp_cases), "--workers", "2"])
            work.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps(pp))
        ours, nn = pp["suprem_net"], pp["nnunet_3d_fullres"]
        rows.append({"row": f"plan + preprocess {args.pp_cases} cases (s)", "nnunet_wall": nn["wall_s"],
                     "ours_wall": ours["wall_s"], "nnunet_rss": nn["peak_rss_bytes"],
                     "ours_rss": ours["peak_rss_bytes"], "nnunet_disk": nn["disk_bytes"],
                     "ours_disk": ours["disk_bytes"],
                     "cmd_nnunet": "nnUNetv2_plan_and_preprocess -d 950 -npfp 2 -np 2 -c 3d_fullres",
                     "cmd_ours": "suprem_plan_and_preprocess -d 950 -np 2 --device cpu"})
    model = agree.setup(work, 6, 2, 3, 20)
    pred_rows, dice = predict_rows(work, model)
    rows += pred_rows
    if not args.skip_train:
        tr = train_row(work, model, args.train_iters)
        if tr:
            rows.append(tr)
    test_image = sorted((work / "raw" / agree.DATASET / "imagesTs").glob("*.nii.gz"))[0]
    peak = matmul_peak()
    conv = {tag: conv_throughput(model, test_image, tta) for tag, tta in (("notta", False), ("tta", True))}
    lines = table(rows)
    print("\n".join(lines))
    print(f"Dice ours vs nnU-Net: {json.dumps(dice)}")
    print(f"fp32 matmul peak {peak:.1f} GFLOP/s; our prediction: "
          + ", ".join(f"{k} {v['gflops']:.1f} GFLOP/s ({100 * v['gflops'] / peak:.0f}%)" for k, v in conv.items()))
    doc = [
        "# Benchmark report: suprem_net vs nnU-Net v2",
        "",
        "Generated by `python -m benchmarks.report` (see its docstring). Same machine, one run, "
        "each tool in its own process; wall time and peak summed RSS of the process tree.",
        "",
        "## Machine and versions",
        "",
        *[f"- {k}: {v}" for k, v in info.items()],
        "",
        "## Results (ratio < 1: suprem_net is faster / smaller)",
        "",
        *lines,
        "",
        f"Per-class Dice between the two tools' label maps (same weights, step 0.5): {json.dumps(dice)}",
        "",
        "## Convolution throughput of our prediction",
        "",
        f"fp32 `torch.mm` peak ({2048}x{2048}): **{peak:.1f} GFLOP/s**.",
        "",
        "| TTA | GFLOP per tile | tiles | forwards | sliding window s | achieved GFLOP/s | of peak |",
        "|---|---:|---:|---:|---:|---:|---:|",
        *[f"| {k} | {v['gflop_per_tile']:.2f} | {v['tiles']} | {v['forwards']} | {v['window_s']:.2f} | "
          f"{v['gflops']:.1f} | {100 * v['gflops'] / peak:.0f}% |" for k, v in conv.items()],
        "",
        "## Commands",
        "",
        *[f"- {r['row']}: `{r['cmd_nnunet']}` vs `{r['cmd_ours']}`" for r in rows],
        "",
        NOTES,
    ]
    Path(args.doc).write_text("\n".join(doc))
    return {"machine": info, "rows": rows, "dice": dice, "matmul_peak_gflops": peak, "conv": conv}


if __name__ == "__main__":
    res = main()
    json.dump({k: v for k, v in res.items() if k != "rows"}, sys.stdout, indent=1, default=str)
