"""Pre-trained checkpoints of the SuPreM model table: registry, cache and downloads, safe loading,
head transfer.

>>> from suprem_net.weights import load_pretrained
>>> report = load_pretrained(model, "suprem_unet")          # or a path to a .pth file
>>> report.counts()  # {'loaded': 104, 'skipped': 13, ...}
"""
from suprem_net.weights.cache import import_file, local_path, verify_cache, weights_dir
from suprem_net.weights.heads import canonical_name, match_classes, transfer_head
from suprem_net.weights.loading import (
    LoadReport,
    load_pretrained,
    model_family,
    read_state_dict,
    resolve_checkpoint,
)
from suprem_net.weights.registry import (
    REGISTRY,
    CheckpointEntry,
    get_entry,
    names,
)

__all__ = [
    "REGISTRY", "CheckpointEntry", "LoadReport", "canonical_name",
    "get_entry", "import_file", "load_pretrained", "local_path", "match_classes", "model_family", "names",
    "read_state_dict", "resolve_checkpoint", "transfer_head", "verify_cache", "weights_dir",
]
