"""Per-case work over worker processes, in order, with a progress bar (shared by the fingerprint,
preprocessing and the AbdomenAtlas converter)."""
from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor

from tqdm import tqdm


def map_cases(fn, jobs: list, num_workers: int, desc: str) -> list:
    """Run ``fn`` over ``jobs`` in order, in worker processes when ``num_workers > 1``."""
    if num_workers <= 1 or len(jobs) <= 1:
        return [fn(j) for j in tqdm(jobs, desc=desc, unit="case", leave=False, disable=None)]
    with ProcessPoolExecutor(max_workers=num_workers) as pool:
        return list(tqdm(pool.map(fn, jobs), total=len(jobs), desc=desc, unit="case", leave=False, disable=None))
