"""Decode speed: our KV-cache `generate` against transformers' `generate`, same weights, one process.

Greedy decoding of --new-tokens tokens at each of --batch-sizes. The model (the 'tiny' preset
with random weights, --preset, or --checkpoint) is exported with llm.hf.export_hf and loaded back
twice: by transformers' AutoModelForCausalLM and by llm.hf.import_hf, so both sides run the very
same weights, on the same device in the same dtype. The sides take turns (timings on a shared
machine drift a lot) and the medians are reported as one JSON line:

    {"bench": "decode", ..., "batch_1": {"ours_tokens_per_s": ..., "hf_tokens_per_s": ..., "ratio": ...},
     "batch_64": {...}}

Sides: "ours" is llm.generate's Engine (the model's own forward pass with a KVCache, weights
in their decoding layout) as the pipeline, the server and the tests use it; "hf" is
transformers' generate with use_cache=True, greedy, and no end-of-sequence token, so every side
produces exactly --new-tokens tokens. ratio = ours / hf.

tokens/s counts generated tokens over the wall time of one whole generate call (prompt
included; the call ends by reading the tokens back, so GPU work is finished); cpu_us_per_token
is the process's CPU time over the same calls, per token (on a busy shared CPU it drifts less
than the wall time). Loading and the
first call of each side (kernel selection and autotuning, caches warming) stay outside the
timing: "first_call_s" reports them. "tokens_match" says whether a side produced hf's tokens;
in bfloat16 two correct implementations may part ways after a near-tie, so read it as a check
on float32 runs.

"matmul_only_tokens_per_s" times nothing but the weight matmuls of the same decoding run (the
linear layers in their decoding layout, random inputs): no decoder that reads these weights with
these kernels and launches them one by one is faster, so it shows how much of a step is overhead.

    .venv/bin/python bench/decode.py                           # CPU: tiny, batch 1 and 8, float32
    .venv/bin/python bench/decode.py --preset gpt2-124m --prompt-tokens 16 \\
        --out bench/results/h100-decode-gpt2-124m-$(date +%Y%m%d).json   # GPU: batch 1 and 64, bf16

--baseline FILE adds the decoder of another tree's llm/generate.py (its Engine, or the older
Decoder) on the same weights and this tree's llm.model, as side "baseline", for a before/after
of a change in one run (the sides take turns, so both see the same machine):

    git -C . show 8896b31:llm/generate.py > /tmp/generate_before.py
    .venv/bin/python bench/decode.py --repeats 3 --new-tokens 128 --baseline /tmp/generate_before.py

On a CPU both sides run on --threads threads (default 1: on a busy 2-core machine two-thread
kernels stall whenever the other core is taken; try --threads 0, torch's default, on a quiet one).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

# Run as a script from anywhere: make the repository's packages importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from bench.report import context, emit  # noqa: E402
from llm.checkpoint import load_checkpoint  # noqa: E402
from llm.device import resolve_device  # noqa: E402
from llm.generate import Engine  # noqa: E402
from llm.hf import export_hf, import_hf  # noqa: E402
from llm.model import GPT, ModelConfig, num_params  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", metavar="DIR", help="a checkpoint written by llm.checkpoint.save_checkpoint "
                   "(default: --preset with random weights)")
    p.add_argument("--preset", default="tiny", help="model preset when no --checkpoint (default: tiny)")
    p.add_argument("--new-tokens", type=int, default=256, help="tokens to generate per row (default: 256)")
    p.add_argument("--prompt-tokens", type=int, default=1,
                   help="prompt length (default: 1, so 256 new tokens fit the tiny preset's 256-token context)")
    p.add_argument("--batch-sizes", default="",
                   help="comma-separated batch sizes (default: 1,64 on CUDA, 1,8 elsewhere)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per side and batch size; medians reported (default: 5)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="weights' dtype on both sides (default: bfloat16 on CUDA, float32 elsewhere)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads for both sides (default: 1; 0 = torch's default). On a shared 2-core "
                        "machine two-thread kernels stall whenever the other core is busy, and rates swing 50x")
    p.add_argument("--seed", type=int, default=0, help="seed for the random weights and prompts (default: 0)")
    p.add_argument("--baseline", metavar="FILE", help="another tree's llm/generate.py, timed as side 'baseline'")
    p.add_argument("--out", metavar="FILE", help="also write the JSON to FILE (e.g. bench/results/NAME.json)")
    return p.parse_args(argv)


def build_model(args) -> GPT:
    if args.checkpoint:
        return load_checkpoint(args.checkpoint).eval()
    torch.manual_seed(args.seed)
    return GPT(ModelConfig.from_preset(args.preset)).eval()


def matmul_only(engine: Engine, batch: int, steps: int):
    """A decode run that does only the weight matmuls: `steps` times every linear layer and the
    output layer, on random (batch, 1, in) rows (one new token per row, as the model passes them),
    through the layers' own decoding kernels."""
    layers = [m for m in engine.model.modules() if hasattr(m, "packed")]   # the DecodingLinears
    rows = {layer.weight.shape[1]: torch.randn(batch, 1, layer.weight.shape[1], dtype=layer.weight.dtype,
                                               device=layer.weight.device) for layer in layers}

    def run():
        with torch.inference_mode():
            for _ in range(steps):
                for layer in layers:
                    layer(rows[layer.weight.shape[1]])
        if engine.device.type == "cuda":
            torch.cuda.synchronize()
    return run


