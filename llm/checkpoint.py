"""Model folders and training checkpoints: what a trained model is on disk, and everything a killed
run needs to continue as if it had never stopped.

A model folder is what the stages write, log to MLflow and serve (save_model_dir, load_model_dir):

    model.safetensors   the weights (safetensors: tensors only, nothing executes on load)
    config.json         the model config (llm.model.ModelConfig)
    tokenizer/          the tokenizer (llm.tokenizer.Tokenizer.save)

A training checkpoint is one folder, `<out_dir>/checkpoints/step_0000040/`, named by the number of
optimizer updates done:

    model.safetensors   the weights, as in a model folder (save_checkpoint)
    config.json         the model config; a different model is refused on resume
    train_state.pt      optimizer state, step, RNG states and the metric history,
                        read back with torch.load(weights_only=True): plain data only
    train_config.json   the training config that produced it, with the number of processes
                        (world_size) and the tokens of one whole update (global_tokens_per_step)

Written by several processes (DistributedDataParallel), a checkpoint is the same: weights and
optimizer state are identical on every rank and rank 0 writes them; train_state.pt adds every
rank's RNG state (`rng_per_rank`), while `rng` stays rank 0's, so one process can continue it.
Sharded training (FSDP) keeps the optimizer state in a dcp/ folder instead: see llm.sharded.

A folder is written under a temporary name and renamed into place when complete (rename is
atomic), so a run killed at any instant leaves only complete checkpoints behind, plus a hidden
temporary that the next run sweeps away. The data order needs no saved state: batches are a pure
function of the step (TokenDataset.batch), so the step number is the data loader's state.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from safetensors.torch import load_model, save_model

from llm.files import atomic_dir
from llm.model import GPT, ModelConfig
from llm.tokenizer import META_FILE as TOKENIZER_META_FILE
from llm.tokenizer import Tokenizer, load_tokenizer

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_DIR = "tokenizer"

STATE_FILE = "train_state.pt"
TRAIN_CONFIG_FILE = "train_config.json"
COMPLETE_FILES = (WEIGHTS_FILE, CONFIG_FILE, STATE_FILE, TRAIN_CONFIG_FILE)
_NAME = re.compile(r"^step_(\d+)$")


class CheckpointMismatch(ValueError):
    """A checkpoint was written by a different model or training setup than the one resuming it,
    or a model folder's tokenizer does not fit its weights."""


@dataclass
class TrainingState:
    """What train_state.pt holds besides the weights."""

    step: int                      # optimizer updates done; the next step to run
    optimizer: dict[str, Any]      # optimizer.state_dict()
    rng: dict[str, Any]            # capture_rng_state() of rank 0 (the only one with one process)
    history: dict[str, list]       # metric curves, e.g. {"train_loss": [(step, value), ...]}
    rng_per_rank: list[dict[str, Any]] | None = None   # every rank's, when several processes wrote it


# --- the model folder ---------------------------------------------------------------------------

def save_checkpoint(model: GPT, directory: str | Path) -> Path:
    """Write model.safetensors and config.json into `directory` (created if missing)."""
    return _save_weights_and_config(model, Path(directory), WEIGHTS_FILE, CONFIG_FILE, model.config.to_dict())


def load_checkpoint(directory: str | Path, map_location: str | torch.device = "cpu") -> GPT:
    """Read a checkpoint written by save_checkpoint. Safetensors holds only tensors, so loading
    never runs pickled code."""
    directory = Path(directory)
    model = GPT(read_config(directory))
    load_weights(model, directory / WEIGHTS_FILE, map_location)
    return model.to(map_location)


def read_config(folder: str | Path) -> ModelConfig:
    """The architecture of a model folder or checkpoint alone, without loading weights."""
    return ModelConfig.from_dict(json.loads((Path(folder) / CONFIG_FILE).read_text()))


def load_weights(model: torch.nn.Module, path: Path, device: str | torch.device = "cpu") -> None:
    """Load a safetensors file into `model` in place; every tensor must match, none be missing."""
    load_model(model, str(path), strict=True, device=str(device))


def save_model_dir(model: torch.nn.Module, tokenizer: Tokenizer, folder: str | Path, *,
                   weights_file: str = WEIGHTS_FILE, config_file: str = CONFIG_FILE,
                   config: dict[str, Any] | None = None) -> Path:
    """Write a model folder: the weights, the config (the model's own, or `config`) and tokenizer/.

    A model that is not a plain GPT (a classifier) names its own files and config:
    Classifier.save writes classifier.safetensors and classifier.json this way.
    """
    folder = Path(folder)
    _save_weights_and_config(model, folder, weights_file, config_file,
                             model.config.to_dict() if config is None else config)
    tokenizer.save(folder / TOKENIZER_DIR)
    return folder


