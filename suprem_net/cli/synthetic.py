"""suprem_synthetic: write a small seeded synthetic abdominal CT dataset (nnU-Net raw layout)."""
from __future__ import annotations

import argparse

from suprem_net.cli._common import setup_logging, user_errors_exit_2
from suprem_net.paths import location
from suprem_net.synthetic import ORGANS, SyntheticSpec, write_abdomenatlas, write_raw_dataset


@user_errors_exit_2
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="suprem_synthetic", description=__doc__)
    p.add_argument("-d", "--dataset-id", type=int, default=900, help="dataset number (default 900)")
    p.add_argument("--raw", help="raw datasets folder (default: $SUPREM_raw, else ./suprem_data/raw)")
    p.add_argument("--cases", type=int, default=12, help="training cases (default 12)")
    p.add_argument("--test-cases", type=int, default=2, help="test cases in imagesTs/labelsTs (default 2)")
    p.add_argument("--classes", type=int, default=6, choices=range(1, len(ORGANS) + 1), metavar=f"1..{len(ORGANS)}",
                   help="foreground classes (default 6)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--abdomenatlas", metavar="ROOT",
                   help="write the AbdomenAtlas layout (BDMAP_*/ct.nii.gz + segmentations/) to ROOT instead")
    args = p.parse_args(argv)
    setup_logging()
    spec = SyntheticSpec(num_cases=args.cases, num_classes=args.classes, seed=args.seed)
    if args.abdomenatlas:
        print(f"wrote {write_abdomenatlas(args.abdomenatlas, spec)}")
    else:
        print(f"wrote {write_raw_dataset(location('raw', args.raw), args.dataset_id, spec, args.test_cases)}")
    return 0
