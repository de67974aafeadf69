"""What a resolved config implies before anything runs (`python train.py ... --dry_run`): parameters, FLOPs,
GPU memory per process under ddp and fsdp, the largest batch that fits, the time per step at a given MFU.
"""

import copy

import torch

from gpt2_pretrain.flops import model_flops_per_token, peak_flops_for
from gpt2_pretrain.fused_loss import rows_per_chunk
from model import GPT


def meta_model(gpt_config):
    """The model built on the meta device: exact shapes and parameter counts, no memory, no time."""
    with torch.device("meta"):
        return GPT(gpt_config)


def memory_estimate(config, n_params, bf16=True, shards=1, gathered_params=0):
    """Bytes of GPU memory per process: fp32 weights, gradients, optimizer state, activations of one micro-batch.

    shards: processes that FSDP spreads weights, gradients and optimizer state over (1: ddp, every process
    holds all of it); gathered_params: parameters FSDP holds whole at once (the root unit and two blocks,
    one computing and one prefetched), as bf16 weights and fp32 gradients before their reduce-scatter.

    Activations follow Korthikanti et al. 2022 (34*B*T*C bytes per layer at 2 bytes a value, with flash
    attention so no T*T scores are kept), plus the chunked loss (fused_loss.py): one chunk's logits in
    bf16, float32 and their bf16 gradient, and the float32 gradients of the last hidden states and the
    lm_head weight it keeps. A rough guide, not a promise: measured peaks are in docs/benchmarks.md.
    """
    B, T, C, V = config.batch_size, config.block_size, config.n_embd, config.vocab_size
    value_scale = 1 if bf16 else 2
    rows = rows_per_chunk(B * T, V, torch.device("cuda"))
    # adamw keeps two fp32 moments per parameter; muon keeps one momentum on most, so this is an upper bound
    return {
        "weights": 4 * n_params / shards,
        "gradients": 4 * n_params / shards,
        "optimizer state": 8 * n_params / shards,
        **({"gathered": (2 + 4) * gathered_params} if shards > 1 else {}),
        "activations": value_scale * 34 * B * T * C * config.n_layer,
        "loss": rows * V * ((2 if bf16 else 4) + 4 + 2) + 4 * B * T * C + 4 * V * C,
    }


def largest_batch_size(config, n_params, memory_bytes, **sharding):
    """The largest batch_size whose memory_estimate fits in memory_bytes (0 when none does)."""
    fits = 0
    for batch_size in range(1, 4097):
        trial = copy.copy(config)
        trial.batch_size = batch_size
        if sum(memory_estimate(trial, n_params, **sharding).values()) > memory_bytes:
            break
        fits = batch_size
    return fits


def gib(n_bytes):
    return f"{n_bytes / 2**30:.2f} GiB"


def dry_run_report(config, gpt_config, grad_accum_steps, world_size=1):
    """The lines --dry_run prints: what the resolved config implies, without data, device or training."""
    model = meta_model(gpt_config)
    n_params = model.num_params()
    per_token = model_flops_per_token(model)
    tokens_per_step = config.total_batch_size
    block_params = sum(p.numel() for p in model.transformer.h[0].parameters())
    gathered = n_params - max(0, gpt_config.n_layer - 2) * block_params  # the root unit and two blocks
    sharding = {"ddp": {}, "fsdp": dict(shards=world_size, gathered_params=gathered)}
    lines = [
        f"parameters: {n_params:,} ({model.num_params(non_embedding=True):,} without the position embedding)",
        f"world size: {world_size} | grad_accum_steps: {grad_accum_steps} | "
        f"micro-batch: {config.batch_size} x {config.block_size} tokens per process",
        f"tokens per step: {tokens_per_step:,} | steps: {config.max_steps:,} | "
        f"total tokens: {tokens_per_step * config.max_steps:,}",
        f"FLOPs per token: {per_token:.4g} | FLOPs per step: {per_token * tokens_per_step:.4g} | "
        f"total FLOPs: {per_token * tokens_per_step * config.max_steps:.4g}",
    ]
    processes = f"{world_size} process{'es' if world_size > 1 else ''}"
    for parallel, arguments in sharding.items():
        memory = memory_estimate(config, n_params, **arguments)
        chosen = ", this run" if parallel == config.parallel else ""
        lines.append(f"GPU memory per process ({parallel}{chosen}, {processes}; estimate, bf16 autocast): "
                     + ", ".join(f"{name} {gib(size)}" for name, size in memory.items())
                     + f", total {gib(sum(memory.values()))}")
    fits = [f"{parallel} {largest_batch_size(config, n_params, 80e9, **arguments)}"
            for parallel, arguments in sharding.items()]
    lines.append(f"largest batch_size whose estimate fits an 80 GB GPU: {', '.join(fits)}")
    for name in ("H100", "A100"):
        seconds = per_token * tokens_per_step / (0.45 * peak_flops_for(name) * world_size)
        lines.append(f"time per step at 45% MFU on {world_size}x {name}: {seconds:.3g} s "
                     f"(whole run {seconds * config.max_steps / 3600:.3g} h)")
    return lines
