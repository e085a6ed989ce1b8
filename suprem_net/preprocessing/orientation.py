"""Reorienting arrays to a named orientation (e.g. RAS) by axis permutation and flips.

Only permutations and flips are applied (never interpolation), so the step is exactly
invertible: ``restore(reorient(a, t), t) == a``. For an oblique direction the nearest
axis-aligned orientation is used, as MONAI's ``Orientationd`` does.

Orientation letters name the world direction each array axis points *to*, for array
axes in SimpleITK index order (x, y, z), like SimpleITK's ``DICOMOrient`` and
nibabel's codes: "RAS" = x toward Right, y toward Anterior, z toward Superior.
"""
from __future__ import annotations

import numpy as np

# ITK world coordinates are LPS: +x = Left, +y = Posterior, +z = Superior
_LETTER = {"L": (0, 1), "R": (0, -1), "P": (1, 1), "A": (1, -1), "S": (2, 1), "I": (2, -1)}


def orientation_transform(direction: tuple[float, ...], target: str) -> dict:
    """Permutation and flips that bring a (z, y, x) array with ``direction`` to ``target``.

    Returns ``{"perm": [...], "flip": [...]}`` for numpy axes: ``out = flip(transpose(a, perm))``.
    """
    target = target.upper()
    if sorted(_LETTER[c][0] for c in target) != [0, 1, 2]:
        raise ValueError(f"invalid orientation {target!r}")
    d = np.asarray(direction, dtype=float).reshape(3, 3)  # column c = world direction of index axis c
    # assign each index axis to one world axis (greedy on the strongest components: handles oblique)
    world_of = [-1, -1, -1]
    sign_of = [1, 1, 1]
    order = np.dstack(np.unravel_index(np.argsort(-np.abs(d), axis=None), d.shape))[0]
    used_w, used_c = set(), set()
    for w, c in order:
        if w in used_w or c in used_c:
            continue
        world_of[c], sign_of[c] = int(w), int(np.sign(d[w, c]) or 1)
        used_w.add(w)
        used_c.add(c)
    perm, flip = [], []
    # output numpy axis a corresponds to index axis 2 - a (numpy order is z, y, x)
    for out_axis in range(3):
        world, want_sign = _LETTER[target[2 - out_axis]]
        c = world_of.index(world)
        perm.append(2 - c)
        flip.append(sign_of[c] != want_sign)
    return {"perm": perm, "flip": flip}


def reorient(arr: np.ndarray, t: dict) -> np.ndarray:
    """Apply ``t`` to the last three axes of ``arr`` (leading channel axes are kept)."""
    lead = arr.ndim - 3
    out = np.transpose(arr, list(range(lead)) + [lead + p for p in t["perm"]])
    axes = tuple(lead + i for i, f in enumerate(t["flip"]) if f)
    return np.flip(out, axes) if axes else out


def restore(arr: np.ndarray, t: dict) -> np.ndarray:
    """Undo :func:`reorient`."""
    lead = arr.ndim - 3
    axes = tuple(lead + i for i, f in enumerate(t["flip"]) if f)
    if axes:
        arr = np.flip(arr, axes)
    inv = np.argsort(t["perm"])
    return np.transpose(arr, list(range(lead)) + [lead + int(p) for p in inv])


def reorient_spacing(spacing, t: dict) -> list[float]:
    return [float(spacing[p]) for p in t["perm"]]
