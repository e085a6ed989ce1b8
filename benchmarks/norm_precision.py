"""Does channels-last training lose precision that matters? On the CPU, PyTorch's batch and group
norms compute their statistics less accurately on channels-last tensors than on contiguous ones.
This measures, for the SuPreM U-Net (batch norm with batch statistics) and SegResNet (group norm)
as ``suprem_train`` prepares them for the CPU:

1. one training-mode forward of a real (synthetic CT, preset-normalised) batch: the largest
   difference to a float64 forward, channels-last against contiguous;
2. a short training run from the same initial weights on the same batches, channels-last
   against contiguous, with a control: contiguous on one thread instead of two (a different
   summation order, the noise floor every run already has).

    python -m benchmarks.norm_precision [--steps 20] [--patch 32] [--out norm_precision.json]
"""
from __future__ import annotations

import argparse
import copy
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from suprem_net.data.dataset import CaseStore
from suprem_net.data.loader import make_loader
from suprem_net.io.atomic import read_json
from suprem_net.networks import build_network
from suprem_net.synthetic import SyntheticSpec, write_raw_dataset
from suprem_net.training.acceleration import prepare_for_training
from suprem_net.losses import make_loss
from suprem_net.training.schedules import make_optimizer

PRESETS = ("suprem_unet", "suprem_segresnet")
DATASET_ID = 975  # apart from the other benchmarks' datasets


def prepare_data(work: Path, preset: str, patch: int) -> tuple[dict, CaseStore]:
    from suprem_net.cli.plan_and_preprocess import main as plan_main

    raw, pp = work / "raw", work / "preprocessed"
    name = f"Dataset{DATASET_ID}_SynthAbdomen"
    if not (raw / name).is_dir():
        write_raw_dataset(raw, DATASET_ID, SyntheticSpec(num_cases=4, seed=975), num_test=0)
    assert plan_main(["-d", str(DATASET_ID), "--raw", str(raw), "--preprocessed", str(pp), "--preset", preset,
                      "--device", "cpu", "-np", "2"]) == 0
    plan = read_json(pp / name / f"{preset}_plans.json")
    plan["patch_size"] = [patch] * 3
    return plan, CaseStore(pp / name / plan["data_identifier"])


def batches(plan: dict, store: CaseStore, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader = make_loader(store, store.case_ids, plan, batch_size=2, seed=0, rank=0, train=True,
                         iterations_per_epoch=n, start_epoch=0, num_workers=0)
    out = []
    for _ in range(n):
        b = next(loader)
        out.append((torch.from_numpy(np.ascontiguousarray(b["data"], dtype=np.float32)),
                    torch.from_numpy(np.ascontiguousarray(b["seg"])).long()))
    return out


def prepared_model(plan: dict) -> tuple[torch.nn.Module, torch.memory_format]:
    torch.manual_seed(0)
    model = build_network(plan["network"], 1, plan["num_classes"])
    return model, prepare_for_training(model, plan["network"]["family"], torch.device("cpu"))


def forward_error(plan: dict, x: torch.Tensor) -> dict:
    """Largest |output - float64 output| of one training-mode forward, per memory format."""
    model, _ = prepared_model(plan)
    model.train()
    ref_model = copy.deepcopy(model).double().to(memory_format=torch.contiguous_format)
    with torch.no_grad():
        ref = ref_model(x.double())
        out = {"max_abs_output": float(ref.abs().max())}
        for name, fmt in (("channels_last", torch.channels_last_3d), ("contiguous", torch.contiguous_format)):
            m = copy.deepcopy(model).to(memory_format=fmt)
            out[name] = float((m(x.contiguous(memory_format=fmt)).double() - ref).abs().max())
    return out


def train_losses(plan: dict, data: list, fmt: torch.memory_format, threads: int) -> list[float]:
    torch.set_num_threads(threads)
    model, _ = prepared_model(plan)
    model.to(memory_format=fmt).train()
    opt = make_optimizer([{"params": list(model.parameters())}], plan["training"])
    loss_fn = make_loss(plan)
    losses = []
    for x, y in data:
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x.contiguous(memory_format=fmt)), y, None)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--patch", type=int, default=32)
    p.add_argument("--out", default="norm_precision.json")
    args = p.parse_args(argv)
    threads = torch.get_num_threads()
    result = {"steps": args.steps, "patch": args.patch, "threads": threads,
              "cpu_capability": torch.backends.cpu.get_cpu_capability(), "families": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for preset in PRESETS:
            plan, store = prepare_data(Path(tmp), preset, args.patch)
            data = batches(plan, store, args.steps)
            row = {"forward": forward_error(plan, data[0][0])}
            runs = {"channels_last": train_losses(plan, data, torch.channels_last_3d, threads),
                    "contiguous": train_losses(plan, data, torch.contiguous_format, threads),
                    "contiguous_1_thread": train_losses(plan, data, torch.contiguous_format, 1)}
            torch.set_num_threads(threads)
            base = np.array(runs["contiguous"])
            row["losses"] = runs
            row["max_loss_difference"] = {k: float(np.abs(np.array(v) - base).max()) for k, v in runs.items()
                                          if k != "contiguous"}
            row["mean_last5"] = {k: float(np.mean(v[-5:])) for k, v in runs.items()}
            result["families"][plan["network"]["family"]] = row
            print(json.dumps({plan["network"]["family"]: {k: v for k, v in row.items() if k != "losses"}}), flush=True)
    Path(args.out).write_text(json.dumps(result, indent=2), encoding="utf-8")
    return result


if __name__ == "__main__":
    main()
