"""Text classification with the pretrained GPT: replace the output layer by a small class head.

Read top to bottom: the config, labelled data (validation, the stratified split, the majority
baseline), the model (head, pooling, what to train), metrics, the Classifier that predicts and
saves, then training.

As in chapter 6 of Raschka's book, the vocabulary-sized output layer becomes a linear layer with
one output per class, so the model's "logits" are class scores at every position:

    [EOT] Free  entry  in  2  a  wkly  comp ...  apply   <pad> <pad>
                                                  ^ pooling='last' reads the last real token

With causal attention the last real token is the only one that has seen the whole text, so
'last' pooling reads there (not at the padding that fills the batch); 'mean' averages the
scores of all real tokens. (Averaging the head's outputs equals applying the head to the
averaged features: the head is linear.) A text starts with the document-boundary token, as every
pretraining document did, so the model sees the position it knows texts begin at.

What to train, from cheapest to most capable: 'head' (the new layer only), 'last_blocks' (the
last N transformer blocks, the final norm and the head), 'lora' (adapters on the blocks' linear
layers, plus the final norm and the head) and 'all'.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from llm.checkpoint import load_model_dir, save_model_dir
from llm.finetune import pad_token_id
from llm.lora import DEFAULT_TARGETS, LoraSettings, add_lora, count_parameters, is_lora, merge_lora
from llm.model import GPT, ModelConfig
from llm.optim import plain_adamw
from llm.plain import field_checker
from llm.step import StepResult, lr_schedule, record_history, train_step
from llm.tokenizer import ENDOFTEXT, Tokenizer
from llm.tuning import TuningKnobs, prepare_run

POOLINGS = ("last", "mean")
TRAIN_MODES = ("head", "last_blocks", "all", "lora")
BALANCES = ("none", "weighted", "oversample")
UNKNOWN_LABELS = ("error", "skip")
FORMAT = "llm-classifier/1"
WEIGHTS_FILE = "classifier.safetensors"
META_FILE = "classifier.json"

Callback = Callable[[int, dict], None]


# --- config -------------------------------------------------------------------------------------

@dataclass
class ClassifyConfig(TuningKnobs):
    """Every classification knob. Defaults suit the SMS spam data and the tiny model on a CPU."""

    labels: tuple[str, ...] = ("ham", "spam")   # the declared classes, in head-output order
    positive_label: str = "spam"     # precision/recall/F1 of this class; '' = macro average over classes
    pooling: str = "last"            # 'last' (the last real token) or 'mean' (all real tokens)
    train: str = "all"               # 'head', 'last_blocks', 'all' or 'lora'
    last_blocks: int = 2             # blocks trained when train='last_blocks'
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] = DEFAULT_TARGETS
    max_length: int = 128            # tokens per text, boundary token included; longer texts are cut
    batch_size: int = 32
    epochs: int = 3                  # passes over the training data (at most: early stopping may end sooner)
    lr: float = 5e-4
    min_lr: float = 5e-5
    warmup_steps: int = 20
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    patience: int = 2                # stop after this many evaluations without a better val loss; 0 = never
    balance: str = "none"            # 'none', 'weighted' (class-weighted loss) or 'oversample'
    val_fraction: float = 0.1        # the stratified split (see stratified_split)
    test_fraction: float = 0.2
    train_fraction: float = 1.0      # train on this share of the training split (stratified): fewer labels
    unknown_labels: str = "error"    # a label outside `labels`: 'error' (stop, naming it) or 'skip' (count)
    eval_every: int = 0              # validate every N updates; 0 = at the end of each epoch
    seed: int = 1337
    device: str = "auto"
    threads: int = 0
    progress: bool = True

    def __post_init__(self):
        self.labels = tuple(self.labels)
        check = field_checker("ClassifyConfig")
        check(len(self.labels) >= 2 and all(isinstance(x, str) and x for x in self.labels), "labels",
              self.labels, "must be two or more non-empty strings")
        check(len(set(self.labels)) == len(self.labels), "labels", self.labels, "must not repeat a label")
        check(self.positive_label == "" or self.positive_label in self.labels, "positive_label",
              self.positive_label, f"must be one of labels {list(self.labels)} or '' (macro average)")
        check(self.pooling in POOLINGS, "pooling", self.pooling, f"must be one of {POOLINGS}")
        check(self.train in TRAIN_MODES, "train", self.train, f"must be one of {TRAIN_MODES}")
        check(self.last_blocks >= 1, "last_blocks", self.last_blocks, "must be >= 1")
        check(self.max_length >= 2, "max_length", self.max_length, "must be >= 2 (the boundary token and one more)")
        check(self.batch_size >= 1, "batch_size", self.batch_size, "must be >= 1")
        check(self.epochs >= 1, "epochs", self.epochs, "must be >= 1")
        check(self.patience >= 0, "patience", self.patience, "must be >= 0 (0 = no early stopping)")
        check(self.balance in BALANCES, "balance", self.balance, f"must be one of {BALANCES}")
        check(0 <= self.val_fraction < 1, "val_fraction", self.val_fraction, "must be in [0, 1)")
        check(0 <= self.test_fraction < 1 and self.val_fraction + self.test_fraction < 1, "test_fraction",
              self.test_fraction, f"must be in [0, 1) and leave training data with val_fraction={self.val_fraction}")
        check(0 < self.train_fraction <= 1, "train_fraction", self.train_fraction, "must be in (0, 1]")
        check(self.unknown_labels in UNKNOWN_LABELS, "unknown_labels", self.unknown_labels,
              f"must be one of {UNKNOWN_LABELS}")
        self.check_shared_knobs(check)


# --- labelled data ------------------------------------------------------------------------------

@dataclass
class LabeledTexts:
    texts: list[str]
    labels: list[int]             # indices into the declared label names

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, index: Sequence[int]) -> "LabeledTexts":
        return LabeledTexts([self.texts[i] for i in index], [self.labels[i] for i in index])


def labeled_texts(texts: Sequence[Any], labels: Sequence[Any], label_names: Sequence[str], *,
                  unknown_labels: str = "error") -> tuple[LabeledTexts, dict[str, int]]:
    """Validate (text, label) pairs: (usable data, counts of what was left out and why).

    Empty or non-string texts are skipped and counted. A label outside label_names raises a
    ValueError naming it (unknown_labels='error') or is skipped and counted ('skip').
    """
    if len(texts) != len(labels):
        raise ValueError(f"{len(texts)} texts but {len(labels)} labels")
    index = {name: i for i, name in enumerate(label_names)}
    unknown = Counter(label for label in labels if label not in index)
    if unknown and unknown_labels == "error":
        shown = ", ".join(f"{label!r} ({n}x)" for label, n in unknown.most_common(5))
        raise ValueError(f"{sum(unknown.values())} example(s) have labels outside the declared classes "
                         f"{list(label_names)}: {shown}. Fix the data, add the label to the classes, or "
                         "set unknown_labels='skip'.")
    report = {"records": len(texts), "used": 0, "empty_text": 0, "not_string": 0, "unknown_label": 0}
    kept = LabeledTexts([], [])
    for text, label in zip(texts, labels):
        problem = ("not_string" if not isinstance(text, str) else "empty_text" if not text.strip()
                   else "unknown_label" if label not in index else None)
        if problem:
            report[problem] += 1
            continue
        kept.texts.append(text)
        kept.labels.append(index[label])
        report["used"] += 1
    return kept, report


def stratified_split(data: LabeledTexts, val_fraction: float, test_fraction: float, seed: int
                     ) -> tuple[LabeledTexts, LabeledTexts, LabeledTexts]:
    """(train, val, test) with each class in the same proportion in every part, seeded.

    Without stratifying, a 13% minority class can come out noticeably rarer in a small test set,
    and the test accuracy then measures the split as much as the model.
    """
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"val_fraction={val_fraction} and test_fraction={test_fraction} must be in [0, 1) "
                         "and leave something to train on")
    rng = np.random.default_rng(seed)
    parts: tuple[list[int], list[int], list[int]] = ([], [], [])
    labels = np.asarray(data.labels)
    for label in sorted(set(data.labels)):
        members = rng.permutation(np.flatnonzero(labels == label)).tolist()
        n_test, n_val = round(len(members) * test_fraction), round(len(members) * val_fraction)
        parts[2].extend(members[:n_test])
        parts[1].extend(members[n_test:n_test + n_val])
        parts[0].extend(members[n_test + n_val:])
    # Shuffled, so the classes are interleaved and not in blocks.
    train, val, test = (data.subset(rng.permutation(part).tolist()) for part in parts)
    return train, val, test


def labelled_share(data: LabeledTexts, fraction: float, seed: int) -> LabeledTexts:
    """A seeded, stratified `fraction` of the examples, at least one of each class: how well a
    model does with fewer labels is the question pretraining answers."""
    if fraction >= 1:
        return data
    rng = np.random.default_rng([seed, 1])   # not the split's stream: the split stays the same
    labels = np.asarray(data.labels)
    keep: list[int] = []
    for label in sorted(set(data.labels)):
        members = rng.permutation(np.flatnonzero(labels == label)).tolist()
        keep.extend(members[:max(1, round(len(members) * fraction))])
    return data.subset(rng.permutation(keep).tolist())


def majority_baseline(labels: Sequence[int], eval_labels: Sequence[int] | None = None, *,
                      label_names: Sequence[str] | None = None, positive_label: str = "") -> dict[str, Any]:
    """Always predict the most common label of `labels`, scored on `eval_labels` (default: the
    same labels). The floor any classifier must clear: 87% accuracy on the SMS data, F1 0."""
    if not labels:
        raise ValueError("majority_baseline needs at least one label")
    majority = Counter(labels).most_common(1)[0][0]
    truth = list(labels if eval_labels is None else eval_labels)
    names = list(label_names) if label_names is not None else [str(i) for i in range(max([*labels, *truth]) + 1)]
    metrics = classification_metrics(truth, [majority] * len(truth), names, positive_label)
    return {"label": names[majority], **metrics}


# --- the model ----------------------------------------------------------------------------------

def add_class_head(model: GPT, num_classes: int) -> GPT:
    """Replace the output layer by one with num_classes outputs (in place; returns the model).

    The new layer has its own weight, so a tied embedding stays as it was.
    """
    model.lm_head = nn.Linear(model.config.d_model, num_classes)
    return model


def select_trainable(model: nn.Module, train: str, last_blocks: int = 1, lora: LoraSettings | None = None
                     ) -> nn.Module:
    """Freeze what `train` leaves alone; returns the model to train (wrapped, for 'lora')."""
    if train == "lora":
        model = add_lora(model, lora or LoraSettings())   # freezes everything but the adapters
        base = model.get_base_model()
        for module in (base.final_norm, base.lm_head):
            module.requires_grad_(True)
        return model
    if train == "all":
        return model.requires_grad_(True)
    model.requires_grad_(False)
    trained: list[nn.Module] = [model.lm_head]
    if train == "last_blocks":
        if last_blocks > len(model.blocks):
            raise ValueError(f"ClassifyConfig.last_blocks={last_blocks} but the model has {len(model.blocks)} blocks")
        trained += [*model.blocks[-last_blocks:], model.final_norm]
    for module in trained:
        module.requires_grad_(True)
    return model


def pooled_logits(model: nn.Module, ids: torch.Tensor, lengths: torch.Tensor, pooling: str) -> torch.Tensor:
    """Class scores (B, K) of right-padded ids (B, T) whose real lengths are `lengths` (B,)."""
    scores = model(ids).logits                                             # (B, T, K)
    if pooling == "last":
        return scores[torch.arange(len(ids), device=ids.device), lengths - 1]
    real = torch.arange(ids.size(1), device=ids.device)[None, :] < lengths[:, None]   # (B, T)
    return (scores * real[..., None]).sum(dim=1) / lengths[:, None]


def encode_texts(tokenizer: Tokenizer, texts: Sequence[str], max_length: int) -> tuple[list[list[int]], int]:
    """Token ids of each text after the boundary token, cut to max_length: (ids, number cut)."""
    boundary = tokenizer.special_tokens[ENDOFTEXT]
    encoded, truncated = [], 0
    for ids in tokenizer.encode_batch(list(texts)):
        if len(ids) + 1 > max_length:
            ids, truncated = ids[:max_length - 1], truncated + 1
        encoded.append([boundary, *ids])
    return encoded, truncated


def pad_batch(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest in the batch: (ids (B, T), lengths (B,))."""
    lengths = torch.tensor([len(s) for s in sequences])
    ids = torch.full((len(sequences), int(lengths.max())), pad_id, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        ids[row, :len(sequence)] = torch.tensor(sequence)
    return ids, lengths


def length_bucketed_batches(lengths: Sequence[int], batch_size: int, generator: np.random.Generator,
                            pool: int = 50) -> list[list[int]]:
    """Random batches of similar-length texts: shuffle, sort within pools of `pool` batches, cut,
    shuffle the batches. Padding to the longest in a batch then wastes little, while every batch
    still mixes examples from across the data."""
    order = generator.permutation(len(lengths)).tolist()
    batches = []
    for start in range(0, len(order), batch_size * pool):
        chunk = sorted(order[start:start + batch_size * pool], key=lambda i: lengths[i])
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in generator.permutation(len(batches))]


