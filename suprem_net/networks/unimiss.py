"""UniMiSS tiny and small (``unimiss_tiny``, ``unimiss_small``): the MiT encoder-decoder that
UniMiSS (Xie et al., ECCV 2022) fine-tunes for 3D CT segmentation, key-compatible with its
checkpoints once the ``unimiss`` adapter of :mod:`suprem_net.weights.adapters` has renamed them.

Written from the description in ``reference/unimiss-facts.md`` (no upstream code). A pyramid
transformer with spatial-reduction attention, a transformer decoder of the same blocks, and a
convolutional stem and last stage:

* stem ``transformer.patch_embed0``: Conv3d k7 s(1,2,2) p3 (no bias) -> InstanceNorm3d(affine)
  -> LeakyReLU(0.01), 1 -> 32 channels.
* encoder stages 1-4 ``transformer.patch_embedN.proj`` (Conv3d k3 s2 p1, no bias -> IN -> LeakyReLU;
  32 -> 48 -> 128 -> 256 -> 512), tokens in D-H-W raster order plus a learned positional
  embedding ``transformer.pos_embedN``, then ``transformer.blockN.{i}`` (heads 1/2/4/8, spatial
  reduction 6/4/2/1, MLP ratio 4). No norm after the embedding or at the end of a stage.
* decoder stages 0-2 (at the root): ``DecEmbedJ.proj`` ConvTranspose3d k2 s2 (bias), + the encoder
  skip, + ``DecPosEmbedJ``, ``DecblockJ.{i}`` (256/128/48 channels, heads 8/4/2, reduction 2/4/6,
  no q/kv bias); the final LayerNorm ``norm`` only after stage 2.
* decoder stage 3: ``transposeconv_stage3`` (48 -> 32, k2 s2) + the stem map, ``stage3_de``
  (Conv3d k3 p1 no bias -> IN -> LeakyReLU), trilinear x(1,2,2) upsampling, ``cls_conv`` (1x1).
* heads ``ds0..ds3_cls_conv`` (1x1) for deep supervision; outputs ``[result, ds3, ds2, ds1, ds0]``
  at scales 1, (1,1/2,1/2), (1/2,1/4,1/4), (1/4,1/8,1/8), (1/8,1/16,1/16).

Blocks are pre-norm (``x + attn(norm1(x))``, ``x + mlp(norm2(x))``); attention has ``q`` (C -> C),
one ``kv`` (C -> 2C, [K of all heads | V of all heads]), ``proj``; with reduction r > 1 the keys and
values come from ``sr`` (Conv3d k = s = r, bias) then ``norm`` (LayerNorm eps 1e-5). The MLP is
``fc1`` -> exact GELU -> ``fc2``. LayerNorm eps: 1e-6 for the encoder blocks' ``norm1``/``norm2``,
1e-5 everywhere else.

Depths: tiny encoder 1/1/1/1, decoder 1/1/1; small 2/3/4/3 and 3/4/3. Both families share this
module as ``nnunet``/``resenc`` share theirs, so ``--network unimiss_tiny|unimiss_small`` picks a
variant on the command line and a file of one variant cannot load into the other.

The positional embeddings have one row per token of the training patch, so the network is built
for one input size, plan kwarg ``img_size`` (z, y, x), which the planner keeps equal to the plan's
``patch_size``: depth divisible by 16, height and width by 32 (the stem does not halve the
depth), with at least two stage-4 voxels (the smallest: 32x32x32 or 16x64x32). Another input
size is refused. Parameters at 48x192x192 with 14 classes: 22,954,310
(tiny) and 43,644,582 (small), ``C + 501 K + 4.28125 D H W`` with C = 15,371,744 / 36,062,016.
"""
from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from suprem_net.errors import SupremError
from suprem_net.networks.family import Family

logger = logging.getLogger(__name__)

DIVISOR = (16, 32, 32)  # per axis (z, y, x): the stem keeps the depth, four stride-2 stages follow
DEFAULT_KWARGS: dict = {"img_size": [48, 192, 192]}

DEPTHS = {"unimiss_tiny": ((1, 1, 1, 1), (1, 1, 1)), "unimiss_small": ((2, 3, 4, 3), (3, 4, 3))}
STEM = 32
ENC_DIMS, ENC_HEADS, ENC_SR = (48, 128, 256, 512), (1, 2, 4, 8), (6, 4, 2, 1)
DEC_DIMS, DEC_HEADS, DEC_SR = (256, 128, 48), (8, 4, 2), (2, 4, 6)
MLP_RATIO = 4


