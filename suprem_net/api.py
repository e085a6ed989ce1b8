"""The library entry points: what the ``suprem_*`` commands do, as Python functions.

    from suprem_net import api

    api.plan_and_preprocess(900)                         # check, fingerprint, plan, preprocess
    api.train(900, "0", overrides={"epochs": 10})        # one fold (see TrainConfig for every option)
    api.predict("scans/", "out/", dataset=900)           # sliding-window prediction in the input's geometry
    api.export_model("results/.../suprem_plans", "bundle/")  # a predictor bundle (ONNX) for onnxruntime
    api.predict("scans/", "out/", model="bundle/")       # ... predicted with onnxruntime
    api.evaluate("labels/", "out/")                      # DSC and NSD per case and class

Locations (``raw``, ``preprocessed``, ``results``) default as for the commands: ``$SUPREM_raw`` ...,
else ``./suprem_data/...``. User errors raise :class:`suprem_net.errors.SupremError`; progress is
logged through :mod:`logging`.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path

import torch

from tqdm import tqdm

from suprem_net.errors import SupremError
from suprem_net.inference import bundle
from suprem_net.inference.inputs import discover_cases, read_case
from suprem_net.inference.multilabel import predict_multilabel
from suprem_net.inference.nnunet_compat import load_nnunet_model, preprocess_nnunet
from suprem_net.inference.outputs import CaseOutputs, Prediction
from suprem_net.inference.predictor import Predictor, lcc_classes, load_model_dir
from suprem_net.inference.zero_shot import load_zero_shot
from suprem_net.io.atomic import read_json, write_json
from suprem_net.io.dicom import load_source
from suprem_net.labels import LabelScheme
from suprem_net.paths import location, resolve_dataset_name
from suprem_net.plan import DEFAULT_PLANS_NAME, load_plan
from suprem_net.preprocessing.body import is_ct
from suprem_net.timing import NO_TIMES, StageTimes

# planning, preprocessing, training, evaluation and merging are imported where they are used: a
# prediction (the command users run most) does not pay for importing the training stack (about 1.5 s)

log = logging.getLogger(__name__)
PathLike = str | os.PathLike


def _processes() -> int:
    return min(4, os.cpu_count() or 1)


# ------------------------------------------------------------------------------------------ planning
def plan_and_preprocess(dataset: str | int, *, raw: PathLike | None = None, preprocessed: PathLike | None = None,
                        network: str | None = None, preset: str | None = None, like: PathLike | None = None,
                        plans_name: str | None = None, device: str | None = None, check_only: bool = False,
                        verify: bool = False, replan: bool = False, preprocess: bool = True,
                        num_processes: int | None = None, shard: tuple[int, int] = (0, 1), **budgets) -> dict:
    """Check the raw dataset, fingerprint it, plan (or reuse the existing plan) and preprocess its training
    cases. ``budgets``: ``gpu_memory_gb``, ``cpu_seconds_per_iteration``, ``cpu_gflops``, ``time_budget_s`` of
    :func:`~suprem_net.planning.planner.make_plan`. A CPU plan is timed on this machine (real training
    steps, cached per machine: :mod:`suprem_net.training.calibration`) unless ``cpu_gflops`` gives the
    throughput of the machine it is meant for; a CUDA plan made where a GPU is records its measured step
    too. Returns ``{"dataset", "cases", "plan", "plan_path", "counts"}`` (``counts``: cases, preprocessed,
    skipped; ``None`` without preprocessing)."""
    from suprem_net.device import resolve_device
    from suprem_net.io.dataset import load_raw_dataset
    from suprem_net.planning.fingerprint import compute_fingerprint, load_or_compute
    from suprem_net.planning.planner import make_plan, plan_like
    from suprem_net.planning.verify import IntegrityError, header_problems

    if like and (preset or network):
        raise SupremError("--like takes the network and input distribution from the given plan; "
                          "leave out --preset/--network")
    num_processes = num_processes or _processes()
    raw_root, pp_root = location("raw", raw), location("preprocessed", preprocessed)
    ds = load_raw_dataset(raw_root / resolve_dataset_name(str(dataset), raw_root))
    source = _like_source(like, ds) if like else None  # a bad plan fails before anything is written
    problems = header_problems(ds)
    if problems:
        raise IntegrityError(problems)
    cases = ds.training_cases()
    result = {"dataset": ds.name, "cases": len(cases), "plan": None, "plan_path": None, "counts": None}
    if check_only:
        compute_fingerprint(ds, cases, num_processes)
        return result
    out = pp_root / ds.name
    fp = load_or_compute(out / "fingerprint.json", ds, cases, num_processes, force=verify)
    if not out.joinpath("dataset.json").is_file():
        shutil.copyfile(ds.root / "dataset.json", out / "dataset.json")
    name = plans_name or ("transfer_plans" if source else f"{preset}_plans" if preset else DEFAULT_PLANS_NAME)
    plan_path = out / f"{name}.json"
    if plan_path.is_file() and not replan:
        plan = load_plan(plan_path)
        log.info("reusing existing plan %s (pass --replan to overwrite)", plan_path)
    else:
        if source is not None:
            plan = plan_like(ds.spec, fp, source, plans_name=name, source_path=str(like))
        else:
            target = device or resolve_device("auto", ("cuda", "cpu")).type
            plan = make_plan(ds.spec, fp, plans_name=name, network=network, preset=preset, device=target,
                             speed=_speed(target, budgets.get("cpu_gflops")), **budgets)
        write_json(plan_path, plan)
    result.update(plan=plan, plan_path=plan_path)
    if preprocess:
        result["counts"] = _preprocess(ds, cases, plan, out / plan["data_identifier"], num_processes, shard)
    return result


CPU_GFLOPS_ENV = "SUPREM_cpu_gflops"


def _speed(device: str, cpu_gflops: float | None):
    """How the planner times a step: from an assumed throughput (``cpu_gflops``, else
    ``$SUPREM_cpu_gflops``: planning for another machine, or plans that must not depend on this one),
    else measured here; None for a CUDA plan made without a GPU."""
    from suprem_net.planning.speed import AssumedSpeed
    from suprem_net.training.calibration import MeasuredSpeed

    if device == "cpu":
        gflops = cpu_gflops or _env_gflops()
        return AssumedSpeed(gflops) if gflops else MeasuredSpeed("cpu")
    return MeasuredSpeed(device) if torch.cuda.is_available() else None


def _env_gflops() -> float | None:
    text = os.environ.get(CPU_GFLOPS_ENV, "").strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if value <= 0:
        raise SupremError(f"${CPU_GFLOPS_ENV}={text!r}: give a throughput in GFLOP/s, e.g. 60")
    return value


def _like_source(path: PathLike, ds) -> dict:
    """The source plan of ``--like``, checked against this dataset."""
    plan = load_plan(path)
    ours, theirs = ds.channel_names, plan["channel_names"]
    if len(ours) != len(theirs):
        raise SupremError(f"{path}: planned for {len(theirs)} input channel(s) {theirs}, this dataset has "
                          f"{len(ours)} {ours}")
    return plan


def _preprocess(ds, cases: list, plan: dict, data_dir: Path, num_processes: int,
                shard: tuple[int, int]) -> dict:
    from suprem_net.preprocessing.run import preprocess_dataset, verify_complete

    counts = preprocess_dataset(cases, plan, data_dir, num_processes, shard,
                                partial_labels=ds.spec.get("partial_labels"))
    if shard[1] == 1:
        missing = verify_complete(cases, plan, data_dir)
        if missing:
            raise SupremError(f"{data_dir}: {len(missing)} cases missing after preprocessing: {', '.join(missing[:5])}")
    return counts


# ------------------------------------------------------------------------------------------ training
def train(dataset: str | int, fold: str | int, *, raw: PathLike | None = None, preprocessed: PathLike | None = None,
          results: PathLike | None = None, **options) -> dict:
    """Train one fold (``"all"``: every case). ``options``: the fields of
    :class:`~suprem_net.training.trainer.TrainConfig` (``plans_name``, ``pretrained``, ``overrides``,
    ``resume``, ``device``, ...). Returns the history, the best EMA pseudo Dice, the fold folder and,
    unless switched off, the final validation's summary."""
    from suprem_net.training.trainer import TrainConfig, train_fold

    pp_root = location("preprocessed", preprocessed)
    name = resolve_dataset_name(str(dataset), location("raw", raw), pp_root)
    cfg = TrainConfig(dataset=name, fold=str(fold), preprocessed_root=pp_root,
                      results_root=location("results", results), **options)
    return train_fold(cfg)


