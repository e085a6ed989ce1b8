"""Image reading and writing through SimpleITK (NIfTI, NRRD, MHA, ...).

Arrays are in SimpleITK/numpy order ``(z, y, x)``; ``Geometry.spacing`` is in the
same order. Origin and direction are kept exactly as SimpleITK reports them so that
outputs can be written back in the input's exact geometry.
"""
from __future__ import annotations

import errno
import os
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from suprem_net.errors import InputError
from suprem_net.io.atomic import atomic_path

IMAGE_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")


@dataclass(frozen=True)
class Geometry:
    """Where an image lies in space. ``shape`` and ``spacing`` are (z, y, x)."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]  # SimpleITK (x, y, z) world coordinates
    direction: tuple[float, ...]  # SimpleITK row-major 3x3

    @classmethod
    def from_sitk(cls, img: sitk.Image) -> "Geometry":
        return cls(
            shape=tuple(int(s) for s in img.GetSize()[::-1]),
            spacing=tuple(float(s) for s in img.GetSpacing()[::-1]),
            origin=tuple(float(o) for o in img.GetOrigin()),
            direction=tuple(float(d) for d in img.GetDirection()),
        )

    @classmethod
    def from_dict(cls, d: dict) -> "Geometry":
        return cls(tuple(d["shape"]), tuple(d["spacing"]), tuple(d["origin"]), tuple(d["direction"]))

    def to_dict(self) -> dict:
        return {k: list(v) for k, v in asdict(self).items()}

    def apply_to(self, img: sitk.Image) -> sitk.Image:
        img.SetSpacing(self.spacing[::-1])
        img.SetOrigin(self.origin)
        img.SetDirection(self.direction)
        return img

    def mismatch(self, other: "Geometry", tol: float = 1e-3) -> str | None:
        """Describe the first difference to ``other`` (None when they agree within ``tol``)."""
        if self.shape != other.shape:
            return f"size {list(self.shape[::-1])} vs {list(other.shape[::-1])}"
        for name in ("spacing", "origin", "direction"):
            a, b = np.asarray(getattr(self, name)), np.asarray(getattr(other, name))
            if not np.allclose(a, b, atol=tol, rtol=tol):
                return f"{name} {np.round(a[::-1] if name == 'spacing' else a, 4).tolist()} vs " \
                       f"{np.round(b[::-1] if name == 'spacing' else b, 4).tolist()}"
        return None


def check_3d(img: sitk.Image, path) -> None:
    if img.GetDimension() != 3:
        raise InputError(path, f"expected a 3D image, got {img.GetDimension()}D")
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(path, f"expected one value per voxel, got {img.GetNumberOfComponentsPerPixel()} (vector image)")
    if min(img.GetSize()) < 2:
        raise InputError(path, f"expected a 3D image, got size {list(img.GetSize())} (a 2D slice)")


def read_header(path: str | os.PathLike) -> tuple[Geometry, str]:
    """Geometry and pixel type without reading the voxels."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file not found")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        raise InputError(path, f"cannot read image header ({short_error(e)})") from None
    if reader.GetDimension() != 3:
        raise InputError(path, f"expected a 3D image, got {reader.GetDimension()}D")
    if reader.GetNumberOfComponents() != 1:
        raise InputError(path, f"expected one value per voxel, got {reader.GetNumberOfComponents()} (vector image)")
    size = reader.GetSize()
    if min(size) < 2:
        raise InputError(path, f"expected a 3D image, got size {list(size)} (a 2D slice)")
    _check_complete(path)
    geo = Geometry(
        shape=tuple(int(s) for s in size[::-1]),
        spacing=tuple(float(s) for s in reader.GetSpacing()[::-1]),
        origin=tuple(float(o) for o in reader.GetOrigin()),
        direction=tuple(float(d) for d in reader.GetDirection()),
    )
    return geo, sitk.GetPixelIDValueAsString(reader.GetPixelID())