def load_model_dir(folder: str | Path, device: str | torch.device = "cpu", *, model: torch.nn.Module | None = None,
                   weights_file: str = WEIGHTS_FILE) -> tuple[GPT, Tokenizer]:
    """The model (on `device`, in the mode it was built in) and the tokenizer of a model folder.

    The model is built from config.json, unless `model` is given (built by the caller from its
    own config) to load the weights into. A tokenizer with more ids than the model has
    embeddings is refused: the two do not belong together.
    """
    folder = Path(folder)
    if model is None:
        model = load_checkpoint(folder, device)
    else:
        load_weights(model, folder / weights_file, device)
        model = model.to(device)
    tokenizer = load_tokenizer(folder / TOKENIZER_DIR)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise CheckpointMismatch(f"{folder}: the tokenizer has {tokenizer.vocab_size} ids but the model only "
                                 f"{model.config.vocab_size} embeddings; they do not belong together")
    return model, tokenizer


def missing_model_files(folder: str | Path) -> list[Path]:
    """The files a model folder must hold that `folder` lacks (none: it is one)."""
    folder = Path(folder)
    needed = [folder / WEIGHTS_FILE, folder / CONFIG_FILE, folder / TOKENIZER_DIR / TOKENIZER_META_FILE]
    return [p for p in needed if not p.is_file()]


def _save_weights_and_config(model: torch.nn.Module, folder: Path, weights_file: str, config_file: str,
                             config: dict[str, Any]) -> Path:
    # save_model (not save_file) because it handles the tied embedding / output weight.
    folder.mkdir(parents=True, exist_ok=True)
    save_model(model, str(folder / weights_file))
    (folder / config_file).write_text(json.dumps(config, indent=2) + "\n")
    return folder


# --- naming and finding checkpoints --------------------------------------------------------------

def checkpoint_name(step: int) -> str:
    return f"step_{step:07d}"


def checkpoint_step(path: str | Path) -> int:
    match = _NAME.match(Path(path).name)
    if not match:
        raise ValueError(f"{path} is not a checkpoint folder (expected a name like step_0000040)")
    return int(match.group(1))


