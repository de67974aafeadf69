"""Process-group setup and teardown in one place: rank, local rank, world size, device.

Under torchrun (RANK and WORLD_SIZE set) this starts torch.distributed: NCCL with one GPU per process
(chosen by LOCAL_RANK) on CUDA, gloo on CPU, so the same code path runs on a machine without GPUs.
Without torchrun it is a single process and nothing is started.
"""

import atexit
import contextlib
import datetime
import gc
import os
import random
import signal
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from config import ConfigError
from gpt2_pretrain import console
from gpt2_pretrain.elastic import attempt_store
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


# the signals that stop a run with a checkpoint (guards.StopSignal): SIGUSR1 is what Slurm sends ahead of a time
# limit (#SBATCH --signal, scripts/slurm/train.sbatch)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)


@contextlib.contextmanager
def stop_signals_blocked():
    """Block the STOP_SIGNALS in this thread meanwhile: threads started inside inherit the block, so a signal
    always lands in the main thread (where our handler runs), never in a communication thread mid-call."""
    if not hasattr(signal, "pthread_sigmask"):  # Windows
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, set(STOP_SIGNALS))
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def setup_distributed(requested_device="auto", timeout_seconds=300):
    """Start the process group when launched by torchrun; return who we are and where to compute.

    The group lives as long as the process (destroyed at exit): a second run in the same process (a sweep,
    a notebook calling train.main again) reuses it. Destroying it and starting another under torchrun would
    meet the first group's rendezvous keys in the job's store, and ranks would dial addresses that are gone."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        device = check_device(requested_device)
        if device.startswith("cuda"):
            torch.cuda.set_device(device)  # --device=cuda:1: allocations and kernels without an index go there too
        return DistInfo(device=device)
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = check_device(requested_device, local_rank, torchrun=True)
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    if dist.is_initialized():
        if (dist.get_backend(), dist.get_rank(), dist.get_world_size()) != (backend, rank, world_size):
            raise ConfigError(f"this process already has a {dist.get_backend()} process group of "
                              f"{dist.get_world_size()} ranks, and this run needs {backend} with {world_size}: "
                              f"start the run in a new process.")
        return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=device, ddp=True)
    with stop_signals_blocked():  # the backend's threads start with them blocked and keep them so
        store = attempt_store(timeout_seconds)  # a torchrun restart: keys of this attempt's own (elastic.py)
        meet = dict(store=store, rank=rank, world_size=world_size) if store is not None else {}
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_seconds),
                                device_id=torch.device(device) if backend == "nccl" else None, **meet)
        dist.barrier()  # the backend connects (and starts its threads) here at the latest
    atexit.register(teardown_distributed)
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=device, ddp=True)


def end_of_run():
    """After a run: a DDP wrapper caught in a reference cycle lets go of its buffers and hooks now, not at
    exit (the process group itself stays for the next run in this process)."""
    gc.collect()


def teardown_distributed():
    if dist.is_available() and dist.is_initialized():
        end_of_run()
        dist.destroy_process_group()


def all_reduce_mean(tensor, info):
    """Mean of a tensor over ranks (in place); a no-op for one process."""
    if info.ddp:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor /= info.world_size
    return tensor


def seed_rank_streams(seed, rank):
    """Give this rank its own random streams (torch on every device, python, numpy); call once the model
    is built, so the initial weights stay the same on every rank while dropout masks and other draws differ.
    Mixed from (seed, rank) by numpy's SeedSequence: no rank's stream repeats the one the weights came from."""
    rank_seed = int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])  # uint32
    torch.manual_seed(rank_seed)
    random.seed(rank_seed)
    np.random.seed(rank_seed)


def all_reduce_sum(tensor, info):
    if info.ddp:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier(info):
    if info.ddp:
        dist.barrier()
