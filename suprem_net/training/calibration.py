"""Measure the machine: real training steps of a plan's configuration, timed on the device.

:class:`MeasuredSpeed` is the planner's speed (:mod:`suprem_net.planning.speed`) on the machine it
runs on. It builds the network, feeds it random data of the plan's patch and batch and times whole
training steps (forward, the plan's loss, backward, gradient clipping, the plan's optimiser), so the
planner sizes the patch by seconds instead of by an assumed GFLOP/s. For the configuration the
planner picks it also measures the CPU levers of :mod:`~suprem_net.training.acceleration`, each
against the setting without it, in alternating steps so that drift of a shared machine falls on
all of them alike: channels-last memory with group norms, upsampling as matrix products, kept
freed memory, and the thread count. A lever that makes the step slower on this machine is
switched off in the plan. ``torch.compile`` costs a one-off compilation (about a minute on two
cores) that planning does not spend: the first training run on a machine that lasts at least
:data:`COMPILE_TRIAL_MIN_S` measures it in its own first steps (:class:`CompileTrial`), and the
result is cached for every later plan and run of that configuration here.

Every result is cached per machine (:func:`suprem_net.device.describe_machine`'s key) and
configuration in ``$SUPREM_calibration``, else ``<user cache dir>/calibration``, so replanning on
the same machine measures nothing again.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from suprem_net.device import describe_machine
from suprem_net.errors import SupremError
from suprem_net.io.atomic import read_json, write_json
from suprem_net.labels import PACK_BITS
from suprem_net.losses import build_loss
from suprem_net.networks import build_network, speed
from suprem_net.planning.speed import StepSpec, expected_training_seconds
from suprem_net.training import acceleration as acc
from suprem_net.training.schedules import make_optimizer

log = logging.getLogger(__name__)

CALIBRATION_ENV = "SUPREM_calibration"
APP_NAME = "suprem_net"
SEARCH_ROUNDS = 2          # timed steps per candidate of the planner's search (after one warm-up step)
LEVER_ROUNDS = (3, 5)      # alternating rounds per lever setting: at least, at most
LEVER_SECONDS = 15.0       # the lever comparison stops adding rounds beyond this
LEVER_TOLERANCE = 0.02     # a lever is switched off when the step is more than 2 % slower with it
COMPILE_TRIAL_MIN_S = 1800.0  # a run of at least this long tries torch.compile when it was not measured here
COMPILE_ROUNDS = 3


def cache_dir() -> Path:
    """``$SUPREM_calibration``, else ``<user cache dir>/calibration`` (``~/.cache/suprem_net/calibration``)."""
    env = os.environ.get(CALIBRATION_ENV)
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir(APP_NAME, appauthor=False)) / "calibration"


class CalibrationCache:
    """``<folder>/<machine key>.json``: ``{"machine": ..., "entries": {name: result}}``."""

    def __init__(self, folder: Path, machine: dict):
        self.path = Path(folder) / f"{machine['key']}.json"
        self.machine = machine

    def _read(self) -> dict:
        if not self.path.is_file():
            return {}
        try:
            data = read_json(self.path)
        except (OSError, ValueError, SupremError):  # unreadable: measured again, and rewritten
            return {}
        return data.get("entries", {}) if isinstance(data, dict) else {}

    def get(self, name: str):
        return self._read().get(name)

    def put(self, name: str, value) -> None:
        entries = self._read()
        entries[name] = value
        try:
            write_json(self.path, {"machine": self.machine, "entries": entries}, sort_keys=True)
        except OSError as e:  # a read-only cache costs a re-measurement next time, nothing else
            log.warning("could not write the calibration cache %s (%s)", self.path, e.strerror or e)


class _Bench:
    """One configuration of a step on ``device``, ready to be timed: model, optimiser, loss, data."""

    def __init__(self, spec: StepSpec, device: torch.device, levers: dict):
        torch.manual_seed(0)
        network = spec.network_dict
        self.device, self.levers = device, levers
        self.threads = int(levers.get("threads") or torch.get_num_threads())
        self.model = build_network(network, spec.in_channels, spec.num_classes).to(device)
        fmt = acc.apply_model_levers(self.model, network["family"], levers) if device.type == "cpu" \
            else torch.contiguous_format
        self.loss = build_loss(spec.loss or "dice_ce", spec.num_classes)
        training = {"optimizer": spec.optimizer, "lr": 1e-5}
        self.optimizer = make_optimizer([{"params": list(self.model.parameters())}], training)
        self.x = torch.randn(spec.batch, spec.in_channels, *spec.patch, device=device).contiguous(memory_format=fmt)
        if spec.loss == "dice_bce":
            channels = -(-spec.num_classes // PACK_BITS)
            high = 2 ** min(spec.num_classes, PACK_BITS - 1)
            self.y = torch.randint(0, high, (spec.batch, channels, *spec.patch), device=device)
        else:
            self.y = torch.randint(0, spec.num_classes, (spec.batch, 1, *spec.patch), device=device)
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16) if spec.dtype == "bfloat16" \
            else contextlib.nullcontext()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _enter_levers(self) -> None:
        if self.device.type == "cpu":
            speed.set_freed_memory_kept(bool(self.levers.get("keep_freed_memory")))
            if torch.get_num_threads() != self.threads:
                torch.set_num_threads(self.threads)

    def step(self, clock: Callable[[], float]) -> float:
        self._enter_levers()
        self._sync()
        t = clock()
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast:
            loss = self.loss(self.model(self.x), self.y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 12.0)
        self.optimizer.step()
        self._sync()
        return clock() - t

    @torch.no_grad()
    def forward(self, clock: Callable[[], float]) -> float:
        self._enter_levers()
        self._sync()
        t = clock()
        with self.autocast:
            self.model(self.x)
        self._sync()
        return clock() - t


def _alternate(benches: dict[str, _Bench], rounds: tuple[int, int], budget_s: float,
               clock: Callable[[], float]) -> dict[str, float]:
    """The median seconds per step of each bench, timed in alternating rounds after one warm-up step
    each; at least ``rounds[0]`` rounds, more (up to ``rounds[1]``) while within ``budget_s``."""
    times: dict[str, list[float]] = {name: [] for name in benches}
    start = clock()
    for b in benches.values():
        b.step(clock)
    for r in range(rounds[1]):
        if r >= rounds[0] and clock() - start > budget_s:
            break
        for name, b in benches.items():
            times[name].append(b.step(clock))
    return {name: statistics.median(ts) for name, ts in times.items()}


def _in_block(bench: _Bench, clock: Callable[[], float], steps: int = LEVER_ROUNDS[0]) -> float:
    """The median of ``steps`` consecutive steps after a warm-up one (for settings whose effect shows
    in the steps after a switch: a new thread count rebuilds OpenMP's thread pool; kept memory
    reuses the pages of the step before)."""
    bench.step(clock)
    return statistics.median(bench.step(clock) for _ in range(steps))


class MeasuredSpeed:
    """Training steps timed on ``device`` (see the module docstring), cached per machine."""

    source = "measured"

    def __init__(self, device: torch.device | str = "cpu", cache: str | os.PathLike | None = None,
                 clock: Callable[[], float] = time.perf_counter):
        self.device = torch.device(device)
        self.machine = describe_machine(self.device)
        self.cache = CalibrationCache(Path(cache) if cache else cache_dir(), self.machine)
        self.clock = clock

    # ------------------------------------------------------------------ the planner's search
    def step_seconds(self, spec: StepSpec) -> float:
        """Seconds per step with every lever on (how the trainer runs before calibration)."""
        name = f"step/{spec.key()}"
        hit = self.cache.get(name)
        if hit is not None:
            return float(hit)
        levers = acc.default_levers(json.loads(spec.network)["family"], self.device)
        log.info("measuring a training step of patch %s, batch %d on %s ...", list(spec.patch), spec.batch,
                 self.machine["cpu"] if self.device.type == "cpu" else self.machine.get("gpu"))
        with _restoring_process_state():
            t = _alternate({"on": _Bench(spec, self.device, levers)}, (SEARCH_ROUNDS, SEARCH_ROUNDS), 0,
                           self.clock)["on"]
        self.cache.put(name, t)
        return t

    # ------------------------------------------------------------------ levers of the chosen step
    def levers(self, spec: StepSpec) -> dict:
        """Which levers win for ``spec`` here: ``{"levers": {...}, "step_seconds": {setting: s},
        "val_step_seconds": s}`` (measured once per machine and configuration)."""
        name = f"levers/{spec.key()}"
        hit = self.cache.get(name)
        if hit is not None:
            return hit
        family = json.loads(spec.network)["family"]
        result = _measure_levers(spec, self.device, family, self.clock)
        self.cache.put(name, result)
        return result

    def _compile_name(self, spec: StepSpec, levers: dict) -> str:
        return f"compile/{spec.key()}/{json.dumps({k: v for k, v in levers.items() if k != 'compile'}, sort_keys=True)}"

    def compile_known(self, spec: StepSpec, levers: dict) -> dict | None:
        """What a training run on this machine measured of torch.compile for ``spec`` with ``levers``
        (:class:`CompileTrial`), or None."""
        return self.cache.get(self._compile_name(spec, levers))

    def store_compile(self, spec: StepSpec, levers: dict, result: dict) -> None:
        self.cache.put(self._compile_name(spec, levers), result)

    def record(self, spec: StepSpec, training: dict) -> dict:
        """The plan's ``speed`` entry: machine, measured step, achieved GFLOP/s, levers, expected time."""
        lev = self.levers(spec)
        levers = dict(lev["levers"])
        eager, val = lev["chosen_step_seconds"], lev["val_step_seconds"]
        expected = expected_training_seconds(training, eager, val)
        known = self.compile_known(spec, levers)
        if known is None:
            levers["compile"] = None
            info = {"measured": False, "reason": "measured by the first training run here of at least "
                                                 f"{COMPILE_TRIAL_MIN_S / 60:.0f} min"}
        else:
            levers["compile"] = compile_pays(known, expected)
            info = {"measured": True, **known}
        step = eager * known["ratio"] if levers["compile"] else eager
        expected = expected_training_seconds(training, step, val)
        return {"source": self.source, "machine": self.machine, "config": spec.key(),
                "gflops": round(spec.flops / step / 1e9, 1) if spec.flops else None,
                "step_seconds": round(step, 4), "eager_step_seconds": round(eager, 4),
                "val_step_seconds": round(val, 4),
                "expected_training_seconds": round(expected, 1), "levers": levers,
                "lever_step_seconds": lev["step_seconds"], "compile": info}


