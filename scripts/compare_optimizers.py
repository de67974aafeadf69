"""AdamW against Muon+AdamW, each at its own tuned learning rate: a sweep, then several seeds at the best lrs.

    python scripts/compare_optimizers.py --out out/compare --jobs 2

1. sweep: for each optimizer, train at each lr of a small log-spaced list (AdamW: --learning_rate, with
   --min_lr a tenth of it; Muon: --matrix_lr, the AdamW half's lrs at the base config's values) on the
   first seed, and pick the lr with the lowest final val loss (same token budget for every run);
2. tuned: both optimizers at their best lr on every seed (the sweep's run is reused for the first seed).

Every run is `python train.py configs/shakespeare.py ...` with the flags below (any other --key=value
flag is passed on to train.py: --data_dir, the model's shape...). Writes into OUT: one folder a run
(run.json holds its flags and val curve; a rerun with the same flags reuses it), and
optimizer_comparison.json (every run's curve, the sweep's losses, the best lrs, final val losses over
seeds, the fraction of AdamW's steps Muon needs to reach tuned AdamW's final val loss), .md and .png.
--jobs N runs N trainings at once, each on one torch thread.
"""

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE_CONFIG = "configs/shakespeare.py"
MUON_SCALAR_LR = 2e-3  # configs/shakespeare.py's learning_rate: Muon's biases and LayerNorm gains (AdamW half)


class CompareError(Exception):
    """A run or a sweep that cannot give a comparison: reported as one line."""


def run_flags(optimizer, lr, seed, args):
    """train.py's flags for one run: the shared budget and model, plus this optimizer's lr."""
    if optimizer == "adamw":
        lr_flags = [f"--learning_rate={lr:g}", f"--min_lr={lr / 10:g}"]
    else:
        lr_flags = [f"--matrix_lr={lr:g}", f"--learning_rate={MUON_SCALAR_LR:g}", f"--min_lr={MUON_SCALAR_LR / 10:g}"]
    return [BASE_CONFIG, f"--optimizer={optimizer}", f"--seed={seed}", *lr_flags,
            f"--n_layer={args.n_layer}", f"--n_head={args.n_head}", f"--n_embd={args.n_embd}",
            f"--block_size={args.block_size}", f"--batch_size={args.batch_size}",
            f"--total_batch_size={args.total_batch_size}", f"--max_steps={args.steps}",
            f"--warmup_steps={max(1, args.steps // 10)}", f"--eval_interval={args.eval_interval}",
            f"--eval_iters={args.eval_iters}", "--sample_tokens=0", f"--checkpoint_interval={10 * args.steps}",
            "--keep_best=false", "--resume=never", "--wandb_mode=disabled", *args.train_flags]


def train_run(run_dir, flags, threads=None):
    """Train once with train.py; returns {"flags", "curve": [[step, val_loss]...], "finished", "wall_s"}.

    A run.json with the same flags is reused. A run that stops early (diverged: too many non-finite
    steps) keeps its curve with finished false; one that never reached its first eval is an error.
    """
    record_path = os.path.join(run_dir, "run.json")
    if os.path.exists(record_path):
        with open(record_path) as f:
            record = json.load(f)
        if record["flags"] == flags:
            return record
    shutil.rmtree(run_dir, ignore_errors=True)
    os.makedirs(run_dir)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    started = time.time()
    with open(os.path.join(run_dir, "train.log"), "w") as log:
        result = subprocess.run([sys.executable, "train.py", *flags, f"--out_dir={run_dir}"], cwd=ROOT, env=env,
                                stdout=log, stderr=subprocess.STDOUT)
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    records = []
    if os.path.exists(metrics_path):
        with open(metrics_path) as f:
            records = [json.loads(line) for line in f]
    curve = [[r["step"], r["val_loss"]] for r in records if "val_loss" in r]
    if not curve:
        raise CompareError(f"train.py failed before its first eval (exit {result.returncode}); see "
                           f"{os.path.join(run_dir, 'train.log')}")
    max_steps = int(next(f for f in flags if f.startswith("--max_steps=")).split("=")[1])
    record = {"flags": flags, "curve": curve, "finished": result.returncode == 0 and curve[-1][0] == max_steps,
              "wall_s": round(time.time() - started, 1)}
    for name in os.listdir(run_dir):
        if name.endswith(".pt"):
            os.remove(os.path.join(run_dir, name))  # the final checkpoint: not needed, and large
    with open(record_path, "w") as f:
        json.dump(record, f)
    return record


