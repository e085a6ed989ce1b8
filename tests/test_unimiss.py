"""UniMiSS tiny and small: the published DINO checkpoint layout (every key and shape of the upstream
key lists in tests/data/unimiss_keys) loads 146 / 394 tensors with the documented renames and
positional-embedding resizes, the networks have the published parameter counts, plan and fine-tune
end to end."""
from __future__ import annotations

import argparse
import json
import logging
import re
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import scipy.ndimage
import torch

from suprem_net.cli.plan_and_preprocess import main as plan_main
from suprem_net.cli.train import main as train_main
from suprem_net.cli.weights import main as weights_main
from suprem_net.errors import SupremError
from suprem_net.networks import build_network, get_family
from suprem_net.weights import REGISTRY, load_pretrained, read_state_dict

KEYS = Path(__file__).parent / "data" / "unimiss_keys"
EXPECTED = {"tiny": 146, "small": 394}
log = logging.getLogger(__name__)


def key_rows(variant: str) -> tuple[list[tuple[str, tuple, str]], dict[str, tuple]]:
    """Section A (checkpoint key, shape, fate) and section B (network key -> shape at 48x192x192, 14
    classes) of the upstream key list."""
    text = (KEYS / f"keys_{variant}.txt").read_text()
    a_text, b_text = text.split("# SECTION B")
    rows = []
    for line in a_text.splitlines():
        if line and not line.startswith("#"):
            key, shape, fate = line.split("\t")
            rows.append((key, tuple(json.loads(shape)), fate))
    b = {}
    for line in b_text.splitlines()[1:]:
        if line and not line.startswith("#"):
            key, shape, _ = line.split("\t")
            b[key] = tuple(json.loads(shape))
    return rows, b


def published_checkpoint(variant: str, path: Path, seed: int = 0) -> OrderedDict:
    """Write a checkpoint in the published layout: ``student`` (every key and shape of the key list,
    random values), ``teacher`` (the same keys without ``module.``, other values), ``optimizer``
    (AdamW state for every student tensor but ``weight_g``), ``epoch``, ``args`` (an
    ``argparse.Namespace``) and ``loss`` (``center``). To keep the file small, the teacher's tensors
    are broadcast views of one value, the optimizer state shares the student's storages and the DINO
    head's large tensors are broadcast views of one row: exact shapes throughout. Returns the student."""
    gen = torch.Generator().manual_seed(seed)
    student = OrderedDict()
    for key, shape, _ in key_rows(variant)[0]:
        if key.startswith("module.head.") and len(shape) == 2 and shape[0] * shape[1] > 1_000_000:
            student[key] = torch.randn((1, shape[1]), generator=gen).expand(shape)
        else:
            student[key] = torch.randn(shape, generator=gen)
    # the EMA teacher: the same keys without "module.", other values (broadcast views, no storage)
    teacher = OrderedDict((k[len("module."):], torch.full((1,) * v.dim(), 0.5).expand(v.shape))
                          for k, v in student.items())
    trainable = [k for k in student if not k.endswith("weight_g")]
    optimizer = {"state": {i: {"step": torch.tensor(200.0), "exp_avg": student[k], "exp_avg_sq": student[k]}
                           for i, k in enumerate(trainable)},
                 "param_groups": [{"lr": 5e-4, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.04,
                                   "amsgrad": False, "params": list(range(len(trainable)))}]}
    args = argparse.Namespace(arch=f"model_{variant}", out_dim=65536, epochs=200, lr=5e-4, batch_size_per_gpu=24,
                              momentum_teacher=0.996, norm_last_layer=True, use_fp16=False, img_size3D=[16, 96, 96],
                              img_size2D=224, data_path="/data/ssl", output_dir="./output")
    torch.save({"student": student, "teacher": teacher, "optimizer": optimizer, "epoch": 200, "args": args,
                "loss": {"center": torch.randn((1, 65536), generator=gen)}}, path)
    return student


def zoomed(t: torch.Tensor, length: int) -> torch.Tensor:
    """The upstream resize, done with scipy: ``zoom(order=1)`` along the token axis only."""
    a = t[0].numpy()
    return torch.from_numpy(scipy.ndimage.zoom(a, (length / a.shape[0], 1), order=1))[None]


