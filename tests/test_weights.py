"""Pre-trained checkpoints: each source's exact file layout (built here with the right shapes)
loads through the public API with exact tensor counts; unsafe, missing and mismatched files are
reported, never loaded silently."""
from __future__ import annotations

import re
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn

from suprem_net.cli.weights import main as weights_main
from suprem_net.errors import SupremError
from suprem_net.labels import UNIVERSAL_32
from suprem_net.networks import build_network
from suprem_net.weights import (
    REGISTRY,
    canonical_name,
    load_pretrained,
    read_state_dict,
    resolve_checkpoint,
)
from tests.helpers import training_extras, universal_checkpoint


class NotATensor:  # something that needs code to unpickle
    def __init__(self) -> None:
        self.payload = 42


def _randomised(sd: dict[str, torch.Tensor], gen: torch.Generator) -> OrderedDict:
    """Same keys and shapes, different values (integer buffers keep their values)."""
    out = OrderedDict()
    for k, v in sd.items():
        out[k] = torch.randn(v.shape, generator=gen) if v.is_floating_point() else v.clone()
    return out


def _backbone(model: nn.Module, head_prefix: str, gen: torch.Generator) -> OrderedDict:
    return _randomised(OrderedDict((k, v) for k, v in model.state_dict().items() if not k.startswith(head_prefix)), gen)


@pytest.fixture
def weights_dir(tmp_path, monkeypatch):
    d = tmp_path / "weights"
    d.mkdir()
    monkeypatch.setenv("SUPREM_weights", str(d))
    return d


def segresnet(num_classes: int = 3, **kwargs) -> nn.Module:
    return build_network({"family": "segresnet", "kwargs": kwargs}, 1, num_classes)


def assert_loaded(model: nn.Module, expected: dict[str, torch.Tensor], report) -> None:
    state = model.state_dict()
    assert sorted(report.loaded) == sorted(expected)
    for k, v in expected.items():
        assert torch.equal(state[k], v), k


# ---------------------------------------------------------------- registry


def test_registry_rows():
    assert len(REGISTRY) >= 11
    for name in ("suprem_unet", "suprem_swinunetr", "suprem_segresnet", "universal_swinunetr", "tang_swinunetr",
                 "valanarasu_swinunetr", "models_genesis_unet", "unimiss_tiny", "unimiss_small", "med3d", "dodnet",
                 "universal_unet"):
        e = REGISTRY[name]
        assert e.file and e.url.startswith("https://") and e.data
        assert e.supported == (e.family is not None)
        assert e.supported or e.unsupported_reason.startswith("not yet supported: ")
    assert REGISTRY["suprem_unet"].url == \
        "https://huggingface.co/MrGiovanni/SuPreM/resolve/main/supervised_suprem_unet_2100.pth"
    assert [REGISTRY[n].expected_tensors for n in ("suprem_swinunetr", "suprem_unet", "suprem_segresnet")] == [157, 104, 81]


def test_registry_param_counts(unet):
    # the published backbones, checked against the networks (the swin count is in test_networks)
    assert sum(p.numel() for n, p in unet.named_parameters() if not n.startswith("out_tr.")) == \
        REGISTRY["suprem_unet"].backbone_params
    seg = segresnet(25)
    assert sum(p.numel() for p in seg.parameters()) == 4_701_305
    assert sum(p.numel() for n, p in seg.named_parameters() if not n.startswith("conv_final.2.")) == \
        REGISTRY["suprem_segresnet"].backbone_params


# ---------------------------------------------------------------- the SuPreM three + Universal


