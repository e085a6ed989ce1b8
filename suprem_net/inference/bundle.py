"""Exported predictor bundles: the network as ONNX, run by onnxruntime (``suprem_export``,
``suprem_predict --backend onnxruntime``; see docs/export.md).

A bundle is a folder:

* ``fold_<F>.onnx``: one network per fold, ONNX opset :data:`OPSET`, input ``image``
  (batch, channels, *patch) float32 with a dynamic batch axis, output ``logits`` (batch, classes,
  *patch) at full resolution (deep supervision off);
* ``plans.json``: the plan (for an nnU-Net model, the plan converted from nnU-Net's, with its
  mirroring axes), so preprocessing, sliding window and export are those of the torch path;
* ``bundle.json``: format and version, opset, the folds, the label names, the classes whose
  largest component is kept, the versions that exported it, the largest logit difference between
  onnxruntime and torch measured at export, and the SHA-256 of every other file.

Loading checks every file against its checksum and refuses, in one line, a bundle with a missing
or changed file, an unknown format version, or an opset that the installed onnxruntime cannot run.
The network then needs neither its Python code nor a checkpoint; onnxruntime's CPU provider runs
it with the predictor's threads.

Networks that normalise with the statistics of the batch (SuPreM's UNet3D) are exported with that
normalisation written out (mean and biased variance over the batch and space), without updating
running statistics; the predictor gives them one tile per forward as with torch.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from suprem_net.errors import SupremError
from suprem_net.io.atomic import write_json
from suprem_net.plan import plan_problem

logger = logging.getLogger(__name__)

BUNDLE_FILE = "bundle.json"
FORMAT = "suprem_net predictor bundle"
FORMAT_VERSION = 1
OPSET = 18  # ONNX opset of exported networks: onnxruntime >= 1.14 runs it
INPUT, OUTPUT = "image", "logits"
INSTALL_HINT = "pip install 'suprem_net[onnx]'"


def is_bundle(folder: str | Path) -> bool:
    return Path(folder, BUNDLE_FILE).is_file()


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


# ------------------------------------------------------------------------------------------ export
class _BatchStatisticsNorm(nn.Module):
    """What a batch norm that always uses the batch's statistics computes, written out for export
    (no running statistics are read or updated)."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.weight, self.bias, self.eps = norm.weight, norm.bias, float(norm.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = (0,) + tuple(range(2, x.dim()))
        mean = x.mean(dim=dims, keepdim=True)
        var = ((x - mean) ** 2).mean(dim=dims, keepdim=True)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        y = (x - mean) * torch.rsqrt(var + self.eps)
        return y * self.weight.view(shape) + self.bias.view(shape) if self.weight is not None else y


def _exportable(model: nn.Module) -> nn.Module:
    """``model`` with batch-statistics norms written out (in place; the parameters are shared)."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if getattr(child, "batch_stats_always", False):
                setattr(module, name, _BatchStatisticsNorm(child))
    return model


class _FullResolution(nn.Module):
    """The full-resolution output of a network that may return a list (deep supervision)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        return out[0] if isinstance(out, (list, tuple)) else out


def _export_one(model: nn.Module, example: torch.Tensor, path: Path, opset: int) -> None:
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise SupremError(f"exporting needs the onnx extra ({e.name} is not installed): {INSTALL_HINT}") from None
    batch = torch.export.Dim("batch", min=1, max=4096)
    quiet = [logging.getLogger(name) for name in ("onnxscript", "onnx_ir")]
    levels = [q.level for q in quiet]
    try:  # the exporter's optimiser logs every pass at INFO, and torch.export warns about its own internals
        for q in quiet:
            q.setLevel(logging.WARNING)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            program = torch.onnx.export(_FullResolution(model).eval(), (example,), dynamo=True, opset_version=opset,
                                        input_names=[INPUT], output_names=[OUTPUT], dynamic_shapes=({0: batch},),
                                        verbose=False)
    finally:
        for q, level in zip(quiet, levels):
            q.setLevel(level)
    program.save(str(path))


