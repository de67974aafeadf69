"""GPT-2's recipe against the modern one, each at its own tuned learning rate: a sweep, then several seeds.

    python scripts/compare_recipes.py --out out/recipes --jobs 2

Three recipes on the same small model, tokens and held-out val (docs/modern.md):
    gpt2_adamw   --architecture=gpt2   --optimizer=adamw --lr_schedule=cosine  (the GPT-2 recipe; sweeps learning_rate)
    gpt2_muon    --architecture=gpt2   --optimizer=muon  --lr_schedule=cosine  (sweeps matrix_lr)
    modern_muon  --architecture=modern --optimizer=muon  --lr_schedule=wsd     (sweeps matrix_lr)
1. sweep: each recipe at each lr of its list on the first seed; the lr with the lowest final val loss is picked;
2. tuned: each recipe at its picked lr on every seed (the sweep's run is reused for the first seed).
Reported: final val losses over seeds, and per seed the fraction of the steps each recipe needs to reach the
GPT-2 recipe's final val loss on that seed (1.0 for the baseline itself), with mean, std, min and max.

The data: byte-level Shakespeare (ids 0..255, --vocab_size=256), made from data/shakespeare into OUT/bytes
(the last 3 plays in name order are val, held out): at GPT-2's 50,304-token vocabulary the output head would
be most of a small model's time. Runs go through scripts/compare_optimizers.py's train_run (run.json reused
when the flags are the same); any other --key=value flag is passed on to train.py.
"""

import argparse
import datetime
import json
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data.shards import write_shard  # noqa: E402
from scripts.compare_optimizers import (CompareError, entry, git_commit, run_flags, spread,  # noqa: E402
                                        step_fractions, sweep_edge, sweep_then_tune, train_run, write_result)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASELINE = "gpt2_adamw"
RECIPES = {  # name: (optimizer, the flags that make the recipe)
    "gpt2_adamw": ("adamw", ["--architecture=gpt2", "--lr_schedule=cosine"]),
    "gpt2_muon": ("muon", ["--architecture=gpt2", "--lr_schedule=cosine"]),
    "modern_muon": ("muon", ["--architecture=modern", "--lr_schedule=wsd"]),
}


def byte_shards(text_dir, out_dir, val_documents=3):
    """Byte-level shards of the .txt files of text_dir: the last val_documents files (name order) are val."""
    names = sorted(name for name in os.listdir(text_dir) if name.endswith(".txt"))
    if len(names) <= val_documents:
        raise CompareError(f"{text_dir} holds {len(names)} .txt files; need more than {val_documents}")
    os.makedirs(out_dir, exist_ok=True)

    def tokens(files):
        data = b"".join(open(os.path.join(text_dir, name), "rb").read() for name in files)
        return np.frombuffer(data, dtype=np.uint8).astype(np.uint16)

    shards = [dict(write_shard(out_dir, "bytes_val_000000.npy", tokens(names[-val_documents:])), split="val"),
              dict(write_shard(out_dir, "bytes_train_000001.npy", tokens(names[:-val_documents])), split="train")]
    with open(os.path.join(out_dir, "manifest.json"), "w") as f:
        json.dump({"source": f"bytes of {text_dir}", "tokenizer": "bytes", "dtype": "uint16", "shards": shards}, f)
    return out_dir


def recipe_flags(recipe, lr, seed, args):
    optimizer, flags = RECIPES[recipe]
    return run_flags(optimizer, lr, seed, args) + flags


