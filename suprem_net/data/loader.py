"""Batches of patches from blosc2, augmented in background worker processes.

Every batch is a pure function of ``(seed, stream, epoch, iteration, rank)``: the loader
derives its own generator and reseeds numpy's global one (used by the batchgenerators
transforms, which run in the same worker right after the batch is drawn) from those numbers.
Workers produce batches round robin and ``MultiThreadedAugmenter`` returns them in order, so
the k-th batch the trainer receives is the same with 0, 1 or 8 workers, and a run resumed at
epoch E sees exactly the batches an uninterrupted run would.
"""
from __future__ import annotations

import ctypes
import functools
import logging
import os
import random
import signal
import sys

import numpy as np
import torch
from batchgenerators.dataloading.data_loader import SlimDataLoaderBase
from batchgenerators.dataloading.multi_threaded_augmenter import MultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
from batchgenerators.transforms.abstract_transforms import AbstractTransform, Compose

from suprem_net.data.augmentation import AugmentationConfig, SpatialAugmentation, training_transforms
from suprem_net.data.dataset import CaseStore
from suprem_net.data.sampler import choose_region, forced_foreground
from suprem_net.labels import LabelScheme, pack16

TRAIN_STREAM, VAL_STREAM = 0, 1


def annotated_matrix(annotated: list[list[int] | None], scheme: LabelScheme) -> np.ndarray:
    """(B, outputs) bool: which output channels are annotated in each sample's case (class c is output
    ``c - 1`` of a multi-label network, ``c`` of a softmax one, whose background channel is always on).
    A case without ``annotated_classes`` is fully annotated."""
    out = np.ones((len(annotated), scheme.num_outputs), dtype=bool)
    for b, classes in enumerate(annotated):
        if classes is None:
            continue
        out[b] = False
        out[b, [int(c) - 1 + scheme.first_scored_output for c in classes]] = True
        if not scheme.multi_label:
            out[b, 0] = True
    return out


log = logging.getLogger(__name__)


class AsTensors(AbstractTransform):
    """The workers' last step: the image as a float32 and the labels as an int16 torch tensor. Torch
    tensors cross from a worker to the training process through shared memory, numpy arrays are
    pickled through a pipe, which costs the training process several times more per batch
    (docs/benchmarks.md, "On a GPU")."""

    def __call__(self, **batch):
        batch["data"] = torch.from_numpy(np.ascontiguousarray(batch["data"], dtype=np.float32))
        batch["seg"] = torch.from_numpy(np.ascontiguousarray(batch["seg"], dtype=np.int16))
        return batch


