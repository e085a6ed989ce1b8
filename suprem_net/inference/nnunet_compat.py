"""Predict with a model trained by nnU-Net v2, without nnU-Net (see docs/nnunet_models.md).

An nnU-Net v2 results folder ``DatasetXXX/<Trainer>__<Plans>__<configuration>`` holds
``plans.json``, ``dataset.json`` and ``fold_<k>/checkpoint_final.pth``. This module turns it
into what :class:`suprem_net.inference.predictor.Predictor` needs:

* a suprem_net plan dict translated from nnU-Net's plan: ``target_spacing`` = the
  configuration's ``spacing`` (already in transposed axis order), ``transpose_forward`` /
  ``transpose_backward`` (the Predictor transposes the image before preprocessing and the
  prediction back after it), normalisation per channel from ``normalization_schemes`` and
  ``foreground_intensity_properties_per_channel`` (``CTNormalization`` -> ``{"scheme": "ct"}``
  with the foreground 0.5/99.5 percentiles, mean and std; ``ZScoreNormalization`` ->
  ``{"scheme": "zscore"}``), ``orientation`` None (nnU-Net keeps the array order as read),
  the separate-z anisotropy threshold 3, patch size, labels;
* the network from the plan's ``architecture`` (``network_class_name`` + ``arch_kwargs``,
  ``_kw_requires_import`` entries resolved by importing the named torch / dynamic-network-
  architectures classes only), deep supervision off;
* the fold weights from ``network_weights`` of each checkpoint, loaded with
  ``torch.load(weights_only=True)``; nnU-Net's checkpoints also pickle numpy scalars (in
  ``_best_ema`` and ``logging``), which the weights-only unpickler refuses by default: the
  numpy scalar reconstructor and dtypes are allowed for that one load (they only rebuild
  numbers; no code runs), never ``weights_only=False``;
* the mirroring axes the trainer allowed (``inference_allowed_mirroring_axes``).

For speed the predictor computes the instance norms as group norms (channels-last on the CPU) or
by one ``group_norm`` call over (1, B*C, ...) (:class:`FastInstanceNorm`, same arithmetic).

Not supported (a one-line :class:`SupremError`): 2D configurations, the cascade
(``previous_stage``), region-based training (sigmoid outputs), ZScore with
``use_mask_for_norm``, ``NoNormalization`` / ``RescaleTo01`` / ``RGBTo01`` channels, plans from
before nnU-Net 2.4 (no ``architecture`` entry).
"""
from __future__ import annotations

import importlib
import json
from concurrent.futures import ThreadPoolExecutor
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from suprem_net.errors import SupremError
from suprem_net.io.checkpoint import load_checkpoint_file, strip_wrapper_prefixes
from suprem_net.preprocessing.case import preprocess_case
from suprem_net.timing import NO_TIMES, StageTimes

logger = logging.getLogger(__name__)

# only classes from these packages may be named in a plans file
_IMPORTABLE = ("torch.nn.", "dynamic_network_architectures.")
_NORMS = {"ctnormalization": "ct", "zscorenormalization": "zscore"}
NNUNET_FAMILY = "nnunet_v2"  # plan["network"]["family"] of a converted model (built here, not by build_network)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise SupremError(f"{path}: not found (not an nnU-Net v2 results folder?)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SupremError(f"{path}: unreadable JSON ({e})") from None


def _locate(name: str):
    """Import ``package.module.Attr`` for the allowed packages only."""
    if not isinstance(name, str) or not name.startswith(_IMPORTABLE):
        raise SupremError(f"plans.json names {name!r}: only torch.nn and dynamic_network_architectures "
                          "classes are allowed")
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
            return obj
        except AttributeError:
            break
    raise SupremError(f"plans.json names {name!r}, which cannot be imported "
                      "(is dynamic-network-architectures up to date?)")


def configuration_of(model_dir: Path, plans: dict, configuration: str | None = None) -> tuple[str, dict]:
    """The configuration name (from ``Trainer__Plans__Config`` unless given) and its merged entry."""
    if configuration is None:
        parts = model_dir.name.split("__")
        if len(parts) != 3:
            raise SupremError(f"{model_dir}: expected a folder named <Trainer>__<Plans>__<configuration>")
        configuration = parts[2]
    configs = plans.get("configurations", {})
    if configuration not in configs:
        raise SupremError(f"{model_dir}: configuration {configuration!r} not in plans.json "
                          f"(have: {', '.join(configs)})")
    cfg, seen = dict(configs[configuration]), {configuration}
    while "inherits_from" in cfg:  # nnU-Net's PlansManager: the child overrides its parent
        parent = cfg.pop("inherits_from")
        if parent in seen or parent not in configs:
            raise SupremError(f"{model_dir}: configuration {configuration!r} inherits from unknown {parent!r}")
        seen.add(parent)
        cfg = {**configs[parent], **cfg}
    return configuration, cfg


