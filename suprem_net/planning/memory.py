"""Memory and compute of one training step, measured from the network itself.

The network is built on the ``meta`` device (no memory, no compute), one forward and
backward pass is run, and we record: the bytes of every tensor autograd saves for the
backward pass (the activations that live at the peak, the loss's included), the labels, the
parameters, gradients and optimiser state, plus the largest single transient tensor; and the
FLOPs of forward plus backward (``torch.utils.flop_counter``). No hand-tuned reference constants.

For a mixed-precision (GPU) plan the pass imitates CUDA autocast, which does not act on ``meta``
tensors: the weights stay fp32, convolutions and matrix products get bf16 copies of their inputs,
and group and layer norms (and the loss's softmax) compute in fp32, so that their fp32 outputs,
which the next layer saves, are counted as such. How close the prediction comes to real peaks on
a GPU is in docs/benchmarks.md ("On a GPU").
"""
from __future__ import annotations

import contextlib
import functools
import json

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode

from suprem_net.networks import build_network
from suprem_net.labels import PACK_BITS
from suprem_net.losses import build_loss

# CUDA autocast's op lists (the ones these networks use): computed in the low precision ...
LOW_PRECISION_OPS = {F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
                     F.linear, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm, torch.baddbmm,
                     torch.mm, torch.addmm, F.scaled_dot_product_attention}
# ... and in fp32 whatever their input (instance and batch norms keep their input's precision)
FP32_OPS = {F.group_norm, torch.group_norm, F.layer_norm, torch.layer_norm, F.softmax, torch.softmax,
            F.log_softmax, torch.log_softmax, torch.exp, torch.log, torch.pow, torch.logsumexp}


class _AutocastOnMeta(TorchFunctionMode):
    """CUDA autocast's casts, for tensors on the ``meta`` device (where real autocast does nothing)."""

    def __init__(self, low: torch.dtype):
        super().__init__()
        self.low = low

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        target = self.low if func in LOW_PRECISION_OPS else torch.float32 if func in FP32_OPS else None
        if target is not None:
            def cast(a):
                return a.to(target) if isinstance(a, torch.Tensor) and a.is_floating_point() else a

            args = tuple(cast(a) for a in args)
            kwargs = {k: cast(v) for k, v in kwargs.items()}
        return func(*args, **kwargs)


@functools.lru_cache(maxsize=256)
def _measure_cached(network_json: str, in_channels: int, num_classes: int, patch: tuple, batch: int,
                    dtype_name: str, optimizer_slots: int, loss_name: str | None) -> dict:
    network = json.loads(network_json)
    dtype = getattr(torch, dtype_name)
    try:
        with torch.device("meta"):
            net = build_network(network, in_channels, num_classes)
    except (RuntimeError, NotImplementedError):  # a constructor that needs real values (e.g. .item())
        net = build_network(network, in_channels, num_classes).to("meta")
    mixed = dtype != torch.float32  # autocast: fp32 weights and inputs, casts per operation
    n_params = sum(p.numel() for p in net.parameters())
    param_bytes = n_params * 4
    saved: dict[int, int] = {}
    keep = []
    largest = [0]

    param_ids = {id(p) for p in net.parameters()}

    def pack(t):
        base = t._base if t._base is not None else t  # a view saves its base's memory, once
        if id(base) in param_ids:  # weights are counted once, with the optimiser state below
            return t
        if id(base) not in saved:
            saved[id(base)] = base.numel() * base.element_size()
            keep.append(base)
        largest[0] = max(largest[0], base.numel() * base.element_size())
        return t

    x = torch.empty((batch, in_channels, *patch), device="meta")
    target = None
    if loss_name is not None:  # the trainer's labels: int64, packed 16 classes per channel when multi-label
        label_channels = -(-num_classes // PACK_BITS) if loss_name == "dice_bce" else 1
        target = torch.empty((batch, label_channels, *patch), device="meta", dtype=torch.long)
    autocast = _AutocastOnMeta(dtype) if mixed else contextlib.nullcontext()
    with FlopCounterMode(display=False) as counter:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
            out = net(x)
            if target is None:
                outs = out if isinstance(out, (list, tuple)) else [out]
                loss = sum(o.float().sum() for o in outs)
            else:
                loss = build_loss(loss_name, num_classes)(out, target)
        loss.backward()
    activation_bytes = sum(saved.values()) + (target.numel() * target.element_size() if target is not None else 0)
    transient = 2 * largest[0]
    peak = activation_bytes + param_bytes * (2 + optimizer_slots) + transient
    return {
        "parameters": int(n_params),
        "activation_bytes": int(activation_bytes),
        "param_grad_optimizer_bytes": int(param_bytes * (2 + optimizer_slots)),
        "transient_bytes": int(transient),
        "predicted_peak_bytes": int(peak),
        "flops_per_iteration": int(counter.get_total_flops()),
    }


def measure_step(network: dict, in_channels: int, num_classes: int, patch, batch: int,
                 dtype: str = "float32", optimizer_slots: int = 1, loss: str | None = None) -> dict:
    """Measure one training step. ``optimizer_slots``: state tensors per parameter (SGD momentum 1, AdamW 2);
    ``loss``: the plan's training loss (``dice_ce``, ``dice_bce``), with its labels; None: the outputs' sum."""
    return dict(_measure_cached(json.dumps(network, sort_keys=True), int(in_channels), int(num_classes),
                                tuple(int(p) for p in patch), int(batch), dtype, int(optimizer_slots), loss))
