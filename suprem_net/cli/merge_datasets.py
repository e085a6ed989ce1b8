"""suprem_merge_datasets: pool raw datasets with different label sets into one multi-label dataset."""
from __future__ import annotations

import argparse

from suprem_net import api
from suprem_net.cli._common import setup_logging, user_errors_exit_2


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
    p.add_argument("-np", "--num-processes", type=int, help="worker processes (default: min(4, CPUs))")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


@user_errors_exit_2
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    result = api.merge_datasets(args.datasets, args.output_id, args.name, aliases=args.aliases,
                                prefix_case_ids=args.prefix_case_ids, raw=args.raw, num_processes=args.num_processes)
    print(f"wrote {result['folder']}: {result['cases']} cases, {result['classes']} classes, "
          f"{result['partial']} case(s) with partial labels")
    return 0


if __name__ == "__main__":
    main()
