"""Checkpoints of a sharded (--parallel=fsdp) run, written with torch.distributed.checkpoint (DCP).

Each rank writes its own shards of the weights and optimizer states; nothing is gathered on rank 0. A
checkpoint is a folder, out_dir/ckpt_STEP.dcp/ (or best_STEP.dcp/):
    .metadata, __R_0.distcp   DCP's files: model and optimizer states keyed by parameter name, so a run
                              with another world size reshards them as it loads
    meta.pt                   the plain data of a .pt checkpoint (step, config, each rank's loader and
                              RNG states, ...), with "model" and "optimizers" set to SHARDED
Atomic like a .pt checkpoint: every rank writes into ckpt_STEP.dcp.tmp/, and rank 0 renames the folder
once all of them are done, so a killed save never replaces the last good checkpoint.
"""

import os
import shutil
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.tensor import DTensor

SHARDED = "sharded"  # a checkpoint's "model" and "optimizers" when they live in the shard files
META = "meta.pt"


def is_sharded_checkpoint(path):
    return os.path.isdir(path)


def read_meta(path):
    """The plain data of a sharded checkpoint folder (no weights); raises when the folder is incomplete."""
    if not os.path.isfile(os.path.join(path, ".metadata")):
        raise FileNotFoundError(f"{path} has no .metadata")
    return torch.load(os.path.join(path, META), map_location="cpu", weights_only=True)


def fsync_directory(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def weights_finite(model):
    """Whether every weight is finite, over all ranks' shards."""
    device = next(model.parameters()).device  # NCCL reduces device tensors only
    finite = torch.tensor([all(bool(torch.isfinite(t.to_local() if isinstance(t, DTensor) else t).all())
                               for t in model.state_dict().values())], dtype=torch.int32, device=device)
    if dist.is_initialized():
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite.item())


def training_state(model, optimizers):
    """Model and optimizer states as DCP saves and loads them: sharded DTensors keyed by parameter name."""
    return {"model": get_model_state_dict(model),
            "optimizers": [get_optimizer_state_dict(model, optimizer) for optimizer in optimizers]}


def save_sharded(meta, path, model, optimizers):
    """Every rank calls this; `meta` is rank 0's plain data (None elsewhere). Returns True on every rank."""
    is_master = dist.get_rank() == 0
    tmp = f"{path}.tmp"
    if is_master:
        shutil.rmtree(tmp, ignore_errors=True)  # a killed save's leftovers
        os.makedirs(tmp)
    dist.barrier()
    dcp.save(training_state(model, optimizers), checkpoint_id=tmp)  # each rank its shards, files fsynced
    if is_master:
        with open(os.path.join(tmp, META), "wb") as f:
            torch.save(meta, f)
            f.flush()
            os.fsync(f.fileno())
        fsync_directory(tmp)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
        fsync_directory(os.path.dirname(os.path.abspath(path)))
    dist.barrier()  # nobody reads or prunes the folder before it is complete
    return True


def load_sharded(path, model, optimizers, load_optimizer_state):
    """Every rank reads its own shards (resharded when the world size changed) into model and optimizers;
    load_optimizer_state(optimizer, state, load) keeps this run's hyperparameters."""
    state = training_state(model, optimizers)  # the shapes to fill: this run's shards
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(model, state["model"])
    for optimizer, optimizer_state in zip(optimizers, state["optimizers"], strict=True):
        load_optimizer_state(optimizer, optimizer_state,
                             load=lambda s, o=optimizer: set_optimizer_state_dict(model, o, s))


def load_full_weights(path):
    """The whole model's weights from a sharded checkpoint, in one process without a process group."""
    metadata = dcp.FileSystemReader(path).read_metadata()
    weights = {key.removeprefix("model."): torch.empty(item.size, dtype=item.properties.dtype)
               for key, item in metadata.state_dict_metadata.items()
               if key.startswith("model.") and isinstance(item, TensorStorageMetadata)}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message=".*load in a single process")
        dcp.load({"model": weights}, checkpoint_id=path, no_dist=True)  # this process reads every shard
    return weights


def link_copy(source, destination):
    """best_STEP.dcp from ckpt_STEP.dcp: hard links to the same files, renamed into place in one step."""
    tmp = f"{destination}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        shutil.copytree(source, tmp, copy_function=os.link)
    except OSError:  # no hard links on this filesystem
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(source, tmp)
    os.replace(tmp, destination)
