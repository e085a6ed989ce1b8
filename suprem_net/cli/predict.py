"""suprem_predict: segment CT images with a trained model folder (see docs/predict.md)."""
from __future__ import annotations

import argparse

from suprem_net import api
from suprem_net.cli._common import setup_logging, user_errors_exit_2
from suprem_net.inference.outputs import LAYOUTS, OUTPUT_TYPES
from suprem_net.inference.sliding_window import PROGRESS_DELAY_S
from suprem_net.plan import DEFAULT_PLANS_NAME
from suprem_net.weights.registry import zero_shot_names


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="suprem_predict",
        description="Segment one image, a folder of images (CASE_0000.nii.gz), a folder of case folders "
                    "(CASE/ct.nii.gz) or a DICOM series folder. Outputs have exactly the input's geometry; "
                    "cases whose output exists are skipped unless --overwrite.")
    p.add_argument("-i", "--input", required=True, help="image file, folder of images/cases, or DICOM series folder")
    p.add_argument("-o", "--output", required=True,
                   help="output folder (or, for a single-case input, an image file name such as seg.nii.gz)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("-m", "--model", help="model folder RESULTS/DatasetXXX/<plans_name>, or a predictor bundle "
                                           "written by suprem_export (run with onnxruntime)")
    src.add_argument("--nnunet-model", metavar="RESULTS_FOLDER",
                     help="an nnU-Net v2 results folder DatasetXXX/<Trainer>__<Plans>__<configuration> "
                          "(plans.json, dataset.json, fold_K/checkpoint_final.pth), predicted with suprem_net "
                          "(see docs/nnunet_models.md)")
    src.add_argument("-d", "--dataset", help="dataset number or name: the model folder in the results folder")
    src.add_argument("--pretrained", choices=zero_shot_names(),
                     help="zero-shot prediction of the 32 AbdomenAtlas/Universal-Model classes with the head stored "
                          "in a pre-trained checkpoint (from the weights cache: suprem_weights download NAME; see "
                          "docs/pretrained.md); uses the backbone's preset preprocessing")
    p.add_argument("--plans", default=DEFAULT_PLANS_NAME, help=f"plans name with -d (default {DEFAULT_PLANS_NAME})")
    p.add_argument("--results", help="results folder with -d (default: $SUPREM_results, else ./suprem_data/results)")
    p.add_argument("-f", "--folds", nargs="+", default=["0"], help="folds to ensemble (default 0)")
    p.add_argument("--checkpoint", default="checkpoint_final.pth", help="checkpoint file name in each fold folder")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="autocast precision of the network (default: fp16 on CUDA, fp32 elsewhere)")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="mirroring test-time augmentation over the 3 axes, 8 passes averaged (default on; off "
                        "for --pretrained zero-shot, which predicts in one pass as SuPreM does)")
    p.add_argument("--step-size", type=float, default=0.5, help="tile step as a fraction of the patch (default 0.5)")
    p.add_argument("--tile-batch-size", type=int, default=None,
                   help="tiles per forward (default: the plan's batch size; 1 for batch-statistics networks)")
    p.add_argument("--lcc", action="store_true",
                   help="keep only the largest connected component of every class (default: as postprocessing.json says)")
    p.add_argument("--output-layout", choices=LAYOUTS, default="flat",
                   help="flat (default): OUTPUT/CASE<ending>; abdomenatlas: OUTPUT/CASE/segmentations/<class>.nii.gz "
                        "(binary) + OUTPUT/CASE/combined_labels.nii.gz (with the CT copied to CASE/ct.nii.gz, "
                        "suprem_convert_abdomenatlas reads it back)")
    p.add_argument("--per-organ", dest="output_layout", action="store_const", const="abdomenatlas",
                   help="the same as --output-layout abdomenatlas")
    p.add_argument("--output-type", choices=OUTPUT_TYPES, default="image",
                   help="image (default): a label map in the input's format (NIfTI for DICOM input); dicom-seg: "
                        "OUTPUT/CASE.dcm, a DICOM Segmentation referencing the input DICOM series (DICOM input only)")
    p.add_argument("--statistics", action="store_true",
                   help="also write per case CASE_statistics.json and .csv (CASE/statistics.* in the abdomenatlas "
                        "layout): volume (ml), intensity mean/std/median/p5/p95, connected components (26-connected) "
                        "and world bounding box (mm) of every class")
    p.add_argument("--save-probabilities", action="store_true",
                   help="also write CASE.npz with float16 softmax probabilities (K, Z, Y, X) in the original geometry")
    p.add_argument("--preview", action="store_true", help="also write CASE.png with three views and a legend")
    p.add_argument("--overwrite", action="store_true", help="predict cases whose output already exists")
    p.add_argument("--backend", choices=api.BACKENDS, default="auto",
                   help="auto (default): onnxruntime for a predictor bundle (-m BUNDLE), torch for everything else; "
                        "onnxruntime runs only bundles (see docs/export.md)")
    p.add_argument("--skip-air", action=argparse.BooleanOptionalAction, default=True,
                   help="leave out the tiles of a CT that hold only air (body mask from the HU values; body voxels "
                        "keep their labels exactly, see docs/predict.md; default on, no effect on non-CT models)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the network (a one-off compilation first; pays off over many tiles or cases)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: one per core)")
    p.add_argument("--profile", action="store_true",
                   help="print the seconds spent per stage (read, reorient, ..., network, accumulation, revert, write)")
    p.add_argument("--no-progress-bar", action="store_true",
                   help=f"no bar of the tiles done (shown on a terminal for a case that takes over {PROGRESS_DELAY_S:g} s)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


@user_errors_exit_2
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    result = api.predict(
        args.input, args.output, model=args.model, dataset=args.dataset, nnunet_model=args.nnunet_model,
        pretrained=args.pretrained, plans_name=args.plans, results=args.results, folds=args.folds,
        checkpoint=args.checkpoint, device=args.device, precision=args.precision, tta=args.tta,
        step_size=args.step_size, tile_batch_size=args.tile_batch_size, lcc=args.lcc, layout=args.output_layout,
        output_type=args.output_type, statistics=args.statistics, save_probabilities=args.save_probabilities,
        preview=args.preview, overwrite=args.overwrite, backend=args.backend, skip_air=args.skip_air,
        compile=args.compile, threads=args.threads, profile=args.profile, progress=not args.no_progress_bar)
    print(f"{result['cases']} case(s): {result['skipped']} already done, wrote {len(result['written'])} to "
          f"{args.output}")
    if args.profile:
        total = sum(result["stages"].values()) or 1.0
        for stage, seconds in result["stages"].items():
            print(f"  {stage:<13} {seconds:8.2f} s  {100 * seconds / total:5.1f} %")
    return 0


if __name__ == "__main__":
    main()
