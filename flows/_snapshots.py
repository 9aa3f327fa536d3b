"""What the training stages share about snapshots (llm.snapshots): who takes them, taking one
with its MLflow metrics and log line, and what the model folder carries of them.

Pretrain and instruct each take theirs at step 0 and at evenly spaced evaluations, on the same
two probes: the `probe_text` and one training row of the stage's own data.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

from llm.lora import merged_copy
from llm.snapshots import Probe, SnapshotConfig, Snapshots, chosen_steps, list_steps, probe_bits


def snapshots_of(config: SnapshotConfig | None, folder: Path, evaluation_steps: Sequence[int],
                 training_row: Sequence[int], tokenizer) -> Snapshots | None:
    """The run's snapshot taker (None with keep: 0): the probe text and one training row."""
    if config is None or config.keep == 0:
        return None
    probes = [Probe("probe text", tokenizer.encode(config.probe_text)), Probe("training row", list(training_row))]
    return Snapshots(folder, config, chosen_steps(evaluation_steps, config.keep), probes, tokenizer.token_text)


def snapshot(snapshots: Snapshots | None, model, step: int, val_loss: float | None, log_metrics, info) -> None:
    """Take the snapshot of `step` if it is a chosen one; log the probes' bits per token.
    A model with LoRA adapters is snapshotted as a merged copy (what the stage will save)."""
    if snapshots is None or not snapshots.wanted(step):
        return
    began = time.perf_counter()
    taken = snapshots.take(merged_copy(model), step, val_loss)
    bits = probe_bits(taken)
    log_metrics({f"snapshot.{name.replace(' ', '_')}_bits": value for name, value in bits.items()}, step=step)
    info(f"snapshot at step {step} ({time.perf_counter() - began:.2f} s): "
         + ", ".join(f"{name} {value:.2f} bits/token" for name, value in bits.items()))


def snapshot_metrics(folder: Path) -> dict:
    """How many snapshots the model folder carries and their size on disk."""
    files = [f for f in folder.rglob("*") if f.is_file()] if folder.is_dir() else []
    return {"snapshots": len(list_steps(folder)), "snapshots_mb": round(sum(f.stat().st_size for f in files) / 2**20, 2)}
