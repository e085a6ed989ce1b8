"""Does supervised pre-training transfer? Pre-train on a synthetic atlas, fine-tune on a small new
task, and compare with training the same network from scratch on the same budget.

    python -m benchmarks.transfer_study            # about 30 minutes on 2 cores; writes docs/transfer.md
    python -m benchmarks.transfer_study --quick    # the mechanics in a few minutes (not the gain)

Every step is the user's own command: ``suprem_plan_and_preprocess`` on the atlas, ``suprem_train``
(pre-training), ``suprem_plan_and_preprocess --like`` on the target (the atlas's spacing,
normalisation and network), then for each number of labelled cases and seed ``suprem_train`` with
``--pretrained <atlas checkpoint>`` and without, ``suprem_predict`` on the test cases and
``suprem_evaluate``. The labelled subsets are folds of the target's ``splits.json`` that share one
validation set. A rerun skips what is finished.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from suprem_net.io.atomic import write_json
from suprem_net.synthetic import ORGAN_NAMES, SyntheticSpec, write_raw_dataset

REPO = Path(__file__).resolve().parents[1]
ATLAS_ID, TARGET_ID = 960, 961
ATLAS = f"Dataset{ATLAS_ID}_SynthAtlas"
TARGET = f"Dataset{TARGET_ID}_SynthTarget"
ATLAS_CLASSES = tuple(ORGAN_NAMES[:10])
NEW_CLASSES = ("liver_tumor", "duodenum")
TARGET_CLASSES = ("liver", "kidney_left", "kidney_right", "aorta") + NEW_CLASSES  # 4 known + 2 new
TARGET_UNLABELLED = tuple(c for c in ATLAS_CLASSES if c not in TARGET_CLASSES)  # in the images, not labelled


@dataclass(frozen=True)
class Setting:
    atlas_cases: int
    pretrain_epochs: int
    pretrain_iterations: int
    val_cases: int        # target cases that validate every run (never trained on)
    test_cases: int       # target cases in imagesTs, scored with suprem_evaluate
    sizes: tuple[int, ...]  # labelled target cases per run
    seeds: tuple[int, ...]
    epochs: int
    iterations: int
    val_iterations: int
    cpu_seconds_per_iteration: float  # the atlas plan's compute budget (it sizes patch and network)
    compile: bool
    long_factor: int = 0  # > 0: one more pair (2 labelled cases, first seed) with this many times the budget


SETTINGS = {
    "full": Setting(atlas_cases=24, pretrain_epochs=40, pretrain_iterations=50, val_cases=3, test_cases=6,
                    sizes=(1, 2, 4), seeds=(0, 1, 2), epochs=10, iterations=25, val_iterations=4,
                    cpu_seconds_per_iteration=0.5, compile=True, long_factor=4),
    "quick": Setting(atlas_cases=4, pretrain_epochs=1, pretrain_iterations=3, val_cases=1, test_cases=1,
                     sizes=(1, 2), seeds=(0,), epochs=2, iterations=2, val_iterations=1,
                     cpu_seconds_per_iteration=0.5, compile=False),
}


def atlas_spec(n: int) -> SyntheticSpec:
    return SyntheticSpec(num_cases=n, classes=ATLAS_CLASSES, inplane_spacing=(3.5, 4.5), z_spacing=(4.0, 6.0),
                         noise_hu=(10.0, 25.0), seed=100)


def target_spec(n: int) -> SyntheticSpec:
    """Finer spacing and more noise than the atlas; two classes the atlas never labelled."""
    return SyntheticSpec(num_cases=n, classes=TARGET_CLASSES, unlabelled=TARGET_UNLABELLED,
                         inplane_spacing=(2.4, 3.0), z_spacing=(2.5, 3.5), noise_hu=(25.0, 40.0), seed=200)


class Study:
    def __init__(self, out: Path, s: Setting, workers: int):
        self.out, self.s, self.workers = out, s, workers
        self.raw, self.pp, self.results = out / "raw", out / "preprocessed", out / "results"
        self.logs = out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.timings: dict[str, float] = {}

    # ------------------------------------------------------------------ commands
    def cli(self, module: str, args: list[str], log_name: str) -> None:
        """Run ``python -m suprem_net.cli.<module> args`` (a fresh process, as a user would), output to a log."""
        log = self.logs / f"{log_name}.txt"
        with open(log, "w") as f:
            code = subprocess.run([sys.executable, "-m", f"suprem_net.cli.{module}", *args], stdout=f,
                                  stderr=subprocess.STDOUT).returncode
        if code:
            tail = "\n".join(log.read_text(encoding="utf-8").splitlines()[-15:])
            raise SystemExit(f"transfer study: suprem_{module} failed (exit {code}); log {log}:\n{tail}")

    def common(self) -> list[str]:
        return ["--raw", str(self.raw), "--preprocessed", str(self.pp)]

    def timed(self, name: str, fn) -> None:
        t = time.perf_counter()
        fn()
        self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t

    # ------------------------------------------------------------------ steps
    def make_data(self) -> None:
        s = self.s
        if not (self.raw / ATLAS / "dataset.json").is_file():
            write_raw_dataset(self.raw, ATLAS_ID, atlas_spec(s.atlas_cases), num_test=0, name="SynthAtlas")
        if not (self.raw / TARGET / "dataset.json").is_file():
            write_raw_dataset(self.raw, TARGET_ID, target_spec(max(s.sizes) + s.val_cases), num_test=s.test_cases,
                              name="SynthTarget")

    def pretrain(self) -> Path:
        s = self.s
        self.cli("plan_and_preprocess", ["-d", str(ATLAS_ID), *self.common(), "--device", "cpu",
                                         "--cpu-seconds-per-iteration", str(s.cpu_seconds_per_iteration),
                                         "-np", str(self.workers)], "atlas_plan")
        model_dir = self.results / "pretrain" / ATLAS / "suprem_plans"
        if not (model_dir / "fold_all" / "checkpoint_final.pth").is_file():
            self.cli("train", [str(ATLAS_ID), "all", *self.common(), "--results", str(self.results / "pretrain"),
                               "--epochs", str(s.pretrain_epochs), "--iterations-per-epoch", str(s.pretrain_iterations),
                               "--val-iterations", str(s.val_iterations), "--skip-final-validation",
                               "--no-progress-bar", "--num-workers", str(self.workers), *self._compile(),
                               *self._continue(model_dir / "fold_all")], "atlas_train")
        return model_dir

    def plan_target(self, atlas_model: Path) -> None:
        self.cli("plan_and_preprocess", ["-d", str(TARGET_ID), *self.common(), "--like", str(atlas_model / "plans.json"),
                                         "-np", str(self.workers)], "target_plan")
        cases = sorted(p.name[: -len("_0000.nii.gz")] for p in (self.raw / TARGET / "imagesTr").glob("*_0000.nii.gz"))
        labelled, val = cases[: max(self.s.sizes)], cases[max(self.s.sizes):]
        # fold i trains on the first sizes[i] labelled cases; all folds validate on the same held-out cases
        write_json(self.pp / TARGET / "splits.json", [{"train": labelled[:n], "val": val} for n in self.s.sizes])

    def jobs(self) -> list[dict]:
        """Every (init, fold, labelled cases, seed, epochs) to run: the grid, then the longer-budget pair."""
        s = self.s
        grid = [dict(init=init, fold=fold, n=n, seed=seed, epochs=s.epochs)
                for fold, n in enumerate(s.sizes) for seed in s.seeds for init in ("finetuned", "scratch")]
        if s.long_factor and 2 in s.sizes:
            grid += [dict(init=init, fold=s.sizes.index(2), n=2, seed=s.seeds[0], epochs=s.epochs * s.long_factor)
                     for init in ("finetuned", "scratch")]
        return grid

    def run_dir(self, job: dict) -> Path:
        longer = "" if job["epochs"] == self.s.epochs else f"_{job['epochs']}epochs"
        return self.results / f"{job['init']}_n{job['n']}_seed{job['seed']}{longer}"

    def finetune_or_scratch(self, atlas_model: Path, job: dict) -> None:
        s, res, fold = self.s, self.run_dir(job), job["fold"]
        name = res.name
        model_dir = res / TARGET / "transfer_plans"
        if not (model_dir / f"fold_{fold}" / "checkpoint_final.pth").is_file():
            extra = ["--pretrained", str(atlas_model / "fold_all" / "checkpoint_final.pth")] \
                if job["init"] == "finetuned" else []
            self.timed(f"train_{job['init']}", lambda: self.cli(
                "train", [str(TARGET_ID), str(fold), *self.common(), "--plans", "transfer_plans", "--results",
                          str(res), "--epochs", str(job["epochs"]), "--iterations-per-epoch", str(s.iterations),
                          "--val-iterations", str(s.val_iterations), "--seed", str(job["seed"]),
                          "--skip-final-validation", "--no-progress-bar", "--num-workers", str(self.workers),
                          *self._compile(), *self._continue(model_dir / f"fold_{fold}"), *extra], f"train_{name}"))
        pred = res / "test_predictions"
        self.timed("predict", lambda: self.cli(
            "predict", ["-i", str(self.raw / TARGET / "imagesTs"), "-o", str(pred), "-m", str(model_dir), "-f",
                        str(fold), "--no-tta", "--device", "cpu"], f"predict_{name}"))
        self.timed("evaluate", lambda: self.cli(
            "evaluate", ["-ref", str(self.raw / TARGET / "labelsTs"), "-pred", str(pred), "-l",
                         str(self.raw / TARGET / "dataset.json"), "-np", str(self.workers)], f"evaluate_{name}"))

    def _compile(self) -> list[str]:
        return ["--compile"] if self.s.compile else ["--no-compile"]

    @staticmethod
    def _continue(fold_dir: Path) -> list[str]:
        return ["--continue"] if (fold_dir / "checkpoint_latest.pth").is_file() else []

    def run(self) -> dict:
        t0 = time.perf_counter()
        self.timed("data", self.make_data)
        atlas_model = None

        def pre():
            nonlocal atlas_model
            atlas_model = self.pretrain()
        self.timed("pretrain", pre)
        self.timed("plan_target", lambda: self.plan_target(atlas_model))
        for job in self.jobs():
            print(f"[{time.perf_counter() - t0:6.0f} s] {job['init']}, {job['n']} labelled case(s), seed "
                  f"{job['seed']}, {job['epochs']} x {self.s.iterations} iterations", flush=True)
            self.finetune_or_scratch(atlas_model, job)
        self.timings["total"] = time.perf_counter() - t0
        return self.collect(atlas_model)

    # ------------------------------------------------------------------ results
    def collect(self, atlas_model: Path) -> dict:
        import torch

        runs = []
        for job in self.jobs():
            res = self.run_dir(job)
            summary = json.loads((res / "test_predictions" / "summary.json").read_text(encoding="utf-8"))
            ckpt = torch.load(res / TARGET / "transfer_plans" / f"fold_{job['fold']}" / "checkpoint_final.pth",
                              map_location="cpu", weights_only=True)
            pseudo = [float(np.nanmean(d)) if len(d) else float("nan") for d in ckpt["logging"]["pseudo_dice"]]
            runs.append({"init": job["init"], "n": job["n"], "seed": job["seed"], "epochs": job["epochs"],
                         "test": summary["mean"], "test_mean": summary["foreground_mean"], "val_pseudo_dice": pseudo})
        atlas = torch.load(atlas_model / "fold_all" / "checkpoint_final.pth", map_location="cpu", weights_only=True)
        plan = json.loads((atlas_model / "plans.json").read_text(encoding="utf-8"))
        return {"setting": self.s.__dict__, "runs": runs, "timings": self.timings,
                "atlas_pseudo_dice": [float(np.nanmean(d)) for d in atlas["logging"]["pseudo_dice"]],
                "plan": {k: plan[k] for k in ("target_spacing", "patch_size", "batch_size")} |
                        {"features": plan["network"]["kwargs"].get("features_per_stage"),
                         "gflop_per_iteration": round(plan["memory"]["flops_per_iteration"] / 1e9, 1)}}


# ---------------------------------------------------------------------- report
def _stats(values) -> tuple[float, float]:
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=float)
    return (float(v.mean()), float(v.std())) if v.size else (float("nan"), float("nan"))


def _fmt(values) -> str:
    m, sd = _stats(values)
    return f"{m:.3f} ± {sd:.3f}"


def grid_runs(result: dict) -> list[dict]:
    """The runs on the study's standard budget (not the longer-budget pair)."""
    return [r for r in result["runs"] if r.get("epochs", result["setting"]["epochs"]) == result["setting"]["epochs"]]


