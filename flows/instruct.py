"""Instruct stage: supervised instruction tuning, then answers for the judge to score.

Tunes the pretrained model on Alpaca-style records (loss on response tokens only by default,
examples packed into full rows with document masking, full tuning or LoRA merged back), then
answers every test instruction with the base model and with the tuned model, same decoding and
seed. Output: data/instruct/model/ (registered in MLflow as <project.name>-instruct; the server's
default model), responses.jsonl (the judge stage's input), curves/loss.csv, metrics.json.

Snapshots (`instruct.snapshots`, as pretrain's: flows/_snapshots.py): at step 0 (the base model)
and at evenly spaced evaluations, the weights and what the model does with the probe text and the
first training example, kept in the model folder's snapshots/ (DVC and MLflow keep them with the
model; the server's training timeline reads them there). The stage has no checkpoints: every run
tunes from the base model again and takes its snapshots afresh.
"""

from __future__ import annotations

import csv
import json
import tempfile
from pathlib import Path

from prefect import flow, task
from prefect.logging import get_run_logger
from tqdm import tqdm

from flows._snapshots import snapshot, snapshot_metrics, snapshots_of
from flows._stage import (
    BASE_MODEL,
    INSTRUCT_MODEL,
    RESPONSES,
    SOURCES,
    StageError,
    as_params,
    main,
    stage_dir,
    stage_run,
)
from flows.params import Params
from llm.chat import alpaca_messages, encode_prompt, stop_token_ids
from llm.checkpoint import load_checkpoint, load_model_dir, save_model_dir
from llm.files import atomic_dir, atomic_file
from llm.finetune import finetune, split_records
from llm.generate import Engine
from llm.snapshots import SNAPSHOTS_DIR
from llm.sources import iter_documents

OUT = stage_dir("instruct")


@task
def answer(model, tokenizer, records: list[dict], max_new_tokens: int, temperature: float, seed: int,
           batch_size: int, label: str) -> list[str]:
    """The model's answer to each record's instruction (and input), in batches."""
    engine = Engine(model)  # the weights laid out for decoding once, for every batch
    answers = []
    for start in tqdm(range(0, len(records), batch_size), desc=f"answering ({label})", unit="batch"):
        batch = records[start:start + batch_size]
        prompts = [encode_prompt(tokenizer, alpaca_messages(r["instruction"], r.get("input") or "")) for r in batch]
        completions = engine.generate(prompts, max_new_tokens, temperature=temperature, seed=seed + start,
                                       stop_token_ids=stop_token_ids(tokenizer), truncate_prompt=True)
        answers += [tokenizer.decode(c.tokens).strip() for c in completions]
    return answers


def usable(record: dict) -> bool:
    return all(isinstance(record.get(k), str) for k in ("instruction", "output")) and \
        isinstance(record.get("input", ""), str)


@flow(name="instruct", log_prints=True, validate_parameters=False)
def instruct_flow(params: Params) -> dict:
    params = as_params(params)
    p = params.instruct
    config = p.build()
    log = get_run_logger()
    records = list(iter_documents(SOURCES, "instruct"))
    if not records:
        raise StageError("no instruction data: the download stage has no source with role 'instruct'")
    train, val, test = split_records(records, p.val_fraction, p.test_fraction, config.seed)
    test = [r for r in test if usable(r)][: p.max_test_items]
    base_model, tokenizer = load_model_dir(BASE_MODEL)

    snapshot_config = p.snapshots.build()
    if snapshot_config.keep and not val:
        log.info("note: no validation records (instruct.val_fraction), so no evaluations and no snapshots")

    # Taken into a scratch folder (no run resumes), copied into the model folder at the end.
    with stage_run("instruct", params) as stage, tempfile.TemporaryDirectory(prefix="instruct-snapshots-") as work:
        snapshots, tuned = None, None

        def on_start(model, data) -> None:   # the evaluation steps are known once the records are encoded
            nonlocal snapshots, tuned
            tuned = model
            snapshots = snapshots_of(snapshot_config, Path(work), data.evaluation_steps, data.train_examples[0][0],
                                     tokenizer)

        def on_step(step: int, m: dict) -> None:
            stage.log_metrics(m, step=step)

        def on_eval(step: int, m: dict) -> None:
            stage.log_metrics({"val_loss": m["val_loss"]}, step=step)
            snapshot(snapshots, tuned, step, m["val_loss"], stage.log_metrics, log.info)

        try:
            result = finetune(base_model, tokenizer, train, val, config, on_step=on_step, on_eval=on_eval,
                              on_start=on_start)
        except ValueError as err:
            raise StageError(str(err)) from err
        with atomic_dir(INSTRUCT_MODEL) as tmp:
            save_model_dir(result.model, tokenizer, tmp)
            if snapshots is not None:
                snapshots.finish(result.model, result.history, tmp / SNAPSHOTS_DIR)
        version = stage.log_model(INSTRUCT_MODEL, f"{params.project.name}-instruct" if p.register_model else None)
        write_curve(result.history, OUT / "curves" / "loss.csv")

        decoding = dict(max_new_tokens=p.max_new_tokens, temperature=p.temperature, seed=config.seed,
                        batch_size=p.generate_batch_size)
        base_answers = answer(load_checkpoint(BASE_MODEL), tokenizer, test, label="base", **decoding)
        tuned_answers = answer(result.model, tokenizer, test, label="tuned", **decoding)
        with atomic_file(RESPONSES) as tmp, open(tmp, "w", encoding="utf-8") as out:
            for record, base, tuned in zip(test, base_answers, tuned_answers):
                out.write(json.dumps({"instruction": record["instruction"], "input": record.get("input", ""),
                                      "reference": record["output"], "base_response": base,
                                      "tuned_response": tuned}, ensure_ascii=False) + "\n")
        stage.log_artifact(RESPONSES)

        metrics = {**{k: v for k, v in result.metrics().items() if v is not None},
                   "test_items": len(test), "registered_version": int(version or 0),
                   "records": result.train_records.as_dict(), **snapshot_metrics(INSTRUCT_MODEL / SNAPSHOTS_DIR)}
        log.info(f"val loss {metrics.get('val_loss_before', float('nan')):.3f} -> {result.val_loss or float('nan'):.3f}; "
                 f"{len(test)} test answers written")
        example = (f"\n\n**{test[0]['instruction']}**\n\n- base: {base_answers[0]!r}\n- tuned: {tuned_answers[0]!r}"
                   if test else "")
        summary = (f"{config.method} tuning, {result.steps} steps, loss on {config.loss_on} tokens, "
                   f"{config.layout} rows (padding waste packed {result.layout_packed.padding_waste:.1%} vs "
                   f"padded {result.layout_padded.padding_waste:.1%}).\n\n"
                   f"Validation loss {metrics.get('val_loss_before', float('nan')):.3f} -> "
                   f"{result.val_loss or float('nan'):.3f}." + example)
        return stage.finish(metrics, summary)


def write_curve(history: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    val = dict(history.get("val_loss", []))
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "loss", "val_loss"])
        for step, loss in history.get("train_loss", []):
            writer.writerow([step, f"{loss:.5f}", f"{val[step]:.5f}" if step in val else ""])


if __name__ == "__main__":
    main(instruct_flow, "instruct")