@pytest.mark.parametrize("name", ["suprem_swinunetr", "universal_swinunetr"])
def test_universal_swinunetr_layout(swin, weights_dir, name):
    gen = torch.Generator().manual_seed(1)
    backbone = _backbone(swin, "out.", gen)
    assert len(backbone) == 157
    ckpt = universal_checkpoint(backbone, dec_ch=48, bottleneck_ch=768)
    assert len(ckpt["net"]) == 170
    torch.save(ckpt, weights_dir / REGISTRY[name].file)
    report = load_pretrained(swin, name)
    assert len(report.loaded) == 157 and report.expected == 157
    assert len(report.skipped) == 13 and not report.unexpected and not report.shape_mismatch
    assert sorted(report.missing) == ["out.conv.conv.bias", "out.conv.conv.weight"]
    assert_loaded(swin, backbone, report)


def test_suprem_unet_layout(unet, weights_dir):
    gen = torch.Generator().manual_seed(2)
    backbone = _backbone(unet, "out_tr.", gen)
    ckpt = universal_checkpoint(backbone, dec_ch=64, bottleneck_ch=512)
    assert len(ckpt["net"]) == 117
    torch.save(ckpt, weights_dir / "supervised_suprem_unet_2100.pth")
    report = load_pretrained(unet, "suprem_unet", target_labels={"background": 0, "liver": 1})
    assert len(report.loaded) == 104 and len(report.skipped) == 13
    assert sorted(report.missing) == ["out_tr.final_conv.bias", "out_tr.final_conv.weight"]
    assert "not transferable" in report.head_note and not report.head_transferred
    assert_loaded(unet, backbone, report)


def test_suprem_segresnet_layout_and_head_transfer(weights_dir):
    gen = torch.Generator().manual_seed(3)
    source = segresnet(32)
    net = OrderedDict((f"module.{k}", v) for k, v in _randomised(source.state_dict(), gen).items())
    assert len(net) == 83
    torch.save({"net": net, **training_extras()}, weights_dir / "supervised_suprem_segresnet_2100.pth")
    model = segresnet(5)
    before = model.state_dict()["conv_final.2.conv.weight"].clone()
    labels = {"background": 0, "Liver": 1, "Gallbladder": 2, "IVC": 3, "lesion": 4}
    report = load_pretrained(model, "suprem_segresnet", target_labels=labels)
    assert len(report.loaded) == 81 and report.expected == 81
    assert set(report.skipped) == {"module.conv_final.2.conv.weight", "module.conv_final.2.conv.bias"}
    assert_loaded(model, {k[len("module."):]: v for k, v in net.items() if "conv_final.2.conv" not in k}, report)
    assert report.head_transferred == {"Liver": (UNIVERSAL_32.index("liver"), 1),
                                       "Gallbladder": (UNIVERSAL_32.index("gall_bladder"), 2),
                                       "IVC": (UNIVERSAL_32.index("postcava"), 3)}
    w, b = model.state_dict()["conv_final.2.conv.weight"], model.state_dict()["conv_final.2.conv.bias"]
    for _, (src, dst) in report.head_transferred.items():
        assert torch.equal(w[dst], net["module.conv_final.2.conv.weight"][src])
        assert torch.equal(b[dst], net["module.conv_final.2.conv.bias"][src])
    assert torch.equal(w[0], before[0]) and torch.equal(w[4], before[4])  # unmatched channels untouched


# ---------------------------------------------------------------- other sources of the table


def test_tang_ssl_layout(swin, weights_dir):
    gen = torch.Generator().manual_seed(4)
    encoder = _randomised(OrderedDict((k, v) for k, v in swin.state_dict().items() if k.startswith("swinViT.")), gen)
    assert len(encoder) == 126
    # the model_swinvit.pt layout: module.<encoder key> with mlp.fc1 / mlp.fc2
    sd = OrderedDict((("module." + k[len("swinViT."):]).replace(".linear1.", ".fc1.").replace(".linear2.", ".fc2."), v)
                     for k, v in encoder.items())
    sd["module.rotation_head.weight"] = torch.randn(4, 768)
    sd["module.contrastive_head.weight"] = torch.randn(512, 768)
    sd["module.conv.0.weight"] = torch.randn(384, 768, 3, 3, 3)
    torch.save({"state_dict": sd, "epoch": 100}, weights_dir / "self_supervised_nv_swin_unetr_5050.pt")
    report = load_pretrained(swin, "tang_swinunetr")
    assert len(report.loaded) == 126 and len(report.skipped) == 3 and not report.unexpected
    assert_loaded(swin, encoder, report)


