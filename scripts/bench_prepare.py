"""Preparation throughput: tokens/s of data/prepare.py on a generated local corpus, with 1 and 2 workers.

    python scripts/bench_prepare.py --mb 200 --workers 1 2
"""

import argparse
import json
import os
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


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=200, help="corpus size in MB")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        corpus = os.path.join(tmp, "corpus.jsonl")
        make_corpus(corpus, args.mb)
        rates = {}
        for workers in args.workers:
            out = os.path.join(tmp, f"out{workers}")
            start = time.perf_counter()
            subprocess.run([sys.executable, "data/prepare.py", "--source", corpus, "--out", out, "--workers",
                            str(workers), "--val_tokens", "1e6"], cwd=ROOT, check=True, stderr=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL)
            elapsed = time.perf_counter() - start
            with open(os.path.join(out, "manifest.json")) as f:
                tokens = sum(s["tokens"] for s in json.load(f)["shards"])
            rates[workers] = tokens / elapsed
            print(f"workers {workers}: {tokens:,} tokens in {elapsed:.1f}s = {rates[workers]:,.0f} tokens/s "
                  f"(whole command, start-up included)", flush=True)
        if 1 in rates and len(rates) > 1:
            for workers, rate in rates.items():
                if workers != 1:
                    print(f"speed-up with {workers} workers: {rate / rates[1]:.2f}x")


if __name__ == "__main__":
    main()
