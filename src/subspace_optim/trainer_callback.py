"""transformers' Trainer in layer-wise mode: log the real gradient norm.

With :func:`subspace_optim.step_in_backward` every gradient is consumed and freed inside
backward, so the Trainer's own clipping sees none and logs ``grad_norm`` 0 (or nothing with
``max_grad_norm=0``). This callback writes the step's total norm measured by the stepper
into the Trainer's logs and log history. Importing this module needs transformers.
"""

from __future__ import annotations

import warnings
from typing import Any

from transformers import TrainerCallback

from .layerwise import BackwardStepper


class LayerwiseGradNormCallback(TrainerCallback):
    """Logs ``stepper.grad_norm`` as ``grad_norm``. Add it first
    (``trainer.callback_handler.callbacks.insert(0, callback)``, or
    :func:`add_grad_norm_callback`) so that the reporting integrations, which the Trainer
    registers before user callbacks, log the corrected value too."""

    def __init__(self, stepper: BackwardStepper) -> None:
        self.stepper = stepper

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if getattr(args, "max_grad_norm", 0) and self.stepper.max_grad_norm is None:
            warnings.warn(
                f"TrainingArguments(max_grad_norm={args.max_grad_norm}) clips nothing in "
                "layer-wise mode: the gradients are consumed inside backward, before the "
                "Trainer clips. Pass max_grad_norm to step_in_backward and set "
                "TrainingArguments(max_grad_norm=0)", UserWarning, stacklevel=2)
        elif getattr(args, "max_grad_norm", 0):
            warnings.warn(
                f"TrainingArguments(max_grad_norm={args.max_grad_norm}): the Trainer's clip "
                "sees no gradient in layer-wise mode (step_in_backward clips instead); set "
                "TrainingArguments(max_grad_norm=0)", UserWarning, stacklevel=2)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None,
               **kwargs: Any) -> None:
        norm = self.stepper.grad_norm
        if logs is None or norm is None or "loss" not in logs:
            return
        value = float(norm)
        logs["grad_norm"] = value
        last = state.log_history[-1] if state.log_history else None
        if last is not None and last.get("step") == state.global_step and "loss" in last:
            last["grad_norm"] = value


def add_grad_norm_callback(trainer: Any, stepper: BackwardStepper) -> LayerwiseGradNormCallback:
    """Put a :class:`LayerwiseGradNormCallback` first in ``trainer``'s callbacks."""
    callback = LayerwiseGradNormCallback(stepper)
    trainer.callback_handler.callbacks.insert(0, callback)
    return callback
