"""Inference: sliding window, predictor, export, inputs (NIfTI/NRRD/DICOM), suprem_predict CLI."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn as nn

from suprem_net.cli.predict import main as predict_main
from suprem_net.inference.export import revert_logits
from suprem_net.inference.postprocessing import keep_largest_component
from suprem_net.inference.predictor import Predictor
from suprem_net.inference.sliding_window import SlidingWindow, compute_steps, gaussian_weights
from suprem_net.io.image import Geometry, read_image, write_image
from suprem_net.networks import build_network
from suprem_net.preprocessing.case import preprocess_case, revert_labels
from suprem_net.synthetic import SyntheticSpec, label_map, make_case, write_raw_dataset
from tests.helpers import tiny_net, write_dicom_series, write_model_dir

TINY_NET = tiny_net((2, 4, 8))
# coarse spacing keeps every volume small (about 50 x 60 x 60): the whole file runs in seconds
SPEC = SyntheticSpec(num_cases=3, num_classes=3, seed=3, inplane_spacing=(5.0, 6.0), z_spacing=(5.0, 6.0))


# ---------------------------------------------------------------------------------------------
# fixtures: a real plan on a tiny synthetic dataset and a model folder with a tiny network
# (random weights: the CLI tests check mechanics; accuracy is tested with a deterministic model)
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("suprem")
    raw, pp = root / "raw", root / "preprocessed"
    write_raw_dataset(raw, 901, SPEC, num_test=2)
    return write_model_dir(raw, pp, root / "results", TINY_NET, [32, 32, 32])


@pytest.fixture(scope="module")
def unlabelled_images(model_dir) -> Path:
    return model_dir.parents[2] / "raw" / "Dataset901_SynthAbdomen" / "imagesTs"


# ---------------------------------------------------------------------------------------------
# sliding window
# ---------------------------------------------------------------------------------------------
def test_compute_steps_like_nnunet():
    assert compute_steps([64, 100, 48], [32, 48, 48], 0.5) == [[0, 16, 32], [0, 17, 35, 52], [0]]
    assert compute_steps([40], [32], 1.0) == [[0, 8]]


def test_gaussian_weights():
    g = gaussian_weights([16, 24, 8])
    assert g.shape == (16, 24, 8)
    assert float(g.max()) == 1.0 and float(g[8, 12, 4]) == 1.0
    assert float(g.min()) > 0
    # sigma = patch / 8: one sigma from the centre along axis 1 (24 / 8 = 3 voxels)
    assert float(g[8, 15, 4]) == pytest.approx(np.exp(-0.5), rel=1e-5)
    # symmetric about the centre voxel
    torch.testing.assert_close(g[1:, 1:, 1:], torch.flip(g[1:, 1:, 1:], [0, 1, 2]))


class _Pointwise(nn.Module):
    """A translation-equivariant 'network' without context: K fixed linear maps of the input."""

    def __init__(self, k: int = 3):
        super().__init__()
        self.conv = nn.Conv3d(1, k, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([1.0, -2.0, 0.5]).view(k, 1, 1, 1, 1))
            self.conv.bias.copy_(torch.tensor([0.0, 1.0, -1.0]))

    def forward(self, x):
        return self.conv(x)


@pytest.mark.parametrize("mirrors,batch,independent", [((0, 1, 2), 3, True), (None, 1, True), ((0, 2), 2, False)])
def test_sliding_window_reproduces_whole_image(mirrors, batch, independent):
    net = _Pointwise()
    data = torch.randn(1, 37, 50, 21)  # smaller than the patch along x: padded and cropped back
    sw = SlidingWindow([16, 24, 32], 3, step_size=0.5, tile_batch_size=batch, mirror_axes=mirrors,
                       batch_independent=independent)
    out = sw(net, data)
    with torch.no_grad():
        ref = net(data[None])[0]
    assert out.shape == (3, 37, 50, 21)
    torch.testing.assert_close(out.float(), ref, atol=1e-4, rtol=1e-4)


def test_batch_statistics_networks_see_one_tile_at_a_time():
    seen = []

    class Spy(_Pointwise):
        def forward(self, x):
            seen.append(x.shape[0])
            return super().forward(x)

    sw = SlidingWindow([8, 8, 8], 3, tile_batch_size=4, mirror_axes=(0, 1, 2), batch_independent=False)
    sw(Spy(), torch.randn(1, 12, 12, 12))
    assert set(seen) == {1}
    seen.clear()
    SlidingWindow([8, 8, 8], 3, tile_batch_size=4, mirror_axes=(0,), batch_independent=True)(Spy(), torch.randn(1, 12, 12, 12))
    assert seen == [8, 8]  # 2 x 2 x 2 = 8 tiles in batches of 4, x 2 mirrors in the same forward


def test_revert_logits_matches_revert_labels():
    ct, masks, geo = make_case(SyntheticSpec(num_classes=3, seed=5), 0)
    seg = label_map(masks)
    plan = {"orientation": "RAS", "normalization": [{"scheme": "ct", "clip": [-100, 200], "mean": 50, "std": 60}],
            "target_spacing": [4.0, 4.5, 4.5], "resampling": {"anisotropy_threshold": 3.0}, "num_classes": 4,
            "labels": {"background": 0, "a": 1, "b": 2, "c": 3}}
    data, s, props = preprocess_case([ct], geo, plan, seg=seg)
    onehot = torch.nn.functional.one_hot(torch.from_numpy(s.astype(np.int64)), 4).permute(3, 0, 1, 2).float()
    labels, probs = revert_logits(onehot * 10, props, probabilities=True, slab=5)
    ref = revert_labels(s, props)
    assert labels.shape == geo.shape and probs.shape == (4, *geo.shape) and probs.dtype == np.float16
    assert (labels == ref).mean() > 0.999
    assert np.allclose(probs.astype(np.float32).sum(0), 1, atol=5e-3)


def test_keep_largest_component():
    lab = np.zeros((10, 10, 10), np.uint8)
    lab[1:4, 1:4, 1:4] = 1
    lab[7:9, 7:9, 7:9] = 1
    lab[6, 0, 0] = 2
    lab[0, 9, 9] = 2
    keep_largest_component(lab, [1])
    assert lab[8, 8, 8] == 0 and lab[2, 2, 2] == 1 and (lab == 2).sum() == 2


# ---------------------------------------------------------------------------------------------
# predictor and CLI
# ---------------------------------------------------------------------------------------------
class _LabelIntensityModel(nn.Module):
    """Deterministic 'perfect' network for images whose intensity is ``100 x label``: with the
    normalisation ``(x - 0) / 100`` class c has logit ``-4 (x - c)^2`` voxel by voxel."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.register_buffer("c", torch.arange(num_classes, dtype=torch.float32).view(1, -1, 1, 1, 1))

    def forward(self, x):
        return -4.0 * (x[:, :1] - self.c) ** 2


