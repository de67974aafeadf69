"""Pretrain a GPT-2-class model. Reads top to bottom: config -> data -> model -> optimizer -> loop.

    python train.py configs/shakespeare.py                      # the CPU quickstart
    python train.py configs/gpt2_124m.py --batch_size=32         # GPT-2 124M on one GPU
    torchrun --standalone --nproc_per_node=8 train.py configs/gpt2_124m.py
    python train.py --help                                       # every key, its default and help
"""

import contextlib
import os
import shutil
import signal
import sys
import time

if __name__ == "__main__":
    def interrupted_while_loading(signum, frame):
        print("error: interrupted by Ctrl-C during start-up, before anything was written: run the command again "
              "(with --resume=auto, a run's checkpoints in out_dir are continued).", file=sys.stderr, flush=True)
        raise SystemExit(2)

    # a Ctrl-C while torch loads (seconds) is one line, not an import traceback; Python's own handler is put
    # back below, before main() (whose start-up turns a Ctrl-C into its own line)
    signal.signal(signal.SIGINT, interrupted_while_loading)

import torch  # noqa: E402
from safetensors import SafetensorError

from config import (ARCHITECTURE_KEYS, ConfigError, config_to_dict, format_config, help_text, load_config, plan_warnings,
                    save_config)
from configure_optimizers import (configure_adamw, configure_muon, get_lr, lr_jump_warning, muon_momentum, set_lr,
                                  set_muon_momentum)
from data.loader import DataError, DataLoader, split_tokens
from data.tokenizer import decode, encode
from gpt2_pretrain import console
from gpt2_pretrain.allocator import keep_large_allocations_on_heap
from gpt2_pretrain.auto_batch import resolve_batch_size
from gpt2_pretrain.checkpoint.checkpointer import Checkpointer
from gpt2_pretrain.checkpoint.files import init_weights, list_checkpoints
from gpt2_pretrain.compiling import eagerly
from gpt2_pretrain.distributed import (all_reduce_mean, all_reduce_sum, barrier, end_of_run, print0,
                                       seed_rank_streams, setup_distributed)
from gpt2_pretrain.dry_run import dry_run_report
from gpt2_pretrain.errors import check_ranks_agree, check_shared_out_dir, fail, hold_out_dir, reported_as_errors
from gpt2_pretrain.flops import device_peak_flops, mfu, model_flops_per_token
from gpt2_pretrain.guards import NonFiniteError, NonFiniteGuard, StopSignal, apply_update
from gpt2_pretrain.hellaswag import HellaSwagError, evaluate_hellaswag, load_hellaswag
from gpt2_pretrain.hf_interop import import_hf, mismatched_keys
from gpt2_pretrain.logging import Logger, Progress, data_size, run_summary
from gpt2_pretrain.muon import ShardedMuon
from gpt2_pretrain.parallel import clip_grad_norm, set_gradient_sync, wrap_model
from gpt2_pretrain.watchdog import beat, process_group_timeout, watching
from model import GPT, GPTConfig


def grad_accum_steps_for(config, world_size):
    """Micro-steps per optimizer step; refuses batch arithmetic that doesn't divide."""
    tokens_per_micro_step = config.batch_size * config.block_size * world_size
    if config.total_batch_size % tokens_per_micro_step:
        raise ConfigError(
            f"total_batch_size ({config.total_batch_size}) must be a multiple of batch_size * block_size * "
            f"world_size = {config.batch_size} * {config.block_size} * {world_size} = {tokens_per_micro_step}. "
            f"Change --total_batch_size, --batch_size or the number of processes."
        )
    return config.total_batch_size // tokens_per_micro_step


def model_config(config):
    return GPTConfig(block_size=config.block_size, vocab_size=config.vocab_size, n_layer=config.n_layer,
                     n_head=config.n_head, n_embd=config.n_embd, dropout=config.dropout,
                     **{key: getattr(config, key) for key in ARCHITECTURE_KEYS})


def make_optimizers(config, model, device_type, log=print0):
    """A list of optimizers; each param group carries 'initial_lr', which the schedule scales."""
    if config.optimizer == "muon":
        return configure_muon(model, config.n_embd, config.matrix_lr, config.embedding_lr, config.unembedding_lr,
                              config.learning_rate, config.muon_momentum, device_type=device_type, log=log,
                              muon_class=ShardedMuon if config.parallel == "fsdp" else torch.optim.Muon)
    adamw = configure_adamw(model, config.weight_decay, config.learning_rate, (config.beta1, config.beta2),
                            device_type=device_type, log=log)
    return [adamw]


