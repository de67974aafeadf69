"""Throughput arithmetic: training FLOPs per token, device peaks and model FLOPs utilization (MFU).

MFU = achieved model FLOP/s / the device's dense bf16 peak. Training FLOPs per token count the matmuls
and attention only, forward and backward, as torch's FlopCounterMode does: 6 * (the weights of the
matmuls) + 12 * n_layer * n_embd * block_size. The embeddings are lookups, not matmuls, so an untied
token embedding adds nothing; layer norms, biases and GELU are elementwise and left out.
On CPU there is no honest peak, so MFU is None ("n/a").
"""

import torch

# dense (no sparsity) bf16 tensor-core peaks in FLOP/s, from the vendors' datasheets.
# matched in order against torch.cuda.get_device_name(), so the more specific names come first.
PEAK_FLOPS = [
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),  # 94 GB, PCIe form factor: lower clocks than the SXM part
    ("H100", 989e12),
    ("H200 NVL", 835e12),  # 141 GB, PCIe form factor, as the H100 NVL
    ("H200", 989e12),
    ("A100", 312e12),
]


def peak_flops_for(device_name, override=0.0):
    """Peak FLOP/s of one device named like torch.cuda.get_device_name(); None when unknown."""
    if override > 0:
        return override
    for name, peak in PEAK_FLOPS:
        if name.lower() in device_name.lower():
            return peak
    return None


def device_peak_flops(device, override=0.0):
    """Peak FLOP/s of `device` ("cuda:0", "cpu", ...); None on CPU/MPS or an unknown GPU unless overridden."""
    if override > 0:
        return override
    if not str(device).startswith("cuda"):
        return None
    return peak_flops_for(torch.cuda.get_device_name(torch.device(device)))


def flops_per_token(config):
    """Training FLOPs per token (forward + backward) of a GPTConfig: 2 FLOPs a multiply-add forward, 4 backward."""
    C, L = config.n_embd, config.n_layer
    # per block: c_attn C x 3C, attn.c_proj C x C, c_fc C x 4C, mlp.c_proj 4C x C; then lm_head C x V
    matmul_weights = L * 12 * C * C + C * config.vocab_size
    # attention scores q @ k^T and their use on v: 2 * 2 * T * C forward per token and layer, over the
    # whole T x T square as nanoGPT and FlopCounterMode count it (a causal kernel skips about half), twice
    # that backward
    attention = L * 12 * config.block_size * C
    return 6 * matmul_weights + attention


def model_flops_per_token(model):
    """Training FLOPs per token of a GPT (forward + backward): step line, W&B, bench.py and --dry_run."""
    return flops_per_token(model.config)


def mfu(flops_per_token_value, tokens_per_sec, peak_flops, world_size=1):
    """Fraction of the peak reached by `tokens_per_sec` summed over `world_size` devices; None without a peak."""
    if peak_flops is None:
        return None
    return flops_per_token_value * tokens_per_sec / (peak_flops * world_size)


def format_mfu(value):
    return "n/a" if value is None else f"{100 * value:.1f}%"
