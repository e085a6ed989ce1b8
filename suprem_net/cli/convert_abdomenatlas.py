"""suprem_convert_abdomenatlas: turn ROOT/CASE/ct.nii.gz + segmentations/<class>.nii.gz into a raw dataset."""
from __future__ import annotations

import argparse
import os

from suprem_net.cli._common import setup_logging, user_errors_exit_2
from suprem_net.io.abdomenatlas import convert
from suprem_net.paths import location


@user_errors_exit_2
def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="suprem_convert_abdomenatlas",
        description="Convert an AbdomenAtlas-layout folder (CASE/ct.nii.gz + CASE/segmentations/<class>.nii.gz) "
                    "into an nnU-Net v2 raw dataset. Overlapping masks: the smallest mask wins (or, with --multi-label, "
                    "all are kept as bits of a bitmask). The source is "
                    "never modified; rerunning skips converted cases.")
    p.add_argument("root", help="folder holding the case folders")
    p.add_argument("-d", "--dataset-id", type=int, required=True, help="number of the new dataset (e.g. 100)")
    p.add_argument("--name", default="AbdomenAtlas", help="dataset name (default AbdomenAtlas)")
    p.add_argument("--raw", help="raw datasets folder (default: $SUPREM_raw, else ./suprem_data/raw)")
    p.add_argument("--multi-label", action="store_true",
                   help="keep overlapping classes: store each class as one bit of a bitmask label map "
                        "(dataset.json label_encoding 'bitmask'; trains sigmoid Dice+BCE; see docs/multilabel.md)")
    p.add_argument("-np", "--num-processes", type=int, default=min(4, os.cpu_count() or 1))
    args = p.parse_args(argv)
    setup_logging()
    out = convert(args.root, location("raw", args.raw), args.dataset_id, args.name, args.num_processes,
                  multi_label=args.multi_label)
    print(f"wrote {out}")
    return 0
