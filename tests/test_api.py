"""The library API under the commands (plan_and_preprocess, train, predict, evaluate) and the checked
plan file."""
from __future__ import annotations

import json

import numpy as np
import pytest

from suprem_net import api
from suprem_net.errors import InputError, SupremError
from suprem_net.io.image import read_image
from suprem_net.plan import load_plan, plan_problem
from tests.helpers import DS, shrink_plan, tiny_net


def test_the_pipeline_through_the_api(tiny_raw, tmp_path):
    raw, pp, results = tiny_raw.parent, tmp_path / "pp", tmp_path / "results"
    planned = api.plan_and_preprocess(901, raw=raw, preprocessed=pp, device="cpu", num_processes=1)
    assert planned["dataset"] == DS and planned["cases"] == 3
    assert planned["counts"] == {"cases": 3, "preprocessed": 3, "skipped": 0}
    assert planned["plan_path"] == pp / DS / "suprem_plans.json" and planned["plan"]["axes"] == "xyz"
    again = api.plan_and_preprocess(901, raw=raw, preprocessed=pp, device="cpu", num_processes=1)
    assert again["counts"]["skipped"] == 3  # resumable: nothing is redone
    shrink_plan(planned["plan_path"], network=tiny_net(), epochs=1, iterations_per_epoch=2, num_val_iterations=1)
    trained = api.train(901, "all", raw=raw, preprocessed=pp, results=results, num_workers=0, progress_bar=False,
                        final_validation=False)
    assert trained["epochs"] == 1 and (results / DS / "suprem_plans" / "fold_all" / "checkpoint_final.pth").is_file()
    predicted = api.predict(tiny_raw / "imagesTs", tmp_path / "out", dataset=901, results=results, folds=["all"],
                            tta=False, device="cpu")
    assert predicted["cases"] == 1 and predicted["skipped"] == 0 and len(predicted["written"]) == 1
    labels, geo = read_image(predicted["written"][0], dtype=None)
    _, ref_geo = read_image(next((tiny_raw / "imagesTs").iterdir()))
    assert geo.mismatch(ref_geo) is None and labels.dtype == np.uint8
    assert api.predict(tiny_raw / "imagesTs", tmp_path / "out", dataset=901, results=results,
                       folds=["all"])["skipped"] == 1
    # evaluation of the predicted case against itself: DSC 1 for every class present
    summary = api.evaluate(tmp_path / "out", tmp_path / "out")
    assert all(v in (1.0, None) or np.isnan(v) for v in (m["dsc"] for m in summary["mean"].values()))
    assert (tmp_path / "out" / "summary.csv").is_file()


def test_checks_come_before_any_output(tiny_raw, tmp_path):
    with pytest.raises(SupremError, match="step-size"):
        api.predict(tiny_raw / "imagesTs", tmp_path / "out", dataset=901, step_size=2)
    with pytest.raises(SupremError, match="--like takes the network"):
        api.plan_and_preprocess(901, raw=tiny_raw.parent, preprocessed=tmp_path / "pp", like="x.json",
                                preset="suprem_unet")
    assert not (tmp_path / "out").exists() and not (tmp_path / "pp").exists()


@pytest.fixture(scope="module")
def written_plan(tmp_path_factory):
    from tests.helpers import tiny_spec
    from suprem_net.synthetic import write_raw_dataset

    root = tmp_path_factory.mktemp("plan")
    write_raw_dataset(root / "raw", 901, tiny_spec(), num_test=0)
    done = api.plan_and_preprocess(901, raw=root / "raw", preprocessed=root / "pp", device="cpu", preprocess=False,
                                   num_processes=1)
    return done["plan_path"]


def _edited(path, tmp_path, edit) -> object:
    plan = json.loads(path.read_text(encoding="utf-8"))
    edit(plan)
    out = tmp_path / "plans.json"
    out.write_text(json.dumps(plan), encoding="utf-8")
    return out


@pytest.mark.parametrize("edit, message", [
    (lambda p: p.update(patch_sise=p.pop("patch_size")), "unknown key 'patch_sise' (did you mean 'patch_size'?)"),
    (lambda p: p["training"].update(lr="fast"), "training.lr must be a number, got str"),
    (lambda p: p["training"].update(epoch=3), "training: unknown key 'epoch' (did you mean 'epochs'?)"),
    (lambda p: p.update(batch_size=0), "batch_size must be >= 1, got 0"),
    (lambda p: p.update(patch_size=[32, 32]), "patch_size must be a list of 3 values, got [32, 32]"),
    (lambda p: p.update(axes="yxz"), "axes must be one of xyz, zyx, got 'yxz'"),
    (lambda p: p.pop("network"), "missing key 'network'"),
    (lambda p: p["training"].update(optimizer="adam"), "training.optimizer must be one of sgd, adamw, got 'adam'"),
    (lambda p: p["training"].update(time_budget_s=-5), "training.time_budget_s must be > 0, got -5"),
    (lambda p: p.update(speed="fast"), "speed must be dict, got str"),
])
def test_a_hand_edited_plan_is_checked(written_plan, tmp_path, edit, message):
    path = _edited(written_plan, tmp_path, edit)
    with pytest.raises(InputError) as e:
        load_plan(path)
    assert str(e.value) == f"{path}: {message}"


def test_plans_of_earlier_versions_stay_valid(written_plan, tmp_path):
    """Fields added since (axes, mirror_axes, label_encoding, like) are optional."""
    old = _edited(written_plan, tmp_path, lambda p: p.pop("axes"))
    assert "axes" not in load_plan(old)
    assert plan_problem(load_plan(written_plan)) is None


def test_training_refuses_a_misspelt_plan_in_one_line(written_plan, tmp_path, capsys):
    from suprem_net.cli.train import main as train_main
    from tests.helpers import user_error

    plan = json.loads(written_plan.read_text(encoding="utf-8"))
    plan["training"]["iterations_per_epok"] = 5
    bad = written_plan.parent / "bad_plans.json"
    bad.write_text(json.dumps(plan), encoding="utf-8")
    user_error(train_main, ["901", "0", "--plans", "bad_plans", "--preprocessed", str(written_plan.parents[1]),
                            "--results", str(tmp_path)], capsys, str(bad), "iterations_per_epok")
