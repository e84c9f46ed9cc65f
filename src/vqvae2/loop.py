"""What every trainer shares: the model on its device (DDP, compile, memory layout) and the
training session that resumes, logs, validates, checkpoints and stops a run, with rank 0 alone
writing. The session's parts have their own modules: the batches of each step (``batches``), the
optimiser (``optimizer``), the generators' states (``random_state``) and the clock and step-size
schedule (``schedule``).

A trainer (``vqvae2.train``) builds its data and model, writes one step function, and hands both
to a ``TrainingSession``: the step order is the same for every model kind.
"""

from __future__ import annotations

import fcntl
import inspect
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ._helpers import load_state_checked
from .batches import EpochBatchSampler, micro_batch_size, rank_batch_sampler
from .checkpoint import Checkpoint, RunFacts, read_checkpoint, save_checkpoint
from .config import RuntimeConfig, TrainConfig, config_from_dict, save_yaml, with_max_steps
from .data import uint8_to_float
from .distributed import DistributedContext, use_global_batch_norm
from .logs import TENSORBOARD_DIR, MetricsLog, naming_file
from .optimizer import AdamInBackward, check_optimizer_state, make_optimizer
from .random_state import (
    RandomState,
    gather_random_states,
    random_state_kept,
    restore_random_state,
)
from .run import CONFIG_FILE, METRICS_FILE, has_checkpoint
from .schedule import Clock, RunClock, learning_rate

logger = logging.getLogger("vqvae2.loop")


