"""The pretraining loop: AdamW or Muon, warmup + decay, accumulation, evaluation, exact resume.

Read top to bottom: the config, its schedule and batch (accumulation over micro-batches and
processes), data, evaluation and samples, then `train` itself. The update (the schedule,
clipping, the divergence check) is llm.step's, shared with tuning; device, precision and MFU
are llm.device's.

Steps are counted as optimizer updates. A metric "at step k" was measured on weights that had
received k updates: the training loss of update k (0-based) is logged at k, a validation loss
taken after k updates at k, and checkpoint `step_k` holds the weights after k updates, so a
resumed run starts by running update k. `tokens_seen` after update k is (k + 1) * tokens_per_step.

Exact resume: batches come from `train_data.batch(i)`, a pure function of i, so the step number
is the whole data-loader state. With weights, AdamW state and every RNG restored, a run killed
at any point and resumed computes the same losses, bit for bit on a CPU at the same thread count.

Several processes (DistributedDataParallel, started by torchrun; see llm/distributed.py): each
update reads the same rows as one process would, split across the processes, so the loss curve
is the single-process one (up to float rounding) and a checkpoint resumes on any number of
processes that can make the same global batch. `batch_size` is the rows of one forward pass in
each process (what fits one GPU); `tokens_per_step` is the whole update across all processes
(0 = one micro-batch per process). Rank 0 alone shows progress, calls the callbacks and writes
checkpoints; the others compute. With `sharding='fsdp'` each process holds only its share of the
model and optimizer state (llm.sharded), and every process writes its share of each checkpoint.

This module knows nothing of pipelines or trackers: callers observe training through the
`on_step` / `on_eval` callbacks and the returned TrainResult.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from llm import distributed, optim, sharded
from llm.checkpoint import (
    TRAIN_CONFIG_FILE,
    CheckpointMismatch,
    capture_rng_state,
    check_model_config,
    check_same,
    checkpoint_name,
    latest_checkpoint,
    load_training_checkpoint,
    prune_checkpoints,
    read_json_file,
    remove_stale_temporaries,
    restore_rng_state,
    save_training_checkpoint,
    seed_everything,
)
from llm.data import TokenDataset
from llm.device import (
    DEVICES,
    DTYPES,
    autocast,
    model_flops_utilisation,
    peak_flops,
    precision_note,
    resolve_device,
    resolve_dtype,
)
from llm.diagnose import Diagnosis, diagnose
from llm.distributed import SHARDINGS, SINGLE, Dist
from llm.model import flops_per_token
from llm.optim import OPTIMIZERS
from llm.plain import PlainDict, field_checker
from llm.step import DECAYS, StepResult, lr_schedule, record_history, train_step

CHECKPOINTS_DIR = "checkpoints"
RESUMES = ("auto", "never")


# --- config -------------------------------------------------------------------------------------

@dataclass
class TrainConfig(PlainDict):
    """Every training knob. Defaults suit a small model on a laptop CPU."""

    # learning rate: linear warmup to `lr`, then `decay` down to `min_lr` at max_steps
    lr: float = 1e-3
    min_lr: float = 1e-4                 # the floor the decay ends at
    warmup_steps: int = 100
    decay: str = "cosine"                # 'cosine', 'linear' or 'constant'
    max_steps: int = 2000                # optimizer updates in the whole run
    # batch: batch_size rows per forward pass (in each process); tokens_per_step > 0 accumulates
    # gradients over several such micro-batches until that many tokens make one update, counted
    # over all processes (0 = one micro-batch per process)
    batch_size: int = 16
    tokens_per_step: int = 0
    # data: train on the first train_tokens tokens of the training file only (0 = all of it); a
    # subset small enough to be seen many times is where a model overfits and regularisation shows
    train_tokens: int = 0
    # optimizer
    optimizer: str = "adamw"             # 'adamw', or 'muon' (Muon for the blocks' matrices; llm.optim)
    grad_clip: float = 1.0               # max global gradient norm; 0 = no clipping
    weight_decay: float = 0.1            # on matrices (>= 2-D parameters) only
    betas: tuple[float, float] = (0.9, 0.95)
    # evaluation: eval_steps validation batches every eval_every steps (0 = only at the end)
    eval_every: int = 200
    eval_steps: int = 20
    # checkpoints: every checkpoint_every steps (0 = only at the end), the newest K kept
    checkpoint_every: int = 200
    keep_checkpoints: int = 3
    resume: str = "auto"                 # 'auto': continue from the newest checkpoint; 'never': start over
    # hardware
    compile: bool = False                # torch.compile: pays off on GPUs, not on small CPU models
    device: str = "auto"                 # 'auto' (cuda > mps > cpu), 'cpu', 'cuda', 'mps'
    dtype: str = "auto"                  # 'auto' (bfloat16 autocast on CUDA, float32 elsewhere)
    threads: int = 0                     # torch CPU threads; 0 = torch's default (bitwise resume needs it fixed)
    seed: int = 1337
    # samples: a short generation at evaluations (every sample_every steps; 0 = at each one)
    sample_every: int = 0
    sample_prompt: str = "The "
    sample_tokens: int = 48              # 0 = no samples
    doc_masking: bool = False            # pass document ids: attention stays inside each document
    progress: bool = True                # the tqdm progress bar and end-of-run report

    def __post_init__(self):
        self.betas = tuple(float(b) for b in self.betas)
        _require(self.lr > 0, "lr", self.lr, "must be > 0")
        _require(0 <= self.min_lr <= self.lr, "min_lr", self.min_lr, f"must be in [0, lr={self.lr}]")
        _require(self.max_steps >= 1, "max_steps", self.max_steps, "must be >= 1")
        _require(0 <= self.warmup_steps <= self.max_steps, "warmup_steps", self.warmup_steps,
                 f"must be in [0, max_steps={self.max_steps}]")
        _require(self.decay in DECAYS, "decay", self.decay, f"must be one of {DECAYS}")
        _require(self.batch_size >= 1, "batch_size", self.batch_size, "must be >= 1")
        _require(self.tokens_per_step >= 0, "tokens_per_step", self.tokens_per_step,
                 "must be >= 0 (0 = no gradient accumulation)")
        _require(self.train_tokens >= 0, "train_tokens", self.train_tokens, "must be >= 0 (0 = all the tokens)")
        _require(self.optimizer in OPTIMIZERS, "optimizer", self.optimizer, f"must be one of {OPTIMIZERS}")
        _require(self.grad_clip >= 0, "grad_clip", self.grad_clip, "must be >= 0 (0 = no clipping)")
        _require(self.weight_decay >= 0, "weight_decay", self.weight_decay, "must be >= 0")
        _require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas", self.betas,
                 "must be two numbers in [0, 1)")
        _require(self.eval_every >= 0, "eval_every", self.eval_every, "must be >= 0 (0 = only at the end)")
        _require(self.eval_steps >= 1, "eval_steps", self.eval_steps, "must be >= 1")
        _require(self.checkpoint_every >= 0, "checkpoint_every", self.checkpoint_every,
                 "must be >= 0 (0 = only at the end)")
        _require(self.keep_checkpoints >= 1, "keep_checkpoints", self.keep_checkpoints, "must be >= 1")
        _require(self.resume in RESUMES, "resume", self.resume, f"must be one of {RESUMES}")
        _require(self.device in DEVICES, "device", self.device, f"must be one of {DEVICES}")
        _require(self.dtype in DTYPES, "dtype", self.dtype, f"must be one of {DTYPES}")
        _require(self.threads >= 0, "threads", self.threads, "must be >= 0 (0 = torch's default)")
        _require(self.seed >= 0, "seed", self.seed, "must be >= 0")
        _require(self.sample_tokens >= 0, "sample_tokens", self.sample_tokens, "must be >= 0 (0 = no samples)")
        _require(self.sample_every >= 0, "sample_every", self.sample_every, "must be >= 0 (0 = at each evaluation)")
        _require(self.sample_every == 0 or self.eval_every == 0 or self.sample_every % self.eval_every == 0,
                 "sample_every", self.sample_every,
                 f"must be a multiple of eval_every={self.eval_every}: samples are taken at evaluations")


_require = field_checker("TrainConfig")


# The fields that decide the loss curve. A checkpoint written with other values is refused on
# resume: continuing it would give a curve that no single configuration produces. The batch
# counts as the tokens of one whole update (global_tokens_per_step): update s reads the same rows
# however they are cut into micro-batches and processes, so batch_size, accumulation and the
# number of processes may change between a checkpoint and its resumption.
TRAJECTORY_FIELDS = ("lr", "min_lr", "warmup_steps", "decay", "max_steps", "global_tokens_per_step", "optimizer",
                     "grad_clip", "weight_decay", "betas", "seed", "doc_masking", "dtype")


# --- schedule and batch -------------------------------------------------------------------------

def lr_of(step: int, config: TrainConfig) -> float:
    """The learning rate of update `step`: warmup, then config.decay to min_lr at max_steps."""
    return lr_schedule(step, lr=config.lr, min_lr=config.min_lr, warmup_steps=config.warmup_steps,
                       total_steps=config.max_steps, decay=config.decay)


def accumulation_steps(config: TrainConfig, seq_len: int, world_size: int = 1) -> int:
    """Micro-batches per optimizer update in each of world_size processes, to reach tokens_per_step."""
    micro_tokens = config.batch_size * seq_len * world_size
    if config.tokens_per_step == 0:
        return 1
    if config.tokens_per_step % micro_tokens:
        if world_size == 1:
            raise ValueError(f"TrainConfig.tokens_per_step={config.tokens_per_step} must be a multiple of "
                             f"batch_size * seq_len = {config.batch_size} * {seq_len} = {micro_tokens} "
                             "(the tokens of one micro-batch)")
        raise ValueError(f"TrainConfig.tokens_per_step={config.tokens_per_step} must be a multiple of "
                         f"batch_size * seq_len * processes = {config.batch_size} * {seq_len} * {world_size} = "
                         f"{micro_tokens} (one micro-batch in each process)")
    return config.tokens_per_step // micro_tokens


def global_tokens_per_step(config: TrainConfig, seq_len: int, world_size: int = 1) -> int:
    """Tokens of one optimizer update, over all processes."""
    return accumulation_steps(config, seq_len, world_size) * config.batch_size * seq_len * world_size


def micro_batch_index(step: int, micro: int, accumulation: int, where: Dist = SINGLE) -> int:
    """The data batch that micro-batch `micro` of update `step` reads in process `where`.

    Update s covers data batches s*G .. s*G + G-1, G = accumulation * world_size, whatever the
    number of processes: micro-step i is the G batches' i-th group of world_size consecutive
    batches, one per rank. One process reads s*G + i, exactly as before.
    """
    return (step * accumulation + micro) * where.world_size + where.rank


# --- data ---------------------------------------------------------------------------------------

class Batches(Protocol):
    """What train() needs of a dataset (llm.data.TokenDataset is one)."""

    batch_size: int
    seq_len: int

    def batch(self, step: int) -> tuple[torch.Tensor, ...]: ...


def load_datasets(train_path: str | Path, val_path: str | Path | None, seq_len: int, config: TrainConfig,
                  expected_fingerprint: str | None = None) -> tuple[TokenDataset, TokenDataset | None]:
    """TokenDatasets built the way train() expects them (batch size, seed, document ids)."""
    def dataset(path):
        return TokenDataset(path, seq_len, config.batch_size, seed=config.seed, with_doc_ids=config.doc_masking,
                            expected_fingerprint=expected_fingerprint)

    return dataset(train_path), (dataset(val_path) if val_path is not None else None)


# --- evaluation and samples ---------------------------------------------------------------------

SampleFn = Callable[[nn.Module, str, int], str]   # (model, prompt, max_new_tokens) -> text


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    # To a GPU from page-locked memory: an asynchronous copy, so the CPU goes on queueing work
    # instead of waiting for the transfer (the batch is small: the extra host copies cost little).
    if device.type == "cuda":
        return tensor.contiguous().pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def _forward_loss(forward: Callable, batch: tuple[torch.Tensor, ...], device: torch.device,
                  doc_masking: bool) -> torch.Tensor:
    inputs, targets = _to_device(batch[0], device), _to_device(batch[1], device)
    doc_ids = _to_device(batch[2], device) if doc_masking else None
    return forward(inputs, targets=targets, doc_ids=doc_ids).loss


@torch.no_grad()
def evaluate(forward: Callable, model: nn.Module, data: Batches, steps: int, device: torch.device,
             dtype: torch.dtype, doc_masking: bool, where: Dist = SINGLE) -> float:
    """Mean loss over validation batches 0..steps-1: the same batches every time, so
    evaluations differ only by what the model learned. Several processes share the batches
    (rank r takes r, r + world_size, ...) and every rank gets the mean over all of them."""
    model.eval()
    try:
        losses = []
        # Sharded, each forward pass is collective (every block's weights are gathered from all
        # ranks): every rank runs as many as the busiest one, dropping batches past the end.
        end = math.ceil(steps / where.world_size) * where.world_size if sharded.is_sharded(model) else steps
        for i in range(where.rank, end, where.world_size):
            with autocast(device, dtype):
                loss = _forward_loss(forward, data.batch(i), device, doc_masking).detach()
            if i < steps:
                losses.append(loss)
        # One transfer to the host at the end, not one wait per batch.
        total = sum(torch.stack(losses).tolist()) if losses else 0.0
        if where.enabled:
            total = distributed.sum_across(torch.tensor([total], dtype=torch.float64, device=device), where).item()
        return total / steps
    finally:
        model.train()


def perplexity(loss: float) -> float:
    """exp(loss): the number of equally likely tokens the model is choosing between."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


