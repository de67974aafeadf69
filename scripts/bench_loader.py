"""Loader throughput on CPU: tokens/s of next_batch() for batch 64 x 1024, and the process's peak RSS.

    python scripts/bench_loader.py                    # makes two 1e8-token shards in a temp dir
    python scripts/bench_loader.py --data_dir data/fineweb10B
"""

import argparse
import json
import multiprocessing
import os
import resource
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from data.loader import DataLoader  # noqa: E402
from data.shards import write_shard  # noqa: E402


def make_shards(folder, shard_tokens):
    rng = np.random.default_rng(0)
    val = rng.integers(0, 50257, 100_000, dtype=np.uint16)
    shards = [dict(write_shard(folder, "val_000000.npy", val), split="val")]
    for i in (1, 2):
        tokens = rng.integers(0, 50257, shard_tokens, dtype=np.uint16)
        shards.append(dict(write_shard(folder, f"train_{i:06d}.npy", tokens), split="train"))
        del tokens
    with open(os.path.join(folder, "manifest.json"), "w") as f:
        json.dump({"source": "random", "tokenizer": "gpt2", "dtype": "uint16", "shards": shards}, f)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--shard_tokens", type=float, default=1e8)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--block_size", type=int, default=1024)
    parser.add_argument("--batches", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = args.data_dir
        if data_dir is None:
            data_dir = tmp
            # in a child process, so this process's peak RSS is the loader's alone
            child = multiprocessing.get_context("spawn").Process(target=make_shards, args=(tmp, int(args.shard_tokens)))
            child.start()
            child.join()
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        loader = DataLoader(data_dir, "train", args.batch_size, args.block_size, seed=1)
        loader.next_batch()  # warm-up
        start = time.perf_counter()
        for _ in range(args.batches):
            loader.next_batch()
        elapsed = time.perf_counter() - start
        tokens = args.batches * args.batch_size * args.block_size
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        status = dict(line.split(":", 1) for line in open("/proc/self/status") if line.startswith("Rss"))
        print(f"loader: {tokens / elapsed / 1e6:.1f}M tokens/s ({args.batch_size} x {args.block_size}, shuffled, "
              f"{args.batches} batches) | peak RSS {peak:.0f} MB (before the loader: {rss_before:.0f} MB; now "
              f"anonymous {status['RssAnon'].strip()}, file-backed shard pages {status['RssFile'].strip()})")


if __name__ == "__main__":
    main()