def _die_with_parent(parent_pid: int) -> None:
    """In a worker: ask Linux to SIGTERM this process when its parent dies (a SIGKILLed trainer
    would otherwise leave workers spinning on a full queue)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except OSError:
            return
    if os.getppid() != parent_pid:
        os._exit(1)


class PatchLoader(SlimDataLoaderBase):
    """Draws ``batch_size`` patches per call, each through ``spatial`` (the spatial augmentation,
    which reads the region it needs) or read as is; batch ``g`` of the stream is (epoch, iteration)
    = divmod(g + start_epoch * iterations_per_epoch, iterations_per_epoch)."""

    def __init__(self, store: CaseStore, case_ids: list[str], patch, batch_size: int, oversample: float,
                 seed: int, rank: int, stream: int, iterations_per_epoch: int, start_epoch: int = 0,
                 num_threads: int = 1, spatial: SpatialAugmentation | None = None):
        super().__init__(None, batch_size, num_threads)
        self.store, self.case_ids = store, list(case_ids)
        self.patch, self.spatial = list(patch), spatial
        self.oversample, self.seed, self.rank, self.stream = oversample, seed, rank, stream
        self.iterations_per_epoch, self.start_epoch = iterations_per_epoch, start_epoch
        self.counter = 0
        self.scheme: LabelScheme | None = None  # set by make_loader from the plan
        self._owner_pid = os.getpid()
        self._guarded_pid: int | None = None

    def position(self, index: int) -> tuple[int, int]:
        return divmod(index + self.start_epoch * self.iterations_per_epoch, self.iterations_per_epoch)

    def generate_train_batch(self) -> dict:
        if self._guarded_pid != os.getpid():
            self._guarded_pid = os.getpid()
            if self._guarded_pid != self._owner_pid:
                _die_with_parent(self._owner_pid)
        n = self.number_of_threads_in_multithreaded or 1
        index = self.counter * n + self.thread_id
        self.counter += 1
        epoch, iteration = self.position(index)
        seq = np.random.SeedSequence([self.seed, self.stream, epoch, iteration, self.rank])
        rng = np.random.default_rng(seq)
        state = seq.generate_state(2)
        np.random.seed(int(state[0]))
        random.seed(int(state[1]))
        forced = forced_foreground(self.batch_size, self.oversample)
        images, segs, keys = [], [], []
        for force in forced:
            case_id = self.case_ids[int(rng.integers(len(self.case_ids)))]
            props = self.store.properties(case_id)
            lo = choose_region(props, self.store.shape(case_id), self.patch, force, rng)
            if self.spatial is None:
                img, seg = self.store.read(case_id, lo, self.patch)
            else:
                img, seg = self.spatial(functools.partial(self.store.read, case_id), lo)
            images.append(img)
            segs.append(seg)
            keys.append(case_id)
        multi = self.scheme is not None and self.scheme.multi_label
        seg = pack16(np.stack(segs), self.scheme.num_classes) if multi else np.stack(segs).astype(np.int16)
        batch = {"data": np.stack(images), "seg": seg, "keys": keys, "epoch": epoch, "iteration": iteration}
        annotated = [self.store.properties(k).get("annotated_classes") for k in keys]
        if any(a is not None for a in annotated):
            batch["annotated"] = annotated_matrix(annotated, self.scheme)
        return batch


def make_loader(store: CaseStore, case_ids: list[str], plan: dict, *, batch_size: int, seed: int, rank: int,
                train: bool, iterations_per_epoch: int, start_epoch: int, num_workers: int,
                elastic: bool = False, augment: bool = True, pin_memory: bool = False):
    """An iterator of augmented batches: dicts with ``data`` (B,C,Z,Y,X) and integer ``seg`` (B,1,Z,Y,X),
    numpy arrays without workers, torch tensors (float32, int16) from workers."""
    patch = [int(p) for p in plan["patch_size"]]
    oversample = float(plan["training"].get("oversample_foreground", 0.33))
    transform = spatial = None
    if train and augment:
        cfg = AugmentationConfig.for_patch(patch, elastic)
        spatial, transform = SpatialAugmentation(patch, cfg), training_transforms(patch, cfg)
    loader = PatchLoader(store, case_ids, patch, batch_size, oversample, seed, rank,
                         TRAIN_STREAM if train else VAL_STREAM, iterations_per_epoch, start_epoch,
                         max(1, num_workers), spatial)
    loader.scheme = LabelScheme.of(plan)
    log.debug("%s loader: patch %s, %d workers", "train" if train else "val", patch, num_workers)
    if num_workers <= 0:
        return SingleThreadedAugmenter(loader, transform)
    transform = Compose([transform, AsTensors()]) if transform is not None else AsTensors()
    # shared-memory files, not file descriptors: a batch still queued when the loader is closed can then
    # be received after its worker has exited (with descriptors that raises in the receiving thread)
    torch.multiprocessing.set_sharing_strategy("file_system")
    return MultiThreadedAugmenter(loader, transform, num_workers, num_cached_per_queue=2,
                                  seeds=[seed + i for i in range(num_workers)], pin_memory=pin_memory)


def close_loader(loader) -> None:
    if isinstance(loader, MultiThreadedAugmenter):
        loader._finish()
