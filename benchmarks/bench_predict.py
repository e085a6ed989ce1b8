"""Side-by-side timing: suprem_net's sliding window vs MONAI's ``sliding_window_inference``.

Same network (the plan's, random weights), same preprocessed synthetic case, same patch,
overlap 0.5 with Gaussian weighting (sigma = patch / 8), same tile batch size, TTA off.
Also times the whole ``Predictor.predict_case`` (preprocessing + window + revert to the
original grid). Not part of the test suite::

    python -m benchmarks.bench_predict [--small-network] [--repeats 2]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _timed(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--small-network", action="store_true", help="features [4, 8, 16, 32] instead of the plan's")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    from monai.inferers import sliding_window_inference

    from suprem_net.cli.plan_and_preprocess import main as plan_main
    from suprem_net.inference.predictor import Predictor
    from suprem_net.networks import build_network
    from suprem_net.preprocessing.case import preprocess_case
    from suprem_net.synthetic import SyntheticSpec, make_case, write_raw_dataset

    with tempfile.TemporaryDirectory() as tmp:
        raw, pp = Path(tmp) / "raw", Path(tmp) / "pp"
        spec = SyntheticSpec(num_cases=4)
        write_raw_dataset(raw, 990, spec, num_test=0)
        plan_main(["-d", "990", "--raw", str(raw), "--preprocessed", str(pp), "--no-preprocess", "--device", "cpu"])
        plan = json.loads((pp / "Dataset990_SynthAbdomen" / "suprem_plans.json").read_text())
    if args.small_network:
        n = plan["network"]["kwargs"]["n_stages"]
        plan["network"]["kwargs"]["features_per_stage"] = [min(4 * 2 ** i, 64) for i in range(n)]
    torch.manual_seed(0)
    net = build_network(plan["network"], 1, plan["num_classes"])
    net.decoder.deep_supervision = False
    net.eval()
    ct, _, geo = make_case(spec, 7)
    data, _, _ = preprocess_case([ct.astype(np.float32)], geo, plan)
    patch, batch = plan["patch_size"], int(plan["batch_size"])
    print(f"case {list(geo.shape)} -> preprocessed {list(data.shape[1:])}, patch {patch}, tile batch {batch}, "
          f"{torch.get_num_threads()} threads")

    pred = Predictor.from_model(plan, net, device="cpu", tta=False, step_size=0.5, tile_batch_size=batch)
    x = torch.from_numpy(data)[None]

    def monai():
        with torch.inference_mode():
            return sliding_window_inference(x, patch, batch, net, overlap=0.5, mode="gaussian", sigma_scale=0.125)[0]

    # alternate the two so that a busy machine slows both alike; best of the repeats
    t_ours = t_monai = float("inf")
    for _ in range(args.repeats):
        t, ours = _timed(lambda: pred.predict_logits(data), 1)
        t_ours = min(t_ours, t)
        t, ref = _timed(monai, 1)
        t_monai = min(t_monai, t)
    agree = float((ours.argmax(0) == ref.argmax(0)).float().mean())
    t_case, _ = _timed(lambda: pred.predict_case([ct.astype(np.float32)], geo), 1)
    print(f"suprem_net sliding window : {t_ours:7.2f} s")
    print(f"MONAI sliding_window_inf. : {t_monai:7.2f} s")
    print(f"ratio suprem/MONAI        : {t_ours / t_monai:7.2f}")
    print(f"argmax agreement          : {agree:.4f}  (tile positions differ: nnU-Net spreads them evenly)")
    print(f"whole case (prep+window+revert to {list(geo.shape)}): {t_case:.2f} s")


if __name__ == "__main__":
    main()