# ------------------------------------------------------------------------------------------ prediction
BACKENDS = ("auto", "torch", "onnxruntime")


def predict(input: PathLike, output: PathLike, *, model: PathLike | None = None, dataset: str | int | None = None,
            nnunet_model: PathLike | None = None, pretrained: str | None = None,
            plans_name: str = DEFAULT_PLANS_NAME, results: PathLike | None = None, folds=("0",),
            checkpoint: str = "checkpoint_final.pth", device: str = "auto", precision: str = "auto",
            tta: bool | None = None, step_size: float = 0.5, tile_batch_size: int | None = None, lcc: bool = False,
            layout: str = "flat", output_type: str = "image", statistics: bool = False,
            save_probabilities: bool = False, preview: bool = False, overwrite: bool = False,
            backend: str = "auto", skip_air: bool = True, compile: bool = False, threads: int | None = None,
            profile: bool = False, progress: bool = True) -> dict:
    """Segment an image, a folder of images or case folders, or a DICOM series with one model source:
    a model folder (``model``, or ``dataset`` + ``plans_name`` in ``results``), a predictor bundle
    written by :func:`export_model` (``model``; run by onnxruntime), an nnU-Net v2 results folder
    (``nnunet_model``) or a zero-shot checkpoint (``pretrained``; no mirroring unless ``tta``). Cases whose
    outputs exist are skipped unless ``overwrite``. ``backend``: ``auto`` runs bundles with onnxruntime and
    everything else with torch. ``skip_air``: leave out tiles of a CT that hold only air
    (:mod:`suprem_net.preprocessing.body`). ``threads``: CPU threads (default: torch's, one per core).
    ``progress``: a bar of the tiles done, on a terminal, for a case that takes over a few seconds.
    Returns ``{"cases", "skipped", "written"}``, with ``profile`` also ``"stages"``: seconds per stage
    (read, reorient, crop, normalise, resample, tiles, network, accumulation, revert, write, ...) summed over
    the cases."""
    if not 0 < step_size <= 1:
        raise SupremError(f"--step-size {step_size}: must be in (0, 1]")
    if tile_batch_size is not None and tile_batch_size < 1:
        raise SupremError("--tile-batch-size must be at least 1")
    if backend not in BACKENDS:
        raise SupremError(f"--backend {backend}: choose one of {', '.join(BACKENDS)}")
    if threads is not None:
        if threads < 1:
            raise SupremError("--threads must be at least 1")
        torch.set_num_threads(threads)
    outputs = CaseOutputs(Path(input), Path(output), layout, output_type, statistics, save_probabilities, preview)
    tta = not pretrained if tta is None else tta
    times = StageTimes() if profile else NO_TIMES
    options = dict(device=device, tta=tta, step_size=step_size, tile_batch_size=tile_batch_size, precision=precision,
                   skip_air=skip_air, compile=compile, times=times, progress=progress)
    plan, make_predictor = _model_source(model, dataset, nnunet_model, pretrained, plans_name, results, folds,
                                         checkpoint, lcc, backend, options)
    cases = discover_cases(Path(input), num_channels=len(plan["channel_names"]))
    outputs.check_cases(cases)
    todo = [c for c in cases if overwrite or not outputs.done(c)]
    log.info("%d case(s) in %s, %d already done, predicting %d", len(cases), input, len(cases) - len(todo), len(todo))
    written = []
    if todo:
        predictor = make_predictor()
        if LabelScheme.of(plan).multi_label and save_probabilities:
            raise SupremError("--save-probabilities is not supported for multi-label models")
        for case in tqdm(todo, unit="case", disable=len(todo) < 2):
            written.append(_predict_case(predictor, case, outputs, save_probabilities, times))
    result = {"cases": len(cases), "skipped": len(cases) - len(todo), "written": written}
    if profile:
        result["stages"] = dict(times.seconds)
    return result


