"""How much memory pretraining needs on each device: weights, gradients, optimizer state and
activations, under DDP and FSDP (llm.distributed), for a number of devices.

    python -m llm.memory                       # every preset, 1, 2, 4 and 8 devices
    python -m llm.memory --preset gpt2-xl      # one preset, item by item

Computed from the model itself, built on the meta device (shapes without memory):
- weights and gradients: every parameter in fp32 (with bf16 autocast the master weights and
  gradients stay fp32);
- optimizer state: the optimizer llm.optim.make_optimizer builds, 2 fp32 numbers a parameter for
  AdamW's moments, 1 for Muon's momentum;
- activations: the bytes autograd keeps for the backward pass of one micro-batch (batch_size rows
  of context_length tokens), counted by running the forward pass with a hook on saved tensors,
  in bf16 (a GPU's autocast; float32 keeps about twice as much), with attention as a fused kernel
  keeps it (queries, keys, values, output and one number a row, never the T x T matrix);
- with FSDP, each device holds 1/N of weights, gradients and optimizer state, plus the units it
  gathers whole while they run (in bf16): the root's parameters (embeddings and output layer) and
  two blocks (the one running and the next, fetched ahead).
Not counted: the CUDA context and allocator slack (a GiB or two), DDP's gradient buckets (another
copy of the gradients unless gradient_as_bucket_view), temporary buffers inside kernels.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from llm import optim
from llm.model import GPT, PRESETS, ModelConfig
from llm.train import TrainConfig

DEVICE_COUNTS = (1, 2, 4, 8)
FP32, BF16 = 4, 2
OPTIMIZER_STATES = {"adamw": 2, "muon": 1}   # fp32 numbers kept per parameter
GIB = 1024 ** 3


@dataclass(frozen=True)
class Footprint:
    """The memory of training one model, before it is spread over devices (bytes)."""

    parameters: int
    weights: int
    gradients: int
    optimizer: int
    activations: int    # one micro-batch, in each process
    gathered: int       # FSDP: the units whole at one moment (root + two blocks), in bf16

    def per_device(self, sharding: str, devices: int) -> dict[str, float]:
        """Bytes on each of `devices` devices: weights, gradients, optimizer, gathered, activations, total."""
        share = 1 if sharding == "ddp" else devices
        gathered = self.gathered if sharding == "fsdp" and devices > 1 else 0
        row = {"weights": self.weights / share, "gradients": self.gradients / share,
               "optimizer": self.optimizer / share, "gathered": gathered, "activations": self.activations}
        return {**row, "total": sum(row.values())}


def footprint(config: ModelConfig, batch_size: int, optimizer: str = "adamw") -> Footprint:
    with torch.device("meta"):
        model = GPT(config)
    parameters = list(model.parameters())
    count = sum(p.numel() for p in parameters)
    made = optim.make_optimizer(model, optimizer, 1e-3, 0.0, (0.9, 0.95), torch.device("meta"))
    optimizers = made.optimizers if isinstance(made, optim.Combined) else {"adamw": made}
    states = sum(OPTIMIZER_STATES[name] * p.numel() for name, o in optimizers.items()
                 for group in o.param_groups for p in group["params"])
    in_blocks = [sum(p.numel() for p in block.parameters()) for block in model.blocks]
    root = count - sum(in_blocks)
    return Footprint(parameters=count, weights=FP32 * count, gradients=FP32 * count, optimizer=FP32 * states,
                     activations=activation_bytes(model.to(torch.bfloat16), batch_size),
                     gathered=BF16 * (root + 2 * max(in_blocks, default=0)))


def activation_bytes(model: GPT, batch_size: int) -> int:
    """Bytes of the tensors autograd saves in a forward pass of batch_size x context_length
    tokens (each storage once; the parameters themselves are not activations). model: on meta."""
    weights = {p.untyped_storage()._cdata for p in model.parameters()}
    saved: dict[int, int] = {}

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage._cdata not in weights:
            saved[storage._cdata] = storage.nbytes()
        return tensor

    tokens = torch.zeros(batch_size, model.config.context_length, dtype=torch.long, device="meta")
    with _FusedAttention(), torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        model(tokens, targets=tokens)
    return sum(saved.values())


class _FusedAttention(TorchFunctionMode):
    """On the meta device scaled_dot_product_attention falls back to the explicit computation,
    which keeps the T x T probabilities; a GPU's fused kernel keeps only what this keeps."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            return _FusedAttentionKeeps.apply(*args[:3])
        return func(*args, **(kwargs or {}))


class _FusedAttentionKeeps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q)
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))  # + log-sum-exp
        return out

    @staticmethod
    def backward(ctx, grad):   # never run: only the forward pass is measured
        raise NotImplementedError


# --- the table ----------------------------------------------------------------------------------

def summary_table(batch_size: int, optimizer: str, presets: list[str]) -> str:
    """Total GiB per device, every preset: DDP (the same for any number of devices) and FSDP."""
    lines = [f"| preset | parameters | activations (batch {batch_size}) | DDP, any devices | "
             + " | ".join(f"FSDP {n}" for n in DEVICE_COUNTS) + " |",
             "|---|---:|---:|---:|" + "---:|" * len(DEVICE_COUNTS)]
    for name in presets:
        config = ModelConfig.from_preset(name)
        f = footprint(config, batch_size, optimizer)
        fsdp = [_gib(f.per_device("fsdp", n)["total"]) for n in DEVICE_COUNTS]
        lines.append(f"| {name} | {f.parameters / 1e6:,.0f}M | {_gib(f.activations)} (T={config.context_length}) | "
                     f"{_gib(f.per_device('ddp', 1)['total'])} | " + " | ".join(fsdp) + " |")
    return "\n".join(lines)


def detail_table(preset: str, batch_size: int, optimizer: str) -> str:
    f = footprint(ModelConfig.from_preset(preset), batch_size, optimizer)
    columns = ("weights", "gradients", "optimizer", "gathered", "activations", "total")
    lines = ["| sharding | devices | " + " | ".join(columns) + " |", "|---|---:|" + "---:|" * len(columns)]
    for sharding in ("ddp", "fsdp"):
        for n in DEVICE_COUNTS:
            row = f.per_device(sharding, n)
            lines.append(f"| {sharding} | {n} | " + " | ".join(_gib(row[c]) for c in columns) + " |")
    return "\n".join(lines)


def _gib(nbytes: float) -> str:
    return f"{nbytes / GIB:.2f}"


def main(argv: list[str] | None = None) -> None:
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(prog="python -m llm.memory", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), help="one preset, item by item (default: all, totals)")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size,
                        help=f"rows of one micro-batch in each process (default: {defaults.batch_size})")
    parser.add_argument("--optimizer", choices=optim.OPTIMIZERS, default=defaults.optimizer,
                        help=f"(default: {defaults.optimizer})")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    what = f"GiB per device, {args.optimizer}, micro-batch of {args.batch_size} rows, bf16 activations"
    if args.preset:
        print(f"{args.preset}: {what}\n\n{detail_table(args.preset, args.batch_size, args.optimizer)}")
    else:
        print(f"{what}\n\n{summary_table(args.batch_size, args.optimizer, list(PRESETS))}")


if __name__ == "__main__":
    main()
