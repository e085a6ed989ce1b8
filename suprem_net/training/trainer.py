"""The training loop: build everything from the plan, train, validate, checkpoint, resume.

Pieces live next door (data loader, loss, schedule, checkpoint, progress, distributed,
splits, final validation); this module wires them together for one fold.
"""
from __future__ import annotations

import contextlib
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from suprem_net.data.dataset import CaseStore
from suprem_net.data.loader import close_loader, make_loader
from suprem_net.device import describe_machine, resolve_device
from suprem_net.errors import SupremError
from suprem_net.io.atomic import read_json, write_json
from suprem_net.labels import LabelScheme
from suprem_net.losses import make_loss
from suprem_net.networks import build_network, get_family
from suprem_net.paths import dataset_number
from suprem_net.plan import DEFAULT_PLANS_NAME, load_plan
from suprem_net.planning.memory import measure_step
from suprem_net.planning.speed import StepSpec, expected_training_seconds, format_duration
from suprem_net.presets import presets_for_family
from suprem_net.preprocessing.orientation import network_axes
from suprem_net.training import checkpoint as ck
from suprem_net.networks.speed import compiled, is_compile_failure
from suprem_net.training.acceleration import prepare_for_training
from suprem_net.training.budget import WallClock, schedule_for_budget
from suprem_net.training.calibration import (COMPILE_ROUNDS, COMPILE_TRIAL_MIN_S, CompileTrial, MeasuredSpeed,
                                             compile_pays)
from suprem_net.training import distributed as dd
from suprem_net.training.label_metrics import confusion_stats
from suprem_net.training.progress import (
    attach_log_file, detach_log_file, new_history, plot_progress, pseudo_dice, update_ema,
)
from suprem_net.training.schedules import EpochSchedule, make_optimizer
from suprem_net.training.splits import fold_cases, load_or_create_splits
from suprem_net.training.validation import validate_fold
from suprem_net.weights import load_pretrained, resolve_checkpoint
from suprem_net.weights.heads import own_model_plan, own_model_plan_path

log = logging.getLogger(__name__)

MAX_NONFINITE = 5
TRAINING_DEVICES = ("cuda", "cpu")
OVERRIDABLE = ("epochs", "iterations_per_epoch", "lr", "num_val_iterations")


@dataclass
class TrainConfig:
    dataset: str                      # full dataset folder name
    fold: str
    preprocessed_root: Path
    results_root: Path
    plans_name: str = DEFAULT_PLANS_NAME
    overrides: dict = field(default_factory=dict)  # epochs, iterations_per_epoch, lr, num_val_iterations
    batch_size: int | None = None
    num_workers: int = 1
    seed: int = 0
    save_every: int = 1
    resume: bool = False
    precision: str = "auto"
    device: str = "auto"
    pretrained: str | None = None
    freeze_encoder_epochs: int = 0
    encoder_lr_scale: float = 1.0
    elastic: bool = False
    augment: bool = True
    final_validation: bool = True
    deterministic: bool = False
    progress_bar: bool = True
    compile: bool | None = None       # torch.compile the step; None: where the plan's measurement says it pays
    time_budget_s: float | None = None  # wall-clock budget of the training (else the plan's training.time_budget_s)
    clock: Callable[[], float] = time.monotonic  # what the budget and the ETA are measured with


def precision_setup(precision: str, device: torch.device):
    """(autocast dtype or None, GradScaler or None). CUDA auto: bf16 where supported, else fp16 + scaler."""
    if device.type == "cuda":
        if precision == "auto":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        if precision == "fp16":
            return torch.float16, torch.amp.GradScaler("cuda")
        return (torch.bfloat16 if precision == "bf16" else None), None
    if precision == "fp16":
        raise SupremError("--precision fp16 needs a CUDA device; use bf16 or fp32 on CPU")
    return (torch.bfloat16 if precision == "bf16" else None), None


def parameter_groups(model: torch.nn.Module, family: str, encoder_lr_scale: float) -> tuple[list[dict], list]:
    prefixes = get_family(family).encoder_prefixes
    enc, rest = [], []
    for name, p in model.named_parameters():
        (enc if name.startswith(prefixes) else rest).append(p)
    groups = [{"params": rest, "lr_scale": 1.0, "name": "decoder"}]
    if enc:
        groups.insert(0, {"params": enc, "lr_scale": float(encoder_lr_scale), "name": "encoder"})
    return groups, enc


