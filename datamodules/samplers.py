"""The training order, resumable part-way through an epoch.

A fit killed mid-epoch (a Colab disconnect, a SLURM preemption) resumes from `checkpoints/last.ckpt` with the next
batch of the same shuffle: the loader counts the batches it has handed to the training loop in the current epoch,
that count is saved in the checkpoint, and on resume the sampler starts its epoch's permutation after them.
"""

from __future__ import annotations

from torch.utils.data import DataLoader, DistributedSampler


class ShuffledEpochs(DistributedSampler):
    """One seeded permutation per epoch (DistributedSampler's, so DDP ranks split it without overlap) that can start
    part-way in. `len` stays the whole epoch: Lightning counts a resumed epoch's batches from where it stopped."""

    def __init__(self, dataset, num_replicas: int, rank: int, seed: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.start = 0  # how many of this epoch's indices the next iteration skips (set by ResumableLoader)

    def __iter__(self):
        indices = list(super().__iter__())
        start, self.start = self.start, 0
        return iter(indices[start:])


class ResumableLoader(DataLoader):
    """The training DataLoader, stateful as Lightning's fault-tolerant loading expects (`state_dict` /
    `load_state_dict`): the state is (epoch, batches handed out in it).

    Batches are counted as the loader yields them, not as the sampler draws indices, so worker prefetching does not
    run the count ahead; Lightning does not prefetch from a loader with a length.
    """

    def __init__(self, dataset, sampler: ShuffledEpochs, **kwargs):
        super().__init__(dataset, sampler=sampler, **kwargs)
        self.epoch = 0
        self.batches = 0
        self._resume: dict | None = None

    def __iter__(self):
        # A generator: this body runs at the first batch, after Lightning has called `set_epoch` on the sampler.
        epoch, resume, self._resume = self.sampler.epoch, self._resume, None
        skip = 0
        if resume and resume["epoch"] == epoch and resume["batches"] < len(self):
            skip = resume["batches"]
        self.sampler.start = skip * self.batch_size
        self.epoch, self.batches = epoch, skip
        for batch in super().__iter__():
            self.batches += 1
            yield batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches": self.batches}

    def load_state_dict(self, state: dict) -> None:
        self._resume = {"epoch": int(state["epoch"]), "batches": int(state["batches"])}
