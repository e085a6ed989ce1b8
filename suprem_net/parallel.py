"""Per-case work over worker processes, in order, with a progress bar (shared by the fingerprint,
preprocessing and the AbdomenAtlas converter)."""
from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor

from tqdm import tqdm


def _one_thread() -> None:
    """Worker initialiser: one torch thread per worker process (the workers are the parallelism)."""
    import torch

    torch.set_num_threads(1)


def map_cases(fn, jobs: list, num_workers: int, desc: str) -> list:
    """Run ``fn`` over ``jobs`` in order, in worker processes of one torch thread each when
    ``num_workers > 1``, else in this process (with its own thread setting, left as it was)."""
    if num_workers <= 1 or len(jobs) <= 1:
        return [fn(j) for j in tqdm(jobs, desc=desc, unit="case", leave=False, disable=None)]
    with ProcessPoolExecutor(max_workers=num_workers, initializer=_one_thread) as pool:
        return list(tqdm(pool.map(fn, jobs), total=len(jobs), desc=desc, unit="case", leave=False, disable=None))
