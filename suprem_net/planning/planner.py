"""From a fingerprint to a plan: spacing, normalisation, patch, batch, network, memory, speed.

The patch and batch are chosen so that one training step fits the memory budget, measured
from the network itself (:mod:`suprem_net.planning.memory`). For a CPU target the step must
also take at most ``cpu_seconds_per_iteration`` on the machine: each candidate is timed by a
*speed* (:mod:`suprem_net.planning.speed`; measured on this machine, or assumed with
``--cpu-gflops``), and the search corrects its throughput estimate with every measurement.

Field of view: when compute is short, a CPU plan trades resolution before context. If the patch
that fits the step budget covers less than :data:`MIN_FOV_SHARE` of the median image's volume, the
spacing is coarsened (the finer axes first, as nnU-Net's ``3d_lowres``) until it covers that share,
instead of shrinking the patch to a few centimetres. Predictions are still written at the input's
geometry (the export resamples back). Plans with a preset keep the preset's spacing: it is the input
distribution the backbone was pre-trained on.
"""
from __future__ import annotations

import copy
import logging
import os

import numpy as np

from suprem_net.errors import SupremError
from suprem_net.labels import LabelScheme
from suprem_net.networks import get_family
from suprem_net.networks.family import Family
from suprem_net.plan import OPTIMIZER_DEFAULTS
from suprem_net.planning.memory import measure_step
from suprem_net.planning.speed import AssumedSpeed, Speed, StepSpec, format_duration
from suprem_net.presets import load_preset
from suprem_net.planning.topology import nnunet_kwargs, pool_and_conv_props
from suprem_net.preprocessing.orientation import network_axes

log = logging.getLogger(__name__)

ANISOTROPY_THRESHOLD = 3.0
NNUNET_RECIPE = {"optimizer": "sgd", "lr": 1e-2, **OPTIMIZER_DEFAULTS["sgd"], "schedule": "poly", "poly_exponent": 0.9}
DEFAULT_GPU_MEMORY_GB = 8.0
DEFAULT_CPU_SECONDS_PER_ITERATION = 3.0
DEFAULT_CPU_GFLOPS = 60.0
DEFAULT_FAMILY = "nnunet"
GPU_INITIAL_VOLUME = 256 ** 3
CPU_INITIAL_VOLUME = 128 ** 3
MAX_DATASET_COVERED = 0.05
# CPU plans: the least share of the median image's volume a training patch covers (coarser spacing
# otherwise); nnU-Net's threshold for planning a 3d_lowres configuration. Evidence: docs/benchmarks.md,
# "Field of view on a short CPU budget" (benchmarks/fov_budget.py)
MIN_FOV_SHARE = 0.25
MAX_COARSENING_STEPS = 8
BISECTION_STEPS = 5  # the spacing found is within 2**(1/32) (2 %) of the finest that keeps the share
SPEED_TOLERANCE = 0.2   # a measured step within 20 % of the budget ends the search
MAX_SPEED_ROUNDS = 4


def fingerprint_in_axes(fp: dict, axes: str) -> dict:
    """``fp`` with every case's spacing and shapes in axis order ``axes`` (a fingerprint is in
    SimpleITK's (z, y, x) order)."""
    if axes == "zyx":
        return fp
    keys = ("spacing", "shape", "shape_after_crop")
    return {**fp, "cases": [{**c, **{k: list(c[k])[::-1] for k in keys if k in c}} for c in fp["cases"]]}


def target_spacing(fp: dict) -> list[float]:
    """Median spacing, with nnU-Net's rule for one much coarser axis (10th percentile)."""
    spacings = np.array([c["spacing"] for c in fp["cases"]], dtype=float)
    sizes = np.array([c["shape_after_crop"] for c in fp["cases"]], dtype=float)
    target = np.median(spacings, axis=0)
    median_size = np.median(sizes, axis=0)
    worst = int(np.argmax(target))
    others = [i for i in range(3) if i != worst]
    if target[worst] > ANISOTROPY_THRESHOLD * max(target[others]) and \
            median_size[worst] * ANISOTROPY_THRESHOLD < min(median_size[others]):
        target[worst] = max(np.percentile(spacings[:, worst], 10), max(target[others]) + 1e-5)
    return [float(t) for t in target]


