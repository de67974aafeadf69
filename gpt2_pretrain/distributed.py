"""Process-group setup and teardown in one place: rank, local rank, world size, device.

Under torchrun (RANK and WORLD_SIZE set) this starts torch.distributed: NCCL with one GPU per process
(chosen by LOCAL_RANK) on CUDA, gloo on CPU, so the same code path runs on a machine without GPUs.
Without torchrun it is a single process and nothing is started.
"""

import contextlib
import datetime
import gc
import os
import signal
from dataclasses import dataclass

import torch
import torch.distributed as dist

from gpt2_pretrain import console
from gpt2_pretrain.errors import check_device


@dataclass
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: str = "cpu"
    ddp: bool = False

    @property
    def is_master(self):
        return self.rank == 0

    @property
    def device_type(self):
        return "cuda" if self.device.startswith("cuda") else self.device.split(":")[0]


def env_rank():
    """This process's rank from torchrun's environment, before any process group exists."""
    return int(os.environ.get("RANK", "0"))


def print0(*args, sep=" ", end="\n", file=None, flush=True):
    """print on rank 0 only (a single process is rank 0), flushed: the one way the run talks to its user. A
    closed stdout drops the line; out_dir/console.log keeps it (console.py)."""
    if env_rank() == 0:
        console.write(sep.join(map(str, args)) + end, file)


@contextlib.contextmanager
def stop_signals_blocked():
    """Block SIGTERM/SIGINT/SIGHUP in this thread meanwhile: threads started inside inherit the block, so a
    signal always lands in the main thread (where our handler runs), never in a communication thread mid-call."""
    if not hasattr(signal, "pthread_sigmask"):  # Windows
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def setup_distributed(requested_device="auto", timeout_seconds=300):
    """Start the process group when launched by torchrun; return who we are and where to compute."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        device = check_device(requested_device)
        if device.startswith("cuda"):
            torch.cuda.set_device(device)  # --device=cuda:1: allocations and kernels without an index go there too
        return DistInfo(device=device)
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = check_device(requested_device, local_rank, torchrun=True)
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    with stop_signals_blocked():  # the backend's threads start with them blocked and keep them so
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_seconds),
                                device_id=torch.device(device) if backend == "nccl" else None)
        dist.barrier()  # the backend connects (and starts its threads) here at the latest
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=device, ddp=True)


def teardown_distributed():
    if dist.is_available() and dist.is_initialized():
        gc.collect()  # a DDP wrapper caught in a reference cycle lets go of the process group now, not at exit
        dist.destroy_process_group()


def all_reduce_mean(tensor, info):
    """Mean of a tensor over ranks (in place); a no-op for one process."""
    if info.ddp:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor /= info.world_size
    return tensor


def all_reduce_sum(tensor, info):
    if info.ddp:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier(info):
    if info.ddp:
        dist.barrier()
