"""The optimiser of every trainer: Adam (fused where it can be), or Adam stepped parameter by
parameter inside the backward pass, and the check that a saved optimiser state fits a model.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .config import TrainConfig


def make_optimizer(model: torch.nn.Module, train: TrainConfig) -> Any:
    """Adam over the model's parameters (``AdamInBackward`` with
    ``train.optimizer_in_backward``)."""
    if train.optimizer_in_backward:
        return AdamInBackward(model, train)
    return _adam(list(model.parameters()), train)


def _adam(parameters: list[torch.nn.Parameter], train: TrainConfig) -> torch.optim.Adam:
    # The fused kernel updates every tensor in one pass: on the CPU the per-parameter loop of
    # the default implementation cost more than 3x as much (bench/README.md).
    fused = all(p.device.type in ("cpu", "cuda") for p in parameters)
    return torch.optim.Adam(
        parameters,
        lr=train.learning_rate,
        betas=(train.adam_beta1, train.adam_beta2),
        fused=fused or None,
    )


class AdamInBackward:
    """Adam stepped parameter by parameter inside the backward pass: as soon as a parameter's
    gradient is complete, its own Adam steps and the gradient is freed, so the gradients of the
    whole model are never held at once (``train.optimizer_in_backward``).

    To the training session it looks like one ``torch.optim.Adam``: ``param_groups`` (one per
    parameter, in the model's order) take the step size, ``zero_grad`` and ``step`` have nothing
    left to do, and ``state_dict`` / ``load_state_dict`` use the single optimiser's layout, so a
    checkpoint resumes with either. The update of each parameter is Adam's own.

    Whether each gradient is finite is noted as its parameter steps (without waiting for the
    device); ``gradients_finite`` says whether all of the last backward pass were. A parameter
    already stepped cannot be put back, so the session stops the run on a non-finite gradient
    (``train.nonfinite=stop``, the only policy allowed with this optimiser) and writes nothing
    after it.
    """

    def __init__(self, model: torch.nn.Module, train: TrainConfig) -> None:
        self.parameters = [p for p in model.parameters() if p.requires_grad]
        self.optimizers = [_adam([p], train) for p in self.parameters]
        self.nonfinite: list[Tensor] = []  # () bool per gradient seen non-finite this step
        for parameter, optimizer in zip(self.parameters, self.optimizers, strict=True):
            parameter.register_post_accumulate_grad_hook(self._stepper(optimizer))

    def _stepper(self, optimizer: torch.optim.Adam) -> Callable[[torch.Tensor], None]:
        def step(parameter: torch.Tensor) -> None:
            # Kept on the device: reading it here would wait for the GPU at every parameter.
            self.nonfinite.append(~parameter.grad.isfinite().all())
            optimizer.step()
            parameter.grad = None

        return step

    def gradients_finite(self) -> bool:
        """Every gradient of the backward passes since ``zero_grad`` was finite."""
        return not (self.nonfinite and bool(torch.stack(self.nonfinite).any()))

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [optimizer.param_groups[0] for optimizer in self.optimizers]

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.nonfinite = []
        for parameter in self.parameters:
            parameter.grad = None

    def step(self) -> None:
        """Nothing: every parameter stepped during the backward pass."""

    def state_dict(self) -> dict[str, Any]:
        """The state in the layout of one Adam over all the parameters (ids 0 .. n-1)."""
        states = [optimizer.state_dict() for optimizer in self.optimizers]
        group = {key: value for key, value in states[0]["param_groups"][0].items()}
        group["params"] = list(range(len(states)))
        return {
            "state": {i: s["state"][0] for i, s in enumerate(states) if 0 in s["state"]},
            "param_groups": [group],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load a state saved by this class or by one Adam over the same parameters."""
        (group,) = state["param_groups"]
        for index, optimizer in enumerate(self.optimizers):
            own = {0: state["state"][index]} if index in state["state"] else {}
            optimizer.load_state_dict({"state": own, "param_groups": [{**group, "params": [0]}]})


ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")  # Adam's tensors of each parameter's shape
ADAM_STATE = ("step", *ADAM_MOMENTS)  # all Adam keeps per parameter (amsgrad off)


def check_optimizer_state(state: dict[str, Any], model: torch.nn.Module, where: Path) -> None:
    """Raise a one-line ``ValueError`` unless ``state`` (``make_optimizer``'s ``state_dict``,
    read from the checkpoint at ``where``) fits ``model``'s parameters. Adam would load a misfit
    and fail at the first step, or with its fused kernel write out of bounds."""
    named = list(model.named_parameters())
    prefix = f"the optimiser state in {where} does not fit the model"
    for param_id, entries in state["state"].items():
        if not 0 <= param_id < len(named):
            raise ValueError(f"{prefix}: it has parameter {param_id}, the model {len(named)}")
        name, parameter = named[param_id]
        missing = [key for key in ADAM_STATE if key not in entries]
        if missing:
            raise ValueError(f"{prefix}: {name} lacks {missing[0]}")
        for key in ADAM_MOMENTS:
            shape = tuple(entries[key].shape)
            if shape != tuple(parameter.shape):
                raise ValueError(
                    f"{prefix}: {name}'s {key} has shape {shape}, expected {tuple(parameter.shape)}"
                )
