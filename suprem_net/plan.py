"""The plans file: its fields, their types, ranges and defaults, and the one way to read it.

:func:`load_plan` reads a plan written by the planner or edited by hand (docs/plans.md invites
that) and checks every field it knows, so that a misspelt key or a wrong type is a one-line error
naming the key and the file instead of a silently ignored edit. Plans of earlier versions stay
valid: fields added since then are optional, with the defaults below (the one place each default
of a plan lives).
"""
from __future__ import annotations

import difflib
import os
from collections.abc import Callable
from pathlib import Path

from suprem_net.errors import InputError
from suprem_net.io.atomic import read_json
from suprem_net.losses import LOSSES

DEFAULT_PLANS_NAME = "suprem_plans"
DEFAULT_MIRROR_AXES = (0, 1, 2)  # test-time mirroring of a plan that does not say otherwise
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("poly", "warmup_cosine", "constant")
# optimiser settings a plan's training entry may leave out
OPTIMIZER_DEFAULTS = {"sgd": {"momentum": 0.99, "nesterov": True, "weight_decay": 3e-5},
                      "adamw": {"weight_decay": 1e-5}}


def _number(lo: float | None = None, hi: float | None = None, strict_lo: bool = False) -> Callable:
    def check(v) -> str | None:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return f"must be a number, got {type(v).__name__}"
        if lo is not None and (v <= lo if strict_lo else v < lo):
            return f"must be {'>' if strict_lo else '>='} {lo}, got {v}"
        if hi is not None and v > hi:
            return f"must be <= {hi}, got {v}"
        return None
    return check


def _optional(check: Callable) -> Callable:
    return lambda v: None if v is None else check(v)


def _integer(lo: int) -> Callable:
    def check(v) -> str | None:
        if isinstance(v, bool) or not isinstance(v, int):
            return f"must be an integer, got {type(v).__name__}"
        return None if v >= lo else f"must be >= {lo}, got {v}"
    return check


def _of_type(*types: type) -> Callable:
    names = " or ".join("null" if t is type(None) else t.__name__ for t in types)

    def check(v) -> str | None:
        return None if isinstance(v, types) and not (isinstance(v, bool) and bool not in types) else \
            f"must be {names}, got {type(v).__name__}"
    return check


def _one_of(*choices) -> Callable:
    def check(v) -> str | None:
        return None if v in choices else f"must be one of {', '.join(map(str, choices))}, got {v!r}"
    return check


def _triple(element: Callable) -> Callable:
    def check(v) -> str | None:
        if not isinstance(v, list) or len(v) != 3:
            return f"must be a list of 3 values, got {v!r}"
        return next((f"[{i}] {p}" for i, x in enumerate(v) if (p := element(x))), None)
    return check


def _axes_list(v) -> str | None:
    if not isinstance(v, list) or any(isinstance(a, bool) or a not in (0, 1, 2) for a in v):
        return f"must be a list of axes 0, 1, 2, got {v!r}"
    return None


# top-level fields: name -> (check, required)
FIELDS: dict[str, tuple[Callable, bool]] = {
    "plans_name": (_of_type(str), True),
    "dataset_name": (_of_type(str), True),
    "preset": (_of_type(str, type(None)), False),
    "pretrained": (_of_type(str, type(None)), False),
    "like": (_of_type(dict), False),
    "labels": (_of_type(dict), True),
    "channel_names": (_of_type(dict), True),
    "file_ending": (_of_type(str), True),
    "num_classes": (_integer(1), True),
    "label_encoding": (_one_of("label_map", "bitmask"), False),
    "data_identifier": (_of_type(str), True),
    "orientation": (_of_type(str, type(None)), False),
    "axes": (_one_of("xyz", "zyx"), False),
    "target_spacing": (_triple(_number(0, strict_lo=True)), True),
    "median_shape": (_triple(_integer(1)), False),
    "normalization": (_of_type(list), True),
    "resampling": (_of_type(dict), True),
    "storage": (_of_type(dict), True),
    "patch_size": (_triple(_integer(1)), True),
    "batch_size": (_integer(1), True),
    "network": (_of_type(dict), True),
    "device": (_one_of("cpu", "cuda"), False),
    "memory": (_of_type(dict), False),
    "field_of_view": (_of_type(dict), False),
    "speed": (_of_type(dict), False),
    "training": (_of_type(dict), True),
    "mirror_axes": (_axes_list, False),
}
TRAINING_FIELDS: dict[str, Callable] = {
    "optimizer": _one_of(*OPTIMIZERS),
    "lr": _number(0, strict_lo=True),
    "momentum": _number(0, 1),
    "nesterov": _of_type(bool),
    "weight_decay": _number(0),
    "schedule": _one_of(*SCHEDULES),
    "poly_exponent": _number(0, strict_lo=True),
    "warmup_epochs": _integer(0),
    "loss": _one_of(*LOSSES),
    "epochs": _integer(1),
    "iterations_per_epoch": _integer(1),
    "num_val_iterations": _integer(1),
    "oversample_foreground": _number(0, 1),
    "grad_clip": _number(0),
    "time_budget_s": _optional(_number(0, strict_lo=True)),
}


def _unknown(key: str, known) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    return f"unknown key {key!r}" + (f" (did you mean {close[0]!r}?)" if close else "")


def plan_problem(plan) -> str | None:
    """Why ``plan`` is not a valid plan (the first problem, naming the key), or ``None``."""
    if not isinstance(plan, dict):
        return f"a plan must be a JSON object, got {type(plan).__name__}"
    for key in plan:
        if key not in FIELDS:
            return _unknown(key, FIELDS)
    for key, (check, required) in FIELDS.items():
        if key not in plan:
            if required:
                return f"missing key {key!r}"
            continue
        problem = check(plan[key])
        if problem:
            return f"{key} {problem}"
    for key, value in plan["training"].items():
        if key not in TRAINING_FIELDS:
            return "training: " + _unknown(key, TRAINING_FIELDS)
        problem = TRAINING_FIELDS[key](value)
        if problem:
            return f"training.{key} {problem}"
    for key in ("optimizer", "lr", "schedule", "epochs", "iterations_per_epoch"):
        if key not in plan["training"]:
            return f"missing key 'training.{key}'"
    if "family" not in plan["network"]:
        return "missing key 'network.family'"
    return None


def load_plan(path: str | os.PathLike) -> dict:
    """Read and check a plan; a problem is an :class:`InputError` naming the file and the key."""
    plan = read_json(path)
    problem = plan_problem(plan)
    if problem:
        raise InputError(Path(path), problem)
    return plan


def optimizer_settings(training: dict) -> dict:
    """The plan's training entry with the optimiser settings it leaves out filled in."""
    return {**OPTIMIZER_DEFAULTS[training["optimizer"]], **training}
