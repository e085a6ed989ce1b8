"""The CPU training speed-ups compute the same thing: group norms for instance norms, channels-last
memory and torch.compile give the plain model's outputs and gradients, and checkpoints keep their keys;
the kept freed memory spares the page faults of large tensors."""
from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch

from suprem_net.networks import build_network
from suprem_net.networks.speed import UpsamplingAsMatmul, instance_norms_as_group_norms, upsampling_as_matmuls
from suprem_net.training.acceleration import prepare_for_training
from tests.helpers import shrink_plan, tiny_net


def _step(model, x):
    model.zero_grad(set_to_none=True)
    out = model(x)
    sum((o.float() ** 2).mean() for o in out).backward()
    return [o.detach() for o in out], {n: p.grad.clone() for n, p in model.named_parameters()}


def test_prepared_model_matches_plain_model():
    torch.manual_seed(0)
    plain = build_network(tiny_net((4, 8, 16)), 1, 3)
    fast = copy.deepcopy(plain)
    fmt = prepare_for_training(fast, "nnunet", torch.device("cpu"))
    assert fmt == torch.channels_last_3d
    assert not any(isinstance(m, torch.nn.InstanceNorm3d) for m in fast.modules())
    assert any(isinstance(m, UpsamplingAsMatmul) for m in fast.modules())
    assert list(fast.state_dict()) == list(plain.state_dict())
    x = torch.randn(2, 1, 16, 24, 24)
    out_a, grad_a = _step(plain, x)
    out_b, grad_b = _step(fast, x.contiguous(memory_format=fmt))
    for a, b in zip(out_a, out_b):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    for name, g in grad_a.items():
        torch.testing.assert_close(grad_b[name], g, rtol=1e-3, atol=1e-5, msg=name)


def test_group_norm_swap_keeps_parameters_in_place():
    net = build_network(tiny_net(), 1, 2)
    before = {id(p) for p in net.parameters()}
    n = instance_norms_as_group_norms(net)
    assert n > 0 and {id(p) for p in net.parameters()} == before  # an optimiser built earlier stays valid


def test_upsampling_as_matmul_is_the_transposed_convolution():
    """Kernel = stride (anisotropic too), with and without bias, either memory layout: the same output
    and gradients as oneDNN's transposed convolution; overlapping ones are left alone."""
    torch.manual_seed(0)
    for kernel, bias in (((2, 2, 2), True), ((1, 2, 2), False), ((2, 1, 3), True)):
        plain = torch.nn.ConvTranspose3d(6, 4, kernel, kernel, bias=bias)
        fast = copy.deepcopy(plain)
        assert upsampling_as_matmuls(fast) == 1 and list(fast.state_dict()) == list(plain.state_dict())
        for fmt in (torch.contiguous_format, torch.channels_last_3d):
            x = torch.randn(2, 6, 3, 5, 4).contiguous(memory_format=fmt)
            y = torch.randn(2, 4, 3 * kernel[0], 5 * kernel[1], 4 * kernel[2])
            grads = []
            for m in (plain, fast):
                m.zero_grad()
                xi = x.clone().requires_grad_()
                out = m(xi)
                (out * y).sum().backward()
                grads.append((out.detach(), xi.grad, *(p.grad for p in m.parameters())))
            for a, b in zip(*grads):
                torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    assert upsampling_as_matmuls(torch.nn.ConvTranspose3d(4, 4, 3, 2)) == 0


@pytest.mark.slow
def test_compiled_training_run(tmp_path):
    """suprem_train --compile trains, and its checkpoint loads into a plain network."""
    from suprem_net.cli.plan_and_preprocess import main as plan_main
    from suprem_net.cli.train import main as train_main
    from suprem_net.synthetic import SyntheticSpec, write_raw_dataset

    spec = SyntheticSpec(num_cases=3, num_classes=2, fov_mm=(48, 64, 64), inplane_spacing=(2, 2), z_spacing=(3, 3))
    write_raw_dataset(tmp_path / "raw", 901, spec, num_test=0)
    common = ["--raw", str(tmp_path / "raw"), "--preprocessed", str(tmp_path / "pp")]
    assert plan_main(["-d", "901", *common, "--device", "cpu", "-np", "1"]) == 0
    shrink_plan(tmp_path / "pp" / "Dataset901_SynthAbdomen" / "suprem_plans.json", epochs=1, iterations_per_epoch=3,
                num_val_iterations=1)
    assert train_main(["901", "0", *common, "--results", str(tmp_path / "res"), "--compile", "--num-workers", "0",
                       "--no-progress-bar", "--skip-final-validation"]) == 0
    fold = tmp_path / "res" / "Dataset901_SynthAbdomen" / "suprem_plans" / "fold_0"
    assert "torch.compile failed" not in (fold / "training_log.txt").read_text(encoding="utf-8")
    weights = torch.load(fold / "checkpoint_final.pth", weights_only=True)["network_weights"]
    plain = build_network(tiny_net(), 1, 3)
    plain.load_state_dict(weights)  # strict: no _orig_mod. prefixes, instance-norm keys unchanged


