"""Wall-clock training budgets: epochs x iterations from the measured step time, re-estimated every
epoch, and the time left.

A budget covers the training epochs (their validation iterations and checkpoints included) up to
``checkpoint_final.pth``; the final validation of the fold runs after it. The first schedule comes
from the step time the calibration measured (:mod:`suprem_net.training.calibration`); after each
epoch the number of epochs is re-estimated from that epoch's own timing, so a slower or busier
machine gets fewer epochs, and the learning-rate schedule follows the new count.
"""
from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass

MIN_EPOCHS = 10          # a budget too short for this many epochs of the plan's length gets shorter epochs
RECENT_EPOCHS = 3        # the epoch time estimate: the median of the last ones


@dataclass(frozen=True)
class BudgetSchedule:
    epochs: int
    iterations_per_epoch: int
    num_val_iterations: int


def schedule_for_budget(budget_s: float, step_s: float, val_step_s: float, iterations: int, val_iterations: int,
                        fixed_iterations: bool = False) -> BudgetSchedule:
    """Epochs x iterations that fill ``budget_s`` at ``step_s`` per training and ``val_step_s`` per validation
    iteration. The plan's epoch length (``iterations``, ``val_iterations``) is kept when the budget holds
    :data:`MIN_EPOCHS` of them (or when ``fixed_iterations``); otherwise epochs get shorter, validation in
    the plan's proportion to training."""
    epoch_s = iterations * step_s + val_iterations * val_step_s
    if not fixed_iterations and budget_s < MIN_EPOCHS * epoch_s:
        ratio = val_iterations / iterations
        iterations = max(1, math.floor(budget_s / MIN_EPOCHS / (step_s + ratio * val_step_s)))
        val_iterations = max(1, round(ratio * iterations))
        epoch_s = iterations * step_s + val_iterations * val_step_s
    return BudgetSchedule(max(1, math.floor(budget_s / epoch_s)), iterations, val_iterations)


class WallClock:
    """The time spent on a budgeted (or open-ended) run and what it predicts; ``spent_s`` carries the time
    of a resumed run's earlier part."""

    def __init__(self, budget_s: float | None, clock: Callable[[], float], spent_s: float = 0.0):
        self.budget_s, self.clock = budget_s, clock
        self.start = clock() - spent_s
        self.epoch_estimates: list[float] = []

    def elapsed(self) -> float:
        return self.clock() - self.start

    def remaining(self) -> float:
        return math.inf if self.budget_s is None else self.budget_s - self.elapsed()

    def add_epoch(self, total_s: float, step_times: list[float]) -> None:
        """Record one epoch: its wall time and the times of its training steps. The estimate of a
        steady epoch replaces the steps by their median (the first step of a compiled run compiles)."""
        if step_times:
            total_s = total_s - sum(step_times) + len(step_times) * statistics.median(step_times)
        self.epoch_estimates.append(total_s)

    def epoch_seconds(self) -> float | None:
        recent = self.epoch_estimates[-RECENT_EPOCHS:]
        return statistics.median(recent) if recent else None

    def epochs_that_fit(self, done: int) -> int:
        """``done`` plus the epochs that fit in the time left at the recent epoch time."""
        per_epoch = self.epoch_seconds()
        if self.budget_s is None or per_epoch is None:
            raise ValueError("no budget or no epoch measured yet")
        return done + max(0, math.floor(self.remaining() / per_epoch))

    def eta_seconds(self, epochs_left: int) -> float | None:
        per_epoch = self.epoch_seconds()
        return None if per_epoch is None else epochs_left * per_epoch
