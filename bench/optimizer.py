"""AdamW against Muon on the pretrain stage's own setup: validation loss per step and per second.

Trains the model of params.yaml's `pretrain` section on the pack stage's tokens, with the very
training loop and settings the stage uses, once per optimizer in --optimizers (same initial
weights, same batches, same schedule; only `train.optimizer` differs), and prints one JSON line:

    {"bench": "optimizer", ..., "runs": {"adamw": {"val_loss": ..., "val_curve": [[step, loss], ...],
     "train_s": ..., "tokens_per_s": ...}, "muon": {...}}, "val_loss_difference": ...}

val_loss is the final evaluation's (train.eval_steps batches of the validation tokens);
val_curve has every evaluation; train_s sums the updates' own times (evaluation excluded), so
'loss per second' compares like with like. The runs go one after the other in one process:
run it on an otherwise idle machine. Needs data/pack/tokens and data/tokenizer/model (`make run`
or `dvc repro pack`).

    .venv/bin/python bench/optimizer.py                        # the stage's 600 steps, twice: the long run
    .venv/bin/python bench/optimizer.py --steps 200 --out bench/results/cpu-optimizer.json
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

# Run as a script from anywhere: make the repository's packages importable.
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.report import context, emit  # noqa: E402
from flows.params import load_params  # noqa: E402
from llm.data import TokenDataset  # noqa: E402
from llm.device import resolve_device  # noqa: E402
from llm.model import GPT, num_params  # noqa: E402
from llm.optim import OPTIMIZERS  # noqa: E402
from llm.tokenizer import load_tokenizer  # noqa: E402
from llm.train import train  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default=str(ROOT / "params.yaml"), help="params file (default: params.yaml)")
    p.add_argument("--tokens", default=str(ROOT / "data/pack/tokens"), help="the pack stage's token folder")
    p.add_argument("--tokenizer", default=str(ROOT / "data/tokenizer/model"), help="the tokenizer stage's model")
    p.add_argument("--optimizers", default="adamw,muon", help=f"comma-separated, of {', '.join(OPTIMIZERS)}")
    p.add_argument("--steps", type=int, default=0, help="optimizer updates per run (default: the params' max_steps)")
    p.add_argument("--out", metavar="FILE", help="also write the JSON to FILE")
    args = p.parse_args(argv)
    unknown = set(args.optimizers.split(",")) - set(OPTIMIZERS)
    if unknown:
        p.error(f"unknown optimizer(s) {sorted(unknown)}; choose from {', '.join(OPTIMIZERS)}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    p = load_params(args.params).pretrain
    tokenizer = load_tokenizer(args.tokenizer)
    model_config = p.model.build()
    model_config.vocab_size = p.model.vocab_size or tokenizer.vocab_size   # as the pretrain stage does
    changes = dict(progress=False, resume="never", checkpoint_every=0, sample_tokens=0)
    if args.steps:
        changes.update(max_steps=args.steps, eval_every=min(p.train.eval_every, args.steps),
                       warmup_steps=min(p.train.warmup_steps, args.steps))
    base = p.train.build(**changes)
    data = dict(seq_len=model_config.context_length, batch_size=base.batch_size, with_doc_ids=base.doc_masking,
                expected_fingerprint=tokenizer.fingerprint())
    tokens = Path(args.tokens)

    runs = {}
    for name in args.optimizers.split(","):
        config = dataclasses.replace(base, optimizer=name)
        torch.manual_seed(config.seed)                     # the same initial weights for every run
        model = GPT(model_config)
        train_data = TokenDataset(tokens / "train.bin", seed=config.seed, **data)
        val_data = TokenDataset(tokens / "val.bin", seed=config.seed + 1, **data)
        with tempfile.TemporaryDirectory(prefix="bench-optimizer-") as out_dir:
            result = train(model, train_data, val_data, config, out_dir)
        train_s = sum(seconds for _, seconds in result.history["step_s"])
        runs[name] = {"val_loss": round(result.val_loss, 4), "train_loss": round(result.train_loss, 4),
                      "val_curve": [[step, round(loss, 4)] for step, loss in result.history["val_loss"]],
                      "train_s": round(train_s, 1), "tokens_per_s": round(result.tokens_per_s, 1)}
        print(f"{name}: val loss {result.val_loss:.4f} after {config.max_steps} steps, {train_s:.0f} s of updates",
              file=sys.stderr)

    device = resolve_device(base.device)
    report = {**context("optimizer", device, "bench/optimizer.py", argv),
              "preset": p.model.preset, "parameters": num_params(model), "steps": base.max_steps,
              "lr": base.lr, "tokens_per_step": result.tokens_per_step, "runs": runs}
    if {"adamw", "muon"} <= set(runs):
        report["val_loss_difference"] = round(runs["muon"]["val_loss"] - runs["adamw"]["val_loss"], 4)
    emit(report, args.out)
    return report


if __name__ == "__main__":
    main()
