"""The clock and step-size schedule of a training run: wall time across resumes, the
``--max-minutes`` deadline, the ``train.schedule_minutes`` budget, warm-up and decay.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from .config import TrainConfig

Clock = Callable[[], float]  # seconds on a clock that never goes back (time.monotonic)


class RunClock:
    """Wall time of a run across resumes, this process's ``--max-minutes`` deadline, and the
    run's ``train.schedule_minutes`` budget (which counts earlier processes too).

    Args:
        elapsed_before: seconds of training done by the earlier processes of a resumed run.
        max_minutes: this process's own limit, or None.
        budget_minutes: the run's whole budget (``train.schedule_minutes``); 0 for none.
        now: the clock read (``time.monotonic``; tests pass a fake one).
    """

    def __init__(
        self,
        elapsed_before: float,
        max_minutes: float | None,
        budget_minutes: float = 0.0,
        now: Clock = time.monotonic,
    ) -> None:
        self.now = now
        self.elapsed_before = elapsed_before
        self.start = now()
        self.deadline = None if max_minutes is None else self.start + 60.0 * max_minutes
        self.budget = 60.0 * budget_minutes if budget_minutes > 0 else None  # seconds

    def elapsed(self) -> float:
        """Seconds of training so far, earlier processes of a resumed run included."""
        return self.elapsed_before + self.now() - self.start

    def out_of_time(self, elapsed: float | None = None) -> bool:
        """This process's deadline is past, or ``elapsed`` seconds (this process's by default)
        spend the budget."""
        elapsed = self.elapsed() if elapsed is None else elapsed
        past_deadline = self.deadline is not None and self.now() >= self.deadline
        return past_deadline or (self.budget is not None and elapsed >= self.budget)

    @property
    def limited(self) -> bool:
        return self.deadline is not None or self.budget is not None


def learning_rate(train: TrainConfig, step: int, budget_spent: float = 0.0) -> float:
    """Step size for optimisation step ``step`` (0-based): optional linear warm-up, then the
    schedule.

    ``cosine`` and ``linear`` decay from ``learning_rate`` after the warm-up to 0 at
    ``max_steps``, or sooner when ``budget_spent`` (the fraction of ``schedule_minutes`` used) is
    further along. The warm-up is cut to ``max_steps // 2`` steps so that short runs of a preset
    still decay.
    """
    warmup = min(train.warmup_steps, train.max_steps // 2)
    if step < warmup:
        return train.learning_rate * (step + 1) / warmup
    progress = min(max((step - warmup) / (train.max_steps - warmup), budget_spent), 1.0)
    if train.lr_schedule == "cosine":
        return train.learning_rate * 0.5 * (1 + math.cos(math.pi * progress))
    if train.lr_schedule == "linear":
        return train.learning_rate * (1 - progress)
    return train.learning_rate
