"""LoRA: tune a model cheaply by training a small low-rank update beside chosen linear layers.

A frozen weight W (out x in) gets a trainable update (alpha / rank) * B @ A, with A (rank x in)
and B (out x rank). B starts at zero, so training starts from exactly the pretrained model, and
only rank * (in + out) numbers per layer are trained instead of in * out. For serving, the update
is added into W once ("merged"): the result is our plain GPT again, as fast as before tuning.

The layers come from peft (Hugging Face's LoRA library), which wraps any nn.Linear of any
nn.Module; `merge_lora` returns the original class. What this module adds is choosing the
targets safely: a tied output layer (lm_head sharing the token embedding) is refused, because
merging an update into it would silently change the embedding too.

    lora_model = add_lora(model, LoraSettings(rank=8, alpha=16, targets=("attn.qkv", "mlp.fc")))
    ...train lora_model (only the adapters have requires_grad)...
    model = merge_lora(lora_model)          # a GPT again, the update folded into its weights
"""

from __future__ import annotations

import copy
import re
import sys
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.nn as nn

# peft is imported inside the functions that need it: it pulls in transformers (seconds of
# start-up), which a process that only serves or evaluates a merged model never needs.

# Every linear layer inside the transformer blocks: attention in/out, MLP in/out.
DEFAULT_TARGETS = ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")


@dataclass
class LoraSettings:
    rank: int = 8
    alpha: float = 16.0        # the update is scaled by alpha / rank
    dropout: float = 0.05      # on the adapter's input only; the frozen path is untouched
    targets: tuple[str, ...] = DEFAULT_TARGETS

    def __post_init__(self):
        self.targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        if not self.alpha > 0:
            raise ValueError(f"LoRA alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise ValueError("LoRA targets must name at least one linear layer")


def matches(name: str, target: str) -> bool:
    """A target matches a dotted module name by suffix ('attn.qkv' matches 'blocks.0.attn.qkv')
    or, failing that, as a regular expression over the whole name ('blocks\\.[23]\\..*')."""
    if name == target or name.endswith("." + target):
        return True
    try:
        return re.fullmatch(target, name) is not None
    except re.error:
        return False


def resolve_targets(model: nn.Module, targets: tuple[str, ...] | list[str]) -> list[str]:
    """The full names of the linear layers the targets select; ValueError if none, or if one
    shares its weight with another module (a tied output layer)."""
    linear = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    chosen = [name for name in linear if any(matches(name, t) for t in targets)]
    if not chosen:
        raise ValueError(f"LoRA targets {list(targets)} match no linear layer; linear layers: {', '.join(linear)}")
    owners = _weight_owners(model)
    for name in chosen:
        weight = model.get_submodule(name).weight
        others = [owner for owner in owners[id(weight)] if owner != name]
        if others:
            raise ValueError(
                f"LoRA target {name!r} shares its weight with {others} (tied embeddings): merging an "
                f"update into it would change {others[0]!r} too. Leave {name!r} out of the targets.")
    return chosen


def _weight_owners(model: nn.Module) -> dict[int, list[str]]:
    """Parameter id -> every module that holds it (tied weights have several)."""
    owners: dict[int, list[str]] = defaultdict(list)
    for name, module in model.named_modules():
        for param in module.parameters(recurse=False):
            owners[id(param)].append(name)
    return owners


def add_lora(model: nn.Module, settings: LoraSettings) -> nn.Module:
    """Wrap the target layers with LoRA adapters and freeze everything else.

    The returned model is called exactly like `model`. A's initialisation draws from the torch
    RNG: seed it first for a reproducible run.
    """
    from peft import LoraConfig, get_peft_model

    names = resolve_targets(model, settings.targets)
    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=names, bias="none")
    return get_peft_model(model, config)


def is_lora(model: nn.Module) -> bool:
    """Whether the model carries adapters (a peft wrapper). If peft was never imported, no
    model can be one."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold the adapters into the weights and return the original model class (not a copy: the
    wrapped layers are replaced in place). A model without adapters is returned as it is."""
    if not is_lora(model):
        return model
    merged = model.merge_and_unload(safe_merge=True)   # safe_merge: refuse to write NaNs
    for param in merged.parameters():
        param.requires_grad_(True)                      # unfrozen again, like any loaded model
    return merged


def merged_copy(model: nn.Module) -> nn.Module:
    """The model with its adapters folded in, as a copy (the model keeps training with them);
    a model without adapters is returned as it is."""
    return merge_lora(copy.deepcopy(model)) if is_lora(model) else model


@torch.no_grad()
def merge_and_check(model: nn.Module, *inputs: torch.Tensor, **kwargs) -> tuple[nn.Module, float]:
    """merge_lora, plus the largest |merged - unmerged| output logit on `inputs` (0.0 for a model
    without adapters): the evidence that serving the merged weights changes nothing."""
    if not is_lora(model):
        return model, 0.0
    was_training = model.training
    model.eval()
    before = model(*inputs, **kwargs).logits
    merged = merge_lora(model)
    after = merged(*inputs, **kwargs).logits
    merged.train(was_training)
    return merged, float((after - before).abs().max())


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters; a tied weight counts once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
