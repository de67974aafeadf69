"""Benchmark training steps on this device: steady-state tokens/s, MFU and peak memory, compile off and on.

    python scripts/bench.py configs/gpt2_124m.py --batch_size=16            # same configs and flags as train.py
    python scripts/bench.py configs/shakespeare.py --bench_steps=5 --bench_compile=off

Each step is one call of train.train_step, the function train.py's loop calls (grad_accum_steps micro-steps,
clipping, schedule, non-finite guard, optimizer step), on random tokens, so no data is needed. The first
--bench_warmup steps (compilation, allocator warm-up) are not timed; the timed ones run back to back with
one device sync at the end, as train.py runs between two log lines. Each compile setting runs in a fresh
process so its peak memory is its own.
"""

import argparse
import itertools
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from config import ConfigError, load_config  # noqa: E402
from gpt2_pretrain.allocator import keep_large_allocations_on_heap  # noqa: E402
from gpt2_pretrain.auto_batch import resolve_batch_size  # noqa: E402
from gpt2_pretrain.distributed import DistInfo  # noqa: E402
from gpt2_pretrain.errors import check_device  # noqa: E402
from gpt2_pretrain.flops import device_peak_flops, format_mfu, mfu, model_flops_per_token  # noqa: E402
from gpt2_pretrain.guards import NonFiniteGuard  # noqa: E402
from gpt2_pretrain.logging import Logger  # noqa: E402
from gpt2_pretrain.parallel import wrap_model  # noqa: E402
from model import GPT  # noqa: E402
from train import grad_accum_steps_for, make_optimizers, model_config, train_step  # noqa: E402


def bench(config, steps, warmup, profile=None):
    """Time `steps` optimizer steps after `warmup` untimed ones; returns a dict of figures."""
    device = check_device(config.device)
    device_type = device.split(":")[0]
    grad_accum_steps = grad_accum_steps_for(config, 1)
    if device_type == "cuda":
        torch.set_float32_matmul_precision("high")
    torch.manual_seed(config.seed)
    raw_model = GPT(model_config(config)).to(device)
    if device_type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # only once the device holds memory: before, torch 2.11 refuses
    info = DistInfo(device=device)
    model, _ = wrap_model(raw_model, config, info)  # --parallel=fsdp: sharded over a one-process group
    optimizers = make_optimizers(config, raw_model, device_type, log=lambda *args, **kwargs: None)
    generator = torch.Generator().manual_seed(config.seed)
    shape = (grad_accum_steps, config.batch_size, config.block_size + 1)
    tokens = torch.randint(0, min(config.vocab_size, 50257), shape, generator=generator).to(device)
    inputs, targets = tokens[..., :-1].contiguous(), tokens[..., 1:].contiguous()
    guard, logger = NonFiniteGuard(config.max_nonfinite_steps), Logger("", enabled=False)
    batches = itertools.cycle(list(zip(inputs, targets)))

    def run(steps):
        for step in range(steps):
            train_step(model, optimizers, lambda: next(batches), grad_accum_steps, step, config, info, guard)
        guard.check(logger)  # reads the NaN/inf flags: waits for the device

    run(warmup)
    t0 = time.perf_counter()
    run(steps)
    step_seconds = (time.perf_counter() - t0) / steps
    if profile:  # after the timing: two more steps under torch.profiler, the kernels by total device time
        activities = [torch.profiler.ProfilerActivity.CPU] + (
            [torch.profiler.ProfilerActivity.CUDA] if device_type == "cuda" else [])
        with torch.profiler.profile(activities=activities) as profiler:
            run(2)
        sort_by = "cuda_time_total" if device_type == "cuda" else "cpu_time_total"
        with open(profile, "w") as f:
            f.write(profiler.key_averages().table(sort_by=sort_by, row_limit=40, max_name_column_width=70))
    tokens_per_step = grad_accum_steps * config.batch_size * config.block_size
    tokens_per_sec = tokens_per_step / step_seconds
    peak = device_peak_flops(device, config.peak_flops)
    if device_type == "cuda":
        memory, memory_kind = torch.cuda.max_memory_allocated(device), "peak allocated"
    else:
        # ru_maxrss is KiB on Linux: the whole process's peak, interpreter and torch included
        memory, memory_kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak RSS"
    return {
        "device": torch.cuda.get_device_name(device) if device_type == "cuda" else device,
        "compile": config.compile, "optimizer": config.optimizer, "parallel": config.parallel,
        "batch_size": config.batch_size, "block_size": config.block_size, "parameters": raw_model.num_params(),
        "tokens_per_step": tokens_per_step, "grad_accum_steps": grad_accum_steps, "step_ms": 1000 * step_seconds,
        "tokens_per_sec": tokens_per_sec, "mfu": mfu(model_flops_per_token(raw_model), tokens_per_sec, peak),
        "memory_bytes": memory, "memory_kind": memory_kind,
    }


def format_result(result):
    return (f"compile {'on ' if result['compile'] else 'off'} | {result['device']} | "
            f"{result['parameters']:,} params | {result['tokens_per_step']:,} tokens/step | "
            f"step {result['step_ms']:.1f} ms | tokens/s {result['tokens_per_sec']:,.0f} | "
            f"mfu {format_mfu(result['mfu'])} | {result['memory_kind']} {result['memory_bytes'] / 2**30:.2f} GiB")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     epilog="Other arguments are train.py's config files and --key=value flags.")
    parser.add_argument("--bench_steps", type=int, default=10, help="timed optimizer steps")
    parser.add_argument("--bench_warmup", type=int, default=3, help="untimed steps first (compilation, warm-up)")
    parser.add_argument("--bench_compile", choices=["both", "on", "off"], default="both",
                        help="torch.compile off, on, or both (each in its own process)")
    parser.add_argument("--bench_json", action="store_true", help="print one JSON line per setting")
    parser.add_argument("--bench_profile", default="", help="write a torch.profiler table of two steps to this file")
    args, config_args = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    try:
        config = load_config(config_args)
        config.batch_size = resolve_batch_size(config, model_config(config), 1)  # --batch_size=auto
        grad_accum_steps_for(config, 1)
        check_device(config.device)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.bench_steps <= 0 or args.bench_warmup < 0:
        print("error: --bench_steps must be positive and --bench_warmup not negative.", file=sys.stderr)
        return 2
    if args.bench_compile == "both":
        for setting in ("off", "on"):
            command = [sys.executable, os.path.abspath(__file__), *config_args, f"--bench_steps={args.bench_steps}",
                       f"--bench_warmup={args.bench_warmup}", f"--bench_compile={setting}"]
            if args.bench_json:
                command.append("--bench_json")
            if args.bench_profile:
                command.append(f"--bench_profile={args.bench_profile}.{setting}")
            code = subprocess.call(command)
            if code:
                return code
        return 0
    config.compile = args.bench_compile == "on"
    keep_large_allocations_on_heap()  # as train.py does
    result = bench(config, args.bench_steps, args.bench_warmup, args.bench_profile)
    print(json.dumps(result) if args.bench_json else format_result(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
