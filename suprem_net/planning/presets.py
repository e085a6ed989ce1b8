"""Backbone presets (``plans/*.json``, installed as ``suprem_net.presets``)."""
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


def _folder():
    return resources.files("suprem_net") / "presets"
