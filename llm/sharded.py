"""Sharded training (FSDP2): parameters, gradients and optimizer state split across processes, and
checkpoints of it (torch.distributed.checkpoint) that any number of processes can resume.

With DDP every process holds the whole training state: with AdamW 16 bytes a parameter (fp32
weights, gradients and two moments), so a 1.5B-parameter model needs 24 GB on each device before
its first activation. FSDP (`fully_shard`) cuts every parameter into N pieces, one per process.
Just before a block runs, its pieces are gathered into whole weights (all-gather), which are
dropped again after it; its gradients are summed across processes and scattered back to the
pieces (reduce-scatter); each process's optimizer updates only its own pieces. Each block is its
own unit, so only a block or two are whole at any moment; the root unit holds what lies outside
the blocks (embeddings, final norm, output layer). `python -m llm.memory` shows what that saves.

On a GPU with bf16 the gathered weights are bf16 (MixedPrecisionPolicy), while the pieces, the
optimizer state and the gradient reduction stay fp32.

Not done here: building the model sharded. Each process builds the whole model, moves it to its
device and shards it there, so the fp32 weights must fit one device once; what sharding spreads
is everything else (gradients and optimizer state, 3x the weights with AdamW). A model whose
weights alone outgrow a GPU would be built on the meta device and each shard initialised.

Muon (llm.optim) needs a whole matrix: Newton-Schulz orthogonalises the matrix, not its rows.
It runs unchanged on the sharded matrices (DTensors): each matrix product of the iteration is a
DTensor operation, which gathers what it needs, so the update is the whole matrix's, as on one
device. (Five rounds of matrix products amplify rounding, more so in bf16, the iteration's
precision on a GPU: a gradient changed by one part in a million moves Muon's weights by far more;
the tests compare sharded Muon to one device with that tolerance, and AdamW tightly.)

A sharded checkpoint is an ordinary checkpoint folder (llm.checkpoint) whose optimizer state
lives in `dcp/` instead of train_state.pt:

    model.safetensors   the whole weights, gathered (the same file as unsharded training writes,
                        so the model folder and everything downstream do not see the sharding)
    config.json, train_config.json, train_state.pt (step, RNG states, history)
    dcp/                weights and optimizer state as torch.distributed.checkpoint writes them:
                        each process its own pieces, plus a description of how they tile every
                        tensor; so N processes write it and M processes (one, with no process
                        group at all) read it back, each taking the pieces it now owns.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from llm import distributed
from llm.checkpoint import (
    STATE_FILE,
    CheckpointMismatch,
    TrainingState,
    capture_rng_state,
    check_model_config,
    checkpoint_name,
    implementation_kept,
    write_checkpoint_files,
)
from llm.distributed import Dist
from llm.files import atomic_dir
from llm.optim import Combined

DCP_DIR = "dcp"


# --- sharding a model ---------------------------------------------------------------------------

def shard(model: nn.Module, device: torch.device, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Shard `model` (a GPT, on `device`) in place across the process group: each block one unit,
    then the root. Returns the model, now an FSDPModule whose parameters are DTensors: make its
    optimizer after this. Every rank starts from rank 0's weights, as DDP does."""
    for tensor in [*model.parameters(), *model.buffers()]:
        dist.broadcast(tensor.data, src=0)
    # fp32 stays fp32; with bf16 the gathered weights (and so the matmuls) are bf16, the gradient
    # sums fp32 (a sum of many bf16 numbers loses the small ones).
    precision = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if dtype != torch.float32 \
        else MixedPrecisionPolicy()
    for block in model.blocks:
        fully_shard(block, mp_policy=precision)
    fully_shard(model, mp_policy=precision)
    return model


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def _optimizers(optimizer: torch.optim.Optimizer | Combined) -> list[torch.optim.Optimizer]:
    return list(optimizer.optimizers.values()) if isinstance(optimizer, Combined) else [optimizer]


# --- checkpoints --------------------------------------------------------------------------------