def report(result):
    lines = ["| recipe | lrs swept (final val loss, first seed) | best lr | final val loss over seeds | "
             "fraction of steps to reach gpt2_adamw's final val loss |", "|---|---|---|---|---|"]
    for recipe, sweep in result["sweep"].items():
        swept = ", ".join(f"{lr}: " + ("diverged" if e["final_val_loss"] is None else f"{e['final_val_loss']:.4f}")
                          for lr, e in sweep.items())
        final, fraction = result["final_val_loss"][recipe], result["fraction"][recipe]["summary"]
        final = "a run diverged" if final is None else f"{final['mean']:.4f} +- {final['std']:.4f}"
        fraction = "not reached on every seed" if fraction is None else (
            f"{fraction['mean']:.3f} +- {fraction['std']:.3f} (min {fraction['min']:.3f}, max {fraction['max']:.3f})")
        lines.append(f"| {recipe} | {swept} | {result['best_lr'][recipe]:g} | {final} | {fraction} |")
    for recipe, edge in result["best_at_edge"].items():
        if edge:
            lines.append(f"\n{recipe}: the best lr is the sweep's {edge}; an lr beyond it may do better")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adamw_lrs", type=float, nargs="+", default=[1e-3, 3e-3, 9e-3])
    parser.add_argument("--muon_lrs", type=float, nargs="+", default=[0.0033, 0.01, 0.03, 0.09])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1337, 1338, 1339], help="the sweep uses the first")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--n_layer", type=int, default=4)
    parser.add_argument("--n_head", type=int, default=4)
    parser.add_argument("--n_embd", type=int, default=128)
    parser.add_argument("--block_size", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--total_batch_size", type=int, default=1024)
    parser.add_argument("--eval_interval", type=int, default=10)
    parser.add_argument("--eval_iters", type=int, default=8, help="val micro-batches of batch_size sequences")
    parser.add_argument("--text_dir", default="data/shakespeare", help=".txt files made into byte-level shards")
    parser.add_argument("--jobs", type=int, default=1, help="trainings at once (each on one torch thread when > 1)")
    parser.add_argument("--out", default="out/recipes")
    args, train_flags = parser.parse_known_args(argv)
    bad = [flag for flag in train_flags if not flag.startswith("--") or "=" not in flag]
    if bad:
        parser.error(f"pass train.py's flags as --key=value, got {bad}")
    data_dir = os.path.abspath(os.path.join(args.out, "bytes"))
    args.train_flags = [f"--data_dir={data_dir}", "--vocab_size=256", *train_flags]
    return args, data_dir


def main(argv=None):
    args, data_dir = parse_args(argv)
    started, commit = time.time(), git_commit()
    os.makedirs(args.out, exist_ok=True)
    if not os.path.exists(os.path.join(data_dir, "manifest.json")):
        byte_shards(os.path.join(ROOT, args.text_dir), data_dir)
    threads = 1 if args.jobs > 1 else None
    lrs = {recipe: args.adamw_lrs if RECIPES[recipe][0] == "adamw" else args.muon_lrs for recipe in RECIPES}

    def train(recipe, lr, seed):
        return train_run(os.path.join(args.out, f"{recipe}_lr{lr:g}_seed{seed}"), recipe_flags(recipe, lr, seed, args),
                         threads)

    sweep, best_lr, tuned = sweep_then_tune(train, lrs, args.seeds, args.jobs)

    curves = {r: {seed: tuned[(r, seed)]["curve"] for seed in args.seeds} for r in RECIPES}
    # per seed: the steps a recipe needs to reach that seed's baseline final val loss, over the baseline's steps
    fractions = {r: step_fractions(curves[r], curves[BASELINE]) for r in RECIPES}
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit,
        "command": " ".join(["python", "scripts/compare_recipes.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": f"{platform.machine()} {platform.processor() or platform.platform()}, {os.cpu_count()} CPUs",
        "model": f"{args.n_layer} layers x {args.n_embd} ({args.n_head} heads), block {args.block_size}, byte vocab, "
                 f"{args.steps} steps x {args.total_batch_size:,} tokens",
        "recipes": {r: {"optimizer": RECIPES[r][0], "flags": RECIPES[r][1]} for r in RECIPES},
        "seeds": args.seeds,
        "sweep": {r: {str(lr): entry(sweep[(r, lr)]) for lr in lrs[r]} for r in RECIPES},
        "best_lr": best_lr,
        "best_at_edge": {r: sweep_edge(best_lr[r], lrs[r]) for r in RECIPES},
        "tuned": {r: {str(seed): entry(tuned[(r, seed)]) for seed in args.seeds} for r in RECIPES},
        "final_val_loss": {r: spread([entry(tuned[(r, s)])["final_val_loss"] for s in args.seeds]) for r in RECIPES},
        "fraction": {r: {"per_seed": {str(s): f for s, f in fractions[r].items()},
                         "summary": spread(list(fractions[r].values()))} for r in RECIPES},
        "wall_s": round(time.time() - started, 1),
    }
    write_result(result, report(result), args.out, "recipe_comparison")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except CompareError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
