"""Zero-shot prediction with the Universal-Model head stored in SuPreM checkpoints."""
import pytest
import torch
import torch.nn.functional as F

from suprem_net.cli.predict import main as predict_main
from suprem_net.io.image import read_header, read_image
from suprem_net.networks.universal import UniversalModel
from suprem_net.synthetic import make_case
from tests.helpers import tiny_spec


@pytest.fixture(scope="module")
def unet_model():
    torch.manual_seed(0)
    m = UniversalModel("suprem_unet", 32).eval()
    with torch.no_grad():
        m.organ_embedding.normal_()
    return m


def test_layout_matches_the_published_checkpoints(unet_model):
    keys = list(unet_model.state_dict())
    assert len(keys) == 117  # SuPreM U-Net file: 117 entries, 104 of them backbone (+ 1 BN counter each...)
    assert keys[0] == "organ_embedding"
    assert sum(k.startswith("backbone.") for k in keys) == 104
    assert {k.split(".")[0] for k in keys} == {"organ_embedding", "backbone", "precls_conv", "GAP", "controller",
                                              "text_to_vision"}
    assert unet_model.controller.weight.shape == (153, 512, 1, 1, 1)
    assert len(UniversalModel("swinunetr", 32).state_dict()) == 170


def test_dynamic_head_matches_an_independent_computation(unet_model):
    x = torch.randn(2, 1, 16, 16, 16)
    with torch.no_grad():
        got = unet_model.class_logits(x)
        deep, dec = unet_model.features(x)
        task = F.relu(unet_model.text_to_vision(unet_model.organ_embedding))
        for b in range(2):
            pooled = unet_model.GAP(deep[b:b + 1]).flatten()
            feats = unet_model.precls_conv(dec[b:b + 1])[0]  # (8, Z, Y, X)
            for c in (0, 7, 31):
                p = unet_model.controller(torch.cat([pooled, task[c]])[None, :, None, None, None]).flatten()
                w1, w2, w3 = p[:64].view(8, 8), p[64:128].view(8, 8), p[128:136].view(1, 8)
                b1, b2, b3 = p[136:144], p[144:152], p[152:153]
                h = torch.relu(torch.einsum("oi,izyx->ozyx", w1, feats) + b1[:, None, None, None])
                h = torch.relu(torch.einsum("oi,izyx->ozyx", w2, h) + b2[:, None, None, None])
                h = torch.einsum("oi,izyx->ozyx", w3, h) + b3[:, None, None, None]
                torch.testing.assert_close(got[b, c], h[0], rtol=1e-4, atol=1e-5)
        full = unet_model(x)
    assert full.shape[1] == 33 and torch.equal(full[:, 0], torch.zeros_like(full[:, 0]))


def _write_checkpoint(model, folder, file_name, drop=None):
    net = {f"module.{k}": v for k, v in model.state_dict().items() if k != drop}
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"net": net, "optimizer": {"state": {}, "param_groups": []}, "epoch": 3}, folder / file_name)


def _small_tiles(monkeypatch):
    """The preset's 96^3 tiles cost ~1 TFLOP per forward of the U-Net; 32^3 keeps the test fast."""
    from suprem_net.inference import zero_shot

    real = zero_shot.load_preset
    monkeypatch.setattr(zero_shot, "load_preset", lambda name: {**real(name), "patch_size": [32, 32, 32]})


def test_cli_zero_shot_keeps_geometry(unet_model, tmp_path, monkeypatch, capsys):
    from suprem_net.io.image import write_image

    _small_tiles(monkeypatch)
    _write_checkpoint(unet_model, tmp_path / "w", "supervised_suprem_unet_2100.pth")
    monkeypatch.setenv("SUPREM_weights", str(tmp_path / "w"))
    ct, _, geo = make_case(tiny_spec(fov_mm=(40.0, 60.0, 60.0)), 0)  # about 2 tiles at 1.5 mm
    write_image(tmp_path / "ct.nii.gz", ct, geo)
    out = tmp_path / "out"
    from suprem_net.inference import predictor as predictor_module

    windows = []

    class Window(predictor_module.SlidingWindow):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            windows.append(self)

    monkeypatch.setattr(predictor_module, "SlidingWindow", Window)
    assert predict_main(["-i", str(tmp_path / "ct.nii.gz"), "-o", str(out), "--pretrained", "suprem_unet",
                         "--device", "cpu", "--per-organ"]) == 0
    # as upstream: one pass, no mirroring, the volume in (x, y, z) order
    assert [w.mirrors for w in windows] == [[()]]
    labels, g = read_image(out / "ct" / "combined_labels.nii.gz", dtype=None)
    assert g.mismatch(read_header(tmp_path / "ct.nii.gz")[0]) is None
    assert labels.max() <= 32
    assert (out / "ct" / "segmentations" / "liver.nii.gz").is_file()
    assert len(list((out / "ct" / "segmentations").iterdir())) == 32


def test_incomplete_universal_checkpoint_is_refused(unet_model, tmp_path, monkeypatch, capsys):
    _write_checkpoint(unet_model, tmp_path / "w", "supervised_suprem_unet_2100.pth", drop="controller.weight")
    monkeypatch.setenv("SUPREM_weights", str(tmp_path / "w"))
    img = tmp_path / "ct.nii.gz"
    from suprem_net.io.image import write_image

    ct, _, geo = make_case(tiny_spec(), 0)
    write_image(img, ct, geo)
    with pytest.raises(SystemExit) as e:
        predict_main(["-i", str(img), "-o", str(tmp_path / "out"), "--pretrained", "suprem_unet"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "1 missing" in err and "controller.weight" in err and "\n" not in err
    assert not (tmp_path / "out").exists()
