"""Fine-tuning from a model we pre-trained ourselves: plan the target like the source
(`suprem_plan_and_preprocess --like`), then hand over the backbone and the head channels by class name."""
from __future__ import annotations

import json

import pytest
import torch

from suprem_net.cli.plan_and_preprocess import main as plan_main
from suprem_net.networks import build_network
from suprem_net.synthetic import write_raw_dataset
from suprem_net.training.trainer import input_differences
from suprem_net.weights import load_pretrained
from tests.helpers import tiny_net, tiny_spec, user_error, write_model_dir

SOURCE, TARGET = "Dataset901_SynthAbdomen", "Dataset902_Target"


@pytest.fixture
def source_and_target(tmp_path):
    raw, pp, res = tmp_path / "raw", tmp_path / "pp", tmp_path / "res"
    write_raw_dataset(raw, 901, tiny_spec(classes=("liver", "spleen", "kidney_left")), num_test=0)
    write_raw_dataset(raw, 902, tiny_spec(classes=("kidney_left", "liver", "liver_tumor"), inplane_spacing=(1.5, 1.8),
                                          z_spacing=(2.0, 2.5), noise_hu=(30.0, 40.0), seed=7), num_test=0,
                      name="Target")
    model_dir = write_model_dir(raw, pp, res, tiny_net((4, 8, 16)), (16, 24, 24), dataset=SOURCE)
    return raw, pp, model_dir


def test_plan_like_keeps_the_source_inputs_and_network(source_and_target):
    raw, pp, model_dir = source_and_target
    assert plan_main(["-d", "902", "--raw", str(raw), "--preprocessed", str(pp), "--like",
                      str(model_dir / "plans.json"), "-np", "1"]) == 0
    source = json.loads((model_dir / "plans.json").read_text(encoding="utf-8"))
    plan = json.loads((pp / TARGET / "transfer_plans.json").read_text(encoding="utf-8"))
    for key in ("target_spacing", "normalization", "orientation", "network", "patch_size", "batch_size", "training"):
        assert plan[key] == source[key], key
    assert plan["labels"] == {"background": 0, "kidney_left": 1, "liver": 2, "liver_tumor": 3}
    assert plan["num_classes"] == 4 and plan["like"]["dataset_name"] == SOURCE
    assert input_differences(source, plan) == []
    own = json.loads((pp / TARGET / "fingerprint.json").read_text(encoding="utf-8"))  # the target's own statistics differ
    assert own["foreground_intensity_properties_per_channel"]["0"]["mean"] != plan["normalization"][0]["mean"]
    assert len(list((pp / TARGET / "transfer_plans").glob("*.b2nd"))) >= 3  # preprocessed with the source plan


def test_plan_like_refuses_a_file_that_is_no_plan(source_and_target, tmp_path, capsys):
    raw, pp, _ = source_and_target
    bad = tmp_path / "x.json"
    bad.write_text('{"a": 1}', encoding="utf-8")
    user_error(plan_main, ["-d", "902", "--raw", str(raw), "--preprocessed", str(pp), "--like", str(bad)], capsys,
               str(bad), "unknown key 'a'")
    assert not (pp / TARGET).exists()  # refused before the fingerprint or anything else is written


def test_plan_like_refuses_a_plan_with_other_channels(source_and_target, capsys):
    raw, pp, model_dir = source_and_target
    plan = json.loads((model_dir / "plans.json").read_text(encoding="utf-8"))
    plan["channel_names"] = {"0": "CT", "1": "CT_late"}
    (model_dir / "plans.json").write_text(json.dumps(plan), encoding="utf-8")
    with pytest.raises(SystemExit) as e:
        plan_main(["-d", "902", "--raw", str(raw), "--preprocessed", str(pp), "--like", str(model_dir / "plans.json")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1
    assert str(model_dir / "plans.json") in err and "planned for 2 input channel(s)" in err
    assert not (pp / TARGET).exists()


def test_backbone_and_head_channels_transfer_by_name(source_and_target):
    _, _, model_dir = source_and_target
    source_plan = json.loads((model_dir / "plans.json").read_text(encoding="utf-8"))
    src = torch.load(model_dir / "fold_0" / "checkpoint_final.pth", weights_only=True)["network_weights"]
    torch.manual_seed(1)
    target_labels = {"background": 0, "kidney_left": 1, "liver": 2, "liver_tumor": 3}
    model = build_network(source_plan["network"], 1, 4)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    report = load_pretrained(model, model_dir / "fold_0" / "checkpoint_final.pth", family="nnunet",
                             target_labels=target_labels)
    state = model.state_dict()
    heads = sorted(k for k in state if k.startswith("decoder.seg_layers.") and k.endswith(".weight"))
    # same number of classes, other classes: the heads must go by name, not by shape
    assert len(heads) == 2 and not report.shape_mismatch
    assert set(report.skipped) == {h for k in heads for h in (k, k[:-6] + "bias")}
    assert len(report.loaded) == len(state) - 2 * len(heads)  # the whole backbone
    assert report.head_transferred == {"background": (0, 0), "kidney_left": (3, 1), "liver": (1, 2)}
    for key in heads:
        for s, t in ((0, 0), (3, 1), (1, 2)):
            assert torch.equal(state[key][t], src[key][s])
        assert torch.equal(state[key][3], init[key][3])  # the new class keeps its initialisation
    assert "3 class(es) transferred by name into 2 output layer(s)" in report.summary()
    changed = dict(source_plan, target_spacing=[9.0, 9.0, 9.0])
    assert input_differences(source_plan, changed)[0].startswith("target_spacing")
