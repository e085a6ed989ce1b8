"""What the labels of a dataset or plan mean: one :class:`LabelScheme` answers every question about
them (outputs of the network, scored classes, activation, default loss, storage), so no other module
inspects ``label_encoding``.

Two encodings (``dataset.json`` / plan ``"label_encoding"``):

* ``"label_map"`` (the default): one class per voxel, values 0 (background) .. C; a softmax network
  with C + 1 outputs, Dice + cross-entropy.
* ``"bitmask"`` (multi-label, overlapping classes): bit ``c - 1`` is set where class ``c`` (``labels``
  name -> 1..C) is present, 0 is "no class". The dtype is the smallest unsigned integer that holds
  C bits: uint8 (C <= 8), uint16 (<= 16), uint32 (<= 32). A sigmoid network with C outputs, SuPreM's
  Dice + BCE. Training batches carry the bitmask as ``ceil(C / 16)`` channels of 16 bits
  (:func:`pack16`), which stay exact through float32 augmentation. See docs/multilabel.md.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from suprem_net.errors import SupremError

# Class orders of the pre-trained heads (reference facts on SuPreM, section 4): the AbdomenAtlas 1.1 order
# (25 organs; SuPreM's pre-training script) and the CLIP-Driven Universal Model order (25 organs + 7
# tumours/cyst; the head order of the published SuPreM/Universal checkpoints). Position i is channel i.
ABDOMENATLAS_25: tuple[str, ...] = (
    "aorta", "gall_bladder", "kidney_left", "kidney_right", "liver", "pancreas", "postcava", "spleen",
    "stomach", "adrenal_gland_left", "adrenal_gland_right", "bladder", "celiac_trunk", "colon", "duodenum",
    "esophagus", "femur_left", "femur_right", "hepatic_vessel", "intestine", "lung_left", "lung_right",
    "portal_vein_and_splenic_vein", "prostate", "rectum",
)

UNIVERSAL_32: tuple[str, ...] = (
    "spleen", "kidney_right", "kidney_left", "gall_bladder", "esophagus", "liver", "stomach", "aorta",
    "postcava", "portal_vein_and_splenic_vein", "pancreas", "adrenal_gland_right", "adrenal_gland_left",
    "duodenum", "hepatic_vessel", "lung_right", "lung_left", "colon", "intestine", "rectum", "bladder",
    "prostate", "femur_left", "femur_right", "celiac_truck", "kidney_tumor", "liver_tumor", "pancreas_tumor",
    "hepatic_vessel_tumor", "lung_tumor", "colon_tumor", "kidney_cyst",
)

BITMASK = "bitmask"
LABEL_MAP = "label_map"
MAX_CLASSES = 32
PACK_BITS = 16


@dataclass(frozen=True)
class LabelScheme:
    """The labels of one dataset or plan: ``labels`` (name -> value, background 0) and the encoding."""

    labels: dict[str, int]
    multi_label: bool = False

    @classmethod
    def of(cls, spec_or_plan: dict) -> "LabelScheme":
        """The scheme of a ``dataset.json`` or plan (both carry ``labels`` and ``label_encoding``)."""
        return cls({k: int(v) for k, v in spec_or_plan["labels"].items()},
                   spec_or_plan.get("label_encoding", LABEL_MAP) == BITMASK)

    @property
    def encoding(self) -> str:
        return BITMASK if self.multi_label else LABEL_MAP

    @property
    def names(self) -> dict[int, str]:
        """Value -> name, background included."""
        return {v: k for k, v in self.labels.items()}

    @property
    def foreground(self) -> dict[str, int]:
        """Name -> value of every class but background, by value."""
        return {k: v for k, v in sorted(self.labels.items(), key=lambda kv: kv[1]) if v != 0}

    @property
    def num_classes(self) -> int:
        """Foreground classes C."""
        return max(self.labels.values())

    @property
    def num_outputs(self) -> int:
        """Output channels of the network: C sigmoid channels, or C + 1 softmax channels."""
        return self.num_classes if self.multi_label else self.num_classes + 1

    @property
    def first_scored_output(self) -> int:
        """Output channel of class 1 (the scored channels are this one and the C - 1 after it)."""
        return 0 if self.multi_label else 1

    @property
    def activation(self) -> str:
        return "sigmoid" if self.multi_label else "softmax"

    @property
    def default_loss(self) -> str:
        return "dice_bce" if self.multi_label else "dice_ce"

    @property
    def storage_dtype(self) -> np.dtype:
        """dtype of a stored label volume."""
        if self.multi_label:
            return bitmask_dtype(self.num_classes)
        return np.dtype(np.uint8 if self.num_outputs <= 255 else np.uint16)

    @property
    def batch_channels(self) -> int:
        """Label channels of a training batch: packed 16-bit bitmask channels, or one label map."""
        return -(-self.num_classes // PACK_BITS) if self.multi_label else 1

    def encoding_fields(self) -> dict:
        """What a plan or dataset.json records of the encoding (nothing for the default)."""
        return {"label_encoding": BITMASK} if self.multi_label else {}

    def annotated(self, missing: list[str] | None) -> list[int]:
        """Class numbers annotated in a case whose ``partial_labels`` entry is ``missing``."""
        return annotated_classes(self.labels, missing)


def bitmask_dtype(num_classes: int) -> np.dtype:
    if num_classes < 1 or num_classes > MAX_CLASSES:
        raise SupremError(f"a bitmask label map holds 1 to {MAX_CLASSES} classes, got {num_classes}")
    return np.dtype(next(dt for dt in (np.uint8, np.uint16, np.uint32) if num_classes <= np.iinfo(dt).bits))


def encode(masks: dict[int, np.ndarray], shape, num_classes: int) -> np.ndarray:
    """Bitmask of ``{class number (1..C): bool mask}``."""
    dt = bitmask_dtype(num_classes)
    out = np.zeros(shape, dtype=dt)
    for c, m in masks.items():
        out[np.asarray(m, dtype=bool)] |= dt.type(1 << (int(c) - 1))
    return out


def channel(seg: np.ndarray, c: int) -> np.ndarray:
    """Bool mask of class ``c`` (1-based) in bitmask ``seg``."""
    return (np.asarray(seg).astype(np.uint64) >> np.uint64(c - 1)) & np.uint64(1) == 1


def class_counts(seg: np.ndarray, num_classes: int) -> list[int]:
    """Voxels per class 1..C (a voxel counts for every class whose bit is set)."""
    flat = np.asarray(seg).reshape(-1).astype(np.uint64)
    return [int(np.count_nonzero((flat >> np.uint64(c)) & np.uint64(1))) for c in range(num_classes)]


def value_problem(seg: np.ndarray, num_classes: int) -> str | None:
    """Why ``seg`` is not a valid bitmask of ``num_classes`` classes, or None."""
    if np.issubdtype(seg.dtype, np.floating):
        if not np.array_equal(seg, np.round(seg)):
            return "bitmask label has non-integer values"
    if seg.size and float(seg.min()) < 0:
        return "bitmask label has negative values"
    if seg.size and int(seg.max()) >= (1 << num_classes):
        return (f"bitmask label value {int(seg.max())} sets bits above the {num_classes} classes of dataset.json "
                f"(values must be OR-combinations of 2^(class-1))")
    return None


def annotated_classes(all_classes: dict[str, int], missing: list[str] | None) -> list[int]:
    """Class numbers (1..) annotated in a case: every class except the names in ``missing``."""
    missing = set(missing or [])
    unknown = missing - set(all_classes)
    if unknown:
        raise SupremError(f"dataset.json partial_labels names unknown classes: {', '.join(sorted(unknown))}")
    return sorted(int(v) for n, v in all_classes.items() if int(v) > 0 and n not in missing)


def pack16(seg: np.ndarray, num_classes: int) -> np.ndarray:
    """(B, 1, ...) bitmask -> (B, ceil(C/16), ...) int32 channels of 16 bits each."""
    s = np.asarray(seg).astype(np.int64)
    n = -(-num_classes // PACK_BITS)
    return np.concatenate([(s >> (PACK_BITS * i)) & 0xFFFF for i in range(n)], axis=1).astype(np.int32)


def unpack16(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, ceil(C/16), ...) packed channels -> (B, C, ...) float 0/1 multi-hot target."""
    t = target.round().long() if target.is_floating_point() else target.long()
    chans = [(t[:, c // PACK_BITS] >> (c % PACK_BITS)) & 1 for c in range(num_classes)]
    return torch.stack(chans, 1).float()
