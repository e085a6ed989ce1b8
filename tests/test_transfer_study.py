"""The transfer study's mechanics in its --quick setting: atlas pre-training, planning the target
like the atlas, fine-tuned and scratch runs on subsets, prediction, evaluation, report and figures.
(It checks the mechanics, not the gain: that needs the full setting, docs/transfer.md.)"""
from __future__ import annotations

import json

from tests.benchmarks import transfer_study as study


def test_quick_study_runs_end_to_end(tmp_path):
    result = study.main(["--quick", "--out", str(tmp_path / "work"), "--report", str(tmp_path / "report")])
    s = study.SETTINGS["quick"]
    assert len(result["runs"]) == 2 * len(s.sizes) * len(s.seeds)
    for run in result["runs"]:
        assert set(run["test"]) == set(study.TARGET_CLASSES)
        assert len(run["val_pseudo_dice"]) == s.epochs
    ft = [r for r in result["runs"] if r["init"] == "finetuned"]
    log = (tmp_path / "work" / "logs" / f"train_finetuned_n{s.sizes[0]}_seed{s.seeds[0]}.txt").read_text(encoding="utf-8")
    # the atlas backbone loaded, the shared classes' head channels handed over by name
    assert "class(es) transferred by name" in log and "liver, kidney_left, kidney_right, aorta" in log
    assert "re-plan" not in log and ft
    splits = json.loads((tmp_path / "work" / "preprocessed" / study.TARGET / "splits.json").read_text(encoding="utf-8"))
    assert [len(f["train"]) for f in splits] == list(s.sizes) and len({tuple(f["val"]) for f in splits}) == 1
    report = (tmp_path / "report" / "transfer.md").read_text(encoding="utf-8")
    assert "| liver_tumor (new) |" in report and "## Label efficiency" in report
    for png in ("transfer_curves.png", "transfer_label_efficiency.png"):
        assert (tmp_path / "report" / png).stat().st_size > 10_000
    # a rerun skips every finished step
    again = study.main(["--quick", "--out", str(tmp_path / "work"), "--report", str(tmp_path / "report")])
    assert again["timings"].get("train_finetuned", 0) == 0
    assert json.dumps(again["runs"]) == json.dumps(result["runs"])
    # the report can be rewritten from the saved results alone
    (tmp_path / "report" / "transfer.md").unlink()
    study.main(["--quick", "--out", str(tmp_path / "work"), "--report", str(tmp_path / "report"), "--report-only"])
    assert "## Label efficiency" in (tmp_path / "report" / "transfer.md").read_text(encoding="utf-8")
