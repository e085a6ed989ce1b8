"""Backbone presets: one JSON per pre-trained backbone in this folder (configuration as data), giving
the input distribution it was pre-trained on (orientation, spacing, intensity window, patch) and its
fine-tuning recipe. ``network.kwargs`` in a preset overrides the family's published kwargs (``{}``:
the published network)."""
from __future__ import annotations

import json
from importlib import resources

from suprem_net.errors import SupremError


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in _folder().iterdir() if p.name.endswith(".json"))


def load_preset(name: str) -> dict:
    path = _folder() / f"{name}.json"
    if not path.is_file():
        raise SupremError(f"unknown preset {name!r}; available: {', '.join(preset_names())}")
    return json.loads(path.read_text(encoding="utf-8"))


def presets_for_family(family: str) -> list[str]:
    """The presets whose network is ``family``."""
    return [n for n in preset_names() if load_preset(n)["network"]["family"] == family]


def _folder():
    return resources.files("suprem_net") / "presets"
