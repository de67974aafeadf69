"""What a resolved config implies before anything runs (`python train.py ... --dry_run`): parameters, FLOPs,
and for the device the run would use: on a GPU the memory per process under ddp and fsdp, the largest batch
that fits and the time per step at a given MFU; on a CPU the memory against the RAM available.
"""

import copy
import os

import torch

from gpt2_pretrain.activation_checkpointing import checkpointed_blocks
from gpt2_pretrain.flops import model_flops_per_token, peak_flops_for
from gpt2_pretrain.fused_loss import rows_per_chunk
from model import GPT


def meta_model(gpt_config):
    """The model built on the meta device: exact shapes and parameter counts, no memory, no time."""
    with torch.device("meta"):
        return GPT(gpt_config)


# what a step holds besides the counted bytes, as (factor, fixed bytes): peak = factor * counted + fixed.
# cuda, from GPT-2 124M at batch 64 compiled on one H100 (docs/benchmarks.md#gpt-2-124m-on-one-h100): 29.7 GiB
# peak allocated against 24.2 counted (x1.23: the compiled graph's own choice of what to keep, the loss's
# chunk buffers), plus the caching allocator's reserve above what is allocated; the fixed GiB for cuBLAS and
# NCCL workspaces and the kernels loaded after start-up. cpu, from 124M steps at batch 8 under each
# --activation_checkpointing (docs/benchmarks.md#activation-checkpointing-on-a-cpu): peak RSS up to 2.65 GiB
# above the count (full, whose count is smallest): the interpreter and torch's libraries, and the heap's
# holes, which keep_large_allocations_on_heap never gives back. docs/distributed.md#what-the-memory-estimate-
# leaves-out says more.
MARGIN = {"cuda": (1.3, 2**30), "cpu": (1.25, 2 * 2**30)}


def peak_estimate(memory, device_type):
    """The estimated peak bytes of a process: the counted bytes (memory_estimate) with the margin."""
    factor, fixed = MARGIN["cuda" if device_type == "cuda" else "cpu"]
    return factor * sum(memory.values()) + fixed


def memory_estimate(config, n_params, bf16=True, shards=1, gathered_params=0, device_type="cuda"):
    """Bytes of GPU memory per process: fp32 weights, gradients, optimizer state, activations of one micro-batch.

    shards: processes that FSDP spreads weights, gradients and optimizer state over (1: ddp, every process
    holds all of it); gathered_params: parameters FSDP holds whole at once (the root unit and two blocks,
    one computing and one prefetched), as bf16 weights and fp32 gradients before their reduce-scatter.

    Activations: what autograd keeps through the forward (activation_bytes), and with activation
    checkpointing one block's, recomputed during its backward. The loss: the chunked loss (fused_loss.py),
    one chunk's logits in bf16, float32 and their bf16 gradient, and the float32 gradients of the last
    hidden states and the lm_head weight it keeps. A guide, not a promise: measured peaks are in
    docs/benchmarks.md, and what is not counted in docs/distributed.md#activation-checkpointing.
    """
    B, T, C, V = config.batch_size, config.block_size, config.n_embd, config.vocab_size
    kept, recompute = activation_bytes(config, bf16)
    rows = rows_per_chunk(B * T, V, torch.device(device_type))
    # adamw keeps two fp32 moments per parameter; muon keeps one momentum on most, so this is an upper bound
    return {
        "weights": 4 * n_params / shards,
        "gradients": 4 * n_params / shards,
        "optimizer state": 8 * n_params / shards,
        **({"gathered": (2 + 4) * gathered_params} if shards > 1 else {}),
        "activations": kept,
        **({"recompute": recompute} if recompute else {}),
        "loss": rows * V * ((2 if bf16 else 4) + 4 + 2) + 4 * B * T * C + 4 * V * C,
    }


def activation_bytes(config, bf16=True):
    """(bytes autograd keeps through the forward of one micro-batch, bytes of one checkpointed block's
    recompute in its backward), counted op by op for model.py. Exact in float32 on a CPU (tests measure
    it with saved_tensors_hooks); under bf16 autocast the matmuls keep bf16 inputs and outputs.

    A block keeps, per token: its input and the mid-block residual (LayerNorm inputs) in float32, since the
    residual adds stay float32 under autocast (fsdp's bf16 weights make them bf16: this is its upper bound);
    14 values of C at the matmul width (ln_1's output, q, k, v, the attention output, ln_2's output, c_fc's
    4C output and the GELU's 4C); float32 LayerNorm mean and rstd (4) and attention logsumexp per head.
    No (T, T) scores: flash attention. No dropout masks: dropout is 0 for pretraining. A checkpointed
    block keeps only its input. Outside the blocks: ln_f's input and statistics, the token and position ids.
    """
    B, T, C, n_head = config.batch_size, config.block_size, config.n_embd, config.n_head
    residual, value = 4, 2 if bf16 else 4
    block = B * T * (C * (2 * residual + 14 * value) + 4 * (4 + n_head))
    checkpointed = len(checkpointed_blocks(config.n_layer, config.activation_checkpointing, config.ac_every))
    outside = B * T * (C * residual + 4 * 2) + 8 * B * T + 8 * T
    kept = (config.n_layer - checkpointed) * block + checkpointed * B * T * C * residual + outside
    return kept, block if checkpointed else 0


