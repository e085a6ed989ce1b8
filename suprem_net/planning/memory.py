"""Memory and compute of one training step, measured from the network itself.

The network is built on the ``meta`` device (no memory, no compute), one forward and
backward pass is run, and we record: the bytes of every tensor autograd saves for the
backward pass (the activations that live at the peak), parameters, gradients and the
optimiser state, plus the largest single transient tensor; and the FLOPs of forward plus
backward (``torch.utils.flop_counter``). No hand-tuned reference constants.
"""
from __future__ import annotations

import functools
import json

import torch
from torch.utils.flop_counter import FlopCounterMode

from suprem_net.networks import build_network


@functools.lru_cache(maxsize=256)
def _measure_cached(network_json: str, in_channels: int, num_classes: int, patch: tuple, batch: int,
                    dtype_name: str, optimizer_slots: int) -> dict:
    network = json.loads(network_json)
    dtype = getattr(torch, dtype_name)
    try:
        with torch.device("meta"):
            net = build_network(network, in_channels, num_classes)
    except (RuntimeError, NotImplementedError):  # a constructor that needs real values (e.g. .item())
        net = build_network(network, in_channels, num_classes).to("meta")
    net = net.to(dtype)
    n_params = sum(p.numel() for p in net.parameters())
    param_bytes = n_params * 4  # master weights stay fp32 under mixed precision
    saved: dict[int, int] = {}
    keep = []
    largest = [0]

    param_ids = {id(p) for p in net.parameters()}

    def pack(t):
        if id(t) in param_ids:  # weights are counted once, with the optimiser state below
            return t
        if id(t) not in saved:
            saved[id(t)] = t.numel() * t.element_size()
            keep.append(t)
        largest[0] = max(largest[0], t.numel() * t.element_size())
        return t

    x = torch.empty((batch, in_channels, *patch), device="meta", dtype=dtype)
    with FlopCounterMode(display=False) as counter:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = net(x)
        outs = out if isinstance(out, (list, tuple)) else [out]
        loss = sum(o.float().sum() for o in outs)
        loss.backward()
    activation_bytes = sum(saved.values())
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
                 dtype: str = "float32", optimizer_slots: int = 1) -> dict:
    """Measure one training step. ``optimizer_slots``: state tensors per parameter (SGD momentum 1, AdamW 2)."""
    return dict(_measure_cached(json.dumps(network, sort_keys=True), int(in_channels), int(num_classes),
                                tuple(int(p) for p in patch), int(batch), dtype, int(optimizer_slots)))
