"""suprem_merge_datasets: pool raw datasets with different label sets into one multi-label dataset."""
from __future__ import annotations

import argparse
import os
import re

from suprem_net.cli._common import setup_logging, user_errors_exit_2
from suprem_net.errors import SupremError
from suprem_net.io.dataset import load_raw_dataset
from suprem_net.io.merge import load_aliases, plan_merge, run_merge
from suprem_net.paths import location, resolve_dataset_name


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="suprem_merge_datasets",
        description="Merge raw datasets (nnU-Net v2 layout) that label different classes into one multi-label "
                    "(bitmask) dataset: classes matched by name (and --aliases), the classes a case does not "
                    "annotate recorded as partial labels, images copied byte for byte, label maps re-encoded. "
                    "Conflicts are listed one per line (exit 2) and nothing is written. Rerunning resumes. "
                    "See docs/multilabel.md.")
    p.add_argument("-d", "--datasets", nargs="+", required=True,
                   help="datasets to merge: numbers or full names (Dataset001_Liver), at least two")
    p.add_argument("-o", "--output-id", type=int, required=True, help="number of the merged dataset (e.g. 500)")
    p.add_argument("--name", default="Merged", help="name of the merged dataset (default Merged)")
    p.add_argument("--aliases", metavar="ALIASES.json",
                   help='JSON object mapping synonyms to class names, e.g. {"kidney_l": "kidney_left"}')
    p.add_argument("--prefix-case-ids", action="store_true",
                   help="prefix every case id with its dataset's folder name (for datasets whose case ids clash)")
    p.add_argument("--raw", help="raw datasets folder (default: $SUPREM_raw, else ./suprem_data/raw)")
    p.add_argument("-np", "--num-processes", type=int, default=min(4, os.cpu_count() or 1))
    p.add_argument("-v", "--verbose", action="store_true")
    return p


@user_errors_exit_2
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    if len(args.datasets) < 2:
        raise SupremError("-d: give at least two datasets to merge")
    if not 0 <= args.output_id <= 999:
        raise SupremError(f"-o {args.output_id}: a dataset number is 0..999")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_\-]*", args.name):
        raise SupremError(f"--name {args.name!r}: use letters, digits, '_' and '-'")
    raw = location("raw", args.raw)
    datasets = [load_raw_dataset(raw / resolve_dataset_name(d, raw)) for d in args.datasets]
    out = raw / f"Dataset{args.output_id:03d}_{args.name}"
    plan = plan_merge(datasets, out, args.name, load_aliases(args.aliases), args.prefix_case_ids)
    run_merge(plan, args.num_processes)
    partial = plan.spec.get("partial_labels", {})
    print(f"wrote {out}: {len(plan.jobs)} cases, {len(plan.spec['labels']) - 1} classes, "
          f"{len(partial)} case(s) with partial labels")
    return 0


if __name__ == "__main__":
    main()