def stage_grids(img_size: Sequence[int]) -> list[tuple[int, int, int]]:
    """Token grids of encoder stages 1-4 for an input of ``img_size`` (z, y, x)."""
    d, h, w = (int(s) for s in img_size)
    return [(d // 2 ** i, h // 2 ** (i + 1), w // 2 ** (i + 1)) for i in range(1, 5)]


class ConvNormAct(nn.Module):
    """Conv3d (no bias) -> InstanceNorm3d(affine, eps 1e-5) -> LeakyReLU(0.01); keys ``conv``, ``norm``."""

    def __init__(self, cin: int, cout: int, kernel: int, stride, padding: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(cin, cout, kernel, stride, padding, bias=False)
        self.norm = nn.InstanceNorm3d(cout, affine=True)
        self.act = nn.LeakyReLU(0.01, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))


class PatchEmbed(nn.Module):
    """A stride-2 ``ConvNormAct`` under the key ``proj``."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.proj = ConvNormAct(cin, cout, 3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class Attention(nn.Module):
    """Multi-head attention whose keys and values come from a strided-conv reduced token grid."""

    def __init__(self, dim: int, heads: int, sr: int, qkv_bias: bool) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.sr_ratio = sr
        if sr > 1:
            self.sr = nn.Conv3d(dim, dim, kernel_size=sr, stride=sr)
            self.norm = nn.LayerNorm(dim, eps=1e-5)

    def forward(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        b, n, c = x.shape
        hd = c // self.heads
        q = self.q(x).reshape(b, n, self.heads, hd).transpose(1, 2)
        src = x
        if self.sr_ratio > 1:
            src = self.sr(x.transpose(1, 2).reshape(b, c, *grid)).flatten(2).transpose(1, 2)
            src = self.norm(src)
        kv = self.kv(src).reshape(b, -1, 2, self.heads, hd).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, kv[0], kv[1])  # softmax(q k^T / sqrt(hd)) v
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(self, dim: int, heads: int, sr: int, qkv_bias: bool, eps: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, heads, sr, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, dim * MLP_RATIO)

    def forward(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), grid)
        return x + self.mlp(self.norm2(x))


def _tokens(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(2).transpose(1, 2)


def _volume(t: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], *grid)


class MiTEncoder(nn.Module):
    """The encoder (``transformer.*``): stem and four transformer stages."""

    def __init__(self, in_channels: int, img_size: Sequence[int], depths: Sequence[int]) -> None:
        super().__init__()
        self.patch_embed0 = ConvNormAct(in_channels, STEM, 7, (1, 2, 2), 3)
        cin = STEM
        for i, (dim, heads, sr, depth, grid) in enumerate(
                zip(ENC_DIMS, ENC_HEADS, ENC_SR, depths, stage_grids(img_size)), start=1):
            setattr(self, f"patch_embed{i}", PatchEmbed(cin, dim))
            setattr(self, f"pos_embed{i}", nn.Parameter(torch.zeros(1, math.prod(grid), dim)))
            setattr(self, f"block{i}", nn.ModuleList(Block(dim, heads, sr, True, 1e-6) for _ in range(depth)))
            cin = dim

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """``([stem, stage 1, stage 2, stage 3] maps, stage-4 tokens)``."""
        x = self.patch_embed0(x)
        maps = [x]
        for i in range(1, 5):
            x = getattr(self, f"patch_embed{i}")(x)
            grid = tuple(x.shape[2:])
            t = _tokens(x) + getattr(self, f"pos_embed{i}")
            for blk in getattr(self, f"block{i}"):
                t = blk(t, grid)
            x = _volume(t, grid)
            if i < 4:
                maps.append(x)
        return maps, x


class UniMiSS(nn.Module):
    """MiT segmentation network; returns the logits, or ``[result, ds3, ds2, ds1, ds0]`` with deep
    supervision."""

    def __init__(self, family: str, in_channels: int, num_classes: int, img_size: Sequence[int],
                 deep_supervision: bool) -> None:
        super().__init__()
        self.suprem_family = family
        self.img_size = tuple(int(s) for s in img_size)
        self.deep_supervision = deep_supervision
        enc_depths, dec_depths = DEPTHS[family]
        self.transformer = MiTEncoder(in_channels, self.img_size, enc_depths)
        grids = stage_grids(self.img_size)
        cin = ENC_DIMS[-1]
        for j, (dim, heads, sr, depth) in enumerate(zip(DEC_DIMS, DEC_HEADS, DEC_SR, dec_depths)):
            setattr(self, f"DecEmbed{j}", _UpEmbed(cin, dim))
            setattr(self, f"DecPosEmbed{j}", nn.Parameter(torch.zeros(1, math.prod(grids[2 - j]), dim)))
            setattr(self, f"Decblock{j}", nn.ModuleList(Block(dim, heads, sr, False, 1e-5) for _ in range(depth)))
            cin = dim
        self.norm = nn.LayerNorm(DEC_DIMS[-1], eps=1e-5)
        self.transposeconv_stage3 = nn.ConvTranspose3d(DEC_DIMS[-1], STEM, kernel_size=2, stride=2)
        self.stage3_de = ConvNormAct(STEM, STEM, 3, 1, 1)
        for j, dim in enumerate((*DEC_DIMS, STEM)):
            setattr(self, f"ds{j}_cls_conv", nn.Conv3d(dim, num_classes, kernel_size=1))
        self.cls_conv = nn.Conv3d(STEM, num_classes, kernel_size=1)
        self.apply(_init_weights)
        for name, p in self.named_parameters():
            if "pos_embed" in name.lower():
                nn.init.trunc_normal_(p, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        if tuple(x.shape[2:]) != self.img_size:
            raise SupremError(f"UniMiSS built for input {list(self.img_size)} got {list(x.shape[2:])}: its positional "
                              "embeddings fix the size (plan network.kwargs.img_size must equal patch_size)")
        maps, x = self.transformer(x)
        side = []
        for j in range(3):
            x = getattr(self, f"DecEmbed{j}")(x)
            grid = tuple(x.shape[2:])
            t = _tokens(x) + _tokens(maps[3 - j]) + getattr(self, f"DecPosEmbed{j}")
            for blk in getattr(self, f"Decblock{j}"):
                t = blk(t, grid)
            if j == 2:
                t = self.norm(t)
            x = _volume(t, grid)
            side.append(getattr(self, f"ds{j}_cls_conv")(x))
        x = self.stage3_de(self.transposeconv_stage3(x) + maps[0])
        side.append(self.ds3_cls_conv(x))
        x = F.interpolate(x, scale_factor=(1, 2, 2), mode="trilinear", align_corners=False)
        result = self.cls_conv(x)
        return [result, *reversed(side)] if self.deep_supervision else result


class _UpEmbed(nn.Module):
    """ConvTranspose3d k2 s2 (bias, no norm or activation) under the key ``proj``."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.proj = nn.ConvTranspose3d(cin, cout, kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def _init_weights(m: nn.Module) -> None:
    """Linear: trunc-normal(0.02), zero bias; Conv3d: Kaiming-normal fan_out, zero bias; LayerNorm:
    1 and 0; transposed convolutions and instance norms keep PyTorch's defaults."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif type(m) is nn.Conv3d:
        nn.init.kaiming_normal_(m.weight, mode="fan_out")
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def check_img_size(img_size) -> list[int]:
    """``img_size`` as three ints, each divisible by its :data:`DIVISOR`; else ``SupremError``."""
    try:
        size = [int(s) for s in img_size]
    except (TypeError, ValueError):
        size = []
    if len(size) != 3 or any(s <= 0 or s % d for s, d in zip(size, DIVISOR)):
        raise SupremError(f"unimiss: img_size {img_size!r} must be three sizes (z, y, x) with z divisible by "
                          f"{DIVISOR[0]} and y, x by {DIVISOR[1]}")
    if math.prod(stage_grids(size)[-1]) < 2:  # the stage-4 instance norm needs two voxels to train
        raise SupremError(f"unimiss: img_size {size} leaves one stage-4 voxel; use at least twice the divisor "
                          f"{list(DIVISOR)} on one axis (e.g. {[2 * DIVISOR[0], DIVISOR[1], DIVISOR[2]]})")
    return size


def build(family: str, kwargs: dict, in_channels: int, num_classes: int, deep_supervision: bool) -> nn.Module:
    """Build UniMiSS tiny or small for inputs of ``kwargs["img_size"]`` (default 48x192x192)."""
    if family not in DEPTHS:
        raise SupremError(f"unimiss: unknown variant {family!r}; choose {', '.join(DEPTHS)}")
    unknown = set(kwargs) - set(DEFAULT_KWARGS)
    if unknown:
        raise SupremError(f"{family}: unknown network kwargs {sorted(unknown)}; allowed: {sorted(DEFAULT_KWARGS)}")
    opts = {**DEFAULT_KWARGS, **kwargs}
    return UniMiSS(family, in_channels, num_classes, check_img_size(opts["img_size"]), deep_supervision)


def _variant(name: str):
    """Signature of a variant's checkpoint: the UniMiSS stem, and a second stage-1 block only in small."""
    small = name == "unimiss_small"
    return lambda keys: "transformer.patch_embed0.conv.weight" in keys and \
        ("transformer.block1.1.norm1.weight" in keys) == small


def _family(name: str) -> Family:
    return Family(
        name, functools.partial(build, name), published_kwargs=DEFAULT_KWARGS, divisor=DIVISOR,
        min_patch=tuple(2 * d for d in DIVISOR),
        head_pattern=r"(?:ds[0-3]_)?cls_conv",  # the full-resolution head and the four deep-supervision heads
        input_keys=("transformer.patch_embed0.conv.weight",),
        encoder_prefixes=("transformer.",),  # its pre-trained decoder is not "encoder"
        signature=_variant(name),
        # UniMiSS was pre-trained and fine-tuned in nnU-Net's (z, y, x) order (facts §1.4: patch
        # [48, 160, 224] (z, y, x) at 2.5 x 0.81 x 0.81 mm): its plans keep that order, the slice axis first
        axes="zyx",
        deep_supervision=True,  # UniMiSS fine-tunes with its four side outputs
        patch_kwarg="img_size",  # the planner writes the plan's patch size here
        # UniMiSS's fine-tuning recipe (facts §1.4): AdamW, lr 1e-4, poly schedule, gradient clipping at 12;
        # the weight decay is not recorded there, so the trainer's AdamW default is written out
        training_defaults={"optimizer": "adamw", "lr": 1e-4, "weight_decay": 1e-5, "schedule": "poly",
                           "poly_exponent": 0.9, "grad_clip": 12.0})


FAMILIES = {name: _family(name) for name in DEPTHS}
