"""Several processes training one model (PyTorch DistributedDataParallel): launch, process group, helpers.

One process per device, started by `torchrun`, which describes each process to it in the
environment (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT). `llm.train.train` joins the
process group that environment describes (NCCL on CUDA, gloo on a CPU), wraps the model in
DistributedDataParallel and gives every process its share of each global batch; rank 0 alone
reports progress, calls the callbacks and writes checkpoints. Run without torchrun, everything
here is a no-op for a single process.

    python -m torch.distributed.run --standalone --nproc_per_node=2 my_training_script.py

`torchrun_command` builds that command line and `run_torchrun` runs it; `resolve_devices` turns
the `devices` setting ('auto' or a count) into a number of processes.
"""

from __future__ import annotations

import atexit
import contextlib
import inspect
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    """Where this process stands among the processes training one model."""

    rank: int = 0          # 0 .. world_size - 1; rank 0 reports and writes
    local_rank: int = 0    # the index of this process on its host: its GPU
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


SINGLE = Dist()


def from_env() -> Dist:
    """This process as torchrun describes it; a single process when not started by torchrun."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return SINGLE
    rank = int(os.environ["RANK"])
    return Dist(rank=rank, local_rank=int(os.environ.get("LOCAL_RANK", rank)), world_size=world_size)


def backend_for(device: torch.device) -> str:
    """NCCL moves gradients GPU to GPU; gloo works on CPUs (and is what the CPU tests use)."""
    return "nccl" if device.type == "cuda" else "gloo"


def device_for(device: torch.device, where: Dist) -> torch.device:
    """One GPU per process: cuda:LOCAL_RANK, made the current device (NCCL needs it)."""
    if device.type != "cuda" or not where.enabled:
        return device
    if where.local_rank >= torch.cuda.device_count():
        raise RuntimeError(f"process with LOCAL_RANK={where.local_rank} has no GPU: torch sees "
                           f"{torch.cuda.device_count()} on this host; start at most that many processes per host")
    torch.cuda.set_device(where.local_rank)
    return torch.device("cuda", where.local_rank)


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[Dist]:
    """Join the process group of this run; yields this process's Dist.

    The group is opened (from torchrun's environment) on first use and stays open until the
    process exits: opening a second default group in the same process re-uses the rendezvous
    store's keys, and under load one rank could read the previous group's stale entries and
    wait forever (seen here with two train() calls in one torchrun process). A single process
    gets SINGLE and no group at all.
    """
    if dist.is_available() and dist.is_initialized():
        yield Dist(rank=dist.get_rank(), local_rank=int(os.environ.get("LOCAL_RANK", dist.get_rank())),
                   world_size=dist.get_world_size())
        return
    where = from_env()
    if not where.enabled:
        yield where
        return
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    if device.type == "cuda":
        # This process's GPU first: NCCL binds its communicator to it.
        dist.init_process_group(backend=backend_for(device), device_id=device_for(device, where))
    else:
        dist.init_process_group(backend=backend_for(device))
    atexit.register(_close_group)
    yield where


def _close_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.parallel.DistributedDataParallel:
    """DistributedDataParallel: the same weights on every rank (rank 0's are broadcast now), and
    gradients averaged across ranks during backward, bucket by bucket as they become ready."""
    # The model's buffers (rotary tables) are constants computed from the config: sending rank
    # 0's copy before every forward pass would move bytes for nothing. (torch 2.13 renamed the
    # switch; the old name still works there but warns.)
    no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in _DDP_OPTIONS
                      else {"broadcast_buffers": False})
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None, **no_buffer_sync)


_DDP_OPTIONS = frozenset(inspect.signature(torch.nn.parallel.DistributedDataParallel.__init__).parameters)


# --- collectives that are no-ops for one process ------------------------------------------------

def sum_across(tensor: torch.Tensor, where: Dist) -> torch.Tensor:
    """The element-wise sum of `tensor` over all ranks (in place; the tensor itself for one process)."""
    if where.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier(where: Dist) -> None:
    if where.enabled:
        dist.barrier()


def gather_objects(obj: Any, where: Dist) -> list[Any]:
    """[obj of rank 0, obj of rank 1, ...] on every rank (picklable objects; small ones only)."""
    if not where.enabled:
        return [obj]
    gathered: list[Any] = [None] * where.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


# --- how many processes, and starting them ------------------------------------------------------

def resolve_devices(devices: int | str, device: str = "auto") -> int:
    """The number of processes for `devices` ('auto' or a count) on `device` (TrainConfig.device).

    'auto': every CUDA GPU of this host (1 without CUDA). A count above 1 needs that many GPUs
    when training on CUDA; on a CPU ('cpu', or 'auto' without CUDA) any count is allowed, with
    gloo, which is how the multi-process path is tested without a GPU. Apple's MPS backend has
    no multi-process support.
    """
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if devices == "auto":
        return max(torch.cuda.device_count(), 1) if cuda else 1
    if not isinstance(devices, int) or isinstance(devices, bool) or devices < 1:
        raise ValueError(f"devices must be 'auto' or a count >= 1, got {devices!r}")
    if devices == 1:
        return 1
    if cuda:
        available = torch.cuda.device_count()
        if devices > available:
            raise ValueError(f"devices={devices} but torch sees {available} CUDA GPU(s) on this host; "
                             "use 'auto' for all of them, or a smaller count")
    elif device == "mps" or (device == "auto" and torch.backends.mps.is_available()):
        raise ValueError(f"devices={devices}: several processes cannot share Apple's MPS backend; use 1, "
                         "or device: cpu to test the multi-process path on the CPU")
    return devices


def torchrun_command(nproc: int, target: Sequence[str], *, python: str | None = None) -> list[str]:
    """`torchrun --standalone --nproc_per_node=N TARGET...` with this interpreter.

    target: a script and its arguments, or ["-m", "package.module", args...]. `--standalone`
    starts a rendezvous on a free local port: one host, nothing to configure.
    """
    return [python or sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc}", *target]


def run_torchrun(nproc: int, target: Sequence[str], *, env: dict[str, str] | None = None,
                 cwd: str | None = None, timeout: float | None = None) -> int:
    """Run `target` in nproc processes under torchrun and return torchrun's exit status.

    Output is not captured: every rank prints to this process's stdout/stderr, so progress
    shows where the caller's output goes. If any rank fails, torchrun stops the others and
    exits non-zero.
    """
    return subprocess.run(torchrun_command(nproc, target), env=env, cwd=cwd, timeout=timeout).returncode
