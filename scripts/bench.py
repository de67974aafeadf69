"""Benchmark training steps on this device: steady-state tokens/s, MFU and peak memory, compile off and on.

    python scripts/bench.py configs/gpt2_124m.py --batch_size=16            # same configs and flags as train.py
    python scripts/bench.py configs/shakespeare.py --bench_steps=5 --bench_compile=off

Each step is one call of train.train_step, the function train.py's loop calls (grad_accum_steps micro-steps,
clipping, schedule, non-finite guard, optimizer step), on random tokens, so no data is needed. The first
--bench_warmup steps (compilation, allocator warm-up) are not timed; the timed ones run back to back with
one device sync at the end of each, as train.py runs with its default log_interval=1 (it reads the loss every
step). Each compile setting runs in a fresh process so its peak memory is its own (compile on first).

Besides tokens/s and MFU it reports what explains them: the first step's time apart from the steady one (the
compile), Dynamo's graph and graph-break counts, the first step's and the steady steps' peak allocated and
reserved CUDA memory, the allocator's retries, the dry run's estimate for the same config, and on request a
torch.cuda.memory snapshot of one step (--bench_memory_snapshot), the step without Muon's host read of the
finite flag (--bench_muon_sync), the loss over full logits (--bench_loss=full) and inductor's tuning options
(--bench_coordinate_descent, --bench_mode). With --bench_json, a JSON line per step as it goes (a stopped
bench leaves its figures so far), then one with the result.
"""