def load_baseline(path: str, model: GPT):
    """The decoder of another tree's generate.py (imported under its own name, against this tree's
    llm.model): its Engine, or the Decoder of the trees before it."""
    if not Path(path).is_file():
        sys.exit(f"--baseline {path}: no such file (a generate.py, e.g. from `git show REV:llm/generate.py`)")
    spec = importlib.util.spec_from_file_location("baseline_generate", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    decoder = getattr(module, "Engine", None) or getattr(module, "Decoder", None)
    if decoder is None:
        sys.exit(f"--baseline {path}: has neither an Engine nor a Decoder")
    return decoder(model)


def timed(fn):
    start, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return time.perf_counter() - start, result, time.process_time() - cpu


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(
        args.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)
    batch_sizes = [int(b) for b in (args.batch_sizes or ("1,64" if device.type == "cuda" else "1,8")).split(",")]
    model = build_model(args)
    config = model.config
    if args.prompt_tokens + args.new_tokens > config.context_length + 1:
        sys.exit(f"--prompt-tokens + --new-tokens must be <= context_length + 1 = {config.context_length + 1}")

    with tempfile.TemporaryDirectory() as folder:
        export_hf(model, folder)
        hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
        ours_model = import_hf(folder).to(device=device, dtype=dtype).eval()
    # No end-of-sequence token: transformers must produce exactly new_tokens tokens, as we do.
    hf_model.generation_config.eos_token_id = None
    hf_model.generation_config.pad_token_id = 0
    decoders = {"ours": Engine(ours_model)}
    if args.baseline:
        decoders["baseline"] = load_baseline(args.baseline, ours_model)

    generator = torch.Generator().manual_seed(args.seed)
    report = {**context("decode", device, "bench/decode.py", argv),
              "model": args.checkpoint or args.preset, "params": num_params(model),
              "dtype": str(dtype).removeprefix("torch."), "new_tokens": args.new_tokens,
              "prompt_tokens": args.prompt_tokens, "repeats": args.repeats, "threads": torch.get_num_threads(),
              "transformers": transformers.__version__}
    for batch in batch_sizes:
        prompts = torch.randint(0, config.vocab_size, (batch, args.prompt_tokens), generator=generator).to(device)
        runs = {side: (lambda d=decoder, prompts=prompts: [c.tokens for c in d.generate(prompts, args.new_tokens)])
                for side, decoder in decoders.items()}

        def run_hf(prompts=prompts):
            with torch.inference_mode():
                out = hf_model.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                                        use_cache=True, max_new_tokens=args.new_tokens)
            return out[:, args.prompt_tokens:].tolist()

        runs["hf"] = run_hf
        runs["floor"] = matmul_only(decoders["ours"], batch, args.new_tokens)
        first = {side: timed(run) for side, run in runs.items()}  # warm-up, and the outputs to compare
        hf_tokens = first["hf"][1]
        times = {side: [] for side in runs}
        cpu = {side: [] for side in runs}
        for _ in range(args.repeats):  # interleaved: every side sees the same machine weather
            for side, run in runs.items():
                wall, _, cpu_s = timed(run)
                times[side].append(wall)
                cpu[side].append(cpu_s)
        rate = {side: batch * args.new_tokens / statistics.median(t) for side, t in times.items()}
        row = {f"{side}_tokens_per_s": round(rate[side], 1) for side in decoders}
        row["hf_tokens_per_s"] = round(rate["hf"], 1)
        row["ratio"] = round(rate["ours"] / rate["hf"], 2)
        if args.baseline:
            row["baseline_ratio"] = round(rate["baseline"] / rate["hf"], 2)
        row["cpu_us_per_token"] = {side: round(1e6 * statistics.median(cpu[side]) / (batch * args.new_tokens), 1)
                                   for side in (*decoders, "hf")}
        row["matmul_only_tokens_per_s"] = round(rate["floor"], 1)
        row["first_call_s"] = {side: round(first[side][0], 3) for side in (*decoders, "hf")}
        row["tokens_match"] = {side: first[side][1] == hf_tokens for side in decoders}
        assert all(len(t) == args.new_tokens for side in (*decoders, "hf") for t in first[side][1]), \
            "a side stopped early"
        report[f"batch_{batch}"] = row
    emit(report, args.out)
    return report


if __name__ == "__main__":
    main()
