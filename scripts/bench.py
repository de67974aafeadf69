"""Benchmark training steps on this device: steady-state tokens/s, MFU and peak memory, compile off and on.

    python scripts/bench.py configs/gpt2_124m.py --batch_size=16            # same configs and flags as train.py
    python scripts/bench.py configs/shakespeare.py --bench_steps=5 --bench_compile=off

Each step is one optimizer step exactly as train.py runs it (grad_accum_steps micro-steps, clipping, AdamW)
on random tokens, so no data is needed. The first --bench_warmup steps (compilation, allocator warm-up) are
not timed. Each compile setting runs in a fresh process so its peak memory is its own.
"""

import argparse
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
from distributed import pick_device  # noqa: E402
from metrics import device_peak_flops, format_mfu, mfu, model_flops_per_token  # noqa: E402
from model import GPT  # noqa: E402
from train import autocast_context, grad_accum_steps_for, make_optimizers, model_config  # noqa: E402


def bench(config, steps, warmup):
    """Time `steps` optimizer steps after `warmup` untimed ones; returns a dict of figures."""
    device = pick_device(config.device)
    device_type = device.split(":")[0]
    grad_accum_steps = grad_accum_steps_for(config, 1)
    if device_type == "cuda":
        torch.set_float32_matmul_precision("high")
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(config.seed)
    raw_model = GPT(model_config(config)).to(device)
    model = torch.compile(raw_model) if config.compile else raw_model
    optimizers = make_optimizers(config, raw_model, device_type, log=lambda *args, **kwargs: None)
    generator = torch.Generator().manual_seed(config.seed)
    shape = (grad_accum_steps, config.batch_size, config.block_size + 1)
    tokens = torch.randint(0, min(config.vocab_size, 50257), shape, generator=generator).to(device)
    inputs, targets = tokens[..., :-1].contiguous(), tokens[..., 1:].contiguous()
    times = []
    for step in range(warmup + steps):
        t0 = time.perf_counter()
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        for micro_step in range(grad_accum_steps):
            x, y = inputs[micro_step], targets[micro_step]
            with autocast_context(device_type):
                _, loss = model(x, y)
            (loss / grad_accum_steps).backward()
        max_norm = config.grad_clip if config.grad_clip > 0 else float("inf")
        torch.nn.utils.clip_grad_norm_(raw_model.parameters(), max_norm)
        for optimizer in optimizers:
            optimizer.step()
        if device_type == "cuda":
            torch.cuda.synchronize()
        loss.item()  # wait for the step on any device
        if step >= warmup:
            times.append(time.perf_counter() - t0)
    tokens_per_step = grad_accum_steps * config.batch_size * config.block_size
    tokens_per_sec = tokens_per_step * len(times) / sum(times)
    peak = device_peak_flops(device, config.peak_flops)
    if device_type == "cuda":
        memory, memory_kind = torch.cuda.max_memory_allocated(device), "peak allocated"
    else:
        # ru_maxrss is KiB on Linux: the whole process's peak, interpreter and torch included
        memory, memory_kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak RSS"
    return {
        "device": torch.cuda.get_device_name(device) if device_type == "cuda" else device,
        "compile": config.compile, "parameters": raw_model.num_params(), "tokens_per_step": tokens_per_step,
        "grad_accum_steps": grad_accum_steps, "step_ms": 1000 * sum(times) / len(times),
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
    args, config_args = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    try:
        config = load_config(config_args)
        grad_accum_steps_for(config, 1)
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
            code = subprocess.call(command)
            if code:
                return code
        return 0
    config.compile = args.bench_compile == "on"
    result = bench(config, args.bench_steps, args.bench_warmup)
    print(json.dumps(result) if args.bench_json else format_result(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
