"""Reorienting arrays to a named orientation (e.g. RAS) and to the network's axis order, by axis
permutation and flips.

Only permutations and flips are applied (never interpolation), so the step is exactly
invertible: ``restore(reorient(a, t), t) == a``. For an oblique direction the closest
axis-aligned orientation is used, decided by nibabel's ``io_orientation`` as MONAI's
``Orientationd`` (and so SuPreM's pipeline) decides it.

Orientation letters name the world direction each array axis points *to*, for array
axes in SimpleITK index order (x, y, z), like SimpleITK's ``DICOMOrient`` and
nibabel's codes: "RAS" = x toward Right, y toward Anterior, z toward Superior.

Axis order (a plan's ``axes``): the order of the array axes the network sees.
``"xyz"``: index order (i, j, k), NIfTI's voxel order, in which nibabel and MONAI hold a volume
(after RAS: axis 0 toward Right, 1 toward Anterior, 2 toward Superior), as SuPreM's backbones
were trained. ``"zyx"``: SimpleITK's numpy order (k, j, i), the order of plans written before
the field existed (:data:`LEGACY_AXES`). Arrays are read in SimpleITK's (z, y, x) order; the
transform of :func:`orientation_transform` brings them to the plan's order in the same step.
"""
from __future__ import annotations

import nibabel as nib
import numpy as np

from suprem_net.errors import SupremError

AXES = ("xyz", "zyx")
LEGACY_AXES = "zyx"  # what a plan without an ``axes`` field means

# ITK world coordinates are LPS: +x = Left, +y = Posterior, +z = Superior
_LETTER = {"L": (0, 1), "R": (0, -1), "P": (1, 1), "A": (1, -1), "S": (2, 1), "I": (2, -1)}


def network_axes(plan: dict) -> str:
    """The axis order a plan feeds its network (``"xyz"`` or ``"zyx"``; see the module docstring)."""
    axes = plan.get("axes", LEGACY_AXES)
    if axes not in AXES:
        raise SupremError(f"plan {plan.get('plans_name', '')!r}: axes must be one of {', '.join(AXES)}, got {axes!r}")
    return axes


def index_axes_world(direction: tuple[float, ...]) -> tuple[list[int], list[int]]:
    """For each SimpleITK index axis (x, y, z): the LPS world axis it points along (0, 1, 2) and the
    sign (+1: toward L / P / S). Oblique directions go to the closest world axes as nibabel's
    ``io_orientation`` assigns them."""
    d = np.asarray(direction, dtype=float).reshape(3, 3)  # column c = world (LPS) direction of index axis c
    affine = np.eye(4)
    affine[:3, :3] = d * np.array([-1.0, -1.0, 1.0])[:, None]  # LPS -> RAS world, as NIfTI stores it
    ornt = nib.orientations.io_orientation(affine)  # per index axis: (RAS world axis, +1 toward R/A/S)
    world = [int(w) for w in ornt[:, 0]]
    sign = [int(s) * (-1 if w < 2 else 1) for w, s in zip(world, ornt[:, 1])]  # RAS sign -> LPS sign
    return world, sign


def orientation_transform(direction: tuple[float, ...], target: str | None, axes: str = LEGACY_AXES) -> dict | None:
    """Permutation and flips that bring a (z, y, x) array with ``direction`` to orientation ``target``
    (``None``: keep the index axes as they are) in axis order ``axes``.

    Returns ``{"perm": [...], "flip": [...]}`` for numpy axes: ``out = flip(transpose(a, perm))``, or
    ``None`` when there is nothing to do (no target, SimpleITK's order).
    """
    if axes not in AXES:
        raise ValueError(f"invalid axis order {axes!r}")
    if target is None and axes == LEGACY_AXES:
        return None
    if target is None:
        perm, flip = [0, 1, 2], [False, False, False]
    else:
        target = target.upper()
        if len(target) != 3 or any(c not in _LETTER for c in target) or \
                sorted(_LETTER[c][0] for c in target) != [0, 1, 2]:
            raise ValueError(f"invalid orientation {target!r}")
        world_of, sign_of = index_axes_world(direction)
        perm, flip = [], []
        # output numpy axis a corresponds to index axis 2 - a (numpy order is z, y, x)
        for out_axis in range(3):
            world, want_sign = _LETTER[target[2 - out_axis]]
            c = world_of.index(world)
            perm.append(2 - c)
            flip.append(sign_of[c] != want_sign)
    if axes == "xyz":
        perm, flip = perm[::-1], flip[::-1]
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
