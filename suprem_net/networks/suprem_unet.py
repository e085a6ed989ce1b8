"""SuPreM's U-Net (``suprem_unet``): the Models Genesis style UNet3D, key-compatible with the
SuPreM / CLIP-Universal-Model / Models Genesis checkpoints.

Architecture (re-implemented from the published description, not copied):

* ``LUConv`` = Conv3d(k=3, p=1, bias) -> batch norm -> activation; keys ``conv1.*``, ``bn1.*``.
* encoder ``down_tr64`` (1->32->64, pool), ``down_tr128`` (64->64->128, pool),
  ``down_tr256`` (128->128->256, pool), ``down_tr512`` (256->256->512, no pool): bottleneck at 1/8.
* decoder ``up_tr256`` / ``up_tr128`` / ``up_tr64``: ConvTranspose3d(k=2, s=2) (``up_conv``),
  concatenation ``[upsampled, skip]``, two LUConv (``ops.0``, ``ops.1``).
* head ``out_tr.final_conv`` = Conv3d(64, num_classes, k=1), raw logits.

19,073,600 parameters without the head, 19,075,225 with 25 classes. Every patch edge must be
divisible by 8. There is no deep supervision (the flag is ignored).

Without gradients on the CPU (prediction) the forward takes less memory for the same numbers: the
norms run in place and each decoder level too large for one slab convolves its concatenation slab by
slab (:meth:`UpTransition.forward_lean`); training, autocast and traced forwards use the plain form.

Plan kwargs (all optional; ``{}`` gives the published network):

* ``act`` (``"relu"``): ``"relu"``, ``"elu"`` or ``"prelu"`` (PReLU adds ``activation.weight``
  keys that the SuPreM files do not have).
* ``batch_stats_always`` (``True``): SuPreM's ``ContBatchNorm3d`` normalises with the statistics
  of the current batch *also in eval mode* (running statistics are updated but never used).
  ``True`` reproduces SuPreM: a tile's prediction then depends on the other tiles in the batch,
  so tiles must be predicted one at a time (sliding-window batch size 1), and training needs a
  batch of more than one voxel per channel. ``False`` gives an ordinary ``BatchNorm3d`` that uses
  the running statistics in eval mode (the pretrained running statistics are loaded too, but
  they were accumulated under SuPreM's behaviour; expect a small shift at first).

``in_channels`` other than 1 is allowed (SuPreM is hard-wired to 1); the first convolution
``down_tr64.ops.0.conv1.weight`` then has another shape and cannot take pretrained weights
(the loader reports it as a shape mismatch and leaves it randomly initialised).
"""
from __future__ import annotations

import functools
import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

from suprem_net.errors import SupremError
from suprem_net.networks.family import Family, prefixed

logger = logging.getLogger(__name__)

DEFAULT_KWARGS: dict = {"act": "relu", "batch_stats_always": True}

# (in, mid, out) channels of the two LUConv of each encoder stage; the decoder in/out channels.
_ENCODER = {"down_tr64": (None, 32, 64), "down_tr128": (64, 64, 128),
            "down_tr256": (128, 128, 256), "down_tr512": (256, 256, 512)}
_DECODER = {"up_tr256": (512, 256, 256), "up_tr128": (256, 128, 128), "up_tr64": (128, 64, 64)}
#            name: (channels coming up, skip channels, out channels)


