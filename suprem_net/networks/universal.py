"""The CLIP-driven Universal-Model wrapper stored in the SuPreM Swin UNETR and U-Net checkpoints,
re-implemented from its published description (for zero-shot prediction, no text encoder needed).

Around the backbone (its own output head removed) sit:
- ``organ_embedding`` [C, 512]: fixed CLIP text embeddings of the C class names (a buffer);
- ``text_to_vision``: Linear(512, 256), then ReLU;
- ``GAP``: GroupNorm(16), ReLU, global average pool, 1x1 conv (bottleneck channels -> 256);
- ``controller``: 1x1 conv 512 -> 153: for every class, the parameters of a 3-layer dynamic
  1x1 head 8 -> 8 -> 8 -> 1 (weights 64 + 64 + 8, then biases 8 + 8 + 1);
- ``precls_conv``: GroupNorm(16), ReLU, 1x1 conv (decoder channels -> 8).

For class c the head input is ``precls_conv(decoder features)``; its parameters come from
``controller(cat(GAP(bottleneck), relu(text_to_vision(organ_embedding[c]))))``. Each class
gives one sigmoid logit (multi-label). :class:`UniversalModel` returns ``C + 1`` channels:
a constant 0 for background followed by the C logits, so that argmax picks the class with
the largest logit among those with sigmoid > 0.5 (logit > 0), and background where none is.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from suprem_net.networks import build_network

WEIGHT_NUMS = (64, 64, 8)
BIAS_NUMS = (8, 8, 1)
# backbone family -> (bottleneck channels, decoder channels, name of its own output head)
BACKBONES = {"swinunetr": (768, 48, "out"), "suprem_unet": (512, 64, "out_tr")}


class UniversalModel(nn.Module):
    def __init__(self, family: str, num_classes: int, backbone_kwargs: dict | None = None) -> None:
        super().__init__()
        if family not in BACKBONES:
            raise ValueError(f"no Universal-Model wrapper for {family!r}")
        deep, dec, head = BACKBONES[family]
        self.family = family
        self.backbone = build_network({"family": family, "kwargs": backbone_kwargs or {}}, 1, 1)
        delattr(self.backbone, head)  # the pre-training backbone has no plain output head
        self.register_buffer("organ_embedding", torch.zeros(num_classes, 512))
        self.precls_conv = nn.Sequential(nn.GroupNorm(16, dec), nn.ReLU(inplace=True), nn.Conv3d(dec, 8, 1))
        self.GAP = nn.Sequential(nn.GroupNorm(16, deep), nn.ReLU(inplace=True), nn.AdaptiveAvgPool3d(1),
                                 nn.Conv3d(deep, 256, 1))
        self.controller = nn.Conv3d(512, sum(WEIGHT_NUMS) + sum(BIAS_NUMS), 1)
        self.text_to_vision = nn.Linear(512, 256)

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(bottleneck features, full-resolution decoder features) of the backbone."""
        b = self.backbone
        if self.family == "swinunetr":
            hidden = b.swinViT(x, b.normalize)
            enc0, enc1 = b.encoder1(x), b.encoder2(hidden[0])
            enc2, enc3 = b.encoder3(hidden[1]), b.encoder4(hidden[2])
            deep = b.encoder10(hidden[4])
            d = b.decoder5(deep, hidden[3])
            d = b.decoder2(b.decoder3(b.decoder4(d, enc3), enc2), enc1)
            return deep, b.decoder1(d, enc0)
        y, s64 = b.down_tr64(x)
        y, s128 = b.down_tr128(y)
        y, s256 = b.down_tr256(y)
        deep, _ = b.down_tr512(y)
        return deep, b.up_tr64(b.up_tr128(b.up_tr256(deep, s256), s128), s64)

    def class_logits(self, x: torch.Tensor) -> torch.Tensor:
        """One logit per class, (B, C, Z, Y, X)."""
        deep, dec = self.features(x)
        n = self.organ_embedding.shape[0]
        task = F.relu(self.text_to_vision(self.organ_embedding))[:, :, None, None, None]  # (C, 256, 1, 1, 1)
        pooled = self.GAP(deep)  # (B, 256, 1, 1, 1)
        head_in = self.precls_conv(dec)  # (B, 8, Z, Y, X)
        out = []
        for i in range(x.shape[0]):
            cond = torch.cat([pooled[i:i + 1].expand(n, -1, -1, -1, -1), task], 1)
            params = self.controller(cond).flatten(1)  # (C, 153)
            splits = torch.split(params, WEIGHT_NUMS + BIAS_NUMS, dim=1)
            ws, bs = splits[:3], splits[3:]
            h = head_in[i:i + 1].repeat(1, n, 1, 1, 1)  # (1, C*8, Z, Y, X): one group per class
            for layer in range(3):
                out_ch = 8 if layer < 2 else 1
                w = ws[layer].reshape(n * out_ch, -1, 1, 1, 1)
                h = F.conv3d(h, w, bs[layer].reshape(-1), groups=n)
                if layer < 2:
                    h = F.relu(h)
            out.append(h)
        return torch.cat(out, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.class_logits(x)
        return torch.cat([torch.zeros_like(logits[:, :1]), logits], 1)
