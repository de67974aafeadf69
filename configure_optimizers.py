"""Optimizer setup and learning-rate schedule.

AdamW with weight decay on the matmul and embedding weights (every parameter with dim >= 2) and none on
biases and LayerNorm parameters. Knows nothing about data or distribution: it takes a model and numbers.
"""

import math

import torch

FUSED_DEVICE_TYPES = ("cuda", "cpu")  # where torch's fused AdamW kernel exists


def param_groups(model, weight_decay):
    """Split trainable parameters into a decayed group (dim >= 2) and an undecayed one; tied weights once."""
    params = [p for p in model.parameters() if p.requires_grad]  # parameters() yields a tied weight once
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def configure_adamw(model, weight_decay, learning_rate, betas=(0.9, 0.95), eps=1e-8, device_type="cpu",
                    log=print):
    groups = param_groups(model, weight_decay)
    n_decay = sum(p.numel() for p in groups[0]["params"])
    n_no_decay = sum(p.numel() for p in groups[1]["params"])
    log(f"adamw: {len(groups[0]['params'])} decayed tensors ({n_decay:,} parameters), "
        f"{len(groups[1]['params'])} undecayed tensors ({n_no_decay:,} parameters)")
    fused = device_type in FUSED_DEVICE_TYPES
    optimizer = torch.optim.AdamW(groups, lr=learning_rate, betas=betas, eps=eps, fused=fused)
    for group in optimizer.param_groups:
        group["initial_lr"] = learning_rate
    return optimizer


def get_lr(step, learning_rate, min_lr, warmup_steps, max_steps):
    """Linear warmup (step 0 already gets lr/warmup_steps), cosine decay to min_lr at max_steps, then min_lr."""
    if step < warmup_steps:
        return learning_rate * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    decay_ratio = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))  # 1 -> 0
    return min_lr + coeff * (learning_rate - min_lr)


def set_lr(optimizers, lr_scale):
    """Every group follows the schedule as a multiplier of its own initial lr."""
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lr_scale