def final_loss(record):
    """The val loss at the end of the budget; inf for a run that diverged or gave a non-finite loss."""
    loss = record["curve"][-1][1]
    return loss if record["finished"] and math.isfinite(loss) else math.inf


def pick_best(losses):
    """The lr (a key of losses: lr -> final val loss) with the lowest loss; non-finite losses never win."""
    finite = {lr: loss for lr, loss in losses.items() if math.isfinite(loss)}
    if not finite:
        raise CompareError("every lr of the sweep diverged: try smaller lrs")
    return min(finite, key=finite.get)


def sweep_edge(best, lrs):
    """'smallest' or 'largest' when the picked lr is an end of a sweep of several lrs, else None."""
    if len(lrs) < 2 or min(lrs) < best < max(lrs):
        return None
    return "smallest" if best == min(lrs) else "largest"


def steps_to_reach(curve, target):
    """First step (linearly interpolated between evaluations) at which the val loss is <= target, else None."""
    if curve and curve[0][1] <= target:
        return curve[0][0]
    for (s0, l0), (s1, l1) in zip(curve, curve[1:]):
        if l1 <= target:
            return s0 + (s1 - s0) * (l0 - target) / (l0 - l1)
    return None


def step_fractions(muon_curves, adamw_curves):
    """Per seed: the steps Muon needs to reach that seed's AdamW final val loss, over AdamW's steps.

    Curves are dicts seed -> [[step, val_loss], ...]; a seed where Muon never gets there maps to None.
    """
    fractions = {}
    for seed, adamw in adamw_curves.items():
        reach = steps_to_reach(muon_curves[seed], adamw[-1][1])
        fractions[seed] = None if reach is None else reach / adamw[-1][0]
    return fractions


def spread(values):
    """Mean, sample standard deviation, min and max (None where a value is missing)."""
    if not values or any(v is None for v in values):
        return None
    values = np.asarray(values, dtype=float)
    return {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
            "min": float(values.min()), "max": float(values.max()), "n": len(values)}


def sweep_then_tune(train, lrs, seeds, jobs):
    """Each lr of lrs[name] on the first seed, then each name's best lr on every seed, `jobs` runs at a time:
    (sweep {(name, lr): record}, best_lr {name: lr}, tuned {(name, seed): record}). train(name, lr, seed)."""
    with ThreadPoolExecutor(jobs) as pool:
        sweep = {(name, lr): pool.submit(train, name, lr, seeds[0]) for name in lrs for lr in lrs[name]}
        sweep = {key: future.result() for key, future in sweep.items()}
        best_lr = {name: pick_best({lr: final_loss(sweep[(name, lr)]) for lr in lrs[name]}) for name in lrs}
        tuned = {(name, seed): pool.submit(train, name, best_lr[name], seed) for name in lrs for seed in seeds}
        tuned = {key: future.result() for key, future in tuned.items()}
    return sweep, best_lr, tuned


def entry(record):
    """A run's record as the report keeps it."""
    loss = final_loss(record)
    return {"final_val_loss": loss if math.isfinite(loss) else None, "curve": record["curve"],
            "finished": record["finished"], "wall_s": record["wall_s"], "flags": record["flags"]}


