"""Supervised instruction tuning: teach the pretrained model to answer, from Alpaca-style records.

Read top to bottom: the config, records -> examples (validation, the loss mask, over-long
examples), the result, batches, evaluation, then the loop. What it shares with classification
(the seeded run, the common config knobs) is in llm.tuning; the update itself (schedule,
clipping, the divergence check) is pretraining's, llm.step.

Each record {instruction, input, output} becomes one conversation in the prompt format of
`llm.chat`, with a loss mask that is True on the response and its end token. The three switches
that the chapter's recurring questions are about:

* loss_on: 'response' trains only on what the model should say; 'all' also on the prompt.
* layout: 'packed' puts several examples end to end in each row, with document masking so they
  cannot see each other (llm.data.pack_examples); 'padded' gives each example its own row,
  padded to the longest in its batch. Same examples, same loss, fewer positions when packed.
* method: 'full' tunes every weight; 'lora' trains small adapters (llm.lora), merged at the end.

Nothing here knows about pipelines or trackers: callers watch through `on_step` / `on_eval` and
read the returned FinetuneResult.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from llm.chat import encode_example
from llm.data import PADDING_DOC, Example, LayoutReport, Rows, pack_examples, pad_examples
from llm.lora import DEFAULT_TARGETS, add_lora, count_parameters, merge_and_check
from llm.model import IGNORE_INDEX
from llm.optim import plain_adamw
from llm.plain import field_checker
from llm.step import StepResult, lr_schedule, record_history, train_step
from llm.tokenizer import PAD, Tokenizer
from llm.tuning import TuningKnobs, prepare_run

LOSS_ON = ("response", "all")
LAYOUTS = ("packed", "padded")
METHODS = ("full", "lora")
TOO_LONG = ("truncate", "drop")

Callback = Callable[[int, dict], None]
StartCallback = Callable[[nn.Module, "TuningData"], None]


# --- config -------------------------------------------------------------------------------------

@dataclass
class FinetuneConfig(TuningKnobs):
    """Every instruction-tuning knob. Defaults suit the tiny model and ~1k Alpaca records on a CPU."""

    epochs: int = 2
    max_steps: int = 0               # > 0: stop after this many updates instead of after `epochs`
    batch_size: int = 8              # rows per update
    seq_len: int = 0                 # row length in tokens; 0 = the model's context length
    lr: float = 3e-4                 # peak learning rate (LoRA usually wants more, e.g. 1e-3)
    min_lr: float = 3e-5             # where the cosine decay ends
    warmup_steps: int = 10
    weight_decay: float = 0.0
    grad_clip: float = 1.0           # max global gradient norm; 0 = no clipping
    loss_on: str = "response"        # 'response' or 'all'
    layout: str = "packed"           # 'packed' or 'padded'
    too_long: str = "truncate"       # examples longer than seq_len: 'truncate' or 'drop'
    method: str = "full"             # 'full' or 'lora'
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] = DEFAULT_TARGETS
    merge_lora: bool = True          # fold the adapters into the weights at the end
    eval_every: int = 0              # validation every N updates; 0 = at the end of each epoch
    seed: int = 1337
    device: str = "auto"
    threads: int = 0                 # torch CPU threads; 0 = torch's default
    progress: bool = True

    def __post_init__(self):
        check = field_checker("FinetuneConfig")
        check(self.epochs >= 1, "epochs", self.epochs, "must be >= 1")
        check(self.max_steps >= 0, "max_steps", self.max_steps, "must be >= 0 (0 = run `epochs` epochs)")
        check(self.batch_size >= 1, "batch_size", self.batch_size, "must be >= 1")
        check(self.seq_len >= 0, "seq_len", self.seq_len, "must be >= 0 (0 = the model's context length)")
        check(self.loss_on in LOSS_ON, "loss_on", self.loss_on, f"must be one of {LOSS_ON}")
        check(self.layout in LAYOUTS, "layout", self.layout, f"must be one of {LAYOUTS}")
        check(self.too_long in TOO_LONG, "too_long", self.too_long, f"must be one of {TOO_LONG}")
        check(self.method in METHODS, "method", self.method, f"must be one of {METHODS}")
        self.check_shared_knobs(check)


# --- records -> examples ------------------------------------------------------------------------

REQUIRED_FIELDS = ("instruction", "output")   # "input" may be absent: Alpaca leaves it empty often


@dataclass
class RecordReport:
    """What happened to each record on its way to a training example."""

    records: int = 0
    used: int = 0
    missing_field: int = 0       # not a dict, or no instruction / output
    not_string: int = 0          # a field that is not a string
    empty: int = 0               # blank instruction or output
    truncated: int = 0           # longer than seq_len, cut (too_long='truncate')
    too_long: int = 0            # longer than seq_len, left out (too_long='drop')
    no_response_left: int = 0   # cutting to seq_len removed the whole response: nothing to learn
    examples_of_problems: list[str] = field(default_factory=list)   # the first few, for the log

    @property
    def skipped(self) -> int:
        return self.records - self.used

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "skipped": self.skipped}

    def _note(self, kind: str, number: int, message: str) -> None:
        setattr(self, kind, getattr(self, kind) + 1)
        if len(self.examples_of_problems) < 5:
            self.examples_of_problems.append(f"record {number}: {message}")


def record_problem(record: Any) -> tuple[str, str] | None:
    """(kind, message) if the record cannot be used, else None."""
    if not isinstance(record, dict):
        return "missing_field", f"expected a dict with {list(REQUIRED_FIELDS)}, got {type(record).__name__}"
    missing = [name for name in REQUIRED_FIELDS if name not in record]
    if missing:
        return "missing_field", f"missing field(s) {missing}"
    for name in (*REQUIRED_FIELDS, "input"):
        if name in record and not isinstance(record[name], str):
            return "not_string", f"field {name!r} is {type(record[name]).__name__}, not a string"
    blank = [name for name in REQUIRED_FIELDS if not record[name].strip()]
    if blank:
        return "empty", f"blank field(s) {blank}"
    return None


def encode_records(tokenizer: Tokenizer, records: Iterable[Any], seq_len: int, *, loss_on: str = "response",
                   too_long: str = "truncate") -> tuple[list[Example], RecordReport]:
    """Records -> (token ids, loss mask) examples that fit a row of seq_len, and what was skipped.

    An example of n tokens fills n - 1 row positions (inputs ids[:-1], targets ids[1:]), so it
    fits when n <= seq_len + 1. Bad records are counted and skipped, never raised: one broken
    line in a data file should not end a run.
    """
    if loss_on not in LOSS_ON:
        raise ValueError(f"loss_on must be one of {LOSS_ON}, got {loss_on!r}")
    if too_long not in TOO_LONG:
        raise ValueError(f"too_long must be one of {TOO_LONG}, got {too_long!r}")
    report, examples = RecordReport(), []
    for number, record in enumerate(records):
        report.records += 1
        problem = record_problem(record)
        if problem:
            report._note(*problem, number)
            continue
        ids, mask = encode_example(tokenizer, record["instruction"], record.get("input", ""), record["output"])
        if loss_on == "all":
            mask = [True] * len(ids)
        if len(ids) > seq_len + 1:
            if too_long == "drop":
                report._note("too_long", number, f"{len(ids)} tokens, rows hold {seq_len + 1}")
                continue
            ids, mask = ids[:seq_len + 1], mask[:seq_len + 1]
            if not any(mask[1:]):
                report._note("no_response_left", number, f"the prompt alone fills the {seq_len} positions")
                continue
            report.truncated += 1
        examples.append((ids, mask))
        report.used += 1
    return examples, report


def split_records(records: Sequence[Any], val_fraction: float, test_fraction: float, seed: int
                  ) -> tuple[list[Any], list[Any], list[Any]]:
    """A seeded (train, val, test) split; each record lands in exactly one part."""
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"val_fraction={val_fraction} and test_fraction={test_fraction} must be in [0, 1) "
                         "and leave something to train on")
    order = np.random.default_rng(seed).permutation(len(records))
    n_test, n_val = round(len(records) * test_fraction), round(len(records) * val_fraction)
    pick = lambda idx: [records[i] for i in idx]  # noqa: E731
    return pick(order[n_test + n_val:]), pick(order[n_test:n_test + n_val]), pick(order[:n_test])


def pad_token_id(tokenizer: Tokenizer) -> int:
    return tokenizer.special_tokens[PAD]


# --- the result ---------------------------------------------------------------------------------

@dataclass
class FinetuneResult:
    model: nn.Module                  # the tuned model; for LoRA with merge_lora, merged back into a GPT
    steps: int
    epochs: float                     # passes over the training rows (fractional with max_steps)
    train_loss: float                 # the last update's
    val_loss: float | None            # the last evaluation's (None without validation records)
    tokens_trained: int               # non-padding tokens that went through training
    loss_tokens: int                  # of those, the ones the loss was computed on
    positions: int                    # all row positions processed, padding included
    tokens_per_s: float               # tokens_trained per second of training
    elapsed_s: float
    trainable_params: int
    total_params: int
    train_records: RecordReport
    val_records: RecordReport | None
    layout_packed: LayoutReport       # the training examples laid out both ways, whichever was used
    layout_padded: LayoutReport
    lora_merge_max_diff: float | None = None   # max |merged - unmerged| logit, when LoRA was merged
    history: dict[str, list] = field(default_factory=dict)
    # history: "train_loss", "lr", "grad_norm": [(step, value)]; "val_loss": [(step, value)], step 0 = before tuning

    def metrics(self) -> dict[str, Any]:
        """Plain numbers for a metrics file or a tracker."""
        return {
            "steps": self.steps, "epochs": self.epochs, "train_loss": self.train_loss, "val_loss": self.val_loss,
            "val_loss_before": self.history["val_loss"][0][1] if self.history.get("val_loss") else None,
            "tokens_trained": self.tokens_trained, "loss_tokens": self.loss_tokens, "positions": self.positions,
            "tokens_per_s": self.tokens_per_s, "elapsed_s": self.elapsed_s,
            "trainable_params": self.trainable_params, "total_params": self.total_params,
            "padding_waste_packed": self.layout_packed.padding_waste,
            "padding_waste_padded": self.layout_padded.padding_waste,
            "positions_packed": self.layout_packed.positions, "positions_padded": self.layout_padded.positions,
            "records_used": self.train_records.used, "records_skipped": self.train_records.skipped,
            "records_truncated": self.train_records.truncated, "lora_merge_max_diff": self.lora_merge_max_diff,
        }


# --- batches ------------------------------------------------------------------------------------

@dataclass
class Batch:
    inputs: torch.Tensor       # (B, T)
    targets: torch.Tensor      # (B, T), IGNORE_INDEX where nothing is learned
    doc_ids: torch.Tensor      # (B, T), PADDING_DOC on padding
    packed: bool               # several examples per row: the model needs doc_ids to keep them apart

    def forward(self, model: nn.Module, device: torch.device):
        # Padded rows hold one example each with padding only at the end, so plain causal
        # attention is exact there and cheaper than a document mask.
        doc_ids = self.doc_ids.to(device) if self.packed else None
        return model(self.inputs.to(device), targets=self.targets.to(device), doc_ids=doc_ids)

    @property
    def real_tokens(self) -> int:
        return int((self.doc_ids != PADDING_DOC).sum())

    @property
    def loss_tokens(self) -> int:
        return int((self.targets != IGNORE_INDEX).sum())


def _batches_of(rows: Rows, order: torch.Tensor, batch_size: int, packed: bool) -> list[Batch]:
    return [Batch(rows.inputs[i], rows.targets[i], rows.doc_ids[i], packed)
            for i in (order[s:s + batch_size] for s in range(0, len(order), batch_size))]


def epoch_batches(examples: list[Example], packed_rows: Rows | None, config: FinetuneConfig, seq_len: int,
                  pad_id: int, epoch: int) -> list[Batch]:
    """One epoch's batches in a seeded order that depends only on (seed, epoch)."""
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)
    if packed_rows is not None:
        order = torch.randperm(len(packed_rows.inputs), generator=generator)
        return _batches_of(packed_rows, order, config.batch_size, packed=True)
    order = torch.randperm(len(examples), generator=generator).tolist()
    return _padded_batches([examples[i] for i in order], config, seq_len, pad_id)


