"""suprem_train on a tiny synthetic dataset: outputs, exact resume after SIGKILL, DDP on gloo."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from suprem_net import api
from suprem_net.synthetic import SyntheticSpec, write_raw_dataset
from suprem_net.losses import SegmentationLoss, deep_supervision_weights
from suprem_net.training.schedules import lr_factor
from suprem_net.training.splits import fold_cases, make_splits
from tests.helpers import shrink_plan, tiny_net, user_error

DS = "Dataset901_SynthAbdomen"
TINY_NET = tiny_net()


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("train")
    spec = SyntheticSpec(num_cases=4, num_classes=2, fov_mm=(60, 80, 80), inplane_spacing=(2, 2), z_spacing=(3, 3))
    write_raw_dataset(root / "raw", 901, spec, num_test=0)
    api.plan_and_preprocess("901", raw=root / "raw", preprocessed=root / "pp", device="cpu", num_processes=1)
    shrink_plan(root / "pp" / DS / "suprem_plans.json", network=TINY_NET, epochs=3, iterations_per_epoch=3,
                num_val_iterations=2)
    return root


def _cmd(root: Path, results: Path, *extra: str, validate: bool = False) -> list[str]:
    skip = [] if validate else ["--skip-final-validation"]
    return ["901", "0", "--raw", str(root / "raw"), "--preprocessed", str(root / "pp"), "--results", str(results),
            "--num-workers", "0", "--no-progress-bar", *skip, *extra]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _weights(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["network_weights"]


def test_deep_supervision_loss():
    assert deep_supervision_weights(3) == pytest.approx([2 / 3, 1 / 3, 0])
    target = torch.zeros(2, 1, 8, 8, 8, dtype=torch.long)
    target[:, :, 2:6, 2:6, 2:6] = 1
    perfect = torch.nn.functional.one_hot(target[:, 0], 2).movedim(-1, 1).float() * 40
    loss = SegmentationLoss()
    outputs = [perfect, perfect[:, :, ::2, ::2, ::2]]
    assert [tuple(t.shape[2:]) for t in loss.targets(outputs, target)] == [(8, 8, 8), (4, 4, 4)]
    assert float(loss(outputs, target)) < 1e-3
    assert float(loss(-perfect, target)) > 1.0


def test_schedules():
    assert lr_factor({"schedule": "poly"}, 0, 10) == 1.0
    cos = {"schedule": "warmup_cosine", "warmup_epochs": 2}
    assert lr_factor(cos, 0, 10) < lr_factor(cos, 2, 10) == pytest.approx(1.0)


def test_splits_are_seeded_and_disjoint():
    ids = [f"c{i:02d}" for i in range(12)]
    s = make_splits(ids)
    assert s == make_splits(list(reversed(ids))) and len(s) == 5
    assert sorted(c for f in s for c in f["val"]) == ids
    for f in s:
        assert not set(f["train"]) & set(f["val"])
    assert fold_cases(s, "all", ids) == (ids, ids)


def test_train_outputs_and_checkpoint_keys(tiny_root, tmp_path):
    from suprem_net.cli.train import main

    results = tmp_path / "results"
    assert main(_cmd(tiny_root, results, "--epochs", "2", validate=True)) == 0
    model_dir = results / DS / "suprem_plans"
    fold = model_dir / "fold_0"
    for name in ("plans.json", "dataset.json"):
        assert (model_dir / name).is_file()
    for name in ("checkpoint_latest.pth", "checkpoint_best.pth", "checkpoint_final.pth", "training_log.txt",
                 "progress.png"):
        assert (fold / name).is_file(), name
    ckpt = torch.load(fold / "checkpoint_final.pth", weights_only=True)
    assert set(ckpt) >= {"network_weights", "optimizer_state", "scheduler_state", "scaler_state", "epoch",
                         "rng_state", "logging", "best_ema", "plans_name", "fold"}
    assert ckpt["epoch"] == 2 and len(ckpt["logging"]["pseudo_dice"]) == 2
    assert json.loads((model_dir / "plans.json").read_text())["training"]["epochs"] == 2
    assert "epoch 1" in (fold / "training_log.txt").read_text()
    assert "nnunet on cpu, fp32" in (fold / "training_log.txt").read_text()  # the header names the precision
    assert (tiny_root / "pp" / DS / "splits.json").is_file()
    summary = json.loads((fold / "validation" / "summary.json").read_text())
    val_ids = json.loads((tiny_root / "pp" / DS / "splits.json").read_text())[0]["val"]
    assert [c["case_id"] for c in summary["cases"]] == val_ids
    assert set(summary["mean"]["dice"]) == {"liver", "spleen"} and set(summary["mean"]["nsd"]) == {"liver", "spleen"}


@pytest.mark.slow
def test_sigkill_and_continue_matches_uninterrupted(tiny_root, tmp_path):
    base = [sys.executable, "-m", "suprem_net.cli.train"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(base + _cmd(tiny_root, straight, "--epochs", "4"), check=True, env=_env(), capture_output=True)
    proc = subprocess.Popen(base + _cmd(tiny_root, killed, "--epochs", "4"), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = killed / DS / "suprem_plans" / "fold_0" / "checkpoint_latest.pth"
    t0 = time.time()
    while not latest.exists() and proc.poll() is None and time.time() - t0 < 120:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "run finished before it could be killed"
    assert not latest.with_name("checkpoint_final.pth").exists()
    subprocess.run(base + _cmd(tiny_root, killed, "--epochs", "4", "--continue"), check=True, env=_env(),
                   capture_output=True)
    a = _weights(straight / DS / "suprem_plans" / "fold_0" / "checkpoint_final.pth")
    b = _weights(killed / DS / "suprem_plans" / "fold_0" / "checkpoint_final.pth")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    la = torch.load(straight / DS / "suprem_plans" / "fold_0" / "checkpoint_final.pth", weights_only=True)["logging"]
    lb = torch.load(killed / DS / "suprem_plans" / "fold_0" / "checkpoint_final.pth", weights_only=True)["logging"]
    assert la["train_loss"] == lb["train_loss"] and la["pseudo_dice"] == lb["pseudo_dice"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_two_cpu_processes(tiny_root, tmp_path):
    results = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           "-m", "suprem_net.cli.train", *_cmd(tiny_root, results, "--epochs", "1")]
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    fold = results / DS / "suprem_plans" / "fold_0"
    ckpt = torch.load(fold / "checkpoint_final.pth", weights_only=True)
    assert ckpt["epoch"] == 1
    assert not any(k.startswith("module.") for k in ckpt["network_weights"])
    assert not list(fold.glob(".tmp-*"))


def test_user_errors_exit_2(tiny_root, tmp_path, capsys):
    from suprem_net.cli.train import main

    user_error(main, _cmd(tiny_root, tmp_path, "--plans", "nope"), capsys, "nope.json", "no such plan")
    user_error(main, _cmd(tiny_root, tmp_path, "--precision", "fp16", "--device", "cpu"), capsys,
               "--precision fp16 needs a CUDA device")


def test_pretrained_file_with_frozen_encoder(tiny_root, tmp_path, caplog):
    from suprem_net.cli.train import main

    first = tmp_path / "first"
    assert main(_cmd(tiny_root, first, "--epochs", "1")) == 0
    source = first / DS / "suprem_plans" / "fold_0" / "checkpoint_final.pth"
    second = tmp_path / "second"
    with caplog.at_level("INFO", logger="suprem_net"):
        assert main(_cmd(tiny_root, second, "--epochs", "1", "--pretrained", str(source),
                         "--freeze-encoder-epochs", "1", "--encoder-lr-scale", "0.5")) == 0
    assert "re-plan" not in caplog.text  # one of our own models, trained on the same inputs
    assert "head: 3 class(es) transferred by name" in caplog.text
    a = _weights(source)
    b = _weights(second / DS / "suprem_plans" / "fold_0" / "checkpoint_final.pth")
    enc = [k for k in a if k.startswith("encoder.") and "weight" in k]
    dec = [k for k in a if k.startswith("decoder.") and "weight" in k]
    assert enc and dec
    assert all(torch.equal(a[k], b[k]) for k in enc)  # frozen, loaded from the file
    assert not all(torch.equal(a[k], b[k]) for k in dec)  # trained
    # a source model planned for other inputs: the trainer names them and the --like command
    source_plans = first / DS / "suprem_plans" / "plans.json"
    plan = json.loads(source_plans.read_text(encoding="utf-8"))
    plan["target_spacing"] = [s * 2 for s in plan["target_spacing"]]
    source_plans.write_text(json.dumps(plan), encoding="utf-8")
    caplog.clear()
    with caplog.at_level("WARNING", logger="suprem_net"):
        assert main(_cmd(tiny_root, tmp_path / "third", "--epochs", "1", "--pretrained", str(source))) == 0
    assert "target_spacing" in caplog.text and f"--like {source_plans.resolve()}" in caplog.text


class SimulatedClock:
    """A clock that only moves when a training step runs: each takes ``step_s`` seconds."""

    def __init__(self, step_s: float):
        self.now, self.step_s = 0.0, step_s

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("step_s, budget_s, epochs, last_iterations", [
    (1.0, 10.0, 3, 3),   # 3 s epochs: after 3 of them 1 s is left, too little for a fourth
    (2.0, 3.0, 1, 2),    # the budget runs out within the first epoch: it ends after 2 of its 3 steps
])
def test_time_budget_stops_on_time_with_a_usable_checkpoint(tiny_root, tmp_path, monkeypatch, step_s, budget_s,
                                                            epochs, last_iterations):
    from suprem_net.networks import build_network
    from suprem_net.training import trainer

    clock = SimulatedClock(step_s)
    real_step = trainer.FoldTraining.train_step
    steps = []

    def timed_step(self, *a, **k):
        clock.now += clock.step_s
        steps.append(self.history["train_loss"].__len__())  # the epoch each step belongs to
        return real_step(self, *a, **k)

    monkeypatch.setattr(trainer.FoldTraining, "train_step", timed_step)
    result = api.train(DS, "0", raw=tiny_root / "raw", preprocessed=tiny_root / "pp", results=tmp_path / "res",
                       time_budget_s=budget_s, clock=clock, num_workers=0, progress_bar=False)
    fold = Path(result["fold_dir"])
    assert result["epochs"] == epochs and len(result["history"]["train_loss"]) == epochs
    assert steps.count(epochs - 1) == last_iterations and clock.now <= budget_s + step_s
    ckpt = torch.load(fold / "checkpoint_final.pth", weights_only=True)
    assert ckpt["epoch"] == epochs and ckpt["time_budget"]["budget_s"] == budget_s
    plan = json.loads((fold.parent / "plans.json").read_text())
    assert plan["training"]["time_budget_s"] == budget_s
    build_network(plan["network"], 1, plan["num_classes"]).load_state_dict(ckpt["network_weights"])
    assert (fold / "validation" / "summary.json").is_file() and "validation" in result
    log_text = (fold / "training_log.txt").read_text()
    assert "time budget 10 s" in log_text or "time budget 3 s" in log_text


def test_time_budget_and_epochs_exclude_each_other(tiny_root, tmp_path, capsys):
    from suprem_net.cli._common import parse_duration
    from suprem_net.cli.train import main

    assert [parse_duration(t) for t in ("90", "90s", "30m", "1.5h", "1h30m", "2 min")] == [90, 90, 1800, 5400, 5400,
                                                                                           120]
    user_error(main, _cmd(tiny_root, tmp_path / "r", "--time-budget", "5m", "--epochs", "2"), capsys,
               "--time-budget sets the number of epochs")
    code = None
    try:
        main(_cmd(tiny_root, tmp_path / "r", "--time-budget", "5 parsecs"))
    except SystemExit as e:
        code = e.code
    assert code == 2 and "give a duration such as 90s, 30m" in capsys.readouterr().err
