"""Pool raw datasets with different label sets into one multi-label (bitmask) dataset.

Classes are matched by name, after an optional alias map (``{"kidney_l": "kidney_left"}``: a
synonym to the name it means). The merged dataset numbers its classes in order of first
appearance (the first dataset's in its label order, then each further dataset's new names), stores
every label map as a bitmask (bit c-1 = merged class c; ``label_encoding: "bitmask"``, see
docs/multilabel.md) and records in ``partial_labels`` the classes each case does not annotate:
every merged class its dataset lacks, plus what the dataset's own ``partial_labels`` said. The
masked Dice + BCE of multi-label training then gives those (case, class) pairs no gradient.

Everything is checked before anything is written; each conflict is one line of the raised
``SupremError``: datasets given twice, different channels or file endings, two classes of one
dataset meaning the same merged name, an alias onto ``background`` or onto another alias, more than
32 merged classes, the same case id in two datasets (``prefix_case_ids`` prefixes every id with
its dataset's folder name), missing label files, an output id already used.

Writing: images are copied byte for byte (``CASE_000k`` names kept), label maps are re-encoded in
the source label's geometry; every file atomically, the label last, so a case is done when its label
exists. The merge's plan (``.merge-plan.json``, the dataset.json to be) is written first and
``dataset.json`` last: a rerun of the same command resumes an interrupted merge, a rerun with other
inputs is refused, and a finished merge is left as it is.
"""
from __future__ import annotations

import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from suprem_net.errors import InputError, SupremError
from suprem_net.io.atomic import atomic_path, read_json, write_json
from suprem_net.io.dataset import Case, RawDataset
from suprem_net.io.image import read_image, write_image
from suprem_net.parallel import map_cases
from suprem_net import labels as label_format

logger = logging.getLogger(__name__)

PLAN_FILE = ".merge-plan.json"
MAX_LISTED = 10  # conflicts of one kind listed before "... and N more"


@dataclass(frozen=True)
class CaseJob:
    """One case to write: its source files, new id and source value (or bit) -> merged class number."""

    case: Case
    new_id: str
    values: dict[int, int]
    source_bitmask: bool
    source_classes: int  # classes of the source dataset (bits of a bitmask source)
    out: Path
    ending: str


@dataclass(frozen=True)
class MergePlan:
    out: Path
    spec: dict  # the merged dataset.json
    jobs: list[CaseJob]


def load_aliases(path: str | Path | None) -> dict[str, str]:
    """``{synonym: name}`` from a JSON object file (empty without a file)."""
    if path is None:
        return {}
    data = read_json(path)
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        raise InputError(path, 'must be a JSON object of class names, e.g. {"kidney_l": "kidney_left"}')
    return {k: v for k, v in data.items() if k != v}


def _alias_problems(aliases: dict[str, str]) -> list[str]:
    problems = [f"alias {k!r} -> {v!r}: {v!r} is itself an alias (of {aliases[v]!r}); map each synonym to the "
                "final name" for k, v in aliases.items() if v in aliases]
    problems += [f"alias {k!r} -> {v!r}: background cannot be merged" for k, v in aliases.items()
                 if v == "background" or k == "background"]
    return problems


def _class_maps(datasets: list[RawDataset], aliases: dict[str, str]) -> tuple[list[str], list[dict[int, str]], list[str]]:
    """Merged class names in order of first appearance, each dataset's {value: merged name}, problems."""
    merged: list[str] = []
    maps, problems = [], []
    for ds in datasets:
        mapping: dict[int, str] = {}
        by_target: dict[str, str] = {}
        for name, value in sorted(ds.labels.items(), key=lambda kv: kv[1]):
            if value == 0:
                continue
            target = aliases.get(name, name)
            if target in by_target:
                problems.append(f"{ds.name}: classes {by_target[target]!r} and {name!r} both map to {target!r}")
                continue
            by_target[target] = name
            mapping[int(value)] = target
            if target not in merged:
                merged.append(target)
        maps.append(mapping)
    if len(merged) > label_format.MAX_CLASSES:
        problems.append(f"the merged dataset would have {len(merged)} classes; a bitmask holds at most "
                        f"{label_format.MAX_CLASSES}")
    return merged, maps, problems


def _listed(kind: list[str]) -> list[str]:
    return kind[:MAX_LISTED] + ([f"... and {len(kind) - MAX_LISTED} more like the above"] if len(kind) > MAX_LISTED else [])


