"""How suprem_net scales with the number of cases on one machine (issue 9, part 3).

    python -m benchmarks.bench_scale [--cases 50 200 500] [--workers 2] [--batches 150]
                                           [--realistic] [--out DIR]

On small synthetic CT cases (80 x 120 x 120 mm, 2-2.5 mm in-plane, 2.5-4 mm slices, 10 organs)
it measures, with the SuPreM U-Net preset (RAS, 1.5 mm isotropic, HU window, as the SuPreM
pre-training pipeline):

* ``suprem_plan_and_preprocess`` on the largest N: the planning run (``--no-preprocess``: header
  checks, fingerprint, plan) and the preprocessing run separately (wall, peak RSS of the process
  tree), per case;
* the fingerprint's peak memory for every N (``--check-only`` on datasets of the first N cases,
  made of symbolic links to the same files);
* disk per case: raw NIfTI against the preprocessed blosc2 folder;
* the training loader's memory for every N: a subprocess builds the data pipeline the way the
  trainer does (``CaseStore`` + ``make_loader``, augmentation on, 1 worker process, the plan's
  batch size), draws ``--batches`` batches and reports its RSS (own and children) with psutil.

``--realistic`` adds one realistic-size case (300 x 400 x 400 mm at 0.8 mm in-plane, 2.5 mm
slices: 120 x 500 x 500 voxels) to anchor the per-voxel cost used for the extrapolation to
AbdomenAtlas 1.1 in docs/scale.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks._harness import folder_bytes, run_measured

BASE_ID = 960
PRESET = "suprem_unet"
SMALL = dict(fov_mm=(80.0, 120.0, 120.0), inplane_spacing=(2.0, 2.5), z_spacing=(2.5, 4.0), num_classes=10, seed=3)
REALISTIC = dict(fov_mm=(300.0, 400.0, 400.0), inplane_spacing=(0.8, 0.8), z_spacing=(2.5, 2.5), num_classes=10,
                 seed=5)
MiB = 2 ** 20


def _cli(name: str) -> str:
    return shutil.which(name) or str(Path(sys.executable).parent / name)


def _pp(raw: Path, pp: Path, dataset_id: int, workers: int, *extra: str) -> dict:
    return run_measured([_cli("suprem_plan_and_preprocess"), "-d", str(dataset_id), "--raw", str(raw),
                         "--preprocessed", str(pp), "-np", str(workers), "--device", "cpu", "--preset", PRESET,
                         *extra])


def _subset(raw: Path, full: Path, dataset_id: int, n: int) -> Path:
    """Dataset of the first ``n`` training cases of ``full``, as symbolic links."""
    folder = raw / f"Dataset{dataset_id:03d}_Subset{n}"
    if folder.exists():
        shutil.rmtree(folder)
    for sub in ("imagesTr", "labelsTr"):
        (folder / sub).mkdir(parents=True)
    for i in range(n):
        case = f"case_{i:03d}"
        (folder / "imagesTr" / f"{case}_0000.nii.gz").symlink_to(full / "imagesTr" / f"{case}_0000.nii.gz")
        (folder / "labelsTr" / f"{case}.nii.gz").symlink_to(full / "labelsTr" / f"{case}.nii.gz")
    spec = json.loads((full / "dataset.json").read_text())
    spec["numTraining"] = n
    (folder / "dataset.json").write_text(json.dumps(spec))
    return folder


def _raw_case_bytes(folder: Path, n: int) -> int:
    return sum(p.stat().st_size for sub in ("imagesTr", "labelsTr") for p in (folder / sub).iterdir()
               if int(p.name.split("_")[1][:3]) < n)


def loader_child(data_dir: str, plan_path: str, n: int, batches: int, workers: int) -> dict:
    """Build the training data pipeline over the first ``n`` cases like the trainer, draw ``batches``
    batches, report RSS (bytes) of this process and its workers."""
    import psutil

    from suprem_net.data.dataset import CaseStore
    from suprem_net.data.loader import close_loader, make_loader

    me = psutil.Process()

    def rss() -> tuple[int, int]:
        kids = 0
        for p in me.children(recursive=True):
            try:
                kids += p.memory_info().rss
            except psutil.Error:
                pass
        return me.memory_info().rss, kids

    plan = json.loads(Path(plan_path).read_text())
    start = rss()
    ids = sorted(p.name[:-5] for p in Path(data_dir).glob("case_*.json"))[:n]
    store = CaseStore(data_dir, ids)
    after_store = rss()
    loader = make_loader(store, ids, plan, batch_size=int(plan["batch_size"]), seed=0, rank=0, train=True,
                         iterations_per_epoch=250, start_epoch=0, num_workers=workers)
    t0 = time.perf_counter()
    peak_main, peak_kids, keys = 0, 0, set()
    for _ in range(batches):
        batch = next(loader)
        keys.update(batch["keys"])
        m, k = rss()
        peak_main, peak_kids = max(peak_main, m), max(peak_kids, k)
    wall = time.perf_counter() - t0
    end = rss()
    close_loader(loader)
    return {"n": n, "rss_start": start[0], "rss_after_store": after_store[0], "rss_end_main": end[0],
            "rss_end_workers": end[1], "peak_main": peak_main, "peak_workers": peak_kids,
            "unique_cases_drawn": len(keys), "batches": batches, "batch_size": int(plan["batch_size"]),
            "patch_size": plan["patch_size"], "s_per_batch": wall / batches,
            "store_props_cached": len(getattr(store, "_props", {})),
            "store_arrays_open": len(getattr(store, "_arrays", {}))}


def _loader_runs(ns, data_dir: Path, plan_path: Path, args) -> list[dict]:
    """Training loader memory against N, one subprocess per N."""
    out = []
    for n in ns:
        cache = ["--cache-cases", str(args.cache_cases)] if getattr(args, "cache_cases", None) else []
        r = run_measured([sys.executable, "-m", "benchmarks.bench_scale", "--loader-workers",
                          str(args.loader_workers), *cache, "--_loader_child", str(data_dir), str(plan_path), str(n),
                          str(args.batches)])
        line = [ln for ln in r["output"].splitlines() if ln.startswith("RESULT ")][-1]
        child = json.loads(line[len("RESULT "):])
        child.update({"tree_peak_rss": r["peak_rss_bytes"], "wall_s": r["wall_s"]})
        out.append(child)
        print(f"[scale] loader N={n}: tree peak {r['peak_rss_bytes'] / MiB:.0f} MiB, main end "
              f"{child['rss_end_main'] / MiB:.0f} MiB, workers end {child['rss_end_workers'] / MiB:.0f} MiB, "
              f"{child['unique_cases_drawn']} cases drawn", flush=True)
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", type=int, nargs="+", default=[50, 200, 500])
    p.add_argument("--workers", type=int, default=2, help="-np of suprem_plan_and_preprocess")
    p.add_argument("--loader-workers", type=int, default=1,
                   help="augmentation workers of the loader (the trainer's default on 2 CPUs)")
    p.add_argument("--batches", type=int, default=150)
    p.add_argument("--realistic", action="store_true", help="also measure one realistic-size CT")
    p.add_argument("--out", help="work folder (kept; reused if it holds the generated data); default: temporary")
    p.add_argument("--json", help="write all measurements to this file")
    p.add_argument("--loader-only", action="store_true",
                   help="only the loader measurements, on the data an earlier run left in --out (merged into --json)")
    p.add_argument("--cache-cases", type=int,
                   help="loader: set suprem_net.data.dataset.CACHED_CASES (e.g. 1000000 = unbounded, the behaviour "
                        "before the LRU cache); with --loader-only the results go to 'loader_cache<N>' in --json")
    p.add_argument("--_loader_child", nargs=4, metavar=("DATA", "PLAN", "N", "BATCHES"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._loader_child:
        d, plan, n, b = args._loader_child
        if args.cache_cases:
            import suprem_net.data.dataset as dataset

            dataset.CACHED_CASES = args.cache_cases
        print("RESULT " + json.dumps(loader_child(d, plan, int(n), int(b), args.loader_workers)))
        return {}

    from suprem_net.synthetic import SyntheticSpec, write_raw_dataset

    work = Path(args.out or tempfile.mkdtemp(prefix="bench_scale_"))
    raw, pp = work / "raw", work / "pp"
    ns = sorted(args.cases)
    n_max = ns[-1]
    res: dict = {"machine": {"cpus": os.cpu_count(), "loadavg_start": os.getloadavg()}, "cases": ns}
    if args.loader_only:
        res = json.loads(Path(args.json).read_text())
        name = f"Dataset{BASE_ID:03d}_ScaleSmall"
        plan_path = pp / name / f"{PRESET}_plans.json"
        data_dir = pp / name / json.loads(plan_path.read_text())["data_identifier"]
        res[f"loader_cache{args.cache_cases}" if args.cache_cases else "loader"] = _loader_runs(
            ns, data_dir, plan_path, args)
        Path(args.json).write_text(json.dumps(res, indent=1))
        print(report(res))
        return res

    name = f"Dataset{BASE_ID:03d}_ScaleSmall"
    full = raw / name
    t0 = time.perf_counter()
    if not (full / "dataset.json").is_file() or json.loads((full / "dataset.json").read_text())["numTraining"] != n_max:
        if full.exists():
            shutil.rmtree(full)
        write_raw_dataset(raw, BASE_ID, SyntheticSpec(num_cases=n_max, **SMALL), num_test=0, name="ScaleSmall")
    res["generate_s"] = time.perf_counter() - t0
    print(f"[scale] {n_max} synthetic cases in {full} ({res['generate_s']:.0f} s)", flush=True)

    # planning (header checks + fingerprint + plan) and preprocessing of the largest dataset, separately
    if (pp / name).exists():
        shutil.rmtree(pp / name)
    plan_run = _pp(raw, pp, BASE_ID, args.workers, "--no-preprocess")
    print(f"[scale] plan run: {plan_run['wall_s']:.1f} s, peak {plan_run['peak_rss_bytes'] / MiB:.0f} MiB", flush=True)
    pre_run = _pp(raw, pp, BASE_ID, args.workers)
    print(f"[scale] preprocess run: {pre_run['wall_s']:.1f} s, peak {pre_run['peak_rss_bytes'] / MiB:.0f} MiB",
          flush=True)
    plan_path = pp / name / f"{PRESET}_plans.json"
    plan = json.loads(plan_path.read_text())
    data_dir = pp / name / plan["data_identifier"]
    fp = json.loads((pp / name / "fingerprint.json").read_text())
    shapes_in = np.array([c["shape"] for c in fp["cases"]])
    res["preprocess"] = {
        "n": n_max, "plan_run_s": plan_run["wall_s"], "plan_run_peak_rss": plan_run["peak_rss_bytes"],
        "preprocess_run_s": pre_run["wall_s"], "preprocess_run_peak_rss": pre_run["peak_rss_bytes"],
        "raw_bytes": folder_bytes(full), "pp_bytes": folder_bytes(data_dir),
        "mean_input_voxels": float(np.prod(shapes_in, axis=1).mean()),
        "patch_size": plan["patch_size"], "batch_size": plan["batch_size"], "target_spacing": plan["target_spacing"],
    }
    import blosc2

    out_vox = [int(np.prod(blosc2.open(str(f)).shape)) for f in sorted(data_dir.glob("case_*[0-9].b2nd"))[:50]]
    res["preprocess"]["mean_output_voxels"] = float(np.mean(out_vox))

    # fingerprint peak memory against N (--check-only: header checks + fingerprint, writes nothing)
    res["fingerprint"] = []
    for k, n in enumerate(ns):
        sub = _subset(raw, full, BASE_ID + 1 + k, n)
        r = run_measured([_cli("suprem_plan_and_preprocess"), "-d", str(BASE_ID + 1 + k), "--raw", str(raw),
                          "--preprocessed", str(pp), "-np", str(args.workers), "--check-only"])
        res["fingerprint"].append({"n": n, "wall_s": r["wall_s"], "peak_rss": r["peak_rss_bytes"],
                                   "raw_bytes": _raw_case_bytes(full, n)})
        shutil.rmtree(sub)
        print(f"[scale] fingerprint N={n}: {r['wall_s']:.1f} s, peak {r['peak_rss_bytes'] / MiB:.0f} MiB", flush=True)

    res["loader"] = _loader_runs(ns, data_dir, plan_path, args)

    if args.realistic:
        rid = BASE_ID + 9
        rname = f"Dataset{rid:03d}_ScaleRealistic"
        if not (raw / rname / "dataset.json").is_file():
            write_raw_dataset(raw, rid, SyntheticSpec(num_cases=1, **REALISTIC), num_test=0, name="ScaleRealistic")
        if (pp / rname).exists():
            shutil.rmtree(pp / rname)
        a = _pp(raw, pp, rid, 1, "--no-preprocess")
        b = _pp(raw, pp, rid, 1)
        rplan = json.loads((pp / rname / f"{PRESET}_plans.json").read_text())
        rdir = pp / rname / rplan["data_identifier"]
        rfp = json.loads((pp / rname / "fingerprint.json").read_text())
        res["realistic"] = {
            "input_shape": rfp["cases"][0]["shape"], "spacing": rfp["cases"][0]["spacing"],
            "output_shape": list(blosc2.open(str(rdir / "case_000.b2nd")).shape),
            "plan_run_s": a["wall_s"], "plan_run_peak_rss": a["peak_rss_bytes"],
            "preprocess_run_s": b["wall_s"], "preprocess_run_peak_rss": b["peak_rss_bytes"],
            "raw_bytes": folder_bytes(raw / rname) - (raw / rname / "dataset.json").stat().st_size,
            "pp_bytes": folder_bytes(rdir)}
        print(f"[scale] realistic case: plan run {a['wall_s']:.1f} s, preprocess run {b['wall_s']:.1f} s, "
              f"peak {b['peak_rss_bytes'] / MiB:.0f} MiB", flush=True)

    res["machine"]["loadavg_end"] = os.getloadavg()
    print(report(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    if not args.out:
        shutil.rmtree(work, ignore_errors=True)
    return res


def report(res: dict) -> str:
    pr = res["preprocess"]
    n = pr["n"]
    lines = [f"machine: {res['machine']['cpus']} CPUs, load average {res['machine']['loadavg_start'][0]:.1f} at start, "
             f"{res['machine']['loadavg_end'][0]:.1f} at end",
             f"small synthetic cases: mean {pr['mean_input_voxels']:.0f} input voxels -> "
             f"{pr['mean_output_voxels']:.0f} at {pr['target_spacing']} mm; plan patch {pr['patch_size']}, "
             f"batch {pr['batch_size']}",
             "",
             f"{'stage (N=' + str(n) + ')':<34}{'wall s':>9}{'s/case':>9}{'peak RSS MiB':>14}",
             f"{'plan run (checks+fingerprint+plan)':<34}{pr['plan_run_s']:>9.1f}{pr['plan_run_s'] / n:>9.3f}"
             f"{pr['plan_run_peak_rss'] / MiB:>14.0f}",
             f"{'preprocess run':<34}{pr['preprocess_run_s']:>9.1f}{pr['preprocess_run_s'] / n:>9.3f}"
             f"{pr['preprocess_run_peak_rss'] / MiB:>14.0f}",
             "",
             f"disk per case: raw NIfTI {pr['raw_bytes'] / n / 1024:.0f} KiB, preprocessed "
             f"{pr['pp_bytes'] / n / 1024:.0f} KiB ({pr['pp_bytes'] / pr['raw_bytes']:.2f}x raw)",
             "",
             f"{'N':>5}{'fingerprint s':>15}{'fp peak MiB':>13}{'loader tree peak MiB':>22}{'main end MiB':>14}"
             f"{'workers end MiB':>17}{'cases drawn':>13}{'s/batch':>9}"]
    for f, l in zip(res["fingerprint"], res["loader"]):
        lines.append(f"{f['n']:>5}{f['wall_s']:>15.1f}{f['peak_rss'] / MiB:>13.0f}{l['tree_peak_rss'] / MiB:>22.0f}"
                     f"{l['rss_end_main'] / MiB:>14.0f}{l['rss_end_workers'] / MiB:>17.0f}"
                     f"{l['unique_cases_drawn']:>13}{l['s_per_batch']:>9.2f}")
    for key in sorted(k for k in res if k.startswith("loader_cache")):
        lines += ["", f"loader with CACHED_CASES={key[len('loader_cache'):]}:",
                  f"{'N':>5}{'loader tree peak MiB':>22}{'main end MiB':>14}{'workers end MiB':>17}{'cases drawn':>13}"
                  f"{'s/batch':>9}"]
        for l in res[key]:
            lines.append(f"{l['n']:>5}{l['tree_peak_rss'] / MiB:>22.0f}{l['rss_end_main'] / MiB:>14.0f}"
                         f"{l['rss_end_workers'] / MiB:>17.0f}{l['unique_cases_drawn']:>13}{l['s_per_batch']:>9.2f}")
    if "realistic" in res:
        r = res["realistic"]
        lines += ["", f"realistic case {r['input_shape']} at {[round(s, 2) for s in r['spacing']]} mm -> "
                  f"{r['output_shape']}: plan run {r['plan_run_s']:.1f} s "
                  f"(peak {r['plan_run_peak_rss'] / MiB:.0f} MiB), "
                  f"preprocess run {r['preprocess_run_s']:.1f} s (peak {r['preprocess_run_peak_rss'] / MiB:.0f} MiB), "
                  f"raw {r['raw_bytes'] / MiB:.1f} MiB, preprocessed {r['pp_bytes'] / MiB:.1f} MiB"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
