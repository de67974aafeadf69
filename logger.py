"""Run logging on rank 0: one nanoGPT-style line per step, metrics.jsonl, and W&B.

Other ranks get a logger whose methods do nothing, so the training loop never asks who it is.
"""

import json
import math
import os


def resolve_wandb_mode(mode):
    """auto: online when logged in (WANDB_API_KEY or a ~/.netrc entry), else offline: no run fails for lack of an account."""
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = os.path.join(os.path.expanduser("~"), ".netrc")
    if os.path.isfile(netrc) and "api.wandb.ai" in open(netrc).read():
        return "online"
    return "offline"


def format_line(metrics):
    parts = [f"step {metrics['step']:5d}", f"loss {metrics['loss']:.4f}", f"lr {metrics['lr']:.4e}",
             f"norm {metrics['grad_norm']:.4f}", f"dt {metrics['dt_ms']:.0f}ms",
             f"tok/s {metrics['tokens_per_sec']:,.0f}"]
    if metrics.get("mfu") is not None:
        parts.append(f"mfu {100 * metrics['mfu']:.1f}%")
    return " | ".join(parts)


class Logger:
    def __init__(self, out_dir, enabled=True, wandb_mode="disabled", wandb_project=None, wandb_run_name=None,
                 config=None, wandb_run_id=None):
        self.enabled = enabled
        self.wandb = None
        self.wandb_run_id = wandb_run_id
        if not enabled:
            return
        os.makedirs(out_dir, exist_ok=True)
        self.metrics_path = os.path.join(out_dir, "metrics.jsonl")
        mode = resolve_wandb_mode(wandb_mode)
        if mode != "disabled":
            import wandb

            run = wandb.init(project=wandb_project, name=wandb_run_name or None, config=config, mode=mode,
                             dir=out_dir, id=wandb_run_id, resume="allow" if wandb_run_id else None)
            self.wandb = run
            self.wandb_run_id = run.id

    def print(self, *args, **kwargs):
        if self.enabled:
            print(*args, **kwargs, flush=True)

    def log(self, metrics):
        """One step's metrics: the stdout line, a metrics.jsonl line, and W&B."""
        if not self.enabled:
            return
        if "loss" in metrics:
            self.print(format_line(metrics))
        record = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log(wandb_keys(metrics), step=metrics["step"])

    def log_sample(self, step, text):
        if not self.enabled:
            return
        self.print(f"sample at step {step}: {text!r}")
        if self.wandb is not None:
            import wandb

            self.wandb.log({"samples": wandb.Table(columns=["step", "text"], data=[[step, text]])}, step=step)

    def finish(self):
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


WANDB_NAMES = {"loss": "train/loss", "grad_norm": "train/grad_norm", "lr": "train/lr",
               "tokens_per_sec": "train/tokens_per_sec", "mfu": "train/mfu", "val_loss": "val/loss",
               "hellaswag_acc_norm": "hellaswag/acc_norm", "hellaswag_acc": "hellaswag/acc"}


def wandb_keys(metrics):
    return {WANDB_NAMES[k]: v for k, v in metrics.items() if k in WANDB_NAMES and v is not None}
