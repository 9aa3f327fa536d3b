"""What the training snapshots cost (llm/snapshots.py): seconds against the training they record,
and megabytes on disk, at the pretrain stage's default shape.

Runs a few updates of the real loop (llm.train.train) on synthetic tokens to time a step, then
takes the `keep` snapshots a run of --max-steps with evaluations every --eval-every would keep
(the weights of the model as it is; what a snapshot costs does not depend on what it learned),
and prints one JSON line:

    {"bench": "snapshots", "step_s": ..., "snapshot_s": [...], "snapshots_s": ..., "run_s": ...,
     "share_of_training_pct": ..., "disk_mb": ..., "records_mb": ..., "weights_mb_each": ...}

share_of_training_pct: all snapshots' seconds / (max_steps x the median step), the training alone
(evaluations, samples and checkpoints not counted, so the share of the whole stage is smaller).

    .venv/bin/python bench/snapshots.py                    # params.yaml's defaults: tiny, B16 x T256, 600 steps, keep 4
    .venv/bin/python bench/snapshots.py --keep 7 --tokens 64
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.report import context, emit  # noqa: E402
from llm.data import write_token_file  # noqa: E402
from llm.device import resolve_device  # noqa: E402
from llm.model import GPT, PRESETS, ModelConfig, num_params  # noqa: E402
from llm.snapshots import Probe, SnapshotConfig, Snapshots, chosen_steps  # noqa: E402
from llm.train import TrainConfig, evaluation_steps, load_datasets, train  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="model preset (default: tiny)")
    p.add_argument("--batch-size", type=int, default=16, help="rows per update (default: 16)")
    p.add_argument("--steps", type=int, default=6, help="updates timed; the first is left out (default: 6)")
    p.add_argument("--max-steps", type=int, default=600, help="the run the snapshots belong to (default: 600)")
    p.add_argument("--eval-every", type=int, default=100, help="its evaluation interval (default: 100)")
    p.add_argument("--keep", type=int, default=SnapshotConfig.keep, help="snapshots kept (default: %(default)s)")
    p.add_argument("--tokens", type=int, default=SnapshotConfig.tokens, help="tokens recorded per probe "
                                                                             "(default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, mps (default: auto)")
    p.add_argument("--out", help="also save the JSON here")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = resolve_device(args.device)
    config = ModelConfig.from_preset(args.preset)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rng = np.random.default_rng(0)
        for split in ("train", "val"):
            documents = [rng.integers(1, config.vocab_size, 5000) for _ in range(40)]
            write_token_file(tmp / f"{split}.bin", documents, vocab_size=config.vocab_size, boundary_id=0,
                             tokenizer_fingerprint="f" * 64)
        timing = TrainConfig(max_steps=args.steps, warmup_steps=1, batch_size=args.batch_size, eval_every=0,
                             checkpoint_every=0, sample_tokens=0, device=args.device, progress=False)
        train_data, val_data = load_datasets(tmp / "train.bin", tmp / "val.bin", config.context_length, timing)
        torch.manual_seed(0)
        model = GPT(config)
        result = train(model, train_data, None, timing, tmp / "run")
        step_s = statistics.median(seconds for _, seconds in result.history["step_s"][1:])

        run = TrainConfig(max_steps=args.max_steps, eval_every=args.eval_every)
        steps = chosen_steps(evaluation_steps(run), args.keep)
        settings = SnapshotConfig(keep=args.keep, tokens=args.tokens)
        probes = [Probe("probe text", train_data.batch(1)[0][0].tolist()),
                  Probe("training row", train_data.batch(0)[0][0].tolist())]
        snapshots = Snapshots(tmp / "snapshots", settings, steps, probes, str)
        seconds = []
        for step in steps:
            began = time.perf_counter()
            snapshots.take(model, step, 1.0)
            seconds.append(time.perf_counter() - began)
        files = [f for f in (tmp / "snapshots").rglob("*") if f.is_file()]
        mb = lambda paths: sum(f.stat().st_size for f in paths) / 2**20  # noqa: E731
        records = [f for f in files if f.name == "record.json"]
        report = {
            **context("snapshots", device, "bench/snapshots.py", argv),
            "preset": args.preset, "parameters": num_params(model), "batch_size": args.batch_size,
            "max_steps": args.max_steps, "steps_kept": steps, "tokens": args.tokens,
            "step_s": round(step_s, 4), "snapshot_s": [round(s, 4) for s in seconds],
            "snapshots_s": round(sum(seconds), 3), "run_s": round(args.max_steps * step_s, 1),
            "share_of_training_pct": round(100 * sum(seconds) / (args.max_steps * step_s), 4),
            "disk_mb": round(mb(files), 2), "records_mb": round(mb(records), 2),
            "weights_mb_each": round((mb(files) - mb(records)) / max(len(steps), 1), 2),
        }
    emit(report, args.out)
    return report


if __name__ == "__main__":
    main()