def bits_per_byte(loss: float, tokens: int, n_bytes: int) -> float:
    """A loss in nats per token as bits per byte of the text: comparable across tokenizers, where
    loss per token is not (a bigger vocabulary has fewer, harder tokens for the same text)."""
    return loss / math.log(2) * tokens / n_bytes


@torch.no_grad()
def take_sample(sample_fn: SampleFn, model: nn.Module, config: TrainConfig) -> str:
    """A generation that leaves the training RNG untouched (so resume stays exact) and uses the
    same seed each time (so samples differ only by what the model learned)."""
    model.eval()
    try:
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(config.seed)
            return sample_fn(model, config.sample_prompt, config.sample_tokens)
    finally:
        model.train()


# --- the result ---------------------------------------------------------------------------------

@dataclass
class TrainResult:
    steps: int                    # optimizer updates done in total (== config.max_steps)
    tokens_seen: int
    tokens_per_step: int          # tokens per optimizer update (to put curves against tokens)
    train_loss: float             # the last update's
    val_loss: float | None        # the last evaluation's
    val_ppl: float | None
    checkpoint: Path              # the final checkpoint
    resumed_from: int | None      # the step this invocation continued from; None if it started fresh
    elapsed_s: float              # wall time of this invocation
    tokens_per_s: float           # over every timed update of the run, earlier invocations included
    mfu: float | None             # from tokens_per_s; None off CUDA or on an unknown GPU
    history: dict[str, list] = field(default_factory=dict)
    # history: "train_loss", "lr", "grad_norm", "step_s" (the update's seconds): [(step, value)]
    # every step; "val_loss": [(step, value)] every evaluation; "sample": [(step, text)].
    # Resumed runs carry the earlier steps (a checkpoint written before step_s existed has none).
    diagnosis: Diagnosis = field(default_factory=Diagnosis)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data (a result passed from a training process to the one that started it)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "diagnosis"}
        return {**values, "checkpoint": str(self.checkpoint) if self.checkpoint is not None else None}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainResult":
        """The inverse of to_dict (the diagnosis is recomputed from the history)."""
        history = {name: [tuple(point) for point in points] for name, points in values["history"].items()}
        checkpoint = Path(values["checkpoint"]) if values.get("checkpoint") else None
        return cls(**{**values, "history": history, "checkpoint": checkpoint,
                      "diagnosis": diagnose(history.get("train_loss", []), history.get("val_loss", []))})


