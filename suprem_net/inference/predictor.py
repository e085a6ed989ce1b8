"""The predictor: a plan plus one model per fold, applied to whole cases.

``Predictor.from_model_dir(RESULTS/DatasetXXX/<plans_name>)`` loads ``plans.json`` and
``fold_<F>/<checkpoint>`` (``{"network_weights": state_dict}``, loaded with
``weights_only=True``); ``Predictor.from_model(plan, model)`` wraps a model in memory (the
trainer's final validation); :func:`suprem_net.inference.bundle.load_bundle` gives the plan and the
onnxruntime networks of an exported bundle. Folds are ensembled by the mean of their logits, tile by
tile.

A case streams through: preprocess -> sliding window, which hands on finished slabs of logits along
the first axis -> revert to the original grid slab by slab (argmax per slab), so the logits of the
whole case never exist at once (see :mod:`~suprem_net.inference.sliding_window` and
:mod:`~suprem_net.inference.export`). On a CT, tiles that hold only air are left out
(``skip_air``; :mod:`suprem_net.preprocessing.body`).

CPU levers (see :mod:`suprem_net.networks.speed`; measured in docs/benchmarks.md): channels-last
memory with instance norms as group norms and the upsampling as matrix products for the families
that declare ``channels_last`` and for nnU-Net models (else nnU-Net models get
:class:`~suprem_net.inference.nnunet_compat.FastInstanceNorm`), freed memory of blocks up to
:data:`~suprem_net.networks.speed.PREDICTION_HEAP_LIMIT` kept for reuse, and on
request ``torch.compile``.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from suprem_net.device import resolve_device
from suprem_net.errors import SupremError
from suprem_net.inference.export import revert_logits
from suprem_net.inference.inputs import Case, read_case
from suprem_net.inference.multilabel import predict_multilabel
from suprem_net.inference.nnunet_compat import fast_instance_norms
from suprem_net.inference.postprocessing import keep_largest_component, read_lcc_classes
from suprem_net.inference.sliding_window import SlidingWindow
from suprem_net.plan import DEFAULT_MIRROR_AXES, load_plan
from suprem_net.io.checkpoint import load_checkpoint_file, strip_wrapper_prefixes
from suprem_net.io.image import Geometry
from suprem_net.labels import BITMASK, LabelScheme
from suprem_net.networks import FAMILY_NAMES, build_network, get_family
from suprem_net.networks.speed import (PREDICTION_FREE_HEAP, PREDICTION_HEAP_LIMIT, compiled, keep_freed_memory,
                                       return_free_memory, to_channels_last)
from suprem_net.preprocessing.case import preprocess_case
from suprem_net.timing import NO_TIMES, StageTimes

logger = logging.getLogger(__name__)

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def batch_independent(plan: dict) -> bool:
    """False for networks that normalise with the statistics of the batch (tiles go one by one)."""
    net = plan["network"]
    if net["family"] not in FAMILY_NAMES:  # a converted nnU-Net v2 model (instance norms)
        return True
    return get_family(net["family"]).batch_independent(net.get("kwargs", {}))


def cpu_tile_batch(patch_size: Sequence[int], tta: bool, n_mirror_axes: int = 3,
                   forward_batch: int = 8, voxel_budget: int = 1 << 21) -> int:
    """Tiles per forward on the CPU: oneDNN convolutions run faster per tile at a batch of ~8 than
    at 1 or 2 (docs/benchmarks.md), so small patches are grouped until tiles x mirrors reach
    ``forward_batch``, keeping at most ``voxel_budget`` input voxels per forward (large patches stay
    at 1)."""
    mirrors = 2 ** n_mirror_axes if tta else 1
    want = max(1, -(-forward_batch // mirrors))
    per_tile = int(np.prod(patch_size)) * mirrors
    return max(1, min(want, voxel_budget // max(per_tile, 1)))


def _without_deep_supervision(model: nn.Module) -> nn.Module:
    decoder = getattr(model, "decoder", None)
    if decoder is not None and hasattr(decoder, "deep_supervision"):
        decoder.deep_supervision = False  # dynamic-network-architectures: full resolution only
    return model


def _channels_last(plan: dict) -> bool:
    """Whether the plan's network runs channels-last on the CPU (the family says so; nnU-Net models do)."""
    family = plan["network"]["family"]
    return get_family(family).channels_last if family in FAMILY_NAMES else True