# --- metrics ------------------------------------------------------------------------------------

def classification_metrics(truth: Sequence[int], predicted: Sequence[int], label_names: Sequence[str],
                           positive_label: str = "") -> dict[str, Any]:
    """Accuracy, precision, recall, F1 (of positive_label, or macro-averaged over classes when it
    is ''), per-class figures and the confusion matrix (rows: true class, columns: predicted)."""
    k = len(label_names)
    matrix = np.zeros((k, k), dtype=np.int64)
    np.add.at(matrix, (np.asarray(truth, dtype=np.int64), np.asarray(predicted, dtype=np.int64)), 1)
    per_class = {name: _precision_recall_f1(matrix, i) for i, name in enumerate(label_names)}
    if positive_label:
        summary = per_class[positive_label]
    else:
        summary = {key: float(np.mean([c[key] for c in per_class.values()])) for key in ("precision", "recall", "f1")}
    total = int(matrix.sum())
    return {"accuracy": float(np.trace(matrix) / total) if total else 0.0, **summary,
            "per_class": per_class, "confusion_matrix": matrix.tolist(), "labels": list(label_names),
            "examples": total}


def _precision_recall_f1(matrix: np.ndarray, i: int) -> dict[str, float]:
    # 0 where undefined (no predictions or no examples of the class), as scikit-learn reports it.
    tp, predicted, actual = matrix[i, i], matrix[:, i].sum(), matrix[i, :].sum()
    precision = float(tp / predicted) if predicted else 0.0
    recall = float(tp / actual) if actual else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "support": int(actual)}


