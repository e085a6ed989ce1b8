"""Atomic writes: write to a temporary name beside the target, then rename."""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path

from suprem_net.errors import InputError


@contextmanager
def atomic_path(target: str | os.PathLike):
    """Yield a temporary path beside ``target``; rename it onto ``target`` on success.

    On any exception the temporary file is removed, so a crash never leaves a
    half-written ``target``.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # keep the full suffix chain (".nii.gz", ".b2nd") so writers that dispatch on it still work
    tmp = target.with_name(f".tmp-{os.getpid()}-{target.name}")
    try:
        yield tmp
        os.replace(tmp, target)
    except OSError as e:
        if e.filename is None:  # a failed write() (full disk) does not say which file: name the target
            raise OSError(e.errno, e.strerror or str(e), str(target)) from e
        raise
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path: str | os.PathLike, obj, *, sort_keys: bool = False) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, sort_keys=sort_keys)
            f.write("\n")


def read_json(path: str | os.PathLike):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise InputError(path, "file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(path, f"not valid JSON ({e})") from None