@pytest.fixture(scope="module", params=["tiny", "small"])
def published(request, tmp_path_factory):
    variant = request.param
    path = tmp_path_factory.mktemp(f"unimiss_{variant}") / REGISTRY[f"unimiss_{variant}"].file
    return variant, path, published_checkpoint(variant, path)


# ---------------------------------------------------------------- the networks


@pytest.mark.parametrize("variant,total,encoder", [("tiny", 22_954_310, 14_699_904),
                                                   ("small", 43_644_582, 27_969_664)])
def test_parameter_counts_and_keys(variant, total, encoder):
    with torch.device("meta"):
        net = build_network({"family": f"unimiss_{variant}", "kwargs": {"img_size": [48, 192, 192]}}, 1, 14)
    assert sum(p.numel() for p in net.parameters()) == total
    assert sum(p.numel() for p in net.transformer.parameters()) == encoder
    assert {k: tuple(v.shape) for k, v in net.state_dict().items()} == key_rows(variant)[1]
    assert REGISTRY[f"unimiss_{variant}"].backbone_params == total - 501 * 14  # less the five 1x1 heads


def test_forward_shapes_and_sizes():
    net = build_network({"family": "unimiss_tiny", "kwargs": {"img_size": [32, 64, 64]}, "deep_supervision": True},
                        1, 3)
    out = net(torch.randn(2, 1, 32, 64, 64))
    assert [tuple(o.shape) for o in out] == [(2, 3, 32, 64, 64), (2, 3, 32, 32, 32), (2, 3, 16, 16, 16),
                                             (2, 3, 8, 8, 8), (2, 3, 4, 4, 4)]
    net.eval()
    with torch.no_grad():
        assert build_network({"family": "unimiss_small", "kwargs": {"img_size": [16, 64, 32]}}, 1, 2).eval()(
            torch.randn(1, 1, 16, 64, 32)).shape == (1, 2, 16, 64, 32)
    with pytest.raises(SupremError, match="img_size must equal patch_size"):
        net(torch.randn(1, 1, 32, 64, 96))
    for bad in ([24, 64, 64], [32, 48, 64], [16, 32, 32], [32, 64]):
        with pytest.raises(SupremError, match="img_size"):
            build_network({"family": "unimiss_tiny", "kwargs": {"img_size": bad}}, 1, 2)
    assert get_family("unimiss_tiny").divisor == (16, 32, 32)


# ---------------------------------------------------------------- the published checkpoint


def test_published_layout_loads(published, tmp_path, monkeypatch):
    variant, path, student = published
    rows, _ = key_rows(variant)
    monkeypatch.setenv("SUPREM_weights", str(path.parent))
    torch.manual_seed(0)
    model = build_network({"family": f"unimiss_{variant}", "kwargs": {"img_size": [48, 192, 192]}}, 1, 14)
    report = load_pretrained(model, f"unimiss_{variant}")  # the published name, from the cache
    loaded = {fate.split()[0]: key for key, _, fate in rows if not fate.startswith("DROP")}
    dropped = {key: fate for key, _, fate in rows if fate.startswith("DROP")}
    assert len(report.loaded) == EXPECTED[variant] == len(loaded) and report.expected == EXPECTED[variant]
    assert sorted(report.loaded) == sorted(loaded)
    assert sorted(report.skipped) == sorted(dropped) and not report.unexpected and not report.shape_mismatch
    reasons = {r.split(" ")[0] for r in report.skipped.values()}
    assert reasons == {"2D", "cls-token", "DINO"}
    assert sum(r.startswith("2D") for r in report.skipped.values()) == (40 if variant == "tiny" else 66)
    assert sorted(report.missing) == sorted(
        ["transposeconv_stage3.weight", "transposeconv_stage3.bias", "stage3_de.conv.weight",
         "stage3_de.norm.weight", "stage3_de.norm.bias", "cls_conv.weight", "cls_conv.bias"]
        + [f"ds{i}_cls_conv.{p}" for i in range(4) for p in ("weight", "bias")])
    state = model.state_dict()
    max_diff = 0.0
    for model_key, file_key in loaded.items():
        file_t = student[file_key]
        if "pos_embed" in model_key or "PosEmbed" in model_key:  # cls row kept for pos_embed1..3, else dropped
            keep_cls = re.fullmatch(r"transformer\.pos_embed[123]", model_key) is not None
            ref = zoomed(file_t if keep_cls else file_t[:, 1:], state[model_key].shape[1])
            assert report.fitted[model_key] == (tuple(file_t.shape[:1]) + (file_t.shape[1] - (not keep_cls),)
                                                + tuple(file_t.shape[2:]), tuple(state[model_key].shape))
            max_diff = max(max_diff, float((state[model_key] - ref).abs().max()))
            assert torch.equal(state[model_key][:, 0], ref[:, 0]) and torch.equal(state[model_key][:, -1], ref[:, -1])
        else:
            assert torch.equal(state[model_key], file_t), model_key
    assert len(report.fitted) == 7 and max_diff < 1e-6
    log.warning("unimiss_%s: %d tensors equal the file's; 7 resized positional embeddings within %.2e of "
                "scipy.ndimage.zoom(order=1)", variant, len(loaded) - 7, max_diff)


