"""Decode speed: our KV-cache `generate` against transformers' `generate`, same weights, one process.

Greedy decoding of --new-tokens tokens at batch 1 and batch 8. The model (the 'tiny' preset with
random weights, or --checkpoint) is exported with llm.hf.export_hf and loaded back twice: by
transformers' AutoModelForCausalLM and by llm.hf.import_hf, so both sides run the very same
weights. Runs alternate between the two (timings on a shared CPU drift a lot) and the medians
are reported as one JSON line:

    {"batch_1": {"ours_tokens_per_s": ..., "hf_tokens_per_s": ..., "ratio": ...}, "batch_8": {...}, ...}

tokens/s counts generated tokens over the wall time of one whole generate call (prompt included).
Both sides load once outside the timing: transformers' model, and our Decoder (which lays the
weights out for decoding). transformers runs with use_cache=True, greedy, and no end-of-sequence
token, so both produce exactly --new-tokens tokens; "tokens_match" says whether they agree.

"matmul_only_tokens_per_s" times nothing but the weight matmuls of the same decoding run (our
decoder's weights, random inputs): no decoder that reads these fp32 weights with these kernels
is faster, so it shows how much of a step is overhead and how much is reading weights.
Both sides run on --threads threads (default 1: on a busy 2-core machine two-thread kernels stall
whenever the other core is taken; try --threads 0, torch's default, on a quiet one).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

# Run as a script from anywhere: make the repository's `llm` package importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from llm.generate import Decoder  # noqa: E402
from llm.hf import export_hf, import_hf  # noqa: E402
from llm.model import GPT, ModelConfig, load_checkpoint, num_params  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", metavar="DIR", help="a checkpoint written by llm.model.save_checkpoint "
                   "(default: the 'tiny' preset with random weights)")
    p.add_argument("--preset", default="tiny", help="model preset when no --checkpoint (default: tiny)")
    p.add_argument("--new-tokens", type=int, default=256, help="tokens to generate per row (default: 256)")
    p.add_argument("--prompt-tokens", type=int, default=1,
                   help="prompt length (default: 1, so 256 new tokens fit the tiny preset's 256-token context)")
    p.add_argument("--batch-sizes", default="1,8", help="comma-separated batch sizes (default: 1,8)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per side and batch size; medians reported (default: 5)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads for both sides (default: 1; 0 = torch's default). On a shared 2-core "
                        "machine two-thread kernels stall whenever the other core is busy, and rates swing 50x")
    p.add_argument("--seed", type=int, default=0, help="seed for the random weights and prompts (default: 0)")
    return p.parse_args(argv)


def build_model(args) -> GPT:
    if args.checkpoint:
        return load_checkpoint(args.checkpoint).eval()
    torch.manual_seed(args.seed)
    return GPT(ModelConfig.from_preset(args.preset)).eval()


def matmul_only(decoder: Decoder, batch: int, steps: int):
    """A decode run that does only the weight matmuls: `steps` times every linear layer and the
    output layer, on random (batch, in) rows."""
    weights = [w for layer in decoder.layers for w in (layer.qkv_w, layer.proj_w, layer.fc_w, layer.out_w)]
    weights.append(decoder.lm_head)
    rows = {w.shape[0]: torch.randn(batch, w.shape[0], dtype=w.dtype) for w in weights}

    def run():
        with torch.inference_mode():
            for _ in range(steps):
                for w in weights:
                    torch.mm(rows[w.shape[0]], w)
    return run


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    model = build_model(args)
    config = model.config
    if args.prompt_tokens + args.new_tokens > config.context_length + 1:
        sys.exit(f"--prompt-tokens + --new-tokens must be <= context_length + 1 = {config.context_length + 1}")

    with tempfile.TemporaryDirectory() as folder:
        export_hf(model, folder)
        hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        ours = Decoder(import_hf(folder).eval())
    # No end-of-sequence token: transformers must produce exactly new_tokens tokens, as we do.
    hf_model.generation_config.eos_token_id = None
    hf_model.generation_config.pad_token_id = 0

    generator = torch.Generator().manual_seed(args.seed)
    report = {"model": args.checkpoint or args.preset, "params": num_params(model),
              "new_tokens": args.new_tokens, "prompt_tokens": args.prompt_tokens,
              "repeats": args.repeats, "threads": torch.get_num_threads(),
              "torch": torch.__version__, "transformers": transformers.__version__}
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        prompts = torch.randint(0, config.vocab_size, (batch, args.prompt_tokens), generator=generator)

        def run_ours():
            return [c.tokens for c in ours.generate(prompts, args.new_tokens)]

        def run_hf():
            with torch.inference_mode():
                out = hf_model.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                                        use_cache=True, max_new_tokens=args.new_tokens)
            return out[:, args.prompt_tokens:].tolist()

        run_floor = matmul_only(ours, batch, args.new_tokens)
        ours_tokens, hf_tokens = run_ours(), run_hf()  # warm-up, and the outputs to compare
        run_floor()
        assert all(len(t) == args.new_tokens for t in ours_tokens + hf_tokens), "a side stopped early"
        times = {"ours": [], "hf": [], "floor": []}
        for _ in range(args.repeats):  # interleaved: all see the same machine weather
            times["ours"].append(timed(run_ours)[0])
            times["hf"].append(timed(run_hf)[0])
            times["floor"].append(timed(run_floor)[0])
        rate = {side: batch * args.new_tokens / statistics.median(t) for side, t in times.items()}
        report[f"batch_{batch}"] = {
            "ours_tokens_per_s": round(rate["ours"], 1), "hf_tokens_per_s": round(rate["hf"], 1),
            "ratio": round(rate["ours"] / rate["hf"], 2),
            "matmul_only_tokens_per_s": round(rate["floor"], 1),
            "tokens_match": ours_tokens == hf_tokens,
        }
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
