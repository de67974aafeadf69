"""Plot one or several runs' metrics.jsonl into one PNG: losses, gradient norm, learning rate, throughput.

    python scripts/plot.py out/shakespeare                            # writes out/shakespeare/loss.png
    python scripts/plot.py out/run_a out/run_b --out compare.png      # metrics.jsonl files work too

Losses are drawn against steps and against tokens seen (from config.json beside metrics.jsonl).
"""

import argparse
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402


def refuse(message):
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def metrics_path(path):
    """A run folder's metrics.jsonl, or the file itself."""
    return os.path.join(path, "metrics.jsonl") if os.path.isdir(path) else path


def read_run(path):
    """(label, records, tokens per step or None) for a metrics.jsonl file or the run folder holding one."""
    path = metrics_path(path)
    if not os.path.isfile(path):
        refuse(f"{path} not found: pass a run's metrics.jsonl (train.py writes it in out_dir).")
    with open(path, "rb") as f:
        lines = [line for line in f.read().splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except ValueError:
            if number == len(lines):
                break  # the last line of a run killed while writing it
            record = None
        if not isinstance(record, dict) or "step" not in record:
            refuse(f"{path} line {number} is not a metrics record: pass a run's metrics.jsonl.")
        records.append(record)
    folder = os.path.dirname(os.path.abspath(path))
    tokens_per_step = None
    config_path = os.path.join(folder, "config.json")
    if os.path.isfile(config_path):
        with open(config_path) as f:
            tokens_per_step = json.load(f).get("total_batch_size")
    return os.path.basename(folder), records, tokens_per_step


def series(records, key):
    """Steps and values of `key`, skipping records without it or with null (non-finite) values."""
    points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
    return [p[0] for p in points], [p[1] for p in points]


def plot_runs(paths, out):
    runs = [read_run(path) for path in paths]
    figure, axes = plt.subplots(2, 3, figsize=(16, 8.5))
    (loss_steps, loss_tokens, norm), (lr, throughput, mfu) = axes
    for color, (label, records, tokens_per_step) in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"] * 9, runs):
        steps, loss = series(records, "loss")
        val_steps, val_loss = series(records, "val_loss")
        loss_steps.plot(steps, loss, color=color, alpha=0.6, linewidth=1, label=f"{label} train")
        loss_steps.plot(val_steps, val_loss, "o-", color=color, markersize=3, label=f"{label} val")
        if tokens_per_step:
            # train loss at step s comes after s + 1 steps of tokens; val loss at step s after s steps
            loss_tokens.plot([(s + 1) * tokens_per_step for s in steps], loss, color=color, alpha=0.6, linewidth=1,
                             label=f"{label} train")
            loss_tokens.plot([s * tokens_per_step for s in val_steps], val_loss, "o-", color=color, markersize=3,
                             label=f"{label} val")
        for axis, key in ((norm, "grad_norm"), (lr, "lr"), (throughput, "tokens_per_sec"), (mfu, "mfu")):
            x, y = series(records, key)
            if x:  # mfu is null on CPU: leave the panel saying n/a
                axis.plot(x, y, color=color, linewidth=1, label=label)
    titles = [(loss_steps, "loss", "step"), (loss_tokens, "loss", "tokens"), (norm, "gradient norm (pre-clip)", "step"),
              (lr, "learning rate", "step"), (throughput, "tokens/s", "step"), (mfu, "MFU (GPU only)", "step")]
    for axis, title, xlabel in titles:
        axis.set_title(title)
        axis.set_xlabel(xlabel)
        axis.grid(alpha=0.3)
        if axis.lines:
            axis.legend(fontsize=7)
        else:
            axis.text(0.5, 0.5, "n/a", ha="center", va="center", transform=axis.transAxes)
    figure.tight_layout()
    try:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        figure.savefig(out, dpi=100)
    except OSError as e:
        refuse(f"cannot write --out {out}: {e.strerror or e}. Choose a file in a folder you can write to.")
    finally:
        plt.close(figure)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="metrics.jsonl files or run folders")
    parser.add_argument("--out", help="PNG to write (default: loss.png beside the first run's metrics.jsonl)")
    args = parser.parse_args(argv)
    out = args.out or os.path.join(os.path.dirname(metrics_path(args.runs[0])), "loss.png")
    print(f"wrote {plot_runs(args.runs, out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