def compile_pays(info: dict, expected_s: float) -> bool:
    """Whether compiled steps were measurably faster here and save more over ``expected_s`` of training
    than the one-off compilation costs."""
    if "ratio" not in info:
        return False
    return info["ratio"] < 1 - LEVER_TOLERANCE and expected_s * (1 - info["ratio"]) > info["compile_seconds"]


class CompileTrial:
    """torch.compile measured inside a real training run: the first step runs compiled (and compiles),
    then eager and compiled steps alternate for :data:`COMPILE_ROUNDS` rounds; both compute the same
    update, so no step is wasted. :meth:`compiled_next` says which to run, :meth:`add` takes each step's
    time and returns the result once complete: ``{"compile_seconds", "compiled_step_seconds",
    "eager_step_seconds", "ratio"}``."""

    def __init__(self):
        self.times: list[float] = []

    def compiled_next(self) -> bool:
        return len(self.times) % 2 == 0  # steps 0, 2, 4, ... compiled

    def add(self, seconds: float) -> dict | None:
        self.times.append(seconds)
        if len(self.times) < 1 + 2 * COMPILE_ROUNDS:
            return None
        compiled = statistics.median(self.times[2::2])
        eager = statistics.median(self.times[1::2])
        return {"compile_seconds": round(max(0.0, self.times[0] - compiled), 2),
                "compiled_step_seconds": round(compiled, 4), "eager_step_seconds": round(eager, 4),
                "ratio": round(compiled / eager, 3)}


