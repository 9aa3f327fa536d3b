"""Classify stage: fine-tune the pretrained model as a spam classifier, and show what pretraining bought.

The same split and budget train three things: the pretrained model (the result), the same
architecture from random initialisation (what pretraining contributed), and the majority-class
baseline (the floor). Output: data/classify/model/ (the classifier, registered in MLflow as
<project.name>-classifier), predictions.csv (a DVC confusion-matrix plot), confusion.png,
metrics.json.
"""

from __future__ import annotations

import csv
from pathlib import Path

import torch
from prefect import flow, task
from prefect.logging import get_run_logger

from flows._stage import BASE_MODEL, CLASSIFIER_MODEL, SOURCES, StageError, as_params, main, stage_dir, stage_run
from flows.params import Params
from llm.checkpoint import load_checkpoint, load_model_dir
from llm.classify import LabeledTexts, labeled_texts, labelled_share, majority_baseline, stratified_split, train_classifier
from llm.files import atomic_dir
from llm.model import GPT
from llm.sources import iter_documents

OUT = stage_dir("classify")


@task
def tune(name: str, model: GPT, tokenizer, train: LabeledTexts, val: LabeledTexts, config, stage):
    def log(step: int, m: dict) -> None:
        stage.log_metrics(m, step=step, prefix=name)

    return train_classifier(model, tokenizer, train, val, config, on_step=log, on_eval=log)


def confusion_png(matrix: list[list[int]], labels: list[str], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 3.6))
    ax.imshow(matrix, cmap="Blues")
    for i, row in enumerate(matrix):
        for j, count in enumerate(row):
            ax.text(j, i, str(count), ha="center", va="center",
                    color="white" if count > max(map(max, matrix)) / 2 else "black")
    ax.set_xticks(range(len(labels)), labels)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summary_numbers(metrics: dict) -> dict:
    return {k: round(metrics[k], 4) for k in ("accuracy", "precision", "recall", "f1")}


@flow(name="classify", log_prints=True, validate_parameters=False)
def classify_flow(params: Params) -> dict:
    params = as_params(params)
    p = params.classify
    config = p.build()
    log = get_run_logger()
    records = list(iter_documents(SOURCES, "classify"))
    if not records:
        raise StageError("no labelled data: the download stage has no source with role 'classify'")
    try:
        data, report = labeled_texts([r.get("text") for r in records], [r.get("label") for r in records],
                                     config.labels, unknown_labels=config.unknown_labels)
        train, val, test = stratified_split(data, config.val_fraction, config.test_fraction, config.seed)
        train = labelled_share(train, config.train_fraction, config.seed)
    except ValueError as err:
        raise StageError(str(err)) from err
    base_model, tokenizer = load_model_dir(BASE_MODEL)
    log.info(f"{len(train)} train / {len(val)} val / {len(test)} test texts; skipped: "
             f"{ {k: v for k, v in report.items() if k not in ('records', 'used') and v} }")

    with stage_run("classify", params) as stage:
        pretrained = tune("pretrained", base_model, tokenizer, train, val, config, stage)
        test_metrics = pretrained.classifier.evaluate(test, config.positive_label)
        results = {"pretrained": summary_numbers(test_metrics)}
        if p.from_scratch:
            torch.manual_seed(config.seed)  # reproducible random weights
            # Same architecture, random weights. Loading the base model first draws from the seeded
            # generator too (GPT() initialises weights); kept so the random weights stay the same.
            scratch_model = GPT(load_checkpoint(BASE_MODEL).config)
            scratch = tune("from_scratch", scratch_model, tokenizer, train, val, config, stage)
            results["from_scratch"] = summary_numbers(scratch.classifier.evaluate(test, config.positive_label))
        majority = majority_baseline(train.labels, test.labels, label_names=list(config.labels),
                                     positive_label=config.positive_label)
        results["majority"] = summary_numbers(majority)

        write_predictions(pretrained.classifier, test, OUT / "predictions.csv")
        confusion_png(test_metrics["confusion_matrix"], list(config.labels), OUT / "confusion.png",
                      f"test accuracy {test_metrics['accuracy']:.2%}")
        with atomic_dir(CLASSIFIER_MODEL) as tmp:
            pretrained.classifier.save(tmp)
        version = stage.log_model(CLASSIFIER_MODEL, f"{params.project.name}-classifier" if p.register_model else None)
        stage.log_artifact(OUT / "confusion.png")

        metrics = {
            "test": results, "test_accuracy": results["pretrained"]["accuracy"],
            "pretraining_gain": results["pretrained"]["accuracy"] - results.get("from_scratch", {}).get("accuracy", 0.0),
            "examples": {"train": len(train), "val": len(val), "test": len(test)},
            "skipped": {k: v for k, v in report.items() if k not in ("records", "used")},
            "truncated_texts": {**pretrained.truncated, "test": test_metrics["truncated"]},
            "steps": pretrained.steps, "stopped_early": pretrained.stopped_early,
            "elapsed_s": pretrained.elapsed_s, "trainable_params": pretrained.trainable_params,
            "registered_version": int(version or 0),
        }
        rows = "\n".join(f"| {name} | {r['accuracy']:.2%} | {r['precision']:.3f} | {r['recall']:.3f} | {r['f1']:.3f} |"
                         for name, r in results.items())
        summary = ("Test set, same split and budget:\n\n| model | accuracy | precision | recall | F1 |\n"
                   "|---|---|---|---|---|\n" + rows)
        return stage.finish(metrics, summary)


def write_predictions(classifier, test: LabeledTexts, path: Path) -> None:
    """One row per test text: DVC draws the confusion matrix from it."""
    predicted, _ = classifier.predict(test.texts)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["actual", "predicted"])
        for label, guess in zip(test.labels, predicted):
            writer.writerow([classifier.labels[label], guess])


if __name__ == "__main__":
    main(classify_flow, "classify")