def batch_peak(config, batch_size, n_params, device_type="cuda", **sharding):
    """The estimated peak bytes (margin included) of one process of this run at another batch_size."""
    trial = copy.copy(config)
    trial.batch_size = batch_size
    memory = memory_estimate(trial, n_params, bf16=device_type == "cuda", device_type=device_type, **sharding)
    return peak_estimate(memory, device_type)


def largest_batch_size(config, n_params, memory_bytes, **sharding):
    """The largest batch_size whose estimated peak fits in memory_bytes on a GPU (0 when none does)."""
    fits = 0
    for batch_size in range(1, 4097):
        if batch_peak(config, batch_size, n_params, **sharding) > memory_bytes:
            break
        fits = batch_size
    return fits


def sharding_options(model, world_size):
    """memory_estimate's arguments for each --parallel: fsdp shards over the processes and holds the root
    unit and two blocks gathered."""
    block_params = sum(p.numel() for p in model.transformer.h[0].parameters())
    gathered = model.num_params() - max(0, len(model.transformer.h) - 2) * block_params
    return {"ddp": {}, "fsdp": dict(shards=world_size, gathered_params=gathered)}


def margin_text(device_type):
    factor, fixed = MARGIN["cuda" if device_type == "cuda" else "cpu"]
    return f"x{factor:g} + {gib(fixed)}"


def gib(n_bytes):
    return f"{n_bytes / 2**30:.2f} GiB"


def device_kind(requested):
    """cuda, mps or cpu: the kind of device --device would give on this machine (auto: the best one here)."""
    if requested != "auto":
        return requested.split(":")[0]
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    return "cuda" if torch.cuda.is_available() else "mps" if mps else "cpu"


def available_ram():
    """Bytes of memory available to new processes on this machine (Linux MemAvailable), or None when unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def host_lines(config, n_params, kind, world_size):
    """A CPU (or MPS) run: its memory in float32 against the RAM available, and no guessed time per step."""
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))  # the processes sharing this machine's RAM
    memory = memory_estimate(config, n_params, bf16=False, device_type=kind)
    total = peak_estimate(memory, kind) * processes
    ram = available_ram()
    against = f"{gib(ram)} RAM available now" if ram is not None else "RAM available unknown"
    lines = [f"{kind.upper()} memory per process (this run, activation_checkpointing={config.activation_checkpointing}"
             f", estimate, float32): " + ", ".join(f"{name} {gib(size)}" for name, size in memory.items())
             + f", total {gib(sum(memory.values()))}; peak with margin ({margin_text(kind)}) "
             f"{gib(peak_estimate(memory, kind))}; {processes} process{'es' if processes > 1 else ''} on this "
             f"machine: {gib(total)} of {against}"]
    if ram is not None and total > ram:
        lines.append(f"warning: the estimate ({gib(total)}) is more than the RAM available ({gib(ram)}): lower "
                     f"--batch_size, or let --batch_size=auto choose (gradient accumulation keeps the tokens per step)")
    lines.append(f"time per step on this {kind.upper()}: not estimated (no known peak FLOP/s): measure it with "
                 f"python scripts/bench.py and this run's config and flags (--device=cuda --dry_run gives GPU "
                 f"estimates)")
    return lines


def dry_run_report(config, gpt_config, grad_accum_steps, world_size=1):
    """The lines --dry_run prints: what the resolved config implies, without data or training."""
    model = meta_model(gpt_config)
    n_params = model.num_params()
    per_token = model_flops_per_token(model)
    tokens_per_step = config.total_batch_size
    sharding = sharding_options(model, world_size)
    lines = [
        f"parameters: {n_params:,} ({model.num_params(non_embedding=True):,} without the position embedding)",
        f"world size: {world_size} | grad_accum_steps: {grad_accum_steps} | "
        f"micro-batch: {config.batch_size} x {config.block_size} tokens per process",
        f"tokens per step: {tokens_per_step:,} | steps: {config.max_steps:,} | "
        f"total tokens: {tokens_per_step * config.max_steps:,}",
        f"FLOPs per token: {per_token:.4g} | FLOPs per step: {per_token * tokens_per_step:.4g} | "
        f"total FLOPs: {per_token * tokens_per_step * config.max_steps:.4g}",
    ]
    kind = device_kind(config.device)
    if kind != "cuda":
        return lines + host_lines(config, n_params, kind, world_size)
    processes = f"{world_size} process{'es' if world_size > 1 else ''}"
    for parallel, arguments in sharding.items():
        memory = memory_estimate(config, n_params, **arguments)
        chosen = ", this run" if parallel == config.parallel else ""
        lines.append(f"GPU memory per process ({parallel}{chosen}, {processes}, activation_checkpointing="
                     f"{config.activation_checkpointing}; estimate, bf16 autocast): "
                     + ", ".join(f"{name} {gib(size)}" for name, size in memory.items())
                     + f", total {gib(sum(memory.values()))}; peak with margin ({margin_text(kind)}) "
                     f"{gib(peak_estimate(memory, kind))}")
    fits = [f"{parallel} {largest_batch_size(config, n_params, 80e9, **arguments)}"
            for parallel, arguments in sharding.items()]
    lines.append(f"largest batch_size whose estimated peak (margin included) fits an 80 GB GPU: {', '.join(fits)}")
    for name in ("H100", "A100"):
        seconds = per_token * tokens_per_step / (0.45 * peak_flops_for(name) * world_size)
        lines.append(f"time per step at 45% MFU on {world_size}x {name}: {seconds:.3g} s "
                     f"(whole run {seconds * config.max_steps / 3600:.3g} h)")
    return lines