@dataclass
class StepModule:
    """What a training step calls: the model, on its device, DDP-wrapped and compiled as asked.

    ``model`` is the plain module (checkpoints, evaluation); ``forward`` is what the step calls.
    """

    model: torch.nn.Module
    forward: Any  # callable module: the model, its DDP wrapper, or a compiled version of either
    ddp: DistributedDataParallel | None
    context: DistributedContext
    runtime: RuntimeConfig

    def autocast(self) -> AbstractContextManager:
        """bf16 autocast when asked (quantizer math opts out of it inside the quantizer)."""
        return torch.autocast(
            self.context.device.type,
            dtype=torch.bfloat16,
            enabled=self.runtime.precision == "bf16",
        )

    def sync_gradients(self, last_micro_batch: bool) -> AbstractContextManager:
        """DDP all-reduces gradients only after the last micro-batch of a step."""
        if self.ddp is None or last_micro_batch:
            return nullcontext()
        return self.ddp.no_sync()

    def images_to_device(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images (B, C, H, W) -> float in [-1, 1] on this process's device."""
        return self.to_device(uint8_to_float(images.to(self.context.device, non_blocking=True)))

    def to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """Move a batch to this process's device (channels-last images when asked)."""
        tensor = tensor.to(self.context.device, non_blocking=True)
        if self.runtime.channels_last and tensor.dim() == 4:
            tensor = tensor.contiguous(memory_format=torch.channels_last)
        return tensor


def prepare_step_module(
    model: torch.nn.Module, context: DistributedContext, runtime: RuntimeConfig
) -> StepModule:
    """Put ``model`` on the device; wrap it in DDP under torchrun; compile it when asked."""
    model.to(context.device)
    if runtime.channels_last:
        model.to(memory_format=torch.channels_last)
    forward: Any = model
    ddp = None
    if context.enabled:
        # Buffers are kept equal by the models' own reductions: the quantizers' EMA codebooks,
        # and batch norms that use the global batch's statistics (the classifier's), so DDP's
        # per-step broadcast of rank 0's buffers is not needed.
        use_global_batch_norm(model)
        device_ids = [context.device.index] if context.device.type == "cuda" else None
        parameters = inspect.signature(DistributedDataParallel).parameters
        no_buffer_sync = (
            {"forward_sync_buffers": False}  # newer PyTorch's name
            if "forward_sync_buffers" in parameters
            else {"broadcast_buffers": False}
        )
        ddp = DistributedDataParallel(model, device_ids=device_ids, **no_buffer_sync)
        forward = ddp
    if runtime.compile:
        forward = torch.compile(forward)
    return StepModule(model=model, forward=forward, ddp=ddp, context=context, runtime=runtime)


# ----------------------------------------------------------------------------------------------
# The session around a trainer's step


@dataclass
class TrainResult:
    run_dir: Path  # the folder of the trained model's config, log and checkpoints
    step: int
    metrics: dict[str, Any]  # final metrics (empty on processes other than rank 0)
    model: torch.nn.Module | None = None  # the trained module (not DDP-wrapped), on its device


SKIPPED = "skipped_nonfinite"  # the logged count of steps skipped for a non-finite loss
LOCK_FILE = ".lock"  # in a checkpoint folder: held by the trainer writing to it


@contextmanager
def training_lock(
    folder: Path, context: DistributedContext, resume: bool, writer: str = "trainer"
) -> Iterator[None]:
    """Hold ``folder/.lock`` while one training run writes to ``folder`` (its checkpoints and,
    for stage 1, the run folder around them); a second trainer is refused with a ``ValueError``.
    A new run creates ``folder``; a resumed one needs it. ``writer`` names the kind of process
    in the refusal (an extraction takes the same lock on the code stores' folder).

    Rank 0, the process that writes, takes an exclusive ``flock`` on an open file held for the
    whole block: the kernel releases it when the process ends, however it ends (kill -9
    included), so no stale lock is ever left to clear. Under torchrun every process learns
    the outcome through one collective before any training collective, and all of them raise.
    """
    handle, refusal = None, None
    if context.is_main:
        try:
            if not resume:
                folder.mkdir(parents=True, exist_ok=True)
            handle = open(folder / LOCK_FILE, "a")  # noqa: SIM115  (held until the block ends)
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except FileNotFoundError:
            refusal = f"nothing to resume: {folder} does not exist"
        except BlockingIOError:
            refusal = (
                f"another {writer} is writing {folder} (it holds {folder / LOCK_FILE}); "
                "wait for it to end or stop it"
            )
        except OSError as error:
            refusal = f"cannot train in {folder}: {error.strerror or error}"
        if refusal is not None and handle is not None:
            handle.close()
            handle = None
    if context.any(refusal is not None):
        raise ValueError(refusal or f"rank 0 cannot train in {folder}; see its error")
    try:
        yield
    finally:
        if handle is not None:
            handle.close()  # releases the lock


def resume_or_start(
    checkpoint_dir: Path,
    kind: str,
    config_class: type,
    config: Any,
    resume: bool,
    occupied: str,
    max_steps: int | None = None,
) -> tuple[Any, Checkpoint | None]:
    """The config to train with and, with ``resume``, the checkpoint to continue from.

    A resumed run keeps the config saved in its checkpoint (the only place it is read); the
    run length (``train.max_steps`` and ``train.schedule_minutes``) of ``config``, when one is
    given, replaces the saved one, then ``max_steps`` when given. Without ``resume`` a folder
    that already holds a checkpoint is refused with the message ``occupied``, and ``config``
    is needed.
    """
    if not resume:
        if has_checkpoint(checkpoint_dir):
            raise ValueError(occupied)
        if config is None:
            raise ValueError("a new run needs a config (None continues a saved one on resume)")
        return with_max_steps(config, max_steps), None
    checkpoint = read_checkpoint(checkpoint_dir, kind, with_optimizer=True)
    saved = config_from_dict(config_class, checkpoint.config)
    if config is not None:
        length = {
            "max_steps": config.train.max_steps,
            "schedule_minutes": config.train.schedule_minutes,
        }
        saved = replace(saved, train=replace(saved.train, **length))
    saved = with_max_steps(saved, max_steps)
    if saved.train.max_steps < checkpoint.step:
        raise ValueError(
            f"{checkpoint_dir} is at step {checkpoint.step}, past train.max_steps "
            f"{saved.train.max_steps}: give --max-steps {checkpoint.step} or more to resume"
        )
    return saved, checkpoint


def image_keys(session: TrainingSession, rows: slice) -> list[int]:
    """The keys of ``rows`` of this process's batch: each image's position in the run's
    sequence of training images, step * batch_size + its place in the global batch (the keys of
    ``batches.EpochBatchSampler``), so the same image has the same key under any number of
    processes and micro-batches, and in a resumed run."""
    train, context = session.train, session.context
    first = session.step * train.batch_size + context.rank * (
        train.batch_size // context.world_size
    )
    return list(range(first + rows.start, first + rows.stop))


class StepOutput(NamedTuple):
    """What a trainer's step function returns after its backward passes."""

    loss: Tensor  # () this process's loss summed over its micro-batches, detached
    figures: Callable[[], dict[str, float]]  # the figures to log (called on rank 0 only)


StepFunction = Callable[[Any], StepOutput]


class TrainingSession:
    """Resume, optimise, log, validate, checkpoint and stop one training run.

    The trainer's step function takes one batch (this process's slice of the global batch),
    runs the forward and backward passes of its micro-batches and returns its loss and a
    function giving the figures to log (called on rank 0 at ``train.log_every``); the session
    does the rest in the same order for every model kind. Under torchrun every process runs the
    session; rank 0 alone writes the config, the log, checkpoints and the progress bar, and
    every process stops at the same step.

    A step whose loss or gradients are not finite on any process stops the run or, with
    ``train.nonfinite=skip``, is skipped by every process: gradients dropped, no optimiser
    step, buffers (the EMA codebooks) put back as they were, the step counted in the log as
    ``skipped_nonfinite``. No checkpoint is written after a non-finite step that stops a run.

    Every checkpoint holds each process's generator states; a resumed run restores them once
    its batches start (a ``DataLoader`` draws a seed from the global generator then), so its
    dropout masks are those of the uninterrupted run. Validation and the final measurement
    draw from forks of the generators, leaving the training stream alone.

    Args:
        model: the plain module (restored from ``checkpoint`` when resuming).
        run_config: the whole run config, saved beside the log and in every checkpoint.
        kind: checkpoint kind (``vqvae``, ``prior-top``, ``classifier`` ...).
        checkpoint_dir: folder of the step folders and ``latest``.
        log_dir: folder of ``config.yaml`` and ``metrics.csv`` (also ``TrainResult.run_dir``).
        checkpoint: the checkpoint to continue from, or None.
        facts: what every checkpoint states about the run (data source, preset, level).
        postfix: name of the logged figure shown beside the progress bar.
        now: the clock (tests pass a fake one).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        run_config: Any,
        context: DistributedContext,
        runtime: RuntimeConfig,
        *,
        kind: str,
        checkpoint_dir: Path,
        log_dir: Path,
        checkpoint: Checkpoint | None,
        max_minutes: float | None,
        progress: bool,
        facts: RunFacts | None = None,
        postfix: str = "loss",
        now: Clock = time.monotonic,
    ) -> None:
        self.model, self.run_config, self.train = model, run_config, run_config.train
        self.context, self.kind, self.facts, self.postfix = context, kind, facts, postfix
        self.checkpoint_dir, self.log_dir = checkpoint_dir, log_dir
        self.step, elapsed_before = 0, 0.0
        self.saved_step: int | None = None  # step of the newest checkpoint of this run
        if checkpoint is not None:
            load_state_checked(model, checkpoint.model_state, checkpoint.path)
            self.step = self.saved_step = checkpoint.step
            elapsed_before = float(checkpoint.extra.get("elapsed_seconds", 0.0))
        # Where the run resumed from and its generator states, restored when the batches start.
        self.resumed_random_state = (
            None if checkpoint is None else (checkpoint.path, checkpoint.random_state)
        )
        self.skipped = 0 if checkpoint is None else int(checkpoint.extra.get(SKIPPED, 0))
        self.step_module, self.optimizer = self._prepare_model(runtime, checkpoint)
        if context.is_main:
            log_dir.mkdir(parents=True, exist_ok=True)
            with naming_file(log_dir / CONFIG_FILE):
                save_yaml(run_config, log_dir / CONFIG_FILE)
        self.log = MetricsLog(
            log_dir / METRICS_FILE,
            self.step,
            enabled=context.is_main,
            tensorboard_dir=log_dir / TENSORBOARD_DIR if runtime.tensorboard else None,
        )
        self.clock = RunClock(elapsed_before, max_minutes, self.train.schedule_minutes, now)
        self._agreed_elapsed = elapsed_before  # see elapsed()
        self._last_log = (elapsed_before, self.step)  # (seconds, step) of the last train row
        self.bar = tqdm(
            total=self.train.max_steps,
            initial=self.step,
            disable=not (progress and context.is_main),
            desc=f"train {kind}",
            dynamic_ncols=True,
            mininterval=1.0,
        )

    def _prepare_model(
        self, runtime: RuntimeConfig, checkpoint: Checkpoint | None
    ) -> tuple[StepModule, Any]:
        """The model on its device as the step calls it, and its optimiser (its state restored
        from ``checkpoint`` when resuming)."""
        model, train = self.model, self.train
        if train.optimizer_in_backward and self.context.enabled:
            raise ValueError("train.optimizer_in_backward runs in one process, not under DDP")
        if train.activation_checkpointing:  # the VQ-VAE's and the priors' switch
            if not hasattr(model, "set_activation_checkpointing"):
                raise ValueError(
                    f"train.activation_checkpointing is not available for the {self.kind}"
                )
            model.set_activation_checkpointing(True)
        step_module = prepare_step_module(model, self.context, runtime)
        optimizer = make_optimizer(model, train)
        if checkpoint is not None and checkpoint.optimizer_state is not None:
            check_optimizer_state(checkpoint.optimizer_state, model, checkpoint.path)
            optimizer.load_state_dict(checkpoint.optimizer_state)
        return step_module, optimizer

    def batch_sampler(self, dataset: Any) -> EpochBatchSampler:
        """This process's slices of the global batches still to come over ``dataset``, keyed
        when the dataset draws random transforms."""
        keyed = getattr(dataset, "transform", None) is not None
        return rank_batch_sampler(len(dataset), self.train, self.step, self.context, keyed)

    def run(
        self,
        batches: Iterable[Any],
        train_step: StepFunction,
        validate: Callable[[], dict[str, float]] | None = None,
    ) -> None:
        """Take one optimiser step per batch until the batches, the steps or the time run out.

        ``validate`` (rank 0, every ``train.val_every`` steps before the last) returns the
        figures logged as the ``val`` split.
        """
        train = self.train
        self.model.train()
        batch_iterator = iter(batches)  # a DataLoader draws from the global generator here
        if self.resumed_random_state is not None:
            self._restore_random_state(*self.resumed_random_state)
            self.resumed_random_state = None
        for batch in batch_iterator:
            if not self._set_step_size():
                break  # resumed with the time budget already spent
            self.optimizer.zero_grad(set_to_none=True)
            buffers = self._copy_buffers() if train.nonfinite == "skip" else None
            output = train_step(batch)
            problem = self._not_finite(output.loss)
            if problem is not None:
                self._nonfinite_step(buffers, problem)
            else:
                self.optimizer.step()
            self.step += 1
            self.bar.update(1)
            out_of_time = self._out_of_time()
            if self.step % train.log_every == 0 and self.context.is_main:
                logged = {
                    **output.figures(),
                    "lr": self.optimizer.param_groups[0]["lr"],
                    "items_per_second": self._throughput(),
                }
                if train.nonfinite == "skip":
                    logged[SKIPPED] = self.skipped
                self.log.write(self.step, self.elapsed(), "train", logged)
                self.bar.set_postfix({self.postfix: f"{logged[self.postfix]:.5g}"}, refresh=False)
            if not out_of_time:
                last = self.step >= train.max_steps
                validating = validate is not None and self.step % train.val_every == 0
                if validating and not last and self.context.is_main:
                    with random_state_kept(self.context):
                        figures = validate()
                    self.log.write(self.step, self.elapsed(), "val", figures)
                if self.step % train.checkpoint_every == 0:
                    self.save()
            if out_of_time:
                break
        self.bar.close()
        self.model.eval()

    def _restore_random_state(self, path: Path, saved: dict[int, RandomState] | None) -> None:
        """Continue the generators of the run resumed from the checkpoint at ``path`` (their
        ``saved`` states, see ``restore_random_state``); say on rank 0 when its dropout cannot
        be continued exactly."""
        exact = restore_random_state(saved, self.context, self.train.seed, self.step)
        if not exact and self.context.is_main:
            held = (
                f"the random state of {len(saved)} process(es)"
                if saved
                else "no random state (an older vqvae2 wrote it)"
            )
            logger.warning(
                "%s holds %s and this run has %d: random draws (dropout) from step %d on come "
                "from new streams seeded by (train.seed, step, rank), not those of an "
                "uninterrupted run",
                path,
                held,
                self.context.world_size,
                self.step,
            )

    def _copy_buffers(self) -> list[Tensor]:
        return [buffer.detach().clone() for buffer in self.model.buffers()]

    def _not_finite(self, loss: Tensor) -> str | None:
        """What is not finite in the step just computed, on any process: "the loss", else "the
        gradients" (a bf16 backward pass can overflow under a finite loss), or None when both
        are finite. One collective: every process takes the step, or none does."""
        if not bool(torch.isfinite(loss)):
            found = 2
        elif not self._gradients_finite():
            found = 1
        else:
            found = 0
        return {0: None, 1: "the gradients are", 2: "the loss is"}[int(self.context.max(found))]

    def _gradients_finite(self) -> bool:
        """Every gradient of this process is finite (checked before the optimiser steps; with
        ``train.optimizer_in_backward``, before each parameter's own step)."""
        if isinstance(self.optimizer, AdamInBackward):
            return self.optimizer.gradients_finite()
        gradients = [p.grad for p in self.model.parameters() if p.grad is not None]
        if not gradients:
            return True
        # The largest magnitude: inf or NaN exactly when some entry is (no overflow, unlike
        # the 2-norm), in one pass over the gradients.
        largest = torch.nn.utils.get_total_norm(gradients, norm_type=math.inf)
        return bool(torch.isfinite(largest))

    def _nonfinite_step(self, buffers: list[Tensor] | None, problem: str) -> None:
        """The loss or the gradients (``problem``: "the loss is", "the gradients are") of the
        step being taken are not finite on some process: stop the run, or
        (``train.nonfinite=skip``, ``buffers`` copied before the step) drop its gradients and
        put the buffers back."""
        step = self.step + 1
        if buffers is None:
            self.bar.close()
            self.log.close()
            kept = (
                f"the last checkpoint, {self.checkpoint_dir / f'step-{self.saved_step:08d}'}, "
                "is kept"
                if self.saved_step is not None
                else "no checkpoint was written"
            )
            instead = (
                ""
                if self.train.optimizer_in_backward  # it cannot skip a step
                else " (train.nonfinite=skip skips such steps instead)"
            )
            raise ValueError(
                f"{problem} not finite at step {step}: training stopped and {kept}{instead}"
            )
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for buffer, saved in zip(self.model.buffers(), buffers, strict=True):
                buffer.copy_(saved)
        self.skipped += 1
        if self.context.is_main:
            logger.warning(
                "step %d skipped: %s not finite (%d so far)", step, problem, self.skipped
            )

    def _throughput(self) -> float:
        """Training items (images, or code maps for priors) per second of the global batch
        since the last call, on this process's clock."""
        now, step = self.clock.elapsed(), self.step
        seconds = max(now - self._last_log[0], 1e-9)
        items = (step - self._last_log[1]) * self.train.batch_size
        self._last_log = (now, step)
        return items / seconds

    def finish(
        self, final_metrics: Callable[[], dict[str, Any]], split: str = "final"
    ) -> TrainResult:
        """Rank 0 measures the trained model, logs the figures as ``split`` and checkpoints;
        every process gets the model back (the metrics only on rank 0)."""
        # Gathered on every process before rank 0 alone measures and writes.
        random_states = None if self.saved_step == self.step else gather_random_states(self.context)
        if not self.context.is_main:
            return TrainResult(run_dir=self.log_dir, step=self.step, metrics={}, model=self.model)
        with random_state_kept(self.context):
            metrics = final_metrics()
        self.log.write(self.step, self.elapsed(), split, metrics)
        self.log.close()
        if random_states is not None:
            self._write_checkpoint(random_states)
        return TrainResult(run_dir=self.log_dir, step=self.step, metrics=metrics, model=self.model)

    def save(self) -> None:
        """Checkpoint the model, optimizer and every process's generator states at the current
        step, unless a checkpoint of this step exists already (the last periodic one, or the one
        resumed from). Every process calls it at the same steps; rank 0 writes."""
        if self.saved_step == self.step:
            return
        self._write_checkpoint(gather_random_states(self.context))

    def _write_checkpoint(self, random_states: dict[int, RandomState]) -> None:
        """Rank 0 writes the checkpoint of the current step."""
        if self.context.is_main:
            save_checkpoint(
                self.checkpoint_dir,
                self.kind,
                self.step,
                self.run_config,
                self.model,
                self.optimizer,
                extra={"elapsed_seconds": self.elapsed(), SKIPPED: self.skipped},
                facts=self.facts,
                random_state=random_states,
            )
        self.saved_step = self.step

    def elapsed(self) -> float:
        """Seconds of training of the run so far: the slowest process's, as last agreed by all
        of them under a time limit, else this process's. It is what the log and checkpoints
        record, so a resumed run spends the rest of a time budget, not more."""
        return max(self._agreed_elapsed, self.clock.elapsed())

    def _agree_elapsed(self) -> float:
        """The slowest process's elapsed time (a collective: every process calls it)."""
        self._agreed_elapsed = self.context.max(self.clock.elapsed())
        return self._agreed_elapsed

    def _out_of_time(self) -> bool:
        """The --max-minutes deadline or the time budget, agreed by all processes so they stop
        at the same step."""
        if not self.clock.limited:
            return False
        agreed = self._agree_elapsed() if self.clock.budget is not None else None
        return self.context.any(self.clock.out_of_time(agreed))

    def _set_step_size(self) -> bool:
        """Give the optimiser the step size of this step; False (and nothing set) when the time
        budget is already spent. The fraction of the budget used is the slowest process's, so
        every process takes the same step size."""
        budget_spent = 0.0
        if self.clock.budget is not None:
            budget_spent = self._agree_elapsed() / self.clock.budget
        if budget_spent >= 1.0:
            return False
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(self.train, self.step, budget_spent)
        return True


def micro_batches(step_module: StepModule, train: TrainConfig) -> Iterator[tuple[slice, bool]]:
    """(rows of this process's batch, whether last) for each micro-batch of a step."""
    size = micro_batch_size(train, step_module.context)
    for micro in range(train.grad_accum_steps):
        yield slice(micro * size, (micro + 1) * size), micro == train.grad_accum_steps - 1
