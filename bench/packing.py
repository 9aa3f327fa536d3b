"""Padding against packing: waste and useful training tokens/s of a small model on CPU, one process.

Variable-length examples (20..256 tokens) are laid out two ways with llm.data:

* padded: `pad_examples`, one example per row, each batch padded to its longest example, plain
  causal attention (the usual way);
* packed: `pack_examples`, examples binned whole into rows of exactly --seq-len, with document ids
  so attention stays inside each example and positions restart at 0 (block-diagonal causal mask).

Two copies of the same model (the 'tiny' preset unless changed; same initial weights, each with its
own AdamW) then train --steps steps each, one step of one and one of the other in turn (which goes
first alternates), so load on a shared machine hits both alike. Both use --batch-size rows a step.
"Useful tokens" are trained target tokens, never padding; a step's rate is its useful tokens over
its wall time (forward, backward, optimizer step). Medians of the per-step rates are reported;
speedup is the median over adjacent (packed, padded) step pairs of their rate ratio.

Before training, the script asserts that masking is right: on the same examples, with the same
weights, the mean loss over all trained targets is the same padded and packed (within --loss-tol).
The same packed rows without document ids (attention leaking across examples) are reported too.

Examples: the Alpaca records of the download stage (data/download/sources, role 'instruct') in the
chat format of llm/chat.py, encoded with the trained tokenizer (data/tokenizer/model), keeping
those of 20..seq_len+1 tokens; or, when those are missing or with --examples random, random
token ids with lengths uniform in 20..seq_len+1.

One JSON line: {"bench": "packing", "padded_waste_pct", "packed_waste_pct",
"padded_useful_tokens_per_s", "packed_useful_tokens_per_s", "speedup", ...}.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

# Run as a script from anywhere: make the repository's `llm` package importable.
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from llm.data import Rows, pack_examples, pad_examples  # noqa: E402
from llm.model import GPT, IGNORE_INDEX, ModelConfig, num_params  # noqa: E402

MIN_TOKENS = 20


# --- examples ---------------------------------------------------------------------------------------

def alpaca_examples(sources_dir: Path, tokenizer_dir: Path, max_tokens: int, loss_on: str):
    """(examples, vocab_size, description), or None when the data or tokenizer is missing."""
    from llm.sources import iter_documents
    from llm.tokenizer import load_tokenizer
    try:
        from llm.chat import encode_example
    except ImportError:
        return None
    if not (tokenizer_dir / "tokenizer.json").is_file() or not sources_dir.is_dir():
        return None
    records = list(iter_documents(sources_dir, "instruct"))
    if not records:
        return None
    tokenizer = load_tokenizer(tokenizer_dir)
    examples = []
    for r in records:
        ids, mask = encode_example(tokenizer, r["instruction"], r.get("input") or "", r["output"])
        if MIN_TOKENS <= len(ids) <= max_tokens:
            examples.append((ids, mask if loss_on == "response" else [True] * len(ids)))
    return examples, tokenizer.vocab_size, f"alpaca ({len(examples)} of {len(records)} records in length range)"


def random_examples(n: int, max_tokens: int, vocab_size: int, seed: int):
    rng = random.Random(seed)
    examples = []
    for _ in range(n):
        length = rng.randint(MIN_TOKENS, max_tokens)
        examples.append(([rng.randrange(vocab_size) for _ in range(length)], [True] * length))
    return examples, vocab_size, f"random ({n} examples, lengths uniform {MIN_TOKENS}..{max_tokens})"


# --- batches ----------------------------------------------------------------------------------------

def row_batches(rows: Rows, batch_size: int, seed: int) -> list[Rows]:
    """Packed rows in a seeded order (best-fit puts the longest examples first), cut into batches."""
    order = torch.randperm(len(rows.inputs), generator=torch.Generator().manual_seed(seed))
    batches = []
    for start in range(0, len(order), batch_size):
        index = order[start:start + batch_size]
        batches.append(Rows(rows.inputs[index], rows.targets[index], rows.doc_ids[index]))
    return batches


def useful(batch: Rows) -> int:
    return int((batch.targets != IGNORE_INDEX).sum())


def loss_sum(model: GPT, batch: Rows, masked: bool) -> tuple[float, int]:
    """Summed cross-entropy over the trained targets, and their count."""
    out = model(batch.inputs, batch.targets, batch.doc_ids if masked else None)
    n = useful(batch)
    return float(out.loss) * n, n


@torch.no_grad()
def mean_loss(model: GPT, batches: list[Rows], masked: bool) -> tuple[float, int]:
    total, count = 0.0, 0
    for batch in batches:
        s, n = loss_sum(model, batch, masked)
        total, count = total + s, count + n
    return total / count, count


# --- main -------------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] + " Prints one JSON line; see the module docstring.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--examples", choices=("auto", "alpaca", "random"), default="auto",
                        help="auto: alpaca when downloaded and a tokenizer exists, else random")
    parser.add_argument("--sources-dir", type=Path, default=ROOT / "data/download/sources",
                        help="download stage output (its role-'instruct' records are the examples)")
    parser.add_argument("--tokenizer", type=Path, default=ROOT / "data/tokenizer/model",
                        help="tokenizer folder used to encode the alpaca examples")
    parser.add_argument("--loss-on", choices=("all", "response"), default="all",
                        help="alpaca: train on every token, or on the response only (as fine-tuning does)")
    parser.add_argument("--num-random", type=int, default=1000, help="examples with --examples random")
    parser.add_argument("--seq-len", type=int, default=256, help="row length; examples have 20..seq_len+1 tokens")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per step, both layouts")
    parser.add_argument("--steps", type=int, default=6, help="timed training steps of each layout")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps of each layout first")
    parser.add_argument("--preset", default="tiny", help="model preset (llm/model.py)")
    parser.add_argument("--n-layer", type=int, default=None, help="override the preset's layers")
    parser.add_argument("--d-model", type=int, default=None, help="override the preset's width")
    parser.add_argument("--n-head", type=int, default=None, help="override the preset's heads")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch.set_num_threads")
    parser.add_argument("--check-examples", type=int, default=48,
                        help="examples in the step-0 loss check (padded vs packed)")
    parser.add_argument("--loss-tol", type=float, default=1e-4, help="allowed |padded - packed| mean loss")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if min(args.steps, args.batch_size, args.seq_len - MIN_TOKENS + 2, args.check_examples) < 1:
        parser.error("--steps, --batch-size and --check-examples must be >= 1; --seq-len >= 19")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    max_tokens = args.seq_len + 1          # n tokens fill n - 1 positions (inputs ids[:-1])

    loaded = None
    if args.examples in ("auto", "alpaca"):
        loaded = alpaca_examples(args.sources_dir, args.tokenizer, max_tokens, args.loss_on)
        if loaded is None and args.examples == "alpaca":
            sys.exit(f"no alpaca examples: need {args.sources_dir}/*/ (role instruct) and {args.tokenizer}")
    if loaded is None:
        loaded = random_examples(args.num_random, max_tokens, 8192, args.seed)
    examples, vocab_size, source = loaded

    start = time.perf_counter()
    packed_rows, packed_report = pack_examples(examples, args.seq_len, too_long="drop")
    pack_seconds = time.perf_counter() - start
    padded_batches, padded_report = pad_examples(examples, args.seq_len, args.batch_size, too_long="drop")
    packed_batches = row_batches(packed_rows, args.batch_size, args.seed)
    assert packed_report.trained_targets == padded_report.trained_targets

    overrides = {k: v for k, v in (("n_layer", args.n_layer), ("d_model", args.d_model),
                                   ("n_head", args.n_head)) if v is not None}
    config = ModelConfig.from_preset(args.preset, vocab_size=vocab_size, context_length=args.seq_len,
                                     dropout=0.0, **overrides)
    model_padded = GPT(config)
    model_packed = copy.deepcopy(model_padded)      # the same initial weights

    # --- sanity check of the masking: same examples, same weights, same loss ---
    model_padded.eval()
    check = examples[:args.check_examples]
    check_padded, _ = pad_examples(check, args.seq_len, args.batch_size, too_long="drop")
    check_packed, _ = pack_examples(check, args.seq_len, too_long="drop")
    check_packed = row_batches(check_packed, args.batch_size, args.seed)
    loss_padded, n_padded = mean_loss(model_padded, check_padded, masked=False)
    loss_packed, n_packed = mean_loss(model_padded, check_packed, masked=True)
    loss_unmasked, _ = mean_loss(model_padded, check_packed, masked=False)
    assert n_padded == n_packed, (n_padded, n_packed)
    assert abs(loss_padded - loss_packed) <= args.loss_tol, (
        f"step-0 loss differs: padded {loss_padded:.6f} vs packed {loss_packed:.6f} "
        f"(tolerance {args.loss_tol}): document masking is broken")
    model_padded.train()

    # --- interleaved training ---
    runs = {
        "padded": dict(model=model_padded, batches=padded_batches, masked=False),
        "packed": dict(model=model_packed, batches=packed_batches, masked=True),
    }
    for run in runs.values():
        run["opt"] = torch.optim.AdamW(run["model"].parameters(), lr=args.lr, weight_decay=0.1)
        run.update(rates=[], seconds=[], useful=[], positions=[], examples=[], losses=[])

    def step(run: dict, i: int) -> None:
        batch = run["batches"][i % len(run["batches"])]
        start = time.perf_counter()
        loss = run["model"](batch.inputs, batch.targets, batch.doc_ids if run["masked"] else None).loss
        run["opt"].zero_grad(set_to_none=True)
        loss.backward()
        run["opt"].step()
        seconds = time.perf_counter() - start
        if i >= args.warmup:
            n = useful(batch)
            run["seconds"].append(seconds)
            run["useful"].append(n)
            run["positions"].append(batch.inputs.numel())
            run["rates"].append(n / seconds)
            # examples in this batch: distinct (row, document id) pairs, padding excluded
            docs = batch.doc_ids + batch.doc_ids.size(1) * torch.arange(len(batch.doc_ids))[:, None]
            run["examples"].append(int(docs[batch.doc_ids >= 0].unique().numel()))
            run["losses"].append(float(loss.detach()))

    for i in range(args.warmup + args.steps):
        for name in (("packed", "padded") if i % 2 == 0 else ("padded", "packed")):
            step(runs[name], i)

    pad, pk = runs["padded"], runs["packed"]
    med = statistics.median
    pair_ratios = [a / b for a, b in zip(pk["rates"], pad["rates"])]
    result = {
        "bench": "packing",
        "padded_waste_pct": round(100 * padded_report.padding_waste, 2),
        "packed_waste_pct": round(100 * packed_report.padding_waste, 2),
        "padded_useful_tokens_per_s": round(med(pad["rates"]), 1),
        "packed_useful_tokens_per_s": round(med(pk["rates"]), 1),
        "speedup": round(med(pair_ratios), 3),
        "speedup_of_medians": round(med(pk["rates"]) / med(pad["rates"]), 3),
        "speedup_of_totals": round((sum(pk["useful"]) / sum(pk["seconds"]))
                                   / (sum(pad["useful"]) / sum(pad["seconds"])), 3),
        # what the speed-up would be if a step cost the same per position (padding included):
        # the load-independent reference for the three measured summaries above
        "speedup_if_cost_per_position": round((sum(pk["useful"]) / sum(pk["positions"]))
                                              / (sum(pad["useful"]) / sum(pad["positions"])), 3),
        "padded_step_s": round(med(pad["seconds"]), 3),
        "packed_step_s": round(med(pk["seconds"]), 3),
        "padded_useful_per_step": round(statistics.mean(pad["useful"]), 1),
        "packed_useful_per_step": round(statistics.mean(pk["useful"]), 1),
        "padded_examples_per_s": round(sum(pad["examples"]) / sum(pad["seconds"]), 2),
        "packed_examples_per_s": round(sum(pk["examples"]) / sum(pk["seconds"]), 2),
        "loss_check": {"padded": round(loss_padded, 6), "packed": round(loss_packed, 6),
                       "abs_diff": float(f"{abs(loss_padded - loss_packed):.3g}"), "tol": args.loss_tol,
                       "packed_without_doc_ids": round(loss_unmasked, 6), "examples": len(check),
                       "targets": n_packed},
        "final_loss": {"padded": round(pad["losses"][-1], 4), "packed": round(pk["losses"][-1], 4)},
        "steps": args.steps,
        "warmup": args.warmup,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "examples": packed_report.examples,
        "example_source": source,
        "loss_on": args.loss_on if source.startswith("alpaca") else "all",
        "padded_rows": padded_report.rows,
        "packed_rows": packed_report.rows,
        "pack_seconds": round(pack_seconds, 3),
        "model": {"preset": args.preset, "n_layer": config.n_layer, "d_model": config.d_model,
                  "n_head": config.n_head, "vocab_size": config.vocab_size,
                  "params": num_params(model_packed)},
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "padded_rates": [round(r) for r in pad["rates"]],
        "packed_rates": [round(r) for r in pk["rates"]],
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
