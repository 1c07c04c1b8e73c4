"""The training sampler: each rank's share of an epoch's permutation, resumable part-way through the epoch."""
from __future__ import annotations

import itertools

from torch.utils.data import DistributedSampler


class ResumableDistributedSampler(DistributedSampler):
    """``DistributedSampler`` (the same permutation from ``seed + epoch``, the same share per rank) whose epoch can
    start part-way: ``set_epoch(epoch, skip=k)`` leaves out the first ``k`` indices of this rank's share.

    ``k`` is what the training loop had *consumed* when its checkpoint was written (batches x batch size), not what
    the DataLoader had fetched: batches that workers had prefetched but the loop had not used are fetched again.
    ``len()`` stays the whole share, so ``len(loader)`` is still the epoch's batch count; an epoch that starts at
    ``k`` yields ``len() - k`` indices. The skip applies to that epoch only: the next ``set_epoch`` sets it again.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        if not 0 <= skip <= len(self):
            raise ValueError(f"cannot start epoch {epoch} after {skip} samples: this rank's share has {len(self)}")
        super().set_epoch(epoch)
        self.skip = int(skip)

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.skip, None)
