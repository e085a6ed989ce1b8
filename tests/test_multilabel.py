"""Multi-label (bitmask) labels end to end, and partial labels: convert --multi-label, preprocess,
pre-train with the masked sigmoid Dice + BCE, fine-tune a softmax model from it, predict overlapping
per-organ masks."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from suprem_net import api
from suprem_net.io.image import read_image
from suprem_net.preprocessing.resampling import resample_bitmask
from suprem_net import labels as bitmask
from suprem_net.synthetic import SyntheticSpec, write_abdomenatlas, write_raw_dataset
from suprem_net.losses import MarginalDiceCELoss, MultiLabelDiceBCE
from tests.helpers import shrink_plan, tiny_net

ML_DS, SL_DS = "Dataset903_AtlasML", "Dataset904_Target"
TINY_NET = tiny_net()
CLASSES = ["kidney_left", "kidney_right", "liver", "spleen"]  # AbdomenAtlas order: classes 1..4
MISSING = {1: ["spleen"], 2: ["kidney_left"]}


def _shrink_plan(pp: Path, ds: str) -> dict:
    return shrink_plan(pp / ds / "suprem_plans.json", network=TINY_NET, epochs=2, iterations_per_epoch=2,
                       num_val_iterations=1)


@pytest.fixture(scope="module")
def ml_root(tmp_path_factory) -> Path:
    from suprem_net.cli.convert_abdomenatlas import main as convert_main

    root = tmp_path_factory.mktemp("multilabel")
    spec = SyntheticSpec(num_cases=4, num_classes=4, fov_mm=(120, 140, 140), inplane_spacing=(3, 3),
                         z_spacing=(4, 4), seed=2)
    write_abdomenatlas(root / "atlas", spec, missing=MISSING)
    assert convert_main([str(root / "atlas"), "-d", "903", "--name", "AtlasML", "--raw", str(root / "raw"),
                         "--multi-label", "-np", "1"]) == 0
    api.plan_and_preprocess("903", raw=root / "raw", preprocessed=root / "pp", device="cpu", num_processes=1)
    _shrink_plan(root / "pp", ML_DS)
    return root


def test_bitmask_helpers():
    a = np.zeros((4, 6, 6), bool)
    b = np.zeros((4, 6, 6), bool)
    a[:, :4], b[:, 2:] = True, True
    seg = bitmask.encode({1: a, 3: b}, a.shape, 3)
    assert seg.dtype == np.uint8 and set(np.unique(seg)) == {1, 4, 5}
    assert bitmask.class_counts(seg, 3) == [int(a.sum()), 0, int(b.sum())]
    assert bitmask.bitmask_dtype(9) == np.uint16 and bitmask.bitmask_dtype(32) == np.uint32
    assert bitmask.value_problem(seg, 3) is None and "bits above" in bitmask.value_problem(seg | 8, 3)
    up = resample_bitmask(seg, (4, 12, 12), None, 3)
    assert np.array_equal(up[:, ::2, ::2], seg)  # overlapping voxels keep both bits
    big = bitmask.encode({1: a, 20: b}, a.shape, 20).astype(np.uint32)[None, None]
    packed = bitmask.pack16(big, 20)
    hot = bitmask.unpack16(torch.from_numpy(packed).float(), 20)
    assert hot.shape == (1, 20, 4, 6, 6) and torch.equal(hot[0, 0].bool(), torch.from_numpy(a))
    assert torch.equal(hot[0, 19].bool(), torch.from_numpy(b)) and hot[0, 1:19].sum() == 0


def test_marginal_loss_merges_background_with_unannotated_classes():
    torch.manual_seed(0)
    target = torch.zeros(2, 1, 6, 6, 6, dtype=torch.long)
    target[:, :, 1:3] = 1
    target[0, :, 4:] = 2  # class 2 annotated in sample 0 only
    logits = torch.randn(2, 3, 6, 6, 6)
    loss = MarginalDiceCELoss()
    full = torch.ones(2, 3, dtype=torch.bool)
    assert torch.allclose(loss(logits, target, full), loss(logits, target))  # no partial labels: plain Dice + CE
    ann = full.clone()
    ann[1, 2] = False
    # in sample 1, moving probability between background and the unannotated class 2 changes nothing
    swapped = logits.clone()
    swapped[1, [0, 2]] = logits[1, [2, 0]]
    assert torch.allclose(loss(logits, target, ann), loss(swapped, target, ann), atol=1e-6)
    assert not torch.allclose(loss(logits, target), loss(swapped, target), atol=1e-6)


def test_convert_and_preprocess_multilabel(ml_root):
    raw = ml_root / "raw" / ML_DS
    spec = json.loads((raw / "dataset.json").read_text())
    assert spec["label_encoding"] == "bitmask"
    assert spec["labels"] == {"background": 0, **{n: i for i, n in enumerate(CLASSES, 1)}}
    assert spec["partial_labels"] == {"BDMAP_00000002": ["spleen"], "BDMAP_00000003": ["kidney_left"]}
    seg, _ = read_image(raw / "labelsTr" / "BDMAP_00000001.nii.gz", dtype=None)
    spleen, kidney = bitmask.channel(seg, 4), bitmask.channel(seg, 1)
    assert (spleen & kidney).any()  # the overlap survives conversion
    fp = json.loads((ml_root / "pp" / ML_DS / "fingerprint.json").read_text())
    assert fp["cases"][0]["class_voxels"]["spleen"] == int(spleen.sum())
    plan = json.loads((ml_root / "pp" / ML_DS / "suprem_plans.json").read_text())
    assert plan["num_classes"] == 4 and plan["label_encoding"] == "bitmask"
    props = json.loads((ml_root / "pp" / ML_DS / "suprem_plans" / "BDMAP_00000002.json").read_text())
    assert props["annotated_classes"] == [1, 2, 3] and "4" not in props["class_locations"]
    from suprem_net.preprocessing.storage import open_array

    pre = open_array(ml_root / "pp" / ML_DS / "suprem_plans" / "BDMAP_00000001_seg.b2nd")[...]
    assert pre.dtype == np.uint8 and ((pre & 8) > 0)[(pre & 1) > 0].any()


def test_rerun_cannot_mix_label_encodings(ml_root, capsys):
    from suprem_net.cli.convert_abdomenatlas import main as convert_main

    with pytest.raises(SystemExit) as e:  # the multi-label dataset 903 exists: a single-label rerun is refused
        convert_main([str(ml_root / "atlas"), "-d", "903", "--name", "AtlasML", "--raw", str(ml_root / "raw"), "-np", "1"])
    assert e.value.code == 2 and "--multi-label" in capsys.readouterr().err


def test_masked_loss_gives_exactly_zero_gradient_to_unannotated_classes(ml_root):
    from suprem_net.data.dataset import CaseStore
    from suprem_net.data.loader import annotated_matrix
    from suprem_net.labels import LabelScheme
    from suprem_net.networks import build_network
    from suprem_net.losses import make_loss

    plan = json.loads((ml_root / "pp" / ML_DS / "suprem_plans.json").read_text())
    store = CaseStore(ml_root / "pp" / ML_DS / "suprem_plans")
    ids = ["BDMAP_00000001", "BDMAP_00000002"]  # fully labelled, spleen (class 4) missing
    reads = [store.read(c, [0, 0, 0], [16, 16, 16]) for c in ids]
    x = torch.from_numpy(np.stack([r[0] for r in reads]))
    y = torch.from_numpy(bitmask.pack16(np.stack([r[1] for r in reads]), 4)).long()
    ann = torch.from_numpy(annotated_matrix([store.properties(c).get("annotated_classes") for c in ids],
                                             LabelScheme.of(plan)))
    assert ann.tolist() == [[True] * 4, [True, True, True, False]]
    torch.manual_seed(0)
    net = build_network(plan["network"], 1, 4)
    outputs = net(x)
    for o in outputs:
        o.retain_grad()
    loss = make_loss(plan)(outputs, y, ann)
    loss.backward()
    full = outputs[0].grad
    for o in outputs:  # every deep-supervision output: unannotated class of case 2 gets exactly zero
        assert torch.count_nonzero(o.grad[1, 3]) == 0
    assert torch.count_nonzero(full[1, 0]) > 0 and torch.count_nonzero(full[0, 3]) > 0
    # and its loss term is zero: changing that channel's logits leaves the loss unchanged
    crit = MultiLabelDiceBCE(4)
    logits = outputs[0].detach().clone()
    changed = logits.clone()
    changed[1, 3] += 5.0
    assert torch.equal(crit(logits, y, ann), crit(changed, y, ann))


def test_pretrain_multilabel_finetune_softmax_and_predict_per_organ(ml_root, tmp_path, caplog):
    from suprem_net.cli.predict import main as predict_main
    from suprem_net.cli.train import main as train_main

    results = ml_root / "results"
    common = ["--preprocessed", str(ml_root / "pp"), "--results", str(results), "--num-workers", "0",
              "--no-progress-bar"]
    assert train_main(["903", "0", "--raw", str(ml_root / "raw"), *common]) == 0
    fold = results / ML_DS / "suprem_plans" / "fold_0"
    summary = json.loads((fold / "validation" / "summary.json").read_text())
    assert set(summary["mean"]["dice"]) == set(CLASSES)
    ckpt = torch.load(fold / "checkpoint_final.pth", weights_only=True)
    assert len(ckpt["logging"]["pseudo_dice"][-1]) == 4  # one pseudo Dice per sigmoid class

    # fine-tune a softmax model on an ordinary single-label dataset from the multi-label checkpoint
    write_raw_dataset(ml_root / "raw", 904, SyntheticSpec(num_cases=3, num_classes=2, fov_mm=(60, 80, 80),
                                                          inplane_spacing=(3, 3), z_spacing=(4, 4)),
                      num_test=0, name="Target")
    api.plan_and_preprocess("904", raw=ml_root / "raw", preprocessed=ml_root / "pp", device="cpu", num_processes=1)
    _shrink_plan(ml_root / "pp", SL_DS)
    caplog.set_level(logging.INFO)
    assert train_main(["904", "0", "--raw", str(ml_root / "raw"), *common, "--epochs", "1",
                       "--skip-final-validation", "--pretrained", str(fold / "checkpoint_final.pth")]) == 0
    text = caplog.text
    # the backbone loads; the 4 sigmoid channels hand liver and spleen to the softmax head by name
    assert "skipped 2, unexpected 0, shape mismatch 0, missing 2 (left as initialised)" in text
    assert "head: 2 class(es) transferred by name into 1 output layer(s) (liver, spleen)" in text
    from suprem_net.networks import build_network
    from suprem_net.weights.loading import load_pretrained

    sl_plan = json.loads((ml_root / "pp" / SL_DS / "suprem_plans.json").read_text())
    report = load_pretrained(build_network(sl_plan["network"], 1, 3), str(fold / "checkpoint_final.pth"),
                             family="nnunet")
    assert report.loaded and all(k.startswith("decoder.seg_layers") for k in report.shape_mismatch)
    assert any(k.startswith("encoder.") for k in report.loaded) and len(report.shape_mismatch) == 2

    # per-organ prediction with the multi-label model; make two classes fire everywhere so that the
    # written masks overlap whatever the two-epoch model learned
    biased = dict(ckpt)
    weights = dict(ckpt["network_weights"])
    bias_key = max(k for k in weights if k.startswith("decoder.seg_layers.") and k.endswith(".bias"))  # full res
    weights[bias_key] = weights[bias_key].clone()
    weights[bias_key][[1, 2]] += 50.0  # kidney_right, liver
    biased["network_weights"] = weights
    torch.save(biased, fold / "checkpoint_biased.pth")
    src = ml_root / "raw" / ML_DS / "imagesTr" / "BDMAP_00000001_0000.nii.gz"
    out = tmp_path / "pred"
    assert predict_main(["-i", str(src), "-o", str(out), "-m", str(results / ML_DS / "suprem_plans"),
                         "--checkpoint", "checkpoint_biased.pth", "--per-organ", "--no-tta", "--device", "cpu"]) == 0
    case_dir = out / "BDMAP_00000001"
    image, geo = read_image(src)
    masks = {}
    for name in CLASSES:
        m, g = read_image(case_dir / "segmentations" / f"{name}.nii.gz", dtype=None)
        assert m.shape == image.shape and not geo.mismatch(g)
        masks[name] = m > 0
    assert (masks["liver"] & masks["kidney_right"]).sum() > 0.5 * image.size  # overlaps kept
    combined, g = read_image(case_dir / "combined_labels.nii.gz", dtype=None)
    assert not geo.mismatch(g) and set(np.unique(combined)) <= {0, 1, 2, 3, 4}
    both = masks["liver"] & masks["kidney_right"]
    assert set(np.unique(combined[both])) <= {2, 3}


def test_single_label_partial_labels_use_the_marginal_loss(ml_root, tmp_path):
    from suprem_net.cli.convert_abdomenatlas import main as convert_main
    from suprem_net.cli.train import main as train_main

    raw, pp = tmp_path / "raw", tmp_path / "pp"
    assert convert_main([str(ml_root / "atlas"), "-d", "905", "--name", "AtlasSL", "--raw", str(raw), "-np", "1"]) == 0
    assert "label_encoding" not in json.loads((raw / "Dataset905_AtlasSL" / "dataset.json").read_text())
    api.plan_and_preprocess("905", raw=raw, preprocessed=pp, device="cpu", num_processes=1)
    plan = _shrink_plan(pp, "Dataset905_AtlasSL")
    assert plan["num_classes"] == 5 and "label_encoding" not in plan
    data = pp / "Dataset905_AtlasSL" / "suprem_plans"
    assert json.loads((data / "BDMAP_00000003.json").read_text())["annotated_classes"] == [2, 3, 4]
    assert json.loads((data / "BDMAP_00000001.json").read_text())["annotated_classes"] == [1, 2, 3, 4]
    assert train_main(["905", "0", "--raw", str(raw), "--preprocessed", str(pp), "--results", str(tmp_path / "res"),
                       "--num-workers", "0", "--no-progress-bar", "--epochs", "1"]) == 0
    summary = json.loads((tmp_path / "res" / "Dataset905_AtlasSL" / "suprem_plans" / "fold_0" / "validation" /
                          "summary.json").read_text())
    for row in summary["cases"]:  # classes a case does not annotate are not scored
        if row["case_id"] == "BDMAP_00000003":
            assert row["dice"]["kidney_left"] is None