def convert_plans(plans: dict, dataset: dict, cfg: dict, name: str = "3d_fullres") -> dict:
    """A suprem_net plan dict equivalent to nnU-Net's configuration ``cfg``."""
    if cfg.get("previous_stage"):
        raise SupremError(f"configuration {name}: cascade models (previous_stage) are not supported")
    patch = [int(p) for p in cfg["patch_size"]]
    if len(patch) != 3:
        raise SupremError(f"configuration {name}: only 3D configurations are supported (patch {patch})")
    if "architecture" not in cfg:
        raise SupremError(f"configuration {name}: plans from nnU-Net < 2.4 (no 'architecture') are not supported")
    labels = dataset["labels"]
    if any(isinstance(v, (list, tuple)) for v in labels.values()):
        raise SupremError("dataset.json: region-based models (label lists) are not supported")
    labels = {k: int(v) for k, v in labels.items() if k != "ignore"}
    values = sorted(labels.values())
    if values != list(range(len(values))):
        raise SupremError(f"dataset.json: labels must be 0..K-1, got {values}")
    channels = dataset.get("channel_names", dataset.get("modality"))
    if not channels:
        raise SupremError("dataset.json: no channel_names")
    schemes = cfg["normalization_schemes"]
    masks = cfg.get("use_mask_for_norm", [False] * len(schemes))
    props = plans.get("foreground_intensity_properties_per_channel", {})
    norm = []
    for c, (scheme, use_mask) in enumerate(zip(schemes, masks)):
        kind = _NORMS.get(str(scheme).casefold())
        if kind is None:
            raise SupremError(f"channel {c}: nnU-Net normalisation {scheme} is not supported")
        if kind == "ct":
            p = props.get(str(c))
            if p is None:
                raise SupremError(f"plans.json: no foreground_intensity_properties_per_channel for channel {c}")
            norm.append({"scheme": "ct", "clip": [float(p["percentile_00_5"]), float(p["percentile_99_5"])],
                         "mean": float(p["mean"]), "std": float(p["std"])})
        else:
            if use_mask:
                raise SupremError(f"channel {c}: ZScore normalisation inside the nonzero mask "
                                  "(use_mask_for_norm) is not supported")
            norm.append({"scheme": "zscore"})
    for key in ("resampling_fn_data_kwargs", "resampling_fn_probabilities_kwargs"):
        kw = cfg.get(key) or {}
        if kw.get("force_separate_z") is not None:
            raise SupremError(f"configuration {name}: {key} force_separate_z={kw['force_separate_z']} "
                              "is not supported (only automatic)")
    tf = [int(a) for a in plans.get("transpose_forward", [0, 1, 2])]
    tb = [int(a) for a in plans.get("transpose_backward", [0, 1, 2])]
    return {
        "source": "nnunetv2",
        "plans_name": plans.get("plans_name"),
        "configuration": name,
        "channel_names": {str(k): v for k, v in channels.items()},
        "labels": labels,
        "num_classes": len(labels),
        "orientation": None,
        "axes": "zyx",  # nnU-Net's own convention: SimpleITK's order, then its transpose_forward
        "transpose_forward": tf,
        "transpose_backward": tb,
        "target_spacing": [float(s) for s in cfg["spacing"]],
        "normalization": norm,
        "resampling": {"anisotropy_threshold": 3.0},
        "patch_size": patch,
        "batch_size": int(cfg.get("batch_size", 2)),
        "network": {"family": NNUNET_FAMILY, "class": cfg["architecture"]["network_class_name"],
                    "kwargs": cfg["architecture"]["arch_kwargs"],
                    "requires_import": cfg["architecture"].get("_kw_requires_import", []),
                    "deep_supervision": False},
    }


