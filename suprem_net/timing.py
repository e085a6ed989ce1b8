"""Wall time per named stage, for ``suprem_predict --profile`` and the benchmarks.

    times = StageTimes()
    with times("resample"):
        ...
    times.seconds  # {"resample": 1.23, ...} in the order the stages first ran

A stage entered several times (a tile batch, a slab) adds up; a stage entered inside another counts
for itself only (the normalisation inside the resampling's first pass), so the stages add up to the
wall time. Code must not yield inside a stage (the stages nest as calls do). ``NO_TIMES`` measures nothing and
costs next to nothing, so code can always write ``with times("x")``. On the CPU every torch
operation has finished when it returns, so the times are the stages' own; on a GPU they include
waiting for queued kernels only where a result is read back.
"""
from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext
from typing import Iterator


class StageTimes:
    """Seconds per stage, added up over every entry."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._nested: list[float] = []  # per open stage, the seconds of the stages inside it

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        self._nested.append(0.0)
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            self.add(stage, elapsed - self._nested.pop())
            if self._nested:
                self._nested[-1] += elapsed

    def add(self, stage: str, seconds: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds

    def merge(self, other: "StageTimes") -> None:
        for stage, s in other.seconds.items():
            self.add(stage, s)


class _NoTimes(StageTimes):
    def __call__(self, stage: str):  # type: ignore[override]
        return nullcontext()

    def add(self, stage: str, seconds: float) -> None:
        pass


NO_TIMES: StageTimes = _NoTimes()
