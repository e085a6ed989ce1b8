"""``suprem_weights check``: load a checkpoint into the network it was published for and report."""
from __future__ import annotations

import os
from collections.abc import Mapping

from suprem_net.errors import SupremError
from suprem_net.io.checkpoint import read_state_dict
from suprem_net.networks import FAMILY_NAMES, build_network, family_of_keys
from suprem_net.weights.adapters import ADAPTERS, infer_adapter
from suprem_net.weights.layout import entry_for_layout
from suprem_net.weights.loading import LoadReport, load_pretrained, resolve_checkpoint
from suprem_net.weights.registry import entry_for_file, get_entry


def check_checkpoint(source: str | os.PathLike, family: str | None = None, num_classes: int = 2, in_channels: int = 1,
                     labels: Mapping[str, object] | None = None) -> tuple[LoadReport, dict, int]:
    """Load ``source`` (registry name or file) into its network: the registry entry's (by name, file name
    or key layout) or ``family``'s, with enough outputs for ``labels``. Returns ``(report, the network
    entry built, num_classes)``."""
    entry = get_entry(str(source))
    if entry is not None and not entry.supported:
        raise SupremError(f"pretrained weights {entry.name!r}: {entry.unsupported_reason}")
    path = resolve_checkpoint(source)
    entry = entry or entry_for_file(path.name)
    if entry is None and not family:
        entry = entry_for_layout(read_state_dict(path))  # a published file under another name
    family = family or (entry.family if entry else None)
    if family is None:
        sd = read_state_dict(path)
        family = family_of_keys(ADAPTERS[infer_adapter(list(sd))](sd, None).tensors)
        if family is None:
            raise SupremError(f"{path}: cannot tell the network family from its keys; pass --family "
                              f"({', '.join(FAMILY_NAMES)})")
    if labels:
        values = [v for v in labels.values() if isinstance(v, int) and not isinstance(v, bool)]
        num_classes = max(num_classes, max(values, default=0) + 1)
    network = {"family": family, "kwargs": dict(entry.kwargs) if entry is not None and entry.family == family else {}}
    model = build_network(network, in_channels, num_classes)
    return load_pretrained(model, path, family=family, target_labels=labels), network, num_classes