def build_nnunet_network(plan: dict) -> nn.Module:
    """The network of a converted plan (nnU-Net's ``get_network_from_plans``), deep supervision off."""
    net = plan["network"]
    kwargs = dict(net["kwargs"])
    for key in net.get("requires_import", []):
        if kwargs.get(key) is not None:
            kwargs[key] = _locate(kwargs[key])
    cls = _locate(net["class"])
    kwargs["deep_supervision"] = False
    try:
        return cls(input_channels=len(plan["channel_names"]), num_classes=plan["num_classes"], **kwargs)
    except TypeError as e:
        raise SupremError(f"{net['class']}: cannot build from the plan's arch_kwargs ({e})") from None


def _separate_z(current: Sequence[float], new: Sequence[float], threshold: float = 3.0) -> int | None:
    """nnU-Net's ``determine_do_sep_z_and_axis`` (automatic): current spacing first, then new."""
    for sp in (current, new):
        sp = np.asarray(sp, dtype=float)
        if sp.max() / sp.min() > threshold:
            axes = np.flatnonzero(sp.max() / sp == 1)
            return int(axes[0]) if len(axes) == 1 else None
    return None


def resample_like_nnunet(data: np.ndarray, new_shape: Sequence[int], axis: int | None, order: int = 3,
                         order_z: int = 0) -> np.ndarray:
    """nnU-Net's ``resample_data_or_seg`` for images: scikit-image ``resize`` (B-spline of
    ``order``, mode edge, no anti-aliasing) in float64, slice by slice in-plane when ``axis`` is
    the separate low-resolution axis (the slices on the predictor's threads, each computed exactly as
    alone), then ``map_coordinates(order=order_z)`` along it."""
    from scipy.ndimage import map_coordinates
    from skimage.transform import resize

    shape = np.array(data.shape[1:])
    new_shape = np.array([int(s) for s in new_shape])
    if np.all(shape == new_shape):
        return data.astype(np.float32, copy=False)
    out = np.zeros((data.shape[0], *new_shape), dtype=np.float32)
    for c in range(data.shape[0]):
        if axis is None:
            out[c] = resize(data[c].astype(float), new_shape, order, mode="edge", anti_aliasing=False)
            continue
        inplane = [int(new_shape[a]) for a in range(3) if a != axis]
        tmp = new_shape.copy()
        tmp[axis] = shape[axis]
        here = np.zeros(tmp)

        def one_slice(i: int, c: int = c) -> None:  # float64 one slice at a time: no float64 copy of the case
            sl = [slice(None)] * 3
            sl[axis] = i
            here[tuple(sl)] = resize(data[c][tuple(sl)].astype(float), inplane, order, mode="edge",
                                     anti_aliasing=False)

        # scipy.ndimage releases the GIL: the slices are resized in parallel, each exactly as alone
        with ThreadPoolExecutor(max(1, torch.get_num_threads())) as pool:
            list(pool.map(one_slice, range(shape[axis])))
        if shape[axis] == new_shape[axis]:
            out[c] = here
            continue
        grids = np.mgrid[tuple(slice(0, int(n)) for n in new_shape)].astype(float)
        for a in range(3):
            grids[a] = here.shape[a] / float(new_shape[a]) * (grids[a] + 0.5) - 0.5
        out[c] = map_coordinates(here, grids, order=order_z, mode="nearest")
    return out


def preprocess_nnunet(images: list[np.ndarray], geometry, plan: dict, seg: np.ndarray | None = None, *,
                      times: StageTimes = NO_TIMES, body: bool = False):
    """:func:`suprem_net.preprocessing.case.preprocess_case` with nnU-Net's image resampling.

    Crop and normalisation are ours (identical arithmetic); the resampling to the plan's
    spacing is nnU-Net's (:func:`resample_like_nnunet`, order 3, order 0 along a separate z),
    because our cubic convolution differs from the order-3 B-spline by up to ~1 standard
    deviation at sharp edges, which moves a few percent of a weakly trained model's surface
    voxels. ``props["separate_z_axis"]`` follows nnU-Net's export rule (target spacing first).
    """
    if seg is not None:
        raise ValueError("preprocess_nnunet is for inference (no segmentation)")
    spacing = [float(s) for s in geometry.spacing]
    target = [float(s) for s in plan["target_spacing"]]
    data, _, props = preprocess_case(images, geometry, {**plan, "target_spacing": spacing},  # crop + normalise
                                     times=times, body=body)
    with times("resample"):
        new_shape = [int(round(sp / t * s)) for sp, t, s in zip(spacing, target, data.shape[1:])]
        data = resample_like_nnunet(data, new_shape, _separate_z(spacing, target), order=3, order_z=0)
    props["shape_after_resample"] = new_shape
    props["separate_z_axis"] = _separate_z(target, spacing)
    return data, None, props


