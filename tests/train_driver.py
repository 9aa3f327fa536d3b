"""A tiny pretraining run, as a program, so a test can SIGKILL it and run it again.

    python tests/train_driver.py DATA_DIR OUT_DIR RESULT_JSON [--step-sleep S] [--max-steps N]
                                 [--checkpoint-every K]

Trains a 2-layer, width-64 GPT on DATA_DIR/train.bin (written by make_token_files) with
dropout, document masking, gradient accumulation, evaluations and random samples: everything
that draws on RNG or data state, so exact resume is tested for all of it. When training
completes it writes RESULT_JSON with every loss as float.hex (bitwise comparisons).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from llm.data import write_token_file
from llm.model import GPT, ModelConfig
from llm.train import TrainConfig, load_datasets, train

VOCAB, BOUNDARY, CONTEXT = 64, 0, 32


def tiny_model_config(**overrides) -> ModelConfig:
    return ModelConfig(**{**dict(vocab_size=VOCAB, context_length=CONTEXT, n_layer=2, n_head=2, d_model=64),
                          **overrides})


def make_token_files(data_dir: Path, seed: int = 0) -> None:
    """train.bin / val.bin of learnable documents: arithmetic sequences of token ids, so the loss
    really falls and a resumed run has something to get wrong."""
    rng = np.random.default_rng(seed)

    def document():
        start, stride, length = rng.integers(1, VOCAB), rng.integers(1, 5), rng.integers(8, 60)
        return 1 + (start + stride * np.arange(length)) % (VOCAB - 1)

    for split, count in (("train", 400), ("val", 60)):
        write_token_file(data_dir / f"{split}.bin", [document() for _ in range(count)], vocab_size=VOCAB,
                         boundary_id=BOUNDARY, tokenizer_fingerprint="f" * 64)


def random_sample(model: torch.nn.Module, prompt: str, max_new_tokens: int) -> str:
    """A stand-in for generation that draws from the torch RNG, as real sampling does."""
    logits = model(torch.zeros(1, 4, dtype=torch.long)).logits[0, -1]
    ids = torch.multinomial(torch.softmax(logits, dim=-1), max_new_tokens, replacement=True)
    return prompt + " ".join(str(i) for i in ids.tolist())


def driver_config(max_steps: int, checkpoint_every: int) -> TrainConfig:
    return TrainConfig(lr=3e-3, min_lr=3e-4, warmup_steps=5, max_steps=max_steps, batch_size=4,
                       tokens_per_step=2 * 4 * CONTEXT, eval_every=5, eval_steps=2, checkpoint_every=checkpoint_every,
                       keep_checkpoints=2, sample_tokens=8, doc_masking=True, threads=1, seed=7,
                       progress=False)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("result", type=Path)
    parser.add_argument("--step-sleep", type=float, default=0.0)
    parser.add_argument("--max-steps", type=int, default=30)
    parser.add_argument("--checkpoint-every", type=int, default=5)
    args = parser.parse_args()

    config = driver_config(args.max_steps, args.checkpoint_every)
    torch.manual_seed(0)   # the initial weights; a resumed run overwrites them from the checkpoint
    model = GPT(tiny_model_config(dropout=0.1))
    train_data, val_data = load_datasets(args.data_dir / "train.bin", args.data_dir / "val.bin", CONTEXT, config)
    # Slows the run so the test can kill it mid-way; it changes no number.
    on_step = (lambda step, metrics: time.sleep(args.step_sleep)) if args.step_sleep else None
    result = train(model, train_data, val_data, config, args.out_dir, on_step=on_step, sample_fn=random_sample)
    args.result.write_text(json.dumps({
        "resumed_from": result.resumed_from,
        "train_loss": [float(v).hex() for _, v in result.history["train_loss"]],
        "val_loss": [float(v).hex() for _, v in result.history["val_loss"]],
        "sample": result.history["sample"],
    }))


if __name__ == "__main__":
    main()
