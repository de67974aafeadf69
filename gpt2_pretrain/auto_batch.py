"""--batch_size=auto: the largest micro-batch whose estimated peak memory fits, chosen before the run starts.

    python train.py configs/gpt2_124m.py --batch_size=auto                          # the GPU's free memory
    python train.py configs/gpt2_124m.py --batch_size=auto --memory_limit_gb=40     # at most 40 GiB of it

The candidates are the powers of two that divide total_batch_size / (block_size * world_size), so gradient
accumulation keeps total_batch_size whichever is chosen. Each is judged by the --dry_run estimate with its
margin (dry_run.peak_estimate) against the memory this process may use: on CUDA the device's free memory
(torch.cuda.mem_get_info), elsewhere the machine's available RAM shared by the processes on it;
--memory_limit_gb caps either. Under torchrun each rank judges its own device: ranks whose free memory
differs can choose differently, which the ranks' config check stops before the first step; a
--memory_limit_gb below every rank's free memory makes them agree.
"""

import copy
import os

import torch

from gpt2_pretrain.dry_run import (available_ram, batch_peak, device_kind, gib, margin_text, meta_model,
                                   sharding_options)
from gpt2_pretrain.errors import ConfigError, check_device


def memory_limit(config, world_size):
    """(bytes one process may plan for, what they are, in words)."""
    kind = device_kind(config.device)
    cap = config.memory_limit_gb * 2**30 if config.memory_limit_gb > 0 else None
    found, what = None, None
    if kind == "cuda" and torch.cuda.is_available():
        device = check_device(config.device, int(os.environ.get("LOCAL_RANK", "0")), torchrun="RANK" in os.environ)
        found, what = torch.cuda.mem_get_info(device)[0], f"free on {device}"
    elif kind != "cuda" and (ram := available_ram()) is not None:
        processes = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))  # the processes sharing this RAM
        found = ram // processes
        what = "RAM available" + (f" / {processes} processes on this machine" if processes > 1 else "")
    if cap is not None and (found is None or cap < found):
        return cap, f"{gib(cap)} (--memory_limit_gb={config.memory_limit_gb:g}" + (f"; {gib(found)} {what})"
                                                                                    if what else ")")
    if found is None:
        where = "free on a GPU (none is visible)" if kind == "cuda" else "available on this machine"
        raise ConfigError(f"--batch_size=auto cannot read the memory {where}: give --memory_limit_gb=GIB, the "
                          f"memory per process to plan for, or a number for --batch_size.")
    return found, f"{gib(found)} {what}"


def resolve_batch_size(config, gpt_config, world_size, log=print):
    """config.batch_size, or for "auto" the largest power of two dividing total_batch_size / (block_size *
    world_size) whose estimated peak fits in memory_limit(config); says which and why in two lines (log)."""
    if config.batch_size != "auto":
        return config.batch_size
    sequences, rest = divmod(config.total_batch_size, config.block_size * world_size)
    if rest:
        raise ConfigError(f"--batch_size=auto needs total_batch_size ({config.total_batch_size}) to be a multiple of "
                          f"block_size * world_size = {config.block_size} * {world_size}: change --total_batch_size.")
    candidates = [2**k for k in range(sequences.bit_length()) if sequences % 2**k == 0]
    model, kind = meta_model(gpt_config), device_kind(config.device)
    sharding = sharding_options(model, world_size)[config.parallel]
    peaks = {size: batch_peak(config, size, model.num_params(), kind, **sharding) for size in candidates}
    limit, limit_text = memory_limit(config, world_size)
    fitting = [size for size in candidates if peaks[size] <= limit]
    setting = f"--parallel={config.parallel}, --activation_checkpointing={config.activation_checkpointing}"
    if not fitting:
        full = copy.copy(config)
        full.activation_checkpointing = "full"
        full_peak = batch_peak(full, 1, model.num_params(), kind, **sharding)
        raise ConfigError(
            f"--batch_size=auto: even batch_size=1 needs an estimated {gib(peaks[1])} per process ({setting}, margin "
            f"{margin_text(kind)} included), {gib(peaks[1] - limit)} more than {limit_text}. Lower the memory a "
            f"sequence needs (--activation_checkpointing=full: {gib(full_peak)}; --parallel=fsdp over more "
            f"processes; a smaller --block_size) or give it more memory (another device, a higher --memory_limit_gb).")
    chosen = fitting[-1]
    larger = [size for size in candidates if size > chosen]
    why = (f"{larger[0]} would need {gib(peaks[larger[0]])}" if larger else
           f"the largest candidate: total_batch_size / (block_size * world_size) = {sequences}")
    log(f"batch_size=auto: {chosen}, estimated peak {gib(peaks[chosen])} per process ({setting}, margin "
        f"{margin_text(kind)} included) within {limit_text}; {why}")
    log(f"  grad_accum_steps {sequences // chosen} keeps total_batch_size {config.total_batch_size:,}")
    return chosen
