"""Prediction at the machine's limit (issue 23): where the time goes, what each lever buys, the goals.

    python -m benchmarks.predict_limits PART [PART ...]
    PART: machine | profile | levers-nnunet | levers-suprem | goals | memory | memory-full | report

Each part writes ``.bench/predict_limits/<part>.json``; ``report`` renders them into docs/benchmarks.md
(between the ``predict_limits`` markers of the machine's instruction set, so that an
AVX2 and an AVX-512 run stand side by side). Parts are separate so that each runs for minutes on a
shared machine; every figure that is compared is measured within one part, side by side.

* ``machine``: CPU, instruction sets, and the measured peaks: the best fp32 GFLOP/s of a set of 3-D
  convolutions (the SuPreM U-Net's own layer shapes, contiguous and channels-last) and of a matrix product;
* ``profile``: seconds per stage of one case (``Predictor`` with a :class:`~suprem_net.timing.StageTimes`)
  for the nnU-Net model on ct300 and for the SuPreM U-Net (96^3 tiles) on ct300, network sampled;
* ``levers-nnunet``: whole-case time of ct300 with the nnU-Net model for each lever (layout, tile
  batch, air, step, accumulation dtype, threads, compile, onnxruntime), labels against the baseline;
* ``levers-suprem``: seconds per 96^3 tile of the SuPreM U-Net per setting (layout, compile, threads,
  onnxruntime), as a share of the conv peak;
* ``goals``: ``nnUNetv2_predict`` (``-npp 1 -nps 1`` and its defaults) against ``suprem_predict`` (and
  the code before this issue) on the nnU-Net model's test cases and on ct300, TTA off, alternating:
  wall, peak RSS of the process tree, voxel agreement;
* ``memory``: peak RSS of one prediction of ct500 (512 x 512 x 500 int16, 7 classes, the SuPreM U-Net
  plan, network sampled after 6 real forwards) and of ct500 with the nnU-Net model, now and before this issue;
* ``memory-full``: ``suprem_predict`` on ct500 with the SuPreM U-Net plan, every forward real (half an
  hour on two cores).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks import _predict_data as data
from benchmarks._harness import REPO, run_measured

BASE_COMMIT = "3a0ad55"  # the code before issue 23
BASE = data.WORK / "base"
DOC = REPO / "docs" / "benchmarks.md"
MARK = "<!-- predict_limits:{} {} -->"  # begin/end, then the instruction set PyTorch used (one section each)


def _save(part: str, result: dict) -> dict:
    data.WORK.mkdir(parents=True, exist_ok=True)
    result["load_average_at_end"] = os.getloadavg()
    (data.WORK / f"{part}.json").write_text(json.dumps(result, indent=1, default=str))
    print(json.dumps(result, indent=1, default=str))
    return result


def _load(part: str) -> dict | None:
    path = data.WORK / f"{part}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _best(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


# ------------------------------------------------------------------------------------------ machine
CONV_SHAPES = [(32, 64, 96, 1), (64, 64, 96, 1), (128, 128, 48, 1), (256, 256, 24, 1), (64, 64, 32, 8)]


def conv_peak(repeats: int = 3) -> dict:
    """fp32 GFLOP/s of 3x3x3 convolutions (c_in, c_out, edge, batch), contiguous and channels-last."""
    out = {}
    with torch.inference_mode():
        for cin, cout, edge, b in CONV_SHAPES:
            conv = torch.nn.Conv3d(cin, cout, 3, padding=1).eval()
            x = torch.randn(b, cin, edge, edge, edge)
            flops = 2 * b * edge ** 3 * 27 * cin * cout
            for layout, fmt in (("contiguous", torch.contiguous_format), ("channels_last", torch.channels_last_3d)):
                c = conv.to(memory_format=fmt)
                xx = x.contiguous(memory_format=fmt)
                out[f"{cin}->{cout} @ {edge}^3 x{b} {layout}"] = flops / _best(lambda: c(xx), repeats) / 1e9
    a, b_ = torch.randn(2048, 2048), torch.randn(2048, 2048)
    mm = 2 * 2048 ** 3 / _best(lambda: torch.mm(a, b_), 5) / 1e9
    return {"convolutions": out, "conv_peak": max(out.values()), "matmul_2048": mm}


def part_machine() -> dict:
    import onnxruntime

    from suprem_net.device import describe_machine

    machine = describe_machine(torch.device("cpu"))
    cpuinfo = Path("/proc/cpuinfo")
    flags = next((line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")), "") \
        if cpuinfo.is_file() else ""
    isa = [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16") if f" {f}" in flags]
    return _save("machine", {
        "cpu": machine["cpu"], "cores": machine["logical_cpus"], "isa": isa, "torch": machine["torch"],
        "torch_cpu_capability": machine["isa"], "threads": machine["threads"],
        "onnxruntime": onnxruntime.__version__, "python": platform.python_version(), **conv_peak()})


# ------------------------------------------------------------------------------------------ profile
def _case(folder: Path):
    from suprem_net.inference.inputs import discover_cases, read_case

    (case,) = discover_cases(folder)
    return read_case(case)


def _profile_case(pred, folder: Path, sample: int = 0) -> dict:
    """Stages of one whole case (read and write included) with ``pred``'s timer."""
    from suprem_net.inference.export import write_labels

    times = pred.times
    with times("read"):
        images, geometry = _case(folder)
    if sample:
        pred.models = [data.Sampled(m, sample) for m in pred.models]
    labels, _ = pred.predict_case(images, geometry)
    out = data.WORK / "profile_out" / "case.nii.gz"
    out.parent.mkdir(parents=True, exist_ok=True)
    with times("write"):
        write_labels(out, labels, geometry)
    stages = dict(times.seconds)
    result = {"stages": stages, "tiles_run": pred.window.tiles_run, "tiles_total": pred.window.tiles_total,
              "forwards": None}
    if sample:
        result["forwards"] = sum(m.calls for m in pred.models)
        result["network_measured_forwards"] = len(pred.models[0].seconds)
        stages["network"] = sum(m.estimated_seconds() for m in pred.models)
    return result


