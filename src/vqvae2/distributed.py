"""Data-parallel training with PyTorch's own engine: ``torch.distributed`` + DDP under torchrun.

``torchrun --nproc_per_node=N -m vqvae2 SUBCOMMAND ...`` starts N processes and sets ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK``; ``runtime_context`` joins the process group (NCCL on GPUs,
gloo on CPUs) and says which device this process drives. Without those variables everything
runs as one process and no process group is created.

The split of work is by the *global* batch: the batch sampler picks the same global batch on
every process from (seed, step), and process r takes the r-th contiguous slice of it, so the
gradient that DDP averages is the gradient of the global batch, whatever the world size, and a
checkpoint written by N processes resumes under M.

This module holds training infrastructure (process-group side effects); the model modules stay
pure and receive only the ``all_reduce_sum`` / ``all_gather_cat`` functions.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .config import RuntimeConfig

T = TypeVar("T")
# How long a collective may wait. Ranks other than 0 wait in the next collective while rank 0
# validates, and in ``shutdown`` while it runs the final evaluation, which can take minutes on
# large data: longer than NCCL's 10-minute default must be allowed.
PROCESS_GROUP_TIMEOUT = timedelta(hours=1)


@dataclass(frozen=True)
class DistributedContext:
    """Who this process is in a (possibly one-process) data-parallel run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes checkpoints, logs, images and progress bars."""
        return self.rank == 0

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum of ``tensor`` over processes (a new tensor; the input is left alone)."""
        if not self.enabled:
            return tensor
        total = tensor.clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total

    def all_gather_cat(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every process's ``tensor`` (same shape on each) concatenated along dim 0 in rank order."""
        if not self.enabled:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    def any(self, flag: bool) -> bool:
        """True on every process when ``flag`` is true on any (e.g. a --max-minutes deadline)."""
        return self.max(1.0 if flag else 0.0) > 0

    def max(self, value: float) -> float:
        """The largest ``value`` over processes (e.g. the wall time of the slowest)."""
        if not self.enabled:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return float(tensor.item())

    def gather_objects(self, value: T) -> list[T]:
        """Every process's ``value`` (any picklable object made by this program), in rank order,
        on every process."""
        if not self.enabled:
            return [value]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        return gathered

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def shard_range(self, count: int) -> range:
        """This process's contiguous share of ``range(count)`` (sizes differ by at most one)."""
        base, extra = divmod(count, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return range(start, start + base + (1 if self.rank < extra else 0))


class _SumOverProcesses(torch.autograd.Function):
    """Sum of a tensor over processes whose gradient is the sum of the processes' gradients:
    each process's loss depends on every process's input through the sum."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor) -> Tensor:
        total = tensor.detach().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total

    @staticmethod
    def backward(ctx: Any, gradient: Tensor) -> Tensor:
        total = gradient.detach().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """``BatchNorm2d`` that, in training under a process group, normalises with the mean and
    variance of the global batch (every process's slice) and moves its running statistics
    by them, so that N processes compute what one process computes for the whole batch and
    keep equal buffers. Outside training or without a process group it is ``BatchNorm2d``.
    Unlike ``torch.nn.SyncBatchNorm`` it runs on the CPU (gloo) too.
    """

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, C, H, W)
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        values = x.float()
        channels = values.shape[1]
        local = torch.cat([values.sum((0, 2, 3)), values.new_tensor([values.numel() / channels])])
        totals = _SumOverProcesses.apply(local)  # (C + 1,): per-channel sums, then the count
        count = totals[channels].detach()
        mean = totals[:channels] / count  # (C,)
        centered = values - mean[None, :, None, None]  # (B, C, H, W)
        variance = _SumOverProcesses.apply(centered.pow(2).sum((0, 2, 3))) / count  # biased, (C,)
        normalised = centered * torch.rsqrt(variance + self.eps)[None, :, None, None]
        if self.affine:
            normalised = (
                normalised * self.weight[None, :, None, None] + self.bias[None, :, None, None]
            )
        if self.track_running_stats:
            self._track(mean.detach(), variance.detach(), float(count))
        return normalised.to(x.dtype)

    @torch.no_grad()
    def _track(self, mean: Tensor, variance: Tensor, count: float) -> None:
        """The running statistics' step, as ``BatchNorm2d`` takes it (unbiased variance)."""
        self.num_batches_tracked.add_(1)
        momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        self.running_mean.lerp_(mean, momentum)
        self.running_var.lerp_(variance * count / max(count - 1.0, 1.0), momentum)


def use_global_batch_norm(model: nn.Module) -> int:
    """Turn every ``BatchNorm2d`` of ``model`` into a ``GlobalBatchNorm2d`` in place (the same
    objects, parameters and buffers; the class alone changes). Returns how many."""
    count = 0
    for module in model.modules():
        if type(module) is nn.BatchNorm2d:
            module.__class__ = GlobalBatchNorm2d
            count += 1
    return count


def pick_device(name: str = "auto") -> torch.device:
    """The device a command asked for: ``auto`` (CUDA when available, else the CPU), ``cpu``,
    ``cuda`` or ``cuda:N``; a clear ``ValueError`` when CUDA is asked for and missing."""
    return _device_for(RuntimeConfig(device=name), int(os.environ.get("LOCAL_RANK", "0")))


def runtime_device(runtime: RuntimeConfig | None, default: str = "cpu") -> torch.device:
    """The device of an inference command's ``runtime`` (``pick_device``), or ``default`` when
    none is given."""
    return pick_device(default if runtime is None else runtime.device)


def _device_for(runtime: RuntimeConfig, local_rank: int) -> torch.device:
    if runtime.device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        return torch.device("cpu")
    try:
        device = torch.device(runtime.device)
    except RuntimeError as error:  # "gpu" and other names torch does not know
        raise ValueError(f"--device {runtime.device}: not a device ({error})") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {runtime.device}: CUDA is not available on this machine")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    return device


def runtime_context(runtime: RuntimeConfig | None = None) -> DistributedContext:
    """Join the torchrun process group when launched by torchrun; pick this process's device.

    Safe to call more than once (the group is created on the first call).
    """
    runtime = runtime or RuntimeConfig()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = _device_for(runtime, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo", timeout=PROCESS_GROUP_TIMEOUT
        )
    if runtime.precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("--precision bf16: this GPU does not support bfloat16")
    return DistributedContext(
        rank=rank, world_size=world_size, local_rank=local_rank, device=device
    )


def shutdown(wait_for_others: bool = True) -> None:
    """Leave the process group (end of a torchrun process); a no-op without one.

    With ``wait_for_others`` (after success) every process first waits for the others: ranks
    other than 0 finish training before rank 0 has run its final evaluation and checkpoint, and
    one process tearing the group down while another still holds it can abort the latter
    ("terminate called without an active exception", seen with gloo). After a failure, leave
    at once: the others may never reach the barrier, and torchrun stops them.
    """
    if dist.is_initialized():
        if wait_for_others:
            dist.barrier()
        dist.destroy_process_group()