# --- the classifier -----------------------------------------------------------------------------

class Classifier:
    """A trained model with what it needs to read raw texts: tokenizer, labels, pooling, length."""

    def __init__(self, model: GPT, tokenizer: Tokenizer, labels: Sequence[str], pooling: str = "last",
                 max_length: int = 128):
        if model.lm_head.out_features != len(labels):
            raise ValueError(f"the model's head has {model.lm_head.out_features} outputs but {len(labels)} "
                             f"labels were given: {list(labels)}")
        self.model, self.tokenizer, self.labels = model.eval(), tokenizer, list(labels)
        self.pooling, self.max_length = pooling, max_length
        self.pad_id = pad_token_id(tokenizer)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode(self, texts: Sequence[str]) -> tuple[list[list[int]], int]:
        """Token ids of each text and how many were cut to max_length. ValueError, naming the
        positions, for empty or non-string texts: a prediction for nothing is not a prediction."""
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str) or not t.strip()]
        if bad:
            raise ValueError(f"texts at position(s) {bad[:10]}{' ...' if len(bad) > 10 else ''} are empty or "
                             "not strings: nothing to classify")
        return encode_texts(self.tokenizer, texts, self.max_length)

    @torch.no_grad()
    def scores(self, sequences: Sequence[Sequence[int]], batch_size: int = 64) -> torch.Tensor:
        """Class scores (N, K) of encoded texts, in their order."""
        self.model.eval()
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))   # similar lengths together
        out = torch.empty(len(sequences), len(self.labels))
        for start in range(0, len(order), batch_size):
            index = order[start:start + batch_size]
            ids, lengths = pad_batch([sequences[i] for i in index], self.pad_id)
            out[index] = pooled_logits(self.model, ids.to(self.device), lengths.to(self.device),
                                       self.pooling).float().cpu()
        return out

    def predict(self, texts: Sequence[str], batch_size: int = 64) -> tuple[list[str], list[list[float]]]:
        """(label of each text, probability of each class in self.labels order). Texts longer
        than max_length tokens are cut (see encode for the count)."""
        if isinstance(texts, str):
            raise TypeError("predict takes a list of texts, not one string")
        if not texts:
            return [], []
        sequences, _ = self.encode(texts)
        probs = self.scores(sequences, batch_size).softmax(dim=-1)
        return [self.labels[i] for i in probs.argmax(dim=-1).tolist()], probs.tolist()

    def evaluate(self, data: LabeledTexts, positive_label: str = "", batch_size: int = 64) -> dict[str, Any]:
        """Metrics on labelled data, plus its mean loss and how many texts were cut."""
        sequences, truncated = self.encode(data.texts)
        scores = self.scores(sequences, batch_size)
        metrics = classification_metrics(data.labels, scores.argmax(dim=-1).tolist(), self.labels, positive_label)
        loss = float(F.cross_entropy(scores, torch.tensor(data.labels)))
        return {**metrics, "loss": loss, "truncated": truncated}

    def save(self, directory: str | Path) -> Path:
        """A model folder (llm.checkpoint.save_model_dir) with the classifier's own files: weights in
        classifier.safetensors, classifier.json (labels, pooling, base config), and the tokenizer."""
        meta = {"format": FORMAT, "labels": self.labels, "pooling": self.pooling, "max_length": self.max_length,
                "base_config": self.model.config.to_dict()}
        return save_model_dir(self.model, self.tokenizer, directory, weights_file=WEIGHTS_FILE,
                              config_file=META_FILE, config=meta)

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu") -> "Classifier":
        directory = Path(directory)
        meta_path = directory / META_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(f"{meta_path} not found: {directory} is not a saved Classifier")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"{meta_path}: format {meta.get('format')!r}, this code reads {FORMAT!r}")
        model = add_class_head(GPT(ModelConfig.from_dict(meta["base_config"])), len(meta["labels"]))
        model, tokenizer = load_model_dir(directory, device, model=model, weights_file=WEIGHTS_FILE)
        return cls(model, tokenizer, meta["labels"], meta["pooling"], meta["max_length"])


