"""Fine-tuning runs for all three SuPreM families: ``suprem_train --pretrained NAME`` with a
checkpoint built in the published layout, on a plan made with the family's preset."""
import json
from collections import OrderedDict

import pytest
import torch

from suprem_net import api
from suprem_net.cli.train import main as train_main
from suprem_net.networks import build_network
from tests.helpers import universal_checkpoint

CASES = {  # preset/zoo name -> (family, plans name, test patch, expected backbone tensors)
    "suprem_unet": ("suprem_unet", 32, 104),
    "suprem_segresnet": ("segresnet", 32, 81),
    "suprem_swinunetr": ("swinunetr", 64, 157),  # Swin UNETR needs at least 64 per edge
}


def _published_checkpoint(name: str, family: str, path):
    torch.manual_seed(1)
    source = build_network({"family": family, "kwargs": {}}, 1, 32)
    sd = source.state_dict()
    if family == "segresnet":
        ckpt = {"net": OrderedDict((f"module.{k}", v) for k, v in sd.items()), "epoch": 5}
    else:
        head = "out." if family == "swinunetr" else "out_tr."
        backbone = OrderedDict((k, v) for k, v in sd.items() if not k.startswith(head))
        dec, deep = (48, 768) if family == "swinunetr" else (64, 512)
        ckpt = universal_checkpoint(backbone, dec, deep)
    torch.save(ckpt, path)
    return {k: v for k, v in sd.items()}


@pytest.mark.parametrize("name", list(CASES))
def test_finetune_each_suprem_family(name, tiny_raw, tmp_path, monkeypatch, caplog):
    family, patch, expected = CASES[name]
    weights = tmp_path / "weights"
    weights.mkdir()
    monkeypatch.setenv("SUPREM_weights", str(weights))
    from suprem_net.weights import get_entry

    entry = get_entry(name)
    source = _published_checkpoint(name, family, weights / entry.file)
    pp, results = tmp_path / "pp", tmp_path / "results"
    api.plan_and_preprocess("901", raw=tmp_path / "raw", preprocessed=pp, device="cpu", num_processes=1, preset=name,
                            preprocess=False)
    plan_path = pp / tiny_raw.name / f"{name}_plans.json"
    plan = json.loads(plan_path.read_text())
    assert plan["network"]["family"] == family and plan["orientation"] == "RAS"
    plan["patch_size"] = [patch] * 3  # test speed; the preset keeps 96^3 on a GPU plan
    plan_path.write_text(json.dumps(plan))
    api.plan_and_preprocess("901", raw=tmp_path / "raw", preprocessed=pp, device="cpu", num_processes=1,
                            plans_name=f"{name}_plans")
    caplog.set_level("INFO")
    assert train_main(["901", "0", "--plans", f"{name}_plans", "--pretrained", name, "--raw", str(tmp_path / "raw"),
                       "--preprocessed", str(pp), "--results", str(results), "--epochs", "1",
                       "--iterations-per-epoch", "1", "--val-iterations", "1", "--batch-size", "1" if
                       family == "swinunetr" else "2", "--num-workers", "0", "--skip-final-validation",
                       "--no-progress-bar"]) == 0
    assert f"loaded {expected} (expected {expected})" in caplog.text
    # the trained first layer starts from the file's values (one AdamW step of lr 1e-4 away), not from init
    ckpt = torch.load(results / tiny_raw.name / f"{name}_plans" / "fold_0" / "checkpoint_final.pth",
                      weights_only=True)
    key = {"suprem_unet": "down_tr64.ops.0.conv1.weight", "segresnet": "convInit.conv.weight",
           "swinunetr": "swinViT.patch_embed.proj.weight"}[family]
    trained = ckpt["network_weights"][key]
    assert torch.allclose(trained, source[key], atol=1e-2)  # starts from the file's values, one small step away
    assert not torch.allclose(trained, build_network(plan["network"], 1, plan["num_classes"]).state_dict()[key],
                              atol=1e-2)
