"""One optimizer step, in one function that train.py and scripts/bench.py both call: what is measured is
what is trained.

    zero grads -> grad_accum_steps x (batch, forward, backward) -> mean loss over ranks -> clip
    -> schedule -> the non-finite check -> optimizer step(s)

The loss and the gradient norm stay tensors on the device. A NaN/inf step skips its update: torch's fused
AdamW skips inside its kernel (its found_inf input, as the AMP grad scaler uses it), with no host sync;
any other optimizer (Muon) reads the finite flag on the host once and does not step at all, so a skipped
step leaves every parameter and state bit for bit as it was.

Why a host read for Muon rather than a masked update on the device: it is exact by construction, keeps
torch.optim.Muon's own step under ddp (and ShardedMuon's under fsdp) unchanged, and needs no copies; an
undo from copies cost a copy of every Muon parameter and momentum each step (about 680 MB at 124M), and
a masked update would mean our own Muon under ddp too. The price is one wait for the device per step,
before the Muon step; with the default log_interval=1 the loop reads the loss on the host every step
anyway.
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


def apply_update(optimizers, finite):
    """Step the optimizers unless this step's loss or gradient norm is NaN/inf (`finite`, a device bool)."""
    finite_on_host = None
    for optimizer in optimizers:
        if skips_on_device(optimizer):
            optimizer.found_inf = (~finite).float()  # 1.0: the kernel leaves weights, moments and step count alone
            try:
                optimizer.step()
            finally:
                del optimizer.found_inf
            continue
        if finite_on_host is None:
            finite_on_host = bool(finite)  # one host sync, the same answer on every rank (loss and norm are reduced)
        if finite_on_host:
            optimizer.step()


def train_step(model, raw_model, optimizers, next_batch, grad_accum_steps, step, config, info, guard):
    """Run optimizer step `step`; returns (mean loss, pre-clip gradient norm) as device tensors and the lr."""
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=True)
    loss_accum = torch.zeros((), device=info.device)
    for micro_step in range(grad_accum_steps):
        x, y = next_batch()
        if info.ddp:
            # ddp: only sync gradients on the last micro-step; earlier ones just accumulate locally
            # (fsdp reduce-scatters on every one, so no whole gradient waits between them: parallel.py)
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