# --- training -----------------------------------------------------------------------------------

@dataclass
class ClassifyResult:
    classifier: Classifier           # holds the best weights (by validation loss)
    steps: int
    epochs: float                    # passes over the training data actually run
    best_step: int                   # the update after which the kept weights were validated
    stopped_early: bool
    train_loss: float                # mean over the last epoch's batches
    val: dict[str, Any]              # metrics of the kept weights on the validation data
    elapsed_s: float
    tokens_per_s: float              # real (non-padding) tokens per second of training
    trainable_params: int
    total_params: int
    truncated: dict[str, int]        # texts cut to max_length: train, val
    history: dict[str, list] = field(default_factory=dict)
    # "train_loss": [(step, value)] every update; "eval": [{step, epoch, train_loss, train_accuracy,
    # val_loss, val_accuracy, val_f1}] every evaluation


def train_classifier(model: GPT, tokenizer: Tokenizer, train: LabeledTexts, val: LabeledTexts,
                     config: ClassifyConfig | None = None, *, on_step: Callback | None = None,
                     on_eval: Callback | None = None) -> ClassifyResult:
    """Turn `model` (a pretrained or freshly initialised GPT; changed in place) into a classifier.

    on_step(step, {loss, lr, grad_norm}) after every update; on_eval(step, {epoch, train_loss,
    train_accuracy, val_loss, val_accuracy, val_f1}) after every evaluation. Early stopping
    watches the validation loss; the returned classifier has the weights of the best evaluation.
    """
    config = config or ClassifyConfig()
    device = prepare_run(config.seed, config.threads, config.device)
    _check_inputs(model, train, val, config)
    model = select_trainable(add_class_head(model, len(config.labels)), config.train, config.last_blocks,
                             config.lora_settings())
    return _Training(model.to(device), tokenizer, train, val, config, device, on_step, on_eval).run()


