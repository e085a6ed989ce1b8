"""Exported predictor bundles (suprem_export) and the onnxruntime backend of suprem_predict."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from suprem_net import api
from suprem_net.cli.export import main as export_main
from suprem_net.cli.predict import main as predict_main
from suprem_net.inference.bundle import BUNDLE_FILE, OPSET, _BatchStatisticsNorm, load_bundle, sha256
from suprem_net.io.image import read_image
from suprem_net.networks.suprem_unet import ContBatchNorm3d
from suprem_net.synthetic import write_raw_dataset
from tests.helpers import DS, shrink_plan, tiny_net, tiny_spec, user_error


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """``(model folder, test images)``: a tiny network trained for two iterations on generated CT."""
    root = tmp_path_factory.mktemp("export")
    raw = write_raw_dataset(root / "raw", 901, tiny_spec(), num_test=2)
    planned = api.plan_and_preprocess(901, raw=root / "raw", preprocessed=root / "pp", device="cpu",
                                      num_processes=1)
    shrink_plan(planned["plan_path"], patch=(16, 32, 32), network=tiny_net((4, 8, 16)), epochs=1,
                iterations_per_epoch=2, num_val_iterations=1)
    api.train(901, "0", raw=root / "raw", preprocessed=root / "pp", results=root / "results", num_workers=0,
              progress_bar=False, final_validation=False)
    return root / "results" / DS / "suprem_plans", raw / "imagesTs"


@pytest.fixture(scope="module")
def bundle(trained, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bundle") / "b"
    assert export_main([str(trained[0]), "-o", str(out)]) == 0
    return out


def test_bundle_contents(bundle, trained):
    manifest = json.loads((bundle / BUNDLE_FILE).read_text())
    assert sorted(p.name for p in bundle.iterdir()) == [BUNDLE_FILE, "fold_0.onnx", "plans.json"]
    assert manifest["opset"] == OPSET and manifest["folds"] == ["0"] and manifest["source"] == "suprem"
    assert manifest["labels"] == json.loads((trained[0] / "plans.json").read_text())["labels"]
    assert manifest["sha256"] == {n: sha256(bundle / n) for n in ("fold_0.onnx", "plans.json")}
    assert manifest["max_abs_logit_difference"]["0"] < 1e-3
    plan, models, _ = load_bundle(bundle)
    x = torch.randn(3, 1, *plan["patch_size"])  # a batch size other than the exported example's
    assert models[0](x).shape == (3, plan["num_classes"], *plan["patch_size"])


def test_both_backends_give_the_same_labels(bundle, trained, tmp_path):
    model, images = trained
    for backend, source in (("torch", model), ("onnxruntime", bundle)):
        assert predict_main(["-i", str(images), "-o", str(tmp_path / backend), "-m", str(source), "--backend",
                             backend, "--device", "cpu", "--tta"]) == 0
    files = sorted(p.name for p in (tmp_path / "torch").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "onnxruntime").iterdir()) and len(files) == 2
    for name in files:
        a, ga = read_image(tmp_path / "torch" / name, dtype=None)
        b, gb = read_image(tmp_path / "onnxruntime" / name, dtype=None)
        assert ga.mismatch(gb) is None
        assert (a == b).mean() >= 0.999


def test_auto_backend_runs_a_bundle_with_onnxruntime(bundle, trained, tmp_path):
    result = api.predict(trained[1], tmp_path / "out", model=bundle, device="cpu", tta=False, profile=True)
    assert len(result["written"]) == 2 and result["stages"]["network"] > 0


def _broken(bundle: Path, tmp_path: Path, how: str) -> Path:
    copy = tmp_path / "broken"
    shutil.copytree(bundle, copy)
    if how == "missing file":
        (copy / "fold_0.onnx").unlink()
    elif how == "wrong checksum":
        with open(copy / "plans.json", "a") as f:
            f.write(" ")
    elif how == "opset too new":
        import onnx

        m = onnx.load(str(copy / "fold_0.onnx"))
        for entry in m.opset_import:
            if entry.domain in ("", "ai.onnx"):
                entry.version = 99
        onnx.save(m, str(copy / "fold_0.onnx"))
        manifest = json.loads((copy / BUNDLE_FILE).read_text())
        manifest["sha256"]["fold_0.onnx"] = sha256(copy / "fold_0.onnx")
        (copy / BUNDLE_FILE).write_text(json.dumps(manifest))
    elif how == "format version":
        manifest = json.loads((copy / BUNDLE_FILE).read_text())
        manifest["format_version"] = 99
        (copy / BUNDLE_FILE).write_text(json.dumps(manifest))
    return copy


@pytest.mark.parametrize("how,needle", [("missing file", "missing from the bundle"),
                                        ("wrong checksum", "SHA-256 does not match"),
                                        ("opset too new", "opset is newer"),
                                        ("format version", "format version 99")])
def test_bad_bundles_are_one_line_errors(how, needle, bundle, trained, tmp_path, capsys):
    broken = _broken(bundle, tmp_path, how)
    out = tmp_path / "out"
    user_error(predict_main, ["-i", str(trained[1]), "-o", str(out), "-m", str(broken)], capsys, needle)
    assert not out.exists()


def test_backend_and_source_must_fit(bundle, trained, tmp_path, capsys):
    model, images = trained
    user_error(predict_main, ["-i", str(images), "-o", str(tmp_path / "a"), "-m", str(model), "--backend",
                              "onnxruntime"], capsys, "suprem_export")
    user_error(predict_main, ["-i", str(images), "-o", str(tmp_path / "b"), "-m", str(bundle), "--backend",
                              "torch"], capsys, "runs with --backend onnxruntime")
    user_error(export_main, [str(model), "-o", str(bundle)], capsys, "exists; pass --overwrite")


def test_batch_statistics_norm_written_out_computes_the_same():
    torch.manual_seed(0)
    norm = ContBatchNorm3d(4)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-1, 1)
    norm.eval()
    x = torch.randn(2, 4, 6, 7, 5) * 3 + 1
    with torch.no_grad():
        torch.testing.assert_close(_BatchStatisticsNorm(norm)(x), norm(x), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_suprem_unet_exports_with_batch_statistics(tmp_path):
    """The published SuPreM U-Net (batch statistics at inference) through ONNX: the same logits."""
    import onnxruntime as ort

    from suprem_net.inference.bundle import _exportable, _export_one
    from suprem_net.networks import build_network

    torch.manual_seed(0)
    net = build_network({"family": "suprem_unet", "kwargs": {}}, 1, 3).eval()
    x = torch.randn(2, 1, 32, 32, 32)
    with torch.no_grad():
        ref = net(x).numpy()
    _export_one(_exportable(net), x, tmp_path / "n.onnx", OPSET)
    got = ort.InferenceSession(str(tmp_path / "n.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"image": x.numpy()})[0]
    assert np.abs(got - ref).max() < 1e-3