@contextlib.contextmanager
def _restoring_process_state():
    """Timing switches threads and glibc's thresholds per step; put both back afterwards."""
    threads, kept = torch.get_num_threads(), speed.freed_memory_is_kept()
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        speed.set_freed_memory_kept(kept)


def _model_lever_settings(family: str, device: torch.device) -> dict[str, dict]:
    """Cumulative settings of the levers that change the model, each adding one to the one before
    (freed memory kept in all of them); on a GPU, or for a family without them, just the step."""
    base = acc.default_levers(family, device)
    if device.type != "cpu":
        return {"default": base}
    current = {"channels_last": False, "upsampling_as_matmul": False, "keep_freed_memory": True, "threads": None}
    settings = {"none": dict(current)}
    for lever in ("channels_last", "upsampling_as_matmul"):
        if base[lever]:
            current = {**current, lever: True}
            settings[lever] = dict(current)
    return settings


def _thread_counts() -> list[int]:
    """Thread counts worth timing besides PyTorch's own (one per physical core): all logical CPUs,
    where simultaneous multithreading gives more. (Fewer threads than cores never wins a bare step;
    what the loader's workers take is measured by ``benchmarks/train_step_levers.py``.)"""
    now, logical = torch.get_num_threads(), os.cpu_count() or 1
    return [logical] if logical > now else []


