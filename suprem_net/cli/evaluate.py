"""``suprem_evaluate -ref REF -pred PRED [-l LABELS]``: DSC and NSD per case and class."""
from __future__ import annotations

import argparse
import math
import os

from suprem_net import api
from suprem_net.cli._common import setup_logging, user_errors_exit_2
from suprem_net.errors import SupremError
from suprem_net.evaluation.evaluate import parse_labels


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="suprem_evaluate",
        description="Dice (DSC) and normalized surface Dice (NSD) of predicted label maps against references. "
                    "Cases are matched by file name. Writes a JSON and a CSV summary.",
    )
    p.add_argument("-ref", required=True, help="folder of reference label maps")
    p.add_argument("-pred", required=True, help="folder of predicted label maps (same file names)")
    p.add_argument("-l", "--labels", nargs="+", default=None, metavar="LABEL",
                   help="label values to score (e.g. -l 1 2 3) or one dataset.json whose 'labels' maps "
                        "names to values; default: every nonzero value found in the references")
    p.add_argument("--tolerance", type=float, default=1.0, metavar="MM",
                   help="NSD tolerance in mm (default: 1.0, as in SuPreM)")
    p.add_argument("-o", "--output", default=None, metavar="JSON",
                   help="summary JSON (default: PRED/summary.json); the CSV is written next to it "
                        "with the ending .csv")
    p.add_argument("-np", "--num_workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="worker processes (default: min(4, CPUs))")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def _cell(v: float) -> str:
    return "   nan" if math.isnan(v) else f"{v:6.4f}"


def format_table(summary: dict) -> str:
    """Per-class means as a small fixed-width table."""
    width = max([len("class"), len("foreground")] + [len(c) for c in summary["labels"]])
    lines = [f"{'class':<{width}}  label     DSC     NSD  cases"]
    for cls, m in summary["mean"].items():
        lines.append(f"{cls:<{width}}  {summary['labels'][cls]:>5}  {_cell(m['dsc'])}  {_cell(m['nsd'])}  "
                     f"{m['n_cases']:>5}")
    fg = summary["foreground_mean"]
    lines.append(f"{'foreground':<{width}}  {'':>5}  {_cell(fg['dsc'])}  {_cell(fg['nsd'])}")
    return "\n".join(lines)


@user_errors_exit_2
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    if args.num_workers < 1:
        raise SupremError(f"-np must be >= 1, got {args.num_workers}")
    summary = api.evaluate(args.ref, args.pred, parse_labels(args.labels), tolerance_mm=args.tolerance,
                           output=args.output, num_workers=args.num_workers)
    print(f"{len(summary['cases'])} case(s), NSD tolerance {summary['tolerance_mm']:g} mm")
    print(format_table(summary))
    print(f"wrote {' and '.join(summary['written'])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
