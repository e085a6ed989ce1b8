"""Recognise a published checkpoint by its key layout, whatever its file name.

A file of the model table saved under another name (renamed by the user, fetched by a browser
that appended ``(1)``, ...) is matched to its registry entry from its keys and shapes, in two steps:

1. :func:`published_adapter`: the wrapper layout the file was published with (``module.backbone.``
   and the CLIP wrapper, ``module.`` from DDP, a DINO student, ...) names one key adapter. Files
   without a ``module.`` prefix and without another marker (e.g. our own fine-tuned networks)
   match none.
2. :func:`entries_for_layout`: every supported entry of that adapter whose published network
   (built on the ``meta`` device) takes the adapted tensors completely: at least the expected
   backbone tensors, no key the network lacks, no shape the adapter cannot fit.

Some entries share a layout (the SuPreM and Universal-Model files of one backbone); they load the
same way, so :func:`entry_for_layout` still answers, naming both.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping

import torch

from suprem_net.networks import build_network, get_family
from suprem_net.weights.adapters import ADAPTERS, infer_adapter
from suprem_net.weights.registry import REGISTRY, CheckpointEntry

logger = logging.getLogger(__name__)

# what two entries must share to load the same way
LOADING_FIELDS = ("adapter", "family", "kwargs", "expected_tensors", "head", "head_classes", "allow_namespace")


def published_adapter(sd: Mapping[str, torch.Tensor]) -> str | None:
    """The adapter of the published wrapper layout ``sd`` has, or ``None``."""
    keys = list(sd)
    guess = infer_adapter(keys)
    if guess != "plain":
        return guess
    if not keys or not all(k.startswith("module.") for k in keys):  # those files were saved from DDP
        return None
    if "module.convInit.conv.weight" in sd:
        return "segresnet_plain"
    head = sd.get("module.out_tr.final_conv.weight")
    if "module.down_tr64.ops.0.conv1.weight" in sd and head is not None and head.shape[0] == 1:
        return "models_genesis"  # its 1-channel image-restoration head
    if "module.layer4.0.conv3.weight" in sd:
        return "med3d"
    return None


def _network_shapes(entry: CheckpointEntry) -> dict[str, tuple[int, ...]]:
    network = {"family": entry.family, "kwargs": dict(entry.kwargs)}
    try:
        with torch.device("meta"):
            net = build_network(network, 1, 2)
    except (RuntimeError, NotImplementedError):  # a constructor that needs real values
        net = build_network(network, 1, 2)
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def takes_layout(entry: CheckpointEntry, sd: Mapping[str, torch.Tensor]) -> bool:
    """Whether ``entry``'s adapter turns ``sd`` into tensors its published network takes completely."""
    head_key = get_family(entry.family).head_key
    adapted = ADAPTERS[entry.adapter](dict(sd), head_key)
    shapes = _network_shapes(entry)
    for key, value in adapted.tensors.items():
        shape = shapes.get(key)
        if shape is None:
            return False
        if tuple(value.shape) != shape:
            fit = adapted.fit.get(key)
            if fit is None or fit(value, shape) is None:
                return False
    return len(adapted.tensors) >= (entry.expected_tensors or 1)


def entries_for_layout(sd: Mapping[str, torch.Tensor]) -> list[CheckpointEntry]:
    """The supported registry entries whose published layout ``sd`` has (see the module docstring)."""
    adapter = published_adapter(sd)
    if adapter is None:
        return []
    return [e for e in REGISTRY.values() if e.supported and e.adapter == adapter and takes_layout(e, sd)]


def entry_for_layout(sd: Mapping[str, torch.Tensor]) -> CheckpointEntry | None:
    """The entry to load ``sd`` as, or ``None``. Entries that share a layout and load the same way
    give one entry named ``"a or b"``; a layout that loads differently per entry gives ``None``."""
    matches = entries_for_layout(sd)
    if not matches:
        return None
    first = matches[0]
    if any(getattr(e, f) != getattr(first, f) for e in matches[1:] for f in LOADING_FIELDS):
        logger.warning("the key layout fits %s, which load differently; name the checkpoint",
                       ", ".join(e.name for e in matches))
        return None
    if len(matches) == 1:
        return first
    return dataclasses.replace(first, name=" or ".join(e.name for e in matches))
