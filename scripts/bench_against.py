"""Compare this checkout's training speed with another commit's, alternating the two in one run.

    python scripts/bench_against.py 126b8cb configs/shakespeare.py --rounds=3 --bench_steps=5
    python scripts/bench_against.py 126b8cb configs/shakespeare.py --n_layer=6 --n_embd=384 --n_head=6 \
        --block_size=256 --batch_size=8 --total_batch_size=2048

The other commit is checked out into a temporary git worktree; each round runs scripts/bench.py of the
other commit, then of this checkout (compile off, a fresh process each, plain `python`, no environment
tricks), so both see the same machine load. Prints each run and the median tokens/s of each side.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bench_once(tree, config_args, steps, warmup):
    command = [sys.executable, os.path.join(tree, "scripts", "bench.py"), *config_args, "--bench_compile=off",
               f"--bench_steps={steps}", f"--bench_warmup={warmup}", "--bench_json"]
    output = subprocess.run(command, cwd=tree, capture_output=True, text=True, check=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ref", help="the commit to compare against, e.g. 126b8cb")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--bench_steps", type=int, default=5)
    parser.add_argument("--bench_warmup", type=int, default=2)
    args, config_args = parser.parse_known_args(argv)
    results = {args.ref: [], "this checkout": []}
    with tempfile.TemporaryDirectory() as scratch:
        other = os.path.join(scratch, "other")
        subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", other, args.ref], check=True,
                       capture_output=True)
        try:
            for round_index in range(args.rounds):
                for name, tree in ((args.ref, other), ("this checkout", ROOT)):
                    result = bench_once(tree, config_args, args.bench_steps, args.bench_warmup)
                    results[name].append(result)
                    print(f"round {round_index + 1} | {name:>13} | step {result['step_ms']:.0f} ms | "
                          f"tokens/s {result['tokens_per_sec']:,.0f} | {result['memory_kind']} "
                          f"{result['memory_bytes'] / 2**30:.2f} GiB", flush=True)
        finally:
            subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", other], capture_output=True)
    medians = {name: statistics.median(r["tokens_per_sec"] for r in runs) for name, runs in results.items()}
    for name, median in medians.items():
        print(f"median tokens/s | {name:>13} | {median:,.0f}")
    print(f"speedup: {medians['this checkout'] / medians[args.ref]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