def test_valanarasu_monai_ssl_layout(swin, weights_dir):
    gen = torch.Generator().manual_seed(5)
    backbone = _backbone(swin, "out.", gen)
    sd = OrderedDict()
    sd["encoder.mask_token"] = torch.randn(1, 1, 768)
    for k, v in backbone.items():
        if k.startswith("swinViT.patch_embed."):
            sd["encoder." + k[len("swinViT."):]] = v
        elif k.startswith("swinViT.layers"):
            layer, rest = k[len("swinViT."):].split(".0.", 1)
            sd[f"encoder.{layer}.0.0.{rest}"] = v
        else:
            sd[k] = v
    sd["encoder.norm.weight"], sd["encoder.norm.bias"] = torch.randn(768), torch.randn(768)
    sd["out.conv.conv.weight"], sd["out.conv.conv.bias"] = torch.randn(1, 48, 1, 1, 1), torch.randn(1)
    torch.save({"model": sd, "epoch": 3}, weights_dir / "self_supervised_nv_swin_unetr_50000.pth")
    report = load_pretrained(swin, "valanarasu_swinunetr")
    assert len(report.loaded) == 157 and len(report.skipped) == 5 and not report.unexpected
    assert_loaded(swin, backbone, report)


def test_models_genesis_layout(unet, weights_dir):
    gen = torch.Generator().manual_seed(6)
    backbone = _backbone(unet, "out_tr.", gen)
    sd = OrderedDict((f"module.{k}", v) for k, v in backbone.items())
    sd["module.out_tr.final_conv.weight"], sd["module.out_tr.final_conv.bias"] = torch.randn(1, 64, 1, 1, 1), torch.randn(1)
    torch.save({"state_dict": sd, "epoch": 10}, weights_dir / "self_supervised_models_genesis_unet_620.pt")
    report = load_pretrained(unet, "models_genesis_unet")
    assert len(report.loaded) == 104 and len(report.skipped) == 2
    assert_loaded(unet, backbone, report)


def test_dodnet_layout(weights_dir):
    gen = torch.Generator().manual_seed(8)
    model = build_network({"family": "dodnet"}, 1, 4)
    backbone = _backbone(model, "cls_conv.", gen)
    assert len(backbone) == 103
    sd = OrderedDict((f"module.{k}", v) for k, v in backbone.items())
    sd["module.precls_conv.0.weight"], sd["module.precls_conv.0.bias"] = torch.randn(32), torch.randn(32)
    sd["module.precls_conv.2.weight"], sd["module.precls_conv.2.bias"] = torch.randn(8, 32, 1, 1, 1), torch.randn(8)
    sd["module.GAP.0.weight"], sd["module.GAP.0.bias"] = torch.randn(256), torch.randn(256)
    sd["module.controller.weight"], sd["module.controller.bias"] = torch.randn(162, 263, 1, 1, 1), torch.randn(162)
    assert len(sd) == 111
    torch.save(sd, weights_dir / "supervised_dodnet_unet_920.pth")
    report = load_pretrained(model, "dodnet", target_labels={"background": 0, "liver": 1})
    assert len(report.loaded) == 103 and len(report.skipped) == 8 and "not transferable" in report.head_note
    assert_loaded(model, backbone, report)