def test_pretraining_size_and_renamed_file(published, tmp_path, caplog):
    """At the pre-training size pos_embed4 and DecPosEmbed* load unchanged, pos_embed1..3 still go from
    N+1 to N rows; a renamed file is recognised by its layout (and read again with the Namespace allowed)."""
    variant, path, student = published
    renamed = tmp_path / "my_download.pth"
    renamed.symlink_to(path)
    model = build_network({"family": f"unimiss_{variant}", "kwargs": {"img_size": [16, 96, 96]}}, 1, 2)
    caplog.set_level(logging.INFO)
    report = load_pretrained(model, renamed)
    assert report.source == f"unimiss_{variant}" and len(report.loaded) == EXPECTED[variant]
    assert "recognised by its key layout" in caplog.text
    assert sorted(report.fitted) == ["transformer.pos_embed1", "transformer.pos_embed2", "transformer.pos_embed3"]
    state = model.state_dict()
    assert torch.equal(state["transformer.pos_embed4"], student["module.backbone.transformer.pos_embed3D4"][:, 1:])
    assert torch.equal(state["DecPosEmbed2"], student["module.backbone.DecPosEmbed3D2"][:, 1:])
    assert torch.equal(state["transformer.pos_embed1"][:, 0], student["module.backbone.transformer.pos_embed3D1"][:, 0])
    with pytest.raises(SupremError, match="are for a unimiss_(tiny|small) network, not unimiss_"):
        other = "small" if variant == "tiny" else "tiny"
        load_pretrained(build_network({"family": f"unimiss_{other}", "kwargs": {"img_size": [32, 64, 64]}}, 1, 2),
                        renamed)


def test_two_input_channels_repeat_the_stem(published):
    variant, path, student = published
    model = build_network({"family": f"unimiss_{variant}", "kwargs": {"img_size": [32, 64, 64]}}, 2, 2)
    report = load_pretrained(model, path)
    assert len(report.loaded) == EXPECTED[variant] and not report.input_mismatch
    stem = model.state_dict()["transformer.patch_embed0.conv.weight"]
    file_stem = student["module.backbone.transformer.patch_embed3D0.conv.weight"]
    assert torch.equal(stem[:, 0:1], file_stem) and torch.equal(stem[:, 1:2], file_stem)


class Payload:  # a class that needs code to unpickle
    pass


def test_only_namespace_is_allowed(tmp_path):
    path = tmp_path / "unimiss_like.pth"
    torch.save({"student": {"module.backbone.norm.weight": torch.ones(48)}, "args": argparse.Namespace(a=1),
                "extra": Payload()}, path)
    with pytest.raises(SupremError, match="contains pickled code; refusing to load"):
        read_state_dict(path)
    assert argparse.Namespace not in torch.serialization.get_safe_globals()  # the allowance did not leak
    torch.save({"student": {"module.backbone.norm.weight": torch.ones(48)}, "args": argparse.Namespace(a=1)}, path)
    assert list(read_state_dict(path)) == ["module.backbone.norm.weight"]
    assert argparse.Namespace not in torch.serialization.get_safe_globals()


# ---------------------------------------------------------------- plan and fine-tune


