"""A preview PNG per case: axial, coronal and sagittal slices through the largest foreground,
the segmentation overlaid in colours, and a legend of class names.

The image is shown in the radiological convention: it is permuted/flipped to LPS index
order (x toward patient left, y toward posterior, z toward superior), so in the axial view
the patient's right is on the left and anterior at the top; coronal and sagittal views have
superior at the top. Pixels have their physical aspect ratio.
"""
from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np

from suprem_net.io.atomic import atomic_path
from suprem_net.io.image import Geometry
from suprem_net.preprocessing import orientation as ori

logger = logging.getLogger(__name__)


def _colours(n: int) -> np.ndarray:
    import matplotlib

    cmap = matplotlib.colormaps["tab20" if n > 10 else "tab10"]
    return np.array([cmap(i % cmap.N)[:3] for i in range(n)])


def _centre_slices(labels: np.ndarray) -> tuple[int, int, int]:
    """Per axis the slice index with the most foreground (centre of the volume if none)."""
    fg = labels > 0
    if not fg.any():
        return tuple(s // 2 for s in labels.shape)
    out = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        out.append(int(fg.sum(axis=other).argmax()))
    return tuple(out)


def write_preview(path: str | Path, image: np.ndarray, labels: np.ndarray, geometry: Geometry,
                  class_names: dict[int, str], window: tuple[float, float] | None = None,
                  title: str | None = None) -> None:
    """Write the preview PNG of ``image`` and ``labels`` (both (z, y, x) in ``geometry``)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    t = ori.orientation_transform(geometry.direction, "LPS")
    img = ori.reorient(image, t)
    lab = ori.reorient(labels, t)
    sz, sy, sx = ori.reorient_spacing(geometry.spacing, t)
    if window is None:
        window = tuple(np.percentile(img[:: max(1, img.shape[0] // 32)], [0.5, 99.5]).tolist())
    k = max(int(labels.max()) + 1, max(class_names) + 1 if class_names else 1)
    colours = _colours(k)
    cz, cy, cx = _centre_slices(lab)
    views = [
        ("axial", img[cz], lab[cz], sy / sx),
        ("coronal", img[:, cy][::-1], lab[:, cy][::-1], sz / sx),
        ("sagittal", img[:, :, cx][::-1], lab[:, :, cx][::-1], sz / sy),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(13, 5.2))
    for ax, (name, im, lb, aspect) in zip(axes, views):
        ax.imshow(im, cmap="gray", vmin=window[0], vmax=window[1], aspect=aspect, interpolation="nearest")
        rgba = np.zeros((*lb.shape, 4))
        rgba[..., :3] = colours[lb]
        rgba[..., 3] = np.where(lb > 0, 0.45, 0.0)
        ax.imshow(rgba, aspect=aspect, interpolation="nearest")
        ax.set_title(name)
        ax.axis("off")
    present = sorted(int(v) for v in np.unique(labels) if v > 0)
    handles = [Patch(color=colours[v], label=class_names.get(v, str(v))) for v in present]
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), frameon=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.08 if handles else 0, 1, 1))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(buf.getvalue())
