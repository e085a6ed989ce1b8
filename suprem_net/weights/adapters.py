"""Key adapters: turn a checkpoint's state dict into the key names of our networks.

An adapter gets the (unwrapped) tensor dict of a file and the model's head prefix, and returns an
:class:`Adapted`: ``tensors`` (model key -> tensor, to be matched by name and shape), ``head``
(a plain output head, kept aside for class-wise transfer) and ``skipped`` (file key -> why it is
deliberately not loaded). Nothing is dropped without a reason.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Callable

import torch

logger = logging.getLogger(__name__)

# modules of the CLIP-Driven Universal Model wrapper around the backbone (SuPreM swin/unet files)
UNIVERSAL_WRAPPER = ("organ_embedding", "precls_conv", "GAP", "controller", "text_to_vision")
# self-supervised pretext heads of the Tang et al. SSL model
TANG_PRETEXT = ("rotation_pre", "rotation_head", "contrastive_pre", "contrastive_head", "conv")
# generic wrapper prefixes of plain checkpoints (DDP, torch.compile, Lightning-style wrappers)
PLAIN_PREFIXES = ("module.", "_orig_mod.", "model.", "network.", "net.")


@dataclass
class Adapted:
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    head: dict[str, torch.Tensor] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def skip(self, key: str, reason: str) -> None:
        self.skipped[key] = reason


def _strip(key: str, prefix: str) -> str:
    return key[len(prefix):] if key.startswith(prefix) else key


def _is_head(key: str, head_key: str | None) -> bool:
    return bool(head_key) and key.startswith(head_key + ".")


def universal_wrapper(sd: dict[str, torch.Tensor], head_key: str | None) -> Adapted:
    """SuPreM / Universal Model swin and unet: ``module.backbone.<key>``; the wrapper is dropped."""
    out = Adapted()
    for k, v in sd.items():
        key = _strip(k, "module.")
        first = key.split(".", 1)[0]
        if first in UNIVERSAL_WRAPPER:
            out.skip(k, "CLIP Universal-Model wrapper (dynamic head), not part of the backbone")
            continue
        key = _strip(key, "backbone.")
        if _is_head(key, head_key):
            out.skip(k, "pre-training output head")
        else:
            out.tensors[key] = v
    return out


def segresnet_plain(sd: dict[str, torch.Tensor], head_key: str | None) -> Adapted:
    """SuPreM SegResNet: ``module.<key>``; the 1x1 head is kept aside for class-wise transfer."""
    out = Adapted()
    for k, v in sd.items():
        key = _strip(k, "module.")
        if _is_head(key, head_key):
            out.head[key] = v
            out.skip(k, "pre-training output head (its channels can seed matching target classes)")
        else:
            out.tensors[key] = v
    return out


def models_genesis(sd: dict[str, torch.Tensor], head_key: str | None) -> Adapted:
    """Models Genesis: ``module.<UNet3D key>``; the 1-channel restoration head is dropped."""
    out = Adapted()
    for k, v in sd.items():
        key = _strip(k, "module.")
        if key.startswith("out_tr."):
            out.skip(k, "Models Genesis image-restoration head")
        else:
            out.tensors[key] = v
    return out


DODNET_HEAD = ("precls_conv", "GAP", "controller")


def dodnet(sd: dict[str, torch.Tensor], head_key: str | None) -> Adapted:
    """DoDNet: ``[module.]<key>`` (optionally under ``model``); its dynamic head is dropped."""
    out = Adapted()
    for k, v in sd.items():
        key = _strip(k, "module.")
        if key.split(".", 1)[0] in DODNET_HEAD:
            out.skip(k, "DoDNet task-conditioned dynamic head, replaced by a plain head")
        else:
            out.tensors[key] = v
    return out


def med3d(sd: dict[str, torch.Tensor], head_key: str | None) -> Adapted:
    """Med3D / MedicalNet: ``[module.]<key>``; the last head conv (task-specific classes) is dropped,
    the class-agnostic ``conv_seg`` layers before it load when the file has them."""
    out = Adapted()
    for k, v in sd.items():
        key = _strip(k, "module.")
        if key.startswith("conv_seg.6."):
            out.skip(k, "MedicalNet segmentation output layer (classes of its pre-training task)")
        else:
            out.tensors[key] = v
    return out


_TANG_TOP = re.compile(r"^(patch_embed|layers[1-4]|pos_drop)\.")


def swin_ssl_tang(sd: dict[str, torch.Tensor], head_key: str | None) -> Adapted:
    """Tang et al. self-supervised Swin-ViT: ``module.swinViT.*`` (or ``swin_vit.*``, or the older
    ``model_swinvit.pt`` layout ``module.patch_embed.*`` / ``module.layersN.*`` with ``mlp.fc1/fc2``)."""
    out = Adapted()
    for k, v in sd.items():
        key = _strip(k, "module.")
        first = key.split(".", 1)[0]
        if first in TANG_PRETEXT:
            out.skip(k, "self-supervised pretext head (rotation / contrastive / reconstruction)")
            continue
        if key.startswith("swin_vit."):
            key = "swinViT." + key[len("swin_vit."):]
        elif _TANG_TOP.match(key):
            key = "swinViT." + key
        if key.startswith("swinViT."):
            key = key.replace(".mlp.fc1.", ".mlp.linear1.").replace(".mlp.fc2.", ".mlp.linear2.")
        if _is_head(key, head_key):
            out.skip(k, "self-supervised reconstruction head")
        else:
            out.tensors[key] = v
    return out


_SSL50K_LAYER = re.compile(r"^encoder\.(layers[1-4])\.0\.(?:0\.)?")


def swin_ssl_monai50k(sd: dict[str, torch.Tensor], head_key: str | None) -> Adapted:
    """MONAI 50k self-supervised Swin UNETR (Valanarasu et al.): ``checkpoint['model']`` with the
    Swin-ViT under ``encoder.`` (``encoder.layersN.0.0.<rest>`` -> ``swinViT.layersN.0.<rest>``)."""
    out = Adapted()
    for k, v in sd.items():
        key = _strip(k, "module.")
        if key == "encoder.mask_token" or key.startswith("encoder.norm."):
            out.skip(k, "masked-image-modelling token / final encoder norm (not in Swin UNETR)")
            continue
        if _is_head(key, head_key):
            out.skip(k, "self-supervised reconstruction head")
            continue
        m = _SSL50K_LAYER.match(key)
        if m:
            key = f"swinViT.{m.group(1)}.0." + key[m.end():]
        elif key.startswith("encoder."):
            key = "swinViT." + key[len("encoder."):]
        out.tensors[key] = v
    return out


def plain(sd: dict[str, torch.Tensor], head_key: str | None) -> Adapted:
    """Any other file (e.g. a fine-tuned network of ours): strip wrapper prefixes, keep every key,
    the head included (it loads when its shape matches)."""
    out = Adapted()
    for k, v in sd.items():
        key = k
        changed = True
        while changed:
            changed = False
            for p in PLAIN_PREFIXES:
                if key.startswith(p):
                    key, changed = key[len(p):], True
        out.tensors[key] = v
    return out


ADAPTERS: dict[str, Callable[[dict[str, torch.Tensor], str | None], Adapted]] = {
    "universal_wrapper": universal_wrapper,
    "segresnet_plain": segresnet_plain,
    "models_genesis": models_genesis,
    "swin_ssl_tang": swin_ssl_tang,
    "swin_ssl_monai50k": swin_ssl_monai50k,
    "dodnet": dodnet,
    "med3d": med3d,
    "plain": plain,
}


def infer_adapter(keys: list[str]) -> str:
    """Pick an adapter for a file that is not a registry entry, from its key names."""
    stripped = [_strip(k, "module.") for k in keys]
    firsts = {k.split(".", 1)[0] for k in stripped}
    if firsts & set(UNIVERSAL_WRAPPER) and "backbone" in firsts:
        return "universal_wrapper"
    if "controller" in firsts and "x8_resb" in firsts:
        return "dodnet"
    if "encoder.mask_token" in stripped or any(_SSL50K_LAYER.match(k) for k in stripped):
        return "swin_ssl_monai50k"
    if firsts & {"rotation_head", "contrastive_head", "swin_vit"} or any(_TANG_TOP.match(k) for k in stripped):
        return "swin_ssl_tang"
    return "plain"


def infer_family(keys: list[str]) -> str | None:
    """The network family a set of (adapted) keys belongs to, or ``None``."""
    for k in keys:
        if k.startswith("swinViT."):
            return "swinunetr"
        if k.startswith("down_tr64."):
            return "suprem_unet"
        if k.startswith("convInit."):
            return "segresnet"
        if k.startswith("x8_resb."):
            return "dodnet"
        if k.startswith("layer4.0.conv3."):
            return "med3d"
    return None
