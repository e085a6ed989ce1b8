"""suprem_predict: segment CT images with a trained model folder (see docs/predict.md)."""
from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path

from suprem_net.cli._common import setup_logging, user_errors_exit_2
from suprem_net.errors import SupremError
from suprem_net.io.image import IMAGE_ENDINGS
from suprem_net.labels import LabelScheme
from suprem_net.weights.registry import zero_shot_names

logger = logging.getLogger(__name__)


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
    src.add_argument("-m", "--model", help="model folder RESULTS/DatasetXXX/<plans_name>")
    src.add_argument("--nnunet-model", metavar="RESULTS_FOLDER",
                     help="an nnU-Net v2 results folder DatasetXXX/<Trainer>__<Plans>__<configuration> "
                          "(plans.json, dataset.json, fold_K/checkpoint_final.pth), predicted with suprem_net "
                          "(see docs/nnunet_models.md)")
    src.add_argument("-d", "--dataset", help="dataset number or name: the model folder in the results folder")
    src.add_argument("--pretrained", choices=zero_shot_names(),
                     help="zero-shot prediction of the 32 AbdomenAtlas/Universal-Model classes with the head stored "
                          "in a pre-trained checkpoint (from the weights cache: suprem_weights download NAME; see "
                          "docs/pretrained.md); uses the backbone's preset preprocessing")
    p.add_argument("--plans", default="suprem_plans", help="plans name with -d (default suprem_plans)")
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
    p.add_argument("--output-layout", choices=["flat", "abdomenatlas"], default="flat",
                   help="flat (default): OUTPUT/CASE<ending>; abdomenatlas: OUTPUT/CASE/segmentations/<class>.nii.gz "
                        "(binary) + OUTPUT/CASE/combined_labels.nii.gz (with the CT copied to CASE/ct.nii.gz, "
                        "suprem_convert_abdomenatlas reads it back)")
    p.add_argument("--per-organ", dest="output_layout", action="store_const", const="abdomenatlas",
                   help="the same as --output-layout abdomenatlas")
    p.add_argument("--output-type", choices=["image", "dicom-seg"], default="image",
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
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def _model_dir(args) -> Path:
    from suprem_net.paths import location

    if args.model:
        return Path(args.model)
    if not args.dataset:
        raise SupremError("give a model folder (-m) or a dataset (-d)")
    results = location("results", args.results)
    ds = str(args.dataset)
    if not re.fullmatch(r"Dataset\d{3}_.+", ds):
        if not re.fullmatch(r"\d{1,3}", ds):
            raise SupremError(f"dataset {ds!r}: give a number (e.g. 3) or a full name (e.g. Dataset003_Liver)")
        prefix = f"Dataset{int(ds):03d}_"
        found = sorted(d.name for d in results.glob(prefix + "*") if d.is_dir()) if results.is_dir() else []
        if len(found) != 1:
            raise SupremError(f"dataset {ds}: {'no' if not found else 'several'} folder(s) {prefix}* in {results}"
                              + (f": {', '.join(found)}" if found else ""))
        ds = found[0]
    return results / ds / args.plans


def _is_within(child: Path, parent: Path) -> bool:
    try:
        child.resolve().relative_to(parent.resolve())
        return True
    except ValueError:
        return False


@user_errors_exit_2
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    args.per_organ = args.output_layout == "abdomenatlas"
    dicom_seg = args.output_type == "dicom-seg"
    if dicom_seg and args.per_organ:
        raise SupremError("--output-type dicom-seg writes one file per case; it cannot be combined with the "
                          "abdomenatlas layout")
    if args.step_size <= 0 or args.step_size > 1:
        raise SupremError(f"--step-size {args.step_size}: must be in (0, 1]")
    if args.tile_batch_size is not None and args.tile_batch_size < 1:
        raise SupremError("--tile-batch-size must be at least 1")

    from tqdm import tqdm

    from suprem_net.inference import export
    from suprem_net.inference.inputs import discover_cases, read_case
    from suprem_net.inference.predictor import Predictor
    from suprem_net.inference.preview import write_preview
    from suprem_net.io.atomic import read_json

    if args.tta is None:
        args.tta = not args.pretrained
    inp, out = Path(args.input), Path(args.output)
    loaded, preprocess = None, None  # (plan, models) built here rather than from a model folder
    if args.nnunet_model:
        from suprem_net.inference.nnunet_compat import load_nnunet_model, preprocess_nnunet

        loaded = load_nnunet_model(args.nnunet_model, folds=args.folds, checkpoint=args.checkpoint)
        plan, preprocess = loaded[0], preprocess_nnunet
    elif args.pretrained:
        from suprem_net.inference.zero_shot import load_zero_shot

        loaded = load_zero_shot(args.pretrained)
        plan = loaded[0]
    else:
        model_dir = _model_dir(args)
        if not model_dir.is_dir():
            raise SupremError(f"{model_dir}: model folder not found")
        plan = read_json(model_dir / "plans.json")
    cases = discover_cases(inp, num_channels=len(plan["channel_names"]))
    if dicom_seg:
        from suprem_net.inference.inputs import require_dicom

        require_dicom(cases, "--output-type dicom-seg must reference the source DICOM series")
    endings = (".dcm",) if dicom_seg else IMAGE_ENDINGS
    if dicom_seg and any(out.name.endswith(e) for e in IMAGE_ENDINGS):
        raise SupremError(f"{out}: --output-type dicom-seg writes DICOM; give a folder or a .dcm file name")
    out_is_file = any(out.name.endswith(e) for e in endings) and not args.per_organ
    if out_is_file and out.is_dir():
        raise SupremError(f"{out}: is a folder; give an output file name or a folder without an image ending")
    if out_is_file and len(cases) > 1:
        raise SupremError(f"{out}: several cases in the input, give an output folder")
    if inp.is_dir() and _is_within(out, inp):
        raise SupremError(f"{out}: the output must not lie inside the input folder {inp}")
    if inp.is_file() and out.exists() and out.resolve() == inp.resolve():
        raise SupremError(f"{out}: the output would overwrite the input")

    def target(case) -> Path:
        if args.per_organ:
            return out / case.name / "combined_labels.nii.gz"
        if out_is_file:
            return out
        return out / f"{case.name}{'.dcm' if dicom_seg else case.ending}"

    def stem(case) -> Path:
        if out_is_file:
            return out.parent / next(out.name[: -len(e)] for e in (*IMAGE_ENDINGS, ".dcm") if out.name.endswith(e))
        return out / case.name

    def stats_paths(case) -> tuple[Path, Path]:
        from suprem_net.inference.statistics import statistics_paths

        return statistics_paths(stem(case), case_folder=args.per_organ)  # CASE/statistics.* in the case folder

    def done(case) -> bool:
        return target(case).exists() and (not args.statistics or all(p.exists() for p in stats_paths(case)))

    todo = [c for c in cases if args.overwrite or not done(c)]
    print(f"{len(cases)} case(s) in {inp}, {len(cases) - len(todo)} already done, predicting {len(todo)}")
    if not todo:
        return 0
    if loaded is not None:
        predictor = Predictor(plan, loaded[1], device=args.device, tta=args.tta, step_size=args.step_size,
                              tile_batch_size=args.tile_batch_size, precision=args.precision,
                              lcc_classes=list(range(1, plan["num_classes"])) if args.lcc else [],
                              preprocess=preprocess)
        del loaded
    else:
        predictor = Predictor.from_model_dir(model_dir, folds=args.folds, checkpoint=args.checkpoint,
                                             device=args.device, tta=args.tta, step_size=args.step_size,
                                             tile_batch_size=args.tile_batch_size, precision=args.precision,
                                             lcc=True if args.lcc else None)
    names = predictor.class_names
    multi_label = LabelScheme.of(plan).multi_label  # sigmoid model: classes may overlap
    if multi_label and args.save_probabilities:
        raise SupremError("--save-probabilities is not supported for multi-label models")
    ct = all(n.get("scheme") == "ct" for n in plan["normalization"])
    for case in tqdm(todo, unit="case", disable=len(todo) < 2):
        images, geo = read_case(case)
        if dicom_seg:  # the source instances, checked to lie on the grid, before any compute is spent
            from suprem_net.io.dicom import load_source

            source = load_source(case.dicom_dir, geo)
        if multi_label:  # labels: the combined map; bits: every class's own mask (bit c-1 = class c)
            from suprem_net.inference.multilabel import predict_multilabel

            (labels, bits), probs = predict_multilabel(predictor, images, geo), None
        else:
            labels, probs = predictor.predict_case(images, geo, probabilities=args.save_probabilities)
        if args.save_probabilities:
            export.write_probabilities(Path(f"{stem(case)}.npz") if not args.per_organ else out / case.name / "probabilities.npz",
                                       probs, names)
        if args.preview:
            png = Path(f"{stem(case)}.png") if not args.per_organ else out / case.name / "preview.png"
            write_preview(png, images[0], labels, geo, names, window=(-160.0, 240.0) if ct else None, title=case.name)
        if args.statistics:
            from suprem_net.inference.statistics import case_statistics, write_statistics

            rows = case_statistics(images[0], bits if multi_label else labels, geo, names, bitmask=multi_label)
            write_statistics(*stats_paths(case), case.name, rows)
        if dicom_seg:
            from suprem_net.io.dicom_seg import write_dicom_seg

            write_dicom_seg(target(case), bits if multi_label else labels, source, names, bitmask=multi_label)
        elif args.per_organ and multi_label:
            from suprem_net.inference.multilabel import write_per_organ_bitmask

            write_per_organ_bitmask(out / case.name, labels, bits, geo, names)
        elif args.per_organ:
            export.write_per_organ(out / case.name, labels, geo, names)
        else:
            export.write_labels(target(case), labels, geo)
        logger.debug("%s -> %s", case.source, target(case))
    print(f"wrote {len(todo)} case(s) to {out}")
    return 0


if __name__ == "__main__":
    main()