def _measure_levers(spec: StepSpec, device: torch.device, family: str, clock) -> dict:
    """Model levers in alternating steps; kept memory and threads in blocks of consecutive steps (their
    effect is on the steps after a switch: pages kept from the step before, a warm thread pool)."""
    settings = _model_lever_settings(family, device)
    log.info("measuring the CPU levers of a training step of patch %s, batch %d ...", list(spec.patch), spec.batch)
    with _restoring_process_state():
        benches = {name: _Bench(spec, device, lv) for name, lv in settings.items()}
        times = _alternate(benches, LEVER_ROUNDS, LEVER_SECONDS, clock) if len(benches) > 1 else {}
        names = list(settings)
        levers = dict(settings[names[-1]])
        for before, name in zip(names, names[1:]):  # each lever against the setting just without it
            levers[name] = times[name] <= times[before] * (1 + LEVER_TOLERANCE)
        if device.type != "cpu":
            chosen = _Bench(spec, device, levers)
            times["default"] = _in_block(chosen, clock)
            step = times["default"]
        else:
            if not levers["channels_last"]:
                levers["upsampling_as_matmul"] = False  # it only runs in channels-last models
            chosen = _Bench(spec, device, levers)
            freed = _Bench(spec, device, {**levers, "keep_freed_memory": False})
            kept_t, freed_t = [], []
            for _ in range(2):
                kept_t.append(_in_block(chosen, clock, 2))
                freed_t.append(_in_block(freed, clock, 2))
            times["keep_freed_memory"], times["freed_memory_returned"] = min(kept_t), min(freed_t)
            levers["keep_freed_memory"] = times["keep_freed_memory"] <= times["freed_memory_returned"] * (
                1 + LEVER_TOLERANCE)
            if not levers["keep_freed_memory"]:
                chosen = freed
            now = levers["threads"] = torch.get_num_threads()
            step = times["keep_freed_memory" if levers["keep_freed_memory"] else "freed_memory_returned"]
            times[f"threads={now}"] = step
            for n in _thread_counts():
                times[f"threads={n}"] = _in_block(_Bench(spec, device, {**levers, "threads": n}), clock)
                if times[f"threads={n}"] < step * (1 - LEVER_TOLERANCE):
                    levers["threads"], step = n, times[f"threads={n}"]
                    chosen = _Bench(spec, device, levers)
        val = statistics.median(chosen.forward(clock) for _ in range(3))
    return {"levers": levers, "step_seconds": {k: round(v, 4) for k, v in times.items()},
            "chosen_step_seconds": step, "val_step_seconds": val}
