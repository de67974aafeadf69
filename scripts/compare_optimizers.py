"""Train the same small model with AdamW and with Muon at equal tokens, several seeds; plot val loss.

    python scripts/compare_optimizers.py --steps 150 --seeds 1337 1338 --out out/compare

Writes OUT/optimizer_comparison.png (val loss against steps) and OUT/optimizer_comparison.md (final val
losses, and the fraction of AdamW's steps Muon needs to reach AdamW's final val loss).
"""

import argparse
import json
import os
import subprocess
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(optimizer, seed, steps, out_dir, extra):
    run_dir = os.path.join(out_dir, f"{optimizer}_seed{seed}")
    args = [sys.executable, "train.py", "configs/shakespeare.py", f"--optimizer={optimizer}", f"--seed={seed}",
            f"--max_steps={steps}", f"--warmup_steps={max(1, steps // 10)}", "--eval_interval=10",
            "--eval_iters=8", "--sample_tokens=0", "--block_size=64", "--batch_size=16",
            "--total_batch_size=1024", f"--checkpoint_interval={10 * steps}", "--keep_best=false",
            "--resume=never", "--wandb_mode=disabled", f"--out_dir={run_dir}", *extra]
    if os.path.exists(os.path.join(run_dir, "metrics.jsonl")):
        os.remove(os.path.join(run_dir, "metrics.jsonl"))
    for name in os.listdir(run_dir) if os.path.isdir(run_dir) else []:
        if name.endswith(".pt"):
            os.remove(os.path.join(run_dir, name))
    subprocess.run(args, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]


def steps_to_reach(curve, target):
    """First step (linearly interpolated between evaluations) at which the val loss is <= target."""
    for (s0, l0), (s1, l1) in zip(curve, curve[1:]):
        if l1 <= target:
            return s0 + (s1 - s0) * (l0 - target) / (l0 - l1) if l0 > target else s0
    return None


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1337, 1338])
    parser.add_argument("--out", default="out/compare")
    parser.add_argument("extra", nargs="*", help="more --key=value flags for both runs")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    curves = {(opt, seed): run(opt, seed, args.steps, args.out, args.extra)
              for opt in ("adamw", "muon") for seed in args.seeds}

    plt.figure(figsize=(7, 4.5))
    for (opt, seed), curve in curves.items():
        steps, losses = zip(*curve[1:])  # step 0 is the same init for both
        plt.plot(steps, losses, color="tab:blue" if opt == "adamw" else "tab:red", alpha=0.8,
                 label=f"{opt} seed {seed}")
    plt.xlabel("step (1024 tokens each)")
    plt.ylabel("val loss")
    plt.title("AdamW vs Muon+AdamW, Shakespeare, 4 layers x 128")
    plt.legend()
    plt.grid(alpha=0.3)
    plt.savefig(os.path.join(args.out, "optimizer_comparison.png"), dpi=80, bbox_inches="tight")

    lines = ["| seed | adamw final val | muon final val | muon steps to adamw's final | fraction |",
             "|---|---|---|---|---|"]
    fractions = []
    for seed in args.seeds:
        adamw, muon = curves[("adamw", seed)], curves[("muon", seed)]
        reach = steps_to_reach(muon, adamw[-1][1])
        fraction = reach / args.steps if reach is not None else None
        fractions.append(fraction)
        lines.append(f"| {seed} | {adamw[-1][1]:.4f} | {muon[-1][1]:.4f} | "
                     f"{'never' if reach is None else f'{reach:.0f}'} | "
                     f"{'-' if fraction is None else f'{fraction:.2f}'} |")
    if all(f is not None for f in fractions):
        lines.append(f"\nmean fraction of AdamW's steps Muon needs: {np.mean(fractions):.2f}")
    table = "\n".join(lines)
    with open(os.path.join(args.out, "optimizer_comparison.md"), "w") as f:
        f.write(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