def effective_plan(plan: dict, cfg: TrainConfig, world_size: int) -> dict:
    plan = {**plan, "training": dict(plan["training"])}
    if cfg.time_budget_s is not None:
        if cfg.overrides.get("epochs") is not None:
            raise SupremError("--time-budget sets the number of epochs; leave out --epochs")
        plan["training"]["time_budget_s"] = float(cfg.time_budget_s)
    elif cfg.overrides.get("epochs") is not None and plan["training"].get("time_budget_s"):
        log.info("--epochs given: the plan's time budget of %s is not used",
                 format_duration(plan["training"]["time_budget_s"]))
        plan["training"]["time_budget_s"] = None
    for k, v in cfg.overrides.items():
        if v is not None:
            if k not in OVERRIDABLE:
                raise ValueError(k)
            plan["training"][k] = v
    if cfg.batch_size is not None:
        plan["batch_size"] = int(cfg.batch_size)
    if plan["batch_size"] < world_size:
        raise SupremError(f"batch size {plan['batch_size']} is smaller than the {world_size} processes")
    return plan


def load_pretrained_weights(model, plan: dict, name_or_path: str, labels: dict) -> None:
    report = load_pretrained(model, name_or_path, family=plan["network"]["family"], target_labels=labels,
                             target_multi_label=LabelScheme.of(plan).multi_label)
    log.info("pretrained %s", report.summary())
    dataset = dataset_number(plan["dataset_name"])
    family = get_family(plan["network"]["family"])
    source_plan = own_model_plan(report.path)
    if source_plan is not None:  # one of our own models: compare the inputs it was trained on
        differs = input_differences(source_plan, plan)
        if differs:
            log.warning("the pre-trained model saw other inputs (%s); re-plan with: suprem_plan_and_preprocess "
                        "-d %s --like %s", "; ".join(differs), dataset, own_model_plan_path(report.path))
    elif network_axes(plan) != family.axes:
        log.warning("the plan %s feeds the network its volumes in (z, y, x) order, transposed from the (x, y, z) "
                    "order the pre-trained backbone learned in (it was written before plans recorded their axis "
                    "order); re-plan with: suprem_plan_and_preprocess -d %s%s --plans-name %s --replan",
                    plan["plans_name"], dataset, f" --preset {plan['preset']}" if plan.get("preset") else "",
                    plan["plans_name"])
    elif plan.get("preset") is None and presets_for_family(family.name):  # UniMiSS has none: its own plan
        log.warning("the plan %s has no preset, so its spacing, orientation and intensity window differ from "
                    "what the SuPreM backbone saw in pre-training; re-plan with: suprem_plan_and_preprocess "
                    "-d %s --preset %s", plan["plans_name"], dataset, presets_for_family(family.name)[0])


def input_differences(source: dict, plan: dict) -> list[str]:
    """What differs between the inputs two plans produce: orientation, axis order, spacing, normalisation."""
    out = []
    if network_axes(source) != network_axes(plan):
        out.append(f"axes {network_axes(source)} vs {network_axes(plan)}")
    for key in ("orientation", "target_spacing", "normalization"):
        a, b = source.get(key), plan.get(key)
        if key == "target_spacing" and a and b and np.allclose(a, b, rtol=1e-3):
            continue
        if a != b:
            out.append(f"{key} {a} vs {b}")
    return out