def longer_runs(result: dict) -> dict[str, dict]:
    return {r["init"]: r for r in result["runs"] if r not in grid_runs(result)}


def table_per_class(result: dict, n: int) -> list[str]:
    runs = [r for r in grid_runs(result) if r["n"] == n]
    lines = ["| class | DSC fine-tuned | DSC scratch | NSD fine-tuned | NSD scratch |", "|---|---|---|---|---|"]
    for cls in TARGET_CLASSES:
        tag = " (new)" if cls in NEW_CLASSES else ""
        cells = [_fmt([r["test"][cls][m] for r in runs if r["init"] == init])
                 for m in ("dsc", "nsd") for init in ("finetuned", "scratch")]
        lines.append(f"| {cls}{tag} | " + " | ".join(cells) + " |")
    cells = [_fmt([r["test_mean"][m] for r in runs if r["init"] == init])
             for m in ("dsc", "nsd") for init in ("finetuned", "scratch")]
    lines.append("| **mean** | " + " | ".join(f"**{c}**" for c in cells) + " |")
    return lines


def gains(result: dict) -> dict[int, dict]:
    out = {}
    for n in result["setting"]["sizes"]:
        by = {init: [r["test_mean"]["dsc"] for r in grid_runs(result) if r["n"] == n and r["init"] == init]
              for init in ("finetuned", "scratch")}
        paired = [a - b for a, b in zip(by["finetuned"], by["scratch"])]  # same seed, same cases
        out[n] = {"finetuned": _stats(by["finetuned"]), "scratch": _stats(by["scratch"]), "gain": _stats(paired),
                  "nsd": {init: _stats([r["test_mean"]["nsd"] for r in grid_runs(result) if r["n"] == n
                                        and r["init"] == init]) for init in ("finetuned", "scratch")}}
    return out


