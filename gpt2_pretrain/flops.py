"""Throughput arithmetic: training FLOPs per token, device peaks and model FLOPs utilization (MFU).

MFU = achieved model FLOP/s / the device's dense bf16 peak, with training FLOPs per token
6N + 12*n_layer*n_embd*block_size (model.flops_per_token, nanoGPT's convention, N excluding the
position embedding as nanoGPT counts it). On CPU there is no honest peak, so MFU is None ("n/a").
"""

import torch

from model import flops_per_token

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


def model_flops_per_token(model):
    """Training FLOPs per token of a GPT (forward + backward)."""
    return flops_per_token(model.config, model.num_params(non_embedding=True))


def mfu(flops_per_token_value, tokens_per_sec, peak_flops, world_size=1):
    """Fraction of the peak reached by `tokens_per_sec` summed over `world_size` devices; None without a peak."""
    if peak_flops is None:
        return None
    return flops_per_token_value * tokens_per_sec / (peak_flops * world_size)


def format_mfu(value):
    return "n/a" if value is None else f"{100 * value:.1f}%"