def new_history() -> dict[str, list]:
    return {"train_loss": [], "lr": [], "grad_norm": [], "step_s": [], "val_loss": [], "sample": []}


# --- the loop -----------------------------------------------------------------------------------

@dataclass
class _Run:
    """Everything one invocation of train() works with."""

    model: nn.Module
    forward: Callable              # the model, or its DDP wrapper, or a compiled version of either
    optimizer: torch.optim.Optimizer
    config: TrainConfig
    device: torch.device
    dtype: torch.dtype
    accumulation: int              # micro-batches per update in each process
    seq_len: int
    checkpoints: Path
    history: dict[str, list]
    where: Dist = SINGLE           # this process among those training the model
    ddp: nn.Module | None = None   # the DDP wrapper or the FSDP-sharded model, with several processes
    sharding: str = "ddp"          # 'ddp' or 'fsdp' (llm.distributed.wrap); fsdp writes sharded checkpoints
    start_step: int = 0              # the first update this invocation runs
    last_checkpoint: Path | None = None


def train(model: nn.Module, train_data: Batches, val_data: Batches | None, config: TrainConfig,
          out_dir: str | Path, *, on_step: Callable[[int, dict], None] | None = None,
          on_eval: Callable[[int, dict], None] | None = None,
          sample_fn: SampleFn | None = None, sharding: str = "ddp") -> TrainResult:
    """Train `model` in place for config.max_steps updates; checkpoints go to out_dir/checkpoints.

    train_data / val_data: TokenDatasets (or anything with batch(i), batch_size, seq_len) built
    with batch_size=config.batch_size (and with_doc_ids=True for doc_masking). val_data None
    skips evaluation. on_step(step, {loss, lr, grad_norm, tokens_seen, tokens_per_s, mfu}) after
    every update; on_eval(step, {val_loss, val_ppl, sample}) after every evaluation. sample_fn
    (model, prompt, max_new_tokens) -> text makes the samples. Raises TrainingDiverged on a
    NaN/inf loss or gradient norm, CheckpointMismatch when resuming an incompatible checkpoint.

    Started by torchrun in several processes (or inside a process group the caller opened),
    every process calls train() with the same arguments: they train one model together with
    DistributedDataParallel, and only rank 0 calls the callbacks, takes samples and writes
    checkpoints. Every rank returns the same TrainResult (rank 0's alone has the samples).
    sharding='fsdp' shards the model and optimizer state across them instead (llm.sharded):
    then every rank writes its share of each checkpoint, and no samples are taken during training.
    """
    if sharding not in SHARDINGS:
        raise ValueError(f"sharding must be one of {SHARDINGS}, got {sharding!r}")
    if config.threads:
        torch.set_num_threads(config.threads)   # process-wide: float sums depend on the split
    _check_data(train_data, val_data, config, model)
    device = resolve_device(config.device)
    with distributed.process_group(device) as where:
        return _train(model, train_data, val_data, config, Path(out_dir), where, on_step, on_eval, sample_fn,
                      sharding)