def list_checkpoints(checkpoints_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first. Hidden temporaries and partial folders are skipped."""
    checkpoints_dir = Path(checkpoints_dir)
    if not checkpoints_dir.is_dir():
        return []
    found = [p for p in checkpoints_dir.iterdir()
             if p.is_dir() and _NAME.match(p.name) and all((p / f).is_file() for f in COMPLETE_FILES)]
    return sorted(found, key=checkpoint_step)


def latest_checkpoint(checkpoints_dir: str | Path) -> Path | None:
    checkpoints = list_checkpoints(checkpoints_dir)
    return checkpoints[-1] if checkpoints else None


def remove_stale_temporaries(checkpoints_dir: str | Path) -> None:
    """Sweep folders left by a run killed while writing or deleting a checkpoint."""
    checkpoints_dir = Path(checkpoints_dir)
    if checkpoints_dir.is_dir():
        for stale in checkpoints_dir.glob(".step_*.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)


def prune_checkpoints(checkpoints_dir: str | Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints.

    Each is first renamed to a hidden temporary (atomic), then deleted: a kill in the middle of
    the deletion can leave a half-deleted folder, but never one that looks like a checkpoint.
    """
    for old in list_checkpoints(checkpoints_dir)[:-keep]:
        doomed = old.with_name(f".{old.name}.tmp-deleting")
        os.replace(old, doomed)
        shutil.rmtree(doomed, ignore_errors=True)


# --- RNG state ----------------------------------------------------------------------------------

def capture_rng_state() -> dict[str, Any]:
    """Every random generator training may draw from, as plain data (weights_only-loadable)."""
    numpy_state = np.random.get_state(legacy=False)
    state = {
        "python": random.getstate(),
        "numpy": {**numpy_state, "state": {"key": numpy_state["state"]["key"].tolist(),
                                           "pos": numpy_state["state"]["pos"]}},
        "torch_cpu": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["torch_cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_as_tuples(state["python"]))
    numpy_state = state["numpy"]
    np.random.set_state({**numpy_state, "state": {"key": np.array(numpy_state["state"]["key"], dtype=np.uint32),
                                                  "pos": numpy_state["state"]["pos"]}})
    torch.set_rng_state(state["torch_cpu"])
    # A CPU-written checkpoint resumed on a GPU has no CUDA state: the CUDA generators keep the
    # seed train() gave them, which is as reproducible as it can be across devices.
    cuda_states = state.get("torch_cuda")
    if cuda_states is not None and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)


def _as_tuples(value):
    # random.setstate wants the exact nested tuples getstate gave; keep them tuples either way.
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds every CUDA device too


# --- writing ------------------------------------------------------------------------------------

def save_training_checkpoint(checkpoints_dir: str | Path, model: torch.nn.Module,
                             optimizer: torch.optim.Optimizer, step: int, history: dict[str, list],
                             train_config: dict[str, Any],
                             rng_per_rank: list[dict[str, Any]] | None = None) -> Path:
    """Write checkpoint `step` atomically and return its folder. Captures the RNG state now.
    rng_per_rank: every rank's RNG state (capture_rng_state), when several processes train."""
    path = Path(checkpoints_dir) / checkpoint_name(step)
    state = {"step": step, "optimizer": optimizer.state_dict(), "rng": capture_rng_state(),
             "history": history}
    if rng_per_rank is not None:
        state["rng_per_rank"] = rng_per_rank
    with atomic_dir(path) as tmp:
        write_checkpoint_files(tmp, model, state, train_config)
    return path


def write_checkpoint_files(folder: Path, model: torch.nn.Module, state: dict[str, Any],
                           train_config: dict[str, Any]) -> None:
    """The files of a checkpoint besides sharded state (llm.sharded adds dcp/)."""
    save_checkpoint(model, folder)  # model.safetensors (tied weights handled) + config.json
    torch.save(state, folder / STATE_FILE)
    (folder / TRAIN_CONFIG_FILE).write_text(json.dumps(train_config, indent=2) + "\n")


# --- reading ------------------------------------------------------------------------------------

def check_same(path: str | Path, what: str, saved: dict[str, Any], current: dict[str, Any],
               fields: Iterable[str] | None = None, hint: str = "") -> None:
    """Raise CheckpointMismatch naming every field (of `fields`, default all) that differs."""
    names = sorted(set(saved) | set(current)) if fields is None else list(fields)
    differences = [f"{name} (checkpoint {saved.get(name)!r}, now {current.get(name)!r})"
                   for name in names if _normalised(saved.get(name)) != _normalised(current.get(name))]
    if differences:
        raise CheckpointMismatch(f"checkpoint {path} was written with a different {what}: "
                                 f"{'; '.join(differences)}.{(' ' + hint) if hint else ''}")


def _normalised(value):
    # JSON turns tuples into lists; (0.9, 0.95) and [0.9, 0.95] are the same setting.
    return [_normalised(v) for v in value] if isinstance(value, (list, tuple)) else value


def read_json_file(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def check_model_config(path: str | Path, model_config: dict[str, Any]) -> None:
    """Refuse a checkpoint of a different architecture, naming the fields, instead of failing on
    a tensor shape or, worse, loading weights of the same shapes into a model that uses them
    differently (another norm, position scheme or activation)."""
    check_same(path, "model config", read_json_file(Path(path) / CONFIG_FILE), model_config,
               hint="Use the model config it was trained with, another out_dir, or resume='never'.")


def load_training_checkpoint(path: str | Path, model: torch.nn.Module,
                             optimizer: torch.optim.Optimizer | None = None) -> TrainingState:
    """Load weights (and optimizer state) from checkpoint `path` into `model` (and `optimizer`).

    The model config is compared first (check_model_config). Returns the rest of the training
    state; the caller decides when to restore the RNG.
    """
    path = Path(path)
    check_model_config(path, model.config.to_dict())
    device = next(model.parameters()).device
    load_weights(model, path / WEIGHTS_FILE, device)
    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    if optimizer is not None:
        load_optimizer_state(optimizer, state["optimizer"])
    return TrainingState(step=state["step"], optimizer=state["optimizer"], rng=state["rng"],
                         history=state["history"], rng_per_rank=state.get("rng_per_rank"))


# How the optimizer runs on this machine, not what it has learned: a checkpoint written with the
# fused CUDA kernel must load on a CPU and the other way round.
_IMPLEMENTATION_OPTIONS = ("fused", "foreach", "capturable")


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    with implementation_kept(optimizer):
        optimizer.load_state_dict(saved)


@contextlib.contextmanager
def implementation_kept(optimizer) -> Iterator[None]:
    """Loading saved param groups inside leaves this machine's implementation options as they were."""
    implementation = [{k: g.get(k) for k in _IMPLEMENTATION_OPTIONS if k in g} for g in optimizer.param_groups]
    yield
    for group, options in zip(optimizer.param_groups, implementation):
        group.update(options)