def test_med3d_layout(weights_dir):
    gen = torch.Generator().manual_seed(9)
    model = build_network({"family": "med3d"}, 1, 3)
    encoder = _backbone(model, "conv_seg.", gen)
    assert len(encoder) == 624
    sd = OrderedDict((f"module.{k}", v) for k, v in encoder.items())
    sd["module.conv_seg.6.weight"] = torch.randn(8, 32, 1, 1, 1)  # another task's classes
    torch.save({"state_dict": sd, "epoch": 200}, weights_dir / "supervised_med3D_residual_unet_1623.pth")
    report = load_pretrained(model, "med3d")
    assert len(report.loaded) == 624 and list(report.skipped) == ["module.conv_seg.6.weight"]
    assert_loaded(model, encoder, report)


@pytest.mark.parametrize("name", ["unimiss_tiny", "unimiss_small"])
def test_other_architecture_refused(unet, weights_dir, name):
    (weights_dir / REGISTRY[name].file).write_bytes(b"")  # refused before it is read
    with pytest.raises(SupremError, match=f"are for a {name} network, not suprem_unet"):
        load_pretrained(unet, name)


# ---------------------------------------------------------------- safety and reporting


def test_missing_file_message(weights_dir):
    with pytest.raises(SupremError) as err:
        resolve_checkpoint("suprem_unet")
    msg = str(err.value)
    assert str(weights_dir / "supervised_suprem_unet_2100.pth") in msg
    assert "https://huggingface.co/MrGiovanni/SuPreM/resolve/main/supervised_suprem_unet_2100.pth" in msg
    assert "suprem_weights download suprem_unet" in msg
    assert "\n" not in msg


def test_default_folder_is_the_user_cache(tmp_path, monkeypatch):
    from suprem_net.weights.cache import weights_dir as cache_folder

    monkeypatch.delenv("SUPREM_weights", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # Linux; HOME elsewhere
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pretrained_weights").mkdir()  # the old default, under the current directory: not used
    (tmp_path / "pretrained_weights" / "supervised_suprem_segresnet_2100.pth").write_bytes(b"")
    target = cache_folder() / "supervised_suprem_segresnet_2100.pth"
    assert target.parts[-3:-1] == ("suprem_net", "weights") and "pretrained_weights" not in str(target)
    with pytest.raises(SupremError, match="not found at " + re.escape(str(target))):
        resolve_checkpoint("suprem_segresnet")
    target.parent.mkdir(parents=True)
    target.write_bytes(b"")
    assert resolve_checkpoint("suprem_segresnet") == target


def test_unknown_name_lists_known_names(weights_dir):
    with pytest.raises(SupremError, match="suprem_unet.*suprem_segresnet|known:"):
        resolve_checkpoint("suprem_vnet")
    with pytest.raises(SupremError, match="not found"):
        resolve_checkpoint(str(weights_dir / "nope.pth"))


def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"net": {"convInit.conv.weight": torch.zeros(16, 1, 3, 3, 3)}, "args": NotATensor()}, path)
    with pytest.raises(SupremError, match="contains pickled code; refusing to load"):
        read_state_dict(path)
    with pytest.raises(SupremError, match="contains pickled code"):
        load_pretrained(segresnet(), path)
    for name, content in (("garbage.pth", b"not a checkpoint at all"), ("empty.pth", b"")):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(SupremError, match="not a readable PyTorch checkpoint"):
            read_state_dict(tmp_path / name)


def test_plain_path_reports_shape_mismatch(tmp_path):
    gen = torch.Generator().manual_seed(7)
    finetuned = _randomised(segresnet(3).state_dict(), gen)
    path = tmp_path / "finetuned.pth"
    torch.save({"network_weights": OrderedDict((f"_orig_mod.{k}", v) for k, v in finetuned.items())}, path)
    same = segresnet(3)
    report = load_pretrained(same, path)
    assert len(report.loaded) == 83 and not report.missing and report.adapter == "plain"
    other = segresnet(5)
    report = load_pretrained(other, path)
    assert len(report.loaded) == 81
    assert report.shape_mismatch == {"conv_final.2.conv.weight": ((3, 16, 1, 1, 1), (5, 16, 1, 1, 1)),
                                     "conv_final.2.conv.bias": ((3,), (5,))}
    assert sorted(report.missing) == ["conv_final.2.conv.bias", "conv_final.2.conv.weight"]
    with pytest.raises(SupremError, match="no tensor matches"):
        load_pretrained(build_network({"family": "suprem_unet"}, 1, 2), path)