def _train(model: nn.Module, train_data: Batches, val_data: Batches | None, config: TrainConfig, out_dir: Path,
           where: Dist, on_step: Callable | None, on_eval: Callable | None,
           sample_fn: SampleFn | None, sharding: str) -> TrainResult:
    run = _prepare(model, train_data, config, out_dir, where, sharding)
    start = run.start_step
    resumed_from = start if run.last_checkpoint else None
    peak = peak_flops(run.device)
    peak = peak * where.world_size if peak is not None else None   # tokens/s below count every GPU
    flops_per_tok = flops_per_token(model.config, train_data.seq_len)
    tokens_per_step = run.accumulation * where.world_size * config.batch_size * train_data.seq_len
    if not where.is_main:   # the other ranks compute; rank 0 reports
        on_step = on_eval = sample_fn = None
    if sharded.is_sharded(model):   # generation alone on rank 0 would wait forever for the others' shards
        sample_fn = None

    began = time.perf_counter()
    with tqdm(total=config.max_steps, initial=start, disable=not (config.progress and where.is_main), unit="step",
              dynamic_ncols=True) as bar:
        for step in range(start, config.max_steps):
            t0 = time.perf_counter()
            update = _update(run, train_data, step)
            step_s = time.perf_counter() - t0
            tokens_per_s = tokens_per_step / step_s
            metrics = {"loss": update.loss, "lr": update.lr, "grad_norm": update.grad_norm,
                       "tokens_seen": (step + 1) * tokens_per_step, "tokens_per_s": tokens_per_s,
                       "mfu": model_flops_utilisation(tokens_per_s, flops_per_tok, peak)}
            record_history(run.history, step, train_loss=update.loss, lr=update.lr, grad_norm=update.grad_norm,
                   step_s=step_s)
            bar.set_postfix(_postfix(metrics), refresh=False)
            bar.update()
            if on_step:
                on_step(step, metrics)
            done = step + 1
            if val_data is not None and _due(done, config.eval_every, config.max_steps):
                _evaluate_and_sample(run, val_data, done, sample_fn, on_eval, bar)
            if _due(done, config.checkpoint_every, config.max_steps):
                _save(run, done)
    # Every rank leaves once the final checkpoint is on disk, so every rank's result names a
    # checkpoint that exists.
    distributed.barrier(where)
    return _result(run, resumed_from, tokens_per_step, time.perf_counter() - began, flops_per_tok, peak)


