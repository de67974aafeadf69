"""One optimizer step, in one function that train.py and scripts/bench.py both call: what is measured is
what is trained.

    zero grads -> grad_accum_steps x (batch, forward, backward) -> mean loss over ranks -> clip
    -> schedule -> the non-finite check -> optimizer step(s)

No host sync on the way on a GPU: the loss and the gradient norm stay tensors on the device. A NaN/inf
step skips its update on the device, and the guard reads the flags when the loop next logs: torch's
fused AdamW skips inside its kernel (its found_inf input, as the AMP grad scaler uses it); any other
optimizer (Muon) steps, then puts back its parameters and states from copies taken before (torch.where on
the finite flag).
"""

from contextlib import nullcontext

import torch

from configure_optimizers import get_lr, muon_momentum, set_lr, set_muon_momentum
from distributed import all_reduce_mean
from parallel import clip_grad_norm, set_gradient_sync


def autocast_context(device_type):
    """bf16 autocast on GPUs; plain float32 on CPU, where bf16 matmuls are slow and inexact."""
    if device_type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return nullcontext()


def skips_on_device(optimizer):
    """True when the optimizer can skip a non-finite update itself (fused AdamW's found_inf)."""
    return type(optimizer) is torch.optim.AdamW and optimizer.defaults.get("fused")


@torch.no_grad()
def step_unless_nonfinite(optimizer, finite):
    """Step, then undo it where `finite` is False: parameters and existing states come back from copies, states
    the step created go back to zeros (their initial value in AdamW and Muon). No host sync."""
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    saved = [(p, p.clone(), {k: v.clone() for k, v in optimizer.state[p].items() if torch.is_tensor(v)})
             for p in params]
    optimizer.step()
    for p, before, states in saved:
        p.copy_(torch.where(finite, p, before))
        for key, value in optimizer.state[p].items():
            if torch.is_tensor(value):
                value.copy_(torch.where(finite, value, states.get(key, torch.zeros_like(value))))


def apply_update(optimizers, finite):
    """Step the optimizers unless this step's loss or gradient norm is NaN/inf, without a host sync."""
    for optimizer in optimizers:
        if skips_on_device(optimizer):
            optimizer.found_inf = (~finite).float()  # 1.0: the kernel leaves weights, moments and step count alone
            try:
                optimizer.step()
            finally:
                del optimizer.found_inf
        else:
            step_unless_nonfinite(optimizer, finite)


def train_step(model, raw_model, optimizers, next_batch, grad_accum_steps, step, config, info, guard):
    """Run optimizer step `step`; returns (mean loss, pre-clip gradient norm) as device tensors and the lr."""
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=True)
    loss_accum = torch.zeros((), device=info.device)
    for micro_step in range(grad_accum_steps):
        x, y = next_batch()
        if info.ddp:
            # only sync gradients on the last micro-step; earlier ones just accumulate locally
            set_gradient_sync(model, micro_step == grad_accum_steps - 1)
        with autocast_context(info.device_type):
            _, loss = model(x, y)
        loss = guard.inject(loss, step)  # test hook: GPT2_DEBUG_NAN_STEPS
        # scale the loss: each backward() adds into .grad, and we want the mean over micro-steps
        loss = loss / grad_accum_steps
        loss_accum += loss.detach()
        loss.backward()
    all_reduce_mean(loss_accum, info)
    max_norm = config.grad_clip if config.grad_clip > 0 else float("inf")
    grad_norm = clip_grad_norm(raw_model.parameters(), max_norm)  # pre-clip norm, over all shards
    lr = get_lr(step, config.learning_rate, config.min_lr, config.warmup_steps, config.max_steps)
    set_lr(optimizers, lr / config.learning_rate)
    set_muon_momentum(optimizers, muon_momentum(step, final=config.muon_momentum))
    finite = guard.record(step, loss_accum, grad_norm)  # same on every rank: both are already reduced
    apply_update(optimizers, finite)
    return loss_accum, grad_norm, lr