class FastInstanceNorm(nn.Module):
    """Inference-only drop-in for an affine ``InstanceNorm{2,3}d`` without running statistics:
    one ``group_norm`` over (1, B*C, ...) with a group per (sample, channel), which is the same
    arithmetic (per sample and channel mean / biased variance, eps, affine) and about twice
    as fast as ``instance_norm``'s batch-norm route on the CPU (max difference ~1e-6)."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.weight, self.bias, self.eps = norm.weight, norm.bias, float(norm.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        y = torch.nn.functional.group_norm(x.reshape(1, b * c, *x.shape[2:]), b * c, self.weight.repeat(b),
                                           self.bias.repeat(b), self.eps)
        return y.view_as(x)


def fast_instance_norms(model: nn.Module) -> int:
    """Swap affine, statistics-free instance norms for :class:`FastInstanceNorm` (after loading
    the weights: the parameters are shared, so ``state_dict`` keys are unchanged)."""
    n = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if (isinstance(child, (nn.InstanceNorm3d, nn.InstanceNorm2d)) and child.affine
                    and not child.track_running_stats):
                setattr(module, name, FastInstanceNorm(child))
                n += 1
    return n


def _numpy_scalar_globals() -> list:
    """What numpy scalars pickle to: the scalar reconstructor and the dtype classes."""
    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import scalar  # type: ignore[no-redef]
    out: list = [scalar, np.dtype]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        out += [getattr(dtypes, n) for n in ("Float64DType", "Float32DType", "Float16DType", "Int64DType",
                                             "Int32DType", "BoolDType") if hasattr(dtypes, n)]
    return out


def load_nnunet_checkpoint(path: Path) -> tuple[dict, tuple[int, ...] | None]:
    """``(state_dict, inference_allowed_mirroring_axes)`` of an nnU-Net v2 checkpoint."""
    ckpt = load_checkpoint_file(path, _numpy_scalar_globals())
    if not isinstance(ckpt, dict) or "network_weights" not in ckpt:
        raise SupremError(f"{path}: not an nnU-Net checkpoint (no 'network_weights')")
    state = strip_wrapper_prefixes(ckpt["network_weights"])
    axes = ckpt.get("inference_allowed_mirroring_axes")
    return state, (tuple(int(a) for a in axes) if axes is not None else None)


def load_nnunet_model(model_dir: str | Path, folds: Sequence[str | int] = ("0",),
                      checkpoint: str = "checkpoint_final.pth",
                      configuration: str | None = None) -> tuple[dict, list[nn.Module], tuple[int, ...] | None]:
    """``(plan, models in eval mode, mirroring axes)`` for an nnU-Net v2 results folder."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise SupremError(f"{model_dir}: nnU-Net model folder not found")
    plans = _read_json(model_dir / "plans.json")
    dataset = _read_json(model_dir / "dataset.json")
    name, cfg = configuration_of(model_dir, plans, configuration)
    plan = convert_plans(plans, dataset, cfg, name)
    if not folds:
        raise SupremError(f"{model_dir}: no folds given")
    models, mirror_axes = [], None
    for f in folds:
        fold_dir = model_dir / f"fold_{f}"
        if not fold_dir.is_dir():
            have = sorted(p.name for p in model_dir.glob("fold_*") if p.is_dir())
            raise SupremError(f"{fold_dir}: fold {f} not found (have: {', '.join(have) or 'none'})")
        state, axes = load_nnunet_checkpoint(fold_dir / checkpoint)
        net = build_nnunet_network(plan)
        try:
            net.load_state_dict(state)
        except RuntimeError as e:
            raise SupremError(f"{fold_dir / checkpoint}: weights do not fit the plan's network "
                              f"({str(e).splitlines()[0][:150]})") from None
        models.append(net.eval())
        mirror_axes = axes if mirror_axes is None else tuple(a for a in mirror_axes if a in (axes or ()))
    plan["mirror_axes"] = list(mirror_axes) if mirror_axes is not None else [0, 1, 2]
    logger.info("nnU-Net model %s (%s): folds %s, %s, mirroring axes %s", model_dir, name,
                ", ".join(str(f) for f in folds), checkpoint, plan["mirror_axes"])
    return plan, models, mirror_axes