def is_sharded_checkpoint(path: str | Path) -> bool:
    return (Path(path) / DCP_DIR).is_dir()


def save_training_checkpoint(checkpoints_dir: str | Path, model: nn.Module, optimizer, step: int,
                             history: dict[str, list], train_config: dict[str, Any], where: Dist) -> Path:
    """Write checkpoint `step` atomically; every rank calls it (it gathers). Returns its folder.

    Rank 0 makes the temporary folder, every rank writes its pieces into dcp/ there, rank 0 adds
    the whole weights and the rest and renames the folder into place."""
    path = Path(checkpoints_dir) / checkpoint_name(step)
    model_state, optimizer_state = get_state_dict(model, optimizers=_optimizers(optimizer))
    whole = _whole_model(model, where)
    rng_per_rank = distributed.gather_objects(capture_rng_state(), where)
    state = {"step": step, "rng": rng_per_rank[0], "history": history, "rng_per_rank": rng_per_rank}
    with (atomic_dir(path) if where.is_main else contextlib.nullcontext()) as tmp:
        folder = Path(_from_rank_0(str(tmp), where))
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=folder / DCP_DIR,
                 no_dist=not where.enabled)
        if where.is_main:
            write_checkpoint_files(folder, whole, state, train_config)
    distributed.barrier(where)   # in place before any rank goes on
    return path


def load_training_checkpoint(path: str | Path, model: nn.Module, optimizer) -> TrainingState:
    """Load a sharded checkpoint into `model` and `optimizer`, sharded or not, whatever the number
    of processes that wrote it. Returns the rest of the training state (the RNG not yet restored)."""
    path = Path(path)
    check_model_config(path, model.config.to_dict())
    optimizers = _optimizers(optimizer)
    # The state dicts of this model and optimizer say which pieces this process holds; DCP fills
    # exactly those from the files.
    model_state, optimizer_state = get_state_dict(model, optimizers=optimizers)
    loaded = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(loaded, checkpoint_id=path / DCP_DIR, no_dist=not (dist.is_initialized() and dist.get_world_size() > 1))
    with implementation_kept(optimizer):
        set_state_dict(model, optimizers=optimizers, model_state_dict=loaded["model"],
                       optim_state_dict=loaded["optimizer"])
    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    return TrainingState(step=state["step"], optimizer={}, rng=state["rng"], history=state["history"],
                         rng_per_rank=state.get("rng_per_rank"))


def refuse_unsharded(path: Path) -> None:
    raise CheckpointMismatch(
        f"checkpoint {path} was written by unsharded training (sharding: ddp, its optimizer state in "
        f"{STATE_FILE}); sharded training resumes only sharded checkpoints (with {DCP_DIR}/). Continue it "
        "with sharding: ddp (the same loss curve), or use another out_dir, or resume='never' to start over.")


def _whole_model(model: nn.Module, where: Dist) -> nn.Module | None:
    """On rank 0, an unsharded copy of the model on the CPU with every weight (each rank takes part
    in gathering it); None elsewhere. An unsharded model is its own copy."""
    if not is_sharded(model):
        return model
    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not where.is_main:
        return None
    # The class the model had before fully_shard (FSDP2 derives FSDP<Class> from it), built without
    # memory, then given the gathered tensors themselves.
    plain_class = next(c for c in type(model).__bases__ if not issubclass(c, FSDPModule))
    with torch.device("meta"):
        copy = plain_class(model.config)
    tied = _tied_names(copy)
    copy.load_state_dict(weights, assign=True)
    for first, *others in tied:   # assigning gave each name its own tensor: share them again
        for name in others:
            owner, _, attribute = name.rpartition(".")
            setattr(copy.get_submodule(owner), attribute, copy.get_parameter(first))
    return copy


def _tied_names(model: nn.Module) -> list[list[str]]:
    """The names of each parameter that has several (a tied embedding and output layer)."""
    names: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(parameter), []).append(name)
    return [group for group in names.values() if len(group) > 1]


def _from_rank_0(value: Any, where: Dist) -> Any:
    if not where.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