def read_image(path: str | os.PathLike, dtype=np.float32) -> tuple[np.ndarray, Geometry]:
    """Read a 3D image as a ``(z, y, x)`` array of ``dtype`` plus its geometry."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file not found")
    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as e:
        raise InputError(path, f"cannot read image ({short_error(e)})") from None
    check_3d(img, path)
    _check_complete(path)
    arr = sitk.GetArrayViewFromImage(img)
    if dtype is not None and arr.dtype != dtype:
        arr = arr.astype(dtype)
    else:
        arr = np.array(arr)
    return arr, Geometry.from_sitk(img)


def write_image(path: str | os.PathLike, arr: np.ndarray, geometry: Geometry, *, compress: bool = True) -> None:
    """Write ``arr`` (z, y, x) with ``geometry``, atomically."""
    if tuple(arr.shape) != tuple(geometry.shape):
        raise ValueError(f"array shape {arr.shape} does not match geometry {geometry.shape}")
    img = geometry.apply_to(sitk.GetImageFromArray(arr))
    with atomic_path(path) as tmp:
        try:
            sitk.WriteImage(img, str(tmp), useCompression=compress)
            _check_complete(tmp, written=True)  # ITK's NIfTI writer does not report a short write (full disk)
        except (RuntimeError, InputError) as e:
            detail = e.problem if isinstance(e, InputError) else short_error(e)
            raise OSError(errno.EIO, f"write failed, is the disk full? ({detail})", str(path)) from None


def strip_ending(name: str) -> str:
    for end in IMAGE_ENDINGS:
        if name.endswith(end):
            return name[: -len(end)]
    return name


def _check_complete(path: Path, written: bool = False) -> None:
    """Refuse a truncated NIfTI file: ITK fills the missing voxels with zeros without an error.

    Cheap: the header gives the bytes the voxels need; an uncompressed file's size, or a gzip
    file's recorded length (its last 4 bytes), must cover them. Only when the recorded length
    disagrees is the stream decompressed to count (a multi-member gzip, or a cut stream).
    """
    if not path.name.endswith((".nii", ".nii.gz")):
        return
    import nibabel

    try:
        img = nibabel.load(str(path))
        need = int(img.dataobj.offset) + int(np.prod(img.shape)) * img.header.get_data_dtype().itemsize
    except Exception:  # noqa: BLE001 - ITK read the header; nibabel's opinion is not needed
        if written:  # a file we just wrote must be readable
            raise InputError(path, "unreadable header") from None
        return
    if path.name.endswith(".nii"):
        have = path.stat().st_size
    else:
        with open(path, "rb") as f:
            f.seek(-4, os.SEEK_END)
            if int.from_bytes(f.read(4), "little") == need % 2 ** 32:
                return
        have = _gunzipped_size(path)
        if have is None:
            raise InputError(path, "truncated or corrupt gzip stream (incomplete download or copy?)")
    if have < need:
        raise InputError(path, f"truncated file: {have} bytes, the header needs {need} "
                               "(incomplete download or copy?)")


def _gunzipped_size(path: Path) -> int | None:
    """Decompressed length of a (possibly multi-member) gzip file; None if the stream is cut or corrupt."""
    total, in_member = 0, False
    d = zlib.decompressobj(wbits=31)
    with open(path, "rb") as f:
        try:
            while chunk := f.read(1 << 20):
                while chunk:
                    total += len(d.decompress(chunk))
                    in_member = not d.eof
                    chunk = d.unused_data if d.eof else b""
                    if d.eof:
                        d = zlib.decompressobj(wbits=31)
        except zlib.error:
            return None
    return None if in_member else total


def short_error(e: Exception) -> str:
    """The informative last line of an ITK exception message."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    msg = lines[-1] if lines else type(e).__name__
    return msg[:200]


def has_nonfinite(path: str | os.PathLike, arr: np.ndarray) -> bool:
    """True if the file holds NaN or Inf voxels.

    ITK's NIfTI reader silently turns NaN/Inf into 0, so for floating-point NIfTI files the
    raw voxels are read again with nibabel to see them (integer files cannot hold them).
    """
    if not np.issubdtype(arr.dtype, np.floating):
        return False
    if not np.isfinite(arr).all():
        return True
    if str(path).endswith((".nii", ".nii.gz")):
        import nibabel

        return not np.isfinite(np.asanyarray(nibabel.load(str(path)).dataobj)).all()
    return False
