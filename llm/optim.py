"""The optimizers: pretraining's AdamW, or Muon for the blocks' weight matrices with AdamW for the
rest (make_optimizer); tuning's plain AdamW (plain_adamw).

AdamW scales each weight's step by that weight's own gradient history. Muon treats a weight
matrix as a whole: it orthogonalises the matrix's momentum (a few Newton-Schulz iterations,
`newton_schulz`), so the update moves every direction the matrix maps by the same amount instead
of mostly the few directions that dominate the gradient. Scaled as Moonshot's "match_rms_adamw"
does, its steps are as large as AdamW's, so it takes AdamW's learning rate and weight decay. Muon is
made for the 2-D matrices inside the transformer blocks; the embeddings, the output layer, norm
gains and biases stay with AdamW (as in nanochat and modded-nanogpt). 'muon' therefore means two
optimizers over disjoint parameters, stepped together by `Combined`.

Newton-Schulz is five rounds of matrix products, so its precision is the device's: bf16 where the
hardware multiplies bf16 natively (a GPU, a CPU with AMX or AVX512-BF16), fp32 elsewhere, where a
bf16 matmul is emulated and ~100x slower (llm.device.matmul_dtype). torch.optim.Muon hard-codes
bf16; `Muon` here is the same algorithm with the precision as a setting (tests/test_optim.py
checks it against torch's, step for step, in bf16).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn

from llm.device import matmul_dtype

OPTIMIZERS = ("adamw", "muon")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups of the trainable parameters: matrices (and embeddings) decay, vectors
    (biases, norm gains) do not. A tied embedding/output matrix appears once."""
    return decay_groups([p for p in model.parameters() if p.requires_grad], weight_decay)


def decay_groups(params: list[nn.Parameter], weight_decay: float) -> list[dict[str, Any]]:
    """Decay pulls weights towards zero; a norm's gain pulled towards zero, or a bias, only loses
    expressiveness and regularises nothing."""
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


# The quintic's coefficients from Keller Jordan's Muon: chosen to push small singular values up as
# fast as possible, so five rounds bring every singular value into roughly [0.7, 1.2].
NEWTON_SCHULZ = (3.4445, -4.7750, 2.0315)


def newton_schulz(matrix: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A matrix with the singular vectors of `matrix` and singular values near 1 (U S' V^T for
    U S V^T), in `dtype`. Each round maps every singular value s to a*s + b*s^3 + c*s^5."""
    a, b, c = NEWTON_SCHULZ
    x = matrix.to(dtype)
    wide = x.size(0) <= x.size(1)
    if not wide:
        x = x.T                                # the Gram matrix x x^T is then the smaller square
    x = x / x.norm().clamp(min=1e-7)           # Frobenius norm >= spectral norm: every s <= 1
    for _ in range(steps):
        gram = x @ x.T
        poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)     # b G + c G^2
        x = torch.addmm(x, poly, x, beta=a)                       # a X + (b G + c G^2) X
    return x if wide else x.T


class Muon(torch.optim.Optimizer):
    """Muon for 2-D weight matrices: Nesterov momentum, orthogonalised by Newton-Schulz in
    `ns_dtype`, decoupled weight decay, the step scaled to AdamW's size (0.2 sqrt(max(rows, cols)))."""

    def __init__(self, params, lr: float, weight_decay: float, momentum: float = 0.95, ns_steps: int = 5,
                 ns_dtype: torch.dtype = torch.float32):
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay, "momentum": momentum, "ns_steps": ns_steps})
        self.ns_dtype = ns_dtype
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() != 2:
                    raise ValueError(f"Muon takes 2-D matrices only; got a parameter of shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                buffer = state["momentum_buffer"]
                buffer.lerp_(p.grad, 1 - momentum)
                nesterov = p.grad.lerp(buffer, momentum)        # look one momentum step ahead
                update = newton_schulz(nesterov, group["ns_steps"], self.ns_dtype)
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(update, alpha=-lr * 0.2 * math.sqrt(max(p.shape)))


class Combined:
    """Optimizers over disjoint parameters, used as one: what the training loop and checkpoints
    call (param_groups for the schedule, zero_grad, step, state_dict, load_state_dict)."""

    def __init__(self, **optimizers: torch.optim.Optimizer):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [group for optimizer in self.optimizers.values() for group in optimizer.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers.values():
            optimizer.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for optimizer in self.optimizers.values():
            optimizer.step()

    def state_dict(self) -> dict[str, Any]:
        return {name: optimizer.state_dict() for name, optimizer in self.optimizers.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != set(self.optimizers):
            raise ValueError(f"optimizer state holds {sorted(state)}, expected {sorted(self.optimizers)}")
        for name, optimizer in self.optimizers.items():
            optimizer.load_state_dict(state[name])


def set_lr(optimizer: torch.optim.Optimizer | Combined, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def clip_gradients(model: nn.Module, max_norm: float) -> torch.Tensor:
    """The global gradient norm before clipping (a 0-d tensor); clipped to max_norm unless that is 0.

    Clipping caps the size of one update, so a single bad batch cannot throw the weights far;
    the pre-clip norm is the early-warning signal (it climbs before a loss spike). Clipping a
    non-finite norm spoils the gradients, but the caller stops before they are applied."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    # Sharded gradients (FSDP's DTensors) give a sharded norm: the whole one is every rank's combined.
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def make_optimizer(model: nn.Module, kind: str, lr: float, weight_decay: float, betas: tuple[float, float],
                   device: torch.device) -> torch.optim.Optimizer | Combined:
    """AdamW over every trainable parameter, or (kind 'muon') Muon over the blocks' matrices and
    AdamW over the rest, its Newton-Schulz in the device's fast matmul precision. model: a GPT
    (it has .blocks)."""
    # The fused CUDA kernel updates all parameters in one launch instead of several per tensor.
    def adamw(groups):
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device.type == "cuda")

    if kind == "adamw":
        return adamw(param_groups(model, weight_decay))
    if kind != "muon":
        raise ValueError(f"unknown optimizer {kind!r}; optimizers: {', '.join(OPTIMIZERS)}")
    matrices = [p for p in model.blocks.parameters() if p.requires_grad and p.dim() == 2]
    in_muon = {id(p) for p in matrices}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in in_muon]
    muon = Muon(matrices, lr=lr, weight_decay=weight_decay, ns_dtype=matmul_dtype(device))
    return Combined(muon=muon, adamw=adamw(decay_groups(rest, weight_decay)))


def plain_adamw(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with torch's defaults (betas 0.9/0.999, not the fused kernel) over the trainable
    parameters only (frozen ones would just hold zero state): what tuning uses."""
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr)
