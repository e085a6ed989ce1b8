"""How long a training step takes: what the planner asks of the machine it plans for.

The planner sizes CPU plans by time, not by a constant throughput: it hands each candidate
configuration (:class:`StepSpec`) to a *speed* and gets seconds per step back. Two speeds exist:

* a measured one (:class:`suprem_net.training.calibration.MeasuredSpeed`, what
  ``suprem_plan_and_preprocess`` uses): real training steps timed on the target device, cached
  per machine;
* :class:`AssumedSpeed` (``--cpu-gflops G``): the step's FLOPs divided by an assumed throughput,
  for planning on one machine for another, and for tests that must not depend on the machine.

Both write the plan's ``speed`` entry (docs/plans.md) through :meth:`record`.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Protocol

# forward only (a validation step) against forward + backward: about a third of the FLOPs
FORWARD_SHARE = 1 / 3


@dataclass(frozen=True)
class StepSpec:
    """One training step of a plan: the network, input channels, outputs, patch, batch, compute dtype,
    optimiser and loss, and its FLOPs (forward + backward, from the planner's memory model)."""

    network: str          # the plan's ``network`` entry as sorted JSON (hashable)
    in_channels: int
    num_classes: int
    patch: tuple[int, int, int]
    batch: int
    dtype: str
    optimizer: str
    loss: str | None
    flops: int

    @classmethod
    def of(cls, network: dict, in_channels: int, num_classes: int, patch, batch: int, *, dtype: str,
           optimizer: str, loss: str | None, flops: int) -> "StepSpec":
        return cls(json.dumps(network, sort_keys=True), int(in_channels), int(num_classes),
                   tuple(int(p) for p in patch), int(batch), dtype, optimizer, loss, int(flops))

    @classmethod
    def of_plan(cls, plan: dict, in_channels: int | None = None) -> "StepSpec":
        """The step a plan trains with (FLOPs from its ``memory`` entry, 0 when it has none)."""
        mem = plan.get("memory") or {}
        return cls.of(plan["network"], in_channels or len(plan["channel_names"]), plan["num_classes"],
                      plan["patch_size"], plan["batch_size"], dtype=mem.get("compute_dtype", "float32"),
                      optimizer=plan["training"]["optimizer"], loss=plan["training"].get("loss"),
                      flops=mem.get("flops_per_iteration", 0))

    @property
    def network_dict(self) -> dict:
        return json.loads(self.network)

    def key(self) -> str:
        """A digest of everything but the FLOPs (which follow from the rest)."""
        text = json.dumps([self.network, self.in_channels, self.num_classes, self.patch, self.batch, self.dtype,
                           self.optimizer, self.loss])
        return hashlib.sha256(text.encode()).hexdigest()[:16]


class Speed(Protocol):
    source: str

    def step_seconds(self, spec: StepSpec) -> float:
        """Seconds of one training step of ``spec`` (with the device's default levers)."""

    def record(self, spec: StepSpec, training: dict) -> dict:
        """The plan's ``speed`` entry for the chosen step and its training schedule."""


def expected_training_seconds(training: dict, step_s: float, val_step_s: float) -> float:
    """The wall time of a schedule: its time budget, else epochs x (training + validation iterations)."""
    if training.get("time_budget_s"):
        return float(training["time_budget_s"])
    per_epoch = training["iterations_per_epoch"] * step_s + training.get("num_val_iterations", 0) * val_step_s
    return float(training["epochs"] * per_epoch)


class AssumedSpeed:
    """A step takes its FLOPs / ``gflops`` seconds: planning for another machine (``--cpu-gflops``)."""

    source = "assumed"

    def __init__(self, gflops: float):
        self.gflops = float(gflops)

    def step_seconds(self, spec: StepSpec) -> float:
        return spec.flops / (self.gflops * 1e9)

    def record(self, spec: StepSpec, training: dict) -> dict:
        step = self.step_seconds(spec)
        return {"source": self.source, "machine": None, "config": spec.key(), "gflops": self.gflops,
                "step_seconds": round(step, 4), "eager_step_seconds": round(step, 4),
                "val_step_seconds": round(step * FORWARD_SHARE, 4),
                "expected_training_seconds": round(expected_training_seconds(training, step, step * FORWARD_SHARE), 1),
                "levers": None}


def format_duration(seconds: float) -> str:
    """``"4 h 12 min"``, ``"12 min 30 s"``, ``"45 s"``."""
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    if s >= 60:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s} s"
