"""suprem_plan_and_preprocess: check a raw dataset, fingerprint it, plan, preprocess to blosc2."""
from __future__ import annotations

import argparse

from suprem_net import api
from suprem_net.cli._common import parse_duration, setup_logging, user_errors_exit_2
from suprem_net.networks import FAMILY_NAMES
from suprem_net.planning.planner import DEFAULT_CPU_SECONDS_PER_ITERATION, DEFAULT_GPU_MEMORY_GB, summary, time_summary
from suprem_net.presets import preset_names
from suprem_net.preprocessing.run import parse_shard


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="suprem_plan_and_preprocess",
        description="Check a raw dataset (nnU-Net v2 layout), compute its fingerprint, write a plan "
                    "(spacing, normalisation, patch, batch, network sized for your memory) and preprocess "
                    "every training case into blosc2. Finished cases are skipped on a rerun.")
    p.add_argument("-d", "--dataset", required=True, help="dataset number (e.g. 3) or full name (Dataset003_Liver)")
    p.add_argument("--raw", help="raw datasets folder (default: $SUPREM_raw, else ./suprem_data/raw)")
    p.add_argument("--preprocessed", help="output folder (default: $SUPREM_preprocessed, else ./suprem_data/preprocessed)")
    p.add_argument("--network", choices=sorted(FAMILY_NAMES), help="network family (default: nnunet, or the preset's)")
    p.add_argument("--preset", choices=preset_names(),
                   help="plan for a pre-trained backbone: its orientation, spacing, HU window, patch and architecture")
    p.add_argument("--like", metavar="PLAN.json",
                   help="plan like another dataset's plan (e.g. RESULTS/DatasetXXX/suprem_plans/plans.json of a "
                        "pre-trained model): same orientation, spacing, normalisation, patch, network and recipe; "
                        "only the labels are this dataset's. Use it to fine-tune a model you pre-trained yourself")
    p.add_argument("--plans-name", help="name of the plan and its data folder (default: suprem_plans, PRESET_plans, "
                                        "or transfer_plans with --like)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="device the plan targets (default: cuda if available)")
    p.add_argument("--gpu-memory-gb", type=float, default=DEFAULT_GPU_MEMORY_GB,
                   help=f"GPU memory budget for training (default {DEFAULT_GPU_MEMORY_GB:g})")
    p.add_argument("--cpu-seconds-per-iteration", type=float, default=DEFAULT_CPU_SECONDS_PER_ITERATION,
                   help="CPU plans: time of one training step on the machine, in seconds "
                        f"(default {DEFAULT_CPU_SECONDS_PER_ITERATION:g}); measured here by timing real steps "
                        "(cached per machine)")
    p.add_argument("--cpu-gflops", type=float, metavar="G",
                   help="CPU plans for another machine: assume it trains at G GFLOP/s (forward + backward) "
                        "instead of measuring this one")
    p.add_argument("--time-budget", type=parse_duration, metavar="DURATION",
                   help="wall-clock training budget written to the plan (training.time_budget_s), e.g. 30m, "
                        "2h: suprem_train sizes epochs x iterations to it and stops there")
    p.add_argument("--verify", action="store_true",
                   help="re-read every voxel for the integrity checks even when a fingerprint exists")
    p.add_argument("--replan", action="store_true", help="overwrite an existing plan (default: keep hand edits)")
    p.add_argument("--no-preprocess", action="store_true", help="stop after planning")
    p.add_argument("--check-only", action="store_true", help="run the integrity checks and write nothing")
    p.add_argument("-np", "--num-processes", type=int, help="worker processes (default: min(4, CPUs))")
    p.add_argument("--shard", help="i/N: preprocess only every N-th case starting at i (job arrays)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


@user_errors_exit_2
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    budgets = {k: getattr(args, k) for k in ("gpu_memory_gb", "cpu_seconds_per_iteration", "cpu_gflops")}
    budgets["time_budget_s"] = args.time_budget
    result = api.plan_and_preprocess(
        args.dataset, raw=args.raw, preprocessed=args.preprocessed, network=args.network, preset=args.preset,
        like=args.like, plans_name=args.plans_name, device=args.device, check_only=args.check_only,
        verify=args.verify, replan=args.replan, preprocess=not args.no_preprocess,
        num_processes=args.num_processes, shard=parse_shard(args.shard), **budgets)
    if args.check_only:
        print(f"{result['dataset']}: {result['cases']} cases, no problems found")
        return 0
    print(summary(result["plan"]))
    print(time_summary(result["plan"]))
    print(f"plan written to {result['plan_path']}")
    counts = result["counts"]
    if counts is not None:
        print(f"preprocessed {counts['preprocessed']} cases, skipped {counts['skipped']} finished ones -> "
              f"{result['plan_path'].parent / result['plan']['data_identifier']}")
    return 0


if __name__ == "__main__":
    main()
