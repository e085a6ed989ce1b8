"""The weights cache: where registry checkpoints live, how a file gets in (checked first), and how
what is there is checked again.

Folder: ``$SUPREM_weights``, else the platform's user cache folder (``platformdirs``:
``~/.cache/suprem_net/weights`` on Linux, ``~/Library/Caches/suprem_net/weights`` on macOS,
``%LOCALAPPDATA%\\suprem_net\\Cache\\weights`` on Windows); never the current directory.

* ``<folder>/<published file name>``: what the loader uses. A file only gets this name once it is
  complete and checked (atomic rename).
* ``<folder>/<published file name>.sha256``: its SHA-256 when it was placed (``sha256sum`` format),
  the reference of ``verify`` for files whose published hash is unknown.
* ``<folder>/.partial/``: downloads in progress, resumed from there; the loader never looks in it.

A file is accepted for an entry (:func:`check_file`) when its size and SHA-256 equal the registry's
where those are known; where the hash is unknown, when its key layout is the entry's
(:mod:`suprem_net.weights.layout`).
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from suprem_net.errors import SupremError
from suprem_net.io.atomic import atomic_path
from suprem_net.io.checkpoint import read_state_dict
from suprem_net.weights.layout import entries_for_layout
from suprem_net.weights.registry import REGISTRY, CheckpointEntry, get_entry

logger = logging.getLogger(__name__)

WEIGHTS_ENV = "SUPREM_weights"
APP_NAME = "suprem_net"
PARTIAL = ".partial"
CHUNK = 1 << 20


def weights_dir() -> Path:
    """``$SUPREM_weights``, else ``<user cache dir>/weights`` (see the module docstring)."""
    env = os.environ.get(WEIGHTS_ENV)
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir(APP_NAME, appauthor=False)) / "weights"


def local_path(entry: CheckpointEntry) -> Path:
    return weights_dir() / entry.file


def partial_path(entry: CheckpointEntry) -> Path:
    return weights_dir() / PARTIAL / f"{entry.file}.part"


def sidecar_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def sha256_file(path: str | os.PathLike, progress: bool = False) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks (with a progress bar if ``progress``)."""
    from tqdm import tqdm

    h = hashlib.sha256()
    path = Path(path)
    with open(path, "rb") as f, tqdm(total=path.stat().st_size, unit="B", unit_scale=True, unit_divisor=1024,
                                     desc=f"hashing {path.name}", disable=None if progress else True) as bar:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            bar.update(len(chunk))
    return h.hexdigest()


def read_sidecar(path: Path) -> str | None:
    try:
        return sidecar_path(path).read_text(encoding="utf-8").split()[0].lower()
    except (OSError, IndexError):
        return None


def write_sidecar(path: Path, digest: str) -> None:
    with atomic_path(sidecar_path(path)) as tmp:
        tmp.write_text(f"{digest}  {path.name}\n", encoding="utf-8")


def _note(entry: CheckpointEntry) -> str:
    return f" ({entry.checksum_note})" if entry.checksum_note else ""


def check_file(entry: CheckpointEntry, path: Path, digest: str, source: str, sd: dict | None = None) -> None:
    """Raise ``SupremError`` (naming ``source``) unless ``path`` (SHA-256 ``digest``) is ``entry``'s
    file: its size and hash where the registry knows them, else its key layout (``sd``: the tensors,
    if already read)."""
    size = path.stat().st_size
    if entry.size is not None and size != entry.size:
        raise SupremError(f"{source}: {size:,} bytes, expected {entry.size:,}{_note(entry)}")
    if entry.sha256 is not None:
        if digest != entry.sha256.lower():
            raise SupremError(f"{source}: SHA-256 {digest} differs from the expected {entry.sha256}{_note(entry)}")
        return

    try:
        sd = sd if sd is not None else read_state_dict(path, allow_namespace=entry.allow_namespace)
    except SupremError as e:
        raise SupremError(f"{source}: not a readable {entry.name} checkpoint ({e})") from None
    if entry.name not in {e.name for e in entries_for_layout(sd)}:
        raise SupremError(f"{source}: its key layout is not that of {entry.name} (no published SHA-256 to check "
                          "instead)")


def place(entry: CheckpointEntry, src: Path, digest: str, move: bool) -> Path:
    """Put a checked file into the cache under its published name, atomically; record its hash."""
    target = local_path(entry)
    target.parent.mkdir(parents=True, exist_ok=True)
    if move:
        os.replace(src, target)
    elif src.resolve() != target.resolve():
        with atomic_path(target) as tmp:
            shutil.copyfile(src, tmp)
    write_sidecar(target, digest)
    return target


def import_file(src: str | os.PathLike, name: str | None = None, progress: bool = False
                ) -> tuple[CheckpointEntry, Path]:
    """Check a file fetched elsewhere and copy it into the cache (for machines without internet).

    The entry is ``name``, else the one whose published SHA-256 the file has, else the one whose key
    layout it has. Returns ``(entry, cached path)``."""
    src = Path(src).expanduser()
    if not src.is_file():
        raise SupremError(f"{src}: file not found")
    entry = get_entry(name) if name else None
    if name and entry is None:
        raise SupremError(f"unknown pretrained weights {name!r} (known: {', '.join(REGISTRY)})")
    digest = sha256_file(src, progress)
    if entry is None:
        entry = next((e for e in REGISTRY.values() if e.sha256 and e.sha256.lower() == digest), None)
    sd = None
    if entry is None:
        entry, sd = _entry_by_layout(src)
    check_file(entry, src, digest, str(src), sd)
    target = place(entry, src, digest, move=False)
    logger.info("%s: checked as %s and placed at %s", src, entry.name, target)
    return entry, target


def _entry_by_layout(src: Path) -> tuple[CheckpointEntry, dict]:

    sd = read_state_dict(src)
    matches = entries_for_layout(sd)
    if not matches:
        raise SupremError(f"{src}: neither its SHA-256 nor its key layout is that of a checkpoint of the model table; "
                          "pass --name NAME to say which it is")
    if len(matches) > 1:
        raise SupremError(f"{src}: its key layout is that of {' and '.join(e.name for e in matches)}; "
                          "pass --name NAME to say which it is")
    return matches[0], sd


@dataclass
class CachedFile:
    name: str
    path: Path
    status: str         # "ok", "ok (recorded hash)", "no reference hash", "MISMATCH", "partial download"
    digest: str | None


def verify_cache(progress: bool = False) -> list[CachedFile]:
    """Hash every registry file in the cache again and compare it with the published SHA-256, else
    with the one recorded when it was placed; partial downloads are listed too."""
    out = []
    for entry in REGISTRY.values():
        path = local_path(entry)
        if path.is_file():
            digest = sha256_file(path, progress)
            expected = entry.sha256.lower() if entry.sha256 else read_sidecar(path)
            if expected is None:
                status = "no reference hash"
            elif digest != expected:
                status = "MISMATCH"
            else:
                status = "ok" if entry.sha256 else "ok (recorded hash)"
            out.append(CachedFile(entry.name, path, status, digest))
        if partial_path(entry).is_file():
            out.append(CachedFile(entry.name, partial_path(entry), "partial download", None))
    return out
