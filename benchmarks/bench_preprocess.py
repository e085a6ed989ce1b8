"""Side by side: suprem_plan_and_preprocess vs nnUNetv2_plan_and_preprocess on the same generated
dataset, same machine, same number of worker processes, in one run.

    python -m benchmarks.bench_preprocess [--cases 12] [--workers 2] [--out DIR]

Prints wall time, peak memory (summed RSS of the process tree) and disk size of the
preprocessed data, and the ratios ours / nnU-Net's. nnU-Net runs twice: its default
configurations (2d, 3d_fullres, 3d_lowres where planned) and 3d_fullres alone (like for like).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from suprem_net.synthetic import SyntheticSpec, write_raw_dataset
from benchmarks._harness import ensure_nnunet_env, folder_bytes, ratio, run_measured

DATASET_ID = 950


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--cases", type=int, default=12)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--inplane-spacing", type=float, nargs=2, default=(0.9, 1.3))
    p.add_argument("--out", help="work folder (default: a temporary one, removed afterwards)")
    args = p.parse_args(argv)
    nn_bin = ensure_nnunet_env()
    work = Path(args.out or tempfile.mkdtemp(prefix="bench_pp_"))
    raw = work / "raw"
    spec = SyntheticSpec(num_cases=args.cases, num_classes=6, inplane_spacing=tuple(args.inplane_spacing),
                         z_spacing=(2.5, 5.0), seed=7)
    ds = write_raw_dataset(raw, DATASET_ID, spec, num_test=0)
    raw_bytes = folder_bytes(ds)
    results = {}
    ours_pp = work / "ours"
    results["suprem_net"] = run_measured(
        [shutil.which("suprem_plan_and_preprocess") or "suprem_plan_and_preprocess", "-d", str(DATASET_ID),
         "--raw", str(raw), "--preprocessed", str(ours_pp), "-np", str(args.workers), "--device", "cpu"])
    results["suprem_net"]["disk_bytes"] = folder_bytes(ours_pp / ds.name / "suprem_plans")
    for label, configs in (("nnunet_3d_fullres", ["-c", "3d_fullres"]), ("nnunet_default", [])):
        pp = work / label
        env = {"nnUNet_raw": str(raw), "nnUNet_preprocessed": str(pp), "nnUNet_results": str(work / "nn_results")}
        results[label] = run_measured(
            [str(nn_bin / "nnUNetv2_plan_and_preprocess"), "-d", str(DATASET_ID), "-npfp", str(args.workers),
             "-np", *([str(args.workers)] * (len(configs) // 2 or 3)), *configs, "--no_pbar"], env=env)
        data = [d for d in (pp / ds.name).iterdir() if d.is_dir() and d.name.startswith("nnUNetPlans")]
        results[label]["disk_bytes"] = sum(folder_bytes(d) for d in data)
        results[label]["configurations"] = sorted(d.name for d in data)
    ours = results["suprem_net"]
    lines = [f"dataset: {args.cases} synthetic CT cases, {raw_bytes / 2**20:.1f} MiB of NIfTI; "
             f"{args.workers} worker processes each",
             f"{'tool':<22}{'wall s':>9}{'peak RSS MiB':>14}{'disk MiB':>10}"]
    for k, r in results.items():
        lines.append(f"{k:<22}{r['wall_s']:>9.1f}{r['peak_rss_bytes'] / 2**20:>14.0f}{r['disk_bytes'] / 2**20:>10.1f}")
    for k in ("nnunet_3d_fullres", "nnunet_default"):
        r = results[k]
        lines.append(f"ours / {k}: wall {ratio(ours['wall_s'], r['wall_s'])}, "
                     f"peak memory {ratio(ours['peak_rss_bytes'], r['peak_rss_bytes'])}, "
                     f"disk {ratio(ours['disk_bytes'], r['disk_bytes'])}")
    print("\n".join(lines))
    if not args.out:
        shutil.rmtree(work, ignore_errors=True)
    return {k: {kk: vv for kk, vv in v.items() if kk != "output"} for k, v in results.items()}


if __name__ == "__main__":
    json.dump(main(), sys.stdout, indent=1)
