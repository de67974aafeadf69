"""The chunked loss on CPU (or CUDA): seconds per forward + backward of linear_cross_entropy, or of the
per-chunk softmax gradient alone, for the fused_loss.py in this tree or one from another commit.

    python scripts/bench_loss.py                            # 1,024 rows (one CPU chunk) of GPT-2 124M's lm_head
    python scripts/bench_loss.py --compile --part chunk     # the per-chunk softmax - one-hot, compiled
    python scripts/bench_loss.py --compile --part chunk --bf16   # ... of bf16 logits, as under autocast
    git show be67c61:gpt2_pretrain/fused_loss.py > /tmp/old_loss.py
    python scripts/bench_loss.py --source /tmp/old_loss.py  # the same, timed on that commit's loss

Prints the median seconds of --steps timed steps after one untimed one (which compiles, with --compile).
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


def load_source(path):
    spec = importlib.util.spec_from_file_location("fused_loss_under_test", path)
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
    module = load_source(args.source)
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
    if args.compile:
        step = torch.compile(step, dynamic=False)
    seconds = []
    for i in range(args.steps + 1):
        start = time.perf_counter()
        step(*inputs)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    print(f"part={args.part} compile={args.compile} bf16={args.bf16} rows={args.rows} channels={args.channels} vocab={args.vocab} "
          f"first={seconds[0]:.3f}s median={statistics.median(seconds[1:]):.3f}s")


if __name__ == "__main__":
    main()
