"""blosc2 storage of preprocessed cases: ``CASE.b2nd`` (image), ``CASE_seg.b2nd`` (labels),
``CASE.json`` (properties, written last: its presence marks a finished case).

Chunks and blocks derive from the patch size so that reading a random training patch
decompresses little beyond the patch: a chunk spans at most the patch per axis, a block at
most ``BLOCK_BYTES``. Only the region that is sliced is decompressed when reading.
"""
from __future__ import annotations

import errno
import os
from pathlib import Path

import blosc2
import numpy as np

from suprem_net.io.atomic import atomic_path

BLOCK_BYTES = 128 * 1024


def chunks_and_blocks(shape, patch, itemsize: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Chunk and block shapes for an array (C, Z, Y, X) read in patches of ``patch`` (Z, Y, X)."""
    spatial = [int(min(s, p)) for s, p in zip(shape[1:], patch)]
    chunk = [1] + spatial
    block = [1] + spatial
    while int(np.prod(block)) * itemsize > BLOCK_BYTES:
        i = 1 + int(np.argmax(block[1:]))
        block[i] = max(1, block[i] // 2)
    return tuple(chunk), tuple(block)


def save_array(path: str | os.PathLike, arr: np.ndarray, patch, codec: str = "ZSTD", clevel: int = 3) -> None:
    """Write ``arr`` (C, Z, Y, X) to ``path`` atomically."""
    chunk, block = chunks_and_blocks(arr.shape, patch, arr.itemsize)
    cparams = blosc2.CParams(codec=getattr(blosc2.Codec, codec), clevel=clevel,
                             filters=[blosc2.Filter.SHUFFLE], nthreads=1)
    with atomic_path(path) as tmp:
        try:
            blosc2.asarray(np.ascontiguousarray(arr), urlpath=str(tmp), mode="w", chunks=chunk, blocks=block,
                           cparams=cparams)
        except RuntimeError as e:  # blosc2 reports a failed write (full disk) as RuntimeError
            raise OSError(errno.EIO, f"write failed, is the disk full? ({e})", str(path)) from None


def open_array(path: str | os.PathLike):
    """Open a stored array for reading slices (``arr[:, z0:z1, y0:y1, x0:x1]`` returns numpy)."""
    return blosc2.open(str(path), mode="r", dparams=blosc2.DParams(nthreads=1))


def case_files(folder: Path, case_id: str) -> dict[str, Path]:
    return {"image": folder / f"{case_id}.b2nd", "seg": folder / f"{case_id}_seg.b2nd",
            "properties": folder / f"{case_id}.json"}


def finished_cases(folder: Path) -> list[str]:
    """Case ids whose properties JSON (the last file written) exists."""
    if not folder.is_dir():
        return []
    return sorted(p.name[:-5] for p in folder.glob("*.json") if not p.name.startswith("."))