def class_group_gains(result: dict, n: int) -> dict[str, tuple[float, float]]:
    """Mean test DSC gain (fine-tuned - scratch, paired by seed) over the atlas's organs and over the new classes."""
    out = {}
    for group, classes in (("known", [c for c in TARGET_CLASSES if c not in NEW_CLASSES]), ("new", NEW_CLASSES)):
        diffs = []
        for seed in result["setting"]["seeds"]:
            pair = {r["init"]: r for r in grid_runs(result) if r["n"] == n and r["seed"] == seed}
            diffs.append(float(np.nanmean([pair["finetuned"]["test"][c]["dsc"] - pair["scratch"]["test"][c]["dsc"]
                                           for c in classes])))
        out[group] = _stats(diffs)
    return out


def longer_section(result: dict) -> list[str]:
    longer, s = longer_runs(result), result["setting"]
    if set(longer) != {"finetuned", "scratch"}:
        return []
    ft, sc = longer["finetuned"], longer["scratch"]
    same = {r["init"]: r for r in grid_runs(result) if r["n"] == ft["n"] and r["seed"] == ft["seed"]}
    budget = ft["epochs"] * s["iterations"]
    return [
        f"**Longer budget** ({budget} iterations, {s['long_factor']}x; {ft['n']} labelled cases, seed {ft['seed']}; "
        "dashed in the figure): does scratch catch up?",
        "",
        "| budget | DSC fine-tuned | DSC scratch | NSD fine-tuned | NSD scratch |",
        "|---|---|---|---|---|",
        *[f"| {it} iterations | {a['test_mean']['dsc']:.3f} | {b['test_mean']['dsc']:.3f} | "
          f"{a['test_mean']['nsd']:.3f} | {b['test_mean']['nsd']:.3f} |"
          for it, a, b in ((s["epochs"] * s["iterations"], same["finetuned"], same["scratch"]), (budget, ft, sc))],
        "",
        "Per class at the longer budget (DSC fine-tuned / scratch): " + ", ".join(
            f"{c} {ft['test'][c]['dsc']:.2f} / {sc['test'][c]['dsc']:.2f}" for c in TARGET_CLASSES) + ".",
        "",
    ]


