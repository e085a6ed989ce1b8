"""What each CPU speed-up of the training step buys, measured on the bench_train network
(PlainConvUNet 32-256, patch 24x48x48, batch 2, deep supervision, SGD, gradient clipping) on
random data, without the data loader:

    python -m benchmarks.train_step_levers [--rounds 3] [--steps 8] [--out FILE]

Each setting runs in its own process (the allocator setting cannot be undone in a process), the
settings alternate round by round, and the median time per step of each is reported relative to
the plain eager model (nnU-Net's CPU setting). ``--out FILE`` adds this call's rounds to the ones
already in FILE (so the rounds can be run one at a time) and reports all of them. The report names
the CPU and the instruction set PyTorch uses on it (``ATEN_CPU_CAPABILITY`` lowers it).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SETTINGS = {
    "eager, contiguous, instance norm (as nnU-Net on the CPU)": [],
    "group norm alone (contiguous)": ["groupnorm"],
    "+ group norm, channels-last": ["layout"],
    "+ torch.compile (model and loss)": ["layout", "compile"],
    "+ freed memory kept": ["layout", "compile", "memory"],
    "+ upsampling as matrix products (every lever on)": ["layout", "compile", "memory", "upsampling"],
    "torch.compile alone": ["compile"],
    "every lever on, 1 thread": ["layout", "compile", "memory", "upsampling", "1thread"],
}
NETWORK = {"family": "nnunet", "deep_supervision": True, "kwargs": {
    "n_stages": 4, "features_per_stage": [32, 64, 128, 256], "kernel_sizes": [[3, 3, 3]] * 4,
    "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2], [1, 2, 2]], "n_conv_per_stage": [2] * 4,
    "n_conv_per_stage_decoder": [2] * 3}}
PATCH, BATCH, CLASSES = (24, 48, 48), 2, 7


def time_steps(levers: list[str], steps: int) -> float:
    """Seconds per training step (after three warm-up steps) with the given levers."""
    import torch

    from suprem_net.networks import build_network
    from suprem_net.networks import speed as acc
    from suprem_net.losses import SegmentationLoss

    torch.manual_seed(0)
    if "1thread" in levers:
        torch.set_num_threads(1)
    model = build_network(NETWORK, 1, CLASSES)
    fmt = torch.contiguous_format
    if "groupnorm" in levers:
        acc.instance_norms_as_group_norms(model)
    if "layout" in levers:
        acc.instance_norms_as_group_norms(model)
        model.to(memory_format=torch.channels_last_3d)
        fmt = torch.channels_last_3d
    if "upsampling" in levers:
        acc.upsampling_as_matmuls(model)
    if "memory" in levers:
        assert acc.keep_freed_memory()
    loss_fn = SegmentationLoss()
    net = model
    if "compile" in levers:
        net, loss_fn = torch.compile(model, dynamic=False), torch.compile(loss_fn, dynamic=False)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5)
    x = torch.randn(BATCH, 1, *PATCH).contiguous(memory_format=fmt)
    y = torch.randint(0, CLASSES, (BATCH, 1, *PATCH))

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(net(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 12)
        opt.step()

    for _ in range(3):
        step()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t) / steps


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--out", help="JSON file that collects the rounds of several calls")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: time one setting in this process
    args = p.parse_args(argv)
    if args.one is not None:
        print("RESULT", time_steps(SETTINGS[args.one], args.steps))
        return {}
    import torch

    from suprem_net.device import describe_machine

    machine = describe_machine(torch.device("cpu"))
    times: dict[str, list[float]] = {name: [] for name in SETTINGS}
    if args.out and Path(args.out).is_file():
        saved = json.loads(Path(args.out).read_text())
        times.update({k: v for k, v in saved["times"].items() if k in SETTINGS})
    for _ in range(args.rounds):
        for name in SETTINGS:
            out = subprocess.run([sys.executable, "-m", "benchmarks.train_step_levers", "--one", name,
                                  "--steps", str(args.steps)], check=True, capture_output=True, text=True).stdout
            times[name].append(float(out.split("RESULT", 1)[1].split()[0]))
    if args.out:
        Path(args.out).write_text(json.dumps({"machine": machine, "times": times}, indent=1))
    base = float(np.median(times[next(iter(SETTINGS))]))
    print(f"{machine['cpu']}, {machine['isa']}, {machine['threads']} threads, torch {machine['torch']}")
    print(f"{'setting':<58}{'s/step (runs)':>24}{'vs eager':>10}")
    for name, ts in times.items():
        runs = ", ".join(f"{t:.2f}" for t in ts)
        print(f"{name:<58}{runs:>24}{np.median(ts) / base:>9.2f}x")
    return times


if __name__ == "__main__":
    json.dump(main(), sys.stdout, indent=1)