def _to_device(batch: dict, device: torch.device, memory_format=torch.contiguous_format
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(image, labels, annotated (B, K) bool or None: which classes each sample's case annotates)."""
    def tensor(a):  # tensors from the loader's workers, (possibly flipped) arrays without workers
        return a if isinstance(a, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(a))

    x = tensor(batch["data"]).to(device, torch.float32, non_blocking=True).contiguous(memory_format=memory_format)
    y = tensor(batch["seg"]).to(device, non_blocking=True).long()  # int16 from the workers: widened on the device
    ann = batch.get("annotated")
    ann = torch.as_tensor(np.asarray(ann, dtype=bool)).to(device) if ann is not None else None
    return x, y, ann


class FoldTraining:
    """State of one fold's run; :meth:`run` trains from the start or the latest checkpoint."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.device = resolve_device(cfg.device, TRAINING_DEVICES)
        self.dist = dd.init_distributed(self.device.type)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        pp = cfg.preprocessed_root / cfg.dataset
        plan_path = pp / f"{cfg.plans_name}.json"
        if not plan_path.is_file():
            raise SupremError(f"{plan_path}: no such plan (run suprem_plan_and_preprocess -d ... first, "
                              "or pass --plans NAME)")
        self.plan = effective_plan(load_plan(plan_path), cfg, self.dist.world_size)
        self.labels = LabelScheme.of(self.plan)
        self.dataset_json = pp / "dataset.json"
        self.model_dir = cfg.results_root / cfg.dataset / cfg.plans_name
        self.fold_dir = self.model_dir / f"fold_{cfg.fold}"
        self.store = CaseStore(pp / self.plan["data_identifier"])
        if self.dist.is_main:
            splits = load_or_create_splits(pp / "splits.json", self.store.case_ids)
        dd.barrier(self.dist)
        if not self.dist.is_main:
            splits = read_json(pp / "splits.json")
        self.train_ids, self.val_ids = fold_cases(splits, cfg.fold, self.store.case_ids)
        self.tr = self.plan["training"]
        self.epochs = int(self.tr["epochs"])
        self.per_rank_batch = self.plan["batch_size"] // self.dist.world_size
        self.history = new_history()
        self.best_ema: float | None = None
        self.start_epoch = 0
        self.nonfinite_in_a_row = 0
        self.budget_s = self.tr.get("time_budget_s") or None
        self.spent_s = 0.0          # time of the earlier part of a resumed run
        self.stop_now = False       # the budget ran out within an epoch
        self.step_times: list[float] = []
        self.trial: CompileTrial | None = None  # torch.compile measured in this run's first steps

    # ---------------------------------------------------------------- setup
    def build(self) -> None:
        cfg, plan = self.cfg, self.plan
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True)
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed)
        self.model = build_network(plan["network"], self.store.num_channels(), plan["num_classes"]).to(self.device)
        family = plan["network"]["family"]
        self.speed = self._speed_record()
        self.memory_format = prepare_for_training(self.model, family, self.device, cfg.deterministic,
                                                  levers=(self.speed or {}).get("levers"))
        groups, self.encoder_params = parameter_groups(self.model, family, cfg.encoder_lr_scale)
        if (cfg.freeze_encoder_epochs or cfg.encoder_lr_scale != 1.0) and not self.encoder_params:
            raise SupremError(f"--freeze-encoder-epochs/--encoder-lr-scale: no encoder parameters found for {family}")
        self.optimizer = make_optimizer(groups, self.tr)
        latest = self.fold_dir / "checkpoint_latest.pth"
        state = ck.load_checkpoint(latest) if cfg.resume and latest.is_file() else None  # on the CPU
        if self.budget_s:
            self._budget_schedule((state or {}).get("time_budget"))
        self.schedule = EpochSchedule(self.optimizer, self.tr, self.epochs)
        self.autocast_dtype, self.scaler = precision_setup(cfg.precision, self.device)
        self.loss_fn = make_loss(plan)  # Dice + CE (softmax) or Dice + BCE (multi-label), deep supervision
        if state is not None:
            ck.restore(state, model=self.model, optimizer=self.optimizer, schedule=self.schedule, scaler=self.scaler)
            self.start_epoch, self.best_ema = int(state["epoch"]), state["best_ema"]
            self.history = {k: list(state["logging"].get(k, [])) for k in self.history}
            log.info("resuming %s at epoch %d", latest, self.start_epoch)
        else:
            if cfg.resume:
                log.warning("--continue: no %s, starting from scratch", latest)
            if cfg.pretrained:
                load_pretrained_weights(self.model, plan, cfg.pretrained, read_json(self.dataset_json)["labels"])
        self._wrap(compile_step=self._compile_choice())

    def _speed_record(self) -> dict | None:
        """The plan's measured speed when it was measured on this machine for this configuration; else
        measured here now (cached per machine; not under DDP, where every process would time its own)."""
        spec = StepSpec.of_plan(self.plan, self.store.num_channels())
        record = self.plan.get("speed") or {}
        here = describe_machine(self.device)
        if record.get("source") == "measured" and (record.get("machine") or {}).get("key") == here["key"] \
                and record.get("config") == spec.key():
            return record
        if self.dist.enabled:
            return None
        m = measure_step(self.plan["network"], spec.in_channels, spec.num_classes, spec.patch, spec.batch,
                         dtype=spec.dtype, loss=spec.loss)
        spec = StepSpec.of_plan({**self.plan, "memory": {**(self.plan.get("memory") or {}), **m,
                                                         "compute_dtype": spec.dtype}}, spec.in_channels)
        log.info("the plan's training step was not measured on this machine (%s, %s): measuring it", here.get("gpu")
                 or here["cpu"], here["isa"])
        return MeasuredSpeed(self.device).record(spec, self.tr)

    def _compile_choice(self) -> bool:
        """``--compile``/``--no-compile``; else what this machine measured of torch.compile for this step
        (compiled where the faster steps repay the compilation over this run); else, unmeasured, a run of
        at least :data:`COMPILE_TRIAL_MIN_S` measures it in its first steps (:class:`CompileTrial`)."""
        if self.cfg.compile is not None:
            return self.cfg.compile
        speed = self.speed or {}
        expected = expected_training_seconds(self.tr, speed.get("eager_step_seconds", 0),
                                             speed.get("val_step_seconds", 0))
        info = speed.get("compile") or {}
        if not info.get("measured") and speed.get("source") == "measured":
            info = self._calibration().compile_known(self._spec(), speed["levers"]) or info
        if "ratio" in info:
            use = compile_pays(info, expected)
            log.info("torch.compile: %s (measured here: steps %.0f %% faster, saving about %s of %s against a "
                     "compilation of %s)", "on" if use else "off", 100 * (1 - info["ratio"]),
                     format_duration(max(0.0, expected * (1 - info["ratio"]))), format_duration(expected),
                     format_duration(info["compile_seconds"]))
            return use
        if speed.get("source") == "measured" and not self.dist.enabled and expected >= COMPILE_TRIAL_MIN_S:
            log.info("torch.compile: not measured on this machine yet; measuring it in the first %d steps",
                     2 * COMPILE_ROUNDS + 1)
            self.trial = CompileTrial()
            return True
        log.info("torch.compile: off (%s; --compile to use it)", info.get("error") or
                 f"not measured here, and a run of {format_duration(expected)} is too short to try it")
        return False

    def _calibration(self) -> MeasuredSpeed:
        return MeasuredSpeed(self.device)

    def _spec(self) -> StepSpec:
        return StepSpec.of_plan(self.plan, self.store.num_channels())

    def _budget_schedule(self, resumed: dict | None) -> None:
        """Epochs x iterations for the time budget (a resumed run keeps its epoch length and time spent)."""
        if resumed is not None:
            self.spent_s = float(resumed["spent_s"])
            self.tr.update(iterations_per_epoch=int(resumed["iterations_per_epoch"]),
                           num_val_iterations=int(resumed["num_val_iterations"]))
            self.epochs = self.tr["epochs"] = int(resumed["epochs"])
            return
        fixed = self.cfg.overrides.get("iterations_per_epoch") is not None
        if self.speed is None:  # nothing measured: one epoch of the plan's length, re-estimated after it
            sched = schedule_for_budget(self.budget_s, self.budget_s, 0.0, int(self.tr["iterations_per_epoch"]),
                                        int(self.tr["num_val_iterations"]), fixed_iterations=True)
        else:
            sched = schedule_for_budget(self.budget_s, self.speed["step_seconds"], self.speed["val_step_seconds"],
                                        int(self.tr["iterations_per_epoch"]), int(self.tr["num_val_iterations"]),
                                        fixed_iterations=fixed)
        self.tr.update(epochs=sched.epochs, iterations_per_epoch=sched.iterations_per_epoch,
                       num_val_iterations=sched.num_val_iterations)
        self.epochs = sched.epochs
        log.info("time budget %s: %d epochs x %d iterations (%d validation iterations each) at the measured "
                 "%.2f s per step, re-estimated after every epoch", format_duration(self.budget_s), sched.epochs,
                 sched.iterations_per_epoch, sched.num_val_iterations, (self.speed or {}).get("step_seconds", 0))

    def _wrap(self, compile_step: bool) -> None:
        """``self.net`` and ``self.train_loss``: the model and loss as the training step calls them
        (compiled, DDP-wrapped)."""
        self.net = compiled(self.model) if compile_step else self.model
        self.compiling = self.net is not self.model
        self.train_loss = compiled(self.loss_fn) if self.compiling else self.loss_fn  # fused: cheaper on the CPU
        self.compiled_pair = (self.net, self.train_loss) if self.compiling else None
        if not self.compiling:
            self.trial = None
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = torch.nn.parallel.DistributedDataParallel(self.net, device_ids=ids)

    def _loaders(self) -> None:
        nw = self.cfg.num_workers
        common = dict(batch_size=self.per_rank_batch, seed=self.cfg.seed, rank=self.dist.rank,
                      start_epoch=self.start_epoch, pin_memory=self.device.type == "cuda")
        self.train_loader = make_loader(self.store, self.train_ids, self.plan, train=True, num_workers=nw,
                                        iterations_per_epoch=int(self.tr["iterations_per_epoch"]),
                                        elastic=self.cfg.elastic, augment=self.cfg.augment, **common)
        self.val_loader = make_loader(self.store, self.val_ids, self.plan, train=False, num_workers=min(nw, 1),
                                      iterations_per_epoch=int(self.tr["num_val_iterations"]), **common)

    def _write_model_folder(self) -> None:
        write_json(self.model_dir / "plans.json", self.plan)
        shutil.copyfile(self.dataset_json, self.model_dir / "dataset.json")

    # ---------------------------------------------------------------- steps
    def precision_name(self) -> str:
        if self.autocast_dtype is None:
            return "fp32"
        name = "bf16" if self.autocast_dtype == torch.bfloat16 else "fp16"
        return f"{name} autocast" + (" with gradient scaling" if self.scaler is not None else "")

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def train_step(self, x: torch.Tensor, y: torch.Tensor, freeze_encoder: bool,
                   annotated: torch.Tensor | None = None) -> float | None:
        self.optimizer.zero_grad(set_to_none=True)
        try:
            with self._autocast():
                out = self.net(x)
                loss = self.train_loss(out, y, annotated)
        except Exception as e:
            if not (self.compiling and is_compile_failure(e)):
                raise
            log.warning("torch.compile failed (%s); training without it (--no-compile skips the attempt)",
                        " ".join(str(e).split())[:200])
            self._wrap(compile_step=False)
            return self.train_step(x, y, freeze_encoder, annotated)
        if not dd.all_true(bool(torch.isfinite(loss).item()), self.dist, self.device):
            self.nonfinite_in_a_row += 1
            log.warning("non-finite loss (%s), step skipped (%d in a row)", float(loss.item()), self.nonfinite_in_a_row)
            if self.nonfinite_in_a_row >= MAX_NONFINITE:
                raise SupremError(f"{MAX_NONFINITE} non-finite losses in a row: training diverged; lower --lr "
                                  "or use --precision fp32")
            return None
        self.nonfinite_in_a_row = 0
        clip = float(self.tr.get("grad_clip", 0) or 0)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        if freeze_encoder:
            for p in self.encoder_params:
                p.grad = None
        if clip > 0:
            torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.grad is not None], clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        return float(loss.detach().item())

    @torch.no_grad()
    def val_step(self, x: torch.Tensor, y: torch.Tensor,
                 annotated: torch.Tensor | None = None) -> tuple[float, torch.Tensor]:
        with self._autocast():
            out = self.model(x)
            loss = self.loss_fn(out, y, annotated)
        logits = out[0] if isinstance(out, (list, tuple)) else out
        return float(loss.item()), confusion_stats(logits.float(), y, self.labels, annotated)

    # ---------------------------------------------------------------- epochs
    def _eta(self, epoch: int) -> str:
        """When the run's training ends, e.g. ``"18:42 (12 min left)"``, from the measured epochs (before
        the first one: from the measured step time); empty when nothing is known yet."""
        left = self.wall.eta_seconds(self.epochs - epoch)
        if left is None and self.speed:
            left = (self.epochs - epoch) * (int(self.tr["iterations_per_epoch"]) * self.speed["step_seconds"] +
                                            int(self.tr["num_val_iterations"]) * self.speed["val_step_seconds"])
        if left is None:
            return ""
        if self.budget_s:
            left = min(left, max(0.0, self.wall.remaining()))
        return f"{time.strftime('%H:%M', time.localtime(time.time() + left))} ({format_duration(left)} left)"

    def run_epoch(self, epoch: int) -> None:
        clock = self.cfg.clock
        t0 = clock()
        lr = self.schedule.set_epoch(epoch)
        freeze = epoch < self.cfg.freeze_encoder_epochs
        self.net.train()
        iters = int(self.tr["iterations_per_epoch"])
        losses, wait, self.step_times = [], 0.0, []
        eta = self._eta(epoch)
        bar = tqdm(total=iters, desc=f"epoch {epoch}/{self.epochs}", unit="it", leave=False,
                   disable=not (self.dist.is_main and self.cfg.progress_bar))
        for i in range(iters):
            if i > 0 and self.wall.remaining() <= 0:  # the budget ran out: this is the last epoch
                self.stop_now = True
                log.info("time budget reached after %d of %d iterations of epoch %d", i, iters, epoch)
                break
            tw = clock()
            x, y, ann = _to_device(next(self.train_loader), self.device, self.memory_format)
            if self.trial is not None:  # alternate compiled and eager steps
                self.net, self.train_loss = self.compiled_pair if self.trial.compiled_next() else \
                    (self.model, self.loss_fn)
            ts = clock()
            wait += ts - tw
            loss = self.train_step(x, y, freeze, ann)
            self.step_times.append(clock() - ts)
            if self.trial is not None:
                self._trial_step(self.step_times[-1])
            if loss is not None:
                losses.append(loss)
                bar.set_postfix(loss=f"{loss:.4f}", **({"ETA": eta} if eta else {}))
            bar.update()
        bar.close()
        iters = max(1, len(self.step_times))
        train_time = clock() - t0
        self.model.eval()
        val_losses, stats = [], torch.zeros(3, self.labels.num_classes, dtype=torch.float64, device=self.device)
        for _ in range(int(self.tr["num_val_iterations"])):
            tw = clock()
            x, y, ann = _to_device(next(self.val_loader), self.device, self.memory_format)
            wait += clock() - tw
            vl, st = self.val_step(x, y, ann)
            val_losses.append(vl)
            stats += st
        dd.all_reduce_sum(stats, self.dist)
        summary = torch.tensor([np.mean(losses) if losses else float("nan"), np.mean(val_losses) if val_losses
                                else float("nan")], dtype=torch.float64, device=self.device)
        summary = dd.all_reduce_sum(summary, self.dist) / self.dist.world_size
        dice = pseudo_dice(*stats.cpu().numpy())
        ema = update_ema(self.history, dice)
        elapsed = clock() - t0
        h = self.history
        h["train_loss"].append(float(summary[0]))
        h["val_loss"].append(float(summary[1]))
        h["pseudo_dice"].append(dice)
        h["ema_dice"].append(float(ema))
        h["lr"].append(float(lr))
        h["epoch_time"].append(float(elapsed))
        h["data_wait"].append(float(wait / elapsed))
        log.info("epoch %d: train loss %.4f, val loss %.4f, pseudo Dice %s, EMA %.4f, lr %.2e, %.1f s "
                 "(%.2f s/it, %.0f%% waiting for data)", epoch, summary[0], summary[1],
                 [round(d, 4) for d in dice], ema, lr, elapsed, train_time / iters, 100 * wait / max(elapsed, 1e-9))

    def _trial_step(self, seconds: float) -> None:
        result = self.trial.add(seconds)
        if result is None:
            return
        self.trial = None
        self._calibration().store_compile(self._spec(), self.speed["levers"], result)
        expected = expected_training_seconds(self.tr, result["eager_step_seconds"], self.speed["val_step_seconds"])
        use = compile_pays(result, expected)
        log.info("torch.compile measured: %.2f s per step against %.2f s eager, compiled in %s: %s",
                 result["compiled_step_seconds"], result["eager_step_seconds"],
                 format_duration(result["compile_seconds"]), "kept" if use else "training on without it")
        self.net, self.train_loss = self.compiled_pair if use else (self.model, self.loss_fn)
        self.compiling = use

    def _fit_epochs_to_budget(self, done: int) -> None:
        """After ``done`` epochs: as many more as fit in the time left at the recent epoch time (the
        learning-rate schedule follows); none once the budget ran out."""
        self.epochs = done if self.stop_now else max(done, self.wall.epochs_that_fit(done))
        self.tr["epochs"] = self.schedule.epochs = self.epochs

    def _save(self, name: str, next_epoch: int) -> None:
        if self.dist.is_main:
            budget = None
            if self.budget_s:
                budget = {"budget_s": self.budget_s, "spent_s": self.wall.elapsed(), "epochs": self.epochs,
                          "iterations_per_epoch": int(self.tr["iterations_per_epoch"]),
                          "num_val_iterations": int(self.tr["num_val_iterations"])}
            ck.save_checkpoint(self.fold_dir / name, model=self.model, optimizer=self.optimizer,
                               schedule=self.schedule, scaler=self.scaler, epoch=next_epoch, history=self.history,
                               best_ema=self.best_ema, plans_name=self.plan["plans_name"], fold=self.cfg.fold,
                               time_budget=budget)

    def _end_of_epoch(self, epoch: int) -> None:
        ema = self.history["ema_dice"][-1]
        if self.best_ema is None or ema > self.best_ema:
            self.best_ema = ema
            log.info("new best EMA pseudo Dice %.4f", ema)
            self._save("checkpoint_best.pth", epoch + 1)
        if (epoch + 1) % max(1, self.cfg.save_every) == 0 or epoch + 1 == self.epochs:
            self._save("checkpoint_latest.pth", epoch + 1)
        if self.dist.is_main:
            names = list(self.labels.foreground)
            plot_progress(self.history, self.fold_dir / "progress.png", names)

    def run(self) -> dict:
        if self.cfg.pretrained:  # a missing or unknown checkpoint fails before anything is written
            resolve_checkpoint(self.cfg.pretrained)
        handler = attach_log_file(self.fold_dir / "training_log.txt") if self.dist.is_main else None
        try:
            self.build()
            if self.dist.is_main:
                self._write_model_folder()
                log.info("fold %s: %d training, %d validation cases; %d epochs x %d iterations, batch %d (%d per "
                         "process), patch %s, %s on %s, %s", self.cfg.fold, len(self.train_ids), len(self.val_ids),
                         self.epochs, self.tr["iterations_per_epoch"], self.plan["batch_size"], self.per_rank_batch,
                         self.plan["patch_size"], self.plan["network"]["family"], self.device, self.precision_name())
            self._loaders()
            epoch = self.start_epoch
            self.wall = WallClock(self.budget_s, self.cfg.clock, self.spent_s)
            try:
                while epoch < self.epochs:
                    t0 = self.cfg.clock()
                    self.run_epoch(epoch)
                    self._end_of_epoch(epoch)
                    self.wall.add_epoch(self.cfg.clock() - t0, self.step_times)
                    epoch += 1
                    if self.budget_s:
                        self._fit_epochs_to_budget(epoch)
                    eta = self._eta(epoch)
                    if eta and epoch < self.epochs:
                        log.info("%d of %d epochs done, ETA %s", epoch, self.epochs, eta)
            except KeyboardInterrupt:
                log.warning("interrupted in epoch %d: saving checkpoint_latest.pth (that epoch restarts on "
                            "--continue)", epoch)
                self._save("checkpoint_latest.pth", epoch)
                raise
            finally:
                close_loader(self.train_loader)
                close_loader(self.val_loader)
            if self.budget_s:
                log.info("time budget %s: stopped after %d epochs, %s spent; writing checkpoint_final.pth%s",
                         format_duration(self.budget_s), self.epochs, format_duration(self.wall.elapsed()),
                         ", then the final validation" if self.cfg.final_validation else "")
            self._save("checkpoint_final.pth", self.epochs)
            result = {"epochs": self.epochs, "best_ema": self.best_ema, "history": self.history,
                      "fold_dir": str(self.fold_dir)}
            if self.cfg.final_validation and self.dist.is_main:
                result["validation"] = validate_fold(self.plan, self.model, self.store, self.val_ids,
                                                     self.fold_dir / "validation", self.device)
            dd.barrier(self.dist)
            return result
        finally:
            if handler is not None:
                detach_log_file(handler)
            dd.cleanup(self.dist)


def train_fold(cfg: TrainConfig) -> dict:
    """Train one fold as configured; returns the history and where the outputs are."""
    return FoldTraining(cfg).run()
