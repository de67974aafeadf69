"""Checkpoints of a sharded (--parallel=fsdp) run, written with torch.distributed.checkpoint (DCP).

Each rank writes its own shards of the weights and optimizer states; nothing is gathered on rank 0. A
checkpoint is a folder, out_dir/ckpt_STEP.dcp/ (or best_STEP.dcp/):
    .metadata, __R_0.distcp   DCP's files: model and optimizer states keyed by parameter name, so a run
                              with another world size reshards them as it loads
    meta.pt                   the plain data of a .pt checkpoint (step, config, each rank's loader and
                              RNG states, ...), with "model" and "optimizers" set to SHARDED, the sha256 and
                              size of every other file of the folder and a checksum of its own (checksum.py),
                              and the tied weights' names (lm_head.weight: saved once, as transformer.wte.weight)
Atomic like a .pt checkpoint: every rank writes into ckpt_STEP.dcp.tmp/, and rank 0 renames the folder
once all of them are done, so a killed save never replaces the last good checkpoint. A write that fails on
any rank (a full disk, also in the middle of a shard: shard_writer.py) raises the same OSError on every
rank, so none is left waiting for the others, and the partial folder is removed.
Every rank must see the same out_dir: errors.check_shared_out_dir refuses a run where they do not.

Test hook: GPT2_DEBUG_FULL_DISK_STEPS=4,6 makes rank 0 write the meta.pt of the checkpoints at those steps
into /dev/full, whose writes fail with ENOSPC: a disk that fills up once every rank's shards are written.
"""

import os
import re
import shutil
import warnings

import torch
import torch.distributed as dist

from gpt2_pretrain.atomic import WriteRecorder, fsync_path
from gpt2_pretrain.checkpoint.checksum import FILES, SIZES, folder_digests, with_checksum
from gpt2_pretrain.parallel import is_dtensor

# torch.distributed.checkpoint is imported in the functions that use it: it brings DTensor, about 1.5 s of
# every start-up, which runs that never write or read a sharded checkpoint do not need

SHARDED = "sharded"  # a checkpoint's "model" and "optimizers" when they live in the shard files
META = "meta.pt"
TIED = "tied"  # meta.pt's {name: first name} of the weights saved once, under their first name


def is_sharded_checkpoint(path):
    return os.path.isdir(path)


def read_meta(path):
    """The plain data of a sharded checkpoint folder (no weights); raises when the folder is incomplete."""
    if not os.path.isfile(os.path.join(path, ".metadata")):
        raise FileNotFoundError(f"{path} has no .metadata")
    return torch.load(os.path.join(path, META), map_location="cpu", weights_only=True)


def ranks_that_cannot_read(path):
    """The ranks on which the sharded checkpoint folder `path` is missing or has no .metadata (every rank
    calls it): each rank reads its own shards, so a folder only some nodes see would leave the others
    waiting in the load's collectives."""
    readable = [None] * dist.get_world_size()
    dist.all_gather_object(readable, os.path.isfile(os.path.join(path, ".metadata")))
    return [rank for rank, ok in enumerate(readable) if not ok]


def weights_finite(model):
    """Whether every weight is finite, over all ranks' shards."""
    device = next(model.parameters()).device  # NCCL reduces device tensors only
    finite = torch.tensor([all(bool(torch.isfinite(t.to_local() if is_dtensor(t) else t).all())
                               for t in model.state_dict().values())], dtype=torch.int32, device=device)
    if dist.is_initialized():
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite.item())