class _Training:
    """One run of train_classifier: its state, an epoch, an evaluation, the result."""

    def __init__(self, model: nn.Module, tokenizer: Tokenizer, train: LabeledTexts, val: LabeledTexts,
                 config: ClassifyConfig, device: torch.device, on_step: Callback | None, on_eval: Callback | None):
        self.model, self.train, self.val, self.config, self.device = model, train, val, config, device
        self.on_step, self.on_eval = on_step, on_eval
        self.classifier = Classifier(_base(model), tokenizer, config.labels, config.pooling, config.max_length)
        self.model.train()   # Classifier() switched it to eval mode
        self.trainable_params, self.total_params = count_parameters(model)
        self.train_ids, self.truncated = encode_texts(tokenizer, train.texts, config.max_length)
        self.class_weights = (_class_weights(train.labels, len(config.labels), device)
                              if config.balance == "weighted" else None)
        self.rng = np.random.default_rng(config.seed)
        self.steps_per_epoch = math.ceil(len(_epoch_index(train.labels, config.balance, self.rng)) / config.batch_size)
        self.total_steps = config.epochs * self.steps_per_epoch
        self.optimizer = plain_adamw(model, config.lr, config.weight_decay)
        self.history: dict[str, list] = {"train_loss": [], "eval": []}
        self.best: dict[str, Any] = {"val_loss": math.inf, "step": 0, "state": None, "val": {}}
        self.stale = self.step = self.real_tokens = 0
        self.train_seconds, self.began = 0.0, time.perf_counter()
        self.running = _Running()

    def run(self) -> ClassifyResult:
        stopped = False
        with tqdm(total=self.total_steps, disable=not self.config.progress, unit="step", dynamic_ncols=True,
                  desc=f"classify ({self.config.train})") as bar:
            for _ in range(self.config.epochs):
                stopped = self.train_epoch(bar)
                if not stopped and not self.config.eval_every:
                    stopped = self.evaluate()
                if stopped:
                    break
        if not self.history["eval"] or self.history["eval"][-1]["step"] != self.step:
            self.evaluate()   # the last updates, when eval_every did not land on them
        return self.result(stopped)

    def train_epoch(self, bar) -> bool:
        """One pass over the training data; True if an evaluation in it ran out of patience."""
        config = self.config
        index = _epoch_index(self.train.labels, config.balance, self.rng)
        for batch in length_bucketed_batches([len(self.train_ids[i]) for i in index], config.batch_size, self.rng):
            rows = [index[i] for i in batch]
            ids, lengths = pad_batch([self.train_ids[i] for i in rows], self.classifier.pad_id)
            labels = torch.tensor([self.train.labels[i] for i in rows], device=self.device)
            t0 = time.perf_counter()
            update, correct = self.update(ids.to(self.device), lengths.to(self.device), labels)
            self.train_seconds += time.perf_counter() - t0
            self.step += 1
            self.real_tokens += int(lengths.sum())
            self.running.add(update.loss, correct, len(rows))
            record_history(self.history, self.step, train_loss=update.loss)
            bar.set_postfix(loss=f"{update.loss:.4f}", lr=f"{update.lr:.1e}", refresh=False)
            bar.update()
            if self.on_step:
                self.on_step(self.step, {"loss": update.loss, "lr": update.lr, "grad_norm": update.grad_norm})
            if config.eval_every and self.step % config.eval_every == 0 and self.evaluate():
                return True
        return False

    def update(self, ids: torch.Tensor, lengths: torch.Tensor, labels: torch.Tensor) -> tuple[StepResult, int]:
        """Update self.step (0-based) on one batch, llm.step's as in pretraining; also how many of
        the batch's predictions were right (the logits are there already: accuracy comes free)."""
        config, logits = self.config, []

        def loss_of(micro: int) -> torch.Tensor:
            logits.append(pooled_logits(self.model, ids, lengths, config.pooling))
            return F.cross_entropy(logits[-1].float(), labels, weight=self.class_weights)

        lr = lr_schedule(self.step, lr=config.lr, min_lr=config.min_lr, warmup_steps=config.warmup_steps,
                         total_steps=self.total_steps)
        update = train_step(self.model, self.optimizer, loss_of, step=self.step, lr=lr, grad_clip=config.grad_clip,
                            config_name="ClassifyConfig", device=self.device)
        return update, int((logits[0].argmax(dim=-1) == labels).sum())

    def evaluate(self) -> bool:
        """Validate, keeping the weights if they are the best yet. True when patience has run out."""
        metrics = self.classifier.evaluate(self.val, self.config.positive_label) if len(self.val) else {}
        self.model.train()   # evaluate() switched it to eval mode
        row = {"epoch": self.step / self.steps_per_epoch, "train_loss": self.running.loss,
               "train_accuracy": self.running.accuracy, "val_loss": metrics.get("loss", math.nan),
               "val_accuracy": metrics.get("accuracy", math.nan), "val_f1": metrics.get("f1", math.nan)}
        self.history["eval"].append({"step": self.step, **row})
        if self.on_eval:
            self.on_eval(self.step, row)
        self.running.reset()
        if not metrics or metrics["loss"] < self.best["val_loss"]:
            self.best.update(val_loss=metrics.get("loss", math.inf), step=self.step, val=metrics,
                             state=copy.deepcopy(self.model.state_dict()))
            self.stale = 0
            return False
        self.stale += 1
        return self.config.patience > 0 and self.stale >= self.config.patience

    def result(self, stopped: bool) -> ClassifyResult:
        self.model.load_state_dict(self.best["state"])
        self.classifier.model = merge_lora(self.model).eval()
        return ClassifyResult(
            classifier=self.classifier, steps=self.step, epochs=self.step / self.steps_per_epoch,
            best_step=self.best["step"], stopped_early=stopped, train_loss=self.history["eval"][-1]["train_loss"],
            val=self.best["val"], elapsed_s=time.perf_counter() - self.began,
            tokens_per_s=self.real_tokens / self.train_seconds if self.train_seconds else 0.0,
            trainable_params=self.trainable_params, total_params=self.total_params,
            truncated={"train": self.truncated, "val": self.best["val"].get("truncated", 0)}, history=self.history)


