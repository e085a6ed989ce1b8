"""suprem_export: write a self-contained predictor bundle (ONNX) of a model folder (see docs/export.md)."""
from __future__ import annotations

import argparse

from suprem_net import api
from suprem_net.cli._common import setup_logging, user_errors_exit_2
from suprem_net.inference.bundle import OPSET


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="suprem_export",
        description="Export a trained model as a predictor bundle: one ONNX network per fold (dynamic batch axis, "
                    f"opset {OPSET} by default), the plan, the label names and a SHA-256 per file. "
                    "suprem_predict -m BUNDLE runs it with onnxruntime (--backend onnxruntime), with the same "
                    "preprocessing, sliding window and export as the torch path; no training code or checkpoint "
                    "is needed. Needs the onnx extra: pip install 'suprem_net[onnx]'.")
    p.add_argument("model", metavar="MODEL_DIR",
                   help="model folder RESULTS/DatasetXXX/<plans_name>, or an nnU-Net v2 results folder "
                        "DatasetXXX/<Trainer>__<Plans>__<configuration>")
    p.add_argument("-o", "--output", required=True, help="the bundle folder to write")
    p.add_argument("-f", "--folds", nargs="+", default=["0"], help="folds to export (default 0)")
    p.add_argument("--checkpoint", default="checkpoint_final.pth", help="checkpoint file name in each fold folder")
    p.add_argument("--opset", type=int, default=OPSET, help=f"ONNX opset (default {OPSET})")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle at OUTPUT")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


@user_errors_exit_2
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    manifest = api.export_model(args.model, args.output, folds=args.folds, checkpoint=args.checkpoint,
                                opset=args.opset, overwrite=args.overwrite)
    diff = max(manifest["max_abs_logit_difference"].values())
    print(f"wrote {args.output}: {len(manifest['folds'])} fold(s), opset {manifest['opset']}, "
          f"largest logit difference onnxruntime vs torch {diff:.2e}")
    return 0


if __name__ == "__main__":
    main()
