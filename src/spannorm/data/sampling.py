"""The order of the training batches: fixed by (seed, epoch), and resumable in mid-epoch."""

from __future__ import annotations

from collections.abc import Iterator, Sized
from itertools import islice
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, RandomSampler


class EpochShuffle(RandomSampler):
    """A `RandomSampler` whose permutation depends only on (seed, epoch): Lightning calls
    `set_epoch` at the start of every epoch, including the one a resumed run continues. Being a
    `RandomSampler`, it is replaced by Lightning's seeded `DistributedSampler` under DDP."""

    def __init__(self, data_source: Sized, seed: int) -> None:
        super().__init__(data_source, generator=torch.Generator())
        self.seed = seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        (epoch_seed,) = np.random.SeedSequence([self.seed, epoch]).generate_state(1, np.uint64)
        self.generator.manual_seed(int(epoch_seed))


class ResumableLoader(DataLoader):
    """A DataLoader that Lightning resumes in mid-epoch: every checkpoint stores `state_dict()`
    (the batches served in the current pass), and on resume `load_state_dict` makes the next pass
    skip that many batches, so with a sampler fixed per epoch the run sees the same batches as
    one that never stopped. Skipped batches are still loaded (cheap for packed token blocks)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.served = 0
        self.resume_at = 0

    def __iter__(self) -> Iterator[Any]:
        self.served, self.resume_at = self.resume_at, 0
        for batch in islice(super().__iter__(), self.served, None):
            self.served += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"served": self.served}

    def load_state_dict(self, state: dict[str, int]) -> None:
        # a pass that had ended resumes with the next epoch, from its first batch
        self.resume_at = state["served"] % len(self)