def part_profile() -> dict:
    from suprem_net.timing import StageTimes

    ct300 = data.ct_case("ct300")
    nn = data.predictor(data.nnunet_model(), nnunet=True, device="cpu", tta=False, times=StageTimes())
    su = data.predictor(data.suprem_model(), device="cpu", tta=False, times=StageTimes())
    return _save("profile", {"nnunet_ct300": _profile_case(nn, ct300),
                             "suprem_unet_ct300": _profile_case(su, ct300, sample=3)})


# ------------------------------------------------------------------------------------------ levers
def _dice(a: np.ndarray, b: np.ndarray, classes) -> dict:
    out = {}
    for c in classes:
        x, y = a == c, b == c
        s = int(x.sum()) + int(y.sum())
        out[int(c)] = 1.0 if s == 0 else round(2 * int((x & y).sum()) / s, 5)
    return out


def _flops_per_tile(net, plan) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as fc:
        net(torch.zeros(1, len(plan["channel_names"]), *plan["patch_size"]))
    return fc.get_total_flops()


def part_levers_nnunet() -> dict:
    """Whole-case runs of ct300 with the nnU-Net model, one lever at a time against the baseline."""
    from suprem_net.timing import StageTimes

    model, case = data.nnunet_model(), data.ct_case("ct300")
    images, geometry = _case(case)
    settings = {
        "baseline (before: contiguous, FastInstanceNorm, 8 tiles per forward, every tile)":
            dict(channels_last=False, skip_air=False),
        "channels-last (group norms, matmul upsampling)": dict(channels_last=True, skip_air=False),
        "channels-last + air tiles left out (the new default)": dict(channels_last=True, skip_air=True),
        "1 tile per forward": dict(tile_batch_size=1), "4 tiles per forward": dict(tile_batch_size=4),
        "16 tiles per forward": dict(tile_batch_size=16), "32 tiles per forward": dict(tile_batch_size=32),
        "accumulation float16": dict(accumulation=torch.float16),
        "accumulation bfloat16": dict(accumulation=torch.bfloat16),
        "step 0.75": dict(step_size=0.75), "step 1.0": dict(step_size=1.0),
        "1 thread": dict(threads=1),
        "torch.compile (compilation included)": dict(compile=True),
        "onnxruntime": dict(backend="onnxruntime"),
    }
    bundle_dir = data.WORK / "nnunet_bundle"
    if not bundle_dir.is_dir():
        from suprem_net import api

        api.export_model(model, bundle_dir)
    threads = torch.get_num_threads()
    results, reference, flops = {}, None, None
    for name, s in settings.items():
        s = dict(s)
        torch.set_num_threads(s.pop("threads", threads))
        source = bundle_dir if s.pop("backend", "torch") == "onnxruntime" else model
        times = StageTimes()
        t = time.perf_counter()
        pred = data.predictor(source, nnunet=source == model, device="cpu", tta=False, times=times, **s)
        labels, _ = pred.predict_case(images, geometry)
        wall = time.perf_counter() - t
        torch.set_num_threads(threads)
        if flops is None:
            flops = _flops_per_tile(pred.models[0], pred.plan)
        if reference is None:
            reference = labels
        forwards = pred.window.tiles_run
        results[name] = {"wall_s": wall, "stages": dict(times.seconds), "tiles_run": forwards,
                         "tiles_total": pred.window.tiles_total,
                         "network_gflops": flops * forwards / times.seconds["network"] / 1e9,
                         "voxel_agreement": float((labels == reference).mean()),
                         "dice_vs_baseline": _dice(labels, reference, range(1, pred.plan["num_classes"]))}
        print(name, json.dumps(results[name]), file=sys.stderr)
    return _save("levers-nnunet", {"gflop_per_tile": flops / 1e9, "settings": results})


