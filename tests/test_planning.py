"""Planner: target spacing rule, topology, measured memory model, budgets, presets."""
import numpy as np
import pytest

from suprem_net.errors import SupremError
from suprem_net.networks import get_family
from suprem_net.planning.memory import measure_step
from suprem_net.planning.planner import make_plan, target_spacing
from suprem_net.presets import load_preset, preset_names
from suprem_net.planning.topology import nnunet_kwargs, pool_and_conv_props
from suprem_net.synthetic import ct_fingerprint

SPEC = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1, "spleen": 2},
        "file_ending": ".nii.gz", "numTraining": 4}


def fingerprint(spacings, shapes):
    cases = [{"case_id": f"c{i}", "spacing": list(sp), "shape": list(sh), "shape_after_crop": list(sh)}
             for i, (sp, sh) in enumerate(zip(spacings, shapes))]
    return {"dataset": "Dataset999_T", "num_cases": len(cases), "cases": cases,
            "foreground_intensity_properties_per_channel": {
                "0": {"mean": 80.0, "std": 40.0, "percentile_00_5": -50.0, "percentile_99_5": 250.0}}}


def test_target_spacing_median_and_anisotropy_rule():
    iso = fingerprint([(1.0, 0.8, 0.8), (2.0, 0.8, 0.8), (3.0, 1.0, 1.0)], [(100, 200, 200)] * 3)
    assert target_spacing(iso) == [2.0, 0.8, 0.8]
    # z much coarser than in-plane and few slices: 10th percentile instead of the median
    aniso = fingerprint([(5.0, 0.7, 0.7), (6.0, 0.7, 0.7), (8.0, 0.7, 0.7), (9.0, 0.7, 0.7)], [(30, 400, 400)] * 4)
    t = target_spacing(aniso)
    assert t[0] == pytest.approx(np.percentile([5, 6, 8, 9], 10)) and t[1:] == [0.7, 0.7]


def test_topology_pools_fine_axes_first():
    strides, kernels, padded, div = pool_and_conv_props([4.0, 1.0, 1.0], [20, 160, 160])
    assert strides[1] == [1, 2, 2] and kernels[0] == [1, 3, 3]  # the coarse z axis is neither pooled nor convolved
    assert all(p % d == 0 for p, d in zip(padded, div))
    kw, _ = nnunet_kwargs(get_family("nnunet"), [1, 1, 1], [64, 64, 64])
    assert kw["features_per_stage"][:3] == [32, 64, 128] and max(kw["features_per_stage"]) <= 320


def test_memory_model_is_measured_and_scales():
    kw, patch = nnunet_kwargs(get_family("nnunet"), [1, 1, 1], [32, 32, 32])
    net = {"family": "nnunet", "kwargs": kw, "deep_supervision": True}
    m2 = measure_step(net, 1, 3, patch, 2)
    m4 = measure_step(net, 1, 3, patch, 4)
    assert m4["activation_bytes"] == pytest.approx(2 * m2["activation_bytes"], rel=0.01)
    assert m4["flops_per_iteration"] == pytest.approx(2 * m2["flops_per_iteration"], rel=0.01)
    assert m2["parameters"] == m4["parameters"] > 1e6
    # a first conv of 32 channels at full resolution alone saves 32 * voxels * batch * 4 bytes
    assert m2["activation_bytes"] > 32 * np.prod(patch) * 2 * 4
    # bf16 autocast: half the bytes per activation, plus the bf16 copies of the weights it keeps
    mb = measure_step(net, 1, 3, patch, 2, dtype="bfloat16")
    assert mb["activation_bytes"] == pytest.approx(m2["activation_bytes"] / 2 + 2 * m2["parameters"], rel=0.02)


# Peak GPU memory of one eager bf16-autocast training step (the plan's optimiser and loss, 14 classes),
# measured on an NVIDIA H200 with ``python -m benchmarks.cuda_check`` (2026-11-28):
# family, patch, batch, torch.cuda.max_memory_allocated
H200_PEAKS = [("nnunet", [64, 192, 192], 2, 6886865408), ("resenc", [48, 160, 160], 3, 7571692032),
              ("suprem_unet", [96, 96, 96], 2, 4377211392), ("suprem_swinunetr", [64, 96, 96], 2, 7154866176),
              ("suprem_segresnet", [96, 96, 96], 15, 19927887872)]


