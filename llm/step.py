"""One training update, the same for pretraining (llm.train) and tuning (llm.classify, llm.finetune).

Each loop reads its own data, evaluates and reports in its own way; the update is shared:

    lr = lr_schedule(step, lr=..., min_lr=..., warmup_steps=..., total_steps=...)
    result = train_step(model, optimizer, loss_of, step=step, lr=lr, grad_clip=..., ...)

`train_step` sets the learning rate, runs forward and backward over the update's micro-batches
(their gradients add up to the gradient of their mean), clips the gradient norm and steps the
optimizer, unless the loss or the norm is NaN/inf: then it raises TrainingDiverged before the bad
update reaches the weights.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from llm import distributed, optim
from llm.device import autocast
from llm.distributed import SINGLE, Dist

DECAYS = ("cosine", "linear", "constant")


# --- learning-rate schedule ---------------------------------------------------------------------

def lr_schedule(step: int, *, lr: float, min_lr: float, warmup_steps: int, total_steps: int,
                decay: str = "cosine") -> float:
    """Linear warmup from lr/warmup_steps to lr, then `decay` to min_lr at total_steps.

    Warmup: Adam's first updates rest on almost no gradient statistics and are large; ramping
    the rate up keeps them from throwing a freshly initialised model into a bad region (or a
    pretrained one far from where it was). Decay: a lower rate at the end lets the weights
    settle into the minimum that a high rate keeps bouncing around.
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if decay == "constant":
        return lr
    progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
    if decay == "linear":
        fraction = 1.0 - progress
    else:  # cosine
        fraction = 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_lr + fraction * (lr - min_lr)


# --- divergence ---------------------------------------------------------------------------------

class TrainingDiverged(FloatingPointError):
    """The loss or gradient norm became NaN/inf; training stopped before the bad update."""

    def __init__(self, step: int, what: str, value: float, config_name: str, checkpoint: Path | None = None):
        self.step, self.what, self.value, self.checkpoint = step, what, value, checkpoint
        again = (f"The last good checkpoint, {checkpoint}, is intact; resuming it" if checkpoint
                 else "Running again")
        super().__init__(
            f"training diverged at step {step}: the {what} is {value}. Training stopped before applying "
            f"this update. {again} with the same settings will diverge again: lower {config_name}.lr, "
            f"lengthen {config_name}.warmup_steps or clip gradients ({config_name}.grad_clip=1.0).")


def check_finite(step: int, loss: float, grad_norm: float, config_name: str,
                 checkpoint: Path | None = None) -> None:
    """Raise TrainingDiverged if the loss or the gradient norm is NaN/inf (config_name: whose
    settings to change, e.g. 'TrainConfig'; checkpoint: the last good one, if any)."""
    for what, value in (("training loss", loss), ("gradient norm", grad_norm)):
        if not math.isfinite(value):
            raise TrainingDiverged(step, what, value, config_name, checkpoint)


# --- the step -----------------------------------------------------------------------------------

@dataclass
class StepResult:
    loss: float         # the update's mean loss over its micro-batches (and processes)
    grad_norm: float    # the global gradient norm before clipping
    lr: float


def record_history(history: dict[str, list], step: int, **values: float) -> None:
    """Append (step, value) to each named curve of a run's history."""
    for name, value in values.items():
        history[name].append((step, value))


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer | optim.Combined,
               loss_of: Callable[[int], torch.Tensor], *, step: int, lr: float, grad_clip: float,
               config_name: str, device: torch.device, dtype: torch.dtype = torch.float32,
               accumulation: int = 1, ddp: nn.Module | None = None, where: Dist = SINGLE,
               checkpoint: Path | None = None) -> StepResult:
    """One optimizer update over `accumulation` micro-batches; loss_of(i): micro-batch i's mean loss.

    model: the module whose gradients are clipped (not a DDP or compiled wrapper of it). dtype:
    the autocast precision of the forward passes. ddp: the DistributedDataParallel wrapper that
    loss_of runs through, or the FSDP-sharded model, with several processes (where). step, config_name and checkpoint name
    the update, the settings to change and the last good checkpoint if training diverges.
    """
    optim.set_lr(optimizer, lr)
    optimizer.zero_grad(set_to_none=True)
    total = torch.zeros((), device=device)
    for micro in range(accumulation):
        # DDP averages gradients across processes during backward; on all micro-steps but the
        # last they only accumulate locally (no_sync), and the last one sends the sum.
        last = micro == accumulation - 1
        with (distributed.no_sync(ddp) if ddp is not None and not last else contextlib.nullcontext()):
            with autocast(device, dtype):
                # Each micro-batch loss is a mean; dividing by their number makes the summed gradients
                # the gradient of the mean over the whole update (DDP then averages over processes).
                loss = loss_of(micro) / accumulation
            loss.backward()
        total += loss.detach()
    if where.enabled:   # the update's loss is the mean over processes: every rank sees the same number
        total = distributed.sum_across(total, where) / where.world_size
    norm = optim.clip_gradients(model, grad_clip)
    # One wait for the device per update: the loss and the norm come back together, and must,
    # before the optimizer step, so that a NaN stops training before it reaches the weights.
    loss_value, grad_norm = torch.stack([total.float(), norm.float()]).tolist()
    check_finite(step, loss_value, grad_norm, config_name, checkpoint)
    optimizer.step()
    return StepResult(loss_value, grad_norm, lr)