def test_accuracy_with_a_deterministic_model(model_dir, unlabelled_images, tmp_path):
    """The whole path (read -> orient -> crop -> resample -> sliding window with TTA -> resample
    back -> uncrop -> restore orientation) with a model that is exact on any grid, so every
    lost voxel is the pipeline's: only the two resamplings (about 5.5 mm -> 5.1 mm and back)
    change boundaries by about one voxel (cubic interpolation of the 0 -> 300 step at the
    kidney's rim passes through 100/200, i.e. liver/spleen). Measured: liver 0.99, spleen
    0.93, kidney 0.87 (the kidney is ~370 voxels, radius ~4.5: its one-voxel rim is half of
    its volume); 0.8 keeps a margin for that, while a flipped axis,
    a shifted crop box or a wrong resampling moves the small off-centre kidney away
    (Dice < 0.3). The same must hold for a copy with a rotated direction saved as NRRD.
    """
    from suprem_net.evaluation.metrics import dice

    plan = json.loads((model_dir / "plans.json").read_text())
    plan["orientation"] = "RAS"
    plan["normalization"] = [{"scheme": "ct", "clip": [-1000.0, 1000.0], "mean": 0.0, "std": 100.0}]
    pred = Predictor.from_model(plan, _LabelIntensityModel(plan["num_classes"]), device="cpu", tta=True)
    ref, g = read_image(str(unlabelled_images / "case_004_0000.nii.gz").replace("imagesTs", "labelsTs")
                        .replace("_0000", ""), dtype=np.uint8)
    write_image(tmp_path / "img.nii.gz", ref.astype(np.int16) * 100, g)
    labels, geo = pred.predict_files([tmp_path / "img.nii.gz"])
    assert geo == g and labels.dtype == np.uint8
    scores = [dice(labels == c, ref == c) for c in (1, 2, 3)]
    assert min(scores) > 0.8, scores

    rot = Geometry(g.shape, g.spacing, g.origin, (0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    write_image(tmp_path / "rot.nrrd", ref.astype(np.int16) * 100, rot)
    labels_rot, geo_rot = pred.predict_files([tmp_path / "rot.nrrd"])
    assert geo_rot == rot
    assert min(dice(labels_rot == c, ref == c) for c in (1, 2, 3)) > 0.8


def _sitk_header(path) -> tuple:
    r = sitk.ImageFileReader()
    r.SetFileName(str(path))
    r.ReadImageInformation()
    return r.GetSize(), r.GetSpacing(), r.GetOrigin(), r.GetDirection()


def test_cli_nifti_nrrd_headers_per_organ_preview_probabilities(model_dir, unlabelled_images, tmp_path):
    img = unlabelled_images / "case_004_0000.nii.gz"
    nrrd_dir = tmp_path / "in"
    nrrd_dir.mkdir()
    arr, geo = read_image(img)
    # an oblique-ish, flipped direction to exercise orientation handling
    geo = Geometry(geo.shape, geo.spacing, geo.origin, (0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    write_image(nrrd_dir / "rot_0000.nrrd", arr.astype(np.int16), geo)
    shutil.copy(img, nrrd_dir / "case_004_0000.nii.gz")
    before = sorted(p.name for p in nrrd_dir.iterdir())
    out = tmp_path / "out"
    assert predict_main(["-i", str(nrrd_dir), "-o", str(out), "-m", str(model_dir), "--no-tta", "--device", "cpu", "--step-size", "1",
                         "--preview", "--save-probabilities"]) == 0
    assert sorted(p.name for p in nrrd_dir.iterdir()) == before  # nothing written into INPUT
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["case_004.nii.gz", "case_004.npz", "case_004.png", "rot.nrrd", "rot.npz", "rot.png"])
    assert _sitk_header(out / "rot.nrrd") == _sitk_header(nrrd_dir / "rot_0000.nrrd")
    assert _sitk_header(out / "case_004.nii.gz") == _sitk_header(img)
    probs = np.load(out / "case_004.npz")
    assert probs["probabilities"].shape == (4, *geo.shape) and list(probs["labels"])[1] == "liver"
    assert (out / "case_004.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    organ = tmp_path / "organ"
    assert predict_main(["-i", str(img), "-o", str(organ), "-m", str(model_dir), "--no-tta", "--step-size", "1", "--per-organ",
                         "--lcc"]) == 0
    files = sorted(str(p.relative_to(organ)) for p in organ.rglob("*") if p.is_file())
    assert files == ["case_004/combined_labels.nii.gz", "case_004/segmentations/kidney_left.nii.gz",
                     "case_004/segmentations/liver.nii.gz", "case_004/segmentations/spleen.nii.gz"]
    liver, _ = read_image(organ / "case_004/segmentations/liver.nii.gz", dtype=np.uint8)
    comb, _ = read_image(organ / "case_004/combined_labels.nii.gz", dtype=np.uint8)
    assert np.array_equal(liver, (comb == 1).astype(np.uint8))


def test_cli_dicom_series(model_dir, unlabelled_images, tmp_path):
    arr, geo = read_image(unlabelled_images / "case_003_0000.nii.gz")
    geo = Geometry(geo.shape, geo.spacing, geo.origin, (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    series = tmp_path / "series"
    write_dicom_series(series, arr, "1.2.826.0.1.3680043.2.1125.2", geo)
    out = tmp_path / "out"
    assert predict_main(["-i", str(series), "-o", str(out), "-m", str(model_dir), "--no-tta", "--step-size", "1"]) == 0
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(series)))
    ref = reader.Execute()
    seg = sitk.ReadImage(str(out / "series.nii.gz"))
    assert seg.GetSize() == ref.GetSize()
    assert np.allclose(seg.GetSpacing(), ref.GetSpacing(), atol=1e-6)
    assert np.allclose(seg.GetOrigin(), ref.GetOrigin(), atol=1e-4)
    assert seg.GetDirection() == ref.GetDirection()

    # a second series in the same folder: refused with the list of series
    write_dicom_series(series, arr[:5], "1.2.826.0.1.3680043.2.1125.3", geo)
    with pytest.raises(SystemExit) as e:
        predict_main(["-i", str(series), "-o", str(tmp_path / "out2"), "-m", str(model_dir)])
    assert e.value.code == 2 and not (tmp_path / "out2").exists()


def test_cli_tta_and_skip_done(model_dir, unlabelled_images, tmp_path, capsys):
    inp = tmp_path / "atlas"
    for name in ("BDMAP_A", "BDMAP_B"):
        (inp / name).mkdir(parents=True)
        shutil.copy(unlabelled_images / "case_003_0000.nii.gz", inp / name / "ct.nii.gz")
    out = tmp_path / "out"
    assert predict_main(["-i", str(inp / "BDMAP_A" / "ct.nii.gz"), "-o", str(out / "BDMAP_A.nii.gz"),
                         "-m", str(model_dir), "--tta", "--tile-batch-size", "1", "--step-size", "1"]) == 0
    capsys.readouterr()
    stamp = (out / "BDMAP_A.nii.gz").stat().st_mtime_ns
    assert predict_main(["-i", str(inp), "-o", str(out), "-m", str(model_dir), "--no-tta", "--step-size", "1"]) == 0
    assert "1 already done, wrote 1 to" in capsys.readouterr().out
    assert (out / "BDMAP_A.nii.gz").stat().st_mtime_ns == stamp and (out / "BDMAP_B.nii.gz").is_file()
    a, _ = read_image(out / "BDMAP_A.nii.gz", dtype=np.uint8)
    b, _ = read_image(out / "BDMAP_B.nii.gz", dtype=np.uint8)
    assert a.shape == b.shape and (a == b).mean() > 0.5  # random weights: TTA on vs off still mostly agree


def test_predictor_from_model_and_logits(model_dir):
    plan = json.loads((model_dir / "plans.json").read_text())
    net = build_network(plan["network"], 1, plan["num_classes"])
    pred = Predictor.from_model(plan, net, device="cpu")
    logits = pred.predict_logits(np.random.default_rng(0).normal(size=(1, 20, 50, 40)).astype(np.float32))
    assert logits.shape == (4, 20, 50, 40) and logits.dtype == torch.float32
    assert net.training  # the caller's train/eval state is restored


@pytest.mark.parametrize("case", ["unreadable", "2d", "no_model", "no_fold", "pretrained", "inside_input"])
def test_cli_bad_inputs_exit_2(case, model_dir, unlabelled_images, tmp_path, capsys):
    inp = tmp_path / "in"
    inp.mkdir()
    model, extra = str(model_dir), []
    if case == "unreadable":
        (inp / "bad_0000.nii.gz").write_bytes(b"not an image")
    elif case == "2d":
        sitk.WriteImage(sitk.Image(20, 20, sitk.sitkInt16), str(inp / "flat_0000.nii.gz"))
    else:
        shutil.copy(unlabelled_images / "case_003_0000.nii.gz", inp / "case_0000.nii.gz")
    if case == "no_model":
        model = str(tmp_path / "nowhere")
    elif case == "no_fold":
        extra = ["-f", "3"]
    elif case == "pretrained":
        extra, model = ["--pretrained", "suprem_unet"], None
    out = inp / "out" if case == "inside_input" else tmp_path / "out"
    argv = ["-i", str(inp), "-o", str(out)] + (["-m", model] if model else []) + extra
    with pytest.raises(SystemExit) as e:
        predict_main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2
    assert err.startswith("error:") and "\n" not in err, err
    assert not out.exists()
    if case in ("unreadable", "2d"):
        assert "_0000.nii.gz" in err