def prepare_for_inference(model: nn.Module, channels_last: bool, compile: bool = False) -> nn.Module:
    """The CPU levers for ``model`` (in place, parameters shared; returns the model to call)."""
    if channels_last:
        to_channels_last(model)
    else:
        fast_instance_norms(model)
    return compiled(model, "predicting") if compile else model


def load_state_dict(path: Path) -> dict:
    """The network weights of one of our fold checkpoints."""
    ckpt = load_checkpoint_file(path)
    if not isinstance(ckpt, dict) or "network_weights" not in ckpt:
        raise SupremError(f"{path}: not a suprem_net checkpoint (no 'network_weights')")
    return strip_wrapper_prefixes(ckpt["network_weights"])


def load_model_dir(model_dir: str | Path, folds: Sequence[str | int] = ("0",),
                   checkpoint: str = "checkpoint_final.pth") -> tuple[dict, list[nn.Module]]:
    """``(plan, one network per fold in eval mode)`` of a model folder (``plans.json``, ``fold_<F>/<checkpoint>``)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise SupremError(f"{model_dir}: model folder not found")
    plan = load_plan(model_dir / "plans.json")
    if not folds:
        raise SupremError(f"{model_dir}: no folds given")
    models = []
    for f in folds:
        fold_dir = model_dir / f"fold_{f}"
        if not fold_dir.is_dir():
            have = sorted(p.name for p in model_dir.glob("fold_*") if p.is_dir())
            raise SupremError(f"{fold_dir}: fold {f} not found (have: {', '.join(have) or 'none'})")
        net = build_network(plan["network"], len(plan["channel_names"]), plan["num_classes"])
        try:
            net.load_state_dict(load_state_dict(fold_dir / checkpoint))
        except RuntimeError as e:
            raise SupremError(f"{fold_dir / checkpoint}: weights do not fit the plan's network "
                              f"({str(e).splitlines()[0][:150]})") from None
        models.append(_without_deep_supervision(net).eval())
    logger.info("model %s: folds %s, %s", model_dir, ", ".join(str(f) for f in folds), checkpoint)
    return plan, models


def lcc_classes(model_dir: Path, plan: dict, lcc: bool | None) -> list[int]:
    """The classes whose largest component is kept: None = as the folder's ``postprocessing.json`` says."""
    if lcc is None:
        return read_lcc_classes(model_dir)
    return list(range(1, plan["num_classes"])) if lcc else []


