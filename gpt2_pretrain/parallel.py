"""How the model is spread over processes: DDP (every rank holds everything) or FSDP2 (each rank holds a
shard of every weight, gradient and optimizer state), gradient sync and global-norm clipping.

    --parallel=ddp   DistributedDataParallel; one process without torchrun needs nothing at all
    --parallel=fsdp  torch.distributed.fsdp.fully_shard on each block, then on the whole model (the root
                     unit holds wte, tied to lm_head, wpe and ln_f); bf16 weights gathered for compute and
                     fp32 gradient reduction on CUDA; the same code under gloo on CPU
    --compile        ddp: the whole model; fsdp: each block before fully_shard (gpt2_pretrain/compiling.py)

Gradient accumulation: DDP syncs only on the last micro-step (earlier ones accumulate locally, costing
nothing extra: DDP holds whole gradients anyway). FSDP reduce-scatters on every micro-step: turning the
sync off would make it keep each weight's whole fp32 gradient between micro-steps (6 GB a GPU for
GPT-2 XL), more than its shards of weights, gradients and optimizer state together, on the memory that
FSDP is there to save; the reduce-scatters overlap with the backward.
"""

import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from gpt2_pretrain.activation_checkpointing import apply_activation_checkpointing
from gpt2_pretrain.compiling import compile_blocks

# fsdp and DTensor are imported where a sharded run needs them: importing them costs about 1.5 s of every
# start-up (train.py, each torchrun worker, the scripts), which a ddp or single-process run never uses


def is_dtensor(value):
    """isinstance(value, DTensor) without importing DTensor: no tensor is one unless fsdp has loaded it."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(value, module.DTensor)


def ensure_process_group(info):
    """FSDP needs a process group even for one process without torchrun: a private one-rank group then."""
    if not dist.is_initialized():
        cuda = info.device_type == "cuda"
        device = torch.device(info.device if ":" in info.device or not cuda else f"cuda:{torch.cuda.current_device()}")
        dist.init_process_group("nccl" if cuda else "gloo", store=dist.HashStore(), rank=0, world_size=1,
                                device_id=device if cuda else None)


def shard_model(model, info):
    """fully_shard each transformer block, then the root (in place: `model` becomes the FSDP module)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    ensure_process_group(info)
    policy = MixedPrecisionPolicy()  # float32 throughout on CPU
    if info.device_type == "cuda":
        # weights gathered in bf16 for the matmuls, gradients reduced in fp32, fp32 master weights kept sharded
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in model.transformer.h:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)  # the rest, wte/lm_head's tied weight included, lives in the root unit
    if info.device_type != "cuda" and hasattr(model, "set_force_sum_reduction_for_comms"):
        # gloo has no AVG reduction: sum, then divide by the world size ourselves (pytorch issue 162338)
        model.set_force_sum_reduction_for_comms(True)
    return model


def wrap_model(raw_model, config, info):
    """(model to train, model to evaluate): blocks checkpointed as configured, compiled when config.compile,
    sharded or DDP-wrapped. The order, checkpoint then compile then shard under fsdp, is torchtitan's; ddp
    compiles the whole model (docs/distributed.md#torchcompile says why each)."""
    # first: fsdp's hooks and compile must see the checkpointed forward, so a block's recompute in the
    # backward runs inside fsdp's all-gather of it and inside the compiled graph (docs/distributed.md)
    apply_activation_checkpointing(raw_model.transformer.h, config.activation_checkpointing, config.ac_every)
    if config.parallel == "fsdp":
        if config.compile:
            compile_blocks(raw_model.transformer.h)  # before fully_shard: its hooks stay outside the graphs
        shard_model(raw_model, info)
        return raw_model, raw_model
    model = torch.compile(raw_model) if config.compile else raw_model
    eval_model = model  # not DDP-wrapped: evaluation needs no gradient sync
    if info.ddp:
        model = DDP(model, device_ids=[info.local_rank] if info.device_type == "cuda" else None)
    return model, eval_model


def set_gradient_sync(model, enabled):
    """DDP: sync gradients on this backward (the last micro-step) or only accumulate locally (earlier ones).
    An FSDP module is left syncing on every micro-step (see the module docstring)."""
    if isinstance(model, DDP):
        model.require_backward_grad_sync = enabled


def clip_grad_norm(parameters, max_norm):
    """Clip to the global norm over every shard; return the pre-clip norm as a plain tensor."""
    parameters = [p for p in parameters if p.grad is not None]
    grads = [p.grad for p in parameters]
    total_norm = torch.nn.utils.get_total_norm(grads)
    if is_dtensor(total_norm):
        total_norm = total_norm.full_tensor()  # the sum of squares over all ranks' shards
    torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total_norm)
    return total_norm
