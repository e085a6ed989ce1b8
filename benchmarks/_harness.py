"""Shared benchmark plumbing: run a command, sample the peak RSS of its whole process tree,
find nnU-Net v2 in its own environment, measure folder sizes."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
NNUNET_VENV = REPO / ".bench" / "venv"


def ensure_nnunet_env() -> Path:
    """A virtual environment with nnunetv2 from PyPI (the benchmark environment only, never a
    dependency of suprem_net). It shares this interpreter's site-packages for the CPU torch.
    ``$SUPREM_BENCH_NNUNET_BIN`` names a folder that already holds ``python`` (with nnunetv2) and
    ``nnUNetv2_plan_and_preprocess`` instead (e.g. on a machine without package registries)."""
    if os.environ.get("SUPREM_BENCH_NNUNET_BIN"):
        return Path(os.environ["SUPREM_BENCH_NNUNET_BIN"])
    bin_dir = NNUNET_VENV / "bin"
    if not (bin_dir / "nnUNetv2_plan_and_preprocess").exists():
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(NNUNET_VENV)], check=True)
        torch_pin = f"torch=={__import__('torch').__version__.split('+')[0]}"
        subprocess.run([str(bin_dir / "pip"), "install", "-q", "nnunetv2", torch_pin], check=True)
    return bin_dir


def run_measured(cmd: list[str], env: dict | None = None, poll: float = 0.05, cwd: Path | None = None) -> dict:
    """Run ``cmd`` (in ``cwd``); return wall seconds and the peak RSS: the larger of the summed RSS of the
    process and its children, sampled every ``poll`` s, and the largest high-water mark of one of them
    (the kernel's VmHWM, which a sample cannot miss; not ``wait4``'s maximum, which counts the memory
    of this process at the fork)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=cwd)
    root = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            procs = [root] + root.children(recursive=True)
            rss = 0
            for p in procs:
                try:
                    rss += p.memory_info().rss
                    peak = max(peak, _high_water_mark(p.pid))
                except psutil.Error:
                    pass
            peak = max(peak, rss)
        except psutil.Error:
            pass
        time.sleep(poll)
    out = proc.stdout.read()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{out[-3000:]}")
    return {"wall_s": wall, "peak_rss_bytes": peak, "output": out}


def _high_water_mark(pid: int) -> int:
    """Peak resident bytes of process ``pid`` so far (0 where /proc does not say)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "n/a"
