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


def get_lr(step, learning_rate, min_lr, warmup_steps, max_steps, schedule="cosine", warmdown_frac=0.2):
    """Linear warmup (step 0 already gets lr/warmup_steps), then to min_lr at max_steps, then min_lr:
    cosine: a cosine decay over all the steps after the warmup;
    wsd (warmup-stable-decay): learning_rate until the last warmdown_frac of max_steps, then linear to min_lr."""
    if step < warmup_steps:
        return learning_rate * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    if schedule == "wsd":
        warmdown_steps = max(1, round(warmdown_frac * max_steps))
        coeff = min(1.0, (max_steps - step) / warmdown_steps)  # 1 until the warmdown, then linear -> 0
    else:
        decay_ratio = (step - warmup_steps) / max(1, max_steps - warmup_steps)
        coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))  # 1 -> 0
    return min_lr + coeff * (learning_rate - min_lr)


# get_lr's arguments after step; the values a checkpoint written before the last two existed ran with
SCHEDULE_KEYS = ("learning_rate", "min_lr", "warmup_steps", "max_steps", "lr_schedule", "warmdown_frac")
SCHEDULE_BEFORE_KEYS = {"lr_schedule": "cosine", "warmdown_frac": 0.2}


def lr_jump_warning(saved, current, step):
    """A `warning:` line when a run resumed at `step` gets another lr than the checkpoint's schedule gave it
    (a finished run continued with a larger max_steps: min_lr -> mid-cosine at once), else None.
    saved, current: the checkpoint's config and this run's, as dicts."""
    saved = {**SCHEDULE_BEFORE_KEYS, **saved}
    before = get_lr(step, *(saved[key] for key in SCHEDULE_KEYS))
    after = get_lr(step, *(current[key] for key in SCHEDULE_KEYS))
    if math.isclose(before, after, rel_tol=1e-3):
        return None
    changed = ", ".join(f"{key} {saved[key]} -> {current[key]}" for key in SCHEDULE_KEYS if saved[key] != current[key])
    return (f"warning: resume at step {step}: the learning rate was {before:.3e} on the checkpoint's schedule and "
            f"is {after:.3e} on this one ({changed}): it jumps there at the first step, then follows the new schedule")


def set_lr(optimizers, lr_scale):
    """Every group follows the schedule as a multiplier of its own initial lr."""
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lr_scale


def muon_param_groups(model):
    """Names of the parameters each optimizer gets: 2-D matrices inside the blocks go to Muon, the rest to AdamW."""
    seen, groups = set(), {"matrix": [], "embedding": [], "unembedding": [], "scalar": []}
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue  # a tied weight is listed once, under its first name (transformer.wte.weight)
        seen.add(id(p))
        if p.dim() == 2 and ".h." in f".{name}":
            groups["matrix"].append((name, p))
        elif name.startswith("lm_head") or p is getattr(model, "lm_head", None).weight:
            # the output head, or wte tied to it: the head's gradient sets how large a step it takes
            groups["unembedding"].append((name, p))
        elif p.dim() >= 2:
            groups["embedding"].append((name, p))  # wpe, and wte when untied
        else:
            groups["scalar"].append((name, p))  # biases and LayerNorm gains
    return groups


def configure_muon(model, n_embd, matrix_lr, embedding_lr, unembedding_lr, scalar_lr, momentum=0.95,
                   device_type="cpu", log=print, muon_class=torch.optim.Muon):
    """nanochat's hybrid: Muon for the blocks' matrices, AdamW (0.8, 0.95), eps 1e-10 for everything else.

    AdamW's lrs are scaled by (n_embd / 768) ** -0.5 as nanochat does, so they transfer across widths.
    Muon's own shape adjustment ("original", Keller Jordan's): a (rows, cols) matrix's step is scaled by
    sqrt(max(1, rows / cols)), so tall matrices (c_fc: 4C x C) get a 2x larger step.
    muon_class: torch.optim.Muon, or a subclass that takes the same arguments (parallel.ShardedMuon).
    """
    groups = muon_param_groups(model)
    scale = (n_embd / 768) ** -0.5
    adam_groups = [
        {"params": [p for _, p in groups["embedding"]], "lr": embedding_lr * scale},
        {"params": [p for _, p in groups["unembedding"]], "lr": unembedding_lr * scale},
        {"params": [p for _, p in groups["scalar"]], "lr": scalar_lr},
    ]
    adam_groups = [g for g in adam_groups if g["params"]]
    matrices = [p for _, p in groups["matrix"]]
    muon = muon_class(matrices, lr=matrix_lr, weight_decay=0.0, momentum=momentum, nesterov=True,
                      adjust_lr_fn="original")
    adamw = torch.optim.AdamW(adam_groups, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0,
                              fused=device_type in FUSED_DEVICE_TYPES)
    for optimizer in (muon, adamw):
        for group in optimizer.param_groups:
            group["initial_lr"] = group["lr"]
    log(f"muon: {len(matrices)} matrices ({sum(p.numel() for p in matrices):,} parameters); adamw: "
        + ", ".join(f"{k} {sum(p.numel() for _, p in v):,}" for k, v in groups.items() if k != "matrix" and v))
    return [muon, adamw]


def muon_momentum(step, final=0.95, start=0.85, warmup_steps=300):
    """Muon's momentum, warmed linearly from `start` to `final` over the first warmup_steps."""
    frac = min(step / warmup_steps, 1.0)
    return (1 - frac) * start + frac * final


def set_muon_momentum(optimizers, momentum):
    for optimizer in optimizers:
        if isinstance(optimizer, torch.optim.Muon):
            for group in optimizer.param_groups:
                group["momentum"] = momentum