def part_levers_suprem(repeats: int = 2) -> dict:
    """Seconds per 96^3 tile of the SuPreM U-Net (batch 1: it normalises with the batch's statistics)."""
    from suprem_net.inference.bundle import load_bundle
    from suprem_net.inference.predictor import load_model_dir, prepare_for_inference

    model = data.suprem_model()
    plan, (net,) = load_model_dir(model)
    flops = _flops_per_tile(net, plan)
    x = torch.randn(1, 1, *plan["patch_size"])
    bundle_dir = data.WORK / "suprem_bundle"
    if not bundle_dir.is_dir():
        from suprem_net import api

        api.export_model(model, bundle_dir)
    threads = torch.get_num_threads()
    out = {}

    def timed(name, fn, n_threads=threads):
        torch.set_num_threads(n_threads)
        with torch.inference_mode():
            t0 = time.perf_counter()
            fn()  # warm-up (and compilation)
            first = time.perf_counter() - t0
            secs = min(_timed_once(fn) for _ in range(repeats))
        torch.set_num_threads(threads)
        out[name] = {"s_per_tile": secs, "first_s": first, "gflops": flops / secs / 1e9}
        print(name, out[name], file=sys.stderr)

    _, (contig,) = load_model_dir(model)
    timed("contiguous (before)", lambda: contig(x))
    _, (cl,) = load_model_dir(model)
    cl = prepare_for_inference(cl, channels_last=True)
    xc = x.contiguous(memory_format=torch.channels_last_3d)
    timed("channels-last + matmul upsampling (the new default)", lambda: cl(xc))
    timed("channels-last, 1 thread", lambda: cl(xc), 1)
    _, (comp,) = load_model_dir(model)
    comp = prepare_for_inference(comp, channels_last=True, compile=True)
    timed("channels-last + torch.compile", lambda: comp(xc))
    _, (ort,), _ = load_bundle(bundle_dir)
    timed("onnxruntime", lambda: ort(x))
    return _save("levers-suprem", {"gflop_per_tile": flops / 1e9, "settings": out})


def _timed_once(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


# ------------------------------------------------------------------------------------------ goals
def base_checkout() -> Path:
    """``suprem_net`` as it was before this issue, extracted from git (for side-by-side runs: run with
    this folder as the working directory, which ``python -m`` puts before PYTHONPATH)."""
    if not (BASE / "suprem_net").is_dir():
        BASE.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(REPO), "archive", BASE_COMMIT, "suprem_net"], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(BASE)], input=archive, check=True)
    return BASE


