"""The pre-trained checkpoint zoo of the SuPreM model table, as data.

One :class:`CheckpointEntry` per downloadable file. ``family`` (with its published kwargs) says which network of
:mod:`suprem_net.networks` the file loads into, ``adapter`` names the key remapping of
:mod:`suprem_net.weights.adapters`, and ``expected_tensors`` is the number of backbone tensors
(state-dict entries, buffers included) that must load, or the load is refused. ``size`` (bytes)
and ``sha256`` are the file's where known; ``checksum_note`` says where they come from and whether
they were checked.
The class orders of the heads (``ABDOMENATLAS_25``, ``UNIVERSAL_32``) live in :mod:`suprem_net.labels`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from suprem_net.labels import ABDOMENATLAS_25, UNIVERSAL_32
from suprem_net.networks import get_family

HF_BASE = "https://huggingface.co/MrGiovanni/SuPreM/resolve/main/"


@dataclass(frozen=True)
class CheckpointEntry:
    name: str
    title: str                      # the model table's name
    family: str | None              # network family, None when the architecture is not supported
    params: str                     # as published in the table (SegResNet corrected)
    data: str                       # pre-training data
    file: str
    url: str
    adapter: str | None             # key remapping, see adapters.ADAPTERS
    expected_tensors: int | None    # backbone state-dict entries that must load
    backbone_params: int | None = None   # exact parameter count without the head, where checked
    head: str = "none"              # "conv" (plain 1x1 conv), "universal" (CLIP dynamic head),
    #                                 "dynamic" (DoDNet task-conditioned head), "pretext", "none"
    head_classes: tuple[str, ...] | None = None   # class order of the head's output channels
    supported: bool = True
    unsupported_reason: str = ""
    mirror_url: str = ""
    source: str = ""                # the project that published the weights
    notes: str = ""
    extra: dict = field(default_factory=dict)
    size: int | None = None         # bytes, where known
    sha256: str | None = None       # hex digest, where known
    checksum_note: str = ""         # where size and sha256 come from; "unverified" when not checked
    size_note: str = ""             # an approximate size where the exact one is unknown
    allow_namespace: bool = False   # the file stores an argparse.Namespace (allowed in its read only)
    preset: str | None = None       # the preset of the input distribution it was pre-trained on

    @property
    def status(self) -> str:
        return "supported" if self.supported else "not yet supported"

    @property
    def kwargs(self) -> dict:
        """Plan network kwargs of the published architecture (the family's own)."""
        return get_family(self.family).published_kwargs if self.family else {}


_DBX = "https://www.dropbox.com/scl/fi/"


def _unimiss(variant: str, params: str, dropbox: str, rlkey: str, counts: tuple[int, int, int, int, int],
             **known) -> CheckpointEntry:
    """A UniMiSS row; ``counts``: tensors loaded, in the student, of the encoder, of the transformer
    decoder, of the 2D branch (the cls-token layers, 13, and the DINO head, 8, are the same in both)."""
    loaded, student, encoder, decoder, two_d = counts
    file = f"self_supervised_unimiss_nnunet_{variant}_5022.pth"
    return CheckpointEntry(
        name=f"unimiss_{variant}", title=f"UniMiSS ({variant})", family=f"unimiss_{variant}",
        params=f"{params} ({variant}; at 48x192x192 with 14 classes, the count grows with the patch)",
        data="5022 CT&MRI", file=file, url=HF_BASE + file, mirror_url=f"{_DBX}{dropbox}/{file}?rlkey={rlkey}&dl=0",
        adapter="unimiss", expected_tensors=loaded, head="pretext", source="YtongXie/UniMiSS-code",
        allow_namespace=True,
        notes=f"UniMiSS DINO training checkpoint (student, teacher, optimizer, args as an argparse.Namespace, epoch, "
              f"loss): the student's 3D branch loads ({loaded} of {student} tensors: encoder {encoder}, transformer "
              f"decoder {decoder}, '3D' removed from the names, positional embeddings resampled to the plan's "
              f"patch); the 2D branch ({two_d}), the cls-token layers (13) and the DINO head (8) are dropped. "
              "backbone_params: without the five 1x1 heads, at 48x192x192.",
        **known)


_ENTRIES: tuple[CheckpointEntry, ...] = (
    # ---- Swin UNETR ----
    CheckpointEntry(
        name="tang_swinunetr", title="Tang et al.", family="swinunetr", params="62.19M",
        data="5050 CT", file="self_supervised_nv_swin_unetr_5050.pt",
        url=_DBX + "7v0ohio4dhaod8azg0unw/self_supervised_nv_swin_unetr_5050.pt"
                   "?rlkey=rq03hg6guq9kpi4uqpbkte41d&dl=0",
        adapter="swin_ssl_tang", expected_tensors=126, backbone_params=62_186_610, head="pretext",
        source="Project-MONAI/research-contributions (SwinUNETR/Pretrain)",
        notes="self-supervised Swin-ViT encoder only (126 swinViT entries); decoder and head start random. "
              "Keys module.[swinViT.|swin_vit.]<encoder key> or the model_swinvit.pt layout "
              "(module.layersN..., mlp.fc1/fc2) are both accepted.",
    ),
    CheckpointEntry(
        name="valanarasu_swinunetr", title="Jose Valanarasu et al.", family="swinunetr",
        params="62.19M", data="50000 CT/MRI", file="self_supervised_nv_swin_unetr_50000.pth",
        url=_DBX + "ymw3zt4aawa1fvo1o7saj/self_supervised_nv_swin_unetr_50000.pth"
                   "?rlkey=sanmzwl9ez1xub9y94fiozogk&dl=0",
        adapter="swin_ssl_monai50k", expected_tensors=126, backbone_params=62_186_610, head="pretext",
        source="MONAI self-supervised Swin UNETR (50k CT/MRI)",
        notes="checkpoint['model'] with encoder.* keys renamed to swinViT.*; encoder.mask_token, encoder.norm.* "
              "and the reconstruction head out.conv.conv.* are dropped. 126 swinViT entries must load; the "
              "decoder entries (up to 157 in all) load too when the file has them.",
    ),
    CheckpointEntry(
        name="universal_swinunetr", preset="suprem_swinunetr", title="Universal Model", family="swinunetr",
        params="62.19M", data="2100 CT", file="supervised_clip_driven_universal_swin_unetr_2100.pth",
        url=_DBX + "v7fg5cesxx6hra6stln09/supervised_clip_driven_universal_swin_unetr_2100.pth"
                   "?rlkey=2pubjk679ai5s59g8884318r8&dl=0",
        adapter="universal_wrapper", expected_tensors=157, backbone_params=62_186_610, head="universal",
        head_classes=UNIVERSAL_32, source="ljwztc/CLIP-Driven-Universal-Model",
        notes="checkpoint['net'] with module.backbone.<SwinUNETR key>; the CLIP wrapper (organ_embedding, "
              "precls_conv, GAP, controller, text_to_vision) is dropped.",
    ),
    CheckpointEntry(
        name="suprem_swinunetr", preset="suprem_swinunetr", title="SuPreM", family="swinunetr", params="62.19M",
        size_note="about 759 MB (third-party report)",
        data="2100 CT", file="supervised_suprem_swinunetr_2100.pth", url=HF_BASE + "supervised_suprem_swinunetr_2100.pth",
        mirror_url=_DBX + "gd1d7k9mac5azpwurds66/supervised_suprem_swinunetr_2100.pth"
                          "?rlkey=xoqr7ey52rnese2k4hwmrlqrt&dl=0",
        adapter="universal_wrapper", expected_tensors=157, backbone_params=62_186_610, head="universal",
        head_classes=UNIVERSAL_32, source="MrGiovanni/SuPreM",
        notes="checkpoint['net'] (170 entries): module.backbone.<SwinUNETR key> (157) + the CLIP wrapper (13).",
    ),
    # ---- U-Net ----
    CheckpointEntry(
        name="models_genesis_unet", title="Models Genesis", family="suprem_unet",
        params="19.08M", data="623 CT", file="self_supervised_models_genesis_unet_620.pt",
        url=_DBX + "h9006v3bhxjlg6x1yvcge/self_supervised_models_genesis_unet_620.pt"
                   "?rlkey=2wqm80i5hvrktpk6n7ye3hc55&dl=0",
        adapter="models_genesis", expected_tensors=104, backbone_params=19_073_600, head="pretext",
        source="MrGiovanni/ModelsGenesis",
        notes="checkpoint['state_dict'] with module.<UNet3D key>; the 1-channel restoration head "
              "out_tr.final_conv is dropped.",
    ),
    _unimiss("tiny", params="22.95M", dropbox="joxv6gwhizcg5pmgxtoy7", rlkey="kj2wzl6t5fxfkxuwl18r1jfer",
             counts=(146, 207, 87, 59, 40), backbone_params=22_947_296, size=672_755_586,
             sha256="c6097192cde5c01b2d79f68f1403aa0c077d10335e010b92b37ccccc3f28a1a1",
             checksum_note="unverified: size and SHA-256 of the same-named file in the third-party mirror "
                           "jethro682/pretrain_mri (whose copies of other SuPreM files carry SuPreM's hashes)"),
    _unimiss("small", params="43.64M", dropbox="mej5qfc5w6dmtsgn7hsbs", rlkey="k0hzktopzh8ih20aou241r9rb",
             counts=(394, 481, 223, 171, 66), backbone_params=43_637_568, size=1_050_159_114,
             sha256="a3b97d8e5db01a4b7fa84a6107d859dcec15897997d33e719e02f01c815aa640",
             checksum_note="from the Git-LFS pointer of MrGiovanni/SuPreM commit 1620408 (the host's own record; "
                           "the file itself was not hashed here)"),
    CheckpointEntry(
        name="med3d", title="Med3D", family="med3d", params="85.75M", data="1638 CT",
        file="supervised_med3D_residual_unet_1623.pth",
        url=_DBX + "dv2u26f5ibwvkd0wgf8sj/supervised_med3D_residual_unet_1623.pth"
                   "?rlkey=h7ddvgilv27esypjh8w4hrhgb&dl=0",
        adapter="med3d", expected_tensors=624, backbone_params=85_201_216, head="none",
        source="Tencent/MedicalNet",
        notes="MedicalNet 3D ResNet-101 (the parameter count with its conv_seg head matches the table's 85.75M); "
              "checkpoint['state_dict'] with module.<key> assumed as in MedicalNet's releases (not checked "
              "against the file). The 624 encoder entries must load; conv_seg layers before the output "
              "conv load when present.",
    ),
    CheckpointEntry(
        name="dodnet", title="DoDNet", family="dodnet", params="17.29M", data="920 CT",
        file="supervised_dodnet_unet_920.pth",
        url=_DBX + "wf5xuoqe2pa8xky6rwhv1/supervised_dodnet_unet_920.pth?rlkey=c6g94jxukuan4osxldbrpwbix&dl=0",
        adapter="dodnet", expected_tensors=103, backbone_params=17_285_920, head="dynamic",
        source="jianpengz/DoDNet",
        notes="DoDNet's saved state dict ([module.]<key>, possibly under 'model'); its dynamic head "
              "(precls_conv, GAP, controller) is dropped and a plain cls_conv head starts random. Layout "
              "inferred from the public DoDNet code (the parameter count matches the table); the file "
              "itself was not available to check.",
    ),
    CheckpointEntry(
        name="universal_unet", preset="suprem_unet", title="Universal Model", family="suprem_unet", params="19.08M",
        data="2100 CT", file="supervised_clip_driven_universal_unet_2100.pth",
        url=_DBX + "k6yffxaavofwtkut076t0/supervised_clip_driven_universal_unet_2100.pth"
                   "?rlkey=myf71pu6v8j16bwv4ouoz4xov&dl=0",
        adapter="universal_wrapper", expected_tensors=104, backbone_params=19_073_600, head="universal",
        head_classes=UNIVERSAL_32, source="ljwztc/CLIP-Driven-Universal-Model",
        notes="checkpoint['net'] with module.backbone.<UNet3D key>; the CLIP wrapper is dropped.",
    ),
    CheckpointEntry(
        name="suprem_unet", preset="suprem_unet", title="SuPreM", family="suprem_unet", params="19.08M",
        size_note="about 233 MB (third-party report)",
        data="2100 CT", file="supervised_suprem_unet_2100.pth", url=HF_BASE + "supervised_suprem_unet_2100.pth",
        mirror_url=_DBX + "r5ti0vj6sgrengvvmez1k/supervised_suprem_unet_2100.pth"
                          "?rlkey=i4rw4xw44vpjpz75eq32fk0rb&dl=0",
        adapter="universal_wrapper", expected_tensors=104, backbone_params=19_073_600, head="universal",
        head_classes=UNIVERSAL_32, source="MrGiovanni/SuPreM",
        notes="checkpoint['net'] (117 entries): module.backbone.<UNet3D key> (104) + the CLIP wrapper (13).",
    ),
    # ---- SegResNet ----
    CheckpointEntry(
        name="suprem_segresnet", preset="suprem_segresnet", title="SuPreM", family="segresnet",
        params="4.70M (README first said 470.13M)", data="2100 CT", file="supervised_suprem_segresnet_2100.pth",
        sha256="2db81dc05cd9ea7234ca75e921e53e32b8716dc4cba88a6710742bfc282589a3", size_note="about 56.5 MB",
        checksum_note="unverified: SHA-256 and size from a third-party report",
        url=HF_BASE + "supervised_suprem_segresnet_2100.pth",
        mirror_url=_DBX + "hq10omgcie7mdsxo34bjg/supervised_suprem_segresnet_2100.pth"
                          "?rlkey=pwwes2dnlo2t6na80kioljbmm&dl=0",
        adapter="segresnet_plain", expected_tensors=81, backbone_params=4_700_880, head="conv",
        head_classes=UNIVERSAL_32, source="MrGiovanni/SuPreM",
        notes="checkpoint['net'] (83 entries): module.<SegResNet key>; the head conv_final.2.conv is not loaded "
              "as such (reported to have 32 outputs, read in the Universal-Model order; a 25-output head is "
              "read in the AbdomenAtlas 1.1 order) but its channels can seed matching target classes.",
    ),
)

REGISTRY: dict[str, CheckpointEntry] = {e.name: e for e in _ENTRIES}


def names() -> list[str]:
    """All registry names, in model-table order."""
    return list(REGISTRY)


def get_entry(name: str) -> CheckpointEntry | None:
    """The entry called ``name`` (case-insensitive), or ``None``."""
    return REGISTRY.get(name.strip().lower())


def entry_for_file(file_name: str) -> CheckpointEntry | None:
    """The entry whose published file name is ``file_name`` (a path's base name), or ``None``."""
    for entry in _ENTRIES:
        if entry.file == file_name:
            return entry
    return None


def head_classes_for(entry: CheckpointEntry, n_outputs: int) -> tuple[str, ...] | None:
    """Class order of a plain head with ``n_outputs`` channels from ``entry``'s file, or ``None``."""
    if entry.head != "conv":
        return None
    if entry.head_classes is not None and len(entry.head_classes) == n_outputs:
        return entry.head_classes
    if n_outputs == len(ABDOMENATLAS_25):
        return ABDOMENATLAS_25
    if n_outputs == len(UNIVERSAL_32):
        return UNIVERSAL_32
    return None


def zero_shot_names() -> list[str]:
    """Entries whose file carries a whole segmentation model (the CLIP-driven Universal-Model head)."""
    return [e.name for e in _ENTRIES if e.head == "universal" and e.supported]
