"""Zero-shot prediction with a pre-trained Universal-Model checkpoint (SuPreM, Universal Model).

The checkpoint's whole model is loaded (backbone, ``organ_embedding``, controller, ...: every
tensor, strictly) into :class:`suprem_net.networks.universal.UniversalModel`, and the plan is
the backbone's preset: RAS, 1.5 mm, HU -175..250 to 0..1, 96^3 tiles. Each class is decided by
its own sigmoid > 0.5 (overlaps go to the larger logit); label values follow the checkpoint's
head order (the 32-class Universal-Model order for the published files).
"""
from __future__ import annotations

import logging

import torch.nn as nn

from suprem_net.errors import SupremError
from suprem_net.io.checkpoint import read_state_dict, strip_wrapper_prefixes
from suprem_net.networks import get_family
from suprem_net.networks.universal import BACKBONES, UniversalModel
from suprem_net.presets import load_preset
from suprem_net.weights.loading import resolve_checkpoint
from suprem_net.labels import ABDOMENATLAS_25, UNIVERSAL_32
from suprem_net.weights.registry import get_entry, zero_shot_names

logger = logging.getLogger(__name__)


def load_zero_shot(name: str) -> tuple[dict, list[nn.Module]]:
    """Return ``(plan, [model])`` for zero-shot prediction with the registry checkpoint ``name``."""
    if name not in zero_shot_names():
        raise SupremError(f"--pretrained {name}: zero-shot needs a Universal-Model checkpoint "
                          f"({', '.join(sorted(zero_shot_names()))})")
    entry = get_entry(name)
    path = resolve_checkpoint(name)
    sd = strip_wrapper_prefixes(read_state_dict(path))
    if "organ_embedding" not in sd:
        raise SupremError(f"{path}: no 'organ_embedding' in the checkpoint: not a Universal-Model file, "
                          "so it has no zero-shot head (fine-tune it with suprem_train --pretrained instead)")
    n = int(sd["organ_embedding"].shape[0])
    model = UniversalModel(entry.family, n, dict(entry.kwargs))
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    wrong = sorted(k for k in set(own) & set(sd) if own[k].shape != sd[k].shape)
    if missing or unexpected or wrong:
        first = (missing or unexpected or wrong)[0]
        raise SupremError(f"{path}: does not match the {entry.family} Universal Model: {len(missing)} missing, "
                          f"{len(unexpected)} unexpected, {len(wrong)} wrong-shape tensors (first: {first})")
    model.load_state_dict(sd, strict=True)
    logger.info("%s: loaded all %d tensors of the Universal Model (%d classes)", path, len(sd), n)
    names = UNIVERSAL_32 if n == len(UNIVERSAL_32) else ABDOMENATLAS_25 if n == len(ABDOMENATLAS_25) else \
        tuple(f"class_{i}" for i in range(1, n + 1))
    preset = load_preset(entry.preset)
    plan = {
        "plans_name": f"{name}_zero_shot",
        "preset": entry.preset,
        "labels": {"background": 0, **{c: i for i, c in enumerate(names, start=1)}},
        "channel_names": {"0": "CT"},
        "num_classes": n + 1,
        "orientation": preset["orientation"],
        "axes": get_family(entry.family).axes,  # as its pipeline held the volume: RAS, NIfTI voxel order
        "target_spacing": preset["target_spacing"],
        "normalization": [preset["normalization"]],
        "resampling": {"image": "cubic", "labels": "linear_argmax", "anisotropy_threshold": 3.0},
        "patch_size": preset["patch_size"],
        "batch_size": 1,
        # batch_independent() reads this: the U-Net backbone normalises with batch statistics
        "network": {"family": entry.family, "kwargs": dict(entry.kwargs)},
    }
    assert entry.family in BACKBONES
    return plan, [model.eval()]