def test_planner_shrinks_each_axis_by_its_divisor(variant="tiny"):
    from suprem_net.planning.planner import make_plan

    spec = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1}, "file_ending": ".nii.gz"}
    fp = {"dataset": "Dataset999_T", "num_cases": 4,
          "cases": [{"case_id": f"c{i}", "spacing": [2.5, 0.8, 0.8], "shape": [120, 400, 400],
                     "shape_after_crop": [120, 400, 400]} for i in range(4)],
          "foreground_intensity_properties_per_channel": {
              "0": {"mean": 80.0, "std": 40.0, "percentile_00_5": -50.0, "percentile_99_5": 250.0}}}
    plans = {budget: make_plan(spec, fp, plans_name="p", network=f"unimiss_{variant}", device="cpu",
                               cpu_seconds_per_iteration=budget) for budget in (3.0, 0.3)}
    for plan in plans.values():
        patch = plan["patch_size"]
        assert [p % d for p, d in zip(patch, (16, 32, 32))] == [0, 0, 0] and min(patch) >= 32
        assert plan["network"] == {"family": f"unimiss_{variant}", "kwargs": {"img_size": patch},
                                   "deep_supervision": True}
        m = plan["memory"]
        assert m["flops_per_iteration"] <= m["flops_budget"] or patch in ([32, 64, 64], [32, 32, 64])
        with torch.device("meta"):
            net = build_network(plan["network"], 1, plan["num_classes"])
        assert m["parameters"] == sum(p.numel() for p in net.parameters())
    assert np.prod(plans[0.3]["patch_size"]) < np.prod(plans[3.0]["patch_size"])



def test_plan_and_finetune_end_to_end(tiny_raw, tmp_path, monkeypatch, caplog):
    weights = tmp_path / "weights"
    weights.mkdir()
    monkeypatch.setenv("SUPREM_weights", str(weights))
    student = published_checkpoint("tiny", weights / REGISTRY["unimiss_tiny"].file, seed=3)
    raw, pp, results = tmp_path / "raw", tmp_path / "pp", tmp_path / "results"
    common = ["-d", "901", "--raw", str(raw), "--preprocessed", str(pp), "--device", "cpu", "-np", "1"]
    assert plan_main(common + ["--network", "unimiss_tiny", "--no-preprocess"]) == 0
    plan_path = pp / tiny_raw.name / "suprem_plans.json"
    plan = json.loads(plan_path.read_text())
    net = plan["network"]
    assert net["family"] == "unimiss_tiny" and net["deep_supervision"] is True
    assert net["kwargs"]["img_size"] == plan["patch_size"]
    assert all(p % d == 0 for p, d in zip(plan["patch_size"], (16, 32, 32)))
    assert plan["training"]["optimizer"] == "adamw" and plan["training"]["lr"] == 1e-4
    plan["patch_size"] = net["kwargs"]["img_size"] = [32, 64, 64]  # test speed
    plan_path.write_text(json.dumps(plan))
    assert plan_main(common + ["--plans-name", "suprem_plans"]) == 0
    caplog.set_level(logging.INFO)
    assert train_main(["901", "0", "--pretrained", "unimiss_tiny", "--raw", str(raw), "--preprocessed", str(pp),
                       "--results", str(results), "--epochs", "1", "--iterations-per-epoch", "2",
                       "--val-iterations", "1", "--batch-size", "2", "--num-workers", "0",
                       "--no-progress-bar", "--no-compile"]) == 0
    assert "loaded 146 (expected 146) (7 resized to the network)" in caplog.text
    assert "re-plan with" not in caplog.text  # UniMiSS fine-tunes on the dataset's own plan (no preset)
    fold = results / tiny_raw.name / "suprem_plans" / "fold_0"
    summary = json.loads((fold / "validation" / "summary.json").read_text())  # sliding-window prediction ran
    assert summary["cases"] and all((fold / "validation" / f"{c['case_id']}.nii.gz").is_file()
                                    for c in summary["cases"])
    ckpt = torch.load(fold / "checkpoint_final.pth", weights_only=True)
    trained = ckpt["network_weights"]["transformer.block2.0.attn.q.weight"]
    source = student["module.backbone.transformer.block2.0.attn.q.weight"]
    assert torch.allclose(trained, source, atol=1e-2) and not torch.equal(trained, source)  # two small AdamW steps


def test_weights_list_shows_both_rows(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("SUPREM_weights", str(tmp_path))
    assert weights_main(["list"]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.startswith("unimiss_")}
    assert set(rows) == {"unimiss_tiny", "unimiss_small"}
    for name, line in rows.items():
        assert name in line.split()[1] and " supported " in line  # family column, status column
    assert np.isclose(REGISTRY["unimiss_small"].size / 1e9, 1.05, atol=0.01)