def test_a_failing_compiler_falls_back_to_eager(tmp_path, monkeypatch, caplog):
    """No C++ compiler (or any inductor failure): one warning, and training goes on without compile."""
    from torch._dynamo.exc import TorchDynamoException

    from suprem_net.training import trainer

    class Broken(torch.nn.Module):
        def forward(self, x):
            raise TorchDynamoException("no C++ compiler found")

    monkeypatch.setattr(trainer, "compiled", lambda model: Broken())
    ft = trainer.FoldTraining.__new__(trainer.FoldTraining)
    ft.model = build_network(tiny_net(), 1, 3)
    ft.dist, ft.device = trainer.dd.init_distributed("cpu"), torch.device("cpu")
    ft.tr, ft.scaler, ft.autocast_dtype, ft.nonfinite_in_a_row, ft.encoder_params = {"grad_clip": 12}, None, None, 0, []
    ft.optimizer = torch.optim.SGD(ft.model.parameters(), lr=0.01)
    ft.loss_fn = lambda out, y, ann: sum(o.float().mean() for o in out)
    ft._wrap(compile_step=True)
    with caplog.at_level("WARNING"):
        loss = ft.train_step(torch.randn(2, 1, 16, 16, 16), torch.zeros(2, 1, 16, 16, 16, dtype=torch.long), False)
    assert loss is not None and ft.net is ft.model and not ft.compiling
    assert "torch.compile failed (no C++ compiler found)" in caplog.text


def test_compile_that_cannot_be_set_up_returns_the_model(monkeypatch, caplog):
    from suprem_net.networks import speed

    def broken(*a, **k):
        raise UnicodeDecodeError("ascii", b"\xe2", 0, 1, "ordinal not in range(128)")

    monkeypatch.setattr(torch, "compile", broken)
    net = build_network(tiny_net(), 1, 2)
    with caplog.at_level("WARNING"):
        assert speed.compiled(net) is net
    assert "torch.compile is not available (UnicodeDecodeError" in caplog.text


ALLOCATION_FAULTS = """
import resource, sys, torch
from suprem_net.networks.speed import keep_freed_memory
if sys.argv[1] == "kept":
    assert keep_freed_memory()
for step in range(25):  # a training step's activations: allocated, used, freed, again
    if step == 15:  # glibc settles within a few steps (at most 7 in 8 tries)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    activations = [torch.empty(12 << 20).fill_(1) for _ in range(2)]  # 48 MB each
    del activations
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_kept_memory_spares_the_page_faults_of_large_tensors():
    """By default every tensor above glibc's mmap threshold (at most 32 MB) is a fresh mapping that
    faults in page by page (12,288 faults per 48 MB); kept, the freed pages are reused."""
    faults = {mode: int(subprocess.run([sys.executable, "-c", ALLOCATION_FAULTS, mode], check=True,
                                       capture_output=True, text=True).stdout)
              for mode in ("default", "kept")}
    assert faults["default"] > 10 * 2 * 10_000
    assert faults["kept"] < 1_000


def test_cuda_training_autotunes_cudnn_unless_deterministic(monkeypatch):
    """Only a flag is set for CUDA (no GPU needed): the model keeps its layout and norms."""
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3), torch.nn.InstanceNorm3d(2, affine=True))
    cuda = torch.device("cuda")
    assert prepare_for_training(net, "nnunet", cuda) == torch.contiguous_format
    assert torch.backends.cudnn.benchmark and isinstance(net[1], torch.nn.InstanceNorm3d)
    prepare_for_training(net, "nnunet", cuda, deterministic=True)
    assert not torch.backends.cudnn.benchmark


def test_channels_last_norms_stay_within_the_documented_bound():
    """On the CPU, batch and group norm statistics of channels-last tensors are less accurate than of
    contiguous ones. docs/training.md gives the bound we keep: a training-mode forward of a SuPreM
    U-Net (batch statistics) or SegResNet (group norm) on a CT batch stays within 1e-3 of the largest
    output of a float64 forward (benchmarks/norm_precision.py measured up to 1.4e-4)."""
    from suprem_net.preprocessing.normalization import normalize
    from suprem_net.synthetic import SyntheticSpec, make_case

    ct, _, _ = make_case(SyntheticSpec(num_cases=1, seed=4, inplane_spacing=(1.5, 1.5), z_spacing=(1.5, 1.5)), 0)
    ct = normalize(ct, {"scheme": "window", "window": [-175, 250], "range": [0.0, 1.0]})
    z, y, x = (s // 2 for s in ct.shape)
    x_in = torch.from_numpy(ct[None, None, z - 16:z + 16, y - 40:y + 24, x - 40:x - 8].copy())
    x_in = torch.cat([x_in[..., :32, :], x_in[..., 32:, :]])  # a batch of two 32^3 patches
    for family in ("suprem_unet", "segresnet"):
        torch.manual_seed(0)
        model = build_network({"family": family, "kwargs": {}}, 1, 8)
        fmt = prepare_for_training(model, family, torch.device("cpu"))
        assert fmt == torch.channels_last_3d
        ref_model = copy.deepcopy(model).double().to(memory_format=torch.contiguous_format).train()
        with torch.no_grad():
            ref = ref_model(x_in.double())
            out = model.train()(x_in.contiguous(memory_format=fmt))
        assert (out.double() - ref).abs().max() <= 1e-3 * ref.abs().max(), family
