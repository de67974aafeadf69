"""Preparation throughput: tokens/s of data/prepare.py on a generated local corpus, with 1 and 2 workers.

    python scripts/bench_prepare.py --mb 200 --workers 1 2 --repeats 3
"""

import argparse
import json
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_corpus(path, megabytes, seed=0):
    """jsonl documents of English-like words, about `megabytes` MB of text."""
    rng = np.random.default_rng(seed)
    words = np.array("the of and to in a is that for it as was with be by on not he I this are or his from at which "
                     "but have an they you were her she there been one all we their has would when if so no will "
                     "more can out some time only new like people two first very after any where most made over "
                     "learning model data science history river mountain library energy planet network".split())
    written = 0
    with open(path, "w") as f:
        while written < megabytes * 1e6:
            n = int(rng.integers(100, 800))
            text = " ".join(words[rng.integers(0, len(words), n)]) + "."
            line = json.dumps({"text": text}) + "\n"
            f.write(line)
            written += len(line)


def run_prepare(corpus, out, workers):
    """Seconds for one whole data/prepare.py command (start-up included), and the tokens it wrote."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "data/prepare.py", "--source", corpus, "--out", out, "--workers", str(workers),
                    "--val_tokens", "1e6"], cwd=ROOT, check=True, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    elapsed = time.perf_counter() - start
    with open(os.path.join(out, "manifest.json")) as f:
        tokens = sum(s["tokens"] for s in json.load(f)["shards"])
    shutil.rmtree(out)
    return elapsed, tokens


def tokenize_share(args):
    """Seconds to tokenize every k-th document of the corpus (from i), the texts already in memory."""
    corpus, i, k = args
    sys.path.insert(0, ROOT)
    from data.tokenizer import encode_array

    with open(corpus) as f:
        texts = [json.loads(line)["text"] for j, line in enumerate(f) if j % k == i]
    start = time.perf_counter()
    for text in texts:
        encode_array(text)
    return time.perf_counter() - start


def tokenizer_ceiling(corpus, workers):
    """Tokenizing alone, each process on its share, no reading, no IPC: how far tiktoken itself scales here."""
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        return max(pool.map(tokenize_share, [(corpus, i, workers) for i in range(workers)]))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=200, help="corpus size in MB")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3, help="runs per worker count, interleaved; the median counts")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        corpus = os.path.join(tmp, "corpus.jsonl")
        make_corpus(corpus, args.mb)
        times = {workers: [] for workers in args.workers}
        for _ in range(args.repeats):  # interleaved, so a slow spell of a shared machine hits every setting
            for workers in args.workers:
                elapsed, tokens = run_prepare(corpus, os.path.join(tmp, "out"), workers)
                times[workers].append(elapsed)
        rates = {}
        for workers, runs in times.items():
            median = statistics.median(runs)
            rates[workers] = tokens / median
            print(f"workers {workers}: {tokens:,} tokens, median {median:.1f}s of {len(runs)} runs "
                  f"({', '.join(f'{t:.1f}' for t in runs)}) = {rates[workers]:,.0f} tokens/s "
                  f"(whole command, start-up included)", flush=True)
        if 1 in rates and len(rates) > 1:
            for workers, rate in rates.items():
                if workers != 1:
                    print(f"speed-up with {workers} workers: {rate / rates[1]:.2f}x")
            # the ceiling: tiktoken alone in N processes against 1, medians of the same number of runs
            ceiling = {w: statistics.median(tokenizer_ceiling(corpus, w) for _ in range(args.repeats))
                       for w in args.workers}
            for workers, seconds in ceiling.items():
                print(f"tokenizing alone (no reading, no IPC), {workers} process(es): {seconds:.1f}s"
                      + (f" = {ceiling[1] / seconds:.2f}x" if workers != 1 else ""))


if __name__ == "__main__":
    main()