def _model_source(model, dataset, nnunet_model, pretrained, plans_name, results, folds, checkpoint, lcc, backend,
                  options):
    """``(plan, make_predictor)``: the plan is read first (it says how many channels a case has), the
    weights only when there is something to predict."""
    is_bundle = bool(model) and bundle.is_bundle(model)
    if backend == "onnxruntime" and not is_bundle:
        raise SupremError("--backend onnxruntime runs a predictor bundle: write one with suprem_export MODEL_DIR -o "
                          "BUNDLE and predict with -m BUNDLE")
    if is_bundle:
        if backend == "torch":
            raise SupremError(f"{model}: a predictor bundle (ONNX) runs with --backend onnxruntime, not torch")
        manifest = bundle.verify_bundle(model)
        plan_path = Path(model) / "plans.json"
        plan = load_plan(plan_path) if manifest.get("source") != "nnunetv2" else read_json(plan_path)
        return plan, lambda: _bundle_predictor(model, folds, lcc, options)
    if nnunet_model:
        plan, models, _ = load_nnunet_model(nnunet_model, folds=folds, checkpoint=checkpoint)
        return plan, lambda: Predictor(plan, models, preprocess=preprocess_nnunet, **options,
                                       lcc_classes=range(1, plan["num_classes"]) if lcc else ())
    if pretrained:
        plan, models = load_zero_shot(pretrained)
        return plan, lambda: Predictor(plan, models, **options,
                                       lcc_classes=range(1, plan["num_classes"]) if lcc else ())
    model_dir = Path(model) if model else _model_dir(dataset, plans_name, results)
    if not model_dir.is_dir():
        raise SupremError(f"{model_dir}: model folder not found")
    return load_plan(model_dir / "plans.json"), lambda: Predictor.from_model_dir(
        model_dir, folds=folds, checkpoint=checkpoint, lcc=True if lcc else None, **options)