def median_resampled_shape(fp: dict, spacing) -> list[int]:
    shapes = [np.array(c["shape_after_crop"]) * np.array(c["spacing"]) / np.array(spacing) for c in fp["cases"]]
    return [int(round(v)) for v in np.median(shapes, axis=0)]


def normalization(ds_spec: dict, fp: dict, preset: dict | None) -> list[dict]:
    out = []
    for c, name in sorted(ds_spec["channel_names"].items(), key=lambda kv: int(kv[0])):
        props = fp["foreground_intensity_properties_per_channel"][c]
        if name.lower() == "ct" and preset is not None:
            out.append(dict(preset["normalization"]))
        elif name.lower() == "ct":
            out.append({"scheme": "ct", "clip": [props["percentile_00_5"], props["percentile_99_5"]],
                        "mean": props["mean"], "std": props["std"]})
        else:
            out.append({"scheme": "zscore"})
    return out


def default_memory_budget(device: str, gpu_memory_gb: float | None) -> int:
    if device == "cuda":
        return int((gpu_memory_gb or DEFAULT_GPU_MEMORY_GB) * 0.9 * 1024 ** 3)
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(min(total * 0.5, 16 * 1024 ** 3))


def _training_defaults(family: Family, preset: dict | None, device: str) -> dict:
    """The recipe: the preset's, else the family's own, else nnU-Net's (SGD, poly)."""
    common = {"oversample_foreground": 0.33, "grad_clip": 12.0, "num_val_iterations": 20}
    if device == "cpu":
        common.update({"epochs": 100, "iterations_per_epoch": 50})
    else:
        common.update({"epochs": 1000, "iterations_per_epoch": 250})
    recipe = preset["training"] if preset is not None else family.training_defaults or NNUNET_RECIPE
    training = {**common, **recipe}
    if training["schedule"] == "warmup_cosine":
        training.setdefault("warmup_epochs", max(1, training["epochs"] // 50))
    return training


def _step_kwargs(training: dict, dtype: str, scheme: LabelScheme) -> dict:
    """What :func:`measure_step` needs of the training recipe: precision, optimiser state, loss."""
    return {"dtype": dtype, "optimizer_slots": 2 if training["optimizer"] == "adamw" else 1,
            "loss": training.get("loss", scheme.default_loss)}


def _label_resampling(scheme: LabelScheme) -> str:
    """Each class mask interpolated linearly, then the largest per voxel (label maps) or > 0.5 (bitmasks)."""
    return "linear_threshold" if scheme.multi_label else "linear_argmax"


def _fits(m: dict, budget: dict) -> float:
    """Factor (<= 1 means it fits) by which the step exceeds its budgets."""
    f = m["predicted_peak_bytes"] / budget["memory_bytes"]
    if budget.get("flops") is not None:
        f = max(f, m["flops_per_iteration"] / budget["flops"])
    return f


def _plan_nnunet_patch(family: Family, spacing, median_shape, in_ch, n_cls, budget, initial_volume, step: dict):
    aspect = 1.0 / np.asarray(spacing)
    patch = aspect * (initial_volume / np.prod(aspect)) ** (1 / 3)
    patch = np.minimum(np.round(patch), median_shape).astype(int)
    for _ in range(40):
        kw, padded = nnunet_kwargs(family, spacing, patch)
        network = {"family": family.name, "kwargs": kw, "deep_supervision": family.deep_supervision}
        m = measure_step(network, in_ch, n_cls, padded, 2, **step)
        excess = _fits(m, budget)
        if excess <= 1.0:
            return network, padded, m
        div = np.asarray(pool_and_conv_props(spacing, padded)[3])
        patch = np.asarray(padded).copy()
        if excess > 1.15:  # far off: rescale the whole patch, keeping its aspect, down to the divisors
            scaled = patch / excess ** (1 / 3)  # of the topology that the smaller patch itself gets
            div = np.asarray(pool_and_conv_props(spacing, np.maximum(1, np.round(scaled)).astype(int))[3])
            patch = np.maximum(div, np.floor(scaled / div) * div).astype(int)
        else:  # close: shrink the axis that covers most of the median image by its divisor
            axis = int(np.argmax(patch / np.asarray(median_shape)))
            patch[axis] = max(div[axis], patch[axis] - div[axis])
    raise SupremError("could not find a patch size that fits the budget; raise --gpu-memory-gb or "
                      "--cpu-seconds-per-iteration")


def _plan_fixed_patch(family: Family, kwargs, base_patch, median_shape, in_ch, n_cls, budget, step: dict):
    div = np.broadcast_to(np.asarray(family.divisor, dtype=int), (3,))  # one divisor, or one per axis
    minimum = np.broadcast_to(np.asarray(family.min_patch, dtype=int), (3,))
    patch = np.array(base_patch, dtype=int)
    network = {"family": family.name, "kwargs": kwargs, "deep_supervision": family.deep_supervision}
    while True:
        if family.patch_kwarg:  # a network built for one input size (UniMiSS)
            network["kwargs"] = {**kwargs, family.patch_kwarg: patch.tolist()}
        m = measure_step(network, in_ch, n_cls, patch.tolist(), 2, **step)
        if _fits(m, budget) <= 1.0:
            return network, patch.tolist(), m
        axis = int(np.argmax(patch / div))  # the axis with the most divisor steps left
        if patch[axis] - div[axis] < minimum[axis]:
            if m["predicted_peak_bytes"] <= budget["memory_bytes"]:  # compute is a soft budget: warn
                log.warning("the smallest %s patch (%s) needs %.0f GFLOP per step, over the CPU budget of %.0f; "
                            "expect slower iterations", family.name, patch.tolist(), m["flops_per_iteration"] / 1e9,
                            budget["flops"] / 1e9)
                return network, patch.tolist(), m
            raise SupremError(f"even a {patch.tolist()} patch of {family.name} does not fit the memory budget; "
                              "raise --gpu-memory-gb")
        patch[axis] -= div[axis]


def fov_share(patch, median_shape) -> float:
    """The share of the median image's volume that one patch covers (at most 1)."""
    patch, median = np.asarray(patch, dtype=float), np.asarray(median_shape, dtype=float)
    return float(np.prod(np.minimum(patch, median)) / np.prod(median))


def floored_spacing(spacing, floor: float) -> list[float]:
    """Every axis at least ``floor`` mm: the finest axes are coarsened first, up to isotropic voxels."""
    return [round(max(float(s), floor), 4) for s in spacing]


class _Search:
    """What the patch search needs besides the spacing: family, channels, budgets, step settings."""

    def __init__(self, family: Family, fp: dict, kwargs, base_patch, in_ch: int, n_cls: int, budget: dict,
                 initial_volume: int, step: dict, min_share: float = MIN_FOV_SHARE):
        self.family, self.fp, self.kwargs, self.base_patch = family, fp, kwargs, base_patch
        self.min_share = min_share
        self.in_ch, self.n_cls, self.budget, self.initial, self.step = in_ch, n_cls, budget, initial_volume, step

    def patch(self, spacing) -> tuple[list[int], dict, list[int], dict]:
        """(median shape, network, patch, measured step) at ``spacing``."""
        median_shape = median_resampled_shape(self.fp, spacing)
        if self.family.topology_kwargs is not None:
            net, patch, m = _plan_nnunet_patch(self.family, spacing, median_shape, self.in_ch, self.n_cls,
                                               self.budget, self.initial, self.step)
        else:
            net, patch, m = _plan_fixed_patch(self.family, self.kwargs, self.base_patch, median_shape, self.in_ch,
                                              self.n_cls, self.budget, self.step)
        return median_shape, net, patch, m

    def keeping_fov(self, spacing, coarsen: bool):
        """The patch at ``spacing``; with ``coarsen``, at the finest spacing (by raising the finest axes, see
        :func:`floored_spacing`) whose patch covers at least ``min_share`` of the median image."""
        found = self._at(spacing)
        if not coarsen or found[-1] >= self.min_share:
            return found
        lo, hi = min(spacing), min(spacing) * 2
        for _ in range(MAX_COARSENING_STEPS):  # an upper bound on the floor: double until the patch covers it
            found = self._at(floored_spacing(spacing, hi))
            if found[-1] >= self.min_share:
                break
            lo, hi = hi, hi * 2
        for _ in range(BISECTION_STEPS):  # then the finest floor that still covers it
            mid = (lo * hi) ** 0.5
            candidate = self._at(floored_spacing(spacing, mid))
            if candidate[-1] >= self.min_share:
                hi, found = mid, candidate
            else:
                lo = mid
        return found

    def _at(self, spacing):
        median_shape, net, patch, m = self.patch(spacing)
        return spacing, median_shape, net, patch, m, fov_share(patch, median_shape)


def make_plan(ds_spec: dict, fp: dict, *, plans_name: str, network: str | None = None, preset: str | None = None,
              device: str = "cpu", gpu_memory_gb: float | None = None,
              cpu_seconds_per_iteration: float = DEFAULT_CPU_SECONDS_PER_ITERATION,
              cpu_gflops: float | None = None, speed: Speed | None = None,
              time_budget_s: float | None = None, min_fov_share: float = MIN_FOV_SHARE) -> dict:
    """Build the plans dict (see docs/plans.md). ``speed`` times candidate steps (default, and with
    ``cpu_gflops``: :class:`AssumedSpeed` at ``cpu_gflops`` or :data:`DEFAULT_CPU_GFLOPS`);
    ``time_budget_s``: the plan's wall-clock training budget (``training.time_budget_s``);
    ``min_fov_share``: the field-of-view rule of CPU plans (0: keep the median spacing, the rule
    before it, which ``benchmarks/fov_budget.py`` compares with)."""
    pre = load_preset(preset) if preset else None
    family = get_family(network or (pre["network"]["family"] if pre else DEFAULT_FAMILY))
    fp = fingerprint_in_axes(fp, family.axes)
    if pre and family.name != pre["network"]["family"]:
        raise SupremError(f"--network {family.name} does not match preset {preset} ({pre['network']['family']})")
    if speed is None and device == "cpu":
        speed = AssumedSpeed(cpu_gflops or DEFAULT_CPU_GFLOPS)
    median_spacing = list(pre["target_spacing"]) if pre else target_spacing(fp)
    in_ch = len(ds_spec["channel_names"])
    scheme = LabelScheme.of(ds_spec)
    n_cls = scheme.num_outputs
    budget = {"memory_bytes": default_memory_budget(device, gpu_memory_gb)}
    training = _training_defaults(family, pre, device)
    if scheme.multi_label:
        training["loss"] = scheme.default_loss  # SuPreM's pre-training loss: sigmoid Dice + BCE
    if time_budget_s:
        training["time_budget_s"] = float(time_budget_s)
    dtype = "float32" if device == "cpu" else "bfloat16"
    step = _step_kwargs(training, dtype, scheme)
    search = _Search(family, fp, family.kwargs(pre["network"]["kwargs"] if pre else None) if
                     family.topology_kwargs is None else None, pre["patch_size"] if pre else [96, 96, 96], in_ch,
                     n_cls, budget, GPU_INITIAL_VOLUME if device == "cuda" else CPU_INITIAL_VOLUME, step,
                     min_fov_share)
    coarsen = device == "cpu" and pre is None and min_fov_share > 0
    if device == "cpu":
        spacing, median_shape, net, patch, m, share = _fit_cpu_time(search, median_spacing, coarsen, speed,
                                                                    cpu_seconds_per_iteration, training, dtype)
    else:
        spacing, median_shape, net, patch, m, share = search.keeping_fov(median_spacing, False)
    batch = 2
    if device == "cuda" and family.grows_batch:
        cap = max(2, int(MAX_DATASET_COVERED * np.prod(median_shape) * fp["num_cases"] / np.prod(patch)))
        while batch < cap:
            m_next = measure_step(net, in_ch, n_cls, patch, batch + 1, **step)
            if _fits(m_next, budget) > 1.0:
                break
            batch, m = batch + 1, m_next
    plan = {
        "plans_name": plans_name,
        "dataset_name": fp["dataset"],
        "preset": preset,
        "pretrained": pre.get("pretrained") if pre else None,
        "labels": ds_spec["labels"],
        "channel_names": ds_spec["channel_names"],
        "file_ending": ds_spec["file_ending"],
        "num_classes": n_cls,
        "data_identifier": plans_name,
        "orientation": pre["orientation"] if pre else None,
        "axes": family.axes,
        "target_spacing": spacing,
        "median_shape": median_shape,
        "normalization": normalization(ds_spec, fp, pre),
        "resampling": {"image": "cubic", "labels": _label_resampling(scheme),
                       "anisotropy_threshold": ANISOTROPY_THRESHOLD},
        "storage": {"dtype": "float16", "codec": "ZSTD", "clevel": 3},
        "patch_size": [int(p) for p in patch],
        "batch_size": int(batch),
        "network": net,
        "device": device,
        "memory": {"budget_bytes": budget["memory_bytes"], "compute_dtype": dtype,
                   "flops_budget": budget.get("flops"), **m},
        "field_of_view": {"patch_mm": [round(p * s, 1) for p, s in zip(patch, spacing)],
                          "median_image_mm": [round(n * s, 1) for n, s in zip(median_shape, spacing)],
                          "share": round(share, 4), "minimum_share": min_fov_share if coarsen else None,
                          "median_spacing": [round(float(v), 4) for v in median_spacing],
                          "coarsened": bool(not np.allclose(spacing, median_spacing))},
        "training": training,
        **scheme.encoding_fields(),
    }
    if speed is not None:
        spec = StepSpec.of(net, in_ch, n_cls, patch, batch, dtype=dtype, optimizer=training["optimizer"],
                           loss=training.get("loss"), flops=m["flops_per_iteration"])
        plan["speed"] = speed.record(spec, training)
    return plan


def _fit_cpu_time(search: _Search, median_spacing, coarsen: bool, speed: Speed, seconds: float, training: dict,
                  dtype: str):
    """The CPU plan whose measured step takes about ``seconds``: plan at an estimated throughput, time
    the step, correct the estimate with the measurement, and again until a step lands within
    :data:`SPEED_TOLERANCE` of the budget (or a configuration comes back). Returns the largest
    candidate that was not too slow, else the fastest."""
    gflops = speed.gflops if isinstance(speed, AssumedSpeed) else DEFAULT_CPU_GFLOPS  # the first estimate
    tried: dict[str, tuple[float, tuple, float]] = {}
    for _ in range(MAX_SPEED_ROUNDS):
        search.budget["flops"] = seconds * gflops * 1e9
        found = search.keeping_fov(median_spacing, coarsen)
        spacing, median_shape, net, patch, m, share = found
        spec = StepSpec.of(net, search.in_ch, search.n_cls, patch, 2, dtype=dtype, optimizer=training["optimizer"],
                           loss=training.get("loss"), flops=m["flops_per_iteration"])
        if spec.key() in tried:
            break
        t = speed.step_seconds(spec)
        tried[spec.key()] = (t, found, gflops)
        log.info("candidate: spacing %s, patch %s: %.2f s per step (%.0f GFLOP/s)", spacing, patch, t,
                 m["flops_per_iteration"] / t / 1e9)
        if abs(t / seconds - 1) <= SPEED_TOLERANCE:
            break
        gflops = m["flops_per_iteration"] / t / 1e9
    fitting = [r for r in tried.values() if r[0] <= seconds * (1 + SPEED_TOLERANCE)]
    if fitting:
        _, found, gflops = max(fitting, key=lambda r: r[1][4]["flops_per_iteration"])
    else:
        _, found, gflops = min(tried.values(), key=lambda r: r[0])
    search.budget["flops"] = seconds * gflops * 1e9  # the budget the chosen candidate was planned for
    return found


INHERITED_FROM_SOURCE = ("preset", "pretrained", "orientation", "target_spacing", "normalization", "resampling",
                         "storage", "patch_size", "batch_size", "network", "device", "training")


def plan_like(ds_spec: dict, fp: dict, source: dict, *, plans_name: str, source_path: str = "") -> dict:
    """A plan for this dataset that keeps ``source``'s input distribution and network: orientation,
    spacing, normalisation (the source's own CT statistics), resampling, patch, batch, architecture
    and training recipe. Only the labels (and so the output channels) are this dataset's. This is
    how a model pre-trained on one dataset is fine-tuned on another with the inputs it was trained on."""
    channels = ds_spec["channel_names"]  # the same number as the source's (the caller checks)
    scheme = LabelScheme.of(ds_spec)
    n_cls = scheme.num_outputs
    plan = {k: copy.deepcopy(source[k]) for k in INHERITED_FROM_SOURCE if k in source}
    plan["axes"] = network_axes(source)  # written out: a source from before the field keeps its order
    fp = fingerprint_in_axes(fp, plan["axes"])
    plan["training"].pop("loss", None)
    plan["resampling"]["labels"] = _label_resampling(scheme)
    if scheme.multi_label:
        plan["training"]["loss"] = scheme.default_loss
    budget = source["memory"]["budget_bytes"]
    m = measure_step(plan["network"], len(channels), n_cls, plan["patch_size"], plan["batch_size"],
                     **_step_kwargs(plan["training"], source["memory"]["compute_dtype"], scheme))
    if m["predicted_peak_bytes"] > budget:
        log.warning("the source plan's network needs %.1f GiB per step with this dataset's %d classes, over its "
                    "budget of %.1f GiB", m["predicted_peak_bytes"] / 2 ** 30, n_cls, budget / 2 ** 30)
    plan.update({
        "plans_name": plans_name,
        "dataset_name": fp["dataset"],
        "like": {"plans_name": source["plans_name"], "dataset_name": source["dataset_name"], "path": source_path},
        "labels": ds_spec["labels"],
        "channel_names": channels,
        "file_ending": ds_spec["file_ending"],
        "num_classes": n_cls,
        "data_identifier": plans_name,
        "median_shape": median_resampled_shape(fp, plan["target_spacing"]),
        "memory": {**source["memory"], **m},
        **scheme.encoding_fields(),
    })
    return plan


def summary(plan: dict) -> str:
    mem = plan["memory"]
    text = (f"plan {plan['plans_name']}: {plan['network']['family']} on {plan['device']}, spacing "
            f"{[round(s, 3) for s in plan['target_spacing']]}, patch {plan['patch_size']}, batch {plan['batch_size']}, "
            f"{mem['parameters'] / 1e6:.2f}M parameters, predicted peak {mem['predicted_peak_bytes'] / 2 ** 30:.2f} GiB, "
            f"{mem['flops_per_iteration'] / 1e9:.0f} GFLOP per iteration")
    fov = plan.get("field_of_view")
    if fov:
        text += (f"; the patch covers {100 * fov['share']:.0f} % of the median image "
                 f"({' x '.join(f'{v:.0f}' for v in fov['patch_mm'])} mm)")
        if fov.get("coarsened"):
            text += f", spacing coarsened from the median {[round(v, 3) for v in fov['median_spacing']]}"
    return text


def time_summary(plan: dict) -> str:
    """One line: the plan's expected training time and where its step time comes from."""
    sp, tr = plan.get("speed"), plan["training"]
    if not sp:
        return "expected training time: not measured (no device of this kind here)"
    if sp["source"] == "measured":
        m = sp["machine"]
        where = (f"measured on {m.get('gpu') or m['cpu']}" +
                 (f", {m['isa']}, {m['threads']} threads" if m["device"] == "cpu" else ""))
    else:
        where = f"assumed {sp['gflops']:g} GFLOP/s"
    step = f"{sp['step_seconds']:.2f} s per iteration ({where})"
    if tr.get("time_budget_s"):
        n = int(tr["time_budget_s"] / sp["step_seconds"])
        return f"training time budget {format_duration(tr['time_budget_s'])}: about {n} iterations at {step}"
    return (f"expected training time {format_duration(sp['expected_training_seconds'])}: {tr['epochs']} epochs x "
            f"{tr['iterations_per_epoch']} iterations at {step}; suprem_train --time-budget sets another")