def autocast_context(device_type):
    """bf16 autocast on GPUs; plain float32 on CPU, where bf16 matmuls are slow and inexact."""
    if device_type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_step(model, optimizers, next_batch, grad_accum_steps, step, config, info, guard):
    """One optimizer step, the one scripts/bench.py times too: zero grads -> grad_accum_steps x (batch,
    forward, backward) -> mean loss over ranks -> clip -> schedule -> the update (skipped when NaN/inf).
    Returns (mean loss, pre-clip gradient norm) as device tensors, so a GPU step needs no host sync, and the lr."""
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
    grad_norm = clip_grad_norm(model.parameters(), max_norm)  # pre-clip norm, over all shards
    lr = get_lr(step, config.learning_rate, config.min_lr, config.warmup_steps, config.max_steps, config.lr_schedule,
                config.warmdown_frac)
    set_lr(optimizers, lr / config.learning_rate)
    set_muon_momentum(optimizers, muon_momentum(step, final=config.muon_momentum))
    finite = guard.record(step, loss_accum, grad_norm)  # same on every rank: both are already reduced
    apply_update(optimizers, finite)  # fused AdamW skips on the device; Muon after one host read (guards.py)
    return loss_accum, grad_norm, lr


def load_gpt2_folder(model, config):
    """Start from a local GPT-2 folder (e.g. written by scripts/export_hf.py or a transformers save), or from
    the weights of one of our checkpoints (a .pt file or .dcp folder)."""
    if os.path.isfile(config.init_from) or os.path.isfile(os.path.join(config.init_from, ".metadata")):
        model.load_state_dict(init_weights(config.init_from, config))
        return
    if not os.path.isfile(os.path.join(config.init_from, "model.safetensors")):
        raise ConfigError(f"init_from '{config.init_from}' has no model.safetensors: give a GPT-2 folder "
                          f"with config.json and model.safetensors.")
    try:
        model_keys, state = import_hf(config.init_from, config.vocab_size)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, SafetensorError) as e:  # not JSON, not a dict
        raise ConfigError(f"init_from '{config.init_from}' is not a GPT-2 folder that can be read ({type(e).__name__}: "
                          f"{e}): give a folder written by scripts/export_hf.py or transformers.") from None
    differ = mismatched_keys(model_keys, config)
    if differ:
        raise ConfigError(f"init_from '{config.init_from}' is another model shape: {'; '.join(differ)}. "
                          f"Set these keys to the folder's values.")
    model.load_state_dict(state)


def hellaswag_examples(config, info):
    """The HellaSwag val examples (rank 0 reads or downloads them and broadcasts), or None when turned off."""
    if not config.hellaswag:
        return None
    try:
        return load_hellaswag(config.hellaswag_path)
    except HellaSwagError as e:
        raise DataError(str(e)) from None


@torch.no_grad()
def evaluate(model, val_loader, config, info):
    """Mean val loss over eval_iters * batch_size windows spread evenly over the whole val split (all of it
    with eval_iters=-1): the same windows at every evaluation, whatever the world size."""
    model.eval()
    windows = val_loader.spread_windows(config.eval_iters * config.batch_size if config.eval_iters > 0 else None)
    per_call = config.batch_size * info.world_size
    loss_sum = torch.zeros((), device=info.device, dtype=torch.float64)
    for call_start in range(0, len(windows), per_call):
        first = call_start + info.rank * config.batch_size
        mine = windows[first:min(first + config.batch_size, call_start + per_call)]
        x, y = val_loader.windows(mine, config.batch_size)  # padding rows: targets -1, same shapes on every call
        with autocast_context(info.device_type):
            _, loss = model(x, y)  # on every rank, rows or none: under fsdp each forward is a collective
        if len(mine):  # a rank without rows has a nan loss (no target counted): it adds nothing
            loss_sum += loss.double() * len(mine) * config.block_size
    all_reduce_sum(loss_sum, info)
    model.train()
    return (loss_sum / (len(windows) * config.block_size)).item()