def _ours(case_dir: Path, out: Path, model: Path, nnunet: bool, base: bool = False, sample: int = 0) -> dict:
    """One process per case folder: ``suprem_predict`` (this code) or the runner with the code before."""
    shutil.rmtree(out, ignore_errors=True)
    if not base:
        cmd = [sys.executable, "-m", "suprem_net.cli.predict", "-i", str(case_dir), "-o", str(out), "--device", "cpu",
               "--no-tta", "--overwrite", "--nnunet-model" if nnunet else "-m", str(model)]
        return run_measured(cmd, env={"PYTHONPATH": str(REPO)}, cwd=REPO)
    walls, peaks = [], []
    for f in sorted(case_dir.glob("*_0000.nii.gz")):  # the runner takes one case per process
        single = out.parent / f"{out.name}_in" / f.name.replace("_0000.nii.gz", "")
        single.mkdir(parents=True, exist_ok=True)
        if not (single / f.name).exists():
            (single / f.name).symlink_to(f.resolve())
        cmd = [sys.executable, "-m", "benchmarks._predict_data", str(single),
               str(out / f.name.replace("_0000", "")), str(model)] + (["--nnunet"] if nnunet else []) + \
            (["--sample", str(sample)] if sample else [])
        r = run_measured(cmd, env={"PYTHONPATH": f"{base_checkout()}:{REPO}"}, cwd=base_checkout())
        walls.append(r["wall_s"])
        peaks.append(r["peak_rss_bytes"])
    return {"wall_s": sum(walls), "peak_rss_bytes": max(peaks)}


def _nnunet(case_dir: Path, out: Path, single_process: bool) -> dict:
    from benchmarks import nnunet_agreement as agree
    from benchmarks._harness import ensure_nnunet_env

    shutil.rmtree(out, ignore_errors=True)
    cmd = [str(ensure_nnunet_env() / "nnUNetv2_predict"), "-i", str(case_dir), "-o", str(out), "-d",
           str(agree.DATASET_ID), "-c", "3d_fullres", "-tr", agree.TRAINER, "-f", "0", "-step_size", "0.5",
           "-device", "cpu", "--disable_tta", "--disable_progress_bar"] + (["-npp", "1", "-nps", "1"] if single_process
                                                                           else [])
    return run_measured(cmd, env=agree.nn_env(data.AGREEMENT))


def _agreement(ours: Path, theirs: Path) -> dict:
    from suprem_net.io.image import read_image

    same = total = 0
    for f in sorted(theirs.glob("*.nii.gz")):
        a, _ = read_image(ours / f.name, dtype=None)
        b, _ = read_image(f, dtype=None)
        same += int((a == b).sum())
        total += a.size
    return {"voxel_agreement": same / total, "voxels": total}


def part_goals() -> dict:
    model = data.nnunet_model()
    inputs = {"test cases (2, ~27 x 140 x 140)": data.nnunet_test_cases(), "ct300 (512 x 512 x 300)":
              data.ct_case("ct300")}
    results = {}
    for label, case_dir in inputs.items():
        tag = "small" if "test" in label else "ct300"
        runs = {}
        runs["nnU-Net -npp 1 -nps 1"] = _nnunet(case_dir, data.WORK / f"g_{tag}_nn1", True)
        runs["suprem_predict"] = _ours(case_dir, data.WORK / f"g_{tag}_ours", model, True)
        runs["nnU-Net defaults"] = _nnunet(case_dir, data.WORK / f"g_{tag}_nnd", False)
        runs["suprem_net before this issue"] = _ours(case_dir, data.WORK / f"g_{tag}_base", model, True, base=True)
        runs["suprem_predict (again)"] = _ours(case_dir, data.WORK / f"g_{tag}_ours2", model, True)
        rows = {k: {"wall_s": v["wall_s"], "peak_rss_mib": v["peak_rss_bytes"] / 2 ** 20} for k, v in runs.items()}
        for k, out in (("suprem_predict", "ours"), ("suprem_net before this issue", "base"),
                       ("nnU-Net defaults", "nnd")):
            rows[k].update(_agreement(data.WORK / f"g_{tag}_{out}", data.WORK / f"g_{tag}_nn1"))
        results[label] = rows
        print(label, json.dumps(rows), file=sys.stderr)
    return _save("goals", results)


def part_memory() -> dict:
    ct500, model, nn_model = data.ct_case("ct500"), data.suprem_model(), data.nnunet_model()
    runs = {
        "SuPreM U-Net plan, 7 classes (network sampled)": _ours_one(ct500, model, False, 6),
        "SuPreM U-Net plan, before this issue": _ours_one(ct500, model, False, 6, base=True),
        "nnU-Net model": _ours_one(ct500, nn_model, True, 0),
        "nnU-Net model, before this issue": _ours_one(ct500, nn_model, True, 0, base=True),
    }
    return _save("memory", {k: {"wall_s": v["wall_s"], "peak_rss_mib": v["peak_rss_bytes"] / 2 ** 20}
                            for k, v in runs.items()})