def _check_inputs(model: GPT, train: LabeledTexts, val: LabeledTexts, config: ClassifyConfig) -> None:
    if config.max_length > model.config.context_length:
        raise ValueError(f"ClassifyConfig.max_length={config.max_length} is longer than the model's "
                         f"context_length={model.config.context_length}")
    if not len(train):
        raise ValueError("no training examples")
    for name, data in (("train", train), ("val", val)):
        outside = sorted({label for label in data.labels if not 0 <= label < len(config.labels)})
        if outside:
            raise ValueError(f"{name} has label indices {outside} outside the {len(config.labels)} declared "
                             f"classes {list(config.labels)}: build the data with labeled_texts()")


def _base(model: nn.Module) -> GPT:
    """The GPT inside a LoRA wrapper (its forward includes the adapters), or the model itself."""
    return model.get_base_model() if is_lora(model) else model


def _class_weights(labels: Sequence[int], k: int, device: torch.device) -> torch.Tensor:
    """n / (k * n_class): each class contributes equally to the loss, whatever its size."""
    counts = np.bincount(labels, minlength=k).astype(np.float64)
    weights = np.where(counts > 0, len(labels) / (k * np.maximum(counts, 1)), 0.0)
    return torch.tensor(weights, dtype=torch.float32, device=device)


def _epoch_index(labels: Sequence[int], balance: str, rng: np.random.Generator) -> list[int]:
    """The training examples of one epoch; with 'oversample', smaller classes are drawn again
    (with replacement) until every class is as large as the largest."""
    index = list(range(len(labels)))
    if balance != "oversample":
        return index
    by_class: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        by_class.setdefault(label, []).append(i)
    largest = max(len(members) for members in by_class.values())
    for members in by_class.values():
        index += rng.choice(members, size=largest - len(members), replace=True).tolist()
    return index


@dataclass
class _Running:
    """Training loss and accuracy since the last evaluation (free: from the batches just trained)."""

    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    batches: int = 0

    def add(self, loss: float, correct: int, n: int) -> None:
        self.loss_sum, self.correct, self.seen, self.batches = (
            self.loss_sum + loss, self.correct + correct, self.seen + n, self.batches + 1)

    @property
    def loss(self) -> float:
        return self.loss_sum / self.batches if self.batches else math.nan

    @property
    def accuracy(self) -> float:
        return self.correct / self.seen if self.seen else math.nan

    def reset(self) -> None:
        self.loss_sum, self.correct, self.seen, self.batches = 0.0, 0, 0, 0