def _check_data(train_data: Batches, val_data: Batches | None, config: TrainConfig, model: nn.Module) -> None:
    for name, data in (("train_data", train_data), ("val_data", val_data)):
        if data is None:
            continue
        if data.batch_size != config.batch_size:
            raise ValueError(f"{name} makes batches of {data.batch_size} rows but TrainConfig.batch_size="
                             f"{config.batch_size}: build the dataset with batch_size=config.batch_size")
        if data.seq_len > model.config.context_length:
            raise ValueError(f"{name} has seq_len={data.seq_len}, longer than the model's "
                             f"context_length={model.config.context_length}")
        if config.doc_masking and not getattr(data, "with_doc_ids", True):
            raise ValueError(f"TrainConfig.doc_masking=True but {name} was built without document ids: "
                             "build it with with_doc_ids=True")


def _prepare(model: nn.Module, train_data: Batches, config: TrainConfig, out_dir: Path, where: Dist,
             sharding: str) -> _Run:
    """Device, optimizer, and either a fresh start or the state of the newest checkpoint."""
    device = distributed.device_for(resolve_device(config.device), where)
    dtype = resolve_dtype(config.dtype, device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True   # fp32 matmuls outside autocast use TF32
        torch.backends.cudnn.allow_tf32 = True
    model.to(device)
    model.train()
    ddp = None
    if where.enabled:
        # Before the optimizer: FSDP replaces the parameters by their shards. DDP copies rank 0's
        # weights to every rank now; a checkpoint loaded below then gives every rank the same.
        ddp = distributed.wrap(model, device, sharding, dtype)
    elif sharding == "fsdp" and where.is_main:
        print("note: sharding='fsdp' with one process shards nothing: training as one process, with "
              "checkpoints written sharded (dcp/) so that any number of processes can resume them")
    optimizer = optim.make_optimizer(model, config.optimizer, lr_of(0, config), config.weight_decay, config.betas,
                                     device)
    note = precision_note(device, dtype)
    if note and where.is_main and config.progress:
        print(note)
    checkpoints = out_dir / CHECKPOINTS_DIR
    run = _Run(model=model, forward=ddp or model, optimizer=optimizer, config=config, device=device, dtype=dtype,
               accumulation=accumulation_steps(config, train_data.seq_len, where.world_size),
               seq_len=train_data.seq_len, checkpoints=checkpoints, history=new_history(), where=where, ddp=ddp,
               sharding=sharding)
    _resume_or_start(run)
    if config.compile:
        # The DDP wrapper is compiled, not wrapped around a compiled model: torch.compile then
        # splits the graph at DDP's gradient buckets, so their all-reduce overlaps the backward.
        run.forward = torch.compile(run.forward)
    return run


def _resume_or_start(run: _Run) -> None:
    where, seq_len = run.where, run.seq_len
    if where.is_main:   # one process changes the folder; the others wait for it, then read
        remove_stale_temporaries(run.checkpoints)
        if run.config.resume == "never" and run.checkpoints.exists():
            # Starting over: old checkpoints would otherwise be mistaken for this run's later steps.
            shutil.rmtree(run.checkpoints)
    distributed.barrier(where)
    latest = latest_checkpoint(run.checkpoints)
    if latest is None:
        seed_everything(run.config.seed + where.rank)   # rank 0 draws as a single process would
        return
    check_model_config(latest, run.model.config.to_dict())
    saved = read_json_file(latest / TRAIN_CONFIG_FILE)
    saved.setdefault("optimizer", "adamw")   # written before there was a choice
    current = _checked_config(run.config, seq_len, where.world_size)
    _check_global_batch(latest, saved, current, seq_len)
    check_same(latest, "training config", saved, current, TRAJECTORY_FIELDS,
               hint="Use the same settings, another out_dir, or resume='never' to start over.")
    state = _load_checkpoint(latest, run)
    run.history = {**new_history(), **state.history}   # keys added since the checkpoint start empty
    run.start_step, run.last_checkpoint = state.step, latest
    if len(state.history["train_loss"]) != state.step:
        raise ValueError(f"checkpoint {latest} is inconsistent: step {state.step} but "
                         f"{len(state.history['train_loss'])} logged losses")
    # Last: nothing may draw random numbers between here and step one. Each rank continues its
    # own generators when the number of processes is unchanged; otherwise rank 0 continues the
    # saved (rank 0 / single-process) state and the other ranks start fresh ones, seeded by
    # (seed, rank, step). Only dropout draws random numbers in training.
    per_rank = state.rng_per_rank
    if per_rank is not None and len(per_rank) == where.world_size:
        restore_rng_state(per_rank[where.rank])
    elif where.is_main:
        restore_rng_state(state.rng)
    else:
        seed_everything(int(np.random.SeedSequence([run.config.seed, where.rank, state.step]).generate_state(1)[0]))


def _load_checkpoint(path: Path, run: _Run):
    """A sharded checkpoint loads into any model; an unsharded one into any but a sharded model."""
    if sharded.is_sharded_checkpoint(path):
        return sharded.load_training_checkpoint(path, run.model, run.optimizer)
    if sharded.is_sharded(run.model):
        sharded.refuse_unsharded(path)
    return load_training_checkpoint(path, run.model, run.optimizer)


def _checked_config(config: TrainConfig, seq_len: int, world_size: int) -> dict[str, Any]:
    """The training config as a checkpoint records it: the config, plus how it was run."""
    return {**config.to_dict(), "world_size": world_size,
            "global_tokens_per_step": global_tokens_per_step(config, seq_len, world_size)}


def _check_global_batch(path: Path, saved: dict[str, Any], current: dict[str, Any], seq_len: int) -> None:
    """Refuse to continue a checkpoint with a different global batch, saying how to match it."""
    if "global_tokens_per_step" not in saved:   # written before multi-process training: one process
        saved["global_tokens_per_step"] = saved["tokens_per_step"] or saved["batch_size"] * seq_len
    was, now = saved["global_tokens_per_step"], current["global_tokens_per_step"]
    if was == now:
        return
    processes = saved.get("world_size", 1)
    raise CheckpointMismatch(
        f"checkpoint {path} was written with a different training config: global_tokens_per_step "
        f"(checkpoint {was}, now {now}): {processes} process(es) with batch_size={saved['batch_size']} and "
        f"tokens_per_step={saved['tokens_per_step']}; now {current['world_size']} with "
        f"batch_size={current['batch_size']} and tokens_per_step={current['tokens_per_step']}. "
        f"Continue it with {processes} process(es) as before, or set tokens_per_step: {was} to make every update "
        f"{was} tokens whatever the number of processes; or use another out_dir, or resume='never' to start over.")


def _update(run: _Run, data: Batches, step: int) -> StepResult:
    """One optimizer update over `accumulation` micro-batches (llm.step.train_step)."""
    config, where = run.config, run.where

    def loss_of(micro: int) -> torch.Tensor:
        # Micro-batch i of update s is data batch s * accumulation + i with one process: with
        # TokenDataset this reads exactly the rows one big batch of accumulation * batch_size rows
        # would. With several, each takes its share of the same batches (micro_batch_index).
        batch = data.batch(micro_batch_index(step, micro, run.accumulation, where))
        return _forward_loss(run.forward, batch, run.device, config.doc_masking)

    return train_step(run.model, run.optimizer, loss_of, step=step, lr=lr_of(step, config),
                      grad_clip=config.grad_clip, config_name="TrainConfig", device=run.device, dtype=run.dtype,
                      accumulation=run.accumulation, ddp=run.ddp, where=where, checkpoint=run.last_checkpoint)


def _due(done: int, every: int, max_steps: int) -> bool:
    return done == max_steps or (every > 0 and done % every == 0)


def evaluation_steps(config: TrainConfig) -> list[int]:
    """The steps at which train() evaluates (and calls on_eval) when given validation data."""
    return [done for done in range(1, config.max_steps + 1) if _due(done, config.eval_every, config.max_steps)]


def _evaluate_and_sample(run: _Run, val_data: Batches, step: int, sample_fn: SampleFn | None,
                         on_eval: Callable | None, bar) -> None:
    config = run.config
    val_loss = evaluate(run.forward, run.model, val_data, config.eval_steps, run.device, run.dtype,
                        config.doc_masking, run.where)
    sample = None
    wants_sample = config.sample_every == 0 or step % config.sample_every == 0 or step == config.max_steps
    if sample_fn is not None and config.sample_tokens > 0 and wants_sample:
        sample = take_sample(sample_fn, run.model, config)
        run.history["sample"].append((step, sample))
    run.history["val_loss"].append((step, val_loss))
    if config.progress and run.where.is_main:
        bar.write(f"step {step}: val loss {val_loss:.4f}, perplexity {perplexity(val_loss):.1f}"
                  + (f"\n  sample: {sample!r}" if sample is not None else ""))
    if on_eval:
        on_eval(step, {"val_loss": val_loss, "val_ppl": perplexity(val_loss), "sample": sample})


def _save(run: _Run, step: int) -> None:
    """Rank 0 writes the checkpoint (weights and optimizer state are the same on every rank);
    every rank's RNG state goes in it, so an unchanged number of processes resumes exactly."""
    where = run.where
    if run.sharding == "fsdp":   # every rank writes its share
        run.last_checkpoint = sharded.save_training_checkpoint(
            run.checkpoints, run.model, run.optimizer, step, run.history,
            _checked_config(run.config, run.seq_len, where.world_size), where)
        if where.is_main:
            prune_checkpoints(run.checkpoints, run.config.keep_checkpoints)
        return
    rng_per_rank = distributed.gather_objects(capture_rng_state(), where) if where.enabled else None
    if not where.is_main:
        run.last_checkpoint = run.checkpoints / checkpoint_name(step)
        return
    run.last_checkpoint = save_training_checkpoint(
        run.checkpoints, run.model, run.optimizer, step, run.history,
        _checked_config(run.config, run.seq_len, where.world_size),
        rng_per_rank=rng_per_rank)
    prune_checkpoints(run.checkpoints, run.config.keep_checkpoints)


def _postfix(metrics: dict[str, Any]) -> dict[str, str]:
    postfix = {"loss": f"{metrics['loss']:.4f}", "lr": f"{metrics['lr']:.2e}",
               "tok/s": f"{metrics['tokens_per_s']:,.0f}"}
    if metrics["mfu"] is not None:
        postfix["mfu"] = f"{metrics['mfu']:.1%}"
    return postfix


def _result(run: _Run, resumed_from: int | None, tokens_per_step: int, elapsed_s: float, flops_per_tok: int,
            peak: float | None) -> TrainResult:
    history = run.history
    val_loss = history["val_loss"][-1][1] if history["val_loss"] else None
    # Over the whole run, so that an invocation that resumes at the last step still reports the
    # speed the model was trained at (the first update of each invocation pays for start-up).
    timed = [seconds for _, seconds in history["step_s"]]
    trained_s = sum(timed)
    tokens_per_s = len(timed) * tokens_per_step / trained_s if trained_s > 0 else 0.0
    diagnosis = diagnose(history["train_loss"], history["val_loss"])
    if run.config.progress and run.where.is_main:
        print(diagnosis.report())
    return TrainResult(
        steps=run.config.max_steps, tokens_seen=run.config.max_steps * tokens_per_step,
        tokens_per_step=tokens_per_step, train_loss=history["train_loss"][-1][1], val_loss=val_loss,
        val_ppl=perplexity(val_loss) if val_loss is not None else None, checkpoint=run.last_checkpoint,
        resumed_from=resumed_from, elapsed_s=elapsed_s, tokens_per_s=tokens_per_s,
        mfu=model_flops_utilisation(tokens_per_s, flops_per_tok, peak) if timed else None,
        history=history, diagnosis=diagnosis)