def test_registry_source_into_wrong_architecture_raises(weights_dir):
    net = OrderedDict((f"module.{k}", v) for k, v in segresnet(32).state_dict().items())
    torch.save({"net": net}, weights_dir / "supervised_suprem_segresnet_2100.pth")
    with pytest.raises(SupremError, match=r"only \d+ of 81 backbone tensors"):
        load_pretrained(segresnet(3, init_filters=8), "suprem_segresnet")
    with pytest.raises(SupremError, match="are for a segresnet network"):
        load_pretrained(build_network({"family": "suprem_unet"}, 1, 2), "suprem_segresnet")


def test_other_input_channels_excuse_only_the_first_layer(weights_dir):
    net = OrderedDict((f"module.{k}", v) for k, v in segresnet(32).state_dict().items())
    torch.save({"net": net}, weights_dir / "supervised_suprem_segresnet_2100.pth")
    model = build_network({"family": "segresnet"}, 2, 3)
    report = load_pretrained(model, "suprem_segresnet")
    assert len(report.loaded) == 80 and report.input_mismatch == ["convInit.conv.weight"]


def test_canonical_names():
    assert canonical_name("Left Kidney") == canonical_name("kidney_L") == "kidney_left"
    assert canonical_name("Gallbladder") == "gall_bladder"
    assert canonical_name("inferior_vena_cava") == canonical_name("IVC") == "postcava"
    assert canonical_name("right adrenal gland") == "adrenal_gland_right"
    assert canonical_name("celiac_truck") == "celiac_trunk"
    assert canonical_name("liver tumour") == "liver_tumor"


# ---------------------------------------------------------------- CLI


def test_cli_list_info_and_errors(weights_dir, capsys):
    (weights_dir / "supervised_suprem_unet_2100.pth").write_bytes(b"")
    assert weights_main(["list"]) == 0
    out = capsys.readouterr().out
    for name in REGISTRY:
        assert name in out
    assert "present" in out and "not yet supported" not in out
    assert weights_main(["info", "suprem_swinunetr"]) == 0
    assert "supervised_suprem_swinunetr_2100.pth" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        weights_main(["check", "dodnet"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


def test_cli_check(weights_dir, capsys, tmp_path):
    net = OrderedDict((f"module.{k}", v) for k, v in segresnet(32).state_dict().items())
    torch.save({"net": net}, weights_dir / "supervised_suprem_segresnet_2100.pth")
    labels = tmp_path / "dataset.json"
    labels.write_text('{"labels": {"background": 0, "spleen": 1, "liver": 2}}')
    assert weights_main(["check", "suprem_segresnet", "--labels", str(labels)]) == 0
    out = capsys.readouterr().out
    assert "loaded      81 of 81 expected" in out and "2 class(es) transferred" in out
    plain = tmp_path / "mine.pth"
    torch.save(segresnet(4).state_dict(), plain)
    assert weights_main(["check", str(plain), "--num-classes", "4"]) == 0
    assert "loaded      83" in capsys.readouterr().out


def test_wrapped_model_is_unwrapped(weights_dir):
    net = OrderedDict((f"module.{k}", v) for k, v in segresnet(32).state_dict().items())
    torch.save({"net": net}, weights_dir / "supervised_suprem_segresnet_2100.pth")
    wrapped = nn.DataParallel(segresnet(3))
    report = load_pretrained(wrapped, "suprem_segresnet")
    assert len(report.loaded) == 81 and report.family == "segresnet"
    assert torch.equal(wrapped.module.state_dict()["convInit.conv.weight"], net["module.convInit.conv.weight"])