def write_result(result, table, out, stem):
    """out/stem.json and out/stem.md, and the table printed."""
    with open(os.path.join(out, f"{stem}.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(out, f"{stem}.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    print(f"wall time {result['wall_s'] / 60:.1f} min; written to {out}")


def git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def plot(result, path):
    fig, (sweep_ax, curve_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = {"adamw": "tab:blue", "muon": "tab:red"}
    names = {"adamw": "AdamW (learning_rate)", "muon": "Muon (matrix_lr)"}
    for opt, sweep in result["sweep"].items():
        lrs = [float(lr) for lr in sweep]
        losses = [entry["final_val_loss"] for entry in sweep.values()]
        shown = [(lr, loss) for lr, loss in zip(lrs, losses) if loss is not None]
        sweep_ax.plot(*zip(*shown), "o-", color=colors[opt], label=names[opt])
        best = result["best_lr"][opt]
        sweep_ax.plot([best], [sweep[str(best)]["final_val_loss"]], "*", color=colors[opt], markersize=14)
    sweep_ax.set_xscale("log")
    sweep_ax.set_xlabel("peak lr")
    sweep_ax.set_ylabel(f"final val loss (seed {result['sweep_seed']})")
    sweep_ax.set_title("lr sweep (star: picked)")
    sweep_ax.legend()
    sweep_ax.grid(alpha=0.3, which="both")
    for opt, runs in result["tuned"].items():
        for i, (seed, run) in enumerate(runs.items()):
            steps, losses = zip(*run["curve"][1:])  # step 0 is the same init for both
            curve_ax.plot(steps, losses, color=colors[opt], alpha=0.7,
                          label=f"{opt} lr {result['best_lr'][opt]:g}" if i == 0 else None)
    if result["final_val_loss"]["adamw"] is not None:
        curve_ax.axhline(result["final_val_loss"]["adamw"]["mean"], color="gray", linestyle="--", linewidth=1,
                         label="tuned AdamW final (mean)")
    curve_ax.set_xlabel(f"step ({result['tokens_per_step']:,} tokens each)")
    curve_ax.set_ylabel("val loss")
    curve_ax.set_title(f"tuned runs, {len(result['seeds'])} seeds each")
    curve_ax.legend()
    curve_ax.grid(alpha=0.3)
    fig.suptitle(result["model"])
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)


def report(result):
    lines = ["| optimizer | lrs swept (final val loss) | best lr | final val loss over seeds |", "|---|---|---|---|"]
    for opt, sweep in result["sweep"].items():
        swept = ", ".join(f"{lr}: " + ("diverged" if e["final_val_loss"] is None else f"{e['final_val_loss']:.4f}")
                          for lr, e in sweep.items())
        final = result["final_val_loss"][opt]
        final = "a run diverged" if final is None else (f"{final['mean']:.4f} +- {final['std']:.4f} "
                                                        f"(min {final['min']:.4f}, max {final['max']:.4f})")
        lines.append(f"| {opt} | {swept} | {result['best_lr'][opt]:g} | {final} |")
    for opt, edge in result["best_at_edge"].items():
        if edge:
            lines.append(f"\n{opt}: the best lr is the sweep's {edge}; an lr beyond it may do better: extend the sweep")
    lines += ["", "| seed | adamw final val | muon final val | fraction of AdamW's steps Muon needs |",
              "|---|---|---|---|"]
    for seed in result["seeds"]:
        fraction = result["fraction"]["per_seed"][str(seed)]
        adamw, muon = (result["tuned"][opt][str(seed)]["final_val_loss"] for opt in ("adamw", "muon"))
        lines.append(f"| {seed} | {adamw if adamw is None else f'{adamw:.4f}'} | "
                     f"{muon if muon is None else f'{muon:.4f}'} | "
                     f"{'not reached' if fraction is None else f'{fraction:.3f}'} |")
    summary = result["fraction"]["summary"]
    lines.append("")
    lines.append("fraction: " + ("not reached on every seed" if summary is None else
                                 f"mean {summary['mean']:.3f}, std {summary['std']:.3f}, "
                                 f"min {summary['min']:.3f}, max {summary['max']:.3f}"))
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adamw_lrs", type=float, nargs="+", default=[6.7e-4, 2e-3, 6e-3, 1.8e-2])
    parser.add_argument("--muon_lrs", type=float, nargs="+", default=[3.3e-3, 0.01, 0.03, 0.09])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1337, 1338, 1339], help="the sweep uses the first")
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--n_layer", type=int, default=6)
    parser.add_argument("--n_head", type=int, default=4)
    parser.add_argument("--n_embd", type=int, default=128)
    parser.add_argument("--block_size", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--total_batch_size", type=int, default=1024)
    parser.add_argument("--eval_interval", type=int, default=10)
    parser.add_argument("--eval_iters", type=int, default=8, help="val micro-batches of batch_size sequences")
    parser.add_argument("--jobs", type=int, default=1, help="trainings at once (each on one torch thread when > 1)")
    parser.add_argument("--out", default="out/compare")
    args, args.train_flags = parser.parse_known_args(argv)
    bad = [flag for flag in args.train_flags if not flag.startswith("--") or "=" not in flag]
    if bad:
        parser.error(f"pass train.py's flags as --key=value, got {bad}")
    return args


def main(argv=None):
    args = parse_args(argv)
    started, commit = time.time(), git_commit()  # the commit that ran, not one made while it ran
    os.makedirs(args.out, exist_ok=True)
    threads = 1 if args.jobs > 1 else None
    lrs = {"adamw": args.adamw_lrs, "muon": args.muon_lrs}
    sweep_seed = args.seeds[0]

    def train(opt, lr, seed):
        return train_run(os.path.join(args.out, f"{opt}_lr{lr:g}_seed{seed}"), run_flags(opt, lr, seed, args),
                         threads)

    sweep_runs, best_lr, tuned = sweep_then_tune(train, lrs, args.seeds, args.jobs)

    curves = {opt: {seed: tuned[(opt, seed)]["curve"] for seed in args.seeds} for opt in lrs}
    fractions = step_fractions(curves["muon"], curves["adamw"])
    finals = {opt: [entry(tuned[(opt, seed)])["final_val_loss"] for seed in args.seeds] for opt in lrs}
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit,
        "command": " ".join(["python", "scripts/compare_optimizers.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": f"{platform.machine()} {platform.processor() or platform.platform()}, {os.cpu_count()} CPUs",
        "model": f"{args.n_layer} layers x {args.n_embd} ({args.n_head} heads), block {args.block_size}, "
                 f"{args.steps} steps x {args.total_batch_size:,} tokens",
        "tokens_per_step": args.total_batch_size, "steps": args.steps, "tokens": args.steps * args.total_batch_size,
        "val_tokens_per_eval": args.eval_iters * args.batch_size * args.block_size,
        "seeds": args.seeds, "sweep_seed": sweep_seed,
        "muon_adamw_half": {"learning_rate (biases, LayerNorm gains)": MUON_SCALAR_LR,
                            "embedding_lr, unembedding_lr": "train.py's defaults"},
        "sweep": {opt: {str(lr): entry(sweep_runs[(opt, lr)]) for lr in lrs[opt]} for opt in lrs},
        "best_lr": best_lr,
        "best_at_edge": {opt: sweep_edge(best_lr[opt], lrs[opt]) for opt in lrs},
        "tuned": {opt: {str(seed): entry(tuned[(opt, seed)]) for seed in args.seeds} for opt in lrs},
        "final_val_loss": {opt: spread(finals[opt]) for opt in lrs},
        "fraction": {"per_seed": {str(seed): fraction for seed, fraction in fractions.items()},
                     "summary": spread(list(fractions.values()))},
        "wall_s": round(time.time() - started, 1),
    }
    plot(result, os.path.join(args.out, "optimizer_comparison.png"))
    write_result(result, report(result), args.out, "optimizer_comparison")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except CompareError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
