"""Find, read (safely) and load a pre-trained checkpoint into one of our networks, never silently.

* :func:`resolve_checkpoint`: a registry name -> ``<weights cache>/<file>`` (see
  :mod:`suprem_net.weights.cache`); a path -> itself.
* :func:`read_state_dict`: ``torch.load(weights_only=True)`` only (``argparse.Namespace`` is the one
  class allowed, for the read of a file that stores one); unwraps ``net`` / ``state_dict`` / ``model``
  / ``network_weights`` / ``student``.
* :func:`load_pretrained`: adapt keys, copy by name and shape, return a :class:`LoadReport`;
  a registry source that loads fewer backbone tensors than expected raises ``SupremError``.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch
import torch.nn as nn

from suprem_net.errors import SupremError
from suprem_net.io.checkpoint import read_state_dict
from suprem_net.networks import get_family
from suprem_net.weights.adapters import ADAPTERS, infer_adapter
from suprem_net.weights.cache import local_path
from suprem_net.weights.heads import own_model_labels, own_model_plan, transfer_head, transfer_own_head
from suprem_net.weights.layout import entry_for_layout
from suprem_net.weights.registry import REGISTRY, CheckpointEntry, entry_for_file, get_entry, head_classes_for

logger = logging.getLogger(__name__)


@dataclass
class LoadReport:
    """What happened to every tensor of a checkpoint and every entry of the model."""

    source: str                      # registry name or the path given
    path: str
    family: str | None
    adapter: str
    loaded: list[str] = field(default_factory=list)          # model keys that received a tensor
    skipped: dict[str, str] = field(default_factory=dict)    # file key -> why the adapter left it out
    unexpected: list[str] = field(default_factory=list)      # adapted keys the model does not have
    shape_mismatch: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)  # key -> (file, model)
    missing: list[str] = field(default_factory=list)         # model keys left as initialised
    expected: int | None = None                               # backbone tensors that had to load
    input_mismatch: list[str] = field(default_factory=list)  # input-layer keys excused (in_channels differs)
    head_transferred: dict[str, tuple[int, int]] = field(default_factory=dict)  # label -> (src ch, dst ch)
    head_note: str = ""
    fitted: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)  # loaded after
    #                                                 the adapter's fit to the network's shape: key -> (file, model)

    def counts(self) -> dict[str, int]:
        return {"loaded": len(self.loaded), "skipped": len(self.skipped), "unexpected": len(self.unexpected),
                "shape_mismatch": len(self.shape_mismatch), "missing": len(self.missing),
                "head_transferred": len(self.head_transferred), "fitted": len(self.fitted)}

    def summary(self) -> str:
        c = self.counts()
        exp = f" (expected {self.expected})" if self.expected is not None else ""
        exp += f" ({c['fitted']} resized to the network)" if c["fitted"] else ""
        s = (f"{self.source}: loaded {c['loaded']}{exp}, skipped {c['skipped']}, unexpected {c['unexpected']}, "
             f"shape mismatch {c['shape_mismatch']}, missing {c['missing']} (left as initialised)")
        return s + (f"; {self.head_note}" if self.head_note else "")


def resolve_checkpoint(name_or_path: str | os.PathLike) -> Path:
    """A registry name -> the local file (must exist); otherwise an existing file path."""
    text = str(name_or_path)
    entry = get_entry(text)
    if entry is not None:
        path = local_path(entry)
        if not path.is_file():
            raise SupremError(f"pretrained weights {entry.name!r} not found at {path}; get them with: "
                              f"suprem_weights download {entry.name}   (without internet: fetch {entry.url} "
                              f"elsewhere, then: suprem_weights import FILE --name {entry.name})")
        return path
    path = Path(text).expanduser()
    if path.is_file():
        return path
    if path.exists():
        raise SupremError(f"{path}: is not a file")
    if os.sep in text or "/" in text or path.suffix in (".pt", ".pth", ".ckpt", ".bin"):
        raise SupremError(f"checkpoint file not found: {path}")
    raise SupremError(f"unknown pretrained weights {text!r}: not a file and not a registry name "
                      f"(known: {', '.join(REGISTRY)})")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The network inside DataParallel / DistributedDataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def model_family(model: nn.Module) -> str | None:
    """The family of a network built by :func:`suprem_net.networks.build_network`, or ``None``."""
    family = getattr(unwrap_model(model), "suprem_family", None)
    return family if isinstance(family, str) else None


def _family_attrs(family: str | None) -> tuple[str | None, tuple[str, ...], str | None]:
    """(plain head key, input-layer keys, regex of every output head's key prefix) of a family."""
    if family is None:
        return None, (), None
    fam = get_family(family)
    return fam.head_key, fam.input_keys, fam.heads


def load_pretrained(model: nn.Module, name_or_path: str | os.PathLike, family: str | None = None,
                    target_labels: Mapping[str, object] | None = None, target_multi_label: bool = False
                    ) -> LoadReport:
    """Load a registry checkpoint (``"suprem_unet"``, ...) or a file into ``model``.

    Tensors are matched by (adapted) name and shape and copied in place. ``target_labels``
    (dataset.json ``labels``; ``target_multi_label`` for bitmask datasets) enables class-wise head
    transfer where the source has a plain head with known class names, or is a checkpoint in one of
    our model folders, whose plan names its classes. Raises ``SupremError`` for an unsupported or missing source,
    a family mismatch, a registry source that loads fewer backbone tensors than expected, or a
    file of which nothing loads.
    """
    model = unwrap_model(model)
    text = str(name_or_path)
    entry = get_entry(text)
    if entry is not None and not entry.supported:
        raise SupremError(f"pretrained weights {entry.name!r}: {entry.unsupported_reason}")
    path = resolve_checkpoint(name_or_path)
    sd = None
    if entry is None:
        entry = entry_for_file(path.name)  # a published file given by path
        if entry is None and own_model_plan(path) is None:  # under another name: known by its key layout
            sd = read_state_dict(path)
            entry = entry_for_layout(sd)
            if entry is not None:
                logger.info("%s: recognised by its key layout as %s", path, entry.name)
        if entry is not None and not entry.supported:
            raise SupremError(f"{path} ({entry.name}): {entry.unsupported_reason}")
    net_family = model_family(model)
    if family is not None and net_family is not None and family != net_family:
        raise SupremError(f"family {family!r} given but the network is a {net_family}")
    family = family or net_family
    if entry is not None and family is not None and entry.family != family:
        raise SupremError(f"pretrained weights {entry.name!r} are for a {entry.family} network, not {family}")
    family = family or (entry.family if entry else None)
    head_key, input_keys, head_pattern = _family_attrs(family)

    if sd is None:
        sd = read_state_dict(path, allow_namespace=entry is not None and entry.allow_namespace)
    adapter = entry.adapter if entry is not None else infer_adapter(list(sd))
    adapted = ADAPTERS[adapter](sd, head_key)
    report = LoadReport(source=entry.name if entry else text, path=str(path), family=family, adapter=adapter,
                        skipped=dict(adapted.skipped), expected=entry.expected_tensors if entry else None)
    # one of our own models names its output channels: its heads go over by class name only, never
    # by shape (equal class counts with different classes would otherwise load silently)
    own_plan = own_model_plan(path) if entry is None and target_labels and head_pattern else None
    own = own_model_labels(own_plan) if own_plan is not None else None
    tensors, own_head = dict(adapted.tensors), {}
    if own is not None:
        own_head = {k: tensors.pop(k) for k in list(tensors) if re.fullmatch(head_pattern + r"\.(weight|bias)", k)}
        report.skipped.update({k: "output head: channels transferred by class name" for k in own_head})

    state = model.state_dict()
    with torch.no_grad():
        for key, value in tensors.items():
            target = state.get(key)
            fitted = _fitted(adapted, key, value, target)
            if target is None:
                report.unexpected.append(key)
            elif fitted is None:
                report.shape_mismatch[key] = (tuple(value.shape), tuple(target.shape))
            else:
                target.copy_(fitted)
                report.loaded.append(key)
                if fitted is not value:
                    report.fitted[key] = (tuple(value.shape), tuple(target.shape))
    done = set(report.loaded)
    report.missing = [k for k in state if k not in done]
    report.input_mismatch = [k for k, (fs, ms) in report.shape_mismatch.items()
                             if k in input_keys and fs[0] == ms[0] and fs[2:] == ms[2:]]
    for key in report.input_mismatch:
        logger.warning("%s: %s not loaded: the network has %d input channels, the file %d",
                       report.source, key, report.shape_mismatch[key][1][1], report.shape_mismatch[key][0][1])

    _check_counts(report, entry, family)
    if own is not None:
        report.head_transferred, report.head_note = transfer_own_head(
            model, head_pattern, {**own_head, **adapted.head}, own, (target_labels, target_multi_label))
    elif target_labels and adapted.head and entry is not None and head_key:
        weight = adapted.head.get(f"{head_key}.weight")
        classes = head_classes_for(entry, int(weight.shape[0])) if weight is not None else None
        if classes is None:
            report.head_note = "head: class order of the pre-trained head is unknown, not transferred"
        else:
            report.head_transferred, report.head_note = transfer_head(model, head_key, adapted.head, classes,
                                                                      target_labels)
    elif target_labels and entry is not None and entry.head in ("universal", "dynamic"):
        kind = "CLIP Universal-Model" if entry.head == "universal" else "DoDNet task-conditioned"
        report.head_note = (f"head: not transferable ({kind} dynamic head has no per-class conv weights); "
                            "the target head starts random")
    logger.info("%s", report.summary())
    return report


def _fitted(adapted, key: str, value: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor | None:
    """``value`` in ``target``'s shape: itself, or the adapter's fit of it; ``None`` if it cannot be."""
    if target is None or tuple(target.shape) == tuple(value.shape):
        return value
    fit = adapted.fit.get(key)
    out = fit(value, tuple(target.shape)) if fit is not None else None
    return out if out is not None and tuple(out.shape) == tuple(target.shape) else None


def _check_counts(report: LoadReport, entry: CheckpointEntry | None, family: str | None) -> None:
    for key, (fs, ms) in report.shape_mismatch.items():
        if key not in report.input_mismatch:
            logger.warning("%s: %s not loaded: shape %s in the file, %s in the network", report.source, key, fs, ms)
    if report.unexpected:
        logger.debug("%s: %d file tensors have no counterpart: %s", report.source, len(report.unexpected),
                     ", ".join(report.unexpected[:10]))
    if entry is not None and entry.expected_tensors is not None:
        got = len(report.loaded) + len(report.input_mismatch)
        if got < entry.expected_tensors:
            detail = (list(report.shape_mismatch)[:3] or report.unexpected[:3])
            raise SupremError(
                f"{entry.name}: only {got} of {entry.expected_tensors} backbone tensors loaded from {report.path} "
                f"({len(report.shape_mismatch)} shape mismatches, {len(report.unexpected)} unexpected, e.g. "
                f"{', '.join(detail) or 'none'}); build the network as published: family {entry.family}, "
                f"kwargs {entry.kwargs}")
    elif not report.loaded:
        raise SupremError(f"{report.path}: no tensor matches the {family or 'given'} network "
                          f"({len(report.unexpected)} unexpected, {len(report.shape_mismatch)} shape mismatches)")
