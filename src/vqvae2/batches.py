"""The batches of each training step: which examples every process gets at every global step.

The global batch at a step depends only on the seed and the step, so a resumed run, under any
number of processes, sees the batches an uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler

from .config import TrainConfig
from .distributed import DistributedContext


def check_batch_fits(size: int, batch_size: int) -> None:
    """A training split of ``size`` examples holds at least one global batch (trainers check
    it before they start)."""
    if size < batch_size:
        raise ValueError(
            f"the training split has {size} examples, fewer than one batch ({batch_size})"
        )


class EpochBatchSampler(Sampler[list]):
    """Batches of a fresh seeded permutation each epoch, starting from any global step.

    The global batch at step s depends only on (seed, s), so a resumed run sees exactly the
    batches an uninterrupted one would, under any number of processes: process ``rank`` of
    ``world_size`` gets the rank-th contiguous slice of it. Incomplete final batches of an
    epoch are dropped. With ``keyed`` every item is (index, key), the key being the item's
    position in the run's sequence of images (step * batch_size + slot), from which datasets
    draw random transforms.
    """

    def __init__(
        self,
        size: int,
        batch_size: int,
        seed: int,
        start_step: int,
        end_step: int,
        rank: int = 0,
        world_size: int = 1,
        keyed: bool = False,
    ):
        check_batch_fits(size, batch_size)
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.start_step, self.end_step = start_step, end_step
        self.batches_per_epoch = size // batch_size
        self.per_process = batch_size // world_size
        self.offset = rank * self.per_process
        self.keyed = keyed

    def __len__(self) -> int:
        return max(0, self.end_step - self.start_step)

    def __iter__(self) -> Iterator[list]:
        step = self.start_step
        while step < self.end_step:
            epoch, position = divmod(step, self.batches_per_epoch)
            order = np.random.default_rng([self.seed, epoch]).permutation(self.size)
            for index in range(position, self.batches_per_epoch):
                if step >= self.end_step:
                    return
                start = index * self.batch_size + self.offset
                indices = order[start : start + self.per_process].tolist()
                if self.keyed:
                    first_key = step * self.batch_size + self.offset
                    indices = [(i, first_key + slot) for slot, i in enumerate(indices)]
                yield indices
                step += 1


def micro_batch_size(train: TrainConfig, context: DistributedContext) -> int:
    """Images per process and micro-batch; the global batch must split evenly."""
    parts = context.world_size * train.grad_accum_steps
    if train.batch_size % parts:
        raise ValueError(
            f"train.batch_size {train.batch_size} does not split evenly over "
            f"{context.world_size} process(es) x {train.grad_accum_steps} micro-batch(es)"
        )
    return train.batch_size // parts


def rank_batch_sampler(
    size: int, train: TrainConfig, step: int, context: DistributedContext, keyed: bool = False
) -> EpochBatchSampler:
    """This process's slice of every global batch from ``step`` to ``train.max_steps`` (items
    keyed for random transforms when ``keyed``)."""
    return EpochBatchSampler(
        size,
        train.batch_size,
        train.seed,
        step,
        train.max_steps,
        context.rank,
        context.world_size,
        keyed,
    )