class Predictor:
    """Sliding-window prediction of whole cases with one or more models (folds)."""

    def __init__(self, plan: dict, models: Sequence[nn.Module], *, device: str | torch.device = "auto",
                 tta: bool = True, step_size: float = 0.5, tile_batch_size: int | None = None,
                 precision: str = "auto", lcc_classes: Sequence[int] = (),
                 preprocess: Callable | None = None, skip_air: bool = True, channels_last: bool | None = None,
                 compile: bool = False, accumulation: torch.dtype | None = None,
                 times: StageTimes = NO_TIMES, progress: bool = False) -> None:
        self.plan = plan
        # preprocess(images, geometry, plan, times=, body=) -> (data, seg, props); nnU-Net models bring their own
        self.preprocess = preprocess or preprocess_case
        self.device = resolve_device(device)
        self.times = times
        self.skip_air = skip_air
        self.lcc_classes = list(lcc_classes)
        if precision == "auto":
            precision = "fp16" if self.device.type == "cuda" else "fp32"
        if precision not in PRECISIONS:
            raise SupremError(f"--precision {precision}: choose one of auto, {', '.join(PRECISIONS)}")
        exported = any(getattr(m, "exported", False) for m in models)
        if channels_last is None:
            channels_last = self.device.type == "cpu" and not exported and _channels_last(plan)
        # on the CPU freed blocks up to PREDICTION_HEAP_LIMIT are reused, and the heap's free pages go back
        # to the system after loading and after any forward that leaves more than PREDICTION_FREE_HEAP free
        own_heap = self.device.type == "cpu" and not exported
        if own_heap:
            keep_freed_memory(PREDICTION_HEAP_LIMIT)
        # models are put in eval mode only while predicting (a trainer's model keeps its state)
        self.models = [m if exported else m.to(self.device) for m in models]
        if not exported and (channels_last or compile or plan.get("source") == "nnunetv2"):
            self.models = [prepare_for_inference(m, channels_last, compile) for m in self.models]
        if own_heap:
            return_free_memory()  # the checkpoints' and the contiguous weights' copies
        independent = batch_independent(plan)
        if tile_batch_size is None:
            tile_batch_size = int(plan.get("batch_size", 1)) if independent else 1
            if independent and self.device.type == "cpu":
                tile_batch_size = max(tile_batch_size, cpu_tile_batch(plan["patch_size"], tta,
                                                                      len(plan.get("mirror_axes", DEFAULT_MIRROR_AXES))))
        elif not independent and tile_batch_size != 1:
            logger.warning("%s normalises with batch statistics: tiles go through one at a time",
                           plan["network"]["family"])
        self.window = SlidingWindow(plan["patch_size"], plan["num_classes"], step_size=step_size,
                                    tile_batch_size=tile_batch_size,
                                    mirror_axes=tuple(plan.get("mirror_axes", DEFAULT_MIRROR_AXES)) if tta else None,
                                    batch_independent=independent, device=self.device,
                                    autocast_dtype=PRECISIONS[precision], accumulation=accumulation,
                                    background=None if plan.get("label_encoding") == BITMASK else 0,
                                    memory_format=torch.channels_last_3d if channels_last else torch.contiguous_format,
                                    times=times, progress=progress,
                                    after_forward=partial(return_free_memory, PREDICTION_FREE_HEAP) if own_heap
                                    else None)

    # -- construction -------------------------------------------------------------------
    @classmethod
    def from_model_dir(cls, model_dir: str | Path, folds: Sequence[str | int] = ("0",),
                       checkpoint: str = "checkpoint_final.pth", lcc: bool | None = None, **options) -> "Predictor":
        """Load ``plans.json`` and ``fold_<F>/<checkpoint>`` for each fold of ``model_dir``; ``options``
        are those of the constructor.

        ``lcc``: None = follow the folder's ``postprocessing.json``; True = LCC on every class;
        False = none.
        """
        plan, models = load_model_dir(model_dir, folds, checkpoint)
        return cls(plan, models, lcc_classes=lcc_classes(Path(model_dir), plan, lcc), **options)

    @classmethod
    def from_model(cls, plan: dict, model: nn.Module, device: str = "auto", tta: bool = False,
                   step_size: float = 0.5, tile_batch_size: int | None = None) -> "Predictor":
        """Wrap a model already in memory (e.g. at the end of training); the model is left as it is
        (no CPU levers applied to it), and every tile is computed."""
        return cls(plan, [model], device=device, tta=tta, step_size=step_size, tile_batch_size=tile_batch_size,
                   channels_last=False, skip_air=False)

    # -- prediction ---------------------------------------------------------------------
    @property
    def class_names(self) -> dict[int, str]:
        return {int(v): k for k, v in self.plan["labels"].items()}

    def _eval(self) -> list[bool]:
        was_training = [m.training for m in self.models]
        for m in self.models:
            m.eval()
        return was_training

    def _restore(self, was_training: list[bool]) -> None:
        for m, t in zip(self.models, was_training):
            m.train(t)

    def _keep_tile(self, data: np.ndarray, props: dict | None):
        """Which tiles to compute: those that may hold body, when the case has a body mask."""
        body = props.get("body") if props and self.skip_air else None
        if body is None:
            return None
        grid = tuple(data.shape[1:])
        return lambda start, size: body.tile_has_body(start, size, grid)

    def logit_slabs(self, data: np.ndarray, props: dict | None = None):
        """The logits of a preprocessed case ``data`` (C, Z, Y, X) slab by slab along the first axis
        (see :meth:`SlidingWindow.slabs`): the mean over the folds, tiles without body left out."""
        was_training = self._eval()
        try:
            yield from self.window.slabs(self.models, data, self._keep_tile(data, props))
        finally:
            self._restore(was_training)
        if props is not None and self.window.tiles_run < self.window.tiles_total:
            logger.info("%d of %d tiles held only air and were left out", self.window.tiles_total -
                        self.window.tiles_run, self.window.tiles_total)

    def predict_logits(self, data: np.ndarray) -> torch.Tensor:
        """Logits (K, Z, Y, X) float32 on the CPU for a preprocessed case ``data`` (C, Z, Y, X): the mean
        over the folds, the whole volume at once, every tile computed."""
        was_training = self._eval()
        try:
            return self.window(self.models, data).float().cpu()
        finally:
            self._restore(was_training)

    def preprocessed(self, images: list[np.ndarray], geometry: Geometry) -> tuple[np.ndarray, dict]:
        """``(data, props)`` of a case, with the body mask when tiles of air may be left out."""
        data, _, props = self.preprocess(images, geometry, self.plan, times=self.times, body=self.skip_air)
        return data, props

    def predict_case(self, images: list[np.ndarray], geometry: Geometry, probabilities: bool = False,
                     release_images: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """Label map uint8 (Z, Y, X) in ``geometry`` (and float16 probabilities (K, Z, Y, X) if asked).
        ``release_images``: empty the list ``images`` once the case is preprocessed, so that the arrays
        (unless held elsewhere) are freed before the network runs."""
        if LabelScheme.of(self.plan).multi_label:  # the combined map of sigmoid > 0.5
            if probabilities:
                raise SupremError("--save-probabilities is not supported for multi-label models")
            return predict_multilabel(self, images, geometry)[0], None
        fwd = self.plan.get("transpose_forward")  # nnU-Net models: axes permuted before preprocessing
        transposed = fwd is not None and list(fwd) != list(range(len(fwd)))
        if transposed:
            images = [np.transpose(im, fwd) for im in images]
            geometry = Geometry(tuple(geometry.shape[a] for a in fwd), tuple(geometry.spacing[a] for a in fwd),
                                geometry.origin, geometry.direction)
        caller_images = images
        data, props = self.preprocessed(images, geometry)
        if release_images:  # the caller's list and this function's (transposed views of it)
            caller_images.clear()
            images = None
        labels, probs = revert_logits(self.logit_slabs(data, props), props, probabilities=probabilities,
                                      times=self.times)
        del data
        with self.times("revert"):
            if transposed:
                back = self.plan["transpose_backward"]
                labels = np.ascontiguousarray(np.transpose(labels, back))
                probs = np.ascontiguousarray(np.transpose(probs, [0] + [a + 1 for a in back])) \
                    if probs is not None else None
        if self.lcc_classes:
            with self.times("postprocess"):
                keep_largest_component(labels, self.lcc_classes)
        return labels, probs

    def predict_files(self, image_paths: Sequence[str | Path]) -> tuple[np.ndarray, Geometry]:
        """Predict one case given its channel files; returns (uint8 label map, geometry)."""
        paths = [Path(p) for p in image_paths]
        images, geo = read_case(Case(name=paths[0].name, files=paths))
        labels, _ = self.predict_case(images, geo)
        return labels, geo