def _bundle_predictor(folder, folds, lcc: bool, options: dict) -> Predictor:
    plan, models, manifest = bundle.load_bundle(folder, folds=folds)
    classes = range(1, plan["num_classes"]) if lcc else manifest.get("lcc_classes", [])
    preprocess = preprocess_nnunet if manifest.get("source") == "nnunetv2" else None
    return Predictor(plan, models, preprocess=preprocess, lcc_classes=classes, **options)


def _model_dir(dataset, plans_name: str, results) -> Path:
    if dataset is None:
        raise SupremError("give a model folder (-m) or a dataset (-d)")
    root = location("results", results)
    return root / resolve_dataset_name(str(dataset), root) / plans_name


def _predict_case(predictor: Predictor, case, outputs: CaseOutputs, probabilities: bool,
                  times: StageTimes = NO_TIMES) -> Path:
    with times("read"):
        images, geometry = read_case(case)
        # the source instances of a DICOM-SEG, checked to lie on the grid, before any compute is spent
        source = load_source(case.dicom_dir, geometry) if outputs.dicom_seg else None
    image = images[0] if outputs.statistics or outputs.preview else None  # else freed before the network runs
    if LabelScheme.of(predictor.plan).multi_label:  # the combined map and every class's own mask
        pred = Prediction(*predict_multilabel(predictor, images, geometry))
    else:
        labels, probs = predictor.predict_case(images, geometry, probabilities=probabilities, release_images=True)
        pred = Prediction(labels, probabilities=probs)
    with times("write"):  # the preview of the first channel uses the CT window when that channel is CT
        return outputs.write(case, image, geometry, pred, predictor.class_names,
                             is_ct(predictor.plan["normalization"]), source)


