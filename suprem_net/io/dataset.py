"""nnU-Net v2 raw dataset folders: ``dataset.json``, ``imagesTr/``, ``labelsTr/``, ``imagesTs/``."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from suprem_net.errors import InputError
from suprem_net.io.atomic import read_json
from suprem_net.labels import BITMASK, LABEL_MAP, MAX_CLASSES, LabelScheme

SAFE_CASE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")


@dataclass(frozen=True)
class Case:
    case_id: str
    images: tuple[Path, ...]  # one file per channel, in channel order
    label: Path | None


@dataclass(frozen=True)
class RawDataset:
    root: Path
    spec: dict  # dataset.json

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def file_ending(self) -> str:
        return self.spec["file_ending"]

    @property
    def channel_names(self) -> dict[str, str]:
        return self.spec["channel_names"]

    @property
    def labels(self) -> dict[str, int]:
        return self.spec["labels"]

    @property
    def label_scheme(self) -> LabelScheme:
        """What the labels mean (encoding, outputs, ...): :class:`suprem_net.labels.LabelScheme`."""
        return LabelScheme.of(self.spec)

    def training_cases(self) -> list[Case]:
        return self._cases(self.root / "imagesTr", self.root / "labelsTr")

    def test_cases(self) -> list[Case]:
        return self._cases(self.root / "imagesTs", None)

    def _cases(self, image_dir: Path, label_dir: Path | None) -> list[Case]:
        if not image_dir.is_dir():
            if label_dir is None:
                return []
            raise InputError(image_dir, "folder not found")
        ending = self.file_ending
        pattern = re.compile(rf"(.+)_(\d{{4}}){re.escape(ending)}")
        channels: dict[str, dict[int, Path]] = {}
        for p in sorted(image_dir.iterdir()):
            m = pattern.fullmatch(p.name)
            if m:
                channels.setdefault(m.group(1), {})[int(m.group(2))] = p
        n_channels = len(self.channel_names)
        cases = []
        for case_id, chans in sorted(channels.items()):
            missing = [c for c in range(n_channels) if c not in chans]
            if missing:
                raise InputError(image_dir / f"{case_id}_{missing[0]:04d}{ending}", "channel file missing")
            label = label_dir / f"{case_id}{ending}" if label_dir is not None else None
            cases.append(Case(case_id, tuple(chans[c] for c in range(n_channels)), label))
        return cases


def load_raw_dataset(root: str | Path) -> RawDataset:
    """Open a raw dataset folder, checking ``dataset.json``'s keys and types."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(root, "dataset folder not found")
    spec_path = root / "dataset.json"
    spec = read_json(spec_path)
    problem = _spec_problem(spec)
    if problem:
        raise InputError(spec_path, problem)
    return RawDataset(root, spec)


def _spec_problem(spec) -> str | None:
    if not isinstance(spec, dict):
        return "top level must be an object"
    for key, typ in (("channel_names", dict), ("labels", dict), ("numTraining", int), ("file_ending", str)):
        if key not in spec:
            return f"missing key {key!r}"
        if not isinstance(spec[key], typ) or (typ is int and isinstance(spec[key], bool)):
            return f"key {key!r} must be {typ.__name__}, got {type(spec[key]).__name__}"
    if not spec["channel_names"]:
        return "channel_names is empty"
    if sorted(spec["channel_names"]) != [str(i) for i in range(len(spec["channel_names"]))]:
        return "channel_names keys must be '0', '1', ..."
    labels = spec["labels"]
    if any(not isinstance(v, int) or isinstance(v, bool) for v in labels.values()):
        return "labels values must be integers (region labels are not supported yet)"
    if labels.get("background") != 0:
        return "labels must map 'background' to 0"
    values = sorted(labels.values())
    if values != list(range(len(values))):
        return f"label values must be consecutive from 0, got {values}"
    encoding = spec.get("label_encoding", LABEL_MAP)
    if encoding not in (LABEL_MAP, BITMASK):
        return f"label_encoding must be '{LABEL_MAP}' or '{BITMASK}', got {encoding!r}"
    if encoding == BITMASK and not 1 <= len(values) - 1 <= MAX_CLASSES:
        return f"a bitmask label map holds 1 to {MAX_CLASSES} classes, dataset.json has {len(values) - 1}"
    partial = spec.get("partial_labels", {})
    if not isinstance(partial, dict) or any(not isinstance(v, list) for v in partial.values()):
        return "partial_labels must map case ids to lists of class names"
    named = {n for v in partial.values() for n in v}
    unknown = sorted(n for n in named if n not in labels or n == "background")
    if unknown:
        return f"partial_labels names classes that are not in labels (or background): {unknown[:5]}"
    if not spec["file_ending"].startswith("."):
        return f"file_ending must start with '.', got {spec['file_ending']!r}"
    return None
