"""HellaSwag scoring speed: examples/s of the batched scorer against the one-example-a-forward reference.

    python scripts/bench_hellaswag.py                                   # small model, synthetic examples
    python scripts/bench_hellaswag.py --hellaswag_path data/hellaswag/hellaswag_val.jsonl --examples 64
    python scripts/bench_hellaswag.py --device cuda --n_layer 12 --n_head 12 --n_embd 768 --json   # GPT-2 124M

Both run in one process, alternating round by round, on the same examples and model, so a machine shared
with other work slows both alike. Without --hellaswag_path the examples are synthetic, with HellaSwag-like
lengths (a 20-80 word context, 5-25 word endings). Prints one line per round and a summary (--json: the
summary as one JSON line). On CUDA both run under bf16 autocast, as in training, where the two versions'
different paddings can turn a near tie: the scores are then printed, not required to agree.
"""

import argparse
import json
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from data.tokenizer import encode  # noqa: E402
from gpt2_pretrain.hellaswag import evaluate_hellaswag, evaluate_hellaswag_per_example, load_examples  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from train import autocast_context  # noqa: E402

WORDS = ("the a man woman dog child runs jumps walks into water slowly quickly then picks up ball and throws it "
         "far away while people watch from side of road holding camera smiling at kitchen table cuts").split()


def synthetic_examples(n, seed=0):
    rng = random.Random(seed)

    def text(lo, hi):
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))

    return [{"ctx": text(20, 80), "endings": [text(5, 25) for _ in range(4)], "label": rng.randrange(4)}
            for _ in range(n)]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hellaswag_path", default=None)
    parser.add_argument("--examples", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--n_layer", type=int, default=4)
    parser.add_argument("--n_head", type=int, default=4)
    parser.add_argument("--n_embd", type=int, default=128)
    parser.add_argument("--block_size", type=int, default=1024)
    parser.add_argument("--batch_tokens", type=int, default=8192)
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON line")
    args = parser.parse_args()
    examples = load_examples(args.hellaswag_path) if args.hellaswag_path else synthetic_examples(args.examples)
    examples = examples[: args.examples]
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=args.block_size, vocab_size=50304, n_layer=args.n_layer, n_head=args.n_head,
                          n_embd=args.n_embd)).to(args.device).eval()
    device_type = torch.device(args.device).type
    autocast = lambda: autocast_context(device_type)  # noqa: E731
    print(f"{len(examples)} examples, GPT n_layer={args.n_layer} n_embd={args.n_embd} block_size={args.block_size}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    runs = {"per_example": lambda: evaluate_hellaswag_per_example(model, examples, encode, args.block_size,
                                                                  args.device, autocast=autocast),
            "batched": lambda: evaluate_hellaswag(model, examples, encode, args.block_size, args.device,
                                                  autocast=autocast, batch_tokens=args.batch_tokens)}
    speeds = {name: [] for name in runs}
    scores = {}
    for round_number in range(args.rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            scores[name] = run()
            speeds[name].append(len(examples) / (time.perf_counter() - start))
            print(f"round {round_number}: {name:12s} {speeds[name][-1]:8.2f} examples/s")
    if device_type == "cpu":
        assert scores["batched"] == scores["per_example"], scores  # float32: the same answers, only faster
    old, new = (statistics.median(speeds[name]) for name in ("per_example", "batched"))
    print(f"median: per_example {old:.2f} examples/s, batched {new:.2f} examples/s, {new / old:.1f}x; "
          f"scores {scores['batched']}")
    if args.json:
        print(json.dumps({"device": args.device, "examples": len(examples), "per_example_examples_per_sec": old,
                          "batched_examples_per_sec": new, "scores": scores["batched"],
                          "same_scores": scores["batched"] == scores["per_example"]}))


if __name__ == "__main__":
    main()
