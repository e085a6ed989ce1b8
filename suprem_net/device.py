"""Which torch device a command runs on: the one resolver of ``--device`` for every stage."""
from __future__ import annotations

import torch

from suprem_net.errors import SupremError


def _available(kind: str) -> bool:
    if kind == "cuda":
        return torch.cuda.is_available()
    if kind == "mps":
        return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    return kind == "cpu"


def resolve_device(name: str | torch.device = "auto", kinds: tuple[str, ...] = ("cuda", "mps", "cpu")) -> torch.device:
    """``auto`` -> the first available of ``kinds`` (CUDA, else MPS, else the CPU); a named device that
    is not available here is a user error."""
    text = str(name)
    if text == "auto":
        return torch.device(next(k for k in kinds if _available(k)))
    device = torch.device(text)
    if device.type not in kinds:
        raise SupremError(f"--device {text}: choose one of auto, {', '.join(kinds)}")
    if not _available(device.type):
        raise SupremError(f"--device {text}: no {device.type.upper()} device is available (use --device cpu)")
    return device


def _cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else what the platform reports)."""
    import platform

    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def describe_machine(device: torch.device) -> dict:
    """What a training step's speed depends on: the device's name, the CPU's instruction set as
    PyTorch uses it (``AVX2``, ``AVX512``, ...; ``ATEN_CPU_CAPABILITY`` lowers it), oneDNN's
    ISA limit when one is set, the intra-op threads, the logical CPUs and the torch version.
    ``key`` is a short digest of all of it: measurements are cached and reused under it."""
    import hashlib
    import json
    import os

    desc = {"device": device.type, "cpu": _cpu_model(), "isa": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(), "logical_cpus": os.cpu_count() or 1, "torch": torch.__version__}
    if os.environ.get("ONEDNN_MAX_CPU_ISA"):
        desc["onednn_max_isa"] = os.environ["ONEDNN_MAX_CPU_ISA"]
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        desc.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 2 ** 30, 1),
                    cuda=torch.version.cuda)
    desc["key"] = hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:16]
    return desc
