"""The order of the training batches: fixed by (seed, epoch), and resumable in mid-epoch."""

from __future__ import annotations

from collections.abc import Iterator, Sized
from itertools import islice
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler


class EpochShuffle(DistributedSampler):
    """The training order: one permutation of the blocks per (seed, epoch), the same whatever the
    number of processes. Process `rank` of `num_replicas` takes every `num_replicas`-th index of it
    from position `rank` (the blocks that do not divide evenly are left out), so the batches of
    all ranks at one step are the batch of a single process with `num_replicas` times its size,
    and gradient accumulation over micro batches sees the same global batch. Lightning calls
    `set_epoch` at every epoch start (a resumed one included) and, this being a
    `DistributedSampler`, leaves it in place under DDP and FSDP."""

    def __init__(self, data_source: Sized, seed: int, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(
            data_source, num_replicas=num_replicas, rank=rank, shuffle=True, drop_last=True
        )
        self.seed = seed

    def __iter__(self) -> Iterator[int]:
        (epoch_seed,) = np.random.SeedSequence([self.seed, self.epoch]).generate_state(1, np.uint64)
        order = torch.randperm(
            len(self.dataset), generator=torch.Generator().manual_seed(int(epoch_seed))
        )
        return iter(order[: self.total_size][self.rank :: self.num_replicas].tolist())


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