def plan_merge(datasets: list[RawDataset], out: Path, name: str, aliases: dict[str, str] | None = None,
               prefix_case_ids: bool = False) -> MergePlan:
    """Check the datasets against each other and describe the merged dataset; nothing is written."""
    aliases = aliases or {}
    problems = _alias_problems(aliases)
    names = [ds.name for ds in datasets]
    problems += [f"{n}: given more than once" for n in sorted({n for n in names if names.count(n) > 1})]
    first = datasets[0]
    for ds in datasets[1:]:
        if ds.channel_names != first.channel_names:
            problems.append(f"{ds.name}: channels {ds.channel_names} differ from {first.name}'s {first.channel_names}")
        if ds.file_ending != first.file_ending:
            problems.append(f"{ds.name}: file ending {ds.file_ending!r} differs from {first.name}'s {first.file_ending!r}")
    classes, maps, class_problems = _class_maps(datasets, aliases)
    problems += class_problems
    number = {c: i for i, c in enumerate(classes, start=1)}
    jobs, seen, duplicates, missing = [], {}, [], []
    partial: dict[str, list[str]] = {}
    for ds, mapping in zip(datasets, maps):
        own_partial = ds.spec.get("partial_labels", {})
        name_of = {v: n for n, v in ds.labels.items()}
        for case in ds.training_cases():
            new_id = f"{ds.name}_{case.case_id}" if prefix_case_ids else case.case_id
            if new_id in seen:
                hint = "" if duplicates else " (--prefix-case-ids prefixes each case id with its dataset's name)"
                duplicates.append(f"case id {new_id!r} is in {seen[new_id]} and {ds.name}{hint}")
                continue
            seen[new_id] = ds.name
            if case.label is None or not case.label.is_file():
                missing.append(f"{case.label}: label file missing")
                continue
            annotated = {mapping[v] for v in mapping if name_of[v] not in own_partial.get(case.case_id, [])}
            absent = [c for c in classes if c not in annotated]
            if absent:
                partial[new_id] = absent
            jobs.append(CaseJob(case, new_id, {v: number[c] for v, c in mapping.items()}, ds.label_scheme.multi_label,
                                ds.label_scheme.num_classes, out, first.file_ending))
    problems += _listed(duplicates) + _listed(missing)
    spec = {
        "name": name,
        "description": "merged by suprem_merge_datasets from " + ", ".join(names)
                       + "; multi-label (bitmask), classes matched by name",
        "channel_names": first.channel_names,
        "labels": {"background": 0, **number},
        "numTraining": len(jobs),
        "file_ending": first.file_ending,
        "label_encoding": label_format.BITMASK,
        "merged_from": {ds.name: {n: mapping[v] for n, v in ds.labels.items() if v in mapping}
                        for ds, mapping in zip(datasets, maps)},
    }
    if partial:
        spec["partial_labels"] = partial
    problems += _output_problems(out, spec)
    if problems:
        raise SupremError("\n".join(problems))
    return MergePlan(out, spec, jobs)


def _output_problems(out: Path, spec: dict) -> list[str]:
    m = re.fullmatch(r"(Dataset\d{3})_.+", out.name)
    if m and out.parent.is_dir():
        others = sorted(p.name for p in out.parent.glob(m.group(1) + "_*") if p != out)
        if others:
            return [f"dataset id {m.group(1)[7:]} is already used by {out.parent / others[0]}"]
    done = out / "dataset.json"
    if done.is_file() and read_json(done) != spec:
        return [f"{out}: holds another dataset (its dataset.json differs from this merge); use another id"]
    plan = out / PLAN_FILE
    if plan.is_file() and read_json(plan) != spec:
        return [f"{out}: holds an unfinished merge of other inputs; rerun that command or delete the folder"]
    if out.is_dir() and not done.is_file() and not plan.is_file() and any(out.iterdir()):
        return [f"{out}: exists and is not a merge of these datasets; use another id"]
    return []


def _encode(job: CaseJob, seg: np.ndarray, num_classes: int) -> np.ndarray:
    if job.source_bitmask:
        problem = label_format.value_problem(seg, job.source_classes)
        masks = {job.values[c]: label_format.channel(seg, c) for c in job.values}
    else:
        unknown = sorted(set(np.unique(seg).tolist()) - set(job.values) - {0})
        problem = f"label values {unknown[:5]} are not in dataset.json" if unknown else None
        masks = {job.values[v]: seg == v for v in job.values}
    if problem:
        raise InputError(job.case.label, problem)
    return label_format.encode(masks, seg.shape, num_classes)


def _merge_case(args: tuple[CaseJob, int]) -> str:
    job, num_classes = args
    label = job.out / "labelsTr" / f"{job.new_id}{job.ending}"
    images = [job.out / "imagesTr" / f"{job.new_id}_{c:04d}{job.ending}" for c in range(len(job.case.images))]
    if label.is_file() and all(p.is_file() for p in images):
        return job.new_id
    for src, dst in zip(job.case.images, images):
        with atomic_path(dst) as tmp:
            shutil.copyfile(src, tmp)
    seg, geo = read_image(job.case.label, dtype=None)
    write_image(label, _encode(job, seg, num_classes), geo)  # written last: the case is done
    return job.new_id


def run_merge(plan: MergePlan, num_workers: int = 1) -> Path:
    """Write the planned dataset (resuming an interrupted run of the same merge)."""
    if (plan.out / "dataset.json").is_file():
        logger.info("%s: already merged", plan.out)
        return plan.out
    write_json(plan.out / PLAN_FILE, plan.spec)
    num_classes = len(plan.spec["labels"]) - 1
    map_cases(_merge_case, [(j, num_classes) for j in plan.jobs], num_workers, "merge")
    write_json(plan.out / "dataset.json", plan.spec)
    (plan.out / PLAN_FILE).unlink()
    return plan.out