@eagerly  # fsdp's blocks are compiled in place: each new length would compile
def generate_sample(model, config, device, step):
    model.eval()  # no dropout while sampling
    prompt = torch.tensor([encode(config.sample_prompt or "\n")], dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(config.seed + step)
    with autocast_context(torch.device(device).type):
        out = model.generate(prompt, config.sample_tokens, temperature=1.0, top_k=50, generator=generator)
    model.train()
    return decode(out[0].tolist())


def train(config, info, argv=()):
    console.begin()  # what this run prints goes to out_dir/console.log from its first metrics record
    grad_accum_steps = grad_accum_steps_for(config, info.world_size)
    device_type = info.device_type
    if device_type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 matmuls

    # data
    loader_args = dict(batch_size=config.batch_size, block_size=config.block_size, rank=info.rank,
                       world_size=info.world_size, seed=config.seed, device=info.device, vocab_size=config.vocab_size)
    started = time.time()
    train_loader = DataLoader(config.data_dir, "train", shuffle=config.shuffle, **loader_args)
    val_loader = DataLoader(config.data_dir, "val", shuffle=False, **loader_args)
    if train_loader.hashed_bytes + val_loader.hashed_bytes:
        print0(f"checked the sha256 of {data_size(train_loader.hashed_bytes + val_loader.hashed_bytes)} of shards "
               f"against manifest.json in {time.time() - started:.1f}s (not again while they are unchanged)")
    check_ranks_agree(config_to_dict(config), train_loader.manifest_shards)  # a difference: an error, not a hang
    hellaswag = hellaswag_examples(config, info)

    # model: the same initial weights on every rank
    torch.manual_seed(config.seed)
    raw_model = GPT(model_config(config))
    if config.init_from:
        load_gpt2_folder(raw_model, config)
    seed_rank_streams(config.seed, info.rank)  # from here each rank its own: dropout masks differ across ranks
    raw_model.to(info.device)
    model, eval_model = wrap_model(raw_model, config, info)  # ddp, or fsdp: raw_model's weights become shards
    optimizers = make_optimizers(config, raw_model, device_type)
    # resume: weights, optimizers, loader position and counters from a checkpoint (config.resume), or start fresh
    checkpoints = Checkpointer(config, info, raw_model, optimizers, train_loader)
    start_step = checkpoints.resume()
    if checkpoints.resumed_config:  # a changed schedule moves the lr at once: say from what to what
        jump = lr_jump_warning(checkpoints.resumed_config, config_to_dict(config), start_step)
        if jump:
            print0(jump)

    if info.is_master:
        os.makedirs(config.out_dir, exist_ok=True)
        save_config(config, os.path.join(config.out_dir, "config.json"))
    logger = Logger(config.out_dir, enabled=info.is_master, wandb_mode=config.wandb_mode,
                    wandb_project=config.wandb_project, wandb_run_name=config.wandb_run_name,
                    config=config_to_dict(config), wandb_run_id=checkpoints.wandb_run_id, max_steps=config.max_steps)
    print0(format_config(config))
    print0(f"parameters: {raw_model.num_params():,} | device: {info.device} | world size: {info.world_size} | "
           f"grad_accum_steps: {grad_accum_steps} | tokens per step: {config.total_batch_size:,}")
    for warning in plan_warnings(config, train_tokens=sum(tokens.size for tokens in train_loader.tokens)):
        print0(warning)

    per_token_flops, peak_flops = model_flops_per_token(raw_model), device_peak_flops(info.device, config.peak_flops)
    guard = NonFiniteGuard(config.max_nonfinite_steps, total=checkpoints.nonfinite_steps)
    # SIGTERM/SIGINT/SIGHUP/SIGUSR1: finish the step, checkpoint within stop_grace seconds, exit 0
    stop = StopSignal(info, config.stop_check_interval, config.stop_grace)
    checkpoints.restore_rng()  # last before the loop: the resumed run draws the same random numbers

    window_start, step, stopping = None, start_step, False
    progress = Progress(started, config.max_steps)  # elapsed time and ETA on each step's line
    for step in range(start_step, config.max_steps + 1):
        beat(step)  # the hang watchdog's (main()): host-side only, no sync
        last_step = step == config.max_steps
        stopping = stop.requested(step)
        saving = checkpoints.due(step, final=last_step or stopping)
        evaluating = config.eval_iters != 0 and (step % config.eval_interval == 0 or last_step)
        if saving or evaluating:
            guard.check(logger)  # the saved count of NaN/inf steps is complete
            window_start = None  # the time spent here is no training step's
            stop.check_soon(step)  # a signal during this pause is answered at the next step
        counters = {"nonfinite_steps": guard.total, "wandb_run_id": logger.wandb_run_id,  # what a checkpoint keeps
                    "run_seconds": checkpoints.run_seconds + time.time() - started}
        if saving:
            checkpoints.save(step, final=last_step or stopping, counters=counters)
        if stopping:
            print0(f"stopped by {stop.received or 'a signal on another rank'} at step {step}; continue with --resume=auto")
            break
        if evaluating:
            val_loss = evaluate(eval_model, val_loader, config, info)
            print0(f"step {step:5d} | val loss {val_loss:.4f}")
            logger.log({"step": step, "val_loss": val_loss})
            if config.sample_tokens > 0 and (info.is_master or config.parallel == "fsdp"):
                sample = generate_sample(raw_model, config, info.device, step)  # fsdp: every rank gathers weights
                if info.is_master:
                    logger.log_sample(step, sample)
            if hellaswag is not None:
                # the uncompiled model: its many (rows, length) shapes would make torch.compile mark batch and
                # sequence dynamic, and the training graph compiled after it would keep them for the whole run
                scores = evaluate_hellaswag(raw_model, hellaswag, encode, config.block_size, info.device, info.rank,
                                            info.world_size, lambda: autocast_context(device_type))
                print0(f"step {step:5d} | hellaswag acc_norm {scores['hellaswag_acc_norm']:.4f} | "
                       f"acc_per_token {scores['hellaswag_acc_per_token']:.4f}")
                logger.log({"step": step, **scores})
            checkpoints.update_best(step, val_loss, counters=counters)
        if last_step:
            break

        if window_start is None:  # the timing window opens at the first step after a log, eval or save
            window_start, window_steps = time.time(), 0
        loss, grad_norm, lr = train_step(model, optimizers, train_loader.next_batch, grad_accum_steps, step, config,
                                         info, guard)
        window_steps += 1
        if step % config.log_interval == 0 or step == config.max_steps - 1:
            guard.check(logger)
            loss, grad_norm = loss.item(), grad_norm.item()  # waits for the GPU: the only sync of a step
            dt = (time.time() - window_start) / window_steps
            window_start = None
            logger.log({"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                        "dt_ms": 1000 * dt, "tokens_per_sec": config.total_batch_size / dt,
                        "mfu": mfu(per_token_flops, config.total_batch_size / dt, peak_flops, info.world_size),
                        **progress.at(step, dt)})
    stop.close()
    beat(None)  # the loop is over: the watchdog rests (W&B's upload at finish may take long)
    stopped_by = (stop.received or "a signal on another rank") if stopping else None
    this_process = time.time() - started
    for line in run_summary(config, argv, checkpoints.run_seconds + this_process, step, stopped_by,
                            can_sample=config.sample_tokens > 0,
                            this_process=this_process if checkpoints.run_seconds else None):
        print0(line)
    if checkpoints.timeline_note:
        print0(f"  {checkpoints.timeline_note}")  # a rollback: where the older timeline's files went
    logger.finish()
    return raw_model


def folders_to_create(path):
    """The folders os.makedirs(path) would create, outermost first."""
    missing, path = [], os.path.abspath(path)
    while not os.path.exists(path):
        missing.append(path)
        path = os.path.dirname(path)
    return missing[::-1]


@contextlib.contextmanager
def removed_if_refused(out_dir, created):
    """A run that ends before its first metrics line or checkpoint removes the folders it created (still
    holding the lock); a folder that existed before is never removed, nor anything in it."""
    try:
        yield
    except BaseException:
        if created and not os.path.exists(os.path.join(out_dir, "metrics.jsonl")) and not list_checkpoints(out_dir):
            shutil.rmtree(created[-1], ignore_errors=True)
            for folder in reversed(created[:-1]):  # parents made on the way, unless another run put files there
                with contextlib.suppress(OSError):
                    os.rmdir(folder)
        raise


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if "--help" in argv or "-h" in argv:
        print0(help_text())  # `--help | head` closes the pipe early: the rest is dropped, no traceback
        return 0
    try:
        config = load_config(argv)
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        config.batch_size = resolve_batch_size(config, model_config(config), world_size, log=print0)  # "auto"
        grad_accum_steps = grad_accum_steps_for(config, world_size)
    except ConfigError as e:
        fail(e)
    if config.dry_run:
        print0(format_config(config), *dry_run_report(config, model_config(config), grad_accum_steps, world_size),
               sep="\n")
        with reported_as_errors(DataError):  # the shards a run would read: the same error line as a real run
            tokens = split_tokens(config.data_dir)
        print0(f"data: {config.data_dir} holds {tokens['train']:,} train and {tokens['val']:,} val tokens",
               *plan_warnings(config, train_tokens=tokens["train"]), sep="\n")
        return 0
    keep_large_allocations_on_heap()  # a CPU step's big blocks are reused, not mapped anew each micro-step
    try:
        with reported_as_errors(ConfigError, DataError, NonFiniteError, out_dir=config.out_dir):
            info = setup_distributed(config.device, process_group_timeout(config.hang_timeout_s))
            created = folders_to_create(config.out_dir) if info.is_master else []
            with hold_out_dir(config.out_dir, info.is_master):  # before resume, which trims metrics.jsonl
                with removed_if_refused(config.out_dir, created):
                    check_shared_out_dir(config.out_dir, config.parallel)  # fsdp: every rank writes into out_dir
                    with watching(config.hang_timeout_s, info.rank):  # torchrun: a hang -> stacks, exit
                        train(config, info, argv)
                barrier(info)  # no rank closes its connections while another still finishes its last save
    finally:
        end_of_run()  # the process group stays: a second main() in this process reuses it
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.exit(main())
