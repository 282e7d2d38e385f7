"""A DataLoader that resumes mid-epoch: a sampler that reshuffles each epoch from a seed, and a loader whose
position is saved in the checkpoint, so a resumed run sees exactly the batches it had not seen."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler


class EpochShuffleSampler(Sampler[int]):
    """A permutation that depends only on ``(seed, epoch)``, so a resumed run sees the same order.

    Lightning calls ``set_epoch`` at the start of every epoch (and wraps this for distributed runs).
    """

    def __init__(self, length: int, seed: int):
        self.length, self.seed, self.epoch = length, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.length, generator=generator).tolist())

    def __len__(self) -> int:
        return self.length


class ResumableDataLoader(DataLoader):
    """A DataLoader whose place in the epoch is saved in Lightning checkpoints, so a run resumed mid-epoch goes on
    with exactly the batches the uninterrupted run would have trained on next.

    Lightning saves ``state_dict()`` of a training DataLoader that has one (``_FitLoop.on_save_checkpoint``) and
    hands it back to ``load_state_dict`` on resume. The state is the sampler's epoch and the batches yielded so far
    in it; a resumed iteration over the same epoch passes over that many batches first. Lightning does not prefetch
    from a loader with a length, so batches yielded are batches trained on when a checkpoint is written.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.position = {"epoch": 0, "batches": 0}
        self.resume_from: dict[str, int] | None = None

    def __iter__(self) -> Iterator[Any]:
        epoch = getattr(self.sampler, "epoch", 0)  # set by Lightning's set_epoch (also on a distributed wrapper)
        resume, self.resume_from = self.resume_from, None
        skip = resume["batches"] if resume is not None and resume["epoch"] == epoch else 0
        self.position = {"epoch": epoch, "batches": skip}
        batches = super().__iter__()
        for _ in range(skip):
            next(batches)
        for batch in batches:
            self.position["batches"] += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return dict(self.position)

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.resume_from = dict(state)