def _padded_batches(examples: list[Example], config: FinetuneConfig, seq_len: int, pad_id: int) -> list[Batch]:
    batches, _ = pad_examples(examples, seq_len, config.batch_size, too_long="drop", pad_id=pad_id)
    return [Batch(rows.inputs, rows.targets, rows.doc_ids, packed=False) for rows in batches]


def fixed_batches(examples: list[Example], config: FinetuneConfig, seq_len: int, pad_id: int) -> list[Batch]:
    """All examples in one fixed order (for validation), laid out as in training."""
    if not examples:
        return []
    if config.layout == "packed":
        rows, _ = pack_examples(examples, seq_len, too_long="drop", pad_id=pad_id)
        return _batches_of(rows, torch.arange(len(rows.inputs)), config.batch_size, packed=True)
    return _padded_batches(examples, config, seq_len, pad_id)


# --- evaluation ---------------------------------------------------------------------------------

@torch.no_grad()
def evaluate_loss(model: nn.Module, batches: list[Batch], device: torch.device) -> float:
    """Mean loss per learned token over all batches: independent of how examples are laid out
    into rows, so packed and padded runs report comparable numbers."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        n = batch.loss_tokens
        if n:
            total += batch.forward(model, device).loss.item() * n
            count += n
    model.train(was_training)
    return total / count if count else math.nan


# --- the loop -----------------------------------------------------------------------------------

@dataclass
class TuningData:
    """The records, encoded and laid out: what the loop reads."""

    config: FinetuneConfig
    seq_len: int
    pad_id: int
    train_examples: list[Example]
    train_report: RecordReport
    val_report: RecordReport | None
    packed_rows: Rows                 # the training examples packed (read when layout='packed')
    layout_packed: LayoutReport
    layout_padded: LayoutReport       # consecutive examples batched: a typical random batching's waste
    val_batches: list[Batch]

    @property
    def steps_per_epoch(self) -> int:
        rows = self.layout_packed.rows if self.config.layout == "packed" else len(self.train_examples)
        return math.ceil(rows / self.config.batch_size)

    @property
    def total_steps(self) -> int:
        return self.config.max_steps or self.config.epochs * self.steps_per_epoch

    @property
    def evaluation_steps(self) -> list[int]:
        """The updates after which the loop validates: 0 (before tuning), every `eval_every`
        updates (else at each epoch's end), and the last."""
        every = self.config.eval_every or self.steps_per_epoch
        return sorted({0, *range(every, self.total_steps, every), self.total_steps})

    def epoch(self, number: int) -> list[Batch]:
        packed = self.packed_rows if self.config.layout == "packed" else None
        return epoch_batches(self.train_examples, packed, self.config, self.seq_len, self.pad_id, number)


def prepare_data(tokenizer: Tokenizer, train_records: Iterable[Any], val_records: Iterable[Any] | None,
                 config: FinetuneConfig, seq_len: int) -> TuningData:
    pad_id = pad_token_id(tokenizer)
    encode = lambda records: encode_records(tokenizer, records, seq_len, loss_on=config.loss_on,  # noqa: E731
                                            too_long=config.too_long)
    train_examples, train_report = encode(train_records)
    if not train_examples:
        raise ValueError(f"no usable training record: {train_report.as_dict()}")
    val_examples, val_report = ([], None) if val_records is None else encode(val_records)
    # Both layouts are measured whichever is used: the report compares their padding.
    packed_rows, packed_report = pack_examples(train_examples, seq_len, too_long="drop", pad_id=pad_id)
    _, padded_report = pad_examples(train_examples, seq_len, config.batch_size, too_long="drop", pad_id=pad_id)
    return TuningData(config, seq_len, pad_id, train_examples, train_report, val_report, packed_rows,
                      packed_report, padded_report, fixed_batches(val_examples, config, seq_len, pad_id))


@dataclass
class _Progress:
    """Counters of one run."""

    step: int = 0
    loss: float = math.nan
    tokens_trained: int = 0
    loss_tokens: int = 0
    positions: int = 0
    train_seconds: float = 0.0
    history: dict[str, list] = field(default_factory=lambda: {"train_loss": [], "lr": [], "grad_norm": [],
                                                              "val_loss": []})

    def add(self, batch: Batch, loss: float, seconds: float) -> None:
        self.step, self.loss, self.train_seconds = self.step + 1, loss, self.train_seconds + seconds
        self.tokens_trained += batch.real_tokens
        self.loss_tokens += batch.loss_tokens
        self.positions += batch.inputs.numel()

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_trained / self.train_seconds if self.train_seconds else 0.0


def finetune(model: nn.Module, tokenizer: Tokenizer, train_records: Iterable[Any],
             val_records: Iterable[Any] | None = None, config: FinetuneConfig | None = None, *,
             on_step: Callback | None = None, on_eval: Callback | None = None,
             on_start: StartCallback | None = None) -> FinetuneResult:
    """Tune `model` (a GPT, trained in place) on Alpaca-style records; see the module docstring.

    on_start(model, data) once before the first validation, with the model being trained (a
    LoRA wrapper with method 'lora') and the encoded data (its `evaluation_steps` among them);
    on_step(step, {loss, lr, grad_norm, tokens_trained, tokens_per_s}) after each update;
    on_eval(step, {val_loss}) after each validation, and once at step 0 before any update.
    Raises ValueError if no training record is usable (the report says why).
    """
    config = config or FinetuneConfig()
    began = time.perf_counter()
    device = prepare_run(config.seed, config.threads, config.device)
    data = prepare_data(tokenizer, train_records, val_records, config, _seq_len(model, config))
    if config.method == "lora":
        model = add_lora(model, config.lora_settings())
    model.to(device).train()
    trainable, total = count_parameters(model)
    if on_start:
        on_start(model, data)
    progress = _train(model, data, config, device, on_step, on_eval)

    merge_diff = None
    if config.method == "lora" and config.merge_lora:
        check = (data.val_batches or data.epoch(0))[0]
        model, merge_diff = merge_and_check(model, check.inputs.to(device),
                                            doc_ids=check.doc_ids.to(device) if check.packed else None)
    model.eval()
    history = progress.history
    return FinetuneResult(
        model=model, steps=progress.step, epochs=progress.step / data.steps_per_epoch, train_loss=progress.loss,
        val_loss=history["val_loss"][-1][1] if history["val_loss"] else None,
        tokens_trained=progress.tokens_trained, loss_tokens=progress.loss_tokens, positions=progress.positions,
        tokens_per_s=progress.tokens_per_s, elapsed_s=time.perf_counter() - began, trainable_params=trainable,
        total_params=total, train_records=data.train_report, val_records=data.val_report,
        layout_packed=data.layout_packed, layout_padded=data.layout_padded, lora_merge_max_diff=merge_diff,
        history=history)


def _train(model: nn.Module, data: TuningData, config: FinetuneConfig, device: torch.device,
           on_step: Callback | None, on_eval: Callback | None) -> _Progress:
    optimizer = plain_adamw(model, config.lr, config.weight_decay)
    total_steps, evaluations = data.total_steps, set(data.evaluation_steps)
    run = _Progress()

    def validate() -> None:
        if data.val_batches:
            val_loss = evaluate_loss(model, data.val_batches, device)
            run.history["val_loss"].append((run.step, val_loss))
            if on_eval:
                on_eval(run.step, {"val_loss": val_loss})

    validate()   # step 0: the model before tuning
    with tqdm(total=total_steps, disable=not config.progress, unit="step", desc="finetune",
              dynamic_ncols=True) as bar:
        for epoch in range(math.ceil(total_steps / data.steps_per_epoch)):
            for batch in data.epoch(epoch)[:total_steps - run.step]:
                t0 = time.perf_counter()
                update = _update(model, optimizer, batch, device, run.step, total_steps, config)
                run.add(batch, update.loss, time.perf_counter() - t0)
                record_history(run.history, run.step, train_loss=update.loss, lr=update.lr, grad_norm=update.grad_norm)
                bar.set_postfix(loss=f"{update.loss:.3f}", lr=f"{update.lr:.1e}", refresh=False)
                bar.update()
                if on_step:
                    on_step(run.step, {"loss": update.loss, "lr": update.lr, "grad_norm": update.grad_norm,
                                       "tokens_trained": run.tokens_trained, "tokens_per_s": run.tokens_per_s})
                if run.step in evaluations:
                    validate()
    return run


def _seq_len(model: nn.Module, config: FinetuneConfig) -> int:
    context = model.config.context_length
    if config.seq_len > context:
        raise ValueError(f"FinetuneConfig.seq_len={config.seq_len} is longer than the model's "
                         f"context_length={context}")
    return config.seq_len or context


def _update(model: nn.Module, optimizer: torch.optim.Optimizer, batch: Batch, device: torch.device, step: int,
            total_steps: int, config: FinetuneConfig) -> StepResult:
    """Update `step` (0-based) on one batch: llm.step's, as in pretraining."""
    lr = lr_schedule(step, lr=config.lr, min_lr=config.min_lr, warmup_steps=config.warmup_steps,
                     total_steps=total_steps)
    return train_step(model, optimizer, lambda micro: batch.forward(model, device).loss, step=step, lr=lr,
                      grad_clip=config.grad_clip, config_name="FinetuneConfig", device=device)
