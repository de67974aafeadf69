"""The chunked loss on CPU (or CUDA): seconds per forward + backward of linear_cross_entropy, or of the
per-chunk softmax gradient alone, for the fused_loss.py in this tree or one from another commit.

    python scripts/bench_loss.py                            # 1,024 rows (one CPU chunk) of GPT-2 124M's lm_head
    python scripts/bench_loss.py --compile --part chunk     # the per-chunk softmax - one-hot, compiled
    python scripts/bench_loss.py --compile --part chunk --bf16   # ... of bf16 logits, as under autocast
    git show be67c61:gpt2_pretrain/fused_loss.py > /tmp/old_loss.py
    python scripts/bench_loss.py --source /tmp/old_loss.py  # the same, timed on that commit's loss
    python scripts/bench_loss.py --against /tmp/old_loss.py # both in one process, in turn, and their ratio

Prints the median seconds of --steps timed steps after one untimed one (which compiles, with --compile);
with --against, the two run in turn (A B A B ...) and the median of the step-by-step ratios A/B is printed
too, which holds on a loaded machine better than either median.
"""

import argparse
import importlib.util
import inspect
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from gpt2_pretrain.allocator import keep_large_allocations_on_heap  # noqa: E402


def load_source(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # torch.compile looks the module of the traced code up by name
    spec.loader.exec_module(module)
    return module


def chunk_step(module):
    """The per-chunk (loss, gradient of the logits) of `module`, whichever of its signatures it has."""
    chunk = module._chunk_loss_and_grad
    third = list(inspect.signature(chunk).parameters)[2]  # older commits: the dtype; now: the softcap
    return lambda logits, targets: chunk(logits, targets, logits.dtype if third == "dtype" else 0.0)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default=os.path.join(ROOT, "gpt2_pretrain", "fused_loss.py"),
                        help="a fused_loss.py to time (default: this tree's)")
    parser.add_argument("--against", default=None, help="a second fused_loss.py, timed in turn with --source")
    parser.add_argument("--part", choices=["loss", "chunk"], default="loss",
                        help="loss: linear_cross_entropy forward + backward; chunk: the softmax gradient alone")
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--channels", type=int, default=768)
    parser.add_argument("--vocab", type=int, default=50304)
    parser.add_argument("--compile", action="store_true", help="torch.compile the timed function")
    parser.add_argument("--bf16", action="store_true",
                        help="bf16 logits as under autocast on a GPU (chunk: the logits' dtype; loss: autocast)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the test machines share 2 cores)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    keep_large_allocations_on_heap()  # as train.py does
    torch.set_num_threads(args.threads)
    steps = {"A": make_step(load_source(args.source, "fused_loss_a"), args)}
    if args.against:
        steps["B"] = make_step(load_source(args.against, "fused_loss_b"), args)
    seconds = {name: [] for name in steps}
    for i in range(args.steps + 1):
        for name, (step, inputs) in steps.items():
            start = time.perf_counter()
            step(*inputs)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            seconds[name].append(time.perf_counter() - start)
    print(f"part={args.part} compile={args.compile} bf16={args.bf16} rows={args.rows} channels={args.channels} "
          f"vocab={args.vocab} steps={args.steps}")
    for name, times in seconds.items():
        print(f"{name}: first={times[0]:.3f}s median={statistics.median(times[1:]):.3f}s")
    if args.against:
        ratios = [a / b for a, b in zip(seconds["A"][1:], seconds["B"][1:])]
        print(f"A/B: median={statistics.median(ratios):.3f} min={min(ratios):.3f} max={max(ratios):.3f}")


def make_step(module, args):
    """(step function, its inputs) timing `module`'s loss or per-chunk gradient, the same inputs each time."""
    generator = torch.Generator().manual_seed(0)
    targets = torch.randint(0, args.vocab, (args.rows,), generator=generator).to(args.device)
    targets[::10] = -1
    if args.part == "chunk":
        dtype = torch.bfloat16 if args.bf16 else torch.float32
        logits = torch.randn(args.rows, args.vocab, generator=generator).to(args.device, dtype)
        step, inputs = chunk_step(module), (logits, targets)
    else:
        x = torch.randn(args.rows, args.channels, generator=generator).to(args.device).requires_grad_()
        weight = (0.02 * torch.randn(args.vocab, args.channels, generator=generator)).to(args.device)
        weight.requires_grad_()

        def step(x, weight, targets):
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=args.bf16):
                loss = module.linear_cross_entropy(x, weight, targets)
            loss.backward()
            return loss.detach()

        inputs = (x, weight, targets)
    return (torch.compile(step, dynamic=False) if args.compile else step), inputs


if __name__ == "__main__":
    main()
