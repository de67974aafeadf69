"""Time the val-loss forward (train.py's evaluation: model(x, y) under no_grad, eval mode) on random tokens.

    python scripts/bench_eval.py configs/shakespeare.py --bench_batches=20 --bench_rounds=5

Prints the median over rounds of the seconds one batch of --batch_size sequences takes.
"""

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from config import ConfigError, load_config  # noqa: E402
from gpt2_pretrain.errors import reported_as_errors  # noqa: E402
from model import GPT  # noqa: E402
from train import model_config  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     epilog="Other arguments are train.py's config files and --key=value flags.")
    parser.add_argument("--bench_batches", type=int, default=20, help="batches timed per round")
    parser.add_argument("--bench_rounds", type=int, default=5, help="rounds, after one untimed")
    args, config_args = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    with reported_as_errors(ConfigError):
        config = load_config(config_args)
    torch.manual_seed(config.seed)
    model = GPT(model_config(config)).to(config.device).eval()
    tokens = torch.randint(0, min(config.vocab_size, 50257), (config.batch_size, config.block_size + 1),
                           device=config.device)
    x, y = tokens[:, :-1], tokens[:, 1:]
    rounds = []
    for _ in range(args.bench_rounds + 1):
        start = time.perf_counter()
        with torch.no_grad():
            for _ in range(args.bench_batches):
                model(x, y)
        rounds.append((time.perf_counter() - start) / args.bench_batches)
    print(f"eval forward: {1000 * statistics.median(rounds[1:]):.1f} ms per batch of {config.batch_size} x "
          f"{config.block_size} (median of {args.bench_rounds} rounds; rounds "
          f"{', '.join(f'{1000 * r:.1f}' for r in rounds[1:])} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