def tied_names(model):
    """{name: the name it is tied to} for a parameter held under two names (lm_head.weight: the tied wte)."""
    first, tied = {}, {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            tied[name] = first[id(param)]
        else:
            first[id(param)] = name
    return tied


def training_state(model, optimizers):
    """Model and optimizer states as DCP saves and loads them: sharded DTensors keyed by parameter name; a tied
    weight once, under its first name (DCP would write it under each, and the free-space estimate count it twice)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    weights = get_model_state_dict(model)
    for name in tied_names(model):
        weights.pop(name, None)
    return {"model": weights, "optimizers": [get_optimizer_state_dict(model, optimizer) for optimizer in optimizers]}


def raise_on_every_rank(error, tmp):
    """Every rank calls this after a part of a save that may fail on some ranks (it is also a barrier): when
    any rank's `error` is set, every rank raises the lowest failing rank's as the same OSError, once rank 0
    has removed the temporary folder (on a full disk, the space the shards took)."""
    failures = [None] * dist.get_world_size()
    dist.all_gather_object(failures, error and (error.errno, error.strerror or str(error), error.filename))
    failure = next((f for f in failures if f is not None), None)
    if failure is None:
        return
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    raise OSError(*failure)


def save_sharded(meta, path, model, optimizers):
    """Every rank calls this; `meta` is rank 0's plain data (None elsewhere). A failed write raises the same
    OSError on every rank (see raise_on_every_rank)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    from gpt2_pretrain.checkpoint.shard_writer import shard_writer

    is_master = dist.get_rank() == 0
    tmp = f"{path}.tmp"
    error = None
    if is_master:
        try:
            shutil.rmtree(tmp, ignore_errors=True)  # a killed save's leftovers
            os.makedirs(tmp)
        except OSError as e:
            error = e
    raise_on_every_rank(error, tmp)  # no rank writes before the folder exists
    named = re.search(r"(\d+)\.dcp$", path)  # ckpt_STEP.dcp; the full-shard test hook picks steps by it
    step = int(named.group(1)) if named else None
    storage = shard_writer(tmp, step, dist.get_rank(), dist.get_world_size())
    failed = None
    try:
        dcp.save(training_state(model, optimizers), storage_writer=storage)  # each rank its shards, files fsynced
    except CheckpointException as e:  # raised on every rank when any rank's write failed
        # a full disk mid-tensor reaches DCP as torch.save's "unexpected pos": the writer kept the OSError
        failed, error = e, storage.fs.error or next(
            (failure for _, (failure, _) in sorted(e.failures.items()) if isinstance(failure, OSError)), None)
    raise_on_every_rank(error, tmp)  # the failing rank's OSError on every rank, the partial folder removed
    if failed is not None:
        raise failed  # not a write that failed: a bug, with its traceback
    # each rank hashes the shard files it wrote (DCP names them __RANK_N.distcp), all ranks at once
    digests = [None] * dist.get_world_size()
    try:
        mine = folder_digests(tmp, prefix=f"__{dist.get_rank()}_")
    except OSError as e:
        error, mine = e, {}
    dist.all_gather_object(digests, mine)
    raise_on_every_rank(error, tmp)
    if is_master:
        full_disk = str(meta["step"]) in os.environ.get("GPT2_DEBUG_FULL_DISK_STEPS", "").split(",")  # test hook
        try:
            # every rank's shards are written: meta.pt lists their checksums (the other files' hashed here) and
            # sizes, and carries its own
            hashed = {name: digest for part in digests for name, digest in part.items()}
            files = {**hashed, **folder_digests(tmp, leave_out=(META, *hashed))}
            sizes = {name: os.path.getsize(os.path.join(tmp, name)) for name in files}
            meta = with_checksum({**meta, FILES: files, SIZES: sizes, TIED: tied_names(model)})
            with open("/dev/full" if full_disk else os.path.join(tmp, META), "wb") as f:
                with WriteRecorder(f) as writer:  # a full disk raises its OSError, not torch's "unexpected pos"
                    torch.save(meta, writer)
                f.flush()
                os.fsync(f.fileno())
            fsync_path(tmp)
            shutil.rmtree(path, ignore_errors=True)
            os.replace(tmp, path)
            fsync_path(os.path.dirname(os.path.abspath(path)))
        except OSError as e:
            error = e
    raise_on_every_rank(error, tmp)  # nobody reads or prunes the folder before it is complete


def load_sharded(path, model, optimizers, load_optimizer_state):
    """Every rank reads its own shards (resharded when the world size changed) into model and optimizers;
    load_optimizer_state(optimizer, state, load) keeps this run's hyperparameters."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    state = training_state(model, optimizers)  # the shapes to fill: this run's shards
    dcp.load(state, checkpoint_id=path)  # a checkpoint that holds a tied weight twice is read once, too
    for name, first in tied_names(model).items():
        state["model"][name] = state["model"][first]  # the same parameter: loading it twice sets it once
    set_model_state_dict(model, state["model"])
    for optimizer, optimizer_state in zip(optimizers, state["optimizers"], strict=True):
        load_optimizer_state(optimizer, optimizer_state,
                             load=lambda s, o=optimizer: set_optimizer_state_dict(model, o, s))


def load_full_weights(path):
    """The whole model's weights from a sharded checkpoint, in one process without a process group."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = dcp.FileSystemReader(path).read_metadata()
    weights = {key.removeprefix("model."): torch.empty(item.size, dtype=item.properties.dtype)
               for key, item in metadata.state_dict_metadata.items()
               if key.startswith("model.") and isinstance(item, TensorStorageMetadata)}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message=".*load in a single process")
        dcp.load({"model": weights}, checkpoint_id=path, no_dist=True)  # this process reads every shard
    for name, first in read_meta(path).get(TIED, {}).items():
        weights[name] = weights[first]  # saved once, under its first name
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
