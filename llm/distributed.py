"""Several processes training one model, on one host or several: launch, process group, helpers.

One process per device, started by `torchrun`, which describes each process to it in the
environment (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT). `llm.train.train` joins the
process group that environment describes (NCCL on CUDA, gloo on a CPU), wraps the model (`wrap`)
and gives every process its share of each global batch; rank 0 alone reports progress and calls
the callbacks. Run without torchrun, everything here is a no-op for a single process.

    python -m torch.distributed.run --standalone --nproc_per_node=2 my_training_script.py

Two ways to share the model (`sharding`):
  ddp   DistributedDataParallel: every process holds the whole model, its gradients and the
        optimizer state; gradients are averaged across processes during backward.
  fsdp  FSDP2 (llm.sharded): each process holds 1/N of the parameters, gradients and optimizer
        state, and gathers a block's parameters just before it runs. For models whose training
        state does not fit one device (`python -m llm.memory` shows when).

Several hosts (`Nodes`): torchrun runs on every host, each with its node rank, and the launchers
meet at a rendezvous endpoint, HOST:PORT of node 0 (whose launcher serves a key-value store there):

    torchrun --nnodes=2 --node-rank=R --nproc_per_node=8 --rdzv-backend=static \\
             --rdzv-endpoint=NODE0:PORT --rdzv-id=RUN script.py      # R = 0 on node 0, 1 on the other

`torchrun_command` builds that command line and `run_torchrun` runs it; `resolve_devices` turns
the `devices` setting ('auto' or a count) into a number of processes per host.
"""

from __future__ import annotations

import atexit
import contextlib
import inspect
import math
import os
import subprocess
import sys
import time
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


SHARDINGS = ("ddp", "fsdp")


def wrap(model: torch.nn.Module, device: torch.device, sharding: str = "ddp",
         dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The model as several processes train it: a DDP wrapper ('ddp'), or the model itself with
    its parameters sharded in place ('fsdp', llm.sharded.shard; the optimizer must be made after).
    Either way rank 0's weights are every rank's from here on."""
    if sharding == "fsdp":
        from llm import sharded
        return sharded.shard(model, device, dtype)
    if sharding != "ddp":
        raise ValueError(f"unknown sharding {sharding!r}; shardings: {', '.join(SHARDINGS)}")
    return _ddp(model, device)


def _ddp(model: torch.nn.Module, device: torch.device) -> torch.nn.parallel.DistributedDataParallel:
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


@contextlib.contextmanager
def no_sync(wrapper: torch.nn.Module) -> Iterator[None]:
    """Backward passes inside only accumulate gradients locally; the next one outside sends the
    sum (gradient accumulation: one exchange per update, not one per micro-batch)."""
    if hasattr(wrapper, "set_requires_gradient_sync"):   # FSDP2: the model itself
        wrapper.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            wrapper.set_requires_gradient_sync(True)
    else:
        with wrapper.no_sync():
            yield


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


@dataclass(frozen=True)
class Nodes:
    """The hosts one run trains on, this host's place among them, and where their launchers meet.

    One host needs nothing (torchrun --standalone). Several run the same torchrun line but for
    their node rank, each with `nproc` processes, and meet at `endpoint` (HOST:PORT of node 0,
    which every host reaches; node 0's launcher serves it). Processes are numbered host by host,
    so node 0 holds global rank 0, which reports and writes: node 0 is where the run is watched.
    (The static rendezvous does this; c10d's elastic one numbers the hosts by their names and
    ignores --node-rank.) A host that has not joined within join_timeout_s stops the others'
    launchers with RendezvousTimeout instead of leaving them waiting.
    """

    count: int = 1
    rank: int = 0                   # this host: 0 .. count - 1
    endpoint: str = ""              # HOST:PORT of node 0; required with count > 1
    run_id: str = "llm"             # the launchers of one run share it (and no other run does)
    join_timeout_s: float = 600.0

    def __post_init__(self):
        if self.count < 1:
            raise ValueError(f"Nodes.count must be >= 1, got {self.count}")
        if not 0 <= self.rank < self.count:
            raise ValueError(f"Nodes.rank must be in [0, count={self.count}), got {self.rank}")
        if self.count > 1 and not self.endpoint:
            raise ValueError(f"Nodes.count={self.count} needs an endpoint HOST:PORT where the hosts' launchers meet")
        if self.endpoint and not is_host_port(self.endpoint):
            raise ValueError(f"Nodes.endpoint must be HOST:PORT, got {self.endpoint!r}")
        if self.join_timeout_s <= 0:
            raise ValueError(f"Nodes.join_timeout_s must be > 0, got {self.join_timeout_s}")


ONE_HOST = Nodes()


def is_host_port(endpoint: str) -> bool:
    host, _, port = endpoint.rpartition(":")
    return bool(host) and port.isdigit() and 0 < int(port) < 65536


class RendezvousTimeout(RuntimeError):
    """Not every host's launcher joined the rendezvous in time."""


def torchrun_command(nproc: int, target: Sequence[str], *, nodes: Nodes = ONE_HOST,
                     python: str | None = None) -> list[str]:
    """The torchrun command line of `nproc` processes on this host, with this interpreter.

    target: a script and its arguments, or ["-m", "package.module", args...]. One host:
    `--standalone` starts a rendezvous on a free local port, nothing to configure. Several:
    `--nnodes`, this host's `--node-rank` and the rendezvous at node 0 with a join timeout.
    """
    if nodes.count == 1 and not nodes.endpoint:
        launch = ["--standalone"]
    else:
        launch = [f"--nnodes={nodes.count}", f"--node-rank={nodes.rank}", "--rdzv-backend=static",
                  f"--rdzv-endpoint={nodes.endpoint}", f"--rdzv-id={nodes.run_id}",
                  f"--rdzv-conf=timeout={math.ceil(nodes.join_timeout_s)}"]
    return [python or sys.executable, "-m", "torch.distributed.run", *launch, f"--nproc_per_node={nproc}", *target]


def run_torchrun(nproc: int, target: Sequence[str], *, nodes: Nodes = ONE_HOST, env: dict[str, str] | None = None,
                 cwd: str | None = None) -> int:
    """Run `target` in nproc processes under torchrun and return torchrun's exit status.

    Output is not captured: every rank prints to this process's stdout, and its stderr passes
    through line by line, so progress shows where the caller's output goes. If any rank fails,
    torchrun stops the others and exits non-zero. Raises RendezvousTimeout, saying which hosts
    to start, when the hosts did not all join within nodes.join_timeout_s.
    """
    began = time.monotonic()
    process = subprocess.Popen(torchrun_command(nproc, target, nodes=nodes), env=env, cwd=cwd,
                               stderr=subprocess.PIPE, text=True, errors="replace")
    timed_out = False
    for line in process.stderr:
        sys.stderr.write(line)
        timed_out = timed_out or any(sign in line for sign in _RENDEZVOUS_TIMEOUTS)
    status = process.wait()
    if timed_out:
        raise RendezvousTimeout(
            f"not all {nodes.count} hosts joined the rendezvous at {nodes.endpoint} (run id {nodes.run_id!r}) "
            f"within {nodes.join_timeout_s:g} s (this is node {nodes.rank}; gave up after "
            f"{time.monotonic() - began:.0f} s): start the same run on every host with its own node rank, "
            "node 0 listening at that endpoint, or raise the join timeout")
    return status


# What torchrun prints when hosts did not meet: node 0's store waited for the others in vain, or
# another node found nobody listening at node 0's endpoint.
_RENDEZVOUS_TIMEOUTS = ("DistStoreError: Timed out after", "DistNetworkError: The client socket has timed out")
