"""Planning for the machine: real steps timed and cached per machine, levers switched off where they lose,
the field of view kept on a slow device by coarser spacing, and the search that corrects its throughput."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from suprem_net.device import describe_machine
from suprem_net.planning import planner
from suprem_net.planning.planner import MIN_FOV_SHARE, fov_share, make_plan, median_resampled_shape, target_spacing
from suprem_net.planning.speed import AssumedSpeed, StepSpec
from suprem_net.training import calibration
from suprem_net.training.calibration import CompileTrial, MeasuredSpeed, compile_pays
from tests.helpers import tiny_net

SPEC = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1, "spleen": 2},
        "file_ending": ".nii.gz", "numTraining": 4}


def fingerprint(spacing, shape, n=4):
    cases = [{"case_id": f"c{i}", "spacing": list(spacing), "shape": list(shape), "shape_after_crop": list(shape)}
             for i in range(n)]
    return {"dataset": "Dataset999_T", "num_cases": n, "cases": cases,
            "foreground_intensity_properties_per_channel": {
                "0": {"mean": 80.0, "std": 40.0, "percentile_00_5": -50.0, "percentile_99_5": 250.0}}}


class SimulatedDevice:
    """A device whose steps take FLOPs / ``gflops`` (a measured speed without the measuring)."""

    source = "measured"

    def __init__(self, gflops: float):
        self.gflops, self.timed = gflops, []

    def step_seconds(self, spec: StepSpec) -> float:
        self.timed.append(spec.patch)
        return spec.flops / (self.gflops * 1e9)

    def record(self, spec: StepSpec, training: dict) -> dict:
        return {"source": "measured", "step_seconds": self.step_seconds(spec)}


def tiny_spec(**kw) -> StepSpec:
    return StepSpec.of(tiny_net(), 1, 3, (16, 16, 16), 2, dtype="float32", optimizer="sgd", loss=None, flops=10 ** 8,
                       **kw)


def test_a_slow_device_gets_coarser_spacing_before_a_patch_below_the_minimum_share():
    # 2 mm slices, 0.85 mm in-plane, 100 x 300 x 300 voxels: the synthetic abdomen
    fp = fingerprint((2.0, 0.85, 0.85), (100, 300, 300))
    median = target_spacing(planner.fingerprint_in_axes(fp, "xyz"))
    slow = make_plan(SPEC, fp, plans_name="p", device="cpu", speed=SimulatedDevice(20), cpu_seconds_per_iteration=3)
    fov = slow["field_of_view"]
    assert slow["target_spacing"] != median and fov["coarsened"] and fov["median_spacing"] == median
    assert fov["share"] >= MIN_FOV_SHARE and fov["minimum_share"] == MIN_FOV_SHARE
    assert fov_share(slow["patch_size"], slow["median_shape"]) == pytest.approx(fov["share"], abs=1e-4)
    assert slow["median_shape"] == median_resampled_shape(planner.fingerprint_in_axes(fp, "xyz"),
                                                          slow["target_spacing"])
    # the finest axes were coarsened first, and never beyond what the share needs (about one bisection step)
    assert min(slow["target_spacing"]) == max(slow["target_spacing"]) or slow["target_spacing"][2] == 2.0
    finer = planner.floored_spacing(median, min(slow["target_spacing"]) / 1.05)
    search = _search_like(slow, fp)
    assert search._at(finer)[-1] < MIN_FOV_SHARE
    # at the median spacing the same step budget covers less than the minimum (what the old rule kept)
    assert search._at(median)[-1] < MIN_FOV_SHARE
    # a device fast enough for the largest CPU patch keeps the median spacing
    small = fingerprint((2.0, 0.85, 0.85), (80, 200, 200))
    fastest = make_plan(SPEC, small, plans_name="p", device="cpu", speed=SimulatedDevice(5000),
                        cpu_seconds_per_iteration=3)
    assert fastest["target_spacing"] == [0.85, 0.85, 2.0] and not fastest["field_of_view"]["coarsened"]
    # a preset keeps its spacing (the backbone's input distribution) whatever the device
    pre = make_plan(SPEC, fp, plans_name="p", preset="suprem_unet", device="cpu", speed=AssumedSpeed(60),
                    cpu_seconds_per_iteration=1)
    assert pre["target_spacing"] == [1.5, 1.5, 1.5] and pre["field_of_view"]["minimum_share"] is None


def _search_like(plan, fp):
    family = planner.get_family("nnunet")
    step = {"dtype": "float32", "optimizer_slots": 1, "loss": "dice_ce"}
    budget = {"memory_bytes": plan["memory"]["budget_bytes"], "flops": plan["memory"]["flops_budget"]}
    return planner._Search(family, planner.fingerprint_in_axes(fp, "xyz"), None, None, 1, 3, budget,
                           planner.CPU_INITIAL_VOLUME, step)


def test_the_search_corrects_its_throughput_with_each_measured_step():
    fp = fingerprint((3.0, 1.5, 1.5), (120, 240, 240))
    device = SimulatedDevice(200)  # 3.3x the first estimate
    plan = make_plan(SPEC, fp, plans_name="p", device="cpu", speed=device, cpu_seconds_per_iteration=2)
    assumed = make_plan(SPEC, fp, plans_name="p", device="cpu", speed=AssumedSpeed(60), cpu_seconds_per_iteration=2)
    assert len(device.timed) >= 2 and np.prod(plan["patch_size"]) > np.prod(assumed["patch_size"])
    assert plan["memory"]["flops_per_iteration"] / 200e9 <= 2 * (1 + planner.SPEED_TOLERANCE)
    assert plan["speed"]["source"] == "measured"
    assert assumed["speed"]["source"] == "assumed" and assumed["speed"]["gflops"] == 60


def test_measured_steps_are_real_and_cached_per_machine(tmp_path, monkeypatch):
    speed = MeasuredSpeed("cpu", cache=tmp_path)
    spec = tiny_spec()
    t = speed.step_seconds(spec)
    record = speed.record(spec, {"epochs": 2, "iterations_per_epoch": 3, "num_val_iterations": 1})
    machine = describe_machine(torch.device("cpu"))
    assert t > 0 and record["machine"] == machine and machine["isa"] == torch.backends.cpu.get_cpu_capability()
    assert set(record["levers"]) == {"channels_last", "upsampling_as_matmul", "keep_freed_memory", "threads",
                                     "compile"}
    assert record["levers"]["compile"] is None and not record["compile"]["measured"]  # a short run: not tried
    assert record["expected_training_seconds"] == pytest.approx(
        2 * (3 * record["step_seconds"] + record["val_step_seconds"]), abs=0.06)
    cached = json.loads((tmp_path / f"{machine['key']}.json").read_text())
    assert cached["machine"] == machine and len(cached["entries"]) == 2

    def no_more_timing(*a, **k):
        raise AssertionError("measured again")

    monkeypatch.setattr(calibration, "_Bench", no_more_timing)
    again = MeasuredSpeed("cpu", cache=tmp_path)
    assert again.step_seconds(spec) == t and again.record(spec, {"epochs": 2, "iterations_per_epoch": 3,
                                                                 "num_val_iterations": 1}) == record


def test_a_lever_that_loses_here_is_switched_off(tmp_path, monkeypatch):
    """A simulated machine on which channels-last steps are 30 % slower and kept memory 10 % faster."""
    def simulated_step(self, clock):
        return 1.0 * (1.3 if self.levers.get("channels_last") else 1.0) * \
            (0.9 if self.levers.get("keep_freed_memory") else 1.0)

    monkeypatch.setattr(calibration._Bench, "step", simulated_step)
    monkeypatch.setattr(calibration._Bench, "forward", lambda self, clock: 0.3)
    kept_before = calibration.speed.freed_memory_is_kept()
    result = MeasuredSpeed("cpu", cache=tmp_path).levers(tiny_spec())
    levers = result["levers"]
    assert levers["channels_last"] is False and levers["upsampling_as_matmul"] is False
    assert levers["keep_freed_memory"] is True and result["chosen_step_seconds"] == pytest.approx(0.9)
    assert result["step_seconds"]["channels_last"] == pytest.approx(1.17)  # measured, then switched off
    assert calibration.speed.freed_memory_is_kept() is kept_before  # the process is left as it was


def test_compile_is_measured_inside_a_run_and_kept_only_where_it_pays():
    trial = CompileTrial()
    times = [40.0, 1.0, 0.8, 1.0, 0.8, 1.0, 0.8]  # compiled (compiling), eager, compiled, ...
    assert [trial.compiled_next() for _ in range(1)] == [True]
    results = []
    for t in times:
        results.append(trial.add(t))
    assert results[:-1] == [None] * 6
    r = results[-1]
    assert r["ratio"] == pytest.approx(0.8) and r["compile_seconds"] == pytest.approx(39.2)
    assert not compile_pays(r, 60.0)       # 12 s saved over a minute: less than the compilation
    assert compile_pays(r, 3600.0)         # 12 minutes saved over an hour
    assert not compile_pays({**r, "ratio": 1.05}, 36000.0)
