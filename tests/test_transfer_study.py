"""The transfer study's mechanics in its --quick setting: atlas pre-training, planning the target
like the atlas, fine-tuned and scratch runs on subsets, prediction, evaluation, report and figures.
(It checks the mechanics, not the gain: that needs the full setting, docs/transfer.md.)

The study is a benchmark script, run here as a user runs it (a separate process from the
repository root); the test reads what it writes."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TARGET = "Dataset961_SynthTarget"
NEW_CLASSES = {"liver_tumor", "duodenum"}


def _study(*args: str) -> dict:
    done = subprocess.run([sys.executable, "-m", "benchmarks.transfer_study", "--quick", *args], cwd=REPO,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done


@pytest.mark.slow
def test_quick_study_runs_end_to_end(tmp_path):
    work, report_dir = tmp_path / "work", tmp_path / "report"
    _study("--out", str(work), "--report", str(report_dir))
    result = json.loads((work / "transfer_results.json").read_text(encoding="utf-8"))
    s = result["setting"]
    assert len(result["runs"]) == 2 * len(s["sizes"]) * len(s["seeds"])
    target_classes = set(json.loads((work / "raw" / TARGET / "dataset.json").read_text(encoding="utf-8"))["labels"])
    target_classes.discard("background")
    assert NEW_CLASSES < target_classes
    for run in result["runs"]:
        assert set(run["test"]) == target_classes
        assert len(run["val_pseudo_dice"]) == s["epochs"]
    assert any(r["init"] == "finetuned" for r in result["runs"])
    log = (work / "logs" / f"train_finetuned_n{s['sizes'][0]}_seed{s['seeds'][0]}.txt").read_text(encoding="utf-8")
    # the atlas backbone loaded, the shared classes' head channels handed over by name
    assert "class(es) transferred by name" in log and "liver, kidney_left, kidney_right, aorta" in log
    assert "re-plan" not in log
    splits = json.loads((work / "preprocessed" / TARGET / "splits.json").read_text(encoding="utf-8"))
    assert [len(f["train"]) for f in splits] == list(s["sizes"]) and len({tuple(f["val"]) for f in splits}) == 1
    report = (report_dir / "transfer.md").read_text(encoding="utf-8")
    assert "| liver_tumor (new) |" in report and "## Label efficiency" in report
    for png in ("transfer_curves.png", "transfer_label_efficiency.png"):
        assert (report_dir / png).stat().st_size > 10_000
    # a rerun skips every finished step and gives the same results
    _study("--out", str(work), "--report", str(report_dir))
    again = json.loads((work / "transfer_results.json").read_text(encoding="utf-8"))
    assert again["timings"].get("train_finetuned", 0) == 0
    assert json.dumps(again["runs"]) == json.dumps(result["runs"])
    # the report can be rewritten from the saved results alone
    (report_dir / "transfer.md").unlink()
    _study("--out", str(work), "--report", str(report_dir), "--report-only")
    assert "## Label efficiency" in (report_dir / "transfer.md").read_text(encoding="utf-8")