@pytest.mark.parametrize("name,patch,batch,measured", H200_PEAKS)
def test_mixed_precision_memory_model_matches_gpu_measurements(name, patch, batch, measured):
    """The model imitates autocast (fp32 group norms, bf16 convolutions) and counts the loss; it must not
    under-predict (a plan that does not fit the GPU) nor waste much of it. Before both, SegResNet's
    peak was 2.6x the prediction."""
    spacing = target_spacing(ct_fingerprint())  # the CT collection cuda_check plans for
    if name in ("nnunet", "resenc"):
        kw, padded = nnunet_kwargs(get_family(name), spacing, patch)
        assert padded == patch
        network, training = {"family": name, "kwargs": kw, "deep_supervision": True}, {"optimizer": "sgd"}
    else:
        pre = load_preset(name)
        network = {"family": pre["network"]["family"], "kwargs": pre["network"]["kwargs"], "deep_supervision": False}
        training = pre["training"]
    slots = 2 if training["optimizer"] == "adamw" else 1
    m = measure_step(network, 1, 14, patch, batch, dtype="bfloat16", optimizer_slots=slots, loss="dice_ce")
    assert 0.8 <= measured / m["predicted_peak_bytes"] <= 1.05


def test_cpu_plan_fits_both_budgets_and_gpu_plan_is_larger():
    fp = fingerprint([(3.0, 1.5, 1.5)] * 4, [(80, 160, 160)] * 4)
    cpu = make_plan(SPEC, fp, plans_name="p", device="cpu", cpu_seconds_per_iteration=1.0)
    m = cpu["memory"]
    assert m["flops_per_iteration"] <= m["flops_budget"] and m["predicted_peak_bytes"] <= m["budget_bytes"]
    gpu = make_plan(SPEC, fp, plans_name="p", device="cuda", gpu_memory_gb=8)
    assert np.prod(gpu["patch_size"]) > np.prod(cpu["patch_size"])
    assert gpu["memory"]["predicted_peak_bytes"] <= 8 * 0.9 * 2 ** 30
    assert cpu["normalization"][0] == {"scheme": "ct", "clip": [-50.0, 250.0], "mean": 80.0, "std": 40.0}
    assert cpu["training"]["optimizer"] == "sgd" and cpu["network"]["deep_supervision"] is True


def test_presets_are_complete_and_planned_faithfully():
    assert set(preset_names()) >= {"suprem_unet", "suprem_swinunetr", "suprem_segresnet"}
    for name in preset_names():  # SuPreM's pipeline (reference facts §5), not just the file's current values
        p = load_preset(name)
        assert p["orientation"] == "RAS" and p["target_spacing"] == [1.5, 1.5, 1.5]
        assert p["normalization"] == {"scheme": "window", "window": [-175, 250], "range": [0.0, 1.0]}
    fp = fingerprint([(2.0, 0.8, 0.8)] * 4, [(100, 300, 300)] * 4)
    plan = make_plan(SPEC, fp, plans_name="p", preset="suprem_unet", device="cuda", gpu_memory_gb=24)
    assert plan["patch_size"] == [96, 96, 96] and plan["orientation"] == "RAS"
    assert plan["network"]["family"] == "suprem_unet" and plan["pretrained"] == "suprem_unet"
    assert plan["training"]["optimizer"] == "adamw" and plan["training"]["lr"] == 1e-4
    small = make_plan(SPEC, fp, plans_name="p", preset="suprem_unet", device="cpu", cpu_seconds_per_iteration=1)
    assert all(s % 8 == 0 for s in small["patch_size"]) and small["patch_size"] != [96, 96, 96]


def test_bad_choices_are_user_errors():
    fp = fingerprint([(1.0, 1.0, 1.0)] * 4, [(64, 64, 64)] * 4)
    with pytest.raises(SupremError, match="unknown network family"):
        make_plan(SPEC, fp, plans_name="p", network="vit9000")
    with pytest.raises(SupremError, match="does not match preset"):
        make_plan(SPEC, fp, plans_name="p", network="nnunet", preset="suprem_unet")
    with pytest.raises(SupremError, match="unknown preset"):
        make_plan(SPEC, fp, plans_name="p", preset="nope")
