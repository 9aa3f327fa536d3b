"""Pretraining speed: tokens/s, MFU and matmul_fraction of the real training loop (llm.train.train).

By default it measures what the pretrain stage runs: params.yaml's `pretrain` model (vocabulary:
the tokenizer's `vocab_size`), batch size, optimizer and learning rate; any of them can be
overridden (--preset, --batch-size, --optimizer ...). It trains --steps optimizer updates on
synthetic tokens (uniform random ids: the speed of a step does not depend on what the tokens say)
or on a packed token file from the pack stage (--tokens data/pack/tokens/train.bin), with the very
loop the pretrain stage uses, and prints one JSON line:

    {"bench": "pretrain", "date": ..., "device_name": "AMD EPYC (2 torch threads)", "optimizer": "muon",
     "batch_size": 16, "seq_len": 256, "tokens_per_s": ..., "matmul_fraction": ..., "mfu": ..., ...}

tokens_per_s: the median over the updates after --warmup of the loop's own per-update figure
(what on_step reports: tokens of the update / its wall time, which ends with the update's one
wait for the device). matmul_fraction: tokens_per_s * llm.model.flops_per_token (6N + attention)
/ the rate of one matmul of the model's own MLP shape (batch x seq rows, d_model -> 4 d_model), in
the forward's precision, measured in the same process right after training: how close training
runs to the speed of the machine's matmuls (a CPU's MFU). mfu: the same against the GPU's dense
bf16 datasheet peak (llm.device.PEAK_BF16_FLOPS); null, with a note, on a CPU or an unknown GPU.
peak_memory_gb: torch.cuda.max_memory_allocated on a GPU, the process's peak RSS on a CPU.
compile_s: the first update's time minus the median update's, with --compile. --out FILE also
saves the JSON (bench/results/ keeps them).

    .venv/bin/python bench/pretrain.py                                   # the pipeline's own run (CPU: tiny, Muon)
    .venv/bin/python bench/pretrain.py --optimizer adamw                 # the same with AdamW
    LLM_KEEP_FREED_MEMORY=0 .venv/bin/python bench/pretrain.py           # glibc's default allocator behaviour
    .venv/bin/python bench/pretrain.py --preset gpt2-124m --optimizer adamw --batch-size 16 --vocab-size 50257
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
from flows.params import load_params  # noqa: E402
from llm.allocator import keep_freed_memory  # noqa: E402
from llm.data import TokenDataset, read_meta  # noqa: E402
from llm.device import matmul_flops, model_flops_utilisation, peak_flops, resolve_device, resolve_dtype  # noqa: E402
from llm.model import GPT, PRESETS, ModelConfig, flops_per_token, num_params  # noqa: E402
from llm.optim import OPTIMIZERS  # noqa: E402
from llm.train import accumulation_steps, train  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default=str(ROOT / "params.yaml"), help="the pipeline's params (default: params.yaml)")
    p.add_argument("--preset", choices=sorted(PRESETS),
                   help="model preset (default: the params' pretrain.model, with its overrides)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, help="default: the params' pretrain.train.optimizer")
    p.add_argument("--steps", type=int, default=50, help="optimizer updates to run (default: 50)")
    p.add_argument("--warmup", type=int, default=5,
                   help="first updates left out of the median (compilation, allocator warm-up; default: 5)")
    p.add_argument("--batch-size", type=int, help="rows per micro-batch (default: the params' pretrain.train.batch_size)")
    p.add_argument("--seq-len", type=int, default=0, help="tokens per row (default: the model's context_length)")
    p.add_argument("--tokens-per-step", type=int, default=0,
                   help="tokens per update; more than one micro-batch accumulates gradients (default: 0 = one)")
    p.add_argument("--tokens", metavar="FILE", help="a packed token file (the pack stage's train.bin) instead of "
                   "synthetic tokens; the model's vocabulary becomes the file's unless --vocab-size")
    p.add_argument("--vocab-size", type=int, default=0,
                   help="the model's vocabulary, e.g. 50304 (GPT-2's 50257 padded to a multiple of 128); default: "
                        "the params' pretrain.model.vocab_size or tokenizer.vocab_size")
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

    params = load_params(args.params)
    pipeline_train = params.pretrain.train
    if args.preset:
        model_config = ModelConfig.from_preset(args.preset)
    else:
        model_config = params.pretrain.model.build()
        model_config.vocab_size = params.pretrain.model.vocab_size or params.tokenizer.vocab_size
    if args.tokens:
        model_config.vocab_size = read_meta(args.tokens)["vocab_size"]
    if args.vocab_size:
        model_config.vocab_size = args.vocab_size
    seq_len = args.seq_len or model_config.context_length
    batch_size = args.batch_size or pipeline_train.batch_size
    if args.tokens:
        data = TokenDataset(args.tokens, seq_len, batch_size, seed=args.seed)
        if data.meta["vocab_size"] > model_config.vocab_size:
            sys.exit(f"error: {args.tokens} holds ids up to {data.meta['vocab_size'] - 1}; --vocab-size "
                     f"{model_config.vocab_size} is too small")
    else:
        data = SyntheticTokens(model_config.vocab_size, seq_len, batch_size, seed=args.seed)

    # The pipeline's schedule and optimizer settings, shortened to --steps, with no evaluation,
    # checkpoints or samples in the timed loop.
    config = pipeline_train.build(
        warmup_steps=min(pipeline_train.warmup_steps, args.steps), max_steps=args.steps, batch_size=batch_size,
        tokens_per_step=args.tokens_per_step, optimizer=args.optimizer or pipeline_train.optimizer, eval_every=0,
        checkpoint_every=0, keep_checkpoints=1, resume="never", compile=compile_model, device=args.device,
        dtype=args.dtype, threads=args.threads, seed=args.seed, sample_tokens=0, progress=False)
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
    # The reference, in the same process and precision: one matmul of the model's MLP shape.
    dtype = resolve_dtype(args.dtype, device)
    matmul_shape = (batch_size * seq_len, model_config.d_model, 4 * model_config.d_model)
    matmul_rate = matmul_flops(dtype, device, matmul_shape, seconds=1.0)
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
        "preset": args.preset or params.pretrain.model.preset,
        "optimizer": config.optimizer,
        "keep_freed_memory": keep_freed_memory(),
        "parameters": num_params(model),
        "vocab_size": model_config.vocab_size,
        "data": args.tokens or "synthetic",
        "batch_size": batch_size,
        "seq_len": seq_len,
        "accumulation": accumulation_steps(config, seq_len),
        "tokens_per_step": result.tokens_per_step,
        "dtype": str(dtype).removeprefix("torch."),
        "compile": compile_model,
        "steps": args.steps,
        "warmup_steps": args.warmup,
        "tokens_per_s": round(tokens_per_s, 1),
        "tokens_per_s_mean": round(statistics.fmean(measured), 1),
        "tokens_per_s_min": round(min(measured), 1),
        "tokens_per_s_max": round(max(measured), 1),
        "step_ms_median": round(1000 * median_step_s, 2),
        "flops_per_token": flops,
        "matmul_shape": list(matmul_shape),
        "matmul_flops": round(matmul_rate),
        "matmul_fraction": round(tokens_per_s * flops / matmul_rate, 4),
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
