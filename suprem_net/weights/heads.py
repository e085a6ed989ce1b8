"""Class-wise transfer of a pre-trained output head into the head of a fine-tuning network.

Where a checkpoint has a *plain* 1x1x1 conv head with known class names (SuPreM SegResNet:
``conv_final.2.conv``, 32 outputs in the Universal-Model order, or 25 in the AbdomenAtlas order)
and the target dataset's labels (nnU-Net ``dataset.json`` ``labels``: name -> value, background 0)
name some of the same structures, the matching output channels (weight rows and biases) are
copied into the target head at channel = label value. Everything else in the target head keeps
its random initialisation.

Not possible for the SuPreM / Universal-Model Swin UNETR and U-Net files: their head is the
CLIP-driven dynamic head (controller + organ embedding produce per-image 8->8->8->1 kernels), which
has no static per-class weights to copy. Self-supervised files have no class head at all.

Our own model folders (``MODEL/fold_F/checkpoint_*.pth`` next to ``MODEL/plans.json``) name
their output channels through the plan's labels, so a model pre-trained with suprem_train hands
its matching channels (background too, between two softmax heads) to every head of the
fine-tuning network: for the nnU-Net U-Nets, every deep-supervision output ``decoder.seg_layers.N``.

Note on semantics: the pre-trained head is multi-label (one sigmoid per class) while a fine-tuned
network uses softmax over mutually exclusive labels; copied channels are an initialisation, not a
calibrated classifier.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Mapping, Sequence

import torch
import torch.nn as nn

from suprem_net.labels import LabelScheme

logger = logging.getLogger(__name__)

# base-name synonyms -> canonical AbdomenAtlas / Universal-Model name (after normalisation)
_SYNONYMS: dict[str, str] = {
    "gallbladder": "gall_bladder",
    "ivc": "postcava",
    "inferior_vena_cava": "postcava",
    "vena_cava_inferior": "postcava",
    "vena_cava": "postcava",
    "adrenal": "adrenal_gland",
    "adrenal_glands": "adrenal_gland",
    "kidneys": "kidney",
    "lungs": "lung",
    "urinary_bladder": "bladder",
    "celiac_truck": "celiac_trunk",
    "coeliac_trunk": "celiac_trunk",
    "oesophagus": "esophagus",
    "hepatic_vessels": "hepatic_vessel",
    "small_bowel": "intestine",
    "small_intestine": "intestine",
    "bowel": "intestine",
    "portal_and_splenic_vein": "portal_vein_and_splenic_vein",
    "portal_splenic_vein": "portal_vein_and_splenic_vein",
    "portal_vein_splenic_vein": "portal_vein_and_splenic_vein",
    "liver_cancer": "liver_tumor",
    "liver_lesion": "liver_tumor",
    "hepatic_tumor": "liver_tumor",
    "pancreatic_tumor": "pancreas_tumor",
    "pancreas_cancer": "pancreas_tumor",
    "pancreatic_cancer": "pancreas_tumor",
    "renal_tumor": "kidney_tumor",
    "kidney_cancer": "kidney_tumor",
    "renal_cyst": "kidney_cyst",
    "colon_cancer": "colon_tumor",
    "lung_nodule": "lung_tumor",
    "lung_cancer": "lung_tumor",
}
_SIDES = {"left": "left", "l": "left", "lt": "left", "right": "right", "r": "right", "rt": "right"}


def canonical_name(name: str) -> str:
    """Normalise a structure name: lower case, ``_`` separators, British spellings, side last.

    ``"Left Kidney"``, ``"kidney_L"``, ``"left_kidney"`` -> ``"kidney_left"``;
    ``"Gallbladder"`` -> ``"gall_bladder"``; ``"IVC"`` / ``"inferior_vena_cava"`` -> ``"postcava"``.
    """
    n = re.sub(r"[\s\-./]+", "_", name.strip().lower())
    n = re.sub(r"_+", "_", n).strip("_").replace("tumour", "tumor")
    parts = n.split("_")
    side = None
    if len(parts) > 1 and parts[0] in ("left", "right"):
        side, parts = parts[0], parts[1:]
    elif len(parts) > 1 and parts[-1] in _SIDES:
        side, parts = _SIDES[parts[-1]], parts[:-1]
    base = "_".join(parts)
    base = _SYNONYMS.get(base, base)
    return f"{base}_{side}" if side else base


def match_classes(source_classes: Sequence[str], target_labels: Mapping[str, object]) -> dict[str, tuple[int, int]]:
    """Target label name -> (source channel, target channel) for every label that names a source
    class. Background (value 0) and region-style labels (lists) are ignored."""
    index = {canonical_name(c): i for i, c in enumerate(source_classes)}
    matches: dict[str, tuple[int, int]] = {}
    for name, value in target_labels.items():
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            continue
        src = index.get(canonical_name(name))
        if src is not None:
            matches[name] = (src, value)
    return matches


def transfer_head(model: nn.Module, head_key: str, head_tensors: Mapping[str, torch.Tensor],
                  source_classes: Sequence[str], target_labels: Mapping[str, object]) -> tuple[dict[str, tuple[int, int]], str]:
    """Copy matching channels of a pre-trained plain head into ``model``'s head ``head_key``.

    Returns ``(transferred, note)``: ``transferred`` maps the target label name to
    ``(source channel, target channel)``; ``note`` says what happened in one line.
    """
    w_key, b_key = f"{head_key}.weight", f"{head_key}.bias"
    state = model.state_dict()
    if w_key not in state or w_key not in head_tensors:
        return {}, f"no plain head {head_key} to transfer"
    src_w, dst_w = head_tensors[w_key], state[w_key]
    if src_w.shape[1:] != dst_w.shape[1:]:
        return {}, f"head {head_key}: input shape {tuple(src_w.shape[1:])} != {tuple(dst_w.shape[1:])}, not transferred"
    if src_w.shape[0] != len(source_classes):
        return {}, f"head {head_key}: {src_w.shape[0]} outputs but {len(source_classes)} class names, not transferred"
    matches = {n: (s, t) for n, (s, t) in match_classes(source_classes, target_labels).items() if t < dst_w.shape[0]}
    if not matches:
        return {}, "no target label matches a class of the pre-trained head"
    src_b = head_tensors.get(b_key)
    with torch.no_grad():
        for _, (s, t) in matches.items():
            dst_w[t].copy_(src_w[s])
            if src_b is not None and b_key in state:
                state[b_key][t].copy_(src_b[s])
    desc = ", ".join(f"{n}<-{source_classes[s]}" for n, (s, _) in matches.items())
    note = f"head: {len(matches)} class(es) transferred ({desc})"
    logger.info(note)
    return matches, note


def own_model_plan_path(checkpoint: str | Path) -> Path:
    """Where the plan of a suprem_net model folder lies for one of its checkpoints
    (``MODEL/fold_F/<file>`` next to ``MODEL/plans.json``)."""
    return Path(checkpoint).resolve().parent.parent / "plans.json"


def own_model_plan(checkpoint: str | Path) -> dict | None:
    """The plan of the suprem_net model folder a checkpoint lies in, else ``None``."""
    try:
        plan = json.loads(own_model_plan_path(checkpoint).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return plan if isinstance(plan, dict) and isinstance(plan.get("labels"), dict) else None


def own_model_labels(plan: dict) -> tuple[dict, bool]:
    """``(labels, multi_label)`` of one of our plans."""
    return dict(plan["labels"]), LabelScheme.of(plan).multi_label


def label_channels(labels: Mapping[str, object], multi_label: bool) -> dict[str, int]:
    """Label name -> output channel: the label value (softmax; background is channel 0) or value - 1
    (multi-label: one sigmoid per class, no background channel). Region labels (lists) are left out."""
    out = {}
    for name, value in labels.items():
        if isinstance(value, bool) or not isinstance(value, int) or (multi_label and value <= 0):
            continue
        out[name] = value - 1 if multi_label else value
    return out


def transfer_own_head(model: nn.Module, head_pattern: str, tensors: Mapping[str, torch.Tensor],
                      source: tuple[Mapping[str, object], bool], target: tuple[Mapping[str, object], bool]
                      ) -> tuple[dict[str, tuple[int, int]], str]:
    """Copy the channels of every head matching ``head_pattern`` (a regex for the conv's key prefix)
    whose label names match between ``source`` and ``target`` (each ``(labels, multi_label)``)."""
    src = {canonical_name(n): c for n, c in label_channels(*source).items()}
    pairs = {n: (src[canonical_name(n)], t) for n, t in label_channels(*target).items() if canonical_name(n) in src}
    if not pairs:
        return {}, "head: no target label matches a label of the pre-trained model"
    state = model.state_dict()
    heads = [k[: -len(".weight")] for k in state if re.fullmatch(head_pattern + r"\.weight", k)]
    done = []
    with torch.no_grad():
        for key in heads:
            w, b = tensors.get(f"{key}.weight"), tensors.get(f"{key}.bias")
            dst_w, dst_b = state[f"{key}.weight"], state.get(f"{key}.bias")
            if w is None or w.shape[1:] != dst_w.shape[1:]:
                continue
            for s, t in pairs.values():
                if s < w.shape[0] and t < dst_w.shape[0]:
                    dst_w[t].copy_(w[s])
                    if b is not None and dst_b is not None:
                        dst_b[t].copy_(b[s])
            done.append(key)
    if not done:
        return {}, f"head: no head of the pre-trained model fits ({head_pattern})"
    desc = ", ".join(pairs)
    note = f"head: {len(pairs)} class(es) transferred by name into {len(done)} output layer(s) ({desc})"
    logger.info(note)
    return pairs, note