def part_memory_full() -> dict:
    """``suprem_predict`` itself on ct500 with the SuPreM U-Net plan, every forward real (half an hour on
    two cores): the figure the sampled rows stand for."""
    r = _ours(data.ct_case("ct500"), data.WORK / "mf_out", data.suprem_model(), False)
    return _save("memory-full", {"suprem_predict, SuPreM U-Net plan, 7 classes, every forward real":
                                 {"wall_s": r["wall_s"], "peak_rss_mib": r["peak_rss_bytes"] / 2 ** 20}})


def _ours_one(case_dir: Path, model: Path, nnunet: bool, sample: int, base: bool = False) -> dict:
    """One case in the runner process (this code or the code before), network sampled if asked."""
    cmd = [sys.executable, "-m", "benchmarks._predict_data", str(case_dir), str(data.WORK / "m_out" / "case.nii.gz"),
           str(model)] + (["--nnunet"] if nnunet else []) + (["--sample", str(sample)] if sample else [])
    path = f"{base_checkout()}:{REPO}" if base else str(REPO)
    r = run_measured(cmd, env={"PYTHONPATH": path}, cwd=base_checkout() if base else REPO)
    print(model.name, base, r["wall_s"], r["peak_rss_bytes"] / 2 ** 20, file=sys.stderr)
    return r