import argparse
import contextlib
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_arguments(argv):
    """(this script's arguments, train.py's config files and flags)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     epilog="Other arguments are train.py's config files and --key=value flags.")
    parser.add_argument("--bench_steps", type=int, default=10, help="timed optimizer steps")
    parser.add_argument("--bench_warmup", type=int, default=3, help="untimed steps first (compilation, warm-up)")
    parser.add_argument("--bench_compile", choices=["both", "on", "off"], default="both",
                        help="torch.compile on, off, or both (each in its own process, on first)")
    parser.add_argument("--bench_json", action="store_true",
                        help="print one JSON line per step as it goes and one per setting with the result")
    parser.add_argument("--bench_profile", default="", help="write a torch.profiler table of two steps to this file")
    parser.add_argument("--bench_memory_snapshot", default="",
                        help="CUDA: write a torch.cuda.memory snapshot of one more step to this file (with "
                             "--bench_compile=both, of the compiled run); view it at pytorch.org/memory_viz")
    parser.add_argument("--bench_muon_sync", action="store_true",
                        help="Muon: also time the steps without the host read of the finite flag before its step")
    parser.add_argument("--bench_loss", choices=["chunked", "full"], default="chunked",
                        help="chunked: the model's own loss; full: F.cross_entropy over the full logits (ddp only)")
    parser.add_argument("--bench_coordinate_descent", action="store_true",
                        help="compile with torch._inductor.config.coordinate_descent_tuning=True")
    parser.add_argument("--bench_mode", choices=["default", "max-autotune-no-cudagraphs"], default="default",
                        help="torch.compile mode, set as inductor's options for it")
    return parser.parse_known_args(argv)


def run_both(args, config_args):
    """--bench_compile=both: compile on, then off, each in a process of its own (its peak memory its own); on
    first, so that if the process is stopped during the uncompiled run, the compiled figures are out."""
    for setting in ("on", "off"):
        command = [sys.executable, os.path.abspath(__file__), *config_args, f"--bench_steps={args.bench_steps}",
                   f"--bench_warmup={args.bench_warmup}", f"--bench_compile={setting}",
                   f"--bench_loss={args.bench_loss}", f"--bench_mode={args.bench_mode}"]
        flags = {"--bench_json": args.bench_json, "--bench_muon_sync": args.bench_muon_sync,
                 "--bench_coordinate_descent": args.bench_coordinate_descent}
        command += [flag for flag, given in flags.items() if given]
        if args.bench_profile:
            command.append(f"--bench_profile={args.bench_profile}.{setting}")
        if args.bench_memory_snapshot and setting == "on":
            command.append(f"--bench_memory_snapshot={args.bench_memory_snapshot}")
        code = subprocess.call(command)
        if code:
            return code
    return 0


if __name__ == "__main__":
    arguments = parse_arguments(sys.argv[1:])
    if arguments[0].bench_compile == "both":  # before torch is imported: each process imports its own
        sys.exit(run_both(*arguments))

sys.path.insert(0, ROOT)

import torch  # noqa: E402

from config import ConfigError, load_config  # noqa: E402
from gpt2_pretrain.allocator import keep_large_allocations_on_heap  # noqa: E402
from gpt2_pretrain.auto_batch import resolve_batch_size  # noqa: E402
from gpt2_pretrain.compiling import compile_counts  # noqa: E402
from gpt2_pretrain.distributed import DistInfo  # noqa: E402
from gpt2_pretrain.dry_run import memory_estimate  # noqa: E402
from gpt2_pretrain.errors import check_device  # noqa: E402
from gpt2_pretrain.flops import device_peak_flops, format_mfu, mfu, model_flops_per_token  # noqa: E402
from gpt2_pretrain.guards import NonFiniteGuard, apply_update, skips_on_device  # noqa: E402
from gpt2_pretrain.logging import Logger  # noqa: E402
from gpt2_pretrain.parallel import wrap_model  # noqa: E402
from model import GPT  # noqa: E402
import train  # noqa: E402
from train import grad_accum_steps_for, make_optimizers, model_config, train_step  # noqa: E402

# allocation events a memory snapshot keeps (a compiled 124M step of 8 micro-steps: thousands, not measured); each with
# its Python stack (no C++ frames, none for frees), so that the file stays under the device's 16 MiB a file
SNAPSHOT_ENTRIES = 50_000


class FullLogitLoss(torch.nn.Module):
    """--bench_loss=full: the model's full (B, T, V) logits, then F.cross_entropy over them in float32, the loss
    model.py had before the chunked one (gpt2_pretrain/fused_loss.py); compiled, inductor fuses it its own way.
    Bench only: training keeps the chunked loss."""

    def __init__(self, gpt):
        super().__init__()
        self.gpt = gpt

    def forward(self, idx, targets):
        logits, _ = self.gpt(idx)
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-1)
        return None, loss


def dynamo_counts():
    """compile_counts() (graphs, graph breaks, recompiles, what was compiled and what skipped) plus the most common
    graph-break reasons and inductor's FX graph cache hits and misses. All 0 where nothing imported Dynamo
    (nothing was compiled): importing it only to read them costs a second of CPU."""
    counts = compile_counts()
    if "torch._dynamo" not in sys.modules:
        return {**counts, "graph_break_reasons": {}, "fx_graph_cache_hits": 0, "fx_graph_cache_misses": 0}
    from torch._dynamo.utils import counters

    return {**counts, "graph_break_reasons": {reason[:300]: count
                                              for reason, count in counters["graph_break"].most_common(5)},
            "fx_graph_cache_hits": counters["inductor"]["fxgraph_cache_hit"],
            "fx_graph_cache_misses": counters["inductor"]["fxgraph_cache_miss"]}


def compile_time_spent():
    """Seconds Dynamo and inductor spent compiling in this process, by phase (torch._dynamo.utils), or None."""
    try:
        from torch._dynamo.utils import calculate_time_spent

        return {phase: round(seconds, 2) for phase, seconds in calculate_time_spent().items()}
    except Exception:  # a private helper: its form changes between torch versions
        return None


def cuda_memory(device, kind):
    """Peak (since the last reset) allocated and reserved bytes, or None for both off CUDA."""
    if kind != "cuda":
        return {"allocated": None, "reserved": None}
    return {"allocated": torch.cuda.max_memory_allocated(device), "reserved": torch.cuda.max_memory_reserved(device)}


def update_without_host_read(optimizers, finite):
    """--bench_muon_sync: guards.apply_update without its host read of the finite flag, so the host queues the
    Muon step while the device still runs the backward. Timing only: a NaN/inf step would update."""
    for optimizer in optimizers:
        if skips_on_device(optimizer):
            apply_update([optimizer], finite)
        else:
            optimizer.step()


def bench(config, steps, warmup, profile=None, progress=None, loss="chunked", snapshot=None, muon_sync=False,
          inductor_options=None):
    """Time `steps` optimizer steps after `warmup` untimed ones; returns a dict of figures. progress(**fields)
    is called after the setup and each step, as they happen; inductor_options: those the caller set, reported."""
    progress = progress or (lambda **fields: None)
    started = time.perf_counter()
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
    if loss == "full":
        model = FullLogitLoss(raw_model)
        model = torch.compile(model) if config.compile else model
    else:
        model, _ = wrap_model(raw_model, config, info)  # --parallel=fsdp: sharded over a one-process group
    optimizers = make_optimizers(config, raw_model, device_type, log=lambda *args, **kwargs: None)
    generator = torch.Generator().manual_seed(config.seed)
    shape = (grad_accum_steps, config.batch_size, config.block_size + 1)
    tokens = torch.randint(0, min(config.vocab_size, 50257), shape, generator=generator).to(device)
    inputs, targets = tokens[..., :-1].contiguous(), tokens[..., 1:].contiguous()
    guard, logger = NonFiniteGuard(config.max_nonfinite_steps), Logger("", enabled=False)
    batches = itertools.cycle(list(zip(inputs, targets)))
    progress(event="setup", seconds=round(time.perf_counter() - started, 3))

    def run(steps, phase=None):
        """`steps` steps, each waited for (guard.check reads its flags) and reported; their seconds."""
        seconds = []
        for step in range(steps):
            t0 = time.perf_counter()
            train_step(model, optimizers, lambda: next(batches), grad_accum_steps, step, config, info, guard)
            guard.check(logger)  # reads the NaN/inf flags: waits for the device
            seconds.append(time.perf_counter() - t0)
            if phase:
                progress(event="step", phase=phase, step=step, seconds=round(seconds[-1], 4))
        return seconds

    if warmup:
        first = run(1, "first")[0]  # compiles, when compile is on
        first_memory = cuda_memory(device, device_type)
        run(warmup - 1, "warmup")
        if device_type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)  # the steady steps' own peak, compilation left out
    timed = run(steps, "timed")
    step_seconds = sum(timed) / steps
    steady_memory = cuda_memory(device, device_type)
    if not warmup:  # the first step is a timed one: no steady peak apart from it
        first, first_memory = timed[0], steady_memory
    without_host_read = None
    if muon_sync and not all(skips_on_device(optimizer) for optimizer in optimizers):
        train.apply_update = update_without_host_read  # what train_step calls, for these steps only
        try:
            without_host_read = sum(run(steps, "without_host_read")) / steps
        finally:
            train.apply_update = apply_update
    snapshot_path = None
    if snapshot and device_type == "cuda":  # one more step, its allocations and frees recorded
        torch.cuda.memory._record_memory_history(context="alloc", stacks="python", max_entries=SNAPSHOT_ENTRIES)
        run(1)
        torch.cuda.memory._dump_snapshot(snapshot)
        torch.cuda.memory._record_memory_history(enabled=None)
        snapshot_path = snapshot
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
    flops_per_token = model_flops_per_token(raw_model)
    if device_type == "cuda":
        memory, memory_kind = max(first_memory["allocated"], steady_memory["allocated"]), "peak allocated"
        stats = torch.cuda.memory_stats(device)
        retries, ooms = stats.get("num_alloc_retries"), stats.get("num_ooms")
    else:
        # ru_maxrss is KiB on Linux: the whole process's peak, interpreter and torch included
        memory, memory_kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak RSS"
        retries = ooms = None
    # the dry run's estimate for this config (the chunked loss: --bench_loss=full keeps all the logits besides)
    estimate = memory_estimate(config, raw_model.num_params(), bf16=device_type == "cuda", device_type=device_type)
    return {
        "device": torch.cuda.get_device_name(device) if device_type == "cuda" else device,
        "torch": torch.__version__, "compile": config.compile, "optimizer": config.optimizer,
        "parallel": config.parallel, "loss": loss,
        "inductor_options": {option: bool((inductor_options or {}).get(option))
                             for option in ("coordinate_descent_tuning", "max_autotune")},
        "activation_checkpointing": config.activation_checkpointing, "n_layer": config.n_layer,
        "n_embd": config.n_embd,
        "batch_size": config.batch_size, "block_size": config.block_size, "parameters": raw_model.num_params(),
        "tokens_per_step": tokens_per_step, "grad_accum_steps": grad_accum_steps, "step_ms": 1000 * step_seconds,
        "median_step_ms": 1000 * statistics.median(timed), "tokens_per_sec": tokens_per_sec,
        "mfu": mfu(flops_per_token, tokens_per_sec, peak),
        "memory_bytes": memory, "memory_kind": memory_kind,
        "first_step_seconds": first, "warmup_steps": warmup, "timed_steps": steps,
        # the first step less a steady one: compilation (and CUDA/cuBLAS warm-up), when compile is on
        "compile_seconds": first - statistics.median(timed) if config.compile else None,
        "compile_time_spent": compile_time_spent() if config.compile else None, **dynamo_counts(),
        "first_step_peak_allocated": first_memory["allocated"], "first_step_peak_reserved": first_memory["reserved"],
        "steady_peak_allocated": steady_memory["allocated"], "steady_peak_reserved": steady_memory["reserved"],
        "alloc_retries": retries, "ooms": ooms,
        "dry_run_estimate_bytes": sum(estimate.values()), "dry_run_estimate": estimate,
        "step_ms_without_host_read": None if without_host_read is None else 1000 * without_host_read,
        "mfu_without_host_read": None if without_host_read is None else mfu(
            flops_per_token, tokens_per_step / without_host_read, peak),
        "memory_snapshot": snapshot_path,
        "memory_snapshot_bytes": os.path.getsize(snapshot_path) if snapshot_path else None,
    }




def format_result(result):
    return (f"compile {'on ' if result['compile'] else 'off'} | {result['device']} | "
            f"{result['parameters']:,} params | {result['tokens_per_step']:,} tokens/step | "
            f"step {result['step_ms']:.1f} ms | tokens/s {result['tokens_per_sec']:,.0f} | "
            f"mfu {format_mfu(result['mfu'])} | {result['memory_kind']} {result['memory_bytes'] / 2**30:.2f} GiB")


def main(argv=None):
    args, config_args = parse_arguments(sys.argv[1:] if argv is None else argv)
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
    if args.bench_loss == "full" and config.parallel != "ddp":
        print("error: --bench_loss=full runs under --parallel=ddp only: drop one of them.", file=sys.stderr)
        return 2
    if args.bench_compile == "both":
        return run_both(args, config_args)
    config.compile = args.bench_compile == "on"
    keep_large_allocations_on_heap()  # as train.py does

    def progress(**fields):
        if args.bench_json:
            print(json.dumps({"progress": fields.pop("event"), "compile": config.compile, **fields}), flush=True)

    options, patched = {}, contextlib.nullcontext()
    if args.bench_mode != "default" or args.bench_coordinate_descent:  # inductor only then: its import costs 1 s
        import torch._inductor.config as inductor

        options = dict(torch._inductor.list_mode_options(args.bench_mode)) if args.bench_mode != "default" else {}
        if args.bench_coordinate_descent:
            options["coordinate_descent_tuning"] = True
        patched = inductor.patch(options)
    with patched:
        result = bench(config, args.bench_steps, args.bench_warmup, args.bench_profile, progress, args.bench_loss,
                       args.bench_memory_snapshot or None, args.bench_muon_sync, options)
    print(json.dumps(result) if args.bench_json else format_result(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