class ContBatchNorm3d(nn.BatchNorm3d):
    """BatchNorm3d that, when ``batch_stats_always``, always normalises with batch statistics.

    Same parameters and buffers (``weight``, ``bias``, ``running_mean``, ``running_var``,
    ``num_batches_tracked``) as ``nn.BatchNorm3d``, so the state-dict keys match SuPreM's. As in
    SuPreM, the running statistics are updated on every call (also in eval mode) but never used.
    """

    def __init__(self, num_features: int, batch_stats_always: bool = True) -> None:
        super().__init__(num_features)
        self.batch_stats_always = batch_stats_always

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.batch_stats_always:
            return super().forward(x)
        if x.dim() != 5:
            raise ValueError(f"expected a 5D input, got {x.dim()}D")
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            True, self.momentum, self.eps)

    def normalise_(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` written into ``x`` itself (the same kernel, so the same numbers), for a tensor
        nobody else holds; in training mode without ``batch_stats_always`` it is :meth:`forward`."""
        if self.training and not self.batch_stats_always:  # updates num_batches_tracked too
            return self.forward(x)
        stats = x.new_empty(0), x.new_empty(0)
        torch.ops.aten.native_batch_norm.out(x, self.weight, self.bias, self.running_mean, self.running_var,
                                             self.batch_stats_always, self.momentum, self.eps,
                                             out=x, save_mean=stats[0], save_invstd=stats[1])
        return x

    def extra_repr(self) -> str:
        return super().extra_repr() + f", batch_stats_always={self.batch_stats_always}"


def _lean(x: torch.Tensor) -> bool:
    """Whether this forward may trade the autograd-friendly form for less memory: no gradient, on the
    CPU without autocast, and not traced (torch.compile or an export see the plain form)."""
    if torch.is_grad_enabled() or x.device.type != "cpu":
        return False
    try:
        autocast = torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4
        autocast = torch.is_autocast_cpu_enabled()
    traced = any(getattr(torch.compiler, f, lambda: False)() for f in ("is_compiling", "is_exporting"))
    return not autocast and not traced


def _activation(act: str, channels: int) -> nn.Module:
    if act == "relu":
        return nn.ReLU(inplace=True)
    if act == "elu":
        return nn.ELU(inplace=True)
    if act == "prelu":
        return nn.PReLU(channels)
    raise SupremError(f"suprem_unet: unknown act {act!r}; choose relu, elu or prelu")


class LUConv(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, act: str, batch_stats_always: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(in_ch, out_ch, kernel_size=3, padding=1)
        self.bn1 = ContBatchNorm3d(out_ch, batch_stats_always)
        self.activation = _activation(act, out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(x)
        return self.activation(self.bn1.normalise_(y) if _lean(y) else self.bn1(y))


class DownTransition(nn.Module):
    """Two LUConv, then (except at the bottleneck) a 2x max-pool. Returns ``(out, skip)``."""

    def __init__(self, in_ch: int, mid_ch: int, out_ch: int, pool: bool, act: str, bsa: bool) -> None:
        super().__init__()
        self.ops = nn.Sequential(LUConv(in_ch, mid_ch, act, bsa), LUConv(mid_ch, out_ch, act, bsa))
        self.maxpool = nn.MaxPool3d(2) if pool else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        skip = self.ops(x)
        return (self.maxpool(skip) if self.maxpool is not None else skip), skip


class UpTransition(nn.Module):
    slab_bytes = 64 << 20  # the most memory one slab of :meth:`forward_lean` takes

    def __init__(self, up_ch: int, skip_ch: int, out_ch: int, act: str, bsa: bool) -> None:
        super().__init__()
        self.up_conv = nn.ConvTranspose3d(up_ch, up_ch, kernel_size=2, stride=2)
        self.ops = nn.Sequential(LUConv(up_ch + skip_ch, out_ch, act, bsa), LUConv(out_ch, out_ch, act, bsa))

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.ops(torch.cat((self.up_conv(x), skip), dim=1))

    def forward_lean(self, x: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        """``forward(x, skips.pop())`` in less memory (inference): the concatenation of the upsampled
        ``x`` and the skip is never made whole; the first convolution runs slab by slab along the
        first spatial axis on a buffer of the planes it needs (halo included), and the skip is let go
        before the norm. The same arithmetic per output voxel, so the same numbers (tested)."""
        skip = skips.pop()
        step = _slab_planes(self.up_conv, skip, self.slab_bytes)
        if step >= skip.shape[2]:
            return self(x, skip)  # the concatenation fits in one slab
        first = self.ops[0]
        y = _conv_of_upsampled_and_skip(self.up_conv, first.conv1, x, skip, step)
        del skip
        return self.ops[1](first.activation(first.bn1.normalise_(y)))


def _slab_planes(up: nn.ConvTranspose3d, skip: torch.Tensor, slab_bytes: int) -> int:
    """How many planes of the concatenation ``cat((up(x), skip), 1)`` fit in ``slab_bytes``."""
    n, cs, _, h, w = skip.shape
    return max(1, slab_bytes // ((up.out_channels + cs) * n * h * w * skip.element_size()))


def _conv_of_upsampled_and_skip(up: nn.ConvTranspose3d, conv: nn.Conv3d, x: torch.Tensor, skip: torch.Tensor,
                                step: int) -> torch.Tensor:
    """``conv(cat((up(x), skip), 1))`` ``step`` output planes at a time along the first spatial axis:
    ``up`` has kernel = stride (an upsampled plane p comes from plane p // stride of ``x``), ``conv``
    stride 1 and a kernel of 2 x padding + 1 along that axis (the halo), zeros beyond the edges as its
    padding."""
    n, cs, depth, h, w = skip.shape
    cu, s, halo = up.out_channels, up.stride[0], conv.padding[0]
    fmt = torch.channels_last_3d if skip.is_contiguous(memory_format=torch.channels_last_3d) \
        and not skip.is_contiguous() else torch.contiguous_format
    out = torch.empty((n, conv.out_channels, depth, h, w), dtype=skip.dtype, device=skip.device, memory_format=fmt)
    for a in range(0, depth, step):
        b = min(a + step, depth)
        lo, hi = max(a - halo, 0), min(b + halo, depth)
        before, after = halo - (a - lo), halo - (hi - b)  # zero planes of the padding at the edges
        planes = torch.empty((n, cu + cs, before + hi - lo + after, h, w), dtype=skip.dtype, device=skip.device,
                             memory_format=fmt)
        planes[:, :, :before] = 0
        planes[:, :, before + hi - lo:] = 0
        xa, xb = lo // s, (hi - 1) // s + 1
        planes[:, :cu, before:before + hi - lo] = up(x[:, :, xa:xb])[:, :, lo - xa * s:hi - xa * s]
        planes[:, cu:, before:before + hi - lo] = skip[:, :, lo:hi]
        out[:, :, a:b] = F.conv3d(planes, conv.weight, conv.bias, 1, (0, *conv.padding[1:]))
    return out


class OutputTransition(nn.Module):
    def __init__(self, in_ch: int, num_classes: int) -> None:
        super().__init__()
        self.final_conv = nn.Conv3d(in_ch, num_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.final_conv(x)


class SupremUNet3D(nn.Module):
    """SuPreM's UNet3D with a plain 1x1x1 conv head (``out_tr.final_conv``)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 25, act: str = "relu",
                 batch_stats_always: bool = True) -> None:
        super().__init__()
        self.batch_stats_always = batch_stats_always
        for name, (cin, mid, cout) in _ENCODER.items():
            setattr(self, name, DownTransition(in_channels if cin is None else cin, mid, cout,
                                               pool=name != "down_tr512", act=act, bsa=batch_stats_always))
        for name, (up, skip, cout) in _DECODER.items():
            setattr(self, name, UpTransition(up, skip, cout, act, batch_stats_always))
        self.out_tr = OutputTransition(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lean = _lean(x)
        skips = []
        for down in (self.down_tr64, self.down_tr128, self.down_tr256):
            x, skip = down(x)
            skips.append(skip)
        del skip  # the list holds the skips, so each can be let go once used
        x, _ = self.down_tr512(x)
        for up in (self.up_tr256, self.up_tr128, self.up_tr64):
            x = up.forward_lean(x, skips) if lean else up(x, skips.pop())
        return self.out_tr(x)


def build(family: str, kwargs: dict, in_channels: int, num_classes: int, deep_supervision: bool) -> nn.Module:
    """Build SuPreM's UNet3D; ``deep_supervision`` is ignored (the network has none)."""
    unknown = set(kwargs) - set(DEFAULT_KWARGS)
    if unknown:
        raise SupremError(f"suprem_unet: unknown network kwargs {sorted(unknown)}; allowed: {sorted(DEFAULT_KWARGS)}")
    opts = {**DEFAULT_KWARGS, **kwargs}
    if deep_supervision:
        logger.debug("suprem_unet has no deep supervision; the flag is ignored")
    if in_channels != 1:
        logger.info("suprem_unet with %d input channels: the first convolution cannot take pretrained weights",
                    in_channels)
    return SupremUNet3D(in_channels, num_classes, act=str(opts["act"]),
                        batch_stats_always=bool(opts["batch_stats_always"]))


def batch_independent(kwargs: dict) -> bool:
    """False with SuPreM's batch-statistics norm: a tile's prediction depends on the batch it is in."""
    return not bool({**DEFAULT_KWARGS, **kwargs}["batch_stats_always"])


FAMILIES = {"suprem_unet": Family(
    "suprem_unet", functools.partial(build, "suprem_unet"), published_kwargs=DEFAULT_KWARGS, divisor=8, min_patch=32,
    head_key="out_tr.final_conv", input_keys=("down_tr64.ops.0.conv1.weight",), encoder_prefixes=("down_tr",),
    signature=prefixed("down_tr64."), channels_last=True, batch_independent=batch_independent,
    # batch statistics: a larger batch would change what each sample is normalised with
    grows_batch=False)}
