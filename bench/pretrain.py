"""Pretraining speed: tokens/s and MFU of the real training loop (llm.train.train), one process.

Trains the `gpt2-124m` preset (or --preset) for --steps optimizer updates on synthetic tokens
(uniform random ids: the speed of a step does not depend on what the tokens say) or on a packed
token file from the pack stage (--tokens data/pack/tokens/train.bin), with the very loop the
pretrain stage uses, and prints one JSON line:

    {"bench": "pretrain", "date": ..., "device_name": "NVIDIA H100 80GB HBM3", "batch_size": 16,
     "seq_len": 1024, "tokens_per_s": ..., "mfu": ..., "peak_memory_gb": ..., "compile_s": ..., ...}

tokens_per_s: the median over the updates after --warmup of the loop's own per-update figure
(what on_step reports: tokens of the update / its wall time, which ends with the update's one
wait for the device). mfu: tokens_per_s * llm.model.flops_per_token (6N + attention) / the GPU's
dense bf16 peak from llm.device.PEAK_BF16_FLOPS; null, with a note, on a CPU or a GPU that table
does not know. peak_memory_gb: torch.cuda.max_memory_allocated on a GPU, the process's peak RSS
on a CPU. compile_s: the first update's time minus the median update's (compilation, autotuning
and CUDA start-up), with --compile. --out FILE also saves the JSON (bench/results/ keeps them).

    .venv/bin/python bench/pretrain.py                                   # on a GPU: gpt2-124m, B16 x T1024
    .venv/bin/python bench/pretrain.py --batch-size 64 --out bench/results/h100-gpt2-124m-b64.json
    .venv/bin/python bench/pretrain.py --preset tiny --steps 10          # a quick check on a CPU
    .venv/bin/python bench/pretrain.py --vocab-size 50304                # GPT-2's vocabulary padded to 128s
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

# Run as a script from anywhere: make the repository's `llm` package importable.
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.report import context, device_name, emit  # noqa: E402
from llm.data import TokenDataset, read_meta  # noqa: E402
from llm.device import model_flops_utilisation, peak_flops, resolve_device, resolve_dtype  # noqa: E402
from llm.model import GPT, PRESETS, ModelConfig, flops_per_token, num_params  # noqa: E402
from llm.train import TrainConfig, accumulation_steps, train  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="gpt2-124m", choices=sorted(PRESETS), help="model preset (default: gpt2-124m)")
    p.add_argument("--steps", type=int, default=50, help="optimizer updates to run (default: 50)")
    p.add_argument("--warmup", type=int, default=5,
                   help="first updates left out of the median (compilation, allocator warm-up; default: 5)")
    p.add_argument("--batch-size", type=int, default=16, help="rows per micro-batch (default: 16)")
    p.add_argument("--seq-len", type=int, default=0, help="tokens per row (default: the model's context_length)")
    p.add_argument("--tokens-per-step", type=int, default=0,
                   help="tokens per update; more than one micro-batch accumulates gradients (default: 0 = one)")
    p.add_argument("--tokens", metavar="FILE", help="a packed token file (the pack stage's train.bin) instead of "
                   "synthetic tokens; the model's vocabulary becomes the file's unless --vocab-size")
    p.add_argument("--vocab-size", type=int, default=0,
                   help="override the preset's vocabulary, e.g. 50304 (GPT-2's 50257 padded to a multiple of 128)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (default: on for CUDA, off elsewhere)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"))
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="autocast dtype (default: bfloat16 on CUDA, float32 elsewhere)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: 0 = torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", metavar="FILE", help="also write the JSON to FILE (e.g. bench/results/NAME.json)")
    args = p.parse_args(argv)
    if args.steps < 1 or not 0 <= args.warmup < args.steps:
        p.error(f"need --steps >= 1 and 0 <= --warmup < --steps (got --steps {args.steps}, --warmup {args.warmup})")
    return args


class SyntheticTokens:
    """Uniform random token ids; batch(step) is a pure function of (seed, step), like TokenDataset."""

    with_doc_ids = False

    def __init__(self, vocab_size: int, seq_len: int, batch_size: int, seed: int = 0):
        self.vocab_size, self.seq_len, self.batch_size, self.seed = vocab_size, seq_len, batch_size, seed

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        window = torch.randint(self.vocab_size, (self.batch_size, self.seq_len + 1), generator=generator)
        return window[:, :-1], window[:, 1:]


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    compile_model = device.type == "cuda" if args.compile is None else args.compile

    overrides = {}
    if args.tokens:
        overrides["vocab_size"] = read_meta(args.tokens)["vocab_size"]
    if args.vocab_size:
        overrides["vocab_size"] = args.vocab_size
    model_config = ModelConfig.from_preset(args.preset, **overrides)
    seq_len = args.seq_len or model_config.context_length
    if args.tokens:
        data = TokenDataset(args.tokens, seq_len, args.batch_size, seed=args.seed)
        if data.meta["vocab_size"] > model_config.vocab_size:
            sys.exit(f"error: {args.tokens} holds ids up to {data.meta['vocab_size'] - 1}; --vocab-size "
                     f"{model_config.vocab_size} is too small")
    else:
        data = SyntheticTokens(model_config.vocab_size, seq_len, args.batch_size, seed=args.seed)

    config = TrainConfig(lr=6e-4, min_lr=6e-5, warmup_steps=min(10, args.steps), max_steps=args.steps,
                         batch_size=args.batch_size, tokens_per_step=args.tokens_per_step, eval_every=0,
                         checkpoint_every=0, keep_checkpoints=1, resume="never", compile=compile_model,
                         device=args.device, dtype=args.dtype, threads=args.threads, seed=args.seed,
                         sample_tokens=0, progress=False)
    torch.manual_seed(args.seed)
    model = GPT(model_config)
    flops = flops_per_token(model_config, seq_len)
    steps: list[tuple[int, dict]] = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    with tempfile.TemporaryDirectory(prefix="bench-pretrain-") as out_dir:   # the final checkpoint, discarded
        began = time.perf_counter()
        result = train(model, data, None, config, out_dir, on_step=lambda step, m: steps.append((step, m)))
        elapsed = time.perf_counter() - began

    measured = [m["tokens_per_s"] for step, m in steps[args.warmup:]]
    tokens_per_s = statistics.median(measured)
    step_s = [result.tokens_per_step / m["tokens_per_s"] for _, m in steps]
    median_step_s = statistics.median(step_s[args.warmup:])
    peak = peak_flops(device)
    mfu = model_flops_utilisation(tokens_per_s, flops, peak)
    if device.type == "cuda":
        memory, memory_kind = torch.cuda.max_memory_allocated(device), "cuda_max_memory_allocated"
    else:
        memory, memory_kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process_peak_rss"
    note = None
    if device.type != "cuda":
        note = f"MFU is computed for CUDA GPUs only (this ran on {device.type})"
    elif peak is None:
        note = (f"no dense bf16 peak known for {device_name(device)!r} (llm.device.PEAK_BF16_FLOPS): "
                "MFU not computed rather than guessed")

    report = {
        **context("pretrain", device, "bench/pretrain.py", argv),
        "preset": args.preset,
        "parameters": num_params(model),
        "vocab_size": model_config.vocab_size,
        "data": args.tokens or "synthetic",
        "batch_size": args.batch_size,
        "seq_len": seq_len,
        "accumulation": accumulation_steps(config, seq_len),
        "tokens_per_step": result.tokens_per_step,
        "dtype": str(resolve_dtype(args.dtype, device)).removeprefix("torch."),
        "compile": compile_model,
        "steps": args.steps,
        "warmup_steps": args.warmup,
        "tokens_per_s": round(tokens_per_s, 1),
        "tokens_per_s_mean": round(statistics.fmean(measured), 1),
        "tokens_per_s_min": round(min(measured), 1),
        "tokens_per_s_max": round(max(measured), 1),
        "step_ms_median": round(1000 * median_step_s, 2),
        "flops_per_token": flops,
        "peak_flops": peak,
        "mfu": round(mfu, 4) if mfu is not None else None,
        "peak_memory_gb": round(memory / 2**30, 3),
        "peak_memory_kind": memory_kind,
        "first_step_s": round(step_s[0], 3),
        "compile_s": round(step_s[0] - median_step_s, 3) if compile_model else None,
        "elapsed_s": round(elapsed, 1),
        "first_loss": round(steps[0][1]["loss"], 4),
        "final_loss": round(result.train_loss, 4),
        "note": note,
    }
    emit(report, args.out)
    return report


if __name__ == "__main__":
    main()
