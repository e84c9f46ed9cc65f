"""The global random generators of a training run: each process's dropout stream, saved in
every checkpoint and continued on resume, and kept apart from validation's draws.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import Tensor

from ._helpers import SEED_STRIDE
from .config import TrainConfig
from .distributed import DistributedContext

RandomState = dict[str, Tensor]  # one process's generator states: "cpu", "cuda" (uint8)


def seed_own_dropout(train: TrainConfig, context: DistributedContext) -> None:
    """Under DDP every process draws its own dropout masks; one process keeps its stream."""
    if context.enabled:
        torch.manual_seed(train.seed * SEED_STRIDE + context.rank)


def own_random_state(context: DistributedContext) -> RandomState:
    """This process's global generator states: the CPU one, and its CUDA device's when it
    trains on one."""
    state = {"cpu": torch.get_rng_state()}
    if context.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(context.device)
    return state


def gather_random_states(context: DistributedContext) -> dict[int, RandomState]:
    """Every process's generator states by rank (a collective: every process calls it). The
    states of a generator have one size on every process, so they travel as one all-gather."""
    own = own_random_state(context)
    states: dict[int, RandomState] = {rank: {} for rank in range(context.world_size)}
    for name, state in own.items():
        gathered = context.all_gather_cat(state.to(context.device)[None]).cpu()  # (world, n)
        for rank in range(context.world_size):
            states[rank][name] = gathered[rank].clone()
    return states


RANDOM_STREAM_TAG = 0x5EED  # keeps derived_random_seed's hashes apart from other SeedSequences


def derived_random_seed(seed: int, step: int, rank: int) -> int:
    """A seed for process ``rank`` resuming at ``step`` without a saved state of its own: a
    hash of the three, apart from every other seed the run derives."""
    words = np.random.SeedSequence([seed, step, rank, RANDOM_STREAM_TAG]).generate_state(2)
    return int(words[0]) << 32 | int(words[1])


def restore_random_state(
    saved: dict[int, RandomState] | None, context: DistributedContext, seed: int, step: int
) -> bool:
    """Give this process the generator states saved at ``step`` for its rank, and say True; when
    the checkpoint holds none (an older one) or was written by another number of processes,
    whose per-process streams cannot be mapped onto these, seed every generator from
    ``derived_random_seed(seed, step, rank)`` and say False; say False too when it was written
    on another kind of device (CPU against CUDA), whose draws come from another stream."""
    own = saved.get(context.rank) if saved and len(saved) == context.world_size else None
    if own is None:
        torch.manual_seed(derived_random_seed(seed, step, context.rank))  # CUDA's too
        return False
    torch.set_rng_state(own["cpu"])
    on_cuda = context.device.type == "cuda"
    if on_cuda and "cuda" in own:
        torch.cuda.set_rng_state(own["cuda"], context.device)
    elif on_cuda:  # written on the CPU: the CUDA stream cannot be continued
        torch.cuda.manual_seed(derived_random_seed(seed, step, context.rank))
    # Exact only on the kind of device that wrote it (a CUDA run's dropout draws on CUDA).
    return on_cuda == ("cuda" in own)


@contextmanager
def random_state_kept(context: DistributedContext) -> Iterator[None]:
    """Draws inside the block (validation, the final measurement: each ``DataLoader`` draws a
    seed from the global generator) leave the training stream as it was."""
    devices = [context.device] if context.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield
