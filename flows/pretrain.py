"""Pretrain stage: train the GPT on the packed tokens, resumably, and read its loss curve.

Output: data/pretrain/model/ (model.safetensors, config.json, tokenizer/: the folder every later
stage and the server load), data/pretrain/curves/{train,val}.csv (DVC plots), metrics.json.
Registered in MLflow as <project.name>-base.

Checkpoints live in data/pretrain/checkpoints/<run key>/, which DVC keeps between runs
(`persist: true`): a run killed at any point continues from its last checkpoint when the stage
runs again with the same settings, while changed settings get a fresh folder (and a fresh run).
"""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from pathlib import Path

from prefect import flow
from prefect.logging import get_run_logger

from flows._stage import StageError, as_params, main, stage_run
from llm.checkpoint import CheckpointMismatch
from llm.config import Params
from llm.data import TokenDataset
from llm.files import atomic_dir
from llm.generate import generate
from llm.model import GPT, num_params, save_checkpoint
from llm.tokenizer import load_tokenizer
from llm.train import TrainingDiverged, accumulation_steps, perplexity, train

TOKENIZER = Path("data/tokenizer/model")
TOKENS = Path("data/pack/tokens")
OUT = Path("data/pretrain")


def run_key(*parts: dict) -> str:
    """A short hash of everything that decides the training run, to name its checkpoint folder."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def sampler(tokenizer):
    def sample(model, prompt: str, max_new_tokens: int) -> str:
        [completion] = generate(model, [tokenizer.encode(prompt)], max_new_tokens, truncate_prompt=True)
        return prompt + tokenizer.decode(completion.tokens)
    return sample


class Curves:
    """Train and validation curves as CSV files (DVC plots), written as training goes."""

    def __init__(self, folder: Path, tokens_per_step: int):
        folder.mkdir(parents=True, exist_ok=True)
        self.tokens_per_step = tokens_per_step
        self.train = open(folder / "train.csv", "w", newline="")
        self.val = open(folder / "val.csv", "w", newline="")
        self.train_writer = csv.writer(self.train)
        self.val_writer = csv.writer(self.val)
        self.train_writer.writerow(["step", "tokens", "loss", "lr", "grad_norm"])
        self.val_writer.writerow(["step", "tokens", "val_loss", "val_ppl"])

    def add_train(self, step: int, loss: float, lr: float, grad_norm: float) -> None:
        self.train_writer.writerow([step + 1, (step + 1) * self.tokens_per_step, f"{loss:.5f}", f"{lr:.3e}",
                                    f"{grad_norm:.4f}"])

    def add_val(self, step: int, val_loss: float, val_ppl: float) -> None:
        self.val_writer.writerow([step, step * self.tokens_per_step, f"{val_loss:.5f}", f"{val_ppl:.3f}"])
        self.val.flush()

    def close(self) -> None:
        self.train.close()
        self.val.close()


@flow(name="pretrain", log_prints=True, validate_parameters=False)
def pretrain_flow(params: Params) -> dict:
    params = as_params(params)
    p = params.pretrain
    log = get_run_logger()
    tokenizer = load_tokenizer(TOKENIZER)
    model_config = p.model.build()
    if p.model.vocab_size is None:
        model_config.vocab_size = tokenizer.vocab_size  # the model's vocabulary is the tokenizer's
    elif p.model.vocab_size < tokenizer.vocab_size:
        raise StageError(f"pretrain.model.vocab_size={p.model.vocab_size} is smaller than the tokenizer's "
                         f"{tokenizer.vocab_size} ids; leave it unset to use the tokenizer's")
    train_config = p.train.build()
    data_options = dict(seq_len=model_config.context_length, batch_size=train_config.batch_size,
                        with_doc_ids=train_config.doc_masking, expected_fingerprint=tokenizer.fingerprint())
    try:
        train_data = TokenDataset(TOKENS / "train.bin", seed=train_config.seed, **data_options)
        val_data = TokenDataset(TOKENS / "val.bin", seed=train_config.seed + 1, **data_options)
    except ValueError as err:
        raise StageError(str(err)) from err

    try:
        tokens_per_step = (accumulation_steps(train_config, model_config.context_length)
                           * train_config.batch_size * model_config.context_length)
    except ValueError as err:
        raise StageError(str(err)) from err
    key = run_key(model_config.to_dict(), {k: v for k, v in vars(train_config).items() if k != "progress"},
                  train_data.meta["tokenizer_fingerprint"], train_data.meta["num_tokens"])
    checkpoints = OUT / "checkpoints" / key
    model = GPT(model_config)
    log.info(f"model: {num_params(model):,} parameters ({p.model.preset}); run key {key}; "
             f"{train_data.meta['num_tokens']:,} training tokens")

    with stage_run("pretrain", params, system_metrics=True) as stage:
        curves = Curves(OUT / "curves", tokens_per_step)

        def on_step(step: int, m: dict) -> None:
            curves.add_train(step, m["loss"], m["lr"], m["grad_norm"])
            stage.log_metrics({k: v for k, v in m.items() if v is not None}, step=step + 1)

        def on_eval(step: int, m: dict) -> None:
            curves.add_val(step, m["val_loss"], m["val_ppl"])
            stage.log_metrics({"val_loss": m["val_loss"], "val_ppl": m["val_ppl"]}, step=step)
            if m.get("sample"):
                log.info(f"sample at step {step}: {m['sample']!r}")

        try:
            result = train(model, train_data, val_data, train_config, checkpoints,
                           on_step=on_step, on_eval=on_eval, sample_fn=sampler(tokenizer))
        except (TrainingDiverged, CheckpointMismatch) as err:
            raise StageError(str(err)) from err
        finally:
            curves.close()
        rewrite_curves(curves, result.history, tokens_per_step)

        with atomic_dir(OUT / "model") as tmp:
            save_checkpoint(model, tmp)
            shutil.copytree(TOKENIZER, tmp / "tokenizer")
        for stale in (OUT / "checkpoints").iterdir():
            if stale.name != key:  # checkpoints of settings no longer in params
                shutil.rmtree(stale)
        version = stage.log_model(OUT / "model", f"{params.project.name}-base" if p.register_model else None)
        for path in (OUT / "curves" / "train.csv", OUT / "curves" / "val.csv"):
            stage.log_artifact(path, "curves")

        metrics = {
            "parameters": num_params(model), "steps": result.steps, "tokens_seen": result.tokens_seen,
            "train_loss": result.train_loss, "val_loss": result.val_loss, "val_ppl": result.val_ppl,
            "tokens_per_s": result.tokens_per_s, "elapsed_s": result.elapsed_s,
            "resumed_from_step": result.resumed_from or 0, "registered_version": int(version or 0),
            **result.diagnosis.metrics(),
        }
        samples = result.history.get("sample", [])
        summary = (f"{metrics['parameters']:,} parameters, {result.steps} steps, {result.tokens_seen:,} tokens, "
                   f"{result.tokens_per_s:,.0f} tokens/s.\n\n"
                   f"| train loss | val loss | val ppl |\n|---|---|---|\n"
                   f"| {result.train_loss:.3f} | {result.val_loss or float('nan'):.3f} | {result.val_ppl or float('nan'):.1f} |\n\n"
                   f"**Loss curve**: {result.diagnosis.report()}\n\n"
                   + (f"**Last sample**: {samples[-1][1]!r}" if samples else ""))
        return stage.finish(metrics, summary)


def rewrite_curves(curves: Curves, history: dict, tokens_per_step: int) -> None:
    """After a resume the CSVs hold only this invocation's steps: rewrite them from the full history."""
    folder = Path(curves.train.name).parent
    c = Curves(folder, tokens_per_step)
    lrs = dict(history.get("lr", []))
    norms = dict(history.get("grad_norm", []))
    for step, loss in history.get("train_loss", []):
        c.add_train(step, loss, lrs.get(step, 0.0), norms.get(step, 0.0))
    for step, loss in history.get("val_loss", []):
        c.add_val(step, loss, perplexity(loss))
    c.close()


if __name__ == "__main__":
    main(pretrain_flow, "pretrain")
