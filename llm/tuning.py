"""What tuning a pretrained model shares, whatever the task (llm.classify, llm.finetune).

Both tasks start from the pretrained weights and train for a few epochs with the same optimizer
(llm.optim.plain_adamw), optionally through LoRA adapters, on a seeded run; the update and its
schedule are pretraining's (llm.step). Their configs declare their own fields (each lists every
knob of its task in one place); `TuningKnobs` checks the knobs they have in common.
"""

from __future__ import annotations

import numpy as np
import torch

from llm.device import DEVICES, resolve_device
from llm.lora import LoraSettings
from llm.plain import Check, PlainDict

# --- config -------------------------------------------------------------------------------------

class TuningKnobs(PlainDict):
    """Mixin for a tuning config dataclass with the fields lr, min_lr, warmup_steps, weight_decay,
    grad_clip, eval_every, lora_rank, lora_alpha, lora_dropout, lora_targets, seed, device and
    threads."""

    def check_shared_knobs(self, check: Check) -> None:
        """Validate the shared knobs (the task's __post_init__ checks its own)."""
        self.lora_targets = (self.lora_targets,) if isinstance(self.lora_targets, str) else tuple(self.lora_targets)
        check(self.lr > 0, "lr", self.lr, "must be > 0")
        check(0 <= self.min_lr <= self.lr, "min_lr", self.min_lr, f"must be in [0, lr={self.lr}]")
        check(self.warmup_steps >= 0, "warmup_steps", self.warmup_steps, "must be >= 0")
        check(self.weight_decay >= 0, "weight_decay", self.weight_decay, "must be >= 0")
        check(self.grad_clip >= 0, "grad_clip", self.grad_clip, "must be >= 0 (0 = no clipping)")
        check(self.eval_every >= 0, "eval_every", self.eval_every, "must be >= 0 (0 = each epoch's end)")
        check(self.seed >= 0, "seed", self.seed, "must be >= 0")
        check(self.device in DEVICES, "device", self.device, f"must be one of {DEVICES}")
        check(self.threads >= 0, "threads", self.threads, "must be >= 0 (0 = torch's default)")
        self.lora_settings()   # validates rank, alpha, dropout and targets, naming the field

    def lora_settings(self) -> LoraSettings:
        try:
            return LoraSettings(self.lora_rank, self.lora_alpha, self.lora_dropout, self.lora_targets)
        except ValueError as e:
            raise ValueError(f"{type(self).__name__}.lora_*: {e}") from None


# --- the run ------------------------------------------------------------------------------------

def prepare_run(seed: int, threads: int, device: str) -> torch.device:
    """Thread count, seeds and device for a deterministic run."""
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    np.random.seed(seed)
    return resolve_device(device)
