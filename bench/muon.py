"""Muon's cost on this device: a training step with llm.optim.Muon (Newton-Schulz in the device's
native precision, llm.device.matmul_dtype) beside torch.optim.Muon (Newton-Schulz always bf16), in
one process on the same model, batch and initial weights. Prints one JSON line:

    {"bench": "muon", ..., "newton_schulz_dtype": "float32", "ours_step_s": ..., "torch_step_s": ...,
     "ours_tokens_per_s": ..., "torch_tokens_per_s": ..., "speedup": ...}

On a CPU without native bf16 (AVX2 only) torch's bf16 matmuls are emulated: that is the gap this
measures. Each side's figure is the median step after the first; the sides alternate rounds.

    .venv/bin/python bench/muon.py                 # the tiny preset at 16 x 256 tokens (the pipeline's)
    .venv/bin/python bench/muon.py --steps 6 --out FILE
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.report import context, emit  # noqa: E402
from llm.device import matmul_dtype, resolve_device  # noqa: E402
from llm.model import GPT, PRESETS, ModelConfig  # noqa: E402
from llm.optim import Muon, make_optimizer  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=4, help="steps per side and round, the first left out (default: 4)")
    p.add_argument("--rounds", type=int, default=2, help="rounds, alternating which side goes first (default: 2)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", metavar="FILE")
    return p.parse_args(argv)


def step_seconds(config: ModelConfig, muon_of, batch: tuple[torch.Tensor, torch.Tensor], steps: int,
                 device: torch.device) -> list[float]:
    """make_optimizer's Muon and AdamW split, with the Muon side `muon_of(its parameters)`."""
    torch.manual_seed(0)
    model = GPT(config).to(device)
    optimizer = make_optimizer(model, "muon", 1e-3, 0.1, (0.9, 0.95), device)
    ours = optimizer.optimizers["muon"]
    optimizer.optimizers["muon"] = muon_of([p for group in ours.param_groups for p in group["params"]])
    times = []
    for _ in range(steps):
        began = time.perf_counter()
        model(*batch[:1], targets=batch[1]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - began)
    return times[1:]


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = resolve_device(args.device)
    config = ModelConfig.from_preset(args.preset)
    tokens = torch.randint(0, config.vocab_size, (args.batch_size, config.context_length + 1), device=device)
    batch = (tokens[:, :-1], tokens[:, 1:])
    sides = {"ours": lambda m: Muon(m, lr=1e-3, weight_decay=0.1, ns_dtype=matmul_dtype(device)),
             "torch": lambda m: torch.optim.Muon(m, lr=1e-3, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")}
    times = {name: [] for name in sides}
    for round_ in range(args.rounds):
        for name in (list(sides) if round_ % 2 == 0 else list(sides)[::-1]):
            times[name] += step_seconds(config, sides[name], batch, args.steps, device)
    step_s = {name: statistics.median(t) for name, t in times.items()}
    step_tokens = args.batch_size * config.context_length
    report = {**context("muon", device, "bench/muon.py", argv), "preset": args.preset, "batch_size": args.batch_size,
              "newton_schulz_dtype": str(matmul_dtype(device)).removeprefix("torch."),
              **{f"{name}_step_s": round(s, 3) for name, s in step_s.items()},
              **{f"{name}_tokens_per_s": round(step_tokens / s, 1) for name, s in step_s.items()},
              "speedup": round(step_s["torch"] / step_s["ours"], 2)}
    emit(report, args.out)
    return report


if __name__ == "__main__":
    main()
