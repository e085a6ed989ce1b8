"""Key adapters: turn a checkpoint's state dict into the key names of our networks.

An adapter gets the (unwrapped) tensor dict of a file and the model's head prefix, and returns an
:class:`Adapted`: ``tensors`` (model key -> tensor, to be matched by name and shape), ``head``
(a plain output head, kept aside for class-wise transfer), ``skipped`` (file key -> why it is
deliberately not loaded) and ``fit`` (model key -> how its tensor is brought to the network's shape
when the shapes differ, e.g. UniMiSS's positional embeddings). Nothing is dropped without a reason.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Callable

import torch

from suprem_net.io.checkpoint import WRAPPER_PREFIXES, strip_wrapper_prefixes

logger = logging.getLogger(__name__)

# modules of the CLIP-Driven Universal Model wrapper around the backbone (SuPreM swin/unet files)
UNIVERSAL_WRAPPER = ("organ_embedding", "precls_conv", "GAP", "controller", "text_to_vision")
# self-supervised pretext heads of the Tang et al. SSL model
TANG_PRETEXT = ("rotation_pre", "rotation_head", "contrastive_pre", "contrastive_head", "conv")
# generic wrapper prefixes of plain checkpoints (DDP, torch.compile, Lightning-style wrappers)
PLAIN_PREFIXES = WRAPPER_PREFIXES + ("model.", "network.", "net.")


# fit(file tensor, the network's shape) -> the tensor in that shape, or None where it cannot be fitted
Fit = Callable[[torch.Tensor, tuple[int, ...]], "torch.Tensor | None"]


@dataclass
class Adapted:
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    head: dict[str, torch.Tensor] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    fit: dict[str, Fit] = field(default_factory=dict)

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


def resize_tokens(t: torch.Tensor, length: int) -> torch.Tensor:
    """``t`` (B, N, C) resampled to (B, ``length``, C) by linear interpolation along the token axis
    with the end rows kept (row i samples position i (N - 1) / (length - 1), as
    ``scipy.ndimage.zoom(order=1)``), in float64 and returned in ``t``'s dtype."""
    n = t.shape[1]
    if n == length:
        return t
    src = t.detach().to(torch.float64)
    if n == 1 or length == 1:
        return src[:, :1].expand(-1, length, -1).to(t.dtype).clone()
    pos = torch.arange(length, dtype=torch.float64) * ((n - 1) / (length - 1))
    lo = pos.floor().long().clamp(max=n - 2)
    frac = (pos - lo)[None, :, None]
    return (src[:, lo] * (1 - frac) + src[:, lo + 1] * frac).to(t.dtype)


def _fit_tokens(t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor | None:
    if t.dim() != 3 or len(shape) != 3 or (t.shape[0], t.shape[2]) != (shape[0], shape[2]):
        return None
    return resize_tokens(t, shape[1])


def _fit_input_channels(t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor | None:
    """A first-layer kernel repeated (not rescaled) along the input channels, as UniMiSS does."""
    if len(shape) != t.dim() or shape[0] != t.shape[0] or tuple(shape[2:]) != tuple(t.shape[2:]) \
            or shape[1] % t.shape[1]:
        return None
    return t.repeat_interleave(shape[1] // t.shape[1], dim=1)


_UNIMISS_CLS_TOKENS = re.compile(r"^(transformer\.)?cls_tokens\d")
_UNIMISS_POS_WITH_CLS = re.compile(r"^transformer\.pos_embed[123]$")       # resized with their cls row
_UNIMISS_POS_DROP_CLS = re.compile(r"^(transformer\.pos_embed4|DecPosEmbed[012])$")  # cls row dropped first


def unimiss(sd: dict[str, torch.Tensor], head_key: str | None) -> Adapted:
    """UniMiSS DINO checkpoint (``checkpoint['student']``): ``module.backbone.<key>`` with separate 2D
    and 3D branches. The 3D branch loads with ``3D`` removed from its names; the 2D branch, the
    cls-token layers and the DINO head (``module.head.*``) are dropped. Positional embeddings are
    resampled along the token axis to the network's length: ``pos_embed4`` and ``DecPosEmbed*``
    after dropping their cls row, ``pos_embed1..3`` with it (as the UniMiSS fine-tuning code does)."""
    out = Adapted()
    for k, v in sd.items():
        key = _strip(_strip(k, "module."), "backbone.")
        if key.startswith("head."):
            out.skip(k, "DINO projection head of the self-distillation pre-training")
        elif "2D" in key:
            out.skip(k, "2D branch of the mixed 2D/3D pre-training (the 3D network has its own 3D weights)")
        elif _UNIMISS_CLS_TOKENS.match(key):
            out.skip(k, "cls-token layers of the pre-training (the segmentation network has no cls token)")
        else:
            key = key.replace("3D", "")
            if _UNIMISS_POS_DROP_CLS.match(key):
                v = v[:, 1:]
            if _UNIMISS_POS_DROP_CLS.match(key) or _UNIMISS_POS_WITH_CLS.match(key):
                out.fit[key] = _fit_tokens
            elif key == "transformer.patch_embed0.conv.weight":
                out.fit[key] = _fit_input_channels
            out.tensors[key] = v
    return out


def plain(sd: dict[str, torch.Tensor], head_key: str | None) -> Adapted:
    """Any other file (e.g. a fine-tuned network of ours): strip wrapper prefixes, keep every key,
    the head included (it loads when its shape matches)."""
    return Adapted(tensors=strip_wrapper_prefixes(sd, PLAIN_PREFIXES))


ADAPTERS: dict[str, Callable[[dict[str, torch.Tensor], str | None], Adapted]] = {
    "universal_wrapper": universal_wrapper,
    "segresnet_plain": segresnet_plain,
    "models_genesis": models_genesis,
    "swin_ssl_tang": swin_ssl_tang,
    "swin_ssl_monai50k": swin_ssl_monai50k,
    "dodnet": dodnet,
    "med3d": med3d,
    "unimiss": unimiss,
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
    if any(k.startswith("backbone.transformer.patch_embed3D0.") for k in stripped):
        return "unimiss"
    if "encoder.mask_token" in stripped or any(_SSL50K_LAYER.match(k) for k in stripped):
        return "swin_ssl_monai50k"
    if firsts & {"rotation_head", "contrastive_head", "swin_vit"} or any(_TANG_TOP.match(k) for k in stripped):
        return "swin_ssl_tang"
    return "plain"