def plot(result: dict, folder: Path) -> tuple[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = result["setting"]
    colours = {"finetuned": "tab:blue", "scratch": "tab:orange"}
    n_curve = 2 if 2 in s["sizes"] else s["sizes"][0]

    def save(fig, ax, name: str, **labels) -> str:
        ax.set(ylim=(0, 1), **labels)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(folder / name, dpi=110)
        plt.close(fig)
        return name

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for init, colour in colours.items():
        curves = np.array([r["val_pseudo_dice"] for r in grid_runs(result) if r["n"] == n_curve and r["init"] == init])
        x = (np.arange(curves.shape[1]) + 1) * s["iterations"]
        ax.plot(x, np.nanmean(curves, axis=0), color=colour, label=f"{init} (mean of {len(curves)} seeds)")
        ax.fill_between(x, np.nanmin(curves, axis=0), np.nanmax(curves, axis=0), color=colour, alpha=0.2)
        longer = longer_runs(result).get(init)
        if longer is not None:
            y = np.asarray(longer["val_pseudo_dice"], dtype=float)
            ax.plot((np.arange(y.size) + 1) * s["iterations"], y, color=colour, linestyle="--", alpha=0.8,
                    label=f"{init}, {s['long_factor']}x budget (seed {longer['seed']})")
    curves_png = save(fig, ax, "transfer_curves.png", xlabel="training iterations",
                      ylabel="validation pseudo Dice (mean over classes)",
                      title=f"target task, {n_curve} labelled case(s); band: min-max over seeds")

    g = gains(result)
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for init, colour in colours.items():
        ax.errorbar(s["sizes"], [g[n][init][0] for n in s["sizes"]], yerr=[g[n][init][1] for n in s["sizes"]],
                    color=colour, marker="o", capsize=4, label=init)
    eff_png = save(fig, ax, "transfer_label_efficiency.png", xlabel="labelled training cases",
                   ylabel="test DSC (mean over classes)", xticks=s["sizes"],
                   title="label efficiency (mean ± sd over seeds)")
    return curves_png, eff_png


def write_report(result: dict, folder: Path, quick: bool) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    curves_png, eff_png = plot(result, folder)
    s, g, t = result["setting"], gains(result), result["timings"]
    n_main = 2 if 2 in s["sizes"] else s["sizes"][0]
    target = g[n_main]["gain"][0] >= 0.10
    groups = class_group_gains(result, n_main)
    cmd = "python -m benchmarks.transfer_study" + (" --quick" if quick else "")
    lines = [
        "# Does pre-training transfer? Fine-tuning against training from scratch",
        "",
        f"Generated by `{cmd}` on {time.strftime('%Y-%m-%d')} ({platform.processor() or platform.machine()}, "
        f"{_cpus()} CPU cores, {t['total'] / 60:.0f} minutes in all). Rerun that command to reproduce it.",
        "",
        "## The study",
        "",
        f"- **Atlas** (`{ATLAS}`): {s['atlas_cases']} synthetic CT cases with {len(ATLAS_CLASSES)} labelled "
        f"organs ({', '.join(ATLAS_CLASSES)}), spacing 3.5-4.5 mm in plane and 4-6 mm between slices, "
        "noise 10-25 HU.",
        f"- **Target task** (`{TARGET}`): other cases (another seed), finer spacing (2.4-3.0 mm, 2.5-3.5 mm) and "
        f"more noise (25-40 HU); labels for {len(TARGET_CLASSES) - len(NEW_CLASSES)} atlas organs "
        f"({', '.join(c for c in TARGET_CLASSES if c not in NEW_CLASSES)}) and {len(NEW_CLASSES)} structures the "
        f"atlas never labelled ({', '.join(NEW_CLASSES)}); the other atlas organs are in the images but unlabelled "
        f"(background). {max(s['sizes'])} labelled training cases, {s['val_cases']} validation cases, "
        f"{s['test_cases']} test cases.",
        f"- **Pre-training**: `suprem_plan_and_preprocess -d {ATLAS_ID} --device cpu --cpu-seconds-per-iteration "
        f"{s['cpu_seconds_per_iteration']}` (nnunet, spacing {[round(v, 2) for v in result['plan']['target_spacing']]}, "
        f"patch {result['plan']['patch_size']}, batch {result['plan']['batch_size']}, features "
        f"{result['plan']['features']}, {result['plan']['gflop_per_iteration']} GFLOP per iteration), then "
        f"`suprem_train {ATLAS_ID} all` for {s['pretrain_epochs']} x {s['pretrain_iterations']} iterations "
        f"(final pseudo Dice {result['atlas_pseudo_dice'][-1]:.3f} on the atlas).",
        f"- **Target plan**: `suprem_plan_and_preprocess -d {TARGET_ID} --like <atlas model>/plans.json`: the "
        "atlas's spacing, CT normalisation, patch and network; only the labels are the target's.",
        f"- **Runs**: for {', '.join(map(str, s['sizes']))} labelled case(s) and seeds {', '.join(map(str, s['seeds']))}: "
        f"`suprem_train {TARGET_ID} FOLD --plans transfer_plans --seed S` for {s['epochs']} x {s['iterations']} "
        "iterations, once with `--pretrained <atlas>/fold_all/checkpoint_final.pth` (**fine-tuned**: backbone "
        "loaded, the head's background and known-organ channels handed over by name, new classes random) and once "
        "without (**scratch**); same plan, recipe (SGD, lr 0.01, poly), budget, seed and cases. Then "
        "`suprem_predict --no-tta` on the test cases and `suprem_evaluate` (DSC; NSD at 1 mm).",
        "",
        f"## Result: {n_main} labelled case(s)",
        "",
        f"Mean test DSC **{g[n_main]['finetuned'][0]:.3f}** fine-tuned against **{g[n_main]['scratch'][0]:.3f}** "
        f"from scratch: a gain of **{g[n_main]['gain'][0]:+.3f}** (sd {g[n_main]['gain'][1]:.3f} over "
        f"{len(s['seeds'])} seed(s), paired by seed). Target: +0.10; "
        + ("met." if target else "**not met**.") + (" (`--quick` checks the mechanics, not the gain.)" if quick else ""),
        "",
        f"By kind of class: the {len(TARGET_CLASSES) - len(NEW_CLASSES)} organs the atlas labelled gain "
        f"{groups['known'][0]:+.3f} ± {groups['known'][1]:.3f}, the {len(NEW_CLASSES)} new classes "
        f"{groups['new'][0]:+.3f} ± {groups['new'][1]:.3f} (paired by seed).",
        "",
        f"Per class on the {s['test_cases']} test cases (mean ± sd over seeds):",
        "",
        *table_per_class(result, n_main),
        "",
        f"![validation pseudo Dice over iterations]({curves_png})",
        "",
        *longer_section(result),
        "## Label efficiency",
        "",
        "| labelled cases | DSC fine-tuned | DSC scratch | gain (paired) | NSD fine-tuned | NSD scratch |",
        "|---|---|---|---|---|---|",
        *[f"| {n} | {g[n]['finetuned'][0]:.3f} ± {g[n]['finetuned'][1]:.3f} | {g[n]['scratch'][0]:.3f} ± "
          f"{g[n]['scratch'][1]:.3f} | {g[n]['gain'][0]:+.3f} ± {g[n]['gain'][1]:.3f} | "
          f"{g[n]['nsd']['finetuned'][0]:.3f} | {g[n]['nsd']['scratch'][0]:.3f} |" for n in s["sizes"]],
        "",
        f"![label efficiency]({eff_png})",
        "",
        "## What this does and does not show",
        "",
        "- The images are synthetic: organs are noisy ellipsoids and tubes that differ by intensity and position. "
        "The study shows the mechanics of transfer through our own commands (plan like the atlas, load the "
        "backbone, hand over the head by class name) and how much a pre-trained start buys at a fixed small budget; "
        "it is not a claim about real CT, where SuPreM's gains were measured.",
        "- Network, patch and budgets are sized so that everything fits about 30 minutes on 2 CPU cores: "
        f"{s['epochs'] * s['iterations']} iterations per target run, {s['pretrain_epochs'] * s['pretrain_iterations']} "
        "for pre-training. No model here is converged, so the gain is mainly *faster* learning; the longer-budget "
        "pair above is the check on whether it lasts.",
        "- Fine-tuning and scratch share the plan's recipe (SGD, lr 0.01, poly decay, no warm-up, nothing frozen); "
        "no recipe was tuned for either.",
        "",
        "## Time",
        "",
        f"Data generation {t.get('data', 0):.0f} s, pre-training (plan, preprocess, train) "
        f"{t.get('pretrain', 0):.0f} s, target plan {t.get('plan_target', 0):.0f} s, fine-tuning "
        f"{t.get('train_finetuned', 0):.0f} s, scratch {t.get('train_scratch', 0):.0f} s, prediction "
        f"{t.get('predict', 0):.0f} s, evaluation {t.get('evaluate', 0):.0f} s (each command a fresh process, "
        "as a user runs it).",
        "",
    ]
    path = folder / "transfer.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny setting that checks the mechanics in a few minutes")
    p.add_argument("--out", help="work folder (default: ./transfer_study, or ./transfer_study_quick)")
    p.add_argument("--report", help="where transfer.md and its figures go (default: docs/ for the full study, "
                                    "the work folder with --quick)")
    p.add_argument("--workers", type=int, default=2, help="worker processes for preprocessing and augmentation")
    p.add_argument("--report-only", action="store_true",
                   help="rewrite the report from the work folder's transfer_results.json, run nothing")
    args = p.parse_args(argv)
    setting = SETTINGS["quick" if args.quick else "full"]
    out = Path(args.out or ("transfer_study_quick" if args.quick else "transfer_study")).resolve()
    if args.report_only:
        result = json.loads((out / "transfer_results.json").read_text(encoding="utf-8"))
    else:
        result = Study(out, setting, args.workers).run()
        write_json(out / "transfer_results.json", result)
    report = write_report(result, Path(args.report) if args.report else (out if args.quick else REPO / "docs"),
                          args.quick)
    g = gains(result)
    for n, v in g.items():
        print(f"{n} labelled: fine-tuned {v['finetuned'][0]:.3f}, scratch {v['scratch'][0]:.3f}, "
              f"gain {v['gain'][0]:+.3f} ± {v['gain'][1]:.3f}")
    print(f"report: {report}")
    return result


if __name__ == "__main__":
    main()