# ------------------------------------------------------------------------------------------ report
def _row(*cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def render(parts: dict) -> str:
    """The parts measured so far as markdown (a part not run yet is named as missing)."""
    out, m = [], parts.get("machine")
    peak = m["conv_peak"] if m else None
    if m:
        out += [f"Machine: {m['cpu']}, {m['cores']} cores, {'/'.join(m['isa'])} (PyTorch uses "
                f"{m['torch_cpu_capability']}), torch {m['torch']}, onnxruntime {m['onnxruntime']}. Measured fp32 "
                f"peaks: 3x3x3 convolutions {peak:.0f} GFLOP/s (the best of the SuPreM U-Net's layer shapes, "
                f"channels-last), 2048^2 matrix product {m['matmul_2048']:.0f} GFLOP/s.", ""]
    prof = parts.get("profile")
    if prof:
        names = {"nnunet_ct300": "nnU-Net model", "suprem_unet_ct300": "SuPreM U-Net, 96^3 tiles"}
        stages = list(next(iter(prof.values()))["stages"]) if isinstance(next(iter(prof.values())), dict) else []
        stages = [s for s in stages if s in prof["nnunet_ct300"]["stages"]]
        out += ["Where the time goes (ct300, 512 x 512 x 300 int16, no TTA, seconds; the SuPreM U-Net's "
                "network time is its mean real forward times the forwards):", "",
                _row("stage", *(names[k] for k in names)), _row("---", *(["---:"] * len(names)))]
        for s in stages:
            cells = []
            for k in names:
                st = prof[k]["stages"]
                cells.append(f"{st.get(s, 0):.2f} ({100 * st.get(s, 0) / sum(st.values()):.0f} %)")
            out.append(_row(s, *cells))
        out.append(_row("**total**", *(f"**{sum(prof[k]['stages'].values()):.1f}**" for k in names)))
        out.append(_row("tiles run / all", *(f"{prof[k]['tiles_run']} / {prof[k]['tiles_total']}" for k in names)))
        out.append("")
    lv = parts.get("levers-nnunet")
    if lv:
        out += [f"Levers, nnU-Net model on ct300 ({lv['gflop_per_tile']:.1f} GFLOP per tile), whole case:", "",
                _row("setting", "wall s", "network s", "network GFLOP/s", "of conv peak", "tiles run",
                     "voxels as baseline", "lowest DSC vs baseline"),
                _row("---", "---:", "---:", "---:", "---:", "---:", "---:", "---:")]
        for name, r in lv["settings"].items():
            share = f"{100 * r['network_gflops'] / peak:.0f} %" if peak else ""
            out.append(_row(name, f"{r['wall_s']:.1f}", f"{r['stages']['network']:.1f}",
                            f"{r['network_gflops']:.0f}", share, f"{r['tiles_run']}/{r['tiles_total']}",
                            f"{r['voxel_agreement']:.5f}", f"{min(r['dice_vs_baseline'].values()):.4f}"))
        out.append("")
    ls = parts.get("levers-suprem")
    if ls:
        out += [f"Levers, SuPreM U-Net, one 96^3 tile ({ls['gflop_per_tile']:.0f} GFLOP):", "",
                _row("setting", "s per tile", "GFLOP/s", "of conv peak", "first call s"),
                _row("---", "---:", "---:", "---:", "---:")]
        for name, r in ls["settings"].items():
            share = f"{100 * r['gflops'] / peak:.0f} %" if peak else ""
            out.append(_row(name, f"{r['s_per_tile']:.2f}", f"{r['gflops']:.0f}", share, f"{r['first_s']:.1f}"))
        out.append("")
    goals = parts.get("goals")
    if goals:
        out += ["Side by side (one run, alternating; TTA off; peak RSS of the process tree):", ""]
        for label, rows in goals.items():
            if not isinstance(rows, dict):  # load_average_at_end
                continue
            ref, dflt = rows["nnU-Net -npp 1 -nps 1"], rows["nnU-Net defaults"]
            out += [f"{label}:", "", _row("tool", "wall s", "vs nnU-Net -npp 1 -nps 1", "vs nnU-Net defaults",
                                          "peak RSS MiB", "RSS vs nnU-Net -npp 1", "voxel agreement with nnU-Net"),
                    _row("---", "---:", "---:", "---:", "---:", "---:", "---:")]
            for name, r in rows.items():
                agree = f"{r['voxel_agreement']:.5f}" if "voxel_agreement" in r else ""
                out.append(_row(name, f"{r['wall_s']:.1f}", f"{r['wall_s'] / ref['wall_s']:.2f}x",
                                f"{r['wall_s'] / dflt['wall_s']:.2f}x", f"{r['peak_rss_mib']:.0f}",
                                f"{r['peak_rss_mib'] / ref['peak_rss_mib']:.2f}x", agree))
            out.append("")
    mem = {**(parts.get("memory") or {}), **(parts.get("memory-full") or {})}
    if mem:
        out += ["Memory, ct500 (512 x 512 x 500 int16, 7 classes), one process:", "",
                _row("run", "wall s", "peak RSS MiB"), _row("---", "---:", "---:")]
        out += [_row(k, f"{r['wall_s']:.1f}", f"{r['peak_rss_mib']:.0f}")
                for k, r in mem.items() if isinstance(r, dict)]
        out.append("")
    missing = [k for k in PARTS if not parts.get(k)]
    if missing:
        out.append(f"Not measured in this run: {', '.join(missing)}.")
    return "\n".join(out).rstrip() + "\n"


def write_report(parts: dict) -> None:
    """Replace the section of this machine's instruction set in docs/benchmarks.md (between its markers)
    by :func:`render`'s text; a new instruction set gets its own section after the others."""
    isa = (parts.get("machine") or {}).get("torch_cpu_capability", "unknown")
    begin, end = MARK.format("begin", isa), MARK.format("end", isa)
    text = DOC.read_text()
    if begin not in text:
        last = text.rfind(MARK.format("end", "").rstrip(" ->"))
        cut = text.index("-->", last) + 3 if last >= 0 else len(text.rstrip())
        text = f"{text[:cut]}\n\n{begin}\n{end}{text[cut:]}"
    head, rest = text.split(begin, 1)
    tail = rest.split(end, 1)[1]
    DOC.write_text(f"{head}{begin}\n{render(parts)}{end}{tail}")
    print(render(parts))


PARTS = {"machine": part_machine, "profile": part_profile, "levers-nnunet": part_levers_nnunet,
         "levers-suprem": part_levers_suprem, "goals": part_goals, "memory": part_memory,
         "memory-full": part_memory_full}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("parts", nargs="+", choices=[*PARTS, "report"])
    args = p.parse_args(argv)
    for part in args.parts:
        if part == "report":
            write_report({name: _load(name) for name in PARTS})
        else:
            PARTS[part]()


if __name__ == "__main__":
    main()