# ------------------------------------------------------------------------------------------ export
def export_model(model: PathLike, output: PathLike, *, folds=("0",), checkpoint: str = "checkpoint_final.pth",
                 opset: int = bundle.OPSET, overwrite: bool = False) -> dict:
    """Write a predictor bundle (:mod:`suprem_net.inference.bundle`) of a model folder or of an nnU-Net v2
    results folder (recognised by its ``plans.json``); returns the bundle's manifest."""
    model_dir = Path(model)
    if not model_dir.is_dir():
        raise SupremError(f"{model_dir}: model folder not found")
    if bundle.is_bundle(model_dir):
        raise SupremError(f"{model_dir}: already a predictor bundle")
    if _is_nnunet_folder(model_dir):
        plan, models, _ = load_nnunet_model(model_dir, folds=folds, checkpoint=checkpoint)
        source, classes = "nnunetv2", []
    else:
        plan, models = load_model_dir(model_dir, folds, checkpoint)
        source, classes = "suprem", lcc_classes(model_dir, plan, None)
    return bundle.export_bundle(model_dir, output, models, plan, folds=[str(f) for f in folds], lcc_classes=classes,
                                source=source, opset=opset, overwrite=overwrite)


def _is_nnunet_folder(model_dir: Path) -> bool:
    plans = model_dir / "plans.json"
    return plans.is_file() and '"configurations"' in plans.read_text(encoding="utf-8")


# ------------------------------------------------------------------------------------------ evaluation
def evaluate(reference: PathLike, prediction: PathLike, labels: dict[str, int] | None = None, *,
             tolerance_mm: float = 1.0, output: PathLike | None = None, num_workers: int | None = None) -> dict:
    """DSC and NSD of every predicted label map against its reference (matched by file name); writes the
    summary as JSON (``output``, default ``PREDICTION/summary.json``) and CSV next to it."""
    from suprem_net.evaluation.evaluate import evaluate_folders, write_summary

    out_json = Path(output) if output else Path(prediction) / "summary.json"
    if out_json.suffix.lower() == ".csv":
        raise SupremError(f"-o {out_json}: give the JSON path; the CSV is written next to it")
    summary = evaluate_folders(reference, prediction, labels, tolerance_mm=tolerance_mm,
                               num_workers=num_workers or _processes())
    write_summary(summary, out_json, out_json.with_suffix(".csv"))
    summary["written"] = [str(out_json), str(out_json.with_suffix(".csv"))]
    return summary


# ------------------------------------------------------------------------------------------ datasets
def merge_datasets(datasets: list[str | int], output_id: int, name: str = "Merged", *,
                   aliases: PathLike | None = None, prefix_case_ids: bool = False, raw: PathLike | None = None,
                   num_processes: int | None = None) -> dict:
    """Pool raw datasets with different label sets into one multi-label dataset ``DatasetNNN_<name>``
    (see :mod:`suprem_net.io.merge`). Returns ``{"folder", "cases", "classes", "partial"}``."""
    from suprem_net.io.dataset import load_raw_dataset
    from suprem_net.io.merge import load_aliases, plan_merge, run_merge

    if len(datasets) < 2:
        raise SupremError("-d: give at least two datasets to merge")
    if not 0 <= output_id <= 999:
        raise SupremError(f"-o {output_id}: a dataset number is 0..999")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_\-]*", name):
        raise SupremError(f"--name {name!r}: use letters, digits, '_' and '-'")
    root = location("raw", raw)
    sources = [load_raw_dataset(root / resolve_dataset_name(str(d), root)) for d in datasets]
    out = root / f"Dataset{output_id:03d}_{name}"
    plan = plan_merge(sources, out, name, load_aliases(aliases), prefix_case_ids)
    run_merge(plan, num_processes or _processes())
    return {"folder": out, "cases": len(plan.jobs), "classes": len(plan.spec["labels"]) - 1,
            "partial": len(plan.spec.get("partial_labels", {}))}
