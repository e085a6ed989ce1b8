"""suprem_plan_and_preprocess: check a raw dataset, fingerprint it, plan, preprocess to blosc2."""
from __future__ import annotations

import argparse
import logging
import os
import shutil

from suprem_net.cli._common import setup_logging, user_errors_exit_2
from suprem_net.device import resolve_device
from suprem_net.errors import SupremError
from suprem_net.planning.fingerprint import load_or_compute
from suprem_net.io.atomic import read_json, write_json
from suprem_net.io.dataset import load_raw_dataset
from suprem_net.networks import FAMILY_NAMES
from suprem_net.paths import location, resolve_dataset_name
from suprem_net.planning.planner import make_plan, plan_like, summary
from suprem_net.presets import preset_names
from suprem_net.preprocessing.run import parse_shard, preprocess_dataset, verify_complete
from suprem_net.planning.verify import IntegrityError, header_problems

log = logging.getLogger("suprem_net")


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
    p.add_argument("--gpu-memory-gb", type=float, default=8.0, help="GPU memory budget for training (default 8)")
    p.add_argument("--cpu-seconds-per-iteration", type=float, default=3.0,
                   help="CPU plans: compute budget of one training step, in seconds (default 3)")
    p.add_argument("--cpu-gflops", type=float, default=60.0,
                   help="CPU plans: achieved training throughput in GFLOP/s, forward + backward (default 60, "
                        "measured for the nnU-Net U-Net in fp32 on 2 x86 cores)")
    p.add_argument("--verify", action="store_true",
                   help="re-read every voxel for the integrity checks even when a fingerprint exists")
    p.add_argument("--replan", action="store_true", help="overwrite an existing plan (default: keep hand edits)")
    p.add_argument("--no-preprocess", action="store_true", help="stop after planning")
    p.add_argument("--check-only", action="store_true", help="run the integrity checks and write nothing")
    p.add_argument("-np", "--num-processes", type=int, default=min(4, os.cpu_count() or 1),
                   help="worker processes (default: min(4, CPUs))")
    p.add_argument("--shard", help="i/N: preprocess only every N-th case starting at i (job arrays)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


@user_errors_exit_2
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    if args.like and (args.preset or args.network):
        raise SupremError("--like takes the network and input distribution from the given plan; "
                          "leave out --preset/--network")
    raw_root, pp_root = location("raw", args.raw), location("preprocessed", args.preprocessed)
    name = resolve_dataset_name(args.dataset, raw_root)
    ds = load_raw_dataset(raw_root / name)
    source = _read_plan(args.like, ds.spec) if args.like else None  # a bad plan fails before anything is written
    problems = header_problems(ds)
    if problems:
        raise IntegrityError(problems)
    cases = ds.training_cases()
    out = pp_root / name
    if args.check_only:
        from suprem_net.planning.fingerprint import compute_fingerprint

        compute_fingerprint(ds, cases, args.num_processes)
        print(f"{name}: {len(cases)} cases, no problems found")
        return 0
    fp = load_or_compute(out / "fingerprint.json", ds, cases, args.num_processes, force=args.verify)
    if not out.joinpath("dataset.json").is_file():
        shutil.copyfile(ds.root / "dataset.json", out / "dataset.json")
    plans_name = args.plans_name or ("transfer_plans" if source else f"{args.preset}_plans" if args.preset
                                     else "suprem_plans")
    plan_path = out / f"{plans_name}.json"
    if plan_path.is_file() and not args.replan:
        plan = read_json(plan_path)
        log.info("reusing existing plan %s (pass --replan to overwrite)", plan_path)
    elif source is not None:
        plan = plan_like(ds.spec, fp, source, plans_name=plans_name, source_path=str(args.like))
        write_json(plan_path, plan)
    else:
        device = args.device or resolve_device("auto", ("cuda", "cpu")).type
        plan = make_plan(ds.spec, fp, plans_name=plans_name, network=args.network, preset=args.preset,
                         device=device, gpu_memory_gb=args.gpu_memory_gb,
                         cpu_seconds_per_iteration=args.cpu_seconds_per_iteration, cpu_gflops=args.cpu_gflops)
        write_json(plan_path, plan)
    print(summary(plan))
    print(f"plan written to {plan_path}")
    if args.no_preprocess:
        return 0
    shard = parse_shard(args.shard)
    data_dir = out / plan["data_identifier"]
    counts = preprocess_dataset(cases, plan, data_dir, args.num_processes, shard,
                                partial_labels=ds.spec.get("partial_labels"))
    print(f"preprocessed {counts['preprocessed']} cases, skipped {counts['skipped']} finished ones -> {data_dir}")
    if shard[1] == 1:
        missing = verify_complete(cases, plan, data_dir)
        if missing:
            raise SupremError(f"{data_dir}: {len(missing)} cases missing after preprocessing: {', '.join(missing[:5])}")
    return 0


def _read_plan(path: str, ds_spec: dict) -> dict:
    """The source plan of --like, checked against this dataset."""
    plan = read_json(path)
    missing = [k for k in ("network", "patch_size", "target_spacing", "normalization", "training", "channel_names")
               if not isinstance(plan, dict) or k not in plan]
    if missing:
        raise SupremError(f"{path}: not a suprem_net plan (missing {', '.join(missing)})")
    ours, theirs = ds_spec["channel_names"], plan["channel_names"]
    if len(ours) != len(theirs):
        raise SupremError(f"{path}: planned for {len(theirs)} input channel(s) {theirs}, this dataset has "
                          f"{len(ours)} {ours}")
    return plan




if __name__ == "__main__":
    main()