def export_bundle(model_dir: str | Path, out: str | Path, models: Sequence[nn.Module], plan: dict, *,
                  folds: Sequence[str], lcc_classes: Sequence[int] = (), source: str = "suprem",
                  opset: int = OPSET, overwrite: bool = False) -> dict:
    """Write the bundle of ``models`` (one per fold, in eval mode) and ``plan`` to ``out``, atomically
    (a temporary folder beside it, renamed when complete). Returns the contents of ``bundle.json``."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise SupremError(f"{out}: exists; pass --overwrite to replace it")
    if out.exists() and not is_bundle(out):
        raise SupremError(f"{out}: exists and is not a predictor bundle; not replacing it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        torch.manual_seed(0)
        # two tiles: a batch axis of size 1 would be fixed by the exporter
        example = torch.randn(2, len(plan["channel_names"]), *plan["patch_size"])
        differences = {}
        for fold, model in zip(folds, models):
            path = tmp / f"fold_{fold}.onnx"
            with torch.inference_mode():
                reference = _FullResolution(model).eval()(example).float().numpy()
            logger.info("exporting fold %s to ONNX (opset %d)", fold, opset)
            _export_one(_exportable(model.eval()), example, path, opset)
            got = _session(path, threads=None).run([OUTPUT], {INPUT: example.numpy()})[0]
            differences[str(fold)] = float(np.abs(got - reference).max())
        write_json(tmp / "plans.json", plan)
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "opset": opset, "source": source,
            "model": str(Path(model_dir).resolve()), "folds": [str(f) for f in folds],
            "input": {"name": INPUT, "shape": ["batch", len(plan["channel_names"]), *plan["patch_size"]]},
            "output": {"name": OUTPUT, "shape": ["batch", plan["num_classes"], *plan["patch_size"]]},
            "labels": {str(k): int(v) for k, v in plan["labels"].items()},
            "lcc_classes": [int(c) for c in lcc_classes],
            "exported_with": {n: _version(n) for n in ("suprem_net", "torch", "onnx", "onnxscript", "onnxruntime")},
            "max_abs_logit_difference": differences,
            "sha256": {p.name: sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()},
        }
        write_json(tmp / BUNDLE_FILE, manifest)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return manifest


# ------------------------------------------------------------------------------------------ loading
def _session(path: Path, threads: int | None):
    try:
        import onnxruntime as ort
    except ImportError:
        raise SupremError(f"--backend onnxruntime needs onnxruntime: {INSTALL_HINT}") from None
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types
        message = " ".join(str(e).split())
        if "opset" in message.lower():
            raise SupremError(f"{path}: its ONNX opset is newer than onnxruntime {ort.__version__} runs; "
                              "upgrade onnxruntime or export with an older opset") from None
        raise SupremError(f"{path}: onnxruntime cannot load it ({message[:200]})") from None


class OnnxNetwork(nn.Module):
    """One exported network, called like the torch network it came from (CPU tensors in and out)."""

    exported = True

    def __init__(self, session) -> None:
        super().__init__()
        self.session = session

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.session.run([OUTPUT], {INPUT: x.detach().float().cpu().contiguous().numpy()})[0]
        return torch.from_numpy(y)


def _manifest(folder: Path) -> dict:
    path = folder / BUNDLE_FILE
    if not path.is_file():
        raise SupremError(f"{folder}: not a predictor bundle (no {BUNDLE_FILE}; write one with suprem_export)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SupremError(f"{path}: unreadable ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise SupremError(f"{path}: not a suprem_net predictor bundle")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise SupremError(f"{path}: bundle format version {manifest.get('format_version')}, this suprem_net reads "
                          f"version {FORMAT_VERSION}")
    return manifest


def verify_bundle(folder: str | Path) -> dict:
    """The manifest of a complete, unchanged bundle (every file present, every checksum right)."""
    folder = Path(folder)
    manifest = _manifest(folder)
    files = manifest.get("sha256") or {}
    for name in ["plans.json"] + [f"fold_{f}.onnx" for f in manifest.get("folds", [])]:
        if name not in files:
            raise SupremError(f"{folder / BUNDLE_FILE}: no checksum for {name}")
    for name, digest in files.items():
        path = folder / name
        if not path.is_file():
            raise SupremError(f"{path}: missing from the bundle")
        if sha256(path) != digest:
            raise SupremError(f"{path}: SHA-256 does not match {BUNDLE_FILE} (changed or damaged; export again)")
    return manifest


def load_bundle(folder: str | Path, folds: Sequence[str] | None = None,
                threads: int | None = None) -> tuple[dict, list[OnnxNetwork], dict]:
    """``(plan, one network per fold, manifest)`` of a verified bundle; ``folds`` None: every fold."""
    folder = Path(folder)
    manifest = verify_bundle(folder)
    plan = json.loads((folder / "plans.json").read_text(encoding="utf-8"))
    if manifest.get("source") != "nnunetv2":
        problem = plan_problem(plan)
        if problem:
            raise SupremError(f"{folder / 'plans.json'}: {problem}")
    have = [str(f) for f in manifest["folds"]]
    folds = [str(f) for f in folds] if folds else have
    missing = [f for f in folds if f not in have]
    if missing:
        raise SupremError(f"{folder}: fold {missing[0]} is not in the bundle (have: {', '.join(have)})")
    models = [OnnxNetwork(_session(folder / f"fold_{f}.onnx", threads)) for f in folds]
    logger.info("bundle %s: folds %s, opset %s, onnxruntime", folder, ", ".join(folds), manifest.get("opset"))
    return plan, models, manifest
