"""The three SuPreM backbone families: exact architectures (parameter counts, key names), the
legacy Swin patch merging and the batch-statistics BatchNorm of the U-Net."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from suprem_net.errors import SupremError
from suprem_net.networks import build_network, get_family
from suprem_net.networks.swinunetr import SwinPatchMerging
from suprem_net.networks.suprem_unet import ContBatchNorm3d


def n_params(model: nn.Module, skip_prefix: str | None = None) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if not (skip_prefix and n.startswith(skip_prefix)))


def test_divisors():
    assert get_family("suprem_unet").divisor == 8
    assert get_family("swinunetr").divisor == 32
    assert get_family("segresnet").divisor == 8


def test_unet_architecture(unet):
    assert n_params(unet) == 19_075_225
    assert n_params(unet, "out_tr.") == 19_073_600
    sd = unet.state_dict()
    assert len(sd) == 106
    assert sd["down_tr64.ops.0.conv1.weight"].shape == (32, 1, 3, 3, 3)
    assert sd["up_tr256.up_conv.weight"].shape == (512, 512, 2, 2, 2)
    assert sd["up_tr256.ops.0.conv1.weight"].shape == (256, 768, 3, 3, 3)
    assert sd["up_tr64.ops.0.conv1.weight"].shape == (64, 192, 3, 3, 3)
    assert sd["out_tr.final_conv.weight"].shape == (25, 64, 1, 1, 1)
    for buf in ("running_mean", "running_var", "num_batches_tracked"):
        assert f"down_tr512.ops.1.bn1.{buf}" in sd
    unet.eval()
    with torch.no_grad():
        assert unet(torch.randn(1, 1, 32, 32, 32)).shape == (1, 25, 32, 32, 32)


def test_unet_options():
    m = build_network({"family": "suprem_unet", "kwargs": {"batch_stats_always": False}}, 2, 3, )
    assert m.down_tr64.ops[0].conv1.weight.shape == (32, 2, 3, 3, 3)
    assert all(not bn.batch_stats_always for bn in m.modules() if isinstance(bn, ContBatchNorm3d))
    with pytest.raises(SupremError, match="unknown network kwargs"):
        build_network({"family": "suprem_unet", "kwargs": {"n_class": 3}}, 1, 3)
    # deep supervision is accepted and ignored
    build_network({"family": "suprem_unet", "deep_supervision": True}, 1, 2)


def test_cont_batchnorm_uses_batch_statistics_in_eval():
    torch.manual_seed(0)
    a, b = torch.randn(1, 4, 4, 4, 4), 5 + 3 * torch.randn(1, 4, 4, 4, 4)
    faithful = ContBatchNorm3d(4, batch_stats_always=True).eval()
    alone = faithful(a)
    batched = faithful(torch.cat([a, b]))[:1]
    assert not torch.allclose(alone, batched, atol=1e-3)  # depends on the batch partner
    assert torch.allclose(alone.mean(), torch.tensor(0.0), atol=1e-5)  # normalised by its own stats
    plain = ContBatchNorm3d(4, batch_stats_always=False).eval()
    assert torch.allclose(plain(a), plain(torch.cat([a, b]))[:1])
    ref = nn.BatchNorm3d(4).eval()
    assert torch.allclose(plain(a), ref(a))


def test_swinunetr_architecture(swin):
    assert n_params(swin) == 62_187_835
    assert n_params(swin, "out.") == 62_186_610
    sd = swin.state_dict()
    assert len(sd) == 159
    assert len([k for k in sd if k.startswith("swinViT.")]) == 126
    assert sd["swinViT.patch_embed.proj.weight"].shape == (48, 1, 2, 2, 2)
    assert sd["swinViT.layers1.0.blocks.0.attn.relative_position_bias_table"].shape == (2197, 3)
    assert sd["swinViT.layers1.0.downsample.reduction.weight"].shape == (96, 384)
    assert sd["decoder5.transp_conv.conv.weight"].shape == (768, 384, 2, 2, 2)
    assert sd["decoder1.conv_block.conv1.conv.weight"].shape == (48, 96, 3, 3, 3)
    assert sd["out.conv.conv.weight"].shape == (25, 48, 1, 1, 1)
    merges = [m for m in swin.modules() if isinstance(m, SwinPatchMerging)]
    assert len(merges) == 4 and all(m.legacy for m in merges)


def test_swinunetr_options():
    m = build_network({"family": "swinunetr", "kwargs": {"legacy_patch_merging": False, "feature_size": 12}}, 1, 2)
    merges = [x for x in m.modules() if isinstance(x, SwinPatchMerging)]
    assert len(merges) == 4 and not any(x.legacy for x in merges)
    m.eval()
    with torch.no_grad():  # a forward pass on a slim variant (the full one is slow on CPU)
        assert m(torch.randn(1, 1, 64, 64, 64)).shape == (1, 2, 64, 64, 64)
    with pytest.raises(SupremError, match="unknown network kwargs"):
        build_network({"family": "swinunetr", "kwargs": {"img_size": 96}}, 1, 2)


def _reference_merge(x: torch.Tensor, flat_order: list[int]) -> torch.Tensor:
    """Independent reference: view each 2x2x2 cell as 8 sub-voxels numbered d*4 + h*2 + w."""
    b, d, h, w, c = x.shape
    cells = x.reshape(b, d // 2, 2, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 5, 2, 4, 6, 7)
    cells = cells.reshape(b, d // 2, h // 2, w // 2, 8, c)
    return torch.cat([cells[..., i, :] for i in flat_order], dim=-1)


def test_patch_merging_orders():
    x = torch.randn(2, 4, 6, 8, 3)
    legacy = SwinPatchMerging(nn.Identity(), nn.Identity(), legacy=True)
    new = SwinPatchMerging(nn.Identity(), nn.Identity(), legacy=False)
    # pre-MONAI-1.5 order, duplicates included: 000 100 010 001 101 010 001 111
    assert torch.equal(legacy(x), _reference_merge(x, [0, 4, 2, 1, 5, 2, 1, 7]))
    # MONAI >= 1.5 order: 000 100 010 001 110 101 011 111
    assert torch.equal(new(x), _reference_merge(x, [0, 4, 2, 1, 6, 5, 3, 7]))
    assert not torch.equal(legacy(x), new(x))


def test_patch_merging_matches_installed_monai_when_not_legacy():
    import monai
    from monai.networks.nets.swin_unetr import PatchMerging

    major, minor = (int(v) for v in monai.__version__.split(".")[:2])
    ref = PatchMerging(dim=3, spatial_dims=3)
    ours = SwinPatchMerging(ref.norm, ref.reduction, legacy=(major, minor) < (1, 5))
    x = torch.randn(1, 4, 4, 4, 3)
    assert torch.equal(ours(x), ref(x))


def test_dodnet_architecture():
    from suprem_net.networks.dodnet import WSConv3d

    m = build_network({"family": "dodnet", "kwargs": {}}, 1, 4)
    assert get_family("dodnet").divisor == 16
    assert n_params(m, "cls_conv.") == 17_285_920  # the model table's 17.29M
    sd = m.state_dict()
    assert len([k for k in sd if not k.startswith("cls_conv.")]) == 103
    assert sd["layer1.0.downsample.2.weight"].shape == (64, 32, 1, 1, 1)
    assert sd["x8_resb.0.conv1.weight"].shape == (128, 256, 3, 3, 3)
    assert isinstance(m.conv1, WSConv3d)
    w = torch.randn(4, 2, 3, 3, 3)
    conv = WSConv3d(2, 4, 3, padding=1, bias=False)
    conv.weight.data.copy_(w)
    flat = w.reshape(4, -1)
    ref_w = ((flat - flat.mean(1, keepdim=True)) / flat.std(1, keepdim=True)).reshape_as(w)
    x = torch.randn(1, 2, 5, 5, 5)
    assert torch.allclose(conv(x), torch.nn.functional.conv3d(x, ref_w, padding=1), atol=1e-5)
    m.eval()
    with torch.no_grad():
        assert m(torch.randn(1, 1, 32, 32, 32)).shape == (1, 4, 32, 32, 32)


def test_med3d_architecture():
    m = build_network({"family": "med3d", "kwargs": {}}, 1, 2)
    assert get_family("med3d").divisor == 8
    assert n_params(m) == 85_753_376  # the model table's 85.75M
    assert n_params(m, "conv_seg.") == 85_201_216
    sd = m.state_dict()
    assert len(sd) == 638
    assert sd["conv1.weight"].shape == (64, 1, 7, 7, 7)
    assert sd["layer3.22.conv3.weight"].shape == (1024, 256, 1, 1, 1)
    assert sd["layer4.0.downsample.0.weight"].shape == (2048, 1024, 1, 1, 1)
    assert m.layer4[1].conv2.dilation == (4, 4, 4)
    m.eval()
    with torch.no_grad():
        assert m(torch.randn(1, 1, 16, 16, 16)).shape == (1, 2, 16, 16, 16)


def test_segresnet_architecture():
    m = build_network({"family": "segresnet", "kwargs": {}}, 1, 25)
    assert n_params(m) == 4_701_305
    sd = m.state_dict()
    assert len(sd) == 83
    assert sd["convInit.conv.weight"].shape == (16, 1, 3, 3, 3)
    assert sd["conv_final.2.conv.weight"].shape == (25, 16, 1, 1, 1)
    m.eval()
    with torch.no_grad():
        assert m(torch.randn(1, 1, 32, 32, 32)).shape == (1, 25, 32, 32, 32)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("batch_stats", [True, False])
def test_suprem_unet_lean_inference_gives_the_plain_numbers(monkeypatch, channels_last, batch_stats):
    """Without gradients on the CPU the decoder's concatenation is convolved slab by slab and the norms
    run in place: the same logits and running statistics as the plain forward (which training uses)."""
    import suprem_net.networks.suprem_unet as su
    from suprem_net.networks.speed import to_channels_last

    torch.manual_seed(0)
    net = su.SupremUNet3D(1, 4, batch_stats_always=batch_stats).eval()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm3d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
    if channels_last:
        to_channels_last(net)
    x = torch.randn(1, 1, 40, 32, 24)
    x = x.contiguous(memory_format=torch.channels_last_3d) if channels_last else x
    state = {k: v.clone() for k, v in net.state_dict().items()}
    lean = su._lean
    monkeypatch.setattr(su, "_lean", lambda t: False)
    with torch.inference_mode():
        plain = net(x)
    plain_state = {k: v.clone() for k, v in net.state_dict().items()}
    net.load_state_dict(state)
    monkeypatch.setattr(su, "_lean", lean)
    monkeypatch.setattr(su.UpTransition, "slab_bytes", 64 << 10)  # several slabs in the two upper levels
    slabs = []
    conv = su._conv_of_upsampled_and_skip
    monkeypatch.setattr(su, "_conv_of_upsampled_and_skip", lambda *a: slabs.append(a[3].shape) or conv(*a))
    with torch.inference_mode():
        got = net(x)
    assert len(slabs) >= 2  # the slab path ran
    # equal voxel for voxel up to the rounding of convolutions over a few planes (bit-equal at 64 MiB slabs)
    torch.testing.assert_close(got, plain, atol=1e-5 * float(plain.abs().max()), rtol=0)
    assert torch.equal(got.argmax(1), plain.argmax(1))
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, plain_state[k], atol=1e-5, rtol=1e-5)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with torch.no_grad():  # what torch.compile or an export traces is the plain form
        slabs.clear()
        net(x)
        assert not slabs


LEAN_MEMORY = """
import sys, torch
import suprem_net.networks.suprem_unet as su
if sys.argv[1] == "plain":
    su._lean = lambda t: False

def status(key):  # kB; VmHWM is this process's own peak (ru_maxrss would include the parent's at fork)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))

net = su.SupremUNet3D(1, 7).eval()
x = torch.randn(1, 1, 64, 64, 64)
before = status("VmRSS")
with torch.inference_mode():
    net(x)
print(status("VmHWM") - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_suprem_unet_lean_inference_needs_less_memory():
    """The top decoder level's concatenation (192 channels at full resolution) is never made whole and
    the norms run in place: one forward's peak resident size above the process before it is well below
    the plain forward's."""
    def growth(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", LEAN_MEMORY, mode], capture_output=True, text=True, check=True)
        return int(out.stdout.split()[0])

    plain, lean = growth("plain"), growth("lean")
    assert lean < 0.75 * plain, (lean, plain)
